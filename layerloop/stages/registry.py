"""Stage registry: configs name stages (``stage: matting``); this maps names to classes."""

from __future__ import annotations

import importlib
from typing import Any

from layerloop.stages.base import Stage

STAGES: dict[str, type[Stage]] = {}

# Modules that define stages; imported on first lookup so that configs can name any of them.
STAGE_MODULES = (
    "layerloop.stages.load",
    "layerloop.stages.trimap",
    "layerloop.stages.matting",
    "layerloop.stages.shadows",
    "layerloop.stages.backgrounds",
    "layerloop.stages.recompose",
    "layerloop.stages.box_mask",
    "layerloop.stages.captions",
    "layerloop.stages.pairs",
    "layerloop.stages.score",
    "layerloop.stages.alpha_sanity",
    "layerloop.stages.dedupe",
    "layerloop.stages.generate",
    "layerloop.stages.decompose",
    "layerloop.stages.fill_baseline",
    "layerloop.stages.ground_truth",
    "layerloop.stages.copy_input",
    "layerloop.stages.evaluate",
)


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise ValueError(f"two stages are named {cls.name!r}: {STAGES[cls.name].__name__} and {cls.__name__}")
    STAGES[cls.name] = cls
    return cls


def _import_all() -> None:
    for module in STAGE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a real missing dependency, not an optional stage module
                raise


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        _import_all()
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def build_stage(spec: dict[str, Any], seed: int = 0, where: str = "stages") -> Stage:
    """Build a stage from its config entry: ``{"stage": NAME, **params}``; ``where`` is the list it is an
    entry of (``stages``, ``generate.stages``, ``scoring``), for error messages."""
    spec = dict(spec)
    try:
        name = spec.pop("stage")
    except KeyError:
        raise ValueError(f"stage entry {spec} has no 'stage' name") from None
    cls = stage_class(name)
    return cls(stage_params(cls, spec, where=where), seed=seed)


def stage_params(cls: type[Stage], params: dict[str, Any], where: str = "stages") -> Any:
    """A stage's ``Params`` from the rest of its config entry. Problems are one ``ConfigError`` (also a
    pydantic ``ValidationError``) naming the entry as overrides address it; an unknown key lists the
    valid ones: ``stages.matting.bakend: unknown key; valid keys for the matting stage: backend, ...``."""
    from layerloop.config import validate_model

    return validate_model(cls.Params, params, prefix=(*where.split("."), cls.name), label=f"the {cls.name} stage")
