"""Training stream over WebDataset shards: weighted sources, shuffling, kind filter, exact resume.

``ShardStream`` yields batches of ``LayeredSample`` forever. Its whole position is a handful of integers
(``state_dict``), because every random choice is a pure function of (seed, counters):

* **Index.** Each source lists its samples up front: per shard, the rows of ``<shard>.parquet`` with
  status ok (in tar order, which is the order ``ShardWriter`` writes them), else a scan of the tar's
  ``json`` members. Only samples of the wanted ``kinds`` enter the index, so a kind filter never skips
  at read time and positions stay exact. Member offsets come from the tar headers (one pass of
  ``tario.TarWalk``, which reads the shard through once), so reading sample i is a seek and a read
  (``tario.read_member``, which checks the member's header), not a pass over the shard.
* **Epochs.** Source ``s`` in epoch ``e`` visits its shards in an order permuted by ``(seed, s, e)``;
  the resulting sample sequence is cut into windows of ``shuffle_buffer`` samples and each window is
  permuted by ``(seed, s, e, window)``. This is a shuffle buffer whose state is one integer: samples mix
  across the neighbouring shards of a window, and no buffer contents have to be checkpointed.
* **Weights.** Draw ``i`` (counted over all ranks) picks source ``s`` with probability
  ``weight_s / sum(weights)`` from ``default_rng([seed, i])``; weight 2 is drawn twice as often as
  weight 1. Each source counts the samples taken from it and cycles through epochs independently.
* **Ranks.** A global batch is ``batch_size * world_size`` consecutive draws; rank r reads draws
  ``[r * batch_size, (r + 1) * batch_size)`` of it. Every rank advances the same counters, so one
  rank's ``state_dict`` restores all of them (the trainer checkpoints rank 0's).

Shards are local files or objects in a store (``s3://bucket/run`` as ``run_dir``, or ``s3://.../x-{..}.tar``
as ``urls``; ``layerloop.storage``): exact random access needs seekable tars, and a store serves ranged
GETs, so reading sample i is one ranged GET of its members' header block and data (the same checks as a
local read). The index pass streams each tar once. ``http://`` or ``pipe:`` URLs are refused (no seeking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from layerloop import storage
from layerloop.datasets.shards import read_parquet, shard_paths
from layerloop.datasets.tario import TarReadError, TarWalk, local_path, raise_problems, read_member
from layerloop.files import sha256_text
from layerloop.samples import KINDS, LayeredSample
from layerloop.seeds import seed_words

STATE_VERSION = 1


@dataclass(frozen=True)
class WeightedShards:
    """One training source: shard tars (``urls``: a path, a brace pattern such as
    ``/data/x-{000000..000009}.tar``, or a list) or a run directory (``run_dir``: its committed shards),
    drawn with relative ``weight``."""

    urls: str | Sequence[str] | None = None
    run_dir: str | None = None
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if (self.urls is None) == (self.run_dir is None):
            raise ValueError(f"source {self.name!r}: give exactly one of urls or run_dir")
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")

    def shard_files(self) -> list[Path]:
        if self.run_dir is not None:
            found = shard_paths(self.run_dir)
            if not found:
                raise FileNotFoundError(f"source {self.name!r}: no committed shards in {self.run_dir}")
            return found
        from webdataset.shardlists import expand_urls

        urls = expand_urls(self.urls) if isinstance(self.urls, str) else [str(u) for u in self.urls]
        paths = []
        for url in urls:
            if storage.is_remote(url) and not url.startswith(("http://", "https://")):
                stored = storage.location(url)
                if not stored.is_file():
                    raise FileNotFoundError(f"source {self.name!r}: shard {stored} does not exist")
                paths.append(stored)
                continue
            local = local_path(url)
            if local is None:
                raise ValueError(f"source {self.name!r}: {url} is not a local file; the training stream seeks "
                                 "inside tars for exact resume, so put shards on a (shared) filesystem")
            path = Path(local)
            if not path.is_file():
                raise FileNotFoundError(f"source {self.name!r}: shard {path} does not exist")
            paths.append(path)
        return paths


@dataclass(frozen=True)
class _Entry:
    key: str
    kind: str
    members: dict[str, tuple[int, int]]  # tar member suffix -> (data offset, size)


def _url(path: Path | storage.StorePath) -> str:
    return path.url if isinstance(path, storage.StorePath) else str(path)


def _tar_members(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {suffix: (offset, size)} from the tar headers (one ``tario.TarWalk``); members of a key are
    merged wherever they stand. Raises ``TarReadError`` for a shard that cannot be read whole, or one that
    is compressed (its members cannot be read by offset)."""
    walk = TarWalk(_url(path))
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for entry in walk:
        if entry.key is not None and entry.ext is not None:
            out.setdefault(entry.key, {})[entry.ext] = (entry.offset, entry.size)
    if walk.compression is not None:
        raise TarReadError(f"{path} is {walk.compression}-compressed: the training stream reads members by "
                           "offset, so it needs plain tars")
    raise_problems(walk.problems)
    return out


def _read_member(path: Path, key: str, suffix: str, ref: tuple[int, int]) -> bytes:
    return read_member(_url(path), ref, name=f"member {key}.{suffix}")


def index_shard(path: Path) -> list[_Entry]:
    """Samples of one shard in tar order with their kinds: from ``<shard>.parquet`` (ok rows) when the
    shard has one, else from each sample's ``json`` member."""
    members = _tar_members(path)
    parquet = path.with_suffix(".parquet")
    if parquet.is_file():
        table = (read_parquet(parquet, columns=["key", "status", "kind"]) if isinstance(parquet, storage.StorePath)
                 else pq.read_table(parquet, columns=["key", "status", "kind"]))
        rows = [r for r in table.to_pylist() if r["status"] == "ok"]
        missing = [r["key"] for r in rows if r["key"] not in members]
        if missing:
            raise ValueError(f"{path} lacks samples its index {parquet.name} lists as ok: {missing[:3]}")
        return [_Entry(r["key"], r["kind"] or "quadruple", members[r["key"]]) for r in rows]
    entries = []
    for key, found in members.items():
        kind = "quadruple"
        if "json" in found:
            kind = json.loads(_read_member(path, key, "json", found["json"])).get("kind", kind)
        entries.append(_Entry(key, kind, found))
    return entries


class NoSamplesOfKind(ValueError):
    """A source (or every source of a stream) has no samples of the kinds the stream wants."""


class _SourceIndex:
    """The wanted samples of one source, shard by shard, and its per-epoch order."""

    def __init__(self, number: int, source: WeightedShards, kinds: tuple[str, ...] | None, seed: int,
                 shuffle_buffer: int):
        self.number = number
        self.source = source
        self.seed = seed
        self.window = max(1, shuffle_buffer)
        self.shards = source.shard_files()
        self.entries: list[list[_Entry]] = []
        for path in self.shards:
            entries = index_shard(path)
            self.entries.append([e for e in entries if kinds is None or e.kind in kinds])
        self.size = sum(len(e) for e in self.entries)
        if self.size == 0:
            raise NoSamplesOfKind(f"source {source.name!r} has no samples of kind {list(kinds or KINDS)} "
                                  f"in {len(self.shards)} shard(s)")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def fingerprint(self) -> str:
        text = "\n".join(f"{p.name}:{e.key}" for p, es in zip(self.shards, self.entries) for e in es)
        return sha256_text(text, 16)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng(seed_words(self.seed, self.number, epoch, "shards"))
            shard_order = rng.permutation(len(self.shards))
            shard_of = np.concatenate([np.full(len(self.entries[s]), s, dtype=np.int64) for s in shard_order])
            item_of = np.concatenate([np.arange(len(self.entries[s]), dtype=np.int64) for s in shard_order])
            self._epoch_cache = (epoch, shard_of, item_of)
        return self._epoch_cache[1], self._epoch_cache[2]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard, item) of the position-th sample this source yields."""
        epoch, offset = divmod(position, self.size)
        shard_of, item_of = self._epoch_order(epoch)
        window, within = divmod(offset, self.window)
        start = window * self.window
        length = min(self.window, self.size - start)
        perm = np.random.default_rng(seed_words(self.seed, self.number, epoch, "window", window)).permutation(length)
        chosen = start + int(perm[within])
        return epoch, int(shard_of[chosen]), int(item_of[chosen])

    def read(self, shard: int, item: int) -> LayeredSample:
        entry = self.entries[shard][item]
        path = self.shards[shard]
        record: dict[str, Any] = {"__key__": entry.key}
        for suffix, ref in entry.members.items():
            record[suffix] = _read_member(path, entry.key, suffix, ref)
        return LayeredSample.from_wds(record)


class ShardStream:
    """Endless batches of LayeredSamples for one data-parallel rank (see the module docstring)."""

    def __init__(self, sources: Sequence[WeightedShards], batch_size: int, shuffle_buffer: int = 64, seed: int = 0,
                 kinds: Sequence[str] | None = None, rank: int = 0, world_size: int = 1):
        if not sources:
            raise ValueError("ShardStream needs at least one source")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
        unknown = set(kinds or ()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown sample kinds {sorted(unknown)}; kinds are {list(KINDS)}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.kinds = tuple(kinds) if kinds else None
        # A stream that wants some kinds draws from the sources that have them (stage 2's pair stream from the
        # pairs source, its quadruple stream from the quadruples); a source with none of any kind is an error.
        self.sources = []
        for i, s in enumerate(sources):
            try:
                self.sources.append(_SourceIndex(i, s, self.kinds, self.seed, shuffle_buffer))
            except NoSamplesOfKind:
                if self.kinds is None or (not self.sources and i == len(sources) - 1):
                    raise
        if not self.sources:
            raise NoSamplesOfKind(f"no source ({', '.join(s.name for s in sources)}) has samples of kind "
                                  f"{list(self.kinds)}")
        weights = np.array([s.source.weight for s in self.sources], dtype=np.float64)
        self._cumulative = np.cumsum(weights / weights.sum())
        self.draws = 0  # draws made over all ranks
        self.consumed = [0] * len(self.sources)  # samples taken from each source over all ranks

    # --------------------------------------------------------------- drawing
    def _pick(self, draw: int) -> int:
        u = np.random.default_rng(seed_words(self.seed, draw, "source")).random()
        return int(min(np.searchsorted(self._cumulative, u, side="right"), len(self.sources) - 1))

    def next_batch(self) -> list[LayeredSample]:
        """This rank's share of the next global batch; every rank advances the same counters."""
        batch = []
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for slot in range(self.batch_size * self.world_size):
            s = self._pick(self.draws)
            position = self.consumed[s]
            self.draws += 1
            self.consumed[s] += 1
            if slot in mine:
                source = self.sources[s]
                epoch, shard, item = source.locate(position)
                sample = source.read(shard, item)
                # Which source and epoch a sample came from, for the trainer's logs; never serialised.
                sample.work["stream"] = {"source": source.source.name, "epoch": epoch}
                batch.append(sample)
        return batch

    def __iter__(self) -> Iterator[list[LayeredSample]]:
        while True:
            yield self.next_batch()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "draws": self.draws,
            "consumed": list(self.consumed),
            "sources": [{"name": s.source.name, "size": s.size, "fingerprint": s.fingerprint()}
                        for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. Refuses a state from other sources, kinds or seed: the same counters would
        then name other samples and the resumed run would silently differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')} is not {STATE_VERSION}")
        mine = self.state_dict()
        if state["seed"] != self.seed or state["sources"] != mine["sources"]:
            raise ValueError("stream state belongs to other data (sources, kinds, shard contents or seed differ): "
                             f"saved {state['sources']} seed {state['seed']}, now {mine['sources']} seed {self.seed}")
        self.draws = int(state["draws"])
        self.consumed = [int(c) for c in state["consumed"]]
