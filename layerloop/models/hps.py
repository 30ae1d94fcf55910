"""Human Preference Score v2.1 (HPS v2.1): how much people would like an image for a prompt.

HPS v2.1 is open_clip's ``ViT-H-14`` fine-tuned on human preference pairs; the weights are one checkpoint
file, ``HPS_v2.1_compressed.pt`` in the ``xswu/HPSv2`` Hub repository (or any local copy). The score
follows the HPSv2 reference code: L2-normalised image and text features, ``logits = image @ text.T``, and
the diagonal, i.e. the plain cosine of each (image, prompt) pair, with no logit scale. Values of the real
model sit around 0.2-0.35; they are not comparable with CLIPScore's 2.5x scale.

The checkpoint is loaded with ``open_clip.load_checkpoint`` (it unwraps ``{"state_dict": ...}`` and the
``module.`` prefix DDP training leaves) with ``weights_only=True``, so a checkpoint cannot run code when
unpickled; pass ``weights_only=False`` only for a file you trust that needs it.

HPSv3 is not wrapped here: its reference implementation is a Qwen2-VL reward model that pins a
transformers version incompatible with the one this package uses for BLIP-2 and ViTMatte. It can only run
in an isolated environment (a Ray ``runtime_env`` with its own pip requirements for a scoring actor),
which is pipeline wiring, not a model wrapper.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch

from layerloop.models import hub
from layerloop.models.clip_score import CONFIG_NAME, TINY_OPEN_CLIP_CONFIG, OpenClipBundle

DEFAULT_ID = "xswu/HPSv2"
DEFAULT_FILENAME = "HPS_v2.1_compressed.pt"
DEFAULT_ARCHITECTURE = "ViT-H-14"


class HpsScorer:
    def __init__(self, bundle: OpenClipBundle, filename: str = DEFAULT_FILENAME, model_id: str = "tiny",
                 revision: str | None = None):
        self.bundle = bundle
        self.filename = filename
        self.model_id = model_id
        self.revision = revision

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu", filename: str = DEFAULT_FILENAME,
                        architecture: str | dict = DEFAULT_ARCHITECTURE, weights_only: bool = True,
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True) -> "HpsScorer":
        """``id_or_path``: a Hub repository, a folder holding ``filename``, or the checkpoint file itself.

        The architecture is ``architecture`` (an open_clip model name or config dict) unless the folder
        has an ``open_clip_config.json`` (as ``save_pretrained`` writes), which then wins."""
        checkpoint = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                                 filename=None if Path(str(id_or_path)).expanduser().is_file() else filename)
        config_file = checkpoint.parent / CONFIG_NAME
        if config_file.is_file():
            architecture = json.loads(config_file.read_text())["model_cfg"]
        bundle = _load(checkpoint, architecture, device=device, dtype=dtype, weights_only=weights_only)
        return cls(bundle, filename=checkpoint.name, model_id=str(id_or_path), revision=revision)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu") -> "HpsScorer":
        """The tiny open_clip model with random weights, written as an HPS-style checkpoint and loaded back
        through the same checkpoint path as the real one (scores are noise)."""
        random_model = OpenClipBundle.from_config(TINY_OPEN_CLIP_CONFIG, seed=seed).model
        with tempfile.TemporaryDirectory(prefix="layerloop-hps-") as folder:
            checkpoint = Path(folder) / DEFAULT_FILENAME
            torch.save({"state_dict": random_model.state_dict()}, checkpoint)
            bundle = _load(checkpoint, TINY_OPEN_CLIP_CONFIG, device=device, dtype=None, weights_only=True)
        return cls(bundle)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Writes ``<filename>`` in the HPSv2 checkpoint format plus ``open_clip_config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": self.bundle.model.state_dict()}, path / self.filename)
        (path / CONFIG_NAME).write_text(json.dumps({"model_cfg": self.bundle.model_cfg}, indent=2))
        return path

    def describe(self) -> dict:
        return {"model": self.model_id, "file": self.filename, "revision": self.revision}

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """HPS of each (image, prompt) pair, float32."""
        return self.bundle.pair_cosine(images, prompts, batch_size)


def _load(checkpoint: Path, architecture: str | dict, device: str, dtype: torch.dtype | None,
          weights_only: bool) -> OpenClipBundle:
    if isinstance(architecture, dict):
        bundle = OpenClipBundle.from_config(architecture, device="cpu")
    else:
        # Random init of the architecture, then the HPS weights; no pretrained tag, so nothing downloads.
        model = open_clip.create_model(architecture, pretrained=None)
        bundle = OpenClipBundle(model, open_clip.get_tokenizer(architecture), open_clip.get_model_config(architecture))
    open_clip.load_checkpoint(bundle.model, str(checkpoint), strict=True, weights_only=weights_only)
    return OpenClipBundle(bundle.model, bundle.tokenizer, bundle.model_cfg, device=device, dtype=dtype)
