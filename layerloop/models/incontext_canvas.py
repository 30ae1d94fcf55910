"""Canvas layout of the in-context decompose/compose LoRA: one image holds a whole layered example.

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

What lives here: the layout constants, the numpy canvas (uint8) functions, the task fill masks and prompts,
candidates with their lineage, and the two batch containers (pixels ``CanvasBatch``, tokens ``LatentCanvas``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from layerloop.samples import LayeredSample, composite as composite_layers

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


# ============================================================================ canvas (numpy, uint8)
def canonical_layer(layer_rgba: np.ndarray, matte: int = MATTE) -> np.ndarray:
    """The layer with the colour of fully transparent pixels set to ``matte``: the form a canvas keeps.
    Composites over any background are unchanged, since those pixels have weight 0."""
    check_image(layer_rgba, 4, "layer_rgba")
    out = layer_rgba.copy()
    out[layer_rgba[..., 3] == 0, :3] = matte
    return out


def pack_canvas(composite: np.ndarray, layer_rgba: np.ndarray, background: np.ndarray,
                matte: int = MATTE) -> np.ndarray:
    """[composite | layer colour | layer alpha | background] as one H x 4W x 3 uint8 image."""
    check_image(composite, 3, "composite")
    check_image(layer_rgba, 4, "layer_rgba")
    check_image(background, 3, "background")
    if not composite.shape[:2] == layer_rgba.shape[:2] == background.shape[:2]:
        raise ValueError(f"panel sizes differ: composite {composite.shape[:2]}, layer {layer_rgba.shape[:2]}, "
                         f"background {background.shape[:2]}")
    layer = canonical_layer(layer_rgba, matte)
    alpha = np.repeat(layer[..., 3:4], 3, axis=2)
    return np.concatenate([composite, layer[..., :3], alpha, background], axis=1)


def split_panels(canvas: np.ndarray) -> dict[str, np.ndarray]:
    """The four H x W x 3 panels of a canvas, by name."""
    check_image(canvas, 3, "canvas")
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
    check_direction(direction)
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
    check_direction(direction)
    caption = caption.strip().rstrip(".") or "an object with a layer on it"
    return PROMPTS[direction].format(caption=caption)


def recomposition_error(composite: np.ndarray, layer: np.ndarray, background: np.ndarray) -> float:
    """Mean absolute difference between C and ``composite(F, B)`` (the alpha blend), in 1/255 steps.

    For alpha-blended data it is 0 for the true layers, and for a predicted decomposition it says how well
    the layers explain the input they came from. For a composite that is a non-linear rendering of
    (layer, object) (kind ``rendered``) it is not 0 even for the true layers: it is then a consistency score
    of the predicted layers (do they blend back to the input), not a distance to the truth; the cycle error
    (the compose direction applied to the decomposition) is the non-linear counterpart."""
    expected = composite_layers(layer, background).astype(np.float64)
    return float(np.abs(expected - composite.astype(np.float64)).mean())


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


def check_image(image: np.ndarray, channels: int, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != channels:
        raise ValueError(f"{name} must be an H x W x {channels} uint8 array, got "
                         f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image))}")


def check_direction(direction: str) -> None:
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
