"""Build throughput to an S3 endpoint against local disk (issue #17; goal: ratio >= 0.9).

Starts moto's standalone S3 server on 127.0.0.1 in its own process (a free port; fake credentials in this process's
environment, the instance-metadata lookup disabled: nothing else is contacted), renders demo scenes once
(``layerloop demo-data``), builds once to each (untimed: imports, the S3 session), then builds the same
config with the local executor alternately into a fresh
local directory and a fresh S3 prefix (``--rounds`` pairs, interleaved so that other load on the machine
hits both alike). Each build's samples/s is what ``BuildResult.samples_per_second`` reports (the whole
build: listing, stages, shard commits, run records). The ratio is median S3 throughput over median local
throughput; it also checks that both give the same shard bytes.

    python benchmarks/storage_throughput.py --n 64 --size 256 --rounds 3

The store is a local server, so this measures layerloop's commit path on a store (spooling, PUTs, index
checks, the lease), not a network: a remote bucket adds its bandwidth and latency.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's layerloop, not another install


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                      AWS_CONFIG_FILE=os.devnull)
    # The server runs in its own process, as a real store runs elsewhere: in this process its request
    # handling would take the GIL from the build it serves.
    import socket
    import subprocess
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        import boto3

        from layerloop.config import load_config
        from layerloop.datasets.demo_scenes import generate_demo_data
        from layerloop.pipelines.build import build

        for _ in range(200):
            try:
                boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        with tempfile.TemporaryDirectory(prefix="layerloop-storage-bench-") as scratch:
            scenes = Path(scratch) / "scenes"
            generate_demo_data(scenes, n=args.n, seed=0, size=args.size)
            overrides = [f"source.n={args.n}", f"source.size={args.size}", f"source.path={scenes}",
                         f"stages.load.short_side={args.size}", f"shards.samples_per_shard={args.samples_per_shard}",
                         "executor=local", "report.enabled=false"]
            config = load_config("demo", overrides)
            build(config, out=Path(scratch) / "warm", progress=False)  # imports, caches: untimed
            build(config, out="s3://bench/warm", progress=False)  # the S3 session, once per process: untimed
            local, store, first = [], [], None
            for round_ in range(args.rounds):
                out = Path(scratch) / f"local-{round_}"
                result = build(config, out=out, progress=False)
                local.append(result.samples_per_second)
                url = f"s3://bench/run-{uuid.uuid4().hex[:8]}"
                remote = build(config, out=url, progress=False)
                store.append(remote.samples_per_second)
                if first is None:
                    from layerloop.storage import location

                    first = all((location(url) / p.name).read_bytes() == p.read_bytes()
                                for p in out.iterdir() if p.name.startswith("demo-"))
                print(f"round {round_}: local {local[-1]:.2f} samples/s, s3 {store[-1]:.2f} samples/s", flush=True)
        ratio = statistics.median(store) / statistics.median(local)
        print("\n| n | size | local samples/s (median) | S3 samples/s (median) | ratio S3/local | same bytes |")
        print("|---|---|---|---|---|---|")
        print(f"| {args.n} | {args.size} | {statistics.median(local):.2f} | {statistics.median(store):.2f} | "
              f"{ratio:.3f} | {first} |")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
