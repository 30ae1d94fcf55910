"""In-context decompose/compose training task (issue 5) on the generic loop (`training/loop.py`).

| family      | data                               | trains        | loss                                                  |
|-------------|------------------------------------|---------------|-------------------------------------------------------|
| `incontext` | `rendered` logo samples, and the   | the one LoRA  | FM(decompose) + FM(compose)                           |
|             | foundation's F/B quadruples        |               | + `cycle_weight` * (cycle d->c + cycle c->d)           |

The model is `models/incontext.py`'s `InContextLoRA`: FLUX.1-Fill-dev (or `tiny` / `tiny:SEED`, a random
tiny instance for tests and the demo; `tiny:s2d[-SEED]`, the same with the exact space-to-depth VAE; or a
tiny base folder pretrained by the `incontext-base` task, `training/incontext_base_task.py`) with one peft
LoRA; the VAE, the text encoder and the transformer's
own weights stay frozen. `task.cycle_weight: 0` drops the cycle term (and its forward passes).

Every data source of the config feeds the one stream `quadruple` (weighted by the sources' `weight`) with
the samples of the kinds in `task.kinds`, by default `rendered` and `quadruple`: the logo samples
(`datasets/logos.py`, kind `rendered`: C is a non-linear rendering of the layer over the object, which the
compose direction must learn and the decompose direction must undo) teach layer/object decomposition, the
foundation's quadruples foreground/background decomposition. `task.kinds` may add `candidate`s; `pair`s
have no ground-truth layers and are refused.

Pixels: each sample is cropped to the largest square around its region mask (`bfs_task.square_crop`) and
resized to `task.resolution` (a multiple of 2 x the VAE scale: 4 tiny, 16 real; a local folder's scale is
read from its `vae/config.json`). A quadruple's composite
is recomputed from the resized F and B, so C = a F + (1 - a) B holds exactly at training size; every other
kind's composite (a `rendered` one above all: it is not an alpha blend of its layers) is cropped and
resized like its layers.

What `save_weights` writes, and what `stages/decompose.py` loads with
`models/incontext_pipeline.InContextPipeline.from_checkpoint`: the LoRA (`lora.safetensors` + `lora.json`,
which names the base model and the LoRA shape) and `incontext_task.json` (resolution, text tokens, the base
model and revision; for a tiny base folder its absolute path and `base_hash`, which loading checks).
`build_model` / `load_model` live in `models/incontext_pipeline.py` (re-exported here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from layerloop import storage
from layerloop.models import incontext as ic
from layerloop.models.incontext_checkpoint import TASK_FILE, read_task_info  # noqa: F401  (re-exported)
from layerloop.models.incontext_pipeline import build_model, load_model  # noqa: F401  (re-exported)
from layerloop.models.incontext_base import base_hash, base_vae_scale, is_base_folder, is_small_base
from layerloop.models.refs import torch_dtype
from layerloop.samples import INVARIANT_KINDS, KINDS, LayeredSample, composite
from layerloop.training.bfs_task import square_crop
from layerloop.training.config import TrainConfig
from layerloop.training.loop import register_task

TASK_FORMAT = "layerloop-incontext-train"
STREAM = "quadruple"


class InContextParams(BaseModel):
    """The ``task:`` section of an in-context training config."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(512, ge=4)  # square panel size in pixels (the canvas is 4 panels wide)
    rank: int | None = Field(None, ge=1)  # LoRA rank; None: 32 (real, the default) / 4 (tiny)
    alpha: float | None = Field(None, gt=0)  # LoRA alpha; None: = rank
    cycle_weight: float = Field(1.0, ge=0)  # 0 switches the cycle term off
    # None: generate whole panels (the paper). m >= 0: generate only the region dilated by m pixels, be given
    # the rest (InContextConfig.region_margin; docs/fidelity.md says why the CPU experiment uses it)
    region_margin: int | None = Field(None, ge=0)
    guidance: float = 30.0  # distilled guidance of FLUX.1-Fill-dev (its pipeline default)
    timestep_mean: float = 0.0  # logit-normal t, as SD3 / FLUX training
    timestep_std: float = Field(1.0, gt=0)
    # mse: flow matching's MSE (FLUX's); log_mse: per sample and output log-MSE (InContextConfig.decompose_loss)
    decompose_loss: Literal["mse", "log_mse"] = "mse"
    text_tokens: int | None = Field(None, ge=1)  # T5 sequence length; None: 512 (FLUX.1-Fill-dev). Tiny: 64
    init_lora: str | None = None  # start from a saved LoRA (a previous run's final/)
    kinds: list[str] = Field(default_factory=lambda: ["rendered", "quadruple"])  # sample kinds trained on
    gradient_checkpointing: bool = False

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(KINDS))
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {kinds}")
        if "pair" in kinds:
            raise ValueError("pairs have no ground-truth layer and object; the in-context task cannot train on them")
        return kinds


# --------------------------------------------------------------------------- pixels
def _resize(array: np.ndarray, mode: str, size: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode=mode).resize((size, size), resample))


def prepare_sample(sample: LayeredSample, resolution: int) -> LayeredSample:
    """The sample as a ``resolution`` square around its region: what one canvas of the batch holds.
    Pillow resizes RGBA with premultiplied alpha, so no colour bleeds in from transparent pixels."""
    missing = [f for f in ("composite", "background", "foreground", "mask") if getattr(sample, f) is None]
    if missing:
        raise ValueError(f"{sample.key} ({sample.kind}) lacks {missing}; in-context training needs F, B, M and C")
    if sample.size == (resolution, resolution):
        return sample
    top, left, side = square_crop(sample)
    crop = lambda a: a[top:top + side, left:left + side]  # noqa: E731
    foreground = _resize(crop(sample.foreground), "RGBA", resolution)
    background = _resize(crop(sample.background), "RGB", resolution)
    mask = np.where(_resize(crop(sample.mask), "L", resolution, Image.NEAREST) > 0, 255, 0).astype(np.uint8)
    if sample.kind in INVARIANT_KINDS:
        image = composite(foreground, background)  # keep the invariant exact at training size
    else:  # rendered (and candidates): C is no alpha blend of F and B, so it is resized, never recomputed
        image = _resize(crop(sample.composite), "RGB", resolution)
    return LayeredSample(key=sample.key, kind=sample.kind, composite=image, background=background,
                         foreground=foreground, mask=mask, caption=sample.caption)


# --------------------------------------------------------------------------- the task
@register_task("incontext")
class InContextTask:
    Params = InContextParams

    def __init__(self, cfg: TrainConfig):
        if cfg.family != "incontext":
            raise ValueError(f"InContextTask needs family 'incontext', got {cfg.family!r}")
        self.cfg = cfg
        self.params = InContextParams(**cfg.task)
        tiny = is_small_base(cfg.model)  # a tiny id (tiny, tiny:s2d, ...) or a tiny pretrained base folder
        step = 2 * base_vae_scale(cfg.model)  # 2 x 2 token packing x VAE scale (2 tiny, 8 FLUX)
        if self.params.resolution % step:
            raise ValueError(f"task.resolution {self.params.resolution} must be a multiple of {step} "
                             f"(VAE scale x 2x2 token packing)")
        self.dtype = torch_dtype(cfg.dtype)
        rank = self.params.rank or (4 if tiny else 32)
        self.lora_config: dict[str, Any] = {
            "rank": rank, "alpha": self.params.alpha if self.params.alpha is not None else float(rank),
            "cycle_weight": self.params.cycle_weight, "guidance_scale": self.params.guidance,
            "timestep_mean": self.params.timestep_mean, "timestep_std": self.params.timestep_std,
        }
        if self.params.region_margin is not None:  # absent otherwise: lora.json stays as it was
            self.lora_config["region_margin"] = self.params.region_margin
        if self.params.decompose_loss != "mse":  # likewise
            self.lora_config["decompose_loss"] = self.params.decompose_loss

        self.device = torch.device("cpu")
        self.model: ic.InContextLoRA | None = None

    # ------------------------------------------------------------------ data
    def streams(self) -> dict[str, tuple[str, ...] | None]:
        return {STREAM: tuple(self.params.kinds)}

    def stream_for_step(self, step: int) -> str:
        return STREAM

    # ------------------------------------------------------------------ models
    def setup(self, device: torch.device) -> None:
        if self.model is not None:
            return
        self.device = torch.device(device)
        self.model = build_model(self.cfg.model, self.cfg.revision, self.dtype, self.device, self.lora_config,
                                 self.params.text_tokens, lora_seed=self.cfg.seed)
        if self.params.gradient_checkpointing:
            self.model.transformer.enable_gradient_checkpointing()
        if self.params.init_lora:
            self.model.load_lora(self.params.init_lora)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.lora_parameters()

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every module whose non-LoRA parameters must not change (for tests)."""
        return {"transformer": self.model.transformer, "vae": self.model.vae, "text_encoder": self.model.text_encoder}

    # ------------------------------------------------------------------ loss
    def canvas_batch(self, batch: list[LayeredSample]) -> ic.CanvasBatch:
        return ic.CanvasBatch.from_samples([prepare_sample(s, self.params.resolution) for s in batch])

    def loss(self, batch: list[LayeredSample], step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        latents = self.model.encode(self.canvas_batch(batch))
        terms = self.model.training_loss(latents, generator)
        logs: dict[str, Any] = {k: v.detach() for k, v in terms.items() if k != "loss"}
        logs["kind"] = ",".join(sorted({s.kind for s in batch}))
        return terms["loss"], logs

    # ------------------------------------------------------------------ weights
    def save_weights(self, path: Path) -> None:
        path = Path(path)
        self.model.save_lora(path)
        init = self.params.init_lora
        model = self.cfg.model
        if is_base_folder(model):  # a tiny pretrained base: found from any directory, and pinned by its hash
            model = str(Path(model).expanduser().resolve())
        info = {"format": TASK_FORMAT, "model": storage.canonical(model), "revision": self.cfg.revision,
                "resolution": self.params.resolution, "text_tokens": self.params.text_tokens,
                "cycle_weight": self.params.cycle_weight, "guidance": self.params.guidance,
                "init_lora": storage.canonical(str(Path(init).resolve())) if init else None}
        if is_base_folder(model):
            info["base_hash"] = base_hash(model)
        (path / TASK_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    def load_weights(self, path: Path) -> None:
        self.model.load_lora(path)

    def weights_hash(self, path: Path) -> str:
        return ic.checkpoint_hash(path)
