"""Pretraining a tiny in-context base (issue 14): the Fill transformer's full weights as an inpainter.

| family           | data                              | trains                  | loss                                    |
|------------------|-----------------------------------|-------------------------|-----------------------------------------|
| `incontext-base` | the in-context training data (logo | the whole transformer   | FM on masked tokens                     |
|                  | `rendered` samples, quadruples)   | (VAE, text: frozen)     | + `unmasked_weight` * FM on the others  |

Why: a LoRA adapts a pretrained model. FLUX.1-Fill-dev is one; the tiny random transformer of `tiny` is
not, so a LoRA on it has nothing to adapt and a CPU-scale experiment cannot show learning. This task is
the stand-in for Fill's pretraining: it trains a tiny Flux-Fill-shaped transformer (`model: tiny:s2d` /
`tiny:s2d-SEED`, the exact space-to-depth VAE of `models/space_to_depth.py`, so every pixel it learns is
reconstructed) with the Fill conditioning, flow matching, and saves a base folder
(`models/incontext_base.py`) that an `incontext` training config names as its `model` (`runs/base/final`).
`model` may also be a base folder, to continue pretraining it.

**What it sees: the in-context canvas with random boxes.** Each sample is packed into the four-panel canvas
the LoRA works on ([composite | layer colour | layer alpha | clean object], `models/incontext_canvas.py`)
and 1 to `max_boxes` random rectangles (on the token grid, `min_box` to 1 panel per side, anywhere on
the canvas, across panel edges too) are masked: their pixels are zeroed (mid grey) in the masked image and
1 in the Fill mask, exactly as `FluxFillPipeline.prepare_mask_latents`. The prompt is the sample's caption,
not a task prompt. Why the canvas rather than single images: what makes a base useful to the in-context
LoRA is knowing the canvas, i.e. what each panel looks like (an object, a logo on grey, a grey matte) and how
the panels of one example correspond (the object is the composite without the logo, the matte is the logo's
shape), so that a hole in one panel is filled from the others. A single-image inpainter would learn only
the first. What it never sees is the tasks themselves: masks are never the task masks (whole panels by
design, with the `REGION_HINT` in the composite's mask channel) and prompts never the task prompts, so
decomposing and composing stay what the LoRA has to learn.

**Loss**: flow matching (`x_t = (1 - t) x0 + t noise`, target `noise - x0`, logit-normal t) averaged over the
masked tokens, plus `unmasked_weight` (0.1) times the average over the others (the base must also carry
the given pixels through, which the sampler's output relies on; weighted down because it is copying).
Guidance is fed at `guidance` (30), the value the in-context LoRA trains and samples with. With
`prediction: sample` or `residual` the transformer predicts x0 (or x0 minus the conditioning's image
latents) instead of the velocity, and the loss is the MSE of x0 (`incontext_base.to_velocity`,
`flow_error`); the base folder records it, and LoRAs on it use it. With `positions: panels` every panel is
placed on RoPE's index axis with its own rows and columns (`incontext_base.canvas_ids`; FLUX's layout is
one wide image, `canvas`), recorded and used the same way.

Weights: `save_weights` writes the base folder (`transformer/`, `vae/`, `text_encoder/`, `model_index.json`);
`weights_hash` is `incontext_base.base_hash` (the transformer weights' digest), which LoRAs trained on the
base record and their loading checks. Checkpoints and exact resume are the generic loop's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from layerloop.models import incontext_base
from layerloop.models.incontext_canvas import PANELS, CanvasBatch
from layerloop.samples import KINDS, LayeredSample
from layerloop.training.config import TrainConfig
from layerloop.training.incontext_task import prepare_sample
from layerloop.training.loop import register_task

FAMILY = "incontext-base"
STREAM = "canvas"


class InContextBaseParams(BaseModel):
    """The ``task:`` section of an ``incontext-base`` training config."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(32, ge=4)  # panel size (the canvas is 4 panels wide), a multiple of 2 x VAE scale
    # transformer of a new base (model tiny:s2d[-SEED] / tiny[:SEED]); ignored when model is a base folder
    layers: int = Field(2, ge=1)  # double-stream blocks
    single_layers: int = Field(2, ge=0)  # single-stream blocks
    heads: int = Field(4, ge=1)
    head_dim: int = Field(16, ge=8)
    text_dim: int = Field(32, ge=4)  # byte text encoder width (= joint attention and pooled dims)
    # masks
    max_boxes: int = Field(3, ge=1)  # 1..max_boxes rectangles per canvas
    min_box: float = Field(0.25, gt=0, le=1)  # smallest box side, as a fraction of the panel side
    unmasked_weight: float = Field(0.1, ge=0)  # weight of the FM loss on the tokens that are not masked
    guidance: float = 30.0  # fed to the guidance embedding (the in-context LoRA's default)
    timestep_mean: float = 0.0
    timestep_std: float = Field(1.0, gt=0)
    kinds: list[str] = Field(default_factory=lambda: ["rendered", "quadruple"])
    # what the transformer predicts (incontext_base.to_velocity): None is the base folder's when ``model`` is
    # one, else ``velocity`` (FLUX's); ``residual`` lets a tiny base learn content instead of carrying noise
    prediction: Literal["velocity", "sample", "residual"] | None = None
    # where the canvas's tokens sit for RoPE (incontext_base.canvas_ids): None is the base folder's when
    # ``model`` is one, else ``canvas`` (FLUX's one wide image); ``panels`` gives every panel its own index
    positions: Literal["canvas", "panels"] | None = None

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(KINDS))
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {kinds}")
        if "pair" in kinds:
            raise ValueError("pairs have no layer and object panels; the canvas needs F, B, M and C")
        return kinds


def sample_boxes(rows: int, columns: int, panel_columns: int, max_boxes: int, min_box: float,
                 generator: torch.Generator) -> torch.Tensor:
    """A rows x columns token mask (1 = masked) of 1..``max_boxes`` random rectangles, each side from
    ``min_box`` of a panel to a whole panel (``rows`` x ``panel_columns`` tokens), anywhere on the canvas."""
    def draw(low: int, high: int) -> int:  # uniform integer in [low, high]
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    mask = torch.zeros(rows, columns)
    for _ in range(draw(1, max_boxes)):
        height = draw(max(1, math.ceil(min_box * rows)), rows)
        width = draw(max(1, math.ceil(min_box * panel_columns)), panel_columns)
        top, left = draw(0, rows - height), draw(0, columns - width)
        mask[top:top + height, left:left + width] = 1.0
    return mask


class FillBase(nn.Module):
    """The tiny Fill model being pretrained: the transformer (trained), its VAE and byte text encoder
    (frozen). Token layout, packing and conditioning as ``InContextLoRA`` (``models/incontext.py``)."""

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, prediction: str = "velocity",
                 positions: str = "canvas"):
        super().__init__()
        incontext_base.check_choice("prediction", prediction, incontext_base.PREDICTIONS)
        incontext_base.check_choice("positions", positions, incontext_base.POSITIONS)
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.prediction = prediction  # what the transformer learns to predict (incontext_base.to_velocity)
        self.positions = positions  # where the canvas's tokens sit for RoPE (incontext_base.canvas_ids)
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        transformer.requires_grad_(True)
        self.scale = incontext_base.vae_scale(vae)
        self.latent_channels = vae.config.latent_channels
        expected = 8 * self.latent_channels + 4 * self.scale ** 2
        if transformer.config.in_channels != expected:
            raise ValueError(f"transformer in_channels is {transformer.config.in_channels}; the Fill layout for a "
                             f"{self.latent_channels}-channel VAE with scale {self.scale} needs {expected}")

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x 4W canvas in [-1, 1] -> B x L x 4c tokens, panel by panel as ``InContextLoRA.encode``."""
        config = self.vae.config
        panels = pixels.to(self.device, self.vae.dtype).chunk(len(PANELS), dim=3)
        latents = torch.cat([self.vae.encode(p).latent_dist.mode() for p in panels], dim=3).float()
        return self.pack((latents - (config.shift_factor or 0.0)) * config.scaling_factor)

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    def pack_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """B x H x 4W pixel mask -> B x L x 4s^2 (``FluxFillPipeline.prepare_mask_latents``)."""
        b, height, width = mask.shape
        s = self.scale
        mask = mask.view(b, height // s, s, width // s, s).permute(0, 2, 4, 1, 3).reshape(b, s * s, height // s,
                                                                                         width // s)
        return self.pack(mask)

    def image_ids(self, rows: int, columns: int) -> torch.Tensor:
        return incontext_base.canvas_ids(rows, columns, len(PANELS), self.positions, self.device)

    def velocity(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, captions: list[str],
                 rows: int, columns: int, guidance: float) -> torch.Tensor:
        text = self.text_encoder(captions)
        dtype = self.transformer.dtype
        b = x_t.shape[0]
        guidance_input = None
        if self.transformer.config.guidance_embeds:
            guidance_input = torch.full((b,), guidance, device=self.device, dtype=dtype)
        out = self.transformer(
            hidden_states=torch.cat([x_t, cond], dim=-1).to(dtype),
            encoder_hidden_states=text.embeds.to(self.device, dtype),
            pooled_projections=text.pooled.to(self.device, dtype), timestep=t.to(self.device, dtype),
            guidance=guidance_input, img_ids=self.image_ids(rows, columns), txt_ids=text.ids.to(self.device, dtype),
            return_dict=False)[0]
        return incontext_base.to_velocity(out.float(), x_t.float(), cond[..., :x_t.shape[-1]].float(), t,
                                          self.prediction)


@register_task(FAMILY)
class InContextBaseTask:
    Params = InContextBaseParams

    def __init__(self, cfg: TrainConfig):
        if cfg.family != FAMILY:
            raise ValueError(f"InContextBaseTask needs family {FAMILY!r}, got {cfg.family!r}")
        self.cfg = cfg
        self.params = InContextBaseParams(**cfg.task)
        tiny = incontext_base.parse_tiny_model(cfg.model)
        if tiny is None and not incontext_base.is_base_folder(cfg.model):
            raise ValueError(f"{FAMILY} pretrains a tiny base: model must be tiny:s2d, tiny:s2d-SEED (exact "
                             f"space-to-depth VAE), tiny / tiny:SEED, or a base folder it wrote; got {cfg.model!r}")
        if cfg.dtype != "float32":
            raise ValueError(f"{FAMILY} trains the full transformer in float32; got dtype {cfg.dtype}")
        step = 2 * incontext_base.base_vae_scale(cfg.model)
        if self.params.resolution % step:
            raise ValueError(f"task.resolution {self.params.resolution} must be a multiple of {step} "
                             f"(VAE scale x 2x2 token packing)")
        self.model: FillBase | None = None

    # ------------------------------------------------------------------ data
    def streams(self) -> dict[str, tuple[str, ...] | None]:
        return {STREAM: tuple(self.params.kinds)}

    def stream_for_step(self, step: int) -> str:
        return STREAM

    # ------------------------------------------------------------------ models
    def setup(self, device: torch.device) -> None:
        if self.model is not None:
            return
        p = self.params
        tiny = incontext_base.parse_tiny_model(self.cfg.model)
        if tiny is not None:
            parts = incontext_base.tiny_components(*tiny, layers=p.layers, single_layers=p.single_layers,
                                                   heads=p.heads, head_dim=p.head_dim, text_dim=p.text_dim)
            prediction, positions = p.prediction or "velocity", p.positions or "canvas"
        else:
            parts = incontext_base.load_base(self.cfg.model, torch.float32, "cpu")
            prediction = incontext_base.base_prediction(self.cfg.model)
            positions = incontext_base.base_positions(self.cfg.model)
            for key, given, trained in (("prediction", p.prediction, prediction), ("positions", p.positions, positions)):
                if given not in (None, trained):
                    raise ValueError(f"task.{key} is {given!r}, but the base folder {self.cfg.model} was trained "
                                     f"with {trained!r}; leave task.{key} unset to continue it")
        self.model = FillBase(*parts, prediction=prediction, positions=positions).to(device)
        self.model.transformer.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.transformer.parameters())

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.model.vae, "text_encoder": self.model.text_encoder}

    # ------------------------------------------------------------------ loss
    def loss(self, batch: list[LayeredSample], step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        p, model = self.params, self.model
        size = p.resolution
        canvas = CanvasBatch.from_samples([prepare_sample(s, size) for s in batch])
        pixels = torch.cat([canvas.panels[name] for name in PANELS], dim=3)  # B x 3 x H x 4W
        b = pixels.shape[0]
        token = 2 * model.scale
        rows, columns = size // token, len(PANELS) * size // token
        masks = torch.stack([sample_boxes(rows, columns, size // token, p.max_boxes, p.min_box, generator)
                             for _ in range(b)])  # B x rows x columns, per token
        pixel_mask = masks.repeat_interleave(token, dim=1).repeat_interleave(token, dim=2)
        x0 = model.encode(pixels)
        masked = model.encode(pixels * (1.0 - pixel_mask[:, None]))
        cond = torch.cat([masked, model.pack_mask(pixel_mask.to(model.device))], dim=-1)
        t = torch.sigmoid(torch.randn(b, generator=generator) * p.timestep_std + p.timestep_mean).to(model.device)
        noise = torch.randn(x0.shape, generator=generator).to(model.device)
        x_t = (1.0 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        v = model.velocity(x_t, cond, t, [s.caption for s in batch], rows, columns, p.guidance)
        per_token = incontext_base.flow_error(v, noise, x0, t, model.prediction).pow(2).mean(dim=-1)  # B x L
        inside = masks.reshape(b, -1).to(model.device) > 0
        masked_loss = per_token[inside].mean()
        unmasked_loss = per_token[~inside].mean() if (~inside).any() else per_token.new_zeros(())
        loss = masked_loss + p.unmasked_weight * unmasked_loss
        return loss, {"masked": masked_loss.detach(), "unmasked": unmasked_loss.detach(),
                      "mask_fraction": float(inside.float().mean())}

    # ------------------------------------------------------------------ weights
    def save_weights(self, path: Path) -> None:
        p = self.params
        info = {"trained_from": str(self.cfg.model), "resolution": p.resolution, "guidance": p.guidance,
                "data": [d.name for d in self.cfg.data]}
        incontext_base.save_base(path, self.model.transformer, self.model.vae, self.model.text_encoder, info,
                                 prediction=self.model.prediction, positions=self.model.positions)

    def load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(path) / incontext_base.TRANSFORMER_WEIGHTS), device=str(self.model.device))
        self.model.transformer.load_state_dict(state)

    def weights_hash(self, path: Path) -> str:
        return incontext_base.base_hash(path)

