"""The generic training loop every model family uses (BFS stages, the in-context LoRA).

A family plugs in as a ``TrainTask`` (models, trainable parameters, the loss of one micro-batch,
weight save/load); the loop owns everything else: AdamW, warm-up, gradient accumulation and clipping,
data-parallel gradient averaging, ``metrics.jsonl``, checkpoints and exact resume, the final export.

Determinism, which exact resume rests on: a step's randomness (noise, timesteps, branch choices) comes
from the ``torch.Generator`` the loop passes to ``task.loss``, seeded from (seed, rank, step,
micro-batch) alone, and the data position lives in the streams' ``state_dict``. A run stopped after any
checkpoint and restarted on the same directory therefore computes the same steps on the same samples
and ends with bit-identical weights (on the same hardware and library versions).

Data parallelism: with ``world_size > 1`` (Ray Train workers, ``torch.distributed`` initialised) each
rank computes gradients on its own share of the global batch and the loop averages them with one
``all_reduce`` per optimiser step before clipping, which is what DDP does. DDP itself is not used
because a task's trainable parameters sit inside frozen backbones whose forward is not one module call
the loop owns (the BFS processors are called from inside the Flux transformer; a stage-2 branch leaves
some of them unused, which DDP rejects without ``find_unused_parameters``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from layerloop.datasets.stream import ShardStream, WeightedShards
from layerloop.files import atomic_path, write_atomic
from layerloop.models.attention import training_attention
from layerloop.models.checkpoints import HASH_FILE
from layerloop.samples import LayeredSample
from layerloop.seeds import seed63
from layerloop.training import checkpoint as ckpt
from layerloop.training.config import TrainConfig

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
FINAL = "final"


@runtime_checkable
class TrainTask(Protocol):
    """What a model family provides to the loop. Built from the ``TrainConfig``; ``setup`` loads models."""

    def setup(self, device: torch.device) -> None:
        """Build or load every model on ``device``; freeze what is not trained."""

    def streams(self) -> dict[str, tuple[str, ...] | None]:
        """Named data streams the task draws from, each with the sample kinds it wants (None: all)."""

    def stream_for_step(self, step: int) -> str:
        """Which stream feeds optimiser step ``step`` (a pure function of the step)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters AdamW updates, in a fixed order; nothing else may require grad."""

    def loss(self, batch: list[LayeredSample], step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """(scalar loss, log terms) of one micro-batch; all randomness from ``generator`` (CPU)."""

    def save_weights(self, path: Path) -> None:
        """Write the trained weights to the directory ``path`` (the inference format)."""

    def load_weights(self, path: Path) -> None:
        """Load what ``save_weights`` wrote."""

    def weights_hash(self, path: Path) -> str:
        """The id recorded with generated samples for weights saved in ``path``."""


# --------------------------------------------------------------------------- task registry
TASKS: dict[str, type] = {}
# Modules that define tasks, imported on first lookup (as the stage registry does).
TASK_MODULES = {"bfs": "layerloop.training.bfs_task", "incontext": "layerloop.training.incontext_task",
                "incontext-base": "layerloop.training.incontext_base_task"}


def register_task(family: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        TASKS[family] = cls
        return cls

    return decorate


def build_task(cfg: TrainConfig) -> TrainTask:
    if cfg.family not in TASKS:
        module = TASK_MODULES.get(cfg.family)
        if module is None:
            raise ValueError(f"unknown model family {cfg.family!r}; known: {sorted(TASK_MODULES)}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            raise ValueError(f"model family {cfg.family!r} has no trainer yet ({module} does not exist)") from None
    return TASKS[cfg.family](cfg)


# --------------------------------------------------------------------------- streams
def make_streams(task: TrainTask, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> dict[str, ShardStream]:
    sources = [WeightedShards(urls=d.urls, run_dir=d.run_dir, weight=d.weight, name=d.name) for d in cfg.data]
    return {
        name: ShardStream(sources, cfg.batch_size, cfg.shuffle_buffer, seed=derived_seed(cfg.seed, "stream", name),
                          kinds=kinds, rank=rank, world_size=world_size)
        for name, kinds in task.streams().items()
    }


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from mixed parts; independent streams for independent purposes."""
    return seed63(*parts)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _seed_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    import random

    random.seed(seed)


def _distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Mean of the ranks' gradients in one flat all-reduce (a parameter without a gradient this step
    contributes zeros, so every rank reduces the same buffer)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _average_logs(values: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    if not _distributed(world_size) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return {k: float(v) / world_size for k, v in zip(keys, tensor.tolist())}


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from: those steps are computed again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    write_atomic(path, "".join(line + "\n" for line in kept))


def export_final(task: TrainTask, out_dir: Path) -> tuple[Path, str]:
    """``<out>/final/``: the task's weights plus ``checkpoint_hash.txt``, replaced atomically."""
    final = out_dir / FINAL
    with atomic_path(final) as tmp:
        task.save_weights(tmp)
        digest = task.weights_hash(tmp)
        (tmp / HASH_FILE).write_text(digest + "\n")
    return final, digest


# --------------------------------------------------------------------------- the loop
def _resume(task: TrainTask, optimizer: torch.optim.Optimizer, streams: Mapping[str, ShardStream],
            cfg: TrainConfig, out_dir: Path, rank: int) -> int | None:
    """Restore weights, optimiser, streams and RNGs from the newest checkpoint in ``out_dir`` and return its
    step; with none, seed the global RNGs for step 0 and return None."""
    latest = ckpt.latest_checkpoint(out_dir)
    if latest is None:
        if rank == 0:  # killed before its first checkpoint was complete: every logged step is computed again
            _truncate_metrics(out_dir / METRICS, 0)
        _seed_global_rngs(derived_seed(cfg.seed, "global", rank, 0))
        return None
    state = ckpt.read_trainer_state(latest)
    fingerprint = cfg.fingerprint()
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{latest} was written by a different training config (fingerprint "
                         f"{state['fingerprint']}, this one {fingerprint}); use another --out directory")
    task.load_weights(latest / ckpt.WEIGHTS)
    optimizer.load_state_dict(state["optimizer"])
    for name, stream in streams.items():
        stream.load_state_dict(state["streams"][name])
    start_step = int(state["step"])
    if rank == 0:
        ckpt.set_rng_states(state["rng"])
        _truncate_metrics(out_dir / METRICS, start_step)
    else:  # only rank 0's states are saved; the others continue from a seed of (seed, rank, step)
        _seed_global_rngs(derived_seed(cfg.seed, "global", rank, start_step))
    logger.info("resuming %s from step %d (%s)", out_dir, start_step, latest.name)
    return start_step


def _accumulate_gradients(task: TrainTask, stream: ShardStream, cfg: TrainConfig, rank: int,
                          step: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Forward and backward ``cfg.grad_accum`` micro-batches of ``step``; returns the logs averaged over
    them (numbers) and the last value of the others (text)."""
    numeric: dict[str, float] = {}
    text: dict[str, Any] = {}
    for micro in range(cfg.grad_accum):
        batch = stream.next_batch()
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "step", rank, step, micro))
        with training_attention():
            loss, logs = task.loss(batch, step, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower lr or check the data")
            (loss / cfg.grad_accum).backward()
        for key, value in {"loss": loss, **logs}.items():
            if isinstance(value, (torch.Tensor, float, int)) and not isinstance(value, bool):
                value = value.detach() if isinstance(value, torch.Tensor) else value
                numeric[key] = numeric.get(key, 0.0) + float(value) / cfg.grad_accum
            else:
                text[key] = value
    return numeric, text


def _save_checkpoint(task: TrainTask, optimizer: torch.optim.Optimizer, streams: Mapping[str, ShardStream],
                     cfg: TrainConfig, out_dir: Path, done: int) -> Path:
    """Rank 0's checkpoint after ``done`` steps: the task's weights plus the trainer state."""
    trainer_state = {
        "step": done, "fingerprint": cfg.fingerprint(), "optimizer": optimizer.state_dict(),
        "streams": {name: s.state_dict() for name, s in streams.items()}, "rng": ckpt.rng_states(),
    }
    return ckpt.write_checkpoint(out_dir, done, task.save_weights, trainer_state, cfg.keep)


def _optimizer_step(task: TrainTask, optimizer: torch.optim.Optimizer, params: list,
                    streams: Mapping[str, ShardStream], cfg: TrainConfig, step: int, rank: int, world_size: int,
                    device: torch.device) -> dict[str, Any]:
    """One optimiser step (``step`` counts from 0): learning rate, accumulated gradients, averaging across
    ranks, clipping. Returns the metrics line of the step."""
    t0 = time.perf_counter()
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    stream_name = task.stream_for_step(step)
    numeric, text = _accumulate_gradients(task, streams[stream_name], cfg, rank, step)
    if _distributed(world_size):
        _average_gradients(params, world_size)
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    numeric = _average_logs(numeric, world_size, device)
    samples = cfg.batch_size * cfg.grad_accum * world_size
    elapsed = time.perf_counter() - t0
    return {"step": step + 1, **{k: round(v, 6) for k, v in numeric.items()}, **text, "stream": stream_name,
            "lr": lr, "grad_norm": round(grad_norm, 6), "samples_per_s": round(samples / elapsed, 3)}


def train(
    task: TrainTask,
    streams: ShardStream | Mapping[str, ShardStream],
    cfg: TrainConfig,
    out_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    on_checkpoint: Callable[[int, Path | None, dict[str, Any]], None] | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``task`` for ``cfg.steps`` optimiser steps, resuming from the newest checkpoint in
    ``out_dir``. Rank 0 writes metrics, checkpoints and ``final/``; every rank calls ``on_checkpoint``
    after each checkpoint (Ray Train's ``report`` needs all of them; the path is None on other ranks).
    ``stop_at`` ends the run after that step as an interruption would (no final export): for tests
    and time-sliced jobs. Returns a summary."""
    out_dir = Path(out_dir)
    device = torch.device(device)
    if isinstance(streams, ShardStream):
        streams = {next(iter(task.streams())): streams}
    missing = set(task.streams()) - set(streams)
    if missing:
        raise ValueError(f"the task draws from streams {sorted(task.streams())}; missing {sorted(missing)}")
    leader = rank == 0
    params = _prepare(task, out_dir, leader, world_size, device)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    resumed_from = _resume(task, optimizer, streams, cfg, out_dir, rank)
    start_step = resumed_from or 0

    metrics_file = open(out_dir / METRICS, "a", encoding="utf-8") if leader else None
    started = time.perf_counter()
    samples_seen = 0
    last: dict[str, Any] = {}
    # A bar over the optimiser steps (loss in the postfix) on a terminal's stderr; rank 0 only.
    bar = _step_bar(cfg, out_dir, start_step, enabled=leader)
    try:
        for step in range(start_step, cfg.steps):
            last = _optimizer_step(task, optimizer, params, streams, cfg, step, rank, world_size, device)
            done = step + 1
            samples_seen += cfg.batch_size * cfg.grad_accum * world_size
            bar.update(1)
            if "loss" in last:
                bar.set_postfix(loss=f"{last['loss']:.4g}", refresh=False)
            if metrics_file is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                metrics_file.write(json.dumps(last, sort_keys=True) + "\n")
                metrics_file.flush()
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                path = _save_checkpoint(task, optimizer, streams, cfg, out_dir, done) if leader else None
                if _distributed(world_size):
                    torch.distributed.barrier()
                if on_checkpoint is not None:
                    on_checkpoint(done, path, last)
            if stop_at is not None and done >= stop_at and done < cfg.steps:
                return {"out_dir": str(out_dir), "step": done, "stopped": True, "resumed_from": resumed_from,
                        "last": last}
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"out_dir": str(out_dir), "step": cfg.steps, "stopped": False,
                               "resumed_from": resumed_from, "last": last, "seconds": round(seconds, 3),
                               "samples_per_s": round(samples_seen / seconds, 3) if seconds > 0 else None}
    return _finish(task, out_dir, summary, leader, world_size)


def _step_bar(cfg: TrainConfig, out_dir: Path, start_step: int, enabled: bool):
    from tqdm import tqdm

    from layerloop import logs

    return tqdm(total=cfg.steps, initial=start_step, unit="step", desc=f"train {cfg.name}", file=logs.TERMINAL,
                disable=not (enabled and logs.progress_enabled()), dynamic_ncols=True)


def _prepare(task: TrainTask, out_dir: Path, leader: bool, world_size: int, device: torch.device) -> list:
    """Rank 0 creates ``out_dir`` and removes partial checkpoints; then the task is set up on ``device``.
    Returns its trainable parameters."""
    if leader:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial_checkpoints(out_dir)
    if _distributed(world_size):
        torch.distributed.barrier()  # nobody reads checkpoints while rank 0 cleans up
    task.setup(device)
    params = task.trainable_parameters()
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("the task's trainable parameters must be non-empty and require grad")
    return params


def _finish(task: TrainTask, out_dir: Path, summary: dict[str, Any], leader: bool, world_size: int) -> dict[str, Any]:
    """Rank 0 exports ``final/`` and writes ``summary.json``; every rank returns the summary."""
    if leader:
        final, digest = export_final(task, out_dir)
        summary.update(final=str(final), checkpoint_hash=digest)
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if _distributed(world_size):
        torch.distributed.barrier()
    return summary
