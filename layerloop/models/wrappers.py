"""What the model wrappers share: ``rgb_image``, the one check of an input image, and for the
transformers-backed ones (ViTMatte, BLIP-2, DINOv2) a model and its processor on a device, saved together
with ``save_pretrained`` and described by the id and revision they were loaded from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rgb_image(image: np.ndarray) -> np.ndarray:
    """``image`` checked to be HxWx3 uint8 (a ValueError saying what it is otherwise): what every image
    model wrapper takes."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}; "
                         "flatten RGBA layers with layer_on_neutral first")
    return image


class ModelWithProcessor:
    def __init__(self, model: Any, processor: Any, device: str = "cpu", model_id: str = "tiny",
                 revision: str | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.model_id = model_id
        self.revision = revision

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """The model's and the processor's files in one folder, loadable by ``from_pretrained``."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        return path

    def describe(self) -> dict:
        return {"model": self.model_id, "revision": self.revision}
