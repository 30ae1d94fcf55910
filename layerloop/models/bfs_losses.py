"""Training losses of the BFS generator: pure functions; the trainer owns sampling t, noise and the optimiser.

Flow matching follows the Flux convention: `z_t = (1 - t) z0 + t z1` with z0 the data and z1 noise,
velocity target `z1 - z0`. All latents are spatial (B, C, h, w).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "noisy_latents", "flow_matching_target", "denoised_estimate", "flow_matching_loss", "composition_loss",
    "compositor_loss", "stage1_loss", "stage2_loss", "stage2_branch",
]


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def noisy_latents(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) z0 + t z1: z0 data, z1 noise, t per sample (B,) or scalar."""
    t = _per_sample(t, z0)
    return (1 - t) * z0 + t * z1


def flow_matching_target(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    return z1 - z0


def denoised_estimate(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One-step estimate of the data: z0_hat = z_t - t v (exact when v is the true velocity)."""
    return z_t - _per_sample(t, z_t) * v


def flow_matching_loss(v: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(v.float(), flow_matching_target(z0, z1).float())


def composition_loss(
    compositor: nn.Module, z_f_hat: torch.Tensor, z_b: torch.Tensor, z_c_hat: torch.Tensor
) -> torch.Tensor:
    """L_comp = L1(Phi(z_F_hat, z_B), z_C_hat) on spatial latents; gradients reach both branches
    through the two estimates (Phi itself is expected frozen by the caller once trained)."""
    return F.l1_loss(compositor(z_f_hat, z_b).float(), z_c_hat.float())


def compositor_loss(compositor: nn.Module, z_f: torch.Tensor, z_b: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
    """Training loss of Phi itself, on encoded quadruples: L1(Phi(z_F, z_B), z_C)."""
    return F.l1_loss(compositor(z_f, z_b).float(), z_c.float())


def stage1_loss(
    compositor: nn.Module,
    *,
    v_c: torch.Tensor,
    v_f: torch.Tensor,
    z0_c: torch.Tensor,
    z0_f: torch.Tensor,
    z1_c: torch.Tensor,
    z1_f: torch.Tensor,
    z_b: torch.Tensor,
    t: torch.Tensor,
    comp_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Stage 1 on quadruples: FM(C) + FM(F) + comp_weight * L_comp. All latents spatial (B, C, h, w);
    the velocities are the generator's outputs unpacked. The branches' inputs must have been
    `noisy_latents(z0, z1, t)` with these very tensors."""
    z_c_hat = denoised_estimate(noisy_latents(z0_c, z1_c, t), v_c, t)
    z_f_hat = denoised_estimate(noisy_latents(z0_f, z1_f, t), v_f, t)
    fm_c = flow_matching_loss(v_c, z0_c, z1_c)
    fm_f = flow_matching_loss(v_f, z0_f, z1_f)
    comp = composition_loss(compositor, z_f_hat, z_b, z_c_hat)
    return {"loss": fm_c + fm_f + comp_weight * comp, "fm_c": fm_c, "fm_f": fm_f, "comp": comp}


def stage2_loss(
    branch: str,
    compositor: nn.Module,
    *,
    v_c: torch.Tensor,
    v_f: torch.Tensor,
    z0_c: torch.Tensor,
    z0_f: torch.Tensor,
    z1_c: torch.Tensor,
    z1_f: torch.Tensor,
    z_b: torch.Tensor,
    t: torch.Tensor,
    comp_weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Stage 2, one of two objectives chosen per step by `stage2_branch`:
    - "real" (kind=pair samples): L_real = FM on the composite branch only; z0_f is the surrogate
      foreground S the F branch was fed (no ground-truth F exists), used only to form z_F_hat.
    - "reg" (quadruples): L_reg = FM on the foreground branch only.
    Both add comp_weight * L_comp."""
    z_c_hat = denoised_estimate(noisy_latents(z0_c, z1_c, t), v_c, t)
    z_f_hat = denoised_estimate(noisy_latents(z0_f, z1_f, t), v_f, t)
    comp = composition_loss(compositor, z_f_hat, z_b, z_c_hat)
    if branch == "real":
        fm = flow_matching_loss(v_c, z0_c, z1_c)
    elif branch == "reg":
        fm = flow_matching_loss(v_f, z0_f, z1_f)
    else:
        raise ValueError(f"stage-2 branch must be 'real' or 'reg', got {branch!r}")
    return {"loss": fm + comp_weight * comp, "fm": fm, "comp": comp}


def stage2_branch(step: int, seed: int, p_real: float = 0.8) -> str:
    """"real" with probability p_real, else "reg"; a pure function of (seed, step), so a resumed run
    or any Ray worker draws the same branch for the same step without sharing RNG state."""
    if step < 0 or seed < 0:
        raise ValueError("step and seed must be non-negative")
    u = np.random.default_rng([seed, step]).random()
    return "real" if u < p_real else "reg"
