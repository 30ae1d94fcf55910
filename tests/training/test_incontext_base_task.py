"""Pretraining a tiny in-context base as a Fill inpainter (issue 14) on the generic loop, and LoRAs on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from layerloop.datasets.logos import logo_samples
from layerloop.datasets.shards import ShardWriter
from layerloop.models import incontext_base
from layerloop.models.space_to_depth import SpaceToDepthAutoencoder
from layerloop.training import load_train_config, run_training
from layerloop.training.incontext_base_task import InContextBaseTask, sample_boxes
from layerloop.training.incontext_task import load_model
from layerloop.training.loop import build_task

SMALL = {"resolution": 16, "layers": 1, "single_layers": 1, "heads": 2, "head_dim": 16}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("incontext-base") / "logos"
    root.mkdir()
    samples = list(logo_samples(6, seed=0, size=64))
    writer = ShardWriter(root, "logos")
    writer.write(0, samples[:3])
    writer.write(1, samples[3:])
    return root


@pytest.fixture(scope="module")
def batch():
    return list(logo_samples(2, seed=1, size=64))


def _cfg(data, steps=2, model="tiny:s2d", family="incontext-base", **task):
    return load_train_config({
        "family": family, "model": str(model), "steps": steps, "lr": 1e-3, "batch_size": 2, "seed": 3,
        "checkpoint_every": 2, "shuffle_buffer": 8, "data": [{"name": "logos", "run_dir": str(data)}],
        "task": {**SMALL, **task} if family == "incontext-base" else {"resolution": 16, **task},
    })


def _task(data, **task) -> InContextBaseTask:
    t = InContextBaseTask(_cfg(data, **task))
    t.setup(torch.device("cpu"))
    return t


def _base_and_lora(shards, tmp_path, **option):
    """A base pretrained 2 steps with one task option (recorded in its model_index.json) and a LoRA on it."""
    run_training(_cfg(shards, steps=2, **option), tmp_path / "base")
    base = tmp_path / "base" / "final"
    [(key, value)] = option.items()
    assert json.loads((base / "model_index.json").read_text())[key] == value
    lora = run_training(_cfg(shards, steps=2, model=base, family="incontext", region_margin=1), tmp_path / "lora")
    return base, load_model(lora["final"])


def _small_input(sample, size: int = 16):
    """The sample's composite at ``size`` px and a square region in its middle."""
    from PIL import Image

    composite = np.asarray(Image.fromarray(sample.composite).resize((size, size)))
    region = np.zeros((size, size), np.uint8)
    region[size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    return composite, region


def test_registry_builds_the_task_and_validates_its_section(shards, tmp_path):
    assert isinstance(build_task(_cfg(shards)), InContextBaseTask)
    with pytest.raises(ValueError, match="multiple of 4"):
        InContextBaseTask(_cfg(shards, resolution=18))
    with pytest.raises(ValueError, match="pretrains a tiny base"):
        InContextBaseTask(_cfg(shards, model="black-forest-labs/FLUX.1-Fill-dev"))
    with pytest.raises(ValueError, match="pretrains a tiny base"):
        InContextBaseTask(_cfg(shards, model=tmp_path))
    with pytest.raises(ValueError, match="unknown_key"):
        InContextBaseTask(_cfg(shards, unknown_key=1))
    with pytest.raises(ValueError, match="pairs"):
        InContextBaseTask(_cfg(shards, kinds=["pair"]))
    cfg = _cfg(shards).model_copy(update={"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="float32"):
        InContextBaseTask(cfg)


def test_boxes_lie_on_the_canvas_and_are_at_least_min_box():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = sample_boxes(8, 32, 8, 3, 0.25, generator)
        assert mask.shape == (8, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 2 * 2 <= mask.sum() <= 3 * 8 * 8  # at least one 2 x 2 box, at most three whole panels
    a = sample_boxes(8, 32, 8, 3, 0.25, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_boxes(8, 32, 8, 3, 0.25, torch.Generator().manual_seed(5)))


def test_trains_the_whole_transformer_and_nothing_else(shards, batch):
    task = _task(shards)
    assert isinstance(task.model.vae, SpaceToDepthAutoencoder)
    loss, logs = task.loss(batch, 0, torch.Generator().manual_seed(0))
    assert 0 < logs["mask_fraction"] < 1 and torch.isfinite(loss)
    assert torch.allclose(loss.detach(), logs["masked"] + 0.1 * logs["unmasked"])
    loss.backward()
    params = task.trainable_parameters()
    assert params == list(task.model.transformer.parameters())
    assert all(p.grad is not None for p in params if p.requires_grad)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0
    for module in task.frozen_modules().values():
        assert not any(p.requires_grad for p in module.parameters())


def test_loss_falls_when_overfitting_a_fixed_batch(shards, batch):
    task = _task(shards)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss, _ = task.loss(batch, 0, torch.Generator().manual_seed(0))  # same noise, t and boxes each time
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_stop_resume_base_folder_and_a_lora_on_it(shards, tmp_path):
    full = run_training(_cfg(shards, steps=4), tmp_path / "full")
    run_training(_cfg(shards, steps=4), tmp_path / "split", stop_at=2)
    split = run_training(_cfg(shards, steps=4), tmp_path / "split")
    assert split["resumed_from"] == 2
    weights = incontext_base.TRANSFORMER_WEIGHTS
    a, b = load_file(str(tmp_path / "full/final" / weights)), load_file(str(tmp_path / "split/final" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base = tmp_path / "full" / "final"
    assert incontext_base.is_base_folder(base)
    assert full["checkpoint_hash"] == incontext_base.base_hash(base)
    assert json.loads((base / "model_index.json").read_text())["info"]["trained_from"] == "tiny:s2d"

    # an in-context LoRA on the pretrained base: small-model defaults, the base pinned by its hash
    lora = run_training(_cfg(shards, steps=2, model=base, family="incontext"), tmp_path / "lora")
    info = json.loads((tmp_path / "lora/final/incontext_task.json").read_text())
    assert info["model"] == str(base.resolve()) and info["base_hash"] == full["checkpoint_hash"]
    model = load_model(lora["final"])
    assert model.config.rank == 4 and isinstance(model.vae, SpaceToDepthAutoencoder)
    assert all(torch.equal(a[k], model.transformer.state_dict()[k.replace("attn.to_q.", "attn.to_q.base_layer.")])
               for k in a if k.startswith("transformer_blocks.0.attn.to_q."))

    # a base retrained in place is refused by the LoRA trained on the old one
    changed = {k: v + 0.01 if k.endswith("weight") else v for k, v in a.items()}
    save_file(changed, str(base / weights))
    with pytest.raises(ValueError, match="retrained"):
        load_model(lora["final"])


def test_to_velocity_and_flow_error_for_each_prediction():
    g = torch.Generator().manual_seed(0)
    x0, noise, given, out = (torch.randn(2, 5, 3, generator=g) for _ in range(4))
    t = torch.tensor([0.25, 1.0])
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    assert torch.equal(incontext_base.to_velocity(out, x_t, given, t, "velocity"), out)
    for prediction, x0_hat in (("sample", out), ("residual", out + given)):
        v = incontext_base.to_velocity(out, x_t, given, t, prediction)
        # one Euler step from t to 0 lands on the predicted x0, and the x0 error is the loss
        assert torch.allclose(x_t - t.view(-1, 1, 1) * v, x0_hat, atol=1e-6)
        error = incontext_base.flow_error(v, noise, x0, t, prediction)
        assert torch.allclose(error.abs(), (x0_hat - x0).abs(), atol=1e-5)
    # residual: an output of 0 is the given image itself (a task that changes nothing)
    v = incontext_base.to_velocity(torch.zeros_like(out), x_t, given, t, "residual")
    assert torch.allclose(x_t - t.view(-1, 1, 1) * v, given, atol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        incontext_base.to_velocity(out, x_t, given, t, "epsilon")


def test_a_residual_base_records_its_prediction_and_a_lora_on_it_uses_it(shards, batch, tmp_path):
    task = _task(shards, prediction="residual")
    assert task.model.prediction == "residual"
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = task.loss(batch, 0, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]

    base, model = _base_and_lora(shards, tmp_path, prediction="residual")
    assert incontext_base.base_prediction(base) == "residual"
    assert model.prediction == "residual"
    # with the transformer's output zeroed, decomposing returns the given panels: in the region the first
    # guess (the composite for the clean object), outside it what is pasted back (the composite again)
    with torch.no_grad():
        model.transformer.proj_out.weight.zero_()
        model.transformer.proj_out.bias.zero_()
    composite, region = _small_input(batch[0])
    decomposed = model.decompose(composite, region, "", steps=4, seed=0)
    assert np.abs(decomposed.background.astype(int) - composite.astype(int)).max() <= 1
    # continuing a residual base with another prediction is refused; unset continues it
    with pytest.raises(ValueError, match="trained with 'residual'"):
        InContextBaseTask(_cfg(shards, model=base, prediction="velocity")).setup(torch.device("cpu"))
    velocity_base = tmp_path / "vbase"
    run_training(_cfg(shards, steps=2), velocity_base)
    assert "prediction" not in json.loads((velocity_base / "final" / "model_index.json").read_text())


def test_canvas_ids_place_the_panels_on_one_wide_image_or_each_on_its_own_index():
    rows, columns = 3, 8  # four panels of 3 x 2 tokens
    canvas = incontext_base.canvas_ids(rows, columns, 4, "canvas").reshape(rows, columns, 3)
    assert torch.equal(canvas[..., 0], torch.zeros(rows, columns))  # FLUX's layout of one image
    assert torch.equal(canvas[..., 1], torch.arange(rows).float()[:, None].expand(rows, columns))
    assert torch.equal(canvas[..., 2], torch.arange(columns).float()[None, :].expand(rows, columns))
    panels = incontext_base.canvas_ids(rows, columns, 4, "panels").reshape(rows, columns, 3)
    for k in range(4):  # panel k: index k, rows and columns from 0 within the panel
        block = panels[:, 2 * k:2 * k + 2]
        assert torch.equal(block[..., 0], torch.full((rows, 2), float(k)))
        assert torch.equal(block[..., 1:], panels[:, 0:2, 1:])
    assert torch.equal(panels[..., 1], canvas[..., 1])
    with pytest.raises(ValueError, match="not one of"):
        incontext_base.canvas_ids(rows, columns, 4, "grid")
    with pytest.raises(ValueError, match="do not split"):
        incontext_base.canvas_ids(rows, 6, 4, "panels")


def test_a_base_with_panel_positions_records_them_and_a_lora_on_it_feeds_them(shards, batch, tmp_path, monkeypatch):
    task = _task(shards, positions="panels")
    assert task.model.positions == "panels"
    rows, columns = 4, 16  # SMALL: 16 px panels, tokens of 4 x 4 pixels (space-to-depth 2, 2 x 2 packing)
    assert torch.equal(task.model.image_ids(rows, columns), incontext_base.canvas_ids(rows, columns, 4, "panels"))
    base, model = _base_and_lora(shards, tmp_path, positions="panels")
    assert incontext_base.base_positions(base) == "panels"
    assert model.positions == "panels"
    # the transformer gets the panel positions, and they change its output (the base was trained with them)
    seen = []
    forward = model.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["img_ids"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.transformer, "forward", spy)
    composite, region = _small_input(batch[0])
    first = model.decompose(composite, region, "", steps=1, seed=0)
    assert seen and all(torch.equal(ids, incontext_base.canvas_ids(rows, columns, 4, "panels")) for ids in seen)
    model.positions = "canvas"
    second = model.decompose(composite, region, "", steps=1, seed=0)
    assert not np.array_equal(first.layer, second.layer)
    # continuing it with other positions is refused; a base without the option keeps model_index.json's bytes
    with pytest.raises(ValueError, match="task.positions is 'canvas'.*trained with 'panels'"):
        InContextBaseTask(_cfg(shards, model=base, positions="canvas")).setup(torch.device("cpu"))
    plain = tmp_path / "plain"
    run_training(_cfg(shards, steps=2), plain)
    assert "positions" not in json.loads((plain / "final" / "model_index.json").read_text())
    assert incontext_base.base_positions(plain / "final") == "canvas"
