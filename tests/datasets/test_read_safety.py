"""Read safety of every source type, through real builds where practical (issue: data safety).

A. reads stay inside the dataset root (``..``, absolute paths, symlinked files and folders; relative
   paths against the root, not the current directory); ``allow_outside_root`` opts out;
B. file names that are not UTF-8 build, with readable ids and distinct keys;
C. ``meta.json`` problems are per-line / per-entry listing failures (the RORem corpus in
   ``tests/bad_inputs.py`` has the line kinds; the JSON list kinds are here), captions are checked;
D. input files are checked by size and signature before they are read whole, tar members by header size;
E. truncated, corrupt and non-tar WebDataset inputs keep what could be read and record what was lost;
F. missing and unreadable folders are one readable error.

Every build test checks that each listed key ends exactly once in a shard or in ``failures.parquet``.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from layerloop.config import load_config
from layerloop.datasets.base import OutsideRootError, make_key, readable, real_root
from layerloop.datasets.imageio import InputError, decode_image, read_input_file
from layerloop.datasets.shards import read_samples
from layerloop.datasets.sources import (MAX_META_LINE_BYTES, FolderSource, HFSource, RoremSource,
                                        WebDatasetSource, build_source)
from layerloop.datasets.tario import TarMember, TarWalk, read_member, scan_tar
from tests.bad_inputs import record_opens
from tests.messy_inputs import png_bytes, scene

RGB, MASK = scene(48, 32, box=(8, 6, 30, 22))
IMAGE_PNG = png_bytes(Image.fromarray(RGB))
MASK_PNG = png_bytes(Image.fromarray(MASK))


# ------------------------------------------------------------------------------------------ helpers
def run_build(tmp_path: Path, source: dict, *overrides: str):
    config = load_config("demo", ["executor=local", "stages.load.short_side=32", "shards.samples_per_shard=4",
                                  "report.rows=2", *overrides])
    config.source = source
    out = tmp_path / f"run-{source['name']}"
    from layerloop.pipelines.build import build

    result = build(config, out=out, progress=False)
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    samples = list(read_samples(out))
    return result, failures, samples, out


def by_key(failures: list[dict]) -> dict[str, dict]:
    keyed: dict[str, dict] = {}
    for row in failures:
        assert row["key"] not in keyed, f"two failures for {row['key']}"
        keyed[row["key"]] = row
    return keyed


def check_accounted(source_cfg: dict, failures: list[dict], samples: list) -> None:
    """Every listed key is in exactly one place: a shard or a (non-listing) failure row."""
    listed = [item.key for item in build_source(source_cfg).items()]
    written = [s.key for s in samples]
    load_failed = [row["key"] for row in failures if row["stage"] != "list"]
    assert sorted(written + load_failed) == sorted(listed)
    assert len(set(written + load_failed)) == len(listed)
    for row in failures:  # every text in the failures table is valid Unicode (parquet read it back)
        row["message"].encode("utf-8")


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def put_bytes_name(folder: Path, name: bytes, data: bytes) -> str:
    """A file whose name is raw bytes (not necessarily UTF-8); returns the name as Python sees it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(data)
    return os.fsdecode(name)


# ------------------------------------------------------------------------------ A, B: folder source
@pytest.fixture()
def outside(tmp_path):
    folder = tmp_path / "outside"
    put(folder / "secret.png", IMAGE_PNG)
    put(folder / "masks" / "a.png", MASK_PNG)
    put(folder / "masks" / "b.png", MASK_PNG)
    return folder


def test_folder_build_non_utf8_names_symlinks_and_captions(tmp_path, outside):
    root = tmp_path / "ds"
    for stem in ("good", "link_out", "bad_caption", "big_caption", "link_caption"):
        put(root / "masks" / f"{stem}.png", MASK_PNG)
    for stem in ("good", "bad_caption", "big_caption", "link_caption"):
        put(root / "images" / f"{stem}.png", IMAGE_PNG)
    (root / "images" / "link_out.png").symlink_to(outside / "secret.png")
    (root / "images" / "bad_caption.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    (root / "images" / "big_caption.txt").write_bytes(b"x" * 70_000)
    (root / "images" / "link_caption.txt").symlink_to("/etc/hostname")
    (root / "images" / "good.txt").write_text("a box\n")
    # two names that differ only in a byte that is not UTF-8
    e9 = put_bytes_name(root / "images", b"caf\xe9.png", IMAGE_PNG)
    e8 = put_bytes_name(root / "images", b"caf\xe8.png", IMAGE_PNG)
    put_bytes_name(root / "masks", b"caf\xe9.png", MASK_PNG)
    put_bytes_name(root / "masks", b"caf\xe8.png", MASK_PNG)
    put_bytes_name(root / "images", b"caf\xe9.txt", "un café".encode())
    source = {"type": "folder", "path": str(root), "name": "f"}

    with record_opens(outside) as opened:
        result, failures, samples, _ = run_build(tmp_path, source)
    assert opened == []
    check_accounted(source, failures, samples)
    landed = {s.meta["source_id"]: s for s in samples}
    assert set(landed) == {"good", "caf\\xe9", "caf\\xe8"}
    assert landed["caf\\xe9"].key != landed["caf\\xe8"].key
    assert landed["caf\\xe9"].key == make_key("f", Path(e9).stem)
    assert landed["caf\\xe9"].caption == "un café" and landed["good"].caption == "a box"
    rows = by_key(failures)
    assert set(rows) == {make_key("f", s) for s in ("link_out", "bad_caption", "big_caption", "link_caption")}
    link = rows[make_key("f", "link_out")]
    assert link["stage"] == "list" and link["error_type"] == "OutsideRoot"
    assert f"outside the dataset root: {root}/images/link_out.png" in link["message"]
    assert "is not UTF-8 text" in rows[make_key("f", "bad_caption")]["message"]
    assert rows[make_key("f", "bad_caption")]["error_type"] == "BadCaption"
    assert "70000 bytes, over the 65536-byte limit" in rows[make_key("f", "big_caption")]["message"]
    assert (f"caption file is outside the dataset root: {root}/images/link_caption.txt"
            in rows[make_key("f", "link_caption")]["message"])
    assert result.ok == 3 and result.failed == 4
    # the parquet indexes hold the readable ids
    index = [row for p in sorted((tmp_path / "run-f").glob("*.parquet")) if p.name != "failures.parquet"
             for row in pq.read_table(p).to_pylist()]
    assert sorted(r["source_id"] for r in index) == sorted(["good", "caf\\xe9", "caf\\xe8"])
    assert e8 != e9


def test_folder_symlinked_folder_outside_and_the_opt_in(tmp_path, outside):
    root = tmp_path / "ds"
    put(root / "images" / "a.png", IMAGE_PNG)
    put(root / "images" / "b.png", IMAGE_PNG)
    (root / "masks").symlink_to(outside / "masks", target_is_directory=True)
    source = FolderSource(root, name="f")
    assert source.items() == []
    rows = {f.key: f for f in source.listing_failures()}
    assert set(rows) == {make_key("f", "mask-folder"), "f_a", "f_b"}
    assert all(f.error_type == "OutsideRoot" and "outside the dataset root" in f.message for f in rows.values())
    assert f"mask folder is outside the dataset root: {root}/masks" in rows[make_key("f", "mask-folder")].message

    # the positive control: allowed, the same folder builds, and then the outside files are read
    cfg = {"type": "folder", "path": str(root), "name": "f", "allow_outside_root": True}
    with record_opens(outside) as opened:
        result, failures, samples, _ = run_build(tmp_path, cfg)
    assert result.ok == 2 and failures == [] and opened  # so record_opens does see reads there
    check_accounted(cfg, failures, samples)


def test_symlink_swapped_after_listing_is_refused_when_read(tmp_path, outside):
    root = tmp_path / "ds"
    put(root / "images" / "a.png", IMAGE_PNG)
    put(root / "images" / "real.png", IMAGE_PNG)
    put(root / "masks" / "a.png", MASK_PNG)
    (root / "images" / "a.png").unlink()
    (root / "images" / "a.png").symlink_to(root / "images" / "real.png")  # inside: listed
    source = FolderSource(root, name="f")
    (item,) = source.items()
    (root / "images" / "a.png").unlink()
    (root / "images" / "a.png").symlink_to(outside / "secret.png")  # swapped before the read
    with pytest.raises(OutsideRootError, match="outside the dataset root"):
        source.read(item)
    # and the load stage's own check, for a swap between read and load
    with pytest.raises(InputError, match=f"image file is outside the dataset root: {root}/images/a.png"):
        decode_image(item.refs["image"], key="image", root=real_root(root))
    assert decode_image(item.refs["image"], key="image").size == (48, 32)  # no root: allowed


def test_folder_missing_and_unreadable_folders(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    with pytest.raises(FileNotFoundError, match="is not a folder .it does not exist"):
        FolderSource(root).items()
    put(root / "images" / "a.png", IMAGE_PNG)
    with pytest.raises(FileNotFoundError, match=f"mask folder {root}/masks does not exist"):
        FolderSource(root).items()
    put(root / "masks" / "a.png", MASK_PNG)
    with pytest.raises(FileNotFoundError, match=f"background folder {root}/bg does not exist"):
        FolderSource(root, background_dir="bg").items()
    with pytest.raises(FileNotFoundError, match=f"image folder {root}/pics does not exist"):
        FolderSource(root, image_dir="pics").items()
    assert [i.source_id for i in FolderSource(root).items()] == ["a"]

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(PermissionError) as info:
        FolderSource(root).items()
    assert str(info.value) == f"cannot list folder {root}/images: permission denied"
    monkeypatch.undo()
    # RORem without meta.json: source/ without mask/ is one clear error too
    rorem = tmp_path / "rorem"
    put(rorem / "source" / "a.png", IMAGE_PNG)
    with pytest.raises(FileNotFoundError, match="mask/ folder does not exist"):
        RoremSource(rorem).items()


def test_rorem_stem_pairing_with_links_and_bytes_names(tmp_path, outside):
    root = tmp_path / "rorem"
    put(root / "source" / "a.png", IMAGE_PNG)
    put(root / "mask" / "a.png", MASK_PNG)
    (root / "source" / "out.png").symlink_to(outside / "secret.png")
    put(root / "mask" / "out.png", MASK_PNG)
    name = put_bytes_name(root / "source", b"\xff\xfe.png", IMAGE_PNG)
    put_bytes_name(root / "mask", b"\xff\xfe.png", MASK_PNG)
    source = RoremSource(root, name="r")
    items = source.items()
    assert [i.source_id for i in items] == ["\\xff\\xfe", "a"]
    assert items[0].refs["image"] == str(root / "source" / name)  # the real name, for opening
    (failure,) = source.listing_failures()
    assert failure.key == "r_out" and failure.error_type == "OutsideRoot"
    assert RoremSource(root, name="r", allow_outside_root=True).listing_failures() == []


# ----------------------------------------------------------------------------------- A: HF sources
def write_path_parquet(path: Path, rows: list[tuple[str, str]]) -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": None, "path": i} for i, _ in rows], struct),
                      "mask": pa.array([{"bytes": None, "path": m} for _, m in rows], struct),
                      "text": [f"row {n}" for n in range(len(rows))]})
    pq.write_table(table, path)


def test_hf_parquet_paths_resolve_against_the_root_not_the_cwd(tmp_path, outside, monkeypatch):
    root = tmp_path / "hf"
    put(root / "img.png", IMAGE_PNG)
    put(root / "mask.png", MASK_PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    decoy = tmp_path / "cwd"
    put(decoy / "img.png", b"decoy: the current directory must not be read\n")
    put(decoy / "mask.png", b"decoy\n")
    monkeypatch.chdir(decoy)
    write_path_parquet(root / "data.parquet", [("img.png", "mask.png"), (str(outside / "secret.png"), "mask.png"),
                                               ("../outside/secret.png", "mask.png"), ("link.png", "mask.png"),
                                               ("img.png", "/etc/hostname")])
    cfg = {"type": "hf", "path": str(root / "data.parquet"), "name": "hf", "caption_column": "text",
           "cache_dir": str(tmp_path / "cache")}
    with record_opens(outside) as opened:
        result, failures, samples, _ = run_build(tmp_path, cfg)
    assert opened == []
    check_accounted(cfg, failures, samples)
    assert [s.key for s in samples] == ["hf_0"] and samples[0].caption == "row 0"
    rows = by_key(failures)
    assert set(rows) == {"hf_1", "hf_2", "hf_3", "hf_4"}
    assert all(r["stage"] == "list" and r["error_type"] == "OutsideRoot" for r in rows.values())
    assert f"outside the dataset root: {outside}/secret.png" in rows["hf_1"]["message"]
    assert f"outside the dataset root: {root}/../outside/secret.png" in rows["hf_2"]["message"]
    assert f"outside the dataset root: {root}/link.png" in rows["hf_3"]["message"]
    assert "mask file is outside the dataset root: /etc/hostname" in rows["hf_4"]["message"]
    source = build_source(cfg)
    read = source.read(source.items()[0])
    assert read.work["raw_image"] == str(root / "img.png") and read.work["raw_root"] == real_root(root)


def test_hf_imagefolder_links_decoys_and_broken_metadata(tmp_path, outside, monkeypatch):
    data = tmp_path / "folder" / "train"
    put(data / "a.png", IMAGE_PNG)
    put(data / "m.png", MASK_PNG)
    (data / "out.png").symlink_to(outside / "secret.png")
    rows = [{"file_name": "a.png", "mask_file_name": "m.png"}, {"file_name": "out.png", "mask_file_name": "m.png"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    decoy = tmp_path / "cwd"
    put(decoy / "a.png", b"decoy\n")
    put(decoy / "train" / "a.png", b"decoy\n")
    monkeypatch.chdir(decoy)
    source = HFSource(tmp_path / "folder", cache_dir=str(tmp_path / "cache"))
    (item,) = source.items()
    (failure,) = source.listing_failures()
    assert failure.key == "hf_1" and f"outside the dataset root: {data}/out.png" in failure.message
    raw = source.read(item).work["raw_image"]
    assert os.path.realpath(raw) == str(data / "a.png")
    assert decode_image(raw, key="image", root=source.root()).size == (48, 32)

    # metadata problems found by datasets: one readable error, not a traceback through its internals
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "../../x.png", "mask_file_name": "m.png"}))
    with pytest.raises(ValueError, match=r"the data set cannot be loaded: .*must be a relative path") as info:
        HFSource(tmp_path / "folder", cache_dir=str(tmp_path / "cache2")).items()
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "mask_file_name": "m.png"}\n{"file_name": \n')
    with pytest.raises(ValueError, match=r"the data set cannot be loaded: .*JSON parse error"):
        HFSource(tmp_path / "folder", cache_dir=str(tmp_path / "cache3")).items()


# ------------------------------------------------------------------------------ C: meta.json lists
def test_rorem_json_list_entries_and_limits(tmp_path):
    put(tmp_path / "source" / "a.png", IMAGE_PNG)
    put(tmp_path / "mask" / "a.png", MASK_PNG)
    entry = {"source": "source/a.png", "mask": "mask/a.png"}
    text = ("[\n" + ",\n".join([json.dumps({**entry, "id": "ok0"}), json.dumps({**entry, "id": "nan", "v": "NAN"}),
                                json.dumps({**entry, "id": "ok2", "pad": "p" * 70_000}),
                                json.dumps({**entry, "id": "ok3", "t": "ünïcode"}),
                                "[" * 5000 + "]" * 5000, json.dumps({**entry, "id": "lost"})]) + "\n]\n")
    (tmp_path / "meta.json").write_text(text.replace('"NAN"', "NaN"), encoding="utf-8")
    source = RoremSource(tmp_path, name="r")
    assert [i.source_id for i in source.items()] == ["ok0", "ok3"]
    messages = {f.key: f.message for f in source.listing_failures()}
    assert set(messages) == {"r_meta-entry-1", "r_meta-entry-2", "r_meta-entry-4"}
    assert "entry 1 holds the non-finite number NaN (field 'v')" in messages["r_meta-entry-1"]
    assert "entry 2 is 70" in messages["r_meta-entry-2"] and "65536-byte limit" in messages["r_meta-entry-2"]
    assert ("entry 4 (line 6) is nested too deeply to parse" in messages["r_meta-entry-4"]
            and "the rest of the list cannot be read" in messages["r_meta-entry-4"])


def test_rorem_large_json_list_is_streamed_across_chunks(tmp_path, monkeypatch):
    put(tmp_path / "source" / "a.png", IMAGE_PNG)
    put(tmp_path / "mask" / "a.png", MASK_PNG)
    n = 30_000  # about 3 MiB: several read chunks, entries cut at chunk borders
    entries = [{"source": "source/a.png", "mask": "mask/a.png", "id": f"{i:06d}", "score": i * 1.5,
                "caption": "é" * (i % 7)} for i in range(n)]
    (tmp_path / "meta.json").write_text("\ufeff" + json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    assert (tmp_path / "meta.json").stat().st_size > 2 * MAX_META_LINE_BYTES
    source = RoremSource(tmp_path, name="r")
    items = source.items()
    assert source.listing_failures() == []
    assert len(items) == n and items[-1].meta == {"score": (n - 1) * 1.5} and items[13].caption == "é" * 6


def test_rorem_jsonl_whose_first_line_is_a_list_and_non_utf8_list(tmp_path):
    put(tmp_path / "source" / "a.png", IMAGE_PNG)
    put(tmp_path / "mask" / "a.png", MASK_PNG)
    line = json.dumps({"source": "source/a.png", "mask": "mask/a.png"})
    (tmp_path / "meta.json").write_text(f'["not", "an", "entry"]\n{line}\n')
    source = RoremSource(tmp_path, name="r")
    assert [i.source_id for i in source.items()] == ["a"]
    (failure,) = source.listing_failures()
    assert failure.key == "r_meta-line-1" and "line 1 is not a JSON object" in failure.message
    # a byte that is not UTF-8 inside one list entry fails that entry only
    other = json.dumps({"source": "source/a.png", "mask": "mask/a.png", "id": "b"}).encode()
    (tmp_path / "meta.json").write_bytes(b"[" + line.encode() + b',\n{"source": "caf\xe9"},\n' + other + b"]")
    source = RoremSource(tmp_path, name="r")
    assert [i.source_id for i in source.items()] == ["a", "b"]
    (failure,) = source.listing_failures()
    assert failure.key == "r_meta-entry-1" and failure.error_type == "UnicodeDecodeError"
    assert "entry 1 (line 2) is not UTF-8 text: byte 0xe9" in failure.message


# ------------------------------------------------------------------------- D: size and signatures
def test_input_files_are_checked_by_size_and_signature_before_reading(tmp_path, monkeypatch):
    png = put(tmp_path / "a.png", IMAGE_PNG)
    with pytest.raises(InputError, match=rf"image file is too large: {len(IMAGE_PNG)} bytes > 100 byte limit"):
        read_input_file(png, key="image", max_file_bytes=100)
    text = put(tmp_path / "b.png", b"<html>not an image</html>")
    with pytest.raises(InputError, match=r"image is not an image file \(starts with b'<html>not an'"):
        decode_image(text, key="image")
    with pytest.raises(InputError, match=r"mask is not an image file \(starts with b'%PDF"):
        decode_image(b"%PDF-1.4 ...", key="mask")
    with pytest.raises(InputError, match="mask file is too large: 2000 bytes > 1000 byte limit"):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(1992), key="mask", max_file_bytes=1000)
    # the format comes from the bytes, not the name: a JPEG named .png decodes
    jpeg = tmp_path / "c.png"
    Image.fromarray(RGB).save(jpeg, format="JPEG")
    assert decode_image(jpeg, key="image").size == (48, 32)
    for fmt in ("GIF", "WEBP", "BMP", "TIFF"):
        Image.fromarray(RGB).save(tmp_path / f"x.{fmt}", format=fmt)
        assert decode_image(tmp_path / f"x.{fmt}", key="image").size == (48, 32)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="image path is not a file"):
        decode_image(fifo, key="image")  # not opened: opening a FIFO would block
    with pytest.raises(InputError, match="image path is not a file"):
        decode_image("/dev/zero", key="image")
    # nothing is read beyond the header when the signature is wrong
    big = put(tmp_path / "big.png", b"GARBAGE!" + bytes(5 << 20))
    reads = []
    real_read = os.fdopen

    def counting_fdopen(*args, **kwargs):
        f = real_read(*args, **kwargs)
        original = f.read

        def read(n=-1):
            data = original(n)
            reads.append(len(data))
            return data

        f.read = read
        return f

    monkeypatch.setattr(os, "fdopen", counting_fdopen)
    with pytest.raises(InputError, match="not an image file"):
        decode_image(big, key="image")
    assert sum(reads) <= 16


def test_load_stage_max_file_bytes_in_a_build(tmp_path):
    root = tmp_path / "ds"
    put(root / "images" / "a.png", IMAGE_PNG)
    put(root / "masks" / "a.png", MASK_PNG)
    put(root / "images" / "b.png", b"\x89PNG\r\n\x1a\n" + os.urandom(8000))
    put(root / "masks" / "b.png", MASK_PNG)
    cfg = {"type": "folder", "path": str(root), "name": "f"}
    result, failures, samples, _ = run_build(tmp_path, cfg, "stages.load.max_file_bytes=5000")
    check_accounted(cfg, failures, samples)
    (row,) = failures
    assert row["key"] == "f_b" and row["stage"] == "load" and row["error_type"] == "InputError"
    expected = f"image file is too large: 8008 bytes > 5000 byte limit (max_file_bytes): {root}/images/b.png"
    assert row["message"] == expected


# -------------------------------------------------------------------------------- E: tar inputs
def write_tar(path: Path, keys: list[str], image: bytes = IMAGE_PNG) -> list[tuple[str, int, int, int]]:
    """A webdataset tar (png + mask.png + txt per key); returns (name, header offset, data offset, size)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key in keys:
            sink.write({"__key__": key, "png": image, "mask.png": MASK_PNG, "txt": f"caption {key}".encode()})
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar]


def noisy_png(height: int = 32, width: int = 48) -> bytes:
    """A PNG that does not compress (so a cut .tar.gz is cut inside the data, not after it)."""
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))


def test_damaged_webdataset_shards_keep_what_can_be_read(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "good.tar", ["g1", "g2"])
    members = write_tar(tmp_path / "c.tar", ["c1", "c2", "c3"])
    c2_png = next(m for m in members if m[0] == "c2.png")
    data = (tmp_path / "c.tar").read_bytes()
    (d / "cut_data.tar").write_bytes(data[: c2_png[2] + 100])  # cut inside c2's image data
    members = write_tar(tmp_path / "h.tar", ["h1", "h2", "h3"])
    h3 = next(m for m in members if m[0].startswith("h3."))  # its first member
    data = (tmp_path / "h.tar").read_bytes()
    (d / "cut_header.tar").write_bytes(data[: h3[1] + 200])  # cut inside h3's first header
    (d / "not_a_tar.tar").write_bytes(b"<html>404 not found</html>\n" * 30)
    members = write_tar(tmp_path / "t.tar", ["t1", "t2", "t3", "t4"], image=noisy_png(128, 192))  # > gzip's window
    compressed = gzip.compress((tmp_path / "t.tar").read_bytes())
    (d / "trunc.tar.gz").write_bytes(compressed[: len(compressed) * 2 // 3])
    urls = [str(d / n) for n in ("good.tar", "cut_data.tar", "cut_header.tar", "not_a_tar.tar", "trunc.tar.gz")]
    cfg = {"type": "webdataset", "urls": urls, "name": "w"}

    result, failures, samples, _ = run_build(tmp_path, cfg)
    check_accounted(cfg, failures, samples)
    landed = sorted(s.meta["source_id"] for s in samples)
    assert {"g1", "g2", "c1", "h1", "h2", "t1", "t2"} <= set(landed) and not {"c2", "c3", "h3"} & set(landed)
    assert samples[0].caption.startswith("caption ")
    rows = by_key(failures)
    cut = rows["w_c2"]
    assert cut["stage"] == "list" and cut["error_type"] == "MemberCut"
    assert "member 'c2.png'" in cut["message"] and "cut short" in cut["message"]
    by_url = {Path(u).name: [r for r in failures if u in r["message"] and r["key"] not in ("w_c2",)
                             and r["error_type"] != "MemberCut"] for u in urls}
    assert by_url["good.tar"] == []
    (row,) = by_url["cut_data.tar"]
    assert row["error_type"] == "TruncatedTar"
    assert f"its data should end at byte {c2_png[2] + c2_png[3]}" in row["message"]
    (row,) = by_url["cut_header.tar"]
    assert row["error_type"] == "TruncatedTar"
    assert f"reading stopped at byte {h3[1]}, the header there is cut short; the 200 bytes after it" in row["message"]
    (row,) = by_url["not_a_tar.tar"]
    assert row["error_type"] == "NotATar" and "is not a tar archive" in row["message"] and "b'<html>'" in row["message"]
    (row,) = by_url["trunc.tar.gz"]
    assert row["error_type"] == "TruncatedTar" and "gzip" in row["message"] and "byte" in row["message"]
    assert rows["w_t3"]["error_type"] == "MemberCut"  # cut by the gzip truncation
    assert result.failed == len(failures) == 6 and result.ok == len(samples) == 7


def test_tar_members_are_checked_by_header_size_and_after_changes(tmp_path):
    members = write_tar(tmp_path / "a.tar", ["s1", "s2"])
    source = WebDatasetSource([str(tmp_path / "a.tar")], name="w")
    items = source.items()
    raw = source.read(items[1]).work["raw_image"]
    assert isinstance(raw, TarMember) and raw.size == len(IMAGE_PNG)
    # the header size is checked before any byte is read: a reference claiming 1 GB in a small file
    # reports the size, not a short read
    huge = TarMember(raw.url, raw.name, raw.offset, 1 << 30)
    with pytest.raises(InputError, match=r"image file is too large: 1073741824 bytes > 268435456 byte limit"):
        decode_image(huge, key="image")
    with pytest.raises(InputError, match=rf"mask file is too large: {len(IMAGE_PNG)} bytes > 10 byte limit"):
        decode_image(raw, key="mask", max_file_bytes=10)
    assert decode_image(raw, key="image").size == (48, 32)
    # the file is cut after listing: a failure of that sample, not a crash
    s2 = next(m for m in members if m[0] == "s2.png")
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: s2[2] + 10])
    with pytest.raises(InputError, match="cut short"):
        decode_image(raw, key="image")
    # ... or rewritten so that other bytes lie at the offset
    (tmp_path / "a.tar").write_bytes(bytes(512) + data)
    with pytest.raises(InputError, match="changed since it was indexed"):
        decode_image(raw, key="image")


def test_streamed_gz_shard_with_a_cut_member_fails_that_sample_only(tmp_path):
    members = write_tar(tmp_path / "t.tar", ["t1", "t2", "t3"], image=noisy_png())
    t2 = next(m for m in members if m[0] == "t2.png")
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar.gz").write_bytes(gzip.compress(data[: t2[2] + 50]))
    source = WebDatasetSource([str(tmp_path / "t.tar.gz")], name="gz")
    (item,) = source.items()
    assert item.source_id == "t1" and not item.refs["seekable"]
    assert isinstance(source.read(item).work["raw_image"], bytes)
    failures = {f.key: f for f in source.listing_failures()}
    assert failures["gz_t2"].error_type == "MemberCut"
    (stop,) = [f for k, f in failures.items() if k != "gz_t2"]
    assert stop.error_type == "TruncatedTar"
    assert f"{tmp_path}/t.tar.gz is truncated inside member 't2.png'" in stop.message


def test_tar_caption_that_is_not_utf8_or_too_big(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "ok", "png": IMAGE_PNG, "mask.png": MASK_PNG, "txt": "café".encode()})
        sink.write({"__key__": "latin", "png": IMAGE_PNG, "mask.png": MASK_PNG, "txt": b"caf\xe9"})
        sink.write({"__key__": "long", "png": IMAGE_PNG, "mask.png": MASK_PNG, "txt": b"x" * 70_000})
    source = WebDatasetSource(str(tmp_path / "a.tar"), name="w")
    assert [(i.source_id, i.caption) for i in source.items()] == [("ok", "café")]
    failures = {f.key: f for f in source.listing_failures()}
    assert failures["w_latin"].error_type == "BadCaption" and "is not UTF-8 text" in failures["w_latin"].message
    assert failures["w_long"].error_type == "MemberCut"
    assert "70000 bytes, over the 65536-byte" in failures["w_long"].message


# ------------------------------------------------------------------------------------ tario itself
def test_scan_tar_reports_offsets_and_what_was_not_read(tmp_path):
    members = write_tar(tmp_path / "a.tar", ["a", "b"])
    data = (tmp_path / "a.tar").read_bytes()
    end = members[-1][2] + -(-members[-1][3] // 512) * 512  # end of the last member's data

    samples, problems = scan_tar(str(tmp_path / "a.tar"), keep=("txt",))
    assert problems == [] and [s.key for s in samples] == ["a", "b"]
    assert samples[0].kept == {"txt": b"caption a"} and set(samples[0].members) == {"png", "mask.png", "txt"}
    offset, size = samples[1].members["png"]
    assert read_member(str(tmp_path / "a.tar"), (offset, size)) == IMAGE_PNG

    cases = {
        "concat.tar": (data + data, "trailing_data", end, len(data) * 2 - end),
        "garbage.tar": (data[:end] + b"junk" * 400, "corrupt", end, 1600),
        "no_end.tar": (data[:end], "no_end_marker", end, 0),
        "empty.tar": (b"", "not_a_tar", 0, 0),
    }
    for name, (content, kind, offset, unread) in cases.items():
        (tmp_path / name).write_bytes(content)
        samples, problems = scan_tar(str(tmp_path / name))
        (problem,) = problems
        assert (problem.kind, problem.offset, problem.unread) == (kind, offset, unread), (name, problem)
        assert str(tmp_path / name) in problem.message
        if kind != "not_a_tar":
            assert [s.key for s in samples] == ["a", "b"]
    for suffix, compress in (("bz2", bz2.compress), ("xz", lzma.compress)):
        (tmp_path / f"a.tar.{suffix}").write_bytes(compress(data))
        samples, problems = scan_tar(str(tmp_path / f"a.tar.{suffix}"))
        assert problems == [] and [s.key for s in samples] == ["a", "b"]
        (tmp_path / f"cut.tar.{suffix}").write_bytes(compress(data)[:-40])
        _, problems = scan_tar(str(tmp_path / f"cut.tar.{suffix}"))
        assert problems and problems[0].kind == "truncated", problems
    (problem,) = scan_tar(str(tmp_path / "missing.tar"))[1]
    assert problem.kind == "unreadable" and "cannot be opened" in problem.message


def test_tar_walk_names_that_are_not_utf8(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in (("caf\udce9.png", IMAGE_PNG), ("caf\udce9.mask.png", MASK_PNG),
                           ("caf\udce8.png", IMAGE_PNG), ("caf\udce8.mask.png", MASK_PNG)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    assert [e.key for e in TarWalk(str(path))] == ["caf\udce9", "caf\udce9", "caf\udce8", "caf\udce8"]
    source = WebDatasetSource(str(path), name="w")
    items = source.items()
    assert [i.source_id for i in items] == ["caf\\xe9", "caf\\xe8"] and items[0].key != items[1].key
    assert readable(items[0].refs["tar_key"]) == "caf\\xe9"
