"""The ``trimap`` stage: turn the binary object mask into a trimap for matting.

Reads ``object_mask`` (H x W uint8, 0/255); writes ``work["trimap"]`` (H x W uint8): 0 definite
background, 128 unknown, 255 definite foreground (docs/stage-flow.md, step 2).

Object masks from segmentation or annotation are only right to within a few pixels and say nothing
about soft edges (hair, fur, motion blur), so a band around the mask's edge is left for the matting
stage to decide. The band's half-width scales with the image (``band`` times the shorter side, at least
``min_band_px``) so that the same config means the same thing at 256 and at 2048 pixels.

Thin objects (a cable, a stick, a thin logo stroke) are narrower than twice the band: eroding them by the
full half-width would leave no definite foreground, and matting with no foreground anchor either fails
(pymatting refuses such a trimap) or returns alpha 0 for the whole object. In that case only the *inner*
half of the band shrinks, to the largest erosion that still leaves foreground pixels (at worst none, so
the mask itself is the foreground). The outer half keeps its full width because the uncertainty outside
the object (how far hair or blur reach) does not depend on how thick the object is. The inner radius
actually used is recorded per sample (``inner_band_px``).
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

BACKGROUND, UNKNOWN, FOREGROUND = 0, 128, 255


class TrimapParams(StageParams):
    band: float = Field(0.02, ge=0.0, le=0.5)  # unknown-band half-width, fraction of the shorter side
    min_band_px: int = Field(3, ge=0)  # floor for small images, where a fraction rounds to nothing


def band_width(shape: tuple[int, ...], band: float, min_band_px: int) -> int:
    """Half-width of the unknown band in pixels for an image of ``shape`` (H, W, ...)."""
    return max(int(min_band_px), int(round(band * min(shape[0], shape[1]))))


def ellipse(radius: int) -> np.ndarray:
    """Elliptical structuring element of the given radius: a disc, so the band has the same width in
    every direction (a square kernel would make it ~41% wider along diagonals)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def make_trimap(object_mask: np.ndarray, band_px: int, crop: bool = True) -> tuple[np.ndarray, int]:
    """Trimap (uint8 0/128/255) from a binary mask and the inner erosion radius that was used.

    With ``crop`` the morphology runs on the mask's bounding box grown by ``band_px + 1`` (everything
    farther from the object is definite background): the same trimap as on the whole image
    (``crop=False``), since no disc of radius ``band_px`` around a pixel of the box reaches past the crop,
    and the nearest background pixel of any object pixel lies inside it (a test compares both on masks
    that touch the edges). For a 130 x 110 object in a 512 px image: 1.2 ms instead of 10.7.

    Raises ValueError for an empty mask: there is no object to matte."""
    mask = (np.asarray(object_mask) > 127).astype(np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"object_mask must be H x W, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("object mask is empty: there is no object to matte")

    x, y, w, h = cv2.boundingRect(mask) if crop else (0, 0, mask.shape[1], mask.shape[0])
    pad = band_px + 1
    top, left = max(0, y - pad), max(0, x - pad)
    window = (slice(top, min(mask.shape[0], y + h + pad)), slice(left, min(mask.shape[1], x + w + pad)))
    region = mask[window]
    # Start the inner radius at what the mask's thickness allows: a pixel survives an erosion of radius r
    # only if it is farther than r from the background. The loop below then confirms the choice with the
    # actual elliptical kernel (its discretisation differs from the L2 distance by up to a pixel).
    inside_depth = cv2.distanceTransform(region, cv2.DIST_L2, cv2.DIST_MASK_PRECISE).max()
    inner = max(0, min(band_px, int(np.ceil(inside_depth)) - 1))
    while True:
        sure_fg = cv2.erode(region, ellipse(inner)) if inner > 0 else region
        if sure_fg.any() or inner == 0:
            break
        inner -= 1

    maybe_fg = cv2.dilate(region, ellipse(band_px)) if band_px > 0 else region
    trimap = np.full(mask.shape, BACKGROUND, np.uint8)
    part = trimap[window]
    part[maybe_fg > 0] = UNKNOWN
    part[sure_fg > 0] = FOREGROUND
    return trimap, inner


@register_stage
class TrimapStage(Stage):
    """Object mask -> trimap: erosion gives the definite foreground, dilation the outer edge of the unknown
    band, whose width is a fraction of the image (``band``, at least ``min_band_px``)."""

    name = "trimap"
    reads_work = frozenset()
    Params = TrimapParams
    batch_size = 16

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        if sample.object_mask is None:
            raise ValueError("sample has no object_mask; the trimap stage needs the load stage first")
        band_px = band_width(sample.object_mask.shape, self.params.band, self.params.min_band_px)
        trimap, inner = make_trimap(sample.object_mask, band_px)
        sample.work["trimap"] = trimap
        sample.record_stage(self.name, backend="morphology", **self.describe(), band_px=band_px,
                            inner_band_px=inner)
        return sample
