"""The generic training loop on the tiny BFS model (CPU): exact resume, checkpoints, metrics, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from layerloop.datasets.shards import ShardWriter
from layerloop.samples import LayeredSample, composite
from layerloop.training import load_train_config, run_training
from layerloop.training.checkpoint import list_checkpoints, read_trainer_state
from layerloop.training.loop import learning_rate


def write_shards(out_dir, name="q", shards=2, per_shard=4, kinds=("quadruple",), size=16):
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, name)
    for index in range(shards):
        samples = []
        for i in range(per_shard):
            n = index * per_shard + i
            background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            foreground = np.zeros((size, size, 4), np.uint8)
            foreground[3:11, 5:13, :3] = rng.integers(0, 256, 3, dtype=np.uint8)
            foreground[3:11, 5:13, 3] = 200
            mask = np.zeros((size, size), np.uint8)
            mask[2:12, 4:14] = 255
            samples.append(LayeredSample(key=f"{name}_{n:03d}", kind=kinds[n % len(kinds)],
                                         composite=composite(foreground, background), background=background,
                                         foreground=foreground, mask=mask, caption=f"a box number {n}"))
        writer.write(index, samples)
    return out_dir


def config(data_dir, **changes):
    base = {
        "name": "t", "family": "bfs", "stage": "stage1", "model": "tiny", "steps": 6, "lr": 1e-2,
        "batch_size": 2, "checkpoint_every": 2, "keep": 2, "seed": 7, "shuffle_buffer": 4,
        "data": [{"name": "q", "run_dir": str(data_dir)}],
        "task": {"resolution": 16, "phi_checkpoint": "untrained"},
    }
    base.update(changes)
    return load_train_config(base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("loop") / "data")


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_reaches_the_same_weights(shards, tmp_path):
    cfg = config(shards, grad_accum=2)
    whole = run_training(cfg, tmp_path / "whole")

    # Interrupted after step 3: the last checkpoint is step 2, so step 3 is computed again on resume.
    stopped = run_training(cfg, tmp_path / "resumed", stop_at=3)
    assert stopped["stopped"] and not (tmp_path / "resumed" / "final").exists()
    resumed = run_training(cfg, tmp_path / "resumed")
    assert resumed["resumed_from"] == 2

    a = load_file(str(tmp_path / "whole" / "final" / "bfs_lora.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "bfs_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["checkpoint_hash"] == resumed["checkpoint_hash"]
    assert (tmp_path / "whole" / "final" / "checkpoint_hash.txt").read_text().strip() == whole["checkpoint_hash"]
    # Training moved the LoRA away from its zero-initialised up-projections.
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("up.weight"))

    # Metrics: every step exactly once after the resume, with the uninterrupted run's losses.
    whole_m, resumed_m = _metrics(tmp_path / "whole"), _metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed_m] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed_m] == [m["loss"] for m in whole_m]
    assert {"loss", "fm_c", "fm_f", "comp", "lr", "grad_norm", "samples_per_s"} <= set(whole_m[0])

    # keep=2: only the newest two checkpoints; each carries the stream position (accum 2 x batch 2 per step).
    steps = [step for step, _ in list_checkpoints(tmp_path / "whole")]
    assert steps == [4, 6]
    state = read_trainer_state(list_checkpoints(tmp_path / "whole")[-1][1])
    assert state["step"] == 6 and state["streams"]["quadruple"]["draws"] == 6 * 2 * 2


def test_rerun_of_a_finished_run_changes_nothing_and_other_configs_are_refused(shards, tmp_path):
    cfg = config(shards, steps=2)
    first = run_training(cfg, tmp_path / "run")
    again = run_training(cfg, tmp_path / "run")
    assert again["resumed_from"] == 2 and again["checkpoint_hash"] == first["checkpoint_hash"]
    with pytest.raises(ValueError, match="different config"):
        run_training(config(shards, steps=2, lr=1e-3), tmp_path / "run")
    # More steps on the same run is a continuation, not a different config.
    longer = run_training(config(shards, steps=4), tmp_path / "run")
    assert longer["resumed_from"] == 2 and [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_partial_checkpoint_is_ignored_and_removed(shards, tmp_path):
    cfg = config(shards, steps=2)
    partial = tmp_path / "run" / "checkpoints" / "step-000004.tmp-dead"
    partial.mkdir(parents=True)
    (partial / "weights").mkdir()
    summary = run_training(cfg, tmp_path / "run")
    assert summary["resumed_from"] is None and not partial.exists()


def test_killed_before_the_first_checkpoint_logs_no_step_twice(shards, tmp_path):
    """A run killed after logging step 1 but before its first checkpoint was complete (a partial
    ``step-*.tmp-*`` directory) starts again from step 0: the steps it logged are computed again, so they are
    dropped from metrics.jsonl rather than logged twice (the self-improvement kill test caught this)."""
    cfg = config(shards, steps=2)
    run = tmp_path / "run"
    partial = run / "checkpoints" / "step-000001.tmp-dead"
    partial.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    summary = run_training(cfg, run)
    assert summary["resumed_from"] is None
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [1, 2] and _metrics(run)[0]["loss"] != 9.0


def test_warmup_and_overrides(shards, tmp_path):
    cfg = load_train_config(
        {"family": "bfs", "steps": 3, "data": [{"name": "q", "run_dir": str(shards)}], "task": {}},
        ["warmup_steps=2", "lr=0.004", "data.q.weight=2", "task.resolution=16", "task.phi_checkpoint=untrained"])
    assert cfg.data[0].weight == 2 and cfg.task["resolution"] == 16
    assert [learning_rate(cfg, step) for step in range(3)] == [0.002, 0.004, 0.004]
    with pytest.raises(ValueError, match="names no entry"):
        load_train_config(cfg.model_dump(), ["data.missing.weight=2"])
    with pytest.raises(ValueError, match="needs executor=ray"):
        run_training(config(shards, num_workers=2), tmp_path / "other")


def test_a_step_runs_forward_and_backward_without_cudnn_attention(shards, tmp_path, monkeypatch):
    """The loop runs a task's loss and its backward (where a checkpoint recomputes the forward) with cuDNN's
    fused attention switched off (layerloop/models/attention.py: it failed under checkpointing on an H200);
    flash attention stays on, and the switch is restored after the step."""
    from layerloop.training.bfs_task import BFSTask

    seen = {}
    original = BFSTask.loss

    def loss(self, batch, step, generator):
        seen["forward"] = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
        value, logs = original(self, batch, step, generator)
        value.register_hook(lambda grad: seen.update(backward=torch.backends.cuda.cudnn_sdp_enabled()))
        return value, logs

    monkeypatch.setattr(BFSTask, "loss", loss)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    run_training(config(shards, steps=1), tmp_path / "run")
    assert seen == {"forward": (False, True), "backward": False}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
