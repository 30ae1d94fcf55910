"""Ray executor vs local executor on the same build: the overhead ratio (goal <= 1.10 on 2 cores).

Compares like with like, core for core:

* ``local`` (one process) against ``ray:1`` (a local Ray with ``num_cpus=1``): the same single core of
  work, so the ratio is the executor's own cost (Ray Data scheduling, pickling each shard group's samples
  between operators, the object store, worker processes);
* ``local:2`` (two processes over disjoint shard groups, the ideal 2-core split) against ``ray:2``.

Each mode runs in a fresh process and builds ``1 + --repeats`` times into fresh directories: ``cold`` (the
first build) and ``warm`` (the same build again). What the clock includes:

* cold ``local``: the build in the measuring process, which has imported ``layerloop.config`` and
  ``layerloop.pipelines.build`` before (so has every Ray mode): the stages' own imports and first calls
  (pymatting, numba's cached functions, pyarrow's first parquet write) are in it;
* cold ``ray:N``: the build after ``ray.init``: the driver's planning, then each worker's first task, which
  pays the first calls the local process pays, plus whatever of the worker's own start-up is not done yet:
  Ray prestarts a worker per CPU at ``ray.init``, and each imports the pipeline's modules and pymatting as
  it starts (``init_ray(preload=Pipeline.worker_imports())``, as a build starts its local Ray), which may
  still be running when the build begins;
* cold ``local:2``: the children are spawned, import layerloop and plan before a barrier; the clock starts
  when it opens, so their start-up and imports are not in the build time;
* warm: the same build again with the workers up (``local:2``: fresh children that ran one sample first).

**Start-up** is reported apart: ``ray.init`` for the Ray modes (through ``RayExecutor.init_ray`` with the
pipeline's preload, as a build starts its local Ray), the spawn-to-barrier time of the cold attempt for ``local:2`` (process start,
imports, planning), 0 for ``local``. The comparison table gives the warm ratio (goal <= 1.10), the cold
build ratio (start-up excluded; goal <= 1.15, issue #16
goal 3) and the cold end-to-end ratio (start-up + cold build for both sides). Demo scenes are rendered
once up front and shared by every build, so rendering is not timed. Libraries are pinned to one thread
(``--threads``), so a "core" is one core.

    python benchmarks/executor_overhead.py --n 128 --size 256 --samples-per-shard 8
    python benchmarks/executor_overhead.py --n 64 --size 512 --repeats 1 --rounds 5 --modes local:2 ray:2

``--rounds K`` runs every mode K times, interleaved (A, B, A, B, ...), each in a fresh process, and reports
medians over the rounds: one cold build per round, so cold numbers get K samples instead of one, and a load
that comes and goes on a shared machine falls on every mode alike.

Prints markdown tables; appends nothing anywhere.
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
def _tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) so far of this process and every descendant (Ray's raylet, GCS, agents and
    workers are the driver's descendants), by pid."""
    import psutil

    me = psutil.Process()
    seconds = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def _cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the process tree used since ``before`` (a process started since counts from zero)."""
    return sum(now - before.get(pid, 0.0) for pid, now in _tree_cpu().items())


def _local_child(config, out: str, part: int, processes: int, warm: bool, barrier, finished, cpu=None) -> None:
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
    started = time.process_time()
    for _ in LocalExecutor().run(pipeline, tasks[part::processes]):
        pass
    if cpu is not None:
        with cpu.get_lock():
            cpu.value += time.process_time() - started
    finished.wait()


def _local_processes(config, out: Path, processes: int, warm: bool) -> tuple[float, float, float]:
    """The local executor in ``processes`` processes over disjoint shard groups (round robin).

    Children are spawned, not forked: numba's OpenMP layer aborts a fork after it ran. Each child imports
    and plans, then all wait on a barrier; the clock starts when the barrier opens, so process start-up
    is excluded like Ray's start-up; it stops when every child has
    passed a second barrier after its last shard, so interpreter teardown (about a second with torch
    loaded) is excluded too, as Ray's workers stay up. ``warm``: each child first runs one sample through every stage
    and writes it to a throw-away shard (numba's cached functions loaded, pandas imported by pyarrow's
    first parquet write), as Ray's warm workers and the warm
    one-process build have done. Returns (build seconds, spawn-to-barrier seconds, CPU seconds of the
    children between the barriers)."""
    import multiprocessing

    out.mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    barrier, finished = context.Barrier(processes + 1), context.Barrier(processes + 1)
    cpu = context.Value("d", 0.0)
    workers = [context.Process(target=_local_child,
                               args=(config, str(out), part, processes, warm, barrier, finished, cpu))
               for part in range(processes)]
    spawned = time.perf_counter()
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
    return seconds, started - spawned, cpu.value


def run_one(mode: str, args: argparse.Namespace) -> dict:
    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    import cv2

    cv2.setNumThreads(args.threads)
    workdir = Path(args.workdir)
    config = load_config("demo", overrides(args, workdir / "scenes"))
    kind, _, count = mode.partition(":")
    cpus = int(count or 1)
    result: dict = {"mode": mode, "startup_s": 0.0, "builds_s": [], "cpu_s": []}
    if kind == "ray":  # started as a build starts its local instance
        from layerloop.pipelines.executors import RayExecutor
        from layerloop.pipelines.pipeline import Pipeline

        preload = Pipeline.from_config(config, workdir / "unused").worker_imports()  # what build() passes
        started = time.perf_counter()
        RayExecutor(config.ray.model_copy(update={"num_cpus": cpus})).init_ray(preload=preload)
        result["startup_s"] = time.perf_counter() - started
    for attempt in range(1 + args.repeats):
        out = workdir / f"{mode.replace(':', '-')}-{attempt}-{os.getpid()}"
        if kind == "local" and cpus > 1:
            seconds, spawn, cpu = _local_processes(config, out, cpus, warm=attempt > 0)
            if attempt == 0:
                result["startup_s"] = spawn
        else:
            before = _tree_cpu()
            started = time.perf_counter()
            outcome = build(config, out=out, executor=kind, progress=False)
            seconds = time.perf_counter() - started
            cpu = _cpu_since(before)
            result["ok"] = outcome.ok
        result["builds_s"].append(seconds)
        result["cpu_s"].append(cpu)
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
    p.add_argument("--rounds", type=int, default=1,
                   help="run every mode this many times, interleaved, each in a fresh process (one cold build per "
                        "round); the tables give medians over the rounds: on a shared machine, use 3 or more")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    return p


def setup(args: argparse.Namespace) -> None:
    for name in THREAD_VARS:  # before numpy/OpenCV/numba load; Ray's workers inherit them too
        os.environ[name] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.own_workdir = args.workdir is None  # a temporary one: removed at the end (every build is ~100 MB at 512 px)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="layerloop-bench-")


def summarise(runs: list[dict]) -> dict:
    """Medians over the rounds of one mode: start-up, cold build (one per round), start-up + cold build, and
    the warm builds of every round together."""
    colds = [run["builds_s"][0] for run in runs]
    warms = [seconds for run in runs for seconds in run["builds_s"][1:]]
    cpu_warm = [seconds for run in runs for seconds in run["cpu_s"][1:]]
    return {"startup": statistics.median(run["startup_s"] for run in runs), "colds": colds,
            "cpu_cold": statistics.median(run["cpu_s"][0] for run in runs),
            "cpu_warm": statistics.median(cpu_warm) if cpu_warm else None,
            "cold": statistics.median(colds),
            "end_to_end": statistics.median(run["startup_s"] + run["builds_s"][0] for run in runs),
            "warms": warms, "warm": statistics.median(warms) if warms else statistics.median(colds)}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return 0
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    try:
        render_scenes(args)
        for _ in range(args.rounds):  # interleaved: a load that comes and goes hits every mode alike
            for mode in args.modes:
                runs[mode].append(measure(mode, args))
    finally:
        if args.own_workdir:
            import shutil

            shutil.rmtree(args.workdir, ignore_errors=True)
    results = {mode: summarise(mode_runs) for mode, mode_runs in runs.items()}
    print(f"{args.n} samples at {args.size} px, {args.samples_per_shard} per shard; threads per library "
          f"{args.threads}; {args.rounds} round(s) of fresh processes, modes interleaved (medians over rounds); "
          f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f}\n")
    print("| mode | start-up s | cold build s (per round) | cold median s | start-up + cold s | warm builds s | "
          "warm median s | samples/s (warm) | CPU s cold / warm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, result in results.items():
        warm_cpu = f"{result['cpu_warm']:.1f}" if result["cpu_warm"] is not None else "-"
        print(f"| {mode} | {result['startup']:.2f} | {', '.join(f'{s:.2f}' for s in result['colds'])} | "
              f"{result['cold']:.2f} | {result['end_to_end']:.2f} | {', '.join(f'{s:.2f}' for s in result['warms'])} "
              f"| {result['warm']:.2f} | {args.n / result['warm']:.2f} | {result['cpu_cold']:.1f} / {warm_cpu} |")
    print("\nCPU s: user + system seconds of the build (medians over rounds), summed over every process of it (the "
          "driver and all its descendants, Ray's own processes and workers included; local:2: the two children "
          "between the barriers). Less sensitive to other tenants' load than wall time.")
    print("\n| comparison | warm ratio (<= 1.10) | cold build ratio (<= 1.15) | cold end-to-end ratio | cold CPU ratio |")
    print("|---|---:|---:|---:|---:|")
    pairs = [("ray:1", "local"), ("ray:2", "local:2"), ("ray:2", "local")]
    for ray_mode, local_mode in pairs:
        if ray_mode in results and local_mode in results:
            ray, local = results[ray_mode], results[local_mode]
            rc, rw, lc, lw = ray["cold"], ray["warm"], local["cold"], local["warm"]
            core_for_core = (ray_mode, local_mode) != ("ray:2", "local")
            label = f"{ray_mode} / {local_mode}" + ("" if core_for_core else " (2 CPUs vs 1 process; no goal)")
            print(f"| {label} | {rw / lw:.2f}{_verdict(rw / lw, 1.10, core_for_core)} | "
                  f"{rc / lc:.2f}{_verdict(rc / lc, 1.15, core_for_core)} | "
                  f"{ray['end_to_end'] / local['end_to_end']:.2f} | {ray['cpu_cold'] / local['cpu_cold']:.2f} |")
    return 0


def _verdict(ratio: float, goal: float, judged: bool = True) -> str:
    """Judged on the ratio as printed (two decimals)."""
    if not judged:
        return ""
    shown = round(ratio, 2)
    return " (met)" if shown <= goal else f" (missed by {100 * (shown - goal):.0f} points)"


if __name__ == "__main__":
    sys.exit(main())
