"""What the filter writes for an accepted candidate, per family, on candidates built by hand."""

from __future__ import annotations

import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from layerloop.datasets.shards import ShardWriter, read_samples, shard_paths
from layerloop.report import load_index
from layerloop.samples import LayeredSample, composite, composite_error
from layerloop.selfimprove.filter import LineageSource, Verdict, _candidate_rows, _scores_table, write_accepted
from layerloop.selfimprove.layout import RoundPaths
from layerloop.selfimprove.policies import apply_policy
from layerloop.selfimprove.results import TrainResult
from layerloop.selfimprove.steps import _reading_accepted_kind

SIZE = 16


def held_sample(rng: np.random.Generator) -> LayeredSample:
    """A held input whose composite is not the alpha blend of its layers (a non-linear rendering)."""
    layer = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    obj = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 4:12] = 255
    return LayeredSample(key="held_logo_000000", kind="rendered", composite=image, background=obj, foreground=layer,
                         mask=mask, caption="a logo on a mug", meta={"source": "held", "source_id": "logo_000000"})


def candidate_of(held: LayeredSample, rng: np.random.Generator, variant: int, score: float) -> LayeredSample:
    """What ``decompose-incontext`` writes: the input composite unchanged, a generated layer and object."""
    return LayeredSample(
        key=f"r000_{held.key}-v{variant}", kind="candidate", composite=held.composite.copy(),
        foreground=rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8),
        background=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), mask=held.mask.copy(),
        caption=held.caption,
        meta={"source": "r000", "source_id": held.key, "input_key": f"r000_{held.key}",
              "scores": {"cycle_error": score}, "generator": {"family": "incontext", "checkpoint_hash": "h"}})


def member(run_dir: Path, key: str, name: str) -> bytes:
    for tar in shard_paths(run_dir):
        with tarfile.open(tar) as archive:
            for info in archive.getmembers():
                if info.name == f"{key}.{name}":
                    return archive.extractfile(info).read()
    raise KeyError(f"{key}.{name}")


def run_accept(tmp_path: Path, family: str) -> tuple[Path, Path, list[LayeredSample]]:
    """Held shard + candidate shard (2 variants, one accepted) -> ``write_accepted`` for ``family``."""
    rng = np.random.default_rng(0)
    held_dir, paths = tmp_path / "held", RoundPaths(tmp_path / "round-000")
    held = held_sample(rng)
    held_dir.mkdir()
    paths.candidates.mkdir(parents=True)
    ShardWriter(held_dir, "held").write(0, [held])
    candidates = [candidate_of(held, rng, 0, 3.0), candidate_of(held, rng, 1, 9.0)]
    ShardWriter(paths.candidates, "candidates").write(0, candidates)
    rows = _candidate_rows(paths.candidates, 0)
    table = [{"key": r["key"], "input_key": r["input_key"], "round": 0, **r["scores"]} for r in rows]
    decisions = {d.key: d for d in apply_policy(table, {"threshold": {"column": "cycle_error", "op": "<=",
                                                                      "value": 5}})}
    verdict = Verdict(rows, decisions, _scores_table(rows, decisions), "cycle_error <= 5")
    train = TrainResult(checkpoint=str(tmp_path / "final"), checkpoint_hash="h", steps=1, final_loss=None,
                        init_lora=None)
    source = LineageSource(round=0, held=held_dir, held_rows={r["key"]: r for r in load_index(held_dir).to_pylist()},
                           train=train, mix=["base"], policy_text=verdict.policy_text, candidates=paths.candidates,
                           family=family)
    cfg = SimpleNamespace(name="si-test", accepted_per_shard=4)
    write_accepted(cfg, paths, verdict, source)
    return held_dir, paths.accepted, candidates


def test_an_accepted_decomposition_keeps_the_held_input_composite_byte_for_byte(tmp_path):
    held_dir, accepted_dir, candidates = run_accept(tmp_path, "incontext")
    accepted = list(read_samples(accepted_dir))
    assert [s.key for s in accepted] == [candidates[0].key]
    sample, held = accepted[0], next(read_samples(held_dir))
    assert sample.kind == "rendered"
    assert sample.composite.tobytes() == held.composite.tobytes()
    assert member(accepted_dir, sample.key, "composite.png") == member(held_dir, held.key, "composite.png")
    # the generated layer and object are what is new
    np.testing.assert_array_equal(sample.foreground, candidates[0].foreground)
    np.testing.assert_array_equal(sample.background, candidates[0].background)
    assert composite_error(sample.composite, sample.foreground, sample.background) > 1  # no blend invariant
    sample.validate()  # still a writable sample of its kind
    assert sample.meta["lineage"]["candidate_key"] == sample.key
    assert sample.meta["lineage"]["source_key"] == held.key


def test_an_accepted_bfs_candidate_is_still_a_recomputed_quadruple(tmp_path):
    _, accepted_dir, candidates = run_accept(tmp_path, "bfs")
    sample = next(read_samples(accepted_dir))
    assert sample.kind == "quadruple"
    np.testing.assert_array_equal(sample.composite, composite(candidates[0].foreground, candidates[0].background))
    assert not np.array_equal(sample.composite, candidates[0].composite)


def test_in_context_rounds_train_on_the_accepted_kind():
    assert "rendered" in _reading_accepted_kind({})["kinds"]  # the task's default kinds, plus it if missing
    assert _reading_accepted_kind({"kinds": ["quadruple", "candidate"]})["kinds"] == ["quadruple", "candidate",
                                                                                      "rendered"]
    assert _reading_accepted_kind({"kinds": ["rendered"], "resolution": 16}) == {"kinds": ["rendered"],
                                                                                 "resolution": 16}


def test_an_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="family 'nope'"):
        run_accept(tmp_path, "nope")
