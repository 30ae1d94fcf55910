"""The numbers of the round and summary reports: reading a round (``round.json``, ``scores.parquet``,
``train/metrics.jsonl``) and what ``stats.json`` says about it. No tar is opened here.

Inputs, written by the loop into ``OUT/rounds/round-NNN/``:

* ``round.json``: round number, family, policy text, ``model_free_only`` + ``note`` (demo profiles whose
  model scores are random; the note is shown prominently so nobody reads meaning into CLIP or HPS
  columns), checkpoint hash, counts, and the training mix; every key but ``round`` may be absent.
* ``scores.parquet``: one row per candidate. Besides the fixed columns (``FIXED_COLUMNS``) every column
  is a score; numeric ones are plotted and summarised, booleans are summarised as 0/1 (their mean is a
  rate), strings are skipped. The columns are discovered from the table, so a new scorer needs no change
  here.
* ``train/metrics.jsonl``: one JSON object per logged step; absent for a round that did not train.

Definitions used everywhere (stats.json, HTML, figures): a candidate is *failed* when its ``status`` is
``"failed"``, else *ok*; *accepted* when ok and ``accepted`` is true; *rejected* when ok and not
accepted. Score summaries use finite values only; None, NaN and infinities count as ``missing``. Drift
across rounds is measured on all ok candidates of each round (what the model generates, before the
filter), with the accepted candidates' summaries recorded next to it. Rejection reasons are grouped by
their wording with numbers blanked, so ``"recomposition_mean 3.1 > 2"`` and ``"recomposition_mean 4.7 > 2"``
are one reason.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from layerloop.selfimprove.layout import FIXED_COLUMNS, ROUND_FILE, ROUNDS_DIR, SCORES_FILE, RoundPaths

# Numbers (and nan/inf) in a reason are blanked to "#" to group reasons that differ only in their values.
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\b(?:nan|inf|infinity)\b", re.IGNORECASE)


@dataclass
class RoundData:
    """One round's ``round.json`` and ``scores.parquet`` rows, with its score columns sorted by type."""

    round_dir: Path
    number: int
    info: dict[str, Any]
    rows: list[dict[str, Any]]
    numeric: list[str] = field(default_factory=list)  # int/float columns: plotted and summarised
    boolean: list[str] = field(default_factory=list)  # summarised as 0/1
    all_null: list[str] = field(default_factory=list)  # typed null: no value in any row, type unknown
    skipped: list[str] = field(default_factory=list)  # strings, lists, ...
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") != "failed"]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == "failed"]

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.ok if r.get("accepted") is True]

    @property
    def rejected(self) -> list[dict[str, Any]]:
        return [r for r in self.ok if r.get("accepted") is not True]

    @property
    def summarised(self) -> list[str]:
        return self.numeric + self.boolean

    @property
    def paths(self) -> RoundPaths:
        return RoundPaths(self.round_dir)


def load_round(round_dir: str | Path) -> RoundData:
    """Read ``round.json`` and ``scores.parquet``. The round number comes from ``round.json``; a round
    without it falls back to the ``round-NNN`` directory name, then to the scores' ``round`` column."""
    round_dir = Path(round_dir)
    scores_path = RoundPaths(round_dir).scores
    if not scores_path.exists():
        raise FileNotFoundError(f"{round_dir}: no {SCORES_FILE}, not a scored round directory")
    warnings: list[str] = []
    info_path = RoundPaths(round_dir).round_json
    info: dict[str, Any] = {}
    if info_path.exists():
        loaded = json.loads(info_path.read_text())
        info = loaded if isinstance(loaded, dict) else {}
    else:
        warnings.append(f"no {ROUND_FILE}: policy, note and mix are unknown")
    table = pq.read_table(scores_path)
    rows = table.to_pylist()

    number = info.get("round")
    if not isinstance(number, int):
        match = re.fullmatch(r"round-(\d+)", round_dir.name)
        rounds_in_table = {r.get("round") for r in rows if isinstance(r.get("round"), int)}
        if match:
            number = int(match.group(1))
        elif len(rounds_in_table) == 1:
            number = rounds_in_table.pop()
        else:
            raise ValueError(f"{round_dir}: cannot tell the round number (no round.json 'round', "
                             f"directory not named round-NNN)")

    data = RoundData(round_dir=round_dir, number=number, info=info, rows=rows, warnings=warnings)
    for column in table.schema:
        if column.name in FIXED_COLUMNS:
            continue
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            data.numeric.append(column.name)
        elif pa.types.is_boolean(kind):
            data.boolean.append(column.name)
        elif pa.types.is_null(kind):
            data.all_null.append(column.name)
        else:
            data.skipped.append(column.name)
    if "key" not in table.column_names:
        raise ValueError(f"{scores_path}: no 'key' column")
    return data


def finite_values(rows: Iterable[dict[str, Any]], column: str) -> tuple[list[float], int]:
    """Finite values of ``column`` (booleans as 0/1) and how many rows had none (None, NaN, +-inf)."""
    values, missing = [], 0
    for row in rows:
        value = row.get(column)
        number = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
        if number or isinstance(value, (bool, np.bool_)):
            values.append(float(value))
        else:
            missing += 1
    return values, missing


def score_summary(rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    values, missing = finite_values(rows, column)
    if not values:
        return {"count": 0, "missing": missing, "mean": None, "median": None, "min": None, "max": None}
    array = np.asarray(values)
    return {"count": int(array.size), "missing": missing, "mean": round6(array.mean()),
            "median": round6(np.median(array)), "min": round6(array.min()), "max": round6(array.max())}


def round6(value: Any) -> float:
    return round(float(value), 6)


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 6) if denominator else None


def round_counts(data: RoundData) -> dict[str, int]:
    return {"candidates": len(data.rows), "ok": len(data.ok), "failed": len(data.failed),
            "accepted": len(data.accepted), "rejected": len(data.rejected)}


def acceptance_rates(counts: dict[str, int]) -> dict[str, Any]:
    return {"accepted_of_ok": _rate(counts["accepted"], counts["ok"]),
            "accepted_of_all": _rate(counts["accepted"], counts["candidates"])}


def reason_pattern(reason: str) -> str:
    """A reason with its numbers blanked: the text reasons are grouped by."""
    return _NUMBER.sub("#", reason)


def group_reasons(items: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """(key, reason) pairs grouped by ``reason_pattern``, most frequent first, each with its first example.
    A candidate with several reasons counts once in each of their groups."""
    groups: dict[str, dict[str, Any]] = {}
    for key, reason in items:
        pattern = reason_pattern(reason)
        if pattern not in groups:
            groups[pattern] = {"reason": pattern, "count": 0, "example": reason, "example_key": key}
        groups[pattern]["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))


def _rejection_reasons(data: RoundData) -> list[dict[str, Any]]:
    pairs = []
    for row in data.rejected:
        reasons = row.get("reasons") or []
        if not reasons:
            reasons = ["(no reason recorded)"]
        pairs.extend((row["key"], str(reason)) for reason in reasons)
    return group_reasons(pairs)


def _failure_reasons(data: RoundData) -> list[dict[str, Any]]:
    return group_reasons((row["key"], str(row.get("error") or "(no error recorded)")) for row in data.failed)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int] | None:
    """``metrics.jsonl`` records sorted by step (a record without ``step`` takes its line number), and the
    number of lines that were not JSON objects (a line cut short by a crash); None if the file is absent."""
    if not path.exists():
        return None
    records, bad = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        if not is_number(record.get("step")):
            record = {**record, "step": number}
        records.append(record)
    records.sort(key=lambda r: r["step"])
    return records, bad


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """Numeric keys whose name says loss, ``loss`` first, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        for name, value in record.items():
            if "loss" in name.lower() and is_number(value):
                names.setdefault(name)
    return sorted(names, key=lambda n: n != "loss")


def metric_series(records: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    pairs = [(float(r["step"]), float(r[name])) for r in records if is_number(r.get(name))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def training_stats(metrics: tuple[list[dict[str, Any]], int] | None) -> dict[str, Any]:
    if metrics is None:
        return {"present": False}
    records, bad = metrics
    terms = {}
    for name in loss_terms(records):
        steps, values = metric_series(records, name)
        best = int(np.argmin(values))
        terms[name] = {"count": len(values), "first": round6(values[0]), "last": round6(values[-1]),
                       "min": round6(values[best]), "min_step": steps[best], "first_step": steps[0],
                       "last_step": steps[-1]}
    streams = sorted({str(r["stream"]) for r in records if r.get("stream") is not None})
    return {"present": True, "records": len(records), "bad_lines": bad,
            "first_step": records[0]["step"] if records else None,
            "last_step": records[-1]["step"] if records else None,
            "streams": streams, "loss": terms.get("loss"), "terms": terms}


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def round_stats(data: RoundData) -> dict[str, Any]:
    """Everything the round report shows, from ``round.json``, ``scores.parquet`` and ``metrics.jsonl``
    (no tar is opened)."""
    info = data.info
    counts = round_counts(data)
    warnings = list(data.warnings)
    recorded = info.get("counts")
    if isinstance(recorded, dict):
        differ = {k: (recorded[k], counts[k]) for k in counts if k in recorded and recorded[k] != counts[k]}
        if differ:
            warnings.append("round.json counts differ from scores.parquet (recorded, found): "
                            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()))
    groups = {"all": data.ok, "accepted": data.accepted, "rejected": data.rejected}
    return {
        "round": data.number,
        "family": info.get("family"),
        "policy": info.get("policy"),
        "model_free_only": info.get("model_free_only"),
        "note": info.get("note"),
        "checkpoint_hash": info.get("checkpoint_hash"),
        "counts": counts,
        "counts_recorded": recorded if isinstance(recorded, dict) else None,
        "acceptance": acceptance_rates(counts),
        "score_columns": {"numeric": data.numeric, "boolean": data.boolean, "all_null": data.all_null,
                          "skipped": data.skipped},
        "scores": {c: {name: score_summary(rows, c) for name, rows in groups.items()} for c in data.summarised},
        "reasons": _rejection_reasons(data),
        "failures": _failure_reasons(data),
        "mix": info.get("mix") if isinstance(info.get("mix"), list) else [],
        "training": training_stats(read_metrics(data.paths.metrics)),
        "warnings": warnings,
    }


def find_round_dirs(out_dir: str | Path) -> list[Path]:
    """``out_dir/rounds/round-*`` directories holding a ``scores.parquet``, in name order."""
    rounds = Path(out_dir) / ROUNDS_DIR
    return sorted(p for p in rounds.glob("round-*") if p.is_dir() and RoundPaths(p).scores.exists())


def summary_stats(rounds: list[RoundData], report: Path) -> dict[str, Any]:
    """``stats.json`` of the summary report over ``rounds`` (in round order): one entry per round, linked
    to its round report relative to ``report`` (the summary's folder), and each score's drift."""
    entries = [_summary_entry(data, report) for data in rounds]
    summarised = list(dict.fromkeys(c for d in rounds for c in d.summarised))
    return {"rounds": entries, "first_round": entries[0]["round"] if entries else None,
            "drift": {column: _drift(entries, column) for column in summarised},
            "files": {"acceptance": "acceptance.png", "drift": "drift.png", "loss": "loss.png",
                      "html": "index.html"}}


def _summary_entry(data: RoundData, report: Path) -> dict[str, Any]:
    counts = round_counts(data)
    round_report = data.paths.report / "index.html"
    mix = data.info.get("mix") if isinstance(data.info.get("mix"), list) else []
    return {
        "round": data.number, "dir": str(data.round_dir), "family": data.info.get("family"),
        "note": data.info.get("note"), "model_free_only": data.info.get("model_free_only"),
        "checkpoint_hash": data.info.get("checkpoint_hash"), "counts": counts,
        "acceptance": acceptance_rates(counts), "mix": mix,
        "mix_samples": sum(m.get("samples") or 0 for m in mix if isinstance(m, dict)),
        "loss": training_stats(read_metrics(data.paths.metrics)).get("loss"),
        "report": Path(os.path.relpath(round_report, report)).as_posix() if round_report.exists() else None,
        "scores": {c: {"all": score_summary(data.ok, c), "accepted": score_summary(data.accepted, c)}
                   for c in data.summarised},
    }


def _drift(entries: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """The mean of ``column`` over each round's ok candidates, and its change against the first round."""
    base = entries[0]["scores"].get(column, {}).get("all", {}).get("mean") if entries else None
    points = []
    for entry in entries:
        mean = entry["scores"].get(column, {}).get("all", {}).get("mean")
        change = round6(mean - base) if mean is not None and base is not None else None
        points.append({"round": entry["round"], "mean": mean, "change": change})
    return points
