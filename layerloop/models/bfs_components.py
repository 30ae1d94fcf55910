"""The frozen components around the BFS generator, as trained checkpoints and training tasks name them:
the RGB VAE of the base model, the RGBA VAE and Phi (compositor) checkpoints of the `rgba-vae` and `phi`
training stages, the text encoder, and the ``bfs_task.json`` a stage1 / stage2 checkpoint carries.

Used by the training task (`training/bfs_task.py`) and by inference (`bfs_pipeline.BFSPipeline`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from layerloop.models import bfs, hub
from layerloop.models.bfs_modules import LatentCompositor
from layerloop.models.refs import is_tiny, tiny_seed
from layerloop.models.text_encoders import ByteTextEncoder, FluxTextEncoder

COMPOSITOR_WEIGHTS, COMPOSITOR_CONFIG = "compositor.safetensors", "compositor.json"
RGBA_VAE_WEIGHTS, RGBA_VAE_CONFIG = "rgba_vae.safetensors", "rgba_vae.json"
TASK_FILE = "bfs_task.json"  # stage1 / stage2: text encoder, resolution, guidance, Phi and RGBA VAE used


def read_task_info(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``bfs_task.json`` of a stage1 / stage2 checkpoint, or {} when there is none."""
    path = Path(checkpoint) / TASK_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_rgb_vae(model: str, revision: str | None, dtype: torch.dtype, device: torch.device):
    """The frozen RGB VAE: `tiny_vae(seed)` for tiny models, else the `vae` subfolder of the Fill repo."""
    if is_tiny(model):
        vae = bfs.tiny_vae(tiny_seed(model))
    else:
        from diffusers import AutoencoderKL

        root = hub.resolve(model, revision=revision, allow_patterns=["model_index.json", "vae/*"])
        vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_compositor(path: str | Path, device: torch.device | str = "cpu") -> LatentCompositor:
    """Phi from the final/ of a `phi` training run."""
    meta = json.loads((Path(path) / COMPOSITOR_CONFIG).read_text())
    phi = LatentCompositor(meta["latent_channels"], meta["hidden_channels"], meta["num_layers"])
    phi.load_state_dict(load_file(str(Path(path) / COMPOSITOR_WEIGHTS)), strict=True)
    return phi.to(device)


def load_rgba_vae(path: str | Path, rgb_vae) -> nn.Module:
    """An RGBA VAE with the weights of an `rgba-vae` run, built on (a copy of) `rgb_vae`'s config."""
    rgba = bfs.make_rgba_vae(rgb_vae)
    from layerloop import storage

    state = load_file(str(storage.local_folder(path) / RGBA_VAE_WEIGHTS), device=str(next(rgba.parameters()).device))
    rgba.load_state_dict({k: v.to(next(rgba.parameters()).dtype) for k, v in state.items()}, strict=True)
    return rgba


def make_text_encoder(kind: str, model: str, revision: str | None, tokens: int, dtype: torch.dtype,
                      device: torch.device, transformer_config) -> nn.Module:
    """ByteTextEncoder sized for the transformer (tiny), or Fill's CLIP + T5 (`FluxTextEncoder`)."""
    if kind == "byte":
        return ByteTextEncoder(transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim,
                               max_length=tokens, seed=tiny_seed(model) if is_tiny(model) else 0).to(device)
    return FluxTextEncoder.from_pretrained(model, revision, dtype, device, max_sequence_length=tokens)


def text_encoder_kind(kind: str | None, model: str, tokens: int | None) -> tuple[str, int]:
    """(kind, tokens) with defaults filled in: byte for tiny bases, flux otherwise; 32 byte / 512 T5 tokens."""
    kind = kind if kind not in (None, "auto") else ("byte" if is_tiny(model) else "flux")
    return kind, tokens or (32 if kind == "byte" else 512)
