"""The training loop on Ray Train: ``TorchTrainer`` with ``num_workers`` data-parallel workers.

Every worker runs ``loop.train`` on its rank's share of each global batch (``ShardStream`` with
rank/world size); the loop averages gradients across the process group TorchTrainer sets up (gloo on
CPU, NCCL on GPU). Rank 0 writes metrics, checkpoints and ``final/`` into the output directory, which
must be on storage every worker sees (one machine, or a shared filesystem on a cluster); each
checkpoint is also reported to Ray Train (``ray.train.report``), which copies it into
``<out>/ray/`` for Ray's own bookkeeping. After a worker failure (``ray.max_failures``) the new worker
group resumes from the newest checkpoint in the output directory, by the same code path as a local
re-run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from layerloop.training.config import TrainConfig


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train
    import torch

    from layerloop.training.loop import build_task, make_streams, train

    cfg = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Workers share the node's cores: one torch thread per CPU the worker holds avoids oversubscription.
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    task = build_task(cfg)
    streams = make_streams(task, cfg, rank=rank, world_size=world_size)

    def report(step: int, path: Path | None, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({**numbers, "step": step}, checkpoint=checkpoint)

    summary = train(task, streams, cfg, loop_config["out_dir"], rank=rank, world_size=world_size, device=device,
                    on_checkpoint=report, stop_at=loop_config.get("stop_at"))
    if rank == 0:
        (Path(loop_config["out_dir"]) / "ray_worker_summary.json").write_text(
            json.dumps(summary, sort_keys=True))


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

    import ray

    from layerloop import storage

    init_ray(cfg)
    storage.check_staging_on_cluster(out_dir, ray.nodes(), "train")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "out_dir": str(out_dir), "stop_at": stop_at},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=str(out_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary_path = out_dir / "ray_worker_summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    summary["num_workers"] = cfg.num_workers
    return summary
