"""Training losses of the in-context LoRA, as a mixin of ``InContextLoRA`` (``models/incontext.py``).

Flow matching (as FLUX): ``x_t = (1 - t) x0 + t * noise``, the transformer predicts ``v = noise - x0``,
and the one-step clean estimate is ``x0_hat = x_t - t * v``. Losses are computed on the tokens a task
generates; the given panels are reproduced from the conditioning, which the Fill base already does. The
cycle term chains two one-step estimates at independent timesteps (decompose then compose must give back
the composite, compose then decompose the layer and object), so training never runs a sampler.

The mixin relies on the model's ``one_step``, ``panel_tokens``, ``config`` and ``device``.
"""

from __future__ import annotations

import torch

from layerloop.models.incontext_canvas import COMPOSE, DECOMPOSE, DIRECTIONS, GENERATED, LatentCanvas


class InContextLosses:
    """Supervised and cycle losses, timestep sampling and the full training loss of one step."""

    def supervised_loss(self, batch: LatentCanvas, direction: str, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE ``|v - (noise - x0)|^2`` on the tokens ``direction`` generates."""
        return self._supervised(batch, direction, t, noise)[0]

    def _supervised(self, batch: LatentCanvas, direction: str, t: torch.Tensor,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, x0_hat = self.one_step(direction, batch.x0, batch.x0, batch.region, batch.captions, t, noise,
                                  batch.height, batch.width)
        tokens = self.panel_tokens(GENERATED[direction], batch.height, batch.width)
        loss = (v - (noise - batch.x0))[:, tokens].pow(2).mean()
        return loss, x0_hat

    def cycle_loss(self, batch: LatentCanvas, t1: torch.Tensor, t2: torch.Tensor, noise1: torch.Tensor,
                   noise2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both cycle terms from scratch: the first pass of each direction at ``t1`` / ``noise1``, the
        second at ``t2`` / ``noise2``. ``training_loss`` shares the first passes with the supervised
        terms instead."""
        first = {d: self._supervised(batch, d, t1, noise1)[1] for d in DIRECTIONS}
        return self._cycle(batch, first, t2, noise2)

    def _cycle(self, batch: LatentCanvas, x0_hat: dict[str, torch.Tensor], t2: torch.Tensor,
               noise2: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        """L1 in latent space. decompose->compose: the estimated layer and object replace the true ones
        (as conditioning and as the given part of the noisy canvas) and the composite must come back;
        compose->decompose: the estimated composite replaces the true one and the layer and object must
        come back. Gradients flow through both passes into the one LoRA."""
        h, w = batch.height, batch.width
        if isinstance(noise2, torch.Tensor):
            noise2 = {DECOMPOSE: noise2, COMPOSE: noise2}
        terms = {}
        for first, second, name in ((DECOMPOSE, COMPOSE, "cycle_decompose_compose"),
                                    (COMPOSE, DECOMPOSE, "cycle_compose_decompose")):
            estimated = self.panel_tokens(GENERATED[first], h, w)[None, :, None]
            canvas = torch.where(estimated, x0_hat[first], batch.x0)
            _, x0_hat2 = self.one_step(second, canvas, canvas, batch.region, batch.captions, t2,
                                       noise2[second], h, w)
            target = self.panel_tokens(GENERATED[second], h, w)
            terms[name] = (x0_hat2 - batch.x0)[:, target].abs().mean()
        return terms

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal t in (0, 1): most weight at mid noise, where the tasks are decided."""
        normal = torch.randn(batch_size, generator=generator) * self.config.timestep_std + self.config.timestep_mean
        return torch.sigmoid(normal).to(self.device)

    def training_loss(self, batch: LatentCanvas, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All terms of one training step and their sum ``loss``: supervised decompose and compose, plus
        ``cycle_weight`` x both cycle terms. Each direction draws its own t and noise; the cycle's second
        passes draw independent ones. Noise and timesteps come from ``generator`` (CPU) for exact resume."""
        b = batch.x0.shape[0]
        draw = lambda: torch.randn(batch.x0.shape, generator=generator).to(self.device)  # noqa: E731
        terms: dict[str, torch.Tensor] = {}
        first = {}
        for direction in DIRECTIONS:
            t, noise = self.sample_timesteps(b, generator), draw()
            terms[direction], first[direction] = self._supervised(batch, direction, t, noise)
        loss = terms[DECOMPOSE] + terms[COMPOSE]
        if self.config.cycle_weight > 0:
            t2 = self.sample_timesteps(b, generator)
            terms.update(self._cycle(batch, first, t2, {DECOMPOSE: draw(), COMPOSE: draw()}))
            cycle = terms["cycle_decompose_compose"] + terms["cycle_compose_decompose"]
            loss = loss + self.config.cycle_weight * cycle
        terms["loss"] = loss
        return terms
