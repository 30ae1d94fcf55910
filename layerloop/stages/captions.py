"""The ``caption`` stage: one caption per sample, from a pluggable backend.

Backends live in ``CAPTION_BACKENDS`` (name -> class). A backend gets the stage parameters, may load a
model in ``setup()`` (called once per worker/actor by the stage's own ``setup``), and captions a batch.
To add one (a BLIP-2 captioner, say): subclass ``CaptionBackend``, set ``needs_actor = True`` if it loads a
model, decorate it with ``@register_caption_backend``, and add its name to ``CaptionParams.backend``'s
``Literal`` (the ``Literal`` keeps configs validated, and a test checks both lists agree).

Built in:

* ``template``: renders ``template`` (default ``"a photo of {object}"``) with fields from the metadata;
* ``metadata``: the source's own caption (``sample.caption``) when it has one, else the template.

Whatever a backend returns is stripped, NFC-normalised and has its whitespace runs collapsed to one space;
an empty result falls back to the template. The metadata records which backend produced each caption.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

_WHITESPACE = re.compile(r"\s+")
_DETERMINERS = ("a ", "an ", "the ", "some ", "this ", "that ", "my ", "his ", "her ", "their ", "our ")


def normalise_caption(text: str) -> str:
    """NFC, no leading/trailing whitespace, every whitespace run (newlines, tabs) as one space."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


class CaptionParams(StageParams):
    backend: Literal["metadata", "template", "blip2"] = "metadata"
    # blip2 only: hub id, local folder or tiny[:seed]; what it looks at; optional prompt
    model: str = "Salesforce/blip2-opt-2.7b"
    revision: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None  # None: fp16 on GPU, fp32 on CPU
    view: Literal["crop", "layer"] = "crop"  # crop of C in its box, or F over a neutral grey
    prompt: str | None = None
    max_new_tokens: int = Field(30, ge=1)
    # Fields: {object} (category with an article, or `fallback_object`), {category} (bare category, or
    # "object"), and any top-level text/number in the sample's metadata ({source}, ...).
    template: str = "a photo of {object}"
    # Metadata keys tried in order for the object's category; the first non-empty one wins.
    category_keys: tuple[str, ...] = ("category", "object", "label", "class_name")
    fallback_object: str = "an object"
    # Put "a"/"an" before a bare category ("cup" -> "a cup"), unless it already starts with a determiner
    # or a number. The vowel-letter rule is a heuristic ("an umbrella", but also "an unicorn").
    article: bool = True

    @field_validator("template")
    @classmethod
    def _template_parses(cls, value: str) -> str:
        if not normalise_caption(value):
            raise ValueError("template must not be empty")
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as error:
            raise ValueError(f"template {value!r} is not a valid format string: {error}") from None
        if any(not name.isidentifier() for name in fields):
            raise ValueError(f"template {value!r}: fields must be plain names like {{object}}, got {fields}")
        return value


class CaptionBackend:
    """One way of captioning. ``caption_batch`` returns one text per sample (may be empty: the stage then
    falls back to the template) and the name of the backend that produced it."""

    name: ClassVar[str] = "backend"
    needs_actor: ClassVar[bool] = False  # True for model backends: the stage then runs in an actor pool

    def __init__(self, params: CaptionParams):
        self.params = params

    def setup(self) -> None:
        """Load models once per worker/actor. Built-in backends need nothing."""

    def caption_batch(self, samples: list[LayeredSample]) -> list[tuple[str, str]]:
        raise TypeError(f"{type(self).__name__} must implement caption_batch")


CAPTION_BACKENDS: dict[str, type[CaptionBackend]] = {}


def register_caption_backend(cls: type[CaptionBackend]) -> type[CaptionBackend]:
    CAPTION_BACKENDS[cls.name] = cls
    return cls


def render_template(params: CaptionParams, meta: dict[str, Any]) -> str:
    """The template caption for one sample's metadata; unknown fields are a clear error."""
    category = ""
    for key in params.category_keys:
        value = meta.get(key)
        if isinstance(value, str) and normalise_caption(value):
            # Dataset labels are often identifiers ("coffee_mug"); a caption wants words.
            category = normalise_caption(value.replace("_", " "))
            break
    if category:
        obj = _with_article(category) if params.article else category
    else:
        obj = params.fallback_object
    fields: dict[str, Any] = {k: v for k, v in meta.items()
                              if isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    fields.update(object=obj, category=category or "object")
    try:
        return params.template.format_map(fields)
    except KeyError as error:
        raise KeyError(f"caption template {params.template!r} names {error.args[0]!r}, which this sample's "
                       f"metadata lacks; available: {sorted(fields)}") from None


def _with_article(category: str) -> str:
    lowered = category.lower()
    if lowered.startswith(_DETERMINERS) or lowered[0].isdigit():
        return category
    return ("an " if lowered[0] in "aeiou" else "a ") + category


@register_caption_backend
class TemplateCaptions(CaptionBackend):
    name = "template"

    def caption_batch(self, samples: list[LayeredSample]) -> list[tuple[str, str]]:
        return [(render_template(self.params, s.meta), self.name) for s in samples]


@register_caption_backend
class MetadataCaptions(CaptionBackend):
    name = "metadata"

    def caption_batch(self, samples: list[LayeredSample]) -> list[tuple[str, str]]:
        out = []
        for sample in samples:
            text = normalise_caption(sample.caption or "")
            out.append((text, self.name) if text else (render_template(self.params, sample.meta), "template"))
        return out


def blip2_ref(params: CaptionParams):
    from layerloop.models.refs import ModelRef

    return ModelRef(stage="caption/blip2", model=params.model, revision=params.revision)


@register_caption_backend
class Blip2Captions(CaptionBackend):
    """BLIP-2 (``models/blip2.py``) captions the object, not the scene: the composite cropped to the box
    (with a little context) or the foreground layer over neutral grey. Runs after recompose and box-mask."""

    name = "blip2"
    needs_actor = True
    device = "cpu"  # set by the stage from its resources before setup()

    def setup(self) -> None:
        from layerloop.models.blip2 import Blip2Captioner
        from layerloop.models.refs import load_wrapper

        dtype = self.params.dtype or ("float16" if self.device == "cuda" else "float32")
        self.model = load_wrapper(Blip2Captioner, blip2_ref(self.params), self.device, dtype)

    def _view(self, sample: LayeredSample) -> np.ndarray:
        from layerloop.models.blip2 import layer_on_neutral, object_crop

        if self.params.view == "layer":
            if sample.foreground is None:
                raise ValueError("blip2 view 'layer' needs the foreground; run recompose first")
            return layer_on_neutral(sample.foreground)
        if sample.composite is None or "bbox" not in sample.meta:
            raise ValueError("blip2 view 'crop' needs the composite and meta['bbox']; run recompose and box-mask first")
        return object_crop(sample.composite, sample.meta["bbox"])

    def caption_batch(self, samples: list[LayeredSample]) -> list[tuple[str, str]]:
        views = [self._view(sample) for sample in samples]
        texts = self.model.caption(views, prompt=self.params.prompt, max_new_tokens=self.params.max_new_tokens)
        return [(text, self.name) for text in texts]


@register_stage
class CaptionStage(Stage):
    name = "caption"
    reads_work = frozenset()
    Params = CaptionParams

    def __init__(self, params: StageParams | None = None, seed: int = 0, **kwargs: Any):
        super().__init__(params, seed, **kwargs)
        self.backend = CAPTION_BACKENDS[self.params.backend](self.params)

    @property
    def needs_actor(self) -> bool:
        # Only model backends are worth an actor pool; the built-in ones run as plain tasks.
        return self.backend.needs_actor or self.resources.gpus > 0

    def setup(self) -> None:
        self.backend.device = self.device
        self.backend.setup()

    def models(self) -> list:
        return [blip2_ref(self.params)] if self.params.backend == "blip2" else []

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.params.backend != "blip2":  # model fields mean nothing to metadata / template
            for field in ("model", "revision", "dtype", "view", "prompt", "max_new_tokens"):
                described.pop(field, None)
        return described

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        try:
            results = self.backend.caption_batch(samples)
        except Exception as error:
            # One bad sample (a template field its metadata lacks) must not fail its batch mates:
            # retry one by one so only the culprit is recorded as failed.
            if len(samples) == 1:
                return [samples[0].fail(self.name, error)]
            return [out for sample in samples for out in self.process_batch([sample])]
        if len(results) != len(samples):
            raise RuntimeError(f"caption backend {self.backend.name} returned {len(results)} captions "
                               f"for {len(samples)} samples")
        for sample, (text, produced_by) in zip(samples, results):
            caption = normalise_caption(text)
            if not caption:
                caption, produced_by = normalise_caption(render_template(self.params, sample.meta)), "template"
            sample.caption = caption
            sample.record_stage(self.name, backend=produced_by, requested_backend=self.params.backend,
                                config=self.describe())
        return samples

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        return self.process_batch([sample])[0]
