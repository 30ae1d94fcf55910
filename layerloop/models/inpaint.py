"""Object removal by inpainting: any diffusers inpainting pipeline (default RORem), and ObjectClear.

``DiffusersInpainter.remove(images, masks, seed)`` erases the masked object from each image:

1. the image is resized to ``resolution`` x ``resolution`` (bicubic) and the mask to the same size
   (nearest), as RORem's reference inference does at 512 px;
2. the mask is dilated by ``dilate_px`` pixels at that resolution (elliptical kernel), because object
   masks rarely cover the object's anti-aliased rim and a leftover rim gets "re-grown" by the model;
3. the pipeline inpaints the batch; every image gets its own CPU ``torch.Generator`` seeded with its seed,
   so a result depends on (image, mask, seed) only, never on batch composition or the GPU's RNG;
4. the output is resized back to the input size, and only pixels inside the dilated mask (and the
   original mask) are taken from it: everything else is the input, bit for bit. The VAE round trip
   changes colours and detail slightly everywhere; outside the mask those changes are pure damage, and
   keeping the input there also keeps ``composite == background`` outside the object region exact.

Defaults follow RORem's README (``LetsThink/RORem``, an SDXL inpainting pipeline): 50 steps, strength
0.99, guidance 1.0 and its quality prompt and negative prompt. ``dtype`` defaults to fp16 on CUDA and fp32
on CPU.

``ObjectClearRemover`` wraps ObjectClear (``jixin0101/ObjectClear``), which removes an object together with
its shadow and reflections. It needs the ``objectclear`` package from https://github.com/zjx0101/ObjectClear;
without it, constructing the wrapper raises an ``ImportError`` that says how to install it. Its output is
not pasted back inside the mask: removing the object's effects outside the mask is the point of ObjectClear,
and its attention-guided fusion already keeps the untouched background.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoPipelineForInpainting,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from layerloop.models import hub

DEFAULT_ID = "LetsThink/RORem"
ROREM_PROMPT = "4K, high quality, masterpiece, Highly detailed, Sharp focus, Professional, photorealistic, realistic"
ROREM_NEGATIVE_PROMPT = ("low quality, worst, bad proportions, blurry, extra finger, Deformed, disfigured, "
                         "unclear background")

OBJECTCLEAR_ID = "jixin0101/ObjectClear"
OBJECTCLEAR_INSTALL = (
    "ObjectClearRemover needs the `objectclear` package, which is not on PyPI. Install it with\n"
    "    pip install git+https://github.com/zjx0101/ObjectClear\n"
    "or, if pip cannot build it (the repository has had no setup.py), clone it and put it on the path:\n"
    "    git clone https://github.com/zjx0101/ObjectClear && export PYTHONPATH=$PWD/ObjectClear:$PYTHONPATH\n"
    "(and install its requirements.txt). Otherwise use the RORem backend (DiffusersInpainter)."
)


class DiffusersInpainter:
    def __init__(self, pipeline: DiffusionPipeline, device: str = "cpu", resolution: int = 512,
                 dilate_px: int = 20, num_inference_steps: int = 50, strength: float = 0.99,
                 guidance_scale: float = 1.0, prompt: str = ROREM_PROMPT,
                 negative_prompt: str | None = ROREM_NEGATIVE_PROMPT, model_id: str = "tiny",
                 revision: str | None = None):
        self.device = torch.device(device)
        self.pipeline = pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.resolution = resolution
        self.dilate_px = dilate_px
        self.num_inference_steps = num_inference_steps
        self.strength = strength
        self.guidance_scale = guidance_scale
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.model_id = model_id
        self.revision = revision

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEFAULT_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu", variant: str | None = None,
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True,
                        allow_patterns: list[str] | None = None, **settings: Any) -> "DiffusersInpainter":
        """``settings`` are the constructor's knobs (resolution, dilate_px, num_inference_steps, ...).

        ``variant="fp16"`` loads a repository's ``*.fp16.safetensors`` files; ``allow_patterns`` can then
        keep the download to those (for example ``["*.json", "*.txt", "*.fp16.safetensors"]``)."""
        path = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                           allow_patterns=allow_patterns)
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        pipeline = AutoPipelineForInpainting.from_pretrained(path, dtype=dtype, variant=variant)
        return cls(pipeline, device=device, model_id=str(id_or_path), revision=revision, **settings)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", **settings: Any) -> "DiffusersInpainter":
        """A Stable Diffusion inpainting pipeline with tiny random UNet/VAE/CLIP text encoder (the layout of
        diffusers' own pipeline tests) and a character-level CLIP tokenizer built offline, working at 64 px
        with 3 steps. The output is noise inside the mask; it exists to test the plumbing."""
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        )
        tokenizer = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        pipeline = StableDiffusionInpaintPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        defaults = {"resolution": 64, "dilate_px": 2, "num_inference_steps": 3}
        return cls(pipeline, device=device, **{**defaults, **settings})

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        self.pipeline.save_pretrained(path)
        return path

    def describe(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "resolution": self.resolution,
                "dilate_px": self.dilate_px, "num_inference_steps": self.num_inference_steps,
                "strength": self.strength, "guidance_scale": self.guidance_scale, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt}

    @torch.no_grad()
    def remove(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int | Sequence[int] = 0,
               batch_size: int = 4) -> list[np.ndarray]:
        """Inpaint each image inside its mask (nonzero = remove). ``seed`` is one seed for every image or
        one per image. Returns HxWx3 uint8 images of the input sizes."""
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        seeds = [int(seed)] * len(images) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")

        prepared = [self._prepare(image, mask) for image, mask in zip(images, masks)]
        results: list[np.ndarray] = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            count = len(chunk)
            use_negative = self.negative_prompt is not None and self.guidance_scale > 1.0
            output = self.pipeline(
                prompt=[self.prompt] * count,
                negative_prompt=[self.negative_prompt] * count if use_negative else None,
                image=[Image.fromarray(small_image) for small_image, _, _ in chunk],
                mask_image=[Image.fromarray(small_mask) for _, small_mask, _ in chunk],
                height=self.resolution, width=self.resolution, strength=self.strength,
                num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + count]],
                output_type="np",
            ).images
            for inpainted, (_, small_mask, (image, mask)) in zip(output, chunk):
                results.append(self._paste(inpainted, small_mask, image, mask))
        return results

    def _prepare(self, image: np.ndarray, mask: np.ndarray):
        image, mask = _check(image, mask)
        size = (self.resolution, self.resolution)
        small_image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
        small_mask = np.asarray(Image.fromarray(mask * 255).resize(size, Image.NEAREST))
        small_mask = dilate(small_mask, self.dilate_px)
        return small_image, small_mask, (image, mask)

    def _paste(self, inpainted: np.ndarray, small_mask: np.ndarray, image: np.ndarray,
               mask: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        inpainted = np.clip(np.round(inpainted * 255.0), 0, 255).astype(np.uint8)
        full = np.asarray(Image.fromarray(inpainted).resize((width, height), Image.BICUBIC))
        # Nearest resizing of a thin mask can drop pixels; the original mask is always replaced.
        region = (np.asarray(Image.fromarray(small_mask).resize((width, height), Image.NEAREST)) > 0) | (mask > 0)
        return np.where(region[..., None], full, image)


class ObjectClearRemover:
    """ObjectClear (object and effect removal). Needs the ``objectclear`` package; see the module docstring."""

    def __init__(self, pipeline: Any, device: str = "cpu", resolution: int = 512, num_inference_steps: int = 20,
                 guidance_scale: float = 2.5, prompt: str = "remove the instance of object",
                 model_id: str = OBJECTCLEAR_ID, revision: str | None = None):
        _import_objectclear()  # a clear error up front instead of an AttributeError on first use
        self.device = torch.device(device)
        self.pipeline = pipeline.to(self.device)
        self.resolution = resolution
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.prompt = prompt
        self.model_id = model_id
        self.revision = revision

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = OBJECTCLEAR_ID, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu", variant: str | None = None,
                        apply_attention_guided_fusion: bool = True, cache_dir: str | os.PathLike | None = None,
                        allow_download: bool = True, **settings: Any) -> "ObjectClearRemover":
        pipeline_class = _import_objectclear()
        path = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download)
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        pipeline = pipeline_class.from_pretrained_with_custom_modules(
            str(path), torch_dtype=dtype, apply_attention_guided_fusion=apply_attention_guided_fusion,
            variant=variant,
        )
        return cls(pipeline, device=device, model_id=str(id_or_path), revision=revision, **settings)

    def describe(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "resolution": self.resolution,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}

    @torch.no_grad()
    def remove(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
               seed: int | Sequence[int] = 0) -> list[np.ndarray]:
        """One image at a time: ObjectClear's pipeline is written and tested for single images, and its
        images keep their aspect ratio (shorter side ``resolution``), so they rarely share a shape anyway."""
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        seeds = [int(seed)] * len(images) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        results = []
        for image, mask, one_seed in zip(images, masks, seeds):
            image, mask = _check(image, mask)
            height, width = image.shape[:2]
            # Trained at 512 px on the shorter side; sides rounded to the VAE's multiple of 8.
            scale = self.resolution / min(height, width)
            size = (max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))
            output = self.pipeline(
                prompt=self.prompt,
                image=Image.fromarray(image).resize(size, Image.BICUBIC),
                mask_image=Image.fromarray(mask * 255).resize(size, Image.NEAREST),
                generator=torch.Generator("cpu").manual_seed(one_seed),
                num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                height=size[1], width=size[0], return_attn_map=False,
            ).images[0]
            results.append(np.asarray(output.convert("RGB").resize((width, height), Image.BICUBIC)))
        return results


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """A 0/255 mask grown by ``pixels`` in every direction (elliptical structuring element)."""
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask, kernel)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters and digits with no merges (every word becomes its
    characters): real CLIPTokenizer code paths, no download."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _import_objectclear():
    try:
        from objectclear.pipelines import ObjectClearPipeline
    except ImportError as error:
        raise ImportError(OBJECTCLEAR_INSTALL) from error
    return ObjectClearPipeline


def _check(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and a 0/1 uint8 mask of the same size."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    return image, (mask > 0).astype(np.uint8)
