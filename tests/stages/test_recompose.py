"""The recompose stage: quantised F, C from the quantised layers, quadruple invariant."""

import numpy as np

from layerloop.samples import LayeredSample, composite_error
from layerloop.stages import run_stage, stage_class
from layerloop.stages.recompose import Recompose, quantise_foreground
from layerloop.stages.shadows import ShadowAugmentation

SIZE = 64


def float_sample(key="r_0", seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    alpha = rng.random((size, size)).astype(np.float32)
    alpha[: size // 4] = 0.0  # fully transparent rows
    alpha[size // 4 : size // 2, : size // 2] = 1.0
    alpha[0, 0] = 0.0015  # quantises to 0: its RGB must be cleared too
    fg = rng.random((size, size, 3)).astype(np.float32)
    background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 :, :] = 255
    return LayeredSample(key=key, background=background, object_mask=mask.copy(), mask=mask,
                         work={"alpha": alpha, "fg_rgb": fg})


def test_registered_under_its_name():
    assert stage_class("recompose") is Recompose


def test_invariant_is_exact_and_sample_validates():
    for seed in range(3):
        sample = Recompose().process_sample(float_sample(f"r_{seed}", seed))
        assert sample.kind == "quadruple"
        assert sample.foreground.dtype == np.uint8 and sample.foreground.shape == (SIZE, SIZE, 4)
        assert composite_error(sample.composite, sample.foreground, sample.background) == 0
        sample.validate()
        assert sample.meta["stages"]["recompose"]["backend"] == "numpy"


def test_quantisation_rounds_and_clears_rgb_where_alpha_is_zero():
    source = float_sample()
    alpha, fg = source.work["alpha"].copy(), source.work["fg_rgb"].copy()
    sample = Recompose().process_sample(source)
    rgba = sample.foreground
    assert np.array_equal(rgba[..., 3], np.rint(alpha * 255).astype(np.uint8))
    transparent = rgba[..., 3] == 0
    assert transparent[0, 0] and transparent[: SIZE // 4].all()
    assert not rgba[transparent][:, :3].any()  # no stale colour (halo) under zero alpha
    visible = ~transparent
    assert np.array_equal(rgba[visible][:, :3], np.rint(fg[visible] * 255).astype(np.uint8))
    # Fully transparent: C is B; fully opaque: C is F.
    assert np.array_equal(sample.composite[transparent], sample.background[transparent])
    opaque = rgba[..., 3] == 255
    assert np.array_equal(sample.composite[opaque], rgba[opaque][:, :3])


def test_out_of_range_float_colours_are_clipped():
    rgba = quantise_foreground(np.full((2, 2, 3), 1.7, np.float32), np.array([[1.2, 0.5], [-0.1, 0.0]], np.float32))
    assert rgba[0, 0].tolist() == [255, 255, 255, 255]
    assert rgba[0, 1].tolist() == [255, 255, 255, 128]
    assert rgba[1, 0].tolist() == [0, 0, 0, 0]


def test_after_a_shadow_the_invariant_still_holds_and_object_mask_is_kept():
    sample = float_sample("sh_1")
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - 30) ** 2 + (xx - 32) ** 2 <= 100
    sample.object_mask = disc.astype(np.uint8) * 255
    sample.work["alpha"] = disc.astype(np.float32)
    object_mask = sample.object_mask.copy()
    sample = Recompose().process_sample(ShadowAugmentation(azimuth_deg=(260.0, 280.0)).process_sample(sample))
    assert composite_error(sample.composite, sample.foreground, sample.background) == 0
    assert np.array_equal(sample.object_mask, object_mask)
    below = sample.foreground[45, 32]
    assert 0 < below[3] < 255 and below[:3].max() < 40  # the shadow: partial alpha, dark colour
    sample.validate()
    assert LayeredSample.from_wds(sample.to_wds()).foreground.tolist() == sample.foreground.tolist()


def test_missing_inputs_and_size_mismatches_fail_clearly():
    no_background = float_sample("bad_1")
    no_background.background = None
    no_alpha = float_sample("bad_2")
    del no_alpha.work["alpha"]
    wrong_size = float_sample("bad_3")
    wrong_size.background = np.zeros((SIZE, SIZE + 1, 3), np.uint8)
    not_finite = float_sample("bad_4")
    not_finite.work["fg_rgb"][3, 3, 0] = np.nan
    out = run_stage(Recompose(), [no_background, no_alpha, wrong_size, not_finite, float_sample("good")])
    assert "background" in out[0].failure.message
    assert out[1].failure.error_type == "KeyError" and "alpha" in out[1].failure.message
    assert out[2].failure.error_type == "ValueError" and "background" in out[2].failure.message
    assert "NaN" in out[3].failure.message
    assert out[4].ok and out[4].composite is not None
