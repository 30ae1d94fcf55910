"""CLIPScore with open_clip (default ``ViT-H-14`` / ``laion2b_s32b_b79k``), and the open_clip plumbing
that ``hps.py`` shares.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning") is
``2.5 * max(cos(E_image, E_text), 0)`` between an image and its caption. As in the authors' reference code
the caption is prefixed with ``"A photo depicts "`` before encoding (``prefix``; pass ``""`` to turn it off).
Scores are per (image, caption) pair, not a matrix.

To score a foreground layer rather than a photo, flatten it over mid grey first (``layer_on_neutral``,
re-exported here): transparent pixels then look like an empty backdrop instead of black.

Loading. ``ClipScorer.from_pretrained`` accepts
* an open_clip architecture name plus ``pretrained`` tag (``"ViT-H-14"``, ``"laion2b_s32b_b79k"``): the
  tag's weight file is resolved through ``hub.resolve`` (so offline rules and the download lock apply)
  and loaded with ``open_clip.create_model``;
* a folder in open_clip's Hub layout (``open_clip_config.json`` + weights), which is what
  ``save_pretrained`` writes, or a Hub repository with that layout.
Images are preprocessed with the model's own open_clip transform (resize shortest side, centre crop,
normalise), image by image, then encoded in batches; on CUDA the encoders run under fp16/bf16 autocast.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

from layerloop.models import hub
from layerloop.models.blip2 import layer_on_neutral
from layerloop.models.wrappers import rgb_image

__all__ = ["ClipScorer", "OpenClipBundle", "layer_on_neutral", "TINY_OPEN_CLIP_CONFIG"]

DEFAULT_MODEL = "ViT-H-14"
DEFAULT_PRETRAINED = "laion2b_s32b_b79k"
CLIPSCORE_WEIGHT = 2.5  # Hessel et al.'s w: stretches the usual cosine range towards [0, 1]
CONFIG_NAME = "open_clip_config.json"  # open_clip's Hub layout
WEIGHTS_NAME = "open_clip_model.safetensors"

# Tiny ViT + text transformer. The vocabulary stays open_clip's full BPE one because its SimpleTokenizer
# (shipped inside the package, so it works offline) emits ids up to 49407.
TINY_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class OpenClipBundle:
    """An open_clip model with its inference transform and tokenizer, encoding numpy images and strings
    into L2-normalised features."""

    def __init__(self, model: torch.nn.Module, tokenizer, model_cfg: dict, device: str = "cpu",
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg  # kept so that save_pretrained can write open_clip_config.json
        self.preprocess = image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=False)
        self.autocast_dtype = (dtype or torch.float16) if self.device.type == "cuda" else None

    @classmethod
    def from_config(cls, model_cfg: dict, seed: int | None = None, device: str = "cpu") -> "OpenClipBundle":
        """A randomly initialised model from an open_clip model config dict."""
        if seed is not None:
            torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
        size = model_cfg["vision_cfg"]["image_size"]
        set_model_preprocess_cfg(model, {**asdict(PreprocessCfg()), "size": size})
        return cls(model, open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"]),
                   model_cfg, device=device)

    @classmethod
    def from_folder(cls, path: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> "OpenClipBundle":
        """A folder in open_clip's Hub layout (``open_clip_config.json`` + weights)."""
        model = open_clip.create_model(f"local-dir:{path}", device=device)
        model_cfg = json.loads((path / CONFIG_NAME).read_text())["model_cfg"]
        return cls(model, open_clip.get_tokenizer(f"local-dir:{path}"), model_cfg, device=device, dtype=dtype)

    def save(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path / WEIGHTS_NAME))
        preprocess_cfg = get_model_preprocess_cfg(self.model)
        (path / CONFIG_NAME).write_text(json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": preprocess_cfg},
                                                   indent=2))
        return path

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        features = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(rgb_image(image)))
                                  for image in images[start:start + batch_size]]).to(self.device)
            with self._autocast():
                features.append(self.model.encode_image(pixels, normalize=True).float().cpu())
        return torch.cat(features) if features else torch.zeros(0)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        features = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            with self._autocast():
                features.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(features) if features else torch.zeros(0)

    def pair_cosine(self, images: Sequence[np.ndarray], texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """cos(image_i, text_i) for each pair, as float32."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return np.zeros(0, np.float32)
        image_features = self.encode_images(images, batch_size)
        text_features = self.encode_texts(texts, batch_size)
        return (image_features * text_features).sum(dim=-1).numpy().astype(np.float32)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


class ClipScorer:
    def __init__(self, bundle: OpenClipBundle, prefix: str = "A photo depicts ", model_id: str = "tiny",
                 revision: str | None = None):
        self.bundle = bundle
        self.prefix = prefix
        self.model_id = model_id
        self.revision = revision

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_MODEL, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu",
                        pretrained: str = DEFAULT_PRETRAINED, prefix: str = "A photo depicts ",
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True) -> "ClipScorer":
        name = str(id_or_path)
        if not Path(name).expanduser().exists() and name in open_clip.list_models():
            weights = resolve_tag_weights(name, pretrained, revision, cache_dir, allow_download)
            model = open_clip.create_model(name, pretrained=str(weights), device=device)
            bundle = OpenClipBundle(model, open_clip.get_tokenizer(name), open_clip.get_model_config(name),
                                    device=device, dtype=dtype)
            return cls(bundle, prefix=prefix, model_id=f"{name}/{pretrained}", revision=revision)
        path = hub.resolve(name, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                           allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        return cls(OpenClipBundle.from_folder(path, device=device, dtype=dtype), prefix=prefix, model_id=name,
                   revision=revision)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", prefix: str = "A photo depicts ") -> "ClipScorer":
        """Random weights from ``TINY_OPEN_CLIP_CONFIG``: for tests and the demo (scores are noise)."""
        return cls(OpenClipBundle.from_config(TINY_OPEN_CLIP_CONFIG, seed=seed, device=device), prefix=prefix)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        return self.bundle.save(Path(path))

    def describe(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "prefix": self.prefix}

    def score(self, images: Sequence[np.ndarray], texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """CLIPScore of each (image, caption) pair, float32 in [0, 2.5]."""
        cosine = self.bundle.pair_cosine(images, [self.prefix + text for text in texts], batch_size)
        return (CLIPSCORE_WEIGHT * np.maximum(cosine, 0.0)).astype(np.float32)


def resolve_tag_weights(name: str, tag: str, revision: str | None, cache_dir, allow_download: bool) -> Path:
    """The local weight file of an open_clip (architecture, pretrained tag) pair, through hub.resolve."""
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg or not tag_cfg.get("hf_hub"):
        raise ValueError(f"open_clip has no Hugging Face Hub weights for {name} / {tag}; "
                         f"known tags: {open_clip.list_pretrained_tags_by_model(name)}")
    # open_clip writes hf_hub as "owner/repo/" (default file name) or "owner/repo/file".
    repo_id, filename = os.path.split(tag_cfg["hf_hub"])
    candidates = [filename] if filename else [WEIGHTS_NAME, "open_clip_pytorch_model.bin"]
    error: hub.ModelNotAvailable | None = None
    for candidate in candidates:  # the safetensors copy first: no pickle, and what recent repos ship
        try:
            return hub.resolve(repo_id, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                               filename=candidate)
        except hub.ModelNotAvailable as missing:
            error = missing
    raise error

