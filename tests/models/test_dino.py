import numpy as np
import pytest
import torch

from layerloop.models.dino import DinoEmbedder
from layerloop.models.hub import ModelNotAvailable


def _images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for height, width in sizes]


@pytest.fixture(scope="module")
def dino():
    return DinoEmbedder.tiny(seed=0)


def test_embed_shapes_and_unit_norm(dino):
    features = dino.embed(_images(0, [(40, 50), (3, 20), (64, 33)]))
    assert features.shape == (3, 16) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-6)
    assert dino.embed([]).shape == (0, 16)


def test_embed_is_the_normalised_cls_token(dino):
    image = _images(1, [(45, 45)])[0]
    pixels = dino.processor(images=[image], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        cls_token = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls_token, dim=-1).numpy()
    np.testing.assert_allclose(dino.embed([image]), expected, atol=1e-6)


def test_deterministic_per_seed(dino):
    images = _images(2, [(36, 36), (50, 40)])
    np.testing.assert_array_equal(dino.embed(images), DinoEmbedder.tiny(seed=0).embed(images))
    assert not np.allclose(dino.embed(images), DinoEmbedder.tiny(seed=1).embed(images))


def test_batched_equals_one_by_one(dino):
    images = _images(3, [(40, 40), (33, 65), (40, 40), (64, 64), (35, 50)])
    batched = dino.embed(images, batch_size=2)
    single = np.concatenate([dino.embed([image]) for image in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_similarity_is_one_for_the_same_image_and_less_for_others(dino):
    images = _images(4, [(40, 40), (48, 36), (60, 30)])
    same = dino.similarity(images, images)
    assert same.shape == (3,) and same.dtype == np.float32
    np.testing.assert_allclose(same, 1.0, atol=1e-6)
    different = dino.similarity(images, images[1:] + images[:1])
    assert np.all(different < 1.0 - 1e-4)
    with pytest.raises(ValueError, match="3 images against 2"):
        dino.similarity(images, images[:2])


def test_rejects_non_rgb_images(dino):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        dino.embed([np.zeros((32, 32, 4), np.uint8)])


def test_save_and_load_round_trip(dino, tmp_path):
    images = _images(5, [(40, 52), (30, 30)])
    dino.save_pretrained(tmp_path / "dino")
    loaded = DinoEmbedder.from_pretrained(tmp_path / "dino")
    assert loaded.describe() == {"model": str(tmp_path / "dino"), "revision": None}
    np.testing.assert_allclose(loaded.embed(images), dino.embed(images), atol=1e-6)


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        DinoEmbedder.from_pretrained()
    assert "facebook/dinov2-base" in str(info.value)
