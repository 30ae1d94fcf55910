"""The generate-bfs stage on the tiny model: shards -> load -> box-mask -> candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import layerloop.stages.generate  # noqa: F401  (registers generate-bfs)
from layerloop.datasets.shards import ShardWriter
from layerloop.datasets.sources import build_source
from layerloop.models import bfs
from layerloop.samples import LayeredSample, composite
from layerloop.stages import build_stage, run_stage
from layerloop.training import load_train_config
from layerloop.training.bfs_task import BFSTask
from layerloop.training.loop import export_final


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A shard of 3 quadruples (24 x 16 px) and a tiny stage-1 LoRA with non-zero weights in final/."""
    root = tmp_path_factory.mktemp("generate")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        background = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        foreground = np.zeros((16, 24, 4), np.uint8)
        foreground[4:12, 6:14] = (*rng.integers(0, 256, 3), 255)
        object_mask = (foreground[..., 3] > 0).astype(np.uint8) * 255
        samples.append(LayeredSample(key=f"in_{i}", composite=composite(foreground, background), background=background,
                                     foreground=foreground, mask=object_mask, object_mask=object_mask,
                                     caption=f"a red box {i}"))
    ShardWriter(root, "in").write(0, samples)
    cfg = load_train_config({"family": "bfs", "stage": "stage1", "model": "tiny", "steps": 1,
                             "data": [{"name": "in", "run_dir": str(root)}],
                             "task": {"resolution": 16, "phi_checkpoint": "untrained"}})
    task = BFSTask(cfg)
    task.setup(torch.device("cpu"))
    with torch.no_grad():  # an untrained LoRA is exactly the backbone; make the LoRA matter
        g = torch.Generator().manual_seed(0)
        for p in task.generator.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    final, digest = export_final(task, root / "lora")
    return root, final, digest


def _run(root, final, keys=None, **params):
    source = build_source({"type": "webdataset", "urls": str(root / "in-000000.tar")})
    samples = [source.read(item) for item in source.items() if keys is None or item.source_id in keys]
    for spec in ({"stage": "load", "short_side": 16, "multiple_of": 4}, {"stage": "box-mask", "padding": 0.0},
                 {"stage": "generate-bfs", "checkpoint": str(final), "steps": 2, **params}):
        samples = run_stage(build_stage(spec, seed=11), samples)
    return samples


def test_generates_candidates_with_lineage(inputs):
    root, final, digest = inputs
    out = _run(root, final)
    assert [s.ok for s in out] == [True] * 3
    for sample in out:
        assert sample.kind == "candidate"
        assert sample.composite.shape == (16, 24, 3) and sample.foreground.shape == (16, 24, 4)
        assert sample.background.shape == (16, 24, 3) and sample.mask.max() == 255
        meta = sample.meta["generator"]
        assert meta["checkpoint_hash"] == digest == bfs.lora_checkpoint_hash(final)
        assert meta["family"] == "bfs" and meta["steps"] == 2 and isinstance(meta["seed"], int)
        assert meta["recomposition_error"] >= 0
        sample.validate()
        assert json.loads(sample.to_wds()["json"])["kind"] == "candidate"  # writable to a shard
    assert not np.array_equal(out[0].composite, out[1].composite)


def test_output_does_not_depend_on_batch_mates(inputs):
    root, final, _ = inputs
    together = {s.key: s for s in _run(root, final, batch_size=3)}
    alone = _run(root, final, keys={"in_1"}, batch_size=1)[0]
    np.testing.assert_array_equal(alone.composite, together[alone.key].composite)
    np.testing.assert_array_equal(alone.foreground, together[alone.key].foreground)
    assert alone.meta["generator"]["seed"] == together[alone.key].meta["generator"]["seed"]


def test_missing_box_is_a_recorded_failure(inputs):
    _, final, _ = inputs
    stage = build_stage({"stage": "generate-bfs", "checkpoint": str(final), "steps": 1})
    sample = LayeredSample(key="nobox", caption="x")
    sample.work["gt_background"] = np.zeros((16, 16, 3), np.uint8)
    odd = LayeredSample(key="odd", caption="x", mask=np.full((18, 18), 255, np.uint8))
    odd.work["gt_background"] = np.zeros((18, 18, 3), np.uint8)
    out = run_stage(stage, [sample, odd])
    assert out[0].failure.error_type == "MissingInput" and out[1].failure.error_type == "BadSize"
