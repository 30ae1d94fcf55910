"""The BFS paper's applications on the tiny random model (CPU): foreground extraction, multi-layer synthesis and
reference-based generation (FLUX.1 Redux, a tiny random instance built from configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerloop.models import bfs
from layerloop.models.bfs_pipeline import BFSLayers, BFSPipeline, box_mask
from layerloop.models.redux import ReduxEncoder
from layerloop.samples import composite
from tests.models.test_bfs import _randomise_trainables  # the same coupled tiny LoRA + g


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> BFSPipeline:
    """A tiny stage-1-like checkpoint whose LoRA and g are non-zero (so the branches are coupled)."""
    models = bfs.tiny(0)
    _randomise_trainables(models.generator, seed=3, scale=0.05)
    path = tmp_path_factory.mktemp("bfs_apps") / "ckpt"
    models.generator.save_lora(path)
    return BFSPipeline.from_checkpoint(path, dtype=torch.float32, guidance=30.0)


def _inputs(n: int = 2, height: int = 16, width: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    backgrounds = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    composites = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    masks = np.zeros((n, height, width), np.uint8)
    masks[:, 4:12, 2:10] = 255
    return backgrounds, composites, masks


def _spy(generator: bfs.BFSGenerator) -> list[dict]:
    """Every call of the generator: its branch latents, timestep and text embeddings."""
    calls, original = [], generator.forward

    def forward(latents_c, latents_f, cond, timestep, text_embeds, *args, **kwargs):
        calls.append({"c": latents_c.detach().clone(), "f": latents_f.detach().clone(), "t": float(timestep),
                      "text": text_embeds.detach().clone()})
        return original(latents_c, latents_f, cond, timestep, text_embeds, *args, **kwargs)

    generator.forward = forward
    return calls


@pytest.fixture
def spied(pipe):
    calls = _spy(pipe.generator)
    yield calls
    del pipe.generator.forward  # the instance attribute; the class's forward again


# ------------------------------------------------------------------------------------- foreground extraction
def test_extraction_feeds_the_noised_given_composite_and_integrates_only_f(pipe, spied):
    backgrounds, composites, masks = _inputs()
    out = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=3, composites=composites)
    assert out.foreground.shape == (2, 16, 12, 4) and out.foreground.dtype == np.uint8
    assert np.array_equal(out.composite, composites)  # C is the given composite, byte for byte
    assert len(spied) == 3
    with torch.no_grad():
        pixels = torch.from_numpy(composites).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z_c = bfs.pack_latents(bfs.encode_latents(pipe.vae, pixels))
    noise = bfs.pack_latents(torch.stack([torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(s))[0]
                                          for s in (5, 6)]))
    sigmas = bfs.flux_sigmas(3, z_c.shape[1]).tolist()
    for call, sigma in zip(spied, sigmas):
        assert call["t"] == pytest.approx(sigma)
        torch.testing.assert_close(call["c"], (1 - call["t"]) * z_c + call["t"] * noise, rtol=0, atol=1e-6)
    # shared noise: both branches start from the same draw; then F moves on its own
    assert torch.equal(spied[0]["c"], spied[0]["f"]) and not torch.equal(spied[1]["f"], spied[1]["c"])


def test_extraction_is_deterministic_per_seed_and_depends_on_the_composite(pipe):
    backgrounds, composites, masks = _inputs()
    first = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=2, composites=composites)
    again = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=2, composites=composites)
    assert np.array_equal(first.foreground, again.foreground)
    alone = pipe(backgrounds[1:], masks[1:], ["b"], [6], steps=2, composites=composites[1:])
    assert np.abs(alone.foreground[0].astype(int) - first.foreground[1]).max() <= 1  # per sample, not per batch
    other_seed = pipe(backgrounds, masks, ["a", "b"], [7, 6], steps=2, composites=composites)
    assert not np.array_equal(other_seed.foreground[0], first.foreground[0])
    other_c = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=2, composites=composites[::-1].copy())
    assert not np.array_equal(other_c.foreground, first.foreground)
    generated = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=2)
    assert not np.array_equal(generated.foreground, first.foreground)


def test_extraction_refuses_composites_of_another_size(pipe):
    backgrounds, composites, masks = _inputs()
    with pytest.raises(ValueError, match="composites"):
        pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=1, composites=composites[:, :8])


def test_sample_latents_returns_the_given_composite_latents():
    models = bfs.tiny(0)
    z_b, z_c = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    mask = torch.ones(1, 1, 8, 8)
    noise = torch.randn(1, 4, 4, 4)
    text, pooled = torch.randn(1, 3, 32), torch.randn(1, 32)
    latents_c, latents_f = bfs.sample_latents(models.generator, z_b, mask, text, pooled, noise, noise, num_steps=2,
                                              composite_latents=z_c)
    assert latents_c is z_c and latents_f.shape == z_c.shape and torch.isfinite(latents_f).all()


# ------------------------------------------------------------------------------------- multi-layer synthesis
def test_layers_are_generated_back_to_front_over_the_previous_composite(pipe, monkeypatch):
    backgrounds, _, _ = _inputs(1, 16, 16)
    seen = []
    original = BFSPipeline.__call__

    def call(self, backgrounds, masks, captions, seeds, **kwargs):
        seen.append((backgrounds.copy(), masks.copy(), list(captions), list(seeds)))
        return original(self, backgrounds, masks, captions, seeds, **kwargs)

    monkeypatch.setattr(BFSPipeline, "__call__", call)
    boxes = [(0, 0, 8, 8), (4, 4, 16, 12), (8, 0, 16, 16)]
    result = pipe.layers(backgrounds[0], boxes, ["a tree", "a cat", "a lamp"], [1, 2, 3], steps=2)
    assert isinstance(result, BFSLayers) and len(result.layers) == len(result.composites) == 3
    assert all(layer.shape == (16, 16, 4) and layer.dtype == np.uint8 for layer in result.layers)
    assert result.composite.shape == (16, 16, 3)
    assert [s[2] for s in seen] == [["a tree"], ["a cat"], ["a lamp"]] and [s[3] for s in seen] == [[1], [2], [3]]
    previous = backgrounds[0]
    for i, (background, mask, _, _) in enumerate(seen):
        assert np.array_equal(background[0], previous)  # layer i over composite i - 1 (the background first)
        assert np.array_equal(mask[0], box_mask(16, 16, boxes[i]))
        previous = composite(result.layers[i], previous)
        assert np.array_equal(result.composites[i], previous)
    assert np.array_equal(result.composite, previous)  # the layers flatten exactly to the final composite
    assert not np.array_equal(seen[1][0], seen[0][0])


def test_layers_refuse_a_box_outside_the_image(pipe):
    backgrounds, _, _ = _inputs(1, 16, 16)
    with pytest.raises(ValueError, match="layer 2: box"):
        pipe.layers(backgrounds[0], [(0, 0, 8, 8), (4, 4, 20, 12)], ["a", "b"], [1, 2], steps=1)
    with pytest.raises(ValueError, match="one box, caption and seed"):
        pipe.layers(backgrounds[0], [(0, 0, 8, 8)], ["a", "b"], [1], steps=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe.layers(backgrounds[0][:, :14], [(0, 0, 8, 8)], ["a"], [1], steps=1)


# ------------------------------------------------------------------------------------------ Redux reference
def test_redux_tokens_follow_the_caption(pipe, spied, tmp_path):
    backgrounds, _, masks = _inputs()
    reference = np.random.default_rng(9).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="load_redux"):
        pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=1, references=[reference] * 2)
    plain = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=1)
    pipe.load_redux("tiny:1")
    try:
        tokens = pipe.redux([reference])
        assert tokens.shape == (1, 4, 32)  # 28 px SigLIP, 14 px patches: 4 tokens, at the transformer's width
        guided = pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=1, references=[reference] * 2)
        text = pipe.text_encoder(["a", "b"])
        length = text.embeds.shape[1]
        assert spied[-1]["text"].shape[1] == length + 4
        torch.testing.assert_close(spied[-1]["text"][:, :length], text.embeds)
        torch.testing.assert_close(spied[-1]["text"][:, length:], torch.cat([tokens, tokens]))
        assert not np.array_equal(guided.foreground, plain.foreground)
        with pytest.raises(ValueError, match="one each"):
            pipe(backgrounds, masks, ["a", "b"], [5, 6], steps=1, references=[reference])
    finally:
        pipe.redux = None


def test_redux_loads_a_saved_pipeline_folder(tmp_path):
    tiny = ReduxEncoder.tiny(seed=2, text_dim=32)
    tiny.pipeline.save_pretrained(tmp_path / "redux")
    loaded = ReduxEncoder.from_pretrained(tmp_path / "redux", dtype=torch.float32, local_files_only=True)
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    assert torch.equal(loaded([image]), tiny([image])) and loaded.text_dim == 32


def test_redux_offline_and_missing_names_the_model():
    from layerloop.models import hub

    with pytest.raises(hub.ModelNotAvailable, match="layerloop-test/no-redux"):
        ReduxEncoder.from_pretrained("layerloop-test/no-redux", local_files_only=True)
