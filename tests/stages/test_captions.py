"""The caption stage: metadata and template backends, normalisation, the backend plug-in point."""

import typing

import pytest
from pydantic import ValidationError

from layerloop.samples import LayeredSample
from layerloop.stages import run_stage, stage_class
from layerloop.stages.captions import (CAPTION_BACKENDS, CaptionBackend, CaptionParams, CaptionStage,
                                       normalise_caption)


def sample(key="c_0", caption="", **meta):
    return LayeredSample(key=key, caption=caption, meta=dict(meta))


def captioned(stage, s):
    out = run_stage(stage, [s])[0]
    assert out.ok, out.failure
    return out.caption, out.meta["stages"]["caption"]


def test_registered_and_backends_match_the_config_choices():
    assert stage_class("caption") is CaptionStage
    choices = typing.get_args(CaptionParams.model_fields["backend"].annotation)
    assert set(choices) == set(CAPTION_BACKENDS)


def test_whitespace_is_normalised():
    assert normalise_caption("  a\tred \n\n cup  ") == "a red cup"
    assert normalise_caption("cafe\u0301") == "caf\u00e9"  # NFC


def test_metadata_backend_uses_the_source_caption():
    text, record = captioned(CaptionStage(), sample(caption="  A red\n mug on   a table ", category="mug"))
    assert text == "A red mug on a table"
    assert record["backend"] == "metadata" and record["requested_backend"] == "metadata"


def test_metadata_backend_falls_back_to_the_template():
    text, record = captioned(CaptionStage(), sample(caption=" \n\t", category="cup"))
    assert text == "a photo of a cup"
    assert record["backend"] == "template" and record["requested_backend"] == "metadata"
    assert captioned(CaptionStage(), sample(category="apple"))[0] == "a photo of an apple"
    assert captioned(CaptionStage(), sample())[0] == "a photo of an object"


def test_template_backend_ignores_the_source_caption_and_renders_meta_fields():
    stage = CaptionStage(backend="template", template=" {object}  from {source} ")
    text, record = captioned(stage, sample(caption="ignored", label="coffee_mug", source="demo"))
    assert text == "a coffee mug from demo"
    assert record["backend"] == "template"
    bare = CaptionStage(backend="template", template="{category}", article=False)
    assert captioned(bare, sample(category="The Cup"))[0] == "The Cup"
    assert captioned(CaptionStage(backend="template"), sample(category="the cup"))[0] == "a photo of the cup"
    fallback = CaptionStage(backend="template", fallback_object="a thing")
    assert captioned(fallback, sample(category="  "))[0] == "a photo of a thing"


def test_category_keys_are_tried_in_order():
    stage = CaptionStage(backend="template", category_keys=("label", "category"))
    assert captioned(stage, sample(category="cup", label="bowl"))[0] == "a photo of a bowl"


def test_unknown_template_field_fails_only_that_sample():
    stage = CaptionStage(backend="template", template="a photo of {object} in {room}")
    out = run_stage(stage, [sample("c_1", room="a kitchen"), sample("c_2"), sample("c_3", room="a garden")])
    assert out[0].caption == "a photo of an object in a kitchen"
    assert out[1].failure.error_type == "KeyError" and "room" in out[1].failure.message
    assert out[2].caption == "a photo of an object in a garden"


def test_bad_params_are_rejected():
    for bad in ({"template": "   "}, {"template": "a {object"}, {"template": "{0}"}, {"backend": "blip9"},
                {"prompt_text": "x"}):
        with pytest.raises(ValidationError):
            CaptionStage(**bad)


def test_a_model_backend_plugs_in_with_setup_and_falls_back_when_it_returns_nothing():
    class Recording(CaptionBackend):
        name = "recording"
        needs_actor = True

        def setup(self):
            self.loaded = True

        def caption_batch(self, samples):
            assert self.loaded, "setup() must run before captioning"
            return [("  a  generated caption " if s.key.endswith("1") else "", self.name) for s in samples]

    stage = CaptionStage()
    assert not stage.needs_actor  # built-in backends need no actor pool
    stage.backend = Recording(stage.params)
    assert stage.needs_actor
    out = run_stage(stage, [sample("m_1"), sample("m_2", category="vase")])
    assert out[0].caption == "a generated caption"
    assert out[0].meta["stages"]["caption"]["backend"] == "recording"
    assert out[1].caption == "a photo of a vase"
    assert out[1].meta["stages"]["caption"]["backend"] == "template"
