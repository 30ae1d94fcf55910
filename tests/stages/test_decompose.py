"""Logo quadruples built with no stages (LogoSource), then the decompose-incontext stage on a tiny LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import layerloop.stages.decompose  # noqa: F401  (registers decompose-incontext)
from layerloop.config import load_config
from layerloop.datasets.logos import LogoSynthesizer
from layerloop.datasets.shards import read_samples, shard_paths
from layerloop.datasets.sources import LogoSource, build_source
from layerloop.models import incontext as ic
from layerloop.pipelines.build import build
from layerloop.samples import LayeredSample, composite
from layerloop.stages import build_stage, run_stage
from layerloop.training import load_train_config
from layerloop.training.incontext_task import InContextTask
from layerloop.training.loop import export_final


@pytest.fixture(scope="module")
def logos(tmp_path_factory):
    """`logos_demo` shrunk: 6 logo samples (kind rendered) of 64 px in 2 shards, built with `stages: []`."""
    out = tmp_path_factory.mktemp("logos") / "run"
    config = load_config("logos_demo", ["executor=local", "source.n=6", "source.size=64",
                                        "shards.samples_per_shard=3"])
    assert config.stages == []
    build(config, out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, logos):
    """A tiny in-context LoRA with non-zero weights in final/ (an untrained LoRA is exactly the backbone)."""
    root = tmp_path_factory.mktemp("lora")
    cfg = load_train_config({"family": "incontext", "model": "tiny", "steps": 1,
                             "data": [{"name": "logos", "run_dir": str(logos)}], "task": {"resolution": 16}})
    task = InContextTask(cfg)
    task.setup(torch.device("cpu"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in task.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return export_final(task, root)


def test_logo_build_writes_valid_rendered_samples(logos):
    assert len(shard_paths(logos)) == 2
    samples = list(read_samples(sorted(str(p) for p in logos.glob("*.tar"))))
    assert [s.key for s in samples] == [f"logos_{i:06d}" for i in range(6)]
    reference = LogoSynthesizer(size=64, seed=0)
    for i, sample in enumerate(samples):
        assert sample.kind == "rendered" and sample.size == (64, 64)
        sample.validate()  # no alpha-blend invariant for rendered samples: C is the synthesizer's rendering
        np.testing.assert_array_equal(sample.composite, reference.make(i).composite)
        assert sample.mask.max() == 255 and sample.caption
        np.testing.assert_array_equal(sample.foreground, reference.make(i).foreground)  # the synthesizer's sample
        assert sample.meta["source"] == "logos" and "logo" in sample.meta


def test_logo_source_config_and_keys():
    source = build_source({"type": "logos", "n": 3, "seed": 5, "size": 64, "name": "seed5"})
    assert isinstance(source, LogoSource)
    items = source.items()
    assert [i.key for i in items] == ["seed5_000000", "seed5_000001", "seed5_000002"]
    sample = source.read(items[1])
    assert sample.key == "seed5_000001" and sample.meta["source"] == "seed5"
    np.testing.assert_array_equal(sample.composite, LogoSynthesizer(size=64, seed=5).make(1).composite)
    with pytest.raises(ValueError, match="size"):
        build_source({"type": "logos", "n": 3, "size": 32})


def _held(logos, keys=None):
    """The built shards as held inputs: only composite, region mask and caption are read (load stage)."""
    source = build_source({"type": "webdataset", "urls": str(logos / "logos-000000.tar"), "name": "held",
                           "image_member": "composite.png", "mask_member": "mask.png", "background_member": None})
    samples = [source.read(item) for item in source.items() if keys is None or item.source_id in keys]
    return run_stage(build_stage({"stage": "load", "short_side": 32, "multiple_of": 4}, seed=11), samples)


def _decompose(samples, final, **params):
    stage = build_stage({"stage": "decompose-incontext", "checkpoint": str(final), "steps": 2, **params}, seed=11)
    return run_stage(stage, samples)


def test_decompose_writes_candidates_with_lineage(logos, checkpoint):
    final, digest = checkpoint
    out = _decompose(_held(logos), final)
    assert [s.ok for s in out] == [True] * 3
    for sample in out:
        assert sample.kind == "candidate"
        assert sample.composite.shape == (32, 32, 3) and sample.foreground.shape == (32, 32, 4)
        assert sample.background.shape == (32, 32, 3) and set(np.unique(sample.mask)) == {0, 255}
        np.testing.assert_array_equal(sample.composite, sample.work["image"])  # the input is kept as C
        meta = sample.meta["generator"]
        assert meta["family"] == "incontext" and meta["steps"] == 2 and isinstance(meta["seed"], int)
        assert meta["checkpoint_hash"] == digest == ic.checkpoint_hash(final)
        error = ic.recomposition_error(sample.composite, sample.foreground, sample.background)
        assert meta["recomposition_error"] == pytest.approx(error, abs=1e-4) and error > 0
        assert json.loads(sample.to_wds()["json"])["kind"] == "candidate"  # writable to a shard
    assert not np.array_equal(out[0].background, out[1].background)


def test_output_does_not_depend_on_batch_mates_and_bad_inputs_fail(logos, checkpoint):
    final, _ = checkpoint
    together = {s.key: s for s in _decompose(_held(logos), final, batch_size=3)}
    alone = _decompose(_held(logos, keys={"logos_000001"}), final, batch_size=1)[0]
    np.testing.assert_array_equal(alone.foreground, together[alone.key].foreground)
    odd = _held(logos, keys={"logos_000002"})[0]
    odd.work["image"] = odd.work["image"][:30, :30]
    odd.object_mask = odd.object_mask[:30, :30]
    failed = _decompose([odd], final)[0]
    assert not failed.ok and failed.failure.error_type == "BadSize"
    with pytest.raises(FileNotFoundError, match="not an in-context LoRA"):
        build_stage({"stage": "decompose-incontext", "checkpoint": str(logos)}).ensure_setup()


def test_cycle_score_composes_the_decomposition_back(logos, checkpoint):
    final, _ = checkpoint
    plain = {s.key: s for s in _decompose(_held(logos), final)}
    cycled = _decompose(_held(logos), final, cycle=True)
    model = ic.InContextLoRA.tiny()  # only for the layout constants below
    for sample in cycled:
        # the decomposition itself is unchanged by scoring its cycle
        np.testing.assert_array_equal(sample.foreground, plain[sample.key].foreground)
        error = sample.meta["scores"]["cycle_error"]
        assert error == sample.meta["generator"]["cycle_error"] and error > 0
    # the score is what the model's compose direction gives for that layer and object, seeded per sample
    from layerloop.training.incontext_task import load_model

    lora = load_model(final, device=torch.device("cpu"), dtype=torch.float32)
    sample = cycled[0]
    seed = sample.meta["generator"]["seed"]
    recomposed = lora.compose(sample.foreground, sample.background, sample.mask, caption=sample.caption, steps=2,
                              seed=seed + 1)
    assert recomposed.shape == sample.composite.shape and recomposed.dtype == np.uint8
    expected = np.abs(recomposed.astype(np.float64) - sample.composite.astype(np.float64)).mean()
    assert sample.meta["scores"]["cycle_error"] == pytest.approx(expected, abs=1e-4)
    assert model.config.matte == lora.config.matte


def test_a_non_linear_input_is_kept_and_scored_for_consistency_only(logos, checkpoint):
    """A rendered (non-linear) composite: the candidate keeps it byte for byte, and its recomposition error
    is the predicted layers' consistency; for the true layers it is far from zero."""
    final, _ = checkpoint
    source = next(read_samples(sorted(str(p) for p in logos.glob("*.tar"))))
    small = lambda a, mode: np.asarray(Image.fromarray(a, mode).resize((32, 32), Image.NEAREST))  # noqa: E731
    layer, obj, mask = small(source.foreground, "RGBA"), small(source.background, "RGB"), small(source.mask, "L")
    lit = composite(layer, obj).astype(np.float64) * np.linspace(0.5, 1.2, 32)[None, :, None]  # shading
    image = np.clip(np.rint(lit), 0, 255).astype(np.uint8)
    held = LayeredSample(key="held_rendered", kind="rendered", composite=image, mask=mask, caption=source.caption,
                         background=obj, foreground=layer)
    held.validate()  # no alpha-blend invariant for this kind
    assert ic.recomposition_error(image, layer, obj) > 5
    out = _decompose([held], final)[0]
    assert out.ok and out.kind == "candidate"
    assert out.composite.tobytes() == image.tobytes()
    error = ic.recomposition_error(out.composite, out.foreground, out.background)
    assert out.meta["generator"]["recomposition_error"] == pytest.approx(error, abs=1e-4)
    assert json.loads(out.to_wds()["json"])["kind"] == "candidate"



def test_footprint_object_is_the_composite_with_the_layers_footprint_inpainted(logos, checkpoint):
    """``object: footprint``: the same layer as the panel decomposition, and the clean object is the
    composite with that layer's footprint (alpha > footprint_alpha) inpainted, every other pixel kept."""
    from layerloop.models.incontext_pipeline import FootprintRemoval

    final, _ = checkpoint
    panel = {s.key: s for s in _decompose(_held(logos), final)}
    # the random LoRA paints whole panels, its alpha 90-140/255 over most of them: 0.5 splits them
    out = _decompose(_held(logos), final, object="footprint", footprint_alpha=0.5, cycle=True)
    removal = FootprintRemoval(alpha=0.5)
    inpainted = 0
    for sample in out:
        assert sample.ok and sample.meta["generator"]["object"] == "footprint"
        np.testing.assert_array_equal(sample.foreground, panel[sample.key].foreground)
        np.testing.assert_array_equal(sample.background, removal(sample.composite, sample.foreground))
        hole = removal.footprint(sample.foreground) > 0
        assert 0 < hole.mean() < 1
        np.testing.assert_array_equal(sample.background[~hole], sample.composite[~hole])
        inpainted += int((sample.background != sample.composite).any(axis=-1).sum())
        error = ic.recomposition_error(sample.composite, sample.foreground, sample.background)
        assert sample.meta["generator"]["recomposition_error"] == pytest.approx(error, abs=1e-4)
        assert sample.meta["scores"]["cycle_error"] > 0
    assert inpainted > 0  # the random LoRA's layers have a footprint: something was inpainted
    assert all(s.meta["generator"]["object"] == "panel" for s in panel.values())
    with pytest.raises(ValueError, match="footprint_alpha"):
        build_stage({"stage": "decompose-incontext", "checkpoint": str(final), "footprint_alpha": 1.5})
