"""The ``copy-input`` stage: the trivial baseline of a decomposition evaluation.

It predicts an empty layer (fully transparent) and the input composite itself as the clean object:
what a model gets for doing nothing. A decomposition model must beat it on the layer and object metrics to
have learnt anything; its recomposition error is 0 by construction, which is why recomposition alone is
not an evaluation.
"""

from __future__ import annotations

import numpy as np

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage
from layerloop.stages.registry import register_stage


@register_stage
class CopyInputStage(Stage):
    """An empty layer and the input as the clean object: the decomposition baseline of doing nothing."""

    name = "copy-input"
    batch_size = 16

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        image = sample.work.get("image")
        if image is None:
            image = sample.composite
        if image is None:
            return sample.fail(self.name, "needs a composite (work['image'] or the sample's composite)",
                               "MissingInput")
        image = np.ascontiguousarray(image, dtype=np.uint8)
        sample.composite = image
        sample.background = image.copy()
        sample.foreground = np.zeros((*image.shape[:2], 4), np.uint8)
        sample.kind = "candidate"
        sample.meta["generator"] = {"family": "copy-input", "layer": False}
        sample.record_stage(self.name)
        return sample
