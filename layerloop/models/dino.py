"""DINOv2 image embeddings (``facebook/dinov2-*`` through transformers) and the DINO similarity.

``DinoEmbedder.embed`` turns RGB uint8 images into L2-normalised CLS features: the processor's own
preprocessing (for the Hub checkpoints: resize the shortest side to 256 with bicubic resampling, centre
crop 224, ImageNet mean/std), then ``Dinov2Model``, whose ``pooler_output`` is the CLS token after the
final layer norm. ``similarity`` is the cosine of those features for each (a_i, b_i) pair; the BFS paper's
"DINO similarity to the ground-truth composite" is ``similarity(predicted_composites, gt_composites)``.

Batching does not change the result beyond float rounding: every image is resized and cropped on its own
to the same size, so a batch needs no padding, and the model has no batch-dependent layers. On CUDA the
forward pass runs under fp16/bf16 autocast (``dtype``); on CPU it stays fp32. Features come back as fp32.

Loading goes through ``hub.resolve`` limited to the JSON configs and the safetensors weights
(the Hub repositories also ship a ``pytorch_model.bin`` copy that would double the download).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

from layerloop.models import hub
from layerloop.models.wrappers import ModelWithProcessor, rgb_image

__all__ = ["DEFAULT_ID", "DinoEmbedder"]

DEFAULT_ID = "facebook/dinov2-base"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class DinoEmbedder(ModelWithProcessor):
    def __init__(self, model: Dinov2Model, processor, device: str = "cpu", dtype: torch.dtype | None = None,
                 model_id: str = "tiny", revision: str | None = None):
        super().__init__(model, processor, device=device, model_id=model_id, revision=revision)
        self.autocast_dtype = (dtype or torch.float16) if self.device.type == "cuda" else None

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu",
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True) -> "DinoEmbedder":
        path = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                           allow_patterns=["*.json", "*.safetensors"])
        model = Dinov2Model.from_pretrained(path)
        processor = AutoImageProcessor.from_pretrained(path)
        return cls(model, processor, device=device, dtype=dtype, model_id=str(id_or_path), revision=revision)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu") -> "DinoEmbedder":
        """Random weights, a 2-layer ViT on 32x32 crops (16-d features): for tests and the demo."""
        config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                              image_size=32, patch_size=8)
        processor = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        torch.manual_seed(seed)
        return cls(Dinov2Model(config), processor, device=device)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """L2-normalised CLS features, an (N, D) float32 array (N = 0 gives shape (0, D))."""
        images = [rgb_image(image) for image in images]
        features = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            # channels_last said explicitly: a 3-pixel-high image would otherwise be read as channels-first.
            pixels = self.processor(images=images[start:start + batch_size], return_tensors="pt",
                                    input_data_format="channels_last").pixel_values
            autocast = self.autocast_dtype is not None
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=autocast):
                cls_token = self.model(pixel_values=pixels.to(self.device)).pooler_output
            cls_token = torch.nn.functional.normalize(cls_token.float(), dim=-1)
            features.append(cls_token.cpu().numpy().astype(np.float32))
        return np.concatenate(features)

    def similarity(self, images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray],
                   batch_size: int = 16) -> np.ndarray:
        """cos(DINO(a_i), DINO(b_i)) for each pair, float32 in [-1, 1]."""
        if len(images_a) != len(images_b):
            raise ValueError(f"{len(images_a)} images against {len(images_b)}")
        cosine = (self.embed(images_a, batch_size) * self.embed(images_b, batch_size)).sum(axis=-1)
        return np.clip(cosine, -1.0, 1.0).astype(np.float32)

