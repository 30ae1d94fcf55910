"""The ``load`` stage: decode and normalise a source's raw inputs (docs/stage-flow.md, step 1).

Reads ``work["raw_image"]``, ``work["raw_mask"]`` and optional ``work["raw_background"]`` (paths, bytes,
tar member references, PIL images or arrays, as the source's ``read`` left them) and writes:

* ``work["image"]``: H x W x 3 uint8 RGB, shorter side ``short_side``, both sides a multiple of
  ``multiple_of``;
* ``object_mask``: H x W uint8, 0/255;
* ``work["gt_background"]``: H x W x 3 uint8 when the source has a ground-truth background;
* ``meta["original_size"]``: ``[width, height]`` of the upright decoded image before resizing (PIL's
  order, like ``meta["bbox"]`` which is x first).

A file source also leaves ``work["raw_root"]``, its resolved dataset root (None when it allows reading
outside it): paths are checked against it right before they are opened. Every file or tar member is
checked against ``max_file_bytes`` (stat / tar header) and for an image signature before it is read
whole.

The raw entries are removed from ``work`` so that undecoded bytes do not travel further down the
pipeline. Decoding happens here rather than in the source so that a corrupt file is one sample's recorded
failure (an ``InputError`` with a readable reason) instead of a listing error. Every decoding and
normalisation rule lives in ``layerloop/datasets/imageio.py``.
"""

from __future__ import annotations

from pydantic import Field

from layerloop.datasets.imageio import (DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, InputError, decode_image,
                                        normalise, to_mask, to_rgb)
from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

RAW_KEYS = ("raw_image", "raw_mask", "raw_background", "raw_root")


class LoadParams(StageParams):
    short_side: int = Field(512, ge=16)  # the shorter side after resizing
    mask_threshold: int = Field(128, ge=1, le=255)  # mask value (0..255) from which a pixel is object
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # larger inputs are refused (decompression bombs)
    multiple_of: int = Field(8, ge=1)  # centre-crop both sides to a multiple of this; 1 disables
    max_file_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, ge=1)  # larger input files are refused unread


@register_stage
class LoadStage(Stage):
    """Raw inputs -> normalised RGB image, binary object mask and optional ground-truth background."""

    name = "load"
    Params = LoadParams
    batch_size = 8

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        raw = {k: sample.work.pop(k) for k in RAW_KEYS if k in sample.work}
        if raw.get("raw_image") is None:
            raise InputError("image is missing: the source gave none (raw_image)")
        if raw.get("raw_mask") is None:
            raise InputError("mask is missing: the source gave none (raw_mask)")
        p = self.params
        limits = {"max_pixels": p.max_pixels, "max_file_bytes": p.max_file_bytes, "root": raw.get("raw_root")}
        image = to_rgb(decode_image(raw["raw_image"], key="image", **limits), key="image")
        mask = to_mask(decode_image(raw["raw_mask"], key="mask", **limits), p.mask_threshold, key="mask")
        background = None
        if raw.get("raw_background") is not None:
            background = to_rgb(decode_image(raw["raw_background"], key="background", **limits), key="background")
        result = normalise(image, mask, background, short_side=p.short_side, multiple_of=p.multiple_of)

        sample.work["image"] = result.image
        sample.object_mask = result.mask
        if result.background is not None:
            sample.work["gt_background"] = result.background
        sample.meta["original_size"] = list(result.original_size)
        sample.record_stage(self.name, backend="pillow+opencv", **self.describe(), crop=list(result.crop),
                            has_gt_background=result.background is not None)
        return sample
