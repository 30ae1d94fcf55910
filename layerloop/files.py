"""One way to write a file that a reader never sees half-written, and one way to hash files.

Every file layerloop commits (run records, reports, checkpoints, LoRA weights, demo images) is written
under a temporary name in the same folder and renamed over its final name (``os.replace``, atomic on
POSIX within one file system). A crash leaves at most a temporary ``<name>.tmp-<token>`` behind, which
readers ignore (``TMP_MARK``) and writers clean up. An ``OSError`` (disk full, read-only folder) names the
file that was being written, not only the cause.

Shards are the one exception with their own commit (``datasets/shards.py``): a tar and its index are
renamed together under the run lock's ownership check. They use ``TMP_MARK`` and ``sha256_file`` from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from layerloop.errors import attach_path

TMP_MARK = ".tmp-"
_CHUNK = 1 << 20


def temp_sibling(path: str | os.PathLike, hidden: bool = False) -> Path:
    """``<name>.tmp-<token>`` next to ``path`` (``.<name>...`` with ``hidden``): same folder, so the final
    rename is atomic; a fresh token, so two writers never share a temporary."""
    path = Path(path)
    return path.with_name(f"{'.' if hidden else ''}{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, hidden: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; the body writes a file (or fills a folder) there, and on
    success it replaces ``path`` (a folder already at ``path`` is swapped out and removed). On any error
    the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_sibling(path, hidden)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            old = temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as error:
        raise attach_path(error, path) from error
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str, hidden: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path, hidden) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def dump_json(value: Any, *, indent: int | None = 2, sort_keys: bool = True, ensure_ascii: bool = True,
              default: Any = None, newline: bool = True) -> str:
    return json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      default=default) + ("\n" if newline else "")


def write_json_atomic(path: str | os.PathLike, value: Any, *, mkdir: bool = False, **options: Any) -> None:
    """``value`` as JSON (indent 2, sorted keys, a final newline unless ``newline=False``), atomically."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dump_json(value, **options))


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (64 hex digits) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike, exclude: Iterable[str] = ()) -> str:
    """sha256 over the relative names and bytes of every file below ``path`` (sorted by name)."""
    digest = hashlib.sha256()
    root, exclude = Path(path), set(exclude)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(str(file.relative_to(root)).encode() + b"\x00")
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str, digits: int = 64) -> str:
    """sha256 of a text's UTF-8 bytes, the first ``digits`` hex digits (fingerprints of key lists, configs)."""
    return hashlib.sha256(text.encode()).hexdigest()[:digits]
