"""The synthetic logo seed data: valid quadruples, deterministic in (seed, index), diverse, exact invariant."""

from __future__ import annotations

import numpy as np
import pytest

from layerloop.datasets.logos import LOGO_KINDS, OBJECTS, LogoSynthesizer, logo_samples
from layerloop.samples import LayeredSample, composite

SIZE = 96


@pytest.fixture(scope="module")
def samples() -> list[LayeredSample]:
    return list(logo_samples(24, seed=0, size=SIZE))


def test_samples_are_valid_quadruples(samples):
    for index, sample in enumerate(samples):
        sample.validate()
        assert sample.kind == "quadruple"
        assert sample.key == f"logos_{index:06d}"
        assert sample.composite.shape == (SIZE, SIZE, 3) and sample.foreground.shape == (SIZE, SIZE, 4)
        assert np.array_equal(sample.composite, composite(sample.foreground, sample.background))
        assert sample.meta["source"] == "logos" and sample.meta["source_id"] == f"{index:06d}"
        assert {"kind", "colour", "placement"} <= set(sample.meta["logo"])
        assert sample.caption.startswith(("a ", "an ")) and "printed on" in sample.caption
        # the logo is visible, and the region mask covers all of it with a margin
        alpha = sample.foreground[..., 3]
        assert (alpha > 0).sum() > 20
        assert set(np.unique(sample.mask)) <= {0, 255}
        assert np.all(sample.mask[alpha > 0] == 255)
        assert (sample.mask == 255).sum() > (alpha > 0).sum()
        assert np.abs(sample.composite.astype(int) - sample.background).max() > 40


def test_deterministic_in_seed_and_index():
    a, b = LogoSynthesizer(size=SIZE, seed=3), LogoSynthesizer(size=SIZE, seed=3)
    first, again = a.make(7), b.make(7)
    for field in ("composite", "background", "foreground", "mask"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert first.meta == again.meta and first.caption == again.caption
    # order does not matter: index 7 after others equals index 7 alone
    b.make(2)
    assert np.array_equal(b.make(7).foreground, first.foreground)
    other = LogoSynthesizer(size=SIZE, seed=4).make(7)
    assert not np.array_equal(other.composite, first.composite)


def test_diverse(samples):
    objects = {s.meta["object"]["object"] for s in samples}
    kinds = {s.meta["logo"]["kind"] for s in samples}
    prints = {s.meta["logo"]["placement"]["print"] for s in samples}
    assert len(objects) >= 4 and len(kinds) >= 4 and len(prints) == 3
    assert len({s.caption for s in samples}) >= 20
    composites = np.stack([s.composite for s in samples]).reshape(len(samples), -1)
    assert len({c.tobytes() for c in composites}) == len(samples)


def test_effects_are_present():
    synth = LogoSynthesizer(size=SIZE, seed=1, objects=("mug",), logo_kinds=("star",), opacity=(0.5, 0.6))
    sample = synth.make(0)
    alpha = sample.foreground[..., 3]
    # global opacity: no pixel is fully opaque
    assert alpha.max() <= 0.6 * 255 + 1
    assert sample.meta["logo"]["placement"]["surface"] == "cylinder"
    # lighting: the same ink colour appears at different brightness across the cylinder
    ink = sample.foreground[alpha > alpha.max() * 0.5, :3].astype(float).sum(axis=1)
    assert ink.max() - ink.min() > 30


def test_options_are_checked():
    with pytest.raises(ValueError, match="objects"):
        LogoSynthesizer(objects=("spaceship",))
    with pytest.raises(ValueError, match="opacity"):
        LogoSynthesizer(opacity=(0.9, 0.2))
    assert set(OBJECTS) and set(LOGO_KINDS)
