"""BFS training stages on the tiny random Flux-Fill model (CPU)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from layerloop.datasets.shards import ShardWriter
from layerloop.models import bfs
from layerloop.samples import LayeredSample, composite
from layerloop.training import load_train_config, run_training
from layerloop.training.bfs_task import BFSTask, batch_pixels, load_compositor, square_crop


def _sample(n: int, kind: str, rng, size: int = 16) -> LayeredSample:
    background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    foreground = np.zeros((size, size, 4), np.uint8)
    foreground[4:12, 4:12, :3] = rng.integers(0, 256, 3, dtype=np.uint8)
    foreground[4:12, 4:12, 3] = 255
    mask = np.zeros((size, size), np.uint8)
    mask[3:13, 3:13] = 255
    return LayeredSample(key=f"s_{n:03d}", kind=kind, composite=composite(foreground, background),
                         background=background, foreground=foreground, mask=mask, caption=f"object {n}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One run directory with quadruples and pairs alternating, as a mixed training source."""
    root = tmp_path_factory.mktemp("bfs") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, "mix")
    for index in range(2):
        writer.write(index, [_sample(index * 6 + i, ("quadruple", "pair")[i % 2], rng) for i in range(6)])
    return root


def _cfg(data, stage, **task):
    return load_train_config({
        "family": "bfs", "stage": stage, "model": "tiny", "steps": 2, "lr": 1e-2, "batch_size": 2, "seed": 3,
        "checkpoint_every": 100, "data": [{"name": "mix", "run_dir": str(data)}],
        "task": {"resolution": 16, **task},
    })


def _task(data, stage, **task) -> BFSTask:
    t = BFSTask(_cfg(data, stage, **task))
    t.setup(torch.device("cpu"))
    return t


def _batch(kind: str, n: int = 2):
    rng = np.random.default_rng(1)
    return [_sample(i, kind, rng) for i in range(n)]


@pytest.mark.parametrize("stage, step", [("stage1", 0), ("stage2", 0), ("stage2", 4), ("phi", 0), ("rgba-vae", 0)])
def test_only_the_stage_trainables_receive_gradients(shards, stage, step):
    task = _task(shards, stage, phi_checkpoint="untrained")
    kind = "pair" if stage == "stage2" and task.branch(step) == "real" else "quadruple"
    if stage == "stage2":
        assert task.branch(step) == ("real" if step == 0 else "reg")  # seed 3: both branches are covered
    loss, logs = task.loss(_batch(kind), step, torch.Generator().manual_seed(0))
    loss.backward()
    trainable = {id(p) for p in task.trainable_parameters()}
    assert trainable
    for p in task.trainable_parameters():
        assert p.requires_grad and p.grad is not None
    for name, module in task.frozen_modules().items():
        for pname, p in module.named_parameters():
            if id(p) not in trainable:
                assert not p.requires_grad and p.grad is None, f"{name}.{pname}"
    if stage in ("stage1", "stage2"):
        # LoRA + g only, and g's zero-initialised output layer gets a signal.
        assert len(trainable) == len(task.generator.lora_state_dict())
        assert any(proc.g[2].weight.grad.abs().sum() > 0 for proc in task.generator.processors.values())
    if stage == "stage2":
        assert logs["branch"] == bfs.stage2_branch(step, 3) and logs["kind"] == kind


@pytest.mark.parametrize("stage", ["stage1", "phi"])
def test_loss_falls_when_overfitting_a_fixed_batch(shards, stage):
    task = _task(shards, stage, phi_checkpoint="untrained", resolution=8)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-2)
    batch, history = _batch("quadruple"), []
    for _ in range(25):
        # The same noise and timesteps every step: a fixed objective, so the loss must fall.
        loss, _ = task.loss(batch, 0, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.75 * history[0], history


def test_stage2_draws_real_and_reg_80_20_with_their_own_data(shards, tmp_path):
    cfg = _cfg(shards, "stage2", phi_checkpoint="untrained", resolution=8)
    cfg = cfg.model_copy(update={"steps": 20, "batch_size": 1, "checkpoint_every": 20})
    run_training(cfg, tmp_path / "s2")
    metrics = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    branches = [m["branch"] for m in metrics]
    assert branches == [bfs.stage2_branch(step, cfg.seed) for step in range(20)]
    assert all(m["kind"] == ("pair" if m["branch"] == "real" else "quadruple") for m in metrics)
    assert all(m["stream"] == m["kind"] for m in metrics)
    assert 0 < Counter(branches)["reg"] < Counter(branches)["real"]  # both branches ran, mostly real
    draws = [bfs.stage2_branch(s, cfg.seed) for s in range(5000)]
    assert abs(draws.count("real") / 5000 - 0.8) < 0.02


def test_phi_then_stage1_chain(shards, tmp_path):
    phi_summary = run_training(_cfg(shards, "phi"), tmp_path / "phi")
    phi_dir = tmp_path / "phi" / "final"
    assert (phi_dir / "checkpoint_hash.txt").read_text().strip() == phi_summary["checkpoint_hash"]
    task = _task(shards, "stage1", phi_checkpoint=str(phi_dir))
    trained = load_compositor(phi_dir)
    for a, b in zip(task.compositor.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in task.compositor.parameters())
    run_training(_cfg(shards, "stage1", phi_checkpoint=str(phi_dir)), tmp_path / "s1")
    info = json.loads((tmp_path / "s1" / "final" / "bfs_task.json").read_text())
    assert info["phi_checkpoint"] == str(phi_dir.resolve()) and info["text_encoder"] == "byte"
    # The saved LoRA is an inference checkpoint: load_generator rebuilds the tiny base on its own.
    generator = bfs.load_generator(tmp_path / "s1" / "final", dtype=torch.float32)
    assert generator.config.base_model_id == "tiny:0"


def test_stage1_needs_a_phi_checkpoint_and_a_valid_resolution(shards):
    with pytest.raises(ValueError, match="phi_checkpoint"):
        BFSTask(_cfg(shards, "stage1"))
    with pytest.raises(ValueError, match="multiple of 4"):
        BFSTask(_cfg(shards, "phi", resolution=18))
    with pytest.raises(ValueError, match="stage must be one of"):
        BFSTask(_cfg(shards, "stage3"))


def test_square_crop_keeps_the_box_and_pixels_are_normalised():
    rng = np.random.default_rng(0)
    sample = _sample(0, "quadruple", rng, size=16)
    wide = LayeredSample(key="w", composite=np.zeros((16, 40, 3), np.uint8), background=np.zeros((16, 40, 3), np.uint8),
                         foreground=np.zeros((16, 40, 4), np.uint8), mask=np.zeros((16, 40), np.uint8))
    wide.mask[5:9, 30:38] = 255
    top, left, side = square_crop(wide)
    assert side == 16 and left <= 30 and left + side >= 38 and top == 0
    pixels = batch_pixels([sample, wide], 8)
    assert pixels["foreground"].shape == (2, 4, 8, 8) and pixels["composite"].shape == (2, 3, 8, 8)
    assert pixels["composite"].min() >= -1 and pixels["composite"].max() <= 1
    assert set(pixels["mask"].unique().tolist()) <= {0.0, 1.0} and pixels["mask"][1].sum() > 0


# --------------------------------------------------------------------------- noise and timesteps (#15)
def _record_branch_inputs(generator: bfs.BFSGenerator) -> list[tuple[torch.Tensor, ...]]:
    """Wrap the generator: every call appends the (latents_c, latents_f, timestep) it received."""
    seen, original = [], generator.forward

    def forward(latents_c, latents_f, cond, timestep, *args, **kwargs):
        seen.append((latents_c.detach().clone(), latents_f.detach().clone(), torch.as_tensor(timestep).clone()))
        return original(latents_c, latents_f, cond, timestep, *args, **kwargs)

    generator.forward = forward
    return seen


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("noise", [None, "shared", "independent"])
def test_branches_share_one_noise_draw_unless_independent(shards, stage, noise):
    task = _task(shards, stage, phi_checkpoint="untrained", **({} if noise is None else {"noise": noise}))
    seen = _record_branch_inputs(task.generator)
    batch = _batch("quadruple")
    task.loss(batch, 4, torch.Generator().manual_seed(0))  # stage 2, step 4: the reg branch (quadruples)
    (x_c, x_f, t), = seen
    z = task.encode(batch_pixels(batch, task.params.resolution))
    h, w = z["c"].shape[-2:]
    t = t.reshape(-1, 1, 1, 1)
    assert bool((t > 0).all() and (t < 1).all())
    # x = (1 - t) z0 + t z1 per branch: the z1 each branch received
    z1_c = (bfs.unpack_latents(x_c, h, w) - (1 - t) * z["c"]) / t
    z1_f = (bfs.unpack_latents(x_f, h, w) - (1 - t) * z["f"]) / t
    if noise == "independent":
        assert not torch.allclose(z1_c, z1_f, atol=1e-2)
    else:  # the default is the paper's: one z0 (here z1, the Flux convention) for both z_C and z_F
        torch.testing.assert_close(z1_c, z1_f, atol=1e-4, rtol=1e-4)


def _draw_t(timesteps: str | None, n: int = 20000, **extra) -> np.ndarray:
    from layerloop.training.bfs_task import BFSParams, sample_timesteps

    params = BFSParams(**({} if timesteps is None else {"timesteps": timesteps}), **extra)
    return sample_timesteps(params, n, torch.Generator().manual_seed(0)).numpy().astype(np.float64)


def _logit_normal_cdf(mean: float = 0.0, std: float = 1.0):
    from scipy.stats import norm

    return lambda x: norm.cdf((np.log(x) - np.log1p(-x) - mean) / std)


@pytest.mark.parametrize("timesteps", [None, "uniform"])
def test_uniform_timesteps_pass_a_ks_test_against_u01_and_fail_against_logit_normal(timesteps):
    from scipy.stats import kstest

    t = _draw_t(timesteps)
    assert kstest(t, "uniform").pvalue > 0.01
    assert kstest(t, _logit_normal_cdf()).pvalue < 1e-6


def test_logit_normal_timesteps_pass_a_ks_test_against_logit_normal_and_fail_against_u01():
    from scipy.stats import kstest

    t = _draw_t("logit-normal")
    assert kstest(t, _logit_normal_cdf()).pvalue > 0.01
    assert kstest(t, "uniform").pvalue < 1e-6
    shifted = _draw_t("logit-normal", timestep_mean=0.5, timestep_std=0.8)
    assert kstest(shifted, _logit_normal_cdf(0.5, 0.8)).pvalue > 0.01


def test_logit_normal_settings_need_logit_normal_timesteps():
    from pydantic import ValidationError

    from layerloop.training.bfs_task import BFSParams

    with pytest.raises(ValidationError, match="timestep_std only apply to timesteps=logit-normal"):
        BFSParams(timestep_std=0.5)
    with pytest.raises(ValidationError):
        BFSParams(noise="per-branch")
    assert BFSParams(timesteps="logit-normal", timestep_std=0.5).timestep_std == 0.5


def test_fingerprint_records_the_resolved_noise_and_timesteps(shards, tmp_path):
    from layerloop.config import ConfigModel
    from layerloop.pipelines.runs import write_config_record
    from layerloop.training.bfs_task import BFSParams
    from layerloop.training.config import TrainConfig

    for (family, _), resolved in TrainConfig.TASK_FINGERPRINT_DEFAULTS.items():
        assert family == "bfs" and all(BFSParams.model_fields[k].default == v for k, v in resolved.items())
    cfg = _cfg(shards, "stage1", phi_checkpoint="untrained")
    before_15 = ConfigModel.fingerprint(cfg)  # what a run directory made before #15 recorded for this config
    assert cfg.fingerprint() != before_15
    assert cfg.fingerprint() == _cfg(shards, "stage1", phi_checkpoint="untrained", noise="shared",
                                     timesteps="uniform").fingerprint()
    old_choices = _cfg(shards, "stage1", phi_checkpoint="untrained", noise="independent", timesteps="logit-normal")
    assert old_choices.fingerprint() != cfg.fingerprint()
    phi = _cfg(shards, "phi")  # stages without noise or timesteps keep their fingerprint
    assert phi.fingerprint() == ConfigModel.fingerprint(phi)
    # A directory trained with the old defaults is refused, not continued with the new ones.
    out = tmp_path / "old"
    out.mkdir()
    write_config_record(out / "train.json", "a training run", cfg.model_dump(mode="json"), before_15)
    with pytest.raises(ValueError, match="different config"):
        run_training(cfg, out)
