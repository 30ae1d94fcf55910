"""A loop with a ``pretrain`` step (the CPU decomposition experiment, ``selfimprove_logos_cpu``, shrunk): the
base is pretrained once before round 0 on the base data, every round's LoRA adapts it (region-restricted),
each round is evaluated against the trivial baseline, a re-run skips the pretraining, and the loop's seed
makes a replicate."""

from __future__ import annotations

import json

import pytest

from layerloop.models.incontext_checkpoint import read_lora_meta, read_task_info
from layerloop.selfimprove.config import load_selfimprove_config
from layerloop.selfimprove.loop import plan_steps, read_events, self_improve
from layerloop.selfimprove.results import PretrainResult, read_result
from layerloop.selfimprove.steps import pretrain_config, train_config
from tests.selfimprove.test_selfimprove_loop import one_torch_thread

SMALL = [
    "base.logos.overrides=[source.n=8, source.size=64, source.output_size=32]",
    "held.overrides=[source.n=2, source.seed=1, source.size=64, source.output_size=32]",
    "evaluation.heldout.overrides=[source.n=2, source.seed=2, source.size=64, source.output_size=32]",
    "pretrain.overrides=[steps=2, checkpoint_every=2, batch_size=2, shuffle_buffer=4]",
    "train.overrides=[steps=2, checkpoint_every=2, batch_size=2, shuffle_buffer=4, task.region_margin=1]",
    "generate.stages.decompose-incontext.steps=2",
]


@pytest.fixture(scope="module")
def pretrained_loop(tmp_path_factory):
    with one_torch_thread():
        out = tmp_path_factory.mktemp("si-pretrain") / "loop"
        config = load_selfimprove_config("selfimprove_logos_cpu", SMALL)
        result = self_improve(config, rounds=1, out=out, progress=False)
    return config, out, result


def test_the_base_is_pretrained_once_and_every_round_adapts_it(pretrained_loop):
    config, out, result = pretrained_loop
    assert plan_steps(1, evaluate=True, pretrain=True)[:3] == [(-1, "data"), (-1, "pretrain"), (0, "mix")]
    marker = read_result(out, -1, PretrainResult)
    events = [e for e in read_events(out) if e["step"] == "pretrain"]
    assert [e["event"] for e in events] == ["start", "done"]
    final = out / "pretrain" / "final"
    assert (final / "model_index.json").is_file()
    train = train_config(config, out, 0)
    assert train.model == str(final)
    lora = out / "rounds" / "round-000" / "train" / "final"
    info = read_task_info(lora)
    assert info["model"] == str(final.resolve()) and info["base_hash"]
    assert read_lora_meta(lora)["config"]["region_margin"] == 1
    pretrain = pretrain_config(config, out)
    assert pretrain.family == "incontext-base" and [d.name for d in pretrain.data] == ["logos"]
    assert marker.model == str(final) and marker.base_hash == info["base_hash"] and marker.steps == 2
    assert result["rounds"][0]["candidates"] == 4
    # the candidates' clean objects are the composite with the decomposed layer's footprint inpainted
    from layerloop.datasets.shards import read_samples

    candidates = list(read_samples(sorted(str(p) for p in (out / "rounds" / "round-000" / "candidates").glob("*.tar"))))
    assert len(candidates) == 4 and {c.meta["generator"]["object"] for c in candidates} == {"footprint"}


def test_each_round_is_evaluated_against_the_trivial_baseline(pretrained_loop):
    _, out, _ = pretrained_loop
    evaluation = json.loads((out / "rounds" / "round-000" / "eval.json").read_text())
    assert list(evaluation["metrics"]) == ["lora", "start", "copy-input"]
    for method in ("lora", "start", "copy-input"):
        assert evaluation["metrics"][method]["layer_psnr"] > 0 and evaluation["metrics"][method]["object_psnr"] > 0


def test_a_rerun_skips_the_pretraining_and_the_seed_makes_a_replicate(pretrained_loop, tmp_path):
    config, out, _ = pretrained_loop
    self_improve(config, rounds=1, out=out, progress=False)
    events = [e["event"] for e in read_events(out) if e["step"] == "pretrain"]
    assert events == ["start", "done", "skip"]
    replicate = load_selfimprove_config("selfimprove_logos_cpu", [*SMALL, "seed=1"])
    assert pretrain_config(replicate, out).seed == pretrain_config(config, out).seed + 1000
    assert train_config(replicate, out, 0).seed == train_config(config, out, 0).seed + 1000
    with pytest.raises(ValueError, match="pretrain trains an in-context base"):
        load_selfimprove_config("selfimprove_bfs_demo", ["pretrain={config: train_incontext_base_demo}"])


def test_the_no_cycle_ablation_differs_from_the_main_arm_only_in_the_cycle_weight():
    """benchmarks/selfimprove_logos_cpu.py builds its no-cycle arm from the packaged train overrides, so a
    change of the main arm's training reaches the ablation too."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selfimprove_logos_cpu.py"
    spec = importlib.util.spec_from_file_location("selfimprove_logos_cpu_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    main = load_selfimprove_config("selfimprove_logos_cpu")
    ablation = load_selfimprove_config("selfimprove_logos_cpu", benchmark.arm_overrides("nocycle"))
    assert ablation.train.overrides == [*main.train.overrides, "task.cycle_weight=0"]
    assert ablation.model_dump(exclude={"train"}) == main.model_dump(exclude={"train"})
    assert benchmark.arm_overrides("main") == []
