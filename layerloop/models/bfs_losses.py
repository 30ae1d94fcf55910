"""Training losses of the BFS generator: pure functions; the trainer owns sampling t, noise and the optimiser.

Flow matching follows the Flux convention: `z_t = (1 - t) z0 + t z1` with z0 the data and z1 noise,
velocity target `z1 - z0`. All latents are spatial (B, C, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "noisy_latents", "flow_matching_target", "denoised_estimate", "flow_matching_loss", "composition_loss",
    "compositor_loss", "BranchLatents", "stage1_loss", "stage2_loss", "stage2_branch",
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


@dataclass(frozen=True)
class BranchLatents:
    """What the two branches saw and predicted at one training step, all spatial (B, C, h, w) except
    ``t`` (B,): velocities ``v_c``/``v_f`` (the generator's outputs unpacked), data ``z0_*`` and noise ``z1_*`` (this module's
    convention), the background latent ``z_b``. The branches' inputs must have been ``noisy_latents(z0, z1, t)``."""

    v_c: torch.Tensor
    v_f: torch.Tensor
    z0_c: torch.Tensor
    z0_f: torch.Tensor
    z1_c: torch.Tensor
    z1_f: torch.Tensor
    z_b: torch.Tensor
    t: torch.Tensor

    def composition(self, compositor: nn.Module) -> torch.Tensor:
        """L_comp on the one-step estimates of both branches."""
        z_c_hat = denoised_estimate(noisy_latents(self.z0_c, self.z1_c, self.t), self.v_c, self.t)
        z_f_hat = denoised_estimate(noisy_latents(self.z0_f, self.z1_f, self.t), self.v_f, self.t)
        return composition_loss(compositor, z_f_hat, self.z_b, z_c_hat)

    def flow_matching(self, branch: str) -> torch.Tensor:
        if branch == "c":
            return flow_matching_loss(self.v_c, self.z0_c, self.z1_c)
        return flow_matching_loss(self.v_f, self.z0_f, self.z1_f)


def stage1_loss(compositor: nn.Module, *, comp_weight: float = 0.1, **latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage 1 on quadruples: FM(C) + FM(F) + comp_weight * L_comp. ``latents``: the fields of
    ``BranchLatents`` by name (all required)."""
    step = BranchLatents(**latents)
    fm_c, fm_f = step.flow_matching("c"), step.flow_matching("f")
    comp = step.composition(compositor)
    return {"loss": fm_c + fm_f + comp_weight * comp, "fm_c": fm_c, "fm_f": fm_f, "comp": comp}


def stage2_loss(branch: str, compositor: nn.Module, *, comp_weight: float = 0.5,
                **latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage 2, one of two objectives chosen per step by `stage2_branch`:
    - "real" (kind=pair samples): L_real = FM on the composite branch only; z0_f is the surrogate
      foreground S the F branch was fed (no ground-truth F exists), used only to form z_F_hat.
    - "reg" (quadruples): L_reg = FM on the foreground branch only.
    Both add comp_weight * L_comp. ``latents`` as for ``stage1_loss``."""
    if branch not in ("real", "reg"):
        raise ValueError(f"stage-2 branch must be 'real' or 'reg', got {branch!r}")
    step = BranchLatents(**latents)
    comp = step.composition(compositor)
    fm = step.flow_matching("c" if branch == "real" else "f")
    return {"loss": fm + comp_weight * comp, "fm": fm, "comp": comp}


def stage2_branch(step: int, seed: int, p_real: float = 0.8) -> str:
    """"real" with probability p_real, else "reg"; a pure function of (seed, step), so a resumed run
    or any Ray worker draws the same branch for the same step without sharing RNG state."""
    if step < 0 or seed < 0:
        raise ValueError("step and seed must be non-negative")
    u = np.random.default_rng([seed, step]).random()
    return "real" if u < p_real else "reg"
