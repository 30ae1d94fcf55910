"""Layered results as files that image editors open with their layers: Photoshop PSD, through psd-tools.

``write_psd(path, background, layers)`` writes an 8-bit RGB document of the background's size: the background
as the bottom, opaque layer, then each RGBA layer (back to front) as a named pixel layer with its own
transparency, cropped to the bounding box of its non-zero alpha and placed at that offset (as an editor
stores a layer; a fully transparent layer keeps the whole canvas). Pixels are stored losslessly (RLE) and
unpremultiplied, as the layers are, so every layer reads back exactly. The merged image that viewers and
thumbnails show is psd-tools' composite of the layers (normal blending).

Each layer's channels are written red, green, blue, then transparency (ids 0, 1, 2, -1). psd-tools writes the
transparency first, as Photoshop does; the format lists each channel's id, and Photoshop, GIMP and psd-tools
read by id, but Pillow's PSD reader takes a layer's channels in file order as R, G, B, A, and read such a
layer with its colours shifted by one channel. In R, G, B, A order every one of them reads it right
(``tests/test_export.py`` reads the files back with Pillow).

``stored_sample(run_dir, key)`` reads one committed sample of a run directory and ``sample_layers(sample)``
gives its background and foreground layer, for ``layerloop export-layers``. psd-tools is imported only when a
file is written, so the command line stays light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from layerloop.files import atomic_path
from layerloop.samples import LayeredSample

__all__ = ["write_psd", "alpha_bbox", "stored_sample", "sample_layers", "layer_name", "parse_layer_spec"]

NAME_CHARS = 80  # layer names are cut to this many characters (PSD's legacy name field holds 255 bytes)


def alpha_bbox(layer: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), ends exclusive, of an RGBA layer's non-zero alpha; None when it is fully transparent."""
    alpha = layer[..., 3] > 0
    if not alpha.any():
        return None
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def layer_name(text: str, fallback: str) -> str:
    """A layer name from a caption: one line, at most ``NAME_CHARS`` characters, ``fallback`` when empty."""
    name = " ".join(str(text or "").split())
    return (name[: NAME_CHARS - 1] + "…" if len(name) > NAME_CHARS else name) or fallback


def _rgb_then_alpha(layer) -> None:
    """Reorder a psd-tools pixel layer's channels to ids 0, 1, 2, -1 (see the module docstring)."""
    info, data = layer._record.channel_info, layer._channels
    ids = [int(channel.id) for channel in info]
    if sorted(ids) != [-1, 0, 1, 2] or len(data) != len(info):
        raise RuntimeError(f"psd-tools wrote channels {ids} for an RGBA layer (expected -1, 0, 1, 2): this version "
                           "of psd-tools is not one layerloop was tested with")
    order = sorted(range(len(ids)), key=lambda i: (ids[i] < 0, ids[i]))
    layer._record.channel_info = [info[i] for i in order]
    data[:] = [data[i] for i in order]


def write_psd(path: str | os.PathLike, background: np.ndarray, layers: Sequence[tuple[str, np.ndarray]],
              background_name: str = "background") -> Path:
    """Write ``background`` (H, W, 3 uint8, the bottom layer) and ``layers`` ((name, H x W x 4 uint8 RGBA),
    back to front) as a layered PSD at ``path`` (atomically); returns the path."""
    from psd_tools import PSDImage

    background = np.ascontiguousarray(background, dtype=np.uint8)
    if background.ndim != 3 or background.shape[2] != 3:
        raise ValueError(f"the background must be H x W x 3 uint8, got {background.shape}")
    height, width = background.shape[:2]
    document = PSDImage.new("RGB", (width, height))

    def add(pixels: np.ndarray, name: str, top: int = 0, left: int = 0) -> None:
        layer = document.create_pixel_layer_from_array(np.ascontiguousarray(pixels), top=top, left=left)
        # The property, not the argument: it writes the Unicode name too (and "?" as the legacy MacRoman
        # name where the name has characters MacRoman lacks), where the argument fails on save.
        layer.name = name
        _rgb_then_alpha(layer)

    add(np.concatenate([background, np.full((height, width, 1), 255, np.uint8)], axis=-1), background_name)
    for index, (name, layer) in enumerate(layers):
        layer = np.ascontiguousarray(layer, dtype=np.uint8)
        if layer.shape != (height, width, 4):
            raise ValueError(f"layer {index + 1} ({name!r}) is {layer.shape}; every layer must be "
                             f"{(height, width, 4)} RGBA over the {width}x{height} background")
        x0, y0, x1, y1 = alpha_bbox(layer) or (0, 0, width, height)
        add(layer[y0:y1, x0:x1], name, top=y0, left=x0)
    path = Path(path)
    with atomic_path(path) as tmp:
        document.save(str(tmp))
    return path


def stored_sample(run_dir: str | os.PathLike, key: str) -> LayeredSample:
    """One committed sample of a run directory (its shard found through the index, its tar checked against the
    index's sha256); KeyError for a key the run has not written as ok, naming the reason."""
    from layerloop.report.scan import UnknownSampleError, existing_run_dir, index_rows, scan_run

    run_dir = existing_run_dir(run_dir)
    scan = scan_run(run_dir)
    row = index_rows(scan.table, [key]).get(key)
    if row is None:
        raise UnknownSampleError(f"{key!r} is not in {run_dir}: no shard index lists it")
    if row["status"] != "ok":
        raise UnknownSampleError(f"{key!r} in {run_dir} has status {row['status']}: it has no layers to export "
                                 f"(layerloop inspect {run_dir} --key {key} shows why)")
    records = scan.open_records(row["shard"], [key])
    if records is None:
        raise UnknownSampleError(f"{key!r}: shard {row['shard']} of {run_dir} is damaged ({scan.damaged[row['shard']]})")
    if key not in records:
        raise UnknownSampleError(f"{key!r}: tar {row['shard']}.tar lacks it, though its index lists it as ok")
    return LayeredSample.from_wds(records[key])


def sample_layers(sample: LayeredSample) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """A stored sample's background and its foreground layer, named by its caption."""
    missing = [name for name in ("background", "foreground") if getattr(sample, name) is None]
    if missing:
        raise ValueError(f"sample {sample.key} has no {' or '.join(missing)}: nothing to export as layers")
    return sample.background, [(layer_name(sample.caption, "foreground"), sample.foreground)]


def parse_layer_spec(spec: str) -> tuple[tuple[int, int, int, int], str]:
    """``"x0,y0,x1,y1=caption"`` (pixels, ends exclusive) -> ((x0, y0, x1, y1), caption)."""
    box_text, sep, caption = spec.partition("=")
    try:
        box = tuple(int(v) for v in box_text.split(","))
    except ValueError:
        box = ()
    if not sep or len(box) != 4:
        raise ValueError(f"--layer {spec!r}: expected x0,y0,x1,y1=caption (integer pixels, ends exclusive)")
    return box, caption.strip()  # type: ignore[return-value]
