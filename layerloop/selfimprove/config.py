"""Typed self-improvement configs: ``layerloop self-improve CONFIG --rounds N [key=value ...]``.

A self-improvement config composes configs that already exist rather than repeating them:

* ``base``: the base training data, each entry a run directory or a build config that the loop builds
  into ``OUT/data/<name>`` (with its own overrides) before round 0;
* ``held``: the held inputs that candidates are generated from (for BFS: backgrounds + boxes + captions of
  a build's shards; for decomposition: real composites + region masks), also a run directory or a build;
* ``pretrain`` (optional, decomposition only): an ``incontext-base`` training config that the loop runs once
  on the base data before round 0 (``OUT/pretrain``); every round's training then starts from that base
  (its ``model``), as a LoRA on a pretrained model does;
* ``train``: a training config (``train_bfs_demo``, a path, or an inline mapping) plus overrides; the loop
  replaces its ``data`` with the round's mix and, from round 1 on, starts it from the previous round's LoRA
  (``continue_training``);
* ``generate``: the generation stages run on the held shards (``load``, ``box-mask``, ``generate-bfs`` or
  ``decompose-incontext``; the loop fills in the round's checkpoint) and ``variants`` candidates per input;
* ``scoring``: the scoring stages appended to generation (``score``, ``alpha-sanity``, ``dedupe``; the loop
  points ``dedupe`` at the round's mix);
* ``policy``: the filter (``selfimprove/policies.py``); ``accepted_weight``: the sampling weight of every
  round's accepted shards in the following rounds' mixes.

Overrides use the one dialect of ``layerloop/config.py``: ``accepted_weight=3``, ``generate.variants=4``,
``train.overrides=[steps=40]``, ``stages`` entries of ``generate``/``scoring`` by stage name
(``scoring.dedupe.threshold=4``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from layerloop.config import ConfigModel, RayConfig, apply_override



class DataSpec(ConfigModel):
    """Shards the loop reads: an existing run directory, or a build it runs itself into ``OUT/data/<name>``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    run_dir: str | None = None
    build: str | None = None  # a build config (path or packaged name such as demo, logos_demo)
    overrides: list[str] = Field(default_factory=list)  # key=value overrides of that build
    weight: float = Field(1.0, gt=0)  # sampling weight in every round's training mix (base data)

    @model_validator(mode="after")
    def _one_location(self) -> DataSpec:
        if (self.run_dir is None) == (self.build is None):
            raise ValueError(f"data {self.name!r}: give exactly one of run_dir (existing shards) or build (a config)")
        if self.overrides and self.build is None:
            raise ValueError(f"data {self.name!r}: overrides apply to a build; this entry names a run_dir")
        return self


class TrainSpec(ConfigModel):
    config: str | dict[str, Any]  # training config: path, packaged name, or an inline mapping
    overrides: list[str] = Field(default_factory=list)


class GenerateSpec(ConfigModel):
    stages: list[dict[str, Any]] = Field(min_length=1)  # generation stages on the held shards
    variants: int = Field(2, ge=1)  # candidates per held input (each its own noise)
    source: dict[str, Any] = Field(default_factory=dict)  # extra webdataset source fields (member names)
    samples_per_shard: int = Field(16, ge=1)


class LoopEvaluation(ConfigModel):
    """Evaluate every round's LoRA on one fixed held-out set after training (``round-NNN/eval.json``, in the
    shape of ``layerloop evaluate``'s ``metrics.json``), and round 0's starting point with it (``start``).
    The held-out set must not be the loop's ``held`` inputs: those are what the loop selects from."""

    heldout: DataSpec  # built once by the data step, like base and held
    select: int | None = Field(None, ge=1)
    seed: int = 0
    baselines: list[dict[str, Any]] = Field(default_factory=list)  # more methods: {name, label, stages}
    metrics: dict[str, Any] = Field(default_factory=dict)  # parameters of the evaluate stage
    start: bool = True  # also evaluate the model round 0 starts from (its untrained LoRA)
    kid_subset_size: int = Field(1000, ge=2)
    kid_subsets: int = Field(100, ge=1)


class SelfImproveConfig(ConfigModel):
    config_label: ClassVar[str] = "a self-improvement config"
    # What changes the results (not the executor, Ray settings, output directory or the round count:
    # more rounds may be added to a finished loop).
    # The evaluation neither: it measures rounds and changes nothing they train, generate or accept, so it can
    # be added to a loop that exists (its evaluate steps then run on resume).
    FINGERPRINT_EXCLUDE: ClassVar[tuple[str, ...]] = ("executor", "ray", "out", "rounds", "evaluation")

    name: str = "selfimprove"
    profile: str = "demo"
    family: Literal["bfs", "incontext"]
    seed: int = 0  # generation and evaluation seeds; training (and pretrain) seeds are offset by 1000 x seed
    rounds: int = Field(2, ge=1)  # the CLI's --rounds wins
    executor: Literal["local", "ray"] = "ray"  # ray: every step is a task of one Ray DAG; local: in-process
    ray: RayConfig = RayConfig()
    base: list[DataSpec] = Field(min_length=1)
    held: DataSpec
    # a base pretrained by the loop before round 0 (family incontext-base, on the base data), which every
    # round's training then adapts (its `model`): the CPU experiment's stand-in for a pretrained Fill model
    pretrain: TrainSpec | None = None
    train: TrainSpec
    continue_training: bool = True  # round k > 0 starts from round k - 1's LoRA (task.init_lora)
    generate: GenerateSpec
    scoring: list[dict[str, Any]] = Field(default_factory=list)  # stages appended after generation
    policy: dict[str, Any]
    accepted_weight: float = Field(2.0, gt=0)  # weight of accepted shards in later mixes
    accepted_per_shard: int = Field(16, ge=1)
    report_rows: int = Field(6, ge=1)  # candidates per contact sheet (accepted / rejected)
    evaluation: LoopEvaluation | None = None  # held-out metrics of every round's LoRA
    out: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SelfImproveConfig:
        from layerloop.selfimprove.policies import load_policy

        load_policy(self.policy)  # a bad policy fails when the config is read, not after a round of training
        names = [d.name for d in self.base] + [self.held.name]
        if self.evaluation is not None:
            names.append(self.evaluation.heldout.name)
        if len(set(names)) != len(names):
            raise ValueError(f"data names must be distinct (base and held): {names}")
        if any(n.startswith("accepted") for n in names):
            raise ValueError("data names starting with 'accepted' are reserved for the rounds' accepted shards")
        self._check_policy_columns()
        if self.pretrain is not None and self.family != "incontext":
            raise ValueError(f"pretrain trains an in-context base (family incontext-base); this loop's family is "
                             f"{self.family!r}")
        generators = {"bfs": "generate-bfs", "incontext": "decompose-incontext"}
        stage_names = [s.get("stage") for s in self.generate.stages]
        if generators[self.family] not in stage_names:
            raise ValueError(f"family {self.family!r} generates with the {generators[self.family]!r} stage; "
                             f"generate.stages has {stage_names}")
        return self

    def fingerprint(self) -> str:
        """As every config's, with ``pretrain`` left out when there is none: loops from before the option keep
        their fingerprint (and resume)."""
        from layerloop.config import fingerprint_of

        exclude = set(self.FINGERPRINT_EXCLUDE) | ({"pretrain"} if self.pretrain is None else set())
        return fingerprint_of(self.model_dump(mode="json", exclude=exclude))

    def score_columns(self) -> dict[str, str]:
        """Score columns the generation and scoring stages write -> the stage that writes them."""
        from layerloop.stages.registry import stage_class

        produced = {"key": "the loop", "input_key": "the loop", "round": "the loop"}
        for entry in [*self.generate.stages, *self.scoring]:
            name = entry.get("stage")
            try:
                cls = stage_class(name)
            except KeyError as error:
                raise ValueError(str(error).strip("'\"")) from None
            produced.update({column: name for column in cls.score_columns(entry)})
        return produced

    def _check_policy_columns(self) -> None:
        """A policy reading a score no stage writes would fail after a round of training: fail now."""
        from layerloop.selfimprove.policies import load_policy, read_columns

        produced = self.score_columns()
        missing = {c: why for c, why in read_columns(load_policy(self.policy)).items() if c not in produced}
        if missing:
            wanted = "; ".join(f"{c} (read by {why})" for c, why in sorted(missing.items()))
            raise ValueError(f"the policy reads scores that no generation or scoring stage writes: {wanted}. "
                             f"Written: {', '.join(sorted(produced))}")

    def out_dir(self, out: str | Path | None = None) -> Path:
        return Path(out or self.out or Path("runs") / self.name)


def apply_selfimprove_override(data: dict[str, Any], override: str) -> None:
    """One override in the one dialect; list entries by their ``stage`` (generate.stages, scoring) or
    ``name`` (base) field, or by index."""
    apply_override(data, override, SelfImproveConfig)


def load_selfimprove_config(config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> SelfImproveConfig:
    return SelfImproveConfig.load(config, overrides)
