"""What each step of the loop does: ``STEP_FUNCTIONS[name](cfg, out, k)`` returns the step's typed result.

The steps read what earlier steps wrote (their files, and their results from the markers); running them
in order, skipping finished ones and recording results is ``layerloop.selfimprove.loop``'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from layerloop import storage
from layerloop.files import sha256_text, write_json_atomic
from layerloop.selfimprove.config import SelfImproveConfig
from layerloop.selfimprove.layout import ROUNDS_DIR, RoundPaths, data_dir, read_mix, summary_report_dir
from layerloop.selfimprove.results import (DataEntry, DataResult, FilterResult, GenerateResult, MixResult,
                                           PretrainResult, ReportResult, StepResult, SummaryResult, TrainResult,
                                           data_run_dir, read_result)

GENERATOR_STAGES = {"bfs": "generate-bfs", "incontext": "decompose-incontext"}
PRETRAIN_DIR = "pretrain"  # OUT/pretrain: the base the loop pretrains before round 0 (``pretrain:``)
PRETRAIN_FAMILY = "incontext-base"


def _build(cfg: SelfImproveConfig, build_config: dict[str, Any], out_dir: Path):
    from layerloop.config import BuildConfig
    from layerloop.pipelines.build import build

    config = BuildConfig.model_validate({**build_config, "executor": cfg.executor,
                                         "ray": cfg.ray.model_dump(mode="json")})
    return build(config, out=out_dir, progress=False)


def committed_ok(run_dir: Path) -> list[str]:
    """Keys of the ok samples in a run directory's intact committed shards (none when it does not exist)."""
    from layerloop.report import scan_run

    if not run_dir.is_dir():
        return []
    return [key for keys in scan_run(run_dir).ok_keys().values() for key in keys]


# ================================================================================ data and mix
def step_data(cfg: SelfImproveConfig, out: Path, k: int) -> DataResult:
    """Build the base and held data that name a build config (each resumes on its own)."""
    from layerloop.config import load_yaml

    built = {}
    extra = [cfg.evaluation.heldout] if cfg.evaluation is not None else []
    for spec in [*cfg.base, cfg.held, *extra]:
        if spec.build is None:
            run_dir = Path(spec.run_dir).resolve()
            if not committed_ok(run_dir):
                raise FileNotFoundError(f"data {spec.name!r}: {run_dir} has no committed samples; build it first "
                                        f"or give `build:` a config")
            built[spec.name] = DataEntry(str(run_dir), built=False)
            continue
        target = data_dir(out, spec.name)
        config = load_yaml(spec.build, spec.overrides)
        config["report"] = {**config.get("report", {}), "enabled": False}
        if not any(o.startswith("source.name=") for o in spec.overrides):
            # Keys start with the source name: two builds of one config (base and held) get distinct keys.
            config.setdefault("source", {})["name"] = spec.name
        result = _build(cfg, config, target)
        if result.ok == 0:
            raise RuntimeError(f"data {spec.name!r}: the build {spec.build} wrote no samples ({result.failed} failed)")
        built[spec.name] = DataEntry(str(target), built=True, ok=result.ok, failed=result.failed)
    return DataResult(data=built)


def pretrain_config(cfg: SelfImproveConfig, out: Path):
    """The ``pretrain`` TrainConfig: the configured ``incontext-base`` training on the loop's base data."""
    from layerloop.training.config import TrainConfig, load_train_dict

    data = load_train_dict(cfg.pretrain.config, cfg.pretrain.overrides)
    if data.get("family", PRETRAIN_FAMILY) != PRETRAIN_FAMILY:
        raise ValueError(f"pretrain config family {data.get('family')!r}: the loop pretrains a {PRETRAIN_FAMILY} base")
    data["family"] = PRETRAIN_FAMILY
    data["name"] = f"{cfg.name}-pretrain"
    data["seed"] = int(data.get("seed", 0)) + 1000 * cfg.seed
    data["data"] = [{"name": spec.name, "run_dir": str(data_run_dir(out, spec.name)), "weight": spec.weight}
                    for spec in cfg.base]
    data.pop("out", None)
    return TrainConfig.model_validate(data)


def step_pretrain(cfg: SelfImproveConfig, out: Path, k: int) -> PretrainResult:
    """Pretrain the base every round adapts (resumes from its own checkpoints when interrupted)."""
    from layerloop.models.incontext_base import base_hash
    from layerloop.training import run_training

    config = pretrain_config(cfg, out)
    run = out / PRETRAIN_DIR
    summary = run_training(config, run)
    final = run / "final"
    return PretrainResult(model=str(final), base_hash=base_hash(final), steps=config.steps,
                          final_loss=final_loss(summary, run / "metrics.jsonl"))


def _mix_source(name: str, run_dir: Path, weight: float, origin: str, round_: int | None) -> dict[str, Any]:
    keys = committed_ok(run_dir)
    return {"name": name, "run_dir": str(run_dir), "weight": weight, "origin": origin, "round": round_,
            "samples": len(keys), "keys_digest": sha256_text("\n".join(sorted(keys)), 16),
            "used": bool(keys) if origin == "accepted" else True}


def step_mix(cfg: SelfImproveConfig, out: Path, k: int) -> MixResult:
    """The training mix of round k: the base data with their weights plus every earlier round's accepted
    shards with ``accepted_weight``. A round that accepted nothing is listed with 0 samples and left out of
    the training data (an empty source cannot be sampled)."""
    sources = [_mix_source(spec.name, data_run_dir(out, spec.name), spec.weight, "base", None) for spec in cfg.base]
    sources += [_mix_source(f"accepted-r{j:03d}", RoundPaths.of(out, j).accepted, cfg.accepted_weight, "accepted", j)
                for j in range(k)]
    mix = {"round": k, "sources": sources, "accepted_weight": cfg.accepted_weight,
           "samples": sum(s["samples"] for s in sources if s["used"])}
    path = RoundPaths.of(out, k).mix
    write_json_atomic(path, storage.canonical(json.loads(json.dumps(mix, default=str))), mkdir=True)
    return MixResult(mix=str(path), samples=mix["samples"])


# ================================================================================ train and generate
def train_dict(cfg: SelfImproveConfig) -> dict[str, Any]:
    """The configured training config with its overrides applied, as a fresh dict."""
    from layerloop.training.config import load_train_dict

    return load_train_dict(cfg.train.config, cfg.train.overrides)


def train_config(cfg: SelfImproveConfig, out: Path, k: int):
    """Round k's TrainConfig: the configured training with the round's mix as data, its own seed, and
    (``continue_training``) the previous round's LoRA as the starting point."""
    from layerloop.training.config import TrainConfig

    data = train_dict(cfg)
    if data.get("family", cfg.family) != cfg.family:
        raise ValueError(f"train config family {data.get('family')!r} differs from the loop's {cfg.family!r}")
    mix = read_mix(RoundPaths.of(out, k).dir)
    data["family"] = cfg.family
    data["name"] = f"{cfg.name}-r{k:03d}"
    data["data"] = [{"name": s["name"], "run_dir": s["run_dir"], "weight": s["weight"]}
                    for s in mix["sources"] if s["used"]]
    data["seed"] = int(data.get("seed", 0)) + 1000 * cfg.seed + k  # the loop's seed: a replicate (0: as configured)
    data.pop("out", None)
    if cfg.pretrain is not None:  # the base the loop pretrained before round 0
        data["model"] = read_result(out, -1, PretrainResult).model
    if k > 0 and cfg.continue_training:
        data.setdefault("task", {})["init_lora"] = str(RoundPaths.of(out, k - 1).final)
    if cfg.family == "incontext":
        data["task"] = _reading_accepted_kind(data.get("task") or {})
    return TrainConfig.model_validate(data)


def _reading_accepted_kind(task: dict[str, Any]) -> dict[str, Any]:
    """The in-context ``task`` section with the kind accepted decompositions are written as
    (``filter.ACCEPTED_KIND``: ``rendered``) among the kinds it trains on, so that the mix's accepted
    shards are read (a stream source with none of its kinds is an error)."""
    from layerloop.selfimprove.filter import ACCEPTED_KIND
    from layerloop.training.incontext_task import InContextParams

    kinds = list(task.get("kinds") or InContextParams.model_fields["kinds"].default_factory())
    if ACCEPTED_KIND["incontext"] not in kinds:
        kinds.append(ACCEPTED_KIND["incontext"])
    return {**task, "kinds": kinds}


def final_loss(summary: dict[str, Any], metrics: Path) -> float | None:
    """The loss of the last optimiser step: the training summary's ``last`` metrics line, else (a run that
    had already finished, so this call ran no step) the last line of ``metrics.jsonl``."""
    from layerloop.selfimprove.stats import read_metrics

    loss = (summary.get("last") or {}).get("loss")
    if loss is None:
        records = (read_metrics(metrics) or ([], 0))[0]
        loss = records[-1].get("loss") if records else None
    return loss


def step_train(cfg: SelfImproveConfig, out: Path, k: int) -> TrainResult:
    from layerloop.training import run_training

    paths = RoundPaths.of(out, k)
    config = train_config(cfg, out, k)
    summary = run_training(config, paths.train)
    return TrainResult(checkpoint=str(paths.final), checkpoint_hash=paths.checkpoint_hash.read_text().strip(),
                       steps=config.steps, final_loss=final_loss(summary, paths.metrics),
                       init_lora=config.task.get("init_lora"))


def generate_config(cfg: SelfImproveConfig, out: Path, k: int) -> dict[str, Any]:
    """Round k's generation + scoring build over the held inputs."""
    from layerloop.datasets.shards import shard_paths

    paths = RoundPaths.of(out, k)
    urls = [str(p) for p in shard_paths(data_run_dir(out, cfg.held.name))]
    mix = read_mix(paths.dir)
    stages = []
    for entry in [*cfg.generate.stages, *cfg.scoring]:
        entry = dict(entry)
        if entry.get("stage") == GENERATOR_STAGES[cfg.family]:
            entry["checkpoint"] = str(paths.final)
        if entry.get("stage") == "dedupe":
            entry["reference"] = [s["run_dir"] for s in mix["sources"] if s["used"]]
        stages.append(entry)
    return {
        "name": f"{cfg.name}-r{k:03d}-candidates", "profile": cfg.profile, "seed": cfg.seed * 1000 + k,
        "source": {"type": "webdataset", "urls": urls, **cfg.generate.source, "name": f"r{k:03d}",
                   "variants": cfg.generate.variants},
        "stages": stages,
        "shards": {"name": "candidates", "samples_per_shard": cfg.generate.samples_per_shard},
        "report": {"enabled": False},
    }


def step_generate(cfg: SelfImproveConfig, out: Path, k: int) -> GenerateResult:
    candidates = RoundPaths.of(out, k).candidates
    result = _build(cfg, generate_config(cfg, out, k), candidates)
    return GenerateResult(candidates=str(candidates), ok=result.ok, failed=result.failed,
                          shards=result.shards_total)


# ================================================================================ filter and reports
def step_filter(cfg: SelfImproveConfig, out: Path, k: int) -> FilterResult:
    from layerloop.selfimprove.filter import run_filter

    return run_filter(cfg, out, k)


def step_report(cfg: SelfImproveConfig, out: Path, k: int) -> ReportResult:
    from layerloop.selfimprove.report import write_round_report

    paths = RoundPaths.of(out, k)
    stats = write_round_report(paths.dir, rows=cfg.report_rows)
    return ReportResult(report=str(paths.report / "index.html"), acceptance=stats.get("acceptance"))


def step_summary(cfg: SelfImproveConfig, out: Path, k: int) -> SummaryResult:
    from layerloop.selfimprove.report import write_summary_report

    rounds = sorted(p for p in (out / ROUNDS_DIR).glob("round-*") if RoundPaths(p).marker("report").exists())
    write_summary_report(out, rounds)
    return SummaryResult(report=str(summary_report_dir(out) / "index.html"), rounds=len(rounds))


def step_evaluate(cfg: SelfImproveConfig, out: Path, k: int) -> StepResult:
    from layerloop.selfimprove.evaluation import evaluate_round

    return evaluate_round(cfg, out, k)


STEP_FUNCTIONS: dict[str, Callable[[SelfImproveConfig, Path, int], StepResult]] = {
    "data": step_data, "pretrain": step_pretrain, "mix": step_mix, "train": step_train, "evaluate": step_evaluate, "generate": step_generate,
    "filter": step_filter, "report": step_report, "summary": step_summary}
