"""The ``ground-truth`` stage: the reference row of an evaluation.

On samples from a ``shards`` source (``datasets/shard_source.py``) it outputs the held-out sample's own
layers as if a method had produced them: ``foreground``, ``background`` and ``composite`` from
``work["reference"]``. Evaluated like any method, it gives the numbers a perfect method would get (and,
for set metrics such as KID, the floor that the measure itself reaches).
"""

from __future__ import annotations

import numpy as np

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage
from layerloop.stages.registry import register_stage


@register_stage
class GroundTruthStage(Stage):
    """The held-out sample's own layers as the output: the reference row, which a perfect method would
    match (and the floor of a set metric such as KID)."""

    name = "ground-truth"
    batch_size = 16

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        reference = sample.work.get("reference")
        if not reference or any(reference.get(k) is None for k in ("composite", "foreground", "background")):
            return sample.fail(self.name, "needs work['reference'] (composite, foreground, background): read the "
                               "held-out set with a `shards` source", "MissingInput")
        sample.composite = np.ascontiguousarray(reference["composite"])
        sample.foreground = np.ascontiguousarray(reference["foreground"])
        sample.background = np.ascontiguousarray(reference["background"])
        sample.kind = "candidate"
        sample.meta["generator"] = {"family": "ground-truth"}
        sample.record_stage(self.name)
        return sample
