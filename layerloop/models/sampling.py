"""The one flow-matching Euler sampler of the Flux-Fill models (BFS and in-context).

Flow matching follows the Flux convention: ``x_t = (1 - t) x0 + t * noise`` with the transformer predicting
``v = noise - x0`` and its ``timestep`` argument being t itself in [0, 1]. Sampling integrates
``dx/dt = v`` from t = 1 (noise) to t = 0 (data) with Euler steps over a grid of noise levels (sigmas).

The grid is FluxFillPipeline's: ``num_steps`` evenly spaced levels from 1 down to 1/n, resolution-shifted as
``FlowMatchEulerDiscreteScheduler`` does for Flux (``use_dynamic_shifting``, exponential time shift with
``mu = calculate_shift(image_seq_len)``, diffusers' own function), then a final 0.

The scheduler itself is not used: it casts the grid to float32 *before* shifting, which gives other last
bits than the float64 shift both model families have always used (checked for 1..29 steps and 4..4096
tokens), and every candidate and checkpoint hash would change with it. Two grids remain, for the same
reason, as ``grid`` / ``dtype`` arguments of ``sigma_schedule``:

* BFS (``grid="fill"``, ``dtype=torch.float32``): ``np.linspace(1, 1/n, n)``, shifted in float64, rounded to
  float32, then 0 appended;
* in-context (``grid="uniform"``, ``dtype=torch.float64``): ``np.linspace(1, 0, n + 1)``, shifted in float64
  (0 stays 0). The same levels as ``"fill"`` up to the last bit of ``linspace``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

__all__ = ["calculate_shift", "time_shift", "sigma_schedule", "euler_sample"]

Velocity = Callable[[list[torch.Tensor], float], Sequence[torch.Tensor]]


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Flux's exponential resolution shift of noise levels in (0, 1] (float64), as
    ``FlowMatchEulerDiscreteScheduler.time_shift`` with ``time_shift_type="exponential"`` and sigma 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sigma_schedule(num_steps: int, image_seq_len: int, *, shift: bool = True, grid: str = "fill",
                   dtype: torch.dtype = torch.float32) -> list[float]:
    """``num_steps + 1`` noise levels from 1 to 0 for a packed sequence of ``image_seq_len`` tokens.

    ``grid="fill"``: FluxFillPipeline's ``linspace(1, 1/n, n)`` and a final 0; ``grid="uniform"``:
    ``linspace(1, 0, n + 1)``. ``shift``: Flux's resolution shift (``calculate_shift`` with the scheduler's
    defaults, 256 -> 0.5 and 4096 -> 1.15). The levels are computed in float64 and returned as Python
    floats rounded to ``dtype`` (see the module docstring for which family uses which).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if grid == "fill":
        levels = np.linspace(1.0, 1.0 / num_steps, num_steps)
    elif grid == "uniform":
        levels = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    else:
        raise ValueError(f"grid must be 'fill' or 'uniform', got {grid!r}")
    if shift:
        levels = time_shift(calculate_shift(image_seq_len), levels)
    return torch.tensor(np.append(levels, 0.0), dtype=dtype).tolist()


def euler_sample(velocity: Velocity, latents: Sequence[torch.Tensor], sigmas: Sequence[float]) -> list[torch.Tensor]:
    """Euler integration of ``dx/dt = v`` along ``sigmas`` (1 -> 0) for one or more latents integrated
    together (the BFS branches C and F share each transformer call).

    ``velocity(latents, sigma)`` returns one velocity per latent; the update runs in float32 whatever the
    transformer's dtype: ``x <- x + (sigma_next - sigma) * v``.
    """
    latents = list(latents)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        velocities = velocity(latents, sigma)
        latents = [x + (sigma_next - sigma) * v.float() for x, v in zip(latents, velocities)]
    return latents
