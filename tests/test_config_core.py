"""The one config core (``layerloop/config.py``): one override dialect for every config, the typed
``source`` union and switching its type, unknown keys listing the valid ones, and fingerprints that
existing run directories depend on."""

import json
import logging

import pytest
from pydantic import ValidationError

from layerloop.cli import main
from layerloop.config import (BuildConfig, ConfigModel, DemoConfig, RoremConfig, apply_override, load_config, load_yaml,
                              packaged_configs)
from layerloop.errors import ConfigError
from layerloop.selfimprove.config import SelfImproveConfig, load_selfimprove_config
from layerloop.stages.registry import build_stage
from layerloop.training.config import TrainConfig, load_train_config, load_train_dict

# Today's fingerprints of the packaged configs: run directories record them, and a build, training or
# loop refuses a directory whose fingerprint differs. They must not change unless the output changes.
PACKAGED_FINGERPRINTS = {
    "decompose_incontext_demo": "4724ac1b99b33d5d",
    # #16: shards by the opencv PNG encoder at level 1 (was cdce2e623525be33), then matting with the RCM-ordered
    # preconditioner (was 79248d71811975d2), then a trimap band of 0.01 (was c26e6d06e25a122b)
    "demo": "73ebf8ee805e6780",
    "evaluate_bfs_demo": "e5432892ddde4193",
    "evaluate_bfs_rorem": "33c9f28f64b8cdcf",
    "evaluate_decompose_demo": "13f7f4bcd1800a88",
    "generate_bfs_demo": "10c69b51887d8925",  # #15: shared noise recorded: was a60cd3ad30809123
    "logos_demo": "d68cb346bf50d02d",  # #14 changed what it produces (non-linear logos): was 116d7e2697fe5aaf
    "pairs_demo": "d462c7d0150e7e9d",
    # stages' cpus/gpus/concurrency left out of build fingerprints (their run directories are still accepted:
    # BuildConfig.matches_record); rorem's pools resized: were e0381861157f7cdc / 0c094a34d1a683bf
    "rorem": "730a8105df013b35",
    "rorem_pairs": "63c6de1626f6f2de",
    "selfimprove_bfs_demo": "e9b64e32f105f809",
    "selfimprove_incontext_demo": "6f75d0d858f013fb",  # #14: top-k by cycle_error: was 9f3fc33d46dffbfc
    # #14: 2,400 pretraining steps, the object from the layer's footprint (was 55c674048544e7b1; 5f97c3c4ef07184c
    # before rank 32 and t near 1; 98f530b05c50934b before that: 600 pretraining steps, canvas positions)
    "selfimprove_logos_cpu": "8d4721a803aaa907",
    "train_bfs": "2e5b8596fe12bb42",  # #15: shared noise, uniform t recorded: was c6f744fd9eb45728
    "train_bfs_demo": "eb458e6216312cb5",  # #15: shared noise, uniform t recorded: was 5107b9340a57bf13
    "train_bfs_recipe": "4a393db8c48661df",  # #15: the recipe (rgba-vae -> phi -> stage1 -> stage2), new
    "train_bfs_recipe_demo": "19145cf61d17c011",  # #15: new
    "train_incontext_base_demo": "80964d0d002f07a4",  # #14: pretraining a tiny Fill base (space-to-depth AE)
    "train_incontext_demo": "70b6c9b83ed6c000",
}


def _load_packaged(name: str) -> ConfigModel:
    if "recipe" in load_yaml(name):  # a training recipe (its fingerprint covers its stages')
        from layerloop.training.recipe import load_recipe_config

        return load_recipe_config(name)
    if name.startswith("train"):
        return load_train_config(name)
    if name.startswith("selfimprove"):
        return load_selfimprove_config(name)
    if name.startswith("evaluate"):
        from layerloop.evaluation.config import load_evaluate_config

        return load_evaluate_config(name)
    return load_config(name)


@pytest.mark.parametrize("name", sorted(PACKAGED_FINGERPRINTS))
def test_packaged_fingerprints_are_unchanged(name):
    assert _load_packaged(name).fingerprint() == PACKAGED_FINGERPRINTS[name]


def test_every_packaged_config_has_a_recorded_fingerprint():
    assert sorted(PACKAGED_FINGERPRINTS) == packaged_configs()


def test_all_configs_share_the_core():
    assert issubclass(BuildConfig, ConfigModel) and issubclass(TrainConfig, ConfigModel)
    assert issubclass(SelfImproveConfig, ConfigModel)


def test_source_is_recorded_as_written():
    config = load_config("demo")
    assert isinstance(config.source, DemoConfig)
    assert config.model_dump(mode="json")["source"] == {"type": "demo", "n": 64, "seed": 0, "size": 256}
    assert config.source["n"] == 64 and config.source.get("path") is None
    assert load_config("rorem").model_dump(mode="json")["source"] == load_yaml("rorem")["source"]


# ---------------------------------------------------------------------------------- override dialect
def test_entries_by_stage_name_by_entry_name_and_by_index():
    config = load_config("demo", ["stages.matting.backend=knn", "stages.0.short_side=32"])
    assert [s for s in config.stages if s["stage"] == "matting"][0]["backend"] == "knn"
    assert config.stages[0] == {"stage": "load", "short_side": 32, "mask_threshold": 128}

    train = load_train_config("train_bfs_demo", ["data.demo.weight=3", "task.resolution=16"])
    assert train.data[0].weight == 3 and train.task["resolution"] == 16
    assert load_train_config("train_bfs_demo", ["data.0.weight=4"]).data[0].weight == 4

    loop = load_selfimprove_config("selfimprove_bfs_demo", ["scoring.dedupe.threshold=4", "scoring.0.batch_size=2",
                                                            "generate.variants=3"])
    assert [s for s in loop.scoring if s["stage"] == "dedupe"][0]["threshold"] == 4
    assert loop.scoring[0]["batch_size"] == 2 and loop.generate.variants == 3
    name = loop.base[0].name
    assert load_selfimprove_config("selfimprove_bfs_demo", [f"base.{name}.weight=5"]).base[0].weight == 5


def test_values_are_yaml_and_scalar_list_items_by_index():
    data = {"source": {"type": "webdataset", "urls": ["a.tar", "b.tar"]}, "stages": []}
    apply_override(data, "source.urls.1=c.tar")
    apply_override(data, "seed=3")
    apply_override(data, "ray={address: auto, num_cpus: 2}")
    assert data["source"]["urls"] == ["a.tar", "c.tar"] and data["seed"] == 3
    assert data["ray"] == {"address": "auto", "num_cpus": 2}


def test_unknown_entries_and_sections_list_what_exists():
    with pytest.raises(ConfigError, match=r"no stage named 'nope'.*entries: load, trimap, matting"):
        load_config("demo", ["stages.nope.x=1"])
    with pytest.raises(ConfigError, match=r"names no entry of data \(entries: demo, or an index 0\.\.0\)"):
        load_train_config("train_bfs_demo", ["data.missing.weight=2"])
    with pytest.raises(ConfigError, match=r"names no entry of scoring \(entries: score, alpha-sanity, dedupe"):
        load_selfimprove_config("selfimprove_bfs_demo", ["scoring.nope.threshold=4"])
    with pytest.raises(ConfigError, match=r"nope: unknown key; valid keys for a build config: name, profile, seed, "
                                          r"source, stages, shards, executor, ray, report, out"):
        load_config("demo", ["nope.x=1"])
    with pytest.raises(ConfigError, match=r"seed is not a section"):
        load_config("demo", ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"set a field of one entry"):
        load_config("demo", ["stages.load=1"])
    with pytest.raises(ConfigError, match=r"'load' names 2 entries of stages \(indices 0, 1\)"):
        apply_override({"stages": [{"stage": "load"}, {"stage": "load"}]}, "stages.load.x=1")


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError) as raised:
        load_config("rorem", ["source.pth=/data"])
    assert str(raised.value) == ("source.pth: unknown key; valid keys for a rorem source: "
                                 "path, name, limit, allow_outside_root")
    assert isinstance(raised.value, ValidationError)  # callers that catch pydantic's error still do
    with pytest.raises(ConfigError, match=r"shards\.nmae: unknown key; valid keys for shards: name, samples_per_shard"):
        load_config("demo", ["shards.nmae=x"])
    with pytest.raises(ConfigError, match=r"data\.demo\.wieght: unknown key; valid keys for .*: name, run_dir, urls, weight"):
        load_train_config("train_bfs_demo", ["data.0.wieght=2"])
    with pytest.raises(ConfigError, match=r"base\.\w+\.bogus: unknown key; valid keys .*: name, run_dir, build, overrides"):
        load_selfimprove_config("selfimprove_bfs_demo", ["base.0.bogus=2"])
    with pytest.raises(ConfigError, match=r"source\.type: 'lmdb' is not one of rorem, folder, hf, webdataset, demo, logos"):
        load_config("demo", ["source.type=lmdb"])
    with pytest.raises(ConfigError, match=r"source\.path: missing"):
        load_config("demo", ["source.type=rorem"])
    # a TrainConfig validated directly (as the self-improvement loop does) explains the same way
    with pytest.raises(ConfigError, match=r"^stesp: unknown key; valid keys for a training config: name, family"):
        TrainConfig.model_validate({**load_train_dict("train_bfs_demo"), "stesp": 3})


def test_config_errors_survive_pickling():  # raised in Ray workers, reported by the driver
    import pickle

    with pytest.raises(ConfigError) as raised:
        load_config("rorem", ["source.pth=/data"])
    again = pickle.loads(pickle.dumps(raised.value))
    assert isinstance(again, ConfigError) and str(again) == str(raised.value)


def test_stage_entries_are_validated_by_their_stage_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"stages\.matting\.bakend: unknown key; valid keys for the matting stage: "
                                          r"backend, .*batch_size, cpus, gpus, concurrency"):
        build_stage({"stage": "matting", "bakend": "knn"})
    with pytest.raises(ValidationError, match=r"scoring\.dedupe\.threshold"):
        build_stage({"stage": "dedupe", "reference": ["x"], "threshold": "many"}, where="scoring")


# ------------------------------------------------------------------------------------ source switching
def test_switching_the_source_type_drops_the_keys_the_new_type_lacks(caplog):
    with caplog.at_level(logging.INFO, logger="layerloop.config"):
        config = load_config("demo", ["source.type=rorem", "source.path=/data/rorem"])
    assert isinstance(config.source, RoremConfig)
    assert config.model_dump(mode="json")["source"] == {"type": "rorem", "path": "/data/rorem"}
    assert "dropped source.n, source.seed, source.size" in caplog.text
    # the order of the overrides does not matter, and keys both types have are kept
    again = load_config("demo", ["source.name=mine", "source.path=/data/rorem", "source.type=rorem"])
    assert again.model_dump(mode="json")["source"] == {"type": "rorem", "path": "/data/rorem", "name": "mine"}
    # a key the new type lacks, given after the switch, is an error naming the valid keys
    with pytest.raises(ConfigError, match=r"source\.n: unknown key; valid keys for a rorem source"):
        load_config("demo", ["source.type=rorem", "source.path=/d", "source.n=3"])
    # setting the same type again drops nothing
    assert load_config("demo", ["source.type=demo"]).source["n"] == 64


def test_build_demo_with_source_type_rorem_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "mydata"
    assert main(["demo-data", str(data), "--n", "3", "--size", "64"]) == 0
    (data / "demo.json").unlink()  # now it is somebody's RORem folder, not a demo-data folder
    out = tmp_path / "run"
    code = main(["build", "demo", "source.type=rorem", f"source.path={data}", "--out", str(out),
                 "--executor", "local", "--no-progress", "stages.load.short_side=64", "shards.samples_per_shard=2",
                 "report.enabled=false"])
    assert code == 0, capsys.readouterr().err
    assert "samples written: 3, failed: 0" in capsys.readouterr().out
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["config"]["source"] == {"type": "rorem", "path": str(data)}
    assert not (out / "demo-data").exists()
    assert sorted(p.name for p in data.iterdir()) == ["GT", "mask", "meta.json", "source"]  # only read


def test_an_unknown_source_key_is_a_refusal_listing_the_valid_keys(tmp_path, capsys):
    code = main(["build", "demo", "source.type=rorem", "source.pth=x", "--out", str(tmp_path / "r"),
                 "--executor", "local"])
    assert code == 2
    assert "valid keys for a rorem source: path, name, limit, allow_outside_root" in capsys.readouterr().err
