"""The box-mask stage: a padded, optionally jittered box around the object and its shadow."""

import numpy as np
import pytest
from pydantic import ValidationError

from layerloop.samples import LayeredSample
from layerloop.stages import run_stage, stage_class
from layerloop.stages.box_mask import BoxMask

SIZE = 80


def boxed_sample(key="b_0", rows=(20, 40), cols=(30, 50), shadow=None, size=SIZE):
    mask = np.zeros((size, size), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 255
    work = {} if shadow is None else {"shadow_alpha": shadow}
    return LayeredSample(key=key, object_mask=mask, work=work)


def box(sample):
    return sample.meta["bbox"]


def assert_mask_is_box(sample):
    x0, y0, x1, y1 = box(sample)
    expected = np.zeros_like(sample.mask)
    expected[y0:y1, x0:x1] = 255
    assert sample.mask.dtype == np.uint8 and np.array_equal(sample.mask, expected)


def test_registered_under_its_name():
    assert stage_class("box-mask") is BoxMask


def test_padding_is_a_fraction_of_the_box_on_each_side():
    tight = BoxMask(padding=0.0).process_sample(boxed_sample())
    assert box(tight) == [30, 20, 50, 40]  # exclusive ends
    padded = BoxMask(padding=0.1).process_sample(boxed_sample())
    assert box(padded) == [28, 18, 52, 42]  # 10% of 20 px = 2 px a side
    assert_mask_is_box(padded)
    wide = BoxMask(padding=0.1).process_sample(boxed_sample(cols=(10, 70)))
    assert box(wide) == [4, 18, 76, 42]  # horizontal padding follows the width, vertical the height


def test_shadow_region_is_included_above_the_threshold_only_when_asked():
    shadow = np.zeros((SIZE, SIZE), np.float32)
    shadow[40:55, 45:70] = 0.3  # cast shadow below-right of the object
    shadow[:, :5] = 0.01  # a faint blurred tail: below the threshold, must not stretch the box
    with_effects = BoxMask(padding=0.0).process_sample(boxed_sample(shadow=shadow))
    assert box(with_effects) == [30, 20, 70, 55]
    assert with_effects.meta["stages"]["box-mask"]["effects_included"] is True
    object_only = BoxMask(padding=0.0, include_effects=False).process_sample(boxed_sample(shadow=shadow))
    assert box(object_only) == [30, 20, 50, 40]
    no_shadow_yet = BoxMask(padding=0.0).process_sample(boxed_sample())
    assert box(no_shadow_yet) == [30, 20, 50, 40]
    assert no_shadow_yet.meta["stages"]["box-mask"]["effects_included"] is False


def test_box_contains_object_and_shadow_after_the_real_shadow_stage():
    from layerloop.stages.shadows import ShadowAugmentation

    sample = boxed_sample("sh_0")
    sample.work = {"alpha": (sample.object_mask / 255).astype(np.float32),
                   "fg_rgb": np.zeros((SIZE, SIZE, 3), np.float32)}
    sample = BoxMask().process_sample(ShadowAugmentation(opacity=(0.6, 0.6)).process_sample(sample))
    inside = sample.mask == 255
    assert inside[sample.object_mask == 255].all()
    assert inside[sample.work["shadow_alpha"] > 0.04].all()


def test_jitter_only_grows_the_box_is_bounded_and_deterministic_per_key():
    padded = box(BoxMask(padding=0.1).process_sample(boxed_sample()))
    boxes = []
    for key in ("j1", "j2", "j3", "j4"):
        jittered = BoxMask(padding=0.1, jitter=0.25).process_sample(boxed_sample(key))
        x0, y0, x1, y1 = box(jittered)
        assert x0 <= padded[0] and y0 <= padded[1] and x1 >= padded[2] and y1 >= padded[3]
        assert x0 >= 30 - 7 and y0 >= 20 - 7 and x1 <= 50 + 7 and y1 <= 40 + 7  # 35% of 20 px, ceil
        drawn = jittered.meta["stages"]["box-mask"]["jitter_drawn"]
        assert len(drawn) == 4 and all(0.0 <= d <= 0.25 for d in drawn)
        assert box(BoxMask(padding=0.1, jitter=0.25).process_sample(boxed_sample(key))) == box(jittered)
        boxes.append(tuple(box(jittered)))
    assert len(set(boxes)) > 1


def test_box_is_clipped_to_the_image():
    corner = BoxMask(padding=0.5, jitter=0.5).process_sample(boxed_sample(rows=(0, 10), cols=(70, 80)))
    x0, y0, x1, y1 = box(corner)
    assert y0 == 0 and x1 == SIZE and x0 < 70 and y1 > 10
    assert_mask_is_box(corner)


def test_min_size_grows_small_boxes_inside_the_image():
    dot = BoxMask(padding=0.0, min_size=8).process_sample(boxed_sample(rows=(40, 41), cols=(40, 41)))
    assert box(dot) == [37, 37, 45, 45]  # 7 px to add: 3 before, 4 after
    edge = BoxMask(padding=0.0, min_size=8).process_sample(boxed_sample(rows=(0, 1), cols=(79, 80)))
    assert box(edge) == [72, 0, 80, 8]
    tiny_image = BoxMask(padding=0.0, min_size=32).process_sample(boxed_sample(rows=(2, 3), cols=(2, 3), size=6))
    assert box(tiny_image) == [0, 0, 6, 6]


def test_failures_are_clear():
    empty = boxed_sample("bad_1")
    empty.object_mask[:] = 0
    missing = boxed_sample("bad_2")
    missing.object_mask = None
    wrong_shadow = boxed_sample("bad_3", shadow=np.zeros((SIZE, SIZE + 2), np.float32))
    out = run_stage(BoxMask(), [empty, missing, wrong_shadow, boxed_sample("good")])
    assert "empty" in out[0].failure.message
    assert "object_mask" in out[1].failure.message
    assert "shadow_alpha" in out[2].failure.message
    assert out[3].ok and out[3].mask is not None
    with pytest.raises(ValidationError):
        BoxMask(padding=-0.1)
    with pytest.raises(ValidationError):
        BoxMask(margin=3)
