"""What the transformers-backed model wrappers (ViTMatte, BLIP-2) share: a model and its processor on a
device, saved together with ``save_pretrained`` and described by the id and revision they were loaded from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


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
