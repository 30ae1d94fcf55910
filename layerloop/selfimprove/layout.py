"""Where a self-improvement loop keeps its files (``OUT``), named once for the loop, its reports and lineage.

``RoundPaths(dir)`` names the files of one round directory (``OUT/rounds/round-NNN``), or with
``RoundPaths.of(out, -1)`` those of the loop's own steps (the ``data`` step's marker in ``OUT/steps``);
a round directory built by hand (tests, an old loop) works too, since only ``dir`` is needed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerloop.files import TMP_MARK
from layerloop.models.checkpoints import HASH_FILE

ROUNDS_DIR = "rounds"
DATA_DIR = "data"
REPORT_DIR = "report"
CONFIG_FILE = "selfimprove.json"
EVENTS_FILE = "events.jsonl"
ROUND_FILE = "round.json"
SCORES_FILE = "scores.parquet"
REJECTED_FILE = "rejected.parquet"
MIX_FILE = "mix.json"
CANDIDATES_DIR = "candidates"
ACCEPTED_DIR = "accepted"
TRAIN_DIR = "train"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
STEPS_DIR = "steps"
EVAL_DIR = "eval"
EVAL_FILE = "eval.json"
# scores.parquet columns that are not scores; every other column is one.
FIXED_COLUMNS = ("key", "input_key", "source_key", "round", "status", "error", "accepted", "rule", "reasons",
                 "checkpoint_hash")


@dataclass(frozen=True)
class RoundPaths:
    """The files of one round directory (see ``layerloop.selfimprove.loop`` for what each holds)."""

    dir: Path

    @classmethod
    def of(cls, out: str | Path, k: int) -> RoundPaths:
        """Round ``k`` of the loop in ``out``; ``k < 0``: the loop directory itself (the ``data`` step)."""
        out = Path(out)
        return cls(out / ROUNDS_DIR / f"round-{k:03d}" if k >= 0 else out)

    @property
    def mix(self) -> Path:
        return self.dir / MIX_FILE

    @property
    def train(self) -> Path:
        return self.dir / TRAIN_DIR

    @property
    def final(self) -> Path:
        """The round's trained LoRA (``train/final``): what generates its candidates."""
        return self.train / FINAL_DIR

    @property
    def checkpoint_hash(self) -> Path:
        return self.final / HASH_FILE

    @property
    def metrics(self) -> Path:
        return self.train / METRICS_FILE

    @property
    def evaluation(self) -> Path:
        """``eval/``: the round's evaluation directory (``layerloop evaluate``'s layout)."""
        return self.dir / EVAL_DIR

    @property
    def eval_json(self) -> Path:
        """``eval.json``: the round's held-out metrics (``eval/metrics.json``)."""
        return self.dir / EVAL_FILE

    @property
    def candidates(self) -> Path:
        return self.dir / CANDIDATES_DIR

    @property
    def accepted(self) -> Path:
        return self.dir / ACCEPTED_DIR

    @property
    def scores(self) -> Path:
        return self.dir / SCORES_FILE

    @property
    def rejected(self) -> Path:
        return self.dir / REJECTED_FILE

    @property
    def round_json(self) -> Path:
        return self.dir / ROUND_FILE

    @property
    def report(self) -> Path:
        return self.dir / REPORT_DIR

    @property
    def steps(self) -> Path:
        return self.dir / STEPS_DIR

    def marker(self, step: str) -> Path:
        """``steps/<step>.json``: it exists exactly when the step finished."""
        return self.steps / f"{step}.json"

    def remove_stale_temporaries(self, *names: str) -> list[Path]:
        """Remove what a killed step left next to ``names`` (``<name>.tmp-<token>`` files or folders of
        ``layerloop.files``, and ``<name>.tmp`` of loops written before it); returns what was removed."""
        stale = sorted(p for name in names for p in self.dir.glob(f"{name}.tmp*")
                       if p.name == f"{name}.tmp" or p.name.startswith(f"{name}{TMP_MARK}"))
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return stale


def is_selfimprove_dir(path: str | Path) -> bool:
    """``layerloop self-improve``'s output directory (it holds ``selfimprove.json``). Here rather than in
    ``lineage`` so that ``layerloop inspect RUN`` can ask without importing the loop's modules."""
    from layerloop import storage

    if storage.is_remote(path):
        return (storage.location(path) / CONFIG_FILE).is_file()
    return (Path(path) / CONFIG_FILE).is_file()


def round_dir(out: str | Path, k: int) -> Path:
    return RoundPaths.of(out, k).dir


def data_dir(out: str | Path, name: str) -> Path:
    """Where the ``data`` step builds a base or held entry that names a build config."""
    return Path(out) / DATA_DIR / name


def summary_report_dir(out: str | Path) -> Path:
    return Path(out) / REPORT_DIR


def read_mix(round_path: str | Path) -> dict[str, Any]:
    """A round's training mix (``mix.json``, written by the ``mix`` step; paths as ``results.read_result``)."""
    from layerloop import storage

    return storage.localize(json.loads(RoundPaths(Path(round_path)).mix.read_text()))
