"""One tar reader (``datasets/tario.py``) behind the shard reader and the training stream, one temporary
naming (``files.py``) behind demo-data writes, one seed helper (``seeds.py``) behind the logo stream."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from layerloop.datasets import demo_scenes
from layerloop.datasets.logos import SOURCE, LogoSynthesizer
from layerloop.datasets.shards import ShardWriter, read_samples
from layerloop.datasets.stream import _tar_members
from layerloop.datasets.tario import TarReadError, iter_samples
from layerloop.files import temp_sibling
from tests.test_samples import make_quadruple


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    ShardWriter(out, "t").write(0, [make_quadruple(f"t_{i}", seed=i) for i in range(3)])
    return out / "t-000000.tar"


def _tar(path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_iter_samples_groups_like_webdataset(shard, tmp_path):
    mixed = tmp_path / "mixed.tar"
    _tar(mixed, [("a.TXT", b"1"), ("a.json", b"{}"), ("b.txt", b"2"), ("nodot", b"x"), ("a.txt", b"3"),
                 ("__meta__", b"m"), ("dir/c.Seg.PNG", b"4")])
    for url in (str(shard), str(mixed)):
        theirs = [{k: v for k, v in r.items() if not k.startswith("__")} | {"__key__": r["__key__"]}
                  for r in wds.WebDataset(url, shardshuffle=False, empty_check=False)]
        ours = [{**members, "__key__": key} for key, members in iter_samples(url)]
        assert ours == theirs


def test_read_samples_takes_a_brace_pattern_and_a_list(shard):
    pattern = str(shard).replace("000000", "{000000..000000}")
    assert [s.key for s in read_samples(pattern)] == [s.key for s in read_samples([shard])] == ["t_0", "t_1", "t_2"]


def test_read_samples_raises_on_a_truncated_shard_after_the_whole_samples(shard, tmp_path):
    cut = tmp_path / "cut.tar"
    data = shard.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    keys = []
    with pytest.raises(TarReadError, match="cut.tar"):
        for sample in read_samples(cut):
            keys.append(sample.key)
    assert keys and keys == ["t_0", "t_1", "t_2"][: len(keys)] and len(keys) < 3


def test_read_samples_refuses_a_repeated_member(tmp_path):
    _tar(tmp_path / "dup.tar", [("a.txt", b"1"), ("a.TXT", b"2")])
    with pytest.raises(TarReadError, match="repeats extension 'txt'"):
        list(read_samples(tmp_path / "dup.tar"))


def test_stream_index_reads_offsets_through_tario(shard, tmp_path):
    members = _tar_members(shard)
    assert list(members) == ["t_0", "t_1", "t_2"]
    with tarfile.open(shard) as tar:
        infos = {info.name: info for info in tar}
    for key, found in members.items():
        for suffix, (offset, size) in found.items():
            assert (infos[f"{key}.{suffix}"].offset_data, infos[f"{key}.{suffix}"].size) == (offset, size)
    gz = tmp_path / "t.tar"
    gz.write_bytes(gzip.compress(shard.read_bytes(), mtime=0))
    with pytest.raises(TarReadError, match="gzip-compressed"):
        _tar_members(gz)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(TarReadError, match="truncated"):
        _tar_members(cut)


def test_logo_stream_seed_is_the_old_joined_string():
    for seed, index in ((0, 0), (7, 123), (-3, 10**9)):
        digest = hashlib.sha256(f"{SOURCE}\x00{seed}\x00{index}".encode()).digest()
        old = np.random.default_rng(int.from_bytes(digest[:16], "little"))
        assert (LogoSynthesizer(seed=seed).rng(index).random(4) == old.random(4)).all()


def test_demo_temporaries_old_and_new_naming_are_its_own(tmp_path):
    demo_scenes.generate_demo_data(tmp_path, n=1, size=32)
    png = tmp_path / "source" / "scene_000000.png"
    new, old = temp_sibling(png, hidden=True), png.with_name(f".{png.name}.tmp4242")
    for leftover in (new, old, temp_sibling(tmp_path / "meta.json", hidden=True)):
        leftover.write_bytes(b"half")
    assert demo_scenes.foreign_files(tmp_path) == []
    demo_scenes.generate_demo_data(tmp_path, n=2, size=32)  # a re-render removes the scene temporaries
    assert not new.exists() and not old.exists()


def test_demo_write_error_names_the_file(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_bytes", full)
    with pytest.raises(OSError, match="scene_000000.png"):
        demo_scenes.generate_demo_data(tmp_path / "d", n=1, size=32)
    assert not any(p.name.startswith(".") for p in (tmp_path / "d").rglob("*"))
