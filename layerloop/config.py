"""Typed pipeline configs: YAML files validated by pydantic, with ``key=value`` overrides from the CLI.

Overrides use dotted paths: ``seed=3``, ``source.n=16``, ``shards.samples_per_shard=8``. Stage
parameters are addressed by stage name: ``stages.matting.backend=closed-form``. Values are parsed as
YAML scalars (``true``, ``3``, ``0.5``, ``[1, 2]``, ``null``).

The ``source`` section and each ``stages`` entry are validated by the source/stage they name (each has
its own pydantic model), so an unknown parameter is reported with the stage or source it belongs to.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from layerloop.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardsConfig(_Strict):
    name: str = "layerloop"  # shard file prefix: <name>-NNNNNN.tar
    samples_per_shard: int = Field(16, ge=1)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ "):
            raise ValueError(f"shard name {value!r} must be a plain file prefix")
        return value


class RayConfig(_Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray on this machine
    num_cpus: int | None = None  # for the local Ray only
    # Retries of a shard task / restarts of a stage actor after a worker or node dies. None: Ray Data's
    # defaults (tasks retried, actors restarted without limit). A number is passed as a map_batches
    # remote argument, which Ray deprecates for 2.64: set them only to cap retries.
    max_task_retries: int | None = None
    actor_restarts: int | None = None


class ReportConfig(_Strict):
    enabled: bool = True
    rows: int = Field(8, ge=1)  # samples shown on the contact sheet


class BuildConfig(_Strict):
    name: str = "layerloop"
    profile: str = "demo"
    seed: int = 0
    source: dict[str, Any]
    stages: list[dict[str, Any]]
    shards: ShardsConfig = ShardsConfig()
    executor: Literal["local", "ray"] = "ray"
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()
    out: str | None = None  # run directory; the CLI's --out wins

    def fingerprint(self) -> str:
        """Hash of everything that changes the output bytes (not executor, Ray settings or out dir)."""
        relevant = self.model_dump(mode="json", exclude={"executor", "ray", "out", "report"})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def stage_names(self) -> list[str]:
        return [entry.get("stage", "?") for entry in self.stages]


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


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
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
    for override in overrides or []:
        apply_override(data, override)
    return data


def split_override(override: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], the value parsed as a YAML scalar)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not a YAML scalar or list: {error}") from None
    return dotted.strip().split("."), value


def apply_entry_override(data: dict[str, Any], override: str, entry_fields: tuple[str, ...]) -> None:
    """``key.sub=value`` with YAML scalars, where list entries are addressed by one of their
    ``entry_fields`` (``data.accepted.weight=2`` by name, ``scoring.dedupe.threshold=4`` by stage) or by
    index (``data.0.run_dir=runs/x``). Used by training and self-improvement configs."""
    parts, value = split_override(override)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            matches = [e for e in node if isinstance(e, dict) and part in (e.get(f) for f in entry_fields)]
            if not matches and part.isdigit() and int(part) < len(node):
                matches = [node[int(part)]]
            if not matches or last:
                labels = [next((e.get(f) for f in entry_fields if e.get(f)), None) for e in node if isinstance(e, dict)]
                raise ConfigError(f"override {override!r}: {part!r} names no entry of {'.'.join(parts[:i])} "
                                 f"(entries: {labels}); set a field of one entry")
            node = matches[0]
        elif last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")


def load_config(path: str | Path, overrides: list[str] | None = None) -> BuildConfig:
    return BuildConfig.model_validate(load_yaml(path, overrides))


def apply_override(data: dict[str, Any], override: str) -> None:
    parts, value = split_override(override)
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            matches = [entry for entry in node if isinstance(entry, dict) and entry.get("stage") == part]
            if not matches:
                names = [entry.get("stage") for entry in node if isinstance(entry, dict)]
                raise ConfigError(f"override {override!r}: no stage named {part!r} (stages: {names})")
            node = matches[0]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"override {override!r}: name a stage parameter (stages.NAME.PARAM=value)")
    node[parts[-1]] = value
