"""FluxFillInpainter on the tiny random FluxFillPipeline (2 steps, 32 px)."""

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline

from layerloop.models.flux_fill import DEFAULT_ID, FluxFillInpainter, tiny_t5_tokenizer
from layerloop.models.hub import ModelNotAvailable

PROMPTS = ["a red box", "a cat on a sofa", "a lamp", "a bottle"]


def _inputs(seed, sizes):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for height, width in sizes:
        images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        mask = np.zeros((height, width), np.uint8)
        mask[4:height - 8, 8:width - 4] = 255
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny pipeline is latency-bound: on a shared 2-core box, torch's thread pool costs more than it
    gives (seconds per call instead of 0.1 s). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inpainter():
    return FluxFillInpainter.tiny(seed=0)


def test_tiny_is_a_real_fill_pipeline(inpainter):
    pipe = inpainter.pipeline
    assert isinstance(pipe, FluxFillPipeline)
    assert inpainter.size_multiple == 4 == pipe.vae_scale_factor * 2
    # Fill's layout: noisy latents + masked-image latents + the mask folded into the VAE scale, all 2x2 packed.
    latent = pipe.vae.config.latent_channels * 4
    assert pipe.transformer.config.in_channels == 2 * latent + pipe.vae_scale_factor ** 2 * 4
    assert pipe.tokenizer_2(["a red box"]).input_ids[0][-1] == pipe.tokenizer_2.eos_token_id
    described = inpainter.describe()
    assert described["model"] == "tiny:0" and described["num_inference_steps"] == 2
    assert described["guidance_scale"] == 30.0


def test_tiny_same_seed_same_weights():
    a, b, c = FluxFillInpainter.tiny(seed=3), FluxFillInpainter.tiny(seed=3), FluxFillInpainter.tiny(seed=4)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        first, second = getattr(a.pipeline, name).state_dict(), getattr(b.pipeline, name).state_dict()
        assert all(torch.equal(first[key], second[key]) for key in first), name
    weight = next(iter(a.pipeline.text_encoder_2.parameters()))
    assert not torch.equal(weight, next(iter(c.pipeline.text_encoder_2.parameters())))


def test_fill_keeps_pixels_outside_the_mask(inpainter):
    images, masks = _inputs(0, [(32, 32), (32, 48)])
    out = inpainter.fill(images, masks, PROMPTS[:2], [1, 2])
    for image, mask, filled in zip(images, masks, out):
        assert filled.shape == image.shape and filled.dtype == np.uint8
        np.testing.assert_array_equal(filled[mask == 0], image[mask == 0])
        assert np.abs(filled.astype(int) - image)[mask > 0].mean() > 1  # the box was repainted


def test_deterministic_per_seed_and_independent_of_batch_mates(inpainter):
    images, masks = _inputs(1, [(32, 32)] * 3 + [(32, 48)])
    seeds = [11, 12, 13, 14]
    inpainter.batch_size = 3
    try:
        together = inpainter.fill(images, masks, PROMPTS, seeds)
    finally:
        inpainter.batch_size = 1
    for i in range(4):
        alone = inpainter.fill([images[i]], [masks[i]], [PROMPTS[i]], [seeds[i]])[0]
        np.testing.assert_array_equal(alone, together[i])
    other_seed = inpainter.fill(images[:1], masks[:1], PROMPTS[:1], [99])[0]
    other_prompt = inpainter.fill(images[:1], masks[:1], ["a green tree"], seeds[:1])[0]
    assert not np.array_equal(other_seed, together[0]) and not np.array_equal(other_prompt, together[0])


def test_rejects_bad_inputs(inpainter):
    images, masks = _inputs(2, [(32, 32)])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        inpainter.fill([images[0][:30]], [masks[0][:30]], ["x"], [0])
    with pytest.raises(ValueError, match="does not match"):
        inpainter.fill(images, [masks[0][:16]], ["x"], [0])
    with pytest.raises(ValueError, match="one of each per sample"):
        inpainter.fill(images, masks, ["x", "y"], [0])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        inpainter.fill([images[0].astype(np.float32)], masks, ["x"], [0])


def test_save_and_load_round_trip(inpainter, tmp_path):
    images, masks = _inputs(3, [(32, 32)])
    inpainter.save_pretrained(tmp_path / "fill")
    loaded = FluxFillInpainter.from_pretrained(tmp_path / "fill", num_inference_steps=2, max_sequence_length=32)
    assert isinstance(loaded.pipeline, FluxFillPipeline) and loaded.size_multiple == 4
    np.testing.assert_array_equal(loaded.fill(images, masks, ["a red box"], [5])[0],
                                  inpainter.fill(images, masks, ["a red box"], [5])[0])


def test_incomplete_folder_names_what_is_missing(inpainter, tmp_path):
    inpainter.save_pretrained(tmp_path / "fill")
    for path in sorted((tmp_path / "fill" / "tokenizer_2").iterdir()):
        path.unlink()
    (tmp_path / "fill" / "tokenizer_2").rmdir()
    with pytest.raises(ModelNotAvailable, match="tokenizer_2"):
        FluxFillInpainter.from_pretrained(tmp_path / "fill")


def test_tiny_t5_tokenizer_round_trips(tmp_path):
    tokenizer = tiny_t5_tokenizer()
    ids = tokenizer(["A red box, 2!"]).input_ids[0]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A red box, 2!"
    tokenizer.save_pretrained(tmp_path / "tok")
    assert type(tokenizer).from_pretrained(tmp_path / "tok")(["A red box, 2!"]).input_ids[0] == ids


def test_offline_and_missing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        FluxFillInpainter.from_pretrained()
    assert DEFAULT_ID in str(info.value)
