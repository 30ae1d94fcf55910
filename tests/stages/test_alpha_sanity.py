"""The alpha-sanity stage on synthetic alphas: empty, faint, full box, fragmented, outside the box."""

import numpy as np
import pytest
from pydantic import ValidationError

from layerloop.samples import LayeredSample
from layerloop.stages import run_stage, stage_class
from layerloop.stages.alpha_sanity import AlphaSanity

SIZE = 64
BOX = (slice(16, 48), slice(16, 48))  # 32 x 32 = 1024 box pixels


def candidate(alpha, key="cand_0", box=BOX):
    """A candidate whose foreground has the given alpha (float in [0, 1]) and a grey colour."""
    alpha = np.rint(np.asarray(alpha, np.float64) * 255).astype(np.uint8)
    foreground = np.zeros((SIZE, SIZE, 4), np.uint8)
    foreground[..., :3] = 128
    foreground[..., 3] = alpha
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[box] = 255
    return LayeredSample(key=key, kind="candidate", foreground=foreground, mask=mask)


def scores(alpha, **params):
    return AlphaSanity(**params).process_sample(candidate(alpha)).meta["scores"]


def test_registered_and_stateless():
    assert stage_class("alpha-sanity") is AlphaSanity
    assert not AlphaSanity().needs_actor  # pure numpy: fused into CPU tasks, no actor pool


def test_transparent_and_faint_layers_are_empty():
    empty = scores(np.zeros((SIZE, SIZE)))
    assert empty == {"alpha_coverage": 0.0, "alpha_empty": True, "alpha_full": False, "alpha_fragments": 0,
                     "alpha_largest_fraction": 0.0, "alpha_outside_box": 0.0}
    faint = np.zeros((SIZE, SIZE))
    faint[BOX] = 0.3  # shadow-like opacity fills the box but nothing is visible object
    faint_scores = scores(faint)
    assert faint_scores["alpha_empty"] and faint_scores["alpha_coverage"] == 0.0
    assert faint_scores["alpha_outside_box"] == 0.0
    speck = np.zeros((SIZE, SIZE))
    speck[30:34, 30:34] = 1.0  # 16 px = 1.6% of the box, below min_coverage 2%
    assert scores(speck)["alpha_empty"] and not scores(speck, min_coverage=0.01)["alpha_empty"]


def test_an_opaque_box_is_full():
    full = np.zeros((SIZE, SIZE))
    full[BOX] = 1.0
    result = scores(full)
    assert result["alpha_coverage"] == 1.0 and result["alpha_full"] and not result["alpha_empty"]
    assert result["alpha_fragments"] == 1 and result["alpha_largest_fraction"] == 1.0
    assert result["alpha_outside_box"] == 0.0


def test_a_plausible_object_is_neither_empty_full_nor_fragmented():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 10**2).astype(np.float64)
    result = scores(disk)
    assert result["alpha_coverage"] == round(disk[BOX].sum() / 1024, 6)
    assert 0.2 < result["alpha_coverage"] < 0.5
    assert not result["alpha_empty"] and not result["alpha_full"]
    assert result["alpha_fragments"] == 1 and result["alpha_largest_fraction"] == 1.0


def test_fragments_count_pieces_above_the_minimum_size():
    alpha = np.zeros((SIZE, SIZE))
    for y, x in ((18, 18), (18, 38), (38, 18)):
        alpha[y : y + 6, x : x + 6] = 1.0  # three 36 px pieces
    alpha[38:46, 38:46] = 1.0  # one 64 px piece
    alpha[30, 30] = 1.0  # a 1 px speck: below ceil(0.001 * 1024) = 2 px
    alpha[46, 46] = 1.0  # touches the 64 px piece diagonally: the same piece under 8-connectivity
    result = scores(alpha)
    assert result["alpha_fragments"] == 4
    assert result["alpha_largest_fraction"] == round(65 / (3 * 36 + 65 + 1), 6)
    assert scores(alpha, min_fragment=0.05)["alpha_fragments"] == 1  # only pieces >= 52 px count


def test_alpha_outside_the_box_is_a_fraction_of_the_mass():
    alpha = np.zeros((SIZE, SIZE))
    alpha[20:30, 20:30] = 1.0  # 100 px inside
    alpha[0:10, 0:30] = 1.0  # 300 px outside
    assert scores(alpha)["alpha_outside_box"] == 0.75
    alpha[0:10, 0:30] = 0.2  # a faint spill: counts by its opacity (60 vs 100), not as visible pixels
    result = scores(alpha)
    spill = np.rint(0.2 * 255) * 300  # alpha is stored in 8 bits
    assert result["alpha_outside_box"] == pytest.approx(spill / (spill + 255 * 100), abs=1e-6)
    assert result["alpha_fragments"] == 1


def test_parameters_are_recorded_and_validated():
    sample = AlphaSanity(min_coverage=0.05).process_sample(candidate(np.zeros((SIZE, SIZE))))
    recorded = sample.meta["stages"]["alpha-sanity"]
    assert recorded["config"] == {"visible_alpha": 0.5, "min_coverage": 0.05, "full_coverage": 0.98,
                                  "min_fragment": 0.001}
    assert recorded["backend"] == "numpy+opencv"
    with pytest.raises(ValidationError, match="min_coverage"):
        AlphaSanity(min_coverage=0.9, full_coverage=0.5)
    with pytest.raises(ValidationError):
        AlphaSanity(visible_alpha=1.0)


def test_missing_or_empty_box_is_a_recorded_failure_not_a_crash():
    good = candidate(np.ones((SIZE, SIZE)), key="good")
    no_mask = candidate(np.ones((SIZE, SIZE)), key="no_mask")
    no_mask.mask = None
    empty_box = candidate(np.ones((SIZE, SIZE)), key="empty_box", box=(slice(0, 0), slice(0, 0)))
    out = run_stage(AlphaSanity(), [good, no_mask, empty_box])
    assert out[0].ok and out[0].meta["scores"]["alpha_outside_box"] == round(1 - 1024 / SIZE**2, 6)
    assert out[1].failure.stage == "alpha-sanity" and "needs mask" in out[1].failure.message
    assert "box mask is empty" in out[2].failure.message
