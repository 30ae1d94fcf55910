"""BFS generator: a frozen FLUX.1-Fill-dev transformer run as two branches (composite C, foreground F)
that exchange information through trainable cross-branch attention in every block.

What lives here: the generator wrapper (`BFSGenerator`), its loading (`from_pretrained`, `tiny`,
`load_generator`), LoRA checkpoints (`save_lora` / `load_lora`) and the two-branch Euler sampler
(`sample_latents`, `generate`; the schedule and loop are `sampling.py`'s). Elsewhere: the pieces this file
builds on (`bfs_modules.py`), the training losses (`bfs_losses.py`, re-exported here), the frozen
components around the generator (`bfs_components.py`: VAEs, Phi, text encoders) and the inference pipeline
(`bfs_pipeline.BFSPipeline`, what the `generate-bfs` stage calls).

Latent conventions: spatial latents are (B, C, h, w) and normalised as Flux expects
(`encode_latents`); the transformer sees packed tokens (B, h/2 * w/2, 4C) (`pack_latents`).
C and B use the RGB VAE, F uses the RGBA VAE (`make_rgba_vae`), which share one latent space at init.

Flow matching follows the Flux convention: `z_t = (1 - t) z0 + t z1` with z0 the data and z1 noise,
velocity target `z1 - z0`, and the transformer's `timestep` argument is t itself in [0, 1].

Noise of the two branches (`branch_noise`, used by training and inference alike): "shared" (the default, the
BFS paper's: one noise draw interpolated with each data latent, Eq. 6, and at inference one noise tensor
duplicated for the two branches) or "independent" (one draw per branch, what this project did before #15).

Foreground extraction (the paper's application) is `sample_latents(composite_latents=...)`: the composite branch
follows the given composite's forward process instead of being integrated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention
from safetensors.torch import load_file, save_file

from layerloop.files import atomic_path, sha256_file, write_json_atomic
from layerloop.models import hub
from layerloop.models.bfs_losses import (  # noqa: F401  (re-exported)
    composition_loss,
    compositor_loss,
    denoised_estimate,
    flow_matching_loss,
    flow_matching_target,
    noisy_latents,
    stage1_loss,
    stage2_branch,
    stage2_loss,
)
from layerloop.models.bfs_modules import (
    TEXT_TOKENS_KWARG,
    InformationSharingProcessor,
    LatentCompositor,
    decode_latents,
    encode_latents,
    fill_condition,
    latent_image_ids,
    make_rgba_vae,
    pack_latents,
    pack_mask,
    text_ids,
    unpack_latents,
    vae_scale_factor,
)
from layerloop.models.sampling import euler_sample, sigma_schedule

__all__ = [
    "BFSConfig",
    "BFSGenerator",
    "BFSModels",
    "BFSGeneration",
    "InformationSharingProcessor",
    "LatentCompositor",
    "DEFAULT_MODEL_ID",
    "LORA_WEIGHTS_NAME",
    "LORA_CONFIG_NAME",
    "make_rgba_vae",
    "from_pretrained",
    "tiny",
    "load_generator",
    "lora_checkpoint_hash",
    "generate",
    "sample_latents",
    "branch_noise",
    "NOISE_CHOICES",
    "flux_sigmas",
    "read_lora_config",
    "tiny_transformer",
    "tiny_vae",
    "noisy_latents",
    "flow_matching_target",
    "denoised_estimate",
    "flow_matching_loss",
    "composition_loss",
    "compositor_loss",
    "stage1_loss",
    "stage2_loss",
    "stage2_branch",
    "pack_latents",
    "unpack_latents",
    "pack_mask",
    "fill_condition",
    "latent_image_ids",
    "text_ids",
    "encode_latents",
    "decode_latents",
    "vae_scale_factor",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "black-forest-labs/FLUX.1-Fill-dev"
LORA_WEIGHTS_NAME = "bfs_lora.safetensors"
LORA_CONFIG_NAME = "bfs_lora.json"
LORA_FORMAT = "layerloop-bfs-lora"
LORA_FORMAT_VERSION = 1
# How the two branches' noise is drawn (`branch_noise`); the first is the default (the paper's).
NOISE_CHOICES = ("shared", "independent")
Noise = Literal["shared", "independent"]
# Base-model ids of this form name a `tiny(seed)` backbone, so a LoRA trained on the demo's tiny model
# can be reloaded for inference without any download.
TINY_PREFIX = "tiny:"


@dataclass(frozen=True)
class BFSConfig:
    """Shape of the trainable part. Everything except `base_model_id`/`base_revision` must match
    between a checkpoint and the generator it is loaded into."""

    rank: int = 16
    alpha: float = 16.0
    # Hidden width of g. At FLUX size g maps 2 x 3072 -> mlp_hidden -> 2 x 3072 in each of the 57
    # blocks: 128 keeps g (~90 M parameters) of the same order as the LoRAs rather than dominating.
    mlp_hidden: int = 128
    use_rope: bool = True
    share_single_blocks: bool = True
    base_model_id: str = DEFAULT_MODEL_ID
    base_revision: str | None = None

    STRUCTURAL = ("rank", "alpha", "mlp_hidden", "use_rope", "share_single_blocks")


class BFSGenerator(nn.Module):
    """Frozen Flux-Fill transformer with an `InformationSharingProcessor` in every block's attention.

    `forward` runs C and F as one batch `[C, F]` through the shared backbone; the trainable
    parameters are the processors' LoRA sets and g (`trainable_parameters()`).
    """

    def __init__(
        self, transformer: FluxTransformer2DModel, config: BFSConfig | None = None, trainable_dtype=torch.float32
    ):
        super().__init__()
        self.config = config or BFSConfig()
        transformer.requires_grad_(False)
        self.transformer = transformer
        param = next(transformer.parameters())
        # Block paths in a fixed order: the LoRA state-dict keys are built from them.
        self._processors: dict[str, InformationSharingProcessor] = {}
        groups = ["transformer_blocks"] + (["single_transformer_blocks"] if self.config.share_single_blocks else [])
        for group in groups:
            for index, block in enumerate(getattr(transformer, group)):
                attn: FluxAttention = block.attn
                processor = InformationSharingProcessor(
                    attn,
                    rank=self.config.rank,
                    alpha=self.config.alpha,
                    mlp_hidden=self.config.mlp_hidden,
                    use_rope=self.config.use_rope,
                    dtype=trainable_dtype,
                ).to(param.device)
                # set_processor registers the nn.Module processor as `attn.processor`, so the
                # transformer's .to()/state_dict carry it; `_processors` is only an index.
                attn.set_processor(processor)
                self._processors[f"{group}.{index}"] = processor

    # -- trainable state ---------------------------------------------------------------------------

    @property
    def processors(self) -> dict[str, InformationSharingProcessor]:
        return dict(self._processors)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for proc in self._processors.values() for p in proc.parameters()]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA + g weights keyed `<block path>.<c2f|f2c|g>....`, e.g. `transformer_blocks.0.c2f.q.down.weight`."""
        return {
            f"{path}.{name}": tensor.detach().clone()
            for path, proc in self._processors.items()
            for name, tensor in proc.state_dict().items()
        }

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `lora_state_dict()` output; every key must be present and nothing extra (strict)."""
        expected = set(self.lora_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"LoRA state dict does not fit this generator: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
            )
        for path, proc in self._processors.items():
            prefix = f"{path}."
            proc.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)

    def save_lora(self, path: str | os.PathLike) -> Path:
        """Write `<path>/bfs_lora.safetensors` (LoRA + g) and `<path>/bfs_lora.json` (config); returns the dir."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.lora_state_dict().items()}
        # Write under temporary names and rename, so a crash never leaves a half-written checkpoint
        # that load_lora would accept.
        with atomic_path(out / LORA_WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": LORA_FORMAT})
        meta = {
            "format": LORA_FORMAT,
            "format_version": LORA_FORMAT_VERSION,
            **dataclasses.asdict(self.config),
            "num_tensors": len(tensors),
        }
        write_json_atomic(out / LORA_CONFIG_NAME, meta)
        return out

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load a `save_lora` directory; refuses a checkpoint whose structural config differs."""
        saved = read_lora_config(path)
        mismatched = {
            f: (saved.get(f), getattr(self.config, f))
            for f in BFSConfig.STRUCTURAL
            if saved.get(f) != getattr(self.config, f)
        }
        if mismatched:
            raise ValueError(f"LoRA checkpoint {path} does not match this generator (saved, current): {mismatched}")
        if saved.get("base_model_id") != self.config.base_model_id:
            logger.warning(
                "LoRA checkpoint %s was trained on %s, loading into a generator built on %s",
                path, saved.get("base_model_id"), self.config.base_model_id,
            )
        param = next(self.transformer.parameters())
        state = load_file(str(Path(path) / LORA_WEIGHTS_NAME), device=str(param.device))
        self.load_lora_state_dict(state)

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        latents_c: torch.Tensor,
        latents_f: torch.Tensor,
        cond: torch.Tensor,
        timestep: torch.Tensor | float,
        text_embeds: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | float | None,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities (v_c, v_f), each (B, N, out_channels), for packed noisy latents (B, N, 4C).

        cond: (B, N, cond_channels) from `fill_condition`, shared by both branches. text_embeds
        (B, L, joint_attention_dim) T5 states and pooled (B, pooled_projection_dim) CLIP, shared.
        timestep: t in [0, 1], scalar or (B,), the same for both branches. guidance: the distilled
        guidance scale (FLUX.1-Fill-dev embeds it), scalar or (B,); None only for models without it.
        img_ids (N, 3) and txt_ids (L, 3): RoPE positions (`latent_image_ids`, `text_ids`).
        """
        b = latents_c.shape[0]
        if latents_f.shape != latents_c.shape:
            raise ValueError(f"branch latents differ in shape: C {tuple(latents_c.shape)}, F {tuple(latents_f.shape)}")
        expected = self.transformer.config.in_channels
        if latents_c.shape[-1] + cond.shape[-1] != expected:
            raise ValueError(
                f"latents ({latents_c.shape[-1]}) + condition ({cond.shape[-1]}) channels must equal the "
                f"transformer's in_channels ({expected})"
            )
        dtype = next(self.transformer.parameters()).dtype
        device = latents_c.device

        def per_sample(value) -> torch.Tensor:
            t = torch.as_tensor(value, device=device, dtype=torch.float32)
            return (t.expand(b) if t.ndim == 0 else t).to(dtype)

        def both(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=0)

        if guidance is None and self.transformer.config.guidance_embeds:
            raise ValueError("this transformer embeds a guidance scale (Flux dev); pass guidance, e.g. 30.0 for Fill")
        hidden = torch.cat(
            [torch.cat([latents_c, cond], dim=-1), torch.cat([latents_f, cond], dim=-1)], dim=0
        ).to(dtype)
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=both(text_embeds.to(dtype)),
            pooled_projections=both(pooled.to(dtype)),
            timestep=both(per_sample(timestep)),
            guidance=None if guidance is None else both(per_sample(guidance)),
            img_ids=img_ids,
            txt_ids=txt_ids,
            joint_attention_kwargs={TEXT_TOKENS_KWARG: text_embeds.shape[1]},
            return_dict=False,
        )[0]
        v_c, v_f = out.chunk(2, dim=0)
        return v_c, v_f


# --------------------------------------------------------------------------------------------------
# Model bundle, loading, tiny configs
# --------------------------------------------------------------------------------------------------


@dataclass
class BFSModels:
    """Everything the BFS trainer and `generate` need. `compositor` is freshly initialised by the
    constructors: Phi is trained in its own stage and loaded from its checkpoint by the caller."""

    generator: BFSGenerator
    vae: AutoencoderKL
    rgba_vae: AutoencoderKL
    compositor: LatentCompositor

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)


def _check_fill_channels(transformer: FluxTransformer2DModel, vae: AutoencoderKL) -> None:
    # Fill's in_channels = packed latents (4C) + packed background latents (4C) + packed mask (4 s^2).
    c, s = vae.config.latent_channels, vae_scale_factor(vae)
    expected = 8 * c + 4 * s * s
    if transformer.config.in_channels != expected:
        raise ValueError(
            f"transformer in_channels {transformer.config.in_channels} is not a Flux-Fill layout for this VAE "
            f"(expected {expected} = 4*{c} latents + 4*{c} background + 4*{s}^2 mask)"
        )


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """A random Flux-Fill-shaped transformer small enough for CPU tests (matches `tiny_vae`)."""
    latent_channels, scale = 4, 2
    # fork_rng: seed the weights without resetting the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=8 * latent_channels + 4 * scale * scale,  # 16 latents + 16 background + 16 mask
            out_channels=4 * latent_channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,  # FLUX.1-Fill-dev is guidance-distilled; keep that code path in tests
            axes_dims_rope=(4, 6, 6),
        )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random 2-level AutoencoderKL (scale factor 2, 4 latent channels) with Flux-like normalisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            # Non-trivial values so the (z - shift) * scale normalisation is exercised, as with FLUX's VAE.
            scaling_factor=0.5,
            shift_factor=0.1,
        )


def tiny(seed: int = 0, config: BFSConfig | None = None) -> BFSModels:
    """Tiny random BFS models for tests and the demo profile; same seed, same weights."""
    config = config or BFSConfig(rank=4, alpha=4.0, mlp_hidden=16, base_model_id=f"{TINY_PREFIX}{seed}")
    transformer = tiny_transformer(seed)
    vae = tiny_vae(seed)
    _check_fill_channels(transformer, vae)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = BFSGenerator(transformer, config)
        compositor = LatentCompositor(vae.config.latent_channels, hidden_channels=16)
    return BFSModels(generator=generator, vae=vae, rgba_vae=make_rgba_vae(vae), compositor=compositor)


# Only the two components BFS uses: the repository also holds the text encoders and a 23 GB
# single-file checkpoint that a generator worker never reads.
_COMPONENT_PATTERNS = ["model_index.json", "transformer/*", "vae/*"]


def _load_component(cls, id_or_path: str, subfolder: str, revision, dtype, local_files_only: bool):
    """Resolve the model folder with the shared resolver (local path, HF cache, one locked download per
    node; offline and missing raises `hub.ModelNotAvailable` naming the model and `layerloop models pull`),
    then load one component from it."""
    root = hub.resolve(
        id_or_path, revision=revision, allow_download=not local_files_only, allow_patterns=_COMPONENT_PATTERNS
    )
    return cls.from_pretrained(str(root), subfolder=subfolder, torch_dtype=dtype)


def from_pretrained(
    id_or_path: str = DEFAULT_MODEL_ID,
    revision: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config: BFSConfig | None = None,
    local_files_only: bool = False,
) -> BFSModels:
    """Real FLUX.1-Fill-dev transformer (subfolder "transformer", frozen) and VAE (subfolder "vae"),
    the RGBA VAE derived from it and a fresh Phi. The trainable LoRA/g weights stay fp32."""
    config = config or BFSConfig(base_model_id=id_or_path, base_revision=revision)
    transformer = _load_component(FluxTransformer2DModel, id_or_path, "transformer", revision, dtype, local_files_only)
    vae = _load_component(AutoencoderKL, id_or_path, "vae", revision, dtype, local_files_only)
    _check_fill_channels(transformer, vae)
    transformer.to(device)
    vae.to(device).requires_grad_(False)
    generator = BFSGenerator(transformer, config)
    compositor = LatentCompositor(vae.config.latent_channels).to(device)
    return BFSModels(generator=generator, vae=vae, rgba_vae=make_rgba_vae(vae), compositor=compositor)


def read_lora_config(path: str | os.PathLike) -> dict:
    config_path = Path(path) / LORA_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a BFS LoRA checkpoint: {LORA_CONFIG_NAME} is missing")
    saved = json.loads(config_path.read_text())
    if saved.get("format") != LORA_FORMAT or saved.get("format_version") != LORA_FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format {saved.get('format')} v{saved.get('format_version')}")
    return saved


def load_generator(
    path: str | os.PathLike,
    transformer: FluxTransformer2DModel | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
) -> BFSGenerator:
    """Inference entry point: a generator built from a saved LoRA's own config, on `transformer` or,
    if none is given, on the base model the checkpoint names (a `tiny:SEED` base is rebuilt locally)."""
    saved = read_lora_config(path)
    config = BFSConfig(**{f.name: saved[f.name] for f in dataclasses.fields(BFSConfig) if f.name in saved})
    if transformer is None:
        base = config.base_model_id
        if base.startswith(TINY_PREFIX):
            transformer = tiny_transformer(int(base[len(TINY_PREFIX):]))
        else:
            transformer = _load_component(
                FluxTransformer2DModel, base, "transformer", config.base_revision, dtype, local_files_only
            )
        transformer.to(device)
    generator = BFSGenerator(transformer, config)
    generator.load_lora(path)
    return generator


def lora_checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 of the saved LoRA + g weights: the generator checkpoint id recorded in candidate metadata."""
    return sha256_file(Path(path) / LORA_WEIGHTS_NAME)


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


@dataclass
class BFSGeneration:
    latents_c: torch.Tensor  # (B, C, h, w) normalised composite latents
    latents_f: torch.Tensor  # (B, C, h, w) normalised foreground latents (RGBA VAE space)
    image_c: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], if an RGB VAE was given
    image_f: torch.Tensor | None = None  # (B, 4, H, W) in [-1, 1], RGBA, if an RGBA VAE was given


def flux_sigmas(num_steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """num_steps + 1 noise levels from 1 to 0 (float32): FluxFillPipeline's grid, resolution-shifted as
    FlowMatchEulerDiscreteScheduler does for Flux (`sampling.sigma_schedule`)."""
    return torch.tensor(sigma_schedule(num_steps, image_seq_len, shift=shift), dtype=torch.float32)


def branch_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator,
                 noise: str = "shared") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise for the composite and the foreground branch, each of ``shape``, drawn from ``generator`` (on its
    device). ``noise="shared"``: one draw, the same tensor for both (the BFS paper); ``"independent"``: two
    draws, C's first (the same draws as before the choice existed)."""
    if noise not in NOISE_CHOICES:
        raise ValueError(f"noise must be one of {NOISE_CHOICES}, got {noise!r}")
    noise_c = torch.randn(shape, generator=generator, device=generator.device)
    if noise == "shared":
        return noise_c, noise_c
    return noise_c, torch.randn(shape, generator=generator, device=generator.device)


@torch.no_grad()
def sample_latents(
    generator: BFSGenerator,
    background_latents: torch.Tensor,
    mask: torch.Tensor,
    text_embeds: torch.Tensor,
    pooled: torch.Tensor,
    noise_c: torch.Tensor,
    noise_f: torch.Tensor,
    *,
    num_steps: int = 28,
    guidance: float | None = 30.0,
    shift: bool = True,
    composite_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches from the given noise (each (B, C, h, w), like the latents; the same tensor for shared
    noise, `branch_noise`) to data with the shared Euler sampler (`sampling.py`); returns the spatial
    (latents_c, latents_f).

    background_latents: (B, C, h, w) normalised RGB-VAE latents of B; mask: (B, 1, H, W) pixel box
    mask (1 inside); text embeddings as in `BFSGenerator.forward`, on the latents' device.

    ``composite_latents`` (B, C, h, w), the normalised RGB-VAE latents of a given composite: foreground
    extraction (the BFS paper's application). The composite branch is then not integrated: at each step it
    receives the given composite noised to the step's level with its branch noise, ``(1 - sigma) z_C +
    sigma noise_c`` (the forward process of training, `noisy_latents`), and only F is integrated; returns
    (composite_latents, latents_f).
    """
    _, _, h, w = background_latents.shape
    device = background_latents.device
    dtype = next(generator.transformer.parameters()).dtype
    cond = fill_condition(background_latents, mask).to(dtype)
    img_ids = latent_image_ids(h, w, device=device)
    txt_ids = text_ids(text_embeds.shape[1], device=device)
    z_c = pack_latents(noise_c).to(device=device, dtype=torch.float32)
    z_f = pack_latents(noise_f).to(device=device, dtype=torch.float32)

    sigmas = sigma_schedule(num_steps, z_c.shape[1], shift=shift)
    if composite_latents is not None:
        if composite_latents.shape != background_latents.shape:
            raise ValueError(f"composite latents {tuple(composite_latents.shape)} differ from the background's "
                             f"{tuple(background_latents.shape)}")
        data_c, noise_c = pack_latents(composite_latents).to(device=device, dtype=torch.float32), z_c

        def extract(latents: list[torch.Tensor], sigma: float) -> tuple[torch.Tensor]:
            (z_f,) = latents
            z_c = (1.0 - sigma) * data_c + sigma * noise_c
            return generator(z_c.to(dtype), z_f.to(dtype), cond, sigma, text_embeds, pooled, guidance, img_ids,
                             txt_ids)[1:]

        (z_f,) = euler_sample(extract, [z_f], sigmas)
        return composite_latents, unpack_latents(z_f, h, w)

    def velocity(latents: list[torch.Tensor], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        z_c, z_f = latents
        return generator(z_c.to(dtype), z_f.to(dtype), cond, sigma, text_embeds, pooled, guidance, img_ids, txt_ids)

    z_c, z_f = euler_sample(velocity, [z_c, z_f], sigmas)
    return unpack_latents(z_c, h, w), unpack_latents(z_f, h, w)


@torch.no_grad()
def generate(
    generator: BFSGenerator,
    background_latents: torch.Tensor,
    mask: torch.Tensor,
    text_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    seed: int = 0,
    noise: Noise = "shared",
    vae: AutoencoderKL | None = None,
    rgba_vae: AutoencoderKL | None = None,
    **sampling: Any,
) -> BFSGeneration:
    """`sample_latents` from noise drawn for the whole batch from a CPU generator seeded with `seed` (so
    results do not depend on device), decoded when VAEs are given. ``noise``: one draw shared by both
    branches (the paper's) or one per branch (`branch_noise`). ``sampling``: `sample_latents`'s
    keywords (num_steps, guidance, shift). (`BFSPipeline` draws noise per sample instead, so that a
    sample's output does not depend on its batch mates.)"""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    noise_c, noise_f = branch_noise(background_latents.shape, rng, noise)
    latents_c, latents_f = sample_latents(generator, background_latents, mask, text_embeds, pooled, noise_c,
                                          noise_f, **sampling)
    result = BFSGeneration(latents_c=latents_c, latents_f=latents_f)
    if vae is not None:
        result.image_c = decode_latents(vae, result.latents_c).float()
    if rgba_vae is not None:
        result.image_f = decode_latents(rgba_vae, result.latents_f).float()
    return result
