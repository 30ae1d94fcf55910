"""The training loop under Ray Train: 2 CPU workers train the tiny BFS model from tiny shards."""

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

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def write_shards(out_dir, shards=2, per_shard=4, size=16):
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True)
    writer = ShardWriter(out_dir, "q")
    for index in range(shards):
        samples = []
        for i in range(per_shard):
            background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            foreground = np.zeros((size, size, 4), np.uint8)
            foreground[3:11, 5:13] = (*rng.integers(0, 256, 3), 255)
            mask = np.zeros((size, size), np.uint8)
            mask[2:12, 4:14] = 255
            samples.append(LayeredSample(key=f"q_{index}_{i}", composite=composite(foreground, background),
                                         background=background, foreground=foreground, mask=mask, caption="a box"))
        writer.write(index, samples)
    return out_dir


def test_two_cpu_workers_train_from_shards(ray_local, tmp_path):
    data = write_shards(tmp_path / "data")
    cfg = load_train_config({
        "name": "ray-bfs", "family": "bfs", "stage": "stage1", "model": "tiny", "steps": 4, "lr": 1e-2,
        "batch_size": 1, "checkpoint_every": 2, "seed": 1, "executor": "ray", "num_workers": 2,
        # One CPU each: the shared ray_local fixture has exactly 2, and Ray Train v2's controller takes none.
        "ray": {"cpus_per_worker": 1},
        "data": [{"name": "q", "run_dir": str(data)}],
        "task": {"resolution": 16, "phi_checkpoint": "untrained"},
    })
    summary = run_training(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["num_workers"] == 2 and summary["step"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Each step consumed one global batch of 2 (one sample per worker).
    state = read_trainer_state(list_checkpoints(out)[-1][1])
    assert state["streams"]["quadruple"]["draws"] == 4 * 2
    lora = load_file(str(out / "final" / "bfs_lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("up.weight"))
    assert (out / "final" / "checkpoint_hash.txt").read_text().strip() == summary["checkpoint_hash"]
    assert all(torch.isfinite(v).all() for v in lora.values())
