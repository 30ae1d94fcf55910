"""The bad-input corpus: ``tests/messy_inputs.py`` plus the kinds issue 7 adds, in one RORem folder.

``make_bad_rorem(root)`` first writes the messy folder (``make_messy_rorem``, JSON-lines variant), then
adds more files and appends more ``meta.json`` lines. It returns a ``Corpus`` that says, per source id,
what must happen: land in a shard, fail while loading with a given message, fail while listing (bad
``meta.json`` lines, keyed ``meta-line-N``), or be reported as a duplicate of an id that lands.

Added kinds (each image still shows ``messy_inputs.OBJECT`` on a dark gradient, with a matching mask):
truncated JPEG images and masks (in the data and in the header), a truncated PNG mask, zero-byte masks
and backgrounds, 1x1 images, decompression-bomb headers (20000 x 20000) as mask and as background, float
TIFF masks holding NaN or infinity, a file that is not an image, a missing mask, a non-UTF-8
``meta.json`` line, a line that is JSON but not an object, entries without a mask path or with a
non-string source, a duplicate id, ids that only differ in non-ASCII letters (must stay distinct keys),
and non-ASCII, space and dot-laden directory and file names.

Read safety (``tests/datasets/test_read_safety.py`` has the other source types): entries whose paths
escape the root (``../outside.png``, ``/etc/hostname``, a symlink in ``source/`` to a file outside, a
path through a symlinked directory that points outside) are listing failures keyed by their id
("outside the dataset root: <path>", in ``Corpus.outside``), while a symlink that stays inside lands. A
``meta.json`` line nested 200k deep, one nested 5000 deep (small enough to parse, too deep for the
parser), one 40 deep, a 2 MiB line, NaN / Infinity / -Infinity values, an oversized entry and an integer
beyond 64 bits and a path holding a NUL character are each one listing failure naming the line.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from tests.messy_inputs import huge_png_header, make_messy_rorem, png_bytes, scene

BAD_STAGE_LOAD = "load"
BAD_STAGE_LIST = "list"


@dataclass
class Corpus:
    root: Path
    good: set[str] = field(default_factory=set)  # source ids that must land in a shard
    failing: dict[str, str] = field(default_factory=dict)  # source id -> expected message text (load stage)
    listing: dict[str, str] = field(default_factory=dict)  # meta-line-N -> expected message text (list stage)
    duplicates: dict[str, str] = field(default_factory=dict)  # id that lands once -> text of the duplicate's failure
    outside: dict[str, str] = field(default_factory=dict)  # id -> expected message text (list stage, OutsideRoot)
    outside_dir: Path | None = None  # files there must never be opened


@contextlib.contextmanager
def record_opens(folder: Path | None) -> Iterator[list[str]]:
    """Within the block, every ``open``/``os.open`` of a path that resolves into ``folder`` is recorded
    (in this process: the local executor), so a test can show that files outside a root are never read."""
    opened: list[str] = []
    if folder is None:
        yield opened
        return
    target = os.path.realpath(folder)
    real_open, real_os_open = builtins.open, os.open

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            resolved = os.path.realpath(os.fsdecode(path))
            if resolved == target or resolved.startswith(target + os.sep):
                opened.append(resolved)

    def open_(file, *args, **kwargs):
        note(file)
        return real_open(file, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        note(path)
        return real_os_open(path, *args, **kwargs)

    builtins.open, io.open, os.open = open_, open_, os_open
    try:
        yield opened
    finally:
        builtins.open, io.open, os.open = real_open, real_open, real_os_open


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def tiff_float_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32), "F").save(buffer, format="TIFF")
    return buffer.getvalue()


def make_bad_rorem(root: Path) -> Corpus:
    root = Path(root)
    messy = make_messy_rorem(root, meta_format="jsonl")
    corpus = Corpus(root)
    for sid, reason in messy.items():
        if reason is None:
            corpus.good.add(sid)
        elif sid.startswith("meta-line-"):
            corpus.listing[sid] = reason
        else:
            corpus.failing[sid] = reason

    rgb, mask = scene()
    image_png = png_bytes(Image.fromarray(rgb))
    mask_png = png_bytes(Image.fromarray(mask))
    lines: list[bytes] = []

    def put(relative: str, data: bytes) -> str:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return relative

    def add(sid: str, expect: str | None, image: bytes | None, mask_data: bytes | None, *,
            image_name: str | None = None, mask_name: str | None = None, gt: bytes | None = None,
            entry_id: str | None = None) -> None:
        entry: dict = {"source": f"source/{image_name or sid + '.png'}", "mask": f"mask/{mask_name or sid + '.png'}"}
        if image is not None:
            put(entry["source"], image)
        if mask_data is not None:
            put(entry["mask"], mask_data)
        if gt is not None:
            entry["GT"] = put(f"GT/{sid}.png", gt)
        if entry_id is not None:
            entry["id"] = entry_id
        lines.append(json.dumps(entry, ensure_ascii=False).encode("utf-8"))
        if expect is None:
            corpus.good.add(entry_id or sid)
        elif entry_id is None or entry_id == sid:
            corpus.failing[sid] = expect

    whole_jpeg = jpeg_bytes(Image.fromarray(rgb))
    add("truncated_jpeg", "image is truncated or corrupt (JPEG)", whole_jpeg[: len(whole_jpeg) // 2], mask_png,
        image_name="truncated_jpeg.jpg")
    mask_jpeg = jpeg_bytes(Image.fromarray(mask))
    # cut inside the JPEG header (quantisation/Huffman tables): PIL fails while opening, not while decoding
    add("mask_jpeg_header_cut", "mask header is truncated or corrupt", image_png, mask_jpeg[:200],
        mask_name="mask_jpeg_header_cut.jpg")
    add("mask_truncated_jpeg", "mask is truncated or corrupt (JPEG)", image_png,
        mask_jpeg[: len(mask_jpeg) - len(mask_jpeg) // 4], mask_name="mask_truncated_jpeg.jpg")
    add("mask_truncated_png", "mask is truncated or corrupt (PNG)", image_png, mask_png[: len(mask_png) // 2])
    add("mask_zero_byte", "mask is a zero-byte file", image_png, b"")
    add("gt_zero_byte", "background is a zero-byte file", image_png, mask_png, gt=b"")
    one = np.zeros((1, 1, 3), np.uint8)
    one[0, 0] = (230, 200, 40)
    add("one_by_one", "image is too small: 1x1", png_bytes(Image.fromarray(one)),
        png_bytes(Image.fromarray(np.full((1, 1), 255, np.uint8))))
    add("mask_huge", "mask is too large", image_png, huge_png_header(20000, 20000))
    add("gt_huge", "background is too large", image_png, mask_png, gt=huge_png_header(20000, 20000))

    nan_mask = mask.astype(np.float32) / 255.0
    nan_mask[3, 3] = np.nan  # one NaN pixel: thresholding would silently call it background
    add("mask_float_nan", "mask has NaN or infinite pixel values", image_png, tiff_float_bytes(nan_mask),
        mask_name="mask_float_nan.tif")
    inf_mask = mask.astype(np.float32) / 255.0
    inf_mask[-1, -1] = np.inf
    add("mask_float_inf", "mask has NaN or infinite pixel values", image_png, tiff_float_bytes(inf_mask),
        mask_name="mask_float_inf.tif")
    add("not_an_image", "image is not an image file (starts with b'this is a te'",
        b"this is a text file, not a PNG\n" * 4,
        mask_png)
    add("missing_mask", "mask file is missing", image_png, None)

    # Names that are legal on disk but not as webdataset keys: non-ASCII directories and files, spaces,
    # several dots (webdataset splits a member name at the first dot). They must land under safe keys.
    add("données-猫", None, image_png, mask_png, image_name="données/猫 photo.v2.png",
        mask_name="masques/猫 photo.v2.png", entry_id="données-猫")
    add("emoji", None, image_png, mask_png, image_name="🙂 dir/a b.c.png", mask_name="🙂 dir/a b.c.png",
        entry_id="emoji 🙂.x")
    # Two ids that clean to the same key text ("bad_dup-") must still get distinct keys (hash suffix).
    add("dup_accent_e", None, image_png, mask_png, entry_id="dup é")
    add("dup_accent_e2", None, image_png, mask_png, entry_id="dup è")
    # A second entry with the id of messy's "good": reported as a duplicate, the first one kept.
    put("source/good_again.png", image_png)
    lines.append(json.dumps({"source": "source/good_again.png", "mask": "mask/good.png", "id": "good"}).encode())
    corpus.duplicates["good"] = "already used by"

    # Paths that escape the dataset root: listing failures, the files are never opened. The targets are
    # valid images, so a read would show up as a landed sample.
    outside = root.parent / f"{root.name}-outside"
    corpus.outside_dir = outside
    (outside / "dir").mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(image_png)
    (outside / "dir" / "secret.png").write_bytes(image_png)
    escapes = [
        ("escape_dotdot", f"../{outside.name}/secret.png",
         f"outside the dataset root: {root}/../{outside.name}/secret.png"),
        ("escape_absolute", "/etc/hostname", "outside the dataset root: /etc/hostname"),
        ("escape_file_link", "source/link_out.png", f"outside the dataset root: {root}/source/link_out.png"),
        ("escape_dir_link", "source/linked_dir/secret.png",
         f"outside the dataset root: {root}/source/linked_dir/secret.png"),
    ]
    (root / "source" / "link_out.png").symlink_to(outside / "secret.png")
    (root / "source" / "linked_dir").symlink_to(outside / "dir", target_is_directory=True)
    for sid, source_path, expected in escapes:
        lines.append(json.dumps({"source": source_path, "mask": "mask/good.png", "id": sid}).encode())
        corpus.outside[sid] = expected
    lines.append(json.dumps({"source": "source/good.png", "mask": f"../{outside.name}/secret.png",
                             "id": "escape_mask"}).encode())
    corpus.outside["escape_mask"] = f"mask file is outside the dataset root: {root}/../{outside.name}/secret.png"
    # a symlink that stays inside the root is fine
    (root / "source" / "alias_inside.png").symlink_to(root / "source" / "good.png")
    lines.append(json.dumps({"source": "source/alias_inside.png", "mask": "mask/good.png",
                             "id": "alias_inside"}).encode())
    corpus.good.add("alias_inside")

    # Unreadable or unusable meta.json lines, appended after the entries above.
    existing = (root / "meta.json").read_bytes()
    long_line = b'{"source": "source/good.png", "mask": "mask/good.png", "pad": "' + b"x" * (2 << 20) + b'"}'
    first = len(existing.splitlines()) + len(lines) + 1
    broken = [
        (b'{"source": "source/x.png", "mask": "mask/\xff\xfe.png"}', "is not UTF-8 text"),
        (b'["source/x.png", "mask/x.png"]', "is not a JSON object"),
        (json.dumps({"source": "source/good.png"}).encode(), "has no 'mask' path"),
        (json.dumps({"source": 5, "mask": "mask/good.png"}).encode(), "has no 'source' path"),
        (b'{"source": "source/good.png", "mask": "mask/good.png",', "is not valid JSON"),
        (b"[" * 200_000 + b"]" * 200_000, "is 400000 bytes, over the 65536-byte limit for one entry"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
         "is nested too deeply to parse"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "x": ' + b"[" * 40 + b"]" * 40 + b"}",
         "is nested more than 32 levels deep"),
        (long_line, f"is longer than 1048576 bytes ({len(long_line)} bytes): not read"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "id": "nan", "score": NaN}',
         "holds the non-finite number NaN (field 'score')"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "id": "inf", "stats": {"max": Infinity}}',
         "holds the non-finite number Infinity (field 'stats'.max)"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "id": "ninf", "v": [1, -Infinity]}',
         "holds the non-finite number -Infinity (field 'v'[1])"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "id": "big", "blob": "' + b"y" * 70_000 + b'"}',
         "over the 65536-byte limit for one entry"),
        (b'{"source": "source/good.png", "mask": "mask/good.png", "id": "bigint", "n": 1' + b"0" * 30 + b"}",
         "holds an integer beyond 64 bits (field 'n')"),
        (b'{"source": "source/good\\u0000.png", "mask": "mask/good.png"}', "has a path holding a NUL character"),
    ]
    for offset, (line, reason) in enumerate(broken):
        lines.append(line)
        corpus.listing[f"meta-line-{first + offset}"] = reason
    (root / "meta.json").write_bytes(existing + b"\n".join(lines) + b"\n")
    return corpus
