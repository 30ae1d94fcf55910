"""The ``score`` stage: quality scores of a layered sample, written to ``meta["scores"]``.

Metrics (choose with ``metrics``):

* ``clip_foreground``: CLIPScore (Hessel et al. 2021, ``2.5*max(cos, 0)``) of the foreground layer over a
  neutral grey vs the caption: does the layer show what the caption says (the BFS paper's CLIP score);
* ``clip_composite``: CLIPScore of the scene vs the caption;
* ``hps``: HPS v2.1 of the scene vs the caption (human preference);
* ``recomposition``: mean and max of ``|a*F + (1-a)*B - C|`` in 1/255 steps (not 0 for the true layers of a
  ``rendered`` sample, whose C is non-linear: rank decompositions by ``cycle_error`` there), model-free: for generated
  candidates it measures whether the model's layers explain its own composite.

"The scene" depends on the sample. For a BFS candidate (``meta["generator"]["family"] == "bfs"``) it is the
generated foreground F composited over the input background B (``composite(F, B)``; ``generate-bfs`` stores the
input B in ``sample.background``), as the BFS paper evaluates HPS: the product is the layer, and the composite
branch's own decoded C is only a by-product (``recomposition`` compares the two). For every other sample it is
``sample.composite`` (a real composite, or a decomposition's input).

Each sample records which image each of its scores was computed on, in ``meta["scores_on"]``: a JSON object from
score column to one of

* ``"foreground_over_grey"`` (``clip_foreground``);
* ``"foreground_over_input_background"`` (``clip_composite`` and ``hps`` of a BFS candidate);
* ``"composite"`` (``clip_composite`` and ``hps`` of any other sample);
* ``"composite_vs_foreground_over_background"`` (``recomposition_mean`` and ``recomposition_max``).

For example ``{"clip_foreground": "foreground_over_grey", "hps": "foreground_over_input_background", ...}``.

Model metrics load their model once per worker (the stage then runs in an actor pool, on GPUs when it
declares them). ``model: tiny`` style names (``clip_model: tiny``) select random tiny instances for tests
and the demo profile, whose scores are noise: in that profile only ``recomposition`` carries information.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from layerloop.samples import LayeredSample, composite
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

Metric = Literal["clip_foreground", "clip_composite", "hps", "recomposition"]
MODEL_METRICS = {"clip_foreground", "clip_composite", "hps"}


class ScoreParams(StageParams):
    metrics: tuple[Metric, ...] = ("clip_foreground", "clip_composite", "hps", "recomposition")
    clip_model: str = "ViT-H-14"  # open_clip architecture, hub id, folder, or tiny[:seed]
    clip_pretrained: str = "laion2b_s32b_b79k"
    hps_model: str = "xswu/HPSv2"  # hub repository, folder, checkpoint file, or tiny[:seed]
    hps_filename: str = "HPS_v2.1_compressed.pt"
    revision: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    neutral_grey: float = Field(0.5, ge=0.0, le=1.0)  # backdrop of the layer for clip_foreground


def clip_ref(params: ScoreParams):
    from layerloop.models.refs import ModelRef

    tiny = params.clip_model.startswith("tiny")
    return ModelRef(stage="score/clip", model=params.clip_model, revision=params.revision,
                    open_clip_tag=None if tiny or "/" in params.clip_model else params.clip_pretrained)


def hps_ref(params: ScoreParams):
    from layerloop.models.refs import ModelRef

    tiny = params.hps_model.startswith("tiny")
    return ModelRef(stage="score/hps", model=params.hps_model, revision=params.revision,
                    filename=None if tiny else params.hps_filename)


FOREGROUND_OVER_GREY = "foreground_over_grey"
FOREGROUND_OVER_INPUT_BACKGROUND = "foreground_over_input_background"
COMPOSITE = "composite"
RECOMPOSITION = "composite_vs_foreground_over_background"


def is_generated_bfs(sample: LayeredSample) -> bool:
    generator = sample.meta.get("generator")
    return isinstance(generator, dict) and generator.get("family") == "bfs"


def scene(sample: LayeredSample) -> tuple[np.ndarray, str]:
    """The image ``clip_composite`` and ``hps`` score, and its ``scores_on`` name: a BFS candidate's foreground
    over its input background (the paper's evaluation), else the sample's composite."""
    if is_generated_bfs(sample):
        return composite(sample.foreground, sample.background), FOREGROUND_OVER_INPUT_BACKGROUND
    return sample.composite, COMPOSITE


def recomposition_error(sample: LayeredSample) -> tuple[float, int]:
    """(mean, max) of |composite(F, B) - C| in 1/255 steps."""
    error = np.abs(composite(sample.foreground, sample.background).astype(np.int16)
                   - sample.composite.astype(np.int16))
    return float(error.mean()), int(error.max(initial=0))


@register_stage
class ScoreStage(Stage):
    name = "score"
    reads_work = frozenset()
    Params = ScoreParams
    batch_size = 16

    @classmethod
    def score_columns(cls, params: dict) -> tuple[str, ...]:
        metrics = params.get("metrics") or ScoreParams.model_fields["metrics"].default
        return tuple(c for m in metrics for c in
                     (("recomposition_mean", "recomposition_max") if m == "recomposition" else (m,)))

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clip = None
        self.hps = None

    @property
    def needs_actor(self) -> bool:
        return bool(MODEL_METRICS & set(self.params.metrics)) or self.resources.gpus > 0

    def models(self) -> list:
        refs = []
        if {"clip_foreground", "clip_composite"} & set(self.params.metrics):
            refs.append(clip_ref(self.params))
        if "hps" in self.params.metrics:
            refs.append(hps_ref(self.params))
        return refs

    def setup(self) -> None:
        from layerloop.models.refs import load_wrapper

        metrics = set(self.params.metrics)
        if {"clip_foreground", "clip_composite"} & metrics:
            from layerloop.models.clip_score import ClipScorer

            ref = clip_ref(self.params)
            extra = {"pretrained": self.params.clip_pretrained} if ref.open_clip_tag else {}
            self.clip = load_wrapper(ClipScorer, ref, self.device, self.params.dtype, **extra)
        if "hps" in metrics:
            from layerloop.models.hps import HpsScorer

            ref = hps_ref(self.params)
            extra = {} if ref.is_tiny else {"filename": self.params.hps_filename}
            self.hps = load_wrapper(HpsScorer, ref, self.device, self.params.dtype, **extra)

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        self.ensure_setup()
        live = []
        for sample in samples:
            if not sample.ok:
                continue
            missing = [f for f in ("composite", "foreground", "background") if getattr(sample, f) is None]
            if missing:
                sample.fail(self.name, ValueError(f"score needs {', '.join(missing)}"))
            elif not sample.caption and MODEL_METRICS & set(self.params.metrics):
                sample.fail(self.name, ValueError("score needs a caption for CLIP/HPS; run the caption stage"))
            else:
                live.append(sample)
        if not live:
            return samples
        captions = [s.caption for s in live]
        columns: dict[str, np.ndarray] = {}
        metrics = self.params.metrics
        scenes = [scene(s) for s in live] if {"clip_composite", "hps"} & set(metrics) else []
        if "clip_foreground" in metrics:
            from layerloop.models.blip2 import layer_on_neutral

            layers = [layer_on_neutral(s.foreground, self.params.neutral_grey) for s in live]
            columns["clip_foreground"] = self.clip.score(layers, captions)
        if "clip_composite" in metrics:
            columns["clip_composite"] = self.clip.score([image for image, _ in scenes], captions)
        if "hps" in metrics:
            columns["hps"] = self.hps.score([image for image, _ in scenes], captions)
        for row, sample in enumerate(live):
            scores = sample.meta.setdefault("scores", {})
            scored_on = sample.meta.setdefault("scores_on", {})
            for name, values in columns.items():
                scores[name] = round(float(values[row]), 6)
                scored_on[name] = FOREGROUND_OVER_GREY if name == "clip_foreground" else scenes[row][1]
            if "recomposition" in metrics:
                mean, peak = recomposition_error(sample)
                scores["recomposition_mean"] = round(mean, 6)
                scores["recomposition_max"] = peak
                scored_on["recomposition_mean"] = scored_on["recomposition_max"] = RECOMPOSITION
            sample.record_stage(self.name, **self.describe(), models=[r.label() for r in self.models()])
        return samples
