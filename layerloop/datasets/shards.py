"""Shard writer and reader.

A shard is the unit of work and of commit: ``<name>-NNNNNN.tar`` plus ``<name>-NNNNNN.parquet`` with one
row per sample of the shard's group, failures included. Both are written under temporary names and renamed, the parquet last: a shard is
committed exactly when its parquet exists under its final name and its tar matches what the parquet
records. A crash leaves only temporary files, which the next run deletes before rebuilding that shard.

Bytes are reproducible: tar members carry a fixed mtime/user/mode, PNG encoding is fixed
(``samples.encode_png``), and the parquet holds no timings, so the same samples give the same files.

The tar is written by ``TarRecordWriter``, the standard library's ``tarfile`` making the calls webdataset
1.0's ``TarWriter(stream, encoder=False, mtime=0, user=..., group=..., mode=...)`` makes, so the bytes are
the same (``tests/datasets/test_shards.py`` writes the same records with both and compares the tars byte
for byte). The project reads and writes tars with webdataset elsewhere; the writer is the exception
because it runs in every Ray worker of a build, and any import of webdataset runs its package
``__init__``, which imports torch: 2-3 s and ~470 MiB per worker process of a build that has no model
(issue #16, goal 3; ``tests/pipelines/test_worker_imports.py`` checks that no such worker imports torch).

Integrity. The parquet's schema metadata (key-value pairs ``layerloop.tar_size`` and
``layerloop.tar_sha256``) records the size and sha256 of the tar it commits, computed while the tar is
written (the bytes are hashed on their way to the file, never read back). Both are functions of the tar
bytes, so the parquet stays deterministic. ``check_shard`` is the one answer to "is this shard
committed" and is used everywhere:

* ``ShardWriter.committed_summary`` (the build's resume), ``ShardWriter.write``'s already-committed fast
  path and ``ShardWriter.is_committed`` (a retried task) check size *and* sha256. A shard that fails,
  or whose index predates the record and so cannot be verified, is removed (index first, so it is never
  committed-but-damaged in between) and rebuilt; the reason is kept in ``ShardWriter.damaged``.
* Readers (``shard_paths``, ``layerloop.report``) check that the index is readable, the tar exists and
  has the recorded size, which costs a ``stat`` and a parquet footer, not a read of the data; the report
  also checks the sha256 of the few tars it opens. They accept an index without the record (an older
  run) as "unverified".

Ownership. A writer may carry a ``RunOwner`` (the run lock's token): just before its commit renames it
re-reads the lock file and refuses to commit (``RunOwnershipLost``) when another driver has taken the
run over. See ``RunOwner`` for the window that remains and why it is harmless.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from layerloop import storage
from layerloop.errors import EXIT_OWNERSHIP_LOST, LayerloopError, attach_path
from layerloop.files import TMP_MARK, temp_sibling
from layerloop.files import sha256_file as file_sha256  # noqa: F401 - the name this module used to define
from layerloop.samples import PNG_DEFAULT_ENCODER, PNG_DEFAULT_LEVEL, LayeredSample, safe_text

log = logging.getLogger(__name__)

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
# Parquet schema metadata of a shard index: the tar it commits (decimal size, hex sha256).
TAR_SIZE_KEY = b"layerloop.tar_size"
TAR_SHA256_KEY = b"layerloop.tar_sha256"
TAR_FORMAT = tarfile.USTAR_FORMAT  # member headers are checked against it (``check_tar_record``)
TAR_OWNER = "layerloop"  # uname and gname of every member
TAR_MODE = 0o444
# run.lock: a readable first line ("pid N on HOST since TIME"), then "owner <token>".
LOCK_OWNER_PREFIX = "owner "


def shard_stem(name: str, index: int) -> str:
    return f"{name}-{index:06d}"


# ============================================================================= run ownership
class RunOwnershipLost(LayerloopError, RuntimeError):
    """A writer of a driver that no longer holds the run lock was about to commit (or remove) a shard.
    The message names both owners; the CLI exits with ``EXIT_OWNERSHIP_LOST``."""

    exit_code = EXIT_OWNERSHIP_LOST


def format_lock(holder: str, token: str) -> str:
    return f"{holder}\n{LOCK_OWNER_PREFIX}{token}\n"


def parse_lock(text: str) -> tuple[str | None, str]:
    """(owner token or None, readable holder line) of a ``run.lock`` file's text."""
    token, holder = None, []
    for line in text.splitlines():
        if line.startswith(LOCK_OWNER_PREFIX):
            token = line[len(LOCK_OWNER_PREFIX):].strip() or None
        elif line.strip():
            holder.append(line.strip())
    return token, " ".join(holder)


@dataclass(frozen=True)
class RunOwner:
    """Who may commit shards into a run directory: the token ``RunDirectory.acquire`` wrote into
    ``run.lock`` (``lock_path``) and that driver's readable holder line. Picklable, so it travels to Ray
    workers inside the pipeline's ``ShardWriter``.

    ``check()`` re-reads the lock file and raises ``RunOwnershipLost`` when the token there is not this
    one: the driver that started this writer died (its flock went with it) and a new driver took the run.
    The writer calls it just before its two commit renames (and before removing a damaged shard).

    What remains is the window between that check and the renames (two ``os.replace`` calls, normally
    microseconds, longer only if the process is descheduled there): a new driver may take the lock inside
    it, and the orphaned writer then still commits. The files stay correct: (1) the bytes of a shard are a
    function of its input and config alone, and a new driver only resumes the same run (``run.json``
    refuses another config or source listing), so the orphan writes exactly the bytes the new driver would
    write; (2) each rename is atomic, so every reader sees a whole old file or a whole new one, never a
    mix, and two writers racing on one shard replace a file by identical bytes; (3) the tar is renamed
    before the parquet that commits it, so an orphan stopped between the renames leaves an uncommitted tar
    (rebuilt), and an orphan whose temporaries the new driver deleted (``remove_stale_temporaries`` at its
    start) fails its rename and commits nothing. Anything else that could go wrong in a race (a pair that
    does not match) is caught by the size/sha256 check on the next resume and rebuilt.
    """

    token: str
    lock_path: Path | storage.StorePath  # run.lock, or the run.lease object of a run on a store
    holder: str = ""

    def current(self) -> tuple[str | None, str]:
        """(token, holder line) now in the lock file (or lease object); (None, why) when it cannot be read."""
        if isinstance(self.lock_path, storage.StorePath):
            try:
                lease = storage.read_lease(self.lock_path)
            except OSError as error:
                return None, f"unreadable lease object ({error})"
            return (lease.token, lease.holder) if lease is not None else (None, "no lease object")
        try:
            return parse_lock(Path(self.lock_path).read_text(errors="replace"))
        except OSError as error:
            return None, f"unreadable lock file ({error})"

    def check(self, action: str) -> None:
        token, holder = self.current()
        if token != self.token:
            raise RunOwnershipLost(
                f"refusing to {action}: this writer belongs to the run owner {self.token} "
                f"({self.holder or 'holder unknown'}), but {self.lock_path} now names "
                f"{token or 'no owner'} ({holder or 'no holder line'}); that driver owns the run now")


# ============================================================================= integrity
@dataclass(frozen=True)
class ShardCheck:
    """What ``check_shard`` found. ``status``: ``ok`` (committed and verified), ``unverified`` (index
    readable, tar present, but the index predates the size/sha256 record), ``absent`` (no index: not
    committed) or ``damaged`` (``reason`` says what is wrong)."""

    status: str
    reason: str = ""
    rows: tuple[dict[str, Any], ...] | None = None  # the index rows, when asked for and readable

    @property
    def committed(self) -> bool:
        """Verified: what a writer may skip."""
        return self.status == "ok"

    @property
    def readable(self) -> bool:
        """What a reader may open: verified, or from an older writer without the record."""
        return self.status in ("ok", "unverified")


def tar_record(index_path: str | Path) -> tuple[int, str] | None:
    """(size, sha256) of the tar as its index records them, ``None`` for an index without the record.
    Raises what pyarrow raises for a missing or unreadable index."""
    if isinstance(index_path, storage.StorePath):
        index_path = pa.BufferReader(index_path.read_bytes())
    if isinstance(index_path, _Bytes):
        index_path = pa.BufferReader(index_path)
    metadata = pq.read_metadata(index_path).metadata or {}
    if TAR_SIZE_KEY not in metadata or TAR_SHA256_KEY not in metadata:
        return None
    return int(metadata[TAR_SIZE_KEY]), metadata[TAR_SHA256_KEY].decode("ascii")


def table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """``pa.Table.from_pylist(rows, schema=schema)`` for a schema of string and int32 columns (the shard index,
    ``failures.parquet``), built from buffers: pyarrow's converter from Python objects imports pandas on its
    first call in a process, 0.3-0.6 s of a cold build's first shard write in every process that writes one,
    and at the end of a Ray build in the driver, which writes ``failures.parquet`` without having written a
    shard (issue #16, goal 3). The same table, so the same parquet bytes (a test compares them); anything
    else (another column type, a value of another type, text that is not UTF-8, an int out of range) goes to
    ``from_pylist``, which raises what it raised before."""
    columns = []
    try:
        for field in schema:
            values = [row.get(field.name) for row in rows]
            if pa.types.is_string(field.type):
                columns.append(_string_array(values))
            elif pa.types.is_int32(field.type):
                columns.append(_int32_array(values))
            else:
                raise TypeError(field.type)
    except (TypeError, ValueError, OverflowError):
        return pa.Table.from_pylist(rows, schema=schema)
    return pa.Table.from_arrays(columns, schema=schema)


def _validity(values: list[Any]) -> tuple[int, Any]:
    """(null count, validity bitmap buffer or None) in Arrow's layout (one bit per value, least significant
    bit first)."""
    import numpy as np

    valid = np.array([value is not None for value in values], dtype=bool)
    nulls = len(values) - int(valid.sum())
    return nulls, (pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()) if nulls else None)


def _string_array(values: list[Any]) -> pa.Array:
    import numpy as np

    if not all(value is None or type(value) is str for value in values):
        raise TypeError("not str")
    data = [value.encode("utf-8") if value is not None else b"" for value in values]  # lone surrogates raise
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in data], out=offsets[1:])
    if offsets[-1] >= 2 ** 31:
        raise OverflowError("more than 2 GiB of text: pa.string() offsets are int32")
    nulls, validity = _validity(values)
    return pa.Array.from_buffers(pa.string(), len(data), [validity, pa.py_buffer(offsets.astype(np.int32).tobytes()),
                                                          pa.py_buffer(b"".join(data))], null_count=nulls)


def _int32_array(values: list[Any]) -> pa.Array:
    import numpy as np

    if not all(value is None or type(value) is int for value in values):
        raise TypeError("not int")
    if any(value is not None and not -2 ** 31 <= value < 2 ** 31 for value in values):
        raise OverflowError("out of int32")
    nulls, validity = _validity(values)
    data = np.array([value if value is not None else 0 for value in values], dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [validity, pa.py_buffer(data.tobytes())], null_count=nulls)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """``pq.read_table(path, columns=columns)`` of one parquet file, read without ``pyarrow.dataset``
    (which imports pandas: a quarter of a second and 45 MB for ``layerloop inspect``). The table is the
    same; a file that ``ParquetFile`` cannot read goes to ``read_table``, so what it raises is unchanged.
    A store object (``storage.StorePath``) is read whole (an index is small) and parsed from memory."""
    if isinstance(path, storage.StorePath):
        return pq.read_table(pa.BufferReader(path.read_bytes()), columns=columns)
    try:
        with pq.ParquetFile(path) as parquet:
            return parquet.read(columns=columns)
    except Exception:  # noqa: BLE001 - read_table below raises its own error for the same file
        pass
    return pq.read_table(path, columns=columns)


def error_text(error: BaseException) -> str:
    """``Type: first line of the message`` (webdataset and tarfile append streams and names to ``args``)."""
    first = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = first.strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_shard(tar_path: str | Path, index_path: str | Path, content: bool = True,
                read_rows: bool = False) -> ShardCheck:
    """Is the shard ``tar_path`` + ``index_path`` committed and intact? The one check every caller uses.

    In order: the index exists (else ``absent``) and is readable; the tar exists; the index records the
    tar's size and sha256 (else ``unverified``); the tar has that size; with ``content`` its sha256 matches
    (this reads the whole tar). ``read_rows`` also returns the index rows (``rows``). Store URLs are
    checked the same way; a store that cannot be reached raises its ``StoreError``."""
    remote = storage.is_remote(tar_path) or storage.is_remote(index_path)
    if remote:  # a store: the index read into memory once, the tar's size from the listing, its sha256 streamed
        tar_path, index_path = storage.location(tar_path), storage.location(index_path)
    else:
        tar_path, index_path = Path(tar_path), Path(index_path)
    try:
        if not remote and not index_path.exists():
            raise FileNotFoundError(index_path)
        index = _Bytes(index_path.read_bytes()) if remote else index_path
        record = tar_record(index)
        rows = tuple(pq.read_table(pa.BufferReader(index) if remote else index).to_pylist()) if read_rows else None
    except FileNotFoundError:
        return ShardCheck("absent", f"{index_path.name} does not exist: not committed")
    except storage.StoreError:
        raise  # a store that cannot be reached is not a damaged shard
    except Exception as error:  # noqa: BLE001 - any unreadable index is a damaged shard, named
        return ShardCheck("damaged", f"index {index_path.name} is unreadable ({error_text(error)})")
    try:
        size = tar_path.stat().st_size
    except FileNotFoundError:
        return ShardCheck("damaged", f"tar {tar_path.name} is missing", rows)
    except storage.StoreError:
        raise
    except OSError as error:
        return ShardCheck("damaged", f"tar {tar_path.name} cannot be read ({error_text(error)})", rows)
    if record is None:
        return ShardCheck("unverified", f"index {index_path.name} records no tar size and sha256 "
                                        "(written by an older layerloop), so the tar cannot be verified", rows)
    want_size, want_sha = record
    if size != want_size:
        return ShardCheck("damaged", f"tar is {size} bytes, index says {want_size}", rows)
    if content:
        try:
            sha = storage.sha256_of(tar_path)
        except storage.StoreError:
            raise
        except OSError as error:
            return ShardCheck("damaged", f"tar {tar_path.name} cannot be read ({error_text(error)})", rows)
        if sha != want_sha:
            return ShardCheck("damaged", f"tar's sha256 is {sha[:16]}..., index says {want_sha[:16]}... "
                                         f"(same size, different bytes)", rows)
    return ShardCheck("ok", "", rows)


class _Bytes(bytes):
    """Index bytes already read: ``tar_record`` parses them from memory."""


class _HashingStream:
    """A write-only file wrapper that hashes and counts what passes through (tarfile's stream mode
    ``w|`` only calls ``write``)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.stream.write(data)


class TarRecordWriter:
    """Writes webdataset records (``{"__key__": key, ext: bytes, ...}``) to a tar stream: one member
    ``<key>.<ext>`` per value, in sorted order, with the given mtime, mode and owner names.

    The same bytes as webdataset 1.0's ``TarWriter(stream, encoder=False, user=user, group=group, mode=mode,
    mtime=mtime)`` (``webdataset/writer.py``): ``tarfile.open(fileobj=stream, mode="w|")`` in tarfile's
    default format (webdataset computes a ``format`` but does not pass it on), each ``TarInfo`` with only
    name, size, mtime, mode, uname and gname set, added from a ``BytesIO``; entries whose name starts with
    ``_`` are not written; a value that is not bytes-like raises ``ValueError`` before anything of the
    record is written. The test that pins this writes the same records with both."""

    def __init__(self, stream: Any, user: str, group: str, mode: int = 0o444, mtime: float = 0):
        self.user, self.group, self.mode, self.mtime = user, group, mode, mtime
        self.tar = tarfile.open(fileobj=stream, mode="w|")

    def write(self, record: dict[str, Any]) -> int:
        """Write one record; returns the bytes of its members' data (what webdataset's ``write`` returns)."""
        if "__key__" not in record:
            raise ValueError("object must contain a __key__")
        for name, value in record.items():
            if not name.startswith("_") and not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"{name} doesn't map to a bytes after encoding ({type(value)})")
        key, total = record["__key__"], 0
        for name in sorted(record):
            if name.startswith("_"):
                continue
            value = record[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(value)
            info.mtime = self.mtime
            info.mode = self.mode
            info.uname = self.user
            info.gname = self.group
            self.tar.addfile(info, io.BytesIO(value))
            total += info.size
        return total

    def close(self) -> None:
        self.tar.close()


def check_tar_record(record: dict[str, Any], format: int = TAR_FORMAT) -> None:
    """Raise ValueError unless ``TarRecordWriter.write(record)`` can write every member (bytes values, member
    names that fit a tar header), so that a sample is either written whole or not at all."""
    key = record["__key__"]
    for member, value in record.items():
        if member.startswith("_"):
            continue
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"tar member {member} is a {type(value).__name__}, not bytes")
        info = tarfile.TarInfo(f"{key}.{member}")
        info.size = len(value)
        try:
            info.tobuf(format, "utf-8", "strict")
        except (ValueError, UnicodeError) as error:
            raise ValueError(f"tar member name {info.name!r} ({len(info.name)} characters) does not fit a "
                             f"tar header: {error}") from None


# ============================================================================= writing
@dataclass(frozen=True)
class ShardSummary:
    index: int
    ok: int
    failed: int
    failures: tuple[tuple[str, str, str, str], ...]  # (key, stage, error_type, message)
    skipped: bool = False  # already committed before this attempt


@dataclass(frozen=True)
class CommittedShard:
    """``ShardWriter.committed_summary``'s answer: ``summary`` when the shard is committed and verified
    (skip it), else ``None`` (build it); ``problem`` when a damaged pair was just removed."""

    summary: ShardSummary | None
    problem: str | None = None


class ShardWriter:
    """Writes one shard group atomically into a run directory.

    ``owner`` (optional): the run's ``RunOwner`` (``RunDirectory.owner``); with one, the writer refuses to
    commit or remove a shard once another driver holds the run lock. Without one (tests, tools writing a
    private directory) it commits unconditionally. ``damaged`` maps shard index -> why a committed-looking
    shard was removed for rebuilding (filled by ``committed_summary``; per process: a Ray worker's copy
    stays on the worker). ``png_level`` / ``png_encoder``: how image members are encoded
    (``samples.encode_png``; the defaults are the historical bytes)."""

    def __init__(self, out_dir: str | Path, name: str, owner: RunOwner | None = None,
                 png_level: int = PNG_DEFAULT_LEVEL, png_encoder: str = PNG_DEFAULT_ENCODER):
        self.out_dir = storage.location(out_dir)  # a Path, or a StorePath for a run on an object store
        self.name = name
        self.owner = owner
        self.png_level = png_level
        self.png_encoder = png_encoder
        self.damaged: dict[int, str] = {}

    def paths(self, index: int) -> tuple[Path, Path]:
        stem = shard_stem(self.name, index)
        return self.out_dir / f"{stem}.tar", self.out_dir / f"{stem}.parquet"

    def committed_summary(self, index: int) -> CommittedShard:
        """Whether shard ``index`` is committed, verified: ``.summary`` is its recorded summary
        (``skipped=True``) when its index is readable, records its tar's size and sha256, and the tar
        matches both; otherwise ``None``. A damaged or unverifiable pair (an index from an older layerloop)
        is removed first, index before tar, so the shard is rebuilt; ``.problem`` then says why, e.g.
        ``shard demo-000002 rebuilt: tar is 1234 bytes, index says 5678`` (also kept in
        ``self.damaged[index]`` and logged). With an owner, the removal is refused (``RunOwnershipLost``)
        once another driver holds the run."""
        tar_path, index_path = self.paths(index)
        check = check_shard(tar_path, index_path, content=True, read_rows=True)
        if check.committed:
            return CommittedShard(summary_from_rows(index, list(check.rows or ()), skipped=True))
        if check.status == "absent":
            return CommittedShard(None)
        stem = shard_stem(self.name, index)
        if self.owner is not None:
            self.owner.check(f"remove damaged shard {stem} ({check.reason})")
        index_path.unlink(missing_ok=True)  # un-commit first: never a commit mark over a removed tar
        tar_path.unlink(missing_ok=True)
        self.damaged[index] = check.reason
        problem = f"shard {stem} rebuilt: {check.reason}"
        log.info("%s", problem)  # the build reports it; on a Ray worker (a retried task) this log is all
        return CommittedShard(None, problem)

    def is_committed(self, index: int) -> bool:
        """Committed and verified (``committed_summary``, which removes a damaged pair)."""
        return self.committed_summary(index).summary is not None

    def write(self, index: int, samples: Iterable[LayeredSample]) -> ShardSummary:
        tar_path, index_path = self.paths(index)
        committed = self.committed_summary(index).summary
        if committed is not None:  # a retried task after a commit: never write a shard twice
            return committed
        if isinstance(self.out_dir, storage.StorePath):
            return self._write_stored(index, samples)
        tmp_tar, tmp_index = temp_sibling(tar_path), temp_sibling(index_path)
        try:
            with open(tmp_tar, "wb") as stream:
                rows, tar_meta = self._encode(samples, stream)
                stream.flush()
                os.fsync(stream.fileno())
            pq.write_table(table_from_rows(rows, INDEX_SCHEMA.with_metadata(tar_meta)), tmp_index)
            if self.owner is not None:
                self.owner.check(f"commit shard {shard_stem(self.name, index)}")
            os.replace(tmp_tar, tar_path)
            os.replace(tmp_index, index_path)  # the commit point
        except OSError as error:  # disk full, read-only: name the shard being written
            raise attach_path(error, index_path if tar_path.exists() else tar_path) from error
        finally:
            for tmp in (tmp_tar, tmp_index):
                tmp.unlink(missing_ok=True)
        return summary_from_rows(index, rows)

    def _encode(self, samples: Iterable[LayeredSample], stream: Any) -> tuple[list[dict], dict[bytes, bytes]]:
        """The tar into ``stream`` and the index rows (and the tar's size and sha256 for the index's metadata):
        the one encoder of both commits, on disk and on a store, so both write the same bytes."""
        rows = []
        hashed = _HashingStream(stream)
        writer = TarRecordWriter(hashed, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=0)
        for sample in samples:
            if sample.ok:
                try:
                    record = sample.to_wds(self.png_level, self.png_encoder)
                    check_tar_record(record)
                except Exception as error:  # schema violation: recorded, nothing written
                    sample.fail("write", error)
                else:
                    # Every member was checked above, so what raises here is I/O (disk full): it aborts
                    # the shard (the caller removes its temporaries) instead of leaving half a sample.
                    writer.write(record)
            rows.append(index_row(sample))
        writer.close()
        return rows, {TAR_SIZE_KEY: str(hashed.size).encode("ascii"),
                      TAR_SHA256_KEY: hashed.digest.hexdigest().encode("ascii")}

    def _write_stored(self, index: int, samples: Iterable[LayeredSample]) -> ShardSummary:
        """Commit on an object store, which has no rename: the tar is spooled to a local temporary file
        while it is hashed, then uploaded as ``<stem>.tar`` (one PUT, or a multipart upload that appears
        only when complete), then the parquet index is PUT as ``<stem>.parquet``: the commit mark. The
        ownership check (the lease's token) comes just before the first PUT. A writer stopped between the
        two PUTs leaves a tar without an index: not committed, never read, removed by the next run
        (``remove_stale_temporaries``). The bytes are those of a local run: the same tar stream and the
        same parquet, written to memory instead of a file."""
        import tempfile

        tar_path, index_path = self.paths(index)
        spool = tempfile.NamedTemporaryFile(prefix=f"layerloop-{shard_stem(self.name, index)}-", suffix=".tar",
                                            delete=False)
        try:
            with spool as stream:
                rows, tar_meta = self._encode(samples, stream)
            sink = pa.BufferOutputStream()
            pq.write_table(table_from_rows(rows, INDEX_SCHEMA.with_metadata(tar_meta)), sink)
            if self.owner is not None:
                self.owner.check(f"commit shard {shard_stem(self.name, index)}")
            tar_path.put_file(spool.name)
            index_path.write_bytes(sink.getvalue().to_pybytes())  # the commit point
        finally:
            Path(spool.name).unlink(missing_ok=True)
        return summary_from_rows(index, rows)


def _scores_json(scores: Any) -> str:
    """The index's ``scores`` column: JSON text whatever a stage put there (numpy values, odd keys);
    ``ensure_ascii`` escapes lone surrogates. Clean scores give the same text as plain ``json.dumps``."""
    try:
        return json.dumps(scores, sort_keys=True, default=_json_fallback)
    except (TypeError, ValueError):
        return json.dumps({"unserialisable": repr(scores)})


def _json_fallback(value: Any) -> Any:
    item = getattr(value, "tolist", None)  # numpy scalars and arrays
    return item() if callable(item) else repr(value)


def index_row(sample: LayeredSample) -> dict:
    """One parquet index row. Every text passes ``safe_text``: a key, message or source id holding a
    lone surrogate (a file name that is not UTF-8) must not stop the index write."""
    size = sample.size if sample.ok else None
    failure = sample.failure
    return {
        "key": safe_text(sample.key),
        "status": "ok" if failure is None else "failed",
        "kind": safe_text(sample.kind) if failure is None else None,
        "stage": safe_text(failure.stage) if failure else None,
        "error_type": safe_text(failure.error_type) if failure else None,
        "message": safe_text(failure.message) if failure else None,
        "width": size[1] if size else None,
        "height": size[0] if size else None,
        "caption": safe_text(sample.caption) if failure is None else None,
        "source": safe_text(sample.meta.get("source")),
        "source_id": safe_text(sample.meta.get("source_id")),
        "scores": _scores_json(sample.meta.get("scores", {})),
    }


def summary_from_rows(index: int, rows: list[dict], skipped: bool = False) -> ShardSummary:
    failures = tuple((r["key"], r["stage"], r["error_type"], r["message"]) for r in rows if r["status"] != "ok")
    return ShardSummary(index=index, ok=len(rows) - len(failures), failed=len(failures), failures=failures,
                        skipped=skipped)


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete temporary files left by an interrupted run (call only while holding the run lock). On an
    object store: temporaries, and abandoned tars (a ``<stem>.tar`` without its ``<stem>.parquet``: a
    writer stopped between its two PUTs), which no reader trusts."""
    where = storage.location(out_dir)
    if isinstance(where, storage.StorePath):
        return remove_abandoned(where)
    removed = []
    for path in Path(out_dir).glob(f"*{TMP_MARK}*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_abandoned(prefix: storage.StorePath) -> list[Any]:
    """On a store: remove objects with ``TMP_MARK`` and tars whose index does not exist (see above), and
    abort unfinished multipart uploads under the prefix (a writer killed during a large tar upload)."""
    names = {p.name for p in prefix.iterdir()}
    removed = []
    for name in sorted(names):
        stem, _, suffix = name.rpartition(".")
        abandoned = suffix == "tar" and f"{stem}.parquet" not in names
        if TMP_MARK in name or abandoned:
            (prefix / name).unlink(missing_ok=True)
            removed.append(prefix / name)
    aborted = storage.abort_multipart_uploads(prefix)
    if removed or aborted:
        log.info("removed %d abandoned object(s) and %d unfinished upload(s) under %s", len(removed), aborted, prefix)
    return removed


def shard_paths(run_dir: str | Path) -> list[Path]:
    """Readable committed tar shards of a run directory, in order: the index is readable, the tar exists
    and has the size its index records (``check_shard(..., content=False)``; an index of an older
    layerloop without the record is accepted). A store URL gives ``StorePath`` objects (only indexed tars)."""
    run_dir = storage.location(run_dir)
    return sorted(p for p in run_dir.glob("*.tar")
                  if check_shard(p, p.with_suffix(".parquet"), content=False).readable)


def read_samples(urls: str | Path | list, shuffle: bool = False) -> Iterator[LayeredSample]:
    """LayeredSamples from shards, in shard and tar order (``shuffle`` is ignored): a run directory (its
    readable shards, ``shard_paths``), a tar URL or brace pattern as webdataset expands it, or a list of
    them. Members are grouped by key as webdataset groups them and read with ``tario.iter_samples``,
    which raises ``TarReadError`` for anything it cannot read (a truncated or corrupt shard)."""
    from webdataset.shardlists import expand_urls

    from layerloop.datasets.tario import iter_samples

    if isinstance(urls, storage.StorePath) or storage.is_remote(urls):
        where = storage.location(urls)
        if not str(urls).endswith(".tar") and "{" not in str(urls):
            urls = shard_paths(where)  # a run prefix: its committed, indexed shards
        else:
            urls = [where.url] if "{" not in str(urls) else expand_urls(where.url)
    elif isinstance(urls, (str, Path)) and Path(urls).is_dir():
        urls = shard_paths(urls)
    shard_urls = [u.url if isinstance(u, storage.StorePath) else str(u) for u in urls] if isinstance(urls, (list, tuple)) else expand_urls(str(urls))
    for url in shard_urls:
        for key, members in iter_samples(url):
            yield LayeredSample.from_wds({"__key__": key, **members})
