"""Inference with the in-context decompose/compose LoRA, in the style of a diffusers pipeline.

``InContextPipeline.from_checkpoint(folder, device=..., dtype=...)`` rebuilds the base model a trained
checkpoint names (``lora.json``; ``incontext_task.json`` may point it at a local copy), loads the LoRA, and
``pipe(composite, region, caption, steps=..., seed=...)`` (= ``pipe.decompose``) returns the layer and the
clean object; ``pipe.compose(layer, background, region, ...)`` goes the other way. Both run the shared Euler
sampler (``models/sampling.py``) over the whole H x 4W canvas conditioned for their task, as the Fill
pipeline does, with noise from a CPU generator seeded with ``seed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from layerloop import storage
from layerloop.models import incontext_checkpoint as checkpoint_io
from layerloop.models.checkpoints import recorded_hash
from layerloop.models.incontext import InContextLoRA
from layerloop.models.incontext_canvas import (
    COMPOSE, DECOMPOSE, PANELS, CanvasBatch, check_image, pack_canvas, recomposition_error, unpack_canvas,
)
from layerloop.models.incontext_base import (
    base_hash as incontext_base_hash, is_base_folder, parse_tiny_base_name, parse_tiny_model, tiny_model_id,
)
from layerloop.models.removal import INPAINT_METHODS, inpaint
from layerloop.models.sampling import euler_sample, sigma_schedule

__all__ = ["Decomposition", "FootprintRemoval", "InContextPipeline", "build_model", "load_model"]

TINY_BASE_PREFIX = "tiny-"  # how lora.json names a tiny base: "tiny-SEED", "tiny-s2d-SEED"


@dataclass
class Decomposition:
    layer: np.ndarray  # H x W x 4 uint8
    background: np.ndarray  # H x W x 3 uint8: the clean object (the object panel's, or the footprint removal's)
    canvas: np.ndarray  # the decoded canvas, given panels pasted back
    recomposition_error: float  # of layer and background as returned
    panel_background: np.ndarray | None = None  # the object panel's own prediction, when background is not it


@dataclass(frozen=True)
class FootprintRemoval:
    """The clean object as the composite with the decomposed layer's footprint removed: the pixels whose
    predicted alpha exceeds ``alpha`` (0-1) are inpainted from their surroundings with OpenCV (``method``
    Navier-Stokes or Telea, ``radius`` px); every other pixel is the composite, bit for bit (all of them
    when the footprint is empty or covers the whole image, which leaves nothing to inpaint from). The LoRA says
    where the layer is, the inpainter what lies under it: a decomposition followed by object removal, as the
    matting + removal baseline of the evaluation chains them (docs/fidelity.md says why the CPU experiment
    uses it)."""

    alpha: float = 0.03
    radius: int = 5
    method: str = "ns"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"footprint alpha must be in (0, 1), got {self.alpha}")
        if self.radius < 1:
            raise ValueError(f"footprint radius must be at least 1 px, got {self.radius}")
        if self.method not in INPAINT_METHODS:
            raise ValueError(f"footprint method must be one of {sorted(INPAINT_METHODS)}, got {self.method!r}")

    def footprint(self, layer: np.ndarray) -> np.ndarray:
        """H x W uint8 0/255: where the layer's alpha exceeds the threshold."""
        check_image(layer, 4, "layer")
        return np.where(layer[..., 3].astype(np.float64) > self.alpha * 255.0, 255, 0).astype(np.uint8)

    def __call__(self, composite: np.ndarray, layer: np.ndarray) -> np.ndarray:
        check_image(composite, 3, "composite")
        hole = self.footprint(layer)
        if hole.shape != composite.shape[:2]:
            raise ValueError(f"layer is {hole.shape}, composite {composite.shape[:2]}")
        if not hole.any() or hole.all():  # nothing to remove, or nothing left to inpaint from
            return composite.copy()
        return inpaint(composite, hole, self.radius, self.method)


def build_model(model: str, revision: str | None, dtype: torch.dtype, device: torch.device | str,
                config: dict[str, Any], text_tokens: int | None = None, lora_seed: int = 0) -> InContextLoRA:
    """A fresh ``InContextLoRA``: the tiny random instance for ``tiny`` / ``tiny:SEED`` / ``tiny:s2d`` /
    ``tiny:s2d-SEED`` (fp32 always; ``models/incontext_base.py``), else FLUX.1-Fill-dev from ``model`` (hub
    id or folder) or a tiny base folder (``incontext-base`` training) in ``dtype``. The LoRA's random init
    comes from ``lora_seed`` without touching the caller's global RNG."""
    config = dict(config)
    tiny = parse_tiny_model(model) or parse_tiny_base_name(config.get("base_model"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_seed)
        if tiny is not None:
            variant, seed = tiny
            config.pop("base_revision", None)
            config.pop("base_model", None)
            rank, alpha = config.pop("rank", 4), config.pop("alpha", 4.0)
            net = InContextLoRA.tiny(seed=seed, rank=rank, alpha=alpha, vae=variant, **config).to(device)
        else:
            config.pop("base_model", None)
            config.pop("base_revision", None)
            net = InContextLoRA.from_pretrained(model, revision, dtype=dtype, device=str(device), **config)
            if text_tokens is not None and hasattr(net.text_encoder, "max_sequence_length"):
                net.text_encoder.max_sequence_length = text_tokens
    return net


def base_model(checkpoint: str | os.PathLike) -> tuple[str, str | None]:
    """(model, revision) a checkpoint's LoRA was trained on: ``incontext_task.json``'s model when there is
    one (it may be a local folder), else the base named in ``lora.json``; a tiny base as its model id
    (``tiny:SEED``, ``tiny:s2d-SEED``)."""
    saved = checkpoint_io.read_lora_meta(checkpoint)["config"]
    model = checkpoint_io.read_task_info(checkpoint).get("model") or saved["base_model"]
    tiny = parse_tiny_base_name(saved["base_model"])
    if tiny is not None:
        model = tiny_model_id(*tiny)
    elif storage.is_remote(model):  # a base pretrained in a staged run (``storage.canonical``): its local copy
        model = str(storage.local_folder(model))
    return model, saved.get("base_revision")


def check_base_hash(checkpoint: str | os.PathLike, model: str) -> None:
    """A LoRA trained on a tiny base folder records the folder's ``base_hash``; refuse a folder whose weights
    changed since (a retrained base at the same path would silently give another model)."""
    recorded = checkpoint_io.read_task_info(checkpoint).get("base_hash")
    if recorded and is_base_folder(model):
        current = incontext_base_hash(model)
        if current != recorded:
            raise ValueError(f"{checkpoint} was trained on the base {model} with weights {recorded}; that folder "
                             f"now holds weights {current} (retrained?). Retrain the LoRA or restore the base")


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> InContextLoRA:
    """The model of a saved in-context run (``final/`` or ``checkpoints/step-N/weights``): the base it names
    with the LoRA loaded, in eval mode. FileNotFoundError naming the folder when it is not a checkpoint."""
    meta = checkpoint_io.read_lora_meta(checkpoint)
    saved = checkpoint_io.InContextConfig.from_json(meta["config"]).to_json()
    saved["target_modules"] = tuple(saved["target_modules"])
    model, revision = base_model(checkpoint)
    check_base_hash(checkpoint, model)
    text_tokens = checkpoint_io.read_task_info(checkpoint).get("text_tokens")
    net = build_model(model, revision, dtype, device, saved, text_tokens)
    net.load_lora(checkpoint)
    return net.eval()


class InContextPipeline:
    """Decompose / compose with an ``InContextLoRA``. ``checkpoint_hash`` is the hash of the checkpoint it
    was loaded from (None when built from a model)."""

    def __init__(self, model: InContextLoRA, checkpoint_hash: str | None = None):
        self.model = model
        self.checkpoint_hash = checkpoint_hash

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> InContextPipeline:
        """The pipeline of a trained checkpoint folder (the tiny base is always float32)."""
        model = load_model(checkpoint, device=device, dtype=dtype)
        return cls(model, recorded_hash(checkpoint, checkpoint_io.checkpoint_hash))

    @property
    def vae_scale(self) -> int:
        return self.model.vae_scale

    @property
    def size_multiple(self) -> int:
        """Panel sides must be multiples of this (VAE scale x 2x2 token packing)."""
        return 2 * self.model.vae_scale

    def __call__(self, composite: np.ndarray, region: np.ndarray, caption: str = "", steps: int = 8,
                 seed: int = 0, removal: FootprintRemoval | None = None) -> Decomposition:
        return self.decompose(composite, region, caption, steps=steps, seed=seed, removal=removal)

    def decompose(self, composite: np.ndarray, region: np.ndarray, caption: str = "", steps: int = 8,
                  seed: int = 0, removal: FootprintRemoval | None = None) -> Decomposition:
        """Layer + clean object for one H x W x 3 uint8 composite and its H x W region mask; the given
        composite panel is pasted back before unpacking. With ``region_margin`` set, the model paints only
        the (dilated) region of the layer and object panels: outside it the object is the composite and
        the layer is empty, pasted back bit for bit. With ``removal`` the clean object is the composite
        with the predicted layer's footprint inpainted (``FootprintRemoval``), and the object panel's own
        prediction is kept in ``panel_background``."""
        check_image(composite, 3, "composite")
        height, width = composite.shape[:2]
        self.model.check_panel_size(height, width)
        matte = self.model.config.matte
        blank = np.zeros((height, width, 4), np.uint8)
        # outside the region the clean object is what the composite shows (a layer changes only its region)
        canvas = pack_canvas(composite, blank, composite if self.model.restricted else np.zeros_like(composite),
                             matte)
        out = self.paste_given(DECOMPOSE, self.sample(DECOMPOSE, canvas, region, caption, steps, seed), canvas,
                               region)
        out[:, :width] = composite
        _, layer, background = unpack_canvas(out, matte)
        panel = None
        if removal is not None:
            panel, background = background, removal(composite, layer)
        return Decomposition(layer, background, out, recomposition_error(composite, layer, background), panel)

    def compose(self, layer: np.ndarray, background: np.ndarray, region: np.ndarray, caption: str = "",
                steps: int = 8, seed: int = 0) -> np.ndarray:
        """The composite (H x W x 3 uint8) the LoRA's compose direction makes of an RGBA layer and a clean
        object: the other half of the cycle ``compose(decompose(C)) ~ C``."""
        check_image(layer, 4, "layer")
        check_image(background, 3, "background")
        height, width = background.shape[:2]
        self.model.check_panel_size(height, width)
        canvas = pack_canvas(background if self.model.restricted else np.zeros_like(background), layer,
                             background, self.model.config.matte)
        out = self.paste_given(COMPOSE, self.sample(COMPOSE, canvas, region, caption, steps, seed), canvas, region)
        return out[:, :width].copy()

    def paste_given(self, direction: str, generated: np.ndarray, canvas: np.ndarray,
                    region: np.ndarray) -> np.ndarray:
        """With ``region_margin`` set: ``generated`` where the task painted (``fill_pixels``), the given
        ``canvas`` everywhere else, as an inpainting pipeline pastes the unmasked pixels back. Without it
        the generated canvas is returned as it is."""
        if not self.model.restricted:
            return generated
        height, width = canvas.shape[0], canvas.shape[1] // len(PANELS)
        region_t = torch.from_numpy(np.asarray(region) > 0)[None]
        painted = self.model.fill_pixels(direction, region_t, height, width)[0].cpu().numpy() > 0
        return np.where(painted[..., None], generated, canvas)

    @torch.no_grad()
    def sample(self, direction: str, canvas: np.ndarray, region: np.ndarray, caption: str, steps: int,
               seed: int) -> np.ndarray:
        """The Euler sampler over a whole H x 4W canvas conditioned for ``direction``; returns the generated
        canvas as uint8 (the given panels are not pasted back)."""
        model = self.model
        height, width = canvas.shape[0], canvas.shape[1] // len(PANELS)
        batch = model.encode(CanvasBatch.from_canvases(canvas[None], np.asarray(region)[None], [caption]))
        cond = model.condition(direction, batch.x0, batch.region, height, width)
        text = model.encode_text(direction, [caption])
        x = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(seed)).to(model.device)

        def velocity(latents: list[torch.Tensor], sigma: float) -> list[torch.Tensor]:
            t = torch.tensor([sigma], device=model.device)
            return [model.velocity(latents[0], cond, t, text, height, width)]

        sigmas = sigma_schedule(steps, x.shape[1], grid="uniform", dtype=torch.float64)
        (x,) = euler_sample(velocity, [x], sigmas)
        panels = model.unpack(x, height, width).chunk(len(PANELS), dim=3)
        pixels = torch.cat([model.decode_panel(p)[0] for p in panels], dim=2).permute(1, 2, 0).float().cpu().numpy()
        return np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
