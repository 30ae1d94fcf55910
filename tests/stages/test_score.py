"""The score stage measures what the BFS paper measures (#15): CLIP of the generated F over grey against the
caption, and HPS of F composited over the INPUT background B (not the composite branch's own C); every score
records which image it was computed on (``meta["scores_on"]``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerloop.samples import LayeredSample, composite
from layerloop.stages import build_stage, run_stage


def _layers(seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _bfs_candidate(key: str, seed: int) -> LayeredSample:
    """A candidate whose composite branch made a C unlike its F over B (as a real generator may)."""
    foreground, background = _layers(seed)
    own_c = np.full((32, 32, 3), 7, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    return LayeredSample(key=key, kind="candidate", composite=own_c, background=background, foreground=foreground,
                         mask=mask, caption="a cat", meta={"generator": {"family": "bfs", "seed": seed}})


def _score(samples, metrics=("clip_foreground", "clip_composite", "hps", "recomposition")):
    stage = build_stage({"stage": "score", "clip_model": "tiny", "hps_model": "tiny", "metrics": list(metrics)})
    return run_stage(stage, samples)


def test_bfs_candidate_hps_and_clip_composite_score_the_foreground_over_the_input_background():
    from layerloop.models.clip_score import ClipScorer
    from layerloop.models.hps import HpsScorer

    sample = _bfs_candidate("c0", 0)
    over_b = composite(sample.foreground, sample.background)
    own_c = sample.composite.copy()
    out = _score([sample])[0]
    scores = out.meta["scores"]
    hps = HpsScorer.tiny(seed=0)
    assert scores["hps"] == pytest.approx(float(hps.score([over_b], ["a cat"])[0]), abs=1e-5)
    assert scores["hps"] != pytest.approx(float(hps.score([own_c], ["a cat"])[0]), abs=1e-5)
    clip = ClipScorer.tiny(seed=0)
    assert scores["clip_composite"] == pytest.approx(float(clip.score([over_b], ["a cat"])[0]), abs=1e-5)
    np.testing.assert_array_equal(out.composite, own_c)  # scoring changes no layer
    assert out.meta["scores_on"] == {
        "clip_foreground": "foreground_over_grey",
        "clip_composite": "foreground_over_input_background",
        "hps": "foreground_over_input_background",
        "recomposition_mean": "composite_vs_foreground_over_background",
        "recomposition_max": "composite_vs_foreground_over_background",
    }
    json.loads(json.dumps(out.meta["scores_on"], allow_nan=False))  # strict JSON
    assert json.loads(out.to_wds()["json"])["scores_on"] == out.meta["scores_on"]  # written to a shard


def test_other_samples_are_scored_on_their_composite():
    from layerloop.models.hps import HpsScorer

    foreground, background = _layers(1)
    real_c = composite(foreground, background)
    real_c[:8] = 0  # e.g. a decomposition's real input, which is not the alpha blend of its layers
    samples = [LayeredSample(key="q", kind="quadruple", composite=real_c, background=background,
                             foreground=foreground, caption="a cat"),
               LayeredSample(key="d", kind="candidate", composite=real_c, background=background,
                             foreground=foreground, caption="a cat", meta={"generator": {"family": "incontext"}})]
    out = _score(samples, metrics=("hps", "clip_composite"))
    expected = float(HpsScorer.tiny(seed=0).score([real_c], ["a cat"])[0])
    for sample in out:
        assert sample.meta["scores"]["hps"] == pytest.approx(expected, abs=1e-5)
        assert sample.meta["scores_on"] == {"hps": "composite", "clip_composite": "composite"}


def test_scores_on_names_only_the_metrics_computed():
    out = _score([_bfs_candidate("c1", 2)], metrics=("recomposition",))[0]
    assert set(out.meta["scores_on"]) == set(out.meta["scores"]) == {"recomposition_mean", "recomposition_max"}
