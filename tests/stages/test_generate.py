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


def _run(root, final, keys=None, seen=None, **params):
    """The shard through load -> box-mask -> generate-bfs; ``seen``: a list that receives the (latents_c,
    latents_f) of every call of the generator."""
    source = build_source({"type": "webdataset", "urls": str(root / "in-000000.tar")})
    samples = [source.read(item) for item in source.items() if keys is None or item.source_id in keys]
    for spec in ({"stage": "load", "short_side": 16, "multiple_of": 4}, {"stage": "box-mask", "padding": 0.0},
                 {"stage": "generate-bfs", "checkpoint": str(final), "steps": 2, **params}):
        stage = build_stage(spec, seed=11)
        if seen is not None and spec["stage"] == "generate-bfs":
            stage.ensure_setup()
            generator, original = stage._pipe.generator, stage._pipe.generator.forward

            def forward(latents_c, latents_f, *args, _original=original, **kwargs):
                seen.append((latents_c.detach().clone(), latents_f.detach().clone()))
                return _original(latents_c, latents_f, *args, **kwargs)

            generator.forward = forward
        samples = run_stage(stage, samples)
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
        assert meta["noise"] == "shared"  # the default, the BFS paper's (#15)
        assert meta["recomposition_error"] >= 0
        sample.validate()
        assert json.loads(sample.to_wds()["json"])["kind"] == "candidate"  # writable to a shard
    assert not np.array_equal(out[0].composite, out[1].composite)


def test_output_does_not_depend_on_batch_mates(inputs):
    root, final, _ = inputs
    together = {s.key: s for s in _run(root, final, batch_size=3)}
    alone = _run(root, final, keys={"in_1"}, batch_size=1)[0]
    # Up to float rounding: the transformer's matmuls sum in another order for another batch size (~5e-7 in the
    # latents), which can move a pixel that sits on a rounding boundary by one step.
    for layer in ("composite", "foreground"):
        got, want = getattr(alone, layer).astype(int), getattr(together[alone.key], layer).astype(int)
        assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, layer
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


@pytest.mark.parametrize("noise", [None, "shared", "independent"])
def test_both_branches_start_from_one_noise_unless_independent(inputs, noise):
    root, final, _ = inputs
    seen = []
    out = _run(root, final, seen=seen, **({} if noise is None else {"noise": noise}))
    first_c, first_f = seen[0]  # at t = 1 the branches' inputs are their noise
    assert torch.equal(first_c, first_f) == (noise != "independent")
    assert all(s.meta["generator"]["noise"] == (noise or "shared") for s in out)
    assert all(s.meta["stages"]["generate-bfs"]["noise"] == (noise or "shared") for s in out)


def test_build_fingerprint_records_the_resolved_noise():
    from layerloop.config import STAGE_FINGERPRINT_DEFAULTS, ConfigModel, load_config
    from layerloop.stages.generate import GenerateParams

    assert STAGE_FINGERPRINT_DEFAULTS["generate-bfs"] == {"noise": GenerateParams.model_fields["noise"].default}
    config = load_config("generate_bfs_demo")
    # A generation run made before #15 recorded the fingerprint without the noise: refused now, not mixed.
    assert config.fingerprint() != ConfigModel.fingerprint(config)
    assert config.fingerprint() == load_config("generate_bfs_demo", ["stages.generate-bfs.noise=shared"]).fingerprint()
    assert config.fingerprint() != load_config("generate_bfs_demo",
                                               ["stages.generate-bfs.noise=independent"]).fingerprint()
    demo = load_config("demo")  # builds without generate-bfs keep their fingerprint
    assert demo.fingerprint() == ConfigModel.fingerprint(demo)
