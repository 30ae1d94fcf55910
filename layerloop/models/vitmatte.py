"""ViTMatte: trimap-based alpha matting (``hustvl/vitmatte-*`` through transformers).

``VitMatte.predict`` takes RGB uint8 images and 0/128/255 trimaps and returns float32 alphas in [0, 1] of
the input size. What it does around the network, and why:

* Padding: ``VitMatteImageProcessor`` pads each image bottom/right with zeros to a multiple of 32 (the
  ViT patch grid and the decoder's strides need it); the alpha is cropped back to the input size.
* Batching: images whose padded sizes are equal run in one forward pass. Samples never influence each
  other in eval mode (BatchNorm uses running statistics), so a batch gives the same alphas as one image at
  a time; images are not padded further to a common size because that would change what the
  windowed attention of the real backbone sees, and with it the result.
* Precision: on CUDA the forward pass runs under fp16/bf16 autocast (``dtype``); on CPU it stays fp32,
  where half-precision kernels are slow or missing. Weights are kept in fp32 either way.
* Trimap regions: pixels the trimap marks definite (0 = background, 255 = foreground) are set to exactly
  0 and 1. The network only has to solve the unknown band; forcing the known regions removes the small
  leakage it predicts there and keeps the composite invariant exact where the user was certain.
  Every other trimap value counts as unknown.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from transformers import VitDetConfig, VitMatteConfig, VitMatteForImageMatting, VitMatteImageProcessor

from layerloop.models import hub
from layerloop.models.wrappers import ModelWithProcessor

DEFAULT_ID = "hustvl/vitmatte-small-composition-1k"


class VitMatte(ModelWithProcessor):
    def __init__(self, model: VitMatteForImageMatting, processor: VitMatteImageProcessor, device: str = "cpu",
                 dtype: torch.dtype | None = None, model_id: str = "tiny", revision: str | None = None):
        super().__init__(model, processor, device=device, model_id=model_id, revision=revision)
        # Autocast only exists to save GPU time; see the module docstring.
        self.autocast_dtype = (dtype or torch.float16) if self.device.type == "cuda" else None

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu",
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True) -> "VitMatte":
        path = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download)
        model = VitMatteForImageMatting.from_pretrained(path)
        processor = VitMatteImageProcessor.from_pretrained(path)
        return cls(model, processor, device=device, dtype=dtype, model_id=str(id_or_path), revision=revision)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu") -> "VitMatte":
        """Random weights, a 2-layer ViTDet backbone: for tests and the demo profile (alphas are noise)."""
        backbone = VitDetConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64,
            patch_size=16, num_channels=4, out_features=["stage2"],
        )
        config = VitMatteConfig(backbone_config=backbone, hidden_size=32, convstream_hidden_sizes=[4, 8, 16],
                                fusion_hidden_sizes=[16, 8, 8, 4])
        torch.manual_seed(seed)
        return cls(VitMatteForImageMatting(config), VitMatteImageProcessor(), device=device)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], trimaps: Sequence[np.ndarray],
                batch_size: int = 4) -> list[np.ndarray]:
        if len(images) != len(trimaps):
            raise ValueError(f"{len(images)} images but {len(trimaps)} trimaps")
        inputs = []
        for image, trimap in zip(images, trimaps):
            image, trimap = np.asarray(image), np.asarray(trimap)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
            if trimap.shape != image.shape[:2]:
                raise ValueError(f"trimap {trimap.shape} does not match image {image.shape[:2]}")
            pixel_values = self.processor(images=image, trimaps=trimap, return_tensors="pt").pixel_values
            inputs.append(pixel_values)

        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, pixel_values in enumerate(inputs):
            groups[tuple(pixel_values.shape[-2:])].append(index)

        alphas: list[np.ndarray | None] = [None] * len(images)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch = torch.cat([inputs[i] for i in chunk]).to(self.device)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    predicted = self.model(pixel_values=batch).alphas
                predicted = predicted.float().cpu().numpy()[:, 0]
                for row, i in enumerate(chunk):
                    height, width = trimaps[i].shape
                    alphas[i] = force_known_regions(predicted[row, :height, :width], np.asarray(trimaps[i]))
        return alphas


def force_known_regions(alpha: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """Alpha with the trimap's definite background (0) set to 0 and definite foreground (255) to 1."""
    alpha = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    alpha[trimap == 0] = 0.0
    alpha[trimap == 255] = 1.0
    return alpha
