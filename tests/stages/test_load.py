"""The load stage on every kind of messy input: good ones normalise, bad ones fail with a readable reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from layerloop.datasets.sources import RoremSource
from layerloop.samples import LayeredSample
from layerloop.stages import build_stage, run_stage, stage_class
from layerloop.stages.load import LoadStage
from tests.messy_inputs import OBJECT, make_messy_rorem, scene


def run_messy(root, meta_format: str, **params) -> tuple[dict, dict[str, LayeredSample], dict]:
    expected = make_messy_rorem(root, meta_format)
    source = RoremSource(root)
    items = source.items()
    stage = build_stage({"stage": "load", **params}, seed=0)
    samples = run_stage(stage, [source.read(item) for item in items])
    listing = {f.key: f for f in source.listing_failures()}
    return expected, {s.meta["source_id"]: s for s in samples}, listing


@pytest.mark.parametrize("meta_format", ["jsonl", "json"])
def test_messy_rorem_through_the_load_stage(tmp_path, meta_format):
    expected, samples, listing = run_messy(tmp_path, meta_format, short_side=64)
    assert set(samples) | {f.key.removeprefix("rorem_") for f in listing.values()} == set(expected)
    for source_id, reason in expected.items():
        if source_id.startswith("meta-line"):
            assert reason in listing[f"rorem_{source_id}"].message
            continue
        sample = samples[source_id]
        if reason is not None:
            assert not sample.ok, f"{source_id} should fail with {reason!r}"
            assert sample.failure.stage == "load" and sample.failure.error_type == "InputError"
            assert reason in sample.failure.message, f"{source_id}: {sample.failure.message}"
            assert sample.work == {}
            continue
        assert sample.ok, f"{source_id} failed: {sample.failure}"
        image, mask = sample.work["image"], sample.object_mask
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) == 64 and image.shape[0] % 8 == 0 and image.shape[1] % 8 == 0
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
        assert not any(k.startswith("raw_") for k in sample.work)
        # image and mask still line up: the object is bright under the mask, the wall dark outside it
        inside = image[mask > 0].astype(float).mean(axis=0)
        outside = image[mask == 0].astype(float).mean(axis=0)
        assert inside.max() > 120 and outside.max() < 100, (source_id, inside, outside)
        if source_id in ("good", "rgba", "mask_rgb", "mask_jpeg", "mask_small", "exif_rotated", "café_ñ"):
            assert np.abs(inside - OBJECT).max() < 12, (source_id, inside)
        record = sample.meta["stages"]["load"]
        assert record["short_side"] == 64 and record["mask_threshold"] == 128 and record["backend"]


def test_sizes_orientation_and_background(tmp_path):
    _, samples, _ = run_messy(tmp_path, "json", short_side=64)
    good = samples["good"]
    assert good.meta["original_size"] == [120, 80]
    assert good.work["image"].shape == (64, 96, 3)
    assert good.work["gt_background"].shape == (64, 96, 3)
    assert "gt_background" not in samples["gray"].work  # no GT file for that entry
    # the phone photo is stored 120 x 80 with orientation 6: it loads upright, 80 x 120 -> 64 x 96
    rotated = samples["exif_rotated"]
    assert rotated.meta["original_size"] == [80, 120] and rotated.work["image"].shape == (96, 64, 3)
    # 16-bit gray is scaled, not clipped: it matches the 8-bit gray version
    assert np.abs(samples["gray16"].work["image"].astype(int) - samples["gray"].work["image"].astype(int)).max() <= 1
    assert good.caption == "a yellow box on a dark wall"


def test_params_change_the_result_and_are_validated(tmp_path):
    rgb, mask = scene(120, 80)
    grey_mask = np.where(mask > 0, 150, 0).astype(np.uint8)

    def load(**params):
        sample = LayeredSample(key="k", work={"raw_image": rgb, "raw_mask": grey_mask})
        return run_stage(LoadStage(**params), [sample])[0]

    assert load(short_side=32).work["image"].shape == (32, 48, 3)
    assert load(short_side=100, multiple_of=1).work["image"].shape == (100, 150, 3)
    assert load(short_side=100).work["image"].shape == (96, 144, 3)
    assert "mask is empty" in load(mask_threshold=200).failure.message
    assert "too large" in load(max_pixels=5000).failure.message
    with pytest.raises(ValueError, match="short_sid"):
        build_stage({"stage": "load", "short_sid": 3})
    assert stage_class("load") is LoadStage


def test_missing_raw_inputs_fail_readably():
    no_mask = LayeredSample(key="src_1", work={"raw_image": scene()[0]})
    nothing = LayeredSample(key="src_2")
    out = run_stage(LoadStage(), [no_mask, nothing])
    assert out[0].failure.message.startswith("mask is missing")
    assert out[1].failure.message.startswith("image is missing")


def test_accepts_pil_images_and_bytes_from_sources():
    rgb, mask = scene(64, 48)
    pil = Image.fromarray(rgb)
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    sample = LayeredSample(key="k", work={"raw_image": pil, "raw_mask": buffer.getvalue(), "raw_background": rgb})
    (out,) = run_stage(LoadStage(short_side=48, multiple_of=1), [sample])
    assert out.ok and np.array_equal(out.work["image"], rgb) and np.array_equal(out.object_mask, mask)
    assert np.array_equal(out.work["gt_background"], rgb)
