"""Shard writer and reader.

A shard is the unit of work and of commit: ``<name>-NNNNNN.tar`` (webdataset's ``TarWriter``, no
hand-written tar code) plus ``<name>-NNNNNN.parquet`` with one row per sample of the shard's group,
failures included. Both are written under temporary names and renamed, the parquet last: a shard is
committed exactly when its parquet exists under its final name. A crash leaves only temporary files,
which the next run deletes before rebuilding that shard.

Bytes are reproducible: tar members carry a fixed mtime/user/mode, PNG encoding is fixed
(``samples.encode_png``), and the parquet holds no timings, so the same samples give the same files.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from layerloop.samples import LayeredSample

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),  # "ok" | "failed"
    ("kind", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption", pa.string()),
    ("source", pa.string()),
    ("source_id", pa.string()),
    ("scores", pa.string()),  # JSON object
])
FAILURE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("shard", pa.string()),  # "" for failures found while listing the source
])
TMP_MARK = ".tmp-"


def shard_stem(name: str, index: int) -> str:
    return f"{name}-{index:06d}"


@dataclass(frozen=True)
class ShardSummary:
    index: int
    ok: int
    failed: int
    failures: tuple[tuple[str, str, str, str], ...]  # (key, stage, error_type, message)
    skipped: bool = False  # already committed before this attempt


class ShardWriter:
    """Writes one shard group atomically into a run directory."""

    def __init__(self, out_dir: str | Path, name: str):
        self.out_dir = Path(out_dir)
        self.name = name

    def paths(self, index: int) -> tuple[Path, Path]:
        stem = shard_stem(self.name, index)
        return self.out_dir / f"{stem}.tar", self.out_dir / f"{stem}.parquet"

    def is_committed(self, index: int) -> bool:
        return self.paths(index)[1].exists()

    def write(self, index: int, samples: Iterable[LayeredSample]) -> ShardSummary:
        tar_path, index_path = self.paths(index)
        if index_path.exists():  # a retried task after a commit: never write a shard twice
            return summary_from_index(index, index_path, skipped=True)
        token = uuid.uuid4().hex[:8]
        tmp_tar = tar_path.with_name(f"{tar_path.name}{TMP_MARK}{token}")
        tmp_index = index_path.with_name(f"{index_path.name}{TMP_MARK}{token}")
        rows = []
        try:
            with open(tmp_tar, "wb") as stream:
                writer = wds.TarWriter(stream, encoder=False, mtime=0, user="layerloop", group="layerloop",
                                           mode=0o444)
                for sample in samples:
                    if sample.ok:
                        try:
                            writer.write(sample.to_wds())
                        except Exception as error:  # schema violation: recorded, not written
                            sample.fail("write", error)
                    rows.append(index_row(sample))
                writer.close()
                stream.flush()
                os.fsync(stream.fileno())
            pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp_index)
            os.replace(tmp_tar, tar_path)
            os.replace(tmp_index, index_path)  # the commit point
        finally:
            for tmp in (tmp_tar, tmp_index):
                tmp.unlink(missing_ok=True)
        return summary_from_rows(index, rows)


def index_row(sample: LayeredSample) -> dict:
    size = sample.size if sample.ok else None
    failure = sample.failure
    return {
        "key": sample.key,
        "status": "ok" if failure is None else "failed",
        "kind": sample.kind if failure is None else None,
        "stage": failure.stage if failure else None,
        "error_type": failure.error_type if failure else None,
        "message": failure.message if failure else None,
        "width": size[1] if size else None,
        "height": size[0] if size else None,
        "caption": sample.caption if failure is None else None,
        "source": str(sample.meta.get("source")) if sample.meta.get("source") is not None else None,
        "source_id": str(sample.meta.get("source_id")) if sample.meta.get("source_id") is not None else None,
        "scores": json.dumps(sample.meta.get("scores", {}), sort_keys=True),
    }


def summary_from_rows(index: int, rows: list[dict], skipped: bool = False) -> ShardSummary:
    failures = tuple((r["key"], r["stage"], r["error_type"], r["message"]) for r in rows if r["status"] != "ok")
    return ShardSummary(index=index, ok=len(rows) - len(failures), failed=len(failures), failures=failures,
                        skipped=skipped)


def summary_from_index(index: int, index_path: Path, skipped: bool = True) -> ShardSummary:
    return summary_from_rows(index, pq.read_table(index_path).to_pylist(), skipped=skipped)


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete temporary files left by an interrupted run (call only while holding the run lock)."""
    removed = []
    for path in Path(out_dir).glob(f"*{TMP_MARK}*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def shard_paths(run_dir: str | Path) -> list[Path]:
    """Committed tar shards of a run directory, in order."""
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.glob("*.tar") if p.with_suffix(".parquet").exists())


def read_samples(urls: str | Path | list, shuffle: bool = False) -> Iterator[LayeredSample]:
    """Iterate LayeredSamples from shards with plain ``webdataset.WebDataset`` (no custom decoder)."""
    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        urls = shard_paths(urls)
    if isinstance(urls, (list, tuple)):
        urls = [str(u) for u in urls]
    else:
        urls = str(urls)
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for record in dataset:
        yield LayeredSample.from_wds(record)
