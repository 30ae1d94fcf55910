"""Inference with a trained BFS generator, in the style of a diffusers pipeline.

``BFSPipeline.from_checkpoint(folder, device=..., dtype=...)`` loads what a stage1 / stage2 checkpoint
(``final/`` or ``checkpoints/step-N/weights``) names: the LoRA + g on its base transformer, the base's RGB
VAE, the RGBA VAE the LoRA was trained with (``bfs_task.json``, or the one derived from the RGB VAE), the
text encoder and the guidance scale. ``pipe(backgrounds, masks, captions, seeds, steps=...)`` generates a
composite and a foreground layer per background with the shared Euler sampler (``bfs.sample_latents``),
each sample from its own seed, so a sample's output does not depend on its batch mates. ``noise="shared"`` (the
default, the BFS paper's) draws one noise tensor per sample and gives it to both branches; ``"independent"`` draws
one per branch (what the pipeline did before #15).

The BFS paper's applications are options of the same call, not other samplers:

* foreground extraction: ``pipe(backgrounds, masks, captions, seeds, composites=C)`` gives the composite
  branch the given C, noised to each step's level with the branch's noise, instead of integrating it
  (``bfs.sample_latents(composite_latents=...)``); the output's ``composite`` is C itself and ``foreground``
  the extracted layer;
* multi-layer synthesis: ``pipe.layers(background, boxes, captions, seeds)`` adds foregrounds back to front,
  each generated over the composite of the layers before it (``BFSLayers``);
* reference-based generation: ``pipe.load_redux(model)`` then ``references=`` (one RGB image per sample):
  FLUX.1 Redux's image tokens appended to the caption's (``models/redux.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from layerloop.models import bfs
from layerloop.models.bfs_components import (
    load_rgb_vae, load_rgba_vae, make_text_encoder, read_task_info, text_encoder_kind,
)
from layerloop.models.checkpoints import recorded_hash

__all__ = ["BFSPipeline", "BFSPipelineOutput", "BFSLayers", "box_mask", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return np.clip(np.rint((images.float().cpu().permute(0, 2, 3, 1).numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclass
class BFSPipelineOutput:
    composite: np.ndarray  # (B, H, W, 3) uint8, the generated C (extraction: the given C)
    foreground: np.ndarray  # (B, H, W, 4) uint8, the generated RGBA layer F


@dataclass
class BFSLayers:
    """A layered result of ``BFSPipeline.layers``, back to front. ``composites[i]`` is ``layers[: i + 1]``
    alpha-blended over ``background`` (``samples.composite``, one layer at a time), so the layers flatten
    exactly to ``composite``; layer ``i`` was generated over ``composites[i - 1]`` (the background for the
    first). ``generated[i]`` is what the composite branch made for layer ``i`` (not used further, as in the
    paper, whose composite branch output is not decoded)."""

    background: np.ndarray  # (H, W, 3) uint8
    layers: list[np.ndarray]  # (H, W, 4) uint8 each
    masks: list[np.ndarray]  # (H, W) uint8 box masks, 255 inside
    composites: list[np.ndarray]  # (H, W, 3) uint8 each
    generated: list[np.ndarray]  # (H, W, 3) uint8 each

    @property
    def composite(self) -> np.ndarray:
        return self.composites[-1] if self.composites else self.background


def box_mask(height: int, width: int, box: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 mask, 255 inside ``box`` = (x0, y0, x1, y1) in pixels, ends exclusive (``meta["bbox"]``'s
    convention); a box that is empty or leaves the image is refused."""
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {(x0, y0, x1, y1)} is empty or outside the {width}x{height} image "
                         "(x0, y0, x1, y1 with 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


class BFSPipeline:
    """A BFS generator with its VAEs and text encoder. ``checkpoint_hash`` is the hash of the checkpoint it
    was loaded from (None when assembled from parts)."""

    def __init__(self, generator: bfs.BFSGenerator, vae, rgba_vae, text_encoder, guidance: float | None = 30.0,
                 checkpoint_hash: str | None = None):
        self.generator = generator.eval()
        self.vae = vae
        self.rgba_vae = rgba_vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.guidance = guidance
        self.checkpoint_hash = checkpoint_hash
        self.redux = None  # a models.redux.ReduxEncoder, set by load_redux: what references= needs

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, rgba_vae: str | os.PathLike | None = None,
                        guidance: float | None = None) -> BFSPipeline:
        """The pipeline of a stage1 / stage2 checkpoint. ``rgba_vae``: the final/ of an rgba-vae run instead
        of the one ``bfs_task.json`` names; ``guidance``: instead of the one the LoRA was trained with."""
        checkpoint, device = Path(checkpoint), torch.device(device)
        saved, info = bfs.read_lora_config(checkpoint), read_task_info(checkpoint)
        base, revision = saved["base_model_id"], saved.get("base_revision")
        generator = bfs.load_generator(checkpoint, dtype=dtype, device=device)
        vae = load_rgb_vae(base, revision, dtype, device)
        rgba_path = rgba_vae or info.get("rgba_vae_checkpoint")
        rgba = load_rgba_vae(rgba_path, vae) if rgba_path else bfs.make_rgba_vae(vae)
        kind, tokens = text_encoder_kind(info.get("text_encoder"), base, info.get("text_tokens"))
        text_encoder = make_text_encoder(kind, base, revision, tokens, dtype, device, generator.transformer.config)
        guidance = guidance if guidance is not None else info.get("guidance", 30.0)
        digest = recorded_hash(checkpoint, bfs.lora_checkpoint_hash)
        return cls(generator, vae, rgba, text_encoder, guidance, digest)

    @property
    def device(self) -> torch.device:
        return next(self.generator.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.transformer.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE scale x 2x2 token packing)."""
        return 2 * bfs.vae_scale_factor(self.vae)

    def load_redux(self, model: str = "black-forest-labs/FLUX.1-Redux-dev", revision: str | None = None,
                   local_files_only: bool = False) -> BFSPipeline:
        """Load FLUX.1 Redux for ``references=`` (``tiny`` / ``tiny:SEED``: a random tiny one sized for this
        transformer's text width); returns the pipeline."""
        from layerloop.models.redux import ReduxEncoder
        from layerloop.models.refs import is_tiny, tiny_seed

        width = self.generator.transformer.config.joint_attention_dim
        if is_tiny(model):
            self.redux = ReduxEncoder.tiny(tiny_seed(model), text_dim=width, device=self.device)
        else:
            self.redux = ReduxEncoder.from_pretrained(model, revision, dtype=self.dtype, device=self.device,
                                                      local_files_only=local_files_only)
        if self.redux.text_dim != width:
            raise ValueError(f"Redux model {model} makes tokens of width {self.redux.text_dim}; this transformer's "
                             f"text width is {width}")
        return self

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, C, H, W) in [-1, 1] on the pipeline's device."""
        return (torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.device)

    @torch.no_grad()
    def __call__(self, backgrounds: np.ndarray, masks: np.ndarray, captions: Sequence[str], seeds: Sequence[int],
                 steps: int = 28, noise: bfs.Noise = "shared", composites: np.ndarray | None = None,
                 references: Sequence[np.ndarray] | None = None) -> BFSPipelineOutput:
        """Generate C and F for a batch of one size: ``backgrounds`` (B, H, W, 3) uint8, ``masks`` (B, H, W)
        box masks (non-zero inside), one caption and one seed per sample. ``noise``: one draw per sample shared
        by the two branches, or one per branch.

        ``composites`` (B, H, W, 3) uint8: extract F from these composites instead (the composite branch gets
        each one noised to the step's level; the output's composite is the given one). ``references``: one RGB
        uint8 image per sample, whose Redux tokens follow the caption's (needs ``load_redux``)."""
        d = self.device
        mask = torch.from_numpy(np.asarray(masks) > 0).float()[:, None]
        z_b = bfs.encode_latents(self.vae, self._pixels(backgrounds))
        _, c, h, w = z_b.shape
        z_c = None
        if composites is not None:
            if np.shape(composites) != np.shape(backgrounds):
                raise ValueError(f"composites {np.shape(composites)} and backgrounds {np.shape(backgrounds)} differ")
            z_c = bfs.encode_latents(self.vae, self._pixels(composites))
        text = self.text_encoder(list(captions))
        if references is not None:
            from layerloop.models.redux import reference_text

            if self.redux is None:
                raise ValueError("references need FLUX.1 Redux: call load_redux(model) first")
            if len(references) != len(captions):
                raise ValueError(f"{len(references)} reference images for {len(captions)} samples: give one each")
            text = reference_text(text, self.redux(references).to(text.embeds.device))
        if noise not in bfs.NOISE_CHOICES:
            raise ValueError(f"noise must be one of {bfs.NOISE_CHOICES}, got {noise!r}")
        # Per sample one draw (shared) or two, C's first (independent: the draws of before #15).
        draws = [torch.randn(1 if noise == "shared" else 2, c, h, w, generator=torch.Generator().manual_seed(seed))
                 for seed in seeds]
        noise_c = torch.stack([x[0] for x in draws])
        noise_f = noise_c if noise == "shared" else torch.stack([x[1] for x in draws])
        latents_c, latents_f = bfs.sample_latents(
            self.generator, z_b, mask.to(d), text.embeds.to(d), text.pooled.to(d), noise_c, noise_f,
            num_steps=steps, guidance=self.guidance, composite_latents=z_c)
        foreground = to_uint8(bfs.decode_latents(self.rgba_vae, latents_f))
        if composites is not None:
            return BFSPipelineOutput(composite=np.array(composites, dtype=np.uint8), foreground=foreground)
        return BFSPipelineOutput(composite=to_uint8(bfs.decode_latents(self.vae, latents_c)), foreground=foreground)

    def layers(self, background: np.ndarray, boxes: Sequence[Sequence[int]], captions: Sequence[str],
               seeds: Sequence[int], steps: int = 28, noise: bfs.Noise = "shared",
               references: Sequence[np.ndarray | None] | None = None) -> BFSLayers:
        """Multi-layer synthesis: one foreground per box, back to front. Layer ``i`` is generated (``self(...)``)
        over the composite of the layers before it, in its own box (x0, y0, x1, y1, pixels, ends exclusive),
        with its own caption, seed and optional reference image; the next background is that layer alpha-blended
        over it (``samples.composite``), so the returned layers flatten exactly to ``BFSLayers.composite``."""
        from layerloop.samples import composite as blend

        if not (len(boxes) == len(captions) == len(seeds)):
            raise ValueError(f"one box, caption and seed per layer: got {len(boxes)}, {len(captions)}, {len(seeds)}")
        if references is not None and len(references) != len(boxes):
            raise ValueError(f"{len(references)} reference images for {len(boxes)} layers: give one per layer "
                             "(None where a layer has none)")
        background = np.ascontiguousarray(background, dtype=np.uint8)
        height, width = background.shape[:2]
        step = self.size_multiple
        if background.ndim != 3 or background.shape[2] != 3 or height % step or width % step:
            raise ValueError(f"the background must be RGB with sides that are multiples of {step}, got "
                             f"{background.shape}")
        result = BFSLayers(background=background, layers=[], masks=[], composites=[], generated=[])
        current = background
        for i, (box, caption, seed) in enumerate(zip(boxes, captions, seeds)):
            try:
                mask = box_mask(height, width, box)
            except ValueError as error:
                raise ValueError(f"layer {i + 1}: {error}") from None
            reference = None if references is None else references[i]
            out = self(current[None], mask[None], [caption], [seed], steps=steps, noise=noise,
                       references=None if reference is None else [reference])
            layer = out.foreground[0]
            current = blend(layer, current)
            result.layers.append(layer)
            result.masks.append(mask)
            result.composites.append(current)
            result.generated.append(out.composite[0])
        return result
