import io
import json

import numpy as np
import pytest
from PIL import Image

from layerloop.samples import LayeredSample, SampleError, composite, composite_error


def make_quadruple(key="demo_0001", size=(24, 32), seed=0):
    rng = np.random.default_rng(seed)
    h, w = size
    fg = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    bg = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[4:12, 5:20] = 255
    return LayeredSample(key=key, composite=composite(fg, bg), background=bg, foreground=fg, mask=mask,
                         object_mask=mask.copy(), caption="a red ball", meta={"source": "t", "bbox": [5, 4, 20, 12]})


def test_roundtrip_through_wds_record():
    sample = make_quadruple()
    record = sample.to_wds()
    assert set(record) == {"__key__", "composite.png", "background.png", "foreground.png", "mask.png",
                           "object_mask.png", "txt", "json"}
    assert Image.open(io.BytesIO(record["foreground.png"])).mode == "RGBA"
    assert Image.open(io.BytesIO(record["mask.png"])).mode == "L"
    back = LayeredSample.from_wds(record)
    for attr in ("composite", "background", "foreground", "mask", "object_mask"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(sample, attr))
    assert back.caption == "a red ball"
    assert back.meta == {"source": "t", "bbox": [5, 4, 20, 12]}
    meta = json.loads(record["json"])
    assert meta["schema_version"] == 1 and meta["kind"] == "quadruple"
    assert (meta["width"], meta["height"]) == (32, 24)


def test_encoding_is_deterministic():
    assert make_quadruple().to_wds() == make_quadruple().to_wds()


def test_invariant_is_enforced():
    sample = make_quadruple()
    sample.composite = sample.composite.copy()
    sample.composite[0, 0] = (sample.composite[0, 0].astype(int) + 5) % 256
    with pytest.raises(SampleError, match="differs"):
        sample.validate()
    sample.kind = "candidate"  # candidates are not bound by the invariant
    sample.validate()


@pytest.mark.parametrize("mutate, message", [
    (lambda s: setattr(s, "key", "bad key!"), "key must match"),
    (lambda s: setattr(s, "kind", "other"), "kind"),
    (lambda s: setattr(s, "mask", np.zeros((5, 5), np.uint8)), "other layers"),
    (lambda s: setattr(s, "foreground", s.foreground[..., :3]), "channel"),
    (lambda s: setattr(s, "background", s.background.astype(np.float32)), "uint8"),
    (lambda s: setattr(s, "composite", None), "missing"),
])
def test_validation_names_the_problem(mutate, message):
    sample = make_quadruple()
    mutate(sample)
    with pytest.raises(SampleError, match=message):
        sample.validate()


def test_composite_error_counts_steps():
    fg = np.zeros((2, 2, 4), np.uint8)
    fg[..., 3] = 128
    fg[..., :3] = 200
    bg = np.full((2, 2, 3), 100, np.uint8)
    c = composite(fg, bg)
    assert c[0, 0, 0] == round(128 / 255 * 200 + (1 - 128 / 255) * 100)
    assert composite_error(c, fg, bg) == 0
    assert composite_error(c + 1, fg, bg) == 1


def test_fail_records_reason_and_clears_work():
    sample = make_quadruple()
    sample.work["alpha"] = np.ones((2, 2))
    sample.fail("matting", ValueError("trimap has no unknown region"))
    assert not sample.ok
    assert sample.failure.as_row() == {"key": "demo_0001", "stage": "matting", "error_type": "ValueError",
                                       "message": "trimap has no unknown region"}
    assert sample.work == {}


# ------------------------------------------------------------------------------ strict json member
@pytest.mark.parametrize("meta, message", [
    ({"entry_score": float("nan")}, "metadata field entry_score is NaN: shards hold strict JSON only"),
    ({"scores": {"clip": float("inf")}}, "metadata field scores.clip is Infinity"),
    ({"bbox": [1, 2, float("-inf"), 4]}, r"metadata field bbox\[2\] is -Infinity"),
    ({"stages": {"load": {"params": [{"gamma": float("nan")}]}}}, r"stages.load.params\[0\].gamma is NaN"),
    ({"source_path": "photos/caf\udce9.jpg"}, r"metadata field source_path is text that is not valid UTF-8 "
                                              r"\(lone surrogate '\\udce9' at position 10"),
    ({"files": {"caf\udce9.jpg": 1}}, r"metadata field files.caf\\udce9.jpg has a name that is not valid UTF-8"),
    ({"blob": b"raw"}, "metadata field blob is a bytes, not a JSON value"),
])
def test_metadata_that_is_not_strict_json_is_refused_naming_the_field(meta, message):
    sample = make_quadruple()
    sample.meta.update(meta)
    with pytest.raises(SampleError, match=message):
        sample.to_wds()


def test_metadata_member_is_capped():
    from layerloop.samples import METADATA_MAX_BYTES

    sample = make_quadruple()
    sample.meta["notes"] = "x" * METADATA_MAX_BYTES
    with pytest.raises(SampleError, match=r"metadata is \d+ bytes, more than the 1048576 .*\(largest field: notes"):
        sample.to_wds()
    sample.meta["notes"] = "x" * (METADATA_MAX_BYTES - 1000)  # just under: written
    assert len(sample.to_wds()["json"]) <= METADATA_MAX_BYTES


def test_caption_that_is_not_utf8_is_refused():
    sample = make_quadruple()
    sample.caption = "a dog named \udcff"
    with pytest.raises(SampleError, match=r"caption is text that is not valid UTF-8 \(lone surrogate '\\udcff'"):
        sample.to_wds()


def test_strict_json_member_has_the_bytes_of_the_previous_encoding():
    """Clean metadata (non-ASCII included) gives exactly the bytes ``json.dumps(ensure_ascii=False)`` gave,
    so existing shards are reproduced byte for byte."""
    sample = make_quadruple()
    sample.meta.update({"caption_src": "Café über 東京", "score": 0.25, "nested": {"b": [1, 2.5], "a": None}})
    expected = json.dumps(sample.metadata(), sort_keys=True, ensure_ascii=False).encode("utf-8")
    assert sample.to_wds()["json"] == expected
    assert json.loads(expected.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


# ------------------------------------------------------------- PNG encoders (issue #16)
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_opencv_png_encoder_is_lossless_plain_png(level):
    import cv2

    from layerloop.samples import encode_png

    rng = np.random.default_rng(level)
    for shape, mode in (((5, 7), "L"), ((6, 9, 3), "RGB"), ((4, 3, 4), "RGBA"), ((1, 1), "L")):
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        data = encode_png(array, mode, level, "opencv")
        image = Image.open(io.BytesIO(data))
        assert image.mode == mode
        np.testing.assert_array_equal(np.asarray(image), array)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # a second decoder
        if mode == "RGB":
            decoded = decoded[..., ::-1]
        elif mode == "RGBA":
            decoded = decoded[..., [2, 1, 0, 3]]
        np.testing.assert_array_equal(decoded, array)
        assert data == encode_png(array.copy(), mode, level, "opencv")  # deterministic


def test_png_encoder_choice_reaches_the_record_and_defaults_keep_the_old_bytes():
    from layerloop.samples import encode_png

    sample = make_quadruple()
    default = sample.to_wds()
    assert default == sample.to_wds(6, "pil")
    assert default["composite.png"] == encode_png(sample.composite, "RGB")
    fast = sample.to_wds(1, "opencv")
    assert fast["composite.png"] != default["composite.png"]
    back = LayeredSample.from_wds(fast)
    for attr in ("composite", "background", "foreground", "mask", "object_mask"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(sample, attr))
    with pytest.raises(ValueError, match="unknown PNG encoder"):
        encode_png(sample.mask, "L", 1, "nope")


def test_composite_equals_the_float_formula_for_every_value():
    a, f, b = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij")
    fg = np.stack([f, f, f, a], -1).reshape(-1, 1, 4).astype(np.uint8)
    bg = np.stack([b, b, b], -1).reshape(-1, 1, 3).astype(np.uint8)
    alpha = a.reshape(-1, 1, 1) / 255.0
    expected = np.clip(np.rint(alpha * fg[..., :3] + (1.0 - alpha) * bg), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(composite(fg, bg), expected)
