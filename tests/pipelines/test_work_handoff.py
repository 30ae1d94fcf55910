"""Ray Data ops hand on only the ``work`` entries a later stage reads (``Stage.reads_work``).

A stage that declares its reads and reads anything else would fail, or worse change its output, on Ray only:
the first test runs the demo pipeline with ``work`` trimmed before **every** stage to what that stage and the
ones after it declare (stricter than the executor, which trims between ops), and requires the same samples as
the untrimmed run, field by field and in shard bytes.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np

from layerloop.config import load_config
from layerloop.datasets.shards import ShardWriter
from layerloop.pipelines.executors import _read_and_process, _StageActor, handed_on, stage_groups
from layerloop.pipelines.pipeline import Pipeline
from layerloop.samples import LayeredSample
from layerloop.stages.base import keep_work, run_stage, work_read_by

SMALL = ["source.n=6", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=6",
         "report.enabled=false"]


def test_every_declared_stage_reads_only_what_it_declares(tmp_path):
    """The demo's stages, then the scoring stages of a self-improvement round that need no model."""
    config = load_config("demo", SMALL)
    config = config.model_copy(update={"stages": [*config.stages, {"stage": "score", "metrics": ["recomposition"]},
                                                  {"stage": "alpha-sanity"}]})
    pipeline = Pipeline.from_config(config, tmp_path / "plain")
    stages = pipeline.build_stages()
    assert [stage.name for stage in stages[-3:]] == ["caption", "score", "alpha-sanity"]
    assert all(stage.reads_work is not None for stage in stages[1:]), "the stages after load declare"
    task = pipeline.plan().tasks[0]

    plain = pipeline.process(pipeline.read(task.items), stages)
    trimmed = pipeline.read(task.items)
    for position, stage in enumerate(stages):
        if position:  # load reads the source's raw entries, which only a read puts there
            keep_work(trimmed, work_read_by(stages[position:]))
        trimmed = run_stage(stage, trimmed)

    assert [s.failure for s in plain] == [s.failure for s in trimmed] == [None] * len(plain)
    for a, b in zip(plain, trimmed):
        for field in ("composite", "background", "foreground", "mask", "object_mask"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (a.key, field)
        assert (a.caption, a.meta) == (b.caption, b.meta)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    written = [ShardWriter(tmp_path / name, "demo").write(0, samples) for name, samples in
               (("a", plain), ("b", trimmed))]
    assert (tmp_path / "a" / "demo-000000.tar").read_bytes() == (tmp_path / "b" / "demo-000000.tar").read_bytes()
    assert written[0].ok == written[1].ok == len(plain)


def fake(name: str, actor: bool, reads):
    return SimpleNamespace(name=name, needs_actor=actor, reads_work=reads)


def test_an_op_hands_on_what_later_ops_read_everything_when_one_does_not_say_nothing_before_the_write():
    stages = [fake("load", False, None), fake("trimap", False, frozenset()),
              fake("matting", True, frozenset({"image", "trimap"})), fake("shadow", False, frozenset({"alpha"})),
              fake("caption", True, frozenset()), fake("score", False, frozenset())]
    groups = stage_groups(stages)
    assert [kind for kind, _ in groups] == ["tasks", "actor", "tasks", "actor", "tasks"]
    assert handed_on(stages, groups, 0) == {"image", "trimap", "alpha"}
    assert handed_on(stages, groups, 1) == {"alpha"}
    assert handed_on(stages, groups, 2) == handed_on(stages, groups, 3) == handed_on(stages, groups, 4) == set()
    undeclared = stages[:4] + [fake("generate", True, None)] + stages[5:]
    assert handed_on(undeclared, stage_groups(undeclared), 1) is None  # a later stage that does not say


def _row(samples: list[LayeredSample]) -> dict:
    return {"shard": np.array([0]), "payload": np.array([pickle.dumps(samples)], dtype=object)}


def test_the_ops_functions_drop_the_rest_of_work_before_they_hand_a_row_on(tmp_path):
    pipeline = Pipeline.from_config(load_config("demo", SMALL), tmp_path / "run")
    task = pipeline.plan().tasks[0]
    cpu = list(range(len(pipeline.build_stages()) - 1))  # every stage but the caption
    items = {"shard": np.array([0]), "payload": np.array([pickle.dumps(task.items)], dtype=object)}

    kept = pickle.loads(_read_and_process(items, pipeline, cpu, read=True, keep=None)["payload"][0])
    assert {"alpha", "fg_rgb", "shadow_alpha", "image"} <= set(kept[0].work)
    trimmed = pickle.loads(_read_and_process(items, pipeline, cpu, read=True, keep=frozenset({"alpha"}))["payload"][0])
    assert [set(s.work) for s in trimmed] == [{"alpha"}] * len(trimmed)
    assert len(pickle.dumps(trimmed)) < len(pickle.dumps(kept)) / 2

    actor = _StageActor(pipeline, len(cpu), read=False, keep=frozenset())  # the caption stage, last before the write
    out = pickle.loads(actor(_row(kept))["payload"][0])
    assert [s.work for s in out] == [{}] * len(out) and all(s.caption for s in out)
