"""Concrete sources (the contract is in ``datasets/base.py``) and ``build_source`` for configs.

* ``RoremSource``: the RORem layout, ``source/``, ``mask/``, ``GT/`` and ``meta.json``;
* ``FolderSource``: plain image and mask folders matched by file stem;
* ``HFSource``: a Hugging Face ``datasets`` data set from local files (imagefolder, parquet, save_to_disk);
* ``WebDatasetSource``: webdataset tar shards, including shards written by layerloop itself;
* ``DemoSource``: generated demo scenes in the RORem layout;
* ``LogoSource``: synthetic logo-on-object samples of kind ``rendered`` (``datasets/logos.py``), complete.

Every source lists its items up front in a deterministic order with unique keys (``make_key``), reports
what it could not list as ``listing_failures()`` (stage ``"list"``), and leaves decoding to the ``load``
stage: ``read`` only says where the bytes are (a path, bytes from a row or a tar member). Captions come
from the meta entry, column or ``txt`` member when there is one.

Input safety (the rules every source here follows):

* File-based sources (RORem, folder, HF) read only inside their dataset root: a path with ``..``, an
  absolute path or a symlink (to a file or a directory, at any level) that resolves elsewhere is a
  recorded failure "outside the dataset root: <path>" and is never opened. Relative paths resolve against
  the root, never the current directory. ``allow_outside_root: true`` in the source config opts out. The
  check runs at listing time (the item becomes a listing failure), in ``read`` and, through
  ``work["raw_root"]``, in the ``load`` stage right before a file is opened. WebDataset sources have no
  such option: their URLs are the data, and tar members are read by offset, never extracted to paths.
* Everything a source emits as text is valid Unicode (``base.readable``); file names that are not UTF-8
  keep their real bytes in ``refs``.
* ``meta.json`` is streamed: one bad line or entry (not UTF-8, not JSON, nested too deeply, longer than
  ``MAX_META_LINE_BYTES``, larger than ``MAX_META_ENTRY_BYTES`` as an entry, holding NaN/Infinity or an
  integer beyond 64 bits) is one listing failure naming the file and the line or entry; the rest is read.
* A caption file (``<stem>.txt``) that is not UTF-8, larger than ``MAX_CAPTION_BYTES``, unreadable or
  outside the root makes its item a listing failure rather than a sample silently without its caption.
  The same holds for a tar's ``txt`` member.
* Tars are read with ``datasets/tario.py``: what a truncated, corrupt or non-tar input loses is a listing
  failure naming the URL and byte offset; the samples before it are kept; a sample whose member is cut
  short is a failure of that sample.

Sources are pickled to Ray workers. Listings and opened data sets are cached on the instance under
``_cache_*`` attributes, which ``__getstate__`` drops: a worker only needs the item it is given, and a
data set object is re-opened in each worker rather than shipped.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from layerloop.config import (SOURCE_CONFIGS, DemoConfig, FolderConfig, HFConfig, LogoConfig,  # noqa: F401
                              RoremConfig, RunShardsConfig, WebDatasetConfig, SourceConfigBase, validate_model)
from layerloop.datasets.base import (OUTSIDE_ROOT, OutsideRootError, Source, SourceItem, check_inside_root,
                                     make_key, new_sample, readable, real_root)
from layerloop import storage
from layerloop.datasets.tario import TarMember, TarReadError
from layerloop.samples import Failure, LayeredSample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LIST_STAGE = "list"
MAX_META_LINE_BYTES = 1 << 20  # a meta.json line (or list entry) longer than this is not parsed
MAX_META_ENTRY_BYTES = 64 << 10  # one meta entry, as written in the file
MAX_META_DEPTH = 32  # nesting of one meta entry (its extra fields go to the sample metadata)
MAX_CAPTION_BYTES = 64 << 10  # a caption file or tar txt member
STREAM_MAX_MEMBER_BYTES = 256 << 20  # tar members larger than this are not read while streaming

# Fields of a RORem meta entry that say where files are or are used as the id/caption; everything else
# in an entry is copied into the sample's metadata.
_ENTRY_FIELDS = {"source", "mask", "GT", "gt", "caption", "id"}
# Metadata names the pipeline itself writes; an entry field with such a name is kept as "entry_<name>".
_RESERVED_META = {"schema_version", "kind", "key", "width", "height", "source", "source_id", "stages",
                  "bbox", "original_size", "scores", "round", "parents", "lineage"}
_INT64 = 2 ** 63


class _CachedSource(Source):
    """Drops ``_cache_*`` attributes when pickled (see the module docstring)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _listing(self) -> tuple[list[SourceItem], list[Failure]]:
        cached = self.__dict__.get("_cache_listing")
        if cached is None:
            cached = self._list()
            self._cache_listing = cached
        return cached

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        raise TypeError(f"{type(self).__name__} must implement _list()")

    def items(self) -> list[SourceItem]:
        return list(self._listing()[0])

    def listing_failures(self) -> list[Failure]:
        return list(self._listing()[1])


class _FileSource(_CachedSource):
    """A source whose items are files under ``self.path`` (the dataset root)."""

    path: Path
    allow_outside_root: bool = False

    def root(self) -> str | None:
        """The resolved dataset root, or None when reading outside it is allowed."""
        if getattr(self, "allow_outside_root", False) or isinstance(self.path, storage.StorePath):
            return None  # a store: its paths were checked by name when listed (``_stored_ref``)
        base = self.path if self.path.is_dir() or not self.path.exists() else self.path.parent
        return real_root(base)

    def read(self, item: SourceItem) -> LayeredSample:
        """The paths in ``item.refs``, re-checked against the root (files may have changed since listing);
        the ``load`` stage checks again when it opens them (``raw_root``)."""
        root = self.root()
        for role, path in item.refs.items():
            check_inside_root(path, root, f"{role} file")
        if isinstance(self.path, storage.StorePath):
            work = {f"raw_{k}": v for k, v in _stored_files(item.refs).items()}
            work["raw_root"] = None
            return new_sample(item, work)
        work: dict[str, Any] = {f"raw_{k}": v for k, v in item.refs.items()}
        work["raw_root"] = root
        return new_sample(item, work)


def _ref(path: Any) -> str:
    """A listed file as an item ref: its path, or its store URL."""
    return path.url if isinstance(path, storage.StorePath) else str(path)


def _stored_ref(root: storage.StorePath, value: str, allow_outside: bool, what: str) -> str:
    """The URL of a path written in a dataset on an object store (``meta.json``), relative to ``root``.
    A store has no symbolic links, so "outside the root" is a path that leaves it by its name: ``..`` past
    the root, an absolute local path, or another URL (an ``OutsideRootError``, unless ``allow_outside``)."""
    if "\0" in value:
        raise OutsideRootError(f"{what} path holds a NUL character, which no file name can: {readable(value)!r}")
    import posixpath

    if "://" in value or os.path.isabs(value):
        inside = value.startswith(root.url + "/")
        if inside or allow_outside:
            return value
    else:
        normal = posixpath.normpath(value)
        if normal != ".." and not normal.startswith("../"):
            return (root / normal).url
        if allow_outside:
            return f"{root.protocol}://{posixpath.normpath(root.path + '/' + value)}"
    raise OutsideRootError(f"{what} is {OUTSIDE_ROOT}: {readable(value)}; the root is {root} (set "
                           "allow_outside_root: true in the source config to read it anyway)")


def _stored_files(refs: dict[str, Any]) -> dict[str, Any]:
    """Item refs of a dataset on an object store, as the ``load`` stage reads them (``StoredFile``)."""
    return {role: StoredFile(value, f"{role} file {readable(value.rsplit('/', 1)[-1])}", 0, 0)
            if isinstance(value, str) and storage.is_remote(value) else value for role, value in refs.items()}


@dataclass(frozen=True)
class StoredFile(TarMember):
    """A file of a dataset on an object store, handed to the ``load`` stage like a tar member (``url``;
    ``offset`` and ``size`` 0). ``read(max_bytes)`` checks the object's size (a HEAD) before its bytes are
    fetched (a GET), and that it got all of them; a missing object is "file is missing"."""

    def read(self, max_bytes: int | None = None) -> bytes:
        path = storage.StorePath(self.url)
        try:
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise TarReadError(f"{self.name} is {size} bytes, over the {max_bytes}-byte limit: {path}")
            data = path.read_bytes()
        except FileNotFoundError:
            raise TarReadError(f"file is missing: {path}") from None
        except OSError as failure:
            raise TarReadError(f"{path} cannot be read: {failure}") from None
        if len(data) != size:
            raise TarReadError(f"{path} changed while it was read ({len(data)} bytes, {size} expected)")
        return data


def _fail(source: str, source_id: str, error_type: str, message: str) -> Failure:
    return Failure(make_key(source, source_id), LIST_STAGE, error_type, readable(message))


def _list_dir(folder: Path) -> list[Path]:
    """The entries of a folder, or one readable error for an environment problem."""
    try:
        return list(folder.iterdir())
    except PermissionError:
        raise PermissionError(f"cannot list folder {readable(str(folder))}: permission denied") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"{readable(str(folder))} is not a folder") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"folder {readable(str(folder))} does not exist") from None
    except OSError as error:
        raise OSError(f"cannot list folder {readable(str(folder))}: {error.strerror or error}") from None


def _read_caption(image: Path, root: str | None, names: set[str] | None = None) -> tuple[str | None, str | None]:
    """(caption, problem) from ``<stem>.txt`` next to an image; both None when there is no such file.

    The file is checked against the root before it is opened, and must be a regular file of at most
    ``MAX_CAPTION_BYTES`` holding UTF-8 text. On a store, ``names`` is the image folder's listing."""
    path = image.with_suffix(".txt")
    if isinstance(path, storage.StorePath):
        if names is not None and path.name not in names:
            return None, None
        try:
            size = path.stat().st_size
            if size > MAX_CAPTION_BYTES:
                return None, (f"caption file {path} is {size} bytes, over the {MAX_CAPTION_BYTES}-byte limit "
                              "for a caption")
            data = path.read_bytes()
        except FileNotFoundError:
            return None, None
        return _decode_caption(data, f"caption file {path}")
    shown = readable(str(path))
    if not os.path.lexists(path):
        return None, None
    try:
        check_inside_root(path, root, "caption file")
    except OutsideRootError as error:
        return None, str(error)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None, f"caption file {shown} is not a regular file"
            if info.st_size > MAX_CAPTION_BYTES:
                return None, (f"caption file {shown} is {info.st_size} bytes, over the {MAX_CAPTION_BYTES}-byte "
                              "limit for a caption")
            data = f.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        return None, f"caption file {shown} is a broken link"
    except OSError as error:
        return None, f"caption file {shown} cannot be read: {error.strerror or error}"
    return _decode_caption(data, f"caption file {shown}")


def _decode_caption(data: bytes, what: str) -> tuple[str | None, str | None]:
    if len(data) > MAX_CAPTION_BYTES:
        return None, f"{what} is over the {MAX_CAPTION_BYTES}-byte limit for a caption"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return None, (f"{what} is not UTF-8 text ({error.reason}: byte 0x{data[error.start]:02x} at position "
                      f"{error.start})")
    return text.strip(), None


# ------------------------------------------------------------------------------------ folder helpers
def _index_folder(folder: Path, root: str | None
                  ) -> tuple[dict[str, Path], dict[str, list[str]], dict[str, str]]:
    """Image files of one folder by stem, the ambiguous stems (two files with one stem, ``a.png`` and
    ``a.jpg``, cannot be told apart, so that stem is reported instead of guessed) and the stems whose file
    resolves outside the root (a symlink), with the reason. Outside files are not stat-ed."""
    found: dict[str, list[Path]] = {}
    outside: dict[str, str] = {}
    stored = isinstance(folder, storage.StorePath)
    for path in (folder.files() if stored else _list_dir(folder)):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if stored:  # listed as objects: files, inside the prefix by construction
            found.setdefault(path.stem, []).append(path)
            continue
        try:
            check_inside_root(path, root)
        except OutsideRootError as error:
            outside.setdefault(path.stem, str(error))
            continue
        if path.is_file():
            found.setdefault(path.stem, []).append(path)
    index = {stem: paths[0] for stem, paths in sorted(found.items()) if len(paths) == 1}
    ambiguous = {stem: sorted(readable(p.name) for p in paths)
                 for stem, paths in sorted(found.items()) if len(paths) > 1}
    return index, ambiguous, outside


def _pair_by_stem(source: str, image_dir: Path, mask_dir: Path, background_dir: Path | None,
                  root: str | None, image_role: str = "image") -> tuple[list[SourceItem], list[Failure]]:
    """Items from parallel folders; an image's caption may sit next to it as ``<stem>.txt``.
    Each stem gets at most one failure, the first that applies: outside the root, ambiguous file, caption
    problem, then missing partner. A folder that itself resolves outside the root is not listed: it gets
    one failure (``<role>-folder``) and every stem of the other folders fails with the same reason."""
    folders = {image_role: image_dir, "mask": mask_dir}
    if background_dir is not None:
        folders["background"] = background_dir
    blocked: dict[str, str] = {}
    for role, folder in folders.items():
        if isinstance(folder, storage.StorePath):
            continue
        try:
            check_inside_root(folder, root, f"{role} folder")
        except OutsideRootError as error:
            blocked[role] = str(error)
    indexes = {role: _index_folder(folder, root) for role, folder in folders.items() if role not in blocked}
    failures: dict[str, Failure] = {}
    if blocked:
        for role, why in blocked.items():
            failures[f"{role}-folder"] = _fail(source, f"{role}-folder", "OutsideRoot", why)
        reason = "; ".join(blocked.values())
        for index, ambiguous, outside in indexes.values():
            for stem in [*index, *ambiguous, *outside]:
                failures.setdefault(stem, _fail(source, stem, "OutsideRoot", f"{readable(stem)}: not listed, {reason}"))
        return [], [failures[k] for k in sorted(failures)]
    images, masks = indexes[image_role][0], indexes["mask"][0]
    names = {p.name for p in image_dir.files()} if isinstance(image_dir, storage.StorePath) else None
    backgrounds = indexes["background"][0] if background_dir is not None else {}
    for role, (_, ambiguous, outside) in indexes.items():
        for stem, why in outside.items():
            failures.setdefault(stem, _fail(source, stem, "OutsideRoot", why))
        for stem, names in ambiguous.items():
            failures.setdefault(stem, _fail(source, stem, "AmbiguousFile",
                                            f"{role} folder {folders[role]} has several files with stem "
                                            f"{stem!r}: {', '.join(names)}"))
    items = []
    for stem, image in images.items():
        if stem in failures:
            continue
        if stem not in masks:
            failures[stem] = _fail(source, stem, "MissingMask",
                                   f"{image} has no mask in {mask_dir} (files are matched by stem)")
            continue
        refs = {"image": _ref(image), "mask": _ref(masks[stem])}
        if stem in backgrounds:
            refs["background"] = _ref(backgrounds[stem])
        caption, problem = _read_caption(image, root, names)
        if problem is not None:
            error_type = "OutsideRoot" if OUTSIDE_ROOT in problem else "BadCaption"
            failures[stem] = _fail(source, stem, error_type, problem)
            continue
        items.append(SourceItem(make_key(source, stem), source, stem, refs, caption))
    for stem, mask in masks.items():
        if stem not in images and stem not in failures:
            failures[stem] = _fail(source, stem, "MissingImage",
                                   f"mask {mask} has no {image_role} in {image_dir} (files are matched by stem)")
    return _dedupe_sorted(items, [failures[stem] for stem in sorted(failures)])


def _dedupe_sorted(items: list[SourceItem], failures: list[Failure]) -> tuple[list[SourceItem], list[Failure]]:
    """Keep the first item per key (in listing order), report the rest, sort by source id."""
    seen: dict[str, SourceItem] = {}
    for item in items:
        if item.key in seen:
            failures.append(Failure(item.key, LIST_STAGE, "DuplicateKey",
                                    readable(f"id {item.source_id!r} ({item.refs.get('image')}) gives key {item.key}, "
                                             f"already used by {seen[item.key].refs.get('image')}")))
        else:
            seen[item.key] = item
    return sorted(seen.values(), key=lambda i: (i.source_id, i.key)), failures


# --------------------------------------------------------------------------------------- meta.json
class _NonFinite:
    """What ``NaN``/``Infinity`` parse to, so that the entry can be refused after it parsed (a hook that
    raised would leave a JSON list impossible to resynchronise)."""

    def __init__(self, name: str):
        self.name = name


_DECODER = json.JSONDecoder(parse_constant=_NonFinite)
_PARSE_ERRORS = (json.JSONDecodeError, RecursionError, ValueError)
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogate escapes


def _parse_problem(error: BaseException) -> tuple[str, str]:
    """(error_type, reason) for an exception from parsing one line or entry."""
    if isinstance(error, RecursionError):
        return "JSONDecodeError", "is nested too deeply to parse (a recursion limit was hit)"
    if isinstance(error, json.JSONDecodeError):
        return "JSONDecodeError", f"is not valid JSON: {error.msg} (column {error.colno})"
    return "JSONDecodeError", f"is not valid JSON: {error}"


def _entry_problem(entry: Any) -> str | None:
    """Why a parsed meta entry cannot be used as strict JSON metadata, or None."""
    if not isinstance(entry, dict):
        return None
    stack: list[tuple[Any, int, str]] = [(entry, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_META_DEPTH:
            return f"is nested more than {MAX_META_DEPTH} levels deep (at {where or 'the top'})"
        if isinstance(value, _NonFinite):
            return (f"holds the non-finite number {value.name} (field {where}); shards hold strict JSON only, "
                    "write null instead")
        if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
            return f"holds an integer beyond 64 bits (field {where})"
        if isinstance(value, dict):
            stack.extend((v, depth + 1, f"{where}.{k}" if where else repr(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))
    return None


def _read_line(f: Any) -> tuple[bytes | None, int]:
    """(line, its length without the line end) with at most ``MAX_META_LINE_BYTES`` held in memory; line
    None when it is longer (it is then skipped to its end); (b"", -1) at the end of the file."""
    line = f.readline(MAX_META_LINE_BYTES + 1)
    if not line:
        return b"", -1
    if len(line) <= MAX_META_LINE_BYTES or line.endswith(b"\n"):
        return line, len(line.rstrip(b"\r\n"))
    length = len(line)
    while not line.endswith(b"\n"):
        line = f.readline(MAX_META_LINE_BYTES)
        if not line:
            break
        length += len(line)
    return None, length - (1 if line.endswith(b"\n") else 0)


class _ListEnd(Exception):
    """A JSON list that closed on its first line with more text after it: the file is JSON lines."""


class _JsonListReader:
    """The entries of a JSON list, parsed one at a time with ``raw_decode`` from a buffer that holds at
    most about ``MAX_META_LINE_BYTES`` beyond the entry being parsed. What cannot be read goes to
    ``failures``; a list that ends on its first line with more text after it raises ``_ListEnd``."""

    def __init__(self, f: Any, source: str, shown: str, failures: list[Failure]):
        self.f, self.source, self.shown, self.failures = f, source, shown, failures
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")  # bad bytes: per entry
        self.buf, self.pos, self.eof = "", 0, False
        self.line = 1  # line number of buf[0]

    def fill(self) -> bool:
        if self.eof:
            return False
        if self.pos > (1 << 20):
            self.line += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        chunk = self.f.read(1 << 20)
        self.eof = not chunk
        self.buf += self.decoder.decode(chunk, final=self.eof)
        return True

    def skip_ws(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return

    def here(self) -> int:
        """The line number at ``pos``."""
        return self.line + self.buf.count("\n", 0, self.pos)

    def fail(self, source_id: str, error_type: str, message: str) -> None:
        self.failures.append(_fail(self.source, source_id, error_type, message))

    def stop(self, index: int, reason: str) -> None:
        self.fail(f"meta-entry-{index}", "JSONDecodeError",
                  f"{self.shown} entry {index} (line {self.here()}) {reason}; the rest of the list cannot be "
                  "read (where the next entry starts is unknown)")

    def entries(self) -> Iterator[tuple[str, Any, int]]:
        self.skip_ws()
        self.pos += 1  # the "["
        self.skip_ws()
        if self.buf[self.pos:self.pos + 1] == "]":
            self.pos += 1
        elif not (yield from self._items()):
            return
        first_line = self.line == 1 and "\n" not in self.buf[:self.pos]
        self.skip_ws()
        if self.pos < len(self.buf):
            if first_line:
                raise _ListEnd()
            self.fail("meta-after-list", "JSONDecodeError",
                      f"{self.shown} has text after its JSON list (line {self.here()})"
                      f": {self.buf[self.pos:self.pos + 40]!r}; it was not read")

    def _items(self) -> Iterator[tuple[str, Any, int]]:
        """The entries up to the closing ``]``; returns False when the list cannot be read to its end."""
        index = 0
        while True:
            self.skip_ws()
            decoded = self._decode(index)
            if decoded is None:
                return False
            entry, end = decoded
            span = self.buf[self.pos:end]
            bad = _UNDECODED.search(span)
            if bad is not None:
                self.fail(f"meta-entry-{index}", "UnicodeDecodeError",
                          f"{self.shown} entry {index} (line {self.here()}) is not UTF-8 text: byte "
                          f"0x{ord(bad.group()) - 0xDC00:02x} at character {bad.start()} of the entry")
            else:
                yield f"entry {index}", entry, len(span.encode("utf-8", "surrogateescape"))
            self.pos = end
            index += 1
            self.skip_ws()
            if self.buf[self.pos:self.pos + 1] == ",":
                self.pos += 1
                continue
            if self.buf[self.pos:self.pos + 1] == "]":
                self.pos += 1
                return True
            self.stop(index, f"does not follow a ',' (found {self.buf[self.pos:self.pos + 20]!r})")
            return False

    def _decode(self, index: int) -> tuple[Any, int] | None:
        """(entry, end) of the entry at ``pos``, reading more as needed; None (recorded) when it cannot be."""
        while True:
            try:
                entry, end = _DECODER.raw_decode(self.buf, self.pos)
            except _PARSE_ERRORS as error:
                if len(self.buf) - self.pos <= MAX_META_LINE_BYTES and self.fill():
                    continue
                if len(self.buf) - self.pos > MAX_META_LINE_BYTES:
                    self.stop(index, f"is longer than {MAX_META_LINE_BYTES} bytes (or not valid JSON)")
                else:
                    self.stop(index, _parse_problem(error)[1])
                return None
            if end >= len(self.buf) and self.fill():
                continue  # a number or literal may go on in the next chunk
            return entry, end


# ------------------------------------------------------------------------------------------- RORem
class RoremSource(_FileSource):
    """The RORem layout: ``source/``, ``mask/``, ``GT/`` and ``meta.json``.

    ``meta.json`` is a JSON list of ``{"source", "mask", "GT"}`` entries with paths relative to the root
    (``GT`` optional; ``caption`` and ``id`` used when present; other fields go to the metadata), or
    JSON lines with one entry per line. It is streamed (the list entry by entry), so its size does not
    matter; an unreadable line or entry, or one without ``source``/``mask``, is a listing failure naming
    the line (``meta-line-N``) or entry (``meta-entry-N``). A JSON list that cannot be parsed further
    (a broken entry: where the next one starts is unknown) ends with one failure saying so. An entry
    whose files do not exist is still listed, and the ``load`` stage fails it with "file is missing"; one
    whose paths resolve outside the root is a listing failure. Without ``meta.json`` files are paired by
    stem across the three folders. Items are sorted by id (the entry's ``id``, else the source file's
    stem); ``limit`` keeps the first ``limit`` of them.
    """

    def __init__(self, path: str | Path, name: str = "rorem", limit: int | None = None,
                 allow_outside_root: bool = False):
        self.path = storage.location(path) if storage.is_remote(path) else Path(path)
        self.name = name
        self.limit = limit
        self.allow_outside_root = allow_outside_root

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        meta = self.path / "meta.json"
        root = self.root()
        if isinstance(self.path, storage.StorePath):
            return self._list_stored(meta)
        if os.path.lexists(meta):
            try:
                check_inside_root(meta, root, "meta.json")
            except OutsideRootError as error:
                return [], [_fail(self.name, "meta-json", "OutsideRoot", str(error))]
        if meta.is_file():
            items, failures = self._list_meta(meta, root)
        elif (self.path / "source").is_dir():
            gt = self.path / "GT"
            if not (self.path / "mask").is_dir():
                raise FileNotFoundError(f"{readable(str(self.path))} is a RORem folder without meta.json, but its "
                                        "mask/ folder does not exist")
            items, failures = _pair_by_stem(self.name, self.path / "source", self.path / "mask",
                                            gt if gt.is_dir() else None, root, image_role="source image")
        else:
            raise FileNotFoundError(f"{readable(str(self.path))} is not a RORem folder: it has neither meta.json "
                                    "nor source/")
        if self.limit is not None:
            items = items[: self.limit]
        return items, failures

    def _list_stored(self, meta: Any) -> tuple[list[SourceItem], list[Failure]]:
        """``_list`` of a RORem dataset on an object store (``s3://bucket/RORem``): the same rules, with
        "outside the root" decided by name (``_stored_ref``), since a store has no links."""
        storage.check_bucket(self.path)
        if meta.is_file():
            items, failures = self._list_meta(meta, None)
        elif (self.path / "source").is_dir():
            if not (self.path / "mask").is_dir():
                raise FileNotFoundError(f"{self.path} is a RORem folder without meta.json, but its mask/ folder "
                                        "does not exist")
            gt = self.path / "GT"
            items, failures = _pair_by_stem(self.name, self.path / "source", self.path / "mask",
                                            gt if gt.is_dir() else None, None, image_role="source image")
        else:
            raise FileNotFoundError(f"{self.path} is not a RORem folder: it has neither meta.json nor source/")
        if self.limit is not None:
            items = items[: self.limit]
        return items, failures

    def _list_meta(self, meta: Path, root: str | None) -> tuple[list[SourceItem], list[Failure]]:
        items: list[SourceItem] = []
        failures: list[Failure] = []
        shown = readable(str(meta))
        for where, entry, size in self._entries(meta, failures):
            source_id = f"meta-{where.split(' (')[0].replace(' ', '-')}"
            problem = None
            if size > MAX_META_ENTRY_BYTES:
                problem = f"is {size} bytes, over the {MAX_META_ENTRY_BYTES}-byte limit for one entry"
            elif not isinstance(entry, dict):
                problem = f"is not a JSON object: {readable(str(entry))[:80]}"
            else:
                problem = _entry_problem(entry)
            if problem is None:
                missing = [f for f in ("source", "mask") if not isinstance(entry.get(f), str) or not entry.get(f)]
                gt = entry.get("GT", entry.get("gt"))
                if missing:
                    problem = f"has no {' or '.join(repr(f) for f in missing)} path"
                elif any("\0" in v for v in (entry["source"], entry["mask"], gt) if isinstance(v, str)):
                    problem = "has a path holding a NUL character, which no file name can"
                elif gt is not None and not isinstance(gt, str):
                    problem = f"has a 'GT' that is not a path: {readable(str(gt))[:80]}"
                elif entry.get("caption") is not None and not isinstance(entry["caption"], str):
                    problem = f"has a 'caption' that is not a string: {readable(str(entry['caption']))[:80]}"
            if problem is not None:
                failures.append(_fail(self.name, source_id, "BadMetaEntry", f"{shown} {where} {problem}"))
                continue
            item, outside = self._item(entry, root)
            if outside is not None:
                failures.append(_fail(self.name, item.source_id if item else source_id, "OutsideRoot",
                                      f"{shown} {where}: {outside}"))
                continue
            items.append(item)
        return _dedupe_sorted(items, failures)

    def _entries(self, meta: Path, failures: list[Failure]) -> Iterator[tuple[str, Any, int]]:
        """(where, entry, size in bytes) from a JSON list or JSON lines, streamed; what cannot be read is
        recorded in ``failures``. A file whose first non-blank character is ``[`` is a JSON list, unless
        that list ends on its first line and more follows (JSON lines whose first line is a list)."""
        shown = readable(str(meta))
        try:
            # a store object through io.BufferedReader: readline(limit) and seek, as a local file has them
            f = io.BufferedReader(meta.open("rb"), 1 << 20) if isinstance(meta, storage.StorePath) else open(meta, "rb")
        except OSError as error:
            raise OSError(f"cannot read {shown}: {error.strerror or error}") from None
        with f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            f.seek(0)
            if head.startswith(b"["):
                entries: list[tuple[str, Any, int]] = []
                list_failures: list[Failure] = []
                try:
                    for entry in self._list_entries(f, shown, list_failures):
                        entries.append(entry)
                except _ListEnd:
                    f.seek(0)
                else:
                    failures.extend(list_failures)
                    yield from entries
                    return
            yield from self._line_entries(f, shown, failures)

    def _line_entries(self, f: Any, shown: str, failures: list[Failure]) -> Iterator[tuple[str, Any, int]]:
        number = 0
        while True:
            line, length = _read_line(f)
            if length < 0:
                return
            number += 1
            if line is None:
                failures.append(_fail(self.name, f"meta-line-{number}", "LineTooLong",
                                      f"{shown} line {number} is longer than {MAX_META_LINE_BYTES} bytes "
                                      f"({length} bytes): not read"))
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                failures.append(_fail(self.name, f"meta-line-{number}", "UnicodeDecodeError",
                                      f"{shown} line {number} is not UTF-8 text: {error.reason} at byte {error.start}"))
                continue
            if length > MAX_META_ENTRY_BYTES:
                yield f"line {number}", None, length  # refused by size, without parsing
                continue
            try:
                entry = _DECODER.decode(text)
            except _PARSE_ERRORS as error:
                error_type, reason = _parse_problem(error)
                failures.append(_fail(self.name, f"meta-line-{number}", error_type,
                                      f"{shown} line {number} {reason}: {readable(text.strip()[:80])}"))
                continue
            yield f"line {number}", entry, length

    def _list_entries(self, f: Any, shown: str, failures: list[Failure]) -> Iterator[tuple[str, Any, int]]:
        """The entries of a JSON list (``_JsonListReader``)."""
        yield from _JsonListReader(f, self.name, shown, failures).entries()

    def _item(self, entry: dict[str, Any], root: str | None) -> tuple[SourceItem | None, str | None]:
        """(item, None), or (item or None, why) when one of its paths resolves outside the root."""
        def resolve(value: str) -> str:
            return value if os.path.isabs(value) else os.path.join(self.path, value)

        stored_problem = None
        if isinstance(self.path, storage.StorePath):
            def resolve(value: str) -> str:  # noqa: F811 - a dataset on a store: URLs, checked by name
                nonlocal stored_problem
                try:
                    return _stored_ref(self.path, value, self.allow_outside_root, "file")
                except OutsideRootError as error:
                    stored_problem = stored_problem or str(error)
                    return value

        refs = {"image": resolve(entry["source"]), "mask": resolve(entry["mask"])}
        gt = entry.get("GT", entry.get("gt"))
        if isinstance(gt, str) and gt:
            refs["background"] = resolve(gt)
        source_id = str(entry["id"]) if entry.get("id") not in (None, "") else Path(entry["source"]).stem
        caption = entry.get("caption")
        meta = {}
        for field, value in entry.items():
            if field not in _ENTRY_FIELDS:
                meta[f"entry_{field}" if field in _RESERVED_META else field] = value
        item = SourceItem(make_key(self.name, source_id), self.name, source_id, refs,
                          caption if isinstance(caption, str) else None, meta)
        if stored_problem is not None:
            return item, stored_problem
        for role, path in refs.items():
            try:
                check_inside_root(path, root, f"{role} file")
            except OutsideRootError as error:
                return item, str(error)
        return item, None


# ------------------------------------------------------------------------------------------ folders
class FolderSource(_FileSource):
    """Plain folders ``<path>/<image_dir>`` and ``<path>/<mask_dir>`` (optionally ``<background_dir>``)
    matched by file stem, any of png, jpg, jpeg, webp, bmp, tif, tiff. An image without a mask and a
    mask without an image are listing failures; a missing background file just means none, but a
    configured background folder that does not exist is an error, like a missing image or mask folder.
    A ``<stem>.txt`` next to an image is its caption. Items are sorted by stem."""

    def __init__(self, path: str | Path, image_dir: str = "images", mask_dir: str = "masks",
                 background_dir: str | None = None, name: str = "folder", allow_outside_root: bool = False):
        self.path = storage.location(path) if storage.is_remote(path) else Path(path)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.background_dir = background_dir
        self.name = name
        self.allow_outside_root = allow_outside_root

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        if isinstance(self.path, storage.StorePath):
            storage.check_bucket(self.path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"folder source: {readable(str(self.path))} is not a folder"
                                    + ("" if self.path.exists() else " (it does not exist)"))
        folders = {"image": self.path / self.image_dir, "mask": self.path / self.mask_dir}
        if self.background_dir:
            folders["background"] = self.path / self.background_dir
        for role, folder in folders.items():
            if not folder.is_dir():
                state = ("does not exist" if isinstance(folder, storage.StorePath) or not os.path.lexists(folder)
                         else "is not a folder")
                raise FileNotFoundError(f"folder source: {role} folder {readable(str(folder))} {state} (see "
                                        f"{role}_dir in the source config)")
        return _pair_by_stem(self.name, folders["image"], folders["mask"], folders.get("background"), self.root())


# ------------------------------------------------------------------------------------ Hugging Face
def _cell_path(value: Any) -> str | None:
    """The file path an image cell points at (a path string, or a ``{"bytes": None, "path": ...}``
    struct), None when the cell carries its bytes."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return None
        path = value.get("path")
        return path if isinstance(path, str) and path else None
    return value if isinstance(value, str) else None


class HFSource(_FileSource):
    """A Hugging Face ``datasets`` data set from local files or an object store (no Hub access).

    ``data_format`` (inferred when None): ``imagefolder`` (a folder of images with ``metadata.jsonl``;
    ``mask_file_name`` there gives a ``mask`` column), ``parquet`` (a file or a folder of them) or
    ``disk`` (``save_to_disk`` output). Items are row indices in order. Image columns are read with
    ``decode=False`` so that the ``load`` stage decodes the bytes itself, with its size guard and
    readable errors, instead of ``datasets`` decoding them eagerly.

    Cells that are paths (path strings, or image structs without bytes) resolve against the dataset root
    (``path``, or its folder when ``path`` is a file), never the current directory, and must lie inside
    it: a row with a path outside is a listing failure (``allow_outside_root`` opts out). A data set that
    ``datasets`` cannot load (a broken ``metadata.jsonl`` line, a ``file_name`` outside the folder) is
    one readable error.

    On an object store (``path`` an ``s3://``/``gs://`` URL, credentials from the standard places):
    ``disk`` and ``parquet`` load through ``datasets``' own fsspec support (parquet files are cached under
    ``cache_dir`` like any download); an ``imagefolder`` is listed by streaming its ``metadata.jsonl``
    (split folders as ``datasets`` infers them), so its rows hold the images' URLs and each image is read
    from the store when its sample is loaded, never copied into a cache. "Inside the root" is decided by
    name, as for the other sources on a store (``_stored_ref``)."""

    def __init__(self, path: str | Path, split: str = "train", image_column: str = "image",
                 mask_column: str = "mask", background_column: str | None = None,
                 caption_column: str | None = None, name: str = "hf", data_format: str | None = None,
                 cache_dir: str | None = None, allow_outside_root: bool = False):
        self.path = storage.location(path) if storage.is_remote(path) else Path(path)
        self.split = split
        self.image_column = image_column
        self.mask_column = mask_column
        self.background_column = background_column
        self.caption_column = caption_column
        self.name = name
        self.data_format = data_format
        self.cache_dir = cache_dir
        self.allow_outside_root = allow_outside_root

    @property
    def stored(self) -> bool:
        return isinstance(self.path, storage.StorePath)

    def _is_file(self) -> bool:
        cached = self.__dict__.get("_cache_is_file")
        if cached is None:
            cached = self._cache_is_file = self.path.is_file()
        return cached

    def base(self) -> Path | storage.StorePath:
        """What relative path cells are relative to."""
        return self.path.parent if self._is_file() else self.path

    def resolved_format(self) -> str:
        if self.data_format:
            return self.data_format
        if self._is_file():
            return "parquet" if self.path.suffix == ".parquet" else "imagefolder"
        if (self.path / "state.json").is_file() or (self.path / "dataset_dict.json").is_file():
            return "disk"
        if next(iter(self.path.rglob("*.parquet")), None) is not None:
            return "parquet"
        return "imagefolder"

    def dataset(self):
        """The loaded split with image columns undecoded; opened once per process (worker)."""
        cached = self.__dict__.get("_cache_dataset")
        if cached is not None:
            return cached
        import datasets

        if self.stored:
            storage.check_bucket(self.path)
        if not self.path.exists():
            raise FileNotFoundError(f"hf source: {readable(str(self.path))} does not exist")
        fmt = self.resolved_format()
        if fmt not in ("disk", "parquet", "imagefolder"):
            raise ValueError(f"hf source: data_format {fmt!r} is not one of imagefolder, parquet, disk")
        try:
            loaded = self._load(datasets, fmt)
        except (KeyboardInterrupt, MemoryError, storage.StoreError):
            raise
        except Exception as error:
            raise ValueError(f"hf source {readable(str(self.path))} ({fmt}): the data set cannot be loaded: "
                             f"{_error_chain(error)}") from None
        columns = [c for c in (self.image_column, self.mask_column, self.background_column, self.caption_column) if c]
        absent = [c for c in columns if c not in loaded.column_names]
        if absent:
            raise ValueError(f"hf source {readable(str(self.path))}: column(s) {absent} not found; columns are "
                             f"{loaded.column_names}")
        for column in columns[:3]:
            if column and isinstance(loaded.features[column], datasets.Image):
                loaded = loaded.cast_column(column, datasets.Image(decode=False))
        self._cache_dataset = loaded
        return loaded

    def _load(self, datasets: Any, fmt: str) -> Any:
        where = self._local_copy(fmt) if self.stored and fmt != "imagefolder" else self.path
        if fmt == "disk":
            loaded = datasets.load_from_disk(str(where))
            return loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if fmt == "parquet" and where.is_file():
            return datasets.load_dataset("parquet", data_files={self.split: str(where)}, split=self.split,
                                         cache_dir=self.cache_dir)
        if not self.stored or fmt == "parquet":
            return datasets.load_dataset(fmt, data_dir=str(where), split=self.split, cache_dir=self.cache_dir)
        where = self.path.url
        # an imagefolder on a store: ``datasets`` would download every image into its cache (and resolve
        # ``mask_file_name`` against the cache, not the folder), so stream the listing instead: the rows
        # then hold the images' URLs, and the ``load`` stage reads each from the store.
        from datasets.data_files import get_data_patterns

        patterns = {str(split): [f"{where}/{p}" for p in found]
                    for split, found in get_data_patterns(where).items()}
        if self.split not in patterns:
            raise ValueError(f"split {self.split!r} not found; the folder has {sorted(patterns)}")
        stream = datasets.load_dataset(fmt, data_files={self.split: patterns[self.split]}, split=self.split,
                                       streaming=True)
        for column, feature in stream.features.items():
            if isinstance(feature, datasets.Image):
                stream = stream.cast_column(column, datasets.Image(decode=False))
        return datasets.Dataset.from_list(list(stream), features=stream.features)

    def _local_copy(self, fmt: str) -> Path:
        """The files of a ``parquet`` or ``disk`` data set on a store, copied into a local cache
        (``cache_dir``, default ``~/.cache/layerloop``, under ``hf-store/``): ``datasets`` reads those formats
        from local files only (its own remote download copies to an unmanaged temporary folder, and obeys
        ``HF_HUB_OFFLINE`` for any URL). Only the data set's own files are copied: the parquet files, or
        the JSON and arrow files of a saved data set; images its rows point at stay on the store."""
        import json

        target = storage.cache_dir(self.path.url, "hf-store", self.cache_dir)
        if self._is_file():
            storage.mirror([self.path], self.path.parent, target)
            return target / self.path.name
        if fmt == "parquet":
            objects = list(self.path.rglob("*.parquet"))
        else:
            splits = [self.path]
            if (self.path / "dataset_dict.json").is_file():
                names = json.loads((self.path / "dataset_dict.json").read_text()).get("splits", [])
                splits = [self.path / name for name in names]
            objects = [self.path / "dataset_dict.json"] if len(splits) > 1 or splits[0] != self.path else []
            for split in splits:
                state = json.loads((split / "state.json").read_text())
                objects += [split / "state.json", split / "dataset_info.json"]
                objects += [split / entry["filename"] for entry in state.get("_data_files", [])]
        return storage.mirror(objects, self.path, target)

    def _image_columns(self) -> dict[str, str]:
        columns = {"image": self.image_column, "mask": self.mask_column}
        if self.background_column:
            columns["background"] = self.background_column
        return columns

    def _column_paths(self, ds: Any, column: str) -> list[str | None]:
        """The path each row's cell points at (None when it carries bytes), read from arrow without
        materialising the bytes."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = ds.select_columns([column]).with_format("arrow")[:]
        values = table.column(column)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            return values.to_pylist()
        if not pa.types.is_struct(values.type):
            return [None] * len(values)
        names = {values.type.field(i).name for i in range(values.type.num_fields)}
        if "path" not in names:
            return [None] * len(values)
        paths = pc.struct_field(values, "path").to_pylist()
        if "bytes" in names:
            lengths = pc.fill_null(pc.binary_length(pc.struct_field(values, "bytes")), 0).to_pylist()
            paths = [None if n else p for p, n in zip(paths, lengths)]
        return paths

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        ds = self.dataset()
        captions = list(ds[self.caption_column]) if self.caption_column else [None] * len(ds)
        root = self.root()
        outside: dict[int, str] = {}
        if root is not None or (self.stored and not self.allow_outside_root):
            for role, column in self._image_columns().items():
                for row, path in enumerate(self._column_paths(ds, column)):
                    if path is None or row in outside:
                        continue
                    try:
                        self._resolve(path, root, f"{role} file")
                    except OutsideRootError as error:
                        outside[row] = f"row {row}, column {column!r}: {error}"
        items, failures = [], []
        for i in range(len(ds)):
            if i in outside:
                failures.append(_fail(self.name, str(i), "OutsideRoot", outside[i]))
                continue
            caption = captions[i]
            if caption is not None and not isinstance(caption, str):
                caption = str(caption)
            items.append(SourceItem(make_key(self.name, str(i)), self.name, str(i), {"row": i}, caption))
        return items, failures

    def _resolve(self, path: str, root: str | None, what: str) -> str:
        """A path cell as the file it names (resolved against the dataset root, not the current directory),
        checked to lie inside the root: a local path, or the URL of an object on the store."""
        if self.stored:
            return _stored_ref(self.base(), path, self.allow_outside_root, what)
        resolved = path if os.path.isabs(path) else os.path.join(self.base(), path)
        check_inside_root(resolved, root, what)
        return resolved

    def _value(self, value: Any, role: str, root: str | None) -> Any:
        """A cell of an image column as something ``decode_image`` takes: its bytes, its path resolved
        against the dataset root and checked to lie inside it, or (on a store) a ``StoredFile``."""
        if isinstance(value, dict) and ("bytes" in value or "path" in value) and value.get("bytes"):
            return value["bytes"]
        path = _cell_path(value)
        if path is None:
            return value.get("path") if isinstance(value, dict) else value
        resolved = self._resolve(path, root, f"{role} file")
        return _stored_files({role: resolved})[role] if self.stored else resolved

    def read(self, item: SourceItem) -> LayeredSample:
        row = self.dataset()[int(item.refs["row"])]
        root = self.root()
        work: dict[str, Any] = {f"raw_{role}": self._value(row[column], role, root)
                                for role, column in self._image_columns().items()}
        work["raw_root"] = root
        return new_sample(item, work)


def _error_chain(error: BaseException) -> str:
    """The messages of an exception and its causes, one line: ``datasets`` wraps the useful one."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = " ".join(str(error).split())
        text = re.sub(r"Generating \w+ split:.*", "", text).strip()
        if text and text not in parts:
            parts.append(f"{type(error).__name__}: {text[:400]}")
        error = error.__cause__ or error.__context__
    return readable(" <- ".join(parts[:4]))


# -------------------------------------------------------------------------------------- WebDataset
def _alternatives(spec: str | None) -> list[str]:
    """``"jpg|png"`` (or webdataset's ``"jpg;png"``) -> ["jpg", "png"], first present wins."""
    return [part.strip().lower() for part in re.split(r"[|;]", spec or "") if part.strip()]


_PROBLEM_TYPES = {"not_a_tar": "NotATar", "truncated": "TruncatedTar", "corrupt": "CorruptTar",
                  "trailing_data": "TrailingData", "no_end_marker": "TruncatedTar", "unreadable": "UnreadableTar"}


class WebDatasetSource(_CachedSource):
    """webdataset tar shards; keys are the tars' ``__key__`` values.

    ``image_member``/``mask_member``/``background_member`` list alternative member extensions separated
    by ``|`` (or ``;``); the first one a sample has is used. The defaults read generic shards (``jpg``,
    ``png`` ...) and shards written by layerloop (``composite.png``, ``object_mask.png`` before the box
    ``mask.png``, ``background.png`` as the ground-truth background). A ``txt`` member is the caption.

    Listing scans every shard once with ``tario.scan_tar`` and remembers where each member lies. What a
    shard loses (not a tar, truncated, corrupt, cut inside a header, data after the end marker) is one
    listing failure naming the URL and byte offset; the samples before it are listed. A sample whose
    image, mask, background or caption member is cut short is a listing failure of that sample. Reading
    a plain local tar hands the ``load`` stage a ``tario.TarMember`` (it checks the size, then reads by
    offset); compressed or remote shards are re-streamed with ``tario.TarWalk``, keeping one open cursor
    per source instance, so reading a shard's items in order is one forward pass and memory holds one
    sample at a time. Items keep the shards' order (shard by shard, then the order inside each tar), which
    is what makes that single pass possible.

    There is no dataset root and no ``allow_outside_root``: the URLs are the data, and tar members are
    read by offset, never by their names.

    ``variants`` > 1 lists every tar sample that many times, as ``<key>-v0``, ``<key>-v1`` ... with
    ``meta["input_key"]`` (the plain key) and ``meta["variant"]``: several candidates per held input in a
    generation build, each with its own noise (stage seeds derive from the key)."""

    def __init__(self, urls: str | list[str], name: str = "wds",
                 image_member: str = "composite.png|jpg|jpeg|png|webp|image.png|image.jpg",
                 mask_member: str = "object_mask.png|mask.png|mask.jpg|mask|seg.png",
                 background_member: str | None = "background.png|gt.png|gt.jpg", variants: int = 1):
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        self.urls = urls
        self.name = name
        self.variants = variants
        self.image_member = image_member
        self.mask_member = mask_member
        self.background_member = background_member

    def shard_urls(self) -> list[str]:
        from webdataset.shardlists import expand_urls

        return expand_urls(self.urls) if isinstance(self.urls, str) else [str(u) for u in self.urls]

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        from layerloop.datasets.tario import is_seekable, scan_tar

        items, failures = [], []
        seen: dict[str, str] = {}
        for shard, url in enumerate(self.shard_urls()):
            seekable = is_seekable(url)
            samples, problems = scan_tar(url, keep=("txt",), keep_max=MAX_CAPTION_BYTES)
            for problem in problems:
                failures.append(_fail(self.name, f"{os.path.basename(url)}@{problem.offset}",
                                      _PROBLEM_TYPES.get(problem.kind, "CorruptTar"), problem.message))
            for position, sample in enumerate(samples):
                key, members = sample.key, sample.members
                item_key = make_key(self.name, key)
                shown_key = readable(key)
                if item_key in seen:
                    failures.append(Failure(item_key, LIST_STAGE, "DuplicateKey",
                                            readable(f"tar key {shown_key!r} in {url} was already listed from "
                                                     f"{seen[item_key]}")))
                    continue
                seen[item_key] = url
                chosen = {}
                for role, spec in (("image", self.image_member), ("mask", self.mask_member),
                                   ("background", self.background_member)):
                    found = next((m for m in _alternatives(spec) if m in members), None)
                    if found is not None:
                        chosen[role] = found
                missing = [role for role in ("image", "mask") if role not in chosen]
                if missing:
                    failures.append(_fail_key(item_key, "MissingMember",
                                              f"tar key {shown_key!r} in {url} has no {' or '.join(missing)} member "
                                              f"(looked for image {self.image_member!r}, mask {self.mask_member!r}; "
                                              f"it has {sorted(members)})"))
                    continue
                cut = [sample.cut[m] for m in [*chosen.values(), "txt"] if m in sample.cut]
                if cut:
                    failures.append(_fail_key(item_key, "MemberCut", "; ".join(cut)))
                    continue
                caption = None
                if "txt" in sample.kept:
                    caption, problem = _decode_caption(sample.kept["txt"], f"member {shown_key}.txt of {url}")
                    if problem is not None:
                        failures.append(_fail_key(item_key, "BadCaption", problem))
                        continue
                refs = {"url": url, "shard": shard, "position": position, "tar_key": key, "seekable": seekable,
                        "members": {role: [m, *members[m]] for role, m in chosen.items()}}
                if self.variants == 1:
                    items.append(SourceItem(item_key, self.name, key, refs, caption))
                    continue
                for variant in range(self.variants):
                    items.append(SourceItem(f"{item_key}-v{variant}", self.name, key, refs, caption,
                                            {"input_key": item_key, "variant": variant}))
        return items, failures

    def _read_seek(self, item: SourceItem) -> dict[str, Any]:
        """``TarMember`` references: the ``load`` stage checks their size, then reads them by offset."""
        from layerloop.datasets.tario import TarMember

        url, key = item.refs["url"], readable(item.refs["tar_key"])
        return {role: TarMember(url, f"member {key}.{m}", offset, size)
                for role, (m, offset, size) in item.refs["members"].items()}

    def _stream_samples(self, url: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """(position, key, {ext: bytes, or the error/TarMember when it could not be read}) per sample."""
        from layerloop.datasets.tario import TarMember, TarReadError, TarWalk

        position, key, record = -1, None, None
        for entry in TarWalk(url):
            if entry.key is None or entry.ext is None:
                continue
            if entry.key != key:
                if record is not None:
                    yield position, key, record
                position, key, record = position + 1, entry.key, {}
            if entry.size > STREAM_MAX_MEMBER_BYTES:
                record[entry.ext] = TarMember(url, f"member {readable(entry.name)}", entry.offset, entry.size,
                                              seekable=False)
                continue
            try:
                record[entry.ext] = entry.read()
            except TarReadError as error:
                record[entry.ext] = error
        if record is not None:
            yield position, key, record

    def _read_stream(self, item: SourceItem) -> dict[str, Any]:
        url, position = item.refs["url"], item.refs["position"]
        cursor = self.__dict__.get("_cache_cursor")
        if cursor is not None and cursor[0] == url and cursor[1] == position and cursor[3] is not None:
            return dict(cursor[3])  # another variant of the sample just read
        if cursor is None or cursor[0] != url or cursor[1] >= position:
            cursor = [url, -1, self._stream_samples(url), None]
        self._cache_cursor = cursor
        for at, key, record in cursor[2]:
            cursor[1] = at
            if at == position:
                if key != item.refs["tar_key"]:
                    raise RuntimeError(readable(f"{url} changed since it was listed: expected key "
                                                f"{item.refs['tar_key']!r} at position {position}, found {key!r}"))
                out = {}
                for role, (m, _, _) in item.refs["members"].items():
                    value = record.get(m)
                    if value is None or isinstance(value, Exception):
                        raise RuntimeError(readable(str(value) if value is not None else
                                                    f"{url} changed since it was listed: {key}.{m} is gone"))
                    out[role] = value
                cursor[3] = out
                return dict(out)
        self._cache_cursor = None
        raise RuntimeError(readable(f"{url} ended before sample {item.refs['tar_key']!r}: the shard changed since "
                                    "listing"))

    def read(self, item: SourceItem) -> LayeredSample:
        data = self._read_seek(item) if item.refs.get("seekable") else self._read_stream(item)
        return new_sample(item, {f"raw_{role}": value for role, value in data.items()})


def _fail_key(key: str, error_type: str, message: str) -> Failure:
    return Failure(key, LIST_STAGE, error_type, readable(message))


# ------------------------------------------------------------------------------------------- demo
class DemoSource(_CachedSource):
    """Generated demo scenes: renders ``n`` scenes into ``path`` in the RORem layout (once per instance,
    in ``items()``; the generator is deterministic in ``seed``) and then reads them as a RoremSource."""

    def __init__(self, path: str | Path, n: int, seed: int = 0, size: int = 256, name: str = "demo"):
        self.path = Path(path)
        self.n = n
        self.seed = seed
        self.size = size
        self.name = name

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        from layerloop.datasets.demo_scenes import generate_demo_data

        root = generate_demo_data(self.path, self.n, seed=self.seed, size=self.size)
        rorem = RoremSource(root if root is not None else self.path, name=self.name)
        return rorem.items(), rorem.listing_failures()

    def read(self, item: SourceItem) -> LayeredSample:
        """As a RORem folder: the same root check at read time as any file source."""
        return RoremSource(self.path, name=self.name).read(item)


# ------------------------------------------------------------------------------------------ logos
class LogoSource(_CachedSource):
    """Synthetic logo samples: item ``i`` is ``LogoSynthesizer(size, seed).make(i)``.

    Unlike the file sources, ``read`` returns the *complete* sample (F, B, M, C, caption, kind
    ``rendered``: C is a non-linear rendering of the layer on the object), so a build needs no stages at all
    (``stages: []``): generation is cheap and deterministic in (seed, index), so it happens in the worker
    and nothing is rendered to disk first."""

    def __init__(self, n: int, seed: int = 0, size: int = 256, name: str = "logos", output_size: int | None = None):
        self.n = n
        self.seed = seed
        self.size = size
        self.output_size = output_size
        self.name = name

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        items = [SourceItem(make_key(self.name, f"{i:06d}"), self.name, f"{i:06d}", {"index": i})
                 for i in range(self.n)]
        return items, []

    def read(self, item: SourceItem) -> LayeredSample:
        from layerloop.datasets.logos import LogoSynthesizer

        synthesizer = self.__dict__.get("_cache_synthesizer")
        if synthesizer is None:
            synthesizer = self._cache_synthesizer = LogoSynthesizer(size=self.size, seed=self.seed,
                                                                    output_size=self.output_size)
        sample = synthesizer.make(int(item.refs["index"]))
        sample.key = item.key
        sample.meta["source"] = item.source
        return sample


# ------------------------------------------------------------------------------------------ configs
# The source config classes (RoremConfig ... LogoConfig, SOURCE_CONFIGS) live with the other configs in
# ``layerloop/config.py``, where ``BuildConfig.source`` is a discriminated union of them on ``type``; they
# are imported at the top of this module, so ``from layerloop.datasets.sources import RoremConfig`` works.


def _absolute(path: str) -> str:
    """Relative paths are relative to the current directory when the config is read; made absolute here
    because Ray workers run elsewhere."""
    return os.path.abspath(os.path.expanduser(path))


def _absolute_url(url: str) -> str:
    return url if url.startswith("pipe:") or "://" in url else _absolute(url)


def build_source(cfg: dict[str, Any] | SourceConfigBase) -> Source:
    """A source from its config section: ``{"type": "rorem"|"folder"|"hf"|"webdataset"|"demo"|"logos", ...}``
    (a mapping or a validated source config)."""
    from layerloop.errors import ConfigError

    if isinstance(cfg, SourceConfigBase):
        cfg = cfg.as_written()
    cfg = dict(cfg)
    kind = cfg.get("type")
    if kind not in SOURCE_CONFIGS:
        raise ConfigError(f"source type {kind!r} is not one of {', '.join(SOURCE_CONFIGS)}")
    config = validate_model(SOURCE_CONFIGS[kind], cfg, title=f"source type {kind!r}")
    if isinstance(config, DemoConfig) and not config.path:
        raise ConfigError("source type 'demo': path is missing (a build renders the scenes into <run dir>/demo-data)")
    params = {key: value for key, value in config if key != "type"}
    if "path" in params and not storage.is_remote(params["path"]):  # a store URL is absolute already
        params["path"] = _absolute(params["path"])
    if isinstance(config, RoremConfig):
        return RoremSource(**params)
    if isinstance(config, FolderConfig):
        return FolderSource(**params)
    if isinstance(config, HFConfig):
        if params["cache_dir"]:
            params["cache_dir"] = _absolute(params["cache_dir"])
        return HFSource(**params)
    if isinstance(config, WebDatasetConfig):
        urls = params["urls"]
        params["urls"] = _absolute_url(urls) if isinstance(urls, str) else [_absolute_url(u) for u in urls]
        return WebDatasetSource(**params)
    if isinstance(config, LogoConfig):
        return LogoSource(**params)
    if isinstance(config, RunShardsConfig):
        from layerloop.datasets.shard_source import ShardSource

        return ShardSource(**params)
    return DemoSource(**params)
