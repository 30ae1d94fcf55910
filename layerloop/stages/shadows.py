"""The ``shadow`` stage (``ShadowAugmentation``): a geometric cast shadow plus a contact shadow, added to
the foreground layer F so that F carries "the object and its effects".

The model, and why it is enough for training data:

* The object is a flat cut-out standing upright on a horizontal ground plane, touching it at the lowest row
  of its silhouette (the *contact line*). Real objects have depth, but what a removal/insertion model must
  learn is "a soft dark region attached to the object's base, shaped like it and pointing away from a
  light"; a projected silhouette gives exactly that.
* A directional light casts a silhouette point at height ``h`` above the contact line onto the ground
  ``h / tan(elevation)`` away in the direction ``azimuth``. The camera sees the ground obliquely, so the
  depth part of that offset is foreshortened by ``foreshortening`` (0: camera level with the ground,
  1: looking straight down). For every point this is the same affine map of the image plane, fixing the
  contact row::

      x' = x + k_x * h          k_x = cos(azimuth) / tan(elevation)
      y' = y_c - k_y * h        k_y = sin(azimuth) * foreshortening / tan(elevation)

  Azimuth is the direction the shadow falls, counter-clockwise as seen in the image: 0 = right,
  90 = away from the camera (up the image), 180 = left, 270 = towards the camera (down the image).
* A real penumbra widens with distance from the occluder, and scattered light fills in far shadow: the
  projected alpha is blended between increasingly blurred copies as the distance from the contact line
  grows, and its opacity fades with that distance.
* Ambient occlusion makes the ground darkest right under the base: a thin blurred ellipse along the
  contact line (the *contact shadow*).

The shadow map ``s`` (0..1) is composited into F *behind* the object: ``a' = a + (1-a)*s`` and
``rgb' = (a*fg + (1-a)*s*shadow_rgb) / a'``, so the object's own alpha never drops and, over any
background, ``C = a'*rgb' + (1-a')*B`` equals the object over a background darkened by the shadow.

``render_shadow`` and ``apply_shadow`` are pure functions of the recorded parameters, so a sample's
shadow can be rebuilt from its metadata (``meta["stages"]["shadow"]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

# A cut-out has no depth, so a light exactly from the side would squash its shadow to a line; a real object
# of similar width casts a shadow at least this deep (fraction of the object height).
MIN_DEPTH = 0.15
# Penumbra levels blended along the shadow: 4 is visually smooth and keeps the stage well under 50 ms.
BLUR_LEVELS = 4
# Columns whose lowest object pixel lies within this fraction of the object height above the lowest
# row count as touching the ground (the contact span under the contact shadow).
CONTACT_TOLERANCE = 0.1


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if not (lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"{name} must be an ordered range within [{lo}, {hi}], got {list(value)}")


@dataclass(frozen=True)
class ShadowDraw:
    """Everything drawn at random for one sample: with the stage config it fixes the shadow exactly."""

    opacity: float
    azimuth_deg: float
    elevation_deg: float
    foreshortening: float
    shadow_rgb: tuple[float, float, float]
    contact_opacity: float  # 0 when the contact shadow is off


@register_stage
class ShadowAugmentation(Stage):
    name = "shadow"
    reads_work = frozenset({"alpha", "fg_rgb"})

    class Params(StageParams):
        # Chance that a sample gets a shadow; the rest pass through (recorded as applied: false), so a
        # dataset can keep shadow-free examples.
        probability: float = Field(1.0, ge=0.0, le=1.0)
        # Peak opacity of the cast shadow at the contact line. 0.3..0.7 matches measured darkening of
        # indoor/outdoor cast shadows on light floors; 1.0 would read as a black hole.
        opacity: tuple[float, float] = (0.3, 0.7)
        # Direction the shadow falls (see module docstring). Default: behind and to the sides, the usual
        # product-shot lighting (light from the camera side); use (195, 345) for backlit, forward shadows.
        azimuth_deg: tuple[float, float] = (15.0, 165.0)
        # Light elevation above the ground: 30 deg gives shadows ~1.7x the object height, 65 deg ~0.5x;
        # lower is rarely seen in curated photos and runs the shadow out of frame.
        elevation_deg: tuple[float, float] = (30.0, 65.0)
        # How much the camera foreshortens ground depth (sine of the camera's downward view angle).
        foreshortening: tuple[float, float] = (0.3, 0.6)
        # Penumbra blur at the far end, as a fraction of the shadow's length (0 = hard everywhere).
        softness: float = Field(0.12, ge=0.0, le=1.0)
        # Fraction of the opacity lost from the contact line to the far end (scattered light fill-in).
        fade: float = Field(0.5, ge=0.0, le=1.0)
        # Grey level of the shadow colour (near black: a dark layer over B approximates B * (1 - s)).
        shadow_value: tuple[float, float] = (0.02, 0.08)
        # Per-channel random tint added to the grey (sky-lit shadows are slightly blue, warm light's
        # slightly brown); small so the shadow never looks coloured.
        tint: float = Field(0.02, ge=0.0, le=0.2)
        contact_shadow: bool = True
        # Peak opacity of the contact shadow: darker than the cast shadow, as under real objects.
        contact_opacity: tuple[float, float] = (0.4, 0.8)

        @model_validator(mode="after")
        def _ranges(self):
            _check_range("opacity", self.opacity, 0.0, 1.0)
            _check_range("azimuth_deg", self.azimuth_deg, -360.0, 720.0)
            # Below 5 deg the shadow is many times the object height; at 90 it has no direction.
            _check_range("elevation_deg", self.elevation_deg, 5.0, 89.0)
            _check_range("foreshortening", self.foreshortening, 0.0, 1.0)
            _check_range("shadow_value", self.shadow_value, 0.0, 1.0)
            _check_range("contact_opacity", self.contact_opacity, 0.0, 1.0)
            return self

    def draw(self, rng: np.random.Generator) -> ShadowDraw:
        """Draw one sample's shadow parameters (always the same number of draws, in a fixed order)."""
        p = self.params
        opacity = rng.uniform(*p.opacity)
        azimuth = rng.uniform(*p.azimuth_deg)
        elevation = rng.uniform(*p.elevation_deg)
        foreshortening = rng.uniform(*p.foreshortening)
        grey = rng.uniform(*p.shadow_value)
        tint = rng.uniform(-p.tint, p.tint, size=3)
        contact = rng.uniform(*p.contact_opacity)
        rgb = tuple(round(float(v), 6) for v in np.clip(grey + tint, 0.0, 1.0))
        return ShadowDraw(
            opacity=round(float(opacity), 6),
            azimuth_deg=round(float(azimuth), 6),
            elevation_deg=round(float(elevation), 6),
            foreshortening=round(float(foreshortening), 6),
            shadow_rgb=rgb,  # type: ignore[arg-type]
            contact_opacity=round(float(contact), 6) if p.contact_shadow else 0.0,
        )

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        alpha, fg_rgb, object_mask = _inputs(sample)
        rng = self.rng(sample)
        # The coin is drawn first and the shadow parameters always after it, so changing `probability`
        # never changes the shadow of a sample that keeps one.
        applied = bool(rng.random() < self.params.probability)
        draw = self.draw(rng)
        config = self.describe()
        if not applied:
            sample.work["shadow_alpha"] = np.zeros_like(alpha)
            sample.record_stage(self.name, backend="geometric", config=config, applied=False)
            return sample
        shadow, geometry = render_shadow(alpha, object_mask, draw, softness=self.params.softness,
                                         fade=self.params.fade)
        new_alpha, new_rgb = apply_shadow(alpha, fg_rgb, shadow, draw.shadow_rgb)
        sample.work["alpha"] = new_alpha
        sample.work["fg_rgb"] = new_rgb
        sample.work["shadow_alpha"] = shadow
        sample.record_stage(self.name, backend="geometric", config=config, applied=True,
                            **asdict(draw), **geometry)
        return sample


# ---------------------------------------------------------------------------- pure shadow functions
def render_shadow(alpha: np.ndarray, object_mask: np.ndarray, draw: ShadowDraw, softness: float = 0.12,
                  fade: float = 0.5) -> tuple[np.ndarray, dict[str, Any]]:
    """The shadow opacity map ``s`` (H x W float32 in [0, 1], 0 where there is no shadow) and the derived
    geometry (contact row, span, shear, blur) for the metadata.

    ``alpha`` is the object's matte (the shape that is projected); ``object_mask`` fixes the contact line,
    because matting can leave faint alpha below the true base."""
    height, width = alpha.shape
    rows = np.flatnonzero(object_mask.any(axis=1))
    cols = np.flatnonzero(object_mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("object_mask is empty: no object to cast a shadow from")
    top, contact_row = int(rows[0]), int(rows[-1])
    object_height = float(contact_row - top + 1)

    cot = 1.0 / math.tan(math.radians(draw.elevation_deg))
    azimuth = math.radians(draw.azimuth_deg)
    k_x = math.cos(azimuth) * cot
    k_y = math.sin(azimuth) * cot * draw.foreshortening
    if abs(k_y) < MIN_DEPTH:
        k_y = math.copysign(MIN_DEPTH, k_y) if k_y != 0.0 else MIN_DEPTH
    length = object_height * math.hypot(k_x, k_y)  # pixels from the contact line to the top's shadow
    sigma_near = 0.5  # anti-aliasing only: the shadow is sharp where it touches the object
    sigma_far = max(sigma_near, softness * length)

    shadow = np.zeros((height, width), np.float32)
    _cast(shadow, alpha, top, contact_row, int(cols[0]), int(cols[-1]), k_x, k_y, object_height,
          sigma_near, sigma_far, draw.opacity, fade)

    geometry: dict[str, Any] = {"contact_row": contact_row, "object_top": top, "shear": round(k_x, 6),
                                "squash": round(k_y, 6), "blur_near_px": sigma_near,
                                "blur_far_px": round(sigma_far, 4)}
    if draw.contact_opacity > 0.0:
        span = _contact_span(object_mask, contact_row, object_height)
        geometry["contact_span"] = list(span)
        contact = _contact_ellipse(height, width, span, contact_row, object_height, draw)
        # Two independent occluders: light reaching the ground passes both, (1-s) multiplies.
        shadow = 1.0 - (1.0 - shadow) * (1.0 - contact)
    np.clip(shadow, 0.0, 1.0, out=shadow)
    return shadow.astype(np.float32, copy=False), geometry


def apply_shadow(alpha: np.ndarray, fg_rgb: np.ndarray, shadow: np.ndarray,
                 shadow_rgb: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Put the shadow behind the object in one RGBA layer: ``a' = a + (1-a)s``,
    ``rgb' = (a*fg + (1-a)*s*shadow_rgb) / a'`` (unchanged where ``a' == 0``)."""
    a = alpha.astype(np.float32)
    behind = (1.0 - a) * shadow
    new_alpha = np.minimum(a + behind, 1.0)
    colour = np.asarray(shadow_rgb, np.float32)
    weighted = a[..., None] * fg_rgb + behind[..., None] * colour
    safe = np.where(new_alpha > 0.0, new_alpha, 1.0)[..., None]
    new_rgb = np.where(new_alpha[..., None] > 0.0, weighted / safe, fg_rgb)
    # a' >= a holds exactly in float arithmetic (a + x with x >= 0); np.maximum guards rounding anyway.
    return np.maximum(new_alpha, a).astype(np.float32), np.clip(new_rgb, 0.0, 1.0).astype(np.float32)


def _inputs(sample: LayeredSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [k for k in ("alpha", "fg_rgb") if k not in sample.work]
    if missing:
        raise KeyError(f"shadow needs work[{missing[0]!r}] from the matting stage")
    if sample.object_mask is None:
        raise ValueError("shadow needs object_mask (the contact line comes from it)")
    alpha = np.asarray(sample.work["alpha"], np.float32)
    fg_rgb = np.asarray(sample.work["fg_rgb"], np.float32)
    if alpha.ndim != 2 or fg_rgb.shape != alpha.shape + (3,) or sample.object_mask.shape != alpha.shape:
        raise ValueError(f"shape mismatch: alpha {alpha.shape}, fg_rgb {fg_rgb.shape}, "
                         f"object_mask {sample.object_mask.shape}")
    return alpha, fg_rgb, sample.object_mask > 127


def _cast(shadow: np.ndarray, alpha: np.ndarray, top: int, contact_row: int, x0: int, x1: int, k_x: float,
          k_y: float, object_height: float, sigma_near: float, sigma_far: float, opacity: float,
          fade: float) -> None:
    """Project, soften and fade the silhouette into ``shadow`` (in place).

    Works on a canvas covering the projected silhouette plus a blur margin, cut to the image plus that
    margin: blurring there (instead of on the clipped image) keeps a shadow running out of frame as dark
    at the border as it would be, and keeps the cost proportional to the shadow, not the image."""
    height, width = shadow.shape
    # Matting can leave soft alpha a little outside the mask: take the shape from alpha around the mask box.
    pad = 2
    sy0, sy1 = max(top - pad, 0), min(contact_row + pad + 1, height)
    sx0, sx1 = max(x0 - pad, 0), min(x1 + pad + 1, width)
    source = np.ascontiguousarray(alpha[sy0:sy1, sx0:sx1], dtype=np.float32)

    # Image-plane affine map of the projection (see the module docstring), then its bounding box.
    forward = np.array([[1.0, -k_x, k_x * contact_row], [0.0, k_y, contact_row * (1.0 - k_y)]])
    corners = np.array([[sx0, sy0, 1], [sx1, sy0, 1], [sx0, sy1, 1], [sx1, sy1, 1]], np.float64)
    projected = corners @ forward.T
    margin = int(math.ceil(3.0 * sigma_far)) + 2
    cx0 = max(int(math.floor(projected[:, 0].min())) - margin, -margin)
    cx1 = min(int(math.ceil(projected[:, 0].max())) + margin, width + margin)
    cy0 = max(int(math.floor(projected[:, 1].min())) - margin, -margin)
    cy1 = min(int(math.ceil(projected[:, 1].max())) + margin, height + margin)
    if cx1 <= cx0 or cy1 <= cy0:
        return  # the projection falls entirely outside the frame

    # Source-crop coordinates -> canvas coordinates.
    to_canvas = forward.copy()
    to_canvas[:, 2] += forward[:, 0] * sx0 + forward[:, 1] * sy0 - np.array([cx0, cy0])
    canvas = cv2.warpAffine(source, to_canvas, (cx1 - cx0, cy1 - cy0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    # t: distance from the contact line along the shadow, 0 at the contact line, 1 at the top's shadow.
    # It depends only on the canvas row because every source row maps to one row.
    canvas_rows = np.arange(cy0, cy1, dtype=np.float32)
    t = np.clip((contact_row - canvas_rows) / (k_y * object_height), 0.0, 1.0)
    # Hat-function weights over the blur levels: row blends level floor(u) and floor(u)+1, u = t*(L-1).
    u = t * (BLUR_LEVELS - 1)
    levels = np.arange(BLUR_LEVELS, dtype=np.float32)
    weights = np.clip(1.0 - np.abs(u[None, :] - levels[:, None]), 0.0, 1.0)  # L x rows
    softened = np.zeros_like(canvas)
    for level in range(BLUR_LEVELS):
        rows_used = weights[level] > 0.0
        if not rows_used.any():
            continue
        sigma = sigma_near + (sigma_far - sigma_near) * level / (BLUR_LEVELS - 1)
        softened += weights[level][:, None] * _gaussian_blur(canvas, sigma)
    softened *= (opacity * (1.0 - fade * t))[:, None]

    # Paste the part of the canvas that lies inside the image.
    ix0, iy0 = max(cx0, 0), max(cy0, 0)
    ix1, iy1 = min(cx1, width), min(cy1, height)
    if ix1 > ix0 and iy1 > iy0:
        shadow[iy0:iy1, ix0:ix1] = softened[iy0 - cy0:iy1 - cy0, ix0 - cx0:ix1 - cx0]


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur whose cost does not grow with sigma: wide blurs run on a downscaled copy, which
    loses nothing because a wide blur removes that detail anyway."""
    if sigma <= 0.0:
        return image
    factor = int(sigma // 4.0)
    if factor < 2 or min(image.shape) < 4 * factor:
        return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    small = cv2.resize(image, (max(1, image.shape[1] // factor), max(1, image.shape[0] // factor)),
                       interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor, borderType=cv2.BORDER_CONSTANT)
    return cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)


def _contact_span(object_mask: np.ndarray, contact_row: int, object_height: float) -> tuple[int, int]:
    """First and last column whose lowest object pixel is within the contact tolerance of the ground."""
    height = object_mask.shape[0]
    has = object_mask.any(axis=0)
    # Lowest object row per column: index of the last True, via the first True of the flipped mask.
    lowest = height - 1 - np.argmax(object_mask[::-1], axis=0)
    touching = has & (lowest >= contact_row - max(1.0, CONTACT_TOLERANCE * object_height))
    cols = np.flatnonzero(touching)
    return int(cols[0]), int(cols[-1])


def _contact_ellipse(height: int, width: int, span: tuple[int, int], contact_row: int,
                     object_height: float, draw: ShadowDraw) -> np.ndarray:
    """A thin, soft, dark ellipse centred on the contact line under the touching columns."""
    out = np.zeros((height, width), np.float32)
    centre_x = 0.5 * (span[0] + span[1])
    # A little wider than the touching part: occlusion reaches past the base.
    radius_x = 0.5 * (span[1] - span[0] + 1) * 1.15 + 1.0
    # A ground-plane disc seen obliquely: depth shrinks by the foreshortening; capped so a wide flat base
    # does not get a tall dark band, and at least 1.5 px so it survives 8-bit quantisation.
    radius_y = float(np.clip(radius_x * draw.foreshortening * 0.35, 1.5, 0.08 * object_height + 1.5))
    x0, x1 = max(int(centre_x - radius_x) - 1, 0), min(int(centre_x + radius_x) + 2, width)
    y0, y1 = max(int(contact_row - radius_y) - 1, 0), min(int(contact_row + radius_y) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return out
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    radius = np.sqrt(((xs - centre_x) / radius_x) ** 2 + ((ys - contact_row) / radius_y) ** 2)
    # Smoothstep from full at the centre to 0 at the rim: a blurred ellipse without a blur pass.
    ramp = np.clip(1.0 - radius, 0.0, 1.0)
    out[y0:y1, x0:x1] = draw.contact_opacity * ramp * ramp * (3.0 - 2.0 * ramp)
    return out
