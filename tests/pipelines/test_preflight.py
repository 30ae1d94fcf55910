from layerloop.cli import main
from layerloop.config import load_config
from layerloop.pipelines.build import build
from layerloop.pipelines.preflight import config_model_refs


def test_rorem_config_names_every_real_model():
    refs = config_model_refs(load_config("rorem"))
    labels = " ".join(r.label() for r in refs)
    for expected in ("hustvl/vitmatte-small-composition-1k", "Salesforce/blip2-opt-2.7b", "ViT-H-14",
                     "xswu/HPSv2"):
        assert expected in labels
    assert not config_model_refs(load_config("demo"))


def test_models_list_offline_reports_missing_with_pull_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["models", "list", "rorem", "--cache-dir", str(tmp_path / "empty-cache")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("MISSING") == len(config_model_refs(load_config("rorem")))
    assert "layerloop models pull rorem" in out


def test_build_offline_with_missing_model_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["build", "demo", "--out", str(tmp_path / "run"), "--executor", "local",
                 "stages.matting.backend=vitmatte"])
    err = capsys.readouterr().err
    assert code == 2 and "hustvl/vitmatte-small-composition-1k" in err and "layerloop models pull" in err
    assert not (tmp_path / "run").exists()


def test_pairs_demo_builds_pair_samples(tmp_path):
    from layerloop.datasets.shards import read_samples

    config = load_config("pairs_demo", ["executor=local", "source.n=4", "source.size=64",
                                        "stages.load.short_side=64", "report.enabled=false"])
    result = build(config, out=tmp_path / "pairs", progress=False)
    samples = list(read_samples(tmp_path / "pairs"))
    assert result.ok == 4 and {s.kind for s in samples} == {"pair"}
    assert (tmp_path / "pairs" / "pairs-000000.tar").exists()
    assert "surrogate_error_mean" in samples[0].meta["stages"]["pair"]
