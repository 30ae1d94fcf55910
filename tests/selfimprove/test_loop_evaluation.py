"""The loop's evaluate step: every round's LoRA (and round 0's starting point) on one fixed held-out set,
``round-NNN/eval.json``, the summary report's plot by round, compare, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerloop.evaluation.compare import compare_table
from layerloop.selfimprove.loop import read_events, self_improve
from tests.selfimprove.test_selfimprove_loop import bfs_config, one_torch_thread

EVALUATION = {
    "heldout": {"name": "eval-heldout", "build": "demo",
                "overrides": ["source.n=3", "source.seed=2", "source.size=64", "stages.load.short_side=32",
                              "stages.load.multiple_of=16"]},
    "baselines": [{"name": "ground-truth", "stages": [{"stage": "ground-truth"}]}],
    "metrics": {"clip_model": "tiny", "hps_model": "tiny", "musiq_model": "tiny", "maniqa_model": "tiny",
                "dino_model": "tiny"},
    "kid_subset_size": 2, "kid_subsets": 5,
}


@pytest.fixture(scope="module")
def evaluated_loop(tmp_path_factory):
    with one_torch_thread():
        out = tmp_path_factory.mktemp("si-eval") / "loop"
        result = self_improve(bfs_config(evaluation=EVALUATION), rounds=2, out=out, progress=False)
    return out, result


def test_every_round_is_evaluated_on_the_same_heldout_set(evaluated_loop):
    out, _ = evaluated_loop
    evals = [json.loads((out / "rounds" / f"round-{k:03d}" / "eval.json").read_text()) for k in range(2)]
    assert list(evals[0]["metrics"]) == ["lora", "start", "ground-truth"]  # round 0 also measures its start
    assert list(evals[1]["metrics"]) == ["lora", "ground-truth"]
    for result in evals:
        assert result["n"] == 3 and result["family"] == "bfs"
        for metric in ("fg_clip", "musiq", "maniqa", "kid_x1000", "dino", "hps"):
            assert np.isfinite(result["metrics"]["lora"][metric]), metric
    # the same held-out samples every round: the reference row does not move
    assert evals[0]["metrics"]["ground-truth"] == evals[1]["metrics"]["ground-truth"]
    assert evals[0]["metrics"]["lora"] != evals[1]["metrics"]["lora"]
    heldouts = [json.loads(p.read_text())["config"]["heldout"] for p in
                sorted(out.glob("rounds/round-*/eval/evaluate.json"))]
    assert len(heldouts) == 2 and heldouts[0] == heldouts[1]


def test_start_is_the_untrained_lora_and_rounds_use_their_own(evaluated_loop):
    out, result = evaluated_loop
    start_hash = (out / "rounds" / "round-000" / "start" / "final" / "checkpoint_hash.txt").read_text().strip()
    assert start_hash not in {r["checkpoint_hash"] for r in result["rounds"]}
    for k, info in enumerate(result["rounds"]):
        [sample_meta] = [json.loads(p.read_text()) for p in
                         sorted((out / "rounds" / f"round-{k:03d}" / "eval" / "methods" / "lora").glob("run.json"))]
        stages = sample_meta["config"]["stages"]
        assert stages[0]["checkpoint"].endswith(f"round-{k:03d}/train/final")


def test_summary_report_plots_metrics_by_round_and_compare_reads_the_loop(evaluated_loop):
    out, _ = evaluated_loop
    stats = json.loads((out / "report" / "stats.json").read_text())
    assert [e["round"] for e in stats["evaluation"]] == [0, 1]
    assert (out / "report" / "evaluation.png").stat().st_size > 5000
    assert "Held-out evaluation" in (out / "report" / "index.html").read_text()
    table = compare_table([out])
    assert "round-000 | round 0 |" in table and "round-001 | round 1 |" in table


def test_rerun_skips_the_evaluations(evaluated_loop):
    out, _ = evaluated_loop
    before = [(out / "rounds" / f"round-{k:03d}" / "eval.json").read_bytes() for k in range(2)]
    self_improve(bfs_config(evaluation=EVALUATION), rounds=2, out=out, progress=False)
    skipped = [e for e in read_events(out)[-40:] if e["step"] == "evaluate" and e["event"] == "skip"]
    assert len(skipped) == 2
    assert [(out / "rounds" / f"round-{k:03d}" / "eval.json").read_bytes() for k in range(2)] == before
