"""Which weights a config needs, whether they resolve here, and fetching them.

``layerloop models list CONFIG`` and ``layerloop models pull CONFIG`` use this, and ``layerloop build``
checks it before any work starts: offline with a missing model is one clear error listing every missing
model and the pull command, not a stack trace from a worker minutes into the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerloop.config import BuildConfig
from layerloop.models import hub
from layerloop.models.refs import ModelRef, missing_models
from layerloop.stages.registry import build_stage


class ModelsMissing(RuntimeError):
    pass


def config_model_refs(config: BuildConfig) -> list[ModelRef]:
    """Every non-tiny model the config's stages load, once each, in stage order."""
    refs: list[ModelRef] = []
    for spec in config.stages:
        for ref in build_stage(spec, seed=config.seed).models():
            if not ref.is_tiny and all((r.model, r.revision, r.filename, r.open_clip_tag) !=
                                       (ref.model, ref.revision, ref.filename, ref.open_clip_tag) for r in refs):
                refs.append(ref)
    return refs


@dataclass
class ModelStatus:
    ref: ModelRef
    path: Path | None
    problem: str | None


def model_status(config: BuildConfig, cache_dir: str | Path | None = None) -> list[ModelStatus]:
    statuses = []
    for ref in config_model_refs(config):
        try:
            statuses.append(ModelStatus(ref, ref.resolve(allow_download=False, cache_dir=cache_dir), None))
        except hub.ModelNotAvailable as error:
            statuses.append(ModelStatus(ref, None, error.reason))
        except ValueError as error:
            statuses.append(ModelStatus(ref, None, str(error)))
    return statuses


def pull_models(config: BuildConfig, cache_dir: str | Path | None = None) -> list[ModelStatus]:
    statuses = []
    for ref in config_model_refs(config):
        try:
            statuses.append(ModelStatus(ref, ref.resolve(allow_download=True, cache_dir=cache_dir), None))
        except (hub.ModelNotAvailable, ValueError) as error:
            statuses.append(ModelStatus(ref, None, getattr(error, "reason", str(error))))
    return statuses


def check_models(config: BuildConfig, config_path: str = "CONFIG") -> None:
    """Raise ModelsMissing when downloads are off and some model is not here."""
    if not hub.is_offline():
        return  # workers resolve (and download once per node, under a lock) in their setup()
    missing = missing_models(config_model_refs(config))
    if missing:
        lines = [f"  {ref.stage}: {ref.label()} ({reason})" for ref, reason in missing]
        raise ModelsMissing(
            f"{len(missing)} model(s) this config needs are not on this machine and HF_HUB_OFFLINE is set:\n"
            + "\n".join(lines)
            + f"\nFetch them with `layerloop models pull {config_path}` where the Hub is reachable (same HF_HOME or "
              "a shared cache), or point the stage's model at a local folder.")
