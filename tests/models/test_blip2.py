import numpy as np
import pytest
import torch

from layerloop.models.blip2 import Blip2Captioner, layer_on_neutral, object_crop
from layerloop.models.hub import ModelNotAvailable


def _images(seed, count):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def captioner():
    return Blip2Captioner.tiny(seed=0)


def _direct(captioner, image, prompt, max_new_tokens):
    inputs = captioner.processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        output = captioner.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return captioner.processor.tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_matches_direct_generate_and_strips_prompt(captioner):
    image = _images(0, 1)[0]
    caption = captioner.caption([image], prompt="a photo of", max_new_tokens=6)[0]
    assert caption == " ".join(_direct(captioner, image, "a photo of", 6).split())
    assert caption and not caption.startswith("a photo of")


def test_without_prompt_matches_direct_generate(captioner):
    image = _images(1, 1)[0]
    inputs = captioner.processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        output = captioner.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = captioner.processor.tokenizer.decode(output[0], skip_special_tokens=True)
    assert captioner.caption([image], max_new_tokens=6) == [" ".join(expected.split())]


def test_batched_equals_one_by_one(captioner):
    images = _images(2, 4)
    batched = captioner.caption(images, prompt="a photo of", max_new_tokens=6, batch_size=3)
    single = [captioner.caption([image], prompt="a photo of", max_new_tokens=6)[0] for image in images]
    assert batched == single
    assert len(set(batched)) > 1  # different images really give different captions


def test_save_and_load_round_trip(captioner, tmp_path):
    images = _images(3, 2)
    captioner.save_pretrained(tmp_path / "blip2")
    loaded = Blip2Captioner.from_pretrained(tmp_path / "blip2")
    assert loaded.caption(images, max_new_tokens=6) == captioner.caption(images, max_new_tokens=6)


def test_object_crop_pads_and_clips():
    composite = np.arange(100 * 80 * 3, dtype=np.int64).reshape(100, 80, 3).astype(np.uint8)
    crop = object_crop(composite, [10, 20, 30, 60], pad=0.1)  # 20 wide, 40 high -> 2 and 4 px margins
    np.testing.assert_array_equal(crop, composite[16:64, 8:32])
    edge = object_crop(composite, [0, 90, 80, 100], pad=0.5)
    np.testing.assert_array_equal(edge, composite[85:100, 0:80])
    with pytest.raises(ValueError):
        object_crop(composite, [30, 20, 30, 60])


def test_layer_on_neutral():
    layer = np.zeros((2, 2, 4), np.uint8)
    layer[0, 0] = [200, 100, 0, 255]
    layer[0, 1] = [200, 100, 0, 0]
    layer[1, 0] = [255, 255, 255, 51]  # alpha 0.2
    out = layer_on_neutral(layer, grey=0.5)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 0])
    np.testing.assert_array_equal(out[0, 1], [128, 128, 128])
    np.testing.assert_array_equal(out[1, 0], [153, 153, 153])  # 0.2 * 255 + 0.8 * 127.5 = 153


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        Blip2Captioner.from_pretrained()
    assert "Salesforce/blip2-opt-2.7b" in str(info.value)
