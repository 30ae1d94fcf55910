"""The exact space-to-depth autoencoder (issue 14) and the tiny in-context bases that use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerloop.datasets.logos import logo_samples
from layerloop.models import incontext_base
from layerloop.models.incontext import CanvasBatch, InContextLoRA
from layerloop.models.incontext_pipeline import InContextPipeline, base_model, build_model
from layerloop.models.space_to_depth import SpaceToDepthAutoencoder


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_decode_of_encode_is_the_input_exactly(factor):
    vae = SpaceToDepthAutoencoder(factor=factor)
    x = _pixels(2, 3, 16, 24)
    posterior = vae.encode(x).latent_dist
    z = posterior.mode()
    assert z.shape == (2, 3 * factor * factor, 16 // factor, 24 // factor)
    assert torch.equal(posterior.sample(torch.Generator()), z) and torch.equal(posterior.kl(), torch.zeros(2))
    assert torch.equal(vae.decode(z).sample, x)  # bit for bit in float32
    assert torch.equal(vae(x).sample, x) and torch.equal(vae.decode(z, return_dict=False)[0], x)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == factor
    assert vae.config.latent_channels == 3 * factor * factor
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.0, 0.0)


def test_exact_in_bfloat16_and_uint8_levels():
    vae = SpaceToDepthAutoencoder().to(torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and not list(vae.parameters())
    levels = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float() / 127.5 - 1
    x = levels.to(torch.bfloat16)
    assert torch.equal(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)


def test_save_and_load_round_trip(tmp_path):
    vae = SpaceToDepthAutoencoder(factor=4, scaling_factor=0.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path / "vae")
    loaded = SpaceToDepthAutoencoder.from_pretrained(tmp_path / "vae")
    keys = ("in_channels", "factor", "scaling_factor", "shift_factor", "latent_channels", "block_out_channels")
    assert [loaded.config[k] for k in keys] == [vae.config[k] for k in keys] == [3, 4, 0.5, 0.25, 48, [3, 12, 48]]
    assert not loaded.training
    x = _pixels(1, 3, 8, 8)
    assert torch.equal(loaded.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode())
    assert SpaceToDepthAutoencoder.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(TypeError, match="unexpected options"):
        SpaceToDepthAutoencoder.from_pretrained(tmp_path / "vae", variant="fp16")


def test_bad_input_is_a_clear_error():
    vae = SpaceToDepthAutoencoder()
    with pytest.raises(ValueError, match="multiple of the space-to-depth factor 2"):
        vae.encode(_pixels(1, 3, 7, 8))
    with pytest.raises(ValueError, match="4 channels; this autoencoder expects 3"):
        vae.encode(_pixels(1, 4, 8, 8))
    with pytest.raises(ValueError, match="B x C x H x W"):
        vae.encode(_pixels(3, 8, 8))
    with pytest.raises(ValueError, match="expects 12"):
        vae.decode(_pixels(1, 4, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        SpaceToDepthAutoencoder(factor=3)
    with pytest.raises(ValueError, match="does not match"):
        SpaceToDepthAutoencoder(latent_channels=4)
    with pytest.raises(ValueError, match="does not match factor"):
        SpaceToDepthAutoencoder(block_out_channels=[3])


def test_tiny_model_ids_and_base_names():
    parse = incontext_base.parse_tiny_model
    assert [parse(m) for m in ("tiny", "tiny:3", "tiny:s2d", "tiny:s2d-7")] == \
        [("kl", 0), ("kl", 3), ("s2d", 0), ("s2d", 7)]
    assert parse("black-forest-labs/FLUX.1-Fill-dev") is None and parse("runs/base/final") is None
    with pytest.raises(ValueError, match="tiny:s2d-SEED"):
        parse("tiny:vq")
    for variant, seed in (("kl", 0), ("kl", 5), ("s2d", 0), ("s2d", 12)):
        name = incontext_base.tiny_base_name(variant, seed)
        assert incontext_base.parse_tiny_base_name(name) == (variant, seed)
        assert parse(incontext_base.tiny_model_id(variant, seed)) == (variant, seed)
    assert incontext_base.tiny_base_name("kl", 4) == "tiny-4"  # what existing checkpoints record
    assert incontext_base.parse_tiny_base_name("black-forest-labs/FLUX.1-Fill-dev") is None


def test_tiny_kl_is_the_historical_model():
    """``tiny`` keeps its weights: existing checkpoints and fingerprints name it."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.0, shift_factor=0.0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=48, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    model = InContextLoRA.tiny(seed=2)
    assert model.config.base_model == "tiny-2"
    for want, got in ((vae, model.vae), (transformer, model.transformer)):
        state = {k.replace(".base_layer", ""): v for k, v in got.state_dict().items() if "lora_" not in k}
        assert state.keys() == want.state_dict().keys()
        assert all(torch.equal(v, state[k]) for k, v in want.state_dict().items())


def test_in_context_model_on_the_space_to_depth_vae_reconstructs_panels():
    model = InContextLoRA.tiny(seed=1, vae="s2d")
    assert isinstance(model.vae, SpaceToDepthAutoencoder)
    assert (model.latent_channels, model.vae_scale) == (12, 2)
    assert model.transformer.config.in_channels == 8 * 12 + 4 * 2 ** 2
    assert model.config.base_model == "tiny-s2d-1"
    sample = next(iter(logo_samples(1, seed=0, size=64)))
    batch = CanvasBatch.from_samples([sample])
    latents = model.encode(batch)
    panels = model.unpack(latents.x0, 64, 64).chunk(4, dim=3)
    decoded = torch.cat([model.decode_panel(p) for p in panels], dim=3)
    original = torch.cat([batch.panels[name] for name in ("composite", "layer", "alpha", "background")], dim=3)
    assert torch.equal(decoded, original)


def test_tiny_s2d_checkpoint_reloads_with_its_base(tmp_path):
    model = build_model("tiny:s2d-3", None, torch.float32, "cpu", {"rank": 2, "alpha": 2.0})
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05)
    model.save_lora(tmp_path / "ckpt")
    assert base_model(tmp_path / "ckpt") == ("tiny:s2d-3", None)
    pipe = InContextPipeline.from_checkpoint(tmp_path / "ckpt")
    assert isinstance(pipe.model.vae, SpaceToDepthAutoencoder) and pipe.model.config.rank == 2
    sample = next(iter(logo_samples(1, seed=0, size=64)))
    got = pipe(sample.composite, sample.mask, sample.caption, steps=2, seed=1)
    want = InContextPipeline(model).decompose(sample.composite, sample.mask, sample.caption, steps=2, seed=1)
    assert np.array_equal(got.canvas, want.canvas)


def test_base_folder_round_trip(tmp_path):
    parts = incontext_base.tiny_components("s2d", 4, layers=1, single_layers=1, heads=2, head_dim=16)
    folder = incontext_base.save_base(tmp_path / "base", *parts, info={"note": "test"})
    assert incontext_base.is_base_folder(folder) and not incontext_base.is_base_folder(tmp_path)
    assert incontext_base.base_vae_scale(str(folder)) == 2
    transformer, vae, text = incontext_base.load_base(folder)
    for want, got in ((parts[0], transformer), (parts[2], text)):
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in want.state_dict().items())
    assert isinstance(vae, SpaceToDepthAutoencoder)
    model = InContextLoRA.from_pretrained(str(folder), dtype=torch.float32, rank=2, alpha=2.0)
    assert model.config.base_model == str(folder.resolve()) and model.latent_channels == 12
    with pytest.raises(FileNotFoundError, match="not a tiny in-context base folder"):
        incontext_base.load_base(tmp_path)
