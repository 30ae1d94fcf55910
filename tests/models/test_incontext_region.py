"""Region-restricted in-context decomposition (``region_margin``): what is painted, what the conditioning
shows, that nothing of the answer leaks in, what inference pastes back, and that whole-panel LoRAs are
unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerloop.datasets.logos import logo_samples
from layerloop.models.incontext import (
    COMPOSE, DECOMPOSE, GENERATED, MATTE, PANELS, CanvasBatch, InContextLoRA, LatentCanvas,
)
from layerloop.models.incontext_pipeline import load_model
from layerloop.samples import LayeredSample

H = W = 16
TOKEN = 4  # pixels per token side of the tiny models (VAE scale 2 x 2x2 packing)


def logo_batch(n: int = 2, size: int = H) -> list[LayeredSample]:
    """Rendered logo samples (C is not an alpha blend) rendered at 64 px and box-averaged to tiny panels."""
    return list(logo_samples(n, seed=0, size=64, output_size=size))


def perturb_lora(model: InContextLoRA, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def point_region(row: int, column: int) -> torch.Tensor:
    region = torch.zeros(1, H, W)
    region[0, row, column] = 1
    return region


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """B x L -> B x rows x panels x columns."""
    return tokens.view(tokens.shape[0], H // TOKEN, len(PANELS), W // TOKEN)


@pytest.mark.parametrize("margin, rows, columns", [(0, [1], [1]), (1, [1], [1]), (2, [0, 1], [0, 1])])
def test_fill_tokens_are_the_dilated_region_in_the_generated_panels(margin, rows, columns):
    model = InContextLoRA.tiny(seed=0, region_margin=margin)
    region = point_region(5, 5)  # pixel (5, 5): token (1, 1); a margin of 2 reaches pixels 3..7
    for direction in (DECOMPOSE, COMPOSE):
        grid = token_grid(model.fill_tokens(direction, region, H, W))[0]
        for i, name in enumerate(PANELS):
            expected = torch.zeros(H // TOKEN, W // TOKEN, dtype=torch.bool)
            if name in GENERATED[direction]:
                expected[np.ix_(rows, columns)] = True
            assert torch.equal(grid[:, i], expected), (direction, name)
        pixels = model.fill_pixels(direction, region, H, W)[0]
        assert pixels.shape == (H, len(PANELS) * W)
        assert torch.equal(pixels[::TOKEN, ::TOKEN].bool(), grid.reshape(H // TOKEN, -1))
    whole = InContextLoRA.tiny(seed=0)  # no margin: whole panels, whatever the region
    assert torch.equal(whole.fill_tokens(DECOMPOSE, region, H, W)[0], whole.panel_tokens(GENERATED[DECOMPOSE], H, W))


def _replaced(model: InContextLoRA, batch: LatentCanvas, names, seed: int = 7) -> LatentCanvas:
    other = 3.0 * torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(seed))
    tokens = model.panel_tokens(names, batch.height, batch.width)
    x0 = batch.x0.clone()
    x0[:, tokens] = other[:, tokens]
    return LatentCanvas(x0, batch.region, batch.captions, batch.height, batch.width)


def test_restricted_conditioning_shows_the_given_panels_only():
    """Outside the painted tokens the clean object shows the composite and the layer is empty (matte colour,
    alpha 0); on them the object and the layer's colour start from the composite and the alpha is Fill's
    empty panel; compose shows the clean object in the composite panel. Replacing what a task generates
    does not change its conditioning at all."""
    model = InContextLoRA.tiny(seed=0, vae="s2d", region_margin=1)
    samples = logo_batch()
    batch = model.encode(CanvasBatch.from_samples(samples))
    for direction in (DECOMPOSE, COMPOSE):
        given = model.given_only(direction, batch.x0, H, W, batch.region)
        assert torch.equal(given, model.given_only(direction, _replaced(model, batch, GENERATED[direction]).x0, H, W,
                                                   batch.region))
        kept = ~model.panel_tokens(GENERATED[direction], H, W)
        assert torch.equal(given[:, kept], batch.x0[:, kept])  # the given panels, intact
    # in pixels (the space-to-depth VAE is exact): decode the decomposition's conditioning
    given = model.given_only(DECOMPOSE, batch.x0, H, W, batch.region)
    pixels = torch.cat([model.decode_panel(p) for p in model.unpack(given, H, W).chunk(len(PANELS), dim=3)], dim=3)
    canvas = np.rint((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)
    painted = model.fill_pixels(DECOMPOSE, batch.region, H, W).numpy() > 0
    for sample, image, paint in zip(samples, canvas, painted):
        panels = {name: image[:, i * W:(i + 1) * W] for i, name in enumerate(PANELS)}
        paint = {name: paint[:, i * W:(i + 1) * W] for i, name in enumerate(PANELS)}
        assert np.array_equal(panels["background"], sample.composite)  # outside: known; inside: the guess
        assert np.array_equal(panels["layer"][paint["layer"]], sample.composite[paint["layer"]])
        assert (panels["layer"][~paint["layer"]] == MATTE).all() and (panels["alpha"][~paint["alpha"]] == 0).all()
        assert (panels["alpha"][paint["alpha"]] == 128).all()  # Fill's empty (zeroed) pixels: mid grey
        assert paint["background"].any() and not paint["background"].all()


def test_restricted_cycle_never_sees_the_ground_truth_of_what_it_generates():
    model = InContextLoRA.tiny(seed=0, region_margin=1)
    perturb_lora(model)
    batch = model.encode(CanvasBatch.from_samples(logo_batch()))

    def terms(b):
        with torch.no_grad():
            return model.training_loss(b, torch.Generator().manual_seed(3))

    base = terms(batch)
    new_layers = terms(_replaced(model, batch, GENERATED[DECOMPOSE]))
    new_composite = terms(_replaced(model, batch, GENERATED[COMPOSE]))
    assert torch.equal(new_layers["cycle_decompose_compose"], base["cycle_decompose_compose"])
    assert torch.equal(new_composite["cycle_compose_decompose"], base["cycle_compose_decompose"])
    assert not torch.allclose(new_composite["cycle_decompose_compose"], base["cycle_decompose_compose"])
    assert not torch.allclose(new_layers["cycle_compose_decompose"], base["cycle_compose_decompose"])
    assert not torch.allclose(new_layers["decompose"], base["decompose"])
    assert all(torch.isfinite(v) for v in base.values())


def test_restricted_decomposition_pastes_the_known_pixels_back():
    model = InContextLoRA.tiny(seed=0, region_margin=1)
    perturb_lora(model)
    sample = logo_batch(1)[0]
    result = model.decompose(sample.composite, sample.mask, sample.caption, steps=3, seed=0)
    painted = model.fill_pixels(DECOMPOSE, torch.from_numpy(sample.mask > 0)[None], H, W)[0].numpy() > 0
    outside = ~painted[:, -W:]  # the object panel's painted pixels (the same in every generated panel)
    assert outside.any() and (~outside).any()
    assert np.array_equal(result.background[outside], sample.composite[outside])
    assert not result.layer[outside, 3].any() and (result.layer[outside, :3] == MATTE).all()
    assert not np.array_equal(result.background, sample.composite)  # the region was painted
    recomposed = model.compose(result.layer, result.background, sample.mask, sample.caption, steps=3, seed=1)
    assert np.array_equal(recomposed[outside], result.background[outside])
    whole = InContextLoRA.tiny(seed=0)
    perturb_lora(whole)
    other = whole.decompose(sample.composite, sample.mask, sample.caption, steps=3, seed=0)
    assert not np.array_equal(other.background[outside], sample.composite[outside])  # whole panels: all painted


def test_options_are_recorded_and_whole_panel_checkpoints_are_unchanged(tmp_path):
    whole = InContextLoRA.tiny(seed=0)
    assert "region_margin" not in whole.config.to_json()  # lora.json as before the option
    model = InContextLoRA.tiny(seed=0, region_margin=2)
    perturb_lora(model)
    model.save_lora(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "lora.json").read_text())["config"]
    assert saved["region_margin"] == 2
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.region_margin == 2 and loaded.restricted
    with pytest.raises(ValueError, match="needs the region masks"):
        model.given_only(DECOMPOSE, torch.zeros(1, 64, 16), H, W)


def test_log_mse_decompose_loss_is_the_mean_log_of_each_samples_output_errors(tmp_path):
    """``decompose_loss: log_mse``: per sample, the MSE of the layer (with its matte) and of the clean object
    over the tokens it paints, each logged; the loss is their mean. Recorded in lora.json only when set."""
    from layerloop.models.incontext_losses import LOG_MSE_EPS

    model = InContextLoRA.tiny(seed=0, vae="s2d", region_margin=1, decompose_loss="log_mse")
    batch = model.encode(CanvasBatch.from_samples(logo_batch(2)))
    generator = torch.Generator().manual_seed(0)
    error = torch.randn(batch.x0.shape, generator=generator)
    error[1] *= 10.0  # the second sample's errors are 100 times larger in MSE
    painted = model.fill_tokens(DECOMPOSE, batch.region, H, W)
    expected = []
    for panels in (("layer", "alpha"), ("background",)):
        for i in range(2):
            tokens = painted[i] & model.panel_tokens(panels, H, W)
            expected.append(torch.log(error[i][tokens].pow(2).mean() + LOG_MSE_EPS))
    assert torch.allclose(model.log_mse(error, batch), torch.stack(expected).mean())
    # each sample's share of the gradient is relative to its own error: the large one does not dominate
    error.requires_grad_(True)
    model.log_mse(error, batch).backward()
    small, large = error.grad[0].abs().sum(), error.grad[1].abs().sum()
    assert 0.05 < float(large / small) < 0.2  # ~1/10: d log(mse)/d e = 2e / (n mse)

    # it is the decompose term of training_loss (and only that: compose keeps the MSE)
    calls = []
    original = model.log_mse
    model.log_mse = lambda e, b: calls.append(original(e, b)) or calls[-1]
    terms = model.training_loss(batch, torch.Generator().manual_seed(1))
    assert len(calls) == 1 and terms["decompose"] is calls[0]
    plain_terms = InContextLoRA.tiny(seed=0, vae="s2d", region_margin=1).training_loss(
        batch, torch.Generator().manual_seed(1))
    assert torch.allclose(terms["compose"], plain_terms["compose"])
    del model.log_mse
    plain = InContextLoRA.tiny(seed=0, vae="s2d", region_margin=1)
    assert "decompose_loss" not in plain.config.to_json()
    model.save_lora(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "lora.json").read_text())["config"]["decompose_loss"] == "log_mse"
    assert load_model(tmp_path / "ckpt").config.decompose_loss == "log_mse"
    with pytest.raises(ValueError, match="decompose_loss 'l1' is not one of mse, log_mse"):
        InContextLoRA.tiny(seed=0, decompose_loss="l1")
