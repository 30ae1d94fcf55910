"""The ``filter`` step of round k: the policy's verdict on the round's candidates, and what follows from it.

Four jobs, one function each, in the order ``run_filter`` runs them:

1. ``decide``: one row per candidate (failed ones included) from the candidate shards, the policy's
   decisions on the ok ones, and the scores table.
2. ``write_accepted``: the accepted candidates with their lineage, in ``accepted/`` (a run directory
   written under a temporary name and renamed). What an accepted sample's C is depends on the family
   (``accept``): BFS keeps the generated F and B and recomputes ``C = a*F + (1-a)*B``, a valid
   ``quadruple``; decomposition (``incontext``) keeps the real input composite the layers were decomposed
   from, as kind ``rendered`` (the generated layer and object are what is new; no alpha-blend invariant).
3. ``write_score_tables``: ``scores.parquet`` (every candidate) and ``rejected.parquet``.
4. ``write_round_record``: ``round.json`` (counts, policy, the note on noise scores, checkpoint, mix).

Every output is written under a temporary name and renamed, so a crash leaves nothing a re-run would
trust; the re-run removes what a killed one left (``RoundPaths.remove_stale_temporaries``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from layerloop.files import atomic_path, write_json_atomic
from layerloop.report import load_index, read_records
from layerloop.samples import LayeredSample, composite
from layerloop.selfimprove.config import SelfImproveConfig
from layerloop.selfimprove.layout import (ACCEPTED_DIR, FIXED_COLUMNS, REJECTED_FILE, ROUND_FILE, SCORES_FILE,
                                          RoundPaths, read_mix)
from layerloop.selfimprove.policies import Decision, apply_policy, describe, load_policy, read_columns
from layerloop.selfimprove.results import FilterResult, TrainResult, data_run_dir, read_result

MODEL_METRIC_COLUMNS = {"clip_foreground": "clip_model", "clip_composite": "clip_model", "hps": "hps_model"}


def run_filter(cfg: SelfImproveConfig, out: Path, k: int) -> FilterResult:
    paths = RoundPaths.of(out, k)
    paths.remove_stale_temporaries(ACCEPTED_DIR, SCORES_FILE, REJECTED_FILE, ROUND_FILE)
    verdict = decide(cfg, k, paths.candidates)
    train = read_result(out, k, TrainResult)
    mix = read_mix(paths.dir)
    held = data_run_dir(out, cfg.held.name)
    source = LineageSource(round=k, held=held, held_rows={r["key"]: r for r in load_index(held).to_pylist()},
                           train=train, mix=[s["name"] for s in mix["sources"] if s["used"]],
                           policy_text=verdict.policy_text, candidates=paths.candidates, family=cfg.family)
    write_accepted(cfg, paths, verdict, source)
    write_score_tables(paths, verdict.scores)
    counts = write_round_record(cfg, k, paths, verdict, train, mix)
    return FilterResult(counts=counts, accepted=str(paths.accepted))


# ================================================================================ 1. the verdict
@dataclass
class Verdict:
    """Every candidate row of the round, the policy's decision per ok candidate, the scores table."""

    rows: list[dict[str, Any]]
    decisions: dict[str, Decision]
    scores: pa.Table
    policy_text: str

    @property
    def ok_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "ok"]

    @property
    def accepted_keys(self) -> set[str]:
        return {r["key"] for r in self.ok_rows if self.decisions[r["key"]].accepted}

    def counts(self) -> dict[str, int]:
        ok, accepted = len(self.ok_rows), len(self.accepted_keys)
        return {"candidates": len(self.rows), "ok": ok, "failed": len(self.rows) - ok, "accepted": accepted,
                "rejected": len(self.rows) - accepted}


def decide(cfg: SelfImproveConfig, k: int, candidates: Path) -> Verdict:
    policy = load_policy(cfg.policy)
    rows = _candidate_rows(candidates, k)
    table = [{"key": r["key"], "input_key": r["input_key"], "round": k, **r["scores"]} for r in rows
             if r["status"] == "ok"]
    decisions = {d.key: d for d in apply_policy(table, policy)} if table else {}
    return Verdict(rows, decisions, _scores_table(rows, decisions), describe(policy))


def _candidate_rows(candidates: Path, k: int) -> list[dict[str, Any]]:
    """One row per candidate of the round (failed ones included), from the shard indices and json members."""
    index = load_index(candidates).to_pylist()
    rows = []
    by_shard: dict[str, list[str]] = {}
    for row in index:
        if row["status"] == "ok":
            by_shard.setdefault(row["shard"], []).append(row["key"])
    metas: dict[str, dict[str, Any]] = {}
    for shard, keys in by_shard.items():
        for key, record in read_records(candidates / f"{shard}.tar", keys, members=("json",)).items():
            metas[key] = json.loads(record["json"])
    for row in index:
        meta = metas.get(row["key"], {})
        ok = row["status"] == "ok" and row["key"] in metas
        error = None if ok else (f"{row['stage']}: {row['error_type']}: {row['message']}" if row["status"] != "ok"
                                 else "indexed as ok but missing from its tar")
        rows.append({"key": row["key"], "input_key": meta.get("input_key") or row["key"].rsplit("-v", 1)[0],
                     "source_key": meta.get("source_id", row.get("source_id")), "round": k,
                     "status": "ok" if ok else "failed", "error": error,
                     "checkpoint_hash": (meta.get("generator") or {}).get("checkpoint_hash"),
                     "scores": meta.get("scores", {}) if ok else {}, "meta": meta})
    failures = candidates / "failures.parquet"
    if failures.exists():  # failures found while listing the held shards never reach a shard index
        listed = {r["key"] for r in rows}
        for f in pq.read_table(failures).to_pylist():
            if f["key"] not in listed and not f["shard"]:
                rows.append({"key": f["key"], "input_key": f["key"], "source_key": None, "round": k,
                             "status": "failed", "error": f"{f['stage']}: {f['error_type']}: {f['message']}",
                             "checkpoint_hash": None, "scores": {}, "meta": {}})
    return rows


def _scores_table(rows: list[dict[str, Any]], decisions: dict[str, Any]) -> pa.Table:
    columns = sorted({c for r in rows for c in r["scores"]} - set(FIXED_COLUMNS))
    out = []
    for r in rows:
        decision = decisions.get(r["key"])
        if r["status"] != "ok":
            accepted, rule, reasons = False, None, [f"generation failed: {r['error']}"]
        else:
            accepted, rule, reasons = decision.accepted, decision.rule, list(decision.reasons)
        out.append({"key": r["key"], "input_key": r["input_key"], "source_key": r["source_key"], "round": r["round"],
                    "status": r["status"], "error": r["error"], "accepted": accepted, "rule": rule,
                    "reasons": reasons, "checkpoint_hash": r["checkpoint_hash"],
                    **{c: r["scores"].get(c) for c in columns}})
    fields = [("key", pa.string()), ("input_key", pa.string()), ("source_key", pa.string()), ("round", pa.int64()),
              ("status", pa.string()), ("error", pa.string()), ("accepted", pa.bool_()), ("rule", pa.string()),
              ("reasons", pa.list_(pa.string())), ("checkpoint_hash", pa.string())]
    for c in columns:
        values = [r["scores"].get(c) for r in rows if r["scores"].get(c) is not None]
        if values and all(isinstance(v, bool) for v in values):
            fields.append((c, pa.bool_()))
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            fields.append((c, pa.float64()))
        else:
            fields.append((c, pa.string()))
            for row in out:
                row[c] = None if row[c] is None else str(row[c])
    return pa.Table.from_pylist(out, schema=pa.schema(fields))


# ================================================================================ 2. accepted samples
@dataclass
class LineageSource:
    """What the lineage of every accepted sample of a round names besides its own candidate."""

    round: int
    held: Path
    held_rows: dict[str, dict[str, Any]]
    train: TrainResult
    mix: list[str]  # the names of the mix's used sources
    policy_text: str
    candidates: Path
    family: str = "bfs"  # the loop's family: decides what an accepted sample's composite is (``accept``)


# Kind of an accepted sample per loop family (``accept``).
ACCEPTED_KIND = {"bfs": "quadruple", "incontext": "rendered"}


def accept(candidate: LayeredSample, decision: Decision, source: LineageSource) -> LayeredSample:
    """The accepted sample of ``candidate``, made from it in place under the same key (``r<round>_<held
    key>-v<variant>``, unique across rounds), with ``meta["lineage"]``:

    * ``bfs``: a ``quadruple``, C recomputed from the generated F and B (the generator's own composite need
      not satisfy the alpha-blend invariant; the filter's recomposition score bounds the difference);
    * ``incontext``: a ``rendered`` sample that keeps the candidate's composite, the real input C the
      decomposition was made from (``decompose-incontext`` stores it unchanged), with the generated layer
      as F and the generated clean object as B. Recomputing C there would replace a real photo by the
      alpha blend of the model's guesses (pure noise for an untrained model), and for non-linear
      renderings ``a*F + (1-a)*B`` is not C even for the true layers."""
    origin = source.held_rows.get(candidate.meta.get("source_id"), {})
    lineage = {
        "round": source.round, "candidate_key": candidate.key,
        "input_key": candidate.meta.get("input_key"), "source_key": candidate.meta.get("source_id"),
        "origin": {"source": origin.get("source"), "source_id": origin.get("source_id"),
                   "held_run": str(source.held)},
        "checkpoint_hash": (candidate.meta.get("generator") or {}).get("checkpoint_hash"),
        "checkpoint": source.train.checkpoint, "scores": candidate.meta.get("scores", {}),
        "rule": decision.rule, "policy": source.policy_text, "candidates_run": str(source.candidates),
        "mix": source.mix,
    }
    from layerloop import storage

    lineage = storage.canonical(lineage)  # a staged loop's paths by URL: the same on every node
    kind = ACCEPTED_KIND.get(source.family)
    if kind is None:
        raise ValueError(f"no accepted-sample kind for family {source.family!r}; known: {sorted(ACCEPTED_KIND)}")
    candidate.kind = kind
    if kind == "quadruple":
        candidate.composite = composite(candidate.foreground, candidate.background)
    candidate.meta["round"] = source.round
    candidate.meta["parents"] = [candidate.key]
    candidate.meta["lineage"] = lineage
    return candidate


class _ShardBatches:
    """Accepted samples written ``per_shard`` to a shard, in the order they come."""

    def __init__(self, out_dir: Path, per_shard: int, k: int):
        from layerloop.datasets.shards import ShardWriter

        self.writer, self.per_shard, self.k = ShardWriter(out_dir, "accepted"), per_shard, k
        self.batch: list[LayeredSample] = []
        self.shards = 0
        self.written: list[str] = []

    def add(self, sample: LayeredSample) -> None:
        self.batch.append(sample)
        self.written.append(sample.key)
        if len(self.batch) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        summary = self.writer.write(self.shards, self.batch)
        if summary.failed:
            bad = "; ".join(f"{key}: {message}" for key, _, _, message in summary.failures)
            raise RuntimeError(f"round {self.k}: accepted samples broke the schema: {bad}")
        self.shards, self.batch = self.shards + 1, []


def write_accepted(cfg: SelfImproveConfig, paths: RoundPaths, verdict: Verdict, source: LineageSource) -> None:
    """``accepted/``: the accepted candidates, in the candidate shards' order, as ``accept`` makes them
    (BFS quadruples, decomposition ``rendered`` samples) with lineage, ``cfg.accepted_per_shard`` to a
    shard, plus its ``run.json``."""
    from layerloop.datasets.shards import read_samples, shard_paths

    accepted_keys, k = verdict.accepted_keys, source.round
    with atomic_path(paths.accepted) as tmp:
        tmp.mkdir()
        shards = _ShardBatches(tmp, cfg.accepted_per_shard, k)
        for tar in shard_paths(paths.candidates):
            for candidate in read_samples(tar):
                if candidate.key in accepted_keys:
                    shards.add(accept(candidate, verdict.decisions[candidate.key], source))
        shards.flush()
        if set(shards.written) != accepted_keys:
            missing = sorted(accepted_keys - set(shards.written))
            raise RuntimeError(f"round {k}: accepted candidates missing from the candidate shards: {missing[:5]}")
        write_json_atomic(tmp / "run.json", {
            "name": f"{cfg.name}-r{k:03d}-accepted", "status": "complete", "round": k,
            "policy": source.policy_text, "samples_ok": len(shards.written), "samples_failed": 0,
            "shards": shards.shards}, default=str)


# ================================================================================ 3. and 4. the records
def write_score_tables(paths: RoundPaths, scores: pa.Table) -> None:
    for path, table in ((paths.scores, scores), (paths.rejected, scores.filter(pc.invert(scores["accepted"])))):
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)


def write_round_record(cfg: SelfImproveConfig, k: int, paths: RoundPaths, verdict: Verdict, train: TrainResult,
                       mix: dict[str, Any]) -> dict[str, int]:
    """``round.json``; returns the round's counts."""
    model_free_only, note = model_free_note(cfg)
    counts = verdict.counts()
    write_json_atomic(paths.round_json, {
        "round": k, "family": cfg.family, "policy": verdict.policy_text, "policy_spec": cfg.policy,
        "model_free_only": model_free_only, "note": note, "checkpoint_hash": train.checkpoint_hash,
        "checkpoint": train.checkpoint, "counts": counts, "mix": mix["sources"],
        "acceptance_rate": round(counts["accepted"] / counts["ok"], 6) if counts["ok"] else None,
    }, mkdir=True, default=str)
    return counts


def model_free_note(cfg: SelfImproveConfig) -> tuple[bool, str]:
    """Whether the model scores are noise (tiny random scorers) and what the report should say about it."""
    from layerloop.stages.score import ScoreParams

    noise = set()
    for entry in cfg.scoring:
        if entry.get("stage") != "score":
            continue
        metrics = entry.get("metrics") or ScoreParams.model_fields["metrics"].default
        for metric in metrics:
            field = MODEL_METRIC_COLUMNS.get(metric)
            if field and str(entry.get(field, "")).startswith("tiny"):
                noise.add(metric)
    if not noise:
        return False, ""
    read = set(read_columns(load_policy(cfg.policy))) - {"key", "input_key", "round"}
    used = sorted(read & noise)
    deciding = ", ".join(sorted(read - noise)) or "none"
    note = (f"{', '.join(sorted(noise))} come from tiny random scoring models (profile {cfg.profile!r}) and are "
            f"noise: the model-free scores the policy reads ({deciding}) carry the decision.")
    if used:
        note += f" WARNING: the policy reads {', '.join(used)}, so part of the decision is random."
    return True, note
