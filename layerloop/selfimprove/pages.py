"""The HTML pages of the round and summary reports (``index.html``): every value is escaped unless it is
already markup (``_Html``)."""

from __future__ import annotations

import html
from typing import Any

from layerloop.selfimprove.stats import fmt

class _Html(str):
    """Text that is already HTML (a link, a number with markup); every other cell is escaped."""


def _esc(value: Any) -> str:
    return value if isinstance(value, _Html) else html.escape(fmt(value))


def _table(headers: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    if not rows:
        return "<p class='muted'>none</p>"
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        ("<td class='num'>" if i >= numeric_from and _is_numeric_cell(c) else "<td>") + f"{_esc(c)}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_numeric_cell(value: Any) -> bool:
    if isinstance(value, str) and not isinstance(value, _Html):  # a percentage, or "n/a" in its column
        return value.endswith("%") or value == "n/a"
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


_CSS = """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 24px; color: #191919; max-width: 1400px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 28px; border-bottom: 1px solid #ccc; }
.muted { color: #696969; } .num { text-align: right; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #d4d4d4; padding: 3px 8px; vertical-align: top; }
th { background: #f0f0f2; text-align: left; } tbody tr:nth-child(even) { background: #fafafa; }
.note { border: 2px solid #d08c00; background: #fff6dc; padding: 10px 14px; margin: 12px 0; font-size: 15px; }
.big { font-size: 20px; } pre { background: #f4f4f6; padding: 8px; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0; }
"""


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _image(name: str, alt: str) -> str:
    return f"<p><a href='{html.escape(name)}'><img src='{html.escape(name)}' alt='{html.escape(alt)}'></a></p>"


def round_html(stats: dict[str, Any]) -> str:
    number, counts, acceptance = stats["round"], stats["counts"], stats["acceptance"]
    body = [f"<h1>Round {number:03d}</h1>",
            (f"<p class='muted'>family {_esc(stats.get('family') or '?')} · checkpoint "
             f"<code>{_esc(stats.get('checkpoint_hash') or '?')}</code></p>")]
    note = stats.get("note")
    if stats.get("model_free_only"):
        body.append("<div class='note'><b>Only model-free scores decide this round.</b> "
                    + (_esc(note) if note else "Model scores are not meaningful in this profile.") + "</div>")
    elif note:
        body.append(f"<p class='note'>{_esc(note)}</p>")
    for warning in stats.get("warnings", []):
        body.append(f"<p class='muted'>warning: {_esc(warning)}</p>")
    body.append(
        f"<p class='big'>Accepted <b>{counts['accepted']}</b> of {counts['ok']} ok candidates "
        f"(<b>{_percent(acceptance['accepted_of_ok'])}</b>); {counts['accepted']} of {counts['candidates']} "
        f"candidates in all ({_percent(acceptance['accepted_of_all'])}). {counts['rejected']} rejected, "
        f"{counts['failed']} failed.</p>")
    body += ["<h2>Policy</h2>", f"<pre>{_esc(stats.get('policy') or '(not recorded)')}</pre>"]

    body.append("<h2>Training mix</h2>")
    mix = stats.get("mix") or []
    body.append(_table(["name", "origin", "round", "weight", "samples", "run_dir"],
                       [[m.get("name"), m.get("origin"), m.get("round"), m.get("weight"), m.get("samples"),
                         m.get("run_dir")] for m in mix if isinstance(m, dict)], numeric_from=2))

    body.append("<h2>Rejection reasons</h2><p class='muted'>grouped by their text with numbers replaced by #; "
                "a candidate with several reasons counts in each</p>")
    body.append(_table(["reason", "count", "example"],
                       [[g["reason"], g["count"], f"{g['example_key']}: {g['example']}"] for g in stats["reasons"]]))
    if stats["failures"]:
        body.append("<h2>Failures</h2>")
        body.append(_table(["error", "count", "example"],
                           [[g["reason"], g["count"], f"{g['example_key']}: {g['example']}"]
                            for g in stats["failures"]]))

    body.append("<h2>Scores</h2><p class='muted'>finite values only; booleans as 0/1 (mean = rate)</p>")
    headers = ["score"] + [f"{group} {part}" for group in ("accepted", "rejected")
                           for part in ("n", "mean", "median", "min", "max")]
    rows = []
    for column, groups in stats["scores"].items():
        rows.append([column] + [groups[group][part] for group in ("accepted", "rejected")
                                for part in ("count", "mean", "median", "min", "max")])
    body.append(_table(headers, rows))
    columns = stats["score_columns"]
    if columns["all_null"] or columns["skipped"]:
        body.append(f"<p class='muted'>no values in any row: {_esc(', '.join(columns['all_null']) or '–')}; "
                    f"not summarised (text): {_esc(', '.join(columns['skipped']) or '–')}</p>")
    body.append(_image("scores.png", "score histograms"))

    training = stats["training"]
    body.append("<h2>Training</h2>")
    if training.get("present") and training.get("loss"):
        loss = training["loss"]
        body.append(f"<p>loss {fmt(loss['first'])} at step {fmt(loss['first_step'])} → {fmt(loss['last'])} at "
                    f"step {fmt(loss['last_step'])} (min {fmt(loss['min'])} at step {fmt(loss['min_step'])})</p>")
    elif not training.get("present"):
        body.append("<p class='muted'>no training metrics for this round</p>")
    body.append(_image("loss.png", "training loss"))

    shown = stats["shown"]
    body.append("<h2>Accepted candidates</h2>")
    body.append(_image("accepted.png", "accepted candidates"))
    body.append("<h2>Rejected candidates</h2>")
    body.append(_image("rejected.png", "rejected candidates"))
    if shown["missing_images"]:
        body.append(f"<p class='muted'>not found in candidates/: {_esc(', '.join(shown['missing_images']))}</p>")
    body.append("<p class='muted'>all numbers: <a href='stats.json'>stats.json</a></p>")
    return _page(f"round {number:03d} report", body)


def _mix_text(mix: list[Any]) -> str:
    parts = [f"{m.get('name', '?')}: {fmt(m.get('samples'))}" for m in mix if isinstance(m, dict)]
    return ", ".join(parts) or "–"


def summary_html(stats: dict[str, Any]) -> str:
    entries = stats["rounds"]
    body = ["<h1>Self-improvement rounds</h1>",
            (f"<p class='muted'>{len(entries)} round(s) · drift is measured on all ok candidates of each round, "
             f"changes are against round {fmt(stats['first_round'])}</p>")]
    notes: dict[str, list[int]] = {}
    for entry in entries:
        if entry.get("note"):
            notes.setdefault(entry["note"], []).append(entry["round"])
    for note, numbers in notes.items():
        rounds_text = ", ".join(str(n) for n in numbers)
        body.append(f"<div class='note'><b>round(s) {_esc(rounds_text)}:</b> {_esc(note)}</div>")

    body.append("<h2>Rounds</h2>")
    rows = []
    for entry in entries:
        counts, acceptance = entry["counts"], entry["acceptance"]
        label = f"round {entry['round']:03d}"
        link = (_Html(f"<a href='{html.escape(entry['report'])}'>{html.escape(label)}</a>") if entry["report"]
                else _Html(f"{html.escape(label)} <span class='muted'>(no report)</span>"))
        loss = entry["loss"] or {}
        rows.append([link, entry.get("family"), counts["candidates"], counts["ok"], counts["failed"],
                     counts["accepted"], _percent(acceptance["accepted_of_ok"]),
                     _percent(acceptance["accepted_of_all"]), entry.get("checkpoint_hash"),
                     entry["mix_samples"], _mix_text(entry["mix"]),
                     f"{fmt(loss.get('first'))} → {fmt(loss.get('last'))}" if loss else "–"])
    body.append(_table(["round", "family", "candidates", "ok", "failed", "accepted", "accepted / ok",
                        "accepted / all", "checkpoint", "mix samples", "mix", "loss first → last"], rows))
    body.append(_image("acceptance.png", "acceptance per round"))

    body.append("<h2>Score drift</h2><p class='muted'>mean over ok candidates (change vs the first round); "
                "booleans as rates</p>")
    numbers = [e["round"] for e in entries]
    rows = []
    for column, series in stats["drift"].items():
        by_round = {point["round"]: point for point in series}
        cells: list[Any] = [column]
        for number in numbers:
            point = by_round.get(number)
            if point is None or point["mean"] is None:
                cells.append("–")
            elif point["change"] is None or number == stats["first_round"]:
                cells.append(point["mean"])
            else:
                cells.append(f"{fmt(point['mean'])} ({point['change']:+.4g})")
        rows.append(cells)
    body.append(_table(["score"] + [f"round {n}" for n in numbers], rows))
    body.append(_image("drift.png", "score drift"))
    if stats.get("evaluation"):
        body += _evaluation_section(stats["evaluation"])
    body += ["<h2>Training loss</h2>", _image("loss.png", "training loss per round"),
             "<p class='muted'>all numbers: <a href='stats.json'>stats.json</a></p>"]
    return _page("self-improvement rounds", body)


def _evaluation_section(evals: list[dict[str, Any]]) -> list[str]:
    """The held-out metrics of every evaluated round: a row per (round, method)."""
    metrics = list(dict.fromkeys(m for e in evals for values in e["metrics"].values() for m in values))
    rows = []
    for entry in evals:
        for method, values in entry["metrics"].items():
            label = entry.get("labels", {}).get(method, method)
            rows.append([f"round {entry['round']}", label, *[
                "missing weights" if m in entry.get("missing", {}) else ("–" if values.get(m) is None else values[m])
                for m in metrics]])
    last = evals[-1]
    models = ", ".join(f"{m}: {model}" for m, model in last.get("models", {}).items())
    return ["<h2>Held-out evaluation</h2>",
            f"<p class='muted'>n = {_esc(last.get('n'))} fixed held-out samples; models: {_esc(models)}</p>",
            _table(["round", "method", *metrics], rows, numeric_from=2),
            _image("evaluation.png", "held-out metrics by round")]
