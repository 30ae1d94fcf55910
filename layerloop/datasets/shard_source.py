"""A layerloop run's own shards as a source: complete layered samples, for evaluation.

``ShardSource(path)`` lists the ok samples of a run directory's committed shards (``shards.shard_paths``:
index readable, tar of the recorded size) and reads each one whole (F, B, M, C, caption, object mask,
metadata) by member offset (``tario``). A method under evaluation must not see the answers, so ``read``
hands a stage what a method may use and keeps the ground truth apart:

* ``background``: the input background B; ``mask``: the box; ``caption``; ``object_mask`` (when stored);
  ``work["image"]``: the ground-truth composite, for methods that decompose it (the matting baseline,
  the decomposition family);
* ``work["reference"]``: ``{"composite", "foreground", "background"}`` of the stored sample, read only
  by the ``ground-truth`` and ``evaluate`` stages;
* ``composite`` and ``foreground`` are left empty: the method under evaluation fills them.

``select`` keeps a deterministic subset: the ``select`` keys with the smallest ``sha256(seed, key)``,
so the held-out set of an evaluation is fixed by (run, select, seed) and does not depend on listing order
or on how many samples the run holds beyond them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerloop.datasets.base import SourceItem
from layerloop.datasets.sources import _CachedSource
from layerloop.files import sha256_text
from layerloop.samples import Failure, LayeredSample

LIST_STAGE = "list"


class ShardSource(_CachedSource):
    """Lists once per instance (``_CachedSource``: the listing is not pickled to Ray workers)."""

    def __init__(self, path: str | Path, name: str = "heldout", select: int | None = None, seed: int = 0):
        from layerloop import storage

        self.path = storage.location(path)  # a Path, or a StorePath for a run on an object store
        self.name = name
        self.select = select
        self.seed = seed

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        from layerloop.datasets.shards import read_parquet, shard_paths
        from layerloop.datasets.tario import scan_tar

        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a run directory (a build's --out)")
        items, failures = [], []
        for tar in shard_paths(self.path):
            rows = read_parquet(tar.with_suffix(".parquet"), columns=["key", "status"]).to_pylist()
            ok = {row["key"] for row in rows if row["status"] == "ok"}
            samples, problems = scan_tar(str(tar))
            for problem in problems:
                failures.append(Failure(f"{self.name}_{tar.stem}", LIST_STAGE, "CorruptTar", problem.message))
            for sample in samples:
                if sample.key in ok:
                    members = {ext: tuple(ref) for ext, ref in sample.members.items()}
                    items.append(SourceItem(sample.key, self.name, sample.key, {"url": str(tar), "members": members}))
        if not items and not failures:
            raise ValueError(f"{self.path} holds no committed ok samples")
        if self.select is not None:
            order = sorted(items, key=lambda item: sha256_text(f"{self.seed}\x00{item.key}"))
            chosen = {item.key for item in order[:self.select]}
            items = [item for item in items if item.key in chosen]
        return items, failures

    def read(self, item: SourceItem) -> LayeredSample:
        from layerloop.datasets.tario import read_member

        url = item.refs["url"]
        record: dict[str, Any] = {"__key__": item.key}
        for ext, (offset, size) in item.refs["members"].items():
            record[ext] = read_member(url, (offset, size), name=f"member {item.key}.{ext}")
        stored = LayeredSample.from_wds(record)
        meta = {"source": self.name, "source_id": item.key, "heldout": {"kind": stored.kind, **_kept(stored.meta)}}
        sample = LayeredSample(key=item.key, kind="candidate", background=stored.background, mask=stored.mask,
                               object_mask=stored.object_mask, caption=stored.caption, meta=meta)
        sample.work["image"] = stored.composite
        sample.work["reference"] = {"composite": stored.composite, "foreground": stored.foreground,
                                    "background": stored.background}
        return sample


def _kept(meta: dict[str, Any]) -> dict[str, Any]:
    """What of the held-out sample's metadata an evaluation keeps: where it came from and its parameters
    (a logo's warp and lighting), not its stage log."""
    keep = {k: v for k, v in meta.items() if k in ("source", "source_id", "params", "logo")}
    return json.loads(json.dumps(keep, default=str))
