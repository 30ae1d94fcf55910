"""The training loop on Ray Train: ``TorchTrainer`` with ``num_workers`` data-parallel workers.

Every worker runs ``loop.train`` on its rank's share of each global batch (``ShardStream`` with
rank/world size); the loop averages gradients across the process group TorchTrainer sets up (gloo on
CPU, NCCL on GPU). Rank 0 writes metrics, checkpoints and ``final/`` into the output directory, which
every worker reads on resume: either storage every worker sees (one machine, or a shared filesystem
on a cluster), where each checkpoint is also reported to Ray Train (``ray.train.report``), which copies
it into ``<out>/ray/`` for Ray's own bookkeeping; or, for ``--out s3://...``, the command's staging
folder (``storage.Staged``), handed over to the workers: each worker's node holds a copy made equal
to the store before training (then all ranks wait for each other), rank 0 uploads every checkpoint
as soon as it is written and the rest at the end, and the command's folder is made equal to the store
afterwards; no disk is shared, and Ray Train keeps only metrics (its own state in a local cache
folder). After a worker failure (``ray.max_failures``) the new worker group resumes from the newest
checkpoint in the output directory (or on the store), by the same code path as a local re-run.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from layerloop.training.config import TrainConfig


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train
    import torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    staged = loop_config.get("staged")
    if staged is None:
        _train_worker(loop_config, loop_config["config"], loop_config["out_dir"], rank, world_size)
        return
    from layerloop import storage

    # A node copy of the command's staging folder: made equal to the store under a per-node lock; rank 0
    # uploads. Everyone waits for every copy before rank 0 writes anything (a copy on rank 0's node is
    # its folder).
    with storage.Staged(staged["url"], lease=False, writer=rank == 0) as local:
        copy = storage.staging_of(local)[0]
        if world_size > 1:
            torch.distributed.barrier()
        rebased = storage.rebase({"config": loop_config["config"], "out_dir": loop_config["out_dir"]},
                                 staged["local"], str(local))
        _train_worker(loop_config, rebased["config"], rebased["out_dir"], rank, world_size,
                      after_checkpoint=copy.push if rank == 0 else None, paths=(str(local), staged["local"]))


def _train_worker(loop_config: dict[str, Any], config: dict[str, Any], out_dir: str, rank: int, world_size: int,
                  after_checkpoint: Any = None, paths: tuple[str, str] | None = None) -> None:
    """``paths``: (this node copy's folder, the command's folder): the summary names the command's."""
    import ray.train
    import torch

    from layerloop.training.loop import build_task, make_streams, train

    cfg = TrainConfig.model_validate(config)
    # Workers share the node's cores: one torch thread per CPU the worker holds avoids oversubscription.
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    task = build_task(cfg)
    streams = make_streams(task, cfg, rank=rank, world_size=world_size)

    def report(step: int, path: Path | None, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if after_checkpoint is not None and path is not None:
            after_checkpoint()  # on the store before Ray hears of it: a restarted group resumes from it
        staged = loop_config.get("staged") is not None
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None and not staged else None
        ray.train.report({**numbers, "step": step}, checkpoint=checkpoint)

    summary = train(task, streams, cfg, out_dir, rank=rank, world_size=world_size, device=device,
                    on_checkpoint=report, stop_at=loop_config.get("stop_at"))
    if rank == 0:
        if paths is not None:
            from layerloop import storage

            summary = storage.rebase(summary, *paths)
        (Path(out_dir) / "ray_worker_summary.json").write_text(json.dumps(summary, sort_keys=True))


def init_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)


def train_with_ray(cfg: TrainConfig, out_dir: str | Path, stop_at: int | None = None) -> dict[str, Any]:
    """Run ``cfg`` on ``cfg.num_workers`` Ray Train workers; returns rank 0's summary."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from layerloop import storage

    init_ray(cfg)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = storage.staging_of(out_dir)
    loop_config: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "out_dir": str(out_dir), "stop_at": stop_at}
    ray_storage = out_dir / "ray"
    if staged is not None:
        loop_config["staged"] = {"url": staged[0].remote.url, "local": str(staged[0].local.resolve())}
        ray_storage = storage.cache_dir(staged[0].remote.url, "ray-train")
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=str(ray_storage),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    with staged[0].handoff() if staged is not None else contextlib.nullcontext():
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary_path = out_dir / "ray_worker_summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    summary["num_workers"] = cfg.num_workers
    return summary
