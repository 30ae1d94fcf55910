import pytest
from pydantic import ValidationError

from layerloop.config import apply_override, load_config


def test_demo_config_loads_and_names_its_stages():
    config = load_config("demo")
    assert config.profile == "demo"
    assert config.stage_names()[:3] == ["load", "trimap", "matting"]


def test_overrides_reach_sections_and_stages():
    config = load_config("demo", ["seed=7", "source.n=5", "stages.matting.backend=knn",
                                  "shards.samples_per_shard=2", "executor=local"])
    assert config.seed == 7 and config.source["n"] == 5 and config.executor == "local"
    assert next(s for s in config.stages if s["stage"] == "matting")["backend"] == "knn"
    assert config.shards.samples_per_shard == 2


def test_fingerprint_ignores_executor_but_not_seed():
    base = load_config("demo")
    assert base.fingerprint() == load_config("demo", ["executor=local"]).fingerprint()
    assert base.fingerprint() != load_config("demo", ["seed=1"]).fingerprint()


def test_bad_overrides_are_explained():
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        load_config("demo", ["stages.nope.x=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_override({}, "seed")
    with pytest.raises(ValidationError):
        load_config("demo", ["executor=spark"])
    with pytest.raises(ValidationError):
        load_config("demo", ["unknown_field=1"])
