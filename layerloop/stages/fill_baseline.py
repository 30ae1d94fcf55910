"""The ``fill-baseline`` stage: the Flux-Fill inpainting baseline of the BFS paper (Table 3).

Reads ``work["gt_background"]`` (from ``load``; else ``background``), ``mask`` (the box, from
``box-mask``) and ``caption``; fills the box of the background with the caption
(``models/flux_fill.FluxFillInpainter``: pixels outside the box are the input's exactly) and writes
``composite`` (the filled image), ``background`` (the input B), ``foreground`` (a fully transparent
RGBA layer: the baseline paints into the image and produces no layer), ``kind = "candidate"`` and
``meta["generator"]`` = {family: "flux-fill", model, steps, seed, guidance, layer: False}. A typical
pipeline::

    source: {type: webdataset, urls: ...}   -> load -> box-mask -> fill-baseline

``model`` is a Fill repository (default ``black-forest-labs/FLUX.1-Fill-dev``), a local folder in the
diffusers layout, or ``tiny`` / ``tiny:SEED`` (a tiny random pipeline for tests). ``setup`` loads it once
per actor, on CUDA when the stage declares GPUs and CUDA exists, else on CPU. Sides must be multiples of
16 for FLUX (4 for tiny): set ``load``'s ``multiple_of``; other sizes are a recorded ``BadSize`` failure.

Each sample's noise comes from its own seed (``self.rng(sample)``: run seed, key, stage name), so a
sample's output does not depend on its batch mates.
"""

from __future__ import annotations

import numpy as np

from layerloop.samples import LayeredSample
from layerloop.stages.base import SamplerParams, Stage
from layerloop.stages.registry import register_stage

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Fill-dev"


class FillBaselineParams(SamplerParams):
    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, or tiny / tiny:SEED
    revision: str | None = None
    guidance: float = 30.0  # FluxFillPipeline's default (FLUX.1-Fill-dev is guidance-distilled)


@register_stage
class FillBaseline(Stage):
    name = "fill-baseline"
    Params = FillBaselineParams
    batch_size = 4

    def _ref(self):
        from layerloop.models.flux_fill import ALLOW_PATTERNS
        from layerloop.models.refs import ModelRef

        return ModelRef(stage=self.name, model=self.params.model, revision=self.params.revision,
                        allow_patterns=ALLOW_PATTERNS)

    def models(self) -> list:
        ref = self._ref()
        return [] if ref.is_tiny else [ref]

    def setup(self) -> None:
        from layerloop.models.flux_fill import FluxFillInpainter
        from layerloop.models.refs import inference_dtype

        ref, settings = self._ref(), {"num_inference_steps": self.params.steps, "guidance_scale": self.params.guidance}
        if ref.is_tiny:
            self._model = FluxFillInpainter.tiny(seed=ref.tiny_seed, device=self.device, **settings)
        else:
            self._model = FluxFillInpainter.from_pretrained(
                ref.model, revision=ref.revision, dtype=inference_dtype(self.params.dtype, self.device),
                device=self.device, **settings)

    def describe(self) -> dict:
        return self.params.model_dump(exclude={"batch_size", "cpus", "gpus", "concurrency", "dtype"}, mode="json")

    # ------------------------------------------------------------------ batches
    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        todo: list[tuple[LayeredSample, np.ndarray]] = []
        step = self._model.size_multiple
        for sample in samples:
            background = sample.work.get("gt_background")
            if background is None:
                background = sample.background
            if background is None or sample.mask is None:
                sample.fail(self.name, "needs a background (load's gt_background or a background stage) and the box "
                            "mask (box-mask stage)", "MissingInput")
            elif background.ndim != 3 or background.shape[2] != 3 or background.shape[:2] != sample.mask.shape[:2]:
                sample.fail(self.name, f"background {background.shape} and box mask {sample.mask.shape} do not match",
                            "BadSize")
            elif background.shape[0] % step or background.shape[1] % step:
                sample.fail(self.name, f"size {background.shape[1]}x{background.shape[0]} is not a multiple of {step}; "
                            f"set load's multiple_of to {step}", "BadSize")
            elif not np.any(sample.mask):
                sample.fail(self.name, "the box mask is empty: nothing to fill", "EmptyMask")
            else:
                todo.append((sample, np.ascontiguousarray(background)))
        if not todo:
            return samples
        # One seed per sample (not per batch): a sample's result must not depend on which samples share its batch.
        seeds = [int(self.rng(sample).integers(2**63 - 1)) for sample, _ in todo]
        filled = self._model.fill([b for _, b in todo], [s.mask for s, _ in todo], [s.caption for s, _ in todo], seeds)
        for (sample, background), image, seed in zip(todo, filled, seeds):
            height, width = background.shape[:2]
            sample.composite, sample.background = image, background
            sample.foreground = np.zeros((height, width, 4), np.uint8)  # no layer: fully transparent
            sample.kind = "candidate"
            sample.meta["generator"] = {
                "family": "flux-fill", "model": self.params.model, "steps": self.params.steps, "seed": seed,
                "guidance": self.params.guidance, "layer": False,
            }
            sample.record_stage(self.name, backend="flux-fill", **self.describe())
        return samples
