"""BFS generator on the tiny random Flux-Fill config (CPU)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxFillPipeline
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from layerloop.models import bfs, hub
from layerloop.models.bfs_modules import TEXT_TOKENS_KWARG

B, H_LAT, W_LAT, TXT = 2, 8, 8, 7  # tiny VAE: 4 latent channels, scale factor 2 -> 16x16 pixels


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    mask = torch.zeros(B, 1, 2 * H_LAT, 2 * W_LAT)
    mask[:, :, 4:12, 6:14] = 1.0
    return SimpleNamespace(
        z0_c=rand(B, 4, H_LAT, W_LAT),
        z0_f=rand(B, 4, H_LAT, W_LAT),
        z1_c=rand(B, 4, H_LAT, W_LAT),
        z1_f=rand(B, 4, H_LAT, W_LAT),
        z_b=rand(B, 4, H_LAT, W_LAT),
        mask=mask,
        text=rand(B, TXT, 32),
        pooled=rand(B, 32),
        t=torch.tensor([0.3, 0.8]),
        img_ids=bfs.latent_image_ids(H_LAT, W_LAT),
        txt_ids=bfs.text_ids(TXT),
    )


def _velocities(generator: bfs.BFSGenerator, d, latents_f=None):
    z_t_c = bfs.noisy_latents(d.z0_c, d.z1_c, d.t)
    z_t_f = bfs.noisy_latents(d.z0_f, d.z1_f, d.t) if latents_f is None else latents_f
    cond = bfs.fill_condition(d.z_b, d.mask)
    v_c, v_f = generator(
        bfs.pack_latents(z_t_c), bfs.pack_latents(z_t_f), cond, d.t, d.text, d.pooled, 30.0, d.img_ids, d.txt_ids
    )
    return bfs.unpack_latents(v_c, H_LAT, W_LAT), bfs.unpack_latents(v_f, H_LAT, W_LAT)


def _randomise_trainables(generator: bfs.BFSGenerator, seed: int = 3, scale: float = 0.2):
    """Give LoRA up-projections and g's last layer (zero at init) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in generator.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# -- reference implementation of the formulas, with plain torch ops -----------------------------------


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, cos, sin):
    # Rotate consecutive channel pairs (x0 + i x1) by the angle whose cos/sin Flux repeats per pair.
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    angle = torch.atan2(sin[:, ::2], cos[:, ::2]).float()
    rotation = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2)


def _reference_message(attn, lora, x_receive, x_send, rope):
    """softmax(Q_recv K_send^T / sqrt(d)) V_send with W' = W + (alpha/r) B A (merged weights)."""
    heads, d = attn.heads, attn.head_dim

    def project(linear, delta, x):
        weight = linear.weight + delta.scale * delta.up.weight @ delta.down.weight
        return (x @ weight.T + linear.bias).reshape(x.shape[0], x.shape[1], heads, d)

    q = _rms(project(attn.to_q, lora.q, x_receive), attn.norm_q.weight, attn.norm_q.eps)
    k = _rms(project(attn.to_k, lora.k, x_send), attn.norm_k.weight, attn.norm_k.eps)
    v = project(attn.to_v, lora.v, x_send)
    if rope is not None:
        q, k = _rope(q, *rope), _rope(k, *rope)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, N, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).permute(0, 2, 1, 3).reshape(x_receive.shape[0], x_receive.shape[1], heads * d)


def _reference_residuals(proc, z_c_to_f, z_f_to_c):
    lin1, lin2 = proc.g[0], proc.g[2]
    hidden = F.gelu(torch.cat([z_f_to_c, z_c_to_f], -1) @ lin1.weight.T + lin1.bias, approximate="tanh")
    r_c, r_f = (hidden @ lin2.weight.T + lin2.bias).chunk(2, dim=-1)
    return torch.cat([r_c, r_f], dim=0)


# -- the information-sharing module -------------------------------------------------------------------


@pytest.mark.parametrize("use_rope", [True, False])
def test_cross_attention_matches_formulas(use_rope):
    config = bfs.BFSConfig(rank=4, alpha=8.0, mlp_hidden=16, use_rope=use_rope, base_model_id="tiny:0")
    models = bfs.tiny(0, config)
    _randomise_trainables(models.generator)
    transformer = models.generator.transformer
    n = (H_LAT // 2) * (W_LAT // 2)
    cos, sin = transformer.pos_embed(bfs.latent_image_ids(H_LAT, W_LAT))
    rope = (cos, sin) if use_rope else None
    torch.manual_seed(0)
    assert set(models.generator.processors) == {"transformer_blocks.0", "single_transformer_blocks.0"}
    for proc_path, proc in models.generator.processors.items():
        attn = transformer.get_submodule(proc_path).attn
        x = torch.randn(2 * B, n, attn.query_dim)
        with torch.no_grad():
            z_c_to_f, z_f_to_c = proc.messages(attn, x, (cos, sin))
            x_c, x_f = x.chunk(2)
            ref_c_to_f = _reference_message(attn, proc.c2f, x_f, x_c, rope)
            ref_f_to_c = _reference_message(attn, proc.f2c, x_c, x_f, rope)
        torch.testing.assert_close(z_c_to_f, ref_c_to_f, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z_f_to_c, ref_f_to_c, rtol=1e-4, atol=1e-5)
        # The two directions use different LoRA sets, so they are not the same function of (x_C, x_F).
        assert not torch.allclose(z_c_to_f, ref_c_to_f.roll(1, 0), atol=1e-3)


def test_processor_adds_g_residual_to_self_attention_output():
    models = bfs.tiny(0)
    _randomise_trainables(models.generator)
    transformer = models.generator.transformer
    n = (H_LAT // 2) * (W_LAT // 2)
    ids = torch.cat([bfs.text_ids(TXT), bfs.latent_image_ids(H_LAT, W_LAT)])
    cos, sin = transformer.pos_embed(ids)
    image_rope = (cos[TXT:], sin[TXT:])
    base = FluxAttnProcessor()
    torch.manual_seed(0)
    with torch.no_grad():
        # Double-stream block: image and text tokens arrive separately.
        attn = transformer.transformer_blocks[0].attn
        proc = attn.processor
        img, txt = torch.randn(2 * B, n, attn.query_dim), torch.randn(2 * B, TXT, attn.query_dim)
        img_out, txt_out = attn(hidden_states=img, encoder_hidden_states=txt, image_rotary_emb=(cos, sin))
        base_img, base_txt = base(attn, img, txt, None, (cos, sin))
        x_c, x_f = img.chunk(2)
        expected = _reference_residuals(
            proc,
            _reference_message(attn, proc.c2f, x_f, x_c, image_rope),
            _reference_message(attn, proc.f2c, x_c, x_f, image_rope),
        )
        torch.testing.assert_close(img_out - base_img, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(txt_out, base_txt)

        # Single-stream block: one [text, image] sequence; only the image tokens get the residual.
        attn = transformer.single_transformer_blocks[0].attn
        proc = attn.processor
        seq = torch.randn(2 * B, TXT + n, attn.query_dim)
        out = attn(hidden_states=seq, image_rotary_emb=(cos, sin), **{TEXT_TOKENS_KWARG: TXT})
        base_out = base(attn, seq, None, None, (cos, sin))
        x_c, x_f = seq[:, TXT:].chunk(2)
        expected = _reference_residuals(
            proc,
            _reference_message(attn, proc.c2f, x_f, x_c, image_rope),
            _reference_message(attn, proc.f2c, x_c, x_f, image_rope),
        )
        torch.testing.assert_close(out[:, TXT:] - base_out[:, TXT:], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[:, :TXT], base_out[:, :TXT])
        with pytest.raises(ValueError, match=TEXT_TOKENS_KWARG):
            proc(attn, seq, None, None, (cos, sin))


def test_untrained_generator_equals_frozen_backbone():
    models = bfs.tiny(0)
    plain = bfs.tiny_transformer(0)  # same seed: identical weights, diffusers' own processors
    d = _batch()
    with torch.no_grad():
        v_c, v_f = _velocities(models.generator, d)
        z_t_c = bfs.pack_latents(bfs.noisy_latents(d.z0_c, d.z1_c, d.t))
        z_t_f = bfs.pack_latents(bfs.noisy_latents(d.z0_f, d.z1_f, d.t))
        cond = bfs.fill_condition(d.z_b, d.mask)
        out = plain(
            hidden_states=torch.cat([torch.cat([z_t_c, cond], -1), torch.cat([z_t_f, cond], -1)]),
            encoder_hidden_states=torch.cat([d.text, d.text]),
            pooled_projections=torch.cat([d.pooled, d.pooled]),
            timestep=torch.cat([d.t, d.t]),
            guidance=torch.full((2 * B,), 30.0),
            img_ids=d.img_ids,
            txt_ids=d.txt_ids,
            return_dict=False,
        )[0]
        ref_c, ref_f = (bfs.unpack_latents(x, H_LAT, W_LAT) for x in out.chunk(2))
        torch.testing.assert_close(v_c, ref_c, rtol=0, atol=1e-6)
        torch.testing.assert_close(v_f, ref_f, rtol=0, atol=1e-6)
        # With g at zero, nothing crosses between branches.
        v_c_other, _ = _velocities(models.generator, d, latents_f=torch.randn_like(d.z0_f))
        torch.testing.assert_close(v_c_other, v_c, rtol=0, atol=1e-6)


def test_trained_sharing_couples_the_branches():
    models = bfs.tiny(0)
    _randomise_trainables(models.generator)
    d = _batch()
    with torch.no_grad():
        v_c, _ = _velocities(models.generator, d)
        v_c_other, _ = _velocities(models.generator, d, latents_f=torch.randn_like(d.z0_f))
    assert (v_c - v_c_other).abs().max() > 1e-3


def test_only_lora_and_g_receive_gradients():
    models = bfs.tiny(0)
    generator, phi = models.generator, models.compositor.requires_grad_(False)
    d = _batch()
    v_c, v_f = _velocities(generator, d)
    losses = bfs.stage1_loss(
        phi, v_c=v_c, v_f=v_f, z0_c=d.z0_c, z0_f=d.z0_f, z1_c=d.z1_c, z1_f=d.z1_f, z_b=d.z_b, t=d.t
    )
    losses["loss"].backward()
    trainable = {id(p) for p in generator.trainable_parameters()}
    named = dict(generator.named_parameters())
    assert len(trainable) == len(generator.lora_state_dict())
    for name, p in named.items():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None, name
            assert ".processor.c2f." in name or ".processor.f2c." in name or ".processor.g." in name, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is None for p in phi.parameters())
    # g's zero-initialised output layer is where learning starts; it must see a non-zero gradient.
    assert any(proc.g[2].weight.grad.abs().sum() > 0 for proc in generator.processors.values())


def test_overfitting_a_fixed_batch_reduces_the_loss():
    models = bfs.tiny(0)
    generator, phi = models.generator, models.compositor.requires_grad_(False)
    d = _batch()
    frozen_before = {k: v.clone() for k, v in generator.transformer.state_dict().items() if ".processor." not in k}
    optimiser = torch.optim.Adam(generator.trainable_parameters(), lr=1e-2)
    history = []
    for _ in range(60):
        v_c, v_f = _velocities(generator, d)
        loss = bfs.stage1_loss(
            phi, v_c=v_c, v_f=v_f, z0_c=d.z0_c, z0_f=d.z0_f, z1_c=d.z1_c, z1_f=d.z1_f, z_b=d.z_b, t=d.t
        )["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.75 * history[0], history
    frozen_after = {k: v for k, v in generator.transformer.state_dict().items() if ".processor." not in k}
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)


def test_gradient_checkpointing_gives_the_same_gradients():
    # The trainer needs checkpointing at FLUX size; the processors must survive the re-run forward.
    d = _batch()
    grads = []
    for checkpointing in (False, True):
        models = bfs.tiny(0)
        _randomise_trainables(models.generator)
        if checkpointing:
            models.generator.transformer.enable_gradient_checkpointing()
        v_c, v_f = _velocities(models.generator, d)
        (v_c.square().mean() + v_f.abs().mean()).backward()
        grads.append([p.grad.clone() for p in models.generator.trainable_parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


# -- losses and the stage-2 sampler -------------------------------------------------------------------


def test_flow_matching_identities():
    d = _batch()
    torch.testing.assert_close(bfs.noisy_latents(d.z0_c, d.z1_c, torch.zeros(B)), d.z0_c)
    torch.testing.assert_close(bfs.noisy_latents(d.z0_c, d.z1_c, torch.ones(B)), d.z1_c)
    z_t = bfs.noisy_latents(d.z0_c, d.z1_c, d.t)
    true_v = bfs.flow_matching_target(d.z0_c, d.z1_c)
    torch.testing.assert_close(bfs.denoised_estimate(z_t, true_v, d.t), d.z0_c)
    assert bfs.flow_matching_loss(true_v, d.z0_c, d.z1_c).item() == 0.0
    # L_comp is zero when Phi maps the exact foreground estimate onto the exact composite estimate.
    identity_phi = lambda z_f, z_b: z_f  # noqa: E731
    assert bfs.composition_loss(identity_phi, d.z0_c, d.z_b, d.z0_c).item() == 0.0


@pytest.mark.parametrize("branch, supervised", [("real", "c"), ("reg", "f")])
def test_stage2_loss_supervises_one_branch(branch, supervised):
    d = _batch()
    v_c = torch.randn_like(d.z0_c, requires_grad=True)
    v_f = torch.randn_like(d.z0_f, requires_grad=True)
    kwargs = dict(v_c=v_c, v_f=v_f, z0_c=d.z0_c, z0_f=d.z0_f, z1_c=d.z1_c, z1_f=d.z1_f, z_b=d.z_b, t=d.t)
    phi = bfs.LatentCompositor(4, hidden_channels=8)
    out = bfs.stage2_loss(branch, phi, comp_weight=0.0, **kwargs)
    out["loss"].backward()
    other = v_f if supervised == "c" else v_c
    assert other.grad is None or other.grad.abs().max() == 0
    full = bfs.stage2_loss(branch, phi, **kwargs)
    torch.testing.assert_close(full["loss"], full["fm"] + 0.5 * full["comp"])
    with pytest.raises(ValueError):
        bfs.stage2_loss("both", phi, **kwargs)


def test_stage2_branch_ratio_and_determinism():
    draws = [bfs.stage2_branch(step, seed=7) for step in range(1000)]
    assert set(draws) == {"real", "reg"}
    share_real = draws.count("real") / len(draws)
    assert 0.75 <= share_real <= 0.85, share_real  # binomial sd is 0.013: this is > 3.5 sd either side
    assert draws == [bfs.stage2_branch(step, seed=7) for step in range(1000)]
    # Resuming at step 500 draws what the uninterrupted run drew there.
    assert [bfs.stage2_branch(step, seed=7) for step in range(500, 1000)] == draws[500:]
    assert draws != [bfs.stage2_branch(step, seed=8) for step in range(1000)]


# -- Phi, RGBA VAE, packing ---------------------------------------------------------------------------


def test_latent_compositor_shapes_and_init():
    phi = bfs.LatentCompositor(4, hidden_channels=8)
    d = _batch()
    out = phi(d.z0_f, d.z_b)
    assert out.shape == d.z0_f.shape
    torch.testing.assert_close(out, (d.z0_f + d.z_b) / 2)  # zero last layer: gate 0.5, no residual
    loss = bfs.compositor_loss(phi, d.z0_f, d.z_b, d.z0_c)
    loss.backward()
    assert all(p.grad is not None for p in phi.parameters())


def test_rgba_vae_shapes_and_init_reproduces_rgb_vae():
    models = bfs.tiny(0)
    vae, rgba_vae = models.vae.eval(), models.rgba_vae.eval()
    assert rgba_vae.config.in_channels == 4 and rgba_vae.config.out_channels == 4
    torch.manual_seed(0)
    rgb = torch.rand(B, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_rgb = bfs.encode_latents(vae, rgb)
        for alpha in (torch.ones(B, 1, 16, 16), torch.rand(B, 1, 16, 16) * 2 - 1):
            z_rgba = bfs.encode_latents(rgba_vae, torch.cat([rgb, alpha], dim=1))
            assert z_rgba.shape == z_rgb.shape == (B, 4, 8, 8)
            torch.testing.assert_close(z_rgba, z_rgb)  # alpha input filters start at zero
        raw_rgb = vae.decode(z_rgb).sample
        raw_rgba = rgba_vae.decode(z_rgb).sample
    assert raw_rgba.shape == (B, 4, 16, 16)
    torch.testing.assert_close(raw_rgba[:, :3], raw_rgb)
    torch.testing.assert_close(raw_rgba[:, 3], raw_rgb.mean(dim=1))  # alpha = mean of the RGB filters
    with pytest.raises(ValueError):
        bfs.make_rgba_vae(rgba_vae)


def test_packing_matches_flux_fill_pipeline():
    latents = torch.randn(B, 4, H_LAT, W_LAT)
    packed = bfs.pack_latents(latents)
    torch.testing.assert_close(packed, FluxFillPipeline._pack_latents(latents, B, 4, H_LAT, W_LAT))
    torch.testing.assert_close(bfs.unpack_latents(packed, H_LAT, W_LAT), latents)
    d = _batch()
    # Run the pipeline's own prepare_mask_latents on already-encoded latents (it then skips the VAE).
    fake_pipe = SimpleNamespace(
        vae_scale_factor=2,
        vae=SimpleNamespace(config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0)),
        _pack_latents=FluxFillPipeline._pack_latents,
    )
    mask_ref, bg_ref = FluxFillPipeline.prepare_mask_latents(
        fake_pipe, d.mask, d.z_b, B, 4, 1, 2 * H_LAT, 2 * W_LAT, torch.float32, "cpu", None
    )
    torch.testing.assert_close(bfs.fill_condition(d.z_b, d.mask), torch.cat([bg_ref, mask_ref], dim=-1))


# -- checkpoints and inference ------------------------------------------------------------------------


def test_save_load_lora_round_trip(tmp_path):
    trained = bfs.tiny(0).generator
    _randomise_trainables(trained)
    path = trained.save_lora(tmp_path / "ckpt")
    assert (path / bfs.LORA_WEIGHTS_NAME).is_file() and (path / bfs.LORA_CONFIG_NAME).is_file()
    d = _batch()
    fresh = bfs.tiny(0).generator
    with torch.no_grad():
        expected = _velocities(trained, d)
        assert not torch.allclose(_velocities(fresh, d)[0], expected[0])
        fresh.load_lora(path)
        for got, want in zip(_velocities(fresh, d), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        # The inference entry point rebuilds the (tiny) base named in the checkpoint.
        rebuilt = bfs.load_generator(path, dtype=torch.float32)
        for got, want in zip(_velocities(rebuilt, d), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bfs.lora_checkpoint_hash(path) == bfs.lora_checkpoint_hash(trained.save_lora(tmp_path / "again"))
    other_rank = bfs.tiny(0, bfs.BFSConfig(rank=2, alpha=2.0, mlp_hidden=16, base_model_id="tiny:0")).generator
    with pytest.raises(ValueError, match="rank"):
        other_rank.load_lora(path)


def test_generate_runs_end_to_end(tmp_path):
    models = bfs.tiny(0)
    _randomise_trainables(models.generator, scale=0.05)
    models.generator.save_lora(tmp_path / "ckpt")
    generator = bfs.load_generator(tmp_path / "ckpt", dtype=torch.float32)
    d = _batch()
    kwargs = dict(num_steps=3, seed=5, vae=models.vae, rgba_vae=models.rgba_vae)
    out = bfs.generate(generator, d.z_b, d.mask, d.text, d.pooled, **kwargs)
    assert out.latents_c.shape == out.latents_f.shape == (B, 4, H_LAT, W_LAT)
    assert out.image_c.shape == (B, 3, 16, 16) and out.image_f.shape == (B, 4, 16, 16)
    assert torch.isfinite(out.latents_c).all() and torch.isfinite(out.latents_f).all()
    assert out.image_c.abs().max() <= 1 and out.image_f.abs().max() <= 1
    again = bfs.generate(generator, d.z_b, d.mask, d.text, d.pooled, **kwargs)
    torch.testing.assert_close(again.latents_c, out.latents_c, rtol=0, atol=0)
    sigmas = bfs.flux_sigmas(3, 16)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_from_pretrained_offline_names_the_model_and_the_fix():
    with pytest.raises(hub.ModelNotAvailable, match=r"(?s)layerloop-test/no-such-model.*layerloop models pull"):
        bfs.from_pretrained("layerloop-test/no-such-model", local_files_only=True)


def test_from_pretrained_loads_a_local_flux_fill_folder(tmp_path):
    # Same folder layout as the Hub repository: <root>/transformer and <root>/vae.
    bfs.tiny_transformer(0).save_pretrained(tmp_path / "transformer")
    bfs.tiny_vae(0).save_pretrained(tmp_path / "vae")
    models = bfs.from_pretrained(str(tmp_path), dtype=torch.float32, local_files_only=True)
    assert models.generator.config.base_model_id == str(tmp_path)
    assert models.rgba_vae.config.in_channels == 4 and models.vae_scale_factor == 2
    assert all(not p.requires_grad for p in models.vae.parameters())
    d = _batch()
    with torch.no_grad():
        loaded = _velocities(models.generator, d)
        expected = _velocities(bfs.tiny(0).generator, d)  # untrained sharing: equal to the same backbone
    for got, want in zip(loaded, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_pipeline_matches_the_sampler_and_is_per_sample(tmp_path, noise):
    from layerloop.models.bfs_pipeline import BFSPipeline, to_uint8

    models = bfs.tiny(0)
    _randomise_trainables(models.generator, scale=0.05)
    models.generator.save_lora(tmp_path / "ckpt")
    pipe = BFSPipeline.from_checkpoint(tmp_path / "ckpt", dtype=torch.float32, guidance=30.0)
    assert pipe.checkpoint_hash == bfs.lora_checkpoint_hash(tmp_path / "ckpt") and pipe.size_multiple == 4
    g = torch.Generator().manual_seed(0)
    backgrounds = torch.randint(0, 256, (2, 16, 12, 3), generator=g, dtype=torch.uint8).numpy()
    masks = torch.zeros(2, 16, 12, dtype=torch.uint8)
    masks[:, 4:12, 2:10] = 255
    out = pipe(backgrounds, masks.numpy(), ["a", "b"], [5, 6], steps=2, noise=noise)
    assert out.composite.shape == (2, 16, 12, 3) and out.foreground.shape == (2, 16, 12, 4)
    alone = pipe(backgrounds[1:], masks[1:].numpy(), ["b"], [6], steps=2, noise=noise)
    # Its batch mate does not change a sample's output: each sample's noise comes from its own seed. Up to float
    # rounding only: a matmul over a batch of 1 or 2 may sum in another order (BLAS blocking), which can move a
    # value across a rounding boundary of the 8-bit output (measured: 1 pixel of 576 one step apart, with
    # independent noise, on this machine's torch 2.14.1 CPU build), so the check allows one step.
    for got, want in ((alone.composite[0], out.composite[1]), (alone.foreground[0], out.foreground[1])):
        difference = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    # the same numbers as bfs.sample_latents with that sample's noise
    with torch.no_grad():
        pixels = torch.from_numpy(backgrounds[1:]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z_b = bfs.encode_latents(pipe.vae, pixels)
        # shared: one draw for both branches; independent: two, C's first (the draws of before #15)
        draws = torch.randn(1 if noise == "shared" else 2, *z_b.shape[1:], generator=torch.Generator().manual_seed(6))
        text = pipe.text_encoder(["b"])
        _, latents_f = bfs.sample_latents(pipe.generator, z_b, (masks[1:, None] > 0).float(), text.embeds,
                                          text.pooled, draws[:1], draws[-1:], num_steps=2, guidance=30.0)
    assert (to_uint8(bfs.decode_latents(pipe.rgba_vae, latents_f))[0] == alone.foreground[0]).all()  # both batches of 1


# --------------------------------------------------------------------------- one noise for both branches (#15)
def _record_branch_inputs(generator: bfs.BFSGenerator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap the generator: every call appends the (latents_c, latents_f) it received."""
    seen, original = [], generator.forward

    def forward(latents_c, latents_f, *args, **kwargs):
        seen.append((latents_c.detach().clone(), latents_f.detach().clone()))
        return original(latents_c, latents_f, *args, **kwargs)

    generator.forward = forward
    return seen


def test_branch_noise_is_one_draw_or_two():
    c, f = bfs.branch_noise((2, 4, 3, 3), torch.Generator().manual_seed(0))
    assert c is f  # the default is the paper's
    c, f = bfs.branch_noise((2, 4, 3, 3), torch.Generator().manual_seed(0), "independent")
    assert not torch.equal(c, f)
    g = torch.Generator().manual_seed(0)
    expected = (torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g))
    assert torch.equal(c, expected[0]) and torch.equal(f, expected[1])  # the draws of before #15
    with pytest.raises(ValueError, match="noise must be one of"):
        bfs.branch_noise((1,), torch.Generator(), "per-branch")


@pytest.mark.parametrize("noise", [None, "shared", "independent"])
def test_generate_gives_both_branches_one_noise_unless_independent(noise):
    models = bfs.tiny(0)
    _randomise_trainables(models.generator, scale=0.05)
    seen = _record_branch_inputs(models.generator)
    d = _batch()
    out = bfs.generate(models.generator, d.z_b, d.mask, d.text, d.pooled, num_steps=2, seed=5,
                       **({} if noise is None else {"noise": noise}))
    assert len(seen) == 2
    first_c, first_f = seen[0]  # at t = 1 the branches' inputs are their noise
    if noise == "independent":
        assert not torch.equal(first_c, first_f)
    else:
        assert torch.equal(first_c, first_f)
        assert not torch.equal(out.latents_c, out.latents_f)  # the branches still differ in what they make


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_pipeline_gives_both_branches_one_noise_unless_independent(tmp_path, noise):
    from layerloop.models.bfs_pipeline import BFSPipeline

    models = bfs.tiny(0)
    models.generator.save_lora(tmp_path / "ckpt")
    pipe = BFSPipeline.from_checkpoint(tmp_path / "ckpt", dtype=torch.float32, guidance=30.0)
    seen = _record_branch_inputs(pipe.generator)
    backgrounds = torch.randint(0, 256, (2, 8, 8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    masks = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    pipe(backgrounds.numpy(), masks.numpy(), ["a", "b"], [5, 6], steps=1, noise=noise)
    (first_c, first_f), = seen
    assert torch.equal(first_c, first_f) == (noise == "shared")
    assert not torch.equal(first_c[0], first_c[1])  # still one draw per sample
    with pytest.raises(ValueError, match="noise must be one of"):
        pipe(backgrounds.numpy(), masks.numpy(), ["a", "b"], [5, 6], steps=1, noise="per-branch")
