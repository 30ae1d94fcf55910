"""The ``background`` stage: the clean background B behind the object.

Reads ``work["gt_background"]`` (when the source has one) or ``work["image"]`` + ``object_mask``; writes
``sample.background`` (H x W x 3 uint8 RGB) (docs/stage-flow.md, step 5).

Backends
--------
``BACKENDS`` maps a name to a ``BackgroundBackend``:

* ``gt``: the source's own clean plate (``work["gt_background"]``), e.g. RORem pairs or generated
  scenes. A sample without one fails with a message that says what to use instead.
* ``opencv``: inpaint the image where the object was. The object mask is dilated first (``dilate``,
  fraction of the shorter side) because masks stop a pixel or two short of the real edge and
  inpainting from a ring of half-object pixels smears the object's colour into the hole. Telea's
  fast-marching method or Navier-Stokes (``method``), ``radius`` px neighbourhood. It is fast and has
  no model, but it only propagates edge colours: large holes come out smooth, and real shadows or
  reflections outside the dilated mask stay in B. Model backends do better.
* ``auto``: ``gt`` when the sample has a ground truth, else ``opencv``; the backend that actually ran is
  recorded per sample (``backend``), next to ``requested_backend: auto``.

Model backends (ObjectClear, a diffusers inpainting pipeline) plug in like in the matting stage: a
``BackgroundBackend(load=...)`` whose ``load(params, device)`` is called once in ``setup()`` and returns
the fill function, ``batched=True`` for one call per batch (``fill(images, masks, seeds) -> backgrounds``,
one seed per image drawn from that sample's rng, so a result never depends on its batch mates).
``objectclear`` (ObjectClear, removes the object and its shadows/reflections) and ``diffusers-inpaint``
(any diffusers inpainting pipeline, default RORem) are wired this way through ``models/inpaint.py``.

A fill function receives the uint8 RGB image and the uint8 0/255 hole mask (already dilated) and returns
the uint8 RGB background; ``gt`` reads the sample instead and is handled by the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import cv2
import numpy as np
from pydantic import Field

from layerloop.models.removal import inpaint
from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

MISSING_GT = "no ground-truth background for this sample; use backend: opencv"

FillFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
BatchFillFn = Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]]

MODEL_DEFAULTS = {"objectclear": "jixin0101/ObjectClear", "diffusers-inpaint": "LetsThink/RORem"}


class BackgroundParams(StageParams):
    backend: Literal["gt", "opencv", "auto", "objectclear", "diffusers-inpaint"] = "auto"
    dilate: float = Field(0.03, ge=0.0, le=0.5)  # hole grows by this fraction of the shorter side
    method: Literal["telea", "ns"] = "telea"  # OpenCV inpainting algorithm
    radius: int = Field(5, ge=1)  # neighbourhood OpenCV inpainting looks at, px
    # model backends only: hub id, local folder, or tiny[:seed]; None = the backend's default model
    model: str | None = None
    revision: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None  # None: fp16 on GPU, fp32 on CPU
    resolution: int = Field(512, ge=64)  # model backends work at this size and paste back
    num_inference_steps: int = Field(20, ge=1)


@dataclass(frozen=True)
class BackgroundBackend:
    """How one backend fills the hole. ``fill(params)`` for ready functions, ``load(params, device)``
    (called once in ``setup()``) for models; ``batched`` fills take and return lists. ``gt`` has
    neither: it reads the sample, not the image."""

    fill: Callable[[Any], FillFn] | None = None
    load: Callable[[Any, str], FillFn | BatchFillFn] | None = None
    batched: bool = False


def _opencv(params: BackgroundParams) -> FillFn:
    def fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        return inpaint(image, hole, params.radius, params.method)

    return fill


def model_ref(params: BackgroundParams):
    from layerloop.models.refs import ModelRef

    return ModelRef(stage=f"background/{params.backend}", model=params.model or MODEL_DEFAULTS[params.backend],
                    revision=params.revision)


def _load_remover(params: BackgroundParams, device: str) -> BatchFillFn:
    """An object-removal model (``models/inpaint.py``) loaded once per worker. The fill function gets one
    seed per image (from the sample's own rng), so results do not depend on batch composition."""
    from layerloop.models.inpaint import DiffusersInpainter, ObjectClearRemover
    from layerloop.models.refs import load_wrapper

    wrapper = ObjectClearRemover if params.backend == "objectclear" else DiffusersInpainter
    settings = {"resolution": params.resolution, "num_inference_steps": params.num_inference_steps}
    ref = model_ref(params)
    if ref.is_tiny and wrapper is ObjectClearRemover:
        raise ValueError("objectclear has no tiny instance; use backend: diffusers-inpaint with model: tiny")
    remover = wrapper.tiny(seed=ref.tiny_seed, device=device) if ref.is_tiny else \
        load_wrapper(wrapper, ref, device, params.dtype, **settings)

    def fill(images: list[np.ndarray], holes: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        return remover.remove(images, holes, seed=seeds)

    return fill


BACKENDS: dict[str, BackgroundBackend] = {
    "gt": BackgroundBackend(),
    "opencv": BackgroundBackend(fill=_opencv),
    "objectclear": BackgroundBackend(load=_load_remover, batched=True),  # object + its effects removed
    "diffusers-inpaint": BackgroundBackend(load=_load_remover, batched=True),  # RORem or any inpainter
}


def hole_mask(object_mask: np.ndarray, dilate_px: int) -> np.ndarray:
    """The region to fill: the object mask grown by ``dilate_px`` with an elliptical kernel (0/255)."""
    mask = ((np.asarray(object_mask) > 127) * 255).astype(np.uint8)
    if dilate_px <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    return cv2.dilate(mask, kernel)


@register_stage
class BackgroundStage(Stage):
    """Clean background from the ground truth or by removing the object (inpainting)."""

    name = "background"
    reads_work = frozenset({"gt_background", "image"})
    Params = BackgroundParams
    batch_size = 8

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # auto only ever falls back to the classical inpainter, so the image path is fixed at build time.
        self.image_backend_name = "opencv" if self.params.backend in ("gt", "auto") else self.params.backend
        self.image_backend = BACKENDS[self.image_backend_name]
        self._fill: FillFn | BatchFillFn | None = (
            self.image_backend.fill(self.params) if self.image_backend.fill is not None else None)

    @property
    def needs_actor(self) -> bool:
        # Only a backend with a model to load is worth an actor; gt and OpenCV run as plain tasks.
        return self.image_backend.load is not None or self.resources.gpus > 0

    def setup(self) -> None:
        if self.image_backend.load is not None:
            self._fill = self.image_backend.load(self.params, self.device)

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        self.ensure_setup()
        to_fill: list[tuple[LayeredSample, np.ndarray, np.ndarray]] = []
        for sample in samples:
            if not sample.ok:  # failed earlier in this batch before run_stage retried it on its own
                continue
            try:
                if self._use_gt(sample):
                    self._write(sample, self._ground_truth(sample), "gt")
                else:
                    to_fill.append((sample, *self._fill_inputs(sample)))
            except Exception as error:  # one sample's failure is recorded, not raised
                sample.fail(self.name, error)

        if self.image_backend.batched and to_fill:
            # One call per batch; if it raises, run_stage retries one by one and isolates the culprit.
            seeds = [int(self.rng(sample).integers(2**31)) for sample, _, _ in to_fill]
            outputs = self._fill([image for _, image, _ in to_fill], [hole for _, _, hole in to_fill], seeds)
            if len(outputs) != len(to_fill):
                raise RuntimeError(f"background backend returned {len(outputs)} images for {len(to_fill)}")
            for (sample, image, _), background in zip(to_fill, outputs):
                self._write_filled(sample, image, background)
        else:
            for sample, image, hole in to_fill:
                try:
                    self._write_filled(sample, image, self._fill(image, hole))
                except Exception as error:
                    sample.fail(self.name, error)
        return samples

    # ---------------------------------------------------------------- helpers
    def models(self) -> list:
        return [model_ref(self.params)] if self.params.backend in MODEL_DEFAULTS else []

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.params.backend in MODEL_DEFAULTS:
            described["model"] = model_ref(self.params).model
        else:  # model fields mean nothing to gt / opencv
            for field in ("model", "revision", "dtype", "resolution", "num_inference_steps"):
                described.pop(field, None)
        return described

    def _use_gt(self, sample: LayeredSample) -> bool:
        if self.params.backend == "gt":
            return True
        return self.params.backend == "auto" and sample.work.get("gt_background") is not None

    def _ground_truth(self, sample: LayeredSample) -> np.ndarray:
        background = sample.work.get("gt_background")
        if background is None:
            raise ValueError(MISSING_GT)
        background = np.asarray(background)
        image = sample.work.get("image")
        expected = image.shape if image is not None else None
        if background.dtype != np.uint8 or background.ndim != 3 or background.shape[2] != 3:
            raise ValueError(f"gt_background must be H x W x 3 uint8, got {background.shape} {background.dtype}")
        if expected is not None and background.shape != expected:
            raise ValueError(f"gt_background is {background.shape[:2]}, the image is {expected[:2]}")
        return background

    def _fill_inputs(self, sample: LayeredSample) -> tuple[np.ndarray, np.ndarray]:
        image = sample.work.get("image")
        if image is None or sample.object_mask is None:
            raise ValueError("inpainting needs work['image'] and object_mask; run the load stage first")
        if sample.object_mask.shape != image.shape[:2]:
            raise ValueError(f"object_mask is {sample.object_mask.shape}, the image is {image.shape[:2]}")
        dilate_px = int(round(self.params.dilate * min(image.shape[:2])))
        return image, hole_mask(sample.object_mask, dilate_px)

    def _write_filled(self, sample: LayeredSample, image: np.ndarray, background: np.ndarray) -> None:
        background = np.asarray(background)
        if background.shape != image.shape or background.dtype != np.uint8:
            sample.fail(self.name, RuntimeError(
                f"{self.image_backend_name} returned {background.shape} {background.dtype} for a {image.shape} image"))
            return
        self._write(sample, background, self.image_backend_name)

    def _write(self, sample: LayeredSample, background: np.ndarray, used: str) -> None:
        sample.background = np.ascontiguousarray(background, dtype=np.uint8)
        params = self.describe()
        params["requested_backend"] = params.pop("backend")
        sample.record_stage(self.name, backend=used, **params)
