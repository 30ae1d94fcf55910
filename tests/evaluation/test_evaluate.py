"""``layerloop evaluate``: methods on one fixed held-out set, metrics.json / per_sample.parquet / table.md /
sheets, resume, missing weights, a missing generator checkpoint, the decomposition family, compare."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from layerloop.cli import main
from layerloop.config import load_config
from layerloop.datasets.shards import read_samples
from layerloop.errors import ConfigError
from layerloop.evaluation.compare import compare_table
from layerloop.evaluation.config import load_evaluate_config
from layerloop.evaluation.run import evaluate
from layerloop.pipelines.build import build
from layerloop.samples import composite

HELD_OVERRIDES = ["source.n=5", "source.seed=101", "source.size=64", "stages.load.short_side=32",
                  "stages.load.multiple_of=16"]
TINY_METRICS = {"clip_model": "tiny", "hps_model": "tiny", "musiq_model": "tiny", "maniqa_model": "tiny",
                "dino_model": "tiny"}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "heldout"
    build(load_config("demo", HELD_OVERRIDES), out=out, executor="local", progress=False, report=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(heldout, tmp_path_factory):
    """A tiny stage-1 BFS LoRA with non-zero weights (an untrained LoRA is the backbone itself)."""
    from layerloop.training import load_train_config
    from layerloop.training.bfs_task import BFSTask
    from layerloop.training.loop import export_final

    cfg = load_train_config({"family": "bfs", "stage": "stage1", "model": "tiny", "steps": 1,
                             "data": [{"name": "held", "run_dir": str(heldout)}],
                             "task": {"resolution": 16, "phi_checkpoint": "untrained"}})
    task = BFSTask(cfg)
    task.setup(torch.device("cpu"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in task.generator.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    final, _ = export_final(task, tmp_path_factory.mktemp("lora"))
    return final


def bfs_config(heldout, checkpoint, **changes):
    data = {
        "name": "eval-test", "family": "bfs", "executor": "local",
        "heldout": {"run_dir": str(heldout), "select": 4, "seed": 3},
        "methods": [
            {"name": "bfs", "label": "BFS tiny", "stages": [{"stage": "generate-bfs", "checkpoint": str(checkpoint),
                                                             "steps": 2}]},
            {"name": "flux-fill", "stages": [{"stage": "fill-baseline", "model": "tiny", "steps": 2}]},
            {"name": "ld-oc", "stages": [{"stage": "trimap"}, {"stage": "matting", "backend": "closed-form"},
                                         {"stage": "background", "backend": "opencv"}, {"stage": "recompose"}]},
            {"name": "ground-truth", "stages": [{"stage": "ground-truth"}]},
        ],
        "metrics": dict(TINY_METRICS), "kid_subset_size": 3, "kid_subsets": 10, "sheet_rows": 2,
    }
    data.update(changes)
    return load_evaluate_config(data)


@pytest.fixture(scope="module")
def bfs_eval(heldout, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bfs-eval") / "out"
    cfg = bfs_config(heldout, checkpoint)
    return cfg, evaluate(cfg, out=out, progress=False), out


def test_metrics_json_has_every_method_and_metric(bfs_eval):
    cfg, result, out = bfs_eval
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["n"] == 4 and metrics["family"] == "bfs"
    assert list(metrics["metrics"]) == ["bfs", "flux-fill", "ld-oc", "ground-truth"]
    names = ["fg_clip", "musiq", "maniqa", "kid_x1000", "dino", "hps"]
    for method, values in metrics["metrics"].items():
        assert list(values) == names, method
        for name in names:
            if (method, name) != ("flux-fill", "fg_clip"):
                assert isinstance(values[name], float) and np.isfinite(values[name]), (method, name)
    assert metrics["metrics"]["flux-fill"]["fg_clip"] is None  # no layer: not measured, not made up
    assert metrics["models"] == {name: "tiny" for name in names}
    gt = metrics["metrics"]["ground-truth"]
    assert gt["dino"] == pytest.approx(1.0, abs=1e-5)  # the reference compared with itself
    # KID is computed from the features the evaluate stage stored: recompute it for the reference row, whose
    # two feature sets are the same images (tiny random DINO features carry no meaning; test_measures.py
    # checks KID's behaviour on controlled features)
    from layerloop.evaluation.measures import kid_x1000

    stored = [s.meta["eval"]["features"] for s in read_samples(out / "methods" / "ground-truth")]
    mine, theirs = (np.asarray([f[side] for f in stored]) for side in ("method", "reference"))
    np.testing.assert_array_equal(mine, theirs)
    assert gt["kid_x1000"] == pytest.approx(kid_x1000(theirs, mine, subset_size=3, subsets=10, seed=0)[0], abs=1e-5)


def test_per_sample_rows_table_and_sheets(bfs_eval):
    cfg, result, out = bfs_eval
    rows = pq.read_table(out / "per_sample.parquet").to_pylist()
    assert len(rows) == 4 * len(cfg.methods)
    assert {r["method"] for r in rows} == {"bfs", "flux-fill", "ld-oc", "ground-truth"}
    keys = {r["key"] for r in rows}
    assert len(keys) == 4  # the same held-out samples for every method
    for method in ("bfs", "ground-truth"):
        mean = np.mean([r["dino"] for r in rows if r["method"] == method])
        assert mean == pytest.approx(result.metrics["metrics"][method]["dino"], abs=1e-5)
    table = (out / "table.md").read_text()
    assert "| BFS tiny |" in table and "KID×1000" in table and "| ground-truth |" in table
    for metric in ("fg_clip", "musiq", "dino", "hps"):
        assert (out / "sheets" / "bfs" / f"{metric}.png").stat().st_size > 1000
    assert not (out / "sheets" / "flux-fill" / "fg_clip.png").exists()


def test_stored_composite_is_the_layer_over_the_input_background(bfs_eval, heldout):
    _, _, out = bfs_eval
    inputs = {s.key: s for s in read_samples(heldout)}
    for sample in read_samples(out / "methods" / "bfs"):
        assert sample.meta["eval"]["composite"] == "layer over input background"
        np.testing.assert_array_equal(sample.composite, composite(sample.foreground, inputs[sample.key].background))
    for sample in read_samples(out / "methods" / "ground-truth"):
        np.testing.assert_array_equal(sample.composite, inputs[sample.key].composite)


def test_rerun_resumes_and_changes_nothing(bfs_eval):
    cfg, result, out = bfs_eval
    before = {p: p.read_bytes() for p in (out / "metrics.json", out / "per_sample.parquet", out / "table.md")}
    tars = {p: p.stat().st_mtime_ns for p in out.glob("methods/*/*.tar")}
    evaluate(cfg, out=out, progress=False)
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("methods/*/*.tar")} == tars  # nothing rebuilt


def test_missing_metric_weights_are_marked_not_invented(heldout, checkpoint, tmp_path):
    metrics = {**TINY_METRICS, "musiq_model": "nobody/musiq-not-here"}
    cfg = bfs_config(heldout, checkpoint, metrics=metrics,
                     methods=[{"name": "ground-truth", "stages": [{"stage": "ground-truth"}]}])
    result = evaluate(cfg, out=tmp_path / "out", progress=False)
    assert result.metrics["metrics"]["ground-truth"]["musiq"] is None
    assert result.metrics["missing"]["musiq"].startswith("missing weights")
    assert result.metrics["metrics"]["ground-truth"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert "missing weights" in (tmp_path / "out" / "table.md").read_text()


def test_missing_generator_checkpoint_stops_before_any_work(heldout, tmp_path):
    cfg = bfs_config(heldout, tmp_path / "no-such-lora")
    with pytest.raises(ConfigError, match="checkpoint .*no-such-lora does not exist"):
        evaluate(cfg, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_decomposition_family_with_trivial_baseline(tmp_path):
    data = {
        "name": "eval-decompose-test", "family": "decomposition", "executor": "local",
        "heldout": {"build": "logos_demo", "overrides": ["source.n=4", "source.seed=101", "source.size=64"]},
        "methods": [{"name": "copy-input", "stages": [{"stage": "copy-input"}]},
                    {"name": "ground-truth", "stages": [{"stage": "ground-truth"}]}],
        "metrics": {"clip_model": "tiny"},
    }
    result = evaluate(load_evaluate_config(data), out=tmp_path / "out", progress=False)
    trivial, truth = result.metrics["metrics"]["copy-input"], result.metrics["metrics"]["ground-truth"]
    assert list(trivial) == ["layer_psnr", "object_psnr", "layer_ssim", "object_ssim", "recomposition_error", "fg_clip"]
    assert trivial["recomposition_error"] == 0.0  # the input copied back: recomposition alone proves nothing
    assert truth["layer_ssim"] == pytest.approx(1.0) and truth["object_ssim"] == pytest.approx(1.0)
    assert trivial["layer_ssim"] < truth["layer_ssim"] and trivial["object_psnr"] < truth["object_psnr"]
    assert result.metrics["n"] == 4


def test_compare_and_cli(bfs_eval, heldout, tmp_path, capsys):
    cfg, result, out = bfs_eval
    table = compare_table([out, out])
    assert table.count("| BFS tiny |") == 2 and "KID×1000" in table
    assert main(["compare", str(out)]) == 0
    assert "| ground-truth |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        compare_table([tmp_path])


def test_models_list_names_the_metric_models(capsys):
    code = main(["models", "list", "evaluate_bfs_rorem"])
    printed = capsys.readouterr().out
    assert code == 1  # offline here: the real weights are missing, and listed
    for stage in ("evaluate/clip", "evaluate/hps", "evaluate/musiq", "evaluate/maniqa", "evaluate/dino",
                  "fill-baseline"):
        assert stage in printed, stage
