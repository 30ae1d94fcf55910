"""Ray executor vs local executor on the same build: the overhead ratio (goal <= 1.10 on 2 cores).

Compares like with like, core for core:

* ``local`` (one process) against ``ray:1`` (a local Ray with ``num_cpus=1``): the same single core of
  work, so the ratio is the executor's own cost (Ray Data scheduling, pickling each shard group's samples
  between operators, the object store, worker processes);
* ``local:2`` (two processes over disjoint shard groups, the ideal 2-core split) against ``ray:2``.

Ray start-up (``ray.init``) is reported apart and excluded. Each mode runs in a fresh process and builds
twice into fresh directories: ``cold`` (the first build: Ray starts its worker processes, which import
layerloop, webdataset and torch) and ``warm`` (the same build again, workers already up); the goal is
judged on warm builds. Demo scenes are rendered once up front and shared by every build, so rendering is
not timed. Libraries are pinned to one thread (``--threads``), so a "core" is one core.

    python benchmarks/executor_overhead.py --n 128 --size 256 --samples-per-shard 8

Prints a markdown table; appends nothing anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "OPENCV_FOR_THREADS_NUM")


def overrides(args: argparse.Namespace, scenes: Path) -> list[str]:
    return [f"source.n={args.n}", f"source.size={args.size}", f"source.path={scenes}",
            f"stages.load.short_side={args.size}", f"shards.samples_per_shard={args.samples_per_shard}",
            "report.enabled=false"]


# ------------------------------------------------------------------- one measurement (child process)
def _local_child(config, out: str, part: int, processes: int, warm: bool, barrier, finished) -> None:
    from layerloop.pipelines.executors import LocalExecutor
    from layerloop.pipelines.pipeline import Pipeline

    pipeline = Pipeline.from_config(config, out)
    tasks = list(pipeline.plan().tasks)
    if warm:  # one sample through every stage and a throw-away shard (pyarrow imports pandas on first write)
        from layerloop.datasets.shards import ShardWriter

        scratch = Path(out) / f"warmup-{part}"
        scratch.mkdir()
        ShardWriter(scratch, "warmup").write(0, pipeline.process(pipeline.read(tasks[0].items[:1]),
                                                                 pipeline.build_stages()))
    barrier.wait()
    for _ in LocalExecutor().run(pipeline, tasks[part::processes]):
        pass
    finished.wait()


def _local_processes(config, out: Path, processes: int, warm: bool) -> float:
    """The local executor in ``processes`` processes over disjoint shard groups (round robin).

    Children are spawned, not forked: numba's OpenMP layer aborts a fork after it ran. Each child imports
    and plans, then all wait on a barrier; the clock starts when the barrier opens, so process start-up
    is excluded like Ray's start-up; it stops when every child has
    passed a second barrier after its last shard, so interpreter teardown (about a second with torch
    loaded) is excluded too, as Ray's workers stay up. ``warm``: each child first runs one sample through every stage
    and writes it to a throw-away shard (numba's cached functions loaded, pandas imported by pyarrow's
    first parquet write), as Ray's warm workers and the warm
    one-process build have done."""
    import multiprocessing

    out.mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    barrier, finished = context.Barrier(processes + 1), context.Barrier(processes + 1)
    workers = [context.Process(target=_local_child,
                               args=(config, str(out), part, processes, warm, barrier, finished))
               for part in range(processes)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=300)
    started = time.perf_counter()
    finished.wait(timeout=600)  # a child that died never arrives: the timeout raises instead of hanging
    seconds = time.perf_counter() - started
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a local worker process exited with {worker.exitcode}")
    return seconds


def run_one(mode: str, args: argparse.Namespace) -> dict:
    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    import cv2

    cv2.setNumThreads(args.threads)
    workdir = Path(args.workdir)
    config = load_config("demo", overrides(args, workdir / "scenes"))
    kind, _, count = mode.partition(":")
    cpus = int(count or 1)
    result: dict = {"mode": mode, "startup_s": 0.0, "builds_s": []}
    if kind == "ray":
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        result["startup_s"] = time.perf_counter() - started
    for attempt in range(1 + args.repeats):
        out = workdir / f"{mode.replace(':', '-')}-{attempt}-{os.getpid()}"
        if kind == "local" and cpus > 1:
            seconds = _local_processes(config, out, cpus, warm=attempt > 0)
        else:
            started = time.perf_counter()
            outcome = build(config, out=out, executor=kind, progress=False)
            seconds = time.perf_counter() - started
            result["ok"] = outcome.ok
        result["builds_s"].append(seconds)
    return result


def measure(mode: str, args: argparse.Namespace) -> dict:
    """Run one mode in a fresh Python process (so Ray's CPU count and every cache start the same)."""
    command = [sys.executable, str(HERE / "executor_overhead.py"), "--one", mode, "--workdir", args.workdir,
               "--n", str(args.n), "--size", str(args.size), "--samples-per-shard", str(args.samples_per_shard),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def render_scenes(args: argparse.Namespace) -> None:
    from layerloop.datasets.demo_scenes import generate_demo_data

    generate_demo_data(Path(args.workdir) / "scenes", n=args.n, seed=0, size=args.size)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="samples per build")
    p.add_argument("--size", type=int, default=256, help="scene size and load.short_side, px")
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="warm builds after the cold one")
    p.add_argument("--threads", type=int, default=1, help="threads per library")
    p.add_argument("--modes", nargs="+", default=["local", "ray:1", "local:2", "ray:2"])
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    return p


def setup(args: argparse.Namespace) -> None:
    for name in THREAD_VARS:  # before numpy/OpenCV/numba load; Ray's workers inherit them too
        os.environ[name] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="layerloop-bench-")


def summarise(result: dict) -> tuple[float, float]:
    """(cold seconds, median warm seconds)."""
    cold, warm = result["builds_s"][0], result["builds_s"][1:]
    return cold, statistics.median(warm) if warm else cold


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return 0
    render_scenes(args)
    results = {mode: measure(mode, args) for mode in args.modes}
    print(f"{args.n} samples at {args.size} px, {args.samples_per_shard} per shard; threads per library "
          f"{args.threads}; load average before: {os.getloadavg()[0]:.2f}\n")
    print("| mode | Ray start-up s | cold build s | warm builds s | warm median s | samples/s (warm) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, result in results.items():
        cold, warm = summarise(result)
        print(f"| {mode} | {result['startup_s']:.2f} | {cold:.2f} | "
              f"{', '.join(f'{s:.2f}' for s in result['builds_s'][1:])} | {warm:.2f} | {args.n / warm:.2f} |")
    print("\n| comparison | cold ratio | warm ratio | goal |")
    print("|---|---:|---:|---|")
    for ray_mode, local_mode in (("ray:1", "local"), ("ray:2", "local:2")):
        if ray_mode in results and local_mode in results:
            (rc, rw), (lc, lw) = summarise(results[ray_mode]), summarise(results[local_mode])
            verdict = "met" if rw / lw <= 1.10 else f"missed by {100 * (rw / lw - 1.10):.0f} points"
            print(f"| {ray_mode} / {local_mode} | {rc / lc:.2f} | {rw / lw:.2f} | <= 1.10 ({verdict}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
