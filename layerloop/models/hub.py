"""Where model weights come from (docs/architecture.md, "Models").

``resolve(model_id)`` turns a config's model reference into a path on this machine, in this order:

1. a local directory or file: used as is, so an air-gapped cluster can point a config at a copied folder;
2. the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
   looked up without touching the network;
3. a download into that cache, under a file lock in the cache directory: when several Ray workers on one
   node start at once, one downloads and the others wait for it and then find the files in the cache.

Offline (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, ``allow_download=False``) or when the Hub
cannot be reached, a model that is not on disk raises ``ModelNotAvailable``, whose message names the model,
the revision and the two ways to get it there (``layerloop models pull CONFIG`` on a machine with internet,
or copying the folder and pointing the config at it).

The environment is read at call time, not at import time (``huggingface_hub`` freezes ``HF_HUB_OFFLINE``
and its cache path when it is imported), so a worker that sets ``HF_HOME`` or goes offline after import
still gets the behaviour it asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import huggingface_hub
from filelock import FileLock
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)

DEFAULT_REVISION = "main"


class ModelNotAvailable(RuntimeError):
    """A model is neither a local path nor in the Hugging Face cache, and it cannot be downloaded here."""

    def __init__(self, model_id: str, revision: str | None, reason: str, cache_dir: Path,
                 filename: str | None = None):
        self.model_id = model_id
        self.revision = revision or DEFAULT_REVISION
        self.filename = filename
        self.reason = reason
        what = f"'{model_id}'" + (f" file '{filename}'" if filename else "")
        super().__init__(
            f"Model {what} (revision '{self.revision}') is not available on this machine: {reason}.\n"
            f"Looked for a local path '{model_id}' and in the Hugging Face cache {cache_dir}.\n"
            "To fetch it, either run `layerloop models pull CONFIG` (with the config that names this model) on a "
            "machine with internet access and the same HF_HOME / shared cache, or copy the model folder to this "
            "machine and point the config at that folder."
        )


def default_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (``HF_HUB_CACHE`` > ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_offline() -> bool:
    """True when downloads are switched off by ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``."""
    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE") or bool(hub_constants.HF_HUB_OFFLINE)


def resolve(
    model_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
    filename: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local path for ``model_id``: a snapshot directory, or one file when ``filename`` is given.

    ``allow_patterns`` limits a snapshot download to matching files (for example one weight format of a
    repository that ships several); it does not apply to local paths.
    """
    model_id = str(model_id)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    local = Path(model_id).expanduser()
    if local.exists():
        if filename is not None and local.is_dir():
            target = local / filename
            if not target.is_file():
                raise ModelNotAvailable(model_id, revision, f"the local folder has no file '{filename}'", cache,
                                        filename)
            return target.resolve()
        return local.resolve()
    if model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1:
        # Hub ids are "name" or "owner/name": anything else was meant as a local path, and saying
        # "not on the Hub" about it would send the user looking in the wrong place.
        raise ModelNotAvailable(model_id, revision, "the local path does not exist", cache, filename)

    cached = _from_cache(model_id, revision, cache, filename, allow_patterns)
    if cached is not None:
        return cached
    if not allow_download:
        raise ModelNotAvailable(model_id, revision, "it is not in the cache and downloads are disabled", cache,
                                filename)
    if is_offline():
        raise ModelNotAvailable(model_id, revision, "it is not in the cache and HF_HUB_OFFLINE is set", cache,
                                filename)

    cache.mkdir(parents=True, exist_ok=True)
    lock_dir = cache / ".locks" / "layerloop"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock_name = model_id.replace("/", "--") + (f"--{filename.replace('/', '--')}" if filename else "") + ".lock"
    with FileLock(str(lock_dir / lock_name)):
        # Whoever held the lock before us may have just downloaded it.
        cached = _from_cache(model_id, revision, cache, filename, allow_patterns)
        if cached is not None:
            return cached
        try:
            if filename is not None:
                path = huggingface_hub.hf_hub_download(model_id, filename, revision=revision, cache_dir=cache)
            else:
                path = huggingface_hub.snapshot_download(model_id, revision=revision, cache_dir=cache,
                                                         allow_patterns=allow_patterns)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
            # huggingface_hub raises these when the Hub cannot be reached and nothing is cached.
            raise ModelNotAvailable(model_id, revision, f"the Hugging Face Hub cannot be reached ({error})",
                                    cache, filename) from error
        except (HfHubHTTPError, EntryNotFoundError) as error:
            # Unknown repository, revision or file, gated repository without a token, or Hub downtime.
            raise ModelNotAvailable(model_id, revision, f"the Hub refused the download ({error})", cache,
                                    filename) from error
    return Path(path)


def resolve_folder(
    model_id: str | os.PathLike,
    subfolders: Sequence[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> Path:
    """A model folder in the diffusers layout holding every one of ``subfolders`` (e.g. ``transformer``,
    ``vae``): ``resolve`` limited to ``model_index.json`` and those subfolders, then checked, so a local
    folder or a partial snapshot that lacks one is a ``ModelNotAvailable`` naming what is missing."""
    patterns = ["model_index.json"] + [f"{name}/*" for name in subfolders]
    root = resolve(model_id, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                   allow_patterns=patterns)
    missing = [name for name in subfolders if not (root / name).is_dir()]
    if missing:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        raise ModelNotAvailable(str(model_id), revision, f"the folder {root} lacks {missing} (expected the "
                                f"diffusers layout with {', '.join(subfolders)})", cache)
    return root


def is_available(
    model_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    filename: str | None = None,
    allow_patterns: list[str] | None = None,
) -> bool:
    """True when ``resolve`` would succeed without downloading anything."""
    try:
        resolve(model_id, revision=revision, cache_dir=cache_dir, allow_download=False, filename=filename,
                allow_patterns=allow_patterns)
    except ModelNotAvailable:
        return False
    return True


def _from_cache(model_id: str, revision: str | None, cache: Path, filename: str | None,
                allow_patterns: list[str] | None) -> Path | None:
    if filename is not None:
        found = huggingface_hub.try_to_load_from_cache(model_id, filename, cache_dir=cache, revision=revision)
        # try_to_load_from_cache returns a sentinel object (not a str) when the Hub said the file is absent.
        return Path(found) if isinstance(found, str) else None
    try:
        path = huggingface_hub.snapshot_download(model_id, revision=revision, cache_dir=cache,
                                                 local_files_only=True, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError:  # also covers IncompleteSnapshotError: a partial download is a miss
        return None
    return Path(path)
