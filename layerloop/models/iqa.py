"""What the no-reference quality scorers (MUSIQ, MANIQA) share: a network built from a config dict, loaded
from one checkpoint file in pyiqa's format (a plain state_dict, possibly wrapped in ``params`` /
``state_dict`` and with DataParallel's ``module.`` prefixes), saved back as that file plus a JSON config.
A subclass names its network class, file names and configs, and implements ``score``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layerloop.models import hub



def read_state_dict(checkpoint: Path, weights_only: bool) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file, unwrapped from ``{"params": ...}`` / ``{"state_dict": ...}`` and
    with the ``module.`` prefix of DataParallel training removed (what pyiqa accepts)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    for wrapper in ("params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


class Mlp(nn.Module):
    """The transformer MLP of both networks (``fc1`` -> GELU -> ``fc2``, the checkpoints' key names)."""
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class QualityScorer:
    """A subclass names its network and files in its class statement: ``class MusiqScorer(QualityScorer,
    name="musiq", net=MusiqNet, filename=..., config=KONIQ_CONFIG, tiny=TINY_CONFIG)``; the JSON config
    ``save_pretrained`` writes is ``<name>_config.json``."""

    NET: ClassVar[type[nn.Module]]
    NAME: ClassVar[str]  # for file and temporary folder names
    DEFAULT_ID: ClassVar[str] = "chaofengc/IQA-PyTorch-Weights"  # where pyiqa publishes its weights
    DEFAULT_FILENAME: ClassVar[str]
    CONFIG_NAME: ClassVar[str]
    DEFAULT_CONFIG: ClassVar[dict[str, Any]]  # the architecture of the published checkpoint
    TINY_CONFIG: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, *, name: str, net: type[nn.Module], filename: str, config: dict[str, Any],
                          tiny: dict[str, Any], **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.NAME, cls.NET, cls.DEFAULT_FILENAME = name, net, filename
        cls.DEFAULT_CONFIG, cls.TINY_CONFIG, cls.CONFIG_NAME = config, tiny, f"{name}_config.json"

    def __init__(self, net: nn.Module, filename: str | None = None, model_id: str = "tiny",
                 revision: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.net = net.to(self.device, self.dtype).eval()
        self.filename = filename or self.DEFAULT_FILENAME
        self.model_id = model_id
        self.revision = revision

    @property
    def config(self) -> dict:
        return self.net.config

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike | None = None, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu", filename: str | None = None,
                        cache_dir: str | os.PathLike | None = None, allow_download: bool = True,
                        config: dict | None = None, weights_only: bool = True):
        """``id_or_path``: a Hub repository holding ``filename``, a folder holding it, or the checkpoint file
        (default: ``DEFAULT_ID`` / ``DEFAULT_FILENAME``).

        The architecture is ``config`` if given, else the folder's ``CONFIG_NAME`` (as ``save_pretrained``
        writes) if there is one, else ``DEFAULT_CONFIG``. Loading is strict."""
        id_or_path = cls.DEFAULT_ID if id_or_path is None else id_or_path
        filename = filename or cls.DEFAULT_FILENAME
        checkpoint = hub.resolve(id_or_path, revision=revision, cache_dir=cache_dir, allow_download=allow_download,
                                 filename=None if Path(str(id_or_path)).expanduser().is_file() else filename)
        if config is None:
            config_file = checkpoint.parent / cls.CONFIG_NAME
            config = json.loads(config_file.read_text()) if config_file.is_file() else cls.DEFAULT_CONFIG
        net = cls.NET(config)
        net.load_state_dict(read_state_dict(checkpoint, weights_only), strict=True)
        return cls(net, filename=checkpoint.name, model_id=str(id_or_path), revision=revision, device=device,
                   dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu"):
        """``TINY_CONFIG`` with random weights, written as a checkpoint and loaded back through the same
        path as the real one (scores are noise)."""
        torch.manual_seed(seed)
        net = cls.NET(cls.TINY_CONFIG)
        with tempfile.TemporaryDirectory(prefix=f"layerloop-{cls.NAME}-") as folder:
            checkpoint = Path(folder) / cls.DEFAULT_FILENAME
            torch.save(net.state_dict(), checkpoint)
            loaded = cls.NET(cls.TINY_CONFIG)
            loaded.load_state_dict(read_state_dict(checkpoint, True), strict=True)
        return cls(loaded, device=device)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Writes ``<filename>`` (a plain state_dict, the format of the published files) plus ``CONFIG_NAME``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, path / self.filename)
        (path / self.CONFIG_NAME).write_text(json.dumps(self.net.config, indent=2))
        return path

    def describe(self) -> dict:
        return {"model": self.model_id, "file": self.filename, "revision": self.revision}
