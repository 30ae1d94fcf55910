"""What is in a run directory: ``report/`` (contact sheet + stats), ``layerloop inspect`` and lineage tracing.

Everything here reads the per-shard parquet index first and opens a tar shard only for the samples it
shows, so a report on a run of millions of samples reads the index plus a handful of shards, never the
images of the whole run.

* ``load_index(run_dir)``: every committed shard's parquet rows in one table, plus a ``shard`` column
  (the shard stem, ``<name>-NNNNNN``) so a row leads to the tar that holds its sample.
* ``scan_run(run_dir)``: the same rows plus which shards are damaged and why (``RunIndex``).
* ``write_report(run_dir, rows, seed)``: ``report/contact_sheet.png`` and ``report/stats.json``.
* ``inspect_run(run_dir, samples)``: a plain-text summary for the CLI.
* ``trace_sample(run_dir, key)``: one sample's full ``json`` member and index row.

Damaged shards: every shard is checked with ``shards.check_shard`` (the one "is this shard committed"
check of the project): its index must be readable and its tar present with the size the index records;
a tar the report opens is also checked against the recorded sha256, and a tar that cannot be read is
damaged too. A damaged shard never stops a report: it is named with what is wrong (``stats.json``'s
``damaged_shards``, a ``damaged:`` section of ``inspect``, ``shard_damage`` in a trace), its rows are left
out of the counts (a resumed build rebuilds it), and the contact sheet takes its rows from intact shards.
An index written before the size/sha256 record existed is read as before (unverified).

Counting rules: the index is authoritative for every key that reached a shard (ok or failed);
``failures.parquet`` adds only the keys no shard knows, i.e. failures found while listing the source.
That keeps the counts right for a run that is still going, whose ``failures.parquet`` is stale or absent.

Which samples are shown is a deterministic function of (index, seed, damaged shards): shards are visited
round robin in a seeded order and each gives a seeded choice of its ok keys, so a sheet of 8 rows over 100
shards shows 8 different shards instead of the first 8 samples of shard 0.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from layerloop.datasets.shards import INDEX_SCHEMA, check_shard, error_text
from layerloop.samples import LayeredSample

FAILURES_FILE = "failures.parquet"
REPORT_DIR = "report"


class UnknownSampleError(KeyError):
    """A key the run has never seen. A KeyError (the CLI reports those), printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedShardError(RuntimeError):
    """A tar shard that cannot be read (truncated, overwritten, not a tar); the message names it."""


# =========================================================================== reading a run
@dataclass
class RunIndex:
    """The shard indexes of a run and what is wrong with which shard.

    ``table``: the rows of every readable index, with a ``shard`` column, in shard order (rows of damaged
    shards included; ``intact()`` leaves them out). ``damaged``: shard stem -> what is wrong; it grows
    when a tar opened later turns out damaged (``open_records``). ``recorded``: stems whose index records
    the tar's size and sha256. ``rows``: index rows per stem (``None`` when the index is unreadable)."""

    run_dir: Path
    table: pa.Table
    damaged: dict[str, str]
    recorded: set[str]
    rows: dict[str, int | None]

    def intact(self) -> pa.Table:
        if not self.damaged:
            return self.table
        mask = pc.invert(pc.is_in(self.table["shard"], value_set=pa.array(sorted(self.damaged), pa.string())))
        return self.table.filter(mask)

    def damaged_list(self) -> list[dict[str, Any]]:
        return [{"shard": stem, "reason": self.damaged[stem], "indexed_samples": self.rows.get(stem)}
                for stem in sorted(self.damaged)]

    def verify_tar(self, shard: str) -> bool:
        """Check the sha256 of a tar about to be opened (when its index records one); False (and the
        shard marked damaged) when it does not match."""
        if shard in self.damaged:
            return False
        if shard in self.recorded:
            tar = self.run_dir / f"{shard}.tar"
            check = check_shard(tar, tar.with_suffix(".parquet"), content=True)
            if not check.readable:
                self.damaged[shard] = check.reason
                return False
        return True

    def open_records(self, shard: str, keys: Iterable[str], members: tuple[str, ...] | None = None
                     ) -> dict[str, dict[str, Any]] | None:
        """``_read_records`` of a verified shard; ``None`` (and the shard marked damaged) when it is not."""
        if not self.verify_tar(shard):
            return None
        try:
            return _read_records(self.run_dir / f"{shard}.tar", keys, members)
        except DamagedShardError as error:
            self.damaged[shard] = str(error)
            return None


def scan_run(run_dir: str | Path) -> RunIndex:
    """Read every shard index of a run and check every shard (``shards.check_shard`` without reading the
    tars: index readable, tar present, tar size as recorded). Never raises for a damaged shard."""
    run_dir = _existing_run_dir(run_dir)
    tables, damaged, recorded, rows = [], {}, set(), {}
    for path in _index_paths(run_dir):
        stem = path.stem
        try:
            table = pq.read_table(path)
        except Exception as error:  # noqa: BLE001 - any unreadable index is named, not raised
            damaged[stem] = f"index {path.name} is unreadable ({error_text(error)})"
            rows[stem] = None
            continue
        rows[stem] = table.num_rows
        tables.append(table.append_column("shard", pa.array([stem] * table.num_rows, pa.string())))
        check = check_shard(run_dir / f"{stem}.tar", path, content=False)
        if not check.readable:
            damaged[stem] = check.reason
        elif check.status == "ok":
            recorded.add(stem)
    if tables:
        # "permissive" lets shards written by an older writer (a missing column, an all-null column typed
        # null) be read together with newer ones instead of failing on a schema mismatch.
        table = pa.concat_tables(tables, promote_options="permissive")
    else:
        table = INDEX_SCHEMA.append(pa.field("shard", pa.string())).empty_table()
    return RunIndex(run_dir, table, damaged, recorded, rows)


def load_index(run_dir: str | Path) -> pa.Table:
    """Concatenate the per-shard parquet index files (not ``failures.parquet``), in shard order, and add a
    ``shard`` column with each row's shard stem. A run without committed shards gives an empty table with
    the index schema. An unreadable index file is left out (it commits nothing; ``scan_run`` names it);
    rows of a shard whose tar is damaged are kept (``scan_run(...).intact()`` leaves them out)."""
    return scan_run(run_dir).table


def _index_paths(run_dir: Path) -> list[Path]:
    # Temporaries are named "<stem>.parquet.tmp-XXXX", so "*.parquet" sees committed shards only.
    return sorted(p for p in run_dir.glob("*.parquet") if p.name != FAILURES_FILE)


def _existing_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not (run_dir / "run.json").exists() and not _index_paths(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a layerloop run directory (no run.json, no shard index)")
    return run_dir


def _read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError) as error:
        return {"status": f"run.json unreadable ({error_text(error)})"}
    return info if isinstance(info, dict) else {"status": "run.json holds no run record"}


def _read_failures(run_dir: Path, index: pa.Table, damaged: Iterable[str] = ()) -> list[dict[str, Any]]:
    """All failed samples, one dict per key: the index's failed rows plus failures.parquet rows for keys
    that no shard index knows (listing failures). See the module docstring for why. Rows of ``damaged``
    shards are left out (the shard is rebuilt); an unreadable failures.parquet is skipped."""
    damaged = set(damaged)
    failed = index.filter(pc.equal(index["status"], "failed"))
    rows = [{"key": r["key"], "stage": r["stage"], "error_type": r["error_type"], "message": r["message"],
             "shard": r["shard"]} for r in failed.select(["key", "stage", "error_type", "message", "shard"])
            .to_pylist() if r["shard"] not in damaged]
    path = run_dir / FAILURES_FILE
    if path.exists():
        indexed = set(index["key"].to_pylist())
        try:
            listed = pq.read_table(path).to_pylist()
        except Exception:  # noqa: BLE001 - rewritten by every build; the shard indexes hold the rest
            listed = []
        for row in listed:
            if row.get("key") not in indexed and row.get("shard") not in damaged:
                indexed.add(row.get("key"))
                rows.append({name: row.get(name) for name in ("key", "stage", "error_type", "message", "shard")})
    return rows


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


def _committed_ok_keys(run_dir: Path, index: pa.Table, damaged: Iterable[str] | None = None
                       ) -> dict[str, list[str]]:
    """Ok keys per shard stem, in index order, for shards that pass ``shards.check_shard`` without
    reading the tar (index readable, tar present with the recorded size). ``damaged`` (stems already
    known damaged, e.g. ``RunIndex.damaged``) skips the check."""
    ok = index.filter(pc.equal(index["status"], "ok")).select(["key", "shard"])
    by_shard: dict[str, list[str]] = {}
    for key, shard in zip(ok["key"].to_pylist(), ok["shard"].to_pylist()):
        by_shard.setdefault(shard, []).append(key)
    if damaged is not None:
        damaged = set(damaged)
        return {shard: keys for shard, keys in by_shard.items() if shard not in damaged}
    return {shard: keys for shard, keys in by_shard.items()
            if check_shard(run_dir / f"{shard}.tar", run_dir / f"{shard}.parquet", content=False).readable}


def choose_samples(keys_by_shard: dict[str, list[str]], n: int, seed: int) -> list[tuple[str, str]]:
    """A deterministic, seeded choice of ``n`` (shard, key) pairs spread across shards: shards are
    visited round robin in a seeded order, each contributing a seeded choice of its keys. The result is
    ordered by shard and position in the shard, which is also the order a tar is read in."""
    rng = np.random.default_rng(seed)
    shards = sorted(s for s, keys in keys_by_shard.items() if keys)
    order = [shards[i] for i in rng.permutation(len(shards))]
    take = dict.fromkeys(order, 0)
    remaining = min(max(n, 0), sum(len(keys_by_shard[s]) for s in shards))
    while remaining:
        for shard in order:
            if remaining and take[shard] < len(keys_by_shard[shard]):
                take[shard] += 1
                remaining -= 1
    chosen = []
    for shard in order:  # rng draws in the seeded visiting order, so the choice depends on nothing else
        if take[shard]:
            positions = rng.choice(len(keys_by_shard[shard]), size=take[shard], replace=False)
            chosen.extend((shard, int(p)) for p in positions)
    chosen.sort()
    return [(shard, keys_by_shard[shard][p]) for shard, p in chosen]


def _read_records(tar_path: Path, keys: Iterable[str], members: tuple[str, ...] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Raw webdataset records of ``keys`` from one shard; stops reading as soon as all were found.
    ``members`` (e.g. ``("json",)``) skips every other member's bytes, so metadata lookups do not pull
    images into memory."""
    import webdataset as wds

    wanted = set(keys)
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found

    def select(fname: str) -> bool:
        # Member names are "<key>.<ext>" and keys contain no dots (samples.KEY_PATTERN).
        return fname.split(".", 1)[0] in wanted and (members is None or fname.split(".", 1)[1] in members)

    dataset = wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False, select_files=select)
    records = iter(dataset)
    try:
        for record in records:
            if record["__key__"] in wanted:
                found[record["__key__"]] = record
                wanted.discard(record["__key__"])
                if not wanted:
                    break
    except Exception as error:  # noqa: BLE001 - whatever a broken tar raises, say which shard it is
        raise DamagedShardError(f"tar {tar_path.name} is unreadable ({error_text(error)})") from error
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()  # releases the open tar now rather than whenever the generator is collected
    return found


def _index_rows(index: pa.Table, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    keys = list(keys)
    if not keys:
        return {}
    rows = index.filter(pc.is_in(index["key"], value_set=pa.array(keys, pa.string()))).to_pylist()
    return {row["key"]: row for row in rows}


def _scores(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# =========================================================================== statistics
def _summary(values: Iterable[float], integer: bool = False) -> dict[str, Any] | None:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return None
    cast = int if integer else float
    return {"count": int(array.size), "min": cast(array.min()), "median": float(np.median(array)),
            "mean": round(float(array.mean()), 6), "max": cast(array.max())}


def _flatten_numbers(value: Any, prefix: str = "") -> Iterable[tuple[str, float]]:
    """Numeric leaves of a scores object as dotted names (``{"clip": {"t2i": .3}}`` -> ``clip.t2i``);
    booleans and non-finite numbers are not scores to average."""
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from _flatten_numbers(inner, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix, float(value)


def run_stats(run_dir: str | Path, index: RunIndex | pa.Table | None = None) -> dict[str, Any]:
    """Counts and distributions from the index alone (no tar is opened). ``index`` saves re-reading it
    when the caller already has ``scan_run(run_dir)`` (or a ``load_index`` table, taken as intact).
    Damaged shards are listed in ``damaged_shards`` and left out of every count."""
    run_dir = _existing_run_dir(run_dir)
    info = _read_run_info(run_dir)
    if index is None:
        index = scan_run(run_dir)
    if isinstance(index, RunIndex):
        table, damaged, committed = index.intact(), index.damaged_list(), len(index.rows) - len(index.damaged)
        failures = _read_failures(run_dir, index.table, index.damaged)
    else:
        table, damaged, committed = index, [], len(_index_paths(run_dir))
        failures = _read_failures(run_dir, table)
    index = table
    ok = index.filter(pc.equal(index["status"], "ok"))

    kinds = Counter(k if k is not None else "?" for k in ok["kind"].to_pylist())
    widths, heights = ok["width"].to_pylist(), ok["height"].to_pylist()
    captions = [c or "" for c in ok["caption"].to_pylist()]
    scores: dict[str, list[float]] = {}
    for text in ok["scores"].to_pylist():
        for name, value in _flatten_numbers(_scores(text)):
            scores.setdefault(name, []).append(value)

    stats: dict[str, Any] = {
        "run": {name: info.get(name) for name in ("name", "status", "fingerprint", "seed", "created", "finished")},
        "shards": {"committed": committed, "planned": info.get("shards")},
        "damaged_shards": damaged,
        "samples_ok": ok.num_rows,
        "samples_failed": len(failures),
        "samples_total": ok.num_rows + len(failures),
        "by_kind": dict(sorted(kinds.items())),
        "failures": _failure_groups(failures),
        "sizes": {"width": _summary(widths, integer=True), "height": _summary(heights, integer=True)},
        "captions": {"empty": sum(1 for c in captions if not c.strip()),
                     "length_chars": _summary((len(c) for c in captions), integer=True)},
        "scores": {name: _summary(values) for name, values in sorted(scores.items())},
    }
    if ok.num_rows == 0:
        stats["note"] = "no samples: the run has no ok samples"
    return stats


def _damage_lines(damaged: list[dict[str, Any]]) -> list[str]:
    if not damaged:
        return []
    lines = [f"damaged:     {len(damaged)} shard(s), left out of the counts above; re-running the build "
             f"rebuilds them:"]
    for entry in damaged:
        indexed = entry["indexed_samples"]
        lines.append(f"  {entry['shard']}  {entry['reason']}"
                     + (f"  ({indexed} sample(s) indexed)" if indexed is not None else ""))
    return lines


# =========================================================================== contact sheet
@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of the contact sheet; the renderer and the tests both use it."""

    cell: int = 192  # square image cell; images are fitted inside, aspect kept
    text_width: int = 460
    margin: int = 12
    gap: int = 8
    pad: int = 6  # vertical padding inside a row
    title_height: int = 50
    header_height: int = 28
    columns: tuple[str, ...] = ("composite", "background", "foreground (RGBA)", "mask",
                                "key · caption · metadata")

    @property
    def row_height(self) -> int:
        return self.cell + 2 * self.pad

    @property
    def width(self) -> int:
        return 2 * self.margin + 4 * (self.cell + self.gap) + self.text_width

    def height(self, rows: int) -> int:
        # An empty sheet still has one row, which says "no samples".
        return self.title_height + self.header_height + max(rows, 1) * self.row_height + self.margin

    def column_x(self, column: int) -> int:
        return self.margin + column * (self.cell + self.gap)

    def row_y(self, row: int) -> int:
        return self.title_height + self.header_height + row * self.row_height

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of an image cell (columns 0-3) or the text cell (column 4)."""
        x0, y0 = self.column_x(column), self.row_y(row) + self.pad
        return x0, y0, x0 + (self.text_width if column == 4 else self.cell), y0 + self.cell


LAYOUT = SheetLayout()
_INK, _MUTED, _PANEL, _STRIPE = (25, 25, 25), (105, 105, 105), (226, 226, 226), (244, 244, 246)


def _font(size: int, mono: bool = False, bold: bool = False) -> ImageFont.ImageFont:
    # DejaVu ships with matplotlib (a dependency), so the sheet looks the same on every machine and
    # renders non-ASCII captions; Pillow's built-in font is the fallback.
    try:
        from matplotlib import font_manager

        family = "DejaVu Sans Mono" if mono else "DejaVu Sans"
        path = font_manager.findfont(font_manager.FontProperties(family=family, weight="bold" if bold else "normal"),
                                     fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except Exception:  # noqa: BLE001 - any font problem must not stop a report
        return ImageFont.load_default(size=size)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    width, height = image.size
    scale = min(cell / width, cell / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Enlarged small images stay blocky on purpose: a report is for checking data, and interpolated
    # pixels would hide edges and halos. Shrinking uses a proper filter, premultiplied for RGBA so that
    # transparent pixels do not bleed their (meaningless) colour into the edges.
    if scale >= 1:
        return image.resize(size, Image.Resampling.NEAREST)
    if image.mode == "RGBA":
        return image.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    return image.resize(size, Image.Resampling.LANCZOS)


def _checkerboard(size: tuple[int, int], square: int = 8) -> Image.Image:
    ys, xs = np.indices((size[1], size[0]))
    light = ((ys // square + xs // square) % 2 == 0)
    return Image.fromarray(np.where(light, 204, 153).astype(np.uint8), "L").convert("RGBA")


def _thumbnails(sample: LayeredSample, cell: int) -> list[Image.Image]:
    foreground = _fit(Image.fromarray(sample.foreground, "RGBA"), cell)
    on_checker = Image.alpha_composite(_checkerboard(foreground.size), foreground).convert("RGB")
    return [_fit(Image.fromarray(sample.composite, "RGB"), cell),
            _fit(Image.fromarray(sample.background, "RGB"), cell),
            on_checker,
            _fit(Image.fromarray(sample.mask, "L"), cell).convert("RGB")]


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap by rendered width (characters differ in width, so textwrap's counts are not)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width:  # a word longer than the line: hard break
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _clip_lines(lines: list[str], limit: int, font: ImageFont.ImageFont, width: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    last = lines[limit - 1]
    while last and font.getlength(last + " …") > width:
        last = last[:-1]
    return lines[:limit - 1] + [last + " …"]


def _describe(sample: LayeredSample, row: dict[str, Any] | None, shard: str) -> list[str]:
    height, width = sample.size or (0, 0)
    details = [f"{sample.kind} · {width}×{height} · {shard}"]
    source, source_id = sample.meta.get("source"), sample.meta.get("source_id")
    if source is not None or source_id is not None:
        details.append(f"source: {'?' if source is None else source} / {'?' if source_id is None else source_id}")
    if sample.meta.get("bbox") is not None:
        details.append(f"bbox: {sample.meta['bbox']}")
    scores = dict(_flatten_numbers(sample.meta.get("scores") or _scores(row["scores"] if row else None)))
    if scores:
        details.append("scores: " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(scores.items())))
    return details


def _draw_text_cell(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], key: str, caption: str,
                    details: list[str], fonts: dict[str, ImageFont.ImageFont]) -> None:
    x0, y0, x1, y1 = box
    width = x1 - x0
    y = y0
    draw.text((x0, y), _clip_lines(_wrap(key, fonts["key"], width), 1, fonts["key"], width)[0],
              font=fonts["key"], fill=_INK)
    y += 22
    detail_lines = [line for d in details for line in _wrap(d, fonts["small"], width)]
    detail_height = 16 * len(detail_lines)
    caption_lines = _wrap(caption, fonts["text"], width) if caption.strip() else ["(no caption)"]
    room = max(1, (y1 - y - detail_height - 6) // 19)
    for line in _clip_lines(caption_lines, room, fonts["text"], width):
        draw.text((x0, y), line, font=fonts["text"], fill=_INK if caption.strip() else _MUTED)
        y += 19
    y = max(y + 6, y1 - detail_height)  # details sit at the bottom of the cell, under the caption
    for line in detail_lines:
        if y + 14 > y1 + LAYOUT.pad:
            break
        draw.text((x0, y), line, font=fonts["small"], fill=_MUTED)
        y += 16


def render_contact_sheet(samples: list[tuple[str, LayeredSample]], index_rows: dict[str, dict[str, Any]],
                         title: tuple[str, str], layout: SheetLayout = LAYOUT, empty_note: str = ""
                         ) -> Image.Image:
    """One row per (shard, sample): composite | background | foreground on a checkerboard | mask | text.
    ``title`` is a headline and a smaller line under it; ``empty_note`` explains an empty sheet."""
    fonts = {"title": _font(18, bold=True), "header": _font(14, bold=True), "key": _font(15, mono=True, bold=True),
             "text": _font(15), "small": _font(12)}
    sheet = Image.new("RGB", (layout.width, layout.height(len(samples))), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((layout.margin, 8), title[0], font=fonts["title"], fill=_INK)
    draw.text((layout.margin, 32), title[1], font=fonts["small"], fill=_MUTED)
    header_y = layout.title_height
    for column, label in enumerate(layout.columns):
        room = layout.text_width if column == 4 else layout.cell
        label = _clip_lines(_wrap(label, fonts["header"], room), 1, fonts["header"], room)[0]
        draw.text((layout.column_x(column), header_y + 6), label, font=fonts["header"], fill=_INK)
    draw.line([(layout.margin, header_y + layout.header_height - 2),
               (layout.width - layout.margin, header_y + layout.header_height - 2)], fill=_MUTED, width=1)

    if not samples:
        x0, y0, _, y1 = layout.cell_box(0, 0)
        draw.text((layout.width // 2, (y0 + y1) // 2 - 12), "no samples", font=_font(28, bold=True),
                  fill=_MUTED, anchor="mm")
        if empty_note:
            draw.text((layout.width // 2, (y0 + y1) // 2 + 22), empty_note, font=fonts["text"], fill=_MUTED,
                      anchor="mm")
        return sheet

    for row, (shard, sample) in enumerate(samples):
        if row % 2:  # zebra stripes keep a wide row's text attached to its images
            draw.rectangle([0, layout.row_y(row), layout.width, layout.row_y(row + 1) - 1], fill=_STRIPE)
        for column, thumb in enumerate(_thumbnails(sample, layout.cell)):
            x0, y0, x1, y1 = layout.cell_box(row, column)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_PANEL)
            sheet.paste(thumb, (x0 + (layout.cell - thumb.width) // 2, y0 + (layout.cell - thumb.height) // 2))
        _draw_text_cell(draw, layout.cell_box(row, 4), sample.key, sample.caption,
                        _describe(sample, index_rows.get(sample.key), shard), fonts)
    return sheet


# =========================================================================== report/
def _read_chosen(scan: RunIndex, n: int, seed: int, members: tuple[str, ...] | None,
                 decode: Callable[[dict[str, Any]], Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Choose ``n`` ok samples from the intact shards (``choose_samples``), open only their shards
    (sha256 checked first where the index records it) and ``decode`` each record. A shard found damaged
    on the way is recorded in ``scan.damaged`` and the choice is made again without it, so a damaged
    shard costs no rows. Returns (chosen, decoded value per key found)."""
    while True:
        damaged_before = len(scan.damaged)
        chosen = choose_samples(_committed_ok_keys(scan.run_dir, scan.table, scan.damaged), n, seed)
        decoded: dict[str, Any] = {}
        for shard in dict.fromkeys(s for s, _ in chosen):
            keys = [key for s, key in chosen if s == shard]
            records = scan.open_records(shard, keys, members)
            if records is None:
                break
            absent = [key for key in keys if key not in records]
            if absent:
                scan.damaged[shard] = (f"tar {shard}.tar lacks {len(absent)} sample(s) its index lists as ok "
                                       f"(e.g. {absent[0]})")
                break
            for key, record in records.items():
                try:
                    decoded[key] = decode(record)
                except Exception as error:  # noqa: BLE001 - a member that cannot be decoded
                    scan.damaged[shard] = f"sample {key} in {shard}.tar cannot be decoded ({error_text(error)})"
                    break
            if len(scan.damaged) != damaged_before:
                break
        if len(scan.damaged) == damaged_before:
            return chosen, decoded


def write_report(run_dir: str | Path, rows: int = 8, seed: int = 0) -> dict[str, Any]:
    """Write ``report/contact_sheet.png`` and ``report/stats.json``; return the stats.

    The sheet shows ``rows`` ok samples chosen by ``choose_samples(..., seed)``; only their shards are
    opened, and each is read only up to its last chosen sample."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    run_dir = _existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    chosen, decoded = _read_chosen(scan, rows, seed, None, _decode_sample)
    stats = run_stats(run_dir, scan)  # after reading: a tar found damaged there is left out too
    index = scan.table

    shown: list[tuple[str, LayeredSample]] = []
    missing: list[str] = []
    for shard, key in chosen:
        if key in decoded:
            shown.append((shard, decoded[key]))
        else:  # indexed as ok but absent from its tar: worth reporting, not worth crashing over
            missing.append(key)

    alpha = [float(s.foreground[..., 3].mean()) / 255.0 for _, s in shown if s.foreground is not None]
    box = [float((s.mask > 0).mean()) for _, s in shown if s.mask is not None]
    stats["sampled"] = {
        "rows": len(shown), "seed": seed, "keys": [s.key for _, s in shown], "missing_from_tar": missing,
        "mean_alpha_coverage": round(float(np.mean(alpha)), 6) if alpha else None,
        "mean_box_area_fraction": round(float(np.mean(box)), 6) if box else None,
    }
    stats["contact_sheet"] = "contact_sheet.png"

    run = stats["run"]
    title = (f"layerloop report: {run.get('name') or run_dir.name} ({run.get('status') or 'unknown status'})",
             f"{stats['samples_ok']} ok, {stats['samples_failed']} failed, {stats['shards']['committed']} shard(s)"
             f" · fingerprint {run.get('fingerprint') or '?'} · {len(shown)} row(s) sampled with seed {seed}")
    empty_note = ("the run has no ok samples yet" if stats["samples_failed"] == 0 else
                  f"all {stats['samples_failed']} sample(s) failed; see stats.json for the reasons")
    if stats["samples_ok"] and not shown:
        empty_note = "rows=0 was asked for" if rows == 0 else "the chosen samples are missing from their tars"
    if stats["damaged_shards"]:
        title = (title[0], title[1] + f" · {len(stats['damaged_shards'])} damaged shard(s), see stats.json")
    sheet = render_contact_sheet(shown, _index_rows(index, [s.key for _, s in shown]), title,
                                 empty_note=empty_note)

    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    # Written under temporary names and renamed, so a reader never sees half a report.
    tmp_png = out / "contact_sheet.png.tmp"
    sheet.save(tmp_png, format="PNG")
    os.replace(tmp_png, out / "contact_sheet.png")
    tmp_json = out / "stats.json.tmp"
    tmp_json.write_text(json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp_json, out / "stats.json")
    return stats


# =========================================================================== inspect / trace
def _short(text: str | None, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def inspect_run(run_dir: str | Path, samples: int = 3) -> str:
    """A plain-text summary of a run directory: run.json, counts, failures by reason, damaged shards, a
    few samples. Reads the index, and only the ``json`` members of the few samples it shows (after
    checking the sha256 of their tars, where the index records it)."""
    run_dir = _existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    chosen, metas = _read_chosen(scan, samples, 0, ("json",), _json_member)
    stats = run_stats(run_dir, scan)
    index = scan.table
    run = stats["run"]
    lines = [
        f"run:         {run.get('name') or '?'}  ({run.get('status') or 'no run.json'})  at {run_dir}",
        f"fingerprint: {run.get('fingerprint') or '?'}   seed: {run.get('seed')}   "
        f"created: {run.get('created') or '?'}",
    ]
    planned = stats["shards"]["planned"]
    lines.append(f"shards:      {stats['shards']['committed']} committed"
                 + (f" of {planned} planned" if planned is not None else "")
                 + (f", {len(stats['damaged_shards'])} damaged" if stats["damaged_shards"] else ""))
    lines.append(f"samples:     {stats['samples_ok']} ok, {stats['samples_failed']} failed "
                 f"({stats['samples_total']} total)")
    if stats["by_kind"]:
        lines.append("  by kind:   " + ", ".join(f"{kind} {n}" for kind, n in stats["by_kind"].items()))
    sizes = stats["sizes"]
    if sizes["width"]:
        lines.append(f"  sizes:     width {sizes['width']['min']}-{sizes['width']['max']}, "
                     f"height {sizes['height']['min']}-{sizes['height']['max']}")

    lines.append("")
    if stats["failures"]:
        lines.append("failures by reason (stage / error type: count, example):")
        width = max(len(f"{g['stage']} / {g['error_type']}") for g in stats["failures"])
        for group in stats["failures"]:
            reason = f"{group['stage']} / {group['error_type']}"
            lines.append(f"  {reason:<{width}}  x{group['count']:<5} e.g. {group['example_key']}: "
                         f"{_short(group['example_message'], 100)}")
    else:
        lines.append("failures:    none")
    damage = _damage_lines(stats["damaged_shards"])
    if damage:
        lines += [""] + damage

    if chosen:
        rows = _index_rows(index, [key for _, key in chosen])
        lines += ["", f"samples ({len(chosen)} of {stats['samples_ok']}; "
                      f"`layerloop inspect DIR --key KEY` shows all metadata):"]
        for shard in dict.fromkeys(s for s, _ in chosen):
            keys = [key for s, key in chosen if s == shard]
            records = {key: metas[key] for key in keys if key in metas}
            for key in keys:
                row = rows.get(key, {})
                meta = records.get(key, {})
                lines.append(f"  {key}  [{shard}]  {row.get('kind') or meta.get('kind') or '?'}  "
                             f"{row.get('width')}x{row.get('height')}")
                lines.append(f"    caption:   {_short(row.get('caption'), 110) or '(none)'}")
                lines.append(f"    source:    {meta.get('source', row.get('source'))} / "
                             f"{meta.get('source_id', row.get('source_id'))}   bbox: {meta.get('bbox')}")
                scores = dict(_flatten_numbers(_scores(row.get("scores"))))
                if scores:
                    lines.append("    scores:    " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(scores.items())))
                if key not in records:
                    lines.append(f"    (indexed as ok but missing from {shard}.tar)")
    elif stats["samples_ok"] == 0:
        lines += ["", "samples:     none (no ok samples in this run)"]

    report = run_dir / REPORT_DIR / "contact_sheet.png"
    if report.exists():
        lines += ["", f"report:      {report}"]
    return "\n".join(lines)


def trace_sample(run_dir: str | Path, key: str) -> dict[str, Any]:
    """Everything the run knows about one key, for lineage tracing: its index row (``scores`` decoded
    from JSON), its full ``json`` member (``None`` unless it was written), its caption, its tar members,
    its failure record if it failed, and ``shard_damage``: what is wrong with its shard (``None`` when
    intact; the tar of a damaged shard is not read). A key of a shard whose index is unreadable is looked
    for in that shard's tar (status ``unindexed``). Raises KeyError for a key the run has never seen."""
    run_dir = _existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    index = scan.table
    row = _index_rows(index, [key]).get(key)
    failure = next((f for f in _read_failures(run_dir, index) if f["key"] == key), None)
    result: dict[str, Any] = {"key": key, "shard": None, "status": "failed", "index_row": None,
                              "metadata": None, "caption": None, "members": [], "failure": failure,
                              "shard_damage": None}
    if row is None and failure is None:
        unindexed = [stem for stem, count in sorted(scan.rows.items()) if count is None]
        for stem in unindexed:
            try:
                record = _read_records(run_dir / f"{stem}.tar", [key]).get(key)
            except (DamagedShardError, OSError):
                continue
            if record is not None:
                result.update(shard=stem, status="unindexed", shard_damage=scan.damaged[stem])
                _fill_from_record(result, record, stem)
                return result
        note = (f" (the index of {', '.join(unindexed)} is unreadable and its tar does not hold it either)"
                if unindexed else "")
        raise UnknownSampleError(f"{key!r} is not in {run_dir}: no shard index or failures.parquet lists it{note}")

    result["shard"] = row["shard"] if row else (failure or {}).get("shard") or None
    result["status"] = row["status"] if row else "failed"
    if result["shard"] in scan.damaged:
        result["shard_damage"] = scan.damaged[result["shard"]]
    if row is not None:
        result["index_row"] = {**row, "scores": _scores(row["scores"])}
        shard = row["shard"]
        if row["status"] == "ok" and shard not in scan.damaged:
            # All members are selected, but only the key's own: the bytes of other samples are skipped.
            records = scan.open_records(shard, [key])
            if records is None:
                result["shard_damage"] = scan.damaged[shard]
            elif key in records:
                _fill_from_record(result, records[key], shard)
            else:
                result["shard_damage"] = f"tar {shard}.tar lacks {key}, which its index lists as ok"
    return result


def _decode_sample(record: dict[str, Any]) -> LayeredSample:
    """A whole sample for the contact sheet; a record without its image members (a truncated tar read
    by an index without the size record) is an error, not a sample with holes."""
    from layerloop.samples import REQUIRED_MEMBERS

    absent = [member for member in REQUIRED_MEMBERS if member not in record]
    if absent:
        raise ValueError(f"its record lacks {', '.join(absent)}")
    return LayeredSample.from_wds(record)


def _json_member(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(record["json"]) if "json" in record else {}


def _fill_from_record(result: dict[str, Any], record: dict[str, Any], shard: str) -> None:
    try:
        result["metadata"] = json.loads(record["json"]) if "json" in record else None
        result["caption"] = record["txt"].decode("utf-8") if "txt" in record else None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        result["shard_damage"] = result["shard_damage"] or (
            f"sample {result['key']} in {shard}.tar cannot be decoded ({error_text(error)})")
    result["members"] = sorted(name for name in record if not name.startswith("__"))


__all__ = ["load_index", "scan_run", "RunIndex", "DamagedShardError", "run_stats", "choose_samples",
           "write_report", "render_contact_sheet",
           "inspect_run", "trace_sample", "SheetLayout", "LAYOUT", "UnknownSampleError"]
