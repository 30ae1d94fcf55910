"""What every trained checkpoint folder shares, whatever the model family: the hash file the training
loop's export writes next to the weights (``training/loop.py``), which candidates record as their lineage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

HASH_FILE = "checkpoint_hash.txt"


def recorded_hash(checkpoint: str | os.PathLike, weights_hash: Callable[[Path], str]) -> str:
    """The hash a checkpoint is known by: its ``checkpoint_hash.txt`` when the training export wrote one,
    else ``weights_hash(checkpoint)`` (the family's own hash of its weight file)."""
    hash_file = Path(checkpoint) / HASH_FILE
    return hash_file.read_text().strip() if hash_file.is_file() else weights_hash(Path(checkpoint))
