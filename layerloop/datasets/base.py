"""The source contract: what a pipeline reads its inputs from.

A source lists its items up front (``items()``: cheap, deterministic order, one per key) so that work can
be partitioned into shard groups before anything is decoded, and reads one item on demand (``read``)
inside a worker. ``read`` returns a LayeredSample whose ``work`` holds the raw inputs (paths, bytes or
PIL images under ``raw_image``, ``raw_mask``, ``raw_background``); the ``load`` stage decodes and
normalises them, so decoding errors become per-sample failures like any other stage's.

Problems found while listing (an unreadable ``meta.json`` line, a duplicate key, a mask with no image)
are returned by ``listing_failures()`` and land in ``failures.parquet`` too.
Sources are pickled to Ray workers: keep them to plain attributes.

Text a source emits (``source_id``, caption, metadata, failure messages) must be valid Unicode, because it
ends up in parquet indexes and JSON members. On Linux a file name that is not UTF-8 reaches Python as a
``str`` with surrogate escapes (``caf\\udce9.png``); ``readable`` turns those into a visible escaped form
(``caf\\xe9.png``) while ``refs`` keep the real name for opening, and ``make_key`` hashes the real name, so
two names that differ only in such a byte keep distinct keys. ``SourceItem`` applies ``readable`` to its
text fields itself.

File-based sources only read inside their dataset root (``inside_root``): a ``..`` path, an absolute path
or a symlink that resolves elsewhere is refused with "outside the dataset root: <path>", unless the
source's config says ``allow_outside_root: true``. Sources check at listing time (the item becomes a
listing failure) and again in ``read``; the ``load`` stage checks once more right before it opens a file
(``work["raw_root"]``), because files can change between listing and reading.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from layerloop.samples import Failure, LayeredSample

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
OUTSIDE_ROOT = "outside the dataset root"


def readable(text: str) -> str:
    """``text`` with lone surrogates escaped: a surrogate-escaped byte (a file name that is not UTF-8)
    becomes ``\\xNN``, any other lone surrogate ``\\uNNNN``. The result always encodes as UTF-8."""
    if not isinstance(text, str) or _SURROGATES.search(text) is None:
        return text

    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATES.sub(escape, text)


def readable_value(value: Any) -> Any:
    """``readable`` applied to every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, dict):
        return {readable(str(k)): readable_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [readable_value(v) for v in value]
    return value


class OutsideRootError(ValueError):
    """A path resolves outside the dataset root (``..``, an absolute path, a symlink)."""


def real_root(root: str | os.PathLike) -> str:
    """The dataset root with every symlink resolved (the root itself may be a link)."""
    return os.path.realpath(os.fspath(root))


def resolve_in_root(path: str | os.PathLike, root: str) -> tuple[str, bool]:
    """(``path`` with every symlink resolved, whether that lies inside ``root``). ``path`` is absolute or
    relative to ``root`` (never to the current directory); ``root`` is already resolved (``real_root``).
    Reads nothing but the links on the way."""
    path = os.fspath(path)
    resolved = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    try:
        return resolved, os.path.commonpath([resolved, root]) == root
    except ValueError:  # different drives
        return resolved, False


def inside_root(path: str | os.PathLike, root: str) -> bool:
    return resolve_in_root(path, root)[1]


def check_inside_root(path: str | os.PathLike, root: str | None, what: str = "file") -> None:
    """Raise ``OutsideRootError`` unless ``path`` lies inside ``root``; ``root`` None allows anything."""
    if "\0" in os.fsdecode(os.fspath(path)):
        raise OutsideRootError(f"{what} path holds a NUL character, which no file name can: "
                               f"{readable(os.fsdecode(os.fspath(path)))!r}")
    if root is None:
        return
    resolved, inside = resolve_in_root(path, root)
    if not inside:
        shown = readable(os.fspath(path))
        via = f" (it resolves to {readable(resolved)})" if resolved != os.fspath(path) else ""
        raise OutsideRootError(f"{what} is {OUTSIDE_ROOT}: {shown}{via}; the root is {readable(root)} "
                               "(set allow_outside_root: true in the source config to read it anyway)")


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, [A-Za-z0-9_-]+, "<source name>_<id>"
    source: str  # source name
    source_id: str  # the id as the source knows it (a file stem, a row index, a tar key)
    refs: dict[str, Any] = field(default_factory=dict)  # where to read from: paths, row indices
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # valid Unicode only (see the module docstring); refs keep the real names
        object.__setattr__(self, "source_id", readable(self.source_id))
        object.__setattr__(self, "caption", readable(self.caption) if self.caption is not None else None)
        object.__setattr__(self, "meta", readable_value(self.meta))


class Source:
    name: str = "source"

    def items(self) -> list[SourceItem]:
        raise TypeError(f"{type(self).__name__} must implement items()")

    def read(self, item: SourceItem) -> LayeredSample:
        """Default for file-based sources: the raw inputs are the paths in ``item.refs``."""
        return new_sample(item, {f"raw_{k}": v for k, v in item.refs.items()})

    def listing_failures(self) -> list[Failure]:
        return []


def new_sample(item: SourceItem, work: dict[str, Any]) -> LayeredSample:
    meta = {"source": item.source, "source_id": item.source_id, **item.meta}
    return LayeredSample(key=item.key, caption=item.caption or "", meta=meta, work=dict(work))


def make_key(source: str, source_id: str) -> str:
    """A webdataset-safe key from a source name and an arbitrary id (non-ASCII, dots, spaces...).

    Ids that are already safe are kept as they are; others are cleaned and suffixed with a short hash
    of the original id so that two ids that clean to the same text stay distinct. Pass the real id
    (surrogate escapes included, see ``readable``): the hash is taken of it."""
    raw = f"{source}_{source_id}"
    if _BAD_KEY_CHARS.search(raw) is None:
        return raw
    cleaned = _BAD_KEY_CHARS.sub("-", raw).strip("-") or "item"
    digest = hashlib.sha1(source_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}"
