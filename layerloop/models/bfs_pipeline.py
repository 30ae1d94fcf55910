"""Inference with a trained BFS generator, in the style of a diffusers pipeline.

``BFSPipeline.from_checkpoint(folder, device=..., dtype=...)`` loads what a stage1 / stage2 checkpoint
(``final/`` or ``checkpoints/step-N/weights``) names: the LoRA + g on its base transformer, the base's RGB
VAE, the RGBA VAE the LoRA was trained with (``bfs_task.json``, or the one derived from the RGB VAE), the
text encoder and the guidance scale. ``pipe(backgrounds, masks, captions, seeds, steps=...)`` generates a
composite and a foreground layer per background with the shared Euler sampler (``bfs.sample_latents``),
each sample from its own seed, so a sample's output does not depend on its batch mates. ``noise="shared"`` (the
default, the BFS paper's) draws one noise tensor per sample and gives it to both branches; ``"independent"`` draws
one per branch (what the pipeline did before #15).
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

__all__ = ["BFSPipeline", "BFSPipelineOutput", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return np.clip(np.rint((images.float().cpu().permute(0, 2, 3, 1).numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclass
class BFSPipelineOutput:
    composite: np.ndarray  # (B, H, W, 3) uint8, the generated C
    foreground: np.ndarray  # (B, H, W, 4) uint8, the generated RGBA layer F


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

    @torch.no_grad()
    def __call__(self, backgrounds: np.ndarray, masks: np.ndarray, captions: Sequence[str], seeds: Sequence[int],
                 steps: int = 28, noise: bfs.Noise = "shared") -> BFSPipelineOutput:
        """Generate C and F for a batch of one size: ``backgrounds`` (B, H, W, 3) uint8, ``masks`` (B, H, W)
        box masks (non-zero inside), one caption and one seed per sample. ``noise``: one draw per sample shared
        by the two branches, or one per branch."""
        d = self.device
        pixels = torch.from_numpy(np.asarray(backgrounds)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mask = torch.from_numpy(np.asarray(masks) > 0).float()[:, None]
        z_b = bfs.encode_latents(self.vae, pixels.to(d))
        _, c, h, w = z_b.shape
        text = self.text_encoder(list(captions))
        if noise not in bfs.NOISE_CHOICES:
            raise ValueError(f"noise must be one of {bfs.NOISE_CHOICES}, got {noise!r}")
        # Per sample one draw (shared) or two, C's first (independent: the draws of before #15).
        draws = [torch.randn(1 if noise == "shared" else 2, c, h, w, generator=torch.Generator().manual_seed(seed))
                 for seed in seeds]
        noise_c = torch.stack([x[0] for x in draws])
        noise_f = noise_c if noise == "shared" else torch.stack([x[1] for x in draws])
        latents_c, latents_f = bfs.sample_latents(
            self.generator, z_b, mask.to(d), text.embeds.to(d), text.pooled.to(d), noise_c, noise_f,
            num_steps=steps, guidance=self.guidance)
        return BFSPipelineOutput(composite=to_uint8(bfs.decode_latents(self.vae, latents_c)),
                                 foreground=to_uint8(bfs.decode_latents(self.rgba_vae, latents_f)))
