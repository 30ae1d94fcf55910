"""FootprintRemoval: the clean object as the composite with the decomposed layer's footprint inpainted."""

from __future__ import annotations

import numpy as np
import pytest

from layerloop.evaluation.measures import psnr
from layerloop.models.incontext_pipeline import FootprintRemoval
from layerloop.samples import composite


def _scene(size: int = 32):
    """A smooth shaded object, a disc-shaped red logo layer over it, and their alpha blend."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    obj = np.stack([60 + 120 * xx, 80 + 60 * yy, 150 - 50 * xx * yy], axis=-1)
    obj = np.clip(np.rint(obj), 0, 255).astype(np.uint8)
    disc = ((xx - 0.5) ** 2 + (yy - 0.45) ** 2) < 0.03
    layer = np.zeros((size, size, 4), np.uint8)
    layer[disc] = (230, 20, 30, 255)
    return obj, layer, composite(layer, obj)


def test_the_true_footprint_removes_the_layer_and_keeps_every_other_pixel():
    obj, layer, image = _scene()
    removed = FootprintRemoval()(image, layer)
    outside = layer[..., 3] == 0
    np.testing.assert_array_equal(removed[outside], image[outside])  # bit for bit outside the footprint
    assert removed.dtype == np.uint8 and removed.shape == image.shape
    # the logo is gone: far closer to the clean object than the input is
    assert psnr(image, obj) < 20 and psnr(removed, obj) > psnr(image, obj) + 10


def test_the_threshold_decides_the_footprint():
    obj, layer, image = _scene()
    faint = layer.copy()
    faint[..., 3] = np.where(layer[..., 3] > 0, 10, 0)  # 10/255 = 0.039
    assert FootprintRemoval(alpha=0.03).footprint(faint).any()
    assert not FootprintRemoval(alpha=0.05).footprint(faint).any()
    kept = FootprintRemoval(alpha=0.05)(image, faint)
    np.testing.assert_array_equal(kept, image)  # nothing above the threshold: the composite itself
    assert kept is not image
    everywhere = layer.copy()
    everywhere[..., 3] = 255
    np.testing.assert_array_equal(FootprintRemoval()(image, everywhere), image)  # nothing to inpaint from


@pytest.mark.parametrize("kwargs, match", [({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"),
                                           ({"radius": 0}, "radius"), ({"method": "fast"}, "method")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FootprintRemoval(**kwargs)


def test_bad_inputs_are_refused():
    obj, layer, image = _scene()
    with pytest.raises(ValueError, match="layer"):
        FootprintRemoval()(image, layer[..., :3].copy())
    with pytest.raises(ValueError, match="composite"):
        FootprintRemoval()(image.astype(np.float32), layer)
    with pytest.raises(ValueError, match="layer is"):
        FootprintRemoval()(image, layer[:16])
