"""The ``decompose-incontext`` stage: composite + region mask -> predicted layer and clean object.

Reads the composite (``work["image"]`` from ``load``, else ``sample.composite``) and the binary region
mask (``sample.mask``, e.g. a logo shard's region or ``box-mask``'s box, else ``object_mask`` from
``load``); runs the in-context LoRA's decomposition (``InContextPipeline.decompose``, a short Euler sampler
over the canvas); writes ``foreground`` (the predicted layer, RGBA), ``background`` (the predicted clean
object), ``composite`` (the input), ``mask`` (the region, 0/255), ``kind = "candidate"`` and
``meta["generator"]`` = {family, checkpoint, checkpoint_hash, steps, seed, object, recomposition_error}; with
``cycle: true`` also ``cycle_error`` (``compose(decompose(C))`` against C, the cycle score of the
self-improvement loop), copied to ``meta["scores"]``. A typical
pipeline::

    source: {type: webdataset, urls: <held logo shards>}   -> load -> decompose-incontext

``checkpoint`` is the ``final/`` directory (or a ``checkpoints/step-N/weights``) of an ``incontext``
training run; ``setup`` loads it once per actor (``models/incontext_pipeline.InContextPipeline``), on CUDA when the
stage declares GPUs and CUDA exists, else on CPU. Panels are decomposed at their own size, which must be
a multiple of 2 x the VAE scale (4 for the tiny model, 16 for FLUX): set ``load``'s ``multiple_of``.

Where the clean object comes from (``object``): ``panel`` (default) is the LoRA's object panel, as in the
paper; ``footprint`` is the composite with the predicted layer's footprint (alpha above
``footprint_alpha``) inpainted by OpenCV, every other pixel the composite bit for bit: the LoRA locates
the layer, a classical inpainter fills what was under it. ``selfimprove_logos_cpu`` uses ``footprint``
because its tiny LoRA's layer alpha finds the logo while its object panel never learnt to remove it
(docs/fidelity.md, README). The cycle score composes the object as returned.

Each sample's noise comes from its own seed (``self.rng(sample)``: run seed, key, stage name), so its
output does not depend on its batch mates.

What the outputs mean when the composite is a non-linear rendering of (layer, object) (logo samples of
kind ``rendered``: warp, shading, highlights, print texture): ``composite`` is always the input, byte for
byte (never a recomposition), so a candidate, and an accepted decomposition after the filter
(``selfimprove/filter.accept``), keeps the real image; ``foreground`` is the predicted *layer* as the
training data defines it (for rendered samples, free of the surface's influence) and ``background`` the
predicted clean object. ``recomposition_error`` is the mean |C - (a F' + (1 - a) B')| of the prediction in
1/255 steps, the project's alpha blend (``samples.composite``): for alpha-blended data (BFS quadruples) it
is 0 for the true layers and measures how well the prediction explains the input; for non-linear data it
is *not* 0 for the truth (the blend of the true layers is not C), so it is only a consistency score of the
predicted layers, biased toward a layer that has the lighting and warp baked in, and never a distance to
the truth. The score that fits non-linear composition is ``cycle_error`` (``cycle: true``): the LoRA's own
compose direction applied to its decomposition, against C.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from layerloop import storage
from layerloop.samples import LayeredSample
from layerloop.stages.base import SamplerParams, Stage
from layerloop.stages.registry import register_stage


class DecomposeParams(SamplerParams):
    checkpoint: str  # final/ of an incontext training run
    # Where the clean object comes from: "panel", the LoRA's object panel; "footprint", the composite with
    # the predicted layer's footprint (alpha > footprint_alpha, 0-1) inpainted by OpenCV (footprint_method,
    # footprint_radius px; models/incontext_pipeline.FootprintRemoval). Recorded in meta["generator"].
    object: Literal["panel", "footprint"] = "panel"
    footprint_alpha: float = Field(0.03, gt=0.0, lt=1.0)
    footprint_radius: int = Field(5, ge=1)
    footprint_method: Literal["ns", "telea"] = "ns"
    # Also compose the predicted layer back onto the predicted object with the LoRA's compose direction and
    # score the cycle: meta["scores"]["cycle_error"] = mean |compose(decompose(C)) - C| in 1/255 steps
    # (a second sampling pass per sample).
    cycle: bool = False


@register_stage
class DecomposeInContext(Stage):
    """Composite + region -> layer + clean object with an in-context LoRA (see the module docstring); its
    base model is read from the checkpoint, so ``models`` names the Fill repository folders it needs."""

    name = "decompose-incontext"
    Params = DecomposeParams
    batch_size = 4

    def models(self) -> list:
        from layerloop.models.incontext import FILL_SUBFOLDERS
        from layerloop.models.incontext_pipeline import base_model
        from layerloop.models.refs import ModelRef

        try:
            model, revision = base_model(storage.local_folder(self.params.checkpoint))
        except FileNotFoundError:
            return []  # setup() reports the missing checkpoint with its path
        if model.startswith("tiny:") or Path(model).is_dir():
            return []
        return [ModelRef(stage=self.name, model=model, revision=revision,
                         allow_patterns=("model_index.json",) + tuple(f"{s}/*" for s in FILL_SUBFOLDERS))]

    def setup(self) -> None:
        from layerloop.models.incontext_pipeline import InContextPipeline
        from layerloop.models.refs import inference_dtype

        self._pipe = InContextPipeline.from_checkpoint(storage.local_folder(self.params.checkpoint), device=self.device,
                                                       dtype=inference_dtype(self.params.dtype, self.device))
        self._step = self._pipe.size_multiple
        self._removal = None
        if self.params.object == "footprint":
            from layerloop.models.incontext_pipeline import FootprintRemoval

            self._removal = FootprintRemoval(self.params.footprint_alpha, self.params.footprint_radius,
                                             self.params.footprint_method)

    @classmethod
    def score_columns(cls, params: dict) -> tuple[str, ...]:
        return ("cycle_error",) if params.get("cycle") else ()

    def describe(self) -> dict:
        return self.params.model_dump(exclude={"batch_size", "cpus", "gpus", "concurrency", "dtype"}, mode="json")

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        image = sample.work.get("image")
        if image is None:
            image = sample.composite
        region = sample.mask if sample.mask is not None else sample.object_mask
        if image is None or region is None:
            return sample.fail(self.name, "needs a composite (load's image or the sample's composite) and a region "
                               "mask (the sample's mask or load's object_mask)", "MissingInput")
        if image.shape[:2] != region.shape[:2]:
            return sample.fail(self.name, f"composite is {image.shape[:2]}, region mask {region.shape[:2]}", "BadSize")
        height, width = image.shape[:2]
        if height % self._step or width % self._step:
            return sample.fail(self.name, f"size {width}x{height} is not a multiple of {self._step}; set load's "
                               f"multiple_of to {self._step}", "BadSize")
        region = np.where(np.asarray(region) > 0, 255, 0).astype(np.uint8)
        if not region.any():
            return sample.fail(self.name, "the region mask is empty: nothing to decompose", "EmptyMask")
        seed = int(self.rng(sample).integers(2**63 - 1))
        result = self._pipe.decompose(image, region, caption=sample.caption, steps=self.params.steps, seed=seed,
                                      removal=self._removal)
        sample.composite = np.ascontiguousarray(image)
        sample.foreground, sample.background = result.layer, result.background
        sample.mask = region
        sample.kind = "candidate"
        sample.meta["generator"] = {
            "family": "incontext", "checkpoint": storage.reference(self.params.checkpoint),
            "checkpoint_hash": self._pipe.checkpoint_hash, "steps": self.params.steps, "seed": seed,
            "object": self.params.object, "recomposition_error": round(float(result.recomposition_error), 4),
        }
        if self.params.cycle:
            recomposed = self._pipe.compose(result.layer, result.background, region, caption=sample.caption,
                                             steps=self.params.steps, seed=seed + 1)
            error = round(float(np.abs(recomposed.astype(np.float64) - image.astype(np.float64)).mean()), 4)
            sample.meta["generator"]["cycle_error"] = error
            sample.meta.setdefault("scores", {})["cycle_error"] = error
        sample.record_stage(self.name, backend="incontext", **self.describe())
        return sample
