"""Training: LoRA generators and their helper models, from WebDataset shards, locally or on Ray Train.

``train_from_config`` is what ``layerloop train CONFIG [key=value ...] [--out DIR]`` runs:

* ``config.py``: ``TrainConfig`` (family, stage, steps, optimiser, data sources with weights, executor);
* ``loop.py``: the generic loop (``TrainTask`` protocol, checkpoints, exact resume, ``final/`` export);
* ``checkpoint.py``: atomic ``checkpoints/step-NNNNNN/`` directories;
* ``ray_train.py``: the same loop under ``ray.train.torch.TorchTrainer``;
* ``bfs_task.py``: the BFS stages (phi, rgba-vae, stage1, stage2); the in-context family (issue 5) adds
  its own task module;
* ``recipe.py``: a recipe config runs the BFS stages in order (rgba-vae -> phi -> stage1 -> stage2), each
  wired to the earlier ones; ``bfs_lineage.py``: the parents' hashes each BFS export records.

An output directory holds ``train.json`` (config and fingerprint), ``metrics.jsonl``,
``checkpoints/``, ``final/`` (weights + ``checkpoint_hash.txt``) and ``summary.json``. Re-running the
same command on it resumes from the newest checkpoint; a different config is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from layerloop.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "load_training", "train_from_config", "run_training"]

logger = logging.getLogger(__name__)


def _write_train_json(cfg: TrainConfig, out_dir: Path) -> None:
    from layerloop.pipelines.runs import write_config_record

    write_config_record(out_dir / "train.json", "a training run", cfg.model_dump(mode="json"), cfg.fingerprint())


def run_training(cfg: TrainConfig, out: str | Path | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train a validated config into its output directory (locked for the duration); returns a summary."""
    import torch

    from layerloop.pipelines.runs import RunDirectory
    from layerloop.training.loop import build_task, make_streams, train

    out_dir = cfg.out_dir(out)
    if cfg.executor == "local" and cfg.num_workers > 1:
        raise ValueError(f"num_workers={cfg.num_workers} needs executor=ray; the local executor runs one process")
    with RunDirectory(out_dir):
        _write_train_json(cfg, out_dir)
        if cfg.executor == "ray":
            from layerloop.training.ray_train import train_with_ray

            return train_with_ray(cfg, out_dir, stop_at=stop_at)
        device = torch.device("cpu")
        if cfg.use_gpu:
            if torch.cuda.is_available():
                device = torch.device("cuda")
            else:
                logger.warning("use_gpu is set but CUDA is not available: training on CPU")
        from layerloop import logs

        logs.status(f"train {cfg.name}: setting up the {cfg.family} models on {device}")
        task = build_task(cfg)
        return train(task, make_streams(task, cfg), cfg, out_dir, device=device, stop_at=stop_at)


def load_training(config: str | Path | dict[str, Any], overrides: list[str] | None = None):
    """A ``TrainConfig``, or a ``RecipeConfig`` when the config has a ``recipe:`` list (``recipe.py``)."""
    from layerloop.config import load_config_data
    from layerloop.training.recipe import is_recipe, load_recipe_config

    if is_recipe(load_config_data(config)):
        return load_recipe_config(config, overrides)
    return load_train_config(config, overrides)


def train_from_config(config: str | Path | dict[str, Any], overrides: list[str] | None = None,
                      out: str | None = None) -> dict[str, Any]:
    """``layerloop train``: load ``config`` (YAML path, packaged name such as ``train_bfs_demo``, or a
    dict), apply ``key=value`` overrides, train into ``out`` (else the config's ``out``, else
    ``runs/<name>``). Returns the summary (also written to ``<out>/summary.json``). A recipe config runs
    its stages in order (``recipe.run_recipe``)."""
    cfg = load_training(config, overrides)
    if isinstance(cfg, TrainConfig):
        return run_training(cfg, out)
    from layerloop.training.recipe import run_recipe

    return run_recipe(cfg, out)
