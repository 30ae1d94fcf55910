from typing import get_args

import numpy as np
import pytest

from layerloop.samples import LayeredSample
from layerloop.stages import run_stage, stage_class
from layerloop.stages import matting
from layerloop.stages.matting import BACKENDS, MattingBackend, MattingParams, MattingStage
from layerloop.stages.trimap import make_trimap


def soft_disc_scene(size: int = 72, seed: int = 0, radius: float = 0.28, soft: float = 3.0):
    """A reddish disc with a soft edge (known alpha) over a striped, noisy background.

    Returns (image uint8, alpha, foreground colours, object mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    r = np.hypot(yy - size / 2 + 0.3, xx - size / 2 - 0.2)
    alpha = np.clip((radius * size + soft / 2 - r) / soft, 0.0, 1.0)
    fg = np.empty((size, size, 3))
    fg[...] = (0.9, 0.25, 0.15)
    fg[..., 1] += 0.2 * yy / size  # a gentle gradient, so F is not a single constant
    bg = np.stack([0.2 + 0.6 * (np.sin(xx / 3) > 0), 0.3 + 0.4 * (np.sin(yy / 4) > 0), 0.6 + 0 * xx], -1)
    bg = np.clip(bg + rng.normal(0, 0.02, bg.shape), 0, 1)
    image = np.rint((alpha[..., None] * fg + (1 - alpha[..., None]) * bg) * 255).astype(np.uint8)
    mask = ((alpha > 0.5) * 255).astype(np.uint8)
    return image, alpha, fg, mask


def scene_sample(key: str = "s0", band_px: int = 3, **scene_kwargs) -> tuple[LayeredSample, np.ndarray, np.ndarray]:
    image, alpha, fg, mask = soft_disc_scene(**scene_kwargs)
    trimap, _ = make_trimap(mask, band_px)
    sample = LayeredSample(key=key, object_mask=mask, work={"image": image, "trimap": trimap})
    return sample, alpha, fg


def test_registered_and_params_list_every_backend():
    assert stage_class("matting") is MattingStage
    assert set(get_args(MattingParams.model_fields["backend"].annotation)) == set(BACKENDS)


@pytest.mark.parametrize("backend, max_mse", [("closed-form", 5e-4), ("knn", 3e-3), ("lkm", 5e-4)])
def test_recovers_known_alpha(backend, max_mse):
    sample, alpha, _ = scene_sample()
    [out] = run_stage(MattingStage(backend=backend), [sample])
    assert out.ok, out.failure
    got = out.work["alpha"]
    assert got.dtype == np.float32 and got.shape == alpha.shape
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert np.mean((got - alpha) ** 2) < max_mse
    assert out.meta["stages"]["matting"]["backend"] == backend


def test_lkm_works_on_crops_smaller_than_its_default_window():
    sample, alpha, _ = scene_sample(size=24, band_px=2)
    [out] = run_stage(MattingStage(backend="lkm"), [sample])
    assert out.ok, out.failure
    assert np.mean((out.work["alpha"] - alpha) ** 2) < 5e-3


def test_definite_regions_are_exact():
    sample, _, _ = scene_sample()
    trimap = sample.work["trimap"]
    [out] = run_stage(MattingStage(), [sample])
    alpha, fg_rgb = out.work["alpha"], out.work["fg_rgb"]
    assert (alpha[trimap == 255] == 1.0).all()
    assert (alpha[trimap == 0] == 0.0).all()
    # Where alpha is 1 the foreground is the pixel itself, so the composite reproduces the photo there.
    image = out.work["image"].astype(np.float32) / 255.0
    np.testing.assert_array_equal(fg_rgb[trimap == 255], image[trimap == 255])


def test_foreground_colours_have_no_halo():
    sample, alpha, fg = scene_sample()
    image = sample.work["image"].astype(np.float64) / 255.0
    [out] = run_stage(MattingStage(), [sample])
    fg_rgb = out.work["fg_rgb"]
    assert fg_rgb.dtype == np.float32 and fg_rgb.shape == fg.shape
    visible = alpha > 0.1
    assert np.abs(fg_rgb - fg)[visible].mean() < 0.03
    # In the soft edge the pixel is a mix with the background; the estimate must remove that mix.
    edge = (alpha > 0.1) & (alpha < 0.9)
    error_estimate = np.abs(fg_rgb - fg).max(-1)[edge].mean()
    error_naive = np.abs(image - fg).max(-1)[edge].mean()
    assert error_naive > 0.2  # the test scene really has a halo to remove
    assert error_estimate < 0.25 * error_naive


def test_crop_matches_full_image_solve():
    cropped, _, _ = scene_sample(key="a")
    full, _, _ = scene_sample(key="a")
    [cropped] = run_stage(MattingStage(crop=True), [cropped])
    [full] = run_stage(MattingStage(crop=False), [full])
    y0, y1, x0, x1 = cropped.meta["stages"]["matting"]["crop_box"]
    assert (y1 - y0) * (x1 - x0) < 0.7 * 72 * 72  # the crop really is smaller
    assert np.abs(cropped.work["alpha"] - full.work["alpha"]).max() < 0.02
    visible = cropped.work["alpha"] > 0.1
    assert np.abs(cropped.work["fg_rgb"] - full.work["fg_rgb"])[visible].mean() < 0.01


def test_downscaled_solve_stays_close_and_pins_definite_regions():
    sample, alpha, _ = scene_sample(size=96, band_px=4)
    trimap = sample.work["trimap"]
    [out] = run_stage(MattingStage(max_side=32), [sample])
    record = out.meta["stages"]["matting"]
    assert record["solve_scale"] < 1.0
    got = out.work["alpha"]
    assert np.mean((got - alpha) ** 2) < 3e-3
    assert (got[trimap == 255] == 1.0).all() and (got[trimap == 0] == 0.0).all()


def test_thin_object_is_solved_at_full_resolution_rather_than_losing_its_foreground():
    image, _, _, _ = soft_disc_scene(size=64)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 31:34] = 255
    trimap, _ = make_trimap(mask, 3)
    sample = LayeredSample(key="thin", object_mask=mask, work={"image": image, "trimap": trimap})
    [out] = run_stage(MattingStage(max_side=16), [sample])
    assert out.ok, out.failure
    assert out.meta["stages"]["matting"]["solve_scale"] == 1.0
    assert (out.work["alpha"][trimap == 255] == 1.0).all()


def test_trimap_without_unknown_pixels_is_the_matte():
    image, _, _, mask = soft_disc_scene()
    trimap = mask.copy()
    [out] = run_stage(MattingStage(), [LayeredSample(key="hard", work={"image": image, "trimap": trimap})])
    np.testing.assert_array_equal(out.work["alpha"], (trimap == 255).astype(np.float32))
    assert out.meta["stages"]["matting"]["solved"] is False


def test_bad_samples_fail_alone():
    good, alpha, _ = scene_sample(key="good")
    no_trimap, _, _ = scene_sample(key="notrimap")
    del no_trimap.work["trimap"]
    no_fg, _, _ = scene_sample(key="nofg")
    no_fg.work["trimap"] = np.where(no_fg.work["trimap"] == 255, 128, no_fg.work["trimap"]).astype(np.uint8)
    out = run_stage(MattingStage(), [no_trimap, good, no_fg])
    assert [s.key for s in out] == ["notrimap", "good", "nofg"]
    assert out[0].failure.stage == "matting" and "trimap" in out[0].failure.message
    assert out[2].failure.error_type == "ValueError" and "foreground" in out[2].failure.message
    assert out[1].ok and np.mean((out[1].work["alpha"] - alpha) ** 2) < 5e-4


def test_deterministic_and_independent_of_batch_composition():
    alone, _, _ = scene_sample(key="x")
    [alone] = run_stage(MattingStage(seed=0), [alone])
    batch = [scene_sample(key=f"o{i}", seed=i + 1)[0] for i in range(2)]
    again, _, _ = scene_sample(key="x")
    out = run_stage(MattingStage(seed=0, batch_size=3), [batch[0], again, batch[1]])
    np.testing.assert_array_equal(alone.work["alpha"], out[1].work["alpha"])
    np.testing.assert_array_equal(alone.work["fg_rgb"], out[1].work["fg_rgb"])


def test_a_batched_model_backend_plugs_in(monkeypatch):
    """What a ViTMatte entry looks like: load once in setup(), one call per batch with lists."""
    calls = {"load": 0, "batches": []}

    def load(params, device):
        calls["load"] += 1
        assert device == "cpu" and params.backend == "closed-form"

        def predict(images, trimaps):
            calls["batches"].append(len(images))
            return [matting._closed_form(image, trimap) for image, trimap in zip(images, trimaps)]

        return predict

    monkeypatch.setitem(BACKENDS, "closed-form", MattingBackend(load=load, batched=True))
    stage = MattingStage(batch_size=2)
    assert stage.needs_actor
    samples = [scene_sample(key=f"k{i}", seed=i)[0] for i in range(3)]
    out = run_stage(stage, samples)
    assert calls["load"] == 1 and calls["batches"] == [2, 1]
    monkeypatch.undo()
    reference = run_stage(MattingStage(), [scene_sample(key="k0", seed=0)[0]])[0]
    assert not MattingStage().needs_actor
    np.testing.assert_allclose(out[0].work["alpha"], reference.work["alpha"], atol=1e-6)


def test_a_failing_batched_backend_only_fails_the_culprit(monkeypatch):
    def load(params, device):
        def predict(images, trimaps):
            if any(image.shape[0] > 40 for image in images):  # the big sample breaks the "model"
                raise RuntimeError("out of memory")
            return [matting._closed_form(image, trimap) for image, trimap in zip(images, trimaps)]

        return predict

    monkeypatch.setitem(BACKENDS, "closed-form", MattingBackend(load=load, batched=True))
    small = scene_sample(key="small", size=48)[0]
    big = scene_sample(key="big", size=96)[0]
    no_fg = scene_sample(key="nofg", size=48)[0]
    no_fg.work["trimap"] = np.where(no_fg.work["trimap"] == 255, 128, no_fg.work["trimap"]).astype(np.uint8)
    out = run_stage(MattingStage(batch_size=3), [small, big, no_fg])
    assert out[0].ok and "alpha" in out[0].work
    assert out[1].failure.error_type == "RuntimeError"
    # The sample that failed before the batch call keeps its own reason through run_stage's retry.
    assert "foreground" in out[2].failure.message


def test_backend_needs_exactly_one_of_solve_or_load():
    with pytest.raises(ValueError):
        MattingBackend()
    with pytest.raises(ValueError):
        MattingBackend(solve=matting._closed_form, load=lambda params, device: matting._closed_form)


def test_rcm_preconditioner_solves_the_same_system_and_is_recorded_only_when_chosen(monkeypatch):
    # The reverse Cuthill-McKee order only renumbers the unknowns before the incomplete Cholesky: the CG solve
    # converges to the same alphas (to its tolerance), and it really is the preconditioner that was used.
    calls = []
    real = matting._ichol_rcm
    monkeypatch.setattr(matting, "_ichol_rcm", lambda m: calls.append(m.shape) or real(m))
    default, rcm = scene_sample(size=96, seed=3, band_px=5)[0], scene_sample(size=96, seed=3, band_px=5)[0]
    [default] = run_stage(MattingStage(backend="closed-form"), [default])
    [rcm] = run_stage(MattingStage(backend="closed-form", preconditioner="ichol-rcm"), [rcm])
    assert default.ok and rcm.ok, (default.failure, rcm.failure)
    assert len(calls) == 1 and calls[0][0] == calls[0][1] > 0
    assert np.abs(default.work["alpha"] - rcm.work["alpha"]).max() < 1e-4
    assert "preconditioner" not in default.meta["stages"]["matting"]  # the default keeps the historical bytes
    assert rcm.meta["stages"]["matting"]["preconditioner"] == "ichol-rcm"


def test_other_backends_ignore_the_preconditioner_and_do_not_record_it():
    # the demo chooses ichol-rcm; overriding its backend (matting.backend=lkm / vitmatte) must just work
    sample = scene_sample()[0]
    [out] = run_stage(MattingStage(backend="lkm", preconditioner="ichol-rcm"), [sample])
    assert out.ok, out.failure
    assert "preconditioner" not in out.meta["stages"]["matting"]
