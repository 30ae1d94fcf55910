"""The contact sheets of a round report: a few accepted and a few rejected candidates as images, with
their decision and scores.

Rejected candidates are shown from ``candidates/``. Accepted ones are shown as ``accepted/`` stores them
(the sample training reads: a BFS quadruple with its recomputed composite, a decomposition with its
real input composite); a round directory without an
``accepted/`` run (built by hand, or before the filter ran) shows them from ``candidates/``. Only the
shown samples' tar members are read (``layerloop.report.read_records``), never the whole round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from layerloop.report import load_index, read_records
from layerloop.report.sheet import (MUTED, SheetLayout, draw_frame, draw_row_cells, draw_text_cell, load_font,
                                    png_bytes, sheet_fonts, thumbnails, wrap)
from layerloop.samples import LayeredSample
from layerloop.selfimprove.layout import CANDIDATES_DIR
from layerloop.selfimprove.stats import RoundData, fmt

# A smaller cell than the run report's: a round sheet is about comparing rows, and the candidates are
# usually small generated images.
CANDIDATE_LAYOUT = SheetLayout(cell=160, text_width=560,
                               columns=("composite", "background", "foreground (RGBA)", "mask",
                                        "key · caption · input · decision · scores"))


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items evenly spread over ``items`` (first and last included), in order."""
    if count <= 0 or not items:
        return []
    if count >= len(items):
        return list(items)
    positions = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[p] for p in dict.fromkeys(positions.tolist())]


def image_source(data: RoundData, which: str) -> Path:
    """The run directory the ``which`` ("accepted" or "rejected") sheet shows images from: ``accepted/``
    for the accepted candidates when the round has it (the samples as stored, which training reads),
    else ``candidates/``."""
    paths = data.paths
    return paths.accepted if which == "accepted" and paths.accepted.is_dir() else paths.candidates


def read_shown(run_dir: Path, keys: list[str]) -> tuple[dict[str, tuple[str, LayeredSample]], list[str]]:
    """(shard, sample) per key found in the run directory ``run_dir``, and the keys that are not there.
    Only the shards holding the keys are opened, and of those only the keys' members are read."""
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
        for key, record in read_records(tar, wanted).items():
            sample = _decode(record)
            if sample is not None:
                found[key] = (shard, sample)
    return found, [key for key in keys if key not in found]


def _decode(record: dict[str, Any]) -> LayeredSample | None:
    try:
        return LayeredSample.from_wds(record)
    except Exception:  # noqa: BLE001 - an unreadable candidate is reported as missing, not fatal
        return None


def _details(data: RoundData, row: dict[str, Any], shard: str | None, source: str) -> list[str]:
    lines = [f"input {row.get('input_key') or '?'} · source {row.get('source_key') or '?'}"
             + (f" · {shard}" if shard else f" · image missing from {source}/")]
    if row.get("accepted") is True:
        lines.append(f"accepted by {row.get('rule') or '?'}")
    else:
        reasons = [str(r) for r in row.get("reasons") or []] or ["(no reason recorded)"]
        lines.append("rejected: " + "; ".join(reasons))
    scores = [f"{c}={fmt(row.get(c))}" for c in data.summarised if row.get(c) is not None]
    scores += [f"{c}={row[c]}" for c in data.skipped if isinstance(row.get(c), str) and row[c]]
    if scores:
        lines.append("scores: " + ", ".join(scores))
    return lines


def _candidate_thumbnails(sample: LayeredSample, cell: int) -> list[Image.Image | None]:
    try:
        return list(thumbnails(sample, cell))
    except (TypeError, ValueError, AttributeError):  # a layer missing or of the wrong shape
        return [None] * 4


def render_candidates_sheet(data: RoundData, rows: list[dict[str, Any]],
                            samples: dict[str, tuple[str, LayeredSample]], title: tuple[str, str],
                            empty_text: str, layout: SheetLayout = CANDIDATE_LAYOUT, source: str = CANDIDATES_DIR
                            ) -> Image.Image:
    """One row per scores row: composite | background | foreground on a checkerboard | mask | key, caption,
    input, decision (reasons for a rejected one) and scores. A row whose sample is not in ``samples``
    (read from the run directory named ``source``) keeps its text with empty image cells; no rows gives a
    short sheet saying ``empty_text``."""
    fonts = sheet_fonts(14)
    height = layout.height(len(rows)) if rows else layout.title_height + layout.header_height + 90
    sheet = Image.new("RGB", (layout.width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw_frame(draw, layout, fonts, title[0], wrap(title[1], fonts["small"], layout.width - 2 * layout.margin)[0])
    if not rows:
        draw.text((layout.width // 2, layout.title_height + layout.header_height + 45), empty_text,
                  font=load_font(24, bold=True), fill=MUTED, anchor="mm")
        return sheet

    for number, row in enumerate(rows):
        shard, sample = samples.get(row["key"], (None, None))
        thumbs = _candidate_thumbnails(sample, layout.cell) if sample is not None else [None] * 4
        draw_row_cells(sheet, draw, layout, number, thumbs, missing_font=fonts["small"])
        caption = sample.caption if sample is not None else ""
        draw_text_cell(draw, layout.cell_box(number, 4), row["key"], caption, _details(data, row, shard, source),
                       fonts)
    return sheet


def sheet_png(data: RoundData, which: str, rows: int) -> tuple[bytes, list[str], list[str]]:
    """The accepted or rejected sheet, the keys it shows and those of them whose images are missing (from
    ``image_source``)."""
    pool = sorted(data.accepted if which == "accepted" else data.rejected, key=lambda r: str(r["key"]))
    chosen = spread(pool, rows)
    source = image_source(data, which)
    samples, missing = read_shown(source, [r["key"] for r in chosen])
    policy = data.info.get("policy") or "policy unknown"
    title = (f"round {data.number:03d}: {which} candidates",
             f"{len(chosen)} of {len(pool)} shown, evenly spread over the keys in sorted order · policy: {policy}")
    if rows == 0 and pool:
        empty = "rows=0 was asked for"
    else:
        empty = f"no {which} candidates"
    sheet = render_candidates_sheet(data, chosen, samples, title, empty, source=source.name)
    return png_bytes(sheet), [r["key"] for r in chosen], missing
