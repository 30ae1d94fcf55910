"""The in-context decompose/compose LoRA on a tiny random FLUX Fill layout (CPU)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from layerloop.datasets.logos import logo_samples
from layerloop.models.incontext import (
    COMPOSE, DECOMPOSE, GENERATED, MATTE, PANELS, REGION_HINT, CanvasBatch, InContextLoRA, LatentCanvas,
    ModelNotAvailableError, canonical_layer, checkpoint_hash, condition_mask, make_candidate, pack_canvas, prompt_for,
    recomposition_error, task_mask, unpack_canvas,
)
from layerloop.samples import LayeredSample, composite

H = W = 16


def small_samples(n: int = 2, size: int = 32) -> list[LayeredSample]:
    """Logo quadruples shrunk to tiny panels (the invariant is re-established after resizing)."""
    out = []
    for sample in logo_samples(n, seed=0, size=64):
        fg = cv2.resize(sample.foreground, (size, size), interpolation=cv2.INTER_AREA)
        bg = cv2.resize(sample.background, (size, size), interpolation=cv2.INTER_AREA)
        mask = np.where(cv2.resize(sample.mask, (size, size), interpolation=cv2.INTER_AREA) > 0, 255, 0)
        out.append(LayeredSample(key=sample.key, composite=composite(fg, bg), background=bg, foreground=fg,
                                 mask=mask.astype(np.uint8), caption=sample.caption))
    return out


@pytest.fixture()
def model() -> InContextLoRA:
    return InContextLoRA.tiny(seed=0)


@pytest.fixture(scope="module")
def batch_samples() -> list[LayeredSample]:
    return small_samples(2, H)


def perturb_lora(model: InContextLoRA, seed: int = 1) -> None:
    """peft starts lora_B at zero (the LoRA is a no-op); give it weights so outputs depend on it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


# ------------------------------------------------------------------------------------------ canvas
def test_canvas_round_trip_is_exact():
    rng = np.random.default_rng(0)
    comp, bg = rng.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    layer = rng.integers(0, 256, (24, 20, 4), dtype=np.uint8)
    layer[::3, :, 3] = 0  # fully transparent pixels
    layer[1::3, :, 3] = 255
    canvas = pack_canvas(comp, layer, bg)
    assert canvas.shape == (24, 80, 3) and canvas.dtype == np.uint8
    c2, l2, b2 = unpack_canvas(canvas)
    assert np.array_equal(c2, comp) and np.array_equal(b2, bg)
    assert np.array_equal(l2, canonical_layer(layer))
    assert np.array_equal(l2[..., 3], layer[..., 3])  # alpha exact everywhere
    visible = layer[..., 3] > 0
    assert np.array_equal(l2[visible], layer[visible])  # colour exact wherever it can be seen
    assert np.all(l2[~visible, :3] == MATTE)
    assert np.array_equal(composite(l2, bg), composite(layer, bg))
    assert np.array_equal(pack_canvas(c2, l2, b2), canvas)


def test_unpack_averages_a_generated_alpha_panel():
    canvas = np.zeros((4, 16, 3), np.uint8)
    canvas[:, 8:12] = [10, 11, 13]  # channels disagree slightly: alpha is their rounded mean
    assert np.all(unpack_canvas(canvas)[1][..., 3] == 11)


def test_task_masks_select_the_right_panels():
    dec, comp = task_mask(DECOMPOSE, H, W), task_mask(COMPOSE, H, W)
    assert dec.shape == comp.shape == (H, 4 * W)
    for i, name in enumerate(PANELS):
        panel = slice(i * W, (i + 1) * W)
        assert np.all(dec[:, panel] == (name in GENERATED[DECOMPOSE]))
        assert np.all(comp[:, panel] == (name in GENERATED[COMPOSE]))
    assert np.array_equal(dec + comp, np.ones_like(dec))  # complementary: every panel is generated once
    region = np.zeros((H, W), np.uint8)
    region[4:9, 2:7] = 255
    cond = condition_mask(DECOMPOSE, region)
    assert np.array_equal(cond[:, :W], np.where(region > 0, REGION_HINT, 0.0))
    assert np.array_equal(cond[:, W:], dec[:, W:])
    assert np.array_equal(condition_mask(COMPOSE, region), comp)
    with pytest.raises(ValueError):
        task_mask("merge", H, W)


def test_packed_masks_line_up_with_panel_tokens(model):
    for direction in (DECOMPOSE, COMPOSE):
        mask = torch.from_numpy(task_mask(direction, H, W))[None]
        packed = model.pack_mask(mask)
        tokens = model.panel_tokens(GENERATED[direction], H, W)
        assert packed.shape == (1, tokens.numel(), 4 * model.vae_scale ** 2)
        assert torch.equal(packed[0].amax(dim=1) > 0, tokens)
        assert torch.equal(packed[0].amin(dim=1) > 0, tokens)  # panels cover whole tokens
    # the region hint reaches the composite panel's tokens of the decomposition conditioning
    region = torch.zeros(1, H, W)
    region[0, :4, :4] = 1
    x0 = torch.zeros(1, model.panel_tokens(PANELS, H, W).numel(), 4 * model.latent_channels)
    cond = model.condition(DECOMPOSE, x0, region, H, W)
    hint = cond[0, :, 4 * model.latent_channels:]
    assert hint.max() == 1.0 and torch.isclose(hint[0].max(), torch.tensor(REGION_HINT))
    assert torch.all(hint[model.panel_tokens(("composite",), H, W)] <= REGION_HINT)


def test_prompts_name_the_direction():
    assert prompt_for(DECOMPOSE, "a star on a mug").startswith("[DECOMPOSE]")
    assert "a star on a mug" in prompt_for(COMPOSE, "a star on a mug.")


# ------------------------------------------------------------------------------------------ training
def test_only_the_lora_gets_gradients(model, batch_samples):
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] == []
    assert len(model.lora_targets) == 17  # every attention and feed-forward projection of the 2 blocks
    assert "proj_out" not in model.lora_targets  # the top-level output projection keeps the Fill layout
    perturb_lora(model)
    batch = model.encode(CanvasBatch.from_samples(batch_samples))
    terms = model.training_loss(batch, torch.Generator().manual_seed(0))
    assert {"decompose", "compose", "cycle_decompose_compose", "cycle_compose_decompose"} <= set(terms)
    terms["loss"].backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_cycle_switch(batch_samples):
    models = {w: InContextLoRA.tiny(seed=0, cycle_weight=w) for w in (0.0, 1.0)}
    for m in models.values():
        perturb_lora(m)
    batch = models[0.0].encode(CanvasBatch.from_samples(batch_samples))
    terms = {w: m.training_loss(batch, torch.Generator().manual_seed(5)) for w, m in models.items()}
    off, on = terms[0.0], terms[1.0]
    assert "cycle_decompose_compose" not in off  # switched off: not even computed
    assert torch.equal(off["loss"], off["decompose"] + off["compose"])
    assert torch.equal(on["decompose"], off["decompose"]) and torch.equal(on["compose"], off["compose"])
    cycle = on["cycle_decompose_compose"] + on["cycle_compose_decompose"]
    assert cycle > 0 and torch.allclose(on["loss"], off["loss"] + cycle)
    # with the cycle off the gradient is exactly the supervised one
    model = models[0.0]
    off["loss"].backward()
    grad_off = [p.grad.clone() for p in model.lora_parameters()]
    model.zero_grad()
    generator = torch.Generator().manual_seed(5)
    b = batch.x0.shape[0]
    sup = 0
    for direction in (DECOMPOSE, COMPOSE):
        t = model.sample_timesteps(b, generator)
        sup = sup + model.supervised_loss(batch, direction, t, torch.randn(batch.x0.shape, generator=generator))
    sup.backward()
    for g, p in zip(grad_off, model.lora_parameters()):
        assert torch.equal(g, p.grad)
    # the cycle term alone sends gradient into the LoRA through both chained passes
    model.zero_grad()
    g = torch.Generator().manual_seed(1)
    cyc = model.cycle_loss(batch, torch.randn(batch.x0.shape, generator=g), torch.randn(batch.x0.shape, generator=g))
    sum(cyc.values()).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.lora_parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.lora_parameters())


def _with_panels_replaced(model, batch, names, seed: int = 7) -> LatentCanvas:
    """``batch`` with the latents of the named panels replaced by something else (scaled random tokens)."""
    other = 3.0 * torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(seed))
    tokens = model.panel_tokens(names, batch.height, batch.width)
    x0 = batch.x0.clone()
    x0[:, tokens] = other[:, tokens]
    return LatentCanvas(x0, batch.region, batch.captions, batch.height, batch.width)


def test_the_cycle_never_sees_the_ground_truth_of_what_it_generates(model, batch_samples):
    """Each cycle starts from its given panels and noise only: replacing the panels its first pass generates
    (decompose: F and B; compose: C) leaves it bit for bit unchanged, replacing its given panels does not.
    The old cycle noised the true target panels in its first pass (the answer, at small t)."""
    perturb_lora(model)
    batch = model.encode(CanvasBatch.from_samples(batch_samples))

    def terms(b):
        with torch.no_grad():
            return model.training_loss(b, torch.Generator().manual_seed(3))

    base = terms(batch)
    new_layers = terms(_with_panels_replaced(model, batch, GENERATED[DECOMPOSE]))  # decomposition's truth
    new_composite = terms(_with_panels_replaced(model, batch, GENERATED[COMPOSE]))  # composition's truth
    assert torch.equal(new_layers["cycle_decompose_compose"], base["cycle_decompose_compose"])
    assert torch.equal(new_composite["cycle_compose_decompose"], base["cycle_compose_decompose"])
    # the given panels (and the panels compared with, which are the same) do matter
    assert not torch.allclose(new_composite["cycle_decompose_compose"], base["cycle_decompose_compose"])
    assert not torch.allclose(new_layers["cycle_compose_decompose"], base["cycle_compose_decompose"])
    # the supervised terms are unchanged in kind: they see (and are scored on) the truth
    assert not torch.allclose(new_layers["decompose"], base["decompose"])
    assert not torch.allclose(new_composite["compose"], base["compose"])
    # the same holds whatever the first pass's noise: nothing of the replaced panels enters the cycle
    g = torch.Generator().manual_seed(11)
    noise1, noise2 = torch.randn(batch.x0.shape, generator=g), torch.randn(batch.x0.shape, generator=g)
    with torch.no_grad():
        a = model.cycle_loss(batch, noise1, noise2)
        b = model.cycle_loss(_with_panels_replaced(model, batch, GENERATED[DECOMPOSE], seed=8), noise1, noise2)
    assert torch.equal(a["cycle_decompose_compose"], b["cycle_decompose_compose"])


def test_cycle_chains_the_first_estimate_into_the_second_pass(model, batch_samples, monkeypatch):
    """The wiring of one cycle: both passes at t = 1 (pure noise), the first conditioned on the true given
    panels with its generated panels empty, the second on the first pass's x0 estimate, compared with the
    first pass's input; gradient reaches the first pass's estimate through the second pass."""
    perturb_lora(model)
    batch = model.encode(CanvasBatch.from_samples(batch_samples))
    calls = []
    one_step = model.one_step

    def recording(direction, canvas, x0, region, captions, t, noise, height, width):
        v, x0_hat = one_step(direction, canvas, x0, region, captions, t, noise, height, width)
        x0_hat.retain_grad()
        calls.append({"direction": direction, "canvas": canvas, "t": t, "x0_hat": x0_hat, "noise": noise})
        return v, x0_hat

    monkeypatch.setattr(model, "one_step", recording)
    g = torch.Generator().manual_seed(2)
    noise1, noise2 = torch.randn(batch.x0.shape, generator=g), torch.randn(batch.x0.shape, generator=g)
    terms = model.cycle_loss(batch, noise1, noise2)
    assert [c["direction"] for c in calls] == [DECOMPOSE, COMPOSE, COMPOSE, DECOMPOSE]
    assert all(torch.all(c["t"] == 1.0) for c in calls)
    for first, second, name in ((calls[0], calls[1], "cycle_decompose_compose"),
                                (calls[2], calls[3], "cycle_compose_decompose")):
        generated = model.panel_tokens(GENERATED[first["direction"]], H, W)
        given = ~generated
        assert torch.equal(first["canvas"][:, given], batch.x0[:, given])  # the true given panels
        empty = model.given_only(first["direction"], torch.zeros_like(batch.x0), H, W)  # Fill's empty panels
        assert torch.equal(first["canvas"][:, generated], empty[:, generated])  # no ground truth there
        assert torch.equal(first["noise"], noise1) and torch.equal(second["noise"], noise2)
        # the second pass is given the first pass's estimate, and generates what the first one was given
        assert torch.equal(second["canvas"][:, generated], first["x0_hat"][:, generated])
        assert not torch.equal(second["canvas"][:, given], batch.x0[:, given])
        expected = (second["x0_hat"] - batch.x0)[:, given].abs().mean()
        assert torch.equal(terms[name], expected)
    sum(terms.values()).backward()
    for first in (calls[0], calls[2]):
        generated = model.panel_tokens(GENERATED[first["direction"]], H, W)
        grad = first["x0_hat"].grad
        assert grad is not None and grad[:, generated].abs().sum() > 0 and torch.isfinite(grad).all()


def test_loss_falls_on_a_fixed_batch(batch_samples):
    torch.manual_seed(0)
    model = InContextLoRA.tiny(seed=0, rank=8, alpha=8.0)
    batch = model.encode(CanvasBatch.from_samples(batch_samples))
    optimizer = torch.optim.Adam(model.lora_parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        # the same t and noise every step: what falls is the fit, not the sampling noise
        terms = model.training_loss(batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


# ------------------------------------------------------------------------------------------ checkpoints
def test_save_and_load_lora_round_trip(tmp_path, batch_samples):
    model = InContextLoRA.tiny(seed=0)
    perturb_lora(model, seed=3)
    path = model.save_lora(tmp_path / "ckpt")
    assert path.name == "lora.safetensors" and (tmp_path / "ckpt" / "lora.json").exists()
    fresh = InContextLoRA.tiny(seed=0)
    batch = model.encode(CanvasBatch.from_samples(batch_samples))
    t, noise = torch.full((2,), 0.5), torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fresh.one_step(DECOMPOSE, batch.x0, batch.x0, batch.region, batch.captions, t, noise, H, W)[0]
        fresh.load_lora(tmp_path / "ckpt")
        for direction in (DECOMPOSE, COMPOSE):
            want = model.one_step(direction, batch.x0, batch.x0, batch.region, batch.captions, t, noise, H, W)[0]
            got = fresh.one_step(direction, batch.x0, batch.x0, batch.region, batch.captions, t, noise, H, W)[0]
            assert torch.equal(want, got)
    assert not torch.equal(before, want)
    # the hash is of the file's bytes: stable across saves, a folder means its lora.safetensors
    digest = checkpoint_hash(path)
    assert len(digest) == 16 and digest == checkpoint_hash(tmp_path / "ckpt")
    assert checkpoint_hash(fresh.save_lora(tmp_path / "again")) == digest
    perturb_lora(fresh, seed=4)
    assert checkpoint_hash(fresh.save_lora(tmp_path / "other")) != digest
    with pytest.raises(ValueError, match="rank"):
        InContextLoRA.tiny(seed=0, rank=2).load_lora(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------ inference
def test_decompose_end_to_end(model, batch_samples, tmp_path):
    perturb_lora(model)
    sample = batch_samples[0]
    result = model.decompose(sample.composite, sample.mask, sample.caption, steps=3, seed=0)
    assert result.layer.shape == (H, W, 4) and result.layer.dtype == np.uint8
    assert result.background.shape == (H, W, 3) and result.canvas.shape == (H, 4 * W, 3)
    assert np.array_equal(result.canvas[:, :W], sample.composite)
    assert result.recomposition_error == recomposition_error(sample.composite, result.layer, result.background)
    again = model.decompose(sample.composite, sample.mask, sample.caption, steps=3, seed=0)
    assert np.array_equal(again.layer, result.layer)
    digest = checkpoint_hash(model.save_lora(tmp_path))
    candidate = make_candidate("logos_000000-r1", sample.composite, sample.mask, result.layer, result.background,
                               sample.caption, digest, round=1, parent="logos_000000")
    assert candidate.kind == "candidate"
    assert candidate.meta["generator"] == {"model": "incontext", "checkpoint_hash": digest,
                                           "recomposition_error": result.recomposition_error}
    with pytest.raises(ValueError, match="multiple of 4"):
        model.decompose(np.zeros((10, 16, 3), np.uint8), np.zeros((10, 16), np.uint8))


def test_recomposition_error_is_zero_for_the_truth(batch_samples):
    s = batch_samples[1]
    assert recomposition_error(s.composite, s.foreground, s.background) == 0.0
    assert recomposition_error(s.composite, s.foreground, 255 - s.background) > 0
    # a non-linear rendering (here: shading over the whole image) is not the blend of its true layers, so
    # the score is a consistency score there, not zero for the truth
    shaded = np.clip(np.rint(s.composite.astype(np.float64) * 0.7 + 40), 0, 255).astype(np.uint8)
    assert recomposition_error(shaded, s.foreground, s.background) > 5


# ------------------------------------------------------------------------------------------ loading
def test_from_pretrained_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="(?s)FLUX.1-Fill-dev.*layerloop models pull"):
        InContextLoRA.from_pretrained("black-forest-labs/FLUX.1-Fill-dev")
    with pytest.raises(ModelNotAvailableError, match="lacks"):
        InContextLoRA.from_pretrained(str(tmp_path))


def test_from_pretrained_local_folder(tmp_path, batch_samples):
    tiny = InContextLoRA.tiny(seed=0)
    # save the frozen base (without the adapter) in the diffusers layout
    base = InContextLoRA.tiny(seed=0)
    state = {k: v for k, v in base.transformer.state_dict().items() if "lora_" not in k}
    from diffusers import FluxTransformer2DModel

    plain = FluxTransformer2DModel.from_config(base.transformer.config)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items()})
    plain.save_pretrained(tmp_path / "transformer")
    base.vae.save_pretrained(tmp_path / "vae")
    loaded = InContextLoRA.from_pretrained(str(tmp_path), dtype=torch.float32, text_encoder=tiny.text_encoder,
                                           rank=4, alpha=4.0)
    perturb_lora(tiny)
    perturb_lora(loaded)
    batch = tiny.encode(CanvasBatch.from_samples(batch_samples))
    t, noise = torch.full((2,), 0.3), torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tiny.one_step(COMPOSE, batch.x0, batch.x0, batch.region, batch.captions, t, noise, H, W)[0]
        got = loaded.one_step(COMPOSE, batch.x0, batch.x0, batch.region, batch.captions, t, noise, H, W)[0]
    assert torch.allclose(want, got, atol=1e-6)
    assert loaded.config.base_model == str(tmp_path)


def test_pipeline_from_checkpoint_is_the_model_with_its_lora(model, batch_samples, tmp_path):
    from layerloop.models.incontext_pipeline import InContextPipeline

    perturb_lora(model)
    model.save_lora(tmp_path / "ckpt")
    pipe = InContextPipeline.from_checkpoint(tmp_path / "ckpt")
    assert pipe.checkpoint_hash == checkpoint_hash(tmp_path / "ckpt") and pipe.size_multiple == 4
    sample = batch_samples[0]
    got = pipe(sample.composite, sample.mask, sample.caption, steps=2, seed=3)
    want = model.decompose(sample.composite, sample.mask, sample.caption, steps=2, seed=3)
    assert np.array_equal(got.canvas, want.canvas) and got.recomposition_error == want.recomposition_error
    composed = pipe.compose(got.layer, got.background, sample.mask, sample.caption, steps=2, seed=4)
    assert np.array_equal(composed, model.compose(got.layer, got.background, sample.mask, sample.caption,
                                                  steps=2, seed=4))
    with pytest.raises(FileNotFoundError, match="not an in-context LoRA"):
        InContextPipeline.from_checkpoint(tmp_path)
