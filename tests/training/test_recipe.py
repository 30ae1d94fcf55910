"""The BFS training recipe (rgba-vae -> phi -> stage1 -> stage2 in one command) and the parent hashes every
BFS export records, on the tiny random model (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerloop.datasets.shards import ShardWriter
from layerloop.errors import ConfigError
from layerloop.training import load_train_config, load_training, run_training, train_from_config
from layerloop.training.bfs_lineage import read_parents
from layerloop.training.recipe import RecipeConfig, run_recipe
from tests.training.test_bfs_task import _sample  # the same tiny quadruples / pairs

ORDER = ["rgba-vae", "phi", "stage1", "stage2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Quadruples in one run directory, pairs in another (stage 2 draws each stream from its own)."""
    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    for name, kind in (("quads", "quadruple"), ("pairs", "pair")):
        (root / name).mkdir()
        ShardWriter(root / name, name).write(0, [_sample(i, kind, rng) for i in range(6)])
    return root


def _recipe(shards, **stage_steps) -> dict:
    steps = {"rgba-vae": 2, "phi": 2, "stage1": 2, "stage2": 2, **stage_steps}
    return {
        "name": "r", "family": "bfs", "model": "tiny", "lr": 1e-2, "batch_size": 2, "seed": 3,
        "checkpoint_every": 2, "data": [{"name": "quads", "run_dir": str(shards / "quads")}],
        "task": {"resolution": 8},
        "recipe": [{"stage": "rgba-vae", "steps": steps["rgba-vae"]},
                   {"stage": "phi", "steps": steps["phi"], "lr": 3e-3},
                   {"stage": "stage1", "steps": steps["stage1"]},
                   {"stage": "stage2", "steps": steps["stage2"],
                    "data": [{"name": "quads", "run_dir": str(shards / "quads")},
                             {"name": "pairs", "run_dir": str(shards / "pairs")}]}],
    }


def _hash(folder) -> str:
    return (folder / "checkpoint_hash.txt").read_text().strip()


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe-run") / "out"
    return out, train_from_config(_recipe(shards), out=str(out))


def test_recipe_runs_the_four_stages_in_order_and_a_rerun_skips_them(shards, trained):
    out, result = trained
    assert list(result["stages"]) == ORDER and not result["stopped"]
    assert not any(s["skipped"] for s in result["stages"].values())
    for stage in ORDER:
        assert _hash(out / stage / "final") == result["stages"][stage]["checkpoint_hash"]
    # Each stage is an ordinary training run of its own, wired to the earlier stages' final/.
    s2 = json.loads((out / "stage2" / "train.json").read_text())["config"]
    assert s2["name"] == "r-stage2" and s2["stage"] == "stage2" and [d["name"] for d in s2["data"]] == ["quads", "pairs"]
    assert s2["task"] == {"resolution": 8, "rgba_vae_checkpoint": str(out / "rgba-vae" / "final"),
                          "phi_checkpoint": str(out / "phi" / "final"), "init_lora": str(out / "stage1" / "final")}
    metrics = {stage: (out / stage / "metrics.jsonl").read_text() for stage in ORDER}

    again = run_recipe(RecipeConfig.load(_recipe(shards)), out)
    assert all(again["stages"][stage]["skipped"] for stage in ORDER)
    assert {stage: (out / stage / "metrics.jsonl").read_text() for stage in ORDER} == metrics
    assert all(_hash(out / s / "final") == result["stages"][s]["checkpoint_hash"] for s in ORDER)


def test_each_export_records_its_parents_hashes(trained):
    out, _ = trained
    expected = {
        "rgba-vae": {},
        "phi": {"rgba_vae_checkpoint": "rgba-vae"},
        "stage1": {"rgba_vae_checkpoint": "rgba-vae", "phi_checkpoint": "phi"},
        "stage2": {"rgba_vae_checkpoint": "rgba-vae", "phi_checkpoint": "phi", "init_lora": "stage1"},
    }
    for stage, parents in expected.items():
        recorded = read_parents(out / stage / "final")
        assert {key: entry["hash"] for key, entry in recorded.items()} == {
            key: _hash(out / parent / "final") for key, parent in parents.items()}, stage
        assert all(entry["path"] == str((out / parents[key] / "final").resolve()) for key, entry in recorded.items())


def test_a_recipe_stopped_in_stage1_resumes_there(shards, tmp_path):
    recipe = RecipeConfig.load(_recipe(shards, stage1=4))
    first = run_recipe(recipe, tmp_path, stop_at={"stage1": 2})
    assert first["stopped"] and list(first["stages"]) == ["rgba-vae", "phi", "stage1"]
    assert first["stages"]["stage1"]["step"] == 2 and not (tmp_path / "stage1" / "final").exists()
    assert not (tmp_path / "stage2").exists()
    second = run_recipe(recipe, tmp_path)
    assert second["stages"]["rgba-vae"]["skipped"] and second["stages"]["phi"]["skipped"]
    assert second["stages"]["stage1"]["resumed_from"] == 2 and second["stages"]["stage1"]["step"] == 4
    assert not second["stages"]["stage2"]["skipped"] and (tmp_path / "stage2" / "final" / "checkpoint_hash.txt").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_phi_trained_on_another_rgba_vae_is_refused_naming_both_hashes(shards, trained, tmp_path):
    out, _ = trained
    base = {"family": "bfs", "model": "tiny", "steps": 1, "batch_size": 2, "checkpoint_every": 100,
            "data": [{"name": "quads", "run_dir": str(shards / "quads")}]}
    other = load_train_config({**base, "stage": "rgba-vae", "seed": 7, "task": {"resolution": 8}})
    other_hash = run_training(other, tmp_path / "vae-b")["checkpoint_hash"]
    phi_on_a = out / "phi" / "final"
    vae_a = _hash(out / "rgba-vae" / "final")
    assert other_hash != vae_a
    stage1 = load_train_config({**base, "stage": "stage1", "task": {
        "resolution": 8, "phi_checkpoint": str(phi_on_a), "rgba_vae_checkpoint": str(tmp_path / "vae-b" / "final")}})
    with pytest.raises(ValueError) as refused:
        run_training(stage1, tmp_path / "s1")
    assert vae_a in str(refused.value) and other_hash in str(refused.value)
    assert not (tmp_path / "s1" / "checkpoints").exists()  # refused before training
    # Phi trained on the RGBA VAE as initialised (no checkpoint) against a trained one: refused too.
    stage1 = load_train_config({**base, "stage": "stage1", "task": {"resolution": 8, "phi_checkpoint": str(phi_on_a)}})
    with pytest.raises(ValueError, match=f"trained on RGBA VAE {vae_a}.*initialised from the RGB VAE"):
        run_training(stage1, tmp_path / "s1b")


def test_recipes_out_of_order_or_with_hand_wired_keys_are_refused(shards):
    data = _recipe(shards)
    data["recipe"] = [data["recipe"][1], data["recipe"][0], *data["recipe"][2:]]
    with pytest.raises(ConfigError, match=r"rgba-vae -> phi -> stage1 -> stage2.*lists phi, rgba-vae, stage1, "
                                          r"stage2\. List them as rgba-vae, phi, stage1, stage2"):
        RecipeConfig.load(data)
    data = _recipe(shards)
    data["recipe"][2]["task"] = {"phi_checkpoint": "elsewhere/final"}
    with pytest.raises(ConfigError, match="recipe.stage1.task.phi_checkpoint: set by the recipe"):
        RecipeConfig.load(data)
    with pytest.raises(ConfigError, match="'stage3' is not a BFS stage"):
        RecipeConfig.load({**_recipe(shards), "recipe": [{"stage": "stage3", "steps": 1}]})
    with pytest.raises(ConfigError, match="recipe stage phi.*steps: missing"):
        RecipeConfig.load({**_recipe(shards), "recipe": [{"stage": "phi"}]})


def test_recipe_overrides_and_packaged_recipes():
    recipe = load_training("train_bfs_recipe_demo", ["recipe.stage1.steps=7", "data.demo.run_dir=x"])
    configs = dict(recipe.stage_configs("OUT"))
    assert configs["stage1"].steps == 7 and configs["phi"].data[0].run_dir == "x"
    assert configs["stage2"].data[0].run_dir == "runs/demo"  # a stage's own data wins over the shared
    real = dict(load_training("train_bfs_recipe").stage_configs("/o"))
    assert len({(c.batch_size * c.grad_accum, c.steps, c.lr) for c in real.values()}) == 4
    assert real["stage2"].task["init_lora"] == "/o/stage1/final"
