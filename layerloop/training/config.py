"""Typed training configs: ``layerloop train CONFIG [key=value ...]``.

One ``TrainConfig`` serves every model family; what only one family understands lives in ``task`` and is
validated by that family's task (``BFSTask.Params``, ...), the way stage parameters are validated by their
stage. Overrides use the one dialect of ``layerloop/config.py`` (``steps=200``, ``task.phi_checkpoint=runs/phi/final``,
``data.accepted.weight=2``, ``data.0.run_dir=runs/x``); loading, errors and the fingerprint are those of
``ConfigModel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from layerloop.config import ConfigModel, apply_override, fingerprint_of



class DataSourceConfig(ConfigModel):
    """Shards of one source: a run directory or tar urls, with a relative sampling weight (accepted
    samples of later rounds are typically weighted 2)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    run_dir: str | None = None
    urls: str | list[str] | None = None
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one_location(self) -> DataSourceConfig:
        if (self.run_dir is None) == (self.urls is None):
            raise ValueError(f"data source {self.name!r}: give exactly one of run_dir or urls")
        return self


class RayTrainConfig(ConfigModel):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray
    max_failures: int = 0  # worker-group restarts; each restart resumes from the latest checkpoint
    cpus_per_worker: float = 1.0


class TrainConfig(ConfigModel):
    config_label: ClassVar[str] = "a training config"

    name: str = "train"
    family: Literal["bfs", "incontext", "incontext-base"]  # incontext-base: pretrain a tiny Fill base (issue 14)
    stage: str = "stage1"  # family-specific: bfs has phi | rgba-vae | stage1 | stage2
    model: str = "tiny"  # hub id, local folder, or tiny / tiny:SEED (random tiny model)
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the frozen backbone
    steps: int = Field(ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up, then constant
    batch_size: int = Field(1, ge=1)  # per worker and micro-batch
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    data: list[DataSourceConfig] = Field(min_length=1)
    shuffle_buffer: int = Field(64, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep: int = Field(3, ge=1)  # checkpoints kept (the newest)
    log_every: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    executor: Literal["local", "ray"] = "local"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    ray: RayTrainConfig = RayTrainConfig()
    task: dict[str, Any] = Field(default_factory=dict)
    out: str | None = None

    # Settings that do not change what a step computes: a resumed run may change them.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "keep", "log_every", "out", "ray", "executor")
    FINGERPRINT_EXCLUDE: ClassVar[tuple[str, ...]] = RESUMABLE_CHANGES

    # Task parameters whose default changed what a stage trains, by (family, stage): the fingerprint records
    # their resolved value (the default where ``task`` does not give one), so that a directory trained with
    # the old default is refused rather than resumed with the new one. Each value must equal the task's
    # ``Params`` default (tested); kept here so that a fingerprint needs no model code.
    TASK_FINGERPRINT_DEFAULTS: ClassVar[dict[tuple[str, str], dict[str, Any]]] = {
        # #15: the BFS paper's noise (one draw for both branches) and t ~ U(0, 1); before: independent, logit-normal
        ("bfs", "stage1"): {"noise": "shared", "timesteps": "uniform"},
        ("bfs", "stage2"): {"noise": "shared", "timesteps": "uniform"},
    }

    def fingerprint(self) -> str:
        """As every config's, with ``task`` completed by ``TASK_FINGERPRINT_DEFAULTS``."""
        data = self.model_dump(mode="json", exclude=set(self.FINGERPRINT_EXCLUDE))
        data["task"] = {**self.TASK_FINGERPRINT_DEFAULTS.get((self.family, self.stage), {}), **data["task"]}
        return fingerprint_of(data)

    def out_dir(self, out: str | Path | None = None) -> Path:
        return Path(out or self.out or Path("runs") / self.name)


def load_train_dict(config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a config from a YAML path, a packaged name (``train_bfs_demo``) or a dict, plus
    overrides; a fresh copy that callers may edit before validating."""
    return TrainConfig.load_data(config, overrides)


def load_train_config(config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """A config from a YAML path, a packaged name (``train_bfs_demo``) or a dict, plus overrides."""
    return TrainConfig.load(config, overrides)


def apply_train_override(data: dict[str, Any], override: str) -> None:
    """One override in the one dialect; list entries (``data``) by their ``name`` or by index:
    ``data.accepted.weight=2``, ``data.0.run_dir=runs/x``."""
    apply_override(data, override, TrainConfig)
