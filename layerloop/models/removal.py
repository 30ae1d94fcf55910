"""Classical object removal with OpenCV, no model and no torch: ``inpaint`` fills a hole from its
surroundings. The ``background`` stage's ``opencv`` backend and the in-context pipeline's
``FootprintRemoval`` (``decompose-incontext``'s ``object: footprint``) both call it."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["INPAINT_METHODS", "inpaint"]

INPAINT_METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


def inpaint(image: np.ndarray, hole: np.ndarray, radius: int, method: str) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with the pixels where ``hole`` (H x W uint8, non-zero = fill) is set
    inpainted from a ``radius`` px neighbourhood by Telea's fast-marching method or Navier-Stokes
    (``method``: a key of ``INPAINT_METHODS``); every other pixel is kept."""
    # cv2.inpaint treats the three channels alike, so RGB order needs no conversion.
    return cv2.inpaint(np.ascontiguousarray(image, dtype=np.uint8), hole, radius, INPAINT_METHODS[method])
