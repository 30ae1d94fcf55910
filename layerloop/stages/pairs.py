"""The ``pair`` stage: BFS stage-2 "realism" pairs from real photos.

A pair keeps the real composite C (the photo itself, with its real shadows and reflections), the
background B from object removal (``background`` stage with an object-removal backend), and a surrogate
foreground S from matting C with the object mask (``matting`` stage). S lacks the object's effects, which
is the point: stage 2 trains the composite branch on real photos while the foreground branch is fed S.
The quadruple invariant does not hold for pairs (C is real, not ``a*S + (1-a)*B``); ``kind = "pair"``
says so. Reads ``work["image"]``, ``work["fg_rgb"]``, ``work["alpha"]``, ``background``; writes
``composite``, ``foreground`` (S) and ``kind``.
"""

from __future__ import annotations

import numpy as np

from layerloop.samples import LayeredSample, composite, quantise_foreground
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage


@register_stage
class PairStage(Stage):
    name = "pair"

    class Params(StageParams):
        pass  # the pair is fixed by its definition; matting and removal carry the choices

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        missing = [f"work[{k!r}]" for k in ("image", "fg_rgb", "alpha") if k not in sample.work]
        if sample.background is None:
            missing.append("background")
        if missing:
            raise ValueError(f"pair needs {', '.join(missing)}; run load, trimap, matting and background first")
        image = np.asarray(sample.work["image"])
        surrogate = quantise_foreground(sample.work["fg_rgb"], sample.work["alpha"])
        if image.shape[:2] != surrogate.shape[:2] or sample.background.shape != image.shape:
            raise ValueError(f"sizes disagree: image {image.shape[:2]}, surrogate {surrogate.shape[:2]}, "
                             f"background {sample.background.shape[:2]}")
        sample.composite = np.ascontiguousarray(image, dtype=np.uint8)
        sample.foreground = surrogate
        sample.kind = "pair"
        # How far the real photo is from what S over B would give: large where the object cast effects
        # (shadows, reflections) that S lacks, or where removal changed the scene. Useful for filtering.
        error = np.abs(composite(surrogate, sample.background).astype(np.int16) - image.astype(np.int16))
        sample.record_stage(self.name, surrogate_error_mean=round(float(error.mean()), 4))
        sample.work.pop("fg_rgb")
        sample.work.pop("alpha")
        return sample
