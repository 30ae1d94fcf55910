"""Run directories: the lock, ``run.json``, resume checks and the final ``failures.parquet``.

* One writer at a time: ``run.lock`` is held with ``flock`` for the whole run. The kernel releases it
  when the process dies, so a killed run never leaves a stale lock; a second run on the same directory
  while the first is alive refuses with a message naming the holder.
* Resume: ``run.json`` stores the config fingerprint and the digest of the source's key listing. A
  re-run with the same config skips committed shards and rebuilds interrupted ones; a re-run with a
  different config or a changed source is refused instead of mixing two datasets in one directory.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from layerloop.datasets.shards import FAILURE_SCHEMA, shard_stem


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
    info = {"config": config, "fingerprint": fingerprint, "versions": library_versions(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_file = None

    # ------------------------------------------------------------------ lock
    def acquire(self) -> RunDirectory:
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / "run.lock"
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"{self.path} is in use by another layerloop run ({holder}). Wait for it to finish, "
                f"or give this run another --out directory.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{_dt.datetime.now().isoformat(timespec='seconds')}")
        handle.flush()
        self._lock_file = handle
        return self

    def release(self) -> None:
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
        if not self.run_json.exists():
            return None
        return json.loads(self.run_json.read_text())

    def start(self, config: dict[str, Any], fingerprint: str, keys_digest: str, num_shards: int,
              num_items: int, seed: int, name: str) -> dict[str, Any]:
        """Write run.json for a new run, or check that a resumed run is the same run."""
        previous = self.read_run_json()
        if previous is not None:
            if previous.get("fingerprint") != fingerprint:
                raise RunMismatchError(
                    f"{self.path} holds a run of a different config (fingerprint {previous.get('fingerprint')}, "
                    f"this one {fingerprint}). Use another --out directory, or delete {self.path} to start over.")
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

    def _write_json(self, info: dict[str, Any]) -> None:
        tmp = self.run_json.with_name("run.json.tmp")
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
        os.replace(tmp, self.run_json)

    # -------------------------------------------------------------- failures
    def write_failures(self, name: str, shard_failures: dict[int, tuple], listing_failures: tuple) -> int:
        """Collect every failure into ``failures.parquet`` (listing failures first, then by shard)."""
        rows = [{**f.as_row(), "shard": ""} for f in listing_failures]
        for index in sorted(shard_failures):
            for key, stage, error_type, message in shard_failures[index]:
                rows.append({"key": key, "stage": stage, "error_type": error_type, "message": message,
                             "shard": shard_stem(name, index)})
        tmp = self.path / "failures.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA), tmp)
        os.replace(tmp, self.path / "failures.parquet")
        return len(rows)
