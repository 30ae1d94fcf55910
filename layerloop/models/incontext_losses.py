"""Training losses of the in-context LoRA, as a mixin of ``InContextLoRA`` (``models/incontext.py``).

Flow matching (as FLUX): ``x_t = (1 - t) x0 + t * noise``, the transformer predicts ``v = noise - x0``,
and the one-step clean estimate is ``x0_hat = x_t - t * v``. The supervised losses are computed on the
tokens a task generates; the given panels are reproduced from the conditioning, which the Fill base already
does.

The cycle term (the Cycle-Consistent Tuning paper's: compose(decompose(C)) = C, decompose(compose(F, B)) =
(F, B)) chains two one-step x0 estimates, so training never runs a sampler, and never shows the cycle the
ground truth it is compared with or the ground truth of the panels it generates (see ``cycle_loss``).

The mixin relies on the model's ``one_step``, ``panel_tokens``, ``empty_panel``, ``constant_latents``,
``pack``, ``config``, ``prediction`` and ``device``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from layerloop.models.incontext_base import flow_error
from layerloop.models.incontext_canvas import COMPOSE, DECOMPOSE, DIRECTIONS, GENERATED, PANELS, LatentCanvas

# (first direction, second direction, loss name) of the two cycles.
CYCLES = ((DECOMPOSE, COMPOSE, "cycle_decompose_compose"), (COMPOSE, DECOMPOSE, "cycle_compose_decompose"))
# Region-restricted tasks (``region_margin``, ``restricted_given``): what each generated panel shows outside
# the painted tokens (a given panel, or a constant panel of an empty layer), and the given panel its painted
# tokens start from.
KNOWN_OUTSIDE = {"layer": "matte", "alpha": "transparent", "background": "composite", "composite": "background"}
FIRST_GUESS = {"layer": "composite", "background": "composite", "composite": "background"}
# ``decompose_loss: log_mse``: the outputs whose errors are logged apart (the layer with its matte; the clean
# object), and the floor added to each MSE before the log (latent units squared; 1e-5 to 1e-3 measured alike).
DECOMPOSE_OUTPUTS = (("layer", "alpha"), ("background",))
LOG_MSE_EPS = 1e-4
# Noise level of both cycle passes: pure noise, where the sampler starts (see ``cycle_loss``).
CYCLE_T = 1.0


class InContextLosses:
    """Supervised and cycle losses, timestep sampling and the full training loss of one step."""

    def supervised_loss(self, batch: LatentCanvas, direction: str, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE ``|v - (noise - x0)|^2`` on the tokens ``direction`` generates (the MSE of x0 for a
        base that predicts x0: ``incontext_base.flow_error``)."""
        v, _ = self.one_step(direction, batch.x0, batch.x0, batch.region, batch.captions, t, noise,
                             batch.height, batch.width)
        error = flow_error(v, noise, batch.x0, t, self.prediction)
        if direction == DECOMPOSE and self.config.decompose_loss == "log_mse":
            return self.log_mse(error, batch)
        if self.restricted:  # per-sample token sets: the mean over the tokens each sample generates
            tokens = self.fill_tokens(direction, batch.region, batch.height, batch.width)
            return _masked_mean(error.pow(2), tokens)
        tokens = self.panel_tokens(GENERATED[direction], batch.height, batch.width)
        return error[:, tokens].pow(2).mean()

    def log_mse(self, error: torch.Tensor, batch: LatentCanvas) -> torch.Tensor:
        """``decompose_loss: log_mse``: the mean over samples and over their two outputs (the layer with its
        matte, the clean object) of ``log(MSE + LOG_MSE_EPS)``, each MSE over that output's generated tokens
        of that sample. The plain MSE pools every token of the batch, so the samples whose errors are large
        decide the gradient; held-out PSNR is a mean of logs per image, where a faint logo's object, which
        the copy of the input gets within a few 1/255, weighs as much as a bold one. The log weighs each
        sample's error relative to its own size, as that mean does."""
        per_token = error.pow(2).mean(dim=-1)  # B x L
        generated = self.fill_tokens(DECOMPOSE, batch.region, batch.height, batch.width)
        logs = []
        for panels in DECOMPOSE_OUTPUTS:
            tokens = generated & self.panel_tokens(panels, batch.height, batch.width)[None]
            count = tokens.sum(dim=1)
            mse = (per_token * tokens).sum(dim=1) / count.clamp_min(1)
            logs.append(torch.log(mse[count > 0] + LOG_MSE_EPS))
        return torch.cat(logs).mean()

    def given_only(self, direction: str, canvas: torch.Tensor, height: int, width: int,
                   region: torch.Tensor | None = None) -> torch.Tensor:
        """``canvas`` as the conditioning of ``direction`` shows it: a tensor that holds nothing of the panels
        the task generates, the given ones intact. Whole panels (the default): the generated panels are the
        empty panel (what Fill puts there). Region-restricted (``region_margin`` set): ``restricted_given``."""
        b = canvas.shape[0]
        empty = self.pack(self.empty_panel(height, width).repeat(1, 1, 1, len(PANELS))).expand(b, -1, -1)
        if self.restricted:
            if region is None:
                raise ValueError("region_margin is set: given_only needs the region masks")
            return self.restricted_given(direction, canvas, empty.to(canvas.dtype), region, height, width)
        generated = self.panel_tokens(GENERATED[direction], height, width)[None, :, None]
        return torch.where(generated, empty.to(canvas.dtype), canvas)

    def restricted_given(self, direction: str, canvas: torch.Tensor, empty: torch.Tensor, region: torch.Tensor,
                         height: int, width: int) -> torch.Tensor:
        """The conditioning of a region-restricted task, built from its given panels alone, so nothing of what
        it generates leaks in, and the same in training and inference:

        * outside the painted tokens (``fill_tokens``), each generated panel shows what a layer leaves
          unchanged there (``KNOWN_OUTSIDE``): the composite in the clean-object panel, an empty layer (matte
          colour, alpha 0), the clean object in the composite panel;
        * on the painted tokens, a first guess (``FIRST_GUESS``) at the same position: the composite for the
          clean object and the layer's colour, the clean object for the composite; the alpha panel is empty.
        The mask channel still says "paint" there, so the model edits the guess rather than copying it."""
        b, length, channels = canvas.shape
        step = 2 * self.vae_scale
        rows, columns = height // step, width // step
        panels = canvas.view(b, rows, len(PANELS), columns, channels)
        known = canvas.view(b, rows, len(PANELS), columns, channels).clone()
        guess = empty.reshape(b, rows, len(PANELS), columns, channels).clone()
        for name in GENERATED[direction]:
            i = PANELS.index(name)
            outside = KNOWN_OUTSIDE[name]
            if outside in PANELS:
                known[:, :, i] = panels[:, :, PANELS.index(outside)]
            else:
                known[:, :, i] = self.constant_panel(outside, height, width).to(canvas.dtype)
            if name in FIRST_GUESS:
                guess[:, :, i] = panels[:, :, PANELS.index(FIRST_GUESS[name])]
        painted = self.fill_tokens(direction, region, height, width)[:, :, None]
        return torch.where(painted, guess.reshape(b, length, channels), known.reshape(b, length, channels))

    def constant_panel(self, name: str, height: int, width: int) -> torch.Tensor:
        """Packed tokens (rows x columns x 4c) of an empty layer's panels: ``matte`` colour or alpha 0."""
        value = {"matte": self.config.matte, "transparent": 0}[name] / 127.5 - 1.0
        step = 2 * self.vae_scale
        return self.pack(self.constant_latents(value, height, width)).view(height // step, width // step, -1)

    def cycle_loss(self, batch: LatentCanvas, noise1: Mapping[str, torch.Tensor] | torch.Tensor,
                   noise2: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Both cycle terms, L1 in latent space on the panels the cycle returns to:

        * ``cycle_decompose_compose``: decompose the true composite C (given panel) into (F', B') (one-step
          estimate), give (F', B') to compose, and compare its one-step composite C'' with C;
        * ``cycle_compose_decompose``: compose the true (F, B) into C', decompose C', and compare the
          estimated (F'', B'') with (F, B).

        ``noise1`` / ``noise2`` are the noise of the first / second passes (one tensor for both cycles or
        one per first direction, shaped like ``batch.x0``).

        **No ground truth enters a pass it could leak into.** Each pass is the sampler's very first step: the
        noisy input is pure noise (t = ``CYCLE_T`` = 1) on the whole canvas, and the conditioning holds only
        that pass's given panels (its generated panels are emptied, in the tensor passed in as well). So the
        first pass sees the first direction's given panels (C, or F and B) and noise, never the panels it
        generates; its x0 estimate ``noise - v`` becomes the given panels of the second pass, whose noisy
        input is again pure noise, so the panels the cycle is compared with (the first pass's input) reach
        it only through the first pass's estimate. Why t = 1 rather than noise at a sampled t: the previous
        version noised the true target panels at t, which at small t hands the estimate the answer; dropping
        the target term (``x_t = t * noise`` for t < 1) would feed the network inputs of a noise scale it is
        never trained or sampled at, so its estimate would mean nothing; t = 1 is exactly what inference
        starts from, where the estimate is the model's prediction of the panels from the given ones alone.
        Its price: a one-step estimate from pure noise is the conditional mean, smooth where the answer is
        uncertain; the cycle constrains that mean, and the supervised terms cover every t.

        **Gradients flow through both passes** into the one LoRA, as in the paper (the cycle trains the
        first direction through the second, which is how composition's determinism constrains
        decomposition). The chain is two network calls and two differences (``x0_hat = noise - v``): no
        division or exponent, and L1 gives bounded gradients per element, so the term stays finite wherever
        the supervised terms do.
        """
        h, w = batch.height, batch.width
        noise1, noise2 = _per_direction(noise1), _per_direction(noise2)
        t = torch.full((batch.x0.shape[0],), CYCLE_T, device=batch.x0.device)
        terms = {}
        for first, second, name in CYCLES:
            given = self.given_only(first, batch.x0, h, w, batch.region)
            _, x0_hat1 = self.one_step(first, given, given, batch.region, batch.captions, t, noise1[first], h, w)
            # the first pass's estimates are the second pass's given panels; what it generates is emptied
            painted = self.fill_tokens(first, batch.region, h, w)[:, :, None]
            canvas = self.given_only(second, torch.where(painted, x0_hat1, given), h, w, batch.region)
            _, x0_hat2 = self.one_step(second, canvas, canvas, batch.region, batch.captions, t, noise2[first], h, w)
            if self.restricted:  # the tokens the second pass paints: the first pass's given ones in the region
                returned = self.fill_tokens(second, batch.region, h, w)
                terms[name] = _masked_mean((x0_hat2 - batch.x0).abs(), returned)
            else:
                returned = self.panel_tokens(GENERATED[second], h, w)  # = the first pass's given panels
                terms[name] = (x0_hat2 - batch.x0)[:, returned].abs().mean()
        return terms

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal t in (0, 1): most weight at mid noise, where the tasks are decided."""
        normal = torch.randn(batch_size, generator=generator) * self.config.timestep_std + self.config.timestep_mean
        return torch.sigmoid(normal).to(self.device)

    def training_loss(self, batch: LatentCanvas, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All terms of one training step and their sum ``loss``: supervised decompose and compose, plus
        ``cycle_weight`` x both cycle terms (``cycle_loss``). Each direction draws its own t and noise; the
        cycle draws its own noise afterwards (first passes, then second passes, decompose->compose first), so
        the supervised terms do not depend on whether the cycle is on. Noise and timesteps come from
        ``generator`` (CPU) for exact resume."""
        b = batch.x0.shape[0]
        draw = lambda: torch.randn(batch.x0.shape, generator=generator).to(self.device)  # noqa: E731
        terms: dict[str, torch.Tensor] = {}
        for direction in DIRECTIONS:
            t, noise = self.sample_timesteps(b, generator), draw()
            terms[direction] = self.supervised_loss(batch, direction, t, noise)
        loss = terms[DECOMPOSE] + terms[COMPOSE]
        if self.config.cycle_weight > 0:
            noise1 = {first: draw() for first, _, _ in CYCLES}
            noise2 = {first: draw() for first, _, _ in CYCLES}
            terms.update(self.cycle_loss(batch, noise1, noise2))
            cycle = terms["cycle_decompose_compose"] + terms["cycle_compose_decompose"]
            loss = loss + self.config.cycle_weight * cycle
        terms["loss"] = loss
        return terms


def _masked_mean(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of B x L x C ``values`` over the tokens selected by the boolean B x L ``tokens``."""
    weights = tokens.to(values.dtype)[:, :, None]
    return (values * weights).sum() / (weights.sum() * values.shape[-1]).clamp_min(1.0)


def _per_direction(noise: Mapping[str, torch.Tensor] | torch.Tensor) -> Mapping[str, torch.Tensor]:
    """One noise tensor per cycle (keyed by its first direction); a single tensor serves both."""
    if isinstance(noise, torch.Tensor):
        return {DECOMPOSE: noise, COMPOSE: noise}
    return noise
