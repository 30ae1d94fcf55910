"""The Flux-Fill inpainting baseline (the BFS paper's Table 3): fill a box with a caption, no layer.

``FluxFillInpainter`` wraps diffusers' ``FluxFillPipeline`` (default ``black-forest-labs/FLUX.1-Fill-dev``).
``fill(images, masks, prompts, seeds)`` inpaints each image inside its mask (255 = fill) from its prompt:

1. images are generated at their own size (``height``/``width`` = the input's), which must be a multiple
   of ``size_multiple`` (the pipeline's ``vae_scale_factor * 2``: 16 for FLUX, 4 for the tiny model);
   any other size is a ``ValueError``: nothing is resized behind the caller's back;
2. every sample gets its own CPU ``torch.Generator`` seeded with its seed, so a result depends on
   (image, mask, prompt, seed) only, never on which samples share its batch; samples of one size are
   run ``batch_size`` at a time (default 1: FLUX at 1024 px gains little from batching, and one at a
   time also keeps GPU kernels from choosing different reduction orders for different batch sizes);
3. the pixels outside the mask are pasted back from the input, bit for bit: the VAE round trip changes
   them slightly, and the baseline must only be judged on what it put into the box.

Defaults follow diffusers' FluxFill: guidance 30 (FLUX.1-Fill-dev is guidance-distilled), T5 sequence
length 512; 28 steps as FLUX dev. ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU.

``tiny(seed)`` assembles a real ``FluxFillPipeline`` offline from tiny random components (the layout of
diffusers' own Fill pipeline tests): the Fill-shaped transformer and VAE of ``models/bfs.py``, a tiny CLIP
text model with ``inpaint.tiny_clip_tokenizer`` and a tiny T5 encoder with a character-level
``T5TokenizerFast`` built in memory. Its output is noise inside the mask; it exists to test the plumbing.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from layerloop.models import hub

__all__ = ["ALLOW_PATTERNS", "DEFAULT_ID", "PIPELINE_SUBFOLDERS", "FluxFillInpainter", "tiny_t5_tokenizer"]

DEFAULT_ID = "black-forest-labs/FLUX.1-Fill-dev"
# The folders FluxFillPipeline.from_pretrained reads; the repository also holds a 23 GB single-file
# checkpoint (flux1-fill-dev.safetensors) and ae.safetensors that the diffusers layout never touches.
PIPELINE_SUBFOLDERS = ("scheduler", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                       "tokenizer_2")
ALLOW_PATTERNS = ("model_index.json",) + tuple(f"{name}/*" for name in PIPELINE_SUBFOLDERS)


class FluxFillInpainter:
    def __init__(self, pipeline: FluxFillPipeline, device: str = "cpu", num_inference_steps: int = 28,
                 guidance_scale: float = 30.0, max_sequence_length: int = 512, batch_size: int = 1,
                 model_id: str = DEFAULT_ID, revision: str | None = None):
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.pipeline = pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.batch_size = int(batch_size)
        self.model_id = model_id
        self.revision = revision

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu",
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True,
                        **settings: Any) -> FluxFillInpainter:
        """A Fill repository (hub id) or a local folder in the diffusers layout. Only ``model_index.json``
        and the pipeline's folders are fetched; offline and missing raises ``hub.ModelNotAvailable``.
        ``settings`` are the constructor's knobs (num_inference_steps, guidance_scale, ...)."""
        path = hub.resolve_folder(id_or_path, PIPELINE_SUBFOLDERS, revision=revision, cache_dir=cache_dir,
                                  allow_download=allow_download)
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        # dtype= (not torch_dtype=, which current diffusers deprecates), as inpaint.py loads its pipelines.
        pipeline = FluxFillPipeline.from_pretrained(path, dtype=dtype)
        return cls(pipeline, device=device, model_id=str(id_or_path), revision=revision, **settings)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", **settings: Any) -> FluxFillInpainter:
        """A ``FluxFillPipeline`` of tiny random components built offline; same seed, same weights. Sides
        must be multiples of 4; 2 steps and a 32-token T5 sequence by default."""
        from layerloop.models.bfs import tiny_transformer, tiny_vae
        from layerloop.models.inpaint import tiny_clip_tokenizer

        transformer = tiny_transformer(seed)  # Fill layout: 16 latent + 16 masked-image + 16 mask channels
        vae = tiny_vae(seed)
        clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG stream
            torch.manual_seed(seed)
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(clip_tokenizer), hidden_size=transformer.config.pooled_projection_dim,
                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id, max_position_embeddings=clip_tokenizer.model_max_length,
            ))
            t5 = T5EncoderModel(T5Config(
                vocab_size=len(t5_tokenizer), d_model=transformer.config.joint_attention_dim, d_kv=8, d_ff=37,
                num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            ))
        pipeline = FluxFillPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip.eval(),
            tokenizer=clip_tokenizer, text_encoder_2=t5.eval(), tokenizer_2=t5_tokenizer,
            transformer=transformer.eval(),
        )
        defaults = {"num_inference_steps": 2, "max_sequence_length": 32, "model_id": f"tiny:{seed}"}
        return cls(pipeline, device=device, **{**defaults, **settings})

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """The pipeline in the diffusers layout; ``from_pretrained(path)`` loads it back."""
        path = Path(path)
        self.pipeline.save_pretrained(path)
        return path

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE scale x 2x2 token packing)."""
        return self.pipeline.vae_scale_factor * 2

    def describe(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length,
                "dtype": str(self.pipeline.transformer.dtype).removeprefix("torch.")}

    @torch.no_grad()
    def fill(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], prompts: Sequence[str],
             seeds: Sequence[int]) -> list[np.ndarray]:
        """Inpaint each HxWx3 uint8 image inside its HxW mask (non-zero, e.g. 255 = fill) from its prompt,
        with its own seed. Returns HxWx3 uint8 images of the input sizes; pixels outside the mask are the
        input's, exactly (pasted back). Sides must be multiples of ``size_multiple`` (``ValueError``)."""
        count = len(images)
        if not (len(masks) == len(prompts) == len(seeds) == count):
            raise ValueError(f"{count} images, {len(masks)} masks, {len(prompts)} prompts and {len(seeds)} seeds: "
                             "need one of each per sample")
        checked = [self._check(image, mask) for image, mask in zip(images, masks)]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (image, _) in enumerate(checked):
            groups.setdefault(image.shape[:2], []).append(index)
        results: list[np.ndarray | None] = [None] * count
        for (height, width), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                output = self.pipeline(
                    prompt=[str(prompts[i]) for i in chunk],
                    image=[Image.fromarray(checked[i][0]) for i in chunk],
                    mask_image=[Image.fromarray(checked[i][1] * 255) for i in chunk],
                    height=height, width=width, num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale, max_sequence_length=self.max_sequence_length,
                    generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in chunk],
                    output_type="np",
                ).images
                for i, generated in zip(chunk, output):
                    image, mask = checked[i]
                    generated = np.clip(np.rint(np.asarray(generated, np.float32) * 255.0), 0, 255).astype(np.uint8)
                    results[i] = np.where(mask[..., None] > 0, generated, image)
        return results  # type: ignore[return-value]

    def _check(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An RGB uint8 image of a valid size and its 0/1 uint8 mask."""
        image, mask = np.ascontiguousarray(image), np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
        height, width = image.shape[:2]
        step = self.size_multiple
        if height % step or width % step:
            raise ValueError(f"image size {width}x{height} is not a multiple of {step} (the pipeline's "
                             f"vae_scale_factor * 2); resize or crop the inputs first")
        return image, (mask > 0).astype(np.uint8)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A character-level T5 (Unigram) tokenizer built in memory: T5's special tokens (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2), the word-start marker and printable ASCII; no sentencepiece model, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(char, -5.0) for char in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(  # T5 appends </s>, no BOS
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    # tokenizer_object: the constructor both transformers 4.x and 5.x accept for an in-memory tokenizer.
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=512)
