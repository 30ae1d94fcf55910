"""In-context decompose/compose LoRA on FLUX.1-Fill-dev (issue 5): the model.

One image canvas holds a whole layered example side by side (``models/incontext_canvas.py``), and the Fill
model in-paints the part of it a task asks for. One LoRA serves both tasks; the fill mask and the prompt say
which one is asked:

* **decompose**: the composite is given, the layer and the clean object are generated;
* **compose**: the layer and the clean object are given, the composite is generated.

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

The pieces, one job per module (all re-exported here for existing imports):

* ``incontext_canvas``: the canvas layout, masks, prompts, candidates and batch containers;
* ``text_encoders``: Fill's CLIP + T5 and the tiny byte encoder;
* ``incontext_losses``: the supervised and cycle training losses (a mixin of ``InContextLoRA``);
* ``incontext_checkpoint``: ``InContextConfig`` and LoRA checkpoint IO;
* ``incontext_base``: the tiny bases (``tiny``, ``tiny:s2d`` with the exact ``space_to_depth`` VAE) and the
  base folders that the ``incontext-base`` training task pretrains;
* ``incontext_pipeline``: inference (``InContextPipeline``: decompose / compose with the Euler sampler of
  ``sampling``), and loading a trained checkpoint;
* this module: ``InContextLoRA``, the frozen transformer + VAE + text encoder with the one LoRA.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from layerloop.models import hub
from layerloop.models import incontext_checkpoint as checkpoint_io
from layerloop.models.incontext_canvas import (  # noqa: F401  (re-exported)
    COMPOSE, DECOMPOSE, DIRECTIONS, GENERATED, MATTE, PANELS, PROMPTS, REGION_HINT, CanvasBatch, LatentCanvas,
    canonical_layer, check_direction, condition_mask, make_candidate, pack_canvas, prompt_for,
    recomposition_error, split_panels, task_mask, unpack_canvas,
)
from layerloop.models.incontext_checkpoint import (  # noqa: F401  (re-exported)
    FILL_MODEL_ID, LORA_CONFIG_FILE, LORA_FILE, LORA_FORMAT, LORA_TARGETS, InContextConfig, checkpoint_hash,
)
from layerloop.models.incontext_base import to_velocity
from layerloop.models.incontext_losses import InContextLosses
from layerloop.models.text_encoders import (  # noqa: F401  (re-exported)
    TEXT_SUBFOLDERS, ByteTextEncoder, FluxTextEncoder, TextEmbeddings,
)

# What from_pretrained reads from a Fill repository; the rest (the pipeline's own files) is not needed.
FILL_SUBFOLDERS = ("transformer", "vae") + TEXT_SUBFOLDERS
# Weights neither on disk nor downloadable: the shared resolver's error (``models/hub.py``).
ModelNotAvailableError = hub.ModelNotAvailable


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


class InContextLoRA(InContextLosses, nn.Module):
    """A frozen FluxTransformer2DModel (Fill layout) with one peft LoRA for both tasks, the frozen VAE and
    text encoder that feed it; the training losses come from ``InContextLosses``, inference from
    ``InContextPipeline`` (``decompose`` / ``compose`` here are shortcuts to it)."""

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 config: InContextConfig | None = None, prediction: str = "velocity", positions: str = "canvas"):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        from layerloop.models.incontext_base import POSITIONS, PREDICTIONS, check_choice

        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("positions", positions, POSITIONS)
        self.config = config or InContextConfig()
        self.prediction = prediction  # what the base predicts (incontext_base.to_velocity); the base's, not the LoRA's
        self.positions = positions  # where the base places the canvas for RoPE (incontext_base.canvas_ids); the base's
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
        self._constant_panels: dict[tuple[float, int, int, str], torch.Tensor] = {}  # constant_latents

    # ------------------------------------------------------------- constructors
    @classmethod
    def tiny(cls, seed: int = 0, rank: int = 4, alpha: float = 4.0, vae: str = "kl", **config: Any) -> InContextLoRA:
        """Random tiny model for tests: a one-block-each transformer in the Fill token layout, a byte-level
        text encoder, and the VAE ``vae`` names: ``kl`` a random 2-level AutoencoderKL (scale 2, 4 latent
        channels; cannot reconstruct), ``s2d`` the exact space-to-depth autoencoder (scale 2, 12 channels;
        ``models/space_to_depth.py``). Same seed and VAE, same weights (``models/incontext_base.py``)."""
        from layerloop.models.incontext_base import tiny_base_name, tiny_components

        transformer, autoencoder, text_encoder = tiny_components(vae, seed)
        config.setdefault("base_model", tiny_base_name(vae, seed))
        return cls(transformer, autoencoder, text_encoder, InContextConfig(rank=rank, alpha=alpha, **config))

    @classmethod
    def from_pretrained(cls, model: str = FILL_MODEL_ID, revision: str | None = None,
                        dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                        text_encoder: nn.Module | None = None, **config: Any) -> InContextLoRA:
        """FLUX.1-Fill-dev (hub id or local folder in the diffusers layout) with a fresh LoRA.
        ``text_encoder`` replaces CLIP + T5 (for instance a shared or precomputing encoder). A tiny base
        folder (``incontext_base.save_base``, the ``incontext-base`` training task's ``final/``) loads with its
        own byte text encoder; its ``base_model`` is recorded as the absolute path."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        from layerloop.models import incontext_base

        if incontext_base.is_base_folder(model):  # a tiny base pretrained by the incontext-base task
            transformer, vae, own_text_encoder = incontext_base.load_base(model, dtype, device)
            config = {"base_model": str(Path(model).expanduser().resolve()), "base_revision": None, **config}
            return cls(transformer, vae, (text_encoder or own_text_encoder).to(device), InContextConfig(**config),
                       prediction=incontext_base.base_prediction(model),
                       positions=incontext_base.base_positions(model))
        needed = ("transformer", "vae") + (() if text_encoder is not None else TEXT_SUBFOLDERS)
        folder = hub.resolve_folder(model, needed, revision=revision)
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
        self.check_panel_size(height, width)
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

    @property
    def restricted(self) -> bool:
        """Whether the tasks generate only the layer's (dilated) region (``InContextConfig.region_margin``)."""
        return self.config.region_margin is not None

    def fill_tokens(self, direction: str, region: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boolean B x L: the tokens ``direction`` generates. Whole panels (``panel_tokens``, the same for
        every sample) unless ``region_margin`` is set; then, in each generated panel, the tokens that touch
        the region (B x H x W) dilated by ``region_margin`` pixels."""
        b = region.shape[0]
        whole = self.panel_tokens(GENERATED[direction], height, width)
        if not self.restricted:
            return whole[None].expand(b, -1)
        step = 2 * self.vae_scale  # pixels per token side
        area = (region.to(self.device).float() > 0).float()[:, None]
        margin = int(self.config.region_margin)
        if margin:
            area = torch.nn.functional.max_pool2d(area, 2 * margin + 1, stride=1, padding=margin)
        touched = torch.nn.functional.max_pool2d(area, step, stride=step)[:, 0] > 0  # B x rows x columns
        canvas = torch.zeros(b, touched.shape[1], len(PANELS) * touched.shape[2], dtype=torch.bool,
                             device=self.device)
        columns = touched.shape[2]
        for name in GENERATED[direction]:
            i = PANELS.index(name)
            canvas[:, :, i * columns:(i + 1) * columns] = touched
        return canvas.reshape(b, -1)

    def fill_pixels(self, direction: str, region: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``fill_tokens`` as a B x H x 4W float pixel mask (1 where the task paints)."""
        tokens = self.fill_tokens(direction, region, height, width).float()
        step = 2 * self.vae_scale
        grid = tokens.view(tokens.shape[0], height // step, len(PANELS) * width // step)
        return grid.repeat_interleave(step, dim=1).repeat_interleave(step, dim=2)

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        from layerloop.models.incontext_base import canvas_ids

        rows, columns = height // (2 * self.vae_scale), len(PANELS) * width // (2 * self.vae_scale)
        return canvas_ids(rows, columns, len(PANELS), self.positions, self.device)

    def pack_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """B x H x 4W pixel mask -> B x L x 4s^2, as ``FluxFillPipeline.prepare_mask_latents`` (each
        latent pixel carries its s x s block of mask pixels, then 2x2 patches are packed)."""
        b, height, width = mask.shape
        s = self.vae_scale
        h, w = height // s, width // s
        mask = mask.view(b, h, s, w, s).permute(0, 2, 4, 1, 3).reshape(b, s * s, h, w)
        return self.pack(mask)

    def constant_latents(self, value: float, height: int, width: int) -> torch.Tensor:
        """Latents (1 x c x h x w) of a panel whose pixels are all ``value`` (in [-1, 1]), encoded once per
        value, size and device."""
        key = (float(value), height, width, str(self.device))
        if key not in self._constant_panels:
            pixels = torch.full((1, 3, height, width), float(value), device=self.device)
            self._constant_panels[key] = self.encode_panel(pixels).float()
        return self._constant_panels[key]

    def empty_panel(self, height: int, width: int) -> torch.Tensor:
        """Packed-ready latents (1 x c x h x w) of a masked-out panel: Fill zeroes masked pixels
        (``image * (1 - mask)``), i.e. mid grey in [-1, 1]."""
        return self.constant_latents(0.0, height, width)

    # ------------------------------------------------------------- conditioning and the network
    def condition(self, direction: str, canvas: torch.Tensor, region: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
        """Fill conditioning for ``direction`` from packed canvas latents (B x L x 4c; true or estimated,
        gradients pass): masked-image latents with the generated panels emptied, then the packed mask."""
        check_direction(direction)
        b = canvas.shape[0]
        masked = self.given_only(direction, canvas, height, width, region)
        if self.restricted:
            mask = self.fill_pixels(direction, region, height, width)
        else:
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
        """The flow velocity ``v`` (≈ noise - x0) for packed noisy latents ``x_t``: the transformer's output,
        or made from it when the base predicts x0 (``incontext_base.to_velocity``)."""
        b = x_t.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.config.guidance_scale, device=self.device, dtype=self.dtype)
        out = self.transformer(
            hidden_states=torch.cat([x_t, cond], dim=-1).to(self.dtype),
            encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
            timestep=t.to(self.device, self.dtype).expand(b), guidance=guidance,
            img_ids=self.image_ids(height, width), txt_ids=text.ids, return_dict=False)[0]
        return to_velocity(out.float(), x_t.float(), cond[..., :x_t.shape[-1]].float(), t, self.prediction)

    def one_step(self, direction: str, canvas: torch.Tensor, x0: torch.Tensor, region: torch.Tensor,
                 captions: Sequence[str], t: torch.Tensor, noise: torch.Tensor, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, x0_hat) for one task at timesteps ``t`` (B,): the conditioning comes from ``canvas`` (its
        generated panels are emptied), the noisy input ``(1 - t) x0 + t noise`` from ``x0``. The supervised
        terms pass the true canvas as both; the cycle passes t = 1, where ``x0`` does not enter at all."""
        t = t.to(self.device).float().view(-1, 1, 1)
        x_t = (1.0 - t) * x0 + t * noise
        v = self.velocity(x_t, self.condition(direction, canvas, region, height, width), t.view(-1),
                          self.encode_text(direction, captions), height, width)
        return v, x_t - t * v

    # ------------------------------------------------------------- LoRA checkpoints
    def save_lora(self, folder: str | os.PathLike) -> Path:
        """``lora.safetensors`` + ``lora.json`` in ``folder`` (``incontext_checkpoint.save_lora``)."""
        return checkpoint_io.save_lora(self, folder)

    def load_lora(self, folder: str | os.PathLike) -> None:
        """Load a ``save_lora`` checkpoint; refuses a different LoRA shape (``incontext_checkpoint.load_lora``)."""
        checkpoint_io.load_lora(self, folder)

    # ------------------------------------------------------------- inference shortcuts
    def decompose(self, composite: np.ndarray, region: np.ndarray, caption: str = "", steps: int = 8,
                  seed: int = 0):
        """``InContextPipeline(self).decompose(...)``: layer + clean object of one composite."""
        from layerloop.models.incontext_pipeline import InContextPipeline

        return InContextPipeline(self).decompose(composite, region, caption, steps=steps, seed=seed)

    def compose(self, layer: np.ndarray, background: np.ndarray, region: np.ndarray, caption: str = "",
                steps: int = 8, seed: int = 0) -> np.ndarray:
        """``InContextPipeline(self).compose(...)``: the composite of a layer over a clean object."""
        from layerloop.models.incontext_pipeline import InContextPipeline

        return InContextPipeline(self).compose(layer, background, region, caption, steps=steps, seed=seed)

    def check_panel_size(self, height: int, width: int) -> None:
        step = 2 * self.vae_scale  # a panel must cover whole tokens so that masks split exactly at its edges
        if height % step or width % step:
            raise ValueError(f"panel size {height}x{width} must be a multiple of {step} (VAE scale x 2x2 packing)")
