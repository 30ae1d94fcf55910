"""The ``generate-bfs`` stage: background + box + caption -> generated foreground layer and composite.

Reads ``work["gt_background"]`` (from ``load``; else ``background``), ``mask`` (the box, from
``box-mask``) and ``caption``; writes ``composite`` (generated C), ``foreground`` (generated F, RGBA),
``background`` (the input B), ``kind = "candidate"`` and ``meta["generator"]`` = {family, checkpoint,
checkpoint_hash, steps, seed, noise, guidance, recomposition_error}. A typical pipeline::

    source: {type: webdataset, urls: ...}   -> load -> box-mask -> generate-bfs

``checkpoint`` is the ``final/`` directory (or a ``checkpoints/step-N/weights``) of a BFS ``stage1`` /
``stage2`` training run: the LoRA + g, plus ``bfs_task.json`` naming the text encoder and the Phi / RGBA
VAE checkpoints it was trained with. ``setup`` loads it once per actor as a
``models/bfs_pipeline.BFSPipeline``, on CUDA when the stage declares GPUs and CUDA exists, else on CPU.

Each sample's noise comes from its own seed (``self.rng(sample)``: run seed, key, stage name), so a
sample's output does not depend on its batch mates; samples of one size are generated as one batch.
``noise``: ``shared`` (default, the BFS paper's: one noise tensor given to both branches) or ``independent``
(one per branch, the only behaviour before #15). The build fingerprint records the resolved value (default
included, ``config.STAGE_FINGERPRINT_DEFAULTS``), so a run directory generated before the default changed is
refused rather than continued with other noise; each candidate also records it in ``meta["generator"]``.
``recomposition_error`` is the mean |C - (a F + (1 - a) B)| in 1/255 steps: how far the generated
composite is from what the generated layer over the given background gives, a first filter signal.

``mode: extract`` is the BFS paper's foreground extraction: C is given (``work["image"]`` from ``load``, else
the sample's ``composite``) with its background and box, and the composite branch receives C noised to each
step's level instead of generating one (``BFSPipeline(composites=...)``). The sample keeps the real C byte
for byte, gets the extracted F, and ``meta["generator"]["mode"] = "extract"``; ``recomposition_error`` is then
how far F over B is from the real C. ``mode: generate`` (the default) is recorded nowhere, so that configs and
candidates of before the option keep their fingerprints and bytes; a config that sets ``mode`` changes its
fingerprint as any parameter does.

``reference``: an RGB image file (the same for every sample) whose FLUX.1 Redux tokens follow each caption's
(``redux_model``, ``tiny`` in tests; ``models/redux.py``); its sha256 is recorded in ``meta["generator"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from layerloop import storage
from layerloop.samples import LayeredSample, composite as composite_layers
from layerloop.stages.base import SamplerParams, Stage
from layerloop.stages.registry import register_stage


class GenerateParams(SamplerParams):
    checkpoint: str  # final/ of a BFS stage1/stage2 training run
    guidance: float | None = None  # None: the guidance the LoRA was trained with (bfs_task.json)
    rgba_vae: str | None = None  # final/ of an rgba-vae run; None: the one named in bfs_task.json
    noise: Literal["shared", "independent"] = "shared"  # one draw for both branches (paper) or one per branch
    mode: Literal["generate", "extract"] = "generate"  # extract: F from the sample's given composite (paper)
    reference: str | None = None  # an RGB image whose Redux tokens condition every sample (reference-based)
    redux_model: str = "black-forest-labs/FLUX.1-Redux-dev"  # hub id, local folder or tiny; read with reference
    redux_revision: str | None = None


@register_stage
class GenerateBFS(Stage):
    """Background + box + caption -> composite and foreground layer with a trained BFS LoRA."""

    name = "generate-bfs"
    Params = GenerateParams
    batch_size = 4

    def models(self) -> list:
        from layerloop.models.bfs import read_lora_config
        from layerloop.models.refs import ModelRef

        try:
            saved = read_lora_config(storage.local_folder(self.params.checkpoint))
        except (FileNotFoundError, ValueError):
            return []  # setup() reports the missing checkpoint with its path
        ref = ModelRef(stage=self.name, model=saved["base_model_id"], revision=saved.get("base_revision"),
                       allow_patterns=("model_index.json", "transformer/*", "vae/*", "text_encoder*/*", "tokenizer*/*"))
        refs = [] if ref.model.startswith("tiny:") else [ref]
        if self.params.reference is not None:
            from layerloop.models.redux import REDUX_PATTERNS

            redux = ModelRef(stage=self.name, model=self.params.redux_model, revision=self.params.redux_revision,
                             allow_patterns=REDUX_PATTERNS)
            refs += [] if redux.is_tiny else [redux]
        return refs

    def setup(self) -> None:
        from layerloop.models.bfs_pipeline import BFSPipeline
        from layerloop.models.refs import inference_dtype

        self._reference = self._reference_sha256 = None
        if self.params.reference is not None:
            from layerloop.datasets.imageio import decode_image, to_rgb
            from layerloop.files import sha256_file

            self._reference = to_rgb(decode_image(self.params.reference, key="reference", max_file_bytes=None),
                                     key="reference")
            self._reference_sha256 = sha256_file(self.params.reference)
        self._pipe = BFSPipeline.from_checkpoint(
            storage.local_folder(self.params.checkpoint), device=self.device, dtype=inference_dtype(self.params.dtype, self.device),
            rgba_vae=self.params.rgba_vae, guidance=self.params.guidance)
        if self.params.reference is not None:
            self._pipe.load_redux(self.params.redux_model, self.params.redux_revision)

    def describe(self) -> dict:
        exclude = {"batch_size", "cpus", "gpus", "concurrency", "dtype"}
        # Defaults that did not exist before these options are left out: a plain generation records what it did.
        if self.params.mode == "generate":
            exclude.add("mode")
        if self.params.reference is None:
            exclude |= {"reference", "redux_model", "redux_revision"}
        return self.params.model_dump(exclude=exclude, mode="json")

    # ------------------------------------------------------------------ batches
    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        groups: dict[tuple[int, int], list[tuple[LayeredSample, np.ndarray, np.ndarray | None]]] = {}
        extract = self.params.mode == "extract"
        for sample in samples:
            background = sample.work.get("gt_background")
            if background is None:
                background = sample.background
            given = None
            if extract:
                given = sample.work.get("image")
                if given is None:
                    given = sample.composite
            step = self._pipe.size_multiple
            if background is None or sample.mask is None:
                sample.fail(self.name, "needs a background (load's gt_background or a background stage) and the box "
                            "mask (box-mask stage)", "MissingInput")
            elif extract and given is None:
                sample.fail(self.name, "mode extract needs the input composite (load's image or the sample's "
                            "composite)", "MissingInput")
            elif extract and given.shape != background.shape:
                sample.fail(self.name, f"mode extract: the composite is {given.shape[1]}x{given.shape[0]}, the "
                            f"background {background.shape[1]}x{background.shape[0]}", "BadSize")
            elif background.shape[0] % step or background.shape[1] % step:
                sample.fail(self.name, f"size {background.shape[1]}x{background.shape[0]} is not a multiple of {step}; "
                            f"set load's multiple_of to {step}", "BadSize")
            else:
                groups.setdefault(background.shape[:2], []).append((sample, background, given))
        for group in groups.values():
            self._generate(group)
        return samples

    def _generate(self, group: list[tuple[LayeredSample, np.ndarray, np.ndarray | None]]) -> None:
        # One seed per sample (not per batch): a sample's result must not depend on which samples share its batch.
        seeds = [int(self.rng(s).integers(2**63 - 1)) for s, _, _ in group]
        extract = self.params.mode == "extract"
        out = self._pipe(np.stack([b for _, b, _ in group]), np.stack([s.mask for s, _, _ in group]),
                         [s.caption for s, _, _ in group], seeds, steps=self.params.steps, noise=self.params.noise,
                         composites=np.stack([c for _, _, c in group]) if extract else None,
                         references=None if self._reference is None else [self._reference] * len(group))
        for i, (sample, background, _) in enumerate(group):
            sample.composite, sample.foreground = out.composite[i], out.foreground[i]
            sample.background = np.ascontiguousarray(background)
            sample.kind = "candidate"
            error = np.abs(composite_layers(out.foreground[i], background).astype(np.float64) - out.composite[i]).mean()
            sample.meta["generator"] = {
                "family": "bfs", "checkpoint": storage.reference(self.params.checkpoint),
                "checkpoint_hash": self._pipe.checkpoint_hash, "steps": self.params.steps, "seed": seeds[i],
                "noise": self.params.noise, "guidance": self._pipe.guidance,
                "recomposition_error": round(float(error), 4),
            }
            if extract:
                sample.meta["generator"]["mode"] = "extract"
            if self._reference is not None:
                sample.meta["generator"]["reference"] = {"path": str(Path(self.params.reference).resolve()),
                                                         "sha256": self._reference_sha256,
                                                         "redux_model": self.params.redux_model}
            sample.record_stage(self.name, backend="bfs", **self.describe())
