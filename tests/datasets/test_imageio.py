"""Decoding, colour/mask conversion and normalisation rules of layerloop.datasets.imageio."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from layerloop.datasets.imageio import InputError, decode_image, normalise, to_mask, to_rgb
from tests.messy_inputs import huge_png_header, png_bytes, scene


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ decode
def test_decode_accepts_path_bytes_pil_and_array(tmp_path):
    rgb, _ = scene()
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    for raw in (path, str(path), path.read_bytes(), Image.open(path), rgb):
        assert np.array_equal(to_rgb(decode_image(raw, key="image")), rgb)


def test_decode_reports_missing_zero_byte_unknown_and_corrupt(tmp_path):
    with pytest.raises(InputError, match=r"^mask file is missing: .*nope\.png"):
        decode_image(tmp_path / "nope.png", key="mask")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="image is a zero-byte file"):
        decode_image(tmp_path / "empty.png", key="image")
    with pytest.raises(InputError, match="not an image in a known format"):
        decode_image(b"hello, I am text", key="image")
    jpeg = encoded(Image.fromarray(scene()[0]), "JPEG")
    with pytest.raises(InputError, match=r"truncated or corrupt \(JPEG\)"):
        decode_image(jpeg[: len(jpeg) // 2], key="image")
    with pytest.raises(InputError, match="background is missing"):
        decode_image(None, key="background")


def test_decode_refuses_large_images_before_decoding_pixels():
    # 10000 x 8000 = 80 MP: over our 64 MP default but under PIL's own error threshold, so our check runs
    with pytest.raises(InputError, match=r"image is too large: 10000x8000 > 64 MP limit"):
        decode_image(huge_png_header(10000, 8000), key="image")
    # 400 MP: PIL's own bomb error fires inside Image.open; it becomes the same readable error
    with pytest.raises(InputError, match=r"image is too large: 400 MP > 64 MP limit"):
        decode_image(huge_png_header(20000, 20000), key="image")
    with pytest.raises(InputError, match=r"mask is too large: 120x80 > 0.005 MP limit"):
        decode_image(png_bytes(Image.fromarray(scene()[1])), key="mask", max_pixels=5000)
    with pytest.raises(InputError, match="too large"):
        decode_image(np.zeros((100, 100), np.uint8), key="mask", max_pixels=100)


def test_exif_orientation_is_applied():
    upright, _ = scene(80, 120, box=(10, 10, 40, 50))
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(stored, "JPEG", quality=98, exif=exif.tobytes())
    decoded = to_rgb(decode_image(data, key="image"))
    assert decoded.shape == upright.shape
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 3


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(to_rgb(decode_image(buffer.getvalue(), key="image"))[0, 0]) == (200, 0, 0)


# ---------------------------------------------------------------------------------------- to_rgb
def test_rgba_is_composited_over_mid_grey():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 0
    rgba[0, 2, 3] = 128
    rgb = to_rgb(Image.fromarray(rgba))
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[0, 1]) == (128, 128, 128)
    assert tuple(rgb[0, 2]) == (192, 64, 64)  # 128/255 * 255 + 127/255 * 128, rounded


def test_palette_transparency_and_la():
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([255, 0, 255, 10, 200, 30])
    palette.info["transparency"] = 0
    rgb = to_rgb(palette)
    assert tuple(rgb[0, 0]) == (128, 128, 128) and tuple(rgb[0, 1]) == (10, 200, 30)
    la = Image.fromarray(np.dstack([np.full((2, 2), 200, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)]))
    assert la.mode == "LA"
    assert tuple(to_rgb(la)[0, 0]) == (200, 200, 200) and tuple(to_rgb(la)[0, 1]) == (128, 128, 128)


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], np.uint16)
    for raw in (Image.fromarray(values), Image.open(io.BytesIO(encoded(Image.fromarray(values))))):
        rgb = to_rgb(raw)
        assert rgb.shape == (2, 3, 3)
        assert list(rgb[..., 0].ravel()) == [0, 1, 128, 255, 4, 156]
    big_endian = Image.fromarray(values.astype(">u2"))
    assert list(to_rgb(big_endian)[..., 0].ravel()) == [0, 1, 128, 255, 4, 156]


def test_int_and_float_ranges():
    as_8_bit = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    assert list(to_rgb(as_8_bit)[0, :, 0]) == [0, 100, 255]
    as_16_bit = Image.fromarray(np.array([[0, 1000, 65535]], np.int32))
    assert list(to_rgb(as_16_bit)[0, :, 0]) == [0, 4, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert list(to_rgb(unit)[0, :, 0]) == [0, 128, 255]
    stretched = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], np.float32))
    assert list(to_rgb(stretched)[0, :, 0]) == [0, 64, 255]
    nan = Image.fromarray(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(InputError, match="NaN"):
        to_rgb(nan)
    with pytest.raises(InputError, match="NaN"):
        to_mask(nan, key="mask")


def test_cmyk_without_profile_uses_the_plain_formula():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 128, 0, 128]]], np.uint8),
                           mode="CMYK")
    rgb = to_rgb(cmyk)
    assert [tuple(p) for p in rgb[0]] == [(255, 255, 255), (0, 255, 255), (0, 0, 0), (127, 63, 127)]


# --------------------------------------------------------------------------------------- to_mask
def test_mask_rules():
    gray = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8))
    assert list(to_mask(gray)[0]) == [0, 0, 255, 255]
    assert list(to_mask(gray, threshold=200)[0]) == [0, 0, 0, 255]
    labels = Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8))
    assert list(to_mask(labels)[0]) == [0, 255, 255, 0]
    coloured = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255], [0, 0, 0], [40, 40, 40]]], np.uint8))
    assert list(to_mask(coloured)[0]) == [255, 255, 0, 0]  # pure red/blue count (luminance would not)
    cutout = np.zeros((1, 4, 4), np.uint8)
    cutout[0, :, :3] = [[10, 10, 10], [250, 250, 250], [10, 10, 10], [250, 250, 250]]
    cutout[0, :, 3] = [255, 255, 0, 0]
    assert list(to_mask(Image.fromarray(cutout))[0]) == [255, 255, 0, 0]  # varying alpha wins
    opaque = cutout.copy()
    opaque[0, :, 3] = 255
    assert list(to_mask(Image.fromarray(opaque))[0]) == [0, 255, 0, 255]  # constant alpha: colours
    mask16 = Image.fromarray(np.array([[0, 30000, 40000, 65535]], np.uint16))
    assert list(to_mask(mask16)[0]) == [0, 0, 255, 255]
    palette = Image.fromarray(np.array([[0, 1, 2, 0]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 200, 0, 0, 0, 60, 0])
    assert list(to_mask(palette)[0]) == [0, 255, 0, 0]
    assert list(to_mask(Image.fromarray(np.array([[0, 1]], bool)).convert("1"))[0]) == [0, 255]


def test_jpeg_noise_is_thresholded_away():
    _, mask = scene(128, 96)
    noisy = to_mask(Image.open(io.BytesIO(encoded(Image.fromarray(mask), "JPEG", quality=40))))
    decoded = np.asarray(Image.open(io.BytesIO(encoded(Image.fromarray(mask), "JPEG", quality=40))))
    assert len(np.unique(decoded)) > 2  # the JPEG really is noisy
    assert set(np.unique(noisy)) == {0, 255}
    assert (noisy != mask).mean() < 0.01


# ------------------------------------------------------------------------------------- normalise
def test_normalise_shrinks_and_enlarges_to_short_side():
    rgb, mask = scene(120, 80)
    out = normalise(rgb, mask, short_side=64)
    assert out.image.shape == (64, 96, 3) and out.mask.shape == (64, 96)
    assert out.original_size == (120, 80) and out.crop == (0, 0, 96, 64)
    assert set(np.unique(out.mask)) == {0, 255}
    rgb, mask = scene(40, 60)
    out = normalise(rgb, mask, short_side=64)
    assert out.image.shape == (96, 64, 3)
    assert normalise(rgb, mask, short_side=None).image.shape == (56, 40, 3)  # 60 cropped to a multiple of 8


def test_normalise_crops_to_multiple_of_8_around_the_centre():
    rgb, mask = scene(150, 100)  # 100 -> 64: 150 -> 96
    out = normalise(rgb, mask, short_side=60)  # 60 x 90 -> crop to 56 x 88
    assert out.image.shape == (56, 88, 3)
    assert out.crop == (1, 2, 89, 58)
    assert normalise(rgb, mask, short_side=60, multiple_of=1).image.shape == (60, 90, 3)


def test_normalise_matches_mask_and_background_sizes():
    rgb, mask = scene(120, 80)
    half = np.asarray(Image.fromarray(mask).resize((60, 40), Image.Resampling.NEAREST))
    background = np.asarray(Image.fromarray(rgb).resize((240, 160)))
    out = normalise(rgb, half, background, short_side=80, multiple_of=1)
    assert out.mask.shape == (80, 120) and out.background.shape == (80, 120, 3)
    assert (out.mask != mask).mean() < 0.02
    slightly_off = np.asarray(Image.fromarray(mask).resize((121, 80)))  # 0.8% aspect difference
    assert normalise(rgb, slightly_off, short_side=80).mask.shape == (80, 120)
    with pytest.raises(InputError, match=r"mask is 100x80 but the image is 120x80: aspect ratios"):
        normalise(rgb, np.asarray(Image.fromarray(mask).resize((100, 80))))
    with pytest.raises(InputError, match=r"background is 80x80 .* aspect ratios"):
        normalise(rgb, mask, rgb[:, :80])
    with pytest.raises(InputError, match="rotated by 90 degrees"):
        normalise(rgb, mask.T.copy())


def test_normalise_rejects_empty_full_and_tiny():
    rgb, mask = scene(120, 80)
    with pytest.raises(InputError, match="mask is empty"):
        normalise(rgb, np.zeros_like(mask))
    with pytest.raises(InputError, match="mask covers the whole image"):
        normalise(rgb, np.full_like(mask, 255))
    with pytest.raises(InputError, match=r"image is too small: 1x1"):
        normalise(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8))
    speck = np.zeros((800, 1200), np.uint8)
    speck[400, 600] = 255  # one pixel: gone after shrinking 1200 x 800 to 96 x 64
    big = np.zeros((800, 1200, 3), np.uint8)
    with pytest.raises(InputError, match="empty after resizing 1200x800 to 96x64"):
        normalise(big, speck, short_side=64)


def test_shrunk_mask_follows_the_majority_of_each_pixel():
    # An exact 8x reduction: every output pixel must be object exactly when the object covers more than
    # half of its 8 x 8 block (blocks at exactly one half are ties and skipped). Linear interpolation
    # would look at 2 x 2 pixels near the block's centre and disagree on many blocks.
    rng = np.random.default_rng(0)
    coarse = rng.random((64, 96)) < 0.5
    fine = np.kron(coarse, np.ones((8, 8), bool)) ^ (rng.random((512, 768)) < 0.3)  # noisy blocks
    mask = np.where(fine, 255, 0).astype(np.uint8)
    out = normalise(np.zeros((512, 768, 3), np.uint8), mask, short_side=64)
    share = fine.reshape(64, 8, 96, 8).mean(axis=(1, 3))
    decided = share != 0.5
    assert np.array_equal(out.mask[decided] > 0, share[decided] > 0.5)
