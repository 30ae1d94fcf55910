"""The dedupe stage against a tiny reference shard of valid quadruples."""

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from layerloop.datasets.shards import ShardWriter
from layerloop.samples import LayeredSample, composite, quantise_foreground
from layerloop.stages import build_stage, run_stage, stage_class
from layerloop.stages.dedupe import HASH_BITS, Dedupe, phash

SIZE = 96


def quadruple(key, seed):
    """A smooth random floor with a soft-edged coloured ellipse: a valid quadruple (C = a*F + (1-a)*B)."""
    rng = np.random.default_rng(seed)
    floor = cv2.resize(rng.uniform(0, 255, (4, 4, 3)).astype(np.float32), (SIZE, SIZE),
                       interpolation=cv2.INTER_CUBIC)
    background = np.clip(floor, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cx, cy = rng.uniform(0.3, 0.7, 2) * SIZE
    rx, ry = rng.uniform(0.1, 0.25, 2) * SIZE
    alpha = np.clip((1.15 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2) / 0.3, 0, 1)
    foreground = quantise_foreground(np.broadcast_to(rng.uniform(0, 1, 3), (SIZE, SIZE, 3)), alpha)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[alpha > 0] = 255
    return LayeredSample(key=key, foreground=foreground, background=background, mask=mask,
                         composite=composite(foreground, background), caption="a thing")


def copy_of(sample, key):
    return LayeredSample(key=key, kind="candidate", foreground=sample.foreground.copy(),
                         background=sample.background.copy(), mask=sample.mask.copy(),
                         composite=sample.composite.copy())


def noised(sample, key, seed=0):
    """Re-rendered with sensor-like noise and a small brightness shift on every layer."""
    rng = np.random.default_rng(seed)
    out = copy_of(sample, key)
    out.foreground[..., :3] = np.clip(out.foreground[..., :3] + rng.normal(0, 4, (SIZE, SIZE, 3)) + 3, 0, 255)
    out.background = np.clip(out.background + rng.normal(0, 4, (SIZE, SIZE, 3)) + 3, 0, 255).astype(np.uint8)
    out.composite = composite(out.foreground, out.background)
    return out


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A run directory with two reference shards of quadruples (ref_00 .. ref_07)."""
    run_dir = tmp_path_factory.mktemp("mix")
    references = [quadruple(f"ref_{i:02d}", seed=i) for i in range(8)]
    writer = ShardWriter(run_dir, "mix")
    assert writer.write(0, references[:4]).ok == 4
    assert writer.write(1, references[4:]).ok == 4
    return run_dir, {s.key: s for s in references}


def scored(stage, samples):
    out = run_stage(stage, samples)
    assert all(s.ok for s in out), [s.failure for s in out]
    return [s.meta["scores"] for s in out]


def test_registered_and_runs_in_an_actor():
    assert stage_class("dedupe") is Dedupe
    # Built from a config entry without touching the reference (pipelines validate every stage up front);
    # the index is built in setup(), once per actor.
    stage = build_stage({"stage": "dedupe", "reference": ["/nowhere"], "threshold": 4})
    assert stage.needs_actor and stage.reference_keys == [] and stage.params.threshold == 4


def test_exact_and_noised_copies_are_found_unrelated_images_are_not(mix):
    run_dir, references = mix
    exact = copy_of(references["ref_02"], "cand_exact")
    noisy = noised(references["ref_05"], "cand_noisy")
    unrelated = [quadruple(f"cand_new_{i}", seed=100 + i) for i in range(6)]
    result = scored(Dedupe(reference=[str(run_dir)], threshold=8), [exact, noisy, *unrelated])
    assert result[0] == {"dup_distance": 0, "dup_of": "ref_02", "duplicate": True}
    assert np.abs(noisy.composite.astype(int) - references["ref_05"].composite).mean() > 2  # really altered
    assert result[1]["dup_of"] == "ref_05" and result[1]["dup_distance"] <= 8 and result[1]["duplicate"]
    for scores in result[2:]:
        assert scores["dup_distance"] > 8 and not scores["duplicate"]
        assert scores["dup_of"] in references  # the nearest reference is still named


def test_a_duplicate_must_match_in_every_hashed_layer(mix):
    run_dir, references = mix
    other_object = quadruple("other", seed=50)
    # The reference's composite with an unrelated foreground layer: the scene looks the same, but the
    # layer the model would learn from is different.
    swapped = copy_of(references["ref_01"], "cand_swapped")
    swapped.foreground = other_object.foreground
    both = scored(Dedupe(reference=[str(run_dir)]), [swapped])[0]
    assert both["dup_distance"] > 8 and not both["duplicate"]
    composite_only = scored(Dedupe(reference=[str(run_dir)], layers=["composite"]), [swapped])[0]
    assert composite_only == {"dup_distance": 0, "dup_of": "ref_01", "duplicate": True}


def test_scores_do_not_depend_on_batch_composition_or_order(mix):
    run_dir, references = mix
    candidates = [noised(references["ref_03"], "n3", seed=1), quadruple("u1", seed=201),
                  copy_of(references["ref_07"], "c7"), noised(references["ref_00"], "n0", seed=2)]
    together = scored(Dedupe(reference=[str(run_dir)], batch_size=4), candidates)
    reversed_one_by_one = scored(Dedupe(reference=[str(run_dir)], batch_size=1), candidates[::-1])
    assert together == reversed_one_by_one[::-1]


def test_reference_forms_give_the_same_index_and_ties_go_to_the_smallest_key(mix, tmp_path):
    run_dir, references = mix
    tars = sorted(str(p) for p in run_dir.glob("*.tar"))
    by_dir, by_files, by_pattern = (Dedupe(reference=ref) for ref in
                                    ([str(run_dir)], tars, str(run_dir / "mix-{000000..000001}.tar")))
    for stage in (by_dir, by_files, by_pattern):
        stage.ensure_setup()
        assert stage.reference_keys == sorted(references)
        assert stage.reference_hashes.dtype == np.uint64 and stage.reference_hashes.shape == (8, 2)
    assert np.array_equal(by_dir.reference_hashes, by_pattern.reference_hashes)
    # The same picture under two keys, the larger key written first: dup_of names the smaller one.
    twins_dir = tmp_path / "twins"
    twins_dir.mkdir()
    ShardWriter(twins_dir, "mix").write(0, [copy_of(references["ref_04"], "zz_twin"),
                                            quadruple("mid", seed=9), copy_of(references["ref_04"], "aa_twin")])
    result = scored(Dedupe(reference=[str(twins_dir)]), [copy_of(references["ref_04"], "query")])[0]
    assert result["dup_of"] == "aa_twin" and result["dup_distance"] == 0


def test_a_missing_or_empty_reference_stops_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such shard or directory"):
        run_stage(Dedupe(reference=[str(tmp_path / "nope")]), [quadruple("q", 1)])
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        run_stage(Dedupe(reference=[str(tmp_path)]), [quadruple("q", 1)])
    with pytest.raises(ValidationError):
        Dedupe(reference=[])
    with pytest.raises(ValidationError, match="twice"):
        Dedupe(reference=["x"], layers=["composite", "composite"])
    assert Dedupe(reference="one/dir").params.reference == ("one/dir",)


def test_a_sample_without_a_composite_is_a_recorded_failure(mix):
    run_dir, references = mix
    broken = copy_of(references["ref_00"], "broken")
    broken.composite = None
    out = run_stage(Dedupe(reference=[str(run_dir)]), [broken, copy_of(references["ref_00"], "fine")])
    assert out[0].failure.stage == "dedupe" and "needs composite" in out[0].failure.message
    assert out[1].ok and out[1].meta["stages"]["dedupe"]["reference_samples"] == 8


def test_phash_is_a_64_bit_hash_stable_under_re_encoding():
    image = quadruple("p", seed=3).composite
    value = phash(image)
    assert 0 <= value < 2**HASH_BITS
    jpeg = cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1], cv2.IMREAD_UNCHANGED)
    assert bin(value ^ phash(jpeg)).count("1") <= 4
    assert phash(image) == value
