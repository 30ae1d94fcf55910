import numpy as np
import pytest
import torch
from PIL import Image

from layerloop.models.clip_score import ClipScorer, layer_on_neutral
from layerloop.models.hub import ModelNotAvailable

CAPTIONS = ["a red car", "a small dog on a sofa", "a lamp", "two cups", "a green plant"]


def _images(seed, count):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24 + 5 * i, 40 - 3 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.tiny(seed=0)


def test_matches_direct_open_clip_call(scorer):
    images = _images(0, 3)
    model, preprocess, tokenizer = scorer.bundle.model, scorer.bundle.preprocess, scorer.bundle.tokenizer
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]))
        text_features = model.encode_text(tokenizer(["A photo depicts " + c for c in CAPTIONS[:3]]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    cosine = (image_features * text_features).sum(-1).numpy()
    expected = 2.5 * np.maximum(cosine, 0)

    scores = scorer.score(images, CAPTIONS[:3])

    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_negative_cosine_clips_to_zero():
    # Negating the text projection negates every cosine: CLIPScore must then be 0, never negative.
    flipped = ClipScorer.tiny(seed=0)
    with torch.no_grad():
        flipped.bundle.model.text_projection.mul_(-1)
    images = _images(1, 5)
    cosine = flipped.bundle.pair_cosine(images, ["A photo depicts " + c for c in CAPTIONS])
    assert (cosine < 0).all()
    np.testing.assert_array_equal(flipped.score(images, CAPTIONS), np.zeros(5, np.float32))


def test_batched_equals_one_by_one(scorer):
    images = _images(2, 5)
    batched = scorer.score(images, CAPTIONS, batch_size=2)
    single = np.concatenate([scorer.score([image], [caption]) for image, caption in zip(images, CAPTIONS)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_save_and_load_round_trip(scorer, tmp_path):
    images = _images(3, 2)
    scorer.save_pretrained(tmp_path / "clip")
    loaded = ClipScorer.from_pretrained(tmp_path / "clip")
    np.testing.assert_allclose(loaded.score(images, CAPTIONS[:2]), scorer.score(images, CAPTIONS[:2]), atol=1e-6)


def test_scoring_a_foreground_layer(scorer):
    rng = np.random.default_rng(4)
    layer = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="layer_on_neutral"):
        scorer.score([layer], ["a cat"])
    flat = layer_on_neutral(layer)
    np.testing.assert_allclose(scorer.score([flat], ["a cat"]), scorer.score([flat.copy()], ["a cat"]))


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        ClipScorer.from_pretrained("ViT-H-14", pretrained="laion2b_s32b_b79k")
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(info.value)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull"):
        ClipScorer.from_pretrained("someone/open-clip-model")


def test_pretrained_tag_resolves_through_the_cache(monkeypatch, tmp_path):
    from layerloop.models.clip_score import resolve_tag_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # Only the .bin copy is cached: the safetensors name is tried first, then the .bin one is used.
    path = resolve_tag_weights("ViT-H-14", "laion2b_s32b_b79k", None, None, True)
    assert path == repo / "snapshots" / commit / "open_clip_pytorch_model.bin"
