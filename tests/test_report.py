"""Tests for layerloop/report.py on run directories built by hand (webdataset TarWriter + parquet), so they
check the report against the run-directory contract rather than against whatever the shard writer does;
one test also reads a shard written by the real ShardWriter."""

from __future__ import annotations

import io
import json
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from layerloop.report import (LAYOUT, choose_samples, inspect_run, load_index, trace_sample,
                              write_report)
from layerloop.samples import LayeredSample, composite

# The index and failures columns as the run-directory contract states them.
INDEX_COLUMNS = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("kind", pa.string()), ("stage", pa.string()),
    ("error_type", pa.string()), ("message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("caption", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("scores", pa.string()),
])
FAILURE_COLUMNS = pa.schema([
    ("key", pa.string()), ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
    ("shard", pa.string()),
])


def make_sample(key: str, index: int, width: int, height: int) -> LayeredSample:
    """A valid quadruple with flat, distinct colours, so that cells of the contact sheet can be checked
    pixel by pixel: an opaque square in the centre, a half-transparent shadow strip, transparent elsewhere."""
    background = np.empty((height, width, 3), np.uint8)
    background[:] = (30 + 20 * index, 200 - 15 * index, 90)
    foreground = np.zeros((height, width, 4), np.uint8)
    x0, x1, y0, y1 = width // 4, 3 * width // 4, height // 4, 3 * height // 4
    foreground[y0:y1, x0:x1] = (250, 40 + 20 * index, 10, 255)
    foreground[y1:y1 + 3, x0:x1] = (0, 0, 0, 128)  # the shadow: dark colour, partial alpha
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1 + 3, x0:x1] = 255
    return LayeredSample(
        key=key, composite=composite(foreground, background), background=background, foreground=foreground,
        mask=mask, caption=f"a bright orange square number {index} resting on a plain green-blue backdrop",
        meta={"source": "demo", "source_id": str(index), "bbox": [x0, y0, x1, y1 + 3],
              "scores": {"clip": 0.1 * index, "aesthetic": {"v2": 5.0 + index}}})


def ok_row(sample: LayeredSample) -> dict:
    height, width = sample.size
    return {"key": sample.key, "status": "ok", "kind": sample.kind, "stage": None, "error_type": None,
            "message": None, "width": width, "height": height, "caption": sample.caption,
            "source": sample.meta["source"], "source_id": sample.meta["source_id"],
            "scores": json.dumps(sample.meta["scores"], sort_keys=True)}


def failed_row(key: str, stage: str, error_type: str, message: str) -> dict:
    return {"key": key, "status": "failed", "kind": None, "stage": stage, "error_type": error_type,
            "message": message, "width": None, "height": None, "caption": None, "source": "demo",
            "source_id": key, "scores": "{}"}


def write_shard(run_dir: Path, stem: str, samples: list[LayeredSample], failed: list[tuple]) -> None:
    with wds.TarWriter(str(run_dir / f"{stem}.tar")) as writer:
        for sample in samples:
            writer.write(sample.to_wds())
    rows = [ok_row(s) for s in samples] + [failed_row(*f) for f in failed]
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_COLUMNS), run_dir / f"{stem}.parquet")


def write_run_json(run_dir: Path, shards: int, status: str = "complete") -> None:
    (run_dir / "run.json").write_text(json.dumps({
        "name": "demo", "config": {"name": "demo"}, "fingerprint": "f1e2d3c4b5a69788", "seed": 0,
        "versions": {"python": "3.11"}, "created": "2025-01-01T00:00:00", "status": status, "shards": shards}))


@pytest.fixture
def run(tmp_path: Path) -> dict:
    """Two shards: 4 + 3 ok samples (landscape 64x48 and portrait 40x80), 3 failures inside shards and one
    found while listing the source (only in failures.parquet)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shard0 = [make_sample(f"demo_{i:04d}", i, 64, 48) for i in range(4)]
    shard1 = [make_sample(f"demo_{i:04d}", i, 40, 80) for i in range(5, 8)]
    failed0 = [("demo_0004", "matting", "ValueError", "trimap has no unknown region")]
    failed1 = [("demo_0008", "matting", "ValueError", "trimap is all background"),
               ("demo_0009", "shadow", "RuntimeError", "light direction undefined")]
    write_shard(run_dir, "demo-000000", shard0, failed0)
    write_shard(run_dir, "demo-000001", shard1, failed1)
    listing = [("demo_0010", "source", "FileNotFoundError", "mask for demo_0010 is missing")]
    failures = [dict(zip(FAILURE_COLUMNS.names, (*f, ""))) for f in listing]
    failures += [dict(zip(FAILURE_COLUMNS.names, (*f, "demo-000000"))) for f in failed0]
    failures += [dict(zip(FAILURE_COLUMNS.names, (*f, "demo-000001"))) for f in failed1]
    pq.write_table(pa.Table.from_pylist(failures, schema=FAILURE_COLUMNS), run_dir / "failures.parquet")
    write_run_json(run_dir, shards=2)
    samples = {s.key: s for s in shard0 + shard1}
    shard_of = {s.key: "demo-000000" for s in shard0} | {s.key: "demo-000001" for s in shard1}
    return {"dir": run_dir, "samples": samples, "shard_of": shard_of}


# ------------------------------------------------------------------------------------------ index
def test_load_index_concatenates_shard_indexes_and_names_the_shard(run):
    index = load_index(run["dir"])
    assert index.num_rows == 10  # 7 ok + 3 failed in shards; failures.parquet is not an index
    rows = {r["key"]: r for r in index.to_pylist()}
    assert "demo_0010" not in rows
    assert rows["demo_0001"]["shard"] == "demo-000000"
    assert rows["demo_0009"]["shard"] == "demo-000001"
    assert rows["demo_0009"]["status"] == "failed"


def test_load_index_ignores_uncommitted_temporaries(run):
    (run["dir"] / "demo-000002.parquet.tmp-abcd1234").write_bytes(b"half written")
    assert load_index(run["dir"]).num_rows == 10


def test_choose_samples_is_seeded_spread_and_bounded():
    keys = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(10)], "c": ["c0"]}
    chosen = choose_samples(keys, 5, seed=3)
    assert chosen == choose_samples(keys, 5, seed=3)
    assert len(set(chosen)) == 5
    assert {shard for shard, _ in chosen} == {"a", "b", "c"}  # round robin reaches every shard
    assert all(key in keys[shard] for shard, key in chosen)
    assert len({tuple(choose_samples(keys, 5, seed=s)) for s in range(10)}) > 1  # the seed matters
    assert len(choose_samples(keys, 100, seed=0)) == 21


# ----------------------------------------------------------------------------------------- report
def test_write_report_stats(run):
    stats = write_report(run["dir"], rows=4, seed=0)
    assert stats["samples_ok"] == 7
    assert stats["samples_failed"] == 4
    assert stats["samples_total"] == 11
    assert stats["by_kind"] == {"quadruple": 7}
    assert stats["shards"] == {"committed": 2, "planned": 2}
    assert stats["run"]["name"] == "demo" and stats["run"]["status"] == "complete"

    groups = [(g["stage"], g["error_type"], g["count"]) for g in stats["failures"]]
    assert groups == [("matting", "ValueError", 2), ("shadow", "RuntimeError", 1),
                      ("source", "FileNotFoundError", 1)]
    matting = stats["failures"][0]
    assert (matting["example_key"], matting["example_message"]) == ("demo_0004", "trimap has no unknown region")
    assert stats["failures"][2]["example_message"] == "mask for demo_0010 is missing"

    assert stats["sizes"]["width"]["min"] == 40 and stats["sizes"]["width"]["max"] == 64
    assert stats["sizes"]["height"]["min"] == 48 and stats["sizes"]["height"]["max"] == 80
    assert stats["sizes"]["width"]["median"] == 64.0
    lengths = [len(s.caption) for s in run["samples"].values()]
    assert stats["captions"]["length_chars"]["max"] == max(lengths)
    assert stats["captions"]["empty"] == 0

    indices = [0, 1, 2, 3, 5, 6, 7]
    assert stats["scores"]["clip"]["count"] == 7
    assert stats["scores"]["clip"]["mean"] == pytest.approx(np.mean([0.1 * i for i in indices]))
    assert stats["scores"]["aesthetic.v2"]["max"] == pytest.approx(12.0)

    sampled = stats["sampled"]
    assert sampled["rows"] == 4 and len(set(sampled["keys"])) == 4
    assert {run["shard_of"][k] for k in sampled["keys"]} == {"demo-000000", "demo-000001"}
    assert sampled["missing_from_tar"] == []
    expected_alpha = np.mean([run["samples"][k].foreground[..., 3].mean() / 255 for k in sampled["keys"]])
    assert sampled["mean_alpha_coverage"] == pytest.approx(expected_alpha, abs=1e-6)
    expected_box = np.mean([(run["samples"][k].mask > 0).mean() for k in sampled["keys"]])
    assert sampled["mean_box_area_fraction"] == pytest.approx(expected_box, abs=1e-6)

    on_disk = json.loads((run["dir"] / "report" / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert write_report(run["dir"], rows=4, seed=0)["sampled"]["keys"] == sampled["keys"]  # deterministic


def test_contact_sheet_shows_each_sampled_sample_in_its_row(run):
    stats = write_report(run["dir"], rows=4, seed=1)
    sheet = np.asarray(Image.open(run["dir"] / "report" / "contact_sheet.png").convert("RGB"))
    assert sheet.shape[:2] == (LAYOUT.height(4), LAYOUT.width)
    for row, key in enumerate(stats["sampled"]["keys"]):
        sample = run["samples"][key]
        height, width = sample.size

        def centre(column: int) -> np.ndarray:
            x0, y0, x1, y1 = LAYOUT.cell_box(row, column)
            return sheet[(y0 + y1) // 2, (x0 + x1) // 2]

        assert tuple(centre(0)) == tuple(sample.composite[height // 2, width // 2])
        assert tuple(centre(1)) == tuple(sample.background[height // 2, width // 2])
        assert tuple(centre(2)) == tuple(sample.foreground[height // 2, width // 2, :3])  # opaque there
        assert tuple(centre(3)) == (255, 255, 255)
        # The foreground's transparent corner shows the grey checkerboard, not black or the background.
        x0, y0, x1, y1 = LAYOUT.cell_box(row, 2)
        scale = min(LAYOUT.cell / width, LAYOUT.cell / height)
        left = x0 + (LAYOUT.cell - round(width * scale)) // 2
        top = y0 + (LAYOUT.cell - round(height * scale)) // 2
        corner = sheet[top + 1, left + 1]
        assert corner[0] == corner[1] == corner[2] and corner[0] in (153, 204)
        # The caption column has dark text in it.
        tx0, ty0, tx1, ty1 = LAYOUT.cell_box(row, 4)
        assert (sheet[ty0:ty1, tx0:tx1].min(axis=2) < 80).sum() > 200


def test_contact_sheet_has_at_most_the_ok_samples(run):
    stats = write_report(run["dir"], rows=50)
    assert stats["sampled"]["rows"] == 7
    assert sorted(stats["sampled"]["keys"]) == sorted(run["samples"])
    assert Image.open(run["dir"] / "report" / "contact_sheet.png").size == (LAYOUT.width, LAYOUT.height(7))


def test_write_report_reads_only_the_shards_it_shows(run):
    keys = {"demo-000000": [k for k, s in run["shard_of"].items() if s == "demo-000000"],
            "demo-000001": [k for k, s in run["shard_of"].items() if s == "demo-000001"]}
    keys = {shard: sorted(k) for shard, k in keys.items()}
    [(shown, key)] = choose_samples(keys, 1, seed=0)
    other = "demo-000001" if shown == "demo-000000" else "demo-000000"
    (run["dir"] / f"{other}.tar").write_bytes(b"not a tar file at all")
    assert write_report(run["dir"], rows=1, seed=0)["sampled"]["keys"] == [key]


# ---------------------------------------------------------------------------------- inspect/trace
def test_inspect_run_summarises_failures_and_samples(run):
    text = inspect_run(run["dir"], samples=3)
    assert "demo" in text and "complete" in text and "f1e2d3c4b5a69788" in text
    assert "2 committed of 2 planned" in text
    assert "7 ok, 4 failed" in text
    assert "matting / ValueError" in text and "x2" in text
    assert "demo_0004: trimap has no unknown region" in text
    assert "shadow / RuntimeError" in text and "source / FileNotFoundError" in text
    shown = [key for key in run["samples"] if f"  {key}  [" in text]
    assert len(shown) == 3
    for key in shown:
        sample = run["samples"][key]
        assert sample.caption in text
        assert f"bbox: {sample.meta['bbox']}" in text
        assert f"demo / {sample.meta['source_id']}" in text
        height, width = sample.size
        assert f"{width}x{height}" in text


def test_trace_sample_ok_key(run):
    sample = run["samples"]["demo_0006"]
    trace = trace_sample(run["dir"], "demo_0006")
    assert trace["status"] == "ok" and trace["shard"] == "demo-000001"
    assert trace["metadata"] == sample.metadata()
    assert trace["caption"] == sample.caption
    assert trace["members"] == ["background.png", "composite.png", "foreground.png", "json", "mask.png", "txt"]
    assert trace["index_row"]["width"] == 40 and trace["index_row"]["height"] == 80
    assert trace["index_row"]["scores"] == {"aesthetic": {"v2": 11.0}, "clip": pytest.approx(0.6)}
    assert trace["failure"] is None


def test_trace_sample_failed_keys_and_unknown_key(run):
    in_shard = trace_sample(run["dir"], "demo_0009")
    assert in_shard["status"] == "failed" and in_shard["shard"] == "demo-000001"
    assert in_shard["metadata"] is None
    assert (in_shard["failure"]["stage"], in_shard["failure"]["error_type"]) == ("shadow", "RuntimeError")
    listing = trace_sample(run["dir"], "demo_0010")
    assert listing["status"] == "failed" and listing["index_row"] is None and listing["shard"] is None
    assert listing["failure"]["message"] == "mask for demo_0010 is missing"
    with pytest.raises(KeyError, match="demo_9999"):
        trace_sample(run["dir"], "demo_9999")


# -------------------------------------------------------------------------------------- edge cases
def test_empty_run_reports_no_samples(tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    write_shard(run_dir, "demo-000000", [], [("demo_0000", "load", "OSError", "cannot identify image file")])
    pq.write_table(pa.Table.from_pylist([], schema=FAILURE_COLUMNS), run_dir / "failures.parquet")
    write_run_json(run_dir, shards=1)

    stats = write_report(run_dir, rows=8)
    assert stats["samples_ok"] == 0 and stats["samples_failed"] == 1
    assert "no samples" in stats["note"]
    assert stats["sampled"]["rows"] == 0 and stats["sampled"]["mean_alpha_coverage"] is None
    assert stats["sizes"]["width"] is None and stats["scores"] == {}
    sheet = np.asarray(Image.open(run_dir / "report" / "contact_sheet.png").convert("L"))
    assert sheet.shape == (LAYOUT.height(0), LAYOUT.width)
    x0, y0, _, y1 = LAYOUT.cell_box(0, 0)
    assert (sheet[y0:y1] < 160).sum() > 100  # the "no samples" text is drawn in the empty row

    text = inspect_run(run_dir)
    assert "0 ok, 1 failed" in text and "load / OSError" in text and "no ok samples" in text


def test_run_with_no_shards_yet(tmp_path):
    run_dir = tmp_path / "starting"
    run_dir.mkdir()
    write_run_json(run_dir, shards=4, status="running")
    assert load_index(run_dir).num_rows == 0
    assert "shard" in load_index(run_dir).column_names
    stats = write_report(run_dir)
    assert stats["samples_ok"] == 0 and stats["shards"] == {"committed": 0, "planned": 4}
    assert "running" in inspect_run(run_dir) and "0 committed of 4 planned" in inspect_run(run_dir)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        inspect_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a layerloop run"):
        write_report(tmp_path)


def test_reads_shards_written_by_the_shard_writer(tmp_path):
    from layerloop.datasets.shards import ShardWriter

    samples = [make_sample(f"demo_{i:04d}", i, 32, 32) for i in range(3)]
    samples.append(make_sample("demo_0003", 3, 32, 32).fail("matting", ValueError("no unknown region")))
    ShardWriter(tmp_path, "demo").write(0, samples)
    write_run_json(tmp_path, shards=1)
    stats = write_report(tmp_path, rows=2)
    assert (stats["samples_ok"], stats["samples_failed"], stats["sampled"]["rows"]) == (3, 1, 2)
    assert trace_sample(tmp_path, "demo_0001")["metadata"] == samples[1].metadata()


# ------------------------------------------------------------------------------- damaged shards
# A real build (local executor, tiny demo config), then one shard damaged: every reader finishes and
# names the shard and what is wrong; the other shard is reported as usual.
def _truncate(run_dir: Path) -> str:
    tar = run_dir / "demo-000001.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[:1000])
    return f"tar is 1000 bytes, index says {size}"


def _delete(run_dir: Path) -> str:
    (run_dir / "demo-000001.tar").unlink()
    return "tar demo-000001.tar is missing"


def _corrupt_same_size(run_dir: Path) -> str:
    tar = run_dir / "demo-000001.tar"
    data = bytearray(tar.read_bytes())
    data[600:700] = bytes(100)
    tar.write_bytes(bytes(data))
    return "(same size, different bytes)"


def _corrupt_index(run_dir: Path) -> str:
    (run_dir / "demo-000001.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    return "index demo-000001.parquet is unreadable"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    config = load_config("demo", ["source.n=8", "source.size=64", "stages.load.short_side=64",
                                  "shards.samples_per_shard=4", "executor=local"])
    out = tmp_path_factory.mktemp("real") / "run"
    build(config, out=out, executor="local", progress=False, report=False)
    return out


@pytest.mark.parametrize("damage", [_truncate, _delete, _corrupt_same_size, _corrupt_index])
def test_reports_name_a_damaged_shard_instead_of_crashing(real_run, tmp_path, damage):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(real_run, run_dir)
    intact_keys = [r["key"] for r in pq.read_table(run_dir / "demo-000000.parquet").to_pylist()]
    damaged_keys = [r["key"] for r in pq.read_table(run_dir / "demo-000001.parquet").to_pylist()]
    reason = damage(run_dir)

    text = inspect_run(run_dir, samples=8)  # asks for every sample: the damaged shard is chosen first
    assert "1 committed of 2 planned, 1 damaged" in text
    assert "damaged:" in text and "demo-000001" in text and reason in text
    assert "4 ok, 0 failed" in text  # the intact shard's samples; the damaged one is left out
    assert all(f"  {key}  [demo-000000]" in text for key in intact_keys)

    stats = write_report(run_dir, rows=8, seed=0)
    [entry] = stats["damaged_shards"]
    assert entry["shard"] == "demo-000001" and reason in entry["reason"]
    assert entry["indexed_samples"] == (None if damage is _corrupt_index else 4)
    assert stats["samples_ok"] == 4 and stats["shards"]["committed"] == 1
    assert sorted(stats["sampled"]["keys"]) == sorted(intact_keys)
    on_disk = json.loads((run_dir / "report" / "stats.json").read_text())
    assert on_disk["damaged_shards"] == stats["damaged_shards"]
    assert Image.open(run_dir / "report" / "contact_sheet.png").size == (LAYOUT.width, LAYOUT.height(4))

    trace = trace_sample(run_dir, damaged_keys[1])
    assert trace["shard"] == "demo-000001" and reason in trace["shard_damage"]
    if damage is _corrupt_index:  # no index lists it: found in the tar, which is intact
        assert trace["status"] == "unindexed" and trace["metadata"]["key"] == damaged_keys[1]
    else:
        assert trace["status"] == "ok" and trace["metadata"] is None  # a damaged tar is not read
    intact = trace_sample(run_dir, intact_keys[0])
    assert intact["shard_damage"] is None and intact["metadata"]["key"] == intact_keys[0]


def test_old_index_without_record_with_a_broken_tar_is_named(tmp_path):
    """An index from before the size/sha256 record cannot be verified up front: the tar is read as before,
    and when it turns out truncated or garbage the shard is named, not a crash."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_shard(run_dir, "demo-000000", [make_sample(f"demo_{i:04d}", i, 32, 32) for i in range(2)], [])
    write_shard(run_dir, "demo-000001", [make_sample(f"demo_{i:04d}", i, 32, 32) for i in range(2, 4)], [])
    write_run_json(run_dir, shards=2)
    tar = run_dir / "demo-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2500])  # mid-sample: webdataset yields a sample with holes

    stats = write_report(run_dir, rows=4, seed=0)
    [entry] = stats["damaged_shards"]
    assert entry == {"shard": "demo-000001", "indexed_samples": 2,
                     "reason": "tar demo-000001.tar lacks 1 sample(s) its index lists as ok (e.g. demo_0003)"}
    assert sorted(stats["sampled"]["keys"]) == ["demo_0000", "demo_0001"]

    tar.write_bytes(b"\x01" * 2048)  # not a tar at all
    text = inspect_run(run_dir, samples=4)
    assert "demo-000001  tar demo-000001.tar is unreadable (ReadError" in text
    trace = trace_sample(run_dir, "demo_0003")
    assert "demo-000001.tar is unreadable" in trace["shard_damage"] and trace["metadata"] is None


def _read_records_with_webdataset(tar_path: Path, keys: list[str], members: tuple[str, ...] | None) -> dict:
    """``read_records`` as it was written with webdataset (``wds.WebDataset``), the reference for the
    reader that replaced it (importing webdataset imports torch)."""
    from layerloop.datasets.shards import error_text
    from layerloop.report import DamagedShardError

    wanted, found = set(keys), {}

    def select(fname: str) -> bool:
        return fname.split(".", 1)[0] in wanted and (members is None or fname.split(".", 1)[1] in members)

    records = iter(wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False, select_files=select))
    try:
        for record in records:
            if record["__key__"] in wanted:
                found[record["__key__"]] = record
                wanted.discard(record["__key__"])
                if not wanted:
                    break
    except Exception as error:  # noqa: BLE001
        raise DamagedShardError(f"tar {tar_path.name} is unreadable ({error_text(error)})") from error
    finally:
        records.close()
    return found


def _odd_tar(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return buffer.getvalue()


def test_read_records_reads_as_webdataset_does(real_run, tmp_path):
    """Same records (members, ``__key__``, ``__url__``, ``__local_path__``) and the same error, message and
    cause for intact tars, tars cut at every 512-byte block and at odd offsets, overwritten bytes, empty
    and garbage files, and odd member names (duplicates, metadata, no extension, upper-case extension)."""
    from layerloop.report import read_records

    def outcome(read, *args):
        try:
            return "ok", read(*args)
        except Exception as error:  # noqa: BLE001
            cause = error.__cause__
            return "error", type(error).__name__, str(error), type(cause).__name__, [str(a) for a in cause.args]

    intact = (real_run / "demo-000000.tar").read_bytes()
    keys = [r["key"] for r in pq.read_table(real_run / "demo-000000.parquet").to_pylist()]
    rng = random.Random(0)
    variants = [intact, b"", b"\x01" * 2048,
                _odd_tar([("a.json", b"1"), ("a.json", b"2")]),
                _odd_tar([("__meta__", b"x"), ("a.JSON", b"1"), ("a.png", b"p"), ("b", b"no extension"),
                          ("c.__bad__", b"1"), ("c.json", b"c"), ("x/__k__/y.json", b"m"), ("d.e.f.txt", b"t")])]
    variants += [intact[:n] for n in range(0, len(intact), 512)] + [intact[:rng.randrange(len(intact))]
                                                                    for _ in range(10)]
    for _ in range(10):
        damaged = bytearray(intact)
        start = rng.randrange(len(damaged))
        damaged[start:start + 64] = bytes(rng.randrange(256) for _ in range(64))
        variants.append(bytes(damaged))
    key_sets = [keys[:1], keys[-1:], keys, ["nowhere"], ["a", "b", "c", "d", "x/__k__/y"]]
    tar = tmp_path / "demo-000009.tar"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset's own warnings
        for data in variants:
            tar.write_bytes(data)
            for wanted in key_sets:
                for members in (None, ("json",)):
                    expected = outcome(_read_records_with_webdataset, tar, wanted, members)
                    assert outcome(read_records, tar, wanted, members) == expected, (len(data), wanted, members)
