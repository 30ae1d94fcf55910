"""``layerloop evaluate``: every method on one fixed held-out set, measured the same way.

Steps, each resumable (a re-run skips what is committed, like a build):

1. the held-out set: an existing run directory, or a build into ``OUT/heldout``;
2. pre-flight: every method's build config is assembled and checked (stages, generator weights: a method
   whose weights are missing stops the evaluation before any work, with the pull command), and each
   metric's model is looked up; offline, a metric whose model is not here is dropped and marked
   "missing weights" in every table, never filled in;
3. one build per method into ``OUT/methods/<name>``: a ``shards`` source selecting the held-out samples,
   the method's stages, then the ``evaluate`` stage (per-sample metrics in ``meta["eval"]``). Under Ray the
   model metrics run in actor pools, on GPUs when the config gives the stage GPUs;
4. aggregation (``evaluation/results.py``): ``per_sample.parquet``, ``metrics.json``, ``table.md`` and the
   best/worst contact sheets.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerloop import storage
from layerloop.config import BuildConfig, load_config
from layerloop.evaluation.config import EvaluateConfig
from layerloop.files import write_json_atomic

logger = logging.getLogger(__name__)

RECORD = "evaluate.json"
MISSING_WEIGHTS = "missing weights"


@dataclass
class Evaluation:
    out: Path
    metrics: dict[str, Any]  # what metrics.json holds
    table: str  # table.md


def method_build_config(cfg: EvaluateConfig, heldout: Path, method, metrics: tuple[str, ...] | None = None,
                        executor: str | None = None) -> BuildConfig:
    """The build that runs one method on the held-out set, then the evaluate stage."""
    stage = cfg.stage_params()
    if metrics is not None:
        stage["metrics"] = list(metrics)
    data = {
        "name": f"{cfg.name}-{method.name}", "profile": cfg.profile, "seed": cfg.seed,
        "executor": executor or cfg.executor, "ray": cfg.ray.model_dump(),
        "source": {"type": "shards", "path": storage.reference(heldout), "name": "heldout",
                   **({"select": cfg.heldout.select} if cfg.heldout.select else {}), "seed": cfg.heldout.seed},
        "stages": [*method.stages, stage],
        "shards": {"name": method.name, "samples_per_shard": cfg.samples_per_shard},
        "report": {"enabled": True, "rows": max(2, cfg.sheet_rows)},
    }
    return BuildConfig.model_validate(data)


def models_config(cfg: EvaluateConfig) -> BuildConfig:
    """One build config holding every method's stages and the evaluate stage: what ``layerloop models
    list|pull`` reads for an evaluation (the generators' and the metrics' weights)."""
    stages = [stage for method in cfg.methods for stage in method.stages] + [cfg.stage_params()]
    return BuildConfig.model_validate({"name": cfg.name, "profile": cfg.profile, "seed": cfg.seed,
                                       "source": {"type": "shards", "path": "heldout"}, "stages": stages})


def available_metrics(cfg: EvaluateConfig) -> tuple[tuple[str, ...], dict[str, str]]:
    """(metrics to compute, {metric: why not} for the others). Offline, a metric whose model is not on this
    machine cannot be computed; online, workers download it once per node."""
    from layerloop.models import hub
    from layerloop.models.refs import missing_models
    from layerloop.stages.evaluate import EvaluateParams, metric_ref

    params = EvaluateParams.model_validate({**cfg.metrics, "family": cfg.family})
    chosen, skipped = [], {}
    for metric in params.chosen():
        ref = metric_ref(params, metric)
        if ref is not None and not ref.is_tiny and hub.is_offline():
            missing = missing_models([ref])
            if missing:
                skipped[metric] = f"{MISSING_WEIGHTS}: {ref.label()} ({missing[0][1]})"
                continue
        chosen.append(metric)
    return tuple(chosen), skipped


def metric_models(cfg: EvaluateConfig) -> dict[str, str]:
    """metric -> the model it uses ("tiny" for a random tiny instance, "-" for a model-free metric)."""
    from layerloop.stages.evaluate import EvaluateParams, metric_ref

    params = EvaluateParams.model_validate({**cfg.metrics, "family": cfg.family})
    models = {}
    for metric in params.chosen():
        ref = metric_ref(params, metric)
        models[metric] = "-" if ref is None else ("tiny" if ref.is_tiny else ref.label())
    return models


def heldout_dir(cfg: EvaluateConfig, out: Path, executor: str | None, progress: bool) -> Path | storage.StorePath:
    if cfg.heldout.run_dir is not None:
        return storage.location(cfg.heldout.run_dir)
    from layerloop.pipelines.build import build

    target = out / "heldout"
    build(load_config(cfg.heldout.build, list(cfg.heldout.overrides)), out=target, executor=executor,
          progress=progress, report=False)
    return target


def check_checkpoints(cfg: EvaluateConfig) -> None:
    """A method whose trained checkpoint is missing stops the evaluation before any work (the stages would
    only find out in a worker, after the held-out build)."""
    from layerloop.errors import ConfigError

    for method in cfg.methods:
        for stage in method.stages:
            checkpoint = stage.get("checkpoint")
            if checkpoint is not None and not storage.location(checkpoint).exists():
                raise ConfigError(f"method {method.name!r}: {stage.get('stage')} checkpoint {checkpoint} does not "
                                  "exist. Train it first (e.g. `layerloop train train_bfs_demo --out runs/bfs-demo`) "
                                  f"or point methods.{method.name}.stages.{stage.get('stage')}.checkpoint at a "
                                  "final/ folder.")


def check_out_dir(out: Path) -> None:
    """Refuse a non-empty ``--out`` that is not an evaluation (somebody's folder given by mistake)."""
    from layerloop.errors import UnsafePathError

    if out.is_dir() and not (out / RECORD).exists() and any(out.iterdir()):
        raise UnsafePathError(f"--out {out} is not an evaluation directory: it holds files and no {RECORD}. "
                              "Give a new or empty folder.")


def evaluate(cfg: EvaluateConfig, out: str | Path | None = None, executor: str | None = None,
             progress: bool = True, config_ref: str = "CONFIG") -> Evaluation:
    """``config_ref``: how the user named the config, for the pull command of a missing-weights error."""
    from layerloop.evaluation.results import aggregate
    from layerloop.pipelines.build import build
    from layerloop.pipelines.preflight import check_models
    from layerloop.pipelines.runs import write_config_record

    out_dir = cfg.out_dir(out)
    check_out_dir(out_dir)
    metrics, skipped = available_metrics(cfg)
    placeholder = storage.location(cfg.heldout.run_dir or out_dir / "heldout")
    builds = {m.name: method_build_config(cfg, placeholder, m, metrics, executor) for m in cfg.methods}
    check_checkpoints(cfg)
    for config in builds.values():  # generator weights missing: stop before any work
        check_models(config, config_path=config_ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_record(out_dir / RECORD, "an evaluation", cfg.model_dump(mode="json"), cfg.fingerprint())
    heldout = heldout_dir(cfg, out_dir, executor or cfg.executor, progress)
    for method in cfg.methods:
        logger.info("evaluating %s", method.name)
        build(method_build_config(cfg, heldout, method, metrics, executor), out=out_dir / "methods" / method.name,
              executor=executor, progress=progress)
    result = aggregate(cfg, out_dir, skipped=skipped, models=metric_models(cfg))
    write_json_atomic(out_dir / RECORD, {**_read(out_dir / RECORD), "status": "complete"})
    return result


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
