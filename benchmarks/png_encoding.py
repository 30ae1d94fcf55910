"""PNG encoders and levels on the demo chain's real images, against the naive floor (issue #16, goal 1).

Renders demo scenes, runs the demo stages once (untimed) to get each sample's five images (composite,
background, foreground RGBA, box mask, object mask: what the shard writer encodes), then times:

* encoders: PIL ``compress_level`` 0-9, OpenCV ``imencode`` levels and strategies, and whichever of
  ``imagecodecs`` (libpng, libspng), ``fpng`` and a numpy-filtered writer over ``zlib`` / ``zlib_ng`` /
  ``isal`` / ``deflate`` (libdeflate) are importable (none is a dependency; missing ones are skipped and
  named). Each encoder's output is decoded once and compared with its input (lossless check);
* the naive floor: PIL-decode each sample's source and mask files, PIL-encode its five images at the
  default level (6), nothing else;
* the whole local build (one process, ``executor=local``) with the given ``shards.png_encoder`` and
  ``shards.png_compress_level`` (``--builds``): one untimed cold build, then ``--repeats`` warm builds into fresh directories.

Every library is pinned to one thread (``--threads``), as in the other benchmarks. Times are medians of
``--repeats`` passes over all images.

    python benchmarks/png_encoding.py --n 16 --size 512 --repeats 5 --builds pil:6 opencv:1 opencv:2

Prints markdown tables; writes only scratch files in a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's layerloop, not another install

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "OPENCV_FOR_THREADS_NUM")


def pin_threads(threads: int) -> None:
    for name in THREAD_VARS:  # before numpy/OpenCV/numba load
        os.environ[name] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------ encoders
def _pil(level: int):
    from PIL import Image

    def encode(array, mode):
        buffer = io.BytesIO()
        Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    return encode


def _cv2(level: int, strategy: str = "DEFAULT", filt: str | None = None):
    import cv2

    params = [cv2.IMWRITE_PNG_COMPRESSION, level,
              cv2.IMWRITE_PNG_STRATEGY, getattr(cv2, f"IMWRITE_PNG_STRATEGY_{strategy}")]
    if filt is not None:
        params += [cv2.IMWRITE_PNG_FILTER, getattr(cv2, f"IMWRITE_PNG_{filt}")]
    swap = {"RGB": cv2.COLOR_RGB2BGR, "RGBA": cv2.COLOR_RGBA2BGRA}

    def encode(array, mode):
        image = cv2.cvtColor(array, swap[mode]) if mode in swap else array
        ok, data = cv2.imencode(".png", image, params)
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        return data.tobytes()
    return encode


def _imagecodecs(kind: str, level: int, **extra):
    import imagecodecs

    fn = imagecodecs.png_encode if kind == "png" else imagecodecs.spng_encode
    return lambda array, mode: bytes(fn(array, level=level, **extra))


def _fpng():
    """fpng encodes RGB/RGBA only: the two L images go through PIL at level 1 (counted in the time)."""
    import importlib
    import types

    sys.modules.setdefault("lazy_loader", types.SimpleNamespace(load=importlib.import_module))
    from fpng import fpng_ext

    fpng_ext.init()
    channels = {"RGB": 3, "RGBA": 4}
    fallback = _pil(1)

    def encode(array, mode):
        if mode not in channels:
            return fallback(array, mode)
        height, width = array.shape[:2]
        return bytes(fpng_ext.encode_image_to_memory(array.tobytes(), width, height, channels[mode]))
    return encode


_PNG_COLOR = {"L": (1, 0), "RGB": (3, 2), "RGBA": (4, 6)}


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def filter_rows(array, filt: str):
    """PNG scanlines (filter byte + filtered row) with one filter for every row, vectorised in numpy:
    ``sub``, ``up``, ``avg`` or ``paeth``. Encoding filters read only raw bytes, so they vectorise (decoding
    is the sequential direction). uint8 arithmetic wraps, which is the PNG filters' mod-256 arithmetic."""
    import numpy as np

    height = array.shape[0]
    bpp = 1 if array.ndim == 2 else array.shape[2]
    raw = array.reshape(height, -1)
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    if filt == "sub":
        code, body = 1, raw - left
    elif filt == "up":
        code, body = 2, raw - up
    elif filt == "avg":
        code, body = 3, raw - ((left.astype(np.uint16) + up) >> 1).astype(np.uint8)
    else:  # paeth
        upleft = np.zeros_like(raw)
        upleft[1:, bpp:] = raw[:-1, :-bpp]
        a, b, c = left.astype(np.int16), up.astype(np.int16), upleft.astype(np.int16)
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        code, body = 4, raw - pred
    out = np.empty((height, raw.shape[1] + 1), np.uint8)
    out[:, 0] = code
    out[:, 1:] = body
    return out.tobytes()


_filtered_rows = filter_rows


def _handmade(compress, filt: str):
    """A minimal PNG writer: numpy-filtered scanlines compressed by ``compress`` (a zlib stream)."""
    def encode(array, mode):
        height, width = array.shape[:2]
        _, color = _PNG_COLOR[mode]
        header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
        data = compress(_filtered_rows(array, filt))
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    return encode


def encoders(levels: list[int]) -> tuple[dict, list[str]]:
    table: dict = {}
    skipped: list[str] = []
    for level in range(10):
        table[f"PIL compress_level={level}"] = _pil(level)
    for level in levels:
        table[f"cv2 level={level}"] = _cv2(level)
    for strategy in ("FILTERED", "HUFFMAN_ONLY", "RLE", "FIXED"):
        table[f"cv2 level=1 {strategy}"] = _cv2(1, strategy)
    table["cv2 level=1 RLE, SUB filter"] = _cv2(1, "RLE", "FILTER_SUB")
    table["cv2 level=1 FAST_FILTERS"] = _cv2(1, "DEFAULT", "FAST_FILTERS")
    try:
        import imagecodecs  # noqa: F401

        for level in (1, 3, 6):
            table[f"imagecodecs png (libpng) level={level}"] = _imagecodecs("png", level)
        table["imagecodecs png level=1 RLE SUB"] = _imagecodecs("png", 1, strategy=3, filter=16)
        for level in (1, 6):
            table[f"imagecodecs spng level={level}"] = _imagecodecs("spng", level)
    except ImportError:
        skipped.append("imagecodecs")
    try:
        table["fpng (L via PIL 1)"] = _fpng()
    except ImportError:
        skipped.append("fpng")
    from layerloop.samples import encode_png

    for level in (1, 2, 3, 6):
        table[f"layerloop opencv (samples.encode_png) level={level}"] = (
            lambda array, mode, level=level: encode_png(array, mode, level, "opencv"))
    for filt in ("sub", "up", "avg", "paeth"):
        for level in (1, 2, 3, 6):
            table[f"numpy {filt} + zlib {level}"] = _handmade(lambda data, level=level: zlib.compress(data, level), filt)
    try:
        from zlib_ng import zlib_ng

        for level in (1, 2, 6):
            table[f"numpy up + zlib-ng {level}"] = _handmade(lambda d, level=level: zlib_ng.compress(d, level), "up")
    except ImportError:
        skipped.append("zlib-ng")
    try:
        from isal import isal_zlib

        for level in (0, 1, 2):
            table[f"numpy up + isal {level}"] = _handmade(lambda d, level=level: isal_zlib.compress(d, level), "up")
    except ImportError:
        skipped.append("isal")
    try:
        import deflate

        for level in (1, 3, 6):
            table[f"numpy up + libdeflate {level}"] = _handmade(lambda d, level=level: deflate.zlib_compress(d, level), "up")
    except ImportError:
        skipped.append("deflate (libdeflate)")
    return table, skipped


# ---------------------------------------------------------------------------------------- the inputs
def demo_samples(args, scratch: Path):
    """(final samples, scene items) of the demo chain at ``args.size``; stages run once, untimed."""
    from layerloop.config import load_config
    from layerloop.pipelines.pipeline import Pipeline
    from layerloop.stages.base import run_stage

    config = load_config("demo", [f"source.n={args.n}", f"source.size={args.size}", f"source.path={scratch / 'scenes'}",
                                  f"stages.load.short_side={args.size}", "executor=local"])
    (scratch / "probe").mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.from_config(config, scratch / "probe")
    items = [item for task in pipeline.plan().tasks for item in task.items]
    samples = pipeline.read(items)
    for stage in pipeline.build_stages():
        samples = run_stage(stage, samples)
    return [s for s in samples if s.ok]


def images_of(samples):
    from layerloop.samples import IMAGE_MEMBERS

    out = []
    for sample in samples:
        for attr, mode, _ in IMAGE_MEMBERS.values():
            value = getattr(sample, attr)
            if value is not None:
                import numpy as np

                out.append((np.ascontiguousarray(value), mode))
    return out


def scene_files(scenes: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for source in sorted((scenes / "source").iterdir()):
        masks = sorted((scenes / "mask").glob(source.stem + ".*"))
        pairs.append((source, masks[0]))
    return pairs


# ------------------------------------------------------------------------------------------ timings
def time_encoder(encode, images, repeats: int) -> tuple[float, int]:
    encode(*images[0])  # warm: imports, tables
    times = []
    size = 0
    for _ in range(repeats):
        started = time.perf_counter()
        size = sum(len(encode(array, mode)) for array, mode in images)
        times.append(time.perf_counter() - started)
    return statistics.median(times), size


def check_lossless(encode, images) -> bool:
    import numpy as np
    from PIL import Image

    for array, mode in images[:5]:
        decoded = np.asarray(Image.open(io.BytesIO(encode(array, mode))).convert(mode))
        if not np.array_equal(decoded, array):
            return False
    return True


def naive_floor(pairs, images_per_sample, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds for all samples, medians: PIL-decode source and mask, PIL-encode the five images
    at level 6."""
    import numpy as np
    from PIL import Image

    encode = _pil(6)

    def one_pass():
        for (source, mask), images in zip(pairs, images_per_sample):
            with Image.open(source) as im:
                np.asarray(im.convert("RGB"))
            with Image.open(mask) as im:
                np.asarray(im.convert("L"))
            for array, mode in images:
                encode(array, mode)

    one_pass()
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        one_pass()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def local_builds(args, scratch: Path, spec: str, tag: int = 0) -> tuple[float, list[float], list[float]]:
    """``spec`` is ENCODER:LEVEL (``shards.png_encoder`` / ``shards.png_compress_level``), optionally followed by
    comma-separated config overrides (``opencv:1,stages.trimap.band=0.02``); every build goes into a fresh
    directory (``tag`` keeps a repeated spec from resuming an earlier one)."""
    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    overrides = [f"source.n={args.n}", f"source.size={args.size}", f"source.path={scratch / 'scenes'}",
                 f"stages.load.short_side={args.size}", f"shards.samples_per_shard={args.samples_per_shard}",
                 "report.enabled=false"]
    encoding, *extra = spec.split(",")
    encoder, _, level = encoding.partition(":")
    overrides += [f"shards.png_encoder={encoder}", f"shards.png_compress_level={level}", *extra]
    config = load_config("demo", overrides)
    times, cpus = [], []
    for attempt in range(1 + args.repeats):
        out = scratch / f"build-{tag}-{encoder}-{level}-{attempt}"
        started, cpu = time.perf_counter(), time.process_time()
        outcome = build(config, out=out, executor="local", progress=False)
        times.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
        if not outcome.ok:
            raise RuntimeError(f"build {spec} failed")
    return times[0], times[1:], cpus[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="samples (scenes)")
    parser.add_argument("--size", type=int, default=512, help="scene size and load.short_side, px")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes / warm builds (median shown)")
    parser.add_argument("--threads", type=int, default=1, help="threads per library")
    parser.add_argument("--cv2-levels", type=int, nargs="*", default=[0, 1, 2, 3, 6, 9])
    parser.add_argument("--builds", nargs="*", default=["pil:6", "opencv:1", "opencv:2"],
                        help="ENCODER:LEVEL[,OVERRIDE...] of the whole local builds (shards.png_encoder, "
                             "png_compress_level, other config overrides; none: skip the builds)")
    parser.add_argument("--only", nargs="*", default=None, help="encoder names to time (substring match)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    pin_threads(args.threads)

    import cv2

    from layerloop.datasets.demo_scenes import generate_demo_data

    cv2.setNumThreads(args.threads)
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="layerloop-png-"))
    generate_demo_data(scratch / "scenes", n=args.n, seed=0, size=args.size)
    samples = demo_samples(args, scratch)
    per_sample = [images_of([s]) for s in samples]
    images = [image for group in per_sample for image in group]
    count = len(samples)
    print(f"{count} samples at {args.size} px, {len(images)} images; threads per library: {args.threads}; "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.2f} at start\n")

    table, skipped = encoders(args.cv2_levels)
    if args.only:
        table = {k: v for k, v in table.items() if any(part in k for part in args.only)}
    base_time, base_size = time_encoder(table.get("PIL compress_level=6", _pil(6)), images, args.repeats)
    print("| encoder | ms/sample (5 images) | shard image MB | time vs PIL 6 | size vs PIL 6 | lossless |")
    print("|---|---:|---:|---:|---:|---|")
    for name, encode in table.items():
        seconds, size = time_encoder(encode, images, args.repeats)
        lossless = "yes" if check_lossless(encode, images) else "**NO**"
        print(f"| {name} | {1000 * seconds / count:.1f} | {size / 1e6:.2f} | {seconds / base_time:.2f} | "
              f"{size / base_size:.2f} | {lossless} |", flush=True)
    if skipped:
        print(f"\nnot importable here (skipped): {', '.join(skipped)}")

    pairs = scene_files(scratch / "scenes")
    kept = {s.meta.get("source_id") for s in samples}
    pairs = [p for p in pairs if p[0].stem in kept] if kept - {None} else pairs[:count]
    floor_wall, floor_cpu = (t / count for t in naive_floor(pairs[:count], per_sample, args.repeats))
    print(f"\nnaive floor (PIL-decode source + mask, PIL-encode 5 images at level 6): wall {1000 * floor_wall:.1f}, "
          f"CPU {1000 * floor_cpu:.1f} ms/sample; load average {os.getloadavg()[0]:.2f}")
    if args.builds:
        print("\nWarm builds alternate with floor passes (the floor is re-measured before each build spec), so the ratio's "
              "two sides see the same load. Ratios: median build / median floor, per sample.\n")
        print("| build (local, 1 process) | cold s | warm wall s (each) | wall ms/sample | CPU ms/sample | "
              "floor wall / CPU ms | **wall ratio** | **CPU ratio** |")
        print("|---|---:|---|---:|---:|---|---:|---:|")
        for tag, spec in enumerate(args.builds):
            floor_w, floor_c = (t / count for t in naive_floor(pairs[:count], per_sample, args.repeats))
            cold, warm, cpus = local_builds(args, scratch, spec, tag)
            wall_ms, cpu_ms = 1000 * statistics.median(warm) / count, 1000 * statistics.median(cpus) / count
            print(f"| {spec} | {cold:.2f} | {', '.join(f'{w:.2f}' for w in warm)} | {wall_ms:.1f} | {cpu_ms:.1f} | "
                  f"{1000 * floor_w:.1f} / {1000 * floor_c:.1f} | **{wall_ms / (1000 * floor_w):.2f}** | "
                  f"**{cpu_ms / (1000 * floor_c):.2f}** |", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
