import json

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


# ------------------------------------------------------------------------------------ integrity
import hashlib  # noqa: E402
import re  # noqa: E402
import tarfile  # noqa: E402

import pytest  # noqa: E402

from layerloop.datasets.shards import (TAR_SHA256_KEY, TAR_SIZE_KEY, check_shard, shard_paths,  # noqa: E402
                                       tar_record)


def tar_members(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


def test_index_records_the_tar_size_and_sha256(tmp_path):
    writer = ShardWriter(tmp_path, "t")
    writer.write(0, [make_quadruple(f"t_{i}", seed=i) for i in range(2)])
    tar, index = writer.paths(0)
    data = tar.read_bytes()
    metadata = pq.read_schema(index).metadata
    assert int(metadata[TAR_SIZE_KEY]) == len(data)
    assert metadata[TAR_SHA256_KEY].decode() == hashlib.sha256(data).hexdigest()
    assert tar_record(index) == (len(data), hashlib.sha256(data).hexdigest())
    assert check_shard(tar, index).status == "ok"


def damage_truncate(tar):
    tar.write_bytes(tar.read_bytes()[:1500])
    return "tar is 1500 bytes, index says"


def damage_flip_a_byte(tar):
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    return "tar's sha256 is .* \\(same size, different bytes\\)"


def damage_delete(tar):
    tar.unlink()
    return "tar t-000000.tar is missing"


def damage_index(tar):
    tar.with_suffix(".parquet").write_bytes(b"PAR1 not really")
    return "index t-000000.parquet is unreadable"


def damage_old_index(tar):
    index = tar.with_suffix(".parquet")
    pq.write_table(pq.read_table(index).replace_schema_metadata(None), index)
    return "records no tar size and sha256 \\(written by an older layerloop\\)"


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_byte, damage_delete, damage_index,
                                    damage_old_index])
def test_damaged_shard_is_not_committed_and_is_rebuilt_to_the_same_bytes(tmp_path, damage):
    writer = ShardWriter(tmp_path, "t")
    samples = [make_quadruple(f"t_{i}", seed=i) for i in range(3)]
    writer.write(0, samples)
    tar, index = writer.paths(0)
    good = (tar.read_bytes(), index.read_bytes())
    assert writer.committed_summary(0).summary.skipped

    reason = damage(tar)
    committed = writer.committed_summary(0)
    assert committed.summary is None
    assert committed.problem.startswith("shard t-000000 rebuilt: ")
    assert re.search(reason, committed.problem), committed.problem
    assert re.search(reason, writer.damaged[0])
    assert not tar.exists() and not index.exists()  # the damaged pair is gone: nothing half-trusted
    assert writer.committed_summary(0) == type(committed)(None)  # now simply absent

    summary = writer.write(0, [make_quadruple(f"t_{i}", seed=i) for i in range(3)])
    assert not summary.skipped and summary.ok == 3
    assert (tar.read_bytes(), index.read_bytes()) == good


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_byte, damage_delete])
def test_write_fast_path_and_is_committed_verify_the_tar(tmp_path, damage):
    """A retried task (``is_committed`` then ``write``) finding a damaged pair rebuilds it, instead of
    returning the recorded summary of a tar that is not there."""
    writer = ShardWriter(tmp_path, "t")
    writer.write(0, [make_quadruple("t_1")])
    tar, index = writer.paths(0)
    good = tar.read_bytes()
    assert writer.is_committed(0)
    damage(tar)
    assert not writer.is_committed(0) and not index.exists()

    writer.write(0, [make_quadruple("t_1")])
    damage(tar)
    summary = writer.write(0, [make_quadruple("t_1")])  # the fast path sees the damage and rewrites
    assert not summary.skipped and tar.read_bytes() == good


def test_shard_paths_lists_readable_shards_only(tmp_path):
    writer = ShardWriter(tmp_path, "t")
    for i in range(3):
        writer.write(i, [make_quadruple(f"t_{i}", seed=i)])
    damage_truncate(writer.paths(1)[0])
    (tmp_path / "t-000003.tar").write_bytes(b"uncommitted")  # a tar without index
    assert [p.name for p in shard_paths(tmp_path)] == ["t-000000.tar", "t-000002.tar"]
    assert [s.key for s in read_samples(tmp_path)] == ["t_0", "t_2"]


# ------------------------------------------------------------------------ strict samples, whole or none
def test_sample_with_non_finite_metadata_is_a_recorded_failure_and_absent_from_the_tar(tmp_path):
    bad = make_quadruple("t_nan", seed=1)
    bad.meta["entry_score"] = float("nan")
    summary = ShardWriter(tmp_path, "t").write(0, [make_quadruple("t_a"), bad, make_quadruple("t_b", seed=2)])
    assert summary.ok == 2
    assert summary.failures == (("t_nan", "write", "SampleError",
                                 "metadata field entry_score is NaN: shards hold strict JSON only"),)
    tar = tmp_path / "t-000000.tar"
    assert not any(name.startswith("t_nan.") for name in tar_members(tar))
    for record in wds.WebDataset(str(tar), shardshuffle=False):
        json.loads(record["json"], parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "t-000000.parquet").to_pylist()}
    assert rows["t_nan"]["status"] == "failed" and "entry_score is NaN" in rows["t_nan"]["message"]


def test_member_name_too_long_for_a_tar_header_fails_the_sample_whole(tmp_path):
    """A key of 90 characters fits ``KEY.txt`` but not ``KEY.object_mask.png`` (ustar: 100): without the
    check the first members of the sample would be in the tar and the rest missing."""
    long_key = "k" * 90
    summary = ShardWriter(tmp_path, "t").write(0, [make_quadruple(long_key), make_quadruple("t_ok")])
    assert summary.ok == 1 and summary.failures[0][:3] == (long_key, "write", "ValueError")
    assert "does not fit a tar header" in summary.failures[0][3]
    names = tar_members(tmp_path / "t-000000.tar")
    assert names and all(name.startswith("t_ok.") for name in names)


def test_io_error_while_writing_aborts_the_shard_and_leaves_nothing(tmp_path, monkeypatch):
    """Disk full in the middle of a sample: the shard is not committed, no temporaries remain, and a
    retry writes the same bytes as an undisturbed writer."""
    from layerloop.datasets import shards

    clean = tmp_path / "clean"
    clean.mkdir()
    ShardWriter(clean, "t").write(0, [make_quadruple("t_a"), make_quadruple("t_b", seed=3)])
    written = {"bytes": 0}
    real_write = shards._HashingStream.write

    def full_disk(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 30_000:
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(shards._HashingStream, "write", full_disk)
    run = tmp_path / "run"
    run.mkdir()
    writer = ShardWriter(run, "t")
    with pytest.raises(OSError, match="No space left"):
        writer.write(0, [make_quadruple("t_a"), make_quadruple("t_b", seed=3)])
    assert list(run.iterdir()) == []
    monkeypatch.setattr(shards._HashingStream, "write", real_write)
    writer.write(0, [make_quadruple("t_a"), make_quadruple("t_b", seed=3)])
    assert (run / "t-000000.tar").read_bytes() == (clean / "t-000000.tar").read_bytes()
    assert (run / "t-000000.parquet").read_bytes() == (clean / "t-000000.parquet").read_bytes()


def test_index_accepts_any_python_text(tmp_path):
    """A key, source id or message holding a lone surrogate (a file name that is not UTF-8) is written
    escaped instead of stopping the index write."""
    from layerloop.samples import LayeredSample

    bad_name = "scan_\udcff\udcfe.png"
    failed = LayeredSample(key="t_\udcff", meta={"source": "folder", "source_id": bad_name}).fail(
        "read", OSError(f"cannot identify image file {bad_name}"))
    ok = make_quadruple("t_ok")
    ok.meta["source_id"] = "\udce9t\u00e9.png"  # not in the json member (strict), in the index (escaped)
    ok.meta.pop("bbox")
    summary = ShardWriter(tmp_path, "t").write(0, [failed, ok])
    rows = pq.read_table(tmp_path / "t-000000.parquet").to_pylist()
    assert rows[0]["key"] == "t_\\udcff" and rows[0]["source_id"] == "scan_\\udcff\\udcfe.png"
    assert rows[0]["message"] == "cannot identify image file scan_\\udcff\\udcfe.png"
    assert summary.failures[0][0] == "t_\\udcff"
    # the ok sample's source_id is not valid UTF-8 either: it fails as a sample, naming the field
    assert rows[1]["status"] == "failed" and "metadata field source_id is text that is not valid UTF-8" \
        in rows[1]["message"]
    assert rows[1]["source_id"] == "\\udce9t\u00e9.png"
    assert tar_members(tmp_path / "t-000000.tar") == []  # both failed: a valid, empty tar


def test_writer_png_encoder_and_level_give_readable_deterministic_shards(tmp_path):
    """Issue #16: ``shards.png_encoder`` / ``png_compress_level`` reach the tar; same settings, same bytes."""
    samples = [make_quadruple(f"t_{i}", seed=i) for i in range(2)]
    tars = {}
    for name, level, encoder in (("a", 1, "opencv"), ("b", 1, "opencv"), ("c", 6, "pil")):
        (tmp_path / name).mkdir()
        writer = ShardWriter(tmp_path / name, "t", png_level=level, png_encoder=encoder)
        writer.write(0, samples)
        tars[name] = writer.paths(0)[0].read_bytes()
        back = list(read_samples(tmp_path / name))
        for got, want in zip(back, samples):
            np.testing.assert_array_equal(got.foreground, want.foreground)
            np.testing.assert_array_equal(got.composite, want.composite)
    assert tars["a"] == tars["b"] and tars["a"] != tars["c"]


def test_png_settings_at_their_defaults_are_not_recorded():
    from layerloop.config import ShardsConfig, load_config

    assert ShardsConfig().model_dump() == {"name": "layerloop", "samples_per_shard": 16}
    assert ShardsConfig(png_encoder="pil", png_compress_level=6).model_dump() == ShardsConfig().model_dump()
    assert ShardsConfig(png_compress_level=3).model_dump()["png_compress_level"] == 3
    base = load_config("demo", ["shards.png_encoder=pil", "shards.png_compress_level=6"])
    assert base.fingerprint() != load_config("demo").fingerprint()  # the demo writes opencv/1 (its bytes differ)
    assert base.fingerprint() == load_config("demo", ["shards.png_encoder=pil",
                                                       "shards.png_compress_level=6"]).fingerprint()
    with pytest.raises(Exception, match="png_compress_level"):
        load_config("demo", ["shards.png_compress_level=10"])


# ------------------------------------------------------------------------------------ the tar writer
def _webdataset_tar(records) -> bytes:
    """The tar webdataset's own writer makes of ``records``, with the settings the shard writer used before
    it wrote with ``tarfile`` (``shards.TarRecordWriter``)."""
    import io

    stream = io.BytesIO()
    writer = wds.TarWriter(stream, encoder=False, mtime=0, user="layerloop", group="layerloop", mode=0o444)
    for record in records:
        writer.write(record)
    writer.close()
    return stream.getvalue()


def _stdlib_tar(records) -> bytes:
    import io

    from layerloop.datasets.shards import TAR_MODE, TAR_OWNER, TarRecordWriter

    stream = io.BytesIO()
    writer = TarRecordWriter(stream, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=0)
    for record in records:
        writer.write(record)
    writer.close()
    return stream.getvalue()


def test_tar_writer_writes_the_bytes_of_webdatasets_tar_writer():
    """The shard writer's ``tarfile`` writer (which keeps webdataset, and so torch, out of the Ray workers)
    gives the bytes of webdataset's ``TarWriter`` for the same records: empty and multi-block members,
    members that cross tarfile's 10 KiB stream buffer, bytearray and memoryview values, keys of names up to
    ustar's 100 characters, entries starting with ``_`` (not written), no record at all."""
    rng = np.random.default_rng(7)
    records = [make_quadruple(f"t_{i}", seed=i).to_wds() for i in range(3)]
    records += [
        {"__key__": "empty", "txt": b"", "json": b"{}"},
        {"__key__": "big", "bin": rng.integers(0, 256, 3 * 10240 + 17, dtype=np.uint8).tobytes(),
         "a.b.c": bytearray(b"x" * 511), "z": memoryview(b"y" * 513)},
        {"__key__": "m" * 96, "txt": b"fits"},  # "m...m.txt": 100 characters
        {"__key__": "meta", "__url__": "somewhere.tar", "_private": b"skipped", "txt": "caption".encode()},
    ]
    for chosen in (records, records[:1], []):
        assert _stdlib_tar(chosen) == _webdataset_tar(chosen)


def test_tar_writer_refuses_what_webdatasets_refuses():
    from layerloop.datasets.shards import TarRecordWriter

    for record in ({"txt": b"no key"}, {"__key__": "k", "txt": "a str, not bytes"}):
        import io

        with pytest.raises(ValueError) as ours:
            TarRecordWriter(io.BytesIO(), user="u", group="g").write(record)
        with pytest.raises(ValueError) as theirs:
            wds.TarWriter(io.BytesIO(), encoder=False).write(record)
        assert str(ours.value) == str(theirs.value)


def test_shard_writer_tar_equals_webdatasets_tar_of_the_same_records(tmp_path):
    """A whole shard (failed samples left out of the tar, both PNG encoders) against webdataset's writer
    fed the records of the samples that were written."""
    for encoder, level in (("pil", 6), ("opencv", 1)):
        out = tmp_path / encoder
        out.mkdir()
        samples = [make_quadruple(f"t_{i}", seed=i) for i in range(4)]
        samples[2].fail("matting", ValueError("no unknown region"))
        writer = ShardWriter(out, "t", png_level=level, png_encoder=encoder)
        writer.write(0, samples)
        expected = _webdataset_tar([s.to_wds(level, encoder) for s in samples if s.ok])
        assert writer.paths(0)[0].read_bytes() == expected


def test_index_table_is_the_table_from_pylist_makes(tmp_path):
    """``shards.table_from_rows`` (buffers, no pandas import) gives the table, and so the parquet bytes, of
    ``pa.Table.from_pylist``; what it does not handle goes to ``from_pylist`` and raises what it raises."""
    import pyarrow as pa

    from layerloop.datasets.shards import FAILURE_SCHEMA, INDEX_SCHEMA, TAR_SIZE_KEY, table_from_rows

    index_rows = [
        {"key": "k_0", "status": "ok", "kind": "quadruple", "stage": None, "error_type": None, "message": None,
         "width": 512, "height": 384, "caption": "a red ball — ünïcode ✓", "source": "demo", "source_id": "0",
         "scores": "{}"},
        {"key": "k_1", "status": "failed", "kind": None, "stage": "matting", "error_type": "ValueError",
         "message": "", "width": None, "height": -2 ** 31, "caption": None, "source": "demo", "source_id": "1",
         "scores": '{"x": 1}'},
        {"key": "k_2", "status": "ok", "width": 2 ** 31 - 1},  # missing keys are nulls, as in from_pylist
    ]
    failure_rows = [{"key": f"k_{i}", "stage": "list", "error_type": "E", "message": "m" * i, "shard": ""}
                    for i in range(20)]
    schema = INDEX_SCHEMA.with_metadata({TAR_SIZE_KEY: b"123"})
    for rows, wanted_schema in ((index_rows, schema), (failure_rows, FAILURE_SCHEMA), ([], schema)):
        ours, theirs = table_from_rows(rows, wanted_schema), pa.Table.from_pylist(rows, schema=wanted_schema)
        assert ours.equals(theirs, check_metadata=True)
        pq.write_table(ours, tmp_path / "ours.parquet")
        pq.write_table(theirs, tmp_path / "theirs.parquet")
        assert (tmp_path / "ours.parquet").read_bytes() == (tmp_path / "theirs.parquet").read_bytes()
    for bad in ({"key": "k", "width": 2 ** 31}, {"key": "k", "width": "wide"}, {"key": 3}, {"key": "\udcff"}):
        with pytest.raises(Exception) as ours:
            table_from_rows([bad], INDEX_SCHEMA)
        with pytest.raises(Exception) as theirs:
            pa.Table.from_pylist([bad], schema=INDEX_SCHEMA)
        assert type(ours.value) is type(theirs.value)


def test_writing_a_shard_imports_neither_pandas_nor_webdataset(tmp_path):
    """The first shard write of a process (a Ray worker's, the local build's) stays clear of pyarrow's
    pandas import and of webdataset (whose ``__init__`` imports torch)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys; from layerloop.datasets.shards import ShardWriter; from tests.test_samples import "
             "make_quadruple; w = ShardWriter(sys.argv[1], 't'); w.write(0, [make_quadruple('t_1'), "
             "make_quadruple('t_2').fail('x', ValueError('y'))]); "
             "print(sorted(m for m in ('pandas', 'webdataset', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
