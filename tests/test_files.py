"""The one atomic-write module (``layerloop/files.py``) and the one seed helper (``layerloop/seeds.py``)."""

import errno
import hashlib
import os

import numpy as np
import pytest

from layerloop.files import TMP_MARK, atomic_path, sha256_file, sha256_tree, write_atomic, write_json_atomic
from layerloop.seeds import rng_for, seed63, seed_words


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            assert TMP_MARK in tmp.name and tmp.parent == tmp_path
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_folder_is_swapped_whole(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"x")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_bytes(b"y")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_os_error_names_the_file(tmp_path):
    missing = tmp_path / "no-such-folder" / "x.json"
    with pytest.raises(OSError) as caught:
        write_atomic(missing, "x")
    assert caught.value.errno == errno.ENOENT
    assert "no-such-folder" in str(caught.value)


def test_hashes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"beta")
    (tmp_path / "a").write_bytes(b"alpha" * 300_000)  # more than one read chunk
    assert sha256_file(tmp_path / "a") == hashlib.sha256(b"alpha" * 300_000).hexdigest()
    before = sha256_tree(tmp_path)
    assert sha256_tree(tmp_path, exclude=("b",)) != before
    os.rename(tmp_path / "sub" / "b", tmp_path / "sub" / "c")
    assert sha256_tree(tmp_path) != before  # names count, not only bytes


def test_seeds_are_the_documented_digest():
    digest = hashlib.sha256(b"7\x00scene_000001\x00shadows").digest()
    expected = np.random.default_rng(int.from_bytes(digest[:16], "little")).random(3)
    assert np.array_equal(rng_for(7, "scene_000001", "shadows").random(3), expected)
    assert seed63(7, "x") == int.from_bytes(hashlib.sha256(b"7\x00x").digest()[:8], "little") >> 1
    assert 0 <= seed63(7, "x") < 2**63
    words = seed_words(1, 2, "shards")
    assert len(words) == 4 and all(0 <= w < 2**32 for w in words)
    assert seed_words(1, 2, "shards") != seed_words(1, 3, "shards")
