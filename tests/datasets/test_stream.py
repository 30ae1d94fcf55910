"""ShardStream: kinds, epochs, weights, ranks and exact resume, on tiny shards written by ShardWriter."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from layerloop.datasets.shards import ShardWriter
from layerloop.datasets.stream import ShardStream, WeightedShards
from layerloop.samples import LayeredSample, composite


def _sample(key: str, kind: str, rng: np.random.Generator, size: int = 16) -> LayeredSample:
    background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    foreground = np.zeros((size, size, 4), np.uint8)
    foreground[4:12, 4:12, :3] = rng.integers(0, 256, 3, dtype=np.uint8)
    foreground[4:12, 4:12, 3] = 255
    mask = np.zeros((size, size), np.uint8)
    mask[3:13, 3:13] = 255
    return LayeredSample(key=key, kind=kind, composite=composite(foreground, background), background=background,
                         foreground=foreground, mask=mask, caption=f"caption of {key}")


def write_source(out_dir, name: str, shards: int, per_shard: int, kinds=("quadruple",)) -> None:
    """`shards` shards of `per_shard` samples; kinds cycle through `kinds`."""
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, name)
    for index in range(shards):
        samples = []
        for i in range(per_shard):
            n = index * per_shard + i
            samples.append(_sample(f"{name}_{n:04d}", kinds[n % len(kinds)], rng))
        writer.write(index, samples)


def _keys(stream: ShardStream, batches: int) -> list[list[str]]:
    return [[s.key for s in stream.next_batch()] for _ in range(batches)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_source(root / "a", "a", shards=3, per_shard=6, kinds=("quadruple", "pair"))
    write_source(root / "b", "b", shards=2, per_shard=5)
    return root


def test_kind_filter_and_every_sample_once_per_epoch(mixed):
    stream = ShardStream([WeightedShards(run_dir=str(mixed / "a"), name="a")], batch_size=3, shuffle_buffer=4,
                         seed=1, kinds=["pair"])
    epoch = [k for batch in _keys(stream, 3) for k in batch]  # 9 pairs in source a
    assert len(epoch) == len(set(epoch)) == 9
    assert all(int(k.split("_")[1]) % 2 == 1 for k in epoch)  # odd samples are the pairs
    second = [k for batch in _keys(stream, 3) for k in batch]
    assert set(second) == set(epoch) and second != epoch  # cycles, reshuffled per epoch


def test_shuffle_is_deterministic_per_seed_and_mixes_shards(mixed):
    def first(seed):
        stream = ShardStream([WeightedShards(run_dir=str(mixed / "a"), name="a")], 6, shuffle_buffer=12, seed=seed)
        return _keys(stream, 3)

    assert first(0) == first(0)
    assert first(0) != first(1)
    shards_in_first_batch = {int(k.split("_")[1]) // 6 for k in first(0)[0]}
    assert len(shards_in_first_batch) > 1  # a window of 12 spans two shards of 6


def test_resumed_stream_yields_the_same_batches(mixed):
    def make():
        return ShardStream([WeightedShards(run_dir=str(mixed / "a"), weight=2.0, name="a"),
                            WeightedShards(urls=str(mixed / "b" / "b-{000000..000001}.tar"), name="b")],
                           batch_size=4, shuffle_buffer=5, seed=3)

    uninterrupted = make()
    _keys(uninterrupted, 7)  # crosses epoch boundaries of both sources
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # plain JSON: goes into any checkpoint
    expected = _keys(uninterrupted, 6)
    resumed = make()
    resumed.load_state_dict(state)
    assert _keys(resumed, 6) == expected


def test_weights_set_how_often_a_source_is_drawn(mixed):
    stream = ShardStream([WeightedShards(run_dir=str(mixed / "a"), weight=2.0, name="a"),
                          WeightedShards(run_dir=str(mixed / "b"), weight=1.0, name="b")], batch_size=10, seed=0)
    counts = Counter(k.split("_")[0] for batch in _keys(stream, 60) for k in batch)
    assert 0.62 < counts["a"] / 600 < 0.72, counts  # 2/3 expected; 600 draws: sd ~0.019


def test_ranks_split_each_global_batch(mixed):
    sources = [WeightedShards(run_dir=str(mixed / "a"), name="a"), WeightedShards(run_dir=str(mixed / "b"), name="b")]
    whole = ShardStream(sources, batch_size=4, seed=5)
    ranks = [ShardStream(sources, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        global_batch = [s.key for s in whole.next_batch()]
        parts = [[s.key for s in r.next_batch()] for r in ranks]
        assert parts[0] + parts[1] == global_batch
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()


def test_state_of_other_data_is_refused(mixed):
    a = ShardStream([WeightedShards(run_dir=str(mixed / "a"), name="a")], batch_size=2, seed=0)
    b = ShardStream([WeightedShards(run_dir=str(mixed / "b"), name="a")], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="other data"):
        b.load_state_dict(a.state_dict())
    other_kinds = ShardStream([WeightedShards(run_dir=str(mixed / "a"), name="a")], 2, seed=0, kinds=["pair"])
    with pytest.raises(ValueError, match="other data"):
        other_kinds.load_state_dict(a.state_dict())


def test_shards_without_an_index_are_read_from_their_json(tmp_path):
    write_source(tmp_path, "c", shards=1, per_shard=4, kinds=("quadruple", "pair"))
    (tmp_path / "c-000000.parquet").unlink()
    stream = ShardStream([WeightedShards(urls=[str(tmp_path / "c-000000.tar")], name="c")], 2, seed=0,
                         kinds=["quadruple"])
    batch = stream.next_batch()
    assert {s.kind for s in batch} == {"quadruple"} and {s.key for s in batch} == {"c_0000", "c_0002"}
    assert batch[0].composite.shape == (16, 16, 3) and batch[0].foreground.shape == (16, 16, 4)


def test_bad_sources_fail_clearly(tmp_path, mixed):
    with pytest.raises(ValueError, match="not a local file"):
        ShardStream([WeightedShards(urls="http://example.com/x.tar", name="x")], 1).next_batch()
    with pytest.raises(ValueError, match="no samples of kind"):
        ShardStream([WeightedShards(run_dir=str(mixed / "b"), name="b")], 1, kinds=["candidate"])
    with pytest.raises(ValueError, match="exactly one"):
        WeightedShards(name="x")
