"""An exact, invertible space-to-depth autoencoder with the interface of diffusers' ``AutoencoderKL``.

``SpaceToDepthAutoencoder(factor=2)`` maps B x C x H x W pixels to B x (C * factor^2) x H/f x W/f latents
with ``torch.nn.functional.pixel_unshuffle`` and back with ``pixel_shuffle``: a fixed permutation of the
pixels, so ``decode(encode(x)) == x`` bit for bit in every dtype. It has no weights and nothing to train.

Why it exists (issue 14): the tiny in-context model (``InContextLoRA.tiny``) used a random ``AutoencoderKL``
that cannot reconstruct an image, so nothing trained on its latents could ever be judged in pixels. A
CPU-scale experiment that learns needs a VAE that reconstructs; this one does, exactly, at no cost.

What the in-context code reads from a VAE, and what this class gives:

* ``encode(pixels).latent_dist.mode()`` / ``.sample()``: the latents (a degenerate, point-mass
  ``PointDistribution``: mean = mode = sample, zero variance, zero KL);
* ``decode(latents).sample``: the pixels (``return_dict=False`` gives tuples, as ``AutoencoderKL``);
* ``config.block_out_channels``: one entry per level, ``log2(factor) + 1`` entries, so that the usual
  ``2 ** (len(block_out_channels) - 1)`` is the downsampling factor (each entry is the channel count at
  that level: ``in_channels * 4 ** level``);
* ``config.latent_channels`` (``in_channels * factor^2``), ``config.scaling_factor`` (1.0),
  ``config.shift_factor`` (0.0);
* ``dtype`` / ``device`` / ``to(...)``: from a one-element buffer (the model has no parameters), not
  saved with the weights;
* ``save_pretrained`` / ``from_pretrained``: diffusers' ``ModelMixin`` / ``ConfigMixin``; with no weights,
  ``save_pretrained`` writes ``config.json`` only and ``from_pretrained`` builds the model from it.

Latent statistics: pixels in [-1, 1] stay in [-1, 1], with the data's own spread (about 0.5 for images);
``scaling_factor`` / ``shift_factor`` can rescale them like a real VAE's, at the price of exactness in
the last bit when they are not powers of two.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch.nn import functional as F

__all__ = ["PointDistribution", "SpaceToDepthAutoencoder"]


class PointDistribution:
    """The degenerate posterior of a deterministic encoder: every draw is ``latents``. Has the methods of
    diffusers' ``DiagonalGaussianDistribution`` that callers use (``mode``, ``sample``, ``kl``, ``mean``,
    ``std``, ``var``)."""

    def __init__(self, latents: torch.Tensor):
        self.mean = latents
        self.std = torch.zeros_like(latents)
        self.var = torch.zeros_like(latents)
        self.logvar = torch.full_like(latents, -math.inf)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def kl(self, other: PointDistribution | None = None) -> torch.Tensor:
        """Zero per sample: a fixed, invertible encoder has nothing to regularise."""
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)


class SpaceToDepthAutoencoder(ModelMixin, ConfigMixin):
    """``pixel_unshuffle`` / ``pixel_shuffle`` by ``factor`` (a power of two), exactly invertible.

    ``latent_channels`` and ``block_out_channels`` are derived from ``in_channels`` and ``factor``; they
    are stored in the config for the code that reads them from a VAE and, when given (a saved config
    does), must match what ``in_channels`` and ``factor`` imply.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, factor: int = 2, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, latent_channels: int | None = None,
                 block_out_channels: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two (1, 2, 4, ...), got {factor!r}")
        if not scaling_factor or not math.isfinite(scaling_factor) or not math.isfinite(shift_factor):
            raise ValueError(f"scaling_factor must be finite and non-zero and shift_factor finite, got "
                             f"{scaling_factor!r} / {shift_factor!r}")
        levels = factor.bit_length() - 1
        derived_latents = in_channels * factor * factor
        derived_blocks = [in_channels * 4 ** level for level in range(levels + 1)]
        if latent_channels is not None and latent_channels != derived_latents:
            raise ValueError(f"latent_channels {latent_channels} does not match in_channels {in_channels} x "
                             f"factor {factor}^2 = {derived_latents}")
        if block_out_channels is not None and list(block_out_channels) != derived_blocks:
            raise ValueError(f"block_out_channels {list(block_out_channels)} does not match factor {factor} "
                             f"(expected {derived_blocks})")
        self.register_to_config(latent_channels=derived_latents, block_out_channels=derived_blocks)
        # dtype / device anchor (the model has no parameters); not part of the saved weights
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> SpaceToDepthAutoencoder:
        """The model of a ``save_pretrained`` folder (or a hub repository): only ``config.json`` is read,
        since there are no weights. Hub options (``revision``, ``cache_dir``, ...) pass to ``load_config``."""
        hub_options = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token",
                                                    "force_download", "proxies") if k in kwargs}
        kwargs.pop("low_cpu_mem_usage", None)
        kwargs.pop("device_map", None)
        if kwargs:
            raise TypeError(f"SpaceToDepthAutoencoder.from_pretrained got unexpected options {sorted(kwargs)}")
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_options)
        model = cls.from_config(config)
        if torch_dtype is not None:  # nn.Module's cast: diffusers' ``to`` warns about fp32 modules it has none of
            torch.nn.Module.to(model, torch_dtype)
        return model.eval()

    @property
    def factor(self) -> int:
        return self.config.factor

    def _check(self, tensor: torch.Tensor, channels: int, what: str, multiple: int = 1) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{what} must be a B x C x H x W tensor, got {shape}")
        if tensor.shape[1] != channels:
            raise ValueError(f"{what} has {tensor.shape[1]} channels; this autoencoder expects {channels}")
        if tensor.shape[2] % multiple or tensor.shape[3] % multiple:
            raise ValueError(f"{what} size {tensor.shape[2]}x{tensor.shape[3]} is not a multiple of the "
                             f"space-to-depth factor {multiple}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """B x in_channels x H x W -> latents B x latent_channels x H/f x W/f (as a point distribution)."""
        self._check(x, self.config.in_channels, "the image", self.factor)
        latents = F.pixel_unshuffle(x, self.factor) if self.factor > 1 else x
        posterior = PointDistribution(latents)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        """Latents B x latent_channels x h x w -> pixels B x in_channels x h*f x w*f."""
        self._check(z, self.config.latent_channels, "the latents")
        pixels = F.pixel_shuffle(z, self.factor) if self.factor > 1 else z
        return DecoderOutput(sample=pixels) if return_dict else (pixels,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """``decode(encode(sample))``: the input itself."""
        decoded = self.decode(self.encode(sample).latent_dist.mode()).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
