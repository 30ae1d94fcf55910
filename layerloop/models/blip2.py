"""BLIP-2 captions (``Salesforce/blip2-opt-2.7b`` through transformers), plus the crops we caption.

``Blip2Captioner.caption`` returns one caption per image, decoded greedily (deterministic, no sampling),
with the prompt removed (the OPT decoder echoes the prompt tokens, so they are cut off by token position)
and whitespace collapsed to single spaces. Every image in a call gets the same prompt, so batched inputs
need no padding and a batch gives the same captions as one image at a time.

What to caption: the object alone, not the whole scene. ``object_crop`` cuts the object's box (plus a
margin for context) out of the composite; ``layer_on_neutral`` flattens an RGBA foreground layer over
mid grey so that transparent pixels read as "nothing" instead of black.

Precision: ``dtype`` defaults to fp16 on CUDA (the 2.7B model's usual inference precision) and fp32 on CPU.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    PreTrainedTokenizerFast,
)

from layerloop.models import hub
from layerloop.models.wrappers import ModelWithProcessor, rgb_image

DEFAULT_ID = "Salesforce/blip2-opt-2.7b"
# Only what transformers loads: Hub repositories of this size ship the same weights as .bin and as
# .safetensors, and downloading both doubles a 15 GB fetch.
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]

# A small word-level vocabulary for the tiny model: random weights cannot say anything meaningful, but
# with real words the demo's captions are readable strings that exercise decoding and prompt stripping.
_TINY_WORDS = (
    "a an the photo picture of on in with and is are red green blue yellow white black grey small large "
    "cat dog car chair table lamp bottle cup plant bird box ball shoe bag book clock vase sofa bike tree"
).split()
_TINY_SPECIAL = ["<pad>", "</s>", "<unk>", "<image>"]


class Blip2Captioner(ModelWithProcessor):
    """BLIP-2 captioning (``Blip2ForConditionalGeneration`` + ``Blip2Processor``)."""

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu",
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True,
                        allow_patterns: list[str] | None = HUB_PATTERNS) -> "Blip2Captioner":
        path = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                           allow_patterns=allow_patterns)
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = Blip2Processor.from_pretrained(path)
        return cls(model, processor, device=device, model_id=str(id_or_path), revision=revision)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu") -> "Blip2Captioner":
        """Random weights, 2-layer vision/Q-Former/OPT towers, a word-level tokenizer built offline."""
        tokenizer = tiny_tokenizer()
        num_query_tokens = 4
        # Larger-than-default init so that different images lead to different (random) captions.
        init = 0.5
        config = Blip2Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, initializer_range=init),
            qformer_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
                                max_position_embeddings=64, initializer_range=init),
            text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                             ffn_dim=64, num_attention_heads=2, max_position_embeddings=128,
                             word_embed_proj_dim=32, init_std=init,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id),
            num_query_tokens=num_query_tokens,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            initializer_range=init,
        )
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   num_query_tokens=num_query_tokens)
        return cls(model, processor, device=device)

    @torch.no_grad()
    def caption(self, images: Sequence[np.ndarray], prompt: str | None = None, max_new_tokens: int = 30,
                batch_size: int = 8) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = [rgb_image(image) for image in images[start:start + batch_size]]
            if prompt:
                inputs = self.processor(images=batch, text=[prompt] * len(batch), return_tensors="pt")
                # The processor puts num_query_tokens image tokens, then BOS and the prompt, into input_ids.
                prompt_length = inputs["input_ids"].shape[1]
            else:
                inputs = self.processor(images=batch, return_tensors="pt")
                # Without input_ids, generate() builds them itself: the image tokens and BOS.
                prompt_length = self.model.config.num_query_tokens + 1
            inputs = inputs.to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            if not self.model.config.text_config.is_encoder_decoder:
                # Decoder-only language models return the prompt followed by the new tokens.
                output = output[:, prompt_length:]
            for text in self.processor.batch_decode(output, skip_special_tokens=True):
                captions.append(_clean(text, prompt))
        return captions


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download), with OPT's conventions: ``</s>`` is both BOS
    and EOS and is prepended to every text, ``<pad>`` pads, ``<image>`` is BLIP-2's image placeholder."""
    vocab = {token: index for index, token in enumerate(_TINY_SPECIAL + _TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="</s>",
                                   eos_token="</s>", unk_token="<unk>", additional_special_tokens=["<image>"])


def object_crop(composite: np.ndarray, bbox: Sequence[int], pad: float = 0.1) -> np.ndarray:
    """The box ``[x0, y0, x1, y1]`` (exclusive ends, like ``meta["bbox"]``) grown by ``pad`` times its
    width/height on every side, clipped to the image. The margin gives the captioner a little context
    (what the object stands on) without letting the scene dominate the caption."""
    x0, y0, x1, y1 = (int(v) for v in bbox)
    height, width = composite.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"bbox {list(bbox)} is empty or outside the {width}x{height} image")
    grow_x, grow_y = round(pad * (x1 - x0)), round(pad * (y1 - y0))
    return composite[max(y0 - grow_y, 0):min(y1 + grow_y, height), max(x0 - grow_x, 0):min(x1 + grow_x, width)]


def layer_on_neutral(foreground_rgba: np.ndarray, grey: float = 0.5) -> np.ndarray:
    """An RGBA uint8 layer composited over a uniform ``grey`` (0..1) background, as RGB uint8."""
    if foreground_rgba.ndim != 3 or foreground_rgba.shape[2] != 4:
        raise ValueError(f"expected an HxWx4 RGBA layer, got shape {foreground_rgba.shape}")
    rgb = foreground_rgba[..., :3].astype(np.float32)
    alpha = foreground_rgba[..., 3:].astype(np.float32) / 255.0
    out = alpha * rgb + (1.0 - alpha) * (255.0 * grey)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)



def _clean(text: str, prompt: str | None) -> str:
    text = " ".join(text.split())
    # Tokenisation can round-trip the prompt with different spacing; drop an echoed prompt either way.
    if prompt:
        normalised_prompt = " ".join(prompt.split())
        if text.startswith(normalised_prompt):
            text = text[len(normalised_prompt):].strip()
    return text
