"""Robust decoding and normalisation of source images, masks and ground-truth backgrounds.

Real data sets are messy: RGBA and palette PNGs, 16-bit scans, CMYK JPEGs, phone photos that are stored
sideways with an EXIF orientation tag, masks saved as JPEG or as coloured RGB, masks at another
resolution, truncated downloads, zero-byte files. Everything here turns such inputs into exactly what the
stages expect (docs/stage-flow.md, step 1) or raises ``InputError`` with a reason a person can act on;
the ``load`` stage records that as the sample's failure.

The rules (each chosen so that a demanding user gets the obvious result, written down because several
were judgement calls):

Decoding (``decode_image``)
  * Inputs may be a path, bytes, a PIL image or a numpy array. Multi-frame files (GIF, APNG, TIFF pages)
    use their first frame.
  * EXIF orientation is applied to every input, images and masks alike, so that everything is compared in
    the frame a person sees when opening the file. Annotators draw masks on the displayed (upright)
    photo, so a phone JPEG stored landscape with orientation 6 pairs with a portrait mask; ignoring the
    tag would pair a sideways photo with an upright mask (and fail the aspect check, or worse, pass it
    for square images with a misaligned mask).
  * Decompression bombs: the pixel count is checked from the header, after ``Image.open`` and before any
    pixel is decoded, against ``max_pixels`` (default 64 MP). ``Image.MAX_IMAGE_PIXELS`` is process
    global and is left alone; PIL's own bomb warning is silenced and its bomb error (more than twice its
    limit) becomes the same ``InputError``.
  * Zero-byte files, missing files, unknown formats and truncated or corrupt data each get their own
    message, prefixed by which input it was (image, mask, background).
  * Before a file is read whole it is checked: with ``root`` given (the dataset root, from the source's
    ``work["raw_root"]``) its path, symlinks resolved, must lie inside that root ("outside the dataset
    root"), checked again on the opened descriptor; it must be a regular file of at most
    ``max_file_bytes`` (default 256 MiB); and its first bytes must carry a known image signature: PNG,
    JPEG, GIF, WebP, BMP or TIFF (the formats the sources list, plus GIF for animations), else "not an
    image file (starts with ...)". In-memory bytes get the same size and signature checks, and a tar
    member (``tario.TarMember``) has its size from the tar header checked before its bytes are read.

Colour (``to_rgb``) -> H x W x 3 uint8
  * Transparency (RGBA, LA, PA, palette with a transparent index) is composited over neutral mid-grey
    (128, 128, 128), then dropped. The colour under fully transparent pixels is undefined (often black or
    leftover paint), so it must be replaced by something fixed; mid-grey is equally far from black and
    white objects, so neither kind of object melts into the fill, unlike a white or black fill.
  * 16-bit (I;16, I;16B, ...) is scaled by 255/65535 and rounded: the full 16-bit range maps to the full
    8-bit range. (PIL's own ``convert("L")`` clips at 255, which turns most 16-bit images white.)
  * 32-bit integer (I) and float (F) images have no fixed range, so it is taken from the values: integer
    data within 0..255 is 8-bit, within 0..65535 is 16-bit; float data within [0, 1] is scaled by 255,
    within [0, 255] is used as is; anything else is stretched from its minimum to its maximum. NaN or
    infinite values are an error (they would become arbitrary bytes).
  * CMYK is converted with its embedded ICC profile when it has one (CMYK numbers only mean a colour
    relative to a press profile), otherwise with the plain formula R = (255-C)(255-K)/255. RGB images
    are assumed to be sRGB; their profiles are not applied.

Masks (``to_mask``) -> H x W uint8, 0 or 255; a pixel is in the object when its value >= ``threshold``
  * Grayscale: the value itself. A mask whose only values are 0 and 1 is a label map (common in
    segmentation data sets) and 1 means object; with a 0..255 reading it would be empty anyway.
  * RGB (and palette, through its colours): the maximum over the channels, not the luminance, so a mask
    painted in pure red or blue (luminance 76 or 29) still counts; black stays background.
  * RGBA / LA: when the alpha varies, alpha is the mask (a cut-out saved with a transparent surrounding
    is the object, whatever its colours); when alpha is constant the colour rule above applies. This goes
    beyond "alpha only if the colours are constant": a cut-out has varying colours and still means its
    alpha.
  * 16-bit and float masks are scaled to 8 bit like images first; JPEG compression noise (values near 0
    or 255) disappears at the threshold.

Normalisation (``normalise``)
  * A mask or ground-truth background of another size than the image is resized to the image's size when
    the aspect ratios agree within 2% (masks annotated on a downscaled copy); otherwise it is an error,
    since stretching would misalign the object. A size that is the image's transposed size is reported
    as a likely EXIF rotation problem.
  * Inputs whose shorter side is below ``min_side`` (16 px) are errors: nothing useful survives upscaling.
  * The image is resized so that its shorter side is ``short_side``: INTER_AREA when shrinking (averages,
    no aliasing), INTER_CUBIC when enlarging (sharper than linear). The mask is resized as 0/255
    with INTER_AREA when shrinking and INTER_LINEAR when enlarging, then thresholded at 128 again, so it
    stays binary. When shrinking, an output pixel is thus in the object when the object covers at least
    half of its area; INTER_LINEAR would decide by the two source pixels nearest its centre, so a thin
    stroke would survive or vanish depending on where it falls (aliasing).
  * Then both sides are centre-cropped down to a multiple of ``multiple_of`` (8 by default: latent
    diffusion models work on 8x downsampled latents). Cropping, not resizing, keeps the aspect ratio and
    avoids a second resampling; at most ``multiple_of - 1`` pixels per side are lost.
  * After all that the mask must have at least one object pixel and at least one background pixel:
    an empty mask has no object to extract, a full mask leaves no background to learn from.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = 256 << 20
# Leading bytes of the image formats inputs may be in (see the module docstring).
SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("PNG", b"\x89PNG\r\n\x1a\n", 0), ("JPEG", b"\xff\xd8\xff", 0), ("GIF", b"GIF87a", 0),
    ("GIF", b"GIF89a", 0), ("WebP", b"WEBP", 8), ("BMP", b"BM", 0), ("TIFF", b"II*\x00", 0),
    ("TIFF", b"MM\x00*", 0),
)
MIN_SIDE = 16
ASPECT_TOLERANCE = 0.02
NEUTRAL_GREY = 128


class InputError(ValueError):
    """An input image, mask or background cannot be used; the message says which one and why."""


# ------------------------------------------------------------------------------------------- decoding
def image_format(head: bytes) -> str | None:
    """The format a file's first bytes announce (``SIGNATURES``), or None."""
    for name, magic, at in SIGNATURES:
        if head[at : at + len(magic)] == magic and (name != "WebP" or head[:4] == b"RIFF"):
            return name
    return None


def _check_signature(head: bytes, *, key: str, where: str) -> None:
    if head and image_format(head) is None:
        known = ", ".join(dict.fromkeys(name for name, _, _ in SIGNATURES))
        raise InputError(f"{key} is not an image file (starts with {head[:12]!r}; not an image in a known format: "
                         f"{known}): {where}")


def _check_bytes(n: int, *, key: str, where: str, max_file_bytes: int | None) -> None:
    if max_file_bytes is not None and n > max_file_bytes:
        raise InputError(f"{key} file is too large: {n} bytes > {max_file_bytes} byte limit (max_file_bytes): {where}")


def read_input_file(path: str | Path, *, key: str, root: str | None = None,
                    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of one input file, after the checks in the module docstring (root, regular file, size,
    signature), each failing with an ``InputError`` naming the file."""
    import os
    import stat

    from layerloop.datasets.base import OutsideRootError, check_inside_root, readable

    where = readable(str(path))
    root = os.path.realpath(root) if root is not None else None
    try:
        check_inside_root(path, root, f"{key} file")
    except OutsideRootError as error:
        raise InputError(str(error)) from None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{key} file is missing: {where}") from None
    except OSError as error:
        raise InputError(f"{key} file cannot be read: {where}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{key} path is not a file: {where}")
    _check_bytes(info.st_size, key=key, where=where, max_file_bytes=max_file_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise InputError(f"{key} file cannot be opened: {where}: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as f:
        if root is not None and os.path.isdir("/proc/self/fd"):
            # the file actually opened (a link may have been swapped since the check above)
            opened = os.path.realpath(f"/proc/self/fd/{fd}")
            if os.path.commonpath([opened, root]) != root:
                raise InputError(f"{key} file is outside the dataset root: {where} (it was replaced by a link to "
                                 f"{readable(opened)} while being opened)")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{key} path is not a file: {where}")
        _check_bytes(info.st_size, key=key, where=where, max_file_bytes=max_file_bytes)
        head = f.read(16)
        _check_signature(head, key=key, where=where)
        limit = -1 if max_file_bytes is None else max_file_bytes + 1 - len(head)
        data = head + f.read(limit)
    _check_bytes(len(data), key=key, where=where, max_file_bytes=max_file_bytes)  # it grew meanwhile
    return data


def decode_image(raw: Any, *, key: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES, root: str | None = None) -> Image.Image:
    """Decode one input into an upright, fully loaded PIL image.

    ``key`` names the input in messages ("image", "mask", "background"); ``root``, when given, is the
    dataset root a path input must lie in; ``max_file_bytes`` caps what is read (None: no cap)."""
    from layerloop.datasets.base import readable
    from layerloop.datasets.tario import TarMember, TarReadError

    if raw is None:
        raise InputError(f"{key} is missing: the source gave none")
    if isinstance(raw, np.ndarray):
        image = array_to_pil(raw, key=key)
        check_size(image.size, key=key, max_pixels=max_pixels)
        return image
    if isinstance(raw, Image.Image):
        # An already decoded image may still carry its EXIF tag (a caller's Image.open result).
        check_size(raw.size, key=key, max_pixels=max_pixels)
        return _load_upright(raw, key=key, where="in-memory image")
    if isinstance(raw, (str, Path)):
        data = read_input_file(raw, key=key, root=root, max_file_bytes=max_file_bytes)
        where = readable(str(raw))
    elif isinstance(raw, TarMember):
        where = readable(f"{raw.name} of {raw.url}")
        _check_bytes(raw.size, key=key, where=where, max_file_bytes=max_file_bytes)
        try:
            data = raw.read(max_bytes=max_file_bytes)
        except TarReadError as error:
            raise InputError(f"{key}: {readable(str(error))}") from None
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        where = f"{len(data)} bytes in memory"
        _check_bytes(len(data), key=key, where=where, max_file_bytes=max_file_bytes)
    else:
        raise InputError(f"{key} has an unsupported type {type(raw).__name__} (expected a path, bytes, "
                         "PIL image or numpy array)")
    if data:
        _check_signature(data[:16], key=key, where=where)
    if not data:
        raise InputError(f"{key} is a zero-byte file: {where}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # PIL refused before we could read the size; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "more pixels than PIL allows"
        raise InputError(f"{key} is too large: {size} > {max_pixels / 1e6:g} MP limit ({where})") from None
    except UnidentifiedImageError:
        raise InputError(f"{key} is not an image in a known format (or its header is corrupt): {where}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
        raise InputError(f"{key} header is truncated or corrupt: {where}: {error}") from None
    check_size(image.size, key=key, max_pixels=max_pixels)
    return _load_upright(image, key=key, where=where)


def check_size(size: tuple[int, int], *, key: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(f"{key} is too large: {width}x{height} > {max_pixels / 1e6:g} MP limit")


def _load_upright(image: Image.Image, *, key: str, where: str) -> Image.Image:
    fmt = image.format or "image"
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError) as error:
        raise InputError(f"{key} is truncated or corrupt ({fmt}): {where}: {error}") from None
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as error:  # malformed EXIF: guessing the orientation could misalign image and mask
        raise InputError(f"{key} has an unreadable EXIF orientation ({fmt}): {where}: {error}") from None
    return upright if upright is not None else image


def array_to_pil(array: np.ndarray, *, key: str) -> Image.Image:
    """A numpy array as the PIL image it describes (2-D gray, or H x W x 1/3/4)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"{key} array has shape {a.shape}; expected H x W or H x W x 3/4")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        # PIL picks the mode from the dtype: uint8 -> L, uint16 -> I;16, int32 -> I, float32 -> F
        if a.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(a))
        if a.dtype == np.uint16:
            return Image.fromarray(np.ascontiguousarray(a, dtype="<u2"))
        if np.issubdtype(a.dtype, np.integer):
            return Image.fromarray(np.ascontiguousarray(a, dtype="<i4"))
        if np.issubdtype(a.dtype, np.floating):
            return Image.fromarray(np.ascontiguousarray(a, dtype="<f4"))
    else:
        if a.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(a))
        if np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
            # PIL has no 16-bit or float colour modes: bring each channel to 8 bit by the gray rules.
            channels = [_to_uint8(a[..., c], key=key, integer=np.issubdtype(a.dtype, np.integer))
                        for c in range(a.shape[2])]
            return Image.fromarray(np.stack(channels, axis=-1))
    raise InputError(f"{key} array has unsupported dtype {a.dtype}")


# ----------------------------------------------------------------------------------- colour and masks
def _to_uint8(values: np.ndarray, *, key: str, integer: bool) -> np.ndarray:
    """One channel of any depth to uint8 by the range rules in the module docstring."""
    if values.dtype == np.uint8:
        return values
    v = values.astype(np.float64)
    if not np.isfinite(v).all():
        raise InputError(f"{key} has NaN or infinite pixel values (float image)")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if values.dtype == np.uint16 or values.dtype == np.dtype(">u2"):
        scaled = v * (255.0 / 65535.0)
    elif integer and lo >= 0 and hi <= 255:
        scaled = v
    elif integer and lo >= 0 and hi <= 65535:
        scaled = v * (255.0 / 65535.0)
    elif not integer and lo >= 0 and hi <= 1:
        scaled = v * 255.0
    elif not integer and lo >= 0 and hi <= 255:
        scaled = v
    elif hi > lo:
        scaled = (v - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(v)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_uint8(image: Image.Image, *, key: str) -> np.ndarray:
    """Single-channel modes (1, L, I;16*, I, F) as H x W uint8."""
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    if image.mode == "L":
        return np.asarray(image)
    array = np.asarray(image)
    return _to_uint8(array, key=key, integer=image.mode != "F")


def _over_grey(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    mixed = alpha * rgba[..., :3].astype(np.float64) + (1.0 - alpha) * NEUTRAL_GREY
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> np.ndarray:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"),
                                                  outputMode="RGB")
            if converted is not None:
                return np.asarray(converted)
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: the plain formula below is still a sensible colour
    cmyk = np.asarray(image).astype(np.float64)
    white = (255.0 - cmyk[..., 3:4]) / 255.0
    return np.clip(np.rint((255.0 - cmyk[..., :3]) * white), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, *, key: str = "image") -> np.ndarray:
    """Any PIL image as H x W x 3 uint8 RGB (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image).copy()
    if mode == "P":
        has_alpha = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        image = image.convert("RGBA" if has_alpha else "RGB")
        return to_rgb(image, key=key)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _over_grey(np.asarray(image.convert("RGBA")))
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        gray = _gray_uint8(image, key=key)
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        return np.asarray(image.convert("RGB")).copy()  # YCbCr, LAB, HSV: PIL converts these exactly
    except (ValueError, OSError) as error:
        raise InputError(f"{key} has an unsupported colour mode {mode}: {error}") from None


def to_mask(image: Image.Image, threshold: int = 128, *, key: str = "mask") -> np.ndarray:
    """Any PIL image as a binary H x W uint8 mask, 0 or 255 (rules in the module docstring)."""
    mode = image.mode
    if mode == "P":
        has_alpha = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        return to_mask(image.convert("RGBA" if has_alpha else "RGB"), threshold, key=key)
    if mode in ("RGBa", "La", "PA"):
        return to_mask(image.convert("RGBA" if mode != "La" else "LA"), threshold, key=key)
    if mode in ("RGBA", "LA"):
        array = np.asarray(image)
        alpha = array[..., -1]
        if alpha.min() != alpha.max():
            values = alpha
        else:
            values = array[..., :-1].max(axis=2)
    elif mode == "RGB":
        values = np.asarray(image).max(axis=2)
    elif mode == "CMYK":
        values = to_rgb(image, key=key).max(axis=2)
    elif mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        raw = np.asarray(image)
        if mode != "F" and raw.size and raw.max() == 1 and raw.min() >= 0:
            return np.where(raw >= 1, 255, 0).astype(np.uint8)  # a 0/1 label map
        values = _gray_uint8(image, key=key)
    else:
        values = to_rgb(image, key=key).max(axis=2)
    return np.where(values >= threshold, 255, 0).astype(np.uint8)


# -------------------------------------------------------------------------------------- normalisation
@dataclass
class Normalised:
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W uint8, 0/255
    background: np.ndarray | None  # H x W x 3 uint8 or None
    original_size: tuple[int, int]  # (width, height) of the decoded, upright image
    crop: tuple[int, int, int, int]  # (x0, y0, x1, y1) kept from the resized image, exclusive ends


def _wh(array: np.ndarray) -> tuple[int, int]:
    return int(array.shape[1]), int(array.shape[0])


def _match_size(array: np.ndarray, size: tuple[int, int], *, key: str, is_mask: bool) -> np.ndarray:
    """Resize a mask/background to the image's (width, height) when only the scale differs."""
    if _wh(array) == size:
        return array
    (w, h), (iw, ih) = _wh(array), size
    if (w, h) == (ih, iw):
        raise InputError(f"{key} is {w}x{h} but the image is {iw}x{ih}: it looks rotated by 90 degrees "
                         "(an EXIF orientation applied to one file but not the other?)")
    ratio = (w / h) / (iw / ih)
    if abs(ratio - 1.0) > ASPECT_TOLERANCE:
        raise InputError(f"{key} is {w}x{h} but the image is {iw}x{ih}: aspect ratios {w / h:.3f} and "
                         f"{iw / ih:.3f} differ by more than {ASPECT_TOLERANCE:.0%}")
    return _resize(array, size, is_mask=is_mask)


def _resize(array: np.ndarray, size: tuple[int, int], *, is_mask: bool) -> np.ndarray:
    w, h = _wh(array)
    if (w, h) == size:
        return array
    shrinking = size[0] * size[1] < w * h
    if is_mask:
        resized = cv2.resize(array, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        return np.where(resized >= 128, 255, 0).astype(np.uint8)
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _check_min_side(array: np.ndarray, *, key: str, min_side: int) -> None:
    w, h = _wh(array)
    if min(w, h) < min_side:
        raise InputError(f"{key} is too small: {w}x{h} (its shorter side is under {min_side} px)")


def normalise(image: np.ndarray, mask: np.ndarray, background: np.ndarray | None = None, *,
              short_side: int | None = 512, multiple_of: int = 8, min_side: int = MIN_SIDE) -> Normalised:
    """Bring image, mask and optional background to one normalised size (rules in the module docstring).

    ``short_side=None`` keeps the image's scale; ``multiple_of=1`` disables the crop."""
    _check_min_side(image, key="image", min_side=min_side)
    _check_min_side(mask, key="mask", min_side=min_side)
    if background is not None:
        _check_min_side(background, key="background", min_side=min_side)
    original = _wh(image)
    mask = _match_size(mask, original, key="mask", is_mask=True)
    if background is not None:
        background = _match_size(background, original, key="background", is_mask=False)
    had_object = bool(mask.any())

    size = original
    if short_side:
        scale = short_side / min(original)
        w, h = original
        # the shorter side lands exactly on short_side; the longer one is rounded
        size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
    image = _resize(image, size, is_mask=False)
    mask = _resize(mask, size, is_mask=True)
    if background is not None:
        background = _resize(background, size, is_mask=False)

    w, h = size
    m = max(1, int(multiple_of))
    cw, ch = (w // m) * m, (h // m) * m
    if cw == 0 or ch == 0:
        raise InputError(f"image is {w}x{h} after resizing, smaller than the multiple of {m} it must be cropped to")
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    crop = (x0, y0, x0 + cw, y0 + ch)
    image = np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw])
    mask = np.ascontiguousarray(mask[y0 : y0 + ch, x0 : x0 + cw])
    if background is not None:
        background = np.ascontiguousarray(background[y0 : y0 + ch, x0 : x0 + cw])

    covered = int(np.count_nonzero(mask))
    if covered == 0:
        if had_object:
            raise InputError(f"mask is empty after resizing {original[0]}x{original[1]} to {w}x{h} and "
                             "cropping: the object is too small or lies in the cropped margin")
        raise InputError("mask is empty: no pixel is marked as object")
    if covered == mask.size:
        raise InputError("mask covers the whole image: there is no background around the object")
    return Normalised(image, mask, background, original, crop)
