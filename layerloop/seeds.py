"""One way to derive random streams: every seed is a sha256 of its parts joined by NUL.

``(run seed, sample key, stage name)`` for a stage's per-sample generator, ``(seed, rank, "data")`` for a
training stream, and so on: independent purposes get independent streams, and the same parts give the
same numbers on any machine, executor or resume. The three shapes below differ only in how many bytes of
the digest they take, because numpy's and torch's seeding want different widths.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def seed_digest(*parts: Any) -> bytes:
    """sha256 of ``"\\x00".join(str(part) for part in parts)``."""
    return hashlib.sha256("\x00".join(str(part) for part in parts).encode()).digest()


def rng_for(*parts: Any) -> np.random.Generator:
    """A numpy generator seeded by the first 128 bits of ``seed_digest(*parts)``."""
    return np.random.default_rng(int.from_bytes(seed_digest(*parts)[:16], "little"))


def seed63(*parts: Any) -> int:
    """A non-negative 63-bit integer seed (torch, python ``random``) from ``parts``."""
    return int.from_bytes(seed_digest(*parts)[:8], "little") >> 1


def seed_words(*parts: Any) -> list[int]:
    """Four 32-bit words for numpy's ``SeedSequence`` from ``parts``."""
    digest = seed_digest(*parts)
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
