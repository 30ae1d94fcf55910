"""The ``recompose`` stage: quantise the float foreground layer to 8-bit F and rebuild C from F and B.

C is computed from the *quantised* F and B with ``samples.composite`` (the project's one compositing rule),
so the quadruple invariant ``C == round(a*F_rgb + (1-a)*B)`` holds exactly, not just within 1/255: the
training data then contains no compositing error for a model to learn. Where alpha quantises to 0, F's RGB
is set to 0 so a fully transparent pixel carries no stale colour (no halo when F is resized or premultiplied
by a consumer that ignores alpha).
"""

from __future__ import annotations

import numpy as np

from layerloop.samples import LayeredSample, composite, quantise_foreground
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage


@register_stage
class Recompose(Stage):
    name = "recompose"
    reads_work = frozenset({"fg_rgb", "alpha"})

    class Params(StageParams):
        pass  # nothing to choose: the compositing rule is fixed project-wide

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        missing = [f"work[{k!r}]" for k in ("fg_rgb", "alpha") if k not in sample.work]
        if sample.background is None:
            missing.append("background")
        if missing:
            raise KeyError(f"recompose needs {', '.join(missing)} (from the matting/shadow and background stages)")
        fg_rgb = np.asarray(sample.work["fg_rgb"], np.float32)
        alpha = np.asarray(sample.work["alpha"], np.float32)
        background = sample.background
        if alpha.ndim != 2 or fg_rgb.shape != alpha.shape + (3,):
            raise ValueError(f"fg_rgb {fg_rgb.shape} and alpha {alpha.shape} are not H x W x 3 and H x W")
        if background.dtype != np.uint8 or background.shape != alpha.shape + (3,):
            raise ValueError(f"background is {background.shape} {background.dtype}, "
                             f"expected {alpha.shape + (3,)} uint8 to match the foreground")
        if sample.object_mask is not None and sample.object_mask.shape != alpha.shape:
            raise ValueError(f"object_mask {sample.object_mask.shape} does not match the foreground {alpha.shape}")

        foreground = quantise_foreground(fg_rgb, alpha)
        sample.foreground = foreground
        sample.composite = composite(foreground, background)
        sample.kind = "quadruple"
        sample.record_stage(self.name, backend="numpy",
                            alpha_coverage=round(float((foreground[..., 3] > 0).mean()), 6))
        return sample
