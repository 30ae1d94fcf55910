"""The ``generate-bfs`` stage: background + box + caption -> generated foreground layer and composite.

Reads ``work["gt_background"]`` (from ``load``; else ``background``), ``mask`` (the box, from
``box-mask``) and ``caption``; writes ``composite`` (generated C), ``foreground`` (generated F, RGBA),
``background`` (the input B), ``kind = "candidate"`` and ``meta["generator"]`` = {family, checkpoint,
checkpoint_hash, steps, seed, guidance, recomposition_error}. A typical pipeline::

    source: {type: webdataset, urls: ...}   -> load -> box-mask -> generate-bfs

``checkpoint`` is the ``final/`` directory (or a ``checkpoints/step-N/weights``) of a BFS ``stage1`` /
``stage2`` training run: the LoRA + g, plus ``bfs_task.json`` naming the text encoder and the Phi / RGBA
VAE checkpoints it was trained with. ``setup`` loads everything once per actor, on CUDA when the stage
declares GPUs and CUDA exists, else on CPU.

Each sample's noise comes from its own seed (``self.rng(sample)``: run seed, key, stage name), so a
sample's output does not depend on its batch mates; samples of one size are generated as one batch.
``recomposition_error`` is the mean |C - (a F + (1 - a) B)| in 1/255 steps: how far the generated
composite is from what the generated layer over the given background gives, a first filter signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from layerloop.samples import LayeredSample, composite as composite_layers
from layerloop.stages.base import Resources, Stage, StageParams
from layerloop.stages.registry import register_stage


class GenerateParams(StageParams):
    checkpoint: str  # final/ of a BFS stage1/stage2 training run
    steps: int = Field(28, ge=1)  # Euler steps (FluxFillPipeline's default is 50; 28 as FLUX dev)
    guidance: float | None = None  # None: the guidance the LoRA was trained with (bfs_task.json)
    rgba_vae: str | None = None  # final/ of an rgba-vae run; None: the one named in bfs_task.json
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return np.clip(np.rint((images.float().cpu().permute(0, 2, 3, 1).numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)


@register_stage
class GenerateBFS(Stage):
    name = "generate-bfs"
    Params = GenerateParams
    resources = Resources(cpus=1, gpus=0)
    batch_size = 4

    def models(self) -> list:
        from layerloop.models.bfs import read_lora_config
        from layerloop.models.refs import ModelRef

        try:
            saved = read_lora_config(self.params.checkpoint)
        except (FileNotFoundError, ValueError):
            return []  # setup() reports the missing checkpoint with its path
        ref = ModelRef(stage=self.name, model=saved["base_model_id"], revision=saved.get("base_revision"),
                       allow_patterns=("model_index.json", "transformer/*", "vae/*", "text_encoder*/*", "tokenizer*/*"))
        return [] if ref.model.startswith("tiny:") else [ref]

    def setup(self) -> None:
        from layerloop.models import bfs
        from layerloop.training import bfs_task

        checkpoint = Path(self.params.checkpoint)
        saved = bfs.read_lora_config(checkpoint)
        task_file = checkpoint / bfs_task.TASK_FILE
        info = json.loads(task_file.read_text()) if task_file.is_file() else {}
        device = torch.device(self.device)
        if self.params.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.params.dtype]
        base, revision = saved["base_model_id"], saved.get("base_revision")
        self._generator = bfs.load_generator(checkpoint, dtype=dtype, device=device).eval()
        self._vae = bfs_task.load_rgb_vae(base, revision, dtype, device)
        rgba_path = self.params.rgba_vae or info.get("rgba_vae_checkpoint")
        rgba = bfs_task.load_rgba_vae(rgba_path, self._vae) if rgba_path else bfs.make_rgba_vae(self._vae)
        self._rgba_vae = rgba.eval().requires_grad_(False)
        kind = info.get("text_encoder") or ("byte" if base.startswith("tiny:") else "flux")
        tokens = info.get("text_tokens") or (32 if kind == "byte" else 512)
        self._text = bfs_task.make_text_encoder(kind, base, revision, tokens, dtype, device,
                                                self._generator.transformer.config)
        self._guidance = self.params.guidance if self.params.guidance is not None else info.get("guidance", 30.0)
        hash_file = checkpoint / "checkpoint_hash.txt"
        self._hash = hash_file.read_text().strip() if hash_file.is_file() else bfs.lora_checkpoint_hash(checkpoint)
        self._scale = bfs.vae_scale_factor(self._vae)
        self._device, self._dtype = device, dtype

    def describe(self) -> dict:
        return self.params.model_dump(exclude={"batch_size", "cpus", "gpus", "concurrency", "dtype"}, mode="json")

    # ------------------------------------------------------------------ batches
    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        groups: dict[tuple[int, int], list[tuple[LayeredSample, np.ndarray]]] = {}
        for sample in samples:
            background = sample.work.get("gt_background")
            if background is None:
                background = sample.background
            step = 2 * self._scale
            if background is None or sample.mask is None:
                sample.fail(self.name, "needs a background (load's gt_background or a background stage) and the box "
                            "mask (box-mask stage)", "MissingInput")
            elif background.shape[0] % step or background.shape[1] % step:
                sample.fail(self.name, f"size {background.shape[1]}x{background.shape[0]} is not a multiple of {step}; "
                            f"set load's multiple_of to {step}", "BadSize")
            else:
                groups.setdefault(background.shape[:2], []).append((sample, background))
        for group in groups.values():
            self._generate(group)
        return samples

    @torch.no_grad()
    def _generate(self, group: list[tuple[LayeredSample, np.ndarray]]) -> None:
        from layerloop.models import bfs

        d = self._device
        backgrounds = np.stack([b for _, b in group])
        pixels = torch.from_numpy(backgrounds).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mask = torch.from_numpy(np.stack([(s.mask > 0) for s, _ in group])).float()[:, None]
        z_b = bfs.encode_latents(self._vae, pixels.to(d))
        n, c, h, w = z_b.shape
        cond = bfs.fill_condition(z_b, mask.to(d)).to(self._dtype)
        text = self._text([s.caption for s, _ in group])
        embeds, pooled = text.embeds.to(d), text.pooled.to(d)
        img_ids, txt_ids = bfs.latent_image_ids(h, w, device=d), bfs.text_ids(embeds.shape[1], device=d)
        # Per-sample noise (bfs.generate draws one seed per batch): a sample's result must not depend on
        # which samples share its batch.
        seeds = [int(self.rng(s).integers(2**63 - 1)) for s, _ in group]
        noise = [torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        z_c = bfs.pack_latents(torch.stack([x[0] for x in noise])).to(d)
        z_f = bfs.pack_latents(torch.stack([x[1] for x in noise])).to(d)
        sigmas = bfs.flux_sigmas(self.params.steps, z_c.shape[1])
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            v_c, v_f = self._generator(z_c.to(self._dtype), z_f.to(self._dtype), cond, sigma, embeds, pooled,
                                       self._guidance, img_ids, txt_ids)
            z_c = z_c + (sigma_next - sigma) * v_c.float()  # Euler in fp32, t from 1 (noise) to 0 (data)
            z_f = z_f + (sigma_next - sigma) * v_f.float()
        image_c = _to_uint8(bfs.decode_latents(self._vae, bfs.unpack_latents(z_c, h, w)))
        image_f = _to_uint8(bfs.decode_latents(self._rgba_vae, bfs.unpack_latents(z_f, h, w)))
        for i, (sample, background) in enumerate(group):
            sample.composite, sample.foreground = image_c[i], image_f[i]
            sample.background = np.ascontiguousarray(background)
            sample.kind = "candidate"
            error = np.abs(composite_layers(image_f[i], background).astype(np.float64) - image_c[i]).mean()
            sample.meta["generator"] = {
                "family": "bfs", "checkpoint": str(Path(self.params.checkpoint).resolve()),
                "checkpoint_hash": self._hash, "steps": self.params.steps, "seed": seeds[i],
                "guidance": self._guidance, "recomposition_error": round(float(error), 4),
            }
            sample.record_stage(self.name, backend="bfs", **self.describe())
