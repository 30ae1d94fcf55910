"""Listing and reading of every source type, and build_source's config validation."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerloop.datasets.base import make_key
from layerloop.datasets.imageio import decode_image, to_mask, to_rgb
from layerloop.datasets.sources import (DemoSource, FolderSource, HFSource, RoremSource, WebDatasetSource,
                                        build_source)
from layerloop.samples import KEY_PATTERN, LayeredSample, composite
from tests.messy_inputs import make_messy_rorem, png_bytes, scene


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def check_listing(source) -> list:
    items = source.items()
    keys = [item.key for item in items]
    assert len(keys) == len(set(keys))
    assert all(KEY_PATTERN.match(k) for k in keys)
    assert items == source.items()  # deterministic
    return items


# ------------------------------------------------------------------------------------------- RORem
@pytest.mark.parametrize("meta_format", ["jsonl", "json"])
def test_rorem_lists_every_entry_sorted_with_readable_listing_failures(tmp_path, meta_format):
    expected = make_messy_rorem(tmp_path, meta_format)
    source = RoremSource(tmp_path)
    items = check_listing(source)
    listed = {item.source_id for item in items}
    assert listed == {sid for sid in expected if not sid.startswith("meta-line")}
    assert [i.source_id for i in items] == sorted(listed)
    failures = source.listing_failures()
    if meta_format == "jsonl":
        (bad,) = [sid for sid in expected if sid.startswith("meta-line")]
        (failure,) = failures
        assert failure.key == make_key("rorem", bad) and failure.stage == "list"
        assert failure.error_type == "JSONDecodeError" and f"line {bad.split('-')[-1]}" in failure.message
    else:
        assert failures == []
    good = next(i for i in items if i.source_id == "good")
    assert good.caption == "a yellow box on a dark wall"
    assert good.refs == {"image": str(tmp_path / "source/good.png"), "mask": str(tmp_path / "mask/good.png"),
                         "background": str(tmp_path / "GT/good.png")}
    # entries whose files are missing are still items; the load stage fails them
    assert "missing_source" in listed
    sample = source.read(good)
    assert sample.key == good.key and sample.caption == good.caption
    assert sample.meta["source"] == "rorem" and sample.meta["source_id"] == "good"
    assert set(sample.work) == {"raw_image", "raw_mask", "raw_background", "raw_root"}
    assert sample.work["raw_root"] == os.path.realpath(tmp_path)  # the load stage checks paths against it


def test_rorem_duplicates_bad_entries_extras_and_limit(tmp_path):
    rgb, mask = scene()
    for stem in ("a", "b", "c"):
        save(tmp_path / f"source/{stem}.png", rgb)
        save(tmp_path / f"mask/{stem}.png", mask)
    meta = [
        {"source": "source/c.png", "mask": "mask/c.png", "caption": "C", "object": "cup", "kind": "weird"},
        {"source": "source/a.png", "mask": "mask/a.png", "id": "x1"},
        {"source": "source/b.png", "mask": "mask/b.png", "id": "x1"},  # duplicate id: second one fails
        {"source": "source/b.png"},  # no mask field
        ["not", "an", "object"],
    ]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    source = RoremSource(tmp_path, name="r")
    items = check_listing(source)
    assert [(i.key, i.source_id) for i in items] == [("r_c", "c"), ("r_x1", "x1")]
    assert items[1].refs["image"].endswith("source/a.png")
    assert items[0].meta == {"object": "cup", "entry_kind": "weird"}  # reserved names are prefixed
    kinds = {(f.key, f.error_type) for f in source.listing_failures()}
    assert kinds == {("r_x1", "DuplicateKey"), ("r_meta-entry-3", "BadMetaEntry"), ("r_meta-entry-4", "BadMetaEntry")}
    messages = " | ".join(f.message for f in source.listing_failures())
    assert "entry 3 has no 'mask' path" in messages and "entry 4 is not a JSON object" in messages
    assert [i.source_id for i in RoremSource(tmp_path, name="r", limit=1).items()] == ["c"]


def test_rorem_without_meta_pairs_by_stem(tmp_path):
    rgb, mask = scene()
    save(tmp_path / "source/one.jpg", rgb)
    save(tmp_path / "mask/one.png", mask)
    save(tmp_path / "GT/one.png", rgb)
    save(tmp_path / "source/two.png", rgb)
    save(tmp_path / "mask/two.png", mask)  # no GT: fine, no background
    save(tmp_path / "source/lonely.png", rgb)  # no mask
    save(tmp_path / "mask/orphan.png", mask)  # no source
    (tmp_path / "source/notes.txt").write_text("not an image")
    source = RoremSource(tmp_path)
    items = check_listing(source)
    assert [(i.source_id, sorted(i.refs)) for i in items] == [("one", ["background", "image", "mask"]),
                                                              ("two", ["image", "mask"])]
    failures = {f.key: (f.error_type, f.message) for f in source.listing_failures()}
    assert failures["rorem_lonely"][0] == "MissingMask" and "lonely.png has no mask" in failures["rorem_lonely"][1]
    assert failures["rorem_orphan"][0] == "MissingImage"
    with pytest.raises(FileNotFoundError, match="not a RORem folder"):
        RoremSource(tmp_path / "nothing").items()


def test_source_pickles_without_its_listing(tmp_path):
    make_messy_rorem(tmp_path)
    source = RoremSource(tmp_path)
    items = source.items()
    clone = pickle.loads(pickle.dumps(source))
    assert not any(k.startswith("_cache_") for k in vars(clone))
    assert clone.items() == items


# ------------------------------------------------------------------------------------------ folder
def test_folder_source_matches_any_extension_and_reports_strays(tmp_path):
    rgb, mask = scene()
    extensions = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
    for ext in extensions:
        save(tmp_path / f"images/im_{ext}.{ext}", rgb)
        save(tmp_path / f"masks/im_{ext}.png", mask)
    save(tmp_path / "bg/im_png.png", rgb)
    (tmp_path / "images/im_png.txt").write_text("a caption from a side file\n")
    save(tmp_path / "images/no_mask.png", rgb)
    save(tmp_path / "masks/no_image.png", mask)
    save(tmp_path / "images/twice.png", rgb)
    save(tmp_path / "images/twice.jpg", rgb)
    save(tmp_path / "masks/twice.png", mask)
    source = FolderSource(tmp_path, background_dir="bg")
    items = check_listing(source)
    assert [i.source_id for i in items] == sorted(f"im_{e}" for e in extensions)
    by_id = {i.source_id: i for i in items}
    assert by_id["im_png"].caption == "a caption from a side file"
    assert "background" in by_id["im_png"].refs and "background" not in by_id["im_jpg"].refs
    failures = {f.key: f.error_type for f in source.listing_failures()}
    assert failures == {"folder_no_mask": "MissingMask", "folder_no_image": "MissingImage",
                        "folder_twice": "AmbiguousFile"}
    for item in items:
        sample = source.read(item)
        assert to_rgb(decode_image(sample.work["raw_image"], key="image")).shape == rgb.shape


# ------------------------------------------------------------------------------------ Hugging Face
def test_hf_imagefolder_with_mask_column(tmp_path):
    rgb, mask = scene()
    data = tmp_path / "data" / "train"
    rows = []
    for i in range(3):
        save(data / f"img{i}.png", rgb)
        save(data / f"mask{i}.png", mask)
        rows.append({"file_name": f"img{i}.png", "mask_file_name": f"mask{i}.png", "text": f"caption {i}"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = HFSource(tmp_path / "data", caption_column="text", cache_dir=str(tmp_path / "cache"))
    assert source.resolved_format() == "imagefolder"
    items = check_listing(source)
    assert [(i.key, i.caption) for i in items] == [(f"hf_{i}", f"caption {i}") for i in range(3)]
    clone = pickle.loads(pickle.dumps(source))
    assert "_cache_dataset" not in vars(clone)
    sample = clone.read(items[1])  # re-opens the data set in the "worker"
    assert np.array_equal(to_rgb(decode_image(sample.work["raw_image"], key="image")), rgb)
    assert np.array_equal(to_mask(decode_image(sample.work["raw_mask"], key="mask")), mask)
    with pytest.raises(ValueError, match=r"column\(s\) \['matte'\] not found"):
        HFSource(tmp_path / "data", mask_column="matte", cache_dir=str(tmp_path / "cache")).items()


def test_hf_parquet_with_embedded_bytes_and_background(tmp_path):
    import datasets

    rgb, mask = scene()
    n = 4
    table = {"image": [{"bytes": png_bytes(Image.fromarray(rgb)), "path": None}] * n,
             "mask": [{"bytes": png_bytes(Image.fromarray(mask)), "path": None}] * n,
             "bg": [{"bytes": png_bytes(Image.fromarray(rgb[::-1])), "path": None}] * n,
             "prompt": [f"p{i}" for i in range(n)]}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(), "bg": datasets.Image(),
                                  "prompt": datasets.Value("string")})
    parquet = tmp_path / "part.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(parquet))
    source = build_source({"type": "hf", "path": str(parquet), "background_column": "bg",
                           "caption_column": "prompt", "name": "pq", "cache_dir": str(tmp_path / "cache")})
    assert isinstance(source, HFSource) and source.resolved_format() == "parquet"
    items = check_listing(source)
    assert [i.key for i in items] == [f"pq_{i}" for i in range(n)] and items[3].caption == "p3"
    sample = source.read(items[3])
    assert isinstance(sample.work["raw_image"], bytes)
    assert np.array_equal(to_rgb(decode_image(sample.work["raw_background"], key="background")), rgb[::-1])


# -------------------------------------------------------------------------------------- WebDataset
def write_generic_shard(path: Path, keys: list[str], with_mask: bool = True) -> None:
    import webdataset as wds

    rgb, mask = scene()
    with wds.TarWriter(str(path)) as sink:
        for k in keys:
            record = {"__key__": k, "jpg": png_bytes(Image.fromarray(rgb)), "txt": f"caption of {k}".encode()}
            if with_mask:
                record["mask.png"] = png_bytes(Image.fromarray(mask))
            sink.write(record)


def test_webdataset_generic_shards_seek_and_stream(tmp_path):
    write_generic_shard(tmp_path / "a-000.tar", ["s1", "s2", "s3"])
    write_generic_shard(tmp_path / "a-001.tar", ["s4", "s2"])  # s2 again: a duplicate across shards
    write_generic_shard(tmp_path / "a-002.tar", ["nomask"], with_mask=False)
    source = WebDatasetSource(str(tmp_path / "a-{000..002}.tar"))
    items = check_listing(source)
    assert [i.source_id for i in items] == ["s1", "s2", "s3", "s4"]
    assert items[0].caption == "caption of s1" and items[0].refs["seekable"]
    failures = {f.key: f.error_type for f in source.listing_failures()}
    assert failures == {"wds_s2": "DuplicateKey", "wds_nomask": "MissingMember"}
    rgb, mask = scene()
    for item in items:
        sample = source.read(item)
        assert np.array_equal(to_mask(decode_image(sample.work["raw_mask"], key="mask")), mask)

    # compressed shards cannot be seeked into: they are streamed with one forward cursor
    gz = tmp_path / "b-000.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "a-000.tar").read_bytes()))
    streamed = WebDatasetSource([str(gz)], name="gz")
    items = check_listing(streamed)
    assert not items[0].refs["seekable"]
    for item in [items[0], items[2], items[1]]:  # out of order: the cursor restarts when it must
        sample = streamed.read(item)
        assert np.array_equal(to_rgb(decode_image(sample.work["raw_image"], key="image")), rgb)


def test_webdataset_variants_list_each_sample_several_times(tmp_path):
    write_generic_shard(tmp_path / "a-000.tar", ["s1", "s2"])
    gz = tmp_path / "b-000.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "a-000.tar").read_bytes()))
    for url, name in ((str(tmp_path / "a-000.tar"), "held"), (str(gz), "gz")):
        source = build_source({"type": "webdataset", "urls": url, "name": name, "variants": 3})
        items = check_listing(source)
        assert [i.key for i in items] == [f"{name}_s{n}-v{v}" for n in (1, 2) for v in range(3)]
        assert [i.meta for i in items[:3]] == [{"input_key": f"{name}_s1", "variant": v} for v in range(3)]
        first = [source.read(item).work["raw_image"] for item in items]
        assert first[0] == first[1] == first[2] and first[3] == first[5]  # streamed: variants reuse the record
        sample = source.read(items[4])
        assert sample.meta["input_key"] == f"{name}_s2" and sample.meta["source_id"] == "s2"
    with pytest.raises(ValueError, match="variants"):
        build_source({"type": "webdataset", "urls": str(tmp_path / "a-000.tar"), "variants": 0})


def test_webdataset_reads_a_layerloop_shard(tmp_path):
    import webdataset as wds

    rgb, mask = scene()
    foreground = np.dstack([rgb, mask])
    background = np.full_like(rgb, 60)
    sample = LayeredSample(key="demo_7", composite=composite(foreground, background), background=background,
                           foreground=foreground, mask=np.full_like(mask, 255), object_mask=mask, caption="a box")
    with wds.TarWriter(str(tmp_path / "ll-000000.tar")) as sink:
        sink.write(sample.to_wds())
    source = build_source({"type": "webdataset", "urls": [str(tmp_path / "ll-000000.tar")], "name": "again"})
    (item,) = check_listing(source)
    assert item.key == "again_demo_7" and item.caption == "a box"
    assert {role: m[0] for role, m in item.refs["members"].items()} == {
        "image": "composite.png", "mask": "object_mask.png", "background": "background.png"}
    read = source.read(item)
    assert np.array_equal(to_mask(decode_image(read.work["raw_mask"], key="mask")), mask)
    assert np.array_equal(to_rgb(decode_image(read.work["raw_background"], key="background")), background)


# -------------------------------------------------------------------------------------------- demo
def test_demo_source_generates_once_and_reads_as_rorem(tmp_path, monkeypatch):
    calls = []

    def fake_generate(out_dir, n, seed=0, size=256):
        # the real generator's contract: RORem layout with meta entries carrying caption/object/id
        calls.append((Path(out_dir), n, seed, size))
        entries = []
        for i in range(n):
            rgb, mask = scene(size, size)
            save(Path(out_dir) / f"source/{i:04d}.png", rgb)
            save(Path(out_dir) / f"mask/{i:04d}.png", mask)
            save(Path(out_dir) / f"GT/{i:04d}.png", rgb)
            entries.append({"source": f"source/{i:04d}.png", "mask": f"mask/{i:04d}.png", "GT": f"GT/{i:04d}.png",
                            "caption": f"scene {i}", "object": "box", "id": f"{i:04d}"})
        (Path(out_dir) / "meta.json").write_text(json.dumps(entries))
        return Path(out_dir)

    monkeypatch.setitem(sys.modules, "layerloop.datasets.demo_scenes",
                        types.SimpleNamespace(generate_demo_data=fake_generate))
    source = build_source({"type": "demo", "path": str(tmp_path / "demo"), "n": 3, "seed": 5, "size": 64})
    assert isinstance(source, DemoSource)
    items = check_listing(source)
    assert calls == [(tmp_path / "demo", 3, 5, 64)]  # listing twice generated once
    assert [(i.key, i.caption, i.meta) for i in items] == [
        (f"demo_{i:04d}", f"scene {i}", {"object": "box"}) for i in range(3)]
    assert set(source.read(items[0]).work) == {"raw_image", "raw_mask", "raw_background", "raw_root"}


def test_demo_source_with_the_real_generator(tmp_path):
    pytest.importorskip("layerloop.datasets.demo_scenes")  # written in parallel; runs once it exists
    source = DemoSource(tmp_path / "demo", n=3, seed=1, size=64)
    items = check_listing(source)
    assert len(items) == 3 and source.listing_failures() == []
    assert all(item.caption for item in items)
    assert all(Path(p).is_file() for item in items for p in item.refs.values())


# ---------------------------------------------------------------------------------------- configs
def test_build_source_validates_per_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = build_source({"type": "rorem", "path": "data/rorem", "limit": 5})
    assert isinstance(source, RoremSource) and source.path == tmp_path / "data/rorem" and source.limit == 5
    folder = build_source({"type": "folder", "path": "f", "image_dir": "img", "mask_dir": "m"})
    assert isinstance(folder, FolderSource) and folder.path.is_absolute()
    wds_source = build_source({"type": "webdataset", "urls": "shards/x-{000..001}.tar"})
    assert wds_source.urls == str(tmp_path / "shards/x-{000..001}.tar")
    assert build_source({"type": "webdataset", "urls": "pipe:cat a.tar"}).urls == "pipe:cat a.tar"
    for kind, extra in (("rorem", {"path": "r"}), ("folder", {"path": "f"}), ("hf", {"path": "h"})):
        assert not build_source({"type": kind, **extra}).allow_outside_root
        assert build_source({"type": kind, **extra, "allow_outside_root": True}).allow_outside_root
    with pytest.raises(ValueError, match="allow_outside_root"):  # the urls are the data: no root to leave
        build_source({"type": "webdataset", "urls": "x.tar", "allow_outside_root": True})
    with pytest.raises(ValueError, match=r"source type 'rorem': (.|\n)*colour"):
        build_source({"type": "rorem", "path": "x", "colour": "blue"})
    with pytest.raises(ValueError, match=r"source type 'hf': .*path"):
        build_source({"type": "hf"})
    with pytest.raises(ValueError, match=r"source type 'folder': name"):
        build_source({"type": "folder", "path": "x", "name": "has space"})
    with pytest.raises(ValueError, match=r"source type 'lmdb' is not one of rorem, folder, hf, webdataset, demo"):
        build_source({"type": "lmdb", "path": "x"})
