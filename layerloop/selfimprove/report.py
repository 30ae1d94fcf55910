"""What a self-improvement round did, and how rounds compare: ``round-NNN/report/`` and ``OUT/report/``.

A round's decision is a filter over scored candidates, and a filter is only trusted once someone has
looked at what it let through and what it threw away. So the round report puts side by side: how many
candidates were accepted (of the ok ones and of all), the policy text, the score distributions of
accepted vs rejected candidates, why the rejected ones were rejected (reasons grouped by their wording
with numbers blanked, so ``"recomposition_mean 3.1 > 2"`` and ``"recomposition_mean 4.7 > 2"`` are one
reason), a few accepted and rejected candidates as images, and the training loss of the round. The
summary report lines rounds up, because the question a loop raises is drift: does the acceptance rate
move, do the score distributions of what the model generates move, round after round.

Inputs, written by the loop into ``OUT/rounds/round-NNN/``:

* ``round.json``: round number, family, policy text, ``model_free_only`` + ``note`` (demo profiles whose
  model scores are random; the note is shown prominently so nobody reads meaning into CLIP or HPS
  columns), checkpoint hash, counts, and the training mix; every key but ``round`` may be absent.
* ``scores.parquet``: one row per candidate. Besides the fixed columns (``FIXED_COLUMNS``) every column
  is a score; numeric ones are plotted and summarised, booleans are summarised as 0/1 (their mean is a
  rate), strings are skipped. The columns are discovered from the table, so a new scorer needs no change
  here.
* ``candidates/``: a layerloop run directory of the candidate samples; only the shown candidates' tar
  members are read (``layerloop.report._read_records``), never the whole round.
* ``train/metrics.jsonl``: one JSON object per logged step; absent for a round that did not train.

Definitions used everywhere (stats.json, HTML, figures): a candidate is *failed* when its ``status`` is
``"failed"``, else *ok*; *accepted* when ok and ``accepted`` is true; *rejected* when ok and not
accepted. Score summaries use finite values only; None, NaN and infinities count as ``missing``. Drift
across rounds is measured on all ok candidates of each round (what the model generates, before the
filter), with the accepted candidates' summaries recorded next to it.

Every file is written under a temporary name and renamed, so a reader (or the summary report, written
while the next round runs) never sees half a file. Figures use matplotlib's ``Figure`` with the Agg
canvas directly, so nothing here touches pyplot's global state.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from layerloop.report import (SheetLayout, _draw_text_cell, _font, _read_records, _thumbnails, _wrap,
                              load_index)
from layerloop.samples import LayeredSample

ROUND_FILE = "round.json"
SCORES_FILE = "scores.parquet"
CANDIDATES_DIR = "candidates"
METRICS_FILE = Path("train") / "metrics.jsonl"
REPORT_DIR = "report"
ROUNDS_DIR = "rounds"
# scores.parquet columns that are not scores; every other column is one.
FIXED_COLUMNS = ("key", "input_key", "source_key", "round", "status", "error", "accepted", "rule", "reasons",
                 "checkpoint_hash")
# metrics.jsonl keys that are numbers but not loss terms: plotted in their own panel.
OPTIMISER_KEYS = ("lr", "grad_norm")

DPI = 100
ACCEPTED_COLOUR, REJECTED_COLOUR = "#2a9d5c", "#d1495b"
# A smaller cell than the run report's: a round sheet is about comparing rows, and the candidates are
# usually small generated images.
CANDIDATE_LAYOUT = SheetLayout(cell=160, text_width=560,
                               columns=("composite", "background", "foreground (RGBA)", "mask",
                                        "key · caption · input · decision · scores"))
_INK, _MUTED, _PANEL, _STRIPE = (25, 25, 25), (105, 105, 105), (226, 226, 226), (244, 244, 246)
# Numbers (and nan/inf) in a reason are blanked to "#" to group reasons that differ only in their values.
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\b(?:nan|inf|infinity)\b", re.IGNORECASE)


# =========================================================================== reading a round
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


def load_round(round_dir: str | Path) -> RoundData:
    """Read ``round.json`` and ``scores.parquet``. The round number comes from ``round.json``; a round
    without it falls back to the ``round-NNN`` directory name, then to the scores' ``round`` column."""
    round_dir = Path(round_dir)
    scores_path = round_dir / SCORES_FILE
    if not scores_path.exists():
        raise FileNotFoundError(f"{round_dir}: no {SCORES_FILE}, not a scored round directory")
    warnings: list[str] = []
    info_path = round_dir / ROUND_FILE
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


def _values(rows: Iterable[dict[str, Any]], column: str) -> tuple[list[float], int]:
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


def _summary(rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    values, missing = _values(rows, column)
    if not values:
        return {"count": 0, "missing": missing, "mean": None, "median": None, "min": None, "max": None}
    array = np.asarray(values)
    return {"count": int(array.size), "missing": missing, "mean": _round(array.mean()),
            "median": _round(np.median(array)), "min": _round(array.min()), "max": _round(array.max())}


def _round(value: Any) -> float:
    return round(float(value), 6)


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 6) if denominator else None


def _counts(data: RoundData) -> dict[str, int]:
    return {"candidates": len(data.rows), "ok": len(data.ok), "failed": len(data.failed),
            "accepted": len(data.accepted), "rejected": len(data.rejected)}


def _acceptance(counts: dict[str, int]) -> dict[str, Any]:
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
        if not _is_number(record.get("step")):
            record = {**record, "step": number}
        records.append(record)
    records.sort(key=lambda r: r["step"])
    return records, bad


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """Numeric keys whose name says loss, ``loss`` first, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        for name, value in record.items():
            if "loss" in name.lower() and _is_number(value):
                names.setdefault(name)
    return sorted(names, key=lambda n: n != "loss")


def _series(records: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    pairs = [(float(r["step"]), float(r[name])) for r in records if _is_number(r.get(name))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _training_stats(metrics: tuple[list[dict[str, Any]], int] | None) -> dict[str, Any]:
    if metrics is None:
        return {"present": False}
    records, bad = metrics
    terms = {}
    for name in _loss_terms(records):
        steps, values = _series(records, name)
        best = int(np.argmin(values))
        terms[name] = {"count": len(values), "first": _round(values[0]), "last": _round(values[-1]),
                       "min": _round(values[best]), "min_step": steps[best], "first_step": steps[0],
                       "last_step": steps[-1]}
    streams = sorted({str(r["stream"]) for r in records if r.get("stream") is not None})
    return {"present": True, "records": len(records), "bad_lines": bad,
            "first_step": records[0]["step"] if records else None,
            "last_step": records[-1]["step"] if records else None,
            "streams": streams, "loss": terms.get("loss"), "terms": terms}


# =========================================================================== figures
def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _message_figure(title: str, message: str) -> bytes:
    figure = _figure(6, 2.2)
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#666666", transform=ax.transAxes)
    return _png(figure)


def _panels(figure: Figure, count: int, columns: int) -> list[Any]:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_axis_off()
    return list(axes[:count])


def _bin_edges(values: list[float]) -> np.ndarray:
    low, high = min(values), max(values)
    if low == high:  # one distinct value: a single bar around it
        half = abs(low) * 0.05 or 0.5
        return np.array([low - half, high + half])
    if all(v == int(v) for v in values) and high - low <= 40:  # small integers: one bar per integer
        return np.arange(low - 0.5, high + 1.5)
    return np.histogram_bin_edges(values, bins=int(min(30, max(6, math.sqrt(len(values)) * 2))))


def _no_values(ax: Any, text: str = "no values") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#666666", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _scores_figure(data: RoundData) -> bytes:
    columns = data.numeric
    if not columns:
        return _message_figure(f"round {data.number}: scores", "no numeric score columns")
    figure = _figure(3.4 * min(4, len(columns)), 2.5 * math.ceil(len(columns) / 4) + 0.3)
    figure.suptitle(f"round {data.number}: scores of ok candidates, accepted vs rejected")
    accepted_rows, rejected_rows = data.accepted, data.rejected
    for ax, column in zip(_panels(figure, len(columns), 4), columns):
        accepted, accepted_missing = _values(accepted_rows, column)
        rejected, rejected_missing = _values(rejected_rows, column)
        missing = accepted_missing + rejected_missing
        ax.set_title(column + (f"  ({missing} missing)" if missing else ""), fontsize=10)
        if not accepted and not rejected:
            _no_values(ax)
            continue
        edges = _bin_edges(accepted + rejected)
        for values, colour, label in ((rejected, REJECTED_COLOUR, "rejected"),
                                      (accepted, ACCEPTED_COLOUR, "accepted")):
            if values:
                ax.hist(values, bins=edges, color=colour, alpha=0.55, histtype="stepfilled",
                        edgecolor=colour, label=f"{label} ({len(values)})")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    return _png(figure)


def _training_figure(title: str, metrics: tuple[list[dict[str, Any]], int] | None) -> bytes:
    if metrics is None or not metrics[0]:
        return _message_figure(title, "no training metrics" if metrics is None else "metrics.jsonl is empty")
    records = metrics[0]
    terms = _loss_terms(records)
    optimiser = [name for name in OPTIMISER_KEYS if any(_is_number(r.get(name)) for r in records)]
    figure = _figure(6.5 if not optimiser else 10, 3.4)
    figure.suptitle(title)
    axes = _panels(figure, 2 if optimiser else 1, 2)
    ax = axes[0]
    streams = sorted({str(r["stream"]) for r in records if r.get("stream") is not None})
    if not terms:
        _no_values(ax, "no loss values")
    for name in terms:
        if name == "loss" and len(streams) > 1:  # interleaved streams: one line each, not a zigzag
            for stream in streams:
                steps, values = _series([r for r in records if str(r.get("stream")) == stream], name)
                ax.plot(steps, values, label=f"loss [{stream}]", lw=1.4)
        else:
            steps, values = _series(records, name)
            ax.plot(steps, values, label=name, lw=1.4 if name == "loss" else 1.0)
    all_values = [v for name in terms for v in _series(records, name)[1]]
    if all_values and min(all_values) > 0 and max(all_values) / min(all_values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss terms", fontsize=10)
    if terms:
        ax.legend(fontsize=7, frameon=False)
    if optimiser:
        ax = axes[1]
        ax.set_title(" / ".join(optimiser), fontsize=10)
        ax.set_xlabel("step")
        twin = ax.twinx() if len(optimiser) == 2 else None
        for target, name, colour in zip((ax, twin), optimiser, ("#3366aa", "#aa6633")):
            steps, values = _series(records, name)
            target.plot(steps, values, color=colour, lw=1.0)
            target.set_ylabel(name, color=colour)
    return _png(figure)


# =========================================================================== contact sheets
def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items evenly spread over ``items`` (first and last included), in order."""
    if count <= 0 or not items:
        return []
    if count >= len(items):
        return list(items)
    positions = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[p] for p in dict.fromkeys(positions.tolist())]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _read_candidates(round_dir: Path, keys: list[str]) -> tuple[dict[str, tuple[str, LayeredSample]], list[str]]:
    """(shard, sample) per key found in ``candidates/``, and the keys that are not there. Only the shards
    holding the keys are opened, and of those only the keys' members are read."""
    run_dir = round_dir / CANDIDATES_DIR
    found: dict[str, tuple[str, LayeredSample]] = {}
    if not keys:
        return found, []
    try:
        index = load_index(run_dir)
    except FileNotFoundError:
        return found, list(keys)
    wanted_keys = set(keys)
    shard_of = {key: shard for key, shard, status in zip(index["key"].to_pylist(), index["shard"].to_pylist(),
                                                         index["status"].to_pylist())
                if status == "ok" and key in wanted_keys}
    for shard in sorted(set(shard_of.values())):
        tar = run_dir / f"{shard}.tar"
        if not tar.exists():
            continue
        wanted = [key for key in keys if shard_of.get(key) == shard]
        for key, record in _read_records(tar, wanted).items():
            sample = _decode(record)
            if sample is not None:
                found[key] = (shard, sample)
    return found, [key for key in keys if key not in found]


def _decode(record: dict[str, Any]) -> LayeredSample | None:
    try:
        return LayeredSample.from_wds(record)
    except Exception:  # noqa: BLE001 - an unreadable candidate is reported as missing, not fatal
        return None


def _details(data: RoundData, row: dict[str, Any], shard: str | None) -> list[str]:
    lines = [f"input {row.get('input_key') or '?'} · source {row.get('source_key') or '?'}"
             + (f" · {shard}" if shard else " · image missing from candidates/")]
    if row.get("accepted") is True:
        lines.append(f"accepted by {row.get('rule') or '?'}")
    else:
        reasons = [str(r) for r in row.get("reasons") or []] or ["(no reason recorded)"]
        lines.append("rejected: " + "; ".join(reasons))
    scores = [f"{c}={_fmt(row.get(c))}" for c in data.summarised if row.get(c) is not None]
    scores += [f"{c}={row[c]}" for c in data.skipped if isinstance(row.get(c), str) and row[c]]
    if scores:
        lines.append("scores: " + ", ".join(scores))
    return lines


def _candidate_thumbnails(sample: LayeredSample, cell: int) -> list[Image.Image | None]:
    try:
        return list(_thumbnails(sample, cell))
    except (TypeError, ValueError, AttributeError):  # a layer missing or of the wrong shape
        return [None] * 4


def render_candidates_sheet(data: RoundData, rows: list[dict[str, Any]],
                            samples: dict[str, tuple[str, LayeredSample]], title: tuple[str, str],
                            empty_text: str, layout: SheetLayout = CANDIDATE_LAYOUT) -> Image.Image:
    """One row per scores row: composite | background | foreground on a checkerboard | mask | key, caption,
    input, decision (reasons for a rejected one) and scores. A row whose sample is not in ``samples``
    keeps its text with empty image cells; no rows gives a short sheet saying ``empty_text``."""
    fonts = {"title": _font(18, bold=True), "header": _font(14, bold=True), "key": _font(15, mono=True, bold=True),
             "text": _font(14), "small": _font(12)}
    height = layout.height(len(rows)) if rows else layout.title_height + layout.header_height + 90
    sheet = Image.new("RGB", (layout.width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((layout.margin, 8), title[0], font=fonts["title"], fill=_INK)
    subtitle = _wrap(title[1], fonts["small"], layout.width - 2 * layout.margin)[0]
    draw.text((layout.margin, 32), subtitle, font=fonts["small"], fill=_MUTED)
    header_y = layout.title_height
    for column, label in enumerate(layout.columns):
        draw.text((layout.column_x(column), header_y + 6), label, font=fonts["header"], fill=_INK)
    draw.line([(layout.margin, header_y + layout.header_height - 2),
               (layout.width - layout.margin, header_y + layout.header_height - 2)], fill=_MUTED, width=1)
    if not rows:
        draw.text((layout.width // 2, header_y + layout.header_height + 45), empty_text,
                  font=_font(24, bold=True), fill=_MUTED, anchor="mm")
        return sheet

    for number, row in enumerate(rows):
        if number % 2:
            draw.rectangle([0, layout.row_y(number), layout.width, layout.row_y(number + 1) - 1], fill=_STRIPE)
        shard, sample = samples.get(row["key"], (None, None))
        thumbs = _candidate_thumbnails(sample, layout.cell) if sample is not None else [None] * 4
        for column, thumb in enumerate(thumbs):
            x0, y0, x1, y1 = layout.cell_box(number, column)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_PANEL)
            if thumb is None:
                draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "missing", font=fonts["small"], fill=_MUTED,
                          anchor="mm")
            else:
                sheet.paste(thumb, (x0 + (layout.cell - thumb.width) // 2, y0 + (layout.cell - thumb.height) // 2))
        caption = sample.caption if sample is not None else ""
        _draw_text_cell(draw, layout.cell_box(number, 4), row["key"], caption, _details(data, row, shard), fonts)
    return sheet


def _sheet_png(data: RoundData, which: str, rows: int) -> tuple[bytes, list[str], list[str]]:
    """The accepted or rejected sheet, the keys it shows and those of them missing from candidates/."""
    pool = sorted(data.accepted if which == "accepted" else data.rejected, key=lambda r: str(r["key"]))
    chosen = spread(pool, rows)
    samples, missing = _read_candidates(data.round_dir, [r["key"] for r in chosen])
    policy = data.info.get("policy") or "policy unknown"
    title = (f"round {data.number:03d}: {which} candidates",
             f"{len(chosen)} of {len(pool)} shown, evenly spread over the keys in sorted order · policy: {policy}")
    if rows == 0 and pool:
        empty = "rows=0 was asked for"
    else:
        empty = f"no {which} candidates"
    sheet = render_candidates_sheet(data, chosen, samples, title, empty)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue(), [r["key"] for r in chosen], missing


# =========================================================================== HTML
class _Html(str):
    """Text that is already HTML (a link, a number with markup); every other cell is escaped."""


def _esc(value: Any) -> str:
    return value if isinstance(value, _Html) else html.escape(_fmt(value))


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


def _round_html(stats: dict[str, Any]) -> str:
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
        body.append(f"<p>loss {_fmt(loss['first'])} at step {_fmt(loss['first_step'])} → {_fmt(loss['last'])} at "
                    f"step {_fmt(loss['last_step'])} (min {_fmt(loss['min'])} at step {_fmt(loss['min_step'])})</p>")
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


# =========================================================================== writing
def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False, default=_fmt) + "\n"


def round_stats(data: RoundData) -> dict[str, Any]:
    """Everything the round report shows, from ``round.json``, ``scores.parquet`` and ``metrics.jsonl``
    (no tar is opened)."""
    info = data.info
    counts = _counts(data)
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
        "acceptance": _acceptance(counts),
        "score_columns": {"numeric": data.numeric, "boolean": data.boolean, "all_null": data.all_null,
                          "skipped": data.skipped},
        "scores": {c: {name: _summary(rows, c) for name, rows in groups.items()} for c in data.summarised},
        "reasons": _rejection_reasons(data),
        "failures": _failure_reasons(data),
        "mix": info.get("mix") if isinstance(info.get("mix"), list) else [],
        "training": _training_stats(read_metrics(data.round_dir / METRICS_FILE)),
        "warnings": warnings,
    }


def write_round_report(round_dir: str | Path, rows: int = 6) -> dict[str, Any]:
    """Write ``round_dir/report/``: ``scores.png``, ``accepted.png``, ``rejected.png``, ``loss.png``,
    ``index.html`` and ``stats.json``; return the stats. ``rows`` accepted and ``rows`` rejected
    candidates are shown, evenly spread over their keys in sorted order."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    data = load_round(round_dir)
    stats = round_stats(data)
    out = data.round_dir / REPORT_DIR
    out.mkdir(exist_ok=True)

    accepted_png, accepted_keys, accepted_missing = _sheet_png(data, "accepted", rows)
    rejected_png, rejected_keys, rejected_missing = _sheet_png(data, "rejected", rows)
    stats["shown"] = {"accepted": accepted_keys, "rejected": rejected_keys,
                      "missing_images": accepted_missing + rejected_missing}
    stats["files"] = {"scores": "scores.png", "accepted": "accepted.png", "rejected": "rejected.png",
                      "loss": "loss.png", "html": "index.html"}
    _write_atomic(out / "scores.png", _scores_figure(data))
    _write_atomic(out / "accepted.png", accepted_png)
    _write_atomic(out / "rejected.png", rejected_png)
    metrics = read_metrics(data.round_dir / METRICS_FILE)
    _write_atomic(out / "loss.png", _training_figure(f"round {data.number:03d}: training", metrics))
    _write_atomic(out / "index.html", _round_html(stats))
    _write_atomic(out / "stats.json", _json(stats))
    return stats


# =========================================================================== across rounds
def find_round_dirs(out_dir: str | Path) -> list[Path]:
    """``out_dir/rounds/round-*`` directories holding a ``scores.parquet``, in name order."""
    rounds = Path(out_dir) / ROUNDS_DIR
    return sorted(p for p in rounds.glob("round-*") if p.is_dir() and (p / SCORES_FILE).exists())


def _acceptance_figure(entries: list[dict[str, Any]]) -> bytes:
    if not entries:
        return _message_figure("acceptance per round", "no rounds")
    figure = _figure(max(5.0, 1.0 + 0.8 * len(entries)), 3.6)
    ax = figure.add_subplot()
    labels = [f"r{e['round']}" for e in entries]
    positions = np.arange(len(entries))
    of_ok = [100 * (e["acceptance"]["accepted_of_ok"] or 0) for e in entries]
    of_all = [100 * (e["acceptance"]["accepted_of_all"] or 0) for e in entries]
    bars = ax.bar(positions, of_ok, color=ACCEPTED_COLOUR, alpha=0.8, label="accepted / ok")
    ax.plot(positions, of_all, "o--", color="#333333", label="accepted / all")
    for bar, entry in zip(bars, entries):
        counts = entry["counts"]
        ax.annotate(f"{counts['accepted']}/{counts['ok']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(positions, labels)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of candidates")
    ax.set_title("acceptance per round (labels: accepted / ok)")
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return _png(figure)


def _drift_figure(rounds: list[RoundData], columns: list[str]) -> bytes:
    if not rounds or not columns:
        return _message_figure("score drift", "no rounds" if not rounds else "no numeric score columns")
    figure = _figure(3.4 * min(3, len(columns)) + 0.4, 2.7 * math.ceil(len(columns) / 3) + 0.3)
    figure.suptitle("score distributions of ok candidates per round (boxes), means (line)")
    labels = [f"r{d.number}" for d in rounds]
    for ax, column in zip(_panels(figure, len(columns), 3), columns):
        per_round = [_values(d.ok, column)[0] for d in rounds]
        ax.set_title(column, fontsize=10)
        present = [i for i, values in enumerate(per_round) if values]
        if not present:
            _no_values(ax)
            continue
        ax.boxplot([per_round[i] for i in present], positions=present, widths=0.5, showfliers=True,
                   flierprops={"markersize": 3})
        ax.plot(present, [float(np.mean(per_round[i])) for i in present], "o-", color="#d1495b", ms=4, lw=1)
        ax.set_xticks(range(len(rounds)), labels)
        ax.set_xlim(-0.6, len(rounds) - 0.4)
        ax.tick_params(labelsize=8)
    return _png(figure)


def _summary_loss_figure(rounds: list[tuple[int, tuple[list[dict[str, Any]], int] | None]]) -> bytes:
    curves = [(number, _series(metrics[0], "loss")) for number, metrics in rounds if metrics and metrics[0]]
    curves = [(number, series) for number, series in curves if series[0]]
    if not curves:
        return _message_figure("training loss per round", "no training metrics")
    figure = _figure(7, 3.6)
    ax = figure.add_subplot()
    for number, (steps, values) in curves:
        ax.plot(steps, values, label=f"round {number}", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss per round")
    ax.legend(fontsize=8, frameon=False)
    return _png(figure)


def _mix_text(mix: list[Any]) -> str:
    parts = [f"{m.get('name', '?')}: {_fmt(m.get('samples'))}" for m in mix if isinstance(m, dict)]
    return ", ".join(parts) or "–"


def _summary_html(stats: dict[str, Any]) -> str:
    entries = stats["rounds"]
    body = ["<h1>Self-improvement rounds</h1>",
            (f"<p class='muted'>{len(entries)} round(s) · drift is measured on all ok candidates of each round, "
             f"changes are against round {_fmt(stats['first_round'])}</p>")]
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
                     f"{_fmt(loss.get('first'))} → {_fmt(loss.get('last'))}" if loss else "–"])
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
                cells.append(f"{_fmt(point['mean'])} ({point['change']:+.4g})")
        rows.append(cells)
    body.append(_table(["score"] + [f"round {n}" for n in numbers], rows))
    body.append(_image("drift.png", "score drift"))
    body += ["<h2>Training loss</h2>", _image("loss.png", "training loss per round"),
             "<p class='muted'>all numbers: <a href='stats.json'>stats.json</a></p>"]
    return _page("self-improvement rounds", body)


def write_summary_report(out_dir: str | Path, round_dirs: list[Path] | None = None) -> dict[str, Any]:
    """Write ``out_dir/report/``: ``acceptance.png``, ``drift.png``, ``loss.png``, ``index.html`` and
    ``stats.json`` over ``round_dirs`` (default ``find_round_dirs(out_dir)``); return the stats. Round
    reports are linked, not written: run ``write_round_report`` for each round first."""
    out_dir = Path(out_dir)
    report = out_dir / REPORT_DIR
    round_dirs = find_round_dirs(out_dir) if round_dirs is None else [Path(d) for d in round_dirs]
    rounds = sorted((load_round(d) for d in round_dirs), key=lambda d: d.number)

    numeric = list(dict.fromkeys(c for d in rounds for c in d.numeric))
    summarised = list(dict.fromkeys(c for d in rounds for c in d.summarised))
    entries, metrics_by_round = [], []
    for data in rounds:
        counts = _counts(data)
        metrics = read_metrics(data.round_dir / METRICS_FILE)
        metrics_by_round.append((data.number, metrics))
        round_report = data.round_dir / REPORT_DIR / "index.html"
        mix = data.info.get("mix") if isinstance(data.info.get("mix"), list) else []
        entries.append({
            "round": data.number, "dir": str(data.round_dir), "family": data.info.get("family"),
            "note": data.info.get("note"), "model_free_only": data.info.get("model_free_only"),
            "checkpoint_hash": data.info.get("checkpoint_hash"), "counts": counts,
            "acceptance": _acceptance(counts), "mix": mix,
            "mix_samples": sum(m.get("samples") or 0 for m in mix if isinstance(m, dict)),
            "loss": _training_stats(metrics).get("loss"),
            "report": Path(os.path.relpath(round_report, report)).as_posix() if round_report.exists() else None,
            "scores": {c: {"all": _summary(data.ok, c), "accepted": _summary(data.accepted, c)}
                       for c in data.summarised},
        })

    first = entries[0]["round"] if entries else None
    drift: dict[str, list[dict[str, Any]]] = {}
    for column in summarised:
        base = entries[0]["scores"].get(column, {}).get("all", {}).get("mean") if entries else None
        series = []
        for entry in entries:
            mean = entry["scores"].get(column, {}).get("all", {}).get("mean")
            change = _round(mean - base) if mean is not None and base is not None else None
            series.append({"round": entry["round"], "mean": mean, "change": change})
        drift[column] = series
    stats = {"rounds": entries, "first_round": first, "drift": drift,
             "files": {"acceptance": "acceptance.png", "drift": "drift.png", "loss": "loss.png",
                       "html": "index.html"}}

    report.mkdir(parents=True, exist_ok=True)
    _write_atomic(report / "acceptance.png", _acceptance_figure(entries))
    _write_atomic(report / "drift.png", _drift_figure(rounds, numeric))
    _write_atomic(report / "loss.png", _summary_loss_figure(metrics_by_round))
    _write_atomic(report / "index.html", _summary_html(stats))
    _write_atomic(report / "stats.json", _json(stats))
    return stats


__all__ = ["CANDIDATE_LAYOUT", "RoundData", "find_round_dirs", "group_reasons", "load_round", "read_metrics",
           "reason_pattern", "render_candidates_sheet", "round_stats", "spread", "write_round_report",
           "write_summary_report"]
