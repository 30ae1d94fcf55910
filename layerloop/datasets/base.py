"""The source contract: what a pipeline reads its inputs from.

A source lists its items up front (``items()``: cheap, deterministic order, one per key) so that work can
be partitioned into shard groups before anything is decoded, and reads one item on demand (``read``)
inside a worker. ``read`` returns a LayeredSample whose ``work`` holds the raw inputs (paths, bytes or
PIL images under ``raw_image``, ``raw_mask``, ``raw_background``); the ``load`` stage decodes and
normalises them, so decoding errors become per-sample failures like any other stage's.

Problems found while listing (an unreadable ``meta.json`` line, a duplicate key, a mask with no image)
are returned by ``listing_failures()`` and land in ``failures.parquet`` too.
Sources are pickled to Ray workers: keep them to plain attributes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from layerloop.samples import Failure, LayeredSample

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, [A-Za-z0-9_-]+, "<source name>_<id>"
    source: str  # source name
    source_id: str  # the id as the source knows it (a file stem, a row index, a tar key)
    refs: dict[str, Any] = field(default_factory=dict)  # where to read from: paths, row indices
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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
    of the original id so that two ids that clean to the same text stay distinct."""
    raw = f"{source}_{source_id}"
    if _BAD_KEY_CHARS.search(raw) is None:
        return raw
    cleaned = _BAD_KEY_CHARS.sub("-", raw).strip("-") or "item"
    digest = hashlib.sha1(source_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}"
