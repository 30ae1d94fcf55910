"""The one config core: YAML files validated by pydantic, ``key=value`` overrides, fingerprints, errors.

Every config of layerloop (``BuildConfig`` here, ``TrainConfig`` in ``training/config.py``,
``SelfImproveConfig`` in ``selfimprove/config.py``) is a ``ConfigModel``: it is read by one YAML loader
(``load_config_data``: a path, a packaged name such as ``demo``, or a dict), takes overrides in one
dialect (``apply_override``), is fingerprinted by one helper (``fingerprint_of``) and reports every
problem through one error path (``validate_model``), which raises ``ConfigValidationError``: a
``layerloop.errors.ConfigError`` (and a pydantic ``ValidationError``) whose message names the key and,
for an unknown key, lists the valid ones (``source.pth: unknown key; valid keys for a rorem source:
path, name, limit, allow_outside_root``).

The override dialect (the same for builds, training and self-improvement):

* dotted paths: ``seed=3``, ``source.n=16``, ``shards.samples_per_shard=8``;
* a list entry is addressed by its identifying field (``stage`` for stage lists, ``name`` for data
  entries) or by its index: ``stages.matting.backend=knn``, ``data.accepted.weight=2``,
  ``data.0.run_dir=runs/x``; a name that matches no entry is an error that lists the entries; an entry
  name that two entries share must be addressed by index;
* values are parsed as YAML (``true``, ``3``, ``0.5``, ``[1, 2]``, ``null``, ``{type: rorem}``); an empty
  value is the empty string;
* a missing section is created (``ray.address=...``); what no config class knows is reported when the
  config is validated, with the valid keys of that section.
* switching a discriminated section's type (``source.type=rorem`` on a ``demo`` source): the keys the new
  type does not have are dropped, and one INFO log line names them; the keys both types have (``path``,
  ``name``) are kept. Overrides apply in order, so ``source.type=rorem source.path=DIR`` and
  ``source.path=DIR source.type=rorem`` give the same config.

The ``source`` section of a build is a discriminated union on ``type`` (``RoremConfig`` ... ``LogoConfig``,
re-exported by ``datasets/sources.py``). It is recorded (``run.json``, fingerprint) as written: the keys
given, not the defaults, so that fingerprints do not change when a default is added. Each ``stages``
entry stays a mapping, validated by its stage's ``Params`` model when the stage is built
(``stages/registry.py``), with the same error messages.
"""

from __future__ import annotations

import json
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
)

from layerloop.errors import ConfigError
from layerloop.files import sha256_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ENTRY_FIELDS = ("stage", "name")  # the fields that identify a list entry, in order of preference

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- errors
class ConfigValidationError(ConfigError, ValidationError):
    """An invalid config: a ``ConfigError`` (exit code 2) that is also a pydantic ``ValidationError`` for
    callers that catch that. ``str()`` is the explained message; ``problems`` its lines."""

    @classmethod
    def make(cls, message: str, problems: list[str] | None = None) -> ConfigValidationError:
        error = cls.from_exception_data(message, [])
        error.problems = list(problems or [message])
        return error

    def __str__(self) -> str:
        return self.title

    __repr__ = __str__


def _strip_optional(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _variants(annotation: Any, discriminator: str) -> dict[str, type[BaseModel]]:
    """Tag -> model of a discriminated union annotation."""
    out = {}
    for arg in typing.get_args(_strip_optional(annotation)):
        arg = _strip_optional(arg)
        if _is_model(arg) and discriminator in arg.model_fields:
            for tag in typing.get_args(_strip_optional(arg.model_fields[discriminator].annotation)):
                out[tag] = arg
    return out


class _Slot:
    """What the config class expects at one place of the data: a model, a discriminated union, a list
    of something, or anything (``dict[str, Any]``)."""

    def __init__(self, annotation: Any = Any, discriminator: str | None = None):
        self.annotation = _strip_optional(annotation)
        self.discriminator = discriminator

    @classmethod
    def of_field(cls, model: type[BaseModel], name: str) -> _Slot:
        info = model.model_fields[name]
        discriminator = info.discriminator if isinstance(info.discriminator, str) else None
        return cls(info.annotation, discriminator)

    def model(self, node: Any = None, tag: Any = None) -> type[BaseModel] | None:
        if _is_model(self.annotation):
            return self.annotation
        if self.discriminator:
            if tag is None and isinstance(node, dict):
                tag = node.get(self.discriminator)
            return _variants(self.annotation, self.discriminator).get(tag)
        return None

    def child(self, part: str | int, node: Any = None) -> _Slot:
        model = self.model(node)
        if model is not None:
            return _Slot.of_field(model, part) if part in model.model_fields else _Slot()
        if typing.get_origin(self.annotation) in (list, tuple):
            args = typing.get_args(self.annotation)
            return _Slot(args[0] if args else Any)
        if typing.get_origin(self.annotation) is dict:
            args = typing.get_args(self.annotation)
            return _Slot(args[1] if len(args) == 2 else Any)
        return _Slot()


def model_keys(model: type[BaseModel]) -> list[str]:
    """A model's keys as an error lists them: its own fields first, then inherited ones; not the
    discriminator of a union member (``type`` of a source)."""
    hidden = set(getattr(model, "hidden_keys", ()))
    inherited = [n for base in model.__mro__[1:] if _is_model(base) for n in getattr(base, "model_fields", {})]
    own = [n for n in model.model_fields if n not in inherited]
    return [n for n in own + [n for n in model.model_fields if n in inherited] if n not in hidden]


def model_label(model: type[BaseModel], where: str) -> str:
    label = getattr(model, "config_label", "")
    if isinstance(label, str) and label:
        return label
    return where or model.__name__


def _entry_label(entry: Any) -> str | None:
    if isinstance(entry, dict):
        for field in ENTRY_FIELDS:
            if isinstance(entry.get(field), str) and entry.get(field):
                return entry[field]
    return None


def explain(model: type[BaseModel], data: Any, error: ValidationError, *, prefix: tuple[str, ...] = (),
            label: str | None = None) -> list[str]:
    """One line per problem of ``error``: ``source.pth: unknown key; valid keys for a rorem source: ...``."""
    problems = []
    for item in error.errors(include_url=False):
        slot, node, shown = _Slot(model), data, list(prefix)
        parents: list[tuple[_Slot, Any]] = []
        loc = list(item["loc"])
        for part in loc:
            parents.append((slot, node))
            variant = slot.discriminator and isinstance(part, str) and part in _variants(slot.annotation, slot.discriminator)
            if variant:  # the union's tag in the location: not a key of the data
                slot = _Slot(_variants(slot.annotation, slot.discriminator)[part])
                continue
            if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                shown.append(_entry_label(node[part]) or str(part))
            else:
                shown.append(str(part))
            slot = slot.child(part, node)
            node = node.get(part) if isinstance(node, dict) else (
                node[part] if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node) else None)
        where = ".".join(shown)
        kind, msg = item["type"], item["msg"]
        if kind == "extra_forbidden":
            parent_slot, parent_node = parents[-1] if parents else (_Slot(model), data)
            owner = parent_slot.model(parent_node)
            section = ".".join(shown[:-1])
            if owner is not None:
                what = label if (label and owner is model) else model_label(owner, section)
                problems.append(f"{where}: unknown key; valid keys for {what}: {', '.join(model_keys(owner))}")
                continue
            problems.append(f"{where}: unknown key")
            continue
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            tags = list(_variants(slot.annotation, slot.discriminator or "type"))
            disc = item.get("ctx", {}).get("discriminator", "'type'").strip("'")
            key = f"{where}.{disc}" if where else disc
            got = item.get("ctx", {}).get("tag")
            what = f"{got!r} is not one of" if kind == "union_tag_invalid" else "missing; one of"
            problems.append(f"{key}: {what} {', '.join(tags)}")
            continue
        if kind == "missing":
            msg = "missing (required)"
        elif kind in ("value_error", "assertion_error") and msg.startswith(("Value error, ", "Assertion failed, ")):
            msg = msg.split(", ", 1)[1]
        got = item.get("input")
        if kind != "missing" and isinstance(got, (str, int, float, bool, type(None))) and len(repr(got)) <= 80:
            msg = f"{msg} (got {got!r})"
        problems.append(f"{where}: {msg}" if where else msg)
    return problems


def validate_model(model: type[BaseModel], data: Any, *, prefix: tuple[str, ...] = (), label: str | None = None,
                   title: str = "") -> Any:
    """``model.model_validate(data)``, with every problem explained in one ``ConfigValidationError``."""
    try:
        return BaseModel.model_validate.__func__(model, data)
    except ConfigValidationError:
        raise
    except ValidationError as error:
        problems = explain(model, data, error, prefix=prefix, label=label)
        message = "; ".join(problems) if len(problems) == 1 else "\n".join(f"  {p}" for p in problems)
        if title:
            message = f"{title}: {message}" if len(problems) == 1 else f"{title}:\n{message}"
        raise ConfigValidationError.make(message, problems) from None


# ------------------------------------------------------------------------------------- fingerprint
def fingerprint_of(data: Any) -> str:
    """The 16-hex-digit hash of a JSON-able mapping (sorted keys): what run directories record. Paths inside
    a staging folder open in this process count as their store URL (``storage.canonical``), so a step that
    resumes in another node's copy of the folder finds the same fingerprint."""
    from layerloop import storage

    return sha256_text(json.dumps(storage.canonical(data), sort_keys=True), 16)


# ----------------------------------------------------------------------------------------- loading
def packaged_configs() -> list[str]:
    """Names of the configs shipped in ``configs/`` (``demo``, ``rorem`` ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a name under the packaged ``configs/`` (``demo`` -> configs/demo.yaml)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.is_absolute() and len(candidate.parts) == 1:  # a packaged name (a folder may share it)
        for alt in (CONFIG_DIR / candidate, CONFIG_DIR / f"{candidate}.yaml"):
            if alt.is_file():
                return alt
    what = "is a directory, not a YAML file" if candidate.is_dir() else "not found: not a file"
    raise ConfigError(f"config {path} {what}, and not a packaged config ({', '.join(packaged_configs())})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The one YAML loader: a config file (path or packaged name) as a mapping."""
    resolved = resolve_config_path(path)
    try:
        with open(resolved, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"config {resolved} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {resolved} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data


def load_config_data(config: str | Path | dict[str, Any], overrides: list[str] | None = None,
                     model: type[BaseModel] | None = None) -> dict[str, Any]:
    """The raw mapping of a config (a YAML path, a packaged name, or a dict, deep-copied) with overrides
    applied: a fresh dict that callers may edit before validating."""
    if isinstance(config, dict):
        data = json.loads(json.dumps(config))  # a deep copy that overrides may edit
    else:
        data = read_yaml(config)
    for override in overrides or []:
        apply_override(data, override, model)
    return data


# --------------------------------------------------------------------------------------- overrides
def split_override(override: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], the value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not a YAML scalar or list: {error}") from None
    parts = dotted.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {override!r}: {dotted.strip()!r} is not a dotted key")
    return parts, value


def _entry_index(entries: list[Any], part: str, override: str, where: str,
                 entry_fields: tuple[str, ...] = ENTRY_FIELDS) -> int:
    matches = [i for i, e in enumerate(entries) if isinstance(e, dict) and part in (e.get(f) for f in entry_fields)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"override {override!r}: {part!r} names {len(matches)} entries of {where} (indices "
                          f"{', '.join(map(str, matches))}); address one by its index: {where}.{matches[0]}...")
    if part.isdigit() and int(part) < len(entries):
        return int(part)
    labels = [_entry_label(e) or str(i) for i, e in enumerate(entries)]
    field = next((f for f in entry_fields if entries and all(isinstance(e, dict) and f in e for e in entries)), "entry")
    noun = "stage" if field == "stage" else "entry"
    index = f", or an index 0..{len(entries) - 1}" if entries else ""
    raise ConfigError(f"override {override!r}: no {noun} named {part!r}: {part!r} names no entry of {where} "
                      f"(entries: {', '.join(labels) or 'none'}{index})")


def apply_override(data: dict[str, Any], override: str, model: type[BaseModel] | None = None,
                   entry_fields: tuple[str, ...] = ENTRY_FIELDS) -> None:
    """Apply one ``key.sub=value`` override to a config mapping, in the dialect described at the top of
    this module. ``model`` (default ``BuildConfig``) tells which sections are discriminated unions."""
    parts, value = split_override(override)
    node: Any = data
    slot = _Slot(BuildConfig if model is None else model)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i]) or "the config"
        if isinstance(node, list):
            index = _entry_index(node, part, override, where, entry_fields)
            if last:
                if isinstance(node[index], (dict, list)):
                    raise ConfigError(f"override {override!r}: set a field of one entry ({where}.{part}.KEY=value)")
                node[index] = value
                return
            node, slot = node[index], slot.child(index)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {where} is not a section")
        elif last:
            if slot.discriminator == part and node.get(part) not in (None, value):
                _switch_variant(node, slot, value, ".".join(parts[:i]), override)
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section "
                                  f"(it is {child!r})")
            node, slot = child, slot.child(part, node)


def _switch_variant(node: dict[str, Any], slot: _Slot, tag: Any, where: str, override: str) -> None:
    """``source.type=rorem`` on a demo source: drop the keys a rorem source does not have (logged)."""
    new = slot.model(tag=tag)
    if new is None:
        return  # an unknown type: validation lists the valid ones
    dropped = [key for key in node if key != slot.discriminator and key not in new.model_fields]
    for key in dropped:
        del node[key]
    if dropped:
        log.info("%s: dropped %s (not keys of %s)", override, ", ".join(f"{where}.{k}" for k in dropped),
                 model_label(new, where))


# -------------------------------------------------------------------------------------- the base
class ConfigModel(BaseModel):
    """Base of every config: unknown keys are errors that list the valid ones, one loader, one dialect,
    one fingerprint (of ``model_dump(mode="json")`` without ``FINGERPRINT_EXCLUDE``)."""

    model_config = ConfigDict(extra="forbid")
    config_label: ClassVar[str] = ""  # how errors name this section ("a rorem source"); "" its path
    FINGERPRINT_EXCLUDE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):  # every caller gets the explained errors
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ConfigValidationError:
            raise
        except ValidationError as error:
            problems = explain(cls, obj, error)
            message = problems[0] if len(problems) == 1 else "\n".join(f"  {p}" for p in problems)
            raise ConfigValidationError.make(message, problems) from None

    @classmethod
    def load_data(cls, config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
        return load_config_data(config, overrides, cls)

    @classmethod
    def load(cls, config: str | Path | dict[str, Any], overrides: list[str] | None = None):
        """A config from a YAML path, a packaged name or a dict, plus ``key=value`` overrides."""
        return cls.model_validate(cls.load_data(config, overrides))

    def fingerprint(self) -> str:
        return fingerprint_of(self.model_dump(mode="json", exclude=set(self.FINGERPRINT_EXCLUDE)))




# ------------------------------------------------------------------------------------------ sources
_NAME = Field(pattern=r"^[A-Za-z0-9_-]+$")  # becomes the key prefix, so it must be key-safe


class SourceConfigBase(ConfigModel):
    """A source section. Read access as a mapping is kept for callers of the untyped days
    (``config.source["n"]``, ``config.source.get("path")``)."""

    hidden_keys: ClassVar[tuple[str, ...]] = ("type",)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in type(self).model_fields else default

    def __contains__(self, key: str) -> bool:
        return key in self.model_fields_set

    def as_written(self) -> dict[str, Any]:
        """The keys the config gave (what ``run.json`` and the fingerprint record)."""
        return self.model_dump(mode="json", exclude_unset=True)


class RoremConfig(SourceConfigBase):
    config_label: ClassVar[str] = "a rorem source"
    type: Literal["rorem"]
    path: str
    name: Annotated[str, _NAME] = "rorem"
    limit: Annotated[int, Field(ge=1)] | None = None
    allow_outside_root: bool = False  # read meta.json paths and symlinks that resolve outside ``path``


class FolderConfig(SourceConfigBase):
    config_label: ClassVar[str] = "a folder source"
    type: Literal["folder"]
    path: str
    image_dir: str = "images"
    mask_dir: str = "masks"
    background_dir: str | None = None
    name: Annotated[str, _NAME] = "folder"
    allow_outside_root: bool = False  # follow folders and symlinks that resolve outside ``path``


class HFConfig(SourceConfigBase):
    config_label: ClassVar[str] = "an hf source"
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
    allow_outside_root: bool = False  # read path cells that resolve outside ``path`` (its folder for a file)


class WebDatasetConfig(SourceConfigBase):
    # no allow_outside_root: the urls are the data, and tar members are read by offset, not by name
    config_label: ClassVar[str] = "a webdataset source"
    type: Literal["webdataset"]
    urls: str | list[str]
    name: Annotated[str, _NAME] = "wds"
    image_member: str = "composite.png|jpg|jpeg|png|webp|image.png|image.jpg"
    mask_member: str = "object_mask.png|mask.png|mask.jpg|mask|seg.png"
    background_member: str | None = "background.png|gt.png|gt.jpg"
    variants: Annotated[int, Field(ge=1)] = 1  # items per tar sample (<key>-v0, -v1 ...): candidates per input


class DemoConfig(SourceConfigBase):
    config_label: ClassVar[str] = "a demo source"
    type: Literal["demo"]
    path: str | None = None  # None: rendered into <run dir>/demo-data (pipelines/pipeline.py, source_config)
    n: Annotated[int, Field(ge=1)]
    seed: int = 0
    size: Annotated[int, Field(ge=16)] = 256
    name: Annotated[str, _NAME] = "demo"


class LogoConfig(SourceConfigBase):
    config_label: ClassVar[str] = "a logos source"
    # The logos' image formation changed (2: placed unlit layer, non-linear rendering of C, kind "rendered"):
    # the version is part of a build's fingerprint, so a run directory of the old logos is refused, not mixed.
    output_version: ClassVar[int] = 2
    type: Literal["logos"]
    n: Annotated[int, Field(ge=1)]
    seed: int = 0
    size: Annotated[int, Field(ge=64)] = 256
    # delivered size: rendered at ``size``, box-averaged by the whole factor size / output_size (None: size)
    output_size: Annotated[int, Field(ge=1)] | None = None
    name: Annotated[str, _NAME] = "logos"


class RunShardsConfig(SourceConfigBase):
    """A run directory's own committed shards, read whole (``datasets/shard_source.py``): the held-out set of
    an evaluation. ``select``: keep that many samples, chosen by ``seed`` (a fixed subset of the run)."""

    config_label: ClassVar[str] = "a shards source"
    type: Literal["shards"]
    path: str
    select: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    name: Annotated[str, _NAME] = "heldout"


SOURCE_CONFIGS: dict[str, type[SourceConfigBase]] = {
    "rorem": RoremConfig, "folder": FolderConfig, "hf": HFConfig, "webdataset": WebDatasetConfig,
    "demo": DemoConfig, "logos": LogoConfig, "shards": RunShardsConfig,
}

SourceConfig = Annotated[Union[RoremConfig, FolderConfig, HFConfig, WebDatasetConfig, DemoConfig, LogoConfig,
                               RunShardsConfig], Field(discriminator="type")]


# ------------------------------------------------------------------------------------------- builds
class ShardsConfig(ConfigModel):
    name: str = "layerloop"  # shard file prefix: <name>-NNNNNN.tar
    samples_per_shard: int = Field(16, ge=1)
    # PNG encoding of the image members (``samples.encode_png``, issue #16): "pil" (Pillow, adaptive row
    # filters) or "opencv" (libpng with Sub-filtered rows and zlib's RLE strategy, several times faster at
    # a similar size),
    # and the zlib level 0-9. The defaults are the historical bytes (Pillow, level 6) and are left out of
    # run.json and the fingerprint, so configs that do not set them keep their fingerprints; a config that
    # sets them writes other bytes and so gets another fingerprint.
    png_encoder: Literal["pil", "opencv"] = "pil"
    png_compress_level: int = Field(6, ge=0, le=9)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ "):
            raise ValueError(f"shard name {value!r} must be a plain file prefix")
        return value

    @model_serializer(mode="wrap")
    def _png_defaults_unrecorded(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key, default in (("png_encoder", "pil"), ("png_compress_level", 6)):
            if data.get(key) == default:
                data.pop(key)
        return data


class RayConfig(ConfigModel):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray on this machine
    num_cpus: int | None = None  # for the local Ray only
    # Retries of a shard task / restarts of a stage actor after a worker or node dies. None: Ray Data's
    # defaults (tasks retried, actors restarted without limit). A number is passed as a map_batches
    # remote argument, which Ray deprecates for 2.64: set them only to cap retries.
    max_task_retries: int | None = None
    actor_restarts: int | None = None


class ReportConfig(ConfigModel):
    enabled: bool = True
    rows: int = Field(8, ge=1)  # samples shown on the contact sheet


# Stage parameters whose default changed what the stage produces: a build's fingerprint records their resolved
# value (the default where the config does not give one), so that a run directory made with the old default is
# refused rather than continued with the new one. Each value must equal the stage's ``Params`` default (tested).
STAGE_FINGERPRINT_DEFAULTS: dict[str, dict[str, Any]] = {
    "generate-bfs": {"noise": "shared"},  # #15: one noise draw for both branches; before: independent
}


# Stage parameters that only place the work (an actor pool's size, its CPUs and GPUs): not in a build's
# fingerprint, as ``Stage.describe`` leaves them out of each sample's metadata. ``batch_size`` stays in: a
# model's batched numerics can differ with it.
STAGE_SCHEDULING_KEYS = ("cpus", "gpus", "concurrency")


class BuildConfig(ConfigModel):
    config_label: ClassVar[str] = "a build config"
    # Everything that changes the output bytes counts; not the executor, Ray settings, report or out dir,
    # nor the stages' STAGE_SCHEDULING_KEYS.
    FINGERPRINT_EXCLUDE: ClassVar[tuple[str, ...]] = ("executor", "ray", "out", "report")

    name: str = "layerloop"
    profile: str = "demo"
    seed: int = 0
    source: SourceConfig
    stages: list[dict[str, Any]]
    shards: ShardsConfig = ShardsConfig()
    executor: Literal["local", "ray"] = "ray"
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()
    out: str | None = None  # run directory; the CLI's --out wins

    @field_serializer("source")
    def _source_as_written(self, source: Any) -> Any:
        # As written (no defaults): run.json and the fingerprint are what they were for untyped sources.
        # A test or caller may have assigned a plain mapping: recorded as given.
        return source.as_written() if isinstance(source, SourceConfigBase) else dict(source)

    def stage_names(self) -> list[str]:
        return [entry.get("stage", "?") for entry in self.stages]

    def fingerprint(self) -> str:
        """As every config's, plus the source type's ``output_version`` where it has one and the resolved
        ``STAGE_FINGERPRINT_DEFAULTS`` of its stages (what the same config produces changed), without the
        stages' ``STAGE_SCHEDULING_KEYS``: a run resumes with more or fewer actors or GPUs per pool
        (``matches_record`` accepts run directories recorded before that)."""
        return self._fingerprint(scheduling=False)

    def matches_record(self, record: dict[str, Any]) -> bool:
        """Whether a run directory's ``run.json`` (``record``) holds a run of this config: its fingerprint is
        ours, or it was made before the scheduling keys were left out (2026-12-04) and its recorded config,
        under today's definition, has our fingerprint. The recorded fingerprint must then be its config's
        under the earlier definition, so a record whose stage defaults have changed since is still refused."""
        if record.get("fingerprint") == self.fingerprint():
            return True
        try:
            recorded = type(self).model_validate(record["config"])
        except (KeyError, TypeError, ValueError):
            return False
        return (recorded._fingerprint(scheduling=True) == record.get("fingerprint")
                and recorded.fingerprint() == self.fingerprint())

    def _fingerprint(self, scheduling: bool) -> str:
        data = self.model_dump(mode="json", exclude=set(self.FINGERPRINT_EXCLUDE))
        data["stages"] = [{**STAGE_FINGERPRINT_DEFAULTS.get(str(entry.get("stage")), {}),
                           **{k: v for k, v in entry.items() if scheduling or k not in STAGE_SCHEDULING_KEYS}}
                          for entry in data["stages"]]
        version = getattr(type(self.source), "output_version", None)
        if version is not None:
            data["source_output_version"] = version
        return fingerprint_of(data)


# ----------------------------------------------------------------------- the former public functions
def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A build config file as a mapping, with build overrides applied (not validated)."""
    data = read_yaml(path)
    for override in overrides or []:
        apply_override(data, override, BuildConfig)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> BuildConfig:
    return BuildConfig.load(path, overrides)
