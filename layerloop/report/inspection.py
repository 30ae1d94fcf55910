"""``layerloop inspect``: a plain-text summary of a run (``inspect_run``) and everything the run knows
about one key, for lineage tracing (``trace_sample``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerloop.datasets.shards import error_text
from layerloop.report.scan import (REPORT_DIR, DamagedShardError, UnknownSampleError, existing_run_dir, index_rows,
                                   read_chosen, read_failures, read_records, scan_run)
from layerloop.report.stats import flatten_numbers, parse_scores, run_stats


def _short(text: str | None, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


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


def inspect_run(run_dir: str | Path, samples: int = 3) -> str:
    """A plain-text summary of a run directory: run.json, counts, failures by reason, damaged shards, a
    few samples. Reads the index, and only the ``json`` members of the few samples it shows (after
    checking the sha256 of their tars, where the index records it)."""
    run_dir = existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    chosen, metas = read_chosen(scan, samples, 0, ("json",), _json_member)
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
        rows = index_rows(index, [key for _, key in chosen])
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
                scores = dict(flatten_numbers(parse_scores(row.get("scores"))))
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
    run_dir = existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    index = scan.table
    row = index_rows(index, [key]).get(key)
    failure = next((f for f in read_failures(run_dir, index) if f["key"] == key), None)
    result: dict[str, Any] = {"key": key, "shard": None, "status": "failed", "index_row": None,
                              "metadata": None, "caption": None, "members": [], "failure": failure,
                              "shard_damage": None}
    if row is None and failure is None:
        unindexed = [stem for stem, count in sorted(scan.rows.items()) if count is None]
        for stem in unindexed:
            try:
                record = read_records(run_dir / f"{stem}.tar", [key]).get(key)
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
        result["index_row"] = {**row, "scores": parse_scores(row["scores"])}
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
