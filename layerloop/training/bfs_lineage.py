"""Which checkpoints a BFS checkpoint was trained on: ``parents.json`` next to its weights.

Phi composites latents of one RGBA VAE, and stage 1 / stage 2 train against that Phi and encode F with
that RGBA VAE; a Phi trained in another VAE's latent space gives a meaningless L_comp without any error.
So every BFS export records the hashes of the checkpoints it used (the ``checkpoint_hash.txt`` of each,
else the hash of its weight file), keyed by the ``task`` parameter that named it:

| stage      | records                                                             |
|------------|---------------------------------------------------------------------|
| `rgba-vae` | nothing (it starts from the base model's RGB VAE)                   |
| `phi`      | `rgba_vae_checkpoint`                                               |
| `stage1`   | `rgba_vae_checkpoint`, `phi_checkpoint` (+ `init_lora` if given)    |
| `stage2`   | `rgba_vae_checkpoint`, `phi_checkpoint`, `init_lora` (stage 1)      |

A ``hash`` of null means "not a trained checkpoint": the RGBA VAE as initialised from the RGB VAE (no
``rgba_vae_checkpoint``), or ``phi_checkpoint: untrained``.

Before training, ``parent_hashes`` checks the parents against each other: a parent that itself records
the RGBA VAE or Phi this stage also uses (Phi's RGBA VAE; stage 1's Phi and RGBA VAE, for stage 2) must
record the same hash, else the stage is refused with both hashes named. A LoRA's own ``init_lora`` is not
compared: continuing from a LoRA that continued from another (self-improvement rounds) is a chain.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from layerloop.files import sha256_file, write_atomic
from layerloop.models.bfs_components import COMPOSITOR_WEIGHTS, RGBA_VAE_WEIGHTS
from layerloop.models.checkpoints import recorded_hash

logger = logging.getLogger(__name__)

PARENTS_FILE = "parents.json"
UNTRAINED = "untrained"

# task parameter -> (what it is, for messages; the weight file its hash falls back to)
PARENT_KINDS = {
    "rgba_vae_checkpoint": ("RGBA VAE", RGBA_VAE_WEIGHTS),
    "phi_checkpoint": ("Phi", COMPOSITOR_WEIGHTS),
    "init_lora": ("stage-1 LoRA", "bfs_lora.safetensors"),
}
STAGE_PARENTS = {
    "rgba-vae": (),
    "phi": ("rgba_vae_checkpoint",),
    "stage1": ("rgba_vae_checkpoint", "phi_checkpoint", "init_lora"),
    "stage2": ("rgba_vae_checkpoint", "phi_checkpoint", "init_lora"),
}
ALWAYS = ("rgba_vae_checkpoint", "phi_checkpoint")  # recorded even when not given (hash null)


def _describe(key: str, entry: dict[str, Any]) -> str:
    kind = PARENT_KINDS[key][0]
    if entry.get("hash"):
        return f"{kind} {entry['hash']}" + (f" ({entry['path']})" if entry.get("path") else "")
    if key == "rgba_vae_checkpoint":
        return "the RGBA VAE as initialised from the RGB VAE (no task.rgba_vae_checkpoint)"
    return f"an untrained {kind}"


def _hash_of(key: str, path: str, stage: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        producer = {"rgba_vae_checkpoint": "rgba-vae", "phi_checkpoint": "phi", "init_lora": "stage1"}[key]
        raise FileNotFoundError(f"BFS {stage}: task.{key}={path} is not a directory; it should be the final/ of a "
                                f"`stage: {producer}` run (train that stage first, or run the whole recipe: "
                                f"`layerloop train train_bfs_recipe`)")
    return recorded_hash(folder, lambda p: sha256_file(p / PARENT_KINDS[key][1]))


def read_parents(checkpoint: str | Path) -> dict[str, dict[str, Any]] | None:
    """The ``parents`` a checkpoint records, or None when it has no ``parents.json`` (older exports)."""
    path = Path(checkpoint) / PARENTS_FILE
    return json.loads(path.read_text())["parents"] if path.is_file() else None


def parent_hashes(stage: str, params: Any) -> dict[str, dict[str, Any]]:
    """``{task key: {"path", "hash"}}`` of the checkpoints a BFS ``stage`` with ``task`` parameters
    ``params`` trains on, after checking that they agree with what each parent records (raises
    ValueError naming both hashes when not)."""
    parents: dict[str, dict[str, Any]] = {}
    for key in STAGE_PARENTS.get(stage, ()):
        value = getattr(params, key, None)
        if value in (None, UNTRAINED):
            if key in ALWAYS:
                parents[key] = {"path": value, "hash": None}
            continue
        parents[key] = {"path": str(Path(value).resolve()), "hash": _hash_of(key, value, stage)}
    for key, entry in parents.items():
        if not entry["hash"]:
            continue
        recorded = read_parents(entry["path"])
        if recorded is None:
            logger.warning("BFS %s: %s records no parents (exported before parents.json); cannot check that it "
                           "was trained on the same checkpoints as this stage", stage, entry["path"])
            continue
        for other, theirs in recorded.items():
            if other not in ALWAYS:  # a LoRA's own starting LoRA (a chain of rounds) is history, not shared
                continue
            ours = parents.get(other)
            if ours is None or ours.get("hash") == theirs.get("hash"):
                continue
            raise ValueError(
                f"BFS {stage}: task.{key} is {_describe(key, entry)}, which was trained on "
                f"{_describe(other, theirs)}, but this stage uses {_describe(other, ours)} (task.{other}). "
                f"They must be the same checkpoint: Phi composites latents of one RGBA VAE. Give the "
                f"{PARENT_KINDS[other][0]} it was trained on, or retrain {PARENT_KINDS[key][0]} on this one "
                f"(`layerloop train train_bfs_recipe` wires the stages together).")
    return parents


def write_parents(path: str | Path, stage: str, parents: dict[str, dict[str, Any]]) -> None:
    """``parents.json`` in an exported checkpoint folder."""
    record = {"format": "layerloop-bfs-parents", "stage": stage, "parents": parents}
    write_atomic(Path(path) / PARENTS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
