"""Training checkpoints: ``<out>/checkpoints/step-NNNNNN/`` written atomically, the newest K kept.

A checkpoint holds everything a resumed run needs to continue bit for bit:

* ``weights/``: the task's trainable weights in its own format (``task.save_weights``: for BFS the
  LoRA + g checkpoint that inference loads);
* ``trainer.pt``: optimiser state, step, every stream's position, the torch / numpy / python RNG
  states, and the config fingerprint (a resume with a different config is refused).

The directory is written as ``step-NNNNNN.tmp-<token>`` and renamed when complete, so a crash while
writing leaves only a temporary directory, which the next run deletes; ``latest_checkpoint`` never
sees a half-written checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerloop.files import atomic_path

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"
WEIGHTS = "weights"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(out_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(out_dir: str | Path) -> None:
    """Temporary directories of an interrupted write (call only while holding the run lock)."""
    root = checkpoints_root(out_dir)
    if root.is_dir():
        for path in root.glob("step-*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_checkpoint(out_dir: str | Path, step: int, save_weights, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNN/`` atomically (``save_weights(dir)`` fills ``weights/``), then drop all but the
    newest ``keep`` checkpoints. Returns the committed directory."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    # the same step written again (a retried worker) is replaced whole
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_weights(tmp / WEIGHTS)
        torch.save(trainer_state, tmp / TRAINER_STATE)
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples and python's random state, written by us.
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=False)

