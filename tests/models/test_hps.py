import json

import numpy as np
import pytest
import torch
from PIL import Image

from layerloop.models.clip_score import TINY_OPEN_CLIP_CONFIG, OpenClipBundle
from layerloop.models.hps import HpsScorer
from layerloop.models.hub import ModelNotAvailable

PROMPTS = ["a cat on a sofa", "a red car", "a lamp on a table", "a bottle"]


def _images(seed, count):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 4 * i, 28, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def scorer():
    return HpsScorer.tiny(seed=0)


def test_tiny_loads_the_random_checkpoint(scorer):
    # tiny() goes through the checkpoint file; its weights must be the seeded random model's, not a fresh init.
    reference = OpenClipBundle.from_config(TINY_OPEN_CLIP_CONFIG, seed=0).model.state_dict()
    for name, tensor in scorer.bundle.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], msg=name)
    other = HpsScorer.tiny(seed=1)
    assert not torch.equal(other.bundle.model.visual.conv1.weight, scorer.bundle.model.visual.conv1.weight)


def test_matches_hpsv2_reference_formula(scorer):
    images = _images(0, 3)
    model, preprocess, tokenizer = scorer.bundle.model, scorer.bundle.preprocess, scorer.bundle.tokenizer
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]),
                                            normalize=True)
        text_features = model.encode_text(tokenizer(PROMPTS[:3]), normalize=True)
        expected = torch.diagonal(image_features @ text_features.T).numpy()

    scores = scorer.score(images, PROMPTS[:3])

    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_batched_equals_one_by_one(scorer):
    images = _images(1, 4)
    batched = scorer.score(images, PROMPTS, batch_size=3)
    single = np.concatenate([scorer.score([image], [prompt]) for image, prompt in zip(images, PROMPTS)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_save_and_load_round_trip(scorer, tmp_path):
    images = _images(2, 2)
    scorer.save_pretrained(tmp_path / "hps")
    assert (tmp_path / "hps" / "HPS_v2.1_compressed.pt").is_file()
    from_folder = HpsScorer.from_pretrained(tmp_path / "hps")
    from_file = HpsScorer.from_pretrained(tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    expected = scorer.score(images, PROMPTS[:2])
    np.testing.assert_allclose(from_folder.score(images, PROMPTS[:2]), expected, atol=1e-6)
    np.testing.assert_allclose(from_file.score(images, PROMPTS[:2]), expected, atol=1e-6)


def test_checkpoint_with_ddp_prefix_loads(scorer, tmp_path):
    # Checkpoints saved from DistributedDataParallel carry "module." in every key.
    state = {"module." + k: v for k, v in scorer.bundle.model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ddp.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG}))
    loaded = HpsScorer.from_pretrained(tmp_path, filename="ddp.pt")
    images = _images(3, 1)
    np.testing.assert_allclose(loaded.score(images, PROMPTS[:1]), scorer.score(images, PROMPTS[:1]), atol=1e-6)


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        HpsScorer.from_pretrained()
    assert "xswu/HPSv2" in str(info.value) and "HPS_v2.1_compressed.pt" in str(info.value)
