"""Is a model stage fed? The busy fraction of a model stage's actor pool behind the demo's CPU stages
(issue #16 goal 4: at least 0.90 of the build's wall time after start-up).

The build is ``configs/demo.yaml`` (load, trimap, matting, shadow, background, recompose, box-mask, caption)
with two benchmark-only stages appended (``benchmarks/pool_stages.py``): ``feed-stamp`` (records when a shard
group's CPU stages are done) and ``model-wait``, a stand-in for a GPU model that sleeps ``--waits`` seconds per
batch of ``--batch-size`` samples and declares ``gpus: 1`` as the real model stages of ``configs/rorem.yaml``
do (it runs in an actor pool of ``--concurrency`` actors under Ray). Each mode runs in a fresh process:

* ``local``: the local executor, one process (stages run one after the other: the "pool" waits for
  every CPU stage by construction; it gives the CPU chain's time per sample);
* ``ray:N``: a local Ray with ``num_cpus=N`` and one (simulated) GPU;
* ``cluster:N``: ``ray.cluster_utils.Cluster``, N nodes of one CPU each on this machine, the last with one
  (simulated) GPU.

Every Ray node gets a ``--object-store-mb`` object store (1000 MB): small enough that Ray Data's per-operator
object-store budgets bind within a build of a few hundred samples, as they do in a long build with the
default store (a shard group of 16 demo samples at 256 px is a 38 MB row). ``--before`` runs the executor
as it was before issue #16 goal 4 (one Ray Data call per stage actor at a time; no CPU planned for the shard
write after a last actor pool; rows carrying every ``work`` entry), for an A/B in one session; ``--keep-work``
only the last (the stand-in model reads no ``work``, as the caption and score stages that end a real build).

For each build: wall time of ``executor.run`` (Ray start-up excluded), start-up (build start to the first
model batch), and the pool's time after start-up split into busy (model batches), **waiting for input**
(the next shard group's CPU stages were not done yet when the actor finished the previous one), hand-over
(its input was done: pickling, object store, Ray Data scheduling, between batches), and tail (after the
last batch: the last shard's write, the end of the build). busy fraction = busy / (actors x (build end -
first batch start)). The first build of a mode is cold (Ray starts worker processes); goals are judged on
the warm builds after it. ``digest`` is a hash of the shard files: the same in every mode and wait.

    python benchmarks/model_pool.py --n 256 --size 256 --waits 0.2 0.8 1.2   # ~10 min on 2 shared cores
    python benchmarks/model_pool.py --n 256 --modes ray:2 cluster:3 --before

Prints markdown tables; writes nothing outside a temporary folder (removed at the end unless ``--workdir``,
which keeps each build's logs: model batches, feed stamps, shard reads and writes, for a timeline).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "OPENCV_FOR_THREADS_NUM")
GOAL = 0.90


# ------------------------------------------------------------------------ one build (in a mode's process)
def make_pipeline(args: argparse.Namespace, out: Path, log_dir: Path, wait: float):
    from pool_stages import BenchPipeline  # registers model-wait and feed-stamp

    from layerloop.config import BuildConfig, load_config_data

    data = load_config_data("demo", [f"source.n={args.n}", f"source.size={args.size}",
                                     f"source.path={Path(args.workdir) / 'scenes'}",
                                     f"stages.load.short_side={args.size}",
                                     f"shards.samples_per_shard={args.samples_per_shard}", "report.enabled=false"])
    data["stages"] += [{"stage": "feed-stamp", "log_dir": str(log_dir)},
                       {"stage": "model-wait", "wait_s": wait, "log_dir": str(log_dir), "gpus": args.gpus,
                        "batch_size": args.batch_size, "concurrency": args.concurrency}]
    config = BuildConfig.load(data)
    return config, BenchPipeline.from_config(config, out)


def shard_digest(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(out.glob("demo-*")):
        if path.suffix in (".tar", ".parquet"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def one_build(args: argparse.Namespace, executor, label: str, wait: float) -> dict:
    out = Path(args.workdir) / f"{label}-{os.getpid()}"
    log_dir = out.parent / (out.name + "-logs")
    log_dir.mkdir(parents=True)
    out.mkdir()
    config, pipeline = make_pipeline(args, out, log_dir, wait)
    pipeline.log_dir = str(log_dir)
    tasks = list(pipeline.plan().tasks)
    group_of = {item.key: task.index for task in tasks for item in task.items}
    started = time.time()
    summaries = list(executor.run(pipeline, tasks))
    ended = time.time()
    records: dict[str, list] = {"busy": [], "feed": [], "io": []}
    for path in sorted(log_dir.glob("*.jsonl")):
        kind = path.name.split("-")[0]
        if kind not in records:
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "start" in row or "ready" in row:
                row["actor"] = path.name
                row["group"] = group_of.get(row.get("key"), -1)
                records[kind].append(row)
    return {"label": label, "wait": wait, "started": started, "ended": ended, "records": records,
            "ok": sum(s.ok for s in summaries), "failed": sum(s.failed for s in summaries),
            "actors": len({r["actor"] for r in records["busy"]}), "digest": shard_digest(out)}


def start_ray(mode: str, args: argparse.Namespace):
    import ray

    kind, _, count = mode.partition(":")
    cpus = int(count or 2)
    store = args.object_store_mb * 1024**2
    if kind == "ray":
        ray.init(num_cpus=cpus, num_gpus=1, object_store_memory=store, include_dashboard=False,
                 log_to_driver=False)
        return None
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                             "object_store_memory": store})
    for node in range(1, cpus):
        cluster.add_node(num_cpus=1, num_gpus=1 if node == cpus - 1 else 0, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    import cv2

    from layerloop.pipelines import executors

    calls = 1 if args.before and not args.actor_calls else args.actor_calls
    if calls:  # A/B: the stage actors' Ray Data calls at once (1: as before issue #16 goal 4)
        import ray.data

        executors._actor_pool = lambda size: ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=calls)
    if args.before:  # the plan as before: no CPU kept for the write after a last actor pool
        planned = executors.plan_cpus
        executors.plan_cpus = lambda stages, groups, nodes: planned(stages, groups + [("tasks", [])], nodes)
    if args.before or args.keep_work:  # rows carry every work entry to the pool and the write, as before
        executors.work_read_by = lambda stages: None

    cv2.setNumThreads(args.threads)
    result: dict = {"mode": mode, "startup_s": 0.0, "builds": []}
    cluster = None
    if mode == "local":
        from layerloop.pipelines.executors import LocalExecutor

        executor = LocalExecutor()
    else:
        started = time.perf_counter()
        cluster = start_ray(mode, args)
        result["startup_s"] = time.perf_counter() - started
        from layerloop.config import RayConfig
        from layerloop.pipelines.executors import RayExecutor

        executor = RayExecutor(RayConfig())
    try:
        # cold: the first build of this process (fresh Ray workers, imports); then warm builds
        plan = [("cold", args.waits[0])] + [("warm", w) for w in args.waits for _ in range(args.repeats)]
        for number, (kind, wait) in enumerate(plan):
            build = one_build(args, executor, f"{mode.replace(':', '-')}-{number}", wait)
            build["kind"] = kind
            result["builds"].append(build)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    return result


# ------------------------------------------------------------------------------------ the pool's time
def analyse(build: dict) -> dict:
    """Split the pool's actor-seconds after the first batch started into busy / waiting for input /
    hand-over / tail (and a late-starting actor's head); they add up to actors x window."""
    busy_rows = sorted(build["records"]["busy"], key=lambda r: r["start"])
    if not busy_rows:
        return {"error": "no model batch was recorded"}
    ready = {}
    for row in build["records"]["feed"]:  # a retried task stamps twice: the first one counts
        ready[row["group"]] = min(ready.get(row["group"], row["ready"]), row["ready"])
    first = busy_rows[0]["start"]
    window = build["ended"] - first
    actors = sorted({r["actor"] for r in busy_rows})
    split = {"busy": 0.0, "waiting for input": 0.0, "hand-over": 0.0, "tail": 0.0, "head": 0.0}
    row_gaps = []  # idle time between two shard groups whose input was already computed
    for actor in actors:
        rows = [r for r in busy_rows if r["actor"] == actor]
        split["head"] += rows[0]["start"] - first
        for previous, row in zip([None] + rows[:-1], rows):
            split["busy"] += row["end"] - row["start"]
            if previous is None:
                continue
            gap = max(0.0, row["start"] - previous["end"])
            waiting = 0.0
            if row["group"] != previous["group"] and row["group"] in ready:
                waiting = min(gap, max(0.0, ready[row["group"]] - previous["end"]))
            split["waiting for input"] += waiting
            if row["group"] != previous["group"] and waiting == 0.0:
                row_gaps.append(gap)
            split["hand-over"] += gap - waiting
        split["tail"] += build["ended"] - rows[-1]["end"]
    capacity = len(actors) * window
    samples = sum(r["n"] for r in busy_rows)
    return {"wall_s": build["ended"] - build["started"], "startup_s": first - build["started"],
            "window_s": window, "actors": len(actors), "samples": samples,
            "busy_fraction": split["busy"] / capacity, **{k: v / capacity for k, v in split.items()},
            "model_s_per_sample": split["busy"] / samples,
            "row_gap_ms": 1000 * statistics.median(row_gaps) if row_gaps else float("nan"),
            "cpu_s_per_sample_local": (build["ended"] - build["started"] - split["busy"]) / samples}


# ---------------------------------------------------------------------------------------------- driver
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="samples per build")
    p.add_argument("--size", type=int, default=256, help="scene size and load.short_side, px")
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--waits", type=float, nargs="+", default=[0.2, 0.8, 1.2],
                   help="model seconds per batch; one warm build (x --repeats) per value")
    p.add_argument("--batch-size", type=int, default=8, help="model-wait batch size")
    p.add_argument("--concurrency", type=int, default=1, help="model-wait actors")
    p.add_argument("--gpus", type=float, default=1.0, help="GPUs each model-wait actor declares (simulated)")
    p.add_argument("--repeats", type=int, default=1, help="warm builds per wait")
    p.add_argument("--modes", nargs="+", default=["local", "ray:2", "cluster:3"])
    p.add_argument("--actor-calls", type=int, default=None,
                   help="override the executor's concurrent Ray Data calls per stage actor (1: one at a time)")
    p.add_argument("--before", action="store_true",
                   help="the executor as before issue #16 goal 4: one Ray Data call per stage actor at a time, and "
                        "no CPU planned for the shard write after a last actor pool")
    p.add_argument("--keep-work", action="store_true",
                   help="rows carry every work entry through the pool to the write (as before they were trimmed "
                        "to what later stages read); implied by --before")
    p.add_argument("--object-store-mb", type=int, default=1000, help="object store per Ray node")
    p.add_argument("--threads", type=int, default=1, help="threads per library")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    return p


def measure(mode: str, args: argparse.Namespace) -> dict:
    """One mode in a fresh process with a private, short RAY_TMPDIR (its Ray is not published machine-wide,
    where another session's address-less ray.init() could join it)."""
    command = [sys.executable, str(HERE / "model_pool.py"), "--one", mode, "--workdir", args.workdir,
               "--n", str(args.n), "--size", str(args.size), "--samples-per-shard", str(args.samples_per_shard),
               "--waits", *map(str, args.waits), "--batch-size", str(args.batch_size),
               "--concurrency", str(args.concurrency), "--gpus", str(args.gpus), "--repeats", str(args.repeats),
               "--object-store-mb", str(args.object_store_mb), "--threads", str(args.threads)]
    if args.actor_calls:
        command += ["--actor-calls", str(args.actor_calls)]
    if args.before:
        command.append("--before")
    if args.keep_work:
        command.append("--keep-work")
    with tempfile.TemporaryDirectory(prefix="llpool", dir="/tmp") as ray_tmp:
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in THREAD_VARS:  # before numpy/OpenCV/numba load; Ray's workers inherit them too
        os.environ[name] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.one, args)))
        return 0
    if args.workdir:
        return report(args)
    args.workdir = tempfile.mkdtemp(prefix="layerloop-pool-")
    try:
        return report(args)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


def report(args: argparse.Namespace) -> int:
    from layerloop.datasets.demo_scenes import generate_demo_data

    generate_demo_data(Path(args.workdir) / "scenes", n=args.n, seed=0, size=args.size)
    load_before = os.getloadavg()[0]
    results = []
    for mode in args.modes:
        results.append(measure(mode, args))
        print(f"{mode} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"{args.n} samples at {args.size} px, {args.samples_per_shard} per shard; model-wait: batch "
          f"{args.batch_size}, {args.concurrency} actor(s), {args.gpus:g} GPU each (simulated); threads per library "
          f"{args.threads}; executor: {'as before goal 4 (--before)' if args.before else 'current'}"
          f"{f', {args.actor_calls} Ray Data calls per stage actor' if args.actor_calls else ''}; "
          f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}\n")
    print("| mode | build | wait s/batch | model ms/sample | wall s | start-up s | ok | pool busy | waiting for "
          "input | hand-over | tail | hand-over per shard group, median ms | digest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    local_cpu: list[float] = []
    verdicts = []
    for result in results:
        for build in result["builds"]:
            a = analyse(build)
            if "error" in a:
                print(f"| {result['mode']} | {build['kind']} | {build['wait']:g} | | | | {build['ok']} | "
                      f"{a['error']} | | | | | {build['digest']} |")
                continue
            if result["mode"] == "local" and build["kind"] == "warm":
                local_cpu.append(a["cpu_s_per_sample_local"])
            print(f"| {result['mode']} | {build['kind']} | {build['wait']:g} | {1000 * a['model_s_per_sample']:.1f} | "
                  f"{a['wall_s']:.2f} | {a['startup_s']:.2f} | {build['ok']} | **{a['busy_fraction']:.1%}** | "
                  f"{a['waiting for input']:.1%} | {a['hand-over']:.1%} | {a['tail'] + a['head']:.1%} | "
                  f"{a['row_gap_ms']:.0f} | {build['digest']} |")
            if build["kind"] == "warm" and result["mode"] != "local":
                verdicts.append((result["mode"], build["wait"], a["busy_fraction"]))
    print()
    if local_cpu:
        print(f"CPU chain (local executor, warm builds, everything but the model, incl. read and shard write): "
              f"{', '.join(f'{1000 * c:.1f}' for c in local_cpu)} ms/sample on one core; the local executor runs "
              f"the stages one after the other, so its pool waits for every CPU stage by design")
    print("Ray start-up s: " + ", ".join(f"{r['mode']} {r['startup_s']:.2f}" for r in results if r["startup_s"]))
    for mode, wait, fraction in verdicts:
        model_ms = 1000 * wait / args.batch_size / args.concurrency
        print(f"goal (pool busy >= {GOAL:.0%} after start-up): {mode}, wait {wait:g} s ({model_ms:.1f} ms/sample): "
              f"{fraction:.1%}: {'met' if fraction >= GOAL else 'not met'}")
    digests = {b["digest"] for r in results for b in r["builds"]}
    print(f"shard digests: {'all equal' if len(digests) == 1 else 'DIFFER: ' + ', '.join(sorted(digests))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
