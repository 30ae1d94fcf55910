"""``layerloop self-improve CONFIG --rounds N``: train, generate, score, filter, feed back, N times.

Layout of the output directory (``OUT``)::

    selfimprove.json          the config and its fingerprint (a different config is refused)
    events.jsonl              one line per step start / done / skip, with seconds
    data/<name>/              base and held builds the loop ran itself (``build:`` entries)
    rounds/round-NNN/
        mix.json              the training mix: base data + every earlier round's accepted shards, weights
        train/                the training run (metrics.jsonl, checkpoints/, final/ with checkpoint_hash.txt)
        eval/, eval.json      with an ``evaluation``: the LoRA on the fixed held-out set (``evaluation.py``)
        candidates/           generation + scoring build over the held inputs (kind=candidate shards)
        scores.parquet        one row per candidate: scores, accepted, the accepting rule, rejection reasons
        rejected.parquet      the rejected candidates and their reasons
        accepted/             the accepted samples (BFS: kind=quadruple, decomposition: kind=rendered), lineage
        round.json            counts, policy, checkpoint hash, the mix
        report/               round report (index.html, scores/accepted/rejected/loss PNGs, stats.json)
        steps/<step>.json     written when a step finished: the unit of resumption
    report/                   the cross-round report (acceptance, score drift, loss curves)

Steps of round k: ``mix`` -> ``train`` (-> ``evaluate``) -> ``generate`` -> ``filter`` -> ``report``; after the last round,
``summary``. Before round 0, ``data`` builds the base and held data that name a build config, and with a
``pretrain`` section ``pretrain`` trains the base the rounds' LoRAs adapt (``OUT/pretrain``).

Resumption: a step is finished exactly when its ``steps/<step>.json`` marker exists; a re-run skips it. An
interrupted ``train`` resumes from its newest checkpoint and an interrupted ``generate`` from its committed
shards (both already resume on their own); ``mix``, ``filter`` and ``report`` write their outputs under
temporary names and are simply redone.

Execution: with ``executor: ray`` every step is a task of one Ray task graph, submitted at once (each
step's task takes its predecessor's ObjectRef as an argument, so Ray starts it when that one finished,
retries a step whose worker or node died, and places the train step on a GPU node when training uses a
GPU), and the builds inside ``data`` and ``generate`` run on Ray Data as
``layerloop build`` does. ``executor: local`` runs the same steps in this process. With ``--out`` on an
object store (the command's staging folder, ``storage.Staged``) no node needs to see another's disk: the
driver hands the folder over for the DAG, each step runs in its node's own copy of it (``_run_one``), its
builds write to the store (``pipelines.build``), and the driver follows the steps' markers on the store.

Accepted samples (``filter.accept``): for the BFS family a candidate's composite is the generator's own C;
the accepted sample keeps the generated F and B and recomputes ``C = a*F + (1-a)*B`` so that it is a valid
``quadruple`` (the docs/architecture.md invariant) that every training task reads. The filter's
recomposition score bounds how far that is from the generator's composite. For the decomposition family
(``incontext``) the candidate's composite is the real held input the layers were decomposed from: the
accepted sample keeps it byte for byte, with the generated layer as F and the generated clean object as B,
as kind ``rendered`` (no alpha-blend invariant: the composite is a real or rendered image, and the new
information is the layers). The round's training reads that kind too (``steps.train_config``). Either
way the candidate itself stays in ``candidates/``.

Modules: ``layout`` names the files above (``RoundPaths``), ``steps`` says what each step does (``filter``
the filter step's jobs), ``results`` holds each step's typed result (the JSON of its marker), and this
module runs the steps in order, skipping finished ones.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from layerloop.selfimprove.config import SelfImproveConfig, load_selfimprove_config
from layerloop.selfimprove.layout import (CONFIG_FILE, EVENTS_FILE, RoundPaths, data_dir, read_mix, round_dir,
                                          summary_report_dir)
from layerloop.selfimprove.results import RESULT_TYPES, StepResult, data_run_dir, read_result, write_result
from layerloop.selfimprove.steps import STEP_FUNCTIONS, generate_config, train_config, train_dict

logger = logging.getLogger(__name__)

STEPS = ("mix", "train", "generate", "filter", "report")
ALWAYS_RUN = {"summary"}  # cheap, and it must cover however many rounds this invocation asked for


# ================================================================================ markers and events
def _marker(out: Path, k: int, step: str) -> Path:
    return RoundPaths.of(out, k).marker(step)


def _event(out: Path, k: int, step: str, event: str, **extra: Any) -> None:
    line = json.dumps({"time": round(time.time(), 3), "round": k, "step": step, "event": event, "pid": os.getpid(),
                       **extra}, sort_keys=True)
    with open(out / EVENTS_FILE, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
        f.write(line + "\n")


def read_events(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Step:
    """One resumable step: run it unless its marker exists; the marker holds its result."""

    def __init__(self, cfg: SelfImproveConfig, out: Path, k: int, name: str):
        self.cfg, self.out, self.k, self.name = cfg, out, k, name

    def __call__(self) -> StepResult:
        if _marker(self.out, self.k, self.name).exists() and self.name not in ALWAYS_RUN:
            _event(self.out, self.k, self.name, "skip")
            return read_result(self.out, self.k, RESULT_TYPES[self.name])
        _event(self.out, self.k, self.name, "start")
        started = time.perf_counter()
        result = STEP_FUNCTIONS[self.name](self.cfg, self.out, self.k)
        result.seconds = round(time.perf_counter() - started, 2)
        write_result(self.out, self.k, result)
        _event(self.out, self.k, self.name, "done", seconds=result.seconds)
        return result


# ================================================================================ running
def _run_one(config_json: dict[str, Any], out: str, k: int, name: str, staged: str | None = None,
             *upstream: Any) -> dict[str, Any]:
    """A step as a plain function of picklable arguments (the unit of the Ray DAG); ``upstream`` only orders it.

    ``staged``: the store URL of a loop whose ``--out`` is on a store, handed over by the command
    (``storage.Staged.handoff``). The step then runs in this node's copy of the staging folder, made equal
    to the store first and uploaded when the step ends (and every sync interval while it runs): steps run
    one at a time, so there is one writer, and no node needs to see another's disk. Its builds write to the
    store (``pipelines.build``), its records name paths in the folder by their URL (``storage.canonical``)."""
    cfg = SelfImproveConfig.model_validate(config_json)
    if name in ("train", "pretrain"):
        _set_torch_threads()
    if staged is None:
        return {"round": k, "step": name, **Step(cfg, Path(out), k, name)().to_json()}
    from layerloop import storage

    with storage.Staged(staged, lease=False, writer=True) as local:
        return {"round": k, "step": name, **Step(cfg, local, k, name)().to_json()}


def _step_label(k: int, name: str) -> str:
    return name if k < 0 else f"round {k}: {name}"


class _Markers:
    """Which steps have finished: their markers in the loop's folder, or, while the folder is handed to the
    steps' node copies (``remote``: its store prefix), on the store. A marker once seen stays seen (a marker
    is never removed while the loop runs), so a poll asks the store about one step only."""

    def __init__(self, out: Path, remote: Any = None):
        self.out, self.remote, self.seen = out, remote, set()

    def done(self, k: int, name: str) -> bool:
        if (k, name) in self.seen:
            return True
        marker = _marker(self.out, k, name)
        if self.remote is None:
            found = marker.exists()
        else:
            from layerloop import storage

            try:
                found = (self.remote / marker.relative_to(self.out).as_posix()).exists()
            except storage.StoreError:  # the store out of reach for a moment: ask again at the next poll
                found = False
        if found:
            self.seen.add((k, name))
        return found


class _StepBar:
    """A bar over the loop's steps on a terminal's stderr (``round k: step`` as its postfix); the steps
    already finished (their markers exist) count as done."""

    def __init__(self, out: Path, rounds: int, enabled: bool, evaluate: bool = False, pretrain: bool = False):
        from tqdm import tqdm

        from layerloop import logs

        self.out, self.rounds, self.markers = out, rounds, _Markers(out)
        plan = plan_steps(rounds, evaluate, pretrain)
        self.steps = [(k, name) for k, name in plan if name not in ALWAYS_RUN]
        self.bar = tqdm(total=len(plan), unit="step", desc="self-improve",
                        file=logs.TERMINAL, disable=not logs.progress_enabled(enabled), dynamic_ncols=True)
        self.enabled = not self.bar.disable
        self.refresh()

    def refresh(self) -> None:
        """Count the finished steps from their markers; show the first one not finished."""
        if not self.enabled:
            return
        done = sum(1 for k, name in self.steps if self.markers.done(k, name))
        current = next(((k, name) for k, name in self.steps if not self.markers.done(k, name)),
                       (self.rounds - 1, "summary"))
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(_step_label(*current), refresh=True)

    def close(self, finished: bool = False) -> None:
        if finished and self.enabled:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _run_local(cfg: SelfImproveConfig, out_dir: Path, rounds: int, bar: _StepBar | None = None) -> list[dict[str, Any]]:
    """Every step in this process, each starting with the torch thread count the loop started with.

    A step may change it behind the loop's back: pymatting's numba kernels (the data step's matting) set
    OpenMP's thread count, which torch reads. Training and generation outputs depend on the thread count,
    so without this a resumed loop (its data step skipped) could train with other threads than an
    uninterrupted one."""
    import torch

    threads = torch.get_num_threads()
    results = []
    for k, name in _plan(cfg, rounds):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if bar is not None:
            bar.refresh()
        results.append(_run_one(cfg.model_dump(mode="json"), str(out_dir), k, name))
    return results


def _set_torch_threads() -> None:
    """In a Ray worker, give the trainer's libraries as many threads as the CPUs its task holds."""
    import ray

    # Only a worker has assigned resources; a driver (the local executor in a process connected to Ray)
    # keeps its threads.
    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from layerloop.pipelines.executors import pin_threads

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            pin_threads(cpus)


def plan_steps(rounds: int, evaluate: bool = False, pretrain: bool = False) -> list[tuple[int, str]]:
    """The loop's steps in order; ``evaluate`` (the config has an ``evaluation``) adds each round's
    ``evaluate`` step after its ``train``, ``pretrain`` (the config has a ``pretrain``) the base's
    pretraining after ``data``."""
    steps = STEPS if not evaluate else ("mix", "train", "evaluate", "generate", "filter", "report")
    first = [(-1, "data")] + ([(-1, "pretrain")] if pretrain else [])
    return first + [(k, s) for k in range(rounds) for s in steps] + [(rounds - 1, "summary")]


def _plan(cfg: SelfImproveConfig, rounds: int) -> list[tuple[int, str]]:
    return plan_steps(rounds, cfg.evaluation is not None, cfg.pretrain is not None)


def _train_resources(cfg: SelfImproveConfig, out: Path) -> dict[str, float]:
    """The train step's task holds a CPU (or a GPU) while the local trainer runs in it; Ray Train schedules
    its own workers, so then the step task holds nothing."""
    data = train_dict(cfg)
    if data.get("executor", "local") == "ray":
        return {"num_cpus": 0}
    return {"num_cpus": 1, "num_gpus": 1 if data.get("use_gpu") else 0}


def _pretrain_resources(cfg: SelfImproveConfig) -> dict[str, float]:
    """The pretrain step's task, like the train step's: the trainer runs in it (or Ray Train schedules it)."""
    from layerloop.training.config import load_train_dict

    data = load_train_dict(cfg.pretrain.config, cfg.pretrain.overrides)
    if data.get("executor", "local") == "ray":
        return {"num_cpus": 0}
    return {"num_cpus": 1, "num_gpus": 1 if data.get("use_gpu") else 0}


class _Noop:
    def __call__(self, batch: dict) -> dict:
        return batch


def _pin_ray_data_singletons() -> None:
    """Run a one-row Ray Data job (with an actor pool) in the driver before any step runs.

    Ray Data creates detached singleton actors (its stats actor, actor location tracker and autoscaling
    coordinator, ``get_if_exists``) pinned to the node of the process that first executes a dataset; the
    coordinator restarts without limit but only on that node (``ray/data/_internal/cluster_autoscaler``).
    If that were a step's worker node and the node died, later builds would call actors that can never
    come back. Created from the driver, they live on the driver's node and fate-share with it; the steps'
    builds reuse them."""
    import ray.data

    ray.data.range(1, override_num_blocks=1).map_batches(
        _Noop, batch_size=1, num_cpus=0, compute=ray.data.ActorPoolStrategy(size=1)).take_all()


class StepCannotRunError(RuntimeError):
    """The step the loop waits for asks for resources that no alive node of the cluster has."""


def _wait_for_steps(ref: Any, out: Path, rounds: int, requests: dict[tuple[int, str], dict[str, float]],
                    bar: _StepBar | None = None, evaluate: bool = False, pretrain: bool = False,
                    markers: _Markers | None = None) -> Any:
    """``ray.get`` of the last step, but never forever: Ray keeps a task whose resources no alive node has
    pending (an autoscaler may still add one), so when the step that runs now (the first without its
    marker) asks for more than any alive node offers for longer than the stall timeout
    (``LAYERLOOP_RAY_STALL_TIMEOUT_S``), the loop stops with one message; a re-run resumes at that step."""
    import ray

    from layerloop.pipelines.executors import stall_timeout

    timeout, since = stall_timeout(), None
    steps = plan_steps(rounds, evaluate, pretrain)
    markers = markers or _Markers(out)
    while True:
        ready, _ = ray.wait([ref], timeout=1.0 if bar is not None and bar.enabled else 5.0)
        if bar is not None:
            bar.refresh()
        if ready:
            return ray.get(ref)
        current = next(((k, name) for k, name in steps
                        if name not in ALWAYS_RUN and not markers.done(k, name)), None)
        need = {key: value for key, value in requests.get(current, {}).items() if value > 0}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not need or any(all(r.get(key, 0) >= value for key, value in need.items()) for r in nodes):
            since = None
            continue
        since = since or time.monotonic()
        if time.monotonic() - since >= timeout:
            k, name = current
            raise StepCannotRunError(
                f"step {name} of {'the data' if k < 0 else f'round {k}'} has waited {timeout:.0f} s for "
                f"{', '.join(f'{v:g} {key}' for key, v in need.items())} on one node; none of the "
                f"{len(nodes)} alive nodes has that (the cluster has "
                f"{sum(r.get('CPU', 0) for r in nodes):g} CPUs, {sum(r.get('GPU', 0) for r in nodes):g} GPUs). "
                f"Add a node and run the same command again: it resumes at this step.")


def _run_ray(cfg: SelfImproveConfig, out: Path, rounds: int, bar: _StepBar | None = None) -> list[dict[str, Any]]:
    """Submit every step as a Ray task whose argument is its predecessor's result (an ObjectRef): Ray
    starts a step when the previous one finished, retries it when its worker or node dies (the step then
    resumes from its own files), and the driver only waits for the last one."""
    from layerloop.pipelines.executors import RayExecutor

    from layerloop import logs

    if bar is not None:
        bar.bar.set_postfix_str("starting Ray...", refresh=True)
    logs.status("starting Ray", enabled=bar is None or not bar.enabled)
    RayExecutor(cfg.ray).init_ray()
    _pin_ray_data_singletons()
    from layerloop import storage

    staged = storage.staging_of(out)
    if staged is None:
        _submit_steps(cfg, out, rounds, bar, None, _Markers(out))
    else:  # --out on a store: the steps run in node copies of the staging folder (see _run_one), on any node
        markers = _Markers(out, staged[0].remote)
        if bar is not None:
            bar.markers = markers
        try:
            with staged[0].handoff() as url:  # afterwards the driver's folder equals the store
                _submit_steps(cfg, out, rounds, bar, url, markers)
        finally:
            if bar is not None:
                bar.markers = _Markers(out)
    return [json.loads(_marker(out, k, name).read_text()) for k, name in _plan(cfg, rounds) if name != "summary"]


def _submit_steps(cfg: SelfImproveConfig, out: Path, rounds: int, bar: _StepBar | None, staged: str | None,
                  markers: _Markers) -> None:
    import ray

    step_task = ray.remote(_run_one)
    retries = cfg.ray.max_task_retries if cfg.ray.max_task_retries is not None else 3
    defaults = {"num_cpus": 0, "max_retries": retries, "retry_exceptions": False}
    config_json = ray.put(cfg.model_dump(mode="json"))
    ref = None
    requests: dict[tuple[int, str], dict[str, float]] = {}
    steps = _plan(cfg, rounds)
    for k, name in steps:
        options: dict[str, Any] = {**defaults, "name": f"selfimprove:{'data' if k < 0 else f'round-{k:03d}'}:{name}"}
        if name == "train":
            options.update(_train_resources(cfg, out))
        elif name == "pretrain":
            options.update(_pretrain_resources(cfg))
        requests[(k, name)] = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0)}
        args = (config_json, str(out), k, name, staged) + (() if ref is None else (ref,))
        ref = step_task.options(**options).remote(*args)
    try:
        _wait_for_steps(ref, out, rounds, requests, bar, cfg.evaluation is not None, cfg.pretrain is not None,
                        markers)
    except ray.exceptions.RayTaskError as error:
        raise error.as_instanceof_cause() from None


def self_improve(config: str | Path | dict[str, Any] | SelfImproveConfig, rounds: int | None = None,
                 out: str | Path | None = None, overrides: list[str] | None = None,
                 executor: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or extend) a self-improvement loop; returns a summary with per-round counts.
    ``progress``: a bar over the loop's steps on stderr when it is a terminal."""
    from layerloop.pipelines.runs import RunDirectory, write_config_record

    cfg = config if isinstance(config, SelfImproveConfig) else load_selfimprove_config(config, overrides)
    if executor:
        cfg = cfg.model_copy(update={"executor": executor})
    rounds = cfg.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    out_dir = cfg.out_dir(out).resolve()
    started = time.perf_counter()
    with RunDirectory(out_dir):
        write_config_record(out_dir / CONFIG_FILE, "a self-improvement loop", cfg.model_dump(mode="json"),
                            cfg.fingerprint(), rounds=rounds)
        _event(out_dir, -1, "loop", "start", rounds=rounds, executor=cfg.executor)
        bar = _StepBar(out_dir, rounds, progress, cfg.evaluation is not None, cfg.pretrain is not None)
        try:
            if cfg.executor == "ray":
                results = _run_ray(cfg, out_dir, rounds, bar)
            else:
                results = _run_local(cfg, out_dir, rounds, bar)
            bar.close(finished=True)
        finally:
            bar.close()
        _event(out_dir, -1, "loop", "done", seconds=round(time.perf_counter() - started, 2))
    per_round = []
    for k in range(rounds):
        info = json.loads(RoundPaths.of(out_dir, k).round_json.read_text())
        per_round.append({"round": k, **info["counts"], "acceptance_rate": info["acceptance_rate"],
                          "checkpoint_hash": info["checkpoint_hash"]})
    return {"out": str(out_dir), "rounds": per_round, "report": str(summary_report_dir(out_dir) / "index.html"),
            "seconds": round(time.perf_counter() - started, 2), "steps": len(results)}


__all__ = ["self_improve", "round_dir", "data_dir", "data_run_dir", "read_mix", "read_events", "train_config",
           "generate_config", "STEPS", "plan_steps"]
