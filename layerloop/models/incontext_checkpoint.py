"""LoRA configuration and checkpoint IO of the in-context decompose/compose LoRA.

A checkpoint folder (a training run's ``final/`` or ``checkpoints/step-N/weights``) holds
``lora.safetensors`` (the peft adapter weights), ``lora.json`` (``InContextConfig`` and the resolved target
module names) and, when written by the training task, ``incontext_task.json`` (the base model as configured,
resolution, text tokens, ...). Files are written under temporary names and renamed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from layerloop.files import atomic_path, sha256_file, write_json_atomic
from layerloop.models.incontext_base import check_choice
from layerloop.models.incontext_canvas import MATTE

FILL_MODEL_ID = "black-forest-labs/FLUX.1-Fill-dev"
# LoRA targets, as module-name suffixes inside the transformer blocks (names from diffusers 0.42
# transformer_flux.py): every attention projection of the double-stream blocks (image and text stream),
# their feed-forwards, and the attention, MLP and output projections of the single-stream blocks. The
# top-level x_embedder / proj_out stay untouched: they fix the Fill token layout, which the LoRA must keep.
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)
LORA_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora.json"
LORA_FORMAT = 1
TASK_FILE = "incontext_task.json"  # written next to the LoRA by the training task
DECOMPOSE_LOSSES = ("mse", "log_mse")


@dataclass
class InContextConfig:
    rank: int = 32
    alpha: float = 32.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    cycle_weight: float = 1.0  # 0 switches the cycle term off (and skips its forward passes)
    guidance_scale: float = 30.0  # FLUX.1-Fill-dev is guidance-distilled; 30 is its pipeline default
    timestep_mean: float = 0.0  # logit-normal timestep sampling (SD3 / FLUX training practice)
    timestep_std: float = 1.0
    matte: int = MATTE
    # None: both tasks generate their whole panels (the Cycle paper). An int m >= 0: they generate only the
    # layer's region dilated by m pixels and rounded out to whole tokens, and are given the rest (the
    # composite there for the clean object, an empty layer, the object for the composite), as a Fill
    # inpainting mask does; inference pastes the given pixels back (``incontext.InContextLoRA.fill_tokens``)
    region_margin: int | None = None
    # "mse" (flow matching's, as FLUX) or "log_mse": the decompose term as the mean over samples and outputs of
    # log(MSE) (``InContextLosses.log_mse``), the scale of a mean PSNR
    decompose_loss: str = "mse"
    base_model: str = FILL_MODEL_ID
    base_revision: str | None = None

    def __post_init__(self) -> None:
        check_choice("decompose_loss", self.decompose_loss, DECOMPOSE_LOSSES)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        if self.region_margin is None:  # whole-panel LoRAs keep the lora.json of before the option
            del data["region_margin"]
        if self.decompose_loss == "mse":  # likewise
            del data["decompose_loss"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InContextConfig:
        data = dict(data)
        data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """The in-context checkpoint id: the first 16 hex digits of the sha256 of a LoRA file, or of
    ``lora.safetensors`` inside a checkpoint folder (candidate metadata of earlier runs records this
    short form, so it stays; BFS records the full digest of its weights file)."""
    path = Path(path)
    return sha256_file(path / LORA_FILE if path.is_dir() else path)[:16]


def read_task_info(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``incontext_task.json`` of a checkpoint folder, or {} when there is none."""
    path = Path(checkpoint) / TASK_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_lora_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``lora.json`` of a checkpoint; FileNotFoundError naming the folder when it is not one."""
    checkpoint = Path(checkpoint)
    config_file = checkpoint / LORA_CONFIG_FILE
    if not config_file.is_file() or not (checkpoint / LORA_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not an in-context LoRA checkpoint (no {LORA_FILE} + "
                                f"{LORA_CONFIG_FILE}); pass the final/ directory of an `incontext` training run")
    return json.loads(config_file.read_text())


def save_lora(model: nn.Module, folder: str | os.PathLike) -> Path:
    """``lora.safetensors`` (the adapter weights of ``model.transformer``) + ``lora.json`` (config, resolved
    targets) in ``folder``; returns the weights file."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model.transformer).items()}
    meta = {"format": LORA_FORMAT, "config": model.config.to_json(), "targets": model.lora_targets}
    weights, config = folder / LORA_FILE, folder / LORA_CONFIG_FILE
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": str(LORA_FORMAT)})
    write_json_atomic(config, meta, newline=False)
    return weights


def load_lora(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a ``save_lora`` checkpoint into ``model``'s adapter; refuses a different LoRA shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / LORA_CONFIG_FILE).read_text())
    saved = InContextConfig.from_json(meta["config"])
    mine = model.config
    if (saved.rank, saved.alpha, meta["targets"]) != (mine.rank, mine.alpha, model.lora_targets):
        raise ValueError(f"{folder}: LoRA rank/alpha/targets ({saved.rank}/{saved.alpha}, {len(meta['targets'])} "
                         f"modules) differ from this model's ({mine.rank}/{mine.alpha}, "
                         f"{len(model.lora_targets)} modules)")
    state = load_file(str(folder / LORA_FILE), device=str(model.device))
    result = set_peft_model_state_dict(model.transformer, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"{folder}: LoRA weights do not fit: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")
