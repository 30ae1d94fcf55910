"""``stats.json`` of a run: counts and distributions from the shard indexes alone (no tar is opened).

Counting rules: the index is authoritative for every key that reached a shard (ok or failed);
``failures.parquet`` adds only the keys no shard knows, i.e. failures found while listing the source.
That keeps the counts right for a run that is still going, whose ``failures.parquet`` is stale or absent.
Damaged shards are listed in ``damaged_shards`` and left out of every count.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from layerloop.report.scan import RunIndex, existing_run_dir, index_paths, read_failures, read_run_info, scan_run


def parse_scores(text: str | None) -> dict[str, Any]:
    """An index row's ``scores`` JSON text as a dict (``{}`` when absent or not an object)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _summary(values: Iterable[float], integer: bool = False) -> dict[str, Any] | None:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return None
    cast = int if integer else float
    return {"count": int(array.size), "min": cast(array.min()), "median": _median(np.sort(array)),
            "mean": round(float(array.mean()), 6), "max": cast(array.max())}


def _median(ordered: np.ndarray) -> float:
    """``np.median`` of a sorted array of finite values, computed as it does (the middle value, or the mean of
    the two middle values), without ``np.median``, whose NaN check imports ``numpy.ma`` (a sixth of
    ``layerloop inspect``'s start-up)."""
    middle = ordered.size // 2
    if ordered.size % 2:
        return float(ordered[middle])
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def flatten_numbers(value: Any, prefix: str = "") -> Iterable[tuple[str, float]]:
    """Numeric leaves of a scores object as dotted names (``{"clip": {"t2i": .3}}`` -> ``clip.t2i``);
    booleans and non-finite numbers are not scores to average."""
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from flatten_numbers(inner, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix, float(value)


def _failure_groups(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures grouped by (stage, error_type), most frequent first, each with its first example."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in failures:
        reason = (row["stage"] or "?", row["error_type"] or "?")
        if reason not in groups:
            groups[reason] = {"stage": reason[0], "error_type": reason[1], "count": 0,
                              "example_key": row["key"], "example_message": row["message"] or ""}
        groups[reason]["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["stage"], g["error_type"]))


def run_stats(run_dir: str | Path, index: RunIndex | pa.Table | None = None) -> dict[str, Any]:
    """Counts and distributions from the index alone (no tar is opened). ``index`` saves re-reading it
    when the caller already has ``scan_run(run_dir)`` (or a ``load_index`` table, taken as intact).
    Damaged shards are listed in ``damaged_shards`` and left out of every count."""
    run_dir = existing_run_dir(run_dir)
    info = read_run_info(run_dir)
    if index is None:
        index = scan_run(run_dir)
    if not isinstance(index, RunIndex):  # a load_index table, taken as intact
        table = index
        index = RunIndex(run_dir, table, {}, set(), {})
        committed = len(index_paths(run_dir))
    else:
        committed = len(index.rows) - len(index.damaged)
    damaged = index.damaged_list()
    failures = read_failures(run_dir, index.table, index.damaged)
    ok = index.intact_ok_columns(("kind", "width", "height", "caption", "scores"))
    samples_ok = len(ok["kind"])

    kinds = Counter(k if k is not None else "?" for k in ok["kind"])
    widths, heights = ok["width"], ok["height"]
    captions = [c or "" for c in ok["caption"]]
    scores: dict[str, list[float]] = {}
    for text in ok["scores"]:
        for name, value in flatten_numbers(parse_scores(text)):
            scores.setdefault(name, []).append(value)

    stats: dict[str, Any] = {
        "run": {name: info.get(name) for name in ("name", "status", "fingerprint", "seed", "created", "finished")},
        "shards": {"committed": committed, "planned": info.get("shards")},
        "damaged_shards": damaged,
        "samples_ok": samples_ok,
        "samples_failed": len(failures),
        "samples_total": samples_ok + len(failures),
        "by_kind": dict(sorted(kinds.items())),
        "failures": _failure_groups(failures),
        "sizes": {"width": _summary(widths, integer=True), "height": _summary(heights, integer=True)},
        "captions": {"empty": sum(1 for c in captions if not c.strip()),
                     "length_chars": _summary((len(c) for c in captions), integer=True)},
        "scores": {name: _summary(values) for name, values in sorted(scores.items())},
    }
    if samples_ok == 0:
        stats["note"] = "no samples: the run has no ok samples"
    return stats
