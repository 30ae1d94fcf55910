"""``report/``: ``contact_sheet.png`` and ``stats.json`` of a run directory (``write_report``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerloop import storage
from layerloop.files import dump_json, write_atomic, write_json_atomic
from layerloop.report.scan import REPORT_DIR, existing_run_dir, index_rows, read_chosen, scan_run
from layerloop.report.sheet import png_bytes, render_contact_sheet
from layerloop.report.stats import run_stats
from layerloop.samples import LayeredSample

__all__ = ["REPORT_DIR", "write_report"]


def write_report(run_dir: str | Path, rows: int = 8, seed: int = 0) -> dict[str, Any]:
    """Write ``report/contact_sheet.png`` and ``report/stats.json``; return the stats.

    The sheet shows ``rows`` ok samples chosen by ``choose_samples(..., seed)``; only their shards are
    opened, and each is read only up to its last chosen sample."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    run_dir = existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    chosen, decoded = read_chosen(scan, rows, seed, None, _decode_sample)
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
    sheet = render_contact_sheet(shown, index_rows(index, [s.key for _, s in shown]), title,
                                 empty_note=empty_note)

    out = run_dir / REPORT_DIR
    if isinstance(out, storage.StorePath):  # one PUT per object: a reader sees the old or the new report
        (out / "contact_sheet.png").write_bytes(png_bytes(sheet))
        (out / "stats.json").write_text(dump_json(stats, ensure_ascii=False))
        return stats
    out.mkdir(exist_ok=True)
    # Written under temporary names and renamed, so a reader never sees half a report.
    write_atomic(out / "contact_sheet.png", png_bytes(sheet))
    write_json_atomic(out / "stats.json", stats, ensure_ascii=False)
    return stats


def _decode_sample(record: dict[str, Any]) -> LayeredSample:
    """A whole sample for the contact sheet; a record without its image members (a truncated tar read
    by an index without the size record) is an error, not a sample with holes."""
    from layerloop.samples import REQUIRED_MEMBERS

    absent = [member for member in REQUIRED_MEMBERS if member not in record]
    if absent:
        raise ValueError(f"its record lacks {', '.join(absent)}")
    return LayeredSample.from_wds(record)
