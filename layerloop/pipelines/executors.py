"""Executors run a pipeline's shard tasks: ``local`` in this process, ``ray`` on Ray Data.

Both yield one ``ShardSummary`` per committed shard, in completion order, and never hold more than the
summaries in the driver: samples travel from the source to the shard writer inside workers.

The Ray executor runs a pipeline of stateless stages only (the demo, most CPU builds) as plain Ray tasks,
one per shard group (read, stages, write, return the summary), at most two per CPU in flight: there is
nothing to stream between operators, and Ray Data's streaming executor only adds scheduling latency
(benchmarks/RESULTS.md). A pipeline with model stages streams shard groups through Ray Data, one row per
shard group:

    from_items(groups) -> [read + consecutive stateless CPU stages]  (tasks)
                       -> [a stage with setup() or GPUs]               (actor pool, model loaded once per actor)
                       -> ...                                          (alternating as the config orders them)
                       -> [write shard, return its summary]            (fused into the last task op,
                                                                        or a task after an actor pool)

Stateless stages are fused into one task per shard so the per-row overhead is paid once; stages that
load models or declare GPUs get their own actor pool (``num_gpus`` from the stage's resources, pool size
from its ``concurrency`` parameter). Rows carry the pickled samples of one group. Task retries and actor
restarts (``ray.max_task_retries`` / ``ray.actor_restarts``) cover dead workers and nodes; a shard written
twice by a retried task is written under a temporary name and committed by rename, so it is never
duplicated.

The pools hold their CPUs for the whole run, so the plan is sized (``plan_cpus``) on the alive nodes
without the largest one: when a node dies and Ray restarts its actors on the others, a task still finds a
CPU. A build that nonetheless makes no progress for ``LAYERLOOP_RAY_STALL_TIMEOUT_S`` (600 s; Ray Data's
no-progress guard) is planned again for the remaining shard groups when the cluster changed meanwhile,
and otherwise fails with ``BuildStalledError``, one message saying what the plan waits for.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import math
import os
import pickle
import sys
from itertools import islice
from typing import Any, Iterator, Sequence

from layerloop.config import RayConfig
from layerloop.datasets.shards import ShardSummary
from layerloop.pipelines import worker_preload
from layerloop.pipelines.pipeline import Pipeline, ShardTask
from layerloop.stages.base import Stage, keep_work, work_read_by

logger = logging.getLogger(__name__)


class LocalExecutor:
    name = "local"

    def run(self, pipeline: Pipeline, tasks: list[ShardTask]) -> Iterator[ShardSummary]:
        stages = pipeline.build_stages()
        for task in tasks:
            yield pipeline.run_group(task, stages)


# --------------------------------------------------------------------------- Ray
def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _rows(batch: dict) -> list[tuple[int, Any]]:
    return [(int(i), pickle.loads(p)) for i, p in zip(batch["shard"], batch["payload"])]


def _batch(rows: list[tuple[int, Any]]) -> dict:
    import numpy as np

    return {"shard": np.array([i for i, _ in rows], dtype=np.int64),
            "payload": np.array([_dumps(p) for _, p in rows], dtype=object)}


def pin_threads(cpus: float) -> None:
    """Give the libraries of a Ray worker as many threads as the CPUs its task or actor holds. Ray sets
    ``OMP_NUM_THREADS`` for OpenMP, but OpenCV's own pool and torch's intra-op pool default to every core
    of the node: two 1-CPU workers on 2 cores would then run 4+ compute threads and slow each other down.

    torch is pinned now when the worker has imported it, and otherwise the moment it is imported
    (``_TorchThreads``): a worker whose stages have no model never imports torch (1.5 s and 600 MB)."""
    threads = max(1, int(cpus))
    import cv2

    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)
    _TORCH_THREADS.pin(threads)


class _TorchThreads(importlib.abc.MetaPathFinder):
    """``torch.set_num_threads`` without importing torch: applied at once when torch is imported, else
    right after its import (this finder wraps the loader of torch's own spec, then steps aside), before
    any code can compute with it."""

    def __init__(self) -> None:
        self.threads: int | None = None

    def pin(self, threads: int) -> None:
        torch = sys.modules.get("torch")
        if torch is not None:
            _set_torch_threads(torch, threads)
            return
        self.threads = threads
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch" or self.threads is None:
            return None
        sys.meta_path.remove(self)  # once: torch's own finder answers from here on
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _PinAfterExec(spec.loader, self.threads)
        return spec


class _PinAfterExec(importlib.abc.Loader):
    def __init__(self, loader: Any, threads: int):
        self.loader, self.threads = loader, threads

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self.loader.exec_module(module)
        finally:  # the module keeps torch's own loader, as if imported without this
            module.__loader__ = module.__spec__.loader = self.loader
        _set_torch_threads(module, self.threads)


def _set_torch_threads(torch: Any, threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_TORCH_THREADS = _TorchThreads()


def _read_and_process(batch: dict, pipeline: Pipeline, stage_indices: list[int], read: bool,
                      write: bool = False, cpus: float = 1.0, keep: frozenset[str] | None = None) -> dict:
    """Task UDF: read a shard group's items (first op only), apply a run of stateless stages, and, when
    this is the last op, commit the shard and pass on only its summary (no extra hop for the samples);
    otherwise hand on only the ``work`` entries a later stage reads (``keep``)."""
    pin_threads(cpus)
    stages = pipeline.build_stages()
    chosen = [stages[i] for i in stage_indices]
    out = []
    for index, payload in _rows(batch):
        samples = pipeline.read(payload) if read else payload
        processed = Pipeline.process(samples, chosen)
        out.append((index, pipeline.write(index, processed) if write else keep_work(processed, keep)))
    return _batch(out)


def _shard_task(pipeline: Pipeline, task: ShardTask, cpus: float) -> ShardSummary:
    """Plain Ray task: one shard group from its items to its committed shard (``Pipeline.run_group``, as the
    local executor runs it); returns only the summary."""
    pin_threads(cpus)
    return pipeline.run_group(task, pipeline.build_stages())


def _write_shard(batch: dict, pipeline: Pipeline) -> dict:
    """Task UDF: commit each shard group and return only its summary to the driver."""
    return _batch([(index, pipeline.write(index, samples)) for index, samples in _rows(batch)])


class _StageActor:
    """Actor UDF: one stage with its model, set up once per actor."""

    def __init__(self, pipeline: Pipeline, stage_index: int, read: bool, cpus: float = 1.0,
                 keep: frozenset[str] | None = None):
        pin_threads(cpus)
        self.pipeline = pipeline
        self.stage: Stage = pipeline.build_stages()[stage_index]
        self.stage.ensure_setup()
        self.read = read
        self.keep = keep  # the work entries a later stage reads; the shard write reads none

    def __call__(self, batch: dict) -> dict:
        out = []
        for index, payload in _rows(batch):
            samples = self.pipeline.read(payload) if self.read else payload
            out.append((index, keep_work(Pipeline.process(samples, [self.stage]), self.keep)))
        return _batch(out)


def _actor_pool(size: int) -> Any:
    """A fixed pool of ``size`` stage actors, each taking two Ray Data calls at once. The stage still runs
    one call at a time, on one thread (Ray Data's single-threaded UDF wrapper); the second call only lets
    Ray Data turn the next row's block into a batch, and the previous output into a block, while the model
    computes, instead of between its batches (benchmarks/model_pool.py: a model pool's median idle time
    between two 16-sample shard groups at 256 px went from 105-298 ms to 69-142 ms). A Ray without
    ``max_concurrent_calls_per_actor``: one call at a time, as before."""
    import ray.data

    try:
        return ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=2)
    except TypeError:
        return ray.data.ActorPoolStrategy(size=size)


def stage_groups(stages: list[Stage]) -> list[tuple[str, list[int]]]:
    """Split the stage list into runs: ("tasks", [i, j, ...]) of stateless CPU stages and
    ("actor", [k]) for each stage that needs setup or GPUs."""
    groups: list[tuple[str, list[int]]] = []
    for i, stage in enumerate(stages):
        if stage.needs_actor:
            groups.append(("actor", [i]))
        elif groups and groups[-1][0] == "tasks":
            groups[-1][1].append(i)
        else:
            groups.append(("tasks", [i]))
    return groups


# --------------------------------------------------------------------------- planning the CPUs of a Ray Data plan
STALL_TIMEOUT_ENV = "LAYERLOOP_RAY_STALL_TIMEOUT_S"
_WRITE_CPUS = 0.5  # the shard write task after a last actor pool
DEFAULT_STALL_TIMEOUT_S = 600.0


def handed_on(stages: list[Stage], groups: list[tuple[str, list[int]]], position: int) -> frozenset[str] | None:
    """The ``work`` keys the op at ``position`` hands on: those the stages of the later ops read (None, every
    key, when one of them does not declare its reads; none before the shard write). A row is pickled and
    unpickled twice per op, and after matting ``work`` is three quarters of it: at 256 px, a 16-sample row
    of 38 MB becomes 13 MB (issue #16 goal 4, benchmarks/model_pool.py)."""
    return work_read_by([stages[i] for _, later in groups[position + 1:] for i in later])


class BuildStalledError(RuntimeError):
    """A Ray Data build made no progress for the stall timeout and the cluster cannot run its plan."""


def stall_timeout() -> float:
    """Seconds without any progress after which a Ray Data build gives up instead of waiting forever
    (``LAYERLOOP_RAY_STALL_TIMEOUT_S``; it also bounds how long a model may take to load in an actor)."""
    return float(os.environ.get(STALL_TIMEOUT_ENV) or DEFAULT_STALL_TIMEOUT_S)


def alive_node_cpus() -> list[float]:
    """CPUs of each alive node that has any, from the GCS's node table (``ray.nodes()``). A killed node
    stays in ``ray.cluster_resources()`` until the GCS declares it dead, and a plan sized on it asks for
    CPUs that are gone."""
    import ray

    return sorted((float(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                   if n.get("Alive") and n["Resources"].get("CPU", 0) > 0), reverse=True)


def _pools(stages: list[Stage], groups: list[tuple[str, list[int]]]) -> list[tuple[str, int, float]]:
    return [(stages[i[0]].name, stages[i[0]].params.concurrency or 1, stages[i[0]].resources.cpus)
            for kind, i in groups if kind == "actor"]


def _task_cpus(stages: list[Stage], groups: list[tuple[str, list[int]]]) -> float:
    return max((stages[i].resources.cpus for kind, idx in groups if kind == "tasks" for i in idx), default=1.0)


def plan_cpus(stages: list[Stage], groups: list[tuple[str, list[int]]], node_cpus: list[float]) -> float | None:
    """The CPU fraction every op of a Ray Data plan asks for, or None to ask for the stages' own CPUs.

    Every actor pool holds its actors' CPUs for the whole run, and Ray restarts an actor whose node died
    on the nodes that are left. The pools plus one task to feed them must therefore fit the cluster
    *without its largest node* (all of it when it has one node): sized on every CPU, a plan that used
    them all (generator + scorer + dedupe actors and a task on three 1-CPU nodes) had, after a node died,
    its restarted actor take the last free CPU, and the tasks between the pools waited forever for one.
    When an actor pool is the last op, the shard write after it is one more task, which must fit on the
    whole cluster (Ray Data reserves each op's CPUs on every alive CPU): on 2 CPUs, a model actor (1 CPU)
    and a stage task (1 CPU) left Ray Data no CPU to reserve for the write op, so shards were written only
    once every stage task had finished; meanwhile the pool's outputs filled the object store and, once its
    budget bound, the model stage idled between shard groups (benchmarks/model_pool.py, RESULTS.md).
    When the pools do not fit, every op, tasks and actors alike, asks for the same fraction of a CPU, 1/m,
    with m the smallest integer that fits them all: equal fractions of whole-CPU nodes cannot fragment (a
    node's free share is always a multiple of 1/m), so whatever is left anywhere can run the next task."""
    pools = _pools(stages, groups)
    if not pools:
        return None
    actors = sum(n for _, n, _ in pools)
    wanted = sum(n * cpus for _, n, cpus in pools)
    task = _task_cpus(stages, groups)
    writes = 1 if groups[-1][0] == "actor" else 0  # the write task after a last actor pool
    total = sum(node_cpus)
    budget = total - max(node_cpus) if len(node_cpus) > 1 else total
    if wanted + task <= budget and wanted + task + writes * _WRITE_CPUS <= total:
        return None
    quantum = 1.0 / math.ceil((actors + 1 + writes) / max(budget, 1.0))
    logger.warning("the stage actor pools ask for %.1f CPUs and a task for %.1f more; the cluster has %.0f CPUs on "
                   "%d node(s)%s: every op asks for %.2f CPU instead, so that every pool can start and a task "
                   "still finds room%s", wanted, task, total, len(node_cpus),
                   f", {budget:.0f} without its largest" if len(node_cpus) > 1 else "", quantum,
                   " after a node dies" if len(node_cpus) > 1 else "")
    return quantum


def _is_stall(error: BaseException) -> bool:
    seen = 0
    while error is not None and seen < 10:
        if type(error).__name__ == "ExecutionTimeoutError":
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def stall_message(stages: list[Stage], groups: list[tuple[str, list[int]]], quantum: float | None,
                  planned: list[float], alive: list[float], timeout: float, detail: str = "") -> str:
    """One line that says why a build stopped (what the plan waits for, what the cluster has), then
    Ray Data's list of the operators still running."""
    try:
        import ray

        free = ray.available_resources()
        gpus_alive = sum(float(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001 - only for the message
        free, gpus_alive = {}, float("nan")
    pools = _pools(stages, groups)
    gpu = {stages[i[0]].name: stages[i[0]].resources.gpus for kind, i in groups if kind == "actor"}
    described = ", ".join(f"{name} {n} x {quantum or cpus:g} CPU" + (f" + {gpu[name]:g} GPU" if gpu[name] else "")
                          for name, n, cpus in pools)
    task = quantum or _task_cpus(stages, groups)
    need = sum(n * (quantum or cpus) for _, n, cpus in pools) + task
    need_gpus = sum(n * gpu[name] for name, n, _ in pools)
    change = ("unchanged" if alive == planned else
              f"now {sum(alive):g} CPUs on {len(alive)} nodes alive")
    head = (f"Ray Data build made no progress for {timeout:.0f} s: its actor pools ({described}) and a task "
            f"({task:g} CPU) need {need:g} CPUs" + (f" and {need_gpus:g} GPUs" if need_gpus else "") +
            f"; the cluster had {sum(planned):g} CPUs on {len(planned)} nodes when planned ({change}), "
            f"{float(free.get('CPU', 0)):g} CPU free" +
            (f", {gpus_alive:g} GPUs alive ({float(free.get('GPU', 0)):g} free)" if need_gpus else ""))
    ops = [line.strip() for line in detail.splitlines() if line.strip().startswith("- ")]
    return "\n".join([head, *ops[:8]])


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (nothing when ``value`` is None), as it was after."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class RayExecutor:
    name = "ray"

    def __init__(self, config: RayConfig | None = None):
        self.config = config or RayConfig()

    def init_ray(self, preload: Sequence[str] = ()) -> None:
        """Connect to ``ray.address`` (or ``RAY_ADDRESS``), else start a local Ray. ``preload``: modules every
        worker of a local Ray imports as it starts (``Pipeline.worker_imports``; ``worker_preload.py``); a
        cluster's workers were started by ``ray start`` and are left as they are."""
        import ray

        if ray.is_initialized():
            return
        from layerloop import logs

        address = self.config.address or os.environ.get("RAY_ADDRESS")
        # From the CLI without -v, Ray's driver-side output (its loggers, the core worker's C++ lines on the
        # stderr descriptor, the workers' output) goes to OUT/logs/ray.log instead of the terminal
        # (layerloop/logs.py); the workers' own logs stay in Ray's session directory, which that file names.
        quiet = logs.quiet_ray() is not None
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
        if address:
            kwargs["address"] = address
        else:
            kwargs["include_dashboard"] = False
            if self.config.num_cpus:
                kwargs["num_cpus"] = self.config.num_cpus
            if preload:
                kwargs["_system_config"] = {"preload_python_modules": [worker_preload.__name__]}
        logger.info("starting Ray%s", f" (connecting to {address})" if address else " (a local instance)")
        # The local Ray's processes take this environment when ray.init starts them; the driver's is restored.
        with _environment(worker_preload.PRELOAD_ENV, ",".join(preload) if preload and not address else None):
            try:
                ray.init(**kwargs)
            except ValueError as error:
                # Without an address ray.init joins a Ray that ``ray start`` left running on this machine, and
                # refuses a system config for it: join it as before, its workers as they are.
                if "_system_config" not in kwargs or "_system_config" not in str(error):
                    raise
                del kwargs["_system_config"]
                ray.init(**kwargs)
        logs.note_ray_session()

    def run(self, pipeline: Pipeline, tasks: list[ShardTask]) -> Iterator[ShardSummary]:
        if not tasks:
            return
        # Ray Data is imported where it is used (``_run_dataset``): a pipeline of stateless stages runs as plain
        # tasks and does not need it, and importing it took about 1 s of the driver's time before the first
        # task of a cold build (issue #16, goal 3). The CLI's ``logs.quiet_ray`` still imports it, to
        # configure its logging before ``ray.init``.
        self.init_ray()
        stages = pipeline.build_stages()
        groups = stage_groups(stages) or [("tasks", [])]  # no stages at all: still read
        if len(groups) == 1 and groups[0][0] == "tasks":
            yield from self._run_tasks(pipeline, tasks, stages)
            return
        remaining = {task.index: task for task in tasks}
        replans = 0
        while remaining:
            nodes = alive_node_cpus()
            plan = plan_cpus(stages, groups, nodes)
            done_before = len(remaining)
            try:
                for summary in self._run_dataset(pipeline, list(remaining.values()), stages, groups, plan):
                    remaining.pop(summary.index, None)
                    yield summary
            except Exception as error:
                if not _is_stall(error):
                    raise
                now = alive_node_cpus()
                message = stall_message(stages, groups, plan, nodes, now, stall_timeout(), str(error))
                if now == nodes or not now or replans >= 3:
                    raise BuildStalledError(message) from None
                # The cluster changed under the plan (a node died or joined): plan again for what it has now
                # and run the shard groups not committed yet (a committed one is skipped by its writer).
                replans += 1
                logger.warning("%s; planning again for the %d shard groups left (%d done in that attempt)",
                               message.splitlines()[0], len(remaining), done_before - len(remaining))

    def _run_dataset(self, pipeline: Pipeline, tasks: list[ShardTask], stages: list[Stage],
                     groups: list[tuple[str, list[int]]], quantum: float | None) -> Iterator[ShardSummary]:
        import ray
        import ray.data

        task_args: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy",
                                     "compute": ray.data.TaskPoolStrategy(size=self._task_concurrency(len(tasks)))}
        actor_args: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy"}
        if self.config.max_task_retries is not None:
            task_args["max_retries"] = self.config.max_task_retries
            actor_args["max_task_retries"] = self.config.max_task_retries
        if self.config.actor_restarts is not None:
            actor_args["max_restarts"] = self.config.actor_restarts

        dataset = ray.data.from_items(
            [{"shard": task.index, "payload": _dumps(task.items)} for task in tasks],
            override_num_blocks=len(tasks),
        )
        # This build's own settings, on the dataset's copy of the DataContext (every dataset derived from it
        # shares that copy): the process's current context, which other datasets of the process (a user's, a
        # reader's, the next build's) copy from, is left as it was.
        context = dataset.context
        context.enable_progress_bars = False  # the CLI shows one bar over shards instead
        context.max_errored_blocks = 0
        if hasattr(context, "execution_no_progress_timeout_s"):  # Ray >= 2.5x: fail instead of waiting forever
            context.execution_no_progress_timeout_s = stall_timeout()
        write_in_last = groups[-1][0] == "tasks"  # fuse the write into the last task op when there is one
        for position, (kind, indices) in enumerate(groups):
            read = position == 0
            cpus = quantum or max((stages[i].resources.cpus for i in indices), default=1.0)
            keep = handed_on(stages, groups, position)
            if kind == "tasks":
                write = write_in_last and position == len(groups) - 1
                dataset = dataset.map_batches(
                    _read_and_process, fn_kwargs={"pipeline": pipeline, "stage_indices": indices, "read": read,
                                                  "write": write, "cpus": cpus, "keep": keep},
                    num_cpus=cpus, **task_args)
            else:
                stage = stages[indices[0]]
                dataset = dataset.map_batches(
                    _StageActor, fn_constructor_kwargs={"pipeline": pipeline, "stage_index": indices[0],
                                                        "read": read, "cpus": cpus, "keep": keep},
                    num_cpus=cpus, num_gpus=stage.resources.gpus or None,
                    memory=stage.resources.memory,
                    compute=_actor_pool(stage.params.concurrency or 1), **actor_args)
        if not write_in_last:  # the last op is an actor pool: commit in a small task after it
            dataset = dataset.map_batches(_write_shard, fn_kwargs={"pipeline": pipeline},
                                          num_cpus=quantum or _WRITE_CPUS, **task_args)
        for row in dataset.iter_rows():
            yield pickle.loads(row["payload"])

    def _run_tasks(self, pipeline: Pipeline, tasks: list[ShardTask], stages: list[Stage]) -> Iterator[ShardSummary]:
        """A pipeline of stateless stages only: one plain Ray task per shard group (read, stages, write),
        at most two per CPU in flight. Ray Data's streaming executor adds nothing here but scheduling
        latency between tasks (benchmarks/RESULTS.md); Ray core retries a task whose worker or node died."""
        import ray

        cpus = max((stage.resources.cpus for stage in stages), default=1.0)
        retries = self.config.max_task_retries if self.config.max_task_retries is not None else -1
        remote = ray.remote(_shard_task).options(num_cpus=cpus, max_retries=retries, retry_exceptions=False)
        pipeline_ref = ray.put(pipeline)
        window = max(1, 2 * self._task_concurrency(len(tasks)))
        pending: list[Any] = []
        queue = iter(tasks)
        while True:
            pending += [remote.remote(pipeline_ref, task, cpus) for task in islice(queue, window - len(pending))]
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)

    @staticmethod
    def _task_concurrency(num_tasks: int) -> int:
        cpus = int(sum(alive_node_cpus()) or 1)
        return max(1, min(num_tasks, cpus))
