"""The ``evaluate`` stage: per-sample evaluation metrics of a method's output, in ``meta["eval"]``.

It runs after a method's stages on a held-out set read with a ``shards`` source, which leaves the
ground truth in ``work["reference"]`` (composite, foreground, background) where the method cannot use it.

``family: bfs`` (the BFS paper, section 5.1): the method generated a foreground layer F from
(B, box, caption). The composite that is judged is F over the *input* background B (``a*F + (1-a)*B``),
not any composite the method produced on its own; a method without a layer (the Flux-Fill inpainting
baseline, ``meta["generator"]["layer"] == False``) is judged on its own output and gets no ``fg_clip``.

* ``fg_clip``: CLIPScore of F over neutral grey against the caption;
* ``musiq``, ``maniqa``: no-reference quality of the composite;
* ``dino``: cosine of DINOv2 features of the composite and the ground-truth composite;
* ``hps``: HPS of the composite against the (ground-truth) caption;
* ``kid_x1000``: a set metric. The stage stores the DINOv2 features of the composite and of the
  ground-truth composite in ``meta["eval"]["features"]``; the evaluation computes KID over the set.

``family: decomposition``: the method predicted a layer F' and a clean object B' from the composite C.
* ``layer_psnr``/``layer_ssim``: F' against the ground-truth layer (RGBA, ``evaluation.measures``; PSNR
  is capped at ``psnr_max_db``, 100 dB, since identical images have an infinite PSNR);
* ``object_psnr``/``object_ssim``: B' against the ground-truth clean object;
* ``recomposition_error``: mean |a'F' + (1-a')B' - C| in 1/255 steps (on ``rendered`` samples, whose C is a
  non-linear rendering, even the ground-truth layers do not give 0: it measures how far the layers explain C
  by alpha blending, not correctness);
* ``fg_clip``: CLIPScore of the layer against the caption (real photos have no ground-truth layers; this
  and the recomposition error are what can be measured there).
A metric whose reference is missing is recorded as None, never as a made-up number.

The stage writes what was judged: ``composite`` becomes the judged composite, so a contact sheet of the
evaluation's shards shows exactly the images that were scored. Model metrics load their model once per
worker (an actor pool under Ray; on GPUs when the stage declares them); ``tiny`` model names select random
tiny instances (tests, the demo profile), whose numbers are noise.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from layerloop.samples import LayeredSample, composite
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

BFS_METRICS = ("fg_clip", "musiq", "maniqa", "kid_x1000", "dino", "hps")
DECOMPOSITION_METRICS = ("layer_psnr", "object_psnr", "layer_ssim", "object_ssim", "recomposition_error", "fg_clip")
# metric -> the model it needs (a params field naming it)
METRIC_MODELS = {"fg_clip": "clip_model", "musiq": "musiq_model", "maniqa": "maniqa_model", "dino": "dino_model",
                 "kid_x1000": "dino_model", "hps": "hps_model"}
Metric = Literal["fg_clip", "musiq", "maniqa", "kid_x1000", "dino", "hps", "layer_psnr", "object_psnr",
                 "layer_ssim", "object_ssim", "recomposition_error"]


class EvaluateParams(StageParams):
    family: Literal["bfs", "decomposition"] = "bfs"
    metrics: tuple[Metric, ...] | None = None  # None: every metric of the family
    clip_model: str = "ViT-H-14"  # open_clip architecture, hub id, folder, or tiny[:seed]
    clip_pretrained: str = "laion2b_s32b_b79k"
    hps_model: str = "xswu/HPSv2"
    hps_filename: str = "HPS_v2.1_compressed.pt"
    musiq_model: str = "chaofengc/IQA-PyTorch-Weights"
    maniqa_model: str = "chaofengc/IQA-PyTorch-Weights"
    dino_model: str = "facebook/dinov2-base"
    revision: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    neutral_grey: float = Field(0.5, ge=0.0, le=1.0)
    feature_digits: int = Field(6, ge=2, le=9)  # KID features are stored rounded to this many decimals
    psnr_max_db: float = Field(100.0, gt=0)  # identical images have infinite PSNR: capped here, so means exist

    @model_validator(mode="after")
    def _metrics_of_family(self) -> EvaluateParams:
        allowed = BFS_METRICS if self.family == "bfs" else DECOMPOSITION_METRICS
        wrong = [m for m in self.metrics or () if m not in allowed]
        if wrong:
            raise ValueError(f"metrics {wrong} are not {self.family} metrics; those are {', '.join(allowed)}")
        return self

    def chosen(self) -> tuple[str, ...]:
        return self.metrics if self.metrics is not None else (
            BFS_METRICS if self.family == "bfs" else DECOMPOSITION_METRICS)


def metric_ref(params: EvaluateParams, metric: str):
    """The ``ModelRef`` of the model ``metric`` needs (None for a model-free metric)."""
    from layerloop.models.musiq import DEFAULT_FILENAME as MUSIQ_FILE
    from layerloop.models.maniqa import DEFAULT_FILENAME as MANIQA_FILE
    from layerloop.models.refs import ModelRef, is_tiny

    field = METRIC_MODELS.get(metric)
    if field is None:
        return None
    model = getattr(params, field)
    stage = f"evaluate/{field.removesuffix('_model')}"
    if is_tiny(model):
        return ModelRef(stage=stage, model=model)
    if field == "clip_model":
        return ModelRef(stage=stage, model=model, revision=params.revision,
                        open_clip_tag=None if "/" in model else params.clip_pretrained)
    files = {"hps_model": params.hps_filename, "musiq_model": MUSIQ_FILE, "maniqa_model": MANIQA_FILE}
    return ModelRef(stage=stage, model=model, revision=params.revision, filename=files.get(field))


@register_stage
class EvaluateStage(Stage):
    name = "evaluate"
    Params = EvaluateParams
    batch_size = 16

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._models: dict[str, Any] = {}

    @property
    def needs_actor(self) -> bool:
        return any(m in METRIC_MODELS for m in self.params.chosen()) or self.resources.gpus > 0

    def models(self) -> list:
        refs = {}
        for metric in self.params.chosen():
            ref = metric_ref(self.params, metric)
            if ref is not None and not ref.is_tiny:
                refs[ref.stage] = ref
        return list(refs.values())

    def describe(self) -> dict:
        return {"family": self.params.family, "metrics": list(self.params.chosen())}

    def setup(self) -> None:
        from layerloop.models.refs import load_wrapper

        loaders = _loaders()
        for metric in self.params.chosen():
            field = METRIC_MODELS.get(metric)
            if field is None or field in self._models:
                continue
            ref = metric_ref(self.params, metric)
            wrapper, extra = loaders[field](self.params, ref)
            self._models[field] = load_wrapper(wrapper, ref, self.device, self.params.dtype, **extra)

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        self.ensure_setup()
        live = [s for s in samples if s.ok and self._check(s)]
        if not live:
            return samples
        if self.params.family == "bfs":
            values = self._bfs(live)
        else:
            values = self._decomposition(live)
        for row, sample in enumerate(live):
            record = sample.meta.setdefault("eval", {})
            record["family"] = self.params.family
            record["metrics"] = {m: _number(values[m][row]) for m in self.params.chosen()}
            if "features" in values:
                record["features"] = {side: [round(float(x), self.params.feature_digits) for x in values["features"][side][row]]
                                      for side in ("method", "reference")}
            sample.record_stage(self.name, **self.describe(), models=[r.label() for r in self.models()])
        return samples

    # ---------------------------------------------------------------- inputs
    def _check(self, sample: LayeredSample) -> bool:
        reference = sample.work.get("reference") or {}
        if sample.foreground is None or sample.composite is None or reference.get("composite") is None:
            sample.fail(self.name, "needs the method's output (foreground, composite) and work['reference'] from a "
                        "`shards` source", "MissingInput")
            return False
        if sample.composite.shape[:2] != reference["composite"].shape[:2]:
            sample.fail(self.name, f"the method's output is {sample.composite.shape[:2]}, the reference "
                        f"{reference['composite'].shape[:2]}", "BadSize")
            return False
        return True

    # ---------------------------------------------------------------- families
    def _bfs(self, live: list[LayeredSample]) -> dict[str, Any]:
        chosen = self.params.chosen()
        has_layer = [s.meta.get("generator", {}).get("layer", True) is not False for s in live]
        judged = []
        for sample, layer in zip(live, has_layer):
            if layer:  # F over the input background, as the paper measures; stored as such (F, B, C agree)
                sample.background = np.ascontiguousarray(sample.work["reference"]["background"])
                sample.composite = composite(sample.foreground, sample.background)
            sample.kind = "candidate"
            sample.meta.setdefault("eval", {})["composite"] = "layer over input background" if layer else "method output"
            judged.append(sample.composite)
        references = [s.work["reference"]["composite"] for s in live]
        captions = [s.caption for s in live]
        values: dict[str, Any] = {}
        if "fg_clip" in chosen:
            values["fg_clip"] = self._fg_clip(live, has_layer)
        if "musiq" in chosen:
            values["musiq"] = self._models["musiq_model"].score(judged)
        if "maniqa" in chosen:
            values["maniqa"] = self._models["maniqa_model"].score(judged)
        if "hps" in chosen:
            values["hps"] = self._models["hps_model"].score(judged, captions)
        if "dino" in chosen or "kid_x1000" in chosen:
            mine, theirs = self._models["dino_model"].embed(judged), self._models["dino_model"].embed(references)
            values["dino"] = np.sum(mine * theirs, axis=1)
            values["features"] = {"method": mine, "reference": theirs}
        values["kid_x1000"] = [None] * len(live)  # a set metric: computed by the evaluation over the features
        return values

    def _decomposition(self, live: list[LayeredSample]) -> dict[str, Any]:
        from layerloop.evaluation.measures import psnr, recomposition_error, ssim

        chosen = self.params.chosen()
        values: dict[str, list] = {m: [] for m in chosen}
        for sample in live:
            reference = sample.work["reference"]
            for side, predicted, truth in (("layer", sample.foreground, reference.get("foreground")),
                                           ("object", sample.background, reference.get("background"))):
                usable = truth is not None and predicted is not None and predicted.shape == truth.shape
                if f"{side}_psnr" in chosen:
                    values[f"{side}_psnr"].append(psnr(predicted, truth, max_db=self.params.psnr_max_db)
                                                  if usable else None)
                if f"{side}_ssim" in chosen:
                    values[f"{side}_ssim"].append(ssim(predicted, truth) if usable else None)
            if "recomposition_error" in chosen:
                values["recomposition_error"].append(
                    recomposition_error(sample.foreground, sample.background, reference["composite"])
                    if sample.background is not None else None)
        if "fg_clip" in chosen:
            values["fg_clip"] = self._fg_clip(live, [True] * len(live))
        return values

    def _fg_clip(self, live: list[LayeredSample], has_layer: list[bool]) -> list:
        from layerloop.models.blip2 import layer_on_neutral

        rows = [i for i, layer in enumerate(has_layer) if layer]
        scores: list = [None] * len(live)
        if rows:
            layers = [layer_on_neutral(live[i].foreground, self.params.neutral_grey) for i in rows]
            for i, value in zip(rows, self._models["clip_model"].score(layers, [live[i].caption for i in rows])):
                scores[i] = value
        return scores


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if np.isfinite(value) else None


def _loaders() -> dict[str, Any]:
    """params field -> (wrapper class, extra from_pretrained keywords) for each metric model."""
    def clip(params: EvaluateParams, ref):
        from layerloop.models.clip_score import ClipScorer

        return ClipScorer, ({"pretrained": params.clip_pretrained} if ref.open_clip_tag else {})

    def hps(params: EvaluateParams, ref):
        from layerloop.models.hps import HpsScorer

        return HpsScorer, ({} if ref.is_tiny else {"filename": params.hps_filename})

    def musiq(params: EvaluateParams, ref):
        from layerloop.models.musiq import MusiqScorer

        return MusiqScorer, {}

    def maniqa(params: EvaluateParams, ref):
        from layerloop.models.maniqa import ManiqaScorer

        return ManiqaScorer, {}

    def dino(params: EvaluateParams, ref):
        from layerloop.models.dino import DinoEmbedder

        return DinoEmbedder, {}

    return {"clip_model": clip, "hps_model": hps, "musiq_model": musiq, "maniqa_model": maniqa, "dino_model": dino}
