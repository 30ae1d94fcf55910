"""The LayeredSample record and its WebDataset encoding.

One schema serves every kind of layered example (docs/architecture.md, "The sample"):

* ``quadruple``: F (foreground RGBA with effects), B (background), M (box mask), C (composite),
  with the invariant ``C == round(a*F_rgb + (1-a)*B)`` per pixel;
* ``rendered``: F (a layer: e.g. a logo placed where it appears, unlit), B (the clean object), M (the
  region mask) and a C that is not their alpha blend: rendered from them by a non-linear image formation
  (shading multiplied over the layer, highlights, ink opacity and absorption, print texture, emboss:
  ``datasets/logos.py``), or a real input. The alpha-blend invariant does not hold, by design;
* ``pair``: a real composite C with background B from object removal and a surrogate foreground S;
* ``candidate``: a generated sample waiting to be scored and filtered.

The invariant is checked (``LayeredSample.validate``, and so by the shard writer) for ``quadruple`` only
(``INVARIANT_KINDS``).

Besides the serialised fields a sample carries working state between stages (the source photo, trimap,
float alpha, raw undecoded inputs) in ``work``; it never reaches a shard. A sample that failed carries a
``Failure`` and is passed through the remaining stages untouched, so that every key ends exactly once,
either in a shard or in ``failures.parquet``.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported where images are encoded or decoded: ``layerloop inspect`` reads the shard indexes
# through ``datasets.shards``, which imports this module, and decodes no image (issue #16, goal 2).

SCHEMA_VERSION = 1
PNG_DEFAULT_LEVEL = 6  # the historical bytes: PIL at compress_level 6
PNG_DEFAULT_ENCODER = "pil"
PNG_ENCODERS = ("pil", "opencv")
# "rendered": a composite made by a non-linear rendering of (F, B) (or a real input), no alpha-blend invariant
KINDS = ("quadruple", "pair", "candidate", "rendered")
INVARIANT_KINDS = ("quadruple",)  # the kinds whose C must equal round(a*F + (1-a)*B)
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")

# tar member name -> (LayeredSample attribute, PIL mode, channels)
IMAGE_MEMBERS: dict[str, tuple[str, str, int]] = {
    "composite.png": ("composite", "RGB", 3),
    "background.png": ("background", "RGB", 3),
    "foreground.png": ("foreground", "RGBA", 4),
    "mask.png": ("mask", "L", 1),
    "object_mask.png": ("object_mask", "L", 1),
}
REQUIRED_MEMBERS = ("composite.png", "background.png", "foreground.png", "mask.png")
# The ``json`` member is strict JSON (no NaN/Infinity, valid UTF-8) of at most this many bytes.
METADATA_MAX_BYTES = 1 << 20


class SampleError(ValueError):
    """A sample breaks the schema (wrong sizes, modes, key, invariant)."""


@dataclass(frozen=True)
class Failure:
    """Why one sample did not make it into a shard. ``error_type`` is the exception class name, or a
    reason category such as ``Rejected`` for samples dropped on purpose by a filter."""

    key: str
    stage: str
    error_type: str
    message: str

    def as_row(self) -> dict[str, str]:
        return {"key": self.key, "stage": self.stage, "error_type": self.error_type, "message": self.message}


@dataclass
class LayeredSample:
    key: str
    kind: str = "quadruple"
    composite: np.ndarray | None = None  # H x W x 3 uint8
    background: np.ndarray | None = None  # H x W x 3 uint8
    foreground: np.ndarray | None = None  # H x W x 4 uint8, effects (shadows) in alpha
    mask: np.ndarray | None = None  # H x W uint8, 255 inside the box / region
    object_mask: np.ndarray | None = None  # H x W uint8, optional
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    work: dict[str, Any] = field(default_factory=dict)  # stage-to-stage state, never serialised
    failure: Failure | None = None

    # ------------------------------------------------------------------ state
    @property
    def ok(self) -> bool:
        return self.failure is None

    def fail(self, stage: str, error: BaseException | str, error_type: str | None = None) -> LayeredSample:
        """Mark the sample failed; later stages skip it and the sink records it."""
        if isinstance(error, BaseException):
            error_type = error_type or type(error).__name__
            message = str(error) or repr(error)
        else:
            error_type = error_type or "Rejected"
            message = error
        self.failure = Failure(self.key, stage, error_type, message)
        self.work.clear()
        return self

    def record_stage(self, stage: str, **params: Any) -> None:
        """Record a stage's parameters and backend in the metadata (``meta['stages'][stage]``)."""
        self.meta.setdefault("stages", {})[stage] = _jsonable(params)

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) of the first image field present."""
        for attr, _, _ in IMAGE_MEMBERS.values():
            value = getattr(self, attr)
            if value is not None:
                return value.shape[0], value.shape[1]
        return None

    # ------------------------------------------------------------- validation
    def validate(self, check_invariant: bool = True) -> None:
        """Raise SampleError unless the sample is writable: key, kind, modes, sizes, and (for the kinds in
        ``INVARIANT_KINDS``, only ``quadruple``) the alpha-blend invariant; a ``rendered`` sample's C is
        not an alpha blend of its layers by design."""
        if not KEY_PATTERN.match(self.key):
            raise SampleError(f"{self.key!r}: key must match {KEY_PATTERN.pattern}")
        if self.kind not in KINDS:
            raise SampleError(f"{self.key}: kind {self.kind!r} is not one of {KINDS}")
        shape = None
        for member, (attr, _, channels) in IMAGE_MEMBERS.items():
            value = getattr(self, attr)
            if value is None:
                if member in REQUIRED_MEMBERS:
                    raise SampleError(f"{self.key}: {attr} is missing")
                continue
            if not isinstance(value, np.ndarray) or value.dtype != np.uint8:
                raise SampleError(f"{self.key}: {attr} must be a uint8 array, got {getattr(value, 'dtype', type(value))}")
            want_ndim = 2 if channels == 1 else 3
            if value.ndim != want_ndim or (channels > 1 and value.shape[2] != channels):
                raise SampleError(f"{self.key}: {attr} has shape {value.shape}, expected {channels} channel(s)")
            if shape is None:
                shape = value.shape[:2]
            elif value.shape[:2] != shape:
                raise SampleError(f"{self.key}: {attr} is {value.shape[:2]}, other layers are {shape}")
        if check_invariant and self.kind in INVARIANT_KINDS:
            err = composite_error(self.composite, self.foreground, self.background)
            if err > 1:
                raise SampleError(f"{self.key}: composite differs from a*F + (1-a)*B by {err}/255")

    # --------------------------------------------------------------- encoding
    def metadata(self) -> dict[str, Any]:
        """The ``json`` member: schema version, kind, sizes and everything stages recorded."""
        height, width = self.size or (0, 0)
        meta = {"schema_version": SCHEMA_VERSION, "kind": self.kind, "key": self.key,
                "width": width, "height": height}
        meta.update(_jsonable(self.meta))
        return meta

    def to_wds(self, png_level: int = PNG_DEFAULT_LEVEL, png_encoder: str = PNG_DEFAULT_ENCODER) -> dict[str, Any]:
        """Encode as a webdataset record: ``__key__`` plus one bytes value per tar member (PNGs by
        ``encode_png`` with ``png_level`` / ``png_encoder``)."""
        self.validate()
        record: dict[str, Any] = {"__key__": self.key}
        for member, (attr, mode, _) in IMAGE_MEMBERS.items():
            value = getattr(self, attr)
            if value is not None:
                record[member] = encode_png(value, mode, png_level, png_encoder)
        record["txt"] = _caption_bytes(self.caption)
        record["json"] = strict_json_bytes(self.metadata())
        return record

    @classmethod
    def from_wds(cls, record: dict[str, Any]) -> LayeredSample:
        """Decode a webdataset record (raw bytes per member, as ``webdataset.WebDataset`` yields them
        without a decoder; already decoded str/dict values are accepted too)."""
        key = record["__key__"]
        meta = record.get("json", b"{}")
        if isinstance(meta, (bytes, bytearray)):
            meta = json.loads(meta.decode("utf-8"))
        meta = dict(meta)
        caption = record.get("txt", b"")
        if isinstance(caption, (bytes, bytearray)):
            caption = caption.decode("utf-8")
        kind = meta.pop("kind", "quadruple")
        for derived in ("schema_version", "key", "width", "height"):
            meta.pop(derived, None)
        sample = cls(key=key, kind=kind, caption=caption, meta=meta)
        for member, (attr, mode, _) in IMAGE_MEMBERS.items():
            if member in record:
                setattr(sample, attr, decode_png(record[member], mode))
        return sample


# ---------------------------------------------------------------------- helpers
def strict_json_bytes(metadata: dict[str, Any], limit: int = METADATA_MAX_BYTES) -> bytes:
    """The ``json`` member's bytes: ``json.dumps(sort_keys=True, ensure_ascii=False)`` as UTF-8 (the same
    bytes as before for clean metadata), refused with a SampleError naming the field when it would not be
    strict JSON (NaN/Infinity, text that is not valid UTF-8, a value JSON has no type for) or when it is
    larger than ``limit`` bytes."""
    problem = _json_problem(metadata, "")
    if problem is not None:
        path, what = problem
        raise SampleError(f"metadata field {path or '(root)'} {what}: shards hold strict JSON only")
    data = json.dumps(metadata, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(data) > limit:
        sizes = {name: len(json.dumps(value, ensure_ascii=False).encode("utf-8")) for name, value in metadata.items()}
        largest = max(sizes, key=sizes.get) if sizes else "?"
        raise SampleError(f"metadata is {len(data)} bytes, more than the {limit} a shard's json member may hold "
                          f"(largest field: {largest}, {sizes.get(largest, 0)} bytes)")
    return data


def _json_problem(value: Any, path: str) -> tuple[str, str] | None:
    """(field path, what is wrong) of the first value of ``value`` that strict JSON cannot hold."""
    if isinstance(value, str):
        return _text_problem(value, path)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return path, "is NaN"
        if math.isinf(value):
            return path, "is Infinity" if value > 0 else "is -Infinity"
        return None
    if isinstance(value, dict):
        for name, inner in value.items():
            if not isinstance(name, str):
                return path, f"has a key {name!r} that is not text"
            inner_path = f"{path}.{name}" if path else name
            problem = _text_problem(name, inner_path, "has a name")
            if problem is not None:
                return safe_text(inner_path), problem[1]
            problem = _json_problem(inner, inner_path)
            if problem is not None:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for position, inner in enumerate(value):
            problem = _json_problem(inner, f"{path}[{position}]")
            if problem is not None:
                return problem
        return None
    return path, f"is a {type(value).__name__}, not a JSON value"


def _text_problem(text: str, path: str, what: str = "is text") -> tuple[str, str] | None:
    """(path, "<what> that is not valid UTF-8 (lone surrogate ... at position N ...)") or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return path, (f"{what} that is not valid UTF-8 (lone surrogate {text[error.start]!r} at position "
                      f"{error.start}; a file name that is not UTF-8?)")
    return None


def safe_text(value: Any) -> str | None:
    """``value`` as a str that any UTF-8 writer accepts: lone surrogates (from file names that are not
    UTF-8, decoded with ``surrogateescape``) become backslash escapes such as ``\\udcff``. Valid text is
    returned unchanged, so this never changes the bytes of a clean run. ``None`` stays ``None``."""
    if value is None:
        return None
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _caption_bytes(caption: Any) -> bytes:
    if not isinstance(caption, str):
        raise SampleError(f"caption is a {type(caption).__name__}, not text")
    problem = _text_problem(caption, "caption")
    if problem is not None:
        raise SampleError(f"caption {problem[1]}: shards hold UTF-8 text only")
    return caption.encode("utf-8")




def encode_png(array: np.ndarray, mode: str, level: int = PNG_DEFAULT_LEVEL,
               encoder: str = PNG_DEFAULT_ENCODER) -> bytes:
    """Deterministic PNG bytes (fixed encoder and zlib level, no metadata chunks).

    ``encoder="pil"``: Pillow (adaptive per-row filters) at ``compress_level=level``; the historical default
    at level 6. ``encoder="opencv"``: OpenCV's libpng with every row Sub-filtered and zlib's RLE strategy at
    ``level``: most of Pillow's time is choosing a filter per row, so this is several times faster at a
    similar size (``benchmarks/png_encoding.py``, issue #16). Both write plain 8-bit PNGs that any decoder
    reads; the bytes depend only on the array, the settings and the library build."""
    if encoder == "pil":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    if encoder != "opencv":
        raise ValueError(f"unknown PNG encoder {encoder!r}; choose one of {', '.join(PNG_ENCODERS)}")
    import cv2

    channels = {"L": 1, "RGB": 3, "RGBA": 4}.get(mode)
    if channels is None:
        raise ValueError(f"the opencv PNG encoder writes L, RGB and RGBA, not {mode}")
    if array.dtype != np.uint8 or (array.ndim == 2) != (channels == 1) or (channels > 1 and array.shape[2] != channels):
        raise ValueError(f"array {array.shape} {array.dtype} is not an 8-bit {mode} image")
    image = {3: lambda a: cv2.cvtColor(a, cv2.COLOR_RGB2BGR), 4: lambda a: cv2.cvtColor(a, cv2.COLOR_RGBA2BGRA)}.get(
        channels, lambda a: a)(np.ascontiguousarray(array))
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY,
                                            cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER,
                                            cv2.IMWRITE_PNG_FILTER_SUB])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} {mode} image as PNG")
    return data.tobytes()


def decode_png(data: bytes | np.ndarray | Image.Image, mode: str) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data
    from PIL import Image

    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    if image.mode != mode:  # convert() copies even when the mode already matches
        image = image.convert(mode)
    return np.asarray(image)


def composite(foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``round(a*F_rgb + (1-a)*B)`` on 8-bit layers, the one compositing rule of the project.

    Computed exactly in integers: with a = A/255 the value is N/255, N = A*F + (255-A)*B <= 65025, and
    N/255 is never a tie (255 is odd), so round() is (N + 127) // 255, in uint16. The same bytes as the
    float64 formula for every (A, F, B) (checked exhaustively when this replaced it, issue #16), 3x faster."""
    a = foreground[..., 3:4].astype(np.uint16)
    mixed = a * foreground[..., :3] + (255 - a) * background
    mixed += 127
    mixed //= 255
    return mixed.astype(np.uint8)


def quantise_foreground(fg_rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float RGB (H x W x 3) and alpha (H x W) in [0, 1] -> RGBA uint8, RGB zeroed where alpha is 0."""
    if not (np.isfinite(fg_rgb).all() and np.isfinite(alpha).all()):
        raise ValueError("fg_rgb or alpha contains NaN or infinity")
    rgb = np.rint(np.clip(fg_rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    a = np.rint(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)
    rgb[a == 0] = 0
    return np.concatenate([rgb, a[..., None]], axis=-1)


def composite_error(comp: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> int:
    """Largest per-pixel difference (in 1/255 steps) between C and ``a*F + (1-a)*B``."""
    expected = composite(foreground, background)
    return int(np.abs(expected.astype(np.int16) - comp.astype(np.int16)).max(initial=0))


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples so that metadata survives json.dumps."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
