"""``layerloop self-improve CONFIG --rounds N``: train, generate, score, filter, feed back, N times.

Layout of the output directory (``OUT``)::

    selfimprove.json          the config and its fingerprint (a different config is refused)
    events.jsonl              one line per step start / done / skip, with seconds
    data/<name>/              base and held builds the loop ran itself (``build:`` entries)
    rounds/round-NNN/
        mix.json              the training mix: base data + every earlier round's accepted shards, weights
        train/                the training run (metrics.jsonl, checkpoints/, final/ with checkpoint_hash.txt)
        candidates/           generation + scoring build over the held inputs (kind=candidate shards)
        scores.parquet        one row per candidate: scores, accepted, the accepting rule, rejection reasons
        rejected.parquet      the rejected candidates and their reasons
        accepted/             the accepted samples as kind=quadruple shards, with their lineage
        round.json            counts, policy, checkpoint hash, the mix
        report/               round report (index.html, scores/accepted/rejected/loss PNGs, stats.json)
        steps/<step>.json     written when a step finished: the unit of resumption
    report/                   the cross-round report (acceptance, score drift, loss curves)

Steps of round k: ``mix`` -> ``train`` -> ``generate`` -> ``filter`` -> ``report``; after the last round,
``summary``. Before round 0, ``data`` builds the base and held data that name a build config.

Resumption: a step is finished exactly when its ``steps/<step>.json`` marker exists; a re-run skips it. An
interrupted ``train`` resumes from its newest checkpoint and an interrupted ``generate`` from its committed
shards (both already resume on their own); ``mix``, ``filter`` and ``report`` write their outputs under
temporary names and are simply redone.

Execution: with ``executor: ray`` every step is a task of one Ray task graph, submitted at once (each
step's task takes its predecessor's ObjectRef as an argument, so Ray starts it when that one finished,
retries a step whose worker or node died, and places the train step on a GPU node when training uses a
GPU), and the builds inside ``data`` and ``generate`` run on Ray Data as
``layerloop build`` does. ``executor: local`` runs the same steps in this process.

Accepted samples: a candidate's composite is the generator's own C; the accepted sample keeps the
generated F and B and recomputes ``C = a*F + (1-a)*B`` so that it is a valid ``quadruple`` (the
docs/architecture.md invariant) that every training task reads. The filter's recomposition score bounds how far
that is from the generator's composite; the candidate itself stays in ``candidates/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from layerloop.selfimprove.config import SelfImproveConfig, load_selfimprove_config

logger = logging.getLogger(__name__)

STEPS = ("mix", "train", "generate", "filter", "report")
ALWAYS_RUN = {"summary"}  # cheap, and it must cover however many rounds this invocation asked for
MODEL_METRIC_COLUMNS = {"clip_foreground": "clip_model", "clip_composite": "clip_model", "hps": "hps_model"}
FIXED_COLUMNS = ("key", "input_key", "source_key", "round", "status", "error", "accepted", "rule", "reasons",
                 "checkpoint_hash")


# ================================================================================ paths and markers
def round_dir(out: Path, k: int) -> Path:
    return out / "rounds" / f"round-{k:03d}"


def data_dir(out: Path, name: str) -> Path:
    return out / "data" / name


def _marker(out: Path, k: int, step: str) -> Path:
    return (round_dir(out, k) if k >= 0 else out) / "steps" / f"{step}.json"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _event(out: Path, k: int, step: str, event: str, **extra: Any) -> None:
    line = json.dumps({"time": round(time.time(), 3), "round": k, "step": step, "event": event, "pid": os.getpid(),
                       **extra}, sort_keys=True)
    with open(out / "events.jsonl", "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
        f.write(line + "\n")


def read_events(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ================================================================================ steps
class Step:
    """One resumable step: ``run`` unless its marker exists; the marker holds ``run``'s result."""

    def __init__(self, cfg: SelfImproveConfig, out: Path, k: int, name: str):
        self.cfg, self.out, self.k, self.name = cfg, out, k, name
        self.dir = round_dir(out, k) if k >= 0 else out

    def __call__(self) -> dict[str, Any]:
        marker = _marker(self.out, self.k, self.name)
        if marker.exists() and self.name not in ALWAYS_RUN:
            _event(self.out, self.k, self.name, "skip")
            return json.loads(marker.read_text())
        _event(self.out, self.k, self.name, "start")
        started = time.perf_counter()
        result = dict(STEP_FUNCTIONS[self.name](self))
        result["seconds"] = round(time.perf_counter() - started, 2)
        _write_json(marker, result)
        _event(self.out, self.k, self.name, "done", seconds=result["seconds"])
        return result


def _build(cfg: SelfImproveConfig, build_config: dict[str, Any], out_dir: Path):
    from layerloop.config import BuildConfig
    from layerloop.pipelines.build import build

    config = BuildConfig.model_validate({**build_config, "executor": cfg.executor,
                                         "ray": cfg.ray.model_dump(mode="json")})
    return build(config, out=out_dir, progress=False)


def _committed_ok(run_dir: Path) -> list[str]:
    """Keys of the ok samples in a run directory's committed shards (none when it does not exist)."""
    from layerloop.report import _committed_ok_keys, load_index

    if not run_dir.is_dir():
        return []
    return [key for keys in _committed_ok_keys(run_dir, load_index(run_dir)).values() for key in keys]


def _digest(keys: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def step_data(step: Step) -> dict[str, Any]:
    """Build the base and held data that name a build config (each resumes on its own)."""
    from layerloop.config import load_yaml

    built = {}
    for spec in [*step.cfg.base, step.cfg.held]:
        if spec.build is None:
            run_dir = Path(spec.run_dir).resolve()
            if not _committed_ok(run_dir):
                raise FileNotFoundError(f"data {spec.name!r}: {run_dir} has no committed samples; build it first "
                                        f"or give `build:` a config")
            built[spec.name] = {"run_dir": str(run_dir), "built": False}
            continue
        target = data_dir(step.out, spec.name)
        config = load_yaml(spec.build, spec.overrides)
        config["report"] = {**config.get("report", {}), "enabled": False}
        if not any(o.startswith("source.name=") for o in spec.overrides):
            # Keys start with the source name: two builds of one config (base and held) get distinct keys.
            config.setdefault("source", {})["name"] = spec.name
        result = _build(step.cfg, config, target)
        if result.ok == 0:
            raise RuntimeError(f"data {spec.name!r}: the build {spec.build} wrote no samples ({result.failed} failed)")
        built[spec.name] = {"run_dir": str(target), "built": True, "ok": result.ok, "failed": result.failed}
    return {"data": built}


def data_run_dir(out: Path, name: str) -> Path:
    """Run directory of a base or held data entry, as the ``data`` step recorded it."""
    return Path(json.loads(_marker(out, -1, "data").read_text())["data"][name]["run_dir"])


def step_mix(step: Step) -> dict[str, Any]:
    """The training mix of round k: the base data with their weights plus every earlier round's accepted
    shards with ``accepted_weight``. A round that accepted nothing is listed with 0 samples and left out of
    the training data (an empty source cannot be sampled)."""
    sources = []
    for spec in step.cfg.base:
        run_dir = data_run_dir(step.out, spec.name)
        keys = _committed_ok(run_dir)
        sources.append({"name": spec.name, "run_dir": str(run_dir), "weight": spec.weight, "origin": "base",
                        "round": None, "samples": len(keys), "keys_digest": _digest(keys), "used": True})
    for j in range(step.k):
        accepted = round_dir(step.out, j) / "accepted"
        keys = _committed_ok(accepted)
        sources.append({"name": f"accepted-r{j:03d}", "run_dir": str(accepted), "weight": step.cfg.accepted_weight,
                        "origin": "accepted", "round": j, "samples": len(keys), "keys_digest": _digest(keys),
                        "used": bool(keys)})
    mix = {"round": step.k, "sources": sources, "accepted_weight": step.cfg.accepted_weight,
           "samples": sum(s["samples"] for s in sources if s["used"])}
    _write_json(step.dir / "mix.json", mix)
    return {"mix": str(step.dir / "mix.json"), "samples": mix["samples"]}


def read_mix(round_path: str | Path) -> dict[str, Any]:
    return json.loads((Path(round_path) / "mix.json").read_text())


def _train_dict(cfg: SelfImproveConfig) -> dict[str, Any]:
    """The configured training config with its overrides applied, as a fresh dict."""
    from layerloop.training.config import load_train_dict

    return load_train_dict(cfg.train.config, cfg.train.overrides)


def train_config(cfg: SelfImproveConfig, out: Path, k: int):
    """Round k's TrainConfig: the configured training with the round's mix as data, its own seed, and
    (``continue_training``) the previous round's LoRA as the starting point."""
    from layerloop.training.config import TrainConfig

    data = _train_dict(cfg)
    if data.get("family", cfg.family) != cfg.family:
        raise ValueError(f"train config family {data.get('family')!r} differs from the loop's {cfg.family!r}")
    mix = read_mix(round_dir(out, k))
    data["family"] = cfg.family
    data["name"] = f"{cfg.name}-r{k:03d}"
    data["data"] = [{"name": s["name"], "run_dir": s["run_dir"], "weight": s["weight"]}
                    for s in mix["sources"] if s["used"]]
    data["seed"] = int(data.get("seed", 0)) + k
    data.pop("out", None)
    if k > 0 and cfg.continue_training:
        data.setdefault("task", {})["init_lora"] = str(round_dir(out, k - 1) / "train" / "final")
    return TrainConfig.model_validate(data)


def step_train(step: Step) -> dict[str, Any]:
    from layerloop.training import run_training

    cfg = train_config(step.cfg, step.out, step.k)
    summary = run_training(cfg, step.dir / "train")
    final = step.dir / "train" / "final"
    checkpoint_hash = (final / "checkpoint_hash.txt").read_text().strip()
    return {"checkpoint": str(final), "checkpoint_hash": checkpoint_hash, "steps": cfg.steps,
            "final_loss": summary.get("final_loss", summary.get("loss")),
            "init_lora": cfg.task.get("init_lora")}


GENERATOR_STAGES = {"bfs": "generate-bfs", "incontext": "decompose-incontext"}


def generate_config(cfg: SelfImproveConfig, out: Path, k: int) -> dict[str, Any]:
    """Round k's generation + scoring build over the held inputs."""
    from layerloop.datasets.shards import shard_paths

    urls = [str(p) for p in shard_paths(data_run_dir(out, cfg.held.name))]
    mix = read_mix(round_dir(out, k))
    checkpoint = str(round_dir(out, k) / "train" / "final")
    stages = []
    for entry in [*cfg.generate.stages, *cfg.scoring]:
        entry = dict(entry)
        if entry.get("stage") == GENERATOR_STAGES[cfg.family]:
            entry["checkpoint"] = checkpoint
        if entry.get("stage") == "dedupe":
            entry["reference"] = [s["run_dir"] for s in mix["sources"] if s["used"]]
        stages.append(entry)
    return {
        "name": f"{cfg.name}-r{k:03d}-candidates", "profile": cfg.profile, "seed": cfg.seed * 1000 + k,
        "source": {"type": "webdataset", "urls": urls, **cfg.generate.source, "name": f"r{k:03d}",
                   "variants": cfg.generate.variants},
        "stages": stages,
        "shards": {"name": "candidates", "samples_per_shard": cfg.generate.samples_per_shard},
        "report": {"enabled": False},
    }


def step_generate(step: Step) -> dict[str, Any]:
    result = _build(step.cfg, generate_config(step.cfg, step.out, step.k), step.dir / "candidates")
    return {"candidates": str(step.dir / "candidates"), "ok": result.ok, "failed": result.failed,
            "shards": result.shards_total}


# -------------------------------------------------------------------------------- filter
def model_free_note(cfg: SelfImproveConfig) -> tuple[bool, str]:
    """Whether the model scores are noise (tiny random scorers) and what the report should say about it."""
    from layerloop.selfimprove.policies import _columns, load_policy
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
    read = set(_columns(load_policy(cfg.policy))) - {"key", "input_key", "round"}
    used = sorted(read & noise)
    deciding = ", ".join(sorted(read - noise)) or "none"
    note = (f"{', '.join(sorted(noise))} come from tiny random scoring models (profile {cfg.profile!r}) and are "
            f"noise: the model-free scores the policy reads ({deciding}) carry the decision.")
    if used:
        note += f" WARNING: the policy reads {', '.join(used)}, so part of the decision is random."
    return True, note


def _candidate_rows(candidates: Path, k: int) -> list[dict[str, Any]]:
    """One row per candidate of the round (failed ones included), from the shard indices and json members."""
    from layerloop.report import _read_records, load_index

    index = load_index(candidates).to_pylist()
    rows = []
    by_shard: dict[str, list[str]] = {}
    for row in index:
        if row["status"] == "ok":
            by_shard.setdefault(row["shard"], []).append(row["key"])
    metas: dict[str, dict[str, Any]] = {}
    for shard, keys in by_shard.items():
        for key, record in _read_records(candidates / f"{shard}.tar", keys, members=("json",)).items():
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


def step_filter(step: Step) -> dict[str, Any]:
    from layerloop.datasets.shards import ShardWriter, read_samples, shard_paths
    from layerloop.report import load_index
    from layerloop.samples import composite
    from layerloop.selfimprove.policies import apply_policy, describe, load_policy

    cfg, k = step.cfg, step.k
    policy = load_policy(cfg.policy)
    candidates = step.dir / "candidates"
    rows = _candidate_rows(candidates, k)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    table = [{"key": r["key"], "input_key": r["input_key"], "round": k, **r["scores"]} for r in ok_rows]
    decisions = {d.key: d for d in apply_policy(table, policy)} if table else {}
    scores = _scores_table(rows, decisions)

    # Every output is first written under a temporary name; a crash leaves nothing a re-run would trust.
    for stale in (step.dir / "accepted.tmp", step.dir / "accepted"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = step.dir / "accepted.tmp"
    tmp_dir.mkdir(parents=True)
    held = data_run_dir(step.out, cfg.held.name)
    held_rows = {r["key"]: r for r in load_index(held).to_pylist()}
    train_marker = json.loads(_marker(step.out, k, "train").read_text())
    mix = read_mix(step.dir)
    policy_text = describe(policy)
    accepted_keys = {r["key"] for r in ok_rows if decisions[r["key"]].accepted}
    writer = ShardWriter(tmp_dir, "accepted")
    batch, shard_index, written = [], 0, []

    def flush() -> None:
        nonlocal batch, shard_index
        if batch:
            summary = writer.write(shard_index, batch)
            if summary.failed:
                bad = "; ".join(f"{key}: {message}" for key, _, _, message in summary.failures)
                raise RuntimeError(f"round {k}: accepted samples broke the schema: {bad}")
            shard_index, batch = shard_index + 1, []

    for tar in shard_paths(candidates):
        for candidate in read_samples(tar):
            if candidate.key not in accepted_keys:
                continue
            decision = decisions[candidate.key]
            origin = held_rows.get(candidate.meta.get("source_id"), {})
            candidate_key = candidate.key  # r<round>_<held key>-v<variant>: unique across rounds
            sample = candidate  # turned into the accepted quadruple in place, under the same key
            sample.kind = "quadruple"
            sample.composite = composite(sample.foreground, sample.background)
            lineage = {
                "round": k, "candidate_key": candidate_key,
                "input_key": candidate.meta.get("input_key"), "source_key": candidate.meta.get("source_id"),
                "origin": {"source": origin.get("source"), "source_id": origin.get("source_id"),
                           "held_run": str(held)},
                "checkpoint_hash": (candidate.meta.get("generator") or {}).get("checkpoint_hash"),
                "checkpoint": train_marker["checkpoint"], "scores": candidate.meta.get("scores", {}),
                "rule": decision.rule, "policy": policy_text, "candidates_run": str(candidates),
                "mix": [s["name"] for s in mix["sources"] if s["used"]],
            }
            sample.meta["round"] = k
            sample.meta["parents"] = [lineage["candidate_key"]]
            sample.meta["lineage"] = lineage
            batch.append(sample)
            written.append(sample.key)
            if len(batch) >= cfg.accepted_per_shard:
                flush()
    flush()
    if set(written) != accepted_keys:
        missing = sorted(accepted_keys - set(written))
        raise RuntimeError(f"round {k}: accepted candidates missing from the candidate shards: {missing[:5]}")
    _write_json(tmp_dir / "run.json", {"name": f"{cfg.name}-r{k:03d}-accepted", "status": "complete",
                                       "round": k, "policy": policy_text, "samples_ok": len(written),
                                       "samples_failed": 0, "shards": shard_index})

    def write_parquet(tbl: pa.Table, name: str) -> None:
        tmp = step.dir / f"{name}.tmp"
        pq.write_table(tbl, tmp)
        os.replace(tmp, step.dir / name)

    write_parquet(scores, "scores.parquet")
    write_parquet(scores.filter(pa.compute.invert(scores["accepted"])), "rejected.parquet")
    os.replace(tmp_dir, step.dir / "accepted")

    model_free_only, note = model_free_note(cfg)
    counts = {"candidates": len(rows), "ok": len(ok_rows), "failed": len(rows) - len(ok_rows),
              "accepted": len(accepted_keys), "rejected": len(rows) - len(accepted_keys)}
    _write_json(step.dir / "round.json", {
        "round": k, "family": cfg.family, "policy": policy_text, "policy_spec": cfg.policy,
        "model_free_only": model_free_only, "note": note, "checkpoint_hash": train_marker["checkpoint_hash"],
        "checkpoint": train_marker["checkpoint"], "counts": counts, "mix": mix["sources"],
        "acceptance_rate": round(len(accepted_keys) / len(ok_rows), 6) if ok_rows else None,
    })
    return {"counts": counts, "accepted": str(step.dir / "accepted")}


def step_report(step: Step) -> dict[str, Any]:
    from layerloop.selfimprove.report import write_round_report

    stats = write_round_report(step.dir, rows=step.cfg.report_rows)
    return {"report": str(step.dir / "report" / "index.html"), "acceptance": stats.get("acceptance")}


def step_summary(step: Step) -> dict[str, Any]:
    from layerloop.selfimprove.report import write_summary_report

    rounds = sorted(p for p in (step.out / "rounds").glob("round-*") if (p / "steps" / "report.json").exists())
    write_summary_report(step.out, rounds)
    return {"report": str(step.out / "report" / "index.html"), "rounds": len(rounds)}


STEP_FUNCTIONS = {"data": step_data, "mix": step_mix, "train": step_train, "generate": step_generate,
                  "filter": step_filter, "report": step_report, "summary": step_summary}


# ================================================================================ running
def _run_one(config_json: dict[str, Any], out: str, k: int, name: str, *upstream: Any) -> dict[str, Any]:
    """A step as a plain function of picklable arguments (the unit of the Ray DAG); ``upstream`` only orders it."""
    cfg = SelfImproveConfig.model_validate(config_json)
    if name == "train":
        _set_torch_threads()
    return {"round": k, "step": name, **Step(cfg, Path(out), k, name)()}


def _step_label(k: int, name: str) -> str:
    return name if k < 0 else f"round {k}: {name}"


class _StepBar:
    """A bar over the loop's steps on a terminal's stderr (``round k: step`` as its postfix); the steps
    already finished (their markers exist) count as done."""

    def __init__(self, out: Path, rounds: int, enabled: bool):
        from tqdm import tqdm

        from layerloop import logs

        self.out, self.rounds = out, rounds
        self.steps = [(k, name) for k, name in plan_steps(rounds) if name not in ALWAYS_RUN]
        self.bar = tqdm(total=len(plan_steps(rounds)), unit="step", desc="self-improve", file=logs.TERMINAL,
                        disable=not logs.progress_enabled(enabled), dynamic_ncols=True)
        self.enabled = not self.bar.disable
        self.refresh()

    def refresh(self) -> None:
        """Count the finished steps from their markers; show the first one not finished."""
        if not self.enabled:
            return
        done = sum(1 for k, name in self.steps if _marker(self.out, k, name).exists())
        current = next(((k, name) for k, name in self.steps if not _marker(self.out, k, name).exists()),
                       (self.rounds - 1, "summary"))
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(_step_label(*current), refresh=True)

    def close(self, finished: bool = False) -> None:
        if finished and self.enabled:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _run_local(cfg: SelfImproveConfig, out_dir: Path, rounds: int, bar: _StepBar | None = None) -> list[dict[str, Any]]:
    """Every step in this process, each starting with the torch thread count the loop started with.

    A step may change it behind the loop's back: pymatting's numba kernels (the data step's matting) set
    OpenMP's thread count, which torch reads. Training and generation outputs depend on the thread count,
    so without this a resumed loop (its data step skipped) could train with other threads than an
    uninterrupted one."""
    import torch

    threads = torch.get_num_threads()
    results = []
    for k, name in plan_steps(rounds):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if bar is not None:
            bar.refresh()
        results.append(_run_one(cfg.model_dump(mode="json"), str(out_dir), k, name))
    return results


def _set_torch_threads() -> None:
    """In a Ray worker, give the trainer's libraries as many threads as the CPUs its task holds."""
    import ray

    # Only a worker has assigned resources; a driver (the local executor in a process connected to Ray)
    # keeps its threads.
    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from layerloop.pipelines.executors import _pin_threads

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            _pin_threads(cpus)


def plan_steps(rounds: int) -> list[tuple[int, str]]:
    return [(-1, "data")] + [(k, s) for k in range(rounds) for s in STEPS] + [(rounds - 1, "summary")]


def _train_resources(cfg: SelfImproveConfig, out: Path) -> dict[str, float]:
    """The train step's task holds a CPU (or a GPU) while the local trainer runs in it; Ray Train schedules
    its own workers, so then the step task holds nothing."""
    data = _train_dict(cfg)
    if data.get("executor", "local") == "ray":
        return {"num_cpus": 0}
    return {"num_cpus": 1, "num_gpus": 1 if data.get("use_gpu") else 0}


class _Noop:
    def __call__(self, batch: dict) -> dict:
        return batch


def _pin_ray_data_singletons() -> None:
    """Run a one-row Ray Data job (with an actor pool) in the driver before any step runs.

    Ray Data creates detached singleton actors (its stats actor, actor location tracker and autoscaling
    coordinator, ``get_if_exists``) pinned to the node of the process that first executes a dataset; the
    coordinator restarts without limit but only on that node (``ray/data/_internal/cluster_autoscaler``).
    If that were a step's worker node and the node died, later builds would call actors that can never
    come back. Created from the driver, they live on the driver's node and fate-share with it; the steps'
    builds reuse them."""
    import ray.data

    ray.data.range(1, override_num_blocks=1).map_batches(
        _Noop, batch_size=1, num_cpus=0, compute=ray.data.ActorPoolStrategy(size=1)).take_all()


class StepCannotRunError(RuntimeError):
    """The step the loop waits for asks for resources that no alive node of the cluster has."""


def _wait_for_steps(ref: Any, out: Path, rounds: int, requests: dict[tuple[int, str], dict[str, float]],
                    bar: _StepBar | None = None) -> Any:
    """``ray.get`` of the last step, but never forever: Ray keeps a task whose resources no alive node has
    pending (an autoscaler may still add one), so when the step that runs now (the first without its
    marker) asks for more than any alive node offers for longer than the stall timeout
    (``LAYERLOOP_RAY_STALL_TIMEOUT_S``), the loop stops with one message; a re-run resumes at that step."""
    import ray

    from layerloop.pipelines.executors import _stall_timeout

    timeout, since = _stall_timeout(), None
    while True:
        ready, _ = ray.wait([ref], timeout=1.0 if bar is not None and bar.enabled else 5.0)
        if bar is not None:
            bar.refresh()
        if ready:
            return ray.get(ref)
        current = next(((k, name) for k, name in plan_steps(rounds)
                        if name not in ALWAYS_RUN and not _marker(out, k, name).exists()), None)
        need = {key: value for key, value in requests.get(current, {}).items() if value > 0}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not need or any(all(r.get(key, 0) >= value for key, value in need.items()) for r in nodes):
            since = None
            continue
        since = since or time.monotonic()
        if time.monotonic() - since >= timeout:
            k, name = current
            raise StepCannotRunError(
                f"step {name} of {'the data' if k < 0 else f'round {k}'} has waited {timeout:.0f} s for "
                f"{', '.join(f'{v:g} {key}' for key, v in need.items())} on one node; none of the "
                f"{len(nodes)} alive nodes has that (the cluster has "
                f"{sum(r.get('CPU', 0) for r in nodes):g} CPUs, {sum(r.get('GPU', 0) for r in nodes):g} GPUs). "
                f"Add a node and run the same command again: it resumes at this step.")


def _run_ray(cfg: SelfImproveConfig, out: Path, rounds: int, bar: _StepBar | None = None) -> list[dict[str, Any]]:
    """Submit every step as a Ray task whose argument is its predecessor's result (an ObjectRef): Ray
    starts a step when the previous one finished, retries it when its worker or node dies (the step then
    resumes from its own files), and the driver only waits for the last one."""
    import ray

    from layerloop.pipelines.executors import RayExecutor

    from layerloop import logs

    if bar is not None:
        bar.bar.set_postfix_str("starting Ray...", refresh=True)
    logs.status("starting Ray", enabled=bar is None or not bar.enabled)
    RayExecutor(cfg.ray).init_ray()
    _pin_ray_data_singletons()
    step_task = ray.remote(_run_one)
    retries = cfg.ray.max_task_retries if cfg.ray.max_task_retries is not None else 3
    defaults = {"num_cpus": 0, "max_retries": retries, "retry_exceptions": False}
    config_json = ray.put(cfg.model_dump(mode="json"))
    ref = None
    requests: dict[tuple[int, str], dict[str, float]] = {}
    for k, name in plan_steps(rounds):
        options: dict[str, Any] = {**defaults, "name": f"selfimprove:{'data' if k < 0 else f'round-{k:03d}'}:{name}"}
        if name == "train":
            options.update(_train_resources(cfg, out))
        requests[(k, name)] = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0)}
        args = (config_json, str(out), k, name) + (() if ref is None else (ref,))
        ref = step_task.options(**options).remote(*args)
    try:
        _wait_for_steps(ref, out, rounds, requests, bar)
    except ray.exceptions.RayTaskError as error:
        raise error.as_instanceof_cause() from None
    return [json.loads(_marker(out, k, name).read_text()) for k, name in plan_steps(rounds) if name != "summary"]


def self_improve(config: str | Path | dict[str, Any] | SelfImproveConfig, rounds: int | None = None,
                 out: str | Path | None = None, overrides: list[str] | None = None,
                 executor: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or extend) a self-improvement loop; returns a summary with per-round counts.
    ``progress``: a bar over the loop's steps on stderr when it is a terminal."""
    from layerloop.pipelines.runs import RunDirectory, write_config_record

    cfg = config if isinstance(config, SelfImproveConfig) else load_selfimprove_config(config, overrides)
    if executor:
        cfg = cfg.model_copy(update={"executor": executor})
    rounds = cfg.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    out_dir = cfg.out_dir(out).resolve()
    started = time.perf_counter()
    with RunDirectory(out_dir):
        write_config_record(out_dir / "selfimprove.json", "a self-improvement loop", cfg.model_dump(mode="json"),
                            cfg.fingerprint(), rounds=rounds)
        _event(out_dir, -1, "loop", "start", rounds=rounds, executor=cfg.executor)
        bar = _StepBar(out_dir, rounds, progress)
        try:
            if cfg.executor == "ray":
                results = _run_ray(cfg, out_dir, rounds, bar)
            else:
                results = _run_local(cfg, out_dir, rounds, bar)
            bar.close(finished=True)
        finally:
            bar.close()
        _event(out_dir, -1, "loop", "done", seconds=round(time.perf_counter() - started, 2))
    per_round = []
    for k in range(rounds):
        info = json.loads((round_dir(out_dir, k) / "round.json").read_text())
        per_round.append({"round": k, **info["counts"], "acceptance_rate": info["acceptance_rate"],
                          "checkpoint_hash": info["checkpoint_hash"]})
    return {"out": str(out_dir), "rounds": per_round, "report": str(out_dir / "report" / "index.html"),
            "seconds": round(time.perf_counter() - started, 2), "steps": len(results)}


__all__ = ["self_improve", "round_dir", "read_mix", "read_events", "train_config", "generate_config", "STEPS",
           "plan_steps"]
