"""The ``box-mask`` stage: the box mask M (255 inside a padded box around the object and its effects).

The box is what an inpainting/insertion model is told to edit, so it must contain everything that changes
between B and C: the object and, with ``include_effects``, its shadow. Padding and jitter therefore only
ever *grow* the box (jitter moves each edge outwards by a random amount): a box that cut through the object
or its shadow would teach a model to leave object pixels behind.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage


@register_stage
class BoxMask(Stage):
    name = "box-mask"
    reads_work = frozenset({"shadow_alpha"})

    class Params(StageParams):
        # Grow the box by the shadow region (work["shadow_alpha"] > effect_threshold) when present.
        include_effects: bool = True
        # Shadow opacity below ~4% darkens the background by under 1/25 (invisible on most textures);
        # counting it would let the blurred tails of a shadow stretch the box over half the image.
        effect_threshold: float = Field(0.04, ge=0.0, lt=1.0)
        # Margin on each side, as a fraction of the box's width (left/right) and height (top/bottom):
        # 5% covers matting's soft edge and the thin anti-aliased rim a tight box would cut.
        padding: float = Field(0.05, ge=0.0)
        # Extra random outward growth of each edge, up to this fraction of the box size (0 = none), so a
        # model does not learn that objects sit exactly in the middle of a tightly fitting box.
        jitter: float = Field(0.0, ge=0.0)
        # Smallest box side in pixels (tiny objects get a box a model can still attend to); capped by the
        # image size.
        min_size: int = Field(8, ge=1)

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        if sample.object_mask is None:
            raise ValueError("box-mask needs object_mask")
        region = sample.object_mask > 127
        if not region.any():
            raise ValueError("object_mask is empty: there is no object to put a box around")
        height, width = region.shape
        effects_used = False
        shadow = sample.work.get("shadow_alpha")
        if self.params.include_effects and shadow is not None:
            shadow = np.asarray(shadow)
            if shadow.shape != region.shape:
                raise ValueError(f"work['shadow_alpha'] is {shadow.shape}, object_mask is {region.shape}")
            effect = shadow > self.params.effect_threshold
            effects_used = bool(effect.any())
            region = region | effect

        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        tight = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]  # exclusive ends
        box_w, box_h = tight[2] - tight[0], tight[3] - tight[1]
        rng = self.rng(sample)
        # One draw per edge, always, so the same key gets the same jitter whatever the other settings.
        grow = self.params.padding + self.params.jitter * rng.random(4)  # left, top, right, bottom
        x0 = math.floor(tight[0] - grow[0] * box_w)
        y0 = math.floor(tight[1] - grow[1] * box_h)
        x1 = math.ceil(tight[2] + grow[2] * box_w)
        y1 = math.ceil(tight[3] + grow[3] * box_h)
        x0, x1 = _at_least(max(x0, 0), min(x1, width), self.params.min_size, width)
        y0, y1 = _at_least(max(y0, 0), min(y1, height), self.params.min_size, height)

        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 255
        sample.mask = mask
        sample.meta["bbox"] = [x0, y0, x1, y1]
        sample.record_stage(self.name, backend="numpy", config=self.describe(), tight_bbox=tight,
                            effects_included=effects_used,
                            jitter_drawn=[round(float(g - self.params.padding), 6) for g in grow])
        return sample


def _at_least(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) symmetrically to ``size`` (at most ``limit``), shifting it back inside [0, limit)."""
    size = min(size, limit)
    need = size - (hi - lo)
    if need <= 0:
        return lo, hi
    lo -= need // 2
    hi += need - need // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return max(lo, 0), hi
