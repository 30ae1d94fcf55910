"""Evaluation measures: pure functions on numpy arrays, one image pair (or one pair of feature sets) each.

Images are HxWxC arrays (C = 1, 3 or 4; HxW is read as one channel), uint8 or float, both of a pair with
the same shape and on the scale that ``data_range`` names (255 for uint8; pass ``data_range=1.0`` for
floats in [0, 1]). They are compared in float64.

RGBA layers (C = 4) are compared as premultiplied colour plus alpha: the four channels
``(R*a, G*a, B*a, A)`` with ``a = A / data_range``. Colour under a transparent pixel is invisible and
arbitrary (the project stores 0 there, a model may predict anything), so premultiplying makes it count
for nothing, while colour under a half-transparent pixel counts in proportion to its opacity. An error in
the alpha itself shows up twice, in the alpha channel and in the colour it scales, as it would in any
composite. All four channels weigh the same in the mean.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import poly_mmd

from layerloop.samples import composite

__all__ = ["SSIM_KERNEL_SIZE", "kid_x1000", "psnr", "recomposition_error", "ssim"]

SSIM_KERNEL_SIZE = 11  # Wang et al. 2004: an 11x11 Gaussian window, sigma 1.5
SSIM_SIGMA = 1.5


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0, max_db: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 * log10(data_range**2 / MSE)``, the MSE taken over every pixel
    and channel (RGBA: premultiplied, see the module docstring).

    Identical images (MSE = 0) give ``math.inf``, which is what the formula says and what torchmetrics
    returns; averaging over a data set then gives inf too, so pass ``max_db`` (e.g. 100.0) to cap every
    value at that many dB instead, or report a median."""
    pred_t, target_t = _prepare(pred, target, data_range)
    value = float(peak_signal_noise_ratio(pred_t, target_t, data_range=float(data_range)))
    if max_db is not None:
        value = min(value, float(max_db))
    return value


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004) with the standard settings: an 11x11 Gaussian window of
    sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, ``L = data_range``, computed per channel and averaged over the
    channels and the pixels whose window lies inside the image, as scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` does. The map
    comes from torchmetrics' ``structural_similarity_index_measure``, whose own mean (1.9) also counts the
    reflect-padded border and so differs slightly. 1.0 for identical images. Both sides need at least 11
    pixels.
    RGBA: premultiplied, see the module docstring."""
    pred_t, target_t = _prepare(pred, target, data_range)
    if min(pred_t.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} pixels, "
                         f"got {tuple(pred_t.shape[-2:])}")
    _, ssim_map = structural_similarity_index_measure(pred_t, target_t, gaussian_kernel=True, sigma=SSIM_SIGMA,
                                                      kernel_size=SSIM_KERNEL_SIZE, data_range=float(data_range),
                                                      return_full_image=True)
    # torchmetrics reflect-pads the image and averages the whole map, border pixels included; the
    # reference definition (Wang et al.'s code, scikit-image, pytorch-msssim) keeps only the pixels whose
    # window lies inside the image, so the map is cropped back to those before averaging.
    pad = SSIM_KERNEL_SIZE // 2
    return float(ssim_map[..., pad:-pad, pad:-pad].mean())


def kid_x1000(features_real: np.ndarray, features_fake: np.ndarray, subset_size: int = 1000,
              subsets: int = 100, seed: int = 0, degree: int = 3, gamma: float | None = None,
              coef: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) times 1000, as ``(mean, std)`` over subsets.

    On precomputed (N, D) feature arrays, so any extractor works (Inception pool features for the classic
    KID, DINO or CLIP embeddings otherwise). For each of ``subsets`` rounds, ``subset_size`` rows are drawn
    without replacement from each side and the unbiased estimator of the squared MMD under the polynomial
    kernel ``k(x, y) = (gamma * x.y + coef) ** degree`` (``gamma`` defaults to 1 / D) is computed:

        MMD^2 = sum_{i != j} k(x_i, x_j) / (m(m-1)) + sum_{i != j} k(y_i, y_j) / (m(m-1))
                - 2 * sum_{i, j} k(x_i, y_j) / m^2

    The result is the mean and the population standard deviation of those values, times 1000. This is
    torchmetrics' ``KernelInceptionDistance.compute`` (same kernel function, same draw order: real then fake
    permutation per round from ``torch.randperm``), with the draws taken from a generator seeded with
    ``seed`` instead of the global one, so the value is reproducible; it equals torchmetrics' after
    ``torch.manual_seed(seed)``. Computed in float64. The estimator is unbiased for independent sets, so
    it scatters around 0 (negative values included) when both come from one distribution. A set against
    itself is not independent: rows drawn into both subsets pair with themselves in the cross term, which
    biases the value below 0 by O(1/subset_size).

    The defaults (1000 per subset, 100 subsets) are the KID paper's and torchmetrics'. ``subset_size`` is
    clipped to the smaller set, which must hold at least 2 rows; once it is clipped to a set's full size,
    every round sees that whole set, and with both sets whole the std is 0.
    """
    real = _features(features_real, "features_real")
    fake = _features(features_fake, "features_fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} (real) vs {fake.shape[1]} (fake)")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    size = min(int(subset_size), real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set and subset_size >= 2; got {real.shape[0]} real, "
                         f"{fake.shape[0]} fake, subset_size={subset_size}")
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        real_rows = torch.randperm(real.shape[0], generator=generator)[:size]
        fake_rows = torch.randperm(fake.shape[0], generator=generator)[:size]
        scores.append(poly_mmd(real[real_rows], fake[fake_rows], degree=degree, gamma=gamma, coef=coef))
    values = torch.stack(scores)
    return float(values.mean()) * 1000.0, float(values.std(unbiased=False)) * 1000.0


def recomposition_error(layer_rgba: np.ndarray, object_rgb: np.ndarray, composite_rgb: np.ndarray) -> float:
    """How far a decomposition is from re-creating its composite: the mean over pixels and RGB channels of
    ``|round(a*F + (1-a)*B) - C|`` in 1/255 steps, with F, a the RGBA layer, B the object (background)
    under it and C the composite, all uint8. The recomposition is ``layerloop.samples.composite``, the
    project's one compositing rule, so a consistent triple (C made by that rule) scores exactly 0. A
    ``rendered`` sample's C is a non-linear rendering of its layers, so there even the truth scores above 0."""
    layer, under, comp = (np.asarray(x) for x in (layer_rgba, object_rgb, composite_rgb))
    for name, array, channels in (("layer_rgba", layer, 4), ("object_rgb", under, 3), ("composite_rgb", comp, 3)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != channels:
            raise ValueError(f"{name}: expected an HxWx{channels} uint8 image, got {array.shape} {array.dtype}")
    if not layer.shape[:2] == under.shape[:2] == comp.shape[:2]:
        raise ValueError(f"sizes differ: layer {layer.shape[:2]}, object {under.shape[:2]}, "
                         f"composite {comp.shape[:2]}")
    recomposed = composite(layer, under)
    return float(np.abs(recomposed.astype(np.int16) - comp.astype(np.int16)).mean())


def _prepare(pred: np.ndarray, target: np.ndarray, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as 1xCxHxW float64 tensors, RGBA premultiplied (module docstring)."""
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    arrays = []
    for name, image in (("pred", pred), ("target", target)):
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"{name}: expected an HxW or HxWxC image with C in (1, 3, 4), got {image.shape}")
        if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise ValueError(f"{name}: expected an integer or float image, got {image.dtype}")
        image = image.astype(np.float64)
        if not np.isfinite(image).all():
            raise ValueError(f"{name} contains NaN or infinity")
        if image.shape[2] == 4:
            alpha = image[..., 3:] / float(data_range)
            image = np.concatenate([image[..., :3] * alpha, image[..., 3:]], axis=-1)
        arrays.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None])
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"pred {tuple(np.shape(pred))} and target {tuple(np.shape(target))} differ in shape")
    return arrays[0], arrays[1]


def _features(features: np.ndarray, name: str) -> torch.Tensor:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected an (N, D) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return torch.from_numpy(array)
