"""Lineage of self-improvement samples: ``layerloop inspect OUT --key KEY`` on a loop's output directory.

Every accepted sample carries ``meta["lineage"]`` (round, candidate key, held input key, source key,
generator checkpoint hash, scores, the rule that accepted it). ``trace`` follows it hop by hop through the
files the loop wrote, so each hop is checked against the record it points at rather than trusted:

    accepted sample (round k, rounds/round-k/accepted)
      -> candidate (rounds/round-k/candidates: generator checkpoint hash, scores; scores.parquet: decision)
      -> generator (rounds/round-k/train/final: hash, and the mix it was trained on, which names the earlier
         rounds' accepted shards)
      -> held input (data/<held>: the sample the candidate was generated from)
      -> origin (the held sample's own source and source id: the photo or scene it came from)

A key may also be a candidate (traced from the second hop) or a base/held sample (one hop).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerloop.selfimprove.layout import (CONFIG_FILE, DATA_DIR, ROUNDS_DIR, RoundPaths, is_selfimprove_dir,
                                          read_mix, summary_report_dir)
from layerloop.selfimprove.results import data_run_dir


def _run_dirs(out: Path) -> list[tuple[str, int | None, Path]]:
    """(role, round, run directory) of every place a key can live, newest rounds first."""
    places: list[tuple[str, int | None, Path]] = []
    for round_path in sorted((out / ROUNDS_DIR).glob("round-*"), reverse=True):
        k, paths = int(round_path.name.split("-")[1]), RoundPaths(round_path)
        places += [("accepted", k, paths.accepted), ("candidate", k, paths.candidates)]
    for data in sorted((out / DATA_DIR).glob("*")):
        places.append(("data", None, data))
    return [p for p in places if p[2].is_dir()]


def _locate(out: Path, key: str) -> tuple[str, int | None, Path]:
    from layerloop.report import UnknownSampleError, load_index

    for role, k, run_dir in _run_dirs(out):
        try:
            index = load_index(run_dir)
        except (FileNotFoundError, UnknownSampleError):
            continue
        if key in set(index["key"].to_pylist()):
            return role, k, run_dir
    raise UnknownSampleError(f"{key!r} is in none of the rounds (accepted, candidates) or data of {out}")


def _decision(round_path: Path, key: str) -> dict[str, Any] | None:
    from layerloop.datasets.shards import read_parquet

    path = RoundPaths(round_path).scores
    if not path.exists():
        return None
    table = read_parquet(path, columns=["key", "accepted", "rule", "reasons"]).to_pylist()
    return next(({"accepted": r["accepted"], "rule": r["rule"], "reasons": r["reasons"]} for r in table
                 if r["key"] == key), None)


def _mix_summary(round_path: Path) -> list[dict[str, Any]]:
    mix = read_mix(round_path)
    return [{"name": s["name"], "samples": s["samples"], "weight": s["weight"], "origin": s["origin"],
             "round": s["round"]} for s in mix["sources"] if s["used"]]


def trace(out: str | Path, key: str) -> dict[str, Any]:
    """The chain of records from ``key`` back to its origin, with a one-line ``summary``."""
    from layerloop.report import trace_sample  # here: pyarrow is not needed to describe a loop

    out = Path(out)
    role, k, run_dir = _locate(out, key)
    chain: list[dict[str, Any]] = []
    held_key = None
    if role == "accepted":
        record = trace_sample(run_dir, key)
        lineage = (record["metadata"] or {}).get("lineage") or {}
        chain.append({"hop": "accepted", "round": k, "key": key, "run_dir": str(run_dir),
                      "rule": lineage.get("rule"), "policy": lineage.get("policy"), "scores": lineage.get("scores"),
                      "checkpoint_hash": lineage.get("checkpoint_hash")})
        key, role, run_dir = lineage["candidate_key"], "candidate", RoundPaths(run_dir.parent).candidates
    if role == "candidate":
        round_path = run_dir.parent
        record = trace_sample(run_dir, key)
        meta = record["metadata"] or {}
        generator = meta.get("generator") or {}
        chain.append({"hop": "candidate", "round": k, "key": key, "run_dir": str(run_dir),
                      "status": record["status"], "input_key": meta.get("input_key"),
                      "scores": meta.get("scores"), "decision": _decision(round_path, key),
                      "generator_seed": generator.get("seed")})
        final, hash_file = RoundPaths(round_path).final, RoundPaths(round_path).checkpoint_hash
        saved_hash = hash_file.read_text().strip() if hash_file.exists() else None
        if chain[0]["hop"] == "accepted" and chain[0]["checkpoint_hash"] != generator.get("checkpoint_hash"):
            raise ValueError(f"lineage of {chain[0]['key']} names checkpoint {chain[0]['checkpoint_hash']}, but its "
                             f"candidate was generated by {generator.get('checkpoint_hash')}")
        chain.append({"hop": "generator", "round": k, "checkpoint": str(final),
                      "checkpoint_hash": generator.get("checkpoint_hash"),
                      "matches_round_checkpoint": saved_hash == generator.get("checkpoint_hash"),
                      "trained_on": _mix_summary(round_path)})
        held_key = meta.get("source_id")
        held_name = json.loads((out / CONFIG_FILE).read_text())["config"]["held"]["name"]
        run_dir = data_run_dir(out, held_name)
        key, role = held_key, "data"
    if role == "data":
        record = trace_sample(run_dir, key)
        meta = record["metadata"] or {}
        chain.append({"hop": "held input" if held_key else "data", "key": key, "run_dir": str(run_dir),
                      "caption": record["caption"], "kind": (record["index_row"] or {}).get("kind")})
        chain.append({"hop": "origin", "source": meta.get("source"), "source_id": meta.get("source_id")})
    origin = chain[-1]
    summary = " <- ".join(
        f"{h['hop']} {h.get('key') or h.get('checkpoint_hash', '')[:12] or h.get('source_id')}"
        + (f" (round {h['round']})" if h.get("round") is not None else "")
        for h in chain[:-1]) + f" <- {origin['source']}/{origin['source_id']}"
    return {"key": chain[0].get("key"), "source_key": held_key or chain[0].get("key"),
            "origin": {"source": origin["source"], "source_id": origin["source_id"]},
            "summary": summary, "chain": chain}


def describe_loop(out: str | Path) -> str:
    """``layerloop inspect OUT`` on a loop directory: rounds, counts, acceptance, checkpoints, reports."""
    out = Path(out)
    info = json.loads((out / CONFIG_FILE).read_text())
    cfg = info["config"]
    lines = [f"self-improvement loop {cfg['name']} ({cfg['family']}, profile {cfg['profile']}) at {out}",
             f"fingerprint: {info['fingerprint']}   rounds asked: {info.get('rounds')}   "
             f"accepted weight: {cfg['accepted_weight']}", ""]
    for round_path in sorted((out / ROUNDS_DIR).glob("round-*")):
        steps = sorted(p.stem for p in RoundPaths(round_path).steps.glob("*.json"))
        round_json = RoundPaths(round_path).round_json
        if not round_json.exists():
            lines.append(f"{round_path.name}: in progress (finished steps: {', '.join(steps) or 'none'})")
            continue
        r = json.loads(round_json.read_text())
        c = r["counts"]
        rate = f"{100 * r['acceptance_rate']:.1f}%" if r.get("acceptance_rate") is not None else "n/a"
        mix = ", ".join(f"{s['name']} {s['samples']}x{s['weight']:g}" for s in r["mix"] if s.get("used"))
        lines.append(f"{round_path.name}: {c['candidates']} candidates, {c['ok']} ok, {c['accepted']} accepted "
                     f"({rate} of ok), checkpoint {r['checkpoint_hash'][:12]}; mix: {mix}")
        if r.get("note"):
            lines.append(f"  note: {r['note']}")
    lines += ["", f"policy: {json.dumps(cfg['policy'])}", f"report: {summary_report_dir(out) / 'index.html'}",
              "trace a sample: layerloop inspect OUT --key KEY"]
    return "\n".join(lines)


__all__ = ["trace", "describe_loop", "is_selfimprove_dir"]
