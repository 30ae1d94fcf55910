"""Scaling from 1 to 2 cores: the same build on one core and on two, with both executors.

* ``local`` vs ``local:2``: the local executor in one process, then in two processes over disjoint
  shard groups (the ideal split: no coordination at all);
* ``ray:1`` vs ``ray:2``: the Ray executor on a local Ray with ``num_cpus`` 1, then 2.

Measurements come from ``executor_overhead.py`` (same method: fresh process per mode, Ray start-up and
process start-up excluded, one cold build then warm builds, one thread per library). Before them, two
calibrations run the same work in one and in two processes: a compute-bound pure-Python loop and a
memory-bound numpy loop over 512 px float images. On a shared VM, two busy processes do not get two
cores' worth of work done (other tenants, one memory bus), and those ceilings bound every speedup below.

    python benchmarks/core_scaling.py --n 64 --size 512

Prints a markdown table; appends nothing anywhere.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import executor_overhead  # noqa: E402  (a sibling script, not a package)


def burn(scale: float = 1.0) -> float:
    """Compute-bound: a pure-Python loop that lives in the core's caches."""
    started = time.perf_counter()
    total = 0
    for i in range(int(6_000_000 * scale)):
        total += i * i
    return time.perf_counter() - started


def stream_arrays(scale: float = 1.0) -> float:
    """Memory-bound: numpy passes over a 512 x 512 x 3 float64 image (6 MiB, larger than the caches),
    the access pattern of the stages at 512 px."""
    import numpy as np

    image = np.random.default_rng(0).random((512, 512, 3))
    started = time.perf_counter()
    for _ in range(int(150 * scale)):
        image = np.clip((image * 0.5 + 0.25) ** 2, 0.0, 1.0)
    return time.perf_counter() - started


def calibrate(work, repeats: int = 3) -> tuple[float, float]:
    """(one-process seconds, two-process wall seconds) for the same work, best of ``repeats``."""
    one = min(work() for _ in range(repeats))
    two = float("inf")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(work, [0.01, 0.01], chunksize=1)  # untimed: start both workers, import numpy there
        for _ in range(repeats):
            started = time.perf_counter()
            pool.map(work, [1.0, 1.0], chunksize=1)
            two = min(two, time.perf_counter() - started)
    return one, two


def main(argv: list[str] | None = None) -> int:
    parser = executor_overhead.parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(n=64, size=512, repeats=1)
    args = parser.parse_args(argv)
    executor_overhead.setup(args)
    ceilings = {}
    for label, work in (("compute-bound (pure-Python loop)", burn), ("memory-bound (numpy, 6 MiB arrays)",
                                                                       stream_arrays)):
        one, two = calibrate(work)
        ceilings[label] = (one, two, 2 * one / two)  # work two processes do in the time one does half of it
    ceiling = max(c for _, _, c in ceilings.values())
    executor_overhead.render_scenes(args)
    results = {mode: executor_overhead.measure(mode, args) for mode in args.modes}

    print(f"{args.n} samples at {args.size} px, {args.samples_per_shard} per shard; one thread per library; "
          f"load average after: {os.getloadavg()[0]:.2f}\n")
    for label, (one, two, value) in ceilings.items():
        print(f"calibration, {label}: 1 process {one:.2f} s, 2 processes doing the same {two:.2f} s wall "
              f"-> 2-core ceiling {value:.2f}x")
    print(f"(the last column divides by the larger ceiling, {ceiling:.2f}x)\n")
    print("| executor | 1 core warm s | 2 cores warm s | speedup | efficiency | speedup / machine ceiling | "
          "cold 1 -> 2 s |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for single, double in (("local", "local:2"), ("ray:1", "ray:2")):
        if single in results and double in results:
            (c1, w1), (c2, w2) = (executor_overhead.summarise(results[m]) for m in (single, double))
            speedup = w1 / w2
            print(f"| {single.split(':')[0]} | {w1:.2f} | {w2:.2f} | {speedup:.2f}x | {speedup / 2:.0%} | "
                  f"{speedup / ceiling:.0%} | {c1:.2f} -> {c2:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
