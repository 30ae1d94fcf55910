"""Concrete sources (the contract is in ``datasets/base.py``) and ``build_source`` for configs.

* ``RoremSource``: the RORem layout, ``source/``, ``mask/``, ``GT/`` and ``meta.json``;
* ``FolderSource``: plain image and mask folders matched by file stem;
* ``HFSource``: a Hugging Face ``datasets`` data set from local files (imagefolder, parquet, save_to_disk);
* ``WebDatasetSource``: webdataset tar shards, including shards written by layerloop itself;
* ``DemoSource``: generated demo scenes in the RORem layout;
* ``LogoSource``: synthetic logo-on-object quadruples (``datasets/logos.py``), complete samples.

Every source lists its items up front in a deterministic order with unique keys (``make_key``), reports
what it could not list as ``listing_failures()`` (stage ``"list"``), and leaves decoding to the ``load``
stage: ``read`` only says where the bytes are (a path, bytes from a row or a tar member). Captions come
from the meta entry, column or ``txt`` member when there is one.

Sources are pickled to Ray workers. Listings and opened data sets are cached on the instance under
``_cache_*`` attributes, which ``__getstate__`` drops: a worker only needs the item it is given, and a
data set object is re-opened in each worker rather than shipped.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerloop.datasets.base import Source, SourceItem, make_key, new_sample
from layerloop.samples import Failure, LayeredSample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LIST_STAGE = "list"

# Fields of a RORem meta entry that say where files are or are used as the id/caption; everything else
# in an entry is copied into the sample's metadata.
_ENTRY_FIELDS = {"source", "mask", "GT", "gt", "caption", "id"}
# Metadata names the pipeline itself writes; an entry field with such a name is kept as "entry_<name>".
_RESERVED_META = {"schema_version", "kind", "key", "width", "height", "source", "source_id", "stages",
                  "bbox", "original_size", "scores", "round", "parents", "lineage"}


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


def _fail(source: str, source_id: str, error_type: str, message: str) -> Failure:
    return Failure(make_key(source, source_id), LIST_STAGE, error_type, message)


# ------------------------------------------------------------------------------------ folder helpers
def _index_folder(folder: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Image files of one folder by stem, and the ambiguous stems: two files with one stem (``a.png``
    and ``a.jpg``) cannot be told apart, so that stem is reported instead of guessed."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.setdefault(path.stem, []).append(path)
    index = {stem: paths[0] for stem, paths in sorted(found.items()) if len(paths) == 1}
    ambiguous = {stem: sorted(p.name for p in paths) for stem, paths in sorted(found.items()) if len(paths) > 1}
    return index, ambiguous


def _pair_by_stem(source: str, image_dir: Path, mask_dir: Path, background_dir: Path | None,
                  image_role: str = "image") -> tuple[list[SourceItem], list[Failure]]:
    """Items from parallel folders; an image's caption may sit next to it as ``<stem>.txt``.
    Each stem gets at most one failure, the first that applies: ambiguous file, then missing partner."""
    folders = {image_role: image_dir, "mask": mask_dir}
    if background_dir is not None:
        folders["background"] = background_dir
    indexes = {role: _index_folder(folder) for role, folder in folders.items()}
    images, masks = indexes[image_role][0], indexes["mask"][0]
    backgrounds = indexes["background"][0] if background_dir is not None else {}
    failures: dict[str, Failure] = {}
    for role, (_, ambiguous) in indexes.items():
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
        refs = {"image": str(image), "mask": str(masks[stem])}
        if stem in backgrounds:
            refs["background"] = str(backgrounds[stem])
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
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
                                    f"id {item.source_id!r} ({item.refs.get('image')}) gives key {item.key}, "
                                    f"already used by {seen[item.key].refs.get('image')}"))
        else:
            seen[item.key] = item
    return sorted(seen.values(), key=lambda i: (i.source_id, i.key)), failures


# ------------------------------------------------------------------------------------------- RORem
class RoremSource(_CachedSource):
    """The RORem layout: ``source/``, ``mask/``, ``GT/`` and ``meta.json``.

    ``meta.json`` is a JSON list of ``{"source", "mask", "GT"}`` entries with paths relative to the root
    (``GT`` optional; ``caption`` and ``id`` used when present; other fields go to the metadata), or
    JSON lines with one entry per line. An unreadable line or an entry without ``source``/``mask`` is a
    listing failure naming the line; an entry whose files do not exist is still listed, and the ``load``
    stage fails it with "file is missing". Without ``meta.json`` files are paired by stem across the
    three folders. Items are sorted by id (the entry's ``id``, else the source file's stem); ``limit``
    keeps the first ``limit`` of them.
    """

    def __init__(self, path: str | Path, name: str = "rorem", limit: int | None = None):
        self.path = Path(path)
        self.name = name
        self.limit = limit

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        meta = self.path / "meta.json"
        if meta.is_file():
            items, failures = self._list_meta(meta)
        elif (self.path / "source").is_dir():
            gt = self.path / "GT"
            items, failures = _pair_by_stem(self.name, self.path / "source", self.path / "mask",
                                            gt if gt.is_dir() else None, image_role="source image")
        else:
            raise FileNotFoundError(f"{self.path} is not a RORem folder: it has neither meta.json nor source/")
        if self.limit is not None:
            items = items[: self.limit]
        return items, failures

    def _list_meta(self, meta: Path) -> tuple[list[SourceItem], list[Failure]]:
        items: list[SourceItem] = []
        failures: list[Failure] = []
        for where, entry in self._entries(meta, failures):
            if not isinstance(entry, dict):
                failures.append(_fail(self.name, f"meta-{where.replace(' ', '-')}", "BadMetaEntry",
                                      f"{meta} {where} is not a JSON object: {str(entry)[:80]}"))
                continue
            missing = [f for f in ("source", "mask") if not isinstance(entry.get(f), str) or not entry.get(f)]
            if missing:
                failures.append(_fail(self.name, f"meta-{where.replace(' ', '-')}", "BadMetaEntry",
                                      f"{meta} {where} has no {' or '.join(repr(f) for f in missing)} path"))
                continue
            items.append(self._item(entry))
        return _dedupe_sorted(items, failures)

    def _entries(self, meta: Path, failures: list[Failure]) -> Iterator[tuple[str, Any]]:
        """(where, entry) pairs from a JSON list or JSON lines; bad lines are recorded as failures."""
        raw = meta.read_bytes()
        try:
            whole = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None
        if isinstance(whole, list):
            for index, entry in enumerate(whole):
                yield f"entry {index}", entry
            return
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                failures.append(_fail(self.name, f"meta-line-{number}", "UnicodeDecodeError",
                                      f"{meta} line {number} is not UTF-8 text: {error.reason} at byte {error.start}"))
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as error:
                failures.append(_fail(self.name, f"meta-line-{number}", "JSONDecodeError",
                                      f"{meta} line {number} is not valid JSON: {error.msg} "
                                      f"(column {error.colno}): {text.strip()[:80]}"))
                continue
            yield f"line {number}", entry

    def _item(self, entry: dict[str, Any]) -> SourceItem:
        def resolve(value: str) -> str:
            path = Path(value)
            return str(path if path.is_absolute() else self.path / path)

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
        return SourceItem(make_key(self.name, source_id), self.name, source_id, refs,
                          caption if isinstance(caption, str) else None, meta)


# ------------------------------------------------------------------------------------------ folders
class FolderSource(_CachedSource):
    """Plain folders ``<path>/<image_dir>`` and ``<path>/<mask_dir>`` (optionally ``<background_dir>``)
    matched by file stem, any of png, jpg, jpeg, webp, bmp, tif, tiff. An image without a mask and a
    mask without an image are listing failures; a missing background just means none. A ``<stem>.txt``
    next to an image is its caption. Items are sorted by stem."""

    def __init__(self, path: str | Path, image_dir: str = "images", mask_dir: str = "masks",
                 background_dir: str | None = None, name: str = "folder"):
        self.path = Path(path)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.background_dir = background_dir
        self.name = name

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        image_dir = self.path / self.image_dir
        if not image_dir.is_dir():
            raise FileNotFoundError(f"folder source: image folder {image_dir} does not exist")
        background_dir = self.path / self.background_dir if self.background_dir else None
        return _pair_by_stem(self.name, image_dir, self.path / self.mask_dir, background_dir)


# ------------------------------------------------------------------------------------ Hugging Face
class HFSource(_CachedSource):
    """A Hugging Face ``datasets`` data set from local files only (no Hub access).

    ``data_format`` (inferred when None): ``imagefolder`` (a folder of images with ``metadata.jsonl``;
    ``mask_file_name`` there gives a ``mask`` column), ``parquet`` (a file or a folder of them) or
    ``disk`` (``save_to_disk`` output). Items are row indices in order. Image columns are read with
    ``decode=False`` so that the ``load`` stage decodes the bytes itself, with its size guard and
    readable errors, instead of ``datasets`` decoding them eagerly."""

    def __init__(self, path: str | Path, split: str = "train", image_column: str = "image",
                 mask_column: str = "mask", background_column: str | None = None,
                 caption_column: str | None = None, name: str = "hf", data_format: str | None = None,
                 cache_dir: str | None = None):
        self.path = Path(path)
        self.split = split
        self.image_column = image_column
        self.mask_column = mask_column
        self.background_column = background_column
        self.caption_column = caption_column
        self.name = name
        self.data_format = data_format
        self.cache_dir = cache_dir

    def resolved_format(self) -> str:
        if self.data_format:
            return self.data_format
        if self.path.is_file():
            return "parquet" if self.path.suffix == ".parquet" else "imagefolder"
        if (self.path / "state.json").is_file() or (self.path / "dataset_dict.json").is_file():
            return "disk"
        if any(self.path.rglob("*.parquet")):
            return "parquet"
        return "imagefolder"

    def dataset(self):
        """The loaded split with image columns undecoded; opened once per process (worker)."""
        cached = self.__dict__.get("_cache_dataset")
        if cached is not None:
            return cached
        import datasets

        if not self.path.exists():
            raise FileNotFoundError(f"hf source: {self.path} does not exist")
        fmt = self.resolved_format()
        if fmt == "disk":
            loaded = datasets.load_from_disk(str(self.path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[self.split]
        elif fmt == "parquet" and self.path.is_file():
            loaded = datasets.load_dataset("parquet", data_files={self.split: str(self.path)}, split=self.split,
                                           cache_dir=self.cache_dir)
        elif fmt in ("parquet", "imagefolder"):
            loaded = datasets.load_dataset(fmt, data_dir=str(self.path), split=self.split, cache_dir=self.cache_dir)
        else:
            raise ValueError(f"hf source: data_format {fmt!r} is not one of imagefolder, parquet, disk")
        columns = [c for c in (self.image_column, self.mask_column, self.background_column, self.caption_column) if c]
        absent = [c for c in columns if c not in loaded.column_names]
        if absent:
            raise ValueError(f"hf source {self.path}: column(s) {absent} not found; columns are {loaded.column_names}")
        for column in columns[:3]:
            if column and isinstance(loaded.features[column], datasets.Image):
                loaded = loaded.cast_column(column, datasets.Image(decode=False))
        self._cache_dataset = loaded
        return loaded

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        ds = self.dataset()
        captions = list(ds[self.caption_column]) if self.caption_column else [None] * len(ds)
        items = [SourceItem(make_key(self.name, str(i)), self.name, str(i), {"row": i},
                            str(captions[i]) if captions[i] is not None else None)
                 for i in range(len(ds))]
        return items, []

    def _value(self, value: Any) -> Any:
        """A cell of an image column as something ``decode_image`` takes."""
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            if value.get("bytes"):
                return value["bytes"]
            path = value.get("path")
            if path and not Path(path).is_absolute() and not Path(path).exists():
                base = self.path if self.path.is_dir() else self.path.parent
                path = str(base / path)
            return path
        return value

    def read(self, item: SourceItem) -> LayeredSample:
        row = self.dataset()[int(item.refs["row"])]
        work = {"raw_image": self._value(row[self.image_column]), "raw_mask": self._value(row[self.mask_column])}
        if self.background_column:
            work["raw_background"] = self._value(row[self.background_column])
        return new_sample(item, work)


# -------------------------------------------------------------------------------------- WebDataset
def _alternatives(spec: str | None) -> list[str]:
    """``"jpg|png"`` (or webdataset's ``"jpg;png"``) -> ["jpg", "png"], first present wins."""
    return [part.strip().lower() for part in re.split(r"[|;]", spec or "") if part.strip()]


def _is_plain_local_tar(url: str) -> bool:
    """An uncompressed tar on the local disk, where member offsets can be seeked to directly."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return False
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    try:
        with open(path, "rb") as f:
            f.seek(257)
            return f.read(5) == b"ustar"
    except OSError:
        return False


class WebDatasetSource(_CachedSource):
    """webdataset tar shards; keys are the tars' ``__key__`` values.

    ``image_member``/``mask_member``/``background_member`` list alternative member extensions separated
    by ``|`` (or ``;``); the first one a sample has is used. The defaults read generic shards (``jpg``,
    ``png`` ...) and shards written by layerloop (``composite.png``, ``object_mask.png`` before the box
    ``mask.png``, ``background.png`` as the ground-truth background). A ``txt`` member is the caption.

    Listing streams every shard once and remembers where each member lies. Reading a plain local tar
    seeks straight to the member's bytes; compressed or remote shards are re-streamed with webdataset,
    keeping one open cursor per source instance, so reading a shard's items in order is one forward pass
    and memory holds one sample at a time. Items keep the shards' order (shard by shard, then the order
    inside each tar), which is what makes that single pass possible.

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

    def _scan(self, url: str) -> Iterator[tuple[str, dict[str, tuple[int, int]], str | None]]:
        """(key, {member: (offset, size)}, caption) per sample of one shard, in tar order."""
        from webdataset.gopen import gopen
        from webdataset.tariterators import base_plus_ext

        stream = gopen(url, "rb")
        try:
            key, members, caption = None, {}, None
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    prefix, suffix = base_plus_ext(info.name)
                    if prefix is None or (prefix.startswith("__") and prefix.endswith("__")):
                        continue
                    if prefix != key:
                        if key is not None:
                            yield key, members, caption
                        key, members, caption = prefix, {}, None
                    suffix = suffix.lower()
                    members[suffix] = (info.offset_data, info.size)
                    if suffix == "txt":
                        caption = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
            if key is not None:
                yield key, members, caption
        finally:
            stream.close()

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        items, failures = [], []
        seen: dict[str, str] = {}
        for shard, url in enumerate(self.shard_urls()):
            seekable = _is_plain_local_tar(url)
            for position, (key, members, caption) in enumerate(self._scan(url)):
                item_key = make_key(self.name, key)
                if item_key in seen:
                    failures.append(Failure(item_key, LIST_STAGE, "DuplicateKey",
                                            f"tar key {key!r} in {url} was already listed from {seen[item_key]}"))
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
                    failures.append(Failure(item_key, LIST_STAGE, "MissingMember",
                                            f"tar key {key!r} in {url} has no {' or '.join(missing)} member "
                                            f"(looked for image {self.image_member!r}, mask {self.mask_member!r}; "
                                            f"it has {sorted(members)})"))
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

    def _read_seek(self, item: SourceItem) -> dict[str, bytes]:
        url = item.refs["url"]
        path = url[len("file://"):] if url.startswith("file://") else url
        out = {}
        with open(path, "rb") as f:
            for role, (_, offset, size) in item.refs["members"].items():
                f.seek(offset)
                out[role] = f.read(size)
        return out

    def _read_stream(self, item: SourceItem) -> dict[str, bytes]:
        from webdataset.tariterators import tarfile_samples

        url, position = item.refs["url"], item.refs["position"]
        cursor = self.__dict__.get("_cache_cursor")
        if cursor is not None and cursor[0] == url and cursor[1] == position and cursor[3] is not None:
            return dict(cursor[3])  # another variant of the sample just read
        if cursor is None or cursor[0] != url or cursor[1] >= position:
            cursor = [url, -1, iter(tarfile_samples([{"url": url}])), None]
        self._cache_cursor = cursor
        for record in cursor[2]:
            cursor[1] += 1
            if cursor[1] == position:
                if record["__key__"] != item.refs["tar_key"]:
                    raise RuntimeError(f"{url} changed since it was listed: expected key "
                                       f"{item.refs['tar_key']!r} at position {position}, found {record['__key__']!r}")
                cursor[3] = {role: record[m] for role, (m, _, _) in item.refs["members"].items()}
                return dict(cursor[3])
        self._cache_cursor = None
        raise RuntimeError(f"{url} ended before sample {item.refs['tar_key']!r}: the shard changed since listing")

    def read(self, item: SourceItem) -> LayeredSample:
        data = self._read_seek(item) if item.refs.get("seekable") else self._read_stream(item)
        return new_sample(item, {f"raw_{role}": value for role, value in data.items()})


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


# ------------------------------------------------------------------------------------------ logos
class LogoSource(_CachedSource):
    """Synthetic logo quadruples (issue 5): item ``i`` is ``LogoSynthesizer(size, seed).make(i)``.

    Unlike the file sources, ``read`` returns the *complete* sample (F, B, M, C, caption, kind
    ``quadruple``; the invariant holds by construction), so a build needs no stages at all
    (``stages: []``): generation is cheap and deterministic in (seed, index), so it happens in the worker
    and nothing is rendered to disk first."""

    def __init__(self, n: int, seed: int = 0, size: int = 256, name: str = "logos"):
        self.n = n
        self.seed = seed
        self.size = size
        self.name = name

    def _list(self) -> tuple[list[SourceItem], list[Failure]]:
        items = [SourceItem(make_key(self.name, f"{i:06d}"), self.name, f"{i:06d}", {"index": i})
                 for i in range(self.n)]
        return items, []

    def read(self, item: SourceItem) -> LayeredSample:
        from layerloop.datasets.logos import LogoSynthesizer

        synthesizer = self.__dict__.get("_cache_synthesizer")
        if synthesizer is None:
            synthesizer = self._cache_synthesizer = LogoSynthesizer(size=self.size, seed=self.seed)
        sample = synthesizer.make(int(item.refs["index"]))
        sample.key = item.key
        sample.meta["source"] = item.source
        return sample


# ------------------------------------------------------------------------------------------ configs
_NAME = Field(pattern=r"^[A-Za-z0-9_-]+$")  # becomes the key prefix, so it must be key-safe


class _SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoremConfig(_SourceConfig):
    type: Literal["rorem"]
    path: str
    name: Annotated[str, _NAME] = "rorem"
    limit: Annotated[int, Field(ge=1)] | None = None


class FolderConfig(_SourceConfig):
    type: Literal["folder"]
    path: str
    image_dir: str = "images"
    mask_dir: str = "masks"
    background_dir: str | None = None
    name: Annotated[str, _NAME] = "folder"


class HFConfig(_SourceConfig):
    type: Literal["hf"]
    path: str
    split: str = "train"
    image_column: str = "image"
    mask_column: str = "mask"
    background_column: str | None = None
    caption_column: str | None = None
    name: Annotated[str, _NAME] = "hf"
    data_format: Literal["imagefolder", "parquet", "disk"] | None = None
    cache_dir: str | None = None


class WebDatasetConfig(_SourceConfig):
    type: Literal["webdataset"]
    urls: str | list[str]
    name: Annotated[str, _NAME] = "wds"
    image_member: str = "composite.png|jpg|jpeg|png|webp|image.png|image.jpg"
    mask_member: str = "object_mask.png|mask.png|mask.jpg|mask|seg.png"
    background_member: str | None = "background.png|gt.png|gt.jpg"
    variants: Annotated[int, Field(ge=1)] = 1  # items per tar sample (<key>-v0, -v1 ...): candidates per input


class DemoConfig(_SourceConfig):
    type: Literal["demo"]
    path: str
    n: Annotated[int, Field(ge=1)]
    seed: int = 0
    size: Annotated[int, Field(ge=16)] = 256
    name: Annotated[str, _NAME] = "demo"


class LogoConfig(_SourceConfig):
    type: Literal["logos"]
    n: Annotated[int, Field(ge=1)]
    seed: int = 0
    size: Annotated[int, Field(ge=64)] = 256
    name: Annotated[str, _NAME] = "logos"


SOURCE_CONFIGS: dict[str, type[_SourceConfig]] = {
    "rorem": RoremConfig, "folder": FolderConfig, "hf": HFConfig, "webdataset": WebDatasetConfig,
    "demo": DemoConfig, "logos": LogoConfig,
}


def _absolute(path: str) -> str:
    """Relative paths are relative to the current directory when the config is read; made absolute here
    because Ray workers run elsewhere."""
    return os.path.abspath(os.path.expanduser(path))


def _absolute_url(url: str) -> str:
    return url if url.startswith("pipe:") or "://" in url else _absolute(url)


def build_source(cfg: dict[str, Any]) -> Source:
    """A source from its config section: ``{"type": "rorem"|"folder"|"hf"|"webdataset"|"demo"|"logos", ...}``."""
    cfg = dict(cfg)
    kind = cfg.get("type")
    if kind not in SOURCE_CONFIGS:
        raise ValueError(f"source type {kind!r} is not one of {', '.join(SOURCE_CONFIGS)}")
    try:
        config = SOURCE_CONFIGS[kind].model_validate(cfg)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'source'}: {e['msg']}" for e in error.errors())
        raise ValueError(f"source type {kind!r}: {problems}") from None
    params = config.model_dump(exclude={"type"})
    if "path" in params:
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
    return DemoSource(**params)
