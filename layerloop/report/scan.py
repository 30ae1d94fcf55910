"""Reading a run directory: its shard indexes, which shards are damaged, and the few records a report opens.

* ``scan_run(run_dir)``: every committed shard's parquet rows plus which shards are damaged and why
  (``RunIndex``); ``load_index(run_dir)`` is its table alone.
* ``choose_samples`` / ``read_chosen``: the seeded choice of samples a report shows, and reading only
  their shards (sha256-checked first where the index records it).
* ``read_records(tar, keys, members)``: raw webdataset records of a few keys from one shard.

Damaged shards: every shard is checked with ``shards.check_shard`` (the one "is this shard committed"
check of the project): its index must be readable and its tar present with the size the index records;
a tar the report opens is also checked against the recorded sha256, and a tar that cannot be read is
damaged too. A damaged shard never stops a report: it is named with what is wrong and its rows are left
out (a resumed build rebuilds it). An index written before the size/sha256 record existed is read as
before (unverified).

Which samples are shown is a deterministic function of (index, seed, damaged shards): shards are visited
round robin in a seeded order and each gives a seeded choice of its ok keys, so a sheet of 8 rows over 100
shards shows 8 different shards instead of the first 8 samples of shard 0.

Imports: ``layerloop inspect`` goes through this module, so it needs only numpy and ``pyarrow.parquet``.
Rows are selected in Python over a column's ``to_pylist()`` (what the callers turn into Python values
anyway), not with ``pyarrow.compute`` (``Table.filter``, ``pc.equal``, ``pc.is_in``): importing it builds
every compute function's wrapper, 60-80 ms of ``inspect``'s start-up (issue #16, goal 2).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from layerloop import storage
from layerloop.datasets.shards import INDEX_SCHEMA, check_shard, error_text, read_parquet

FAILURES_FILE = "failures.parquet"
REPORT_DIR = "report"  # a run's report/ (``write.write_report``)


class UnknownSampleError(KeyError):
    """A key the run has never seen. A KeyError (the CLI reports those), printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedShardError(RuntimeError):
    """A tar shard that cannot be read (truncated, overwritten, not a tar); the message names it."""


@dataclass
class RunIndex:
    """The shard indexes of a run and what is wrong with which shard.

    ``table``: the rows of every readable index, with a ``shard`` column, in shard order (rows of damaged
    shards included; ``intact()`` leaves them out). ``damaged``: shard stem -> what is wrong; it grows
    when a tar opened later turns out damaged (``open_records``). ``recorded``: stems whose index records
    the tar's size and sha256. ``rows``: index rows per stem (``None`` when the index is unreadable)."""

    run_dir: Path
    table: pa.Table
    damaged: dict[str, str]
    recorded: set[str]
    rows: dict[str, int | None]

    def intact(self) -> pa.Table:
        """The rows of the intact shards (``table`` without the damaged shards' rows)."""
        if not self.damaged:
            return self.table
        keep = [shard not in self.damaged for shard in self.table["shard"].to_pylist()]
        return self.table.filter(pa.array(np.array(keep, dtype=bool)))  # imports pyarrow.compute: not in inspect

    def intact_ok_columns(self, names: Iterable[str]) -> dict[str, list[Any]]:
        """``names``' values (Python lists) over the ``ok`` rows of the intact shards, in index order: what
        ``intact()`` filtered on ``status == "ok"`` gives, without ``pyarrow.compute``."""
        rows = self._rows_where(self.table["status"].to_pylist(), "ok")
        return {name: _take(self.table[name].to_pylist(), rows) for name in names}

    def _rows_where(self, status: list[Any], wanted: str) -> list[int]:
        shards = self.table["shard"].to_pylist()
        return [i for i, (value, shard) in enumerate(zip(status, shards))
                if value == wanted and shard not in self.damaged]

    def ok_keys(self) -> dict[str, list[str]]:
        """Ok keys per intact shard stem, in index order: the committed samples a reader can trust. A shard
        found damaged later (``verify_tar``, ``open_records``) drops out of the next call."""
        by_shard: dict[str, list[str]] = {}
        for key, status, shard in zip(self.table["key"].to_pylist(), self.table["status"].to_pylist(),
                                      self.table["shard"].to_pylist()):
            if status == "ok" and shard not in self.damaged:
                by_shard.setdefault(shard, []).append(key)
        return by_shard

    def damaged_list(self) -> list[dict[str, Any]]:
        return [{"shard": stem, "reason": self.damaged[stem], "indexed_samples": self.rows.get(stem)}
                for stem in sorted(self.damaged)]

    def verify_tar(self, shard: str) -> bool:
        """Check the sha256 of a tar about to be opened (when its index records one); False (and the
        shard marked damaged) when it does not match."""
        if shard in self.damaged:
            return False
        if shard in self.recorded:
            tar = self.run_dir / f"{shard}.tar"
            check = check_shard(tar, tar.with_suffix(".parquet"), content=True)
            if not check.readable:
                self.damaged[shard] = check.reason
                return False
        return True

    def open_records(self, shard: str, keys: Iterable[str], members: tuple[str, ...] | None = None
                     ) -> dict[str, dict[str, Any]] | None:
        """``read_records`` of a verified shard; ``None`` (and the shard marked damaged) when it is not."""
        if not self.verify_tar(shard):
            return None
        try:
            return read_records(self.run_dir / f"{shard}.tar", keys, members)
        except DamagedShardError as error:
            self.damaged[shard] = str(error)
            return None


def _take(values: list[Any], rows: list[int]) -> list[Any]:
    return [values[i] for i in rows]


def strings(values: list[str]) -> pa.Array:
    """``pa.array(values, pa.string())``, built from buffers: pyarrow's converter from Python objects imports
    pandas (0.17 s and 40 MB, most of what ``layerloop inspect`` took once torch was gone). Text that
    cannot be UTF-8 raises the ``UnicodeEncodeError`` that ``pa.array`` raises."""
    data = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(item) for item in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def scan_run(run_dir: str | Path) -> RunIndex:
    """Read every shard index of a run and check every shard (``shards.check_shard`` without reading the
    tars: index readable, tar present, tar size as recorded). Never raises for a damaged shard."""
    run_dir = existing_run_dir(run_dir)
    tables, damaged, recorded, rows = [], {}, set(), {}
    for path in index_paths(run_dir):
        stem = path.stem
        try:
            table = read_parquet(path)
        except Exception as error:  # noqa: BLE001 - any unreadable index is named, not raised
            damaged[stem] = f"index {path.name} is unreadable ({error_text(error)})"
            rows[stem] = None
            continue
        rows[stem] = table.num_rows
        tables.append(table.append_column("shard", strings([stem] * table.num_rows)))
        check = check_shard(run_dir / f"{stem}.tar", path, content=False)
        if not check.readable:
            damaged[stem] = check.reason
        elif check.status == "ok":
            recorded.add(stem)
    if tables:
        # "permissive" lets shards written by an older writer (a missing column, an all-null column typed
        # null) be read together with newer ones instead of failing on a schema mismatch.
        table = pa.concat_tables(tables, promote_options="permissive")
    else:
        table = INDEX_SCHEMA.append(pa.field("shard", pa.string())).empty_table()
    return RunIndex(run_dir, table, damaged, recorded, rows)


def load_index(run_dir: str | Path) -> pa.Table:
    """Concatenate the per-shard parquet index files (not ``failures.parquet``), in shard order, and add a
    ``shard`` column with each row's shard stem. A run without committed shards gives an empty table with
    the index schema. An unreadable index file is left out (it commits nothing; ``scan_run`` names it);
    rows of a shard whose tar is damaged are kept (``scan_run(...).intact()`` leaves them out)."""
    return scan_run(run_dir).table


def index_paths(run_dir: Path) -> list[Path]:
    # Temporaries are named "<stem>.parquet.tmp-XXXX", so "*.parquet" sees committed shards only.
    return sorted(p for p in run_dir.glob("*.parquet") if p.name != FAILURES_FILE)


def existing_run_dir(run_dir: str | Path) -> Path:
    """The run directory as a ``Path``, or a ``storage.StorePath`` for a run on an object store (read
    through the same calls: ``glob``, ``exists``, ``read_text``; a store that cannot be reached or a
    bucket that does not exist is one ``StoreError`` line)."""
    run_dir = storage.location(run_dir)
    if isinstance(run_dir, storage.StorePath):
        storage.check_bucket(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not (run_dir / "run.json").exists() and not index_paths(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a layerloop run directory (no run.json, no shard index)")
    return run_dir


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError) as error:
        return {"status": f"run.json unreadable ({error_text(error)})"}
    return info if isinstance(info, dict) else {"status": "run.json holds no run record"}


def read_failures(run_dir: Path, index: pa.Table, damaged: Iterable[str] = ()) -> list[dict[str, Any]]:
    """All failed samples, one dict per key: the index's failed rows plus failures.parquet rows for keys
    that no shard index knows (listing failures). See the module docstring for why. Rows of ``damaged``
    shards are left out (the shard is rebuilt); an unreadable failures.parquet is skipped."""
    damaged = set(damaged)
    names = ("key", "stage", "error_type", "message", "shard")
    failed = [i for i, status in enumerate(index["status"].to_pylist()) if status == "failed"]
    columns = {name: _take(index[name].to_pylist(), failed) for name in names}
    rows = [row for row in (dict(zip(names, values)) for values in zip(*(columns[name] for name in names)))
            if row["shard"] not in damaged]
    path = run_dir / FAILURES_FILE
    if path.exists():
        indexed = set(index["key"].to_pylist())
        try:
            listed = read_parquet(path).to_pylist()
        except Exception:  # noqa: BLE001 - rewritten by every build; the shard indexes hold the rest
            listed = []
        for row in listed:
            if row.get("key") not in indexed and row.get("shard") not in damaged:
                indexed.add(row.get("key"))
                rows.append({name: row.get(name) for name in ("key", "stage", "error_type", "message", "shard")})
    return rows


def choose_samples(keys_by_shard: dict[str, list[str]], n: int, seed: int) -> list[tuple[str, str]]:
    """A deterministic, seeded choice of ``n`` (shard, key) pairs spread across shards: shards are
    visited round robin in a seeded order, each contributing a seeded choice of its keys. The result is
    ordered by shard and position in the shard, which is also the order a tar is read in."""
    rng = np.random.default_rng(seed)
    shards = sorted(s for s, keys in keys_by_shard.items() if keys)
    order = [shards[i] for i in rng.permutation(len(shards))]
    take = dict.fromkeys(order, 0)
    remaining = min(max(n, 0), sum(len(keys_by_shard[s]) for s in shards))
    while remaining:
        for shard in order:
            if remaining and take[shard] < len(keys_by_shard[shard]):
                take[shard] += 1
                remaining -= 1
    chosen = []
    for shard in order:  # rng draws in the seeded visiting order, so the choice depends on nothing else
        if take[shard]:
            positions = rng.choice(len(keys_by_shard[shard]), size=take[shard], replace=False)
            chosen.extend((shard, int(p)) for p in positions)
    chosen.sort()
    return [(shard, keys_by_shard[shard][p]) for shard, p in chosen]


def read_chosen(scan: RunIndex, n: int, seed: int, members: tuple[str, ...] | None,
                 decode: Callable[[dict[str, Any]], Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Choose ``n`` ok samples from the intact shards (``choose_samples``), open only their shards
    (sha256 checked first where the index records it) and ``decode`` each record. A shard found damaged
    on the way is recorded in ``scan.damaged`` and the choice is made again without it, so a damaged
    shard costs no rows. Returns (chosen, decoded value per key found)."""
    while True:
        damaged_before = len(scan.damaged)
        chosen = choose_samples(scan.ok_keys(), n, seed)
        decoded: dict[str, Any] = {}
        for shard in dict.fromkeys(s for s, _ in chosen):
            keys = [key for s, key in chosen if s == shard]
            records = scan.open_records(shard, keys, members)
            if records is None:
                break
            absent = [key for key in keys if key not in records]
            if absent:
                scan.damaged[shard] = (f"tar {shard}.tar lacks {len(absent)} sample(s) its index lists as ok "
                                       f"(e.g. {absent[0]})")
                break
            for key, record in records.items():
                try:
                    decoded[key] = decode(record)
                except Exception as error:  # noqa: BLE001 - a member that cannot be decoded
                    scan.damaged[shard] = f"sample {key} in {shard}.tar cannot be decoded ({error_text(error)})"
                    break
            if len(scan.damaged) != damaged_before:
                break
        if len(scan.damaged) == damaged_before:
            return chosen, decoded


def read_records(tar_path: Path, keys: Iterable[str], members: tuple[str, ...] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Raw webdataset records of ``keys`` from one shard; stops reading as soon as all were found.
    ``members`` (e.g. ``("json",)``) skips every other member's bytes, so metadata lookups do not pull
    images into memory. Read as ``webdataset.WebDataset(tar, shardshuffle=False, select_files=...)`` reads
    it (``_webdataset_records``), without importing webdataset (which imports torch)."""
    wanted = set(keys)
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found

    def select(fname: str) -> bool:
        # Member names are "<key>.<ext>" and keys contain no dots (samples.KEY_PATTERN).
        return fname.split(".", 1)[0] in wanted and (members is None or fname.split(".", 1)[1] in members)

    records = _webdataset_records(tar_path, select)
    try:
        for record in records:
            if record["__key__"] in wanted:
                found[record["__key__"]] = record
                wanted.discard(record["__key__"])
                if not wanted:
                    break
    except Exception as error:  # noqa: BLE001 - whatever a broken tar raises, say which shard it is
        raise DamagedShardError(f"tar {tar_path.name} is unreadable ({error_text(error)})") from error
    finally:
        records.close()  # releases the open tar now rather than whenever the generator is collected
    return found


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's tariterators.base_plus_ext
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator(skip_meta=...)


def _webdataset_records(tar_path: str | Path, select: Callable[[str], bool]) -> Iterator[dict[str, Any]]:
    """The records ``webdataset.WebDataset(str(tar_path), shardshuffle=False, empty_check=False,
    select_files=select)`` yields for one local tar: webdataset 1.0's ``group_by_keys`` over
    ``_tar_members``, with the same keys, members, ``__url__``/``__local_path__``, and the same exceptions
    and messages for a damaged tar (``tests/test_report.py`` compares the two on intact, cut and corrupt
    shards). Written out because importing webdataset imports torch (1.5 s and 600 MB for ``layerloop
    inspect``). Unlike webdataset it opens the path as given: no URL parsing, brace expansion or
    torch-worker split of the name."""
    url = tar_path.url if isinstance(tar_path, storage.StorePath) else str(tar_path)
    current: dict[str, Any] | None = None
    for fname, data in _tar_members(url, select):
        match = _KEY_EXT.match(fname)
        if match is None:
            continue
        prefix, suffix = match.group(1), match.group(2).lower()
        if current is None or prefix != current["__key__"]:
            if _valid(current):
                yield current  # type: ignore[misc]
            current = {"__key__": prefix, "__url__": url}
        if suffix in current:
            raise ValueError(f"{fname}: duplicate file name in tar file {suffix} {current.keys()}", None, None)
        current[suffix] = data
        current["__local_path__"] = url
    if _valid(current):
        yield current  # type: ignore[misc]


def _valid(record: dict[str, Any] | None) -> bool:
    return record is not None and not record.get("__bad__", False)  # webdataset's valid_sample


def _tar_members(url: str, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the selected regular members, as webdataset's ``tar_file_expander`` and
    ``tar_file_iterator`` give them: an error while reading a member gets `` @ <stream>`` added to its
    first argument, and every error leaving the tar gets the stream and URL added to its arguments."""
    with storage.open_read(url) as stream:  # a local file, or an object in a store
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                fname = info.name
                try:
                    if not info.isreg() or fname is None:
                        continue
                    if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                        continue
                    if _SKIP_META.match(fname) or not select(fname):
                        continue
                    data = tar.extractfile(info).read()
                except Exception as error:
                    if error.args:
                        error.args = (f"{error.args[0]} @ {stream}",) + error.args[1:]
                    raise
                yield fname, data
                tar.members = []  # stream mode keeps every TarInfo otherwise
        except Exception as error:
            error.args = error.args + (stream, url)
            raise


def index_rows(index: pa.Table, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The index row (a dict) of each of ``keys`` found in ``index``; the last row wins for a key listed twice."""
    wanted = set(keys)
    if not wanted:
        return {}
    found = [i for i, key in enumerate(index["key"].to_pylist()) if key in wanted]
    return {row["key"]: row for i in found for row in index.slice(i, 1).to_pylist()}
