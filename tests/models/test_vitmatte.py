import numpy as np
import pytest
import torch

from layerloop.models.hub import ModelNotAvailable
from layerloop.models.vitmatte import VitMatte


def _inputs(seed, sizes):
    rng = np.random.default_rng(seed)
    images, trimaps = [], []
    for height, width in sizes:
        images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        trimaps.append(rng.choice(np.array([0, 128, 255], np.uint8), (height, width)))
    return images, trimaps


@pytest.fixture(scope="module")
def matte():
    return VitMatte.tiny(seed=0)


def test_matches_direct_transformers_call(matte):
    images, trimaps = _inputs(0, [(50, 70)])
    direct_inputs = matte.processor(images=images[0], trimaps=trimaps[0], return_tensors="pt")
    assert direct_inputs.pixel_values.shape[-2:] == (64, 96)  # the processor pads to a multiple of 32
    with torch.no_grad():
        direct = matte.model(**direct_inputs).alphas[0, 0, :50, :70].numpy()
    unknown = trimaps[0] == 128

    alpha = matte.predict(images, trimaps)[0]

    assert alpha.shape == (50, 70) and alpha.dtype == np.float32
    np.testing.assert_allclose(alpha[unknown], np.clip(direct[unknown], 0, 1), atol=1e-6)
    assert np.all(alpha[trimaps[0] == 0] == 0.0)
    assert np.all(alpha[trimaps[0] == 255] == 1.0)
    # The forced regions really changed something: the raw network output there is not exactly 0/1.
    assert not np.all(direct[trimaps[0] == 255] == 1.0)


def test_batched_equals_one_by_one_with_mixed_sizes(matte):
    images, trimaps = _inputs(1, [(40, 40), (33, 65), (40, 40), (64, 64), (35, 50)])
    batched = matte.predict(images, trimaps, batch_size=3)
    single = [matte.predict([image], [trimap])[0] for image, trimap in zip(images, trimaps)]
    for a, b, trimap in zip(batched, single, trimaps):
        assert a.shape == trimap.shape
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_save_and_load_round_trip(matte, tmp_path):
    images, trimaps = _inputs(2, [(48, 40)])
    matte.save_pretrained(tmp_path / "vitmatte")
    loaded = VitMatte.from_pretrained(tmp_path / "vitmatte")
    np.testing.assert_allclose(loaded.predict(images, trimaps)[0], matte.predict(images, trimaps)[0], atol=1e-6)


def test_rejects_mismatched_trimap(matte):
    images, trimaps = _inputs(3, [(32, 32)])
    with pytest.raises(ValueError, match="does not match"):
        matte.predict(images, [trimaps[0][:16]])


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        VitMatte.from_pretrained("hustvl/vitmatte-small-composition-1k")
    assert "hustvl/vitmatte-small-composition-1k" in str(info.value)
