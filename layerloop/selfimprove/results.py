"""What each step of the loop returns: one dataclass per step, written as its marker ``steps/<step>.json``.

A later step reads an earlier one's result from its marker (``read_result``), so the marker is the one
record of a step, whether it ran in this process, in a Ray worker, or in an earlier invocation. The JSON of
a result is its fields plus ``seconds`` (how long the step ran), with sorted keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from layerloop.files import write_json_atomic
from layerloop.selfimprove.layout import RoundPaths


@dataclass(kw_only=True)
class StepResult:
    step: ClassVar[str]
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StepResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: item for name, item in value.items() if name in names})


@dataclass
class DataEntry:
    """A base or held data entry: the run directory to read, and whether the loop built it (then with its
    counts)."""

    run_dir: str
    built: bool
    ok: int | None = None
    failed: int | None = None

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {"run_dir": self.run_dir, "built": self.built}
        if self.built:
            value.update(ok=self.ok, failed=self.failed)
        return value


@dataclass(kw_only=True)
class DataResult(StepResult):
    step: ClassVar[str] = "data"
    data: dict[str, DataEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"data": {name: entry.to_json() for name, entry in self.data.items()}, "seconds": self.seconds}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> DataResult:
        return cls(data={name: DataEntry(**entry) for name, entry in value["data"].items()},
                   seconds=value.get("seconds"))


@dataclass(kw_only=True)
class MixResult(StepResult):
    step: ClassVar[str] = "mix"
    mix: str  # the mix.json written
    samples: int


@dataclass(kw_only=True)
class TrainResult(StepResult):
    step: ClassVar[str] = "train"
    checkpoint: str  # the round's train/final
    checkpoint_hash: str
    steps: int
    final_loss: float | None
    init_lora: str | None


@dataclass(kw_only=True)
class EvaluateResult(StepResult):
    step: ClassVar[str] = "evaluate"
    eval: str  # the round's eval.json
    metrics: dict[str, dict[str, Any]]  # method -> metric -> value, as eval.json holds them


@dataclass(kw_only=True)
class GenerateResult(StepResult):
    step: ClassVar[str] = "generate"
    candidates: str
    ok: int
    failed: int
    shards: int


@dataclass(kw_only=True)
class FilterResult(StepResult):
    step: ClassVar[str] = "filter"
    counts: dict[str, int]
    accepted: str  # the accepted/ run directory


@dataclass(kw_only=True)
class ReportResult(StepResult):
    step: ClassVar[str] = "report"
    report: str
    acceptance: dict[str, Any] | None


@dataclass(kw_only=True)
class PretrainResult(StepResult):
    step: ClassVar[str] = "pretrain"
    model: str  # the base folder every round's training starts from (OUT/pretrain/final)
    base_hash: str
    steps: int
    final_loss: float | None = None


@dataclass(kw_only=True)
class SummaryResult(StepResult):
    step: ClassVar[str] = "summary"
    report: str
    rounds: int


R = TypeVar("R", bound=StepResult)
RESULT_TYPES: dict[str, type[StepResult]] = {
    cls.step: cls for cls in (DataResult, PretrainResult, MixResult, TrainResult, EvaluateResult, GenerateResult,
                              FilterResult, ReportResult, SummaryResult)}


def write_result(out: str | Path, k: int, result: StepResult) -> None:
    """Write ``result`` as step ``result.step``'s marker of round ``k``: from now on the step is finished.
    Paths inside a staging folder are recorded as their store URL (``storage.canonical``), so that a step
    on another node, in its own copy of the folder, reads them as its own paths (``read_result``)."""
    from layerloop import storage

    write_json_atomic(RoundPaths.of(out, k).marker(result.step), storage.canonical(json.loads(
        json.dumps(result.to_json(), default=str))), mkdir=True)


def read_result(out: str | Path, k: int, kind: type[R]) -> R:
    """The result of a finished step of round ``k`` (``kind``: its result type), from its marker."""
    from layerloop import storage

    value = kind.from_json(storage.localize(json.loads(RoundPaths.of(out, k).marker(kind.step).read_text())))
    assert isinstance(value, kind)
    return value


def data_run_dir(out: str | Path, name: str) -> Path:
    """Run directory of a base or held data entry, as the ``data`` step recorded it."""
    return Path(read_result(out, -1, DataResult).data[name].run_dir)
