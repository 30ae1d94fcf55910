"""In-context decompose/compose LoRA on FLUX.1-Fill-dev (issue 5).

One image canvas holds a whole layered example side by side, and the Fill model in-paints the part of it a
task asks for. One LoRA serves both tasks; the fill mask and the prompt say which one is asked:

* **decompose**: the composite is given, the layer and the clean object are generated;
* **compose**: the layer and the clean object are given, the composite is generated.

Canvas layout (``PANELS``), each panel H x W, so the canvas is H x 4W::

    [ composite C | layer colour | layer alpha | clean object B ]

The issue's three-panel canvas [composite | layer | clean object] with the layer shown as *two* panels. An
RGBA layer has four channels and an RGB panel three, so no single RGB panel can hold a layer exactly: the
usual "layer over a neutral grey" loses alpha wherever the layer's colour is close to that grey, and
recovering alpha from C, B and a premultiplied layer divides by (F - B), which is unstable and inexact in
8 bits. Splitting the layer into its straight (un-premultiplied) colour and its alpha as a grey image
makes the canvas exact: ``unpack_canvas(pack_canvas(C, F, B))`` returns C, F and B bit for bit. The only
thing dropped is the colour of fully transparent pixels, which no composite can ever show; the colour panel
shows ``matte`` (neutral grey) there, and ``canonical_layer`` applies the same convention to inputs. Both
layer panels are ordinary images (a sticker on grey, a grey matte) of the kind the base model can paint.

Fill conditioning follows ``FluxFillPipeline.prepare_mask_latents``: the transformer input per token is
``[noisy latents (4c) | masked-image latents (4c) | 8x8 mask (4*s*s)]`` with 2x2 latent patches packed
into tokens. Two choices on top of it:

* Panels are VAE-encoded one at a time (not the canvas as a whole) and concatenated in latent space. A
  panel's latent then depends on that panel only, so the cycle term can swap an estimated panel into the
  conditioning directly in latent space, without decoding and re-encoding.
* The binary region mask of the layer (where the logo is in the composite) is given to decomposition in the
  *mask channel of the composite panel*, at ``REGION_HINT`` (0.5) inside the region and 0 outside. The
  composite itself stays intact in the masked-image latents. Plain Fill masks are binary, so 0.5 never
  means "paint here" and the hint cannot be mistaken for a task; the mask channel has the full 8x8
  sub-latent resolution, so the region's shape survives packing.

Flow matching (as FLUX): ``x_t = (1 - t) x0 + t * noise``, the transformer predicts ``v = noise - x0``,
and the one-step clean estimate is ``x0_hat = x_t - t * v``. Training losses are computed on the tokens a
task generates; the given panels are reproduced from the conditioning, which the Fill base already does.
The cycle term chains two one-step estimates at independent timesteps (decompose then compose must give
back the composite, compose then decompose the layer and object), so training never runs a sampler.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from layerloop.samples import LayeredSample, composite as composite_layers

FILL_MODEL_ID = "black-forest-labs/FLUX.1-Fill-dev"
PANELS = ("composite", "layer", "alpha", "background")
DECOMPOSE = "decompose"
COMPOSE = "compose"
DIRECTIONS = (DECOMPOSE, COMPOSE)
# Panels each task generates (its fill mask is 1 there); the others are given.
GENERATED = {DECOMPOSE: ("layer", "alpha", "background"), COMPOSE: ("composite",)}
MATTE = 128  # colour of the layer panel where the layer is fully transparent: neutral grey
REGION_HINT = 0.5  # fill-mask value marking the layer's region in the (given) composite panel
PROMPTS = {
    DECOMPOSE: "[DECOMPOSE] Four panels. Left: {caption}. Second: only the marked layer on neutral grey. "
    "Third: its alpha matte. Right: the same object without the layer.",
    COMPOSE: "[COMPOSE] Four panels. Second: a layer on neutral grey. Third: its alpha matte. "
    "Right: a clean object. Left: {caption}, the layer placed on the object.",
}
# LoRA targets, as module-name suffixes inside the transformer blocks (names from diffusers 0.42
# transformer_flux.py): every attention projection of the double-stream blocks (image and text stream),
# their feed-forwards, and the attention, MLP and output projections of the single-stream blocks. The
# top-level x_embedder / proj_out stay untouched: they fix the Fill token layout, which the LoRA must keep.
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)
LORA_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora.json"
LORA_FORMAT = 1
# What from_pretrained reads from a Fill repository; the rest (the pipeline's own files) is not needed.
FILL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class ModelNotAvailableError(RuntimeError):
    """Weights are neither a local folder nor in the Hugging Face cache, and cannot be downloaded."""


# ============================================================================ canvas (numpy, uint8)
def canonical_layer(layer_rgba: np.ndarray, matte: int = MATTE) -> np.ndarray:
    """The layer with the colour of fully transparent pixels set to ``matte``: the form a canvas keeps.
    Composites over any background are unchanged, since those pixels have weight 0."""
    _check_image(layer_rgba, 4, "layer_rgba")
    out = layer_rgba.copy()
    out[layer_rgba[..., 3] == 0, :3] = matte
    return out


def pack_canvas(composite: np.ndarray, layer_rgba: np.ndarray, background: np.ndarray,
                matte: int = MATTE) -> np.ndarray:
    """[composite | layer colour | layer alpha | background] as one H x 4W x 3 uint8 image."""
    _check_image(composite, 3, "composite")
    _check_image(layer_rgba, 4, "layer_rgba")
    _check_image(background, 3, "background")
    if not composite.shape[:2] == layer_rgba.shape[:2] == background.shape[:2]:
        raise ValueError(f"panel sizes differ: composite {composite.shape[:2]}, layer {layer_rgba.shape[:2]}, "
                         f"background {background.shape[:2]}")
    layer = canonical_layer(layer_rgba, matte)
    alpha = np.repeat(layer[..., 3:4], 3, axis=2)
    return np.concatenate([composite, layer[..., :3], alpha, background], axis=1)


def split_panels(canvas: np.ndarray) -> dict[str, np.ndarray]:
    """The four H x W x 3 panels of a canvas, by name."""
    _check_image(canvas, 3, "canvas")
    if canvas.shape[1] % len(PANELS):
        raise ValueError(f"canvas width {canvas.shape[1]} is not {len(PANELS)} panels wide")
    width = canvas.shape[1] // len(PANELS)
    return {name: canvas[:, i * width:(i + 1) * width] for i, name in enumerate(PANELS)}


def unpack_canvas(canvas: np.ndarray, matte: int = MATTE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(composite, layer RGBA, background) from a canvas; exact inverse of ``pack_canvas`` on uint8 input
    (up to ``canonical_layer``). On a generated canvas the alpha panel's three channels may disagree
    slightly: their rounded mean is the alpha."""
    panels = split_panels(canvas)
    alpha_panel = panels["alpha"].astype(np.uint16)
    alpha = ((alpha_panel.sum(axis=2) + 1) // 3).astype(np.uint8)  # exact for equal channels
    layer = np.concatenate([panels["layer"], alpha[..., None]], axis=2)
    return panels["composite"].copy(), canonical_layer(layer, matte), panels["background"].copy()


def task_mask(direction: str, height: int, width: int) -> np.ndarray:
    """Fill mask of a task for H x W panels: H x 4W float32, 1 on the panels the task generates."""
    _check_direction(direction)
    mask = np.zeros((height, width * len(PANELS)), np.float32)
    for i, name in enumerate(PANELS):
        if name in GENERATED[direction]:
            mask[:, i * width:(i + 1) * width] = 1.0
    return mask


def condition_mask(direction: str, region: np.ndarray | None) -> np.ndarray:
    """The fill mask a task is conditioned on: ``task_mask`` plus, for decomposition, the layer's region
    at ``REGION_HINT`` in the composite panel. ``region`` is H x W (uint8 0/255 or bool)."""
    if region is None:
        raise ValueError("condition_mask needs the region mask (H x W) to know the panel size")
    height, width = region.shape[:2]
    mask = task_mask(direction, height, width)
    if direction == DECOMPOSE:
        mask[:, :width] = np.where(np.asarray(region) > 0, REGION_HINT, 0.0)
    return mask


def prompt_for(direction: str, caption: str) -> str:
    _check_direction(direction)
    caption = caption.strip().rstrip(".") or "an object with a layer on it"
    return PROMPTS[direction].format(caption=caption)


def recomposition_error(composite: np.ndarray, layer: np.ndarray, background: np.ndarray) -> float:
    """Mean absolute difference between C and ``composite(F, B)``, in 1/255 steps: how well a predicted
    decomposition explains the input it came from."""
    expected = composite_layers(layer, background).astype(np.float64)
    return float(np.abs(expected - composite.astype(np.float64)).mean())


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) of a LoRA file, or of ``lora.safetensors`` inside a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def make_candidate(key: str, composite: np.ndarray, region: np.ndarray, layer: np.ndarray,
                   background: np.ndarray, caption: str, checkpoint: str, **meta: Any) -> LayeredSample:
    """A decomposition candidate with its lineage: the generator checkpoint hash and the recomposition
    error go in ``meta['generator']`` for the scoring and filtering stages."""
    generator = {"model": "incontext", "checkpoint_hash": checkpoint,
                 "recomposition_error": recomposition_error(composite, layer, background)}
    sample = LayeredSample(key=key, kind="candidate", composite=composite, background=background,
                           foreground=layer, mask=np.where(np.asarray(region) > 0, 255, 0).astype(np.uint8),
                           caption=caption, meta={**meta, "generator": generator})
    sample.validate()
    return sample


def _check_image(image: np.ndarray, channels: int, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != channels:
        raise ValueError(f"{name} must be an H x W x {channels} uint8 array, got "
                         f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image))}")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


# ============================================================================ batches
@dataclass
class CanvasBatch:
    """Pixel panels of a batch, float32 B x 3 x H x W in [-1, 1], plus the region masks (B x H x W, 0/1)
    and captions."""

    panels: dict[str, torch.Tensor]
    region: torch.Tensor
    captions: list[str]

    @classmethod
    def from_samples(cls, samples: Sequence[LayeredSample], matte: int = MATTE) -> CanvasBatch:
        """From quadruples (F = layer, B = clean object, M = region mask, C = composite)."""
        canvases, regions = [], []
        for sample in samples:
            canvases.append(pack_canvas(sample.composite, sample.foreground, sample.background, matte))
            regions.append(sample.mask > 0)
        return cls.from_canvases(np.stack(canvases), np.stack(regions), [s.caption for s in samples])

    @classmethod
    def from_canvases(cls, canvases: np.ndarray, regions: np.ndarray, captions: Sequence[str]) -> CanvasBatch:
        """From a stack of packed canvases (B x H x 4W x 3 uint8) and regions (B x H x W)."""
        pixels = torch.from_numpy(np.ascontiguousarray(canvases)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        panels = dict(zip(PANELS, pixels.chunk(len(PANELS), dim=3)))
        region = torch.from_numpy(np.asarray(regions) > 0).float()
        return cls({k: v.contiguous() for k, v in panels.items()}, region, list(captions))

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class LatentCanvas:
    """A batch in the transformer's token space: ``x0`` are the packed clean latents of the whole canvas
    (B x L x 4c, panels side by side), ``region`` the pixel region masks (B x H x W)."""

    x0: torch.Tensor
    region: torch.Tensor
    captions: list[str]
    height: int  # panel size in pixels
    width: int

    def to(self, device: torch.device | str) -> LatentCanvas:
        return LatentCanvas(self.x0.to(device), self.region.to(device), self.captions, self.height, self.width)


@dataclass
class TextEmbeddings:
    embeds: torch.Tensor  # B x T x joint_attention_dim
    pooled: torch.Tensor  # B x pooled_projection_dim
    ids: torch.Tensor  # T x 3 (FLUX gives text tokens position 0)


# ============================================================================ text encoders
class ByteTextEncoder(nn.Module):
    """A frozen random text encoder for tiny models: UTF-8 bytes -> embeddings (+ a fixed positional
    table, since FLUX gives text tokens no rotary position), pooled by a mean and a projection. It cannot
    understand captions, but it tells the two task prompts apart, which is what the tiny tests need."""

    def __init__(self, dim: int, pooled_dim: int, max_length: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.max_length = max_length
        self.register_buffer("table", torch.randn(257, dim, generator=generator))  # 256 bytes + padding
        self.register_buffer("positions", 0.1 * torch.randn(max_length, dim, generator=generator))
        self.register_buffer("projection", torch.randn(dim, pooled_dim, generator=generator) / math.sqrt(dim))

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextEmbeddings:
        tokens = torch.full((len(prompts), self.max_length), 256, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8")[: self.max_length])
            tokens[row, : len(data)] = torch.tensor(data, dtype=torch.long)
        embeds = self.table[tokens] + self.positions
        pooled = embeds.mean(dim=1) @ self.projection
        return TextEmbeddings(embeds, pooled, torch.zeros(self.max_length, 3, device=embeds.device))


class FluxTextEncoder(nn.Module):
    """CLIP (pooled) + T5 (sequence) prompt encoding, exactly as ``FluxFillPipeline.encode_prompt``.
    Frozen; the LoRA adapts the transformer only."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer, max_sequence_length: int = 512):
        super().__init__()
        self.clip, self.t5 = clip.requires_grad_(False), t5.requires_grad_(False)
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype, device: str) -> FluxTextEncoder:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        clip = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).to(device)
        t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype).to(device)
        return cls(clip, CLIPTokenizer.from_pretrained(folder / "tokenizer"), t5,
                   T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = list(prompts)
        device = self.clip.device
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, return_tensors="pt").input_ids
        embeds = self.t5(t5_ids.to(device), output_hidden_states=False)[0]
        return TextEmbeddings(embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype))


# ============================================================================ the model
@dataclass
class InContextConfig:
    rank: int = 32
    alpha: float = 32.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    cycle_weight: float = 1.0  # 0 switches the cycle term off (and skips its forward passes)
    guidance_scale: float = 30.0  # FLUX.1-Fill-dev is guidance-distilled; 30 is its pipeline default
    timestep_mean: float = 0.0  # logit-normal timestep sampling (SD3 / FLUX training practice)
    timestep_std: float = 1.0
    matte: int = MATTE
    base_model: str = FILL_MODEL_ID
    base_revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InContextConfig:
        data = dict(data)
        data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


@dataclass
class Decomposition:
    layer: np.ndarray  # H x W x 4 uint8
    background: np.ndarray  # H x W x 3 uint8
    canvas: np.ndarray  # the decoded canvas, given panels pasted back
    recomposition_error: float


def lora_target_names(transformer: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full names of the Linear modules inside the transformer blocks that end in one of ``suffixes``.
    Resolving to full names keeps a suffix like ``proj_out`` from also catching the model's top-level
    output projection."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if any(name == suffix or name.endswith("." + suffix) for suffix in suffixes):
            names.append(name)
    if not names:
        raise ValueError(f"no transformer block module matches the LoRA targets {list(suffixes)}")
    return names


class InContextLoRA(nn.Module):
    """A frozen FluxTransformer2DModel (Fill layout) with one peft LoRA for both tasks, the frozen VAE and
    text encoder that feed it, the training losses (supervised and cycle) and a short Euler sampler."""

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 config: InContextConfig | None = None):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.config = config or InContextConfig()
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        for module in (transformer, vae, text_encoder):
            module.requires_grad_(False)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        expected = 8 * self.latent_channels + 4 * self.vae_scale ** 2
        if transformer.config.in_channels != expected:
            raise ValueError(f"transformer in_channels is {transformer.config.in_channels}; the Fill layout for a "
                             f"{self.latent_channels}-channel VAE with scale {self.vae_scale} needs {expected}")
        self.lora_targets = lora_target_names(transformer, self.config.target_modules)
        lora = LoraConfig(r=self.config.rank, lora_alpha=self.config.alpha, target_modules=self.lora_targets,
                          init_lora_weights=True)
        inject_adapter_in_model(lora, transformer)
        for name, param in transformer.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_" in name:
                # peft casts the adapter to the base dtype; small LoRA updates vanish in bf16, so train in fp32
                param.data = param.data.float()
        self._empty_panel: dict[tuple[int, int, str], torch.Tensor] = {}

    # ------------------------------------------------------------- constructors
    @classmethod
    def tiny(cls, seed: int = 0, rank: int = 4, alpha: float = 4.0, **config: Any) -> InContextLoRA:
        """Random tiny model for tests: a 2-level VAE (scale 2, 4 latent channels), a one-block-each
        transformer in the Fill token layout, a byte-level text encoder. Same seed, same weights."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                            scaling_factor=1.0, shift_factor=0.0)
        channels, scale = 4, 2
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=8 * channels + 4 * scale * scale, out_channels=4 * channels,
            num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        text_encoder = ByteTextEncoder(32, 32, max_length=64, seed=seed)
        config.setdefault("base_model", f"tiny-{seed}")
        return cls(transformer.eval(), vae.eval(), text_encoder, InContextConfig(rank=rank, alpha=alpha, **config))

    @classmethod
    def from_pretrained(cls, model: str = FILL_MODEL_ID, revision: str | None = None,
                        dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                        text_encoder: nn.Module | None = None, **config: Any) -> InContextLoRA:
        """FLUX.1-Fill-dev (hub id or local folder in the diffusers layout) with a fresh LoRA.
        ``text_encoder`` replaces CLIP + T5 (for instance a shared or precomputing encoder)."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        needed = ("transformer", "vae") + (() if text_encoder is not None else FILL_SUBFOLDERS[2:])
        folder = resolve_model_folder(model, revision, needed)
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).to(device)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device)
        if text_encoder is None:
            text_encoder = FluxTextEncoder.from_folder(folder, dtype, device)
        config = {"base_model": model, "base_revision": revision, **config}
        return cls(transformer.eval(), vae.eval(), text_encoder.to(device), InContextConfig(**config))

    # ------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.transformer.named_parameters() if "lora_" in n]

    # ------------------------------------------------------------- latents
    @torch.no_grad()
    def encode_panel(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [-1, 1] -> normalised latents B x c x H/s x W/s. The posterior mean, not a
        sample, so that a batch always encodes to the same latents (training targets and cycle inputs)."""
        pixels = pixels.to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_panel(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(latents).sample.clamp(-1, 1)

    def encode(self, batch: CanvasBatch) -> LatentCanvas:
        """Panel by panel (see the module docstring), then packed side by side into tokens."""
        height, width = batch.panels["composite"].shape[-2:]
        self._check_panel_size(height, width)
        latents = torch.cat([self.encode_panel(batch.panels[name]) for name in PANELS], dim=3)
        return LatentCanvas(self.pack(latents.float()), batch.region.to(self.device), batch.captions, height, width)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """B x c x h x w -> B x (h/2 * w/2) x 4c (2x2 patches), as ``FluxFillPipeline._pack_latents``."""
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of ``pack`` for a canvas of H x 4W pixel panels: B x c x h x 4w latents."""
        b, _, channels = tokens.shape
        h, w = height // self.vae_scale, len(PANELS) * width // self.vae_scale
        latents = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(b, channels // 4, h, w)

    def panel_tokens(self, names: Sequence[str], height: int, width: int) -> torch.Tensor:
        """Boolean (L,) selecting the tokens of the named panels (tokens are row-major over the canvas)."""
        columns = len(PANELS) * width // (2 * self.vae_scale)
        rows = height // (2 * self.vae_scale)
        panel_of_column = torch.arange(columns, device=self.device) // (columns // len(PANELS))
        wanted = torch.tensor([PANELS.index(n) for n in names], device=self.device)
        return torch.isin(panel_of_column, wanted).repeat(rows)

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        rows, columns = height // (2 * self.vae_scale), len(PANELS) * width // (2 * self.vae_scale)
        ids = torch.zeros(rows, columns, 3, device=self.device)
        ids[..., 1] += torch.arange(rows, device=self.device)[:, None]
        ids[..., 2] += torch.arange(columns, device=self.device)[None, :]
        return ids.reshape(rows * columns, 3)

    def pack_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """B x H x 4W pixel mask -> B x L x 4s^2, as ``FluxFillPipeline.prepare_mask_latents`` (each
        latent pixel carries its s x s block of mask pixels, then 2x2 patches are packed)."""
        b, height, width = mask.shape
        s = self.vae_scale
        h, w = height // s, width // s
        mask = mask.view(b, h, s, w, s).permute(0, 2, 4, 1, 3).reshape(b, s * s, h, w)
        return self.pack(mask)

    def empty_panel(self, height: int, width: int) -> torch.Tensor:
        """Packed-ready latents (1 x c x h x w) of a masked-out panel: Fill zeroes masked pixels
        (``image * (1 - mask)``), i.e. mid grey in [-1, 1]."""
        key = (height, width, str(self.device))
        if key not in self._empty_panel:
            zeros = torch.zeros(1, 3, height, width, device=self.device)
            self._empty_panel[key] = self.encode_panel(zeros).float()
        return self._empty_panel[key]

    # ------------------------------------------------------------- conditioning and the network
    def condition(self, direction: str, canvas: torch.Tensor, region: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
        """Fill conditioning for ``direction`` from packed canvas latents (B x L x 4c; true or estimated,
        gradients pass): masked-image latents with the generated panels emptied, then the packed mask."""
        _check_direction(direction)
        b = canvas.shape[0]
        empty = self.pack(self.empty_panel(height, width).repeat(1, 1, 1, len(PANELS))).expand(b, -1, -1)
        generated = self.panel_tokens(GENERATED[direction], height, width)[None, :, None]
        masked = torch.where(generated, empty.to(canvas.dtype), canvas)
        mask = torch.from_numpy(task_mask(direction, height, width)).to(self.device).expand(b, -1, -1).clone()
        if direction == DECOMPOSE:
            mask[:, :, :width] = REGION_HINT * (region.to(mask.dtype) > 0)
        return torch.cat([masked, self.pack_mask(mask).to(canvas.dtype)], dim=-1)

    def encode_text(self, direction: str, captions: Sequence[str]) -> TextEmbeddings:
        text = self.text_encoder([prompt_for(direction, c) for c in captions])
        return TextEmbeddings(text.embeds.to(self.device, self.dtype), text.pooled.to(self.device, self.dtype),
                              text.ids.to(self.device, self.dtype))

    def velocity(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, text: TextEmbeddings,
                 height: int, width: int) -> torch.Tensor:
        """The transformer's flow prediction ``v`` (≈ noise - x0) for packed noisy latents ``x_t``."""
        b = x_t.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.config.guidance_scale, device=self.device, dtype=self.dtype)
        out = self.transformer(
            hidden_states=torch.cat([x_t, cond], dim=-1).to(self.dtype),
            encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
            timestep=t.to(self.device, self.dtype).expand(b), guidance=guidance,
            img_ids=self.image_ids(height, width), txt_ids=text.ids, return_dict=False)[0]
        return out.float()

    def one_step(self, direction: str, canvas: torch.Tensor, x0: torch.Tensor, region: torch.Tensor,
                 captions: Sequence[str], t: torch.Tensor, noise: torch.Tensor, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, x0_hat) for one task at timesteps ``t`` (B,): the conditioning comes from ``canvas``, the
        noisy input from ``x0`` (the two differ only in the cycle term, where the given panels are
        estimates)."""
        t = t.to(self.device).float().view(-1, 1, 1)
        x_t = (1.0 - t) * x0 + t * noise
        v = self.velocity(x_t, self.condition(direction, canvas, region, height, width), t.view(-1),
                          self.encode_text(direction, captions), height, width)
        return v, x_t - t * v

    # ------------------------------------------------------------- losses
    def supervised_loss(self, batch: LatentCanvas, direction: str, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE ``|v - (noise - x0)|^2`` on the tokens ``direction`` generates."""
        return self._supervised(batch, direction, t, noise)[0]

    def _supervised(self, batch: LatentCanvas, direction: str, t: torch.Tensor,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, x0_hat = self.one_step(direction, batch.x0, batch.x0, batch.region, batch.captions, t, noise,
                                  batch.height, batch.width)
        tokens = self.panel_tokens(GENERATED[direction], batch.height, batch.width)
        loss = (v - (noise - batch.x0))[:, tokens].pow(2).mean()
        return loss, x0_hat

    def cycle_loss(self, batch: LatentCanvas, t1: torch.Tensor, t2: torch.Tensor, noise1: torch.Tensor,
                   noise2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both cycle terms from scratch: the first pass of each direction at ``t1`` / ``noise1``, the
        second at ``t2`` / ``noise2``. ``training_loss`` shares the first passes with the supervised
        terms instead."""
        first = {d: self._supervised(batch, d, t1, noise1)[1] for d in DIRECTIONS}
        return self._cycle(batch, first, t2, noise2)

    def _cycle(self, batch: LatentCanvas, x0_hat: dict[str, torch.Tensor], t2: torch.Tensor,
               noise2: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        """L1 in latent space. decompose->compose: the estimated layer and object replace the true ones
        (as conditioning and as the given part of the noisy canvas) and the composite must come back;
        compose->decompose: the estimated composite replaces the true one and the layer and object must
        come back. Gradients flow through both passes into the one LoRA."""
        h, w = batch.height, batch.width
        if isinstance(noise2, torch.Tensor):
            noise2 = {DECOMPOSE: noise2, COMPOSE: noise2}
        terms = {}
        for first, second, name in ((DECOMPOSE, COMPOSE, "cycle_decompose_compose"),
                                    (COMPOSE, DECOMPOSE, "cycle_compose_decompose")):
            estimated = self.panel_tokens(GENERATED[first], h, w)[None, :, None]
            canvas = torch.where(estimated, x0_hat[first], batch.x0)
            _, x0_hat2 = self.one_step(second, canvas, canvas, batch.region, batch.captions, t2,
                                       noise2[second], h, w)
            target = self.panel_tokens(GENERATED[second], h, w)
            terms[name] = (x0_hat2 - batch.x0)[:, target].abs().mean()
        return terms

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal t in (0, 1): most weight at mid noise, where the tasks are decided."""
        normal = torch.randn(batch_size, generator=generator) * self.config.timestep_std + self.config.timestep_mean
        return torch.sigmoid(normal).to(self.device)

    def training_loss(self, batch: LatentCanvas, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All terms of one training step and their sum ``loss``: supervised decompose and compose, plus
        ``cycle_weight`` x both cycle terms. Each direction draws its own t and noise; the cycle's second
        passes draw independent ones. Noise and timesteps come from ``generator`` (CPU) for exact resume."""
        b = batch.x0.shape[0]
        draw = lambda: torch.randn(batch.x0.shape, generator=generator).to(self.device)  # noqa: E731
        terms: dict[str, torch.Tensor] = {}
        first = {}
        for direction in DIRECTIONS:
            t, noise = self.sample_timesteps(b, generator), draw()
            terms[direction], first[direction] = self._supervised(batch, direction, t, noise)
        loss = terms[DECOMPOSE] + terms[COMPOSE]
        if self.config.cycle_weight > 0:
            t2 = self.sample_timesteps(b, generator)
            terms.update(self._cycle(batch, first, t2, {DECOMPOSE: draw(), COMPOSE: draw()}))
            cycle = terms["cycle_decompose_compose"] + terms["cycle_compose_decompose"]
            loss = loss + self.config.cycle_weight * cycle
        terms["loss"] = loss
        return terms

    # ------------------------------------------------------------- LoRA checkpoints
    def save_lora(self, folder: str | os.PathLike) -> Path:
        """``lora.safetensors`` (the adapter weights) + ``lora.json`` (config, resolved targets) in
        ``folder``; returns the weights file. Written under temporary names, then renamed."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
        meta = {"format": LORA_FORMAT, "config": self.config.to_json(), "targets": self.lora_targets}
        weights, config = folder / LORA_FILE, folder / LORA_CONFIG_FILE
        save_file(state, str(weights) + ".tmp", metadata={"format": str(LORA_FORMAT)})
        (folder / (LORA_CONFIG_FILE + ".tmp")).write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(str(weights) + ".tmp", weights)
        os.replace(folder / (LORA_CONFIG_FILE + ".tmp"), config)
        return weights

    def load_lora(self, folder: str | os.PathLike) -> None:
        """Load a ``save_lora`` checkpoint into this model's adapter; refuses a different LoRA shape."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / LORA_CONFIG_FILE).read_text())
        saved = InContextConfig.from_json(meta["config"])
        if (saved.rank, saved.alpha, meta["targets"]) != (self.config.rank, self.config.alpha, self.lora_targets):
            raise ValueError(f"{folder}: LoRA rank/alpha/targets ({saved.rank}/{saved.alpha}, {len(meta['targets'])} "
                             f"modules) differ from this model's ({self.config.rank}/{self.config.alpha}, "
                             f"{len(self.lora_targets)} modules)")
        state = load_file(str(folder / LORA_FILE), device=str(self.device))
        result = set_peft_model_state_dict(self.transformer, state)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"{folder}: LoRA weights do not fit: missing {missing[:3]}, "
                             f"unexpected {list(result.unexpected_keys)[:3]}")

    # ------------------------------------------------------------- inference
    def sigmas(self, steps: int, height: int, width: int) -> list[float]:
        """Euler noise levels 1 -> 0, time-shifted for the sequence length like the Fill pipeline
        (``calculate_shift`` with its defaults, exponential shift)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = (height // (2 * self.vae_scale)) * (len(PANELS) * width // (2 * self.vae_scale))
        mu = calculate_shift(tokens)
        out = []
        for s in np.linspace(1.0, 0.0, steps + 1):
            out.append(0.0 if s <= 0 else math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)))
        return out

    @torch.no_grad()
    def _sample(self, direction: str, canvas: np.ndarray, region: np.ndarray, caption: str, steps: int,
                seed: int) -> np.ndarray:
        """A short Euler sampler over a whole H x 4W canvas conditioned for ``direction`` (as the Fill
        pipeline does); returns the generated canvas as uint8 (the given panels are not pasted back)."""
        height, width = canvas.shape[0], canvas.shape[1] // len(PANELS)
        batch = self.encode(CanvasBatch.from_canvases(canvas[None], np.asarray(region)[None], [caption]))
        cond = self.condition(direction, batch.x0, batch.region, height, width)
        text = self.encode_text(direction, [caption])
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch.x0.shape, generator=generator).to(self.device)
        sigmas = self.sigmas(steps, height, width)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.tensor([sigma], device=self.device)
            x = x + (sigma_next - sigma) * self.velocity(x, cond, t, text, height, width)
        latents = self.unpack(x, height, width)
        panels = latents.chunk(len(PANELS), dim=3)
        decoded = [self.decode_panel(p)[0] for p in panels]
        pixels = torch.cat(decoded, dim=2).permute(1, 2, 0).float().cpu().numpy()
        return np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)

    def decompose(self, composite: np.ndarray, region: np.ndarray, caption: str = "", steps: int = 8,
                  seed: int = 0) -> Decomposition:
        """Layer + clean object for one H x W x 3 uint8 composite and its H x W region mask; the given
        composite panel is pasted back before unpacking."""
        _check_image(composite, 3, "composite")
        height, width = composite.shape[:2]
        self._check_panel_size(height, width)
        blank = np.zeros((height, width, 4), np.uint8)
        canvas = pack_canvas(composite, blank, np.zeros_like(composite), self.config.matte)
        out = self._sample(DECOMPOSE, canvas, region, caption, steps, seed)
        out[:, :width] = composite
        _, layer, background = unpack_canvas(out, self.config.matte)
        return Decomposition(layer, background, out, recomposition_error(composite, layer, background))

    def compose(self, layer: np.ndarray, background: np.ndarray, region: np.ndarray, caption: str = "",
                steps: int = 8, seed: int = 0) -> np.ndarray:
        """The composite (H x W x 3 uint8) the LoRA's compose direction makes of an RGBA layer and a clean
        object: the other half of the cycle ``compose(decompose(C)) ~ C``."""
        _check_image(layer, 4, "layer")
        _check_image(background, 3, "background")
        height, width = background.shape[:2]
        self._check_panel_size(height, width)
        canvas = pack_canvas(np.zeros_like(background), layer, background, self.config.matte)
        return self._sample(COMPOSE, canvas, region, caption, steps, seed)[:, :width].copy()

    def _check_panel_size(self, height: int, width: int) -> None:
        step = 2 * self.vae_scale  # a panel must cover whole tokens so that masks split exactly at its edges
        if height % step or width % step:
            raise ValueError(f"panel size {height}x{width} must be a multiple of {step} (VAE scale x 2x2 packing)")


# ============================================================================ weights
def resolve_model_folder(model: str, revision: str | None, subfolders: Sequence[str]) -> Path:
    """A local folder in the diffusers layout: ``model`` itself when it is one, else the Hugging Face
    cache, else a download (one per node: a file lock around it). Offline and missing: a clear error."""
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path
    else:
        folder = _hub_snapshot(model, revision, subfolders)
    missing = [name for name in subfolders if not (folder / name).is_dir()]
    if missing:
        raise ModelNotAvailableError(f"{model}: {folder} lacks {missing}; expected the diffusers layout of "
                                     f"{FILL_MODEL_ID} ({', '.join(subfolders)})")
    return folder


def _hub_snapshot(model: str, revision: str | None, subfolders: Sequence[str]) -> Path:
    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download

    patterns = ["model_index.json"] + [f"{name}/*" for name in subfolders]
    how = (f"Fetch it first with `layerloop models pull CONFIG` (or `huggingface-cli download {model}`; "
           f"{FILL_MODEL_ID} is gated: accept its licence on the Hub and log in), or pass a local folder.")
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:  # not in the cache (or incomplete): download unless offline
        if constants.HF_HUB_OFFLINE:
            raise ModelNotAvailableError(f"{model} (revision {revision or 'main'}) is not in the Hugging Face cache "
                                         f"and HF_HUB_OFFLINE is set. {how}") from cached_error
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / f"layerloop-{model.replace('/', '--')}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock)):
            return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as error:
        raise ModelNotAvailableError(f"{model} (revision {revision or 'main'}) could not be downloaded "
                                     f"({type(error).__name__}: {error}). {how}") from error
