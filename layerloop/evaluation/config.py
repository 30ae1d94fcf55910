"""The evaluation config (``layerloop evaluate CONFIG``): a fixed held-out set, the methods, the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from layerloop.config import ConfigModel, RayConfig

_NAME = r"^[A-Za-z0-9_-]+$"


class HeldOutSpec(ConfigModel):
    """The held-out set: an existing run directory of quadruples, or a build the evaluation runs itself into
    ``OUT/heldout``; ``select`` samples of it chosen by ``seed`` (all of them when None)."""

    run_dir: str | None = None
    build: str | None = None  # a build config (path or packaged name)
    overrides: list[str] = Field(default_factory=list)
    select: int | None = Field(None, ge=1)  # the sample size (the BFS paper: 2,000 RORem images)
    seed: int = 0  # which samples: the `select` keys with the smallest sha256(seed, key)

    @model_validator(mode="after")
    def _one_location(self) -> HeldOutSpec:
        if (self.run_dir is None) == (self.build is None):
            raise ValueError("heldout: give exactly one of run_dir (existing shards) or build (a config)")
        if self.overrides and self.build is None:
            raise ValueError("heldout: overrides apply to a build; this one names a run_dir")
        return self


class MethodSpec(ConfigModel):
    """One row of the table: the stages that turn a held-out sample into the method's output."""

    name: str = Field(pattern=_NAME)
    label: str | None = None  # the row's name in the table (default: name)
    stages: list[dict[str, Any]] = Field(default_factory=list)  # empty: not allowed (see EvaluateConfig)


class EvaluateConfig(ConfigModel):
    config_label: ClassVar[str] = "an evaluation config"
    FINGERPRINT_EXCLUDE: ClassVar[tuple[str, ...]] = ("executor", "ray", "out", "sheet_rows")

    name: str = Field("evaluate", pattern=_NAME)
    profile: str = "demo"
    family: Literal["bfs", "decomposition"] = "bfs"
    seed: int = 0
    executor: Literal["local", "ray"] = "ray"
    ray: RayConfig = RayConfig()
    heldout: HeldOutSpec
    methods: list[MethodSpec] = Field(min_length=1)
    metrics: dict[str, Any] = Field(default_factory=dict)  # parameters of the `evaluate` stage (models, metrics)
    kid_subset_size: int = Field(1000, ge=2)  # clipped to the number of samples
    kid_subsets: int = Field(100, ge=1)
    samples_per_shard: int = Field(64, ge=1)
    sheet_rows: int = Field(4, ge=1)  # best and worst samples per metric on the contact sheets
    out: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        from layerloop.stages.evaluate import EvaluateParams

        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be distinct: {names}")
        for method in self.methods:
            if not method.stages:
                raise ValueError(f"method {method.name!r} has no stages (the reference row uses `ground-truth`)")
            if any(s.get("stage") == "evaluate" for s in method.stages):
                raise ValueError(f"method {method.name!r}: the evaluate stage is added by the evaluation itself")
        EvaluateParams.model_validate({**self.metrics, "family": self.family})
        if "family" in self.metrics:
            raise ValueError("metrics.family: set the family at the top level (family: bfs|decomposition)")
        return self

    def out_dir(self, out: str | Path | None = None) -> Path:
        return Path(out or self.out or Path("runs") / self.name)

    def stage_params(self) -> dict[str, Any]:
        return {"stage": "evaluate", "family": self.family, **self.metrics}


def load_evaluate_config(config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> EvaluateConfig:
    return EvaluateConfig.load(config, overrides)
