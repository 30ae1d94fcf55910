"""Reference-image conditioning for the Flux-Fill models through FLUX.1 Redux (``FluxPriorReduxPipeline``).

Redux turns an image into extra text-stream tokens: SigLIP (``image_encoder``, with its
``feature_extractor``: resize to the encoder's size, normalise) gives patch features, and Redux's
``image_embedder`` (``ReduxImageEncoder``: Linear -> SiLU -> Linear) projects them to the T5 width
(FLUX.1-Redux-dev: 729 tokens of 4096). diffusers' ``FluxPriorReduxPipeline.__call__`` appends those tokens
to the prompt's T5 tokens (``torch.cat([prompt_embeds, image_embeds], dim=1)``) and keeps the prompt's pooled
CLIP vector; without its own text encoders (the Redux-dev repository has none) it pads with zeros of the real
T5 / CLIP sizes instead, and it sums a batch of images into one embedding. ``ReduxEncoder`` therefore calls the
pipeline's own two steps (``encode_image`` and ``image_embedder``) per image and leaves the concatenation to
``reference_text``, which does what ``__call__`` does with text encoders loaded, with the BFS model's own text
encoder (Fill's CLIP + T5, or the tiny byte encoder): the caption's tokens, then the reference's, and the
caption's pooled vector.

``ReduxEncoder.from_pretrained("black-forest-labs/FLUX.1-Redux-dev")`` (a gated repository: accept its licence
on the Hub, then ``huggingface-cli login``; resolved like every model, ``hub.resolve``) or ``tiny(seed,
text_dim)`` (random SigLIP + Redux projector from configs, for tests).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from layerloop.models import hub
from layerloop.models.text_encoders import TextEmbeddings

__all__ = ["DEFAULT_REDUX_ID", "REDUX_PATTERNS", "ReduxEncoder", "reference_text"]

DEFAULT_REDUX_ID = "black-forest-labs/FLUX.1-Redux-dev"
# What the pipeline reads: its index, SigLIP, the processor config and the projector.
REDUX_PATTERNS = ("model_index.json", "image_encoder/*", "feature_extractor/*", "image_embedder/*")


class ReduxEncoder:
    """A ``FluxPriorReduxPipeline`` used for its image tokens: ``encoder(images)`` -> (B, T, text dim)."""

    def __init__(self, pipeline, model_id: str = "tiny", revision: str | None = None):
        self.pipeline = pipeline
        self.model_id, self.revision = model_id, revision

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_REDUX_ID, revision: str | None = None,
                        dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                        local_files_only: bool = False) -> ReduxEncoder:
        """The Redux pipeline of a hub id or local folder (``model_index.json``, ``image_encoder/``,
        ``feature_extractor/``, ``image_embedder/``); offline and missing raises ``hub.ModelNotAvailable``."""
        from diffusers import FluxPriorReduxPipeline

        root = hub.resolve(id_or_path, revision=revision, allow_download=not local_files_only,
                           allow_patterns=list(REDUX_PATTERNS))
        pipeline = FluxPriorReduxPipeline.from_pretrained(str(root), torch_dtype=dtype).to(device)
        return cls(pipeline, model_id=str(id_or_path), revision=revision)

    @classmethod
    def tiny(cls, seed: int = 0, text_dim: int = 32, device: str | torch.device = "cpu") -> ReduxEncoder:
        """Random SigLIP (one layer, 28 px, 14 px patches: 4 tokens of 16) and projector to ``text_dim`` (the
        transformer's ``joint_attention_dim``), assembled as a real ``FluxPriorReduxPipeline``."""
        from diffusers import FluxPriorReduxPipeline
        from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=28, patch_size=14))
            embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=text_dim)
        processor = SiglipImageProcessor(size={"height": 28, "width": 28})
        pipeline = FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=processor, image_embedder=embedder)
        return cls(pipeline.to(device), model_id=f"tiny:{seed}")

    @property
    def device(self) -> torch.device:
        return next(self.pipeline.image_encoder.parameters()).device

    @property
    def text_dim(self) -> int:
        return int(self.pipeline.image_embedder.config.txt_in_features)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Redux tokens of RGB uint8 images (H, W, 3), one row per image: (B, T, text dim), float32."""
        from PIL import Image

        pil = [Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB") for image in images]
        features = self.pipeline.encode_image(pil, self.device, 1)
        return self.pipeline.image_embedder(features).image_embeds.float()


def reference_text(text: TextEmbeddings, reference_tokens: torch.Tensor) -> TextEmbeddings:
    """The caption's tokens followed by the reference's (per sample), the caption's pooled vector: what
    ``FluxPriorReduxPipeline.__call__`` returns for one image with its text encoders loaded."""
    if reference_tokens.shape[0] != text.embeds.shape[0] or reference_tokens.shape[-1] != text.embeds.shape[-1]:
        raise ValueError(f"Redux tokens {tuple(reference_tokens.shape)} do not fit the text embeddings "
                         f"{tuple(text.embeds.shape)} (one row per sample, the transformer's text width)")
    embeds = torch.cat([text.embeds, reference_tokens.to(text.embeds)], dim=1)
    return TextEmbeddings(embeds, text.pooled, torch.zeros(embeds.shape[1], 3, device=embeds.device,
                                                           dtype=text.ids.dtype))
