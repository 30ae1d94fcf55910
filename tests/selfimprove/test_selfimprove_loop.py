"""The self-improvement loop end to end on tiny models: rounds, mixes, lineage, kill + resume, both families."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from layerloop.datasets.shards import read_samples, shard_paths
from layerloop.samples import composite
from layerloop.selfimprove.config import load_selfimprove_config
from layerloop.selfimprove.lineage import describe_loop, trace
from layerloop.selfimprove.loop import read_events, read_mix, round_dir, self_improve

ROOT = Path(__file__).resolve().parents[2]

POLICY = {"name": "test", "all": [
    {"threshold": {"column": "alpha_empty", "op": "==", "value": False}},
    {"threshold": {"column": "duplicate", "op": "==", "value": False}},
    {"topk": {"column": "recomposition_mean", "k": 1, "by": "input_key", "keep": "bottom"}},
]}


@contextmanager
def one_torch_thread():
    """Torch on one thread while a loop runs in this process (the shared 2-core machine), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bfs_config(data: dict[str, str] | None = None, **extra) -> dict:
    """Tiny BFS loop: 8 base scenes, 3 held inputs x 2 variants, 4 training steps, 2 sampler steps."""
    base = {"name": "base", "build": "demo",
            "overrides": ["source.n=8", "source.size=64", "stages.load.short_side=64"]}
    held = {"name": "held", "build": "demo",
            "overrides": ["source.n=3", "source.seed=1", "source.size=64", "stages.load.short_side=64"]}
    if data:
        base, held = {"name": "base", "run_dir": data["base"]}, {"name": "held", "run_dir": data["held"]}
    config = {
        "name": "si-test", "family": "bfs", "seed": 0, "executor": "local",
        "base": [base], "held": held,
        "train": {"config": "train_bfs_demo", "overrides": ["steps=4", "checkpoint_every=2", "batch_size=2",
                                                           "shuffle_buffer=8"]},
        "generate": {"variants": 2, "stages": [
            {"stage": "load", "short_side": 32, "multiple_of": 16},
            {"stage": "box-mask", "padding": 0.05},
            {"stage": "generate-bfs", "steps": 2, "batch_size": 8}]},
        "scoring": [{"stage": "score", "metrics": ["clip_foreground", "recomposition"], "clip_model": "tiny"},
                    {"stage": "alpha-sanity"}, {"stage": "dedupe", "threshold": 8}],
        "policy": POLICY, "accepted_weight": 3.0, "accepted_per_shard": 2, "report_rows": 2,
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def loop3(tmp_path_factory):
    """Three rounds of the tiny BFS loop (local executor), built once for the module, with one torch
    thread: the Ray executor's train step holds one CPU and runs one thread, and CPU training outputs
    depend on the thread count (the Ray test below compares checkpoint hashes)."""
    import torch

    out = tmp_path_factory.mktemp("si") / "loop"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = self_improve(bfs_config(), rounds=3, out=out)
    finally:
        torch.set_num_threads(threads)
    return out, result


def accepted_keys(scores_path: Path) -> set[str]:
    rows = pq.read_table(scores_path, columns=["key", "accepted"]).to_pylist()
    return {r["key"] for r in rows if r["accepted"]}


def test_rounds_finish_with_reports_and_reasons(loop3):
    out, result = loop3
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    for k, r in enumerate(result["rounds"]):
        assert r["candidates"] == 6 and r["ok"] == 6  # 3 held inputs x 2 variants
        assert r["accepted"] >= 1 and r["accepted"] <= 3  # top-1 per input
        path = round_dir(out, k)
        for name in ("mix.json", "scores.parquet", "rejected.parquet", "round.json", "report/index.html",
                     "report/scores.png", "report/accepted.png", "report/rejected.png", "report/loss.png",
                     "train/final/checkpoint_hash.txt"):
            assert (path / name).exists(), name
        scores = pq.read_table(path / "scores.parquet").to_pylist()
        for row in scores:
            assert row["round"] == k and row["checkpoint_hash"] == r["checkpoint_hash"]
            if row["accepted"]:
                assert row["rule"] == "test" and row["reasons"] == []
            else:
                assert row["reasons"] and all(isinstance(x, str) and x for x in row["reasons"])
        rejected = pq.read_table(path / "rejected.parquet").to_pylist()
        assert {x["key"] for x in rejected} == {x["key"] for x in scores if not x["accepted"]}
        info = json.loads((path / "round.json").read_text())
        assert info["model_free_only"] and "clip_foreground" in info["note"]  # tiny CLIP: the report says so
        assert "model-free" in (path / "report" / "index.html").read_text()
    for name in ("index.html", "acceptance.png", "drift.png", "loss.png", "stats.json"):
        assert (out / "report" / name).exists(), name
    # every round trains on from the previous round's LoRA, so the checkpoints differ
    assert len({r["checkpoint_hash"] for r in result["rounds"]}) == 3
    assert "round-002" in describe_loop(out)


def test_mix_is_base_plus_exactly_the_accepted_samples_with_their_weight(loop3):
    out, _ = loop3
    base_keys = {s.key for s in read_samples(out / "data" / "base")}
    for k in range(3):
        mix = read_mix(round_dir(out, k))
        used = {s["name"]: s for s in mix["sources"] if s["used"]}
        assert set(used) == {"base"} | {f"accepted-r{j:03d}" for j in range(k)}
        assert used["base"]["weight"] == 1.0 and used["base"]["samples"] == len(base_keys)
        for j in range(k):
            source = used[f"accepted-r{j:03d}"]
            assert source["weight"] == 3.0 and source["origin"] == "accepted" and source["round"] == j
            shard_keys = [s.key for s in read_samples(source["run_dir"])]
            assert len(shard_keys) == len(set(shard_keys))  # nothing written twice
            assert set(shard_keys) == accepted_keys(round_dir(out, j) / "scores.parquet")
            assert source["samples"] == len(shard_keys)
        # the training run of round k was configured with exactly this mix
        trained = json.loads((round_dir(out, k) / "train" / "train.json").read_text())["config"]
        assert [(d["name"], d["run_dir"], d["weight"]) for d in trained["data"]] == \
            [(s["name"], s["run_dir"], s["weight"]) for s in mix["sources"] if s["used"]]
        if k:
            assert trained["task"]["init_lora"] == str(round_dir(out, k - 1) / "train" / "final")


def test_accepted_samples_are_valid_quadruples_with_lineage(loop3):
    out, result = loop3
    for k in range(3):
        samples = list(read_samples(round_dir(out, k) / "accepted"))
        assert samples
        for sample in samples:
            sample.validate()
            assert sample.kind == "quadruple"
            assert (sample.composite == composite(sample.foreground, sample.background)).all()
            lineage = sample.meta["lineage"]
            assert lineage["round"] == k and lineage["rule"] == "test"
            assert lineage["checkpoint_hash"] == result["rounds"][k]["checkpoint_hash"]
            assert lineage["candidate_key"] == sample.key and sample.key.startswith(f"r{k:03d}_held_")
            assert lineage["source_key"] == lineage["input_key"].removeprefix(f"r{k:03d}_")
            assert set(lineage["scores"]) >= {"recomposition_mean", "alpha_coverage", "dup_distance"}


def test_lineage_of_a_round_2_sample_traces_back_to_its_source_key(loop3, capsys):
    from layerloop.cli import main

    out, result = loop3
    sample = next(read_samples(shard_paths(round_dir(out, 2) / "accepted")[0]))
    traced = trace(out, sample.key)
    hops = [h["hop"] for h in traced["chain"]]
    assert hops == ["accepted", "candidate", "generator", "held input", "origin"]
    held_key = sample.meta["lineage"]["source_key"]
    assert traced["source_key"] == held_key and held_key.startswith("held_scene_")
    held = {s.key: s for s in read_samples(out / "data" / "held")}[held_key]
    assert traced["origin"] == {"source": held.meta["source"], "source_id": held.meta["source_id"]}
    generator = traced["chain"][2]
    assert generator["checkpoint_hash"] == result["rounds"][2]["checkpoint_hash"]
    assert generator["matches_round_checkpoint"]
    # round 2's generator was trained on the base data and the accepted samples of rounds 0 and 1
    assert [s["name"] for s in generator["trained_on"]] == ["base", "accepted-r000", "accepted-r001"]
    assert traced["chain"][1]["decision"]["accepted"] is True
    assert main(["inspect", str(out), "--key", sample.key]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source_key"] == held_key
    assert main(["inspect", str(out)]) == 0
    assert "round-002" in capsys.readouterr().out
    assert main(["inspect", str(out), "--key", "nope"]) == 2  # an unknown key is a clear error, not a traceback
    assert "nope" in capsys.readouterr().err
    (out / "report" / "index.html").unlink()
    assert main(["report", str(out)]) == 0  # rewrites the round reports and the summary
    assert (out / "report" / "index.html").exists()


def test_filter_keeps_reasons_for_a_policy_that_rejects_everything(tmp_path, loop3):
    out, _ = loop3
    data = {"base": str(out / "data" / "base"), "held": str(out / "data" / "held")}
    config = bfs_config(data, policy={"name": "strict", "threshold": {"column": "recomposition_mean", "op": "<",
                                                                       "value": 0}})
    result = self_improve(config, rounds=2, out=tmp_path / "strict")
    assert [r["accepted"] for r in result["rounds"]] == [0, 0]
    rows = pq.read_table(round_dir(tmp_path / "strict", 0) / "scores.parquet").to_pylist()
    assert all(r["reasons"] and "recomposition_mean" in r["reasons"][0] and "strict" in r["reasons"][0]
               for r in rows)
    mix = read_mix(round_dir(tmp_path / "strict", 1))
    assert [(s["name"], s["samples"], s["used"]) for s in mix["sources"]] == \
        [("base", 8, True), ("accepted-r000", 0, False)]


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_killed_in_round_1_resumes_without_redoing_finished_steps(tmp_path, loop3):
    """SIGKILL the loop while round 1 trains; the re-run skips round 0 and round 1's mix, finishes, and
    gives what the uninterrupted loop gave."""
    out3, result3 = loop3
    data = {"base": str(out3 / "data" / "base"), "held": str(out3 / "data" / "held")}
    config = bfs_config(data)
    config["train"]["overrides"] = config["train"]["overrides"][:1] + ["checkpoint_every=1", "batch_size=2",
                                                                      "shuffle_buffer=8"]
    config_path = tmp_path / "si.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "layerloop.cli", "self-improve", str(config_path), "--rounds", "2",
               "--out", str(out)]
    # one torch thread, as loop3 (CPU training outputs depend on the thread count)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    checkpoints = round_dir(out, 1) / "train" / "checkpoints"
    while time.time() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    round0 = _tree_digest(round_dir(out, 0))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (round_dir(out, 1) / "steps" / "train.json").exists()

    before = len(read_events(out))
    config_from_file = load_selfimprove_config(config_path)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = self_improve(config_from_file, rounds=2, out=out)
    finally:
        torch.set_num_threads(threads)
    events = [(e["round"], e["step"], e["event"]) for e in read_events(out)[before:] if e["step"] != "loop"]
    assert [e for e in events if e[0] <= 0] == [(-1, "data", "skip")] + [(0, s, "skip") for s in
                                                                        ("mix", "train", "generate", "filter", "report")]
    assert (1, "mix", "skip") in events and (1, "train", "start") in events and (1, "train", "done") in events
    assert _tree_digest(round_dir(out, 0)) == round0  # round 0 untouched
    metrics = (round_dir(out, 1) / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]  # resumed, no step logged twice
    # same seeds, same data: the interrupted loop ends where the uninterrupted one did
    for k in (0, 1):
        assert result["rounds"][k]["checkpoint_hash"] == result3["rounds"][k]["checkpoint_hash"]
        assert accepted_keys(round_dir(out, k) / "scores.parquet") == \
            accepted_keys(round_dir(out3, k) / "scores.parquet")


def test_a_different_config_is_refused_and_rounds_can_be_extended(tmp_path, loop3):
    out3, _ = loop3
    data = {"base": str(out3 / "data" / "base"), "held": str(out3 / "data" / "held")}
    out = tmp_path / "extend"
    first = self_improve(bfs_config(data), rounds=1, out=out)
    assert len(first["rounds"]) == 1
    with pytest.raises(ValueError, match="different config"):
        self_improve(bfs_config(data, accepted_weight=1.0), rounds=1, out=out)
    with pytest.raises(ValueError, match="at least 1"):
        self_improve(bfs_config(data), rounds=0, out=out)
    before = len(read_events(out))
    second = self_improve(bfs_config(data), rounds=2, out=out)
    assert second["rounds"][0] == first["rounds"][0]
    events = read_events(out)[before:]
    assert not [e for e in events if e["round"] == 0 and e["event"] == "start"]
    assert "round-001" in (out / "report" / "index.html").read_text()


def test_config_errors_are_reported_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="decompose-incontext"):
        load_selfimprove_config(bfs_config(family="incontext"))
    with pytest.raises(ValueError, match="policy"):
        load_selfimprove_config(bfs_config(policy={"threshold": {"column": "x", "op": ">"}}))
    with pytest.raises(ValueError, match="exactly one of run_dir"):
        load_selfimprove_config(bfs_config(held={"name": "held"}))
    # a policy reading a score that no configured stage writes fails before any training
    no_dedupe = bfs_config(scoring=[{"stage": "alpha-sanity"}])
    with pytest.raises(ValueError, match=r"no generation or scoring stage writes: duplicate \(read by"):
        load_selfimprove_config(no_dedupe)
    with pytest.raises(ValueError, match="unknown stage 'scroe'"):
        load_selfimprove_config(bfs_config(scoring=[{"stage": "scroe"}]))
    assert set(load_selfimprove_config("selfimprove_incontext_demo").score_columns()) >= {
        "cycle_error", "clip_foreground", "hps", "recomposition_mean", "alpha_empty", "duplicate"}
    config = load_selfimprove_config("selfimprove_bfs_demo", ["accepted_weight=3", "generate.variants=4",
                                                               "scoring.dedupe.threshold=4"])
    assert config.accepted_weight == 3 and config.generate.variants == 4
    assert [s for s in config.scoring if s["stage"] == "dedupe"][0]["threshold"] == 4
    with pytest.raises(ValueError, match="names no entry"):
        load_selfimprove_config("selfimprove_bfs_demo", ["scoring.nope.threshold=4"])


def test_decomposition_family_runs_two_rounds(tmp_path):
    config = load_selfimprove_config("selfimprove_incontext_demo", [
        "executor=local", "base.logos.overrides=[source.n=6, source.size=64]",
        "held.overrides=[source.n=2, source.seed=1, source.size=64]",
        "train.overrides=[steps=3, checkpoint_every=3, batch_size=2, shuffle_buffer=8]",
        "generate.stages.load.short_side=32", "generate.stages.decompose-incontext.steps=2"])
    result = self_improve(config, rounds=2, out=tmp_path / "dec")
    assert [r["candidates"] for r in result["rounds"]] == [4, 4]
    assert all(r["accepted"] >= 1 for r in result["rounds"])
    sample = next(read_samples(round_dir(tmp_path / "dec", 1) / "accepted"))
    assert sample.meta["generator"]["family"] == "incontext"
    # accepted decompositions keep the real input composite the candidate was decomposed from
    candidate = next(c for c in read_samples(round_dir(tmp_path / "dec", 1) / "candidates") if c.key == sample.key)
    assert sample.kind == "rendered" and sample.composite.tobytes() == candidate.composite.tobytes()
    from layerloop.selfimprove.steps import train_config

    assert "rendered" in train_config(config, tmp_path / "dec", 1).task["kinds"]  # round 1 trained on them
    scores = pq.read_table(round_dir(tmp_path / "dec", 1) / "scores.parquet").to_pylist()
    assert all(r["cycle_error"] > 0 for r in scores)  # the cycle score of decomposition candidates
    assert "cycle_error" in sample.meta["lineage"]["scores"]
    assert trace(tmp_path / "dec", sample.key)["source_key"].startswith("held_")


def test_ray_executor_runs_the_steps_as_one_dag(tmp_path, loop3, ray_local):
    out3, result3 = loop3
    data = {"base": str(out3 / "data" / "base"), "held": str(out3 / "data" / "held")}
    result = self_improve(bfs_config(data, executor="ray"), rounds=1, out=tmp_path / "ray")
    pids = {e["pid"] for e in read_events(tmp_path / "ray") if e["step"] not in ("loop",)}
    assert os.getpid() not in pids  # the steps ran in Ray workers, not in this process
    assert result["rounds"][0]["checkpoint_hash"] == result3["rounds"][0]["checkpoint_hash"]
    assert accepted_keys(round_dir(tmp_path / "ray", 0) / "scores.parquet") == \
        accepted_keys(round_dir(out3, 0) / "scores.parquet")


def test_failed_candidates_are_rejected_with_the_generation_error(tmp_path):
    import numpy as np

    from layerloop.datasets.shards import ShardWriter
    from layerloop.samples import LayeredSample
    from layerloop.selfimprove.filter import _candidate_rows, _scores_table
    from layerloop.selfimprove.policies import apply_policy

    rng = np.random.default_rng(0)

    def candidate(key: str, score: float) -> LayeredSample:
        background = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        foreground = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        return LayeredSample(key=key, kind="candidate", composite=composite(foreground, background),
                             background=background, foreground=foreground, mask=mask, caption="a box",
                             meta={"source": "r000", "source_id": "held_a", "input_key": "r000_held_a",
                                   "scores": {"recomposition_mean": score}, "generator": {"checkpoint_hash": "h"}})

    good, broken = candidate("r000_held_a-v0", 3.0), candidate("r000_held_a-v1", 1.0)
    broken.fail("generate-bfs", "needs a background and the box mask", "MissingInput")
    ShardWriter(tmp_path, "candidates").write(0, [good, broken])
    rows = _candidate_rows(tmp_path, 0)
    assert [(r["key"], r["status"]) for r in rows] == [("r000_held_a-v0", "ok"), ("r000_held_a-v1", "failed")]
    table = [{"key": r["key"], "input_key": r["input_key"], "round": 0, **r["scores"]} for r in rows
             if r["status"] == "ok"]
    decisions = {d.key: d for d in apply_policy(table, {"threshold": {"column": "recomposition_mean", "op": "<=",
                                                                      "value": 5}})}
    scores = _scores_table(rows, decisions).to_pylist()
    assert scores[0]["accepted"] and scores[0]["checkpoint_hash"] == "h" and scores[0]["source_key"] == "held_a"
    assert not scores[1]["accepted"] and scores[1]["recomposition_mean"] is None
    assert scores[1]["reasons"] == ["generation failed: generate-bfs: MissingInput: needs a background and the "
                                    "box mask"]


def test_local_steps_start_with_the_loops_thread_count(monkeypatch, tmp_path):
    """A step that changes torch's thread count (pymatting's numba kernels do, through OpenMP) must not
    change the threads later steps train and generate with."""
    import torch

    from layerloop.selfimprove import loop as loop_module

    seen = []

    def fake_run_one(config_json, out, k, name):
        seen.append((name, torch.get_num_threads()))
        torch.set_num_threads(2 if name == "data" else 3)
        return {"round": k, "step": name}

    monkeypatch.setattr(loop_module, "_run_one", fake_run_one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop_module._run_local(loop_module.SelfImproveConfig.model_validate(bfs_config()), tmp_path, 1)
    finally:
        torch.set_num_threads(threads)
    assert seen and all(count == 1 for _, count in seen), seen


def test_a_rerun_filter_removes_what_a_killed_one_left(tmp_path):
    """Temporaries of the filter's outputs (``layerloop.files`` names, and ``accepted.tmp`` of older loops) are
    found and removed; committed outputs and other files stay."""
    from layerloop.files import temp_sibling
    from layerloop.selfimprove.layout import RoundPaths

    paths = RoundPaths.of(tmp_path, 0)
    paths.dir.mkdir(parents=True)
    paths.accepted.mkdir()
    paths.scores.write_bytes(b"committed")
    (paths.dir / "accepted.tmp").mkdir()
    temp_sibling(paths.accepted).mkdir()
    temp_sibling(paths.scores).write_bytes(b"half")
    (paths.dir / "accepted.tmpl").write_text("not a temporary")
    removed = paths.remove_stale_temporaries("accepted", "scores.parquet")
    assert len(removed) == 3
    assert sorted(p.name for p in paths.dir.iterdir()) == ["accepted", "accepted.tmpl", "scores.parquet"]
