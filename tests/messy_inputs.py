"""A small RORem folder with one entry per kind of messy input, for tests of sources and the load stage.

``make_messy_rorem(root)`` writes ``root/source``, ``root/mask``, ``root/GT`` and ``root/meta.json`` and
returns ``{source_id: expected failure substring or None}``; None means the entry must load. Ids are the
source files' stems (entries carry no ``id`` field), so a non-ASCII file name also gives a non-ASCII id.
An unreadable meta line (JSON-lines variant only) appears as ``meta-line-N``, the id its listing failure
is keyed by.

Each image shows a bright object (``OBJECT``) on a dark gradient, and its mask marks exactly that object,
so a test can check that mask and image still line up after decoding, rotation and resizing.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OBJECT = (230, 200, 40)  # bright yellow: max channel 230, far from the dark background
WIDTH, HEIGHT = 120, 80  # default image size (landscape)


def scene(width: int = WIDTH, height: int = HEIGHT, box: tuple[int, int, int, int] | None = None):
    """(RGB image, L mask) with a rectangle object; ``box`` = (x0, y0, x1, y1), default top-left-ish."""
    x0, y0, x1, y1 = box or (width // 6, height // 6, width // 2, height // 2)
    ramp = np.linspace(10, 70, width, dtype=np.float64)[None, :, None]
    image = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    image[..., 2] = 90  # a little blue so the background is not gray
    image[y0:y1, x0:x1] = OBJECT
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return image, mask


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` in its header but holds almost no data: a decompression-bomb
    stand-in that costs nothing to write (the size guard must fire before any pixel is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_messy_rorem(root: Path, meta_format: str = "jsonl") -> dict[str, str | None]:
    """Write the messy RORem folder under ``root``; ``meta_format`` is ``"jsonl"`` (one entry per line,
    plus one unreadable line) or ``"json"`` (a JSON list)."""
    root = Path(root)
    for folder in ("source", "mask", "GT"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    expected: dict[str, str | None] = {}

    def add(stem: str, expect: str | None, image: Image.Image | bytes | None, mask: Image.Image | bytes,
            gt: Image.Image | None = None, image_ext: str = "png", mask_ext: str = "png", **extra) -> None:
        entry = {"source": f"source/{stem}.{image_ext}", "mask": f"mask/{stem}.{mask_ext}"}
        if isinstance(image, bytes):
            (root / entry["source"]).write_bytes(image)
        elif image is not None:
            image.save(root / entry["source"])
        if isinstance(mask, bytes):
            (root / entry["mask"]).write_bytes(mask)
        else:
            mask.save(root / entry["mask"], **({"quality": 60} if mask_ext == "jpg" else {}))
        if gt is not None:
            entry["GT"] = f"GT/{stem}.png"
            gt.save(root / entry["GT"])
        entry.update(extra)
        entries.append(entry)
        expected[stem] = expect

    rgb, mask = scene()
    background = rgb.copy()
    background[mask > 0] = (40, 40, 90)  # the object removed
    add("good", None, Image.fromarray(rgb), Image.fromarray(mask), Image.fromarray(background),
        caption="a yellow box on a dark wall")

    rgba = np.dstack([rgb, np.full(mask.shape, 255, np.uint8)])
    rgba[-10:, :, 3] = 0  # a transparent strip: composited over grey, not left as undefined colour
    add("rgba", None, Image.fromarray(rgba, "RGBA"), Image.fromarray(mask))

    # Palette with a transparent entry: quantise to 15 colours, then paint a bottom strip with an extra
    # index 15 that is the only transparent one (so the object's own colour stays opaque).
    palette = Image.fromarray(rgb).quantize(colors=15)
    indices = np.asarray(palette).copy()
    indices[-10:, :] = 15
    colours = palette.getpalette()[: 15 * 3] + [255, 0, 255]  # magenta under transparency must not show
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette(colours)
    palette.info["transparency"] = 15
    add("palette", None, palette, Image.fromarray(mask))

    add("gray", None, Image.fromarray(rgb).convert("L"), Image.fromarray(mask))

    gray16 = (np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257)  # full 16-bit range
    add("gray16", None, Image.fromarray(gray16), Image.fromarray(mask))

    cmyk = Image.fromarray(rgb).convert("CMYK")
    add("cmyk", None, cmyk, Image.fromarray(mask), image_ext="jpg")

    # A phone photo: the sensor stores it landscape with EXIF orientation 6 ("rotate 90 degrees clockwise
    # to display"). Annotators draw on the displayed, portrait photo, so the mask is stored portrait, in
    # the displayed frame; the loader must apply the orientation to match it.
    upright, upright_mask = scene(HEIGHT, WIDTH, box=(10, 10, 40, 50))  # portrait 80 x 120
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_path = root / "source" / "exif_rotated.jpg"
    stored.save(exif_path, quality=95, exif=exif.tobytes())
    add("exif_rotated", None, None, Image.fromarray(upright_mask), image_ext="jpg")

    red_mask = np.zeros((*mask.shape, 3), np.uint8)
    red_mask[mask > 0] = (255, 0, 0)  # luminance 76: only the max-channel rule reads this as object
    add("mask_rgb", None, Image.fromarray(rgb), Image.fromarray(red_mask))

    add("mask_jpeg", None, Image.fromarray(rgb), Image.fromarray(mask), mask_ext="jpg")

    small = Image.fromarray(mask).resize((WIDTH // 2, HEIGHT // 2), Image.Resampling.NEAREST)
    add("mask_small", None, Image.fromarray(rgb), small)

    add("mask_aspect", "aspect ratios", Image.fromarray(rgb), Image.fromarray(np.full((120, 120), 255, np.uint8)))
    add("mask_empty", "mask is empty", Image.fromarray(rgb), Image.fromarray(np.zeros_like(mask)))
    add("mask_full", "mask covers the whole image", Image.fromarray(rgb), Image.fromarray(np.full_like(mask, 255)))
    add("missing_source", "image file is missing", None, Image.fromarray(mask))

    whole = png_bytes(Image.fromarray(rgb))
    add("truncated", "truncated or corrupt", whole[: len(whole) // 2], Image.fromarray(mask))
    add("zero_byte", "zero-byte file", b"", Image.fromarray(mask))

    tiny_rgb, tiny_mask = scene(12, 12, box=(3, 3, 8, 8))
    add("tiny", "too small", Image.fromarray(tiny_rgb), Image.fromarray(tiny_mask))

    add("huge", "image is too large", huge_png_header(20000, 20000), Image.fromarray(mask))

    nan = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255.0
    nan[5, 5] = np.nan
    add("float_nan", "NaN", Image.fromarray(nan, "F"), Image.fromarray(mask), image_ext="tif")

    add("café_ñ", None, Image.fromarray(rgb), Image.fromarray(mask), caption="non-ASCII file name")

    lines = [json.dumps(entry, ensure_ascii=False) for entry in entries]
    if meta_format == "jsonl":
        bad_line = len(lines) // 2 + 1  # 1-based line number of the broken line
        lines.insert(bad_line - 1, '{"source": "source/good.png", "mask": ')  # cut off mid-entry
        expected[f"meta-line-{bad_line}"] = "not valid JSON"
        text = "\n".join(lines) + "\n"
    elif meta_format == "json":
        text = json.dumps(entries, ensure_ascii=False, indent=1)
    else:
        raise ValueError(f"meta_format must be 'jsonl' or 'json', not {meta_format!r}")
    (root / "meta.json").write_text(text, encoding="utf-8")
    return expected
