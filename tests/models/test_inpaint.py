import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from layerloop.models.hub import ModelNotAvailable
from layerloop.models.inpaint import DiffusersInpainter, ObjectClearRemover


def _inputs(seed, sizes):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for height, width in sizes:
        images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4:height // 2, width // 3:2 * width // 3] = 255
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def inpainter():
    return DiffusersInpainter.tiny(seed=0)


def test_matches_direct_pipeline_call(inpainter):
    images, masks = _inputs(0, [(48, 80)])
    image, mask = images[0], masks[0]
    small_image = Image.fromarray(image).resize((64, 64), Image.BICUBIC)
    small_mask = np.asarray(Image.fromarray(mask).resize((64, 64), Image.NEAREST))
    small_mask = cv2.dilate(small_mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    with torch.no_grad():
        direct = inpainter.pipeline(
            prompt=[inpainter.prompt], image=[small_image], mask_image=[Image.fromarray(small_mask)],
            height=64, width=64, strength=0.99, num_inference_steps=3, guidance_scale=1.0,
            generator=[torch.Generator("cpu").manual_seed(7)], output_type="np",
        ).images[0]
    direct = np.asarray(Image.fromarray(np.round(direct * 255).astype(np.uint8)).resize((80, 48), Image.BICUBIC))
    region = np.asarray(Image.fromarray(small_mask).resize((80, 48), Image.NEAREST)) > 0

    result = inpainter.remove([image], [mask], seed=7)[0]

    assert result.shape == image.shape and result.dtype == np.uint8
    np.testing.assert_array_equal(result[~region], image[~region])  # untouched outside the dilated mask
    np.testing.assert_allclose(result[region].astype(int), direct[region].astype(int), atol=1)
    assert region.sum() > (mask > 0).sum()  # the dilation grew the region
    assert np.abs(result[mask > 0].astype(int) - image[mask > 0].astype(int)).mean() > 5  # inpainted


def test_seed_determinism(inpainter):
    images, masks = _inputs(1, [(40, 40)])
    first = inpainter.remove(images, masks, seed=3)[0]
    np.testing.assert_array_equal(first, inpainter.remove(images, masks, seed=3)[0])
    assert not np.array_equal(first, inpainter.remove(images, masks, seed=4)[0])


def test_batched_equals_one_by_one(inpainter):
    images, masks = _inputs(2, [(40, 40), (30, 70), (64, 48)])
    seeds = [11, 12, 13]
    batched = inpainter.remove(images, masks, seed=seeds, batch_size=3)
    single = [inpainter.remove([i], [m], seed=s)[0] for i, m, s in zip(images, masks, seeds)]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.astype(int), b.astype(int), atol=2)


def test_save_and_load_round_trip(inpainter, tmp_path):
    images, masks = _inputs(3, [(32, 48)])
    inpainter.save_pretrained(tmp_path / "inpaint")
    loaded = DiffusersInpainter.from_pretrained(tmp_path / "inpaint", resolution=64, dilate_px=2,
                                                num_inference_steps=3)
    np.testing.assert_array_equal(loaded.remove(images, masks, seed=5)[0], inpainter.remove(images, masks, seed=5)[0])


def test_rejects_mismatched_inputs(inpainter):
    images, masks = _inputs(4, [(32, 32)])
    with pytest.raises(ValueError, match="does not match"):
        inpainter.remove(images, [masks[0][:10]])
    with pytest.raises(ValueError, match="seeds"):
        inpainter.remove(images, masks, seed=[1, 2])


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        DiffusersInpainter.from_pretrained()
    assert "LetsThink/RORem" in str(info.value)


def test_objectclear_missing_package_says_how_to_install(monkeypatch):
    # None in sys.modules makes `import objectclear` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "objectclear", None)
    monkeypatch.setitem(sys.modules, "objectclear.pipelines", None)
    with pytest.raises(ImportError, match=r"pip install git\+https://github.com/zjx0101/ObjectClear"):
        ObjectClearRemover.from_pretrained()
    with pytest.raises(ImportError, match="objectclear"):
        ObjectClearRemover(pipeline=torch.nn.Identity())
