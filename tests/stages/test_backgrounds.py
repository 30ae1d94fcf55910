from typing import get_args

import numpy as np
import pytest

from layerloop.samples import LayeredSample
from layerloop.stages import build_stage, run_stage, stage_class
from layerloop.stages.backgrounds import (BACKENDS, MISSING_GT, BackgroundBackend, BackgroundParams, BackgroundStage,
                                          hole_mask)


def scene(size: int = 64, seed: int = 0, with_gt: bool = True, key: str = "s0") -> tuple[LayeredSample, np.ndarray]:
    """A smooth gradient background (easy to inpaint) with a magenta square object on it; returns the
    sample and the true background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    background = np.stack([60 + 100 * xx / size, 90 + 60 * yy / size, 120 + 0 * xx], -1)
    background = np.clip(background + rng.normal(0, 1.0, background.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 3: size // 3 + size // 4, size // 3: size // 3 + size // 4] = 255
    image = background.copy()
    image[mask > 0] = (250, 20, 200)
    work = {"image": image}
    if with_gt:
        work["gt_background"] = background
    return LayeredSample(key=key, object_mask=mask, work=work), background


def test_registered_and_params_list_every_backend():
    assert stage_class("background") is BackgroundStage
    assert set(get_args(BackgroundParams.model_fields["backend"].annotation)) == set(BACKENDS) | {"auto"}
    assert isinstance(build_stage({"stage": "background", "backend": "opencv", "method": "ns"}), BackgroundStage)


def test_gt_copies_the_ground_truth():
    sample, truth = scene()
    [out] = run_stage(BackgroundStage(backend="gt"), [sample])
    assert out.ok
    np.testing.assert_array_equal(out.background, truth)
    assert out.meta["stages"]["background"]["backend"] == "gt"


def test_missing_gt_is_a_recorded_failure_and_others_are_fine():
    samples = [scene(key="a")[0], scene(key="b", with_gt=False)[0], scene(key="c")[0]]
    out = run_stage(BackgroundStage(backend="gt"), samples)
    assert out[0].ok and out[2].ok
    assert out[1].failure.stage == "background"
    assert out[1].failure.message == MISSING_GT
    assert out[1].background is None


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_opencv_removes_the_object(method):
    sample, truth = scene(with_gt=False)
    image = sample.work["image"].copy()
    truth = truth.astype(np.int16)
    [out] = run_stage(BackgroundStage(backend="opencv", method=method, radius=3), [sample])
    assert out.ok
    background = out.background
    assert background.dtype == np.uint8 and background.shape == image.shape
    hole = sample.object_mask > 0
    # The magenta object is gone: the hole now looks like the background around it.
    assert np.abs(background.astype(np.int16) - truth)[hole].mean() < 12
    assert np.abs(image.astype(np.int16) - truth)[hole].mean() > 100
    # Far from the dilated hole the photo is untouched.
    far = hole_mask(sample.object_mask, 6) == 0
    np.testing.assert_array_equal(background[far], image[far])
    record = out.meta["stages"]["background"]
    assert record["backend"] == "opencv" and record["method"] == method and record["radius"] == 3


def test_dilation_covers_a_fringe_the_mask_misses():
    sample, truth = scene(with_gt=False)
    truth = truth.astype(np.int16)
    # A one-pixel magenta fringe just outside the mask, as left by a slightly tight segmentation.
    fringe = (hole_mask(sample.object_mask, 1) > 0) & (sample.object_mask == 0)
    sample.work["image"][fringe] = (250, 20, 200)
    [out] = run_stage(BackgroundStage(backend="opencv", dilate=0.05), [sample])
    assert np.abs(out.background.astype(np.int16) - truth)[fringe].mean() < 12
    # Without dilation the fringe pixels are not in the hole, so they stay magenta.
    tight_sample, _ = scene(with_gt=False)
    tight_sample.work["image"][fringe] = (250, 20, 200)
    [tight] = run_stage(BackgroundStage(backend="opencv", dilate=0.0), [tight_sample])
    assert np.abs(tight.background.astype(np.int16) - truth)[fringe].mean() > 100


def test_auto_uses_gt_when_present_else_opencv():
    (with_gt, truth), (without, _) = scene(key="g"), scene(key="n", with_gt=False)
    out = run_stage(BackgroundStage(backend="auto"), [with_gt, without])
    assert all(s.ok for s in out)
    np.testing.assert_array_equal(out[0].background, truth)
    assert out[0].meta["stages"]["background"]["backend"] == "gt"
    assert out[1].meta["stages"]["background"]["backend"] == "opencv"
    assert out[1].meta["stages"]["background"]["requested_backend"] == "auto"
    assert not np.array_equal(out[1].background, out[1].work["image"])


def test_gt_of_the_wrong_size_fails_clearly():
    sample, _ = scene()
    sample.work["gt_background"] = sample.work["gt_background"][:32]
    [out] = run_stage(BackgroundStage(backend="gt"), [sample])
    assert out.failure.error_type == "ValueError" and "gt_background" in out.failure.message


def test_opencv_without_a_mask_fails_clearly():
    sample, _ = scene(with_gt=False)
    sample.object_mask = None
    [out] = run_stage(BackgroundStage(backend="opencv"), [sample])
    assert "object_mask" in out.failure.message


def test_deterministic():
    first = run_stage(BackgroundStage(backend="opencv", seed=0), [scene(with_gt=False)[0]])[0].background
    second = run_stage(BackgroundStage(backend="opencv", seed=0), [scene(with_gt=False)[0]])[0].background
    np.testing.assert_array_equal(first, second)


def test_a_batched_model_backend_plugs_in(monkeypatch):
    """What an ObjectClear / diffusers entry looks like: load once in setup(), lists per batch."""
    calls = {"load": 0, "batches": []}

    def load(params, device):
        calls["load"] += 1

        def remove(images, holes, seeds):
            assert len(seeds) == len(images)  # one seed per sample, from the sample's own rng
            calls["batches"].append(len(images))
            return [np.where(hole[..., None] > 0, 7, image).astype(np.uint8) for image, hole in zip(images, holes)]

        return remove

    monkeypatch.setitem(BACKENDS, "opencv", BackgroundBackend(load=load, batched=True))
    stage = BackgroundStage(backend="auto", batch_size=3)
    assert stage.needs_actor
    (a, _), (b, truth_b), (c, _) = scene(key="a", with_gt=False), scene(key="b"), scene(key="c", with_gt=False)
    out = run_stage(stage, [a, b, c])
    assert calls == {"load": 1, "batches": [2]}
    assert (out[0].background[out[0].object_mask > 0] == 7).all()
    np.testing.assert_array_equal(out[1].background, truth_b)
    monkeypatch.undo()
    assert not BackgroundStage(backend="opencv").needs_actor
