"""Run directories: the lock, ``run.json``, resume checks and the final ``failures.parquet``.

* One writer at a time: ``run.lock`` is held with ``flock`` for the whole run. The kernel releases it
  when the process dies, so a killed run never leaves a stale lock; a second run on the same directory
  while the first is alive refuses with a message naming the holder.
* One owner at a time, also for workers: ``acquire`` writes a fresh random token into ``run.lock`` (after
  the readable ``pid N on HOST since TIME`` line). ``run.owner`` (a ``RunOwner``) given to the
  ``ShardWriter`` makes every writer of this driver, Ray workers included, re-check the token just before
  it commits: a worker still running for a driver that was killed cannot commit once a new driver holds
  the run (see ``shards.RunOwner`` for the window that remains and why it is harmless).
* A run that stops on an error records it: ``fail(message)`` sets ``status: failed`` in ``run.json``.
* Resume: ``run.json`` stores the config fingerprint and the digest of the source's key listing. A
  re-run with the same config skips committed shards and rebuilds interrupted ones; a re-run with a
  different config or a changed source is refused instead of mixing two datasets in one directory.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import secrets
import socket
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from layerloop import storage
from layerloop.datasets.shards import FAILURE_SCHEMA, RunOwner, format_lock, parse_lock, shard_stem, table_from_rows
from layerloop.errors import attach_path
from layerloop.files import atomic_path, dump_json, write_json_atomic
from layerloop.samples import safe_text


class RunLockedError(RuntimeError):
    pass


class RunMismatchError(RuntimeError):
    pass


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("layerloop", "numpy", "pillow", "opencv-python-headless", "pymatting", "webdataset",
                    "ray", "torch", "transformers", "diffusers", "pyarrow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def write_config_record(path: Path, what: str, config: dict[str, Any], fingerprint: str, **extra: Any) -> None:
    """Write ``train.json`` / ``selfimprove.json``: the config, its fingerprint and the library versions
    (plus ``extra``). A record of a different config in the same directory is refused: resuming it with
    this config would mix two runs."""
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(f"{path.parent} holds {what} of a different config (fingerprint "
                             f"{previous.get('fingerprint')}, this one {fingerprint}). Use another --out "
                             f"directory, or delete {path.parent} to start over.")
    info = scrub({"config": config, "fingerprint": fingerprint, "versions": library_versions(), **extra})
    if isinstance(path, storage.StorePath):
        path.write_text(dump_json(info))  # one PUT: atomic for readers
    else:
        write_json_atomic(path, info)


def scrub(value: Any) -> Any:
    """``value`` with every URL-looking string passed through ``storage.redact`` (no ``user:secret@``, no
    query string), so that a record never stores credentials someone put in a URL."""
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return storage.redact(value)
    return value


class RunDirectory:
    """A run directory, or a run prefix on an object store (``s3://bucket/prefix``: ``storage.StorePath``),
    where the ``flock``ed ``run.lock`` is replaced by the lease object ``run.lease`` (``storage.Lease``)."""

    def __init__(self, path: str | Path):
        self.path = storage.location(path)
        self._lock_file = None
        self._lease: storage.Lease | None = None
        self._owner: RunOwner | None = None

    # ------------------------------------------------------------------ lock
    @property
    def lock_path(self) -> Path:
        if isinstance(self.path, storage.StorePath):
            return self.path / storage.LEASE_NAME
        return self.path / "run.lock"

    def acquire(self) -> RunDirectory:
        """Take the run lock and write a fresh owner token into it. Raises RunLockedError while another
        run holds it; ``--out`` being a file, or a directory this process cannot write, raises the
        OSError subclass the system gave (NotADirectoryError, FileExistsError, PermissionError, ...) with a
        message that names the path. On a store: the lease (``storage.Lease``), refused with its holder."""
        if isinstance(self.path, storage.StorePath):
            return self._acquire_lease()
        self._make_directory()
        lock_path = self.lock_path
        try:
            handle = open(lock_path, "a+")
        except OSError as error:
            raise attach_path(error, lock_path, "cannot open the run lock") from error
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            _, holder = parse_lock(handle.read())
            handle.close()
            raise RunLockedError(
                f"{self.path} is in use by another layerloop run ({holder or 'another process'}). Wait for it "
                f"to finish, or give this run another --out directory.") from None
        except OSError as error:
            handle.close()
            raise attach_path(error, lock_path, "cannot lock the run lock") from error
        token = secrets.token_hex(16)
        holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{_dt.datetime.now().isoformat(timespec='seconds')}")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(format_lock(holder, token))
            handle.flush()
            os.fsync(handle.fileno())  # workers on other nodes read it through the shared filesystem
        except OSError as error:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()
            raise attach_path(error, lock_path, "cannot write the run lock") from error
        self._lock_file = handle
        self._owner = RunOwner(token=token, lock_path=lock_path, holder=holder)
        return self

    def _acquire_lease(self) -> RunDirectory:
        self.path.mkdir()  # the bucket exists and these credentials can list it, before any write
        lease = storage.Lease(self.lock_path)
        try:
            lease.acquire()
        except storage.LeaseHeld as error:
            raise RunLockedError(str(error)) from None
        self._lease = lease
        self._owner = RunOwner(token=lease.token or "", lock_path=self.lock_path, holder=lease.holder)
        return self

    def _make_directory(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "the run directory is a file, not a directory", str(self.path))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise attach_path(error, self.path, "cannot create the run directory") from error
        # A directory this user cannot write fails at the lock's open() below, with the lock's path (no
        # os.access pre-check: it is wrong on some network file systems and would refuse usable ones).

    @property
    def owner(self) -> RunOwner | None:
        """This driver's ``RunOwner`` while it holds the lock (give it to ``ShardWriter``), else None."""
        return self._owner if (self._lock_file is not None or self._lease is not None) else None

    @property
    def owner_token(self) -> str | None:
        owner = self.owner
        return owner.token if owner is not None else None

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> RunDirectory:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -------------------------------------------------------------- run.json
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def read_run_json(self) -> dict[str, Any] | None:
        """run.json's content, None when there is none. One that is not a JSON object raises a
        RunMismatchError naming the file (it cannot be checked against this run)."""
        if not self.run_json.exists():
            return None
        text = self.run_json.read_text(errors="replace")
        try:
            info = json.loads(text)
        except ValueError as error:
            raise RunMismatchError(f"{self.run_json} is not valid JSON ({error}); it cannot be checked against "
                                   f"this run. Delete {self.path} to start over, or use another --out.") from None
        if not isinstance(info, dict):
            raise RunMismatchError(f"{self.run_json} does not hold a run record. Delete {self.path} to start over, "
                                   f"or use another --out.")
        return info

    def check_config(self, fingerprint: str, same_config: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Refuse (RunMismatchError) a directory holding a run of another config; call it before listing
        the source (a demo source renders while listing). ``start`` checks again, with the key listing.
        ``same_config(run_json)``, asked when the fingerprints differ, may accept a run recorded under an
        earlier definition of the fingerprint (``BuildConfig.matches_record``); ``start`` then records ours."""
        previous = self.read_run_json()
        if (previous is not None and previous.get("fingerprint") != fingerprint
                and not (same_config is not None and same_config(previous))):
            raise RunMismatchError(
                f"{self.path} holds a run of a different config (fingerprint {previous.get('fingerprint')}, "
                f"this one {fingerprint}). Use another --out directory, or delete {self.path} to start over.")

    def start(self, config: dict[str, Any], fingerprint: str, keys_digest: str, num_shards: int,
              num_items: int, seed: int, name: str,
              same_config: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Write run.json for a new run, or check that a resumed run is the same run."""
        self.check_config(fingerprint, same_config)
        previous = self.read_run_json()
        if previous is not None:
            if previous.get("keys_digest") != keys_digest:
                raise RunMismatchError(
                    f"the source of {self.path} lists different samples than when the run started "
                    f"({previous.get('num_items')} then, {num_items} now). Use another --out directory.")
        info = dict(previous or {})
        info.update({
            "name": name,
            "config": config,
            "fingerprint": fingerprint,
            "keys_digest": keys_digest,
            "seed": seed,
            "shards": num_shards,
            "num_items": num_items,
            "versions": library_versions(),
            "status": "running",
        })
        info.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
        info["attempts"] = int(info.get("attempts", 0)) + 1
        self._write_json(info)
        return info

    def finish(self, **extra: Any) -> None:
        info = self.read_run_json() or {}
        info.update(extra)
        info["status"] = "complete"
        info["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        self._write_json(info)

    def fail(self, error_message: str, **extra: Any) -> bool:
        """Record that the run stopped on an error: ``status: failed``, ``error`` (the message) and
        ``failed`` (a timestamp) in run.json, plus ``extra``; written atomically. Never raises: called
        while another exception is being handled, it must not hide it. Returns whether run.json was
        written (False when it could not be, e.g. the disk is full or the directory is gone, or when
        this driver no longer owns the run: another driver's run.json is not touched)."""
        try:
            owner = self.owner
            if owner is not None and owner.current()[0] != owner.token:
                return False
            try:
                info = self.read_run_json() or {}
            except Exception:  # noqa: BLE001 - an unreadable run.json is replaced by one that says why
                info = {}
            info.update(extra)
            info["status"] = "failed"
            info["error"] = str(error_message)
            info["failed"] = _dt.datetime.now().isoformat(timespec="seconds")
            self._write_json(info)
            return True
        except Exception:  # noqa: BLE001 - see the docstring (the temporary is removed by write_json_atomic)
            return False

    def _write_json(self, info: dict[str, Any]) -> None:
        # default=str: a value of ``extra`` that JSON has no type for is recorded as text, not a crash
        if isinstance(self.run_json, storage.StorePath):  # one PUT, atomic for readers; nothing secret in it
            self.run_json.write_text(dump_json(scrub(info), default=str, newline=False))
            return
        write_json_atomic(self.run_json, scrub(info), default=str, newline=False)

    # -------------------------------------------------------------- failures
    def write_failures(self, name: str, shard_failures: dict[int, tuple], listing_failures: tuple) -> int:
        """Collect every failure into ``failures.parquet`` (listing failures first, then by shard)."""
        rows = [{**f.as_row(), "shard": ""} for f in listing_failures]
        for index in sorted(shard_failures):
            for key, stage, error_type, message in shard_failures[index]:
                rows.append({"key": key, "stage": stage, "error_type": error_type, "message": message,
                             "shard": shard_stem(name, index)})
        # Any Python str is written: lone surrogates (file names that are not UTF-8) become escapes.
        rows = [{column: safe_text(value) for column, value in row.items()} for row in rows]
        if isinstance(self.path, storage.StorePath):
            import pyarrow as pa

            sink = pa.BufferOutputStream()
            pq.write_table(table_from_rows(rows, FAILURE_SCHEMA), sink)
            (self.path / "failures.parquet").write_bytes(sink.getvalue().to_pybytes())
            return len(rows)
        with atomic_path(self.path / "failures.parquet") as tmp:
            # not pa.Table.from_pylist: it imports pandas, 0.5 s at the end of a Ray build (shards.table_from_rows)
            pq.write_table(table_from_rows(rows, FAILURE_SCHEMA), tmp)
        return len(rows)
