"""Robust tar reading: one index and reader for webdataset tars (sources, the shard reader and the training
stream; reports can reuse it).

``tarfile`` stops quietly on a header it cannot read after the first one (a tar cut inside a header, or
garbage in the middle) and raises on the first; ``webdataset`` passes both on. Here nothing is lost without
a word: every pass over a tar records what it could not read as a ``TarProblem`` naming the URL, the byte
offset where reading stopped and, when known, how many bytes after it were not read.

* ``TarWalk(url)``: one forward pass; iterating yields a ``TarEntry`` per regular member (name, sample
  key and extension as webdataset splits them, data offset and size, and ``read()`` for the member's
  bytes while the walk stands on it). After the loop, ``problems`` says what was not read and ``cut``
  which members' data run past the end of the archive.
* ``scan_tar(url)``: the index, ``(samples, problems)``: ``TarSample(key, members={ext: MemberRef(offset,
  size)}, kept={ext: bytes}, cut={ext: message})`` in tar order, consecutive members grouped by key like
  webdataset does. Small members named in ``keep`` (captions) are read during the scan.
* ``iter_samples(url)``: every sample's bytes in one forward pass, ``(key, {ext: bytes})``, grouped like
  ``scan_tar``; strict (whole-shard readers): anything that cannot be read raises ``TarReadError``
  (``raise_problems`` does that for a walk's ``problems``).
* ``TarMember(url, name, offset, size)``: a member to read later (``.read(max_bytes)``), what a source hands
  to the ``load`` stage so that the size is checked before the bytes are read.
* ``read_member(url, ref, max_bytes=...)``: one member's bytes by offset from a plain local tar (see
  ``is_seekable``), after checking its size against ``max_bytes``, that the file still holds it, and that
  the tar header just before it still describes it (the file may have changed since the scan).

Offsets are positions in the uncompressed tar stream. gzip, bzip2 and xz compression are recognised by
their magic bytes and decompressed with the standard library; a compressed stream that ends early is a
problem like a truncated tar. After ``tarfile`` stops, the rest of the stream is read and must be only
the zero blocks that end an archive; anything else (a truncated or corrupt header, data after the
end-of-archive marker) is reported. So is a tar without an end-of-archive marker, since it is most likely
cut at a member boundary.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple

BLOCK = tarfile.BLOCKSIZE  # 512
DEFAULT_KEEP_MAX = 64 * 1024  # members kept during a scan (captions) must be at most this big
_DRAIN_CHUNK = 1 << 20
_TAIL = 1 << 16
_COMPRESSED_ERRORS = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError)
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


class TarReadError(ValueError):
    """A member cannot be read (cut short, too large, changed since it was indexed)."""


class MemberRef(NamedTuple):
    offset: int  # offset of the member's data in the uncompressed tar stream
    size: int  # its size in bytes, from the tar header


class TarEntry(NamedTuple):
    name: str  # member name as stored (str; bytes that are not UTF-8 as surrogate escapes)
    key: str | None  # webdataset sample key (the name up to the first dot of its last part), None if none
    ext: str | None  # the rest after that dot, lower-cased
    offset: int  # data offset
    size: int
    header_offset: int
    read: Callable[[], bytes]  # the member's bytes; only while the walk stands on this member


@dataclass(frozen=True)
class TarMember:
    """A member to be read later (by the ``load`` stage, after checking its size): ``url`` and the data's
    ``offset``/``size``. ``seekable`` False means it was not read while streaming a compressed or remote
    tar (it was too large) and cannot be read by offset."""

    url: str
    name: str
    offset: int
    size: int
    seekable: bool = True

    def read(self, max_bytes: int | None = None) -> bytes:
        if not self.seekable:
            raise TarReadError(f"{self.name} of {self.url} ({self.size} bytes) was not read while streaming the "
                               "tar, and a compressed or remote tar cannot be read by offset")
        return read_member(self.url, (self.offset, self.size), max_bytes=max_bytes, name=self.name)


@dataclass(frozen=True)
class TarProblem:
    url: str
    kind: str  # not_a_tar | truncated | corrupt | trailing_data | no_end_marker | unreadable
    offset: int  # byte offset (uncompressed) where reading stopped
    unread: int | None  # bytes after ``offset`` that were not read, when known
    message: str


@dataclass
class TarSample:
    key: str
    members: dict[str, MemberRef] = field(default_factory=dict)  # ext -> where its data lies
    kept: dict[str, bytes] = field(default_factory=dict)  # ext -> bytes, for members asked for in ``keep``
    cut: dict[str, str] = field(default_factory=dict)  # ext -> why it cannot be read (data past the end...)


def local_path(url: str) -> str | None:
    """The file system path of a local URL (a path or ``file://``), None for pipes and remote URLs."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("pipe:") or "://" in url:
        return None
    return url


def _compression(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


def is_seekable(url: str) -> bool:
    """An uncompressed tar on the local disk or in an object store (``s3://``, ``gs://``: ranged GETs),
    whose members can be read by offset."""
    path = local_path(url)
    if path is None:
        from layerloop import storage

        if not storage.is_remote(url) or url.startswith(("http://", "https://")):
            return False
        try:
            head = storage.StorePath(url).read_range(0, BLOCK)
        except OSError:
            return False
        return len(head) == BLOCK and _compression(head) is None and head[257:262] == b"ustar"
    try:
        with open(path, "rb") as f:
            head = f.read(BLOCK)
    except OSError:
        return False
    return len(head) == BLOCK and _compression(head) is None and head[257:262] == b"ustar"


def open_input(url: str) -> BinaryIO:
    """The raw (possibly compressed) bytes of a tar: a local file, an object in a store through fsspec
    (``s3://``, ``gs://``: ``layerloop.storage``, credentials from the standard chain), or webdataset's
    ``gopen`` otherwise (``http://``, ``pipe:``)."""
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    from layerloop import storage

    if storage.is_remote(url) and not url.startswith(("http://", "https://")):
        return storage.open_read(url)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


class _Prefixed(io.RawIOBase):
    """``head`` followed by the rest of ``stream`` (after peeking at the magic bytes)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Decompressed:
    """A decompressing reader that hands out everything decoded before a decompression error (a
    truncated stream) and raises that error only on the next read: ``BufferedReader.read(n)`` would drop
    the partial data along with the exception."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        parts, want = [], size if size is not None and size >= 0 else 1 << 62
        while want > 0:
            try:
                part = self.stream.read1(min(want, 1 << 20))
            except _READ_ERRORS as error:
                if not parts:
                    raise
                self.error = error
                break
            if not part:
                break
            parts.append(part)
            want -= len(part)
        return b"".join(parts)


class _Counter:
    """Counts the uncompressed bytes handed to ``tarfile``, keeps the last ``_TAIL`` of them (``tarfile``
    reads ahead by at most one record, so the bytes after the last complete member are still there when
    it stops) and, from ``watch`` on, finds the first non-zero byte: after the end of the last member
    only zero blocks may follow."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.pos = 0
        self.tail = bytearray()
        self.watch: int | None = None
        self.nonzero_at: int | None = None
        self.zeros = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.tail += data
            if len(self.tail) > 2 * _TAIL:
                del self.tail[: len(self.tail) - _TAIL]
            if self.watch is not None:
                self._check(data, self.pos)
        self.pos += len(data)
        return data

    def start_watch(self, start: int) -> None:
        """Check the bytes from ``start`` on, those already read included."""
        self.watch, self.nonzero_at, self.zeros = start, None, 0
        first = self.pos - len(self.tail)
        if start < self.pos:
            self._check(bytes(self.tail[max(start - first, 0):]), max(start, first))

    def _check(self, data: bytes, at: int) -> None:
        if self.nonzero_at is not None or self.watch is None:
            return
        skip = max(self.watch - at, 0)
        if skip >= len(data):
            return
        segment = data[skip:]
        stripped = segment.lstrip(b"\0")
        if stripped:
            self.nonzero_at = at + skip + len(segment) - len(stripped)
        else:
            self.zeros += len(segment)

    def close(self) -> None:
        pass


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _human(n: int) -> str:
    return f"{n} bytes" if n < 10_000 else f"{n} bytes ({n / 2**20:.1f} MiB)"


@dataclass
class _Progress:
    """How far a walk's member loop got: where the next header starts (the end of the last member's
    padded data), the last entry yielded, and the error that stopped the loop, if any."""

    last_end: int = 0
    last: TarEntry | None = None
    stop: BaseException | None = None


class TarWalk:
    """One forward pass over a tar (see the module docstring). Iterate once; then read ``problems`` and
    ``cut`` (member name -> why its data cannot be read)."""

    def __init__(self, url: str):
        self.url = str(url)
        self.problems: list[TarProblem] = []
        self.cut: dict[str, str] = {}
        self.total: int | None = None  # uncompressed size, once known
        self.compression: str | None = None

    def _problem(self, kind: str, offset: int, unread: int | None, message: str) -> None:
        self.problems.append(TarProblem(self.url, kind, offset, unread, message))

    def __iter__(self) -> Iterator[TarEntry]:
        try:
            raw = open_input(self.url)
        except OSError as error:
            self._problem("unreadable", 0, None, f"{self.url} cannot be opened: {error}")
            return
        try:
            yield from self._walk(raw)
        finally:
            try:
                raw.close()
            except Exception as error:  # a pipe: the command's exit status
                self._problem("unreadable", 0, None, f"{self.url}: closing the stream failed: {error}")

    def _walk(self, raw: BinaryIO) -> Iterator[TarEntry]:
        opened = self._open_tar(raw)
        if opened is None:
            return
        tar, counter = opened
        progress = _Progress()
        yield from self._members(tar, progress)
        self._finish(counter, progress)

    @property
    def _what(self) -> str:
        return f"{self.compression}-compressed " if self.compression else ""

    def _open_tar(self, raw: BinaryIO) -> tuple[tarfile.TarFile, _Counter] | None:
        """``tarfile`` in stream mode over the uncompressed bytes, or None (the problem recorded) when the
        input cannot be read or is not a tar."""
        try:
            head = raw.read(6)
        except OSError as error:
            self._problem("unreadable", 0, None, f"{self.url} cannot be read: {error}")
            return None
        counter = _Counter(self._uncompressed(raw, head))
        try:
            return tarfile.open(fileobj=counter, mode="r|"), counter  # type: ignore[arg-type]
        except _READ_ERRORS as error:
            self._not_a_tar(counter, head, error)
            return None

    def _uncompressed(self, raw: BinaryIO, head: bytes) -> BinaryIO:
        """The uncompressed stream (``head`` put back in front); sets ``compression`` and, for a plain
        local file, ``total``."""
        self.compression = _compression(head)
        stream: BinaryIO = io.BufferedReader(_Prefixed(head, raw), 1 << 16)
        if self.compression is None:
            path = local_path(self.url)
            if path is not None:
                try:
                    self.total = os.fstat(raw.fileno()).st_size
                except (OSError, AttributeError, io.UnsupportedOperation):
                    self.total = None
            return stream
        opener = {"gzip": lambda f: gzip.GzipFile(fileobj=f), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}
        return _Decompressed(opener[self.compression](stream))  # type: ignore[return-value]

    def _not_a_tar(self, counter: _Counter, head: bytes, error: BaseException) -> None:
        url = self.url
        if self.compression is not None and isinstance(error, _COMPRESSED_ERRORS):
            self._problem("truncated", 0, None,
                          f"{url}: the {self.compression} stream is truncated or corrupt before the first tar "
                          f"member ({_reason(error)}); nothing could be read")
            return
        counter.start_watch(0)
        self._drain(counter)
        total = self.total if self.total is not None else counter.pos
        start = head if self.compression is None else b""
        self._problem("not_a_tar", 0, total,
                      f"{url} is not a {self._what}tar archive ({_reason(error)}"
                      + (f"; it starts with {start!r}" if start else "") + f"): none of its {_human(total)} "
                      "were read")

    def _members(self, tar: tarfile.TarFile, progress: _Progress) -> Iterator[TarEntry]:
        """The regular members, until the end of the archive or the first error (kept in ``progress``)."""
        from webdataset.tariterators import base_plus_ext  # webdataset's own key/extension split

        while True:
            try:
                info = tar.next()
            except _READ_ERRORS as error:
                progress.stop = error
                return
            if info is None:
                return
            tar.members = []  # stream mode keeps every TarInfo otherwise
            progress.last_end = info.offset_data + _padded(info.size) if info.isreg() else info.offset_data
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            if key is not None and key.startswith("__") and key.endswith("__"):
                key = None
            reader = _MemberReader(self, tar, info)
            progress.last = TarEntry(info.name, key, ext.lower() if ext is not None else None, info.offset_data,
                                     info.size, info.offset, reader)
            if self.total is not None and info.offset_data + info.size > self.total:
                self._mark_cut(info.name, info.size, max(self.total - info.offset_data, 0))
            yield progress.last
            if reader.failed is not None:
                progress.stop = reader.failed
                return

    def _finish(self, counter: _Counter, progress: _Progress) -> None:
        """After the last member: read the rest and record why reading stopped, if it was not the end."""
        url, what, last, last_end = self.url, self._what, progress.last, progress.last_end
        counter.start_watch(last_end)
        stop = progress.stop
        if stop is None or not isinstance(stop, _COMPRESSED_ERRORS):
            stop = self._drain(counter) or stop
        available = self.total if self.total is not None else counter.pos
        self.total = available
        if last is not None and last.offset + last.size > available:
            self._mark_cut(last.name, last.size, max(available - last.offset, 0))
            self._problem("truncated", last.header_offset, available - last.header_offset,
                          f"{url} is truncated inside member {last.name!r}: its data should end at byte "
                          f"{last.offset + last.size} but the {what}archive ends at byte {available}"
                          + (f" (the {self.compression} stream itself ends early: {_reason(stop)})"
                             if self.compression and isinstance(stop, _COMPRESSED_ERRORS) else "")
                          + "; any samples after it are lost")
            return
        compressed_end = self.compression is not None and isinstance(stop, _COMPRESSED_ERRORS)
        if compressed_end:
            self._problem("truncated", last_end, None,
                          f"{url}: the {self.compression or 'compressed'} stream is truncated or corrupt "
                          f"({_reason(stop)}); reading stopped at byte {last_end} of the uncompressed archive "
                          "and everything after it is lost")
            return
        if available < last_end:
            self._problem("truncated", last_end, 0,
                          f"{url} ends at byte {available}, inside the padding after its last member (which should "
                          f"end at byte {last_end}), without the end-of-archive marker: it is probably truncated; "
                          "any samples after that point are lost")
            return
        self._check_tail(counter, last_end, available, stop)

    def _check_tail(self, counter: _Counter, last_end: int, available: int, stop: BaseException | None) -> None:
        """What follows the last member must be the zero blocks of the end-of-archive marker."""
        url, what = self.url, self._what
        unread = available - last_end
        if counter.nonzero_at is not None or stop is not None:
            kind = "corrupt" if counter.nonzero_at is not None and available - last_end >= BLOCK else "truncated"
            if stop is not None:
                detail = _reason(stop)
            elif unread < BLOCK:
                detail = "the header there is cut short"
            elif counter.nonzero_at is not None and counter.nonzero_at - last_end >= BLOCK:
                detail = (f"the end-of-archive marker is followed by more data from byte {counter.nonzero_at} "
                          "(concatenated tars are not read)")
            else:
                detail = "the header there is not a valid tar header"
            kind = "trailing_data" if "end-of-archive marker is followed" in detail else kind
            self._problem(kind, last_end, unread,
                          f"{url}: reading stopped at byte {last_end}, {detail}; the {_human(unread)} after it "
                          f"were not read (the {what}archive is {_human(available)})")
        elif counter.zeros < BLOCK:
            self._problem("no_end_marker", last_end, 0,
                          f"{url} ends at byte {last_end} without the end-of-archive marker (zero blocks): it is "
                          "probably truncated at a member boundary; any samples after that point are lost")

    def _drain(self, counter: _Counter) -> BaseException | None:
        """Read what is left (the tail check in ``_Counter``); returns a decompression error if any."""
        try:
            if self.total is not None and counter.nonzero_at is not None:
                return None  # the size is known and the tail is already known to be more than zeros
            while counter.read(_DRAIN_CHUNK):
                if self.total is not None and counter.nonzero_at is not None:
                    break
        except _READ_ERRORS as error:
            return error
        return None

    def _mark_cut(self, name: str, size: int, available: int) -> None:
        self.cut.setdefault(name, f"member {name!r} of {self.url} is cut short: its tar header says {size} bytes "
                                  f"but the archive ends after {available} of them")


class _MemberReader:
    def __init__(self, walk: TarWalk, tar: tarfile.TarFile, info: tarfile.TarInfo):
        self.walk, self.tar, self.info = walk, tar, info
        self.failed: BaseException | None = None

    def __call__(self) -> bytes:
        if self.info.name in self.walk.cut:
            raise TarReadError(self.walk.cut[self.info.name])
        extracted = self.tar.extractfile(self.info)
        try:
            return extracted.read() if extracted is not None else b""
        except _READ_ERRORS as error:
            self.failed = error
            why = f"member {self.info.name!r} of {self.walk.url} cannot be read: {_reason(error)}"
            self.walk.cut.setdefault(self.info.name, why)
            raise TarReadError(why) from None


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown reason"
    text = str(error) or type(error).__name__
    return text if type(error).__name__ in text else f"{type(error).__name__}: {text}"


def scan_tar(url: str, keep: Iterable[str] = (), keep_max: int = DEFAULT_KEEP_MAX
             ) -> tuple[list[TarSample], list[TarProblem]]:
    """The index of one tar: samples in tar order (consecutive members grouped by key) and the problems
    met. Members whose extension is in ``keep`` and whose size is at most ``keep_max`` are read into
    ``TarSample.kept``; a larger one gets an entry in ``TarSample.cut`` instead of being read."""
    keep = {k.lower() for k in keep}
    walk = TarWalk(url)
    samples: list[TarSample] = []
    current: TarSample | None = None
    by_name: dict[str, tuple[TarSample, str]] = {}
    for entry in walk:
        if entry.key is None or entry.ext is None:
            continue
        if current is None or current.key != entry.key:
            current = TarSample(entry.key)
            samples.append(current)
        current.members[entry.ext] = MemberRef(entry.offset, entry.size)
        by_name[entry.name] = (current, entry.ext)
        if entry.ext in keep and entry.name not in walk.cut:
            if entry.size > keep_max:
                current.cut[entry.ext] = (f"member {entry.name!r} of {url} is {entry.size} bytes, over the "
                                          f"{keep_max}-byte limit for it")
                continue
            try:
                current.kept[entry.ext] = entry.read()
            except TarReadError as error:
                current.cut[entry.ext] = str(error)
    for name, why in walk.cut.items():
        if name in by_name:
            sample, ext = by_name[name]
            sample.cut.setdefault(ext, why)
            sample.kept.pop(ext, None)
    return samples, walk.problems


def raise_problems(problems: Iterable[TarProblem]) -> None:
    """Raise ``TarReadError`` naming every problem (joined by "; "), for readers that need the whole tar."""
    messages = [problem.message for problem in problems]
    if messages:
        raise TarReadError("; ".join(messages))


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of one tar in tar order, read in one forward pass (any URL ``open_input`` takes):
    ``(key, {ext: bytes})`` per run of consecutive members with one key, as webdataset groups them.

    Strict, for readers of whole shards: a member that cannot be read, a second member with the same key
    and extension, or any problem of the walk (``raise_problems``) raises ``TarReadError``; the sample
    being read at that point is not yielded."""
    walk = TarWalk(url)
    key: str | None = None
    record: dict[str, bytes] | None = None
    for entry in walk:
        if entry.key is None or entry.ext is None:
            continue
        if record is None or entry.key != key:
            if record is not None:
                yield key, record  # type: ignore[misc]
            key, record = entry.key, {}
        if entry.ext in record:
            raise TarReadError(f"{url}: member {entry.name!r} repeats extension {entry.ext!r} of sample {key!r}")
        record[entry.ext] = entry.read()
    raise_problems(walk.problems)
    if record is not None:
        yield key, record  # type: ignore[misc]


def read_member(url: str, ref: MemberRef | tuple[int, int], *, max_bytes: int | None = None,
                name: str = "member") -> bytes:
    """The bytes of one member of a plain local tar, by offset (``scan_tar``'s ``MemberRef``).

    Checks, before reading the data: the size against ``max_bytes``; that the file is long enough; that the
    512-byte block before the data is a valid tar header for that size (the file did not change since it
    was indexed). Raises ``TarReadError`` with a readable reason."""
    offset, size = int(ref[0]), int(ref[1])
    if max_bytes is not None and size > max_bytes:
        raise TarReadError(f"{name} is {size} bytes, over the {max_bytes}-byte limit: {url} at offset {offset}")
    path = local_path(url)
    if path is None:
        from layerloop import storage

        if storage.is_remote(url) and not url.startswith(("http://", "https://")):
            return _read_stored_member(url, offset, size, name)
        raise TarReadError(f"{url} is not a local file: members can only be read by offset from local tars")
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            if offset + size > total:
                raise TarReadError(f"{name} is cut short: {url} should hold {size} bytes at offset {offset} but "
                                   f"is only {total} bytes long")
            if offset >= BLOCK:
                f.seek(offset - BLOCK)
                _check_header(f.read(BLOCK), url, offset, size)
            f.seek(offset)
            data = f.read(size)
    except OSError as error:
        raise TarReadError(f"{url} cannot be read: {error}") from None
    if len(data) != size:
        raise TarReadError(f"{name} is cut short: read {len(data)} of {size} bytes at offset {offset} of {url}")
    return data


def _check_header(block: bytes, shown: str, offset: int, size: int) -> None:
    """The tar header block just before an indexed member still describes it (a GNU base-256 size, written
    as 0 here, is accepted for members of 8 GiB and more); ``shown`` names the tar in the error."""
    try:
        header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        raise TarReadError(f"{shown} changed since it was indexed: no valid tar header before offset {offset} "
                           f"({error})") from None
    if header.size != size and not (header.size == 0 and size >= 8 ** 11):
        raise TarReadError(f"{shown} changed since it was indexed: the member at offset {offset} is "
                           f"{header.size} bytes, not {size}")


def _read_stored_member(url: str, offset: int, size: int, name: str) -> bytes:
    """``read_member`` of a plain tar in an object store: one ranged GET of the header block before the
    data and the data, with the same checks (the header still describes the member, nothing is cut short)."""
    from layerloop import storage

    where = storage.StorePath(url)
    start = offset - BLOCK if offset >= BLOCK else offset
    try:
        data = where.read_range(start, offset + size)
    except OSError as error:
        raise TarReadError(f"{storage.redact(url)} cannot be read: {error}") from None
    if offset >= BLOCK:
        if len(data) < BLOCK:
            raise TarReadError(f"{name} is cut short: {storage.redact(url)} ends before offset {offset}")
        _check_header(data[:BLOCK], storage.redact(url), offset, size)
        data = data[BLOCK:]
    if len(data) != size:
        raise TarReadError(f"{name} is cut short: read {len(data)} of {size} bytes at offset {offset} of "
                           f"{storage.redact(url)}")
    return data
