"""What a self-improvement round did, and how rounds compare: ``round-NNN/report/`` and ``OUT/report/``.

A round's decision is a filter over scored candidates, and a filter is only trusted once someone has
looked at what it let through and what it threw away. So the round report puts side by side: how many
candidates were accepted (of the ok ones and of all), the policy text, the score distributions of
accepted vs rejected candidates, why the rejected ones were rejected, a few accepted and rejected
candidates as images, and the training loss of the round. The summary report lines rounds up, because
the question a loop raises is drift: does the acceptance rate move, do the score distributions of what
the model generates move, round after round.

One module per job: ``stats`` (reading a round, the numbers of ``stats.json``; its docstring says what
the inputs hold and how everything is defined), ``figures`` (PNG figures), ``sheets`` (contact sheets of
candidates), ``pages`` (``index.html``); this module writes the files. Every file is written under a
temporary name and renamed (``layerloop.files``), so a reader (or the summary report, written while the
next round runs) never sees half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerloop.files import write_atomic, write_json_atomic
from layerloop.selfimprove.evaluation import read_round_evals
from layerloop.selfimprove.figures import (acceptance_figure, drift_figure, evaluation_figure, scores_figure,
                                           summary_loss_figure, training_figure)
from layerloop.selfimprove.layout import summary_report_dir
from layerloop.selfimprove.pages import round_html, summary_html
from layerloop.selfimprove.sheets import CANDIDATE_LAYOUT, render_candidates_sheet, sheet_png, spread
from layerloop.selfimprove.stats import (RoundData, find_round_dirs, fmt, group_reasons, load_round, read_metrics,
                                         reason_pattern, round_stats, summary_stats)


def _write_stats(path: Path, stats: dict[str, Any]) -> None:
    write_json_atomic(path, stats, ensure_ascii=False, default=fmt)


def write_round_report(round_dir: str | Path, rows: int = 6) -> dict[str, Any]:
    """Write ``round_dir/report/``: ``scores.png``, ``accepted.png``, ``rejected.png``, ``loss.png``,
    ``index.html`` and ``stats.json``; return the stats. ``rows`` accepted and ``rows`` rejected
    candidates are shown, evenly spread over their keys in sorted order."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    data = load_round(round_dir)
    stats = round_stats(data)
    out = data.paths.report
    out.mkdir(exist_ok=True)

    accepted_png, accepted_keys, accepted_missing = sheet_png(data, "accepted", rows)
    rejected_png, rejected_keys, rejected_missing = sheet_png(data, "rejected", rows)
    stats["shown"] = {"accepted": accepted_keys, "rejected": rejected_keys,
                      "missing_images": accepted_missing + rejected_missing}
    stats["files"] = {"scores": "scores.png", "accepted": "accepted.png", "rejected": "rejected.png",
                      "loss": "loss.png", "html": "index.html"}
    write_atomic(out / "scores.png", scores_figure(data))
    write_atomic(out / "accepted.png", accepted_png)
    write_atomic(out / "rejected.png", rejected_png)
    metrics = read_metrics(data.paths.metrics)
    write_atomic(out / "loss.png", training_figure(f"round {data.number:03d}: training", metrics))
    write_atomic(out / "index.html", round_html(stats))
    _write_stats(out / "stats.json", stats)
    return stats


def write_summary_report(out_dir: str | Path, round_dirs: list[Path] | None = None) -> dict[str, Any]:
    """Write ``out_dir/report/``: ``acceptance.png``, ``drift.png``, ``loss.png``, ``index.html`` and
    ``stats.json`` over ``round_dirs`` (default ``find_round_dirs(out_dir)``); return the stats. Round
    reports are linked, not written: run ``write_round_report`` for each round first."""
    report = summary_report_dir(out_dir)
    round_dirs = find_round_dirs(out_dir) if round_dirs is None else [Path(d) for d in round_dirs]
    rounds = sorted((load_round(d) for d in round_dirs), key=lambda d: d.number)
    stats = summary_stats(rounds, report)

    report.mkdir(parents=True, exist_ok=True)
    write_atomic(report / "acceptance.png", acceptance_figure(stats["rounds"]))
    write_atomic(report / "drift.png", drift_figure(rounds, list(dict.fromkeys(c for d in rounds for c in d.numeric))))
    write_atomic(report / "loss.png", summary_loss_figure([(d.number, read_metrics(d.paths.metrics)) for d in rounds]))
    evals = read_round_evals([d.round_dir for d in rounds])
    if evals:  # a loop with an `evaluation`: every held-out metric by round
        stats["evaluation"] = [{"round": number, **result} for number, result in evals]
        stats["files"]["evaluation"] = "evaluation.png"
        write_atomic(report / "evaluation.png", evaluation_figure(evals))
    write_atomic(report / "index.html", summary_html(stats))
    _write_stats(report / "stats.json", stats)
    return stats


__all__ = ["CANDIDATE_LAYOUT", "RoundData", "find_round_dirs", "group_reasons", "load_round", "read_metrics",
           "reason_pattern", "render_candidates_sheet", "round_stats", "spread", "write_round_report",
           "write_summary_report"]
