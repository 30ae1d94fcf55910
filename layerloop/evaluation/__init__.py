"""Evaluation of generated layers and composites (issue #13): metric building blocks on numpy arrays."""

from layerloop.evaluation.measures import kid_x1000, psnr, recomposition_error, ssim

__all__ = ["kid_x1000", "psnr", "recomposition_error", "ssim"]
