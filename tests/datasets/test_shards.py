import webdataset as wds

import numpy as np
import pyarrow.parquet as pq

from layerloop.datasets.shards import ShardWriter, read_samples, remove_stale_temporaries
from tests.test_samples import make_quadruple


def test_shard_commit_index_and_readback(tmp_path):
    writer = ShardWriter(tmp_path, "t")
    good = [make_quadruple(f"t_{i}", seed=i) for i in range(3)]
    bad = make_quadruple("t_bad").fail("matting", ValueError("no unknown region"))
    summary = writer.write(0, [good[0], bad, good[1], good[2]])
    assert (summary.ok, summary.failed) == (3, 1)
    assert summary.failures == (("t_bad", "matting", "ValueError", "no unknown region"),)
    tar, index = writer.paths(0)
    assert tar.name == "t-000000.tar" and index.name == "t-000000.parquet"
    rows = pq.read_table(index).to_pylist()
    assert [r["key"] for r in rows] == ["t_0", "t_bad", "t_1", "t_2"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    back = list(read_samples(tmp_path))
    assert [s.key for s in back] == ["t_0", "t_1", "t_2"]
    np.testing.assert_array_equal(back[1].foreground, good[1].foreground)
    # plain webdataset without any layerloop code sees the same members
    records = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert records[0]["__key__"] == "t_0" and "foreground.png" in records[0]


def test_same_samples_same_bytes_and_no_rewrite(tmp_path):
    a, b = ShardWriter(tmp_path / "a", "t"), ShardWriter(tmp_path / "b", "t")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a.write(0, [make_quadruple("t_1")])
    b.write(0, [make_quadruple("t_1")])
    assert a.paths(0)[0].read_bytes() == b.paths(0)[0].read_bytes()
    assert a.paths(0)[1].read_bytes() == b.paths(0)[1].read_bytes()
    before = a.paths(0)[0].stat().st_mtime_ns
    again = a.write(0, [make_quadruple("t_other")])  # a retried task after the commit
    assert again.skipped and a.paths(0)[0].stat().st_mtime_ns == before


def test_invalid_sample_is_recorded_not_written(tmp_path):
    broken = make_quadruple("t_x")
    broken.composite = broken.composite.copy()
    broken.composite[:] = 0
    summary = ShardWriter(tmp_path, "t").write(0, [broken, make_quadruple("t_y")])
    assert summary.ok == 1 and summary.failures[0][:3] == ("t_x", "write", "SampleError")
    assert [s.key for s in read_samples(tmp_path)] == ["t_y"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "t-000001.tar.tmp-abc").write_bytes(b"half")
    (tmp_path / "t-000000.tar").write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == ["t-000001.tar.tmp-abc"]
    assert (tmp_path / "t-000000.tar").exists()
