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


# ------------------------------------------------------------------------- the BFS paper's applications (#15)
OLD_STAGE_RECORD = {"backend", "checkpoint", "guidance", "rgba_vae", "noise", "steps"}


def test_default_mode_records_what_it_did_before_the_applications(inputs):
    root, final, _ = inputs
    for sample in _run(root, final, keys={"in_0"}):
        assert "mode" not in sample.meta["generator"] and "reference" not in sample.meta["generator"]
        assert set(sample.meta["stages"]["generate-bfs"]) == OLD_STAGE_RECORD


def test_extract_mode_keeps_the_real_composite_and_extracts_its_layer(inputs):
    from layerloop.datasets.shards import read_samples

    root, final, _ = inputs
    real = {s.key: s for s in read_samples(root / "in-000000.tar")}
    seen = []
    out = _run(root, final, seen=seen, mode="extract")
    generated = {s.key: s for s in _run(root, final)}
    assert [s.ok for s in out] == [True] * 3
    for sample in out:
        source = real[sample.meta["source_id"]]
        assert np.array_equal(sample.composite, source.composite)  # the real C, byte for byte
        assert np.array_equal(sample.background, source.background)
        assert sample.foreground.shape == (16, 24, 4) and sample.kind == "candidate"
        assert not np.array_equal(sample.foreground, generated[sample.key].foreground)
        meta = sample.meta["generator"]
        assert meta["mode"] == "extract" and meta["seed"] == generated[sample.key].meta["generator"]["seed"]
        error = np.abs(composite(sample.foreground, sample.background).astype(float) - sample.composite).mean()
        assert meta["recomposition_error"] == round(error, 4)
        assert sample.meta["stages"]["generate-bfs"]["mode"] == "extract"
        sample.validate()
    # 2 steps, one batch of 3: after the first step the composite branch gets the noised real C, not F's latents
    assert len(seen) == 2 and not torch.equal(seen[1][0], seen[1][1])


def test_extract_mode_without_a_composite_is_a_recorded_failure(inputs):
    _, final, _ = inputs
    stage = build_stage({"stage": "generate-bfs", "checkpoint": str(final), "steps": 1, "mode": "extract"})
    mask = np.full((16, 16), 255, np.uint8)
    none = LayeredSample(key="nocomposite", caption="x", mask=mask)
    none.work["gt_background"] = np.zeros((16, 16, 3), np.uint8)
    other = LayeredSample(key="othersize", caption="x", mask=mask, composite=np.zeros((8, 16, 3), np.uint8))
    other.work["gt_background"] = np.zeros((16, 16, 3), np.uint8)
    out = run_stage(stage, [none, other])
    assert out[0].failure.error_type == "MissingInput" and "input composite" in out[0].failure.message
    assert out[1].failure.error_type == "BadSize" and "composite is 16x8" in out[1].failure.message


def test_mode_and_reference_change_the_fingerprint_only_when_set():
    from layerloop.config import load_config

    config = load_config("generate_bfs_demo")
    extract = load_config("generate_bfs_demo", ["stages.generate-bfs.mode=extract"])
    assert extract.fingerprint() != config.fingerprint()
    assert load_config("generate_bfs_demo", ["stages.generate-bfs.reference=ref.png"]).fingerprint() \
        != config.fingerprint()


def test_reference_image_conditions_every_sample_through_redux(inputs, tmp_path):
    from PIL import Image

    from layerloop.files import sha256_file

    root, final, _ = inputs
    reference = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(reference)
    plain = {s.key: s for s in _run(root, final, keys={"in_0", "in_1"})}
    guided = _run(root, final, keys={"in_0", "in_1"}, reference=str(reference), redux_model="tiny")
    for sample in guided:
        assert sample.ok and not np.array_equal(sample.foreground, plain[sample.key].foreground)
        assert sample.meta["generator"]["reference"] == {"path": str(reference.resolve()),
                                                         "sha256": sha256_file(reference), "redux_model": "tiny"}
        assert sample.meta["stages"]["generate-bfs"]["reference"] == str(reference)
    stage = build_stage({"stage": "generate-bfs", "checkpoint": str(final), "reference": str(reference)})
    assert [ref.model for ref in stage.models()] == ["black-forest-labs/FLUX.1-Redux-dev"]  # what models pull fetches
