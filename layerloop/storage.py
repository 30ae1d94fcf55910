"""Where layerloop reads and writes: local paths, or object stores through fsspec (issue #17).

Every input and output location may be a plain path, a ``file://`` URL, or an fsspec URL of an object
store (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://...``, any protocol fsspec knows).

* ``location(x)``: a plain path or ``file://`` URL becomes a ``pathlib.Path`` and every caller keeps its
  local code (``os.replace`` commits, ``flock``), byte for byte as before; a store URL becomes a
  ``StorePath``, which offers the subset of ``pathlib.Path`` the run, shard and report code use (``/``,
  ``name``, ``stem``, ``suffix``, ``with_suffix``, ``exists``, ``is_dir``, ``glob``, ``read_bytes``,
  ``write_bytes``, ``stat().st_size``, ``unlink``, ``open``). A ``StorePath`` has no ``__fspath__``: code
  that would hand it to ``open()`` or ``os.replace`` fails loudly instead of writing a local folder named
  ``s3:``.
* Credentials come only from the standard places: fsspec's and the cloud SDK's own chains (environment,
  profiles, instance roles; ``AWS_ENDPOINT_URL`` names an S3-compatible endpoint, botocore reads it). This
  module takes no keys, never logs or stores options, and ``redact`` removes any ``user:secret@`` part
  and query string from a URL before it is shown or recorded.
* Errors: every store call goes through ``_call``, which turns what s3fs/botocore raise into one
  ``StoreError`` (an ``OSError`` with errno, the URL as ``filename`` and a readable reason): a bucket that
  does not exist (ENOENT), missing credentials (ENOKEY), refused ones (EACCES), an endpoint that cannot be
  reached (ECONNREFUSED). The CLI prints it as one line (exit code 4).

Commit on a store. An object store has no rename, but a single PUT is atomic: readers see the whole old
object or the whole new one. A shard is committed by writing its tar object first and its parquet index
last (``datasets/shards.py``); the index is the commit mark and records the tar's size and sha256, so a
reader trusts only a tar whose index exists and matches. A tar without an index (a writer stopped between
the two PUTs) is abandoned and removed by the next run that holds the lease (``remove_abandoned``).

One writer per run prefix: ``Lease`` (see its docstring for what is and is not guaranteed).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fnmatch
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from layerloop.errors import EnvironmentFailure, LayerloopError

log = logging.getLogger(__name__)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
LEASE_NAME = "run.lease"
LEASE_TTL_ENV = "LAYERLOOP_LEASE_TTL_S"
DEFAULT_LEASE_TTL_S = 120.0
_CHUNK = 1 << 20


class StoreError(EnvironmentFailure):
    """A store operation failed: one line naming the URL and the cause (``errno``, ``filename``, ``strerror``)."""


# ============================================================================= URLs
def is_remote(value: Any) -> bool:
    """An fsspec URL of something other than the local file system (``s3://``, ``gs://``, ``memory://``)."""
    if isinstance(value, StorePath):
        return True
    if not isinstance(value, str):
        return False
    match = _URL.match(value)
    return bool(match) and match.group(1).lower() not in ("file", "local")


def location(value: str | os.PathLike | StorePath) -> Path | StorePath:
    """A ``Path`` for a plain path or ``file://`` URL (unchanged local behaviour), a ``StorePath`` for a
    store URL."""
    if isinstance(value, StorePath):
        return value
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    if is_remote(text):
        return StorePath(text)
    match = _URL.match(text)
    if match:  # file:// or local://
        return Path(match.group(2) if match.group(2).startswith("/") else "/" + match.group(2))
    return Path(text)


def redact(url: Any) -> str:
    """``url`` as text without credentials: a ``user:secret@`` part and a query string are removed."""
    text = str(url)
    match = _URL.match(text)
    if not match:
        return text
    rest = match.group(2).split("?", 1)[0]
    head, sep, tail = rest.partition("/")
    if "@" in head:
        head = head.rsplit("@", 1)[1]
    return f"{match.group(1)}://{head}{sep}{tail}"


_FILESYSTEMS: dict[tuple[str, int], Any] = {}


def filesystem(protocol: str) -> Any:
    """The fsspec file system of ``protocol`` for this process, with the SDK's own credential chain and
    without listing caches (a run's prefix changes under the writer, and a cached listing would hide a
    commit). One per process (Ray workers make their own; fsspec's async file systems must not cross a fork)."""
    key = (protocol, os.getpid())
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        import fsspec

        options: dict[str, Any] = {"skip_instance_cache": True}
        if protocol in ("s3", "s3a", "gs", "gcs", "abfs", "az"):
            options["use_listings_cache"] = False
        try:
            fs = fsspec.filesystem(protocol, **options)
        except ImportError as error:
            raise StoreError(errno.EPROTONOSUPPORT, f"no fsspec file system for {protocol}:// is installed "
                             f"({error}); for S3 `pip install s3fs`, for GCS `pip install gcsfs`",
                             f"{protocol}://") from None
        except ValueError as error:
            raise StoreError(errno.EPROTONOSUPPORT, f"unknown storage protocol {protocol}:// ({error})",
                             f"{protocol}://") from None
        _FILESYSTEMS[key] = fs
    return fs


def _describe(error: BaseException) -> tuple[int, str]:
    """(errno, reason) of what a store call raised; the reason holds no credentials (botocore's messages
    name the endpoint and operation, never keys)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return errno.ENOKEY, ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile "
                              "(AWS_PROFILE), or run with an instance role")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ServerDisconnectedError", "ClientOSError", "ReadTimeoutError"} or isinstance(error, ConnectionError):
        return errno.ECONNREFUSED, f"cannot reach the store endpoint ({text})"
    lowered = text.lower()
    if "bucket does not exist" in lowered or "nosuchbucket" in lowered:
        return errno.ENOENT, "the bucket does not exist"
    if isinstance(error, PermissionError) or "access denied" in lowered or "forbidden" in lowered \
            or "invalidaccesskeyid" in lowered or "signaturedoesnotmatch" in lowered:
        return errno.EACCES, f"access denied by the store ({text})"
    if isinstance(error, FileNotFoundError):
        return errno.ENOENT, "no such object"
    if isinstance(error, OSError) and error.errno:
        return error.errno, error.strerror or text
    return errno.EIO, text


def _call(what: str, url: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - every store error becomes one line naming the URL
        code, reason = _describe(error)
        raise StoreError(code, f"cannot {what}: {reason}", redact(url)) from None


# ============================================================================= StorePath
class StorePath:
    """An object (or a prefix) in a store, with the part of ``pathlib.Path``'s interface layerloop uses.
    Picklable (the URL only): a Ray worker opens its own file system from its own environment."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        match = _URL.match(str(url))
        if not match:
            raise ValueError(f"not a store URL: {url}")
        self.url = f"{match.group(1).lower()}://{match.group(2).rstrip('/')}"

    # ------------------------------------------------------------------ naming
    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def path(self) -> str:
        """The path the file system takes (``bucket/key``)."""
        return self.url.split("://", 1)[1]

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    def __truediv__(self, name: str | os.PathLike) -> StorePath:
        return StorePath(f"{self.url}/{os.fspath(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        index = name.rfind(".")
        return name[index:] if 0 < index < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        suffix = self.suffix
        return self.name[: -len(suffix)] if suffix else self.name

    def with_suffix(self, suffix: str) -> StorePath:
        return self.with_name(self.stem + suffix)

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    @property
    def parent(self) -> StorePath:
        head = self.path.rsplit("/", 1)[0] if "/" in self.path else self.path
        return StorePath(f"{self.protocol}://{head}")

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"StorePath({redact(self.url)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: StorePath) -> bool:
        return self.url < other.url

    def __getstate__(self) -> str:
        return self.url

    def __setstate__(self, state: str) -> None:
        self.url = state

    # ------------------------------------------------------------------ queries
    def exists(self) -> bool:
        return bool(_call("check", self.url, self.fs.exists, self.path))

    def is_file(self) -> bool:
        return bool(_call("check", self.url, self.fs.isfile, self.path))

    def is_dir(self) -> bool:
        """A prefix with at least one object below it (object stores have no empty folders)."""
        return bool(_call("list", self.url, lambda: bool(self.fs.ls(self.path, detail=False))
                          if self.fs.isdir(self.path) else False))

    def stat(self) -> SimpleNamespace:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(self)) from None
        except Exception as error:  # noqa: BLE001
            code, reason = _describe(error)
            raise StoreError(code, f"cannot stat: {reason}", str(self)) from None
        return SimpleNamespace(st_size=int(info.get("size") or 0), etag=info.get("ETag"))

    def iterdir(self) -> Iterator[StorePath]:
        names = _call("list", self.url, self._list)
        for name in names:
            yield self / name

    def _list(self) -> list[str]:
        try:
            entries = self.fs.ls(self.path, detail=False, refresh=True)
        except TypeError:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        prefix = self.path + "/"
        return sorted({e[len(prefix):].split("/", 1)[0] for e in entries if e.startswith(prefix)} - {""})

    def files(self) -> list[StorePath]:
        """The objects directly below this prefix (not sub-prefixes), from one listing."""
        def listing() -> list[StorePath]:
            try:
                entries = self.fs.ls(self.path, detail=True)
            except FileNotFoundError:
                return []
            return sorted(StorePath(f"{self.protocol}://{e['name']}") for e in entries
                          if e.get("type") == "file" and e["name"].rstrip("/") != self.path)
        return _call("list", self.url, listing)

    def glob(self, pattern: str) -> Iterator[StorePath]:
        """Direct children whose name matches ``pattern`` (``*.parquet``); no recursion."""
        for name in _call("list", self.url, self._list):
            if fnmatch.fnmatchcase(name, pattern):
                yield self / name

    def rglob(self, pattern: str) -> Iterator[StorePath]:
        """Objects at any depth below this prefix whose name matches ``pattern``, from one recursive listing."""
        for found in _call("list", self.url, self.fs.find, self.path):
            if fnmatch.fnmatchcase(found.rsplit("/", 1)[-1], pattern):
                yield StorePath(f"{self.protocol}://{found}")

    # ------------------------------------------------------------------ reading
    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(self)) from None
        except Exception as error:  # noqa: BLE001
            code, reason = _describe(error)
            raise StoreError(code, f"cannot read: {reason}", str(self)) from None

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def read_range(self, start: int, end: int) -> bytes:
        return _call("read", self.url, self.fs.cat_file, self.path, start=start, end=end)

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        if "b" not in mode:
            raise ValueError("StorePath.open is binary only")
        return _call("open", self.url, self.fs.open, self.path, mode, **kwargs)

    # ------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes) -> Any:
        """One PUT: atomic for readers (the whole old object or the whole new one)."""
        return _call("write", self.url, self.fs.pipe_file, self.path, bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> Any:
        return self.write_bytes(text.encode(encoding))

    def put_file(self, local: str | os.PathLike) -> None:
        """Upload a local file as this object (multipart for a large file: the object appears when it
        completes, never half)."""
        _call("write", self.url, self.fs.put_file, os.fspath(local), self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(errno.ENOENT, "no such object", str(self)) from None
        except Exception as error:  # noqa: BLE001
            code, reason = _describe(error)
            if code == errno.ENOENT and missing_ok and reason == "no such object":
                return
            raise StoreError(code, f"cannot remove: {reason}", str(self)) from None

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: checks that the bucket exists and can be listed with these
        credentials (the first call of a run on a store, so a wrong bucket or missing credentials fail
        before anything is written)."""
        check_bucket(self)

    def create_exclusive(self, data: bytes) -> str | None:
        """Create the object only if it does not exist (S3 ``PutObject`` with ``If-None-Match: *``; fsspec's
        ``mode="create"``). Returns the new ETag; raises ``FileExistsError`` when it exists. A file system
        without conditional create raises ``NotImplementedError`` (``Lease`` then falls back, see there)."""
        try:
            out = self.fs.pipe_file(self.path, bytes(data), mode="create")
        except FileExistsError:
            raise
        except (NotImplementedError, TypeError) as error:
            raise NotImplementedError(f"{self.protocol}:// has no conditional create ({error})") from None
        except Exception as error:  # noqa: BLE001
            if _precondition(error):
                raise FileExistsError(errno.EEXIST, "exists", str(self)) from None
            code, reason = _describe(error)
            raise StoreError(code, f"cannot create: {reason}", str(self)) from None
        return _etag(out)

    def replace_if_match(self, data: bytes, etag: str) -> str | None:
        """Overwrite only if the object still has ``etag`` (S3 ``If-Match``). Raises ``FileExistsError``
        when another writer changed it, ``NotImplementedError`` where the store has no such condition."""
        if self.protocol not in ("s3", "s3a"):
            raise NotImplementedError(f"{self.protocol}:// has no conditional overwrite here")
        try:
            out = self.fs.pipe_file(self.path, bytes(data), IfMatch=etag)
        except Exception as error:  # noqa: BLE001
            text = str(error).lower()
            if _precondition(error):
                raise FileExistsError(errno.EEXIST, "changed by another writer", str(self)) from None
            if "notimplemented" in text or "not implemented" in text:
                raise NotImplementedError(f"the store does not implement If-Match ({error})") from None
            code, reason = _describe(error)
            raise StoreError(code, f"cannot write: {reason}", str(self)) from None
        return _etag(out)


def _precondition(error: BaseException) -> bool:
    """S3's 412 PreconditionFailed (s3fs raises it as a plain OSError) or 409 ConditionalRequestConflict."""
    text = str(error).lower().replace("-", "")
    return "precondition" in text or "conditionalrequestconflict" in text


def _etag(response: Any) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None


_CHECKED_BUCKETS: set[tuple[str, str, int]] = set()


def check_bucket(path: StorePath) -> None:
    """Raise one ``StoreError`` unless ``path``'s bucket exists and can be listed: ENOENT for a missing
    bucket, ENOKEY for missing credentials, EACCES for refused ones, ECONNREFUSED for an endpoint that cannot be reached."""
    fs = path.fs
    key = (path.protocol, path.bucket, os.getpid())
    if key in _CHECKED_BUCKETS:
        return
    try:
        fs.ls(path.bucket, detail=False)
        _CHECKED_BUCKETS.add(key)
    except Exception as error:  # noqa: BLE001
        code, reason = _describe(error)
        if code == errno.ENOENT:
            reason = f"the bucket {path.bucket} does not exist"
        raise StoreError(code, f"cannot use the store: {reason}", str(path)) from None


def abort_multipart_uploads(prefix: StorePath) -> int:
    """Abort the unfinished multipart uploads under ``prefix`` (S3): what a writer killed in the middle of
    a large upload leaves. They are not objects (no reader sees them), but the store keeps and bills their
    parts. Call only while holding the prefix's lease. Other stores: nothing to do (0)."""
    if prefix.protocol not in ("s3", "s3a"):
        return 0
    fs = prefix.fs
    bucket, _, key = prefix.path.partition("/")
    key_prefix = f"{key}/" if key else ""
    uploads = _call("list uploads", prefix.url, fs.call_s3, "list_multipart_uploads", Bucket=bucket,
                    Prefix=key_prefix).get("Uploads", [])
    for upload in uploads:
        _call("abort an upload", prefix.url, fs.call_s3, "abort_multipart_upload", Bucket=bucket,
              Key=upload["Key"], UploadId=upload["UploadId"])
    return len(uploads)


# ============================================================================= helpers for both kinds
def sha256_of(path: Path | StorePath) -> str:
    import hashlib

    if isinstance(path, Path):
        from layerloop.files import sha256_file

        return sha256_file(path)
    digest = hashlib.sha256()
    with path.open("rb", block_size=8 * _CHUNK) as handle:
        while chunk := handle.read(8 * _CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_read(url: str | os.PathLike | StorePath) -> Any:
    """A binary reader of a local path or a store object (streaming, for tars)."""
    where = location(url)
    if isinstance(where, Path):
        return open(where, "rb")
    return where.open("rb", block_size=8 * _CHUNK)


# ============================================================================= the lease
@dataclass
class LeaseRecord:
    token: str | None
    holder: str
    expires: float
    etag: str | None = None

    @property
    def expired(self) -> bool:
        return self.expires < time.time()


def read_lease(path: StorePath) -> LeaseRecord | None:
    """The lease object's content, None when there is none."""
    try:
        info = path.fs.info(path.path)
        data = path.fs.cat_file(path.path)
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001
        code, reason = _describe(error)
        raise StoreError(code, f"cannot read the run lease: {reason}", str(path)) from None
    try:
        value = json.loads(data.decode("utf-8", "replace"))
        return LeaseRecord(str(value.get("token")) or None, str(value.get("holder", "")),
                           float(value.get("expires", 0)), info.get("ETag"))
    except (ValueError, AttributeError, TypeError):
        return LeaseRecord(None, f"an unreadable lease object ({len(data)} bytes)", 0.0, info.get("ETag"))


def lease_ttl() -> float:
    return float(os.environ.get(LEASE_TTL_ENV) or DEFAULT_LEASE_TTL_S)


_HELD_TOKENS: set[str | None] = set()
_HOLDER = re.compile(r"^pid (\d+) on (\S+) since ")


def _holder_is_dead(record: LeaseRecord) -> bool:
    """The lease names a process on this host that no longer runs (killed, or this process after a lease it
    could not remove): taken over at once, as the kernel releases a dead process's ``flock``. A lease of
    another host is only taken over when it has expired."""
    match = _HOLDER.match(record.holder)
    if not match or match.group(2) != socket.gethostname():
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return record.token not in _HELD_TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class LeaseHeld(LayerloopError, RuntimeError):
    """Another writer holds the run's lease; the message names it (exit code 2, like the local lock)."""


class Lease:
    """One writer per run prefix on an object store: the object ``<prefix>/run.lease`` (JSON: holder line
    ``pid N on HOST since TIME``, a random owner token, an expiry time).

    * ``acquire``: create the object with a conditional PUT (S3 ``If-None-Match: *``), which the store
      grants to exactly one of any number of concurrent writers. If it exists and has not expired, refuse
      (``LeaseHeld``) naming its holder, like the local ``flock``. If it has expired (its driver died: no
      heartbeat for ``LAYERLOOP_LEASE_TTL_S``, 120 s), take it over with a PUT conditional on its ETag
      (``If-Match``): again exactly one of several racing writers wins.
    * A heartbeat thread renews the expiry every TTL/4 with ``If-Match`` on the ETag it last wrote; when the
      renewal is refused (another writer took the lease after this one stalled past the TTL) it stops and
      ``RunOwner.check`` refuses this driver's next commit (exit 3).
    * ``release`` deletes the object when it still holds this token.

    What is guaranteed on S3 (and S3-compatible stores implementing conditional writes, as MinIO and moto
    do): two drivers never both acquire a live lease, and a takeover of an expired one has one winner. A
    driver that is alive but frozen for longer than the TTL (a paused VM) can lose its lease without
    noticing until its next commit check; between that check and its PUTs the same window exists as
    locally (``shards.RunOwner``): it writes the same deterministic bytes, and the tar comes before the
    index. The release (read, compare, delete) is not atomic: a takeover exactly between the compare and
    the delete would lose the new lease (S3 has no conditional delete for general-purpose buckets).
    Where the store has no conditional create (``NotImplementedError`` from the file system; e.g. a
    ``memory://`` or other fsspec file system), the lease is best effort: it checks that no live lease
    exists, writes its own and reads it back after a second; two writers starting within that second can
    both think they hold it, and the commit check before every shard narrows, but does not close, that.
    """

    def __init__(self, path: StorePath, ttl: float | None = None):
        self.path = path
        self.ttl = float(ttl if ttl is not None else lease_ttl())
        self.token: str | None = None
        self.holder = ""
        self.etag: str | None = None
        self.conditional = True
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "token": self.token, "expires": time.time() + self.ttl,
                           "ttl": self.ttl}, sort_keys=True).encode()

    def acquire(self) -> Lease:
        self.token = secrets.token_hex(16)
        self.holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{_dt.datetime.now().isoformat(timespec='seconds')}")
        try:
            self.etag = self.path.create_exclusive(self._body())
        except FileExistsError:
            current = read_lease(self.path)
            if current is None:  # released in between: try once more
                self.etag = self.path.create_exclusive(self._body())
            elif not current.expired and not _holder_is_dead(current):
                raise LeaseHeld(self._refusal(current)) from None
            else:
                log.info("taking over the lease of %s (%s): %s", self.path, current.holder,
                         "expired" if current.expired else "its process is gone")
                try:
                    self.etag = self.path.replace_if_match(self._body(), current.etag or "")
                except FileExistsError:
                    raise LeaseHeld(self._refusal(read_lease(self.path) or current)) from None
                except NotImplementedError:
                    self.conditional = False
                    self.etag = _etag(self.path.write_bytes(self._body()))
        except NotImplementedError:
            self.conditional = False
            self._acquire_best_effort()
        _HELD_TOKENS.add(self.token)
        self._thread = threading.Thread(target=self._heartbeat, name="layerloop-lease", daemon=True)
        self._thread.start()
        return self

    def _acquire_best_effort(self) -> None:
        current = read_lease(self.path)
        if current is not None and not current.expired and not _holder_is_dead(current):
            raise LeaseHeld(self._refusal(current))
        self.path.write_bytes(self._body())
        time.sleep(1.0)
        current = read_lease(self.path)
        if current is None or current.token != self.token:
            raise LeaseHeld(self._refusal(current or LeaseRecord(None, "another writer", 0.0)))

    def _refusal(self, current: LeaseRecord) -> str:
        left = max(0, int(current.expires - time.time()))
        return (f"{self.path.parent} is in use by another layerloop run ({current.holder or 'unknown holder'}; "
                f"its lease {self.path.name} expires in {left} s unless renewed). Wait for it to finish, or give "
                f"this run another --out.")

    def _heartbeat(self) -> None:
        interval = max(0.2, self.ttl / 4)
        while not self._stop.wait(interval):
            try:
                if self.conditional and self.etag:
                    self.etag = self.path.replace_if_match(self._body(), self.etag)
                else:
                    current = read_lease(self.path)
                    if current is None or current.token != self.token:
                        raise FileExistsError("lease taken")
                    self.etag = _etag(self.path.write_bytes(self._body()))
            except FileExistsError:
                self.lost = True
                log.error("the lease %s was taken over by another run; this run's next commit will stop", self.path)
                return
            except NotImplementedError:
                self.conditional = False
            except Exception as error:  # noqa: BLE001 - a renewal that fails is retried at the next beat
                log.warning("cannot renew the lease %s: %s", self.path, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        _HELD_TOKENS.discard(self.token)
        if self.token is None or self.lost:
            return
        try:
            current = read_lease(self.path)
            if current is not None and current.token == self.token:
                self.path.unlink(missing_ok=True)
        except Exception as error:  # noqa: BLE001 - it expires on its own (or the next run on this host takes it)
            log.info("cannot remove the lease %s (it expires in %.0f s): %s", self.path, self.ttl, error)
        self.token = None


# ============================================================================= staged outputs
STAGING_ENV = "LAYERLOOP_STAGING_DIR"
SYNC_ENV = "LAYERLOOP_STAGING_SYNC_S"
_TMP_MARK = ".tmp-"
_MARKER_SUFFIXES = (".json", ".parquet", ".jsonl")  # commit marks and records: after data of the same mtime


def mirror(objects: list[StorePath], root: StorePath, target: Path) -> Path:
    """Copy ``objects`` (below ``root``) into the local folder ``target`` at the same relative paths, and
    return ``target``. An object whose size and ETag match the copy made before is not fetched again
    (``.mirror.json`` records them); each copy is written to a temporary name and renamed, so a killed copy
    is fetched again, never read half-written. Files of ``target`` that are not among ``objects`` (gone from
    the store since the last copy) are removed: ``target`` is the mirror's own folder. For what a library
    can only read from local files (a ``datasets`` parquet or ``save_to_disk`` folder, the records of a
    self-improvement loop); the images they point at are not copied."""
    import json
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    record = target / ".mirror.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    for obj in objects:
        if not obj.url.startswith(root.url + "/"):
            raise ValueError(f"{obj} is not below {root}")
        relative = obj.url[len(root.url) + 1:]
        info = obj.stat()
        stamp = [info.st_size, info.etag]
        local = target / relative
        if known.get(relative) == stamp and local.is_file() and local.stat().st_size == info.st_size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f"{local.name}.tmp-{os.getpid()}")
        with obj.open("rb") as source, open(partial, "wb") as sink:
            _call("read", obj.url, shutil.copyfileobj, source, sink, 1 << 22)
        os.replace(partial, local)
        known[relative] = stamp
        record.write_text(json.dumps(known, sort_keys=True))
    wanted = {target / obj.url[len(root.url) + 1:] for obj in objects} | {record}
    for local in [p for p in target.rglob("*") if p.is_file() and p not in wanted]:
        local.unlink()
        known.pop(local.relative_to(target).as_posix(), None)
    record.write_text(json.dumps(known, sort_keys=True))
    return target


CACHE_ENV = "LAYERLOOP_CACHE_DIR"


def cache_dir(url: str, kind: str, base: str | os.PathLike | None = None) -> Path:
    """A local cache folder for what is read from (or logged for) the store at ``url``: ``base`` (default
    ``$LAYERLOOP_CACHE_DIR``, else ``~/.cache/layerloop``) / ``kind`` / the first 16 hex digits of the
    URL's sha256."""
    import hashlib

    root = Path(base or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "layerloop")
    return root / kind / hashlib.sha256(redact(url).encode()).hexdigest()[:16]


def staging_base() -> Path:
    """Where staging folders are made: ``$LAYERLOOP_STAGING_DIR``, default ``~/.cache/layerloop/staging``."""
    return Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "layerloop" / "staging")


def staging_dir(url: str) -> Path:
    """The local folder a store output is staged in: ``$LAYERLOOP_STAGING_DIR`` (default
    ``~/.cache/layerloop/staging``) / the first 16 hex digits of the URL's sha256."""
    import hashlib

    return staging_base() / hashlib.sha256(redact(url).encode()).hexdigest()[:16]


class Staged:
    """``--out s3://...`` for commands whose writers need a local folder (``train``, ``evaluate``,
    ``self-improve``: checkpoints, round folders, reports): the command runs in a local staging folder
    (``staging_dir``) that mirrors the store prefix.

    * Under the prefix's lease (``Lease``: one writer, refused with the holder's line), for the whole command.
    * On entry, objects missing locally or of another size or ETag are downloaded (the prefix is the truth;
      a staging folder holding more, from a run killed before its last upload, keeps it: that is newer
      progress).
    * Every ``LAYERLOOP_STAGING_SYNC_S`` seconds (60) and on exit (also after an error or an interrupt),
      files new or changed since the last upload are uploaded in the order they were last written
      (modification time; on a tie data before ``.json``/``.parquet`` records), then objects whose file is
      gone locally (older checkpoints) are removed. The writers write their commit marks last (a shard's
      index after its tar, a checkpoint's ``trainer.pt`` after its weights, a metrics line before the
      checkpoint of its step), so an upload cut short leaves every mark on the store behind what it marks. A
      copy on the store is therefore a state the local run went through, at most one sync interval old, and
      the same command resumes from it on any machine.
    * The bytes are those of a local run: the command itself writes local files.

    Work on other nodes of a Ray cluster (no shared disk needed). The command hands the prefix over
    (``handoff``: its own syncing stops after one upload) to Ray tasks that each open a *node copy*
    (``Staged(url, lease=False)``, the same folder name under that node's ``staging_base``): it is made
    equal to the store on entry (files the store lacks are removed; one pull at a time per node), and a
    writer's copy (``writer=True``, the single task that writes at that moment: rank 0 of Ray Train)
    uploads like the command's own. When the tasks are done the command's folder is made equal to the
    store again and its syncing goes on. ``staging_of(path)`` finds the staged prefix of a local path in
    this process. Users: Ray Train's workers (rank 0 the writer) and the steps of a self-improvement loop
    (one at a time, each a writer); records they share name paths by URL (``canonical``/``localize``).

    The staging folder is a write outside ``--out`` (in the user's cache; delete it freely once synced).
    """

    def __init__(self, url: str, interval: float | None = None, *, lease: bool = True, writer: bool = True):
        self.remote = StorePath(url)
        self.local = staging_dir(url)
        self.interval = float(interval if interval is not None else os.environ.get(SYNC_ENV) or 60)
        self.owner, self.writer = lease, writer or lease
        self._record = self.local.with_name(self.local.name + ".objects.json")
        self._pushed: dict[str, tuple[int, int]] = {}
        self._etags: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease: Lease | None = None

    def __enter__(self) -> Path:
        if self.owner:
            check_bucket(self.remote)
            self.lease = Lease(self.remote / LEASE_NAME).acquire()
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            if self.owner:
                self.pull()
            else:
                with _node_lock(self.local.with_name(self.local.name + ".lock")):
                    self.pull(mirror=True)
        except BaseException:
            if self.lease is not None:
                self.lease.release()
            raise
        _ACTIVE[str(self.local.resolve())] = self
        self._start()
        return self.local

    def __exit__(self, *exc: object) -> None:
        self._halt()
        _ACTIVE.pop(str(self.local.resolve()), None)
        try:
            if self.writer:
                self.push()
        finally:
            if self.lease is not None:
                self.lease.release()

    def _start(self) -> None:
        if self.writer and self.interval > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="layerloop-staging", daemon=True)
            self._thread.start()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def handoff(self) -> Iterator[str]:
        """Hand the prefix to Ray tasks on any node (node copies, see the class docstring) for the block:
        upload what is new, stop syncing, yield the URL; afterwards (also after an error) make this folder
        equal to the store and sync on. Nested hand-offs of one prefix are one."""
        if self._handed:
            yield self.remote.url
            return
        self._halt()
        self._handed = True
        try:
            self.push()
            yield self.remote.url
        finally:
            self._handed = False
            self.pull(mirror=True)
            self._start()

    _handed = False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.push()
            except Exception as error:  # noqa: BLE001 - the exit push reports it
                log.warning("cannot sync %s to %s yet: %s", self.local, self.remote, error)

    def _remote_files(self) -> dict[str, tuple[int, str | None]]:
        def find() -> dict[str, tuple[int, str | None]]:
            try:
                found = self.remote.fs.find(self.remote.path, detail=True)
            except FileNotFoundError:
                return {}
            prefix = self.remote.path + "/"
            return {name[len(prefix):]: (int(info.get("size") or 0), info.get("ETag") or info.get("etag"))
                    for name, info in found.items()
                    if name.startswith(prefix) and info.get("type", "file") == "file"}
        files = _call("list", self.remote.url, find)
        return {name: info for name, info in files.items()
                if name.rsplit("/", 1)[-1] != LEASE_NAME and _TMP_MARK not in name}

    def _load_record(self) -> None:
        try:
            self._etags = json.loads(self._record.read_text())
        except (OSError, ValueError):
            self._etags = {}

    def _save_record(self) -> None:
        tmp = self._record.with_name(f"{self._record.name}{_TMP_MARK}{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(self._etags, sort_keys=True))
        os.replace(tmp, self._record)

    def _local_files(self) -> dict[str, Path]:
        """The folder's files, not those being written (a ``.tmp-`` name, or inside a ``.tmp-`` folder: a
        checkpoint before its rename)."""
        files = {}
        for path in sorted(self.local.rglob("*")):
            name = path.relative_to(self.local).as_posix()
            if _TMP_MARK not in name and path.is_file() and not path.is_symlink():
                files[name] = path
        return files

    def pull(self, mirror: bool = False) -> int:
        """Download what the staging folder lacks or holds in another version (size, or the ETag recorded
        when it was last downloaded or uploaded); returns how many files. ``mirror``: also remove local
        files the store does not have (and folders left empty), and re-fetch a file of the same size whose
        ETag is not known: the folder is then exactly the store."""
        with self._lock:
            self._load_record()
            remote = self._remote_files()
            count = 0
            for name, (size, etag) in sorted(remote.items()):
                target = self.local / name
                if target.is_file() and target.stat().st_size == size and (
                        self._etags.get(name) == etag or (not mirror and name not in self._etags)):
                    info = target.stat()
                    self._pushed[name] = (info.st_size, info.st_mtime_ns)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}{_TMP_MARK}{secrets.token_hex(4)}")
                try:
                    _call("read", (self.remote / name).url, self.remote.fs.get_file, (self.remote / name).path,
                          str(tmp))
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                info = target.stat()
                self._pushed[name] = (info.st_size, info.st_mtime_ns)
                self._etags[name] = etag
                count += 1
            if mirror:
                for name, path in self._local_files().items():
                    if name not in remote:
                        path.unlink(missing_ok=True)
                        self._pushed.pop(name, None)
                        self._etags.pop(name, None)
                for folder in sorted((p for p in self.local.rglob("*") if p.is_dir()), reverse=True):
                    if not any(folder.iterdir()):
                        folder.rmdir()
            self._save_record()
            return count

    def push(self) -> int:
        """Upload new and changed files in the order they were written, then remove objects deleted
        locally."""
        with self._lock:
            if not self._etags:
                self._load_record()
            local = self._local_files()
            changed = []
            for name, path in local.items():
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                if self._pushed.get(name) != (info.st_size, info.st_mtime_ns):
                    changed.append((info.st_mtime_ns, name.endswith(_MARKER_SUFFIXES), name, path, info))
            for _, _, name, path, info in sorted(changed, key=lambda item: item[:3]):
                try:
                    (self.remote / name).put_file(path)
                except StoreError as error:
                    if not path.exists():  # removed by the command meanwhile
                        continue
                    raise error
                self._pushed[name] = (info.st_size, info.st_mtime_ns)
            remote = self._remote_files()
            # Only what this folder held (pulled or uploaded) and no longer holds: objects another writer put
            # under the prefix meanwhile (a build writing its shards straight to the store) stay.
            for name in sorted(n for n in set(remote) - set(local) if n in self._pushed or n in self._etags):
                (self.remote / name).unlink(missing_ok=True)
                self._pushed.pop(name, None)
                self._etags.pop(name, None)
            for _, _, name, _, info in changed:
                if name in remote and remote[name][0] == info.st_size:
                    self._etags[name] = remote[name][1]
            self._save_record()
            return len(changed)


_ACTIVE: dict[str, Staged] = {}  # local staging folder -> its Staged, in this process


def staging_of(path: str | os.PathLike) -> tuple[Staged, str] | None:
    """(the ``Staged`` open in this process whose folder holds ``path``, ``path`` relative to it), or None."""
    try:
        resolved = Path(path).resolve()
    except (OSError, TypeError):
        return None
    for root, staged in list(_ACTIVE.items()):
        if resolved == Path(root) or resolved.is_relative_to(root):
            return staged, resolved.relative_to(root).as_posix()
    return None


@contextlib.contextmanager
def viewing(url: str, folder: Path) -> Iterator[Path]:
    """Read ``folder`` (a copy of the prefix ``url`` made earlier: a staging folder, a mirror of records) as
    the prefix for the block, without syncing it: records that name ``url`` read as paths in it
    (``localize``)."""
    view = Staged(url, lease=False, writer=False)
    view.local = Path(folder)
    key = str(view.local.resolve())
    previous = _ACTIVE.get(key)
    _ACTIVE[key] = view
    try:
        yield view.local
    finally:
        if previous is None:
            _ACTIVE.pop(key, None)
        else:
            _ACTIVE[key] = previous


def canonical(value: Any) -> Any:
    """``value`` (JSON data: a config, a record) with every path inside a staging folder open in this process
    written as its store URL: what records and fingerprints hold, so that they are the same on every node
    (a node copy of the folder may live elsewhere than the command's: another ``staging_base``)."""
    for root, staged in list(_ACTIVE.items()):
        value = rebase(value, root, staged.remote.url)
    return value


def localize(value: Any) -> Any:
    """The inverse of ``canonical``: every URL below a staged prefix open in this process as the path in
    its local folder (which holds what the store holds: a node copy is made equal to it on entry); the
    folder opened last when several are open for one prefix."""
    for root, staged in reversed(list(_ACTIVE.items())):
        value = rebase(value, staged.remote.url, root)
    return value


def reference(ref: str | os.PathLike) -> str:
    """A path or URL as records name it: a store URL as it is, a local path absolute (inside a staging
    folder: its store URL, ``canonical``)."""
    ref = str(ref)
    return ref if is_remote(ref) else canonical(str(Path(ref).resolve()))


def local_folder(ref: str | os.PathLike) -> Path:
    """A folder to read a model checkpoint (``final/``, a pretrained base) from: a local path as it is; a
    store URL below a staged prefix open in this process as its local copy; any other store URL mirrored
    into ``cache_dir(url, "folders")`` (files the store lacks removed; one copy at a time per machine), so
    that Ray tasks on any node load what a step on another node trained."""
    ref = localize(str(ref))
    if not is_remote(ref):
        return Path(ref)
    root = StorePath(ref)
    objects = list(root.rglob("*"))
    if not objects:
        raise FileNotFoundError(f"{redact(root.url)} holds no files (a checkpoint folder on the store was expected)")
    target = cache_dir(root.url, "folders")
    with _node_lock(target.with_name(target.name + ".lock")):
        return mirror(objects, root, target)


def rebase(value: Any, old: str, new: str) -> Any:
    """``value`` (a config's JSON data) with every string path in the folder ``old`` moved to ``new`` (a
    node copy of a staging folder may live elsewhere than the command's: another ``staging_base``)."""
    if old == new:
        return value
    if isinstance(value, dict):
        return {key: rebase(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [rebase(item, old, new) for item in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old):]
    return value


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (one node copy pulls at a time on a node)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ============================================================================= other readers
def arrow_filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow file system, path) for Ray Data's readers (``ray.data.read_webdataset(paths,
    filesystem=...)``) over the same fsspec file system and credential chain as layerloop's own reads."""
    import pyarrow.fs

    where = location(url)
    if isinstance(where, Path):
        return pyarrow.fs.LocalFileSystem(), str(where)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(where.fs)), where.path


def webdataset_url(url: Any) -> str:
    """A URL ``webdataset.WebDataset`` opens without a custom handler: the local path, or for a store
    object ``pipe:`` of this module's ``cat`` (which streams it to stdout with the standard credentials)."""
    import shlex
    import sys

    where = location(url)
    if isinstance(where, Path):
        return str(where)
    return f"pipe:{shlex.quote(sys.executable)} -m layerloop.storage cat {shlex.quote(where.url)}"


def _main(argv: list[str] | None = None) -> int:
    """``python -m layerloop.storage cat URL``: an object's bytes on stdout (for ``pipe:`` readers)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "cat":
        print("usage: python -m layerloop.storage cat URL", file=sys.stderr)
        return 2
    try:
        with open_read(args[1]) as handle:
            while chunk := handle.read(8 * _CHUNK):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    except OSError as error:
        print(f"layerloop.storage: {redact(args[1])}: {error}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
