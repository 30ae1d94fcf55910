"""Peak driver memory of a build, and whether it grows with the number of samples.

A thread in the driver polls its own resident set size (``/proc/self/statm`` via psutil, every
``--interval`` s) while ``build()`` runs. The same build at two sizes (default 250 and 1,000 samples at
128 px) must show the same peak above the pre-build baseline: the driver only ever holds shard summaries,
never the samples themselves (Ray workers are separate processes and are not counted; under the local
executor the driver is also the worker, so its figure includes one shard group in flight).

Each (executor, n) runs in a fresh process; scenes are rendered up front and shared, so rendering is
neither timed nor counted.

    python benchmarks/build_memory.py --sizes 250 1000 --executors ray local

Prints a markdown table; appends nothing anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1024**2


class RssSampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - start, self.process.memory_info().rss))
            self._halt.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join()
        return self.samples


def run_one(executor: str, n: int, args: argparse.Namespace) -> dict:
    import psutil

    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    config = load_config("demo", [f"source.n={n}", f"source.size={args.px}", f"stages.load.short_side={args.px}",
                                  f"source.path={Path(args.workdir) / f'scenes-{n}'}",
                                  f"shards.samples_per_shard={args.samples_per_shard}", "report.enabled=false",
                                  f"ray.num_cpus={args.cpus}"])
    if executor == "ray":
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    baseline = psutil.Process().memory_info().rss
    sampler = RssSampler(args.interval)
    sampler.start()
    started = time.perf_counter()
    result = build(config, out=Path(args.workdir) / f"run-{executor}-{n}", executor=executor, progress=False)
    seconds = time.perf_counter() - started
    samples = sampler.stop()
    rss = [value for _, value in samples]
    quarter = [rss[min(len(rss) - 1, int(len(rss) * q))] for q in (0.25, 0.5, 0.75)] + [rss[-1]]
    return {"executor": executor, "n": n, "ok": result.ok, "failed": result.failed, "seconds": seconds,
            "baseline": baseline, "peak": max(rss), "quarters": quarter, "polls": len(rss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000], help="samples per build")
    parser.add_argument("--executors", nargs="+", default=["ray", "local"], choices=["ray", "local"])
    parser.add_argument("--px", type=int, default=128, help="scene size and load.short_side")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between RSS polls")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--one", nargs=2, metavar=("EXECUTOR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="layerloop-memory-")

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return 0

    from layerloop.datasets.demo_scenes import generate_demo_data

    for n in args.sizes:
        generate_demo_data(Path(args.workdir) / f"scenes-{n}", n=n, seed=0, size=args.px)
    results = []
    for executor in args.executors:
        for n in args.sizes:
            command = [sys.executable, str(HERE / "build_memory.py"), "--one", executor, str(n), "--workdir",
                       args.workdir, "--px", str(args.px), "--samples-per-shard", str(args.samples_per_shard),
                       "--cpus", str(args.cpus), "--interval", str(args.interval)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"{executor} n={n} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))

    print(f"{args.px} px, {args.samples_per_shard} samples per shard, Ray num_cpus {args.cpus}; driver RSS polled "
          f"every {args.interval} s; load average after: {os.getloadavg()[0]:.2f}\n")
    print("| executor | samples | build s | RSS before MiB | peak MiB | peak - before MiB | "
          "RSS at 25/50/75/100% of the build MiB |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        quarters = " / ".join(f"{q / MB:.0f}" for q in r["quarters"])
        print(f"| {r['executor']} | {r['n']} ({r['ok']} ok) | {r['seconds']:.1f} | {r['baseline'] / MB:.0f} | "
              f"{r['peak'] / MB:.0f} | {(r['peak'] - r['baseline']) / MB:.1f} | {quarters} |")
    print()
    for executor in args.executors:
        mine = sorted((r for r in results if r["executor"] == executor), key=lambda r: r["n"])
        if len(mine) >= 2:
            small, large = mine[0], mine[-1]
            growth = (large["peak"] - large["baseline"]) - (small["peak"] - small["baseline"])
            print(f"{executor}: {large['n']} vs {small['n']} samples: peak above baseline differs by "
                  f"{growth / MB:+.1f} MiB ({growth / (large['n'] - small['n']) / 1024:+.2f} KiB per extra sample)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
