import itertools
import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance

from layerloop.evaluation import kid_x1000, psnr, recomposition_error, ssim
from layerloop.samples import composite


def _image(seed, shape=(40, 48, 3)):
    """A smooth gradient plus noise: SSIM on pure noise would not exercise the structure terms much."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = 120 + 60 * np.sin(xx / 7.0 + seed)[..., None] + 40 * np.cos(yy / 5.0)[..., None]
    noisy = base + rng.normal(0, 12, shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _psnr_numpy(a, b, data_range=255.0):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(data_range ** 2 / mse)


def _ssim_numpy(a, b, data_range=255.0):
    """Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5) over the valid area, mean over channels."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets / 1.5) ** 2 / 2)
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = []
    for channel in range(a.shape[2]):
        x, y = a[..., channel].astype(np.float64), b[..., channel].astype(np.float64)
        blur = lambda z: convolve2d(z, window, mode="valid")
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        maps.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2)))
    return float(np.mean(maps))


def _premultiplied(rgba):
    rgba = rgba.astype(np.float64)
    return np.concatenate([rgba[..., :3] * rgba[..., 3:] / 255.0, rgba[..., 3:]], axis=-1)


# --- PSNR ---------------------------------------------------------------------------------------------

def test_psnr_matches_numpy_formula():
    a, b = _image(0), _image(1)
    # rel 1e-6: torchmetrics turns ln into log10 with a float32 constant
    assert psnr(a, b) == pytest.approx(_psnr_numpy(a, b), rel=1e-6)
    # floats in [0, 1] with data_range=1 give the same number
    assert psnr(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(_psnr_numpy(a, b), rel=1e-6)
    # gray (HxW) images are one channel
    assert psnr(a[..., 0], b[..., 0]) == pytest.approx(_psnr_numpy(a[..., :1], b[..., :1]), rel=1e-6)


def test_psnr_of_identical_images_is_infinite_unless_capped():
    a = _image(2)
    assert psnr(a, a) == math.inf
    assert psnr(a, a, max_db=100.0) == 100.0
    b = _image(3)
    assert psnr(a, b, max_db=100.0) == pytest.approx(_psnr_numpy(a, b))  # the cap leaves real values alone


def test_psnr_rgba_compares_premultiplied_colour_and_alpha():
    rng = np.random.default_rng(4)
    a = np.concatenate([_image(4), rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=-1)
    b = np.concatenate([_image(5), rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=-1)
    assert psnr(a, b) == pytest.approx(_psnr_numpy(_premultiplied(a), _premultiplied(b)), rel=1e-6)
    # colour under fully transparent pixels is invisible and does not count
    hidden = a.copy()
    hidden[..., 3] = np.where(np.arange(48) < 24, 0, 255)[None, :]
    changed = hidden.copy()
    changed[:, :24, :3] = 255 - changed[:, :24, :3]
    assert psnr(hidden, changed) == math.inf


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_image(0), _image(0)[:30])


# --- SSIM ---------------------------------------------------------------------------------------------

def test_ssim_of_identical_images_is_one():
    a = _image(6)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_independent_reference_and_torchmetrics():
    a, b = _image(7), _image(8)
    value = ssim(a, b)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(_ssim_numpy(a, b), abs=1e-9)
    # torchmetrics' own map, cropped to the windows inside the image (its mean also counts the padded border)
    to_tensor = lambda x: torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    _, full = structural_similarity_index_measure(to_tensor(a), to_tensor(b), data_range=255.0,
                                                  return_full_image=True)
    assert value == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-5)


def test_ssim_rgba_is_premultiplied_and_small_images_are_refused():
    rng = np.random.default_rng(9)
    a = np.concatenate([_image(9), rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=-1)
    b = np.concatenate([_image(10), rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=-1)
    assert ssim(a, b) == pytest.approx(_ssim_numpy(_premultiplied(a), _premultiplied(b)), abs=1e-9)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:10], b[:10])


# --- KID ----------------------------------------------------------------------------------------------

def _features(seed, n=200, d=16, shift=0.0):
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, d)) + shift


def _mmd2_numpy(x, y):
    """Unbiased polynomial-kernel MMD^2 written from the KID paper's formula."""
    k = lambda p, q: (p @ q.T / x.shape[1] + 1.0) ** 3
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_kid_on_whole_sets_matches_the_unbiased_formula():
    x, y = _features(0, n=50), _features(1, n=50, shift=0.3)
    mean, std = kid_x1000(x, y, subset_size=1000, subsets=3)  # clipped to 50: every subset is the whole set
    assert mean == pytest.approx(1000 * _mmd2_numpy(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_kid_equals_torchmetrics_kernel_inception_distance():
    x, y = _features(2, n=120), _features(3, n=90, shift=0.2)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=20, subset_size=60)
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    torch.manual_seed(7)
    expected_mean, expected_std = metric.compute()

    mean, std = kid_x1000(x, y, subset_size=60, subsets=20, seed=7)

    assert std > 0
    assert mean == pytest.approx(1000 * float(expected_mean), rel=1e-9)
    assert std == pytest.approx(1000 * float(expected_std), rel=1e-9)


def test_kid_is_about_zero_for_one_distribution_and_grows_with_the_shift():
    x = _features(4)
    same_distribution, _ = kid_x1000(x, _features(5), subset_size=100, subsets=50)
    values = [kid_x1000(x, _features(5, shift=shift), subset_size=100, subsets=50)[0]
              for shift in (0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(values)), values
    assert abs(same_distribution) < 0.1 * values[0], (same_distribution, values)


def test_kid_of_a_set_against_itself_is_slightly_negative():
    # The estimator assumes independent sets; a set against itself pairs every row with itself in the
    # cross term, which the within-set terms leave out. With whole sets that gives exactly
    # -2 (tr K - sum(K) / m) / (m (m - 1)) <= 0, an O(1/m) bias, and still far below any shifted set.
    x = _features(4, n=200)
    k = (x @ x.T / x.shape[1] + 1.0) ** 3
    m = x.shape[0]
    mean, _ = kid_x1000(x, x, subset_size=m, subsets=2)
    assert mean == pytest.approx(-2000 * (np.trace(k) - k.sum() / m) / (m * (m - 1)), rel=1e-9)
    assert mean <= 0
    assert abs(mean) < 0.5 * kid_x1000(x, _features(5, n=200, shift=0.25), subset_size=m, subsets=2)[0]


def test_kid_is_reproducible_and_checks_its_inputs():
    x, y = _features(6), _features(7, shift=0.5)
    first = kid_x1000(x, y, subset_size=50, subsets=10, seed=3)
    assert kid_x1000(x, y, subset_size=50, subsets=10, seed=3) == first
    assert kid_x1000(x, y, subset_size=50, subsets=10, seed=4) != first
    with pytest.raises(ValueError, match="feature sizes differ"):
        kid_x1000(x, y[:, :8])
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid_x1000(x[:1], y)


# --- recomposition error ------------------------------------------------------------------------------

def test_recomposition_error_is_zero_for_a_consistent_triple_and_counts_steps():
    rng = np.random.default_rng(8)
    layer = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    under = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    comp = composite(layer, under)
    assert recomposition_error(layer, under, comp) == 0.0

    off = comp.astype(np.int16)
    off[3, 4, 1] += 6 if off[3, 4, 1] < 250 else -6
    off[10, 2, 0] += 3 if off[10, 2, 0] < 250 else -3
    assert recomposition_error(layer, under, off.astype(np.uint8)) == pytest.approx(9 / (20 * 24 * 3))


def test_recomposition_error_rejects_wrong_inputs():
    layer = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(ValueError, match="layer_rgba"):
        recomposition_error(layer[..., :3], np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="sizes differ"):
        recomposition_error(layer, np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
