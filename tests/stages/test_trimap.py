import numpy as np
import pytest

from layerloop.samples import LayeredSample
from layerloop.stages import build_stage, run_stage, stage_class
from layerloop.stages.trimap import TrimapStage, band_width, make_trimap


def disc_mask(size: int = 80, radius: float = 20.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((np.hypot(yy - size / 2, xx - size / 2) <= radius) * 255).astype(np.uint8)


def sample_with(mask: np.ndarray, key: str = "s0") -> LayeredSample:
    return LayeredSample(key=key, object_mask=mask)


def test_registered_under_its_name():
    assert stage_class("trimap") is TrimapStage
    assert isinstance(build_stage({"stage": "trimap", "band": 0.05}), TrimapStage)


def test_values_and_band_width_on_a_disc():
    mask = disc_mask(80, 20.0)
    stage = TrimapStage(band=0.05, min_band_px=1)  # 0.05 * 80 = 4 px each side
    [out] = run_stage(stage, [sample_with(mask)])
    assert out.ok
    trimap = out.work["trimap"]
    assert trimap.dtype == np.uint8 and trimap.shape == mask.shape
    assert set(np.unique(trimap)) == {0, 128, 255}

    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    # Foreground ends about 4 px inside the edge, the band about 4 px outside (disc kernel: isotropic).
    assert (trimap[r <= 20 - 4 - 1.5] == 255).all()
    assert (trimap[(r > 20 - 4 + 1.5) & (r <= 20 + 4 - 1.5)] == 128).all()
    assert (trimap[r > 20 + 4 + 1.5] == 0).all()
    # The object's edge itself is always unknown.
    assert (trimap[np.abs(r - 20) <= 1] == 128).all()
    assert out.meta["stages"]["trimap"] == {"backend": "morphology", "band": 0.05, "min_band_px": 1,
                                            "band_px": 4, "inner_band_px": 4}


def test_band_scales_with_the_shorter_side_and_has_a_floor():
    assert band_width((1000, 500), 0.02, 3) == 10
    assert band_width((500, 1000, 3), 0.02, 3) == 10
    assert band_width((64, 64), 0.02, 3) == 3  # 1.28 px rounds to 1; the floor wins


def test_wider_band_means_more_unknown():
    mask = disc_mask(80, 20.0)
    narrow, _ = make_trimap(mask, 2)
    wide, _ = make_trimap(mask, 6)
    assert (wide == 128).sum() > (narrow == 128).sum()
    assert ((narrow == 128) <= (wide == 128)).all()  # the wide band contains the narrow one


def test_thin_object_keeps_definite_foreground():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:54, 30:33] = 255  # a 3 px wide stick: a 5 px erosion would erase it
    [out] = run_stage(TrimapStage(band=0.08, min_band_px=3), [sample_with(mask)])
    assert out.ok
    trimap = out.work["trimap"]
    assert (trimap == 255).any()
    assert ((trimap == 255) <= (mask == 255)).all()  # foreground never leaves the mask
    record = out.meta["stages"]["trimap"]
    assert record["band_px"] == 5 and record["inner_band_px"] < record["band_px"]
    # The outer half of the band keeps its full width.
    assert (trimap[30, 33:38] == 128).all() and trimap[30, 39] == 0


def test_one_pixel_object_is_its_own_foreground():
    mask = np.zeros((48, 48), np.uint8)
    mask[20, 20] = 255
    trimap, inner = make_trimap(mask, 3)
    assert inner == 0 and trimap[20, 20] == 255 and (trimap == 255).sum() == 1


def test_empty_or_missing_mask_is_a_recorded_failure():
    good = sample_with(disc_mask(), "good")
    empty = sample_with(np.zeros((48, 48), np.uint8), "empty")
    missing = LayeredSample(key="missing")
    out = run_stage(TrimapStage(), [good, empty, missing])
    assert out[0].ok and "trimap" in out[0].work
    assert out[1].failure.stage == "trimap" and "empty" in out[1].failure.message
    assert out[2].failure.error_type == "ValueError" and "object_mask" in out[2].failure.message


def test_deterministic():
    mask = disc_mask(72, 15.0)
    first = run_stage(TrimapStage(seed=1), [sample_with(mask.copy())])[0].work["trimap"]
    second = run_stage(TrimapStage(seed=2), [sample_with(mask.copy())])[0].work["trimap"]
    np.testing.assert_array_equal(first, second)


def test_unknown_param_is_rejected():
    with pytest.raises(ValueError):
        TrimapStage(bandwidth=3)


def test_the_cropped_morphology_equals_the_whole_image_one():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(40):  # blobs of a few discs, anywhere, also touching or crossing the image's edges
        h, w = rng.integers(24, 90, size=2)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(-5, h + 5), rng.integers(-5, w + 5)
            r = rng.uniform(0.5, 18)
            yy, xx = np.mgrid[:h, :w]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
        masks.append(mask)
    full = np.full((30, 40), 255, np.uint8)
    masks += [full, np.pad(np.full((3, 50), 255, np.uint8), ((10, 10), (0, 0)))]
    tested = 0
    for mask in masks:
        if not mask.any():
            continue
        for band_px in (0, 1, 3, 7, 12):
            trimap, inner = make_trimap(mask, band_px)
            expected, expected_inner = make_trimap(mask, band_px, crop=False)
            assert inner == expected_inner
            np.testing.assert_array_equal(trimap, expected)
            tested += 1
    assert tested >= 150
