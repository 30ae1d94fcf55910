"""The in-context decompose/compose task (issue 5) on the generic loop, tiny random model on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from layerloop.datasets.logos import logo_samples
from layerloop.datasets.shards import ShardWriter
from layerloop.models import incontext as ic
from layerloop.samples import LayeredSample, composite, composite_error
from layerloop.training import load_train_config, run_training
from layerloop.training.bfs_task import square_crop
from layerloop.training.incontext_task import InContextTask, load_model, prepare_sample
from layerloop.training.loop import build_task


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Logo samples (64 px, kind rendered) in one run directory, two shards."""
    root = tmp_path_factory.mktemp("incontext") / "logos"
    root.mkdir()
    samples = list(logo_samples(8, seed=0, size=64))
    writer = ShardWriter(root, "logos")
    writer.write(0, samples[:4])
    writer.write(1, samples[4:])
    return root


def _cfg(data, steps=2, **task):
    return load_train_config({
        "family": "incontext", "model": "tiny", "steps": steps, "lr": 1e-2, "batch_size": 2, "seed": 3,
        "checkpoint_every": 100, "shuffle_buffer": 8, "data": [{"name": "logos", "run_dir": str(data)}],
        "task": {"resolution": 16, **task},
    })


def _task(data, **task) -> InContextTask:
    t = InContextTask(_cfg(data, **task))
    t.setup(torch.device("cpu"))
    return t


@pytest.fixture(scope="module")
def batch():
    return list(logo_samples(2, seed=1, size=64))


def test_registry_builds_the_task_and_validates_its_section(shards):
    assert isinstance(build_task(_cfg(shards)), InContextTask)
    with pytest.raises(ValueError, match="multiple of 4"):
        InContextTask(_cfg(shards, resolution=18))
    with pytest.raises(ValueError, match="cycle_weight"):
        InContextTask(_cfg(shards, cycle_weight=-1))
    with pytest.raises(ValueError, match="unknown_key"):
        InContextTask(_cfg(shards, unknown_key=1))
    with pytest.raises(ValueError, match="pairs"):
        InContextTask(_cfg(shards, kinds=["pair"]))


def test_trains_only_the_lora_with_both_directions_and_the_cycle(shards, batch):
    task = _task(shards)
    loss, logs = task.loss(batch, 0, torch.Generator().manual_seed(0))
    assert set(logs) >= {"decompose", "compose", "cycle_decompose_compose", "cycle_compose_decompose"}
    expected = logs["decompose"] + logs["compose"] + logs["cycle_decompose_compose"] + logs["cycle_compose_decompose"]
    assert torch.allclose(loss.detach(), expected)
    loss.backward()
    trainable = {id(p) for p in task.trainable_parameters()}
    names = [n for n, p in task.model.transformer.named_parameters() if id(p) in trainable]
    assert trainable and len(names) == len(trainable) and all("lora_" in n for n in names)
    assert all(p.requires_grad and p.grad is not None for p in task.trainable_parameters())
    assert any(p.grad.abs().sum() > 0 for p in task.trainable_parameters())
    for module_name, module in task.frozen_modules().items():
        for name, p in module.named_parameters():
            if id(p) not in trainable:
                assert not p.requires_grad and p.grad is None, f"{module_name}.{name}"


def test_cycle_weight_zero_through_the_config_drops_the_cycle(shards, batch):
    cfg = load_train_config(_cfg(shards).model_dump(mode="json"), ["task.cycle_weight=0"])
    task = InContextTask(cfg)
    task.setup(torch.device("cpu"))
    assert task.model.config.cycle_weight == 0
    loss, logs = task.loss(batch, 0, torch.Generator().manual_seed(0))
    assert "cycle_decompose_compose" not in logs and "cycle_compose_decompose" not in logs
    assert torch.allclose(loss.detach(), logs["decompose"] + logs["compose"])
    # The same seed with the cycle on: the supervised terms are drawn first, so they agree exactly.
    _, with_cycle = _task(shards).loss(batch, 0, torch.Generator().manual_seed(0))
    assert torch.equal(with_cycle["decompose"], logs["decompose"])


def test_loss_falls_when_overfitting_a_fixed_batch(shards, batch):
    task = _task(shards)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-2)
    history = []
    for _ in range(20):
        loss, _ = task.loss(batch, 0, torch.Generator().manual_seed(0))  # fixed noise and timesteps
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.75 * history[0], history


def test_prepared_samples_keep_their_composite_rule_and_the_region():
    sample = next(logo_samples(1, seed=2, size=64))
    assert sample.kind == "rendered"
    small = prepare_sample(sample, 16)
    assert small.kind == "rendered"
    assert small.composite.shape == (16, 16, 3) and small.foreground.shape == (16, 16, 4)
    small.validate()
    assert set(np.unique(small.mask)) <= {0, 255} and small.mask.any()
    assert prepare_sample(small, 16) is small
    # rendered: C is the input's C cropped and resized like the layers, never recomputed as a*F + (1-a)*B
    top, left, side = square_crop(sample)
    crop = sample.composite[top:top + side, left:left + side]
    np.testing.assert_array_equal(small.composite, np.asarray(Image.fromarray(crop).resize((16, 16), Image.BILINEAR)))
    assert composite_error(small.composite, small.foreground, small.background) > 1
    # quadruple: C recomputed from the resized layers, so the invariant holds exactly at training size
    quadruple = LayeredSample(key=sample.key, kind="quadruple", composite=composite(sample.foreground, sample.background),
                              background=sample.background, foreground=sample.foreground, mask=sample.mask)
    small_quadruple = prepare_sample(quadruple, 16)
    assert composite_error(small_quadruple.composite, small_quadruple.foreground, small_quadruple.background) == 0
    with pytest.raises(ValueError, match="lacks"):
        prepare_sample(LayeredSample(key="x", composite=sample.composite, mask=sample.mask), 16)


def test_trains_on_rendered_samples_and_quadruples_by_default(shards):
    task = InContextTask(_cfg(shards))
    assert task.params.kinds == ["rendered", "quadruple"]
    assert set(task.streams()["quadruple"]) == {"rendered", "quadruple"}
    assert InContextTask(_cfg(shards, kinds=["rendered"])).streams()["quadruple"] == ("rendered",)


def test_stop_and_resume_gives_identical_lora_and_an_inference_checkpoint(shards, tmp_path):
    cfg = _cfg(shards, steps=4).model_copy(update={"checkpoint_every": 2})
    straight = run_training(cfg, tmp_path / "straight")
    stopped = run_training(cfg, tmp_path / "resumed", stop_at=2)
    assert stopped["stopped"] and stopped["step"] == 2
    resumed = run_training(cfg, tmp_path / "resumed")
    assert resumed["resumed_from"] == 2
    a = load_file(str(tmp_path / "straight" / "final" / ic.LORA_FILE))
    b = load_file(str(tmp_path / "resumed" / "final" / ic.LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # training moved the zero-init B
    assert straight["checkpoint_hash"] == resumed["checkpoint_hash"] == ic.checkpoint_hash(tmp_path / "straight" / "final")
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["kind"] == "rendered" for m in metrics)
    # final/ is an inference checkpoint: load_model rebuilds the tiny base and loads the trained LoRA.
    model = load_model(tmp_path / "straight" / "final")
    assert model.config.base_model == "tiny-0" and model.config.rank == 4
    again = load_file(str(model.save_lora(tmp_path / "reloaded")))
    assert again.keys() == a.keys() and all(torch.equal(a[k], again[k]) for k in a)
    info = json.loads((tmp_path / "straight" / "final" / "incontext_task.json").read_text())
    assert info["resolution"] == 16 and info["model"] == "tiny" and info["cycle_weight"] == 1.0
