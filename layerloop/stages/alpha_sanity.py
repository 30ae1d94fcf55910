"""The ``alpha-sanity`` stage: model-free scores of a candidate's foreground alpha against its box.

A generator can fail in ways CLIP and HPS do not see: a layer that is transparent (the object went into the
background instead), a "sticker" that paints the whole box opaque, an object broken into floating pieces,
or paint outside the box it was asked to fill. These scores measure exactly that, from the foreground's
alpha and the box mask ``sample.mask`` (255 inside the box; for decompositions the region mask) only:

* ``alpha_coverage``: fraction of box pixels with alpha > ``visible_alpha``;
* ``alpha_empty``: ``alpha_coverage < min_coverage``, almost nothing visible;
* ``alpha_full``: ``alpha_coverage >= full_coverage``, the box is (almost) completely opaque;
* ``alpha_fragments``: connected components (8-connected) of alpha > ``visible_alpha`` whose area is at
  least ``min_fragment`` of the box area; specks below that size are not counted as pieces;
* ``alpha_largest_fraction``: area of the largest component / area of all visible pixels (specks
  included, so dust around an object lowers it); 0.0 when nothing is visible;
* ``alpha_outside_box``: fraction of the total alpha mass (sum of alpha, shadows included) outside the
  box; 0.0 when the layer is fully transparent.

The stage scores, it does not decide: the flags are inputs to a filter policy
(``layerloop/selfimprove/policies.py``), because what counts as wrong depends on the data (a logo filling
its region mask is fine for decompositions; the same coverage from a BFS candidate in a padded box is a
sticker). Visible means alpha > ``visible_alpha`` (0.5 by default) so that soft shadows, whose opacity is
usually below one half, do not count as object pixels; they still count in ``alpha_outside_box``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from pydantic import Field, model_validator

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage


class AlphaSanityParams(StageParams):
    # Alpha above which a pixel counts as visible object, in [0, 1].
    visible_alpha: float = Field(0.5, ge=0.0, lt=1.0)
    # A box padded 5% a side around even a thin object is covered far more than 2%; below that the
    # layer shows essentially nothing.
    min_coverage: float = Field(0.02, ge=0.0, le=1.0)
    # The default box-mask padding keeps a tight object under ~83% of its box; 98% means the layer
    # copies the box (a rectangle of paint), not an object.
    full_coverage: float = Field(0.98, gt=0.0, le=1.0)
    # Smallest component counted as a fragment, as a fraction of the box area (resolution independent:
    # 0.1% of a 200x200 box is 40 px, about a 6x6 blob).
    min_fragment: float = Field(0.001, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _empty_below_full(self) -> AlphaSanityParams:
        if self.min_coverage >= self.full_coverage:
            raise ValueError(f"min_coverage ({self.min_coverage}) must be below full_coverage "
                             f"({self.full_coverage})")
        return self


def alpha_scores(alpha: np.ndarray, box: np.ndarray, params: AlphaSanityParams) -> dict[str, float | int | bool]:
    """The scores of one layer: ``alpha`` (H x W uint8 or float in [0, 1]) and ``box`` (H x W bool)."""
    if alpha.dtype == np.uint8:
        alpha = alpha.astype(np.float64) / 255.0
    alpha = np.asarray(alpha, np.float64)
    box_area = int(box.sum())
    if box_area == 0:
        raise ValueError("the box mask is empty: nothing to check the alpha against")
    visible = alpha > params.visible_alpha
    coverage = float(np.count_nonzero(visible & box)) / box_area

    count, _, stats, _ = cv2.connectedComponentsWithStats(visible.astype(np.uint8), connectivity=8)
    areas = stats[1:count, cv2.CC_STAT_AREA]  # label 0 is the transparent remainder
    min_area = max(1, math.ceil(params.min_fragment * box_area))
    visible_area = int(np.count_nonzero(visible))
    largest_fraction = float(areas.max()) / visible_area if visible_area else 0.0

    mass = float(alpha.sum())
    outside = float(alpha[~box].sum()) / mass if mass > 0 else 0.0
    return {
        "alpha_coverage": round(coverage, 6),
        "alpha_empty": coverage < params.min_coverage,
        "alpha_full": coverage >= params.full_coverage,
        "alpha_fragments": int(np.count_nonzero(areas >= min_area)),
        "alpha_largest_fraction": round(largest_fraction, 6),
        "alpha_outside_box": round(outside, 6),
    }


@register_stage
class AlphaSanity(Stage):
    name = "alpha-sanity"
    reads_work = frozenset()
    Params = AlphaSanityParams
    batch_size = 32

    @classmethod
    def score_columns(cls, params: dict) -> tuple[str, ...]:
        return ("alpha_coverage", "alpha_empty", "alpha_full", "alpha_fragments", "alpha_largest_fraction",
                "alpha_outside_box")

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        if sample.foreground is None or sample.mask is None:
            missing = [f for f in ("foreground", "mask") if getattr(sample, f) is None]
            raise ValueError(f"alpha-sanity needs {' and '.join(missing)}")
        if sample.foreground.ndim != 3 or sample.foreground.shape[2] != 4:
            raise ValueError(f"foreground must be RGBA, got shape {sample.foreground.shape}")
        if sample.mask.shape != sample.foreground.shape[:2]:
            raise ValueError(f"mask is {sample.mask.shape}, foreground is {sample.foreground.shape[:2]}")
        scores = alpha_scores(sample.foreground[..., 3], sample.mask > 127, self.params)
        sample.meta.setdefault("scores", {}).update(scores)
        sample.record_stage(self.name, backend="numpy+opencv", config=self.describe())
        return sample
