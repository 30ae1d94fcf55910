"""The shadow stage on a synthetic disc standing on the ground (96-128 px)."""

import time

import numpy as np
import pytest
from pydantic import ValidationError

from layerloop.samples import LayeredSample
from layerloop.stages import run_stage, stage_class
from layerloop.stages.shadows import ShadowAugmentation, ShadowDraw, render_shadow

SIZE = 96
RADIUS = 16
CENTRE = (52, 48)  # (row, col): contact row = 68, top = 36


def disc_sample(key="disc_0", size=SIZE, centre=CENTRE, radius=RADIUS):
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    mask = inside.astype(np.uint8) * 255
    alpha = inside.astype(np.float32)
    fg = np.zeros((size, size, 3), np.float32)
    fg[inside] = (0.9, 0.3, 0.2)
    return LayeredSample(key=key, object_mask=mask, work={"alpha": alpha, "fg_rgb": fg})


def shade(key="disc_0", seed=0, sample=None, **params):
    sample = sample if sample is not None else disc_sample(key)
    return ShadowAugmentation(seed=seed, **params).process_sample(sample)


def rows_with_shadow(shadow, level=0.02):
    return np.flatnonzero((shadow > level).any(axis=1))


def test_registered_under_its_name():
    assert stage_class("shadow") is ShadowAugmentation


def test_forward_shadow_lies_on_the_ground_below_the_contact_line():
    contact = CENTRE[0] + RADIUS
    for key in ("a", "b", "c"):
        sample = shade(key, azimuth_deg=(265.0, 275.0), contact_shadow=False)
        shadow = sample.work["shadow_alpha"]
        rows = rows_with_shadow(shadow)
        assert rows.size > 0
        # Nothing above the contact line (a pixel of bilinear/anti-alias slack), so never above the top.
        assert rows.min() >= contact - 2
        assert shadow[contact + 1 :].sum() > 0.95 * shadow.sum()


def test_back_shadow_recedes_up_the_image_from_the_contact_line():
    contact = CENTRE[0] + RADIUS
    sample = shade("a", azimuth_deg=(88.0, 92.0), elevation_deg=(30.0, 30.0), contact_shadow=False)
    shadow = sample.work["shadow_alpha"]
    rows = rows_with_shadow(shadow)
    assert rows.max() <= contact + 2
    assert rows.min() < contact - 8  # it really extends behind the object


def test_azimuth_sets_the_side_the_shadow_falls_to():
    right = shade("a", azimuth_deg=(0.0, 5.0), contact_shadow=False).work["shadow_alpha"]
    left = shade("a", azimuth_deg=(175.0, 180.0), contact_shadow=False).work["shadow_alpha"]
    cols = np.arange(SIZE)
    assert (right.sum(axis=0) * cols).sum() / right.sum() > CENTRE[1] + 5
    assert (left.sum(axis=0) * cols).sum() / left.sum() < CENTRE[1] - 5


def test_contact_shadow_sits_under_the_base():
    contact = CENTRE[0] + RADIUS
    # Light almost overhead and a hard, faint cast shadow: what remains below the base is the contact shadow.
    sample = shade("a", opacity=(0.0, 0.0), contact_opacity=(0.8, 0.8), elevation_deg=(89.0, 89.0))
    shadow = sample.work["shadow_alpha"]
    assert shadow[contact + 1, CENTRE[1]] > 0.3
    assert shadow[contact + 1, 2] == 0.0 and shadow[:contact - 10].max() == 0.0


def test_never_lowers_object_alpha_and_keeps_object_colour():
    for key in ("a", "b", "c", "d"):
        original = disc_sample(key)
        alpha0, fg0 = original.work["alpha"].copy(), original.work["fg_rgb"].copy()
        sample = shade(sample=original, azimuth_deg=(0.0, 360.0))
        alpha1, fg1 = sample.work["alpha"], sample.work["fg_rgb"]
        assert (alpha1 >= alpha0).all()
        assert alpha1.dtype == np.float32 and alpha1.max() <= 1.0
        assert np.allclose(fg1[alpha0 == 1.0], fg0[alpha0 == 1.0])


def test_shadow_lives_in_alpha_with_the_recorded_dark_colour():
    sample = shade("a", azimuth_deg=(265.0, 275.0))
    record = sample.meta["stages"]["shadow"]
    shadow, alpha, fg = sample.work["shadow_alpha"], sample.work["alpha"], sample.work["fg_rgb"]
    outside = (sample.object_mask == 0) & (shadow > 0.05)
    assert outside.any()
    assert np.allclose(alpha[outside], shadow[outside], atol=1e-6)
    assert np.allclose(fg[outside], np.asarray(record["shadow_rgb"], np.float32), atol=1e-5)
    assert max(record["shadow_rgb"]) <= 0.08 + 0.02  # near black: grey range plus tint


def test_deterministic_per_key_and_different_across_keys_and_seeds():
    first, again = shade("k1"), shade("k1")
    assert np.array_equal(first.work["shadow_alpha"], again.work["shadow_alpha"])
    assert np.array_equal(first.work["fg_rgb"], again.work["fg_rgb"])
    assert first.meta == again.meta
    other_key, other_seed = shade("k2"), shade("k1", seed=1)
    for other in (other_key, other_seed):
        assert other.meta["stages"]["shadow"]["azimuth_deg"] != first.meta["stages"]["shadow"]["azimuth_deg"]
        assert not np.array_equal(other.work["shadow_alpha"], first.work["shadow_alpha"])


def test_parameters_recorded_and_enough_to_rebuild_the_shadow():
    stage = ShadowAugmentation(softness=0.2, fade=0.3)
    sample = stage.process_sample(disc_sample("k3"))
    record = sample.meta["stages"]["shadow"]
    assert record["backend"] == "geometric" and record["applied"] is True
    assert record["config"]["softness"] == 0.2
    for name in ("opacity", "azimuth_deg", "elevation_deg", "foreshortening", "shadow_rgb", "contact_opacity",
                 "contact_row", "shear", "squash", "blur_far_px"):
        assert name in record
    draw = ShadowDraw(**{k: record[k] for k in ShadowDraw.__dataclass_fields__})
    fresh = disc_sample("k3")
    rebuilt, _ = render_shadow(fresh.work["alpha"], fresh.object_mask > 127, draw,
                               softness=record["config"]["softness"], fade=record["config"]["fade"])
    assert np.array_equal(rebuilt, sample.work["shadow_alpha"])


def test_probability_zero_leaves_the_sample_unchanged():
    original = disc_sample("k4")
    alpha0, fg0 = original.work["alpha"].copy(), original.work["fg_rgb"].copy()
    sample = shade(sample=original, probability=0.0)
    assert np.array_equal(sample.work["alpha"], alpha0)
    assert np.array_equal(sample.work["fg_rgb"], fg0)
    assert not sample.work["shadow_alpha"].any()
    assert sample.meta["stages"]["shadow"]["applied"] is False


def test_probability_splits_samples_and_keeps_the_shadow_of_those_that_get_one():
    applied = [shade(f"p{i}", probability=0.5).meta["stages"]["shadow"]["applied"] for i in range(40)]
    assert 5 < sum(applied) < 35
    key = f"p{applied.index(True)}"
    # The coin comes first: the same key draws the same shadow whatever the probability.
    assert shade(key, probability=0.5).meta["stages"]["shadow"]["azimuth_deg"] == \
        shade(key, probability=1.0).meta["stages"]["shadow"]["azimuth_deg"]


def test_opacity_range_respected():
    for key in ("a", "b", "c"):
        sample = shade(key, opacity=(0.2, 0.3), contact_shadow=False)
        record = sample.meta["stages"]["shadow"]
        assert 0.2 <= record["opacity"] <= 0.3 and record["contact_opacity"] == 0.0
        shadow = sample.work["shadow_alpha"]
        assert shadow.max() <= record["opacity"] + 1e-6
        assert shadow.max() >= 0.5 * record["opacity"]  # the cast shadow is really there
    with_contact = shade("a", opacity=(0.2, 0.3), contact_opacity=(0.5, 0.6))
    record = with_contact.meta["stages"]["shadow"]
    bound = 1 - (1 - record["opacity"]) * (1 - record["contact_opacity"])
    assert 0.5 <= record["contact_opacity"] <= 0.6
    assert with_contact.work["shadow_alpha"].max() <= bound + 1e-6


def test_shadow_is_clipped_to_the_image():
    # Object standing on the bottom edge with a forward shadow, and one at the right edge casting right.
    bottom = shade(sample=disc_sample("e1", centre=(SIZE - 1 - RADIUS, 48)), azimuth_deg=(265.0, 275.0))
    right = shade(sample=disc_sample("e2", centre=(52, SIZE - RADIUS - 2)), azimuth_deg=(0.0, 2.0),
                  elevation_deg=(20.0, 20.0))
    for sample in (bottom, right):
        shadow = sample.work["shadow_alpha"]
        assert shadow.shape == (SIZE, SIZE) and 0.0 <= shadow.min() and shadow.max() <= 1.0
        assert sample.work["alpha"].shape == (SIZE, SIZE)
    assert right.work["shadow_alpha"][:, -1].max() > 0.05  # runs out of frame, not faded at the border


def test_failures_are_clear_and_per_sample():
    empty = disc_sample("bad_1")
    empty.object_mask[:] = 0
    no_alpha = disc_sample("bad_2")
    del no_alpha.work["alpha"]
    good = disc_sample("good")
    out = run_stage(ShadowAugmentation(), [empty, no_alpha, good])
    assert out[0].failure.error_type == "ValueError" and "empty" in out[0].failure.message
    assert out[1].failure.error_type == "KeyError" and "alpha" in out[1].failure.message
    assert out[2].ok and out[2].work["shadow_alpha"].any()


def test_params_are_validated():
    with pytest.raises(ValidationError):
        ShadowAugmentation(opacity=(0.8, 0.2))
    with pytest.raises(ValidationError):
        ShadowAugmentation(elevation_deg=(0.0, 30.0))
    with pytest.raises(ValidationError):
        ShadowAugmentation(shadow_colour=(0, 0, 0))


def test_fast_enough_at_512_px():
    sample = disc_sample("speed", size=512, centre=(300, 256), radius=120)
    stage = ShadowAugmentation(elevation_deg=(30.0, 30.0))
    timings = []
    for _ in range(5):
        fresh = LayeredSample(key="speed", object_mask=sample.object_mask,
                              work={"alpha": sample.work["alpha"], "fg_rgb": sample.work["fg_rgb"]})
        start = time.perf_counter()
        stage.process_sample(fresh)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.05
