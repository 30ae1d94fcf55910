"""Prompt encoders of the Flux-Fill models (BFS and in-context): Fill's own CLIP + T5, and a frozen random
byte-level encoder for the tiny test / demo models. Both return ``TextEmbeddings``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from layerloop.models import hub

__all__ = ["TEXT_SUBFOLDERS", "TextEmbeddings", "ByteTextEncoder", "FluxTextEncoder"]

# The folders of a Fill repository the text encoders read.
TEXT_SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass
class TextEmbeddings:
    embeds: torch.Tensor  # B x T x joint_attention_dim
    pooled: torch.Tensor  # B x pooled_projection_dim
    ids: torch.Tensor  # T x 3 (FLUX gives text tokens position 0)


class ByteTextEncoder(nn.Module):
    """A frozen random text encoder for tiny models: UTF-8 bytes -> embeddings (+ a fixed positional
    table, since FLUX gives text tokens no rotary position), pooled by a mean and a projection. It cannot
    understand captions, but it tells prompts apart, which is what the tiny tests need."""

    def __init__(self, dim: int, pooled_dim: int, max_length: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.max_length = max_length
        self.register_buffer("table", torch.randn(257, dim, generator=generator))  # 256 bytes + padding
        self.register_buffer("positions", 0.1 * torch.randn(max_length, dim, generator=generator))
        self.register_buffer("projection", torch.randn(dim, pooled_dim, generator=generator) / math.sqrt(dim))

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextEmbeddings:
        tokens = torch.full((len(prompts), self.max_length), 256, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8")[: self.max_length])
            tokens[row, : len(data)] = torch.tensor(data, dtype=torch.long)
        embeds = self.table[tokens] + self.positions
        pooled = embeds.mean(dim=1) @ self.projection
        return TextEmbeddings(embeds, pooled, torch.zeros(self.max_length, 3, device=embeds.device))


class FluxTextEncoder(nn.Module):
    """CLIP (pooled) + T5 (sequence) prompt encoding, exactly as ``FluxFillPipeline.encode_prompt``.
    Frozen; the LoRAs adapt the transformer only."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer, max_sequence_length: int = 512):
        super().__init__()
        self.clip, self.t5 = clip.requires_grad_(False), t5.requires_grad_(False)
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype, device: str) -> FluxTextEncoder:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        folder = Path(folder)
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).to(device)
        t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype).to(device)
        return cls(clip, CLIPTokenizer.from_pretrained(folder / "tokenizer"), t5,
                   T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))

    @classmethod
    def from_pretrained(cls, model: str, revision: str | None = None, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu", max_sequence_length: int | None = None) -> FluxTextEncoder:
        """The text encoders of a Fill repository (hub id or local folder), resolved by ``hub.resolve_folder``."""
        encoder = cls.from_folder(hub.resolve_folder(model, TEXT_SUBFOLDERS, revision=revision), dtype, str(device))
        if max_sequence_length is not None:
            encoder.max_sequence_length = max_sequence_length
        return encoder

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = list(prompts)
        device = self.clip.device
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, return_tensors="pt").input_ids
        embeds = self.t5(t5_ids.to(device), output_hidden_states=False)[0]
        return TextEmbeddings(embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype))
