"""The loop's ``evaluate`` step: round k's LoRA on the fixed held-out set, after training.

It is ``layerloop evaluate`` with one method per model: ``lora`` (round k's ``train/final``, generating with
the loop's own generator stage and its parameters), in round 0 also ``start`` (the untrained LoRA that round
0's training starts from, exported once into ``round-000/start/final``), plus the configured baselines. The
evaluation lives in ``round-NNN/eval/`` (resumable like any evaluation) and its ``metrics.json`` is copied to
``round-NNN/eval.json``, which the summary report plots by round and ``layerloop compare`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerloop.files import write_json_atomic
from layerloop.selfimprove.config import SelfImproveConfig
from layerloop.selfimprove.layout import FINAL_DIR, RoundPaths
from layerloop.selfimprove.results import EvaluateResult, data_run_dir

FAMILIES = {"bfs": "bfs", "incontext": "decomposition"}
START_DIR = "start"


def _generator_entry(cfg: SelfImproveConfig) -> dict[str, Any]:
    from layerloop.selfimprove.steps import GENERATOR_STAGES

    name = GENERATOR_STAGES[cfg.family]
    return dict(next(e for e in cfg.generate.stages if e.get("stage") == name))


def start_checkpoint(cfg: SelfImproveConfig, out: Path) -> Path:
    """``round-000/start/final``: the LoRA round 0's training starts from, untrained (exported once)."""
    import torch

    from layerloop.models.checkpoints import HASH_FILE
    from layerloop.selfimprove.steps import train_config
    from layerloop.training.loop import build_task, export_final

    target = RoundPaths.of(out, 0).dir / START_DIR
    final = target / FINAL_DIR
    if (final / HASH_FILE).is_file():
        return final
    task = build_task(train_config(cfg, out, 0))
    task.setup(torch.device("cpu"))
    target.mkdir(parents=True, exist_ok=True)
    export_final(task, target)
    return final


def eval_config(cfg: SelfImproveConfig, out: Path, k: int, start: Path | None = None):
    """Round k's ``EvaluateConfig``."""
    from layerloop.evaluation.config import EvaluateConfig

    spec = cfg.evaluation
    generator = _generator_entry(cfg)

    def method(name: str, label: str, checkpoint: Path) -> dict[str, Any]:
        return {"name": name, "label": label, "stages": [{**generator, "checkpoint": str(checkpoint)}]}

    methods = [method("lora", f"round {k}", RoundPaths.of(out, k).final)]
    if start is not None:
        methods.append(method("start", "start (untrained LoRA)", start))
    data = {
        "name": f"{cfg.name}-r{k:03d}-eval", "profile": cfg.profile, "family": FAMILIES[cfg.family],
        "seed": cfg.seed, "executor": cfg.executor, "ray": cfg.ray.model_dump(mode="json"),
        "heldout": {"run_dir": str(data_run_dir(out, spec.heldout.name)), "select": spec.select, "seed": spec.seed},
        "methods": [*methods, *spec.baselines], "metrics": dict(spec.metrics),
        "kid_subset_size": spec.kid_subset_size, "kid_subsets": spec.kid_subsets,
    }
    return EvaluateConfig.model_validate(data)


def evaluate_round(cfg: SelfImproveConfig, out: Path, k: int) -> EvaluateResult:
    from layerloop.evaluation.run import evaluate

    paths = RoundPaths.of(out, k)
    start = start_checkpoint(cfg, out) if k == 0 and cfg.evaluation.start else None
    result = evaluate(eval_config(cfg, out, k, start), out=paths.evaluation, progress=False)
    write_json_atomic(paths.eval_json, result.metrics, sort_keys=False)
    return EvaluateResult(eval=str(paths.eval_json), metrics=result.metrics["metrics"])


def read_round_evals(round_dirs: list[Path]) -> list[tuple[int, dict[str, Any]]]:
    """(round number, eval.json) of the rounds that have one, in order."""
    import json

    found = []
    for folder in round_dirs:
        path = RoundPaths(Path(folder)).eval_json
        if path.is_file():
            found.append((int(Path(folder).name.rsplit("-", 1)[-1]), json.loads(path.read_text())))
    return sorted(found, key=lambda item: item[0])
