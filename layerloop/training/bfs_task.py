"""BFS training task: the four stages of the BFS recipe on the generic loop (`training/loop.py`).

| stage      | data                     | trains               | loss                                                     |
|------------|--------------------------|----------------------|----------------------------------------------------------|
| `phi`      | quadruples               | Phi (compositor)     | `compositor_loss`: L1(Phi(z_F, z_B), z_C)                |
| `rgba-vae` | quadruples' F layers     | the RGBA VAE         | L1 + MSE reconstruction + `kl_weight` * KL               |
| `stage1`   | quadruples               | LoRA sets + g        | FM(C) + FM(F) + 0.1 L_comp, Phi frozen                   |
| `stage2`   | pairs (p=0.8) / quads    | LoRA sets + g        | `stage2_branch(step, seed)`: L_real or L_reg, + 0.5 L_comp |

The order of a full run: `phi` and `rgba-vae` (independent), then `stage1` with
`task.phi_checkpoint=<phi run>/final` (and `task.rgba_vae_checkpoint=<vae run>/final`), then `stage2`
with the same plus `task.init_lora=<stage1 run>/final`.

Latents: C and B through the RGB VAE, F through the RGBA VAE, posterior mode (the same image always
gives the same latent; only the loop's generator adds randomness). Images are cropped to a square that
contains the box (so the object is never cut away), then resized to `resolution`.

Text: the caption, through the Fill repository's CLIP + T5 for real models, or `ByteTextEncoder`
(seeded random byte embeddings, from `models/text_encoders.py`) for tiny ones, which cannot understand a
caption but gives each one a distinct, fixed embedding.

What a stage saves (`save_weights`), and what `models/bfs_pipeline.BFSPipeline` (the `generate-bfs` stage)
and the loaders of `models/bfs_components.py` read:
- `phi`: `compositor.safetensors` + `compositor.json`;
- `rgba-vae`: `rgba_vae.safetensors` + `rgba_vae.json`;
- `stage1` / `stage2`: `save_lora` (`bfs_lora.safetensors` + `bfs_lora.json`) + `bfs_task.json`
  (text encoder, resolution, guidance, and the Phi / RGBA VAE checkpoints the LoRA was trained with).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from PIL import Image
from safetensors.torch import load_file, save_file

from layerloop import storage
from layerloop.files import sha256_file
from layerloop.models import bfs
from layerloop.models.bfs_components import (  # noqa: F401  (re-exported: the stage-file names and loaders)
    COMPOSITOR_CONFIG, COMPOSITOR_WEIGHTS, RGBA_VAE_CONFIG, RGBA_VAE_WEIGHTS, TASK_FILE, load_compositor,
    load_rgb_vae, load_rgba_vae, make_text_encoder, text_encoder_kind,
)
from layerloop.models.bfs_modules import LatentCompositor
from layerloop.models.refs import is_tiny, tiny_seed, torch_dtype
from layerloop.samples import LayeredSample
from layerloop.training.bfs_lineage import parent_hashes, write_parents
from layerloop.training.config import TrainConfig
from layerloop.training.loop import register_task

logger = logging.getLogger(__name__)

STAGES = ("phi", "rgba-vae", "stage1", "stage2")
UNTRAINED = "untrained"  # phi_checkpoint value: keep Phi at its init (the even blend); smoke tests only


class BFSParams(BaseModel):
    """The ``task:`` section of a BFS training config."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(512, ge=8)  # square training size in pixels
    rank: int | None = Field(None, ge=1)  # LoRA rank; None: 16 (real) / 4 (tiny)
    alpha: float | None = None  # LoRA alpha; None: = rank
    mlp_hidden: int | None = Field(None, ge=1)  # hidden width of g; None: 128 (real) / 16 (tiny)
    phi_hidden: int | None = Field(None, ge=1)  # Phi's conv width; None: 64 (real) / 16 (tiny)
    phi_checkpoint: str | None = None  # stage1/stage2: <phi run>/final, or "untrained"
    rgba_vae_checkpoint: str | None = None  # <rgba-vae run>/final; None: the RGBA VAE as initialised from RGB
    init_lora: str | None = None  # stage2: start from the stage-1 LoRA (<stage1 run>/final)
    text_encoder: Literal["auto", "byte", "flux"] = "auto"  # auto: byte for tiny models, flux otherwise
    text_tokens: int | None = Field(None, ge=1)  # None: 32 (byte) / 512 (T5, as FLUX.1-Fill-dev)
    guidance: float = 30.0  # the distilled guidance scale the backbone is run with (FluxFillPipeline's default)
    comp_weight: float | None = Field(None, ge=0)  # None: 0.1 in stage 1, 0.5 in stage 2 (the paper's)
    p_real: float = Field(0.8, ge=0, le=1)  # stage 2: probability of the L_real branch
    # stage1/stage2 noise and timesteps (`sample_timesteps`, `bfs.branch_noise`). The defaults are the BFS
    # paper's (Eq. 6): one noise draw per sample interpolated with both z_C and z_F, and t ~ U(0, 1). Before #15:
    # noise=independent (one draw per branch), timesteps=logit-normal (sigmoid of N(timestep_mean, timestep_std^2),
    # as SD3 / FLUX training). The training fingerprint records the resolved choices (TrainConfig).
    noise: Literal["shared", "independent"] = "shared"
    timesteps: Literal["uniform", "logit-normal"] = "uniform"
    timestep_mean: float = 0.0  # logit-normal only
    timestep_std: float = Field(1.0, gt=0)  # logit-normal only
    gradient_checkpointing: bool = False
    vae_l1_weight: float = Field(1.0, ge=0)
    vae_mse_weight: float = Field(1.0, ge=0)
    vae_kl_weight: float = Field(1e-6, ge=0)

    @model_validator(mode="after")
    def _logit_normal_settings(self) -> BFSParams:
        given = sorted({"timestep_mean", "timestep_std"} & self.model_fields_set)
        if given and self.timesteps != "logit-normal":
            raise ValueError(f"{', '.join(given)} only apply to timesteps=logit-normal (timesteps is {self.timesteps})")
        return self


def sample_timesteps(params: BFSParams, n: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps in (0, 1), float32, from ``generator``: U(0, 1) (``timesteps=uniform``, the paper's) or
    sigmoid(N(timestep_mean, timestep_std^2)) (``logit-normal``)."""
    if params.timesteps == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator) * params.timestep_std + params.timestep_mean)


# --------------------------------------------------------------------------- pixels
def square_crop(sample: LayeredSample) -> tuple[int, int, int]:
    """(top, left, side) of the largest square that is centred on the box as far as the image allows."""
    height, width = sample.size
    side = min(height, width)
    rows, cols = (np.nonzero(sample.mask > 0) if sample.mask is not None else ((), ()))
    cy = (int(rows.min()) + int(rows.max()) + 1) / 2 if len(rows) else height / 2
    cx = (int(cols.min()) + int(cols.max()) + 1) / 2 if len(cols) else width / 2
    top = int(np.clip(round(cy - side / 2), 0, height - side))
    left = int(np.clip(round(cx - side / 2), 0, width - side))
    return top, left, side


def _resize(array: np.ndarray, mode: str, size: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode=mode).resize((size, size), resample))


def batch_pixels(samples: list[LayeredSample], resolution: int) -> dict[str, Any]:
    """Tensors in [-1, 1]: composite / background (B, 3, R, R), foreground (B, 4, R, R); mask (B, 1, R, R)
    in {0, 1}; captions. Pillow resizes RGBA with premultiplied alpha, so no colour bleeds in from
    transparent pixels."""
    out: dict[str, list] = {"composite": [], "background": [], "foreground": [], "mask": []}
    for sample in samples:
        missing = [f for f in ("composite", "background", "foreground", "mask") if getattr(sample, f) is None]
        if missing:
            raise ValueError(f"{sample.key} ({sample.kind}) lacks {missing}; BFS training needs full samples")
        top, left, side = square_crop(sample)
        crop = lambda a: a[top:top + side, left:left + side]  # noqa: E731
        out["composite"].append(_resize(crop(sample.composite), "RGB", resolution))
        out["background"].append(_resize(crop(sample.background), "RGB", resolution))
        out["foreground"].append(_resize(crop(sample.foreground), "RGBA", resolution))
        out["mask"].append(_resize(crop(sample.mask), "L", resolution, Image.NEAREST)[..., None])

    def tensor(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    batch = {name: tensor(arrays) for name, arrays in out.items()}
    batch["mask"] = (batch["mask"] > 0).float()
    batch["captions"] = [s.caption for s in samples]
    return batch


# --------------------------------------------------------------------------- loading helpers
def resolved_text(params: BFSParams, model: str) -> tuple[str, int]:
    return text_encoder_kind(params.text_encoder, model, params.text_tokens)


# --------------------------------------------------------------------------- the task
@register_task("bfs")
class BFSTask:
    Params = BFSParams

    def __init__(self, cfg: TrainConfig):
        if cfg.stage not in STAGES:
            raise ValueError(f"BFS stage must be one of {STAGES}, got {cfg.stage!r}")
        self.cfg = cfg
        self.stage = cfg.stage
        self.params = BFSParams(**cfg.task)
        tiny = is_tiny(cfg.model)
        if self.stage in ("stage1", "stage2") and self.params.phi_checkpoint is None:
            raise ValueError(f"BFS {self.stage} needs task.phi_checkpoint: the final/ directory of a `stage: phi` run "
                             f"(or '{UNTRAINED}' to keep Phi at its init, for smoke tests only)")
        # The checkpoints this stage trains on, checked against each other before anything loads (a Phi
        # trained on another RGBA VAE is refused); written to parents.json with the weights.
        self.parents = parent_hashes(self.stage, self.params)
        self.scale_step = 4 if tiny else 16  # VAE scale x 2x2 token packing
        if self.params.resolution % self.scale_step:
            raise ValueError(f"task.resolution {self.params.resolution} must be a multiple of {self.scale_step}")
        self.dtype = torch_dtype(cfg.dtype)
        self.comp_weight = self.params.comp_weight
        if self.comp_weight is None:
            self.comp_weight = 0.5 if self.stage == "stage2" else 0.1
        self.device = torch.device("cpu")
        self.generator: bfs.BFSGenerator | None = None
        self.vae = self.rgba_vae = self.compositor = self.text_encoder = None

    # ------------------------------------------------------------------ data
    def streams(self) -> dict[str, tuple[str, ...] | None]:
        if self.stage == "stage2":
            return {"pair": ("pair",), "quadruple": ("quadruple",)}
        return {"quadruple": ("quadruple",)}

    def branch(self, step: int) -> str:
        return bfs.stage2_branch(step, self.cfg.seed, self.params.p_real)

    def stream_for_step(self, step: int) -> str:
        if self.stage == "stage2":
            return "pair" if self.branch(step) == "real" else "quadruple"
        return "quadruple"

    # ------------------------------------------------------------------ models
    def setup(self, device: torch.device) -> None:
        if self.vae is not None:
            return
        self.device = device = torch.device(device)
        p, model, tiny = self.params, self.cfg.model, is_tiny(self.cfg.model)
        if self.stage in ("phi", "rgba-vae"):
            # Neither needs the transformer: at FLUX size loading it would cost 24 GB for nothing.
            self.vae = load_rgb_vae(model, self.cfg.revision, self.dtype, device)
        else:
            config = bfs.BFSConfig(
                rank=p.rank or (4 if tiny else 16),
                alpha=p.alpha if p.alpha is not None else float(p.rank or (4 if tiny else 16)),
                mlp_hidden=p.mlp_hidden or (16 if tiny else 128),
                base_model_id=f"tiny:{tiny_seed(model)}" if tiny else model,
                base_revision=None if tiny else self.cfg.revision,
            )
            if tiny:
                models = bfs.tiny(tiny_seed(model), config)
                models.generator.to(device)
                self.vae = models.vae.to(device)
            else:
                models = bfs.from_pretrained(model, self.cfg.revision, dtype=self.dtype, device=device, config=config)
                self.vae = models.vae
            self.vae.eval().requires_grad_(False)
            self.generator = models.generator
            if p.gradient_checkpointing:
                self.generator.transformer.enable_gradient_checkpointing()
            if p.init_lora:
                self.generator.load_lora(p.init_lora)
            kind, tokens = resolved_text(p, model)
            self.text_encoder = make_text_encoder(kind, model, self.cfg.revision, tokens, self.dtype, device,
                                                  self.generator.transformer.config).requires_grad_(False)

        if self.stage == "rgba-vae":
            # Trained in fp32 whatever the backbone dtype: small updates vanish in bf16.
            self.rgba_vae = bfs.make_rgba_vae(self.vae).float().train().requires_grad_(True)
        elif self.stage != "phi":
            if p.rgba_vae_checkpoint:
                self.rgba_vae = load_rgba_vae(p.rgba_vae_checkpoint, self.vae)
            else:
                self.rgba_vae = bfs.make_rgba_vae(self.vae)
            self.rgba_vae.eval().requires_grad_(False)
        else:
            self.rgba_vae = (load_rgba_vae(p.rgba_vae_checkpoint, self.vae) if p.rgba_vae_checkpoint
                             else bfs.make_rgba_vae(self.vae)).eval().requires_grad_(False)

        channels = self.vae.config.latent_channels
        if self.stage == "phi":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                self.compositor = LatentCompositor(channels, p.phi_hidden or (16 if tiny else 64)).to(device)
            self.compositor.train().requires_grad_(True)
        elif self.stage in ("stage1", "stage2"):
            if p.phi_checkpoint == UNTRAINED:
                logger.warning("BFS %s with an untrained Phi: L_comp only pulls towards the even blend", self.stage)
                self.compositor = LatentCompositor(channels, p.phi_hidden or (16 if tiny else 64)).to(device)
            else:
                self.compositor = load_compositor(p.phi_checkpoint, device)
            self.compositor.eval().requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.stage == "phi":
            return list(self.compositor.parameters())
        if self.stage == "rgba-vae":
            return list(self.rgba_vae.parameters())
        return self.generator.trainable_parameters()

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every other module the task holds: none of their parameters may change (for tests)."""
        modules = {"vae": self.vae, "rgba_vae": self.rgba_vae, "compositor": self.compositor,
                   "text_encoder": self.text_encoder}
        if self.generator is not None:
            modules["transformer_backbone"] = self.generator.transformer
        return {k: v for k, v in modules.items() if v is not None}

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def encode(self, pixels: dict[str, Any], with_foreground: bool = True) -> dict[str, torch.Tensor]:
        d = self.device
        z = {"c": bfs.encode_latents(self.vae, pixels["composite"].to(d)).float(),
             "b": bfs.encode_latents(self.vae, pixels["background"].to(d)).float()}
        if with_foreground:
            z["f"] = bfs.encode_latents(self.rgba_vae, pixels["foreground"].to(d)).float()
        return z

    def loss(self, batch: list[LayeredSample], step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        pixels = batch_pixels(batch, self.params.resolution)
        if self.stage == "phi":
            z = self.encode(pixels)
            loss = bfs.compositor_loss(self.compositor, z["f"], z["b"], z["c"])
            return loss, {}
        if self.stage == "rgba-vae":
            return self._vae_loss(pixels["foreground"].to(self.device), generator)
        return self._generator_loss(batch, pixels, step, generator)

    def _vae_loss(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        posterior = self.rgba_vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        z = posterior.mean + posterior.std * noise  # reparameterised sample, noise from the loop's generator
        reconstruction = self.rgba_vae.decode(z).sample
        l1 = F.l1_loss(reconstruction, x)
        mse = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / z[0].numel()  # per latent element, so the weight does not scale with size
        p = self.params
        loss = p.vae_l1_weight * l1 + p.vae_mse_weight * mse + p.vae_kl_weight * kl
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}

    def _generator_loss(self, batch: list[LayeredSample], pixels: dict[str, Any], step: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        z = self.encode(pixels)
        b, _, h, w = z["c"].shape
        d = self.device
        t = sample_timesteps(self.params, b, generator).to(d)
        # z1 is the noise here (Flux convention, `bfs_losses`); shared: one tensor for both branches.
        z1_c, z1_f = (x.to(d) for x in bfs.branch_noise(z["c"].shape, generator, self.params.noise))
        text = self.text_encoder(pixels["captions"])
        embeds, pooled = text.embeds.to(d), text.pooled.to(d)
        cond = bfs.fill_condition(z["b"], pixels["mask"].to(d))
        v_c, v_f = self.generator(
            bfs.pack_latents(bfs.noisy_latents(z["c"], z1_c, t)), bfs.pack_latents(bfs.noisy_latents(z["f"], z1_f, t)),
            cond, t, embeds, pooled, self.params.guidance,
            bfs.latent_image_ids(h, w, device=d), bfs.text_ids(embeds.shape[1], device=d),
        )
        kwargs = dict(v_c=bfs.unpack_latents(v_c.float(), h, w), v_f=bfs.unpack_latents(v_f.float(), h, w),
                      z0_c=z["c"], z0_f=z["f"], z1_c=z1_c, z1_f=z1_f, z_b=z["b"], t=t, comp_weight=self.comp_weight)
        if self.stage == "stage1":
            terms = bfs.stage1_loss(self.compositor, **kwargs)
            logs: dict[str, Any] = {}
        else:
            branch = self.branch(step)
            terms = bfs.stage2_loss(branch, self.compositor, **kwargs)
            # The kinds actually trained on, so metrics.jsonl shows each branch got its own data.
            logs = {"branch": branch, "kind": ",".join(sorted({s.kind for s in batch}))}
        logs.update({k: v.detach() for k, v in terms.items() if k != "loss"})
        return terms["loss"], logs

    # ------------------------------------------------------------------ weights
    def save_weights(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_parents(path, self.stage, self.parents)
        if self.stage == "phi":
            layers = sum(isinstance(m, nn.Conv2d) for m in self.compositor.net)
            meta = {"format": "layerloop-bfs-compositor", "latent_channels": self.compositor.latent_channels,
                    "hidden_channels": self.compositor.net[0].out_channels, "num_layers": layers,
                    "model": self.cfg.model}
            save_file({k: v.contiguous().cpu() for k, v in self.compositor.state_dict().items()},
                      str(path / COMPOSITOR_WEIGHTS))
            (path / COMPOSITOR_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        elif self.stage == "rgba-vae":
            save_file({k: v.contiguous().cpu() for k, v in self.rgba_vae.state_dict().items()},
                      str(path / RGBA_VAE_WEIGHTS))
            meta = {"format": "layerloop-bfs-rgba-vae", "model": self.cfg.model, "revision": self.cfg.revision}
            (path / RGBA_VAE_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        else:
            self.generator.save_lora(path)
            kind, tokens = resolved_text(self.params, self.cfg.model)

            def absolute(value: str | None) -> str | None:
                if value in (None, UNTRAINED) or storage.is_remote(value):
                    return value
                return storage.canonical(str(Path(value).resolve()))  # a staged folder's: its URL

            info = {"format": "layerloop-bfs-train", "stage": self.stage, "model": self.cfg.model,
                    "revision": self.cfg.revision, "text_encoder": kind, "text_tokens": tokens,
                    "resolution": self.params.resolution, "guidance": self.params.guidance,
                    "phi_checkpoint": absolute(self.params.phi_checkpoint),
                    "rgba_vae_checkpoint": absolute(self.params.rgba_vae_checkpoint)}
            (path / TASK_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    def load_weights(self, path: Path) -> None:
        path = Path(path)
        if self.stage == "phi":
            self.compositor.load_state_dict(load_file(str(path / COMPOSITOR_WEIGHTS), device=str(self.device)))
        elif self.stage == "rgba-vae":
            self.rgba_vae.load_state_dict(load_file(str(path / RGBA_VAE_WEIGHTS), device=str(self.device)))
        else:
            self.generator.load_lora(path)

    def weights_hash(self, path: Path) -> str:
        if self.stage == "phi":
            return sha256_file(Path(path) / COMPOSITOR_WEIGHTS)
        if self.stage == "rgba-vae":
            return sha256_file(Path(path) / RGBA_VAE_WEIGHTS)
        return bfs.lora_checkpoint_hash(path)
