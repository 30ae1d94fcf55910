"""Shard read throughput: raw tar + PNG decode of a run's shards vs ``layerloop.datasets.shards.read_samples``
and vs the training loader ``layerloop.datasets.stream.ShardStream`` when it exists (goal for both: >= 0.9
of raw).

* raw: the standard library's ``tarfile`` streams each shard and every ``.png`` member is decoded to a
  numpy array with Pillow; ``json``/``txt`` members are read but not parsed. This is the floor any loader
  pays: I/O plus PNG decompression, nothing else.
* read_samples: ``webdataset.WebDataset`` (no decoder) grouping members by key, then
  ``LayeredSample.from_wds`` decoding every image member in its schema mode and parsing the metadata.
* ShardStream: opening the stream (its index over the shards) plus one epoch's worth of shuffled draws,
  each a seek and read of one sample's members, batches of 16.

Shards are built first (demo scenes, local executor) unless ``--shards DIR`` names a run directory. Each
reader makes ``--passes`` passes after one untimed pass that warms the page cache; the best pass counts
(other processes on the machine only ever slow a pass down). One thread.

    python benchmarks/shard_read.py --n 128 --size 256

Prints a markdown table; appends nothing anywhere.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
              "OPENCV_FOR_THREADS_NUM"):
    os.environ.setdefault(_name, "1")  # one core: before numpy and friends are imported


def raw_read(tars: list[Path]) -> int:
    import numpy as np
    from PIL import Image

    keys = set()
    for path in tars:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    np.asarray(Image.open(io.BytesIO(data)))
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def layerloop_read(run_dir: Path) -> int:
    from layerloop.datasets.shards import read_samples

    return sum(1 for _ in read_samples(run_dir))


def stream_read(run_dir: Path, samples: int, batch_size: int = 16) -> int:
    """The training loader: ``ShardStream`` over the run, one epoch's worth of draws (shuffled, so the
    reads seek across shards); opening it (the index over the shards' parquet and tar headers) is timed
    too, since every training job pays it."""
    from layerloop.datasets.stream import ShardStream, WeightedShards

    stream = ShardStream([WeightedShards(run_dir=str(run_dir), name="bench")], batch_size=batch_size,
                         shuffle_buffer=64, seed=0)
    count = 0
    while count < samples:
        count += len(stream.next_batch())
    return count


def has_stream() -> bool:
    try:
        import layerloop.datasets.stream  # noqa: F401
    except ImportError:
        return False
    return True


def timed(fn, passes: int) -> tuple[float, int]:
    fn()  # untimed: warms the page cache and imports
    best, count = float("inf"), 0
    for _ in range(passes):
        started = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - started)
    return best, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="samples to build when --shards is not given")
    parser.add_argument("--size", type=int, default=256, help="scene size, px")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--shards", default=None, help="an existing run directory to read instead")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args(argv)

    if args.shards:
        run_dir = Path(args.shards)
    else:
        from layerloop.config import load_config
        from layerloop.pipelines.build import build

        run_dir = Path(tempfile.mkdtemp(prefix="layerloop-read-")) / "run"
        build(load_config("demo", [f"source.n={args.n}", f"source.size={args.size}",
                                   f"stages.load.short_side={args.size}",
                                   f"shards.samples_per_shard={args.samples_per_shard}", "report.enabled=false",
                                   "executor=local"]), out=run_dir, progress=False)
    from layerloop.datasets.shards import shard_paths

    tars = shard_paths(run_dir)
    megabytes = sum(p.stat().st_size for p in tars) / 1e6
    rows = [("raw tar + PNG decode", *timed(lambda: raw_read(tars), args.passes)),
            ("shards.read_samples", *timed(lambda: layerloop_read(run_dir), args.passes))]
    if has_stream():
        expected = rows[0][2]
        rows.append(("datasets.stream.ShardStream (training loader)",
                     *timed(lambda: stream_read(run_dir, expected), args.passes)))

    print(f"{len(tars)} shards, {megabytes:.1f} MB, {args.size} px; best of {args.passes} passes; "
          f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| reader | samples | best pass s | samples/s | MB/s | vs raw |")
    print("|---|---:|---:|---:|---:|---:|")
    raw_seconds = rows[0][1]
    for name, seconds, count in rows:
        print(f"| {name} | {count} | {seconds:.3f} | {count / seconds:.1f} | {megabytes / seconds:.1f} | "
              f"{raw_seconds / seconds:.2f} |")
    ratio = raw_seconds / rows[1][1]
    print(f"\nread_samples / raw throughput: {ratio:.2f} (goal >= 0.90: {'met' if ratio >= 0.9 else 'missed'})")
    if len(rows) > 2:
        ratio = raw_seconds / rows[2][1]
        print(f"training loader / raw throughput: {ratio:.2f} (goal >= 0.90: {'met' if ratio >= 0.9 else 'missed'})")
    else:
        print("training loader: layerloop/datasets/stream.py is not in this checkout; not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
