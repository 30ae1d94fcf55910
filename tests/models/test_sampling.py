"""The shared flow-matching Euler sampler (`models/sampling.py`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from layerloop.models.sampling import euler_sample, sigma_schedule, time_shift


@pytest.mark.parametrize("grid", ["fill", "uniform"])
def test_schedule_runs_from_one_to_zero_and_shifts_towards_noise(grid):
    for steps in (1, 2, 4, 28):
        sigmas = sigma_schedule(steps, 1024, grid=grid)
        assert len(sigmas) == steps + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
        plain = sigma_schedule(steps, 1024, grid=grid, shift=False)
        assert all(s >= p for s, p in zip(sigmas, plain))  # mu > 0: more of the steps at high noise
    with pytest.raises(ValueError):
        sigma_schedule(0, 16)
    with pytest.raises(ValueError):
        sigma_schedule(2, 16, grid="karras")


def test_schedule_is_fluxs_shift_of_the_fill_grid():
    steps, tokens = 4, 96
    mu = calculate_shift(tokens)
    grid = np.linspace(1.0, 1.0 / steps, steps)
    want = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in grid] + [0.0]
    assert sigma_schedule(steps, tokens, dtype=torch.float64) == pytest.approx(want, rel=1e-15)
    assert sigma_schedule(steps, tokens) == torch.tensor(want, dtype=torch.float32).tolist()
    # the two grids name the same levels up to the last bit of linspace
    assert sigma_schedule(steps, tokens, grid="uniform", dtype=torch.float64) == pytest.approx(want, rel=1e-12)
    np.testing.assert_array_equal(time_shift(0.0, grid), grid)  # mu = 0: no shift


def test_euler_integrates_each_latent_with_its_velocity():
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    calls = []

    def velocity(latents, sigma):
        calls.append(sigma)
        return [torch.full_like(latents[0], 2.0), -latents[1].double()]

    sigmas = [1.0, 0.5, 0.0]
    out_x, out_y = euler_sample(velocity, [x, y], sigmas)
    assert calls == [1.0, 0.5]
    torch.testing.assert_close(out_x, torch.full((2, 3), -2.0))  # x - 2 * (1 - 0)
    torch.testing.assert_close(out_y, torch.full((2, 3), 2.25))  # y * 1.5 * 1.5
    assert out_y.dtype == torch.float32  # the update runs in float32 whatever the velocity's dtype
