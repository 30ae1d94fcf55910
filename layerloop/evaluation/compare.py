"""``layerloop compare DIR DIR ...``: the metrics of several evaluations or self-improvement loops in one
table. An evaluation directory contributes a row per method (its ``metrics.json``); a self-improvement
directory a row per (round, method) from each round's ``eval.json`` (round 0's also has ``start``, the
untrained LoRA that round 0 started from, when the loop's evaluation measures it)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from layerloop import storage
from layerloop.evaluation.results import METRIC_INFO


def collect(dirs: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """(row label, metrics.json-shaped dict) for every evaluation found in ``dirs`` (folders or store URLs),
    in order."""
    found: list[tuple[str, dict[str, Any]]] = []
    for folder in map(storage.location, dirs):
        if (folder / "metrics.json").is_file():
            found.append((str(folder), json.loads((folder / "metrics.json").read_text())))
            continue
        if isinstance(folder, storage.StorePath):  # one recursive listing of the prefix
            evals = sorted(p for p in folder.rglob("eval.json")
                           if fnmatch.fnmatchcase(p.url[len(folder.url) + 1:], "rounds/round-*/eval.json"))
        else:
            evals = sorted(folder.glob("rounds/round-*/eval.json"))
        for path in evals:
            found.append((f"{folder} {path.parent.name}", json.loads(path.read_text())))
        if not evals:
            raise FileNotFoundError(f"{folder}: no metrics.json (an evaluation) and no rounds/round-*/eval.json "
                                    "(a self-improvement loop with evaluation)")
    return found


def compare_table(dirs: list[str | Path]) -> str:
    found = collect(dirs)
    metrics: list[str] = []
    for _, result in found:
        for values in result["metrics"].values():
            metrics.extend(m for m in values if m not in metrics)
    lines = ["| run | method | n | " + " | ".join(METRIC_INFO.get(m, (m, True))[0] for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 3)]
    for label, result in found:
        missing = result.get("missing", {})
        for method, values in result["metrics"].items():
            cells = []
            for metric in metrics:
                value = values.get(metric)
                cells.append("missing weights" if metric in missing else "—" if value is None else f"{value:.4g}")
            name = result.get("labels", {}).get(method, method)
            lines.append(f"| {label} | {name} | {result.get('n', '?')} | " + " | ".join(cells) + " |")
    models = {m: model for _, r in found for m, model in r.get("models", {}).items()}
    lines += ["", "Models: " + ", ".join(f"{m}: {models.get(m, '-')}" for m in metrics) + "."]
    return "\n".join(lines) + "\n"
