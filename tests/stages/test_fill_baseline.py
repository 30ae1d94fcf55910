"""The fill-baseline stage (Flux-Fill fills the box with the caption) on the tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import layerloop.stages.fill_baseline  # noqa: F401  (registers fill-baseline)
from layerloop.models.flux_fill import DEFAULT_ID
from layerloop.samples import LayeredSample
from layerloop.stages import build_stage, run_stage
from layerloop.stages.registry import STAGE_MODULES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny pipeline is latency-bound; torch's thread pool only slows it on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _samples(count=3, size=(32, 48), in_work=True):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        background = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[4 + i:20, 8:28 + i] = 255
        sample = LayeredSample(key=f"s_{i}", mask=mask, caption=f"a red box {i}")
        if in_work:
            sample.work["gt_background"] = background
        else:
            sample.background = background
        samples.append(sample)
    return samples


def _run(samples, **params):
    return run_stage(build_stage({"stage": "fill-baseline", "model": "tiny", "steps": 2, **params}, seed=11), samples)


def test_fills_the_box_and_writes_candidates():
    inputs = _samples()
    backgrounds = [s.work["gt_background"].copy() for s in inputs]
    out = _run(inputs)
    assert [s.ok for s in out] == [True] * 3
    for sample, background in zip(out, backgrounds):
        outside = sample.mask == 0
        assert sample.kind == "candidate"
        np.testing.assert_array_equal(sample.background, background)
        np.testing.assert_array_equal(sample.composite[outside], background[outside])
        assert np.abs(sample.composite.astype(int) - background)[~outside].mean() > 1
        assert sample.foreground.shape == (32, 48, 4) and not sample.foreground.any()  # no layer
        assert sample.meta["generator"] == {"family": "flux-fill", "model": "tiny", "steps": 2,
                                            "seed": sample.meta["generator"]["seed"], "guidance": 30.0,
                                            "layer": False}
        assert isinstance(sample.meta["generator"]["seed"], int)
        assert sample.meta["stages"]["fill-baseline"]["backend"] == "flux-fill"
        sample.validate()
        assert json.loads(sample.to_wds()["json"])["kind"] == "candidate"  # writable to a shard
    assert len({s.meta["generator"]["seed"] for s in out}) == 3


def test_background_field_is_used_without_gt_background():
    sample = _samples(1, in_work=False)[0]
    background = sample.background.copy()
    out = _run([sample])[0]
    assert out.ok
    np.testing.assert_array_equal(out.composite[out.mask == 0], background[out.mask == 0])


def test_output_does_not_depend_on_batch_mates():
    together = {s.key: s for s in _run(_samples(), batch_size=3)}
    alone = _run(_samples()[1:2], batch_size=1)[0]
    np.testing.assert_array_equal(alone.composite, together[alone.key].composite)
    assert alone.meta["generator"]["seed"] == together[alone.key].meta["generator"]["seed"]
    again = _run(_samples()[1:2])[0]
    np.testing.assert_array_equal(again.composite, alone.composite)


def test_bad_inputs_are_recorded_failures():
    no_mask = LayeredSample(key="nomask", caption="x")
    no_mask.work["gt_background"] = np.zeros((32, 32, 3), np.uint8)
    no_background = LayeredSample(key="nobg", caption="x", mask=np.full((32, 32), 255, np.uint8))
    odd = LayeredSample(key="odd", caption="x", mask=np.full((18, 18), 255, np.uint8))
    odd.work["gt_background"] = np.zeros((18, 18, 3), np.uint8)
    mismatched = LayeredSample(key="mismatch", caption="x", mask=np.full((16, 16), 255, np.uint8))
    mismatched.work["gt_background"] = np.zeros((32, 32, 3), np.uint8)
    empty = LayeredSample(key="empty", caption="x", mask=np.zeros((32, 32), np.uint8))
    empty.work["gt_background"] = np.zeros((32, 32, 3), np.uint8)
    good = _samples(1)[0]
    out = _run([no_mask, no_background, odd, mismatched, empty, good])
    assert [s.failure.error_type if s.failure else None for s in out] == [
        "MissingInput", "MissingInput", "BadSize", "BadSize", "EmptyMask", None]
    assert out[0].failure.stage == "fill-baseline" and "box-mask" in out[0].failure.message
    assert "multiple of 4" in out[2].failure.message


def test_models_for_preflight():
    assert "layerloop.stages.fill_baseline" in STAGE_MODULES
    assert build_stage({"stage": "fill-baseline", "model": "tiny:3"}).models() == []
    (ref,) = build_stage({"stage": "fill-baseline", "revision": "abc"}).models()
    assert ref.model == DEFAULT_ID and ref.revision == "abc" and ref.stage == "fill-baseline"
    assert "transformer/*" in ref.allow_patterns and "tokenizer_2/*" in ref.allow_patterns
    assert not any(pattern.endswith(".safetensors") for pattern in ref.allow_patterns)  # no single-file checkpoint


def test_missing_model_offline_fails_setup(monkeypatch, tmp_path):
    from layerloop.models.hub import ModelNotAvailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    stage = build_stage({"stage": "fill-baseline"})
    with pytest.raises(ModelNotAvailable, match=DEFAULT_ID):
        stage.setup()
