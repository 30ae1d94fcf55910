"""The ``dedupe`` stage: near-duplicate distance of each sample to an existing training mix.

Feeding a generator's copies of its own training data back into its mix teaches it nothing and narrows it
(mode collapse), so every candidate is compared with the current mix (``reference``: shard files, brace
patterns or run directories). The comparison uses 64-bit perceptual hashes (pHash: grey, 32x32 area
resize, 2-D DCT, the 8x8 lowest frequencies against their median), which survive re-encoding, slight noise
and small colour shifts but not a different scene. Two layers are hashed:

* ``composite``: the composite C;
* ``foreground``: the foreground layer over a neutral grey (``a*F + (1-a)*grey``), so that the same object
  on another background, or another object on the same background, is not a duplicate by itself.

A sample's distance to a reference sample is the largest Hamming distance over the configured ``layers``
(a duplicate must be close in every layer), and the stage writes to ``meta["scores"]``:

* ``dup_distance``: the smallest such distance over the reference set (0 = identical hashes);
* ``dup_of``: key of that nearest reference sample (ties: the smallest key);
* ``duplicate``: ``dup_distance <= threshold``.

Only the reference set is compared with, never other samples of the same batch or run: a sample's score
must not depend on which samples happen to share its batch or shard (determinism, docs/architecture.md
"Stages"). Near-identical candidates within one round come from the same held input and are thinned by the
filter policy's top-k per input (``layerloop/selfimprove/policies.py``).

The reference index is built once per worker in ``setup()`` (so under Ray the stage runs in an actor
pool): the shards are streamed and only the hashes (8 bytes per layer) and keys are kept, never images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from layerloop.datasets.shards import read_samples, shard_paths
from layerloop.samples import LayeredSample, composite
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

HASH_BITS = 64
Layer = Literal["composite", "foreground"]


class DedupeParams(StageParams):
    # The current training mix: shard paths, brace patterns ("mix-{000000..000003}.tar") or run directories
    # (their committed shards).
    reference: tuple[str, ...] = Field(min_length=1)
    # Hamming distance (of 64 bits) at or below which a sample counts as a duplicate. Re-encoding and mild
    # noise move a pHash by a few bits; unrelated images sit near 32.
    threshold: int = Field(8, ge=0, le=HASH_BITS)
    layers: tuple[Layer, ...] = Field(("composite", "foreground"), min_length=1)
    neutral_grey: float = Field(0.5, ge=0.0, le=1.0)  # backdrop of the foreground layer before hashing

    @field_validator("reference", mode="before")
    @classmethod
    def _one_reference_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, (str, Path)) else value

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"layers {list(value)} names a layer twice")
        return value


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB (H x W x 3) or grey (H x W) uint8 image, as an int.

    float64 throughout (grey weights, area resize, DCT) so that the median comparison does not depend on
    8-bit rounding in OpenCV's integer paths."""
    image = np.asarray(image)
    if image.ndim == 3:
        grey = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    else:
        grey = image.astype(np.float64)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def layer_images(sample: LayeredSample, layers: tuple[str, ...], neutral_grey: float) -> list[np.ndarray]:
    missing = [f for f in ("composite", "foreground") if f in layers and getattr(sample, f) is None]
    if missing:
        raise ValueError(f"dedupe needs {' and '.join(missing)}")
    images = []
    for layer in layers:
        if layer == "composite":
            images.append(sample.composite)
        else:
            grey = np.full(sample.foreground.shape[:2] + (3,), round(neutral_grey * 255), np.uint8)
            images.append(composite(sample.foreground, grey))
    return images


def sample_hashes(sample: LayeredSample, layers: tuple[str, ...], neutral_grey: float) -> np.ndarray:
    """One uint64 pHash per layer, in ``layers`` order."""
    return np.array([phash(image) for image in layer_images(sample, layers, neutral_grey)], np.uint64)


def hamming(hashes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per-row largest Hamming distance between ``hashes`` (N x L uint64) and ``query`` (L uint64)."""
    return np.bitwise_count(np.bitwise_xor(hashes, query[None, :])).max(axis=1).astype(np.int64)


def reference_urls(reference: tuple[str, ...]) -> list[str]:
    """Shard paths/patterns of the reference; a missing path or a directory without shards is an error
    (a silently empty reference would let every duplicate through)."""
    urls: list[str] = []
    for entry in reference:
        path = Path(entry)
        if path.is_dir():
            shards = shard_paths(path)
            if not shards:
                raise FileNotFoundError(f"dedupe reference {entry}: no committed shards (*.tar with its "
                                        ".parquet) in this directory")
            urls.extend(str(p) for p in shards)
        elif path.exists() or "{" in entry or "://" in entry:
            urls.append(entry)  # a shard file, a brace pattern or a URL: webdataset resolves it
        else:
            raise FileNotFoundError(f"dedupe reference {entry}: no such shard or directory")
    return urls


@register_stage
class Dedupe(Stage):
    name = "dedupe"
    reads_work = frozenset()
    Params = DedupeParams
    batch_size = 32

    @classmethod
    def score_columns(cls, params: dict) -> tuple[str, ...]:
        return ("dup_distance", "dup_of", "duplicate")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reference_keys: list[str] = []
        self.reference_hashes = np.zeros((0, len(self.params.layers)), np.uint64)

    def setup(self) -> None:
        keys, hashes = [], []
        for url in reference_urls(self.params.reference):
            for sample in read_samples(url):
                keys.append(sample.key)
                hashes.append(sample_hashes(sample, self.params.layers, self.params.neutral_grey))
        if not keys:
            raise ValueError(f"dedupe reference {list(self.params.reference)} holds no samples")
        # Sorted by key so that argmin's first hit is the smallest key whatever the shard order.
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.reference_keys = [keys[i] for i in order]
        self.reference_hashes = np.stack([hashes[i] for i in order])

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        self.ensure_setup()
        distances = hamming(self.reference_hashes, sample_hashes(sample, self.params.layers,
                                                                 self.params.neutral_grey))
        nearest = int(np.argmin(distances))
        distance = int(distances[nearest])
        sample.meta.setdefault("scores", {}).update({
            "dup_distance": distance,
            "dup_of": self.reference_keys[nearest],
            "duplicate": distance <= self.params.threshold,
        })
        sample.record_stage(self.name, backend="phash-dct-64", config=self.describe(),
                            reference_samples=len(self.reference_keys))
        return sample
