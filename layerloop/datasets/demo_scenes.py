"""The demo scene generator: rendered RORem-layout triplets (``layerloop demo-data OUT --n N --seed S``).

The ``demo`` profile needs object-removal data without downloading anything, so we render it. Each
scene is a small ray-cast world seen by a pinhole camera standing at height ``CAMERA_HEIGHT`` and
looking along +Z (camera coordinates: X right, Y up, Z away from the camera):

* a textured floor (wooden planks, tiles, a checkerboard, grass or concrete) up to a back wall or, for
  grass, up to the horizon under a sky;
* one or two shaded objects standing on the floor (sphere, cube, box, cylinder, cone, bottle, snowman,
  toy tree, pawn), built from three convex primitives (sphere, vertical frustum, box);
* one directional light plus a tinted ambient term; every object casts a shadow, found by tracing a ray
  from each floor/wall point towards the light, softened with the distance to the occluder (penumbra),
  plus a contact shadow (ambient occlusion) around each footprint.

Written per scene ``<id>``: ``source/<id>.png`` (RGB, objects and shadows), ``GT/<id>.png`` (RGB, the same
background without objects or shadows), ``mask/<id>.png`` (L, 255 on the objects only, never the
shadow) and one entry per scene in ``meta.json``. GT equals source bit for bit wherever neither an
object nor its shadow reaches, because both come from one background render and the shadow is applied
as a factor that is exactly 1.0 outside the shadow region.

Anti-aliasing: the background is rendered at ``BACKGROUND_SUPERSAMPLE`` x and the objects at
``OBJECT_SUPERSAMPLE`` x inside their boxes, then averaged in linear light, so object boundaries carry
fractional coverage (what matting must recover) and far-away floor patterns do not shimmer.

Determinism: everything random comes from ``np.random.default_rng([seed, index, _STREAM])``, so one
scene depends on (seed, index) only and PNGs are byte-identical across runs on one machine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from layerloop.files import write_atomic

GENERATOR_VERSION = 1  # bump when a change alters the pixels, so idempotent re-runs re-render
BACKGROUND_SUPERSAMPLE = 2
OBJECT_SUPERSAMPLE = 4
CAMERA_HEIGHT = 1.0
PNG_COMPRESS_LEVEL = 6  # fixed so that the same pixels always give the same bytes
_STREAM = 0x5CE7E  # separates this generator's random stream from other users of (seed, index)
_EPS = 1e-6
_NEAREST_RECEIVER_Z = 0.5  # shadows are never traced closer to the camera than this (off-screen anyway)

GROUNDS = ("wood", "tiles", "checker", "grass", "concrete")
GROUND_PHRASES = {
    "wood": "on a wooden floor",
    "tiles": "on a tiled floor",
    "checker": "on a checkered floor",
    "grass": "on the grass",
    "concrete": "on a concrete floor",
}
CATEGORIES = ("sphere", "cube", "box", "cylinder", "cone", "bottle", "snowman", "toy tree", "pawn")
COLOURS = {  # sRGB albedo of the object's main colour
    "red": (0.78, 0.12, 0.10),
    "orange": (0.93, 0.48, 0.10),
    "yellow": (0.95, 0.80, 0.15),
    "green": (0.20, 0.60, 0.25),
    "teal": (0.10, 0.55, 0.55),
    "blue": (0.15, 0.30, 0.78),
    "purple": (0.45, 0.22, 0.62),
    "pink": (0.93, 0.50, 0.65),
    "white": (0.90, 0.90, 0.88),
    "black": (0.10, 0.10, 0.11),
    "grey": (0.50, 0.50, 0.52),
    "brown": (0.45, 0.28, 0.15),
}
FINISHES = {"matte": (0.0, 1.0), "satin": (0.25, 18.0), "glossy": (0.7, 80.0)}  # specular, shininess
WALL_COLOURS = ((0.86, 0.80, 0.70), (0.80, 0.82, 0.80), (0.72, 0.80, 0.88), (0.70, 0.76, 0.64),
                (0.90, 0.89, 0.86), (0.82, 0.62, 0.52))


# ------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Camera:
    focal: float  # pixels (at 1x)
    cx: float  # principal point x, pixels
    horizon: float  # image row of the horizon, pixels
    height: float = CAMERA_HEIGHT

    def project(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.cx + self.focal * x / z, self.horizon + self.focal * (self.height - y) / z

    def directions(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ray directions (not normalised: dz == 1) through image points (px, py)."""
        return (px - self.cx) / self.focal, (self.horizon - py) / self.focal, np.ones_like(px)

    @property
    def origin(self) -> tuple[float, float, float]:
        return 0.0, self.height, 0.0


@dataclass(frozen=True)
class Material:
    albedo: tuple[float, float, float]  # linear RGB
    specular: float
    shininess: float


# Rays are passed as component tuples (x, y, z); each component is a scalar or an array, so one
# intersection routine serves camera rays (one origin, many directions) and shadow rays (many origins,
# one direction) through numpy broadcasting. Misses are +inf.
Vec = tuple[Any, Any, Any]


@dataclass(frozen=True)
class Sphere:
    cx: float
    cy: float
    cz: float
    r: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.array([self.cx, self.cy, self.cz])
        return c - self.r, c + self.r

    def intersect(self, o: Vec, d: Vec) -> np.ndarray:
        ox, oy, oz = o[0] - self.cx, o[1] - self.cy, o[2] - self.cz
        a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        b = ox * d[0] + oy * d[1] + oz * d[2]
        c = ox * ox + oy * oy + oz * oz - self.r * self.r
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        # Origins are outside every primitive (shadow rays start just off the surface), so the near
        # root is the visible one; the far root only matters for origins inside, i.e. hidden floor.
        near, far = (-b - root) / a, (-b + root) / a
        t = np.where(near > _EPS, near, far)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def normal(self, p: Vec) -> Vec:
        return (p[0] - self.cx) / self.r, (p[1] - self.cy) / self.r, (p[2] - self.cz) / self.r


@dataclass(frozen=True)
class Frustum:
    """A vertical truncated cone (cylinder when r0 == r1, cone when r1 == 0) with both caps."""

    cx: float
    cz: float
    y0: float
    y1: float
    r0: float
    r1: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.r0, self.r1)
        return np.array([self.cx - r, self.y0, self.cz - r]), np.array([self.cx + r, self.y1, self.cz + r])

    def intersect(self, o: Vec, d: Vec) -> np.ndarray:
        x, z = o[0] - self.cx, o[2] - self.cz
        slope = (self.r1 - self.r0) / (self.y1 - self.y0)
        p = self.r0 + slope * (o[1] - self.y0)  # radius at the origin's height
        a = d[0] * d[0] + d[2] * d[2] - slope * slope * d[1] * d[1]
        a = np.where(np.abs(a) < 1e-12, 1e-12, a)
        b = x * d[0] + z * d[2] - p * slope * d[1]
        c = x * x + z * z - p * p
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(np.broadcast(x, d[0], o[1]).shape, np.inf)
        for t in ((-b - root) / a, (-b + root) / a):
            y = o[1] + t * d[1]
            ok = (disc >= 0) & (t > _EPS) & (y >= self.y0) & (y <= self.y1)
            best = np.where(ok & (t < best), t, best)
        dy = np.where(np.abs(d[1]) < 1e-12, 1e-12, d[1])
        for yc, rc in ((self.y0, self.r0), (self.y1, self.r1)):
            if rc <= 0:
                continue
            t = (yc - o[1]) / dy
            hx, hz = x + t * d[0], z + t * d[2]
            ok = (t > _EPS) & (hx * hx + hz * hz <= rc * rc)
            best = np.where(ok & (t < best), t, best)
        return best

    def normal(self, p: Vec) -> Vec:
        x, y, z = p[0] - self.cx, p[1], p[2] - self.cz
        slope = (self.r1 - self.r0) / (self.y1 - self.y0)
        r = self.r0 + slope * (y - self.y0)
        # The side's implicit surface x^2 + z^2 = r(y)^2 has gradient (x, -r * slope, z).
        nx, ny, nz = x, -r * slope, z
        length = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-12
        nx, ny, nz = nx / length, ny / length, nz / length
        top = y > self.y1 - 1e-5
        bottom = y < self.y0 + 1e-5
        ny = np.where(top, 1.0, np.where(bottom, -1.0, ny))
        nx = np.where(top | bottom, 0.0, nx)
        nz = np.where(top | bottom, 0.0, nz)
        return nx, ny, nz


@dataclass(frozen=True)
class Box:
    """A box resting on the floor, turned by ``angle`` (radians) about its vertical axis."""

    cx: float
    cz: float
    hx: float
    hy: float
    hz: float
    angle: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c, s = abs(math.cos(self.angle)), abs(math.sin(self.angle))
        ex, ez = c * self.hx + s * self.hz, s * self.hx + c * self.hz
        return (np.array([self.cx - ex, 0.0, self.cz - ez]),
                np.array([self.cx + ex, 2 * self.hy, self.cz + ez]))

    def _to_local(self, x: Any, z: Any) -> tuple[Any, Any]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c * x + s * z, -s * x + c * z

    def intersect(self, o: Vec, d: Vec) -> np.ndarray:
        lx, lz = self._to_local(o[0] - self.cx, o[2] - self.cz)
        ly = o[1] - self.hy
        dx, dz = self._to_local(d[0], d[2])
        near = far = None
        for oc, dc, h in ((lx, dx, self.hx), (ly, d[1], self.hy), (lz, dz, self.hz)):
            dc = np.where(np.abs(dc) < 1e-12, 1e-12, dc)
            t0, t1 = (-h - oc) / dc, (h - oc) / dc
            lo, hi = np.minimum(t0, t1), np.maximum(t0, t1)
            near = lo if near is None else np.maximum(near, lo)
            far = hi if far is None else np.minimum(far, hi)
        t = np.where(near > _EPS, near, far)
        return np.where((near <= far) & (t > _EPS), t, np.inf)

    def normal(self, p: Vec) -> Vec:
        lx, lz = self._to_local(p[0] - self.cx, p[2] - self.cz)
        ly = p[1] - self.hy
        qx, qy, qz = lx / self.hx, ly / self.hy, lz / self.hz
        ax, ay, az = np.abs(qx), np.abs(qy), np.abs(qz)
        use_x = (ax >= ay) & (ax >= az)
        use_y = ~use_x & (ay >= az)
        use_z = ~use_x & ~use_y
        nlx, nly, nlz = np.where(use_x, np.sign(qx), 0.0), np.where(use_y, np.sign(qy), 0.0), np.where(use_z, np.sign(qz), 0.0)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c * nlx - s * nlz, nly, s * nlx + c * nlz


Part = Sphere | Frustum | Box


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    finish: str
    parts: tuple[Part, ...]
    x: float
    z: float
    # Footprint for the contact shadow: a rounded rectangle (half sizes, corner radius, angle) and
    # the distance over which the contact darkening fades.
    foot_half: tuple[float, float]
    foot_radius: float
    foot_angle: float
    contact_width: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        los, his = zip(*(p.bounds() for p in self.parts))
        return np.min(los, axis=0), np.max(his, axis=0)

    def footprint_distance(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.foot_angle), math.sin(self.foot_angle)
        dx, dz = x - self.x, z - self.z
        qx = np.abs(c * dx + s * dz) - self.foot_half[0]
        qz = np.abs(-s * dx + c * dz) - self.foot_half[1]
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qz, 0.0))
        return np.maximum(outside - self.foot_radius, 0.0)


@dataclass(frozen=True)
class Scene:
    size: int
    camera: Camera
    light: tuple[float, float, float]  # unit vector towards the light
    sun: tuple[float, float, float]  # linear RGB irradiance of the light
    ambient: tuple[float, float, float]  # linear RGB of the sky/ambient term
    softness: float  # tan of the light's angular radius: penumbra width per unit occluder distance
    ground: str
    wall_z: float | None  # depth of the back wall; None: open ground up to the horizon
    objects: tuple[SceneObject, ...]
    ground_seed: int

    @property
    def floor_top(self) -> float:
        """First image row (1x, fractional) that shows floor."""
        if self.wall_z is None:
            return self.camera.horizon
        return self.camera.horizon + self.camera.focal * self.camera.height / self.wall_z

    def caption(self) -> str:
        parts = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.finish} {o.category}" for o in self.objects]
        return f"{' and '.join(parts)} {GROUND_PHRASES[self.ground]}"


# ------------------------------------------------------------------------------------- scene sampling
def _srgb_to_linear(c: Any) -> Any:
    return np.power(np.asarray(c, dtype=np.float64), 2.2)


def _srgb_to_linear32(c: np.ndarray) -> np.ndarray:
    return np.power(np.clip(c, 0.0, 1.0).astype(np.float32), np.float32(2.2))


def _material(rng: np.random.Generator, srgb: Sequence[float], finish: str, jitter: float = 0.06) -> Material:
    colour = np.clip(np.asarray(srgb) * (1.0 + rng.uniform(-jitter, jitter, 3)), 0.02, 0.97)
    specular, shininess = FINISHES[finish]
    return Material(tuple(float(v) for v in _srgb_to_linear(colour)), specular, shininess)


def _build_object(rng: np.random.Generator, category: str, x: float, z: float, scale: float) -> SceneObject:
    colour = str(rng.choice(list(COLOURS)))
    finish = str(rng.choice(list(FINISHES), p=[0.4, 0.3, 0.3]))
    main = _material(rng, COLOURS[colour], finish)
    u = scale
    foot_half, foot_radius, foot_angle = (0.0, 0.0), 0.0, 0.0
    if category == "sphere":
        r = u * rng.uniform(0.45, 0.6)
        parts: tuple[Part, ...] = (Sphere(x, r, z, r, main),)
        contact = 0.5 * r
    elif category in ("cube", "box"):
        if category == "cube":
            hx = hy = hz = u * rng.uniform(0.3, 0.42)
        else:
            hx, hy, hz = u * rng.uniform(0.3, 0.55), u * rng.uniform(0.18, 0.4), u * rng.uniform(0.25, 0.5)
        angle = float(rng.uniform(0, math.pi / 2))
        parts = (Box(x, z, hx, hy, hz, angle, main),)
        foot_half, foot_angle = (hx, hz), angle
        contact = 0.35 * min(hx, hy, hz)
    elif category in ("cylinder", "cone"):
        r = u * rng.uniform(0.25, 0.4)
        h = u * rng.uniform(0.8, 1.4)
        parts = (Frustum(x, z, 0.0, h, r, r if category == "cylinder" else 0.0, main),)
        foot_radius, contact = r, 0.35 * r
    elif category == "bottle":
        r = u * rng.uniform(0.18, 0.25)
        body = u * rng.uniform(0.8, 1.1)
        neck_r = 0.38 * r
        parts = (Frustum(x, z, 0.0, body, r, r, main),
                 Frustum(x, z, body, body + 0.22 * u, r, neck_r, main),
                 Frustum(x, z, body + 0.22 * u, body + 0.5 * u, neck_r, neck_r, main))
        foot_radius, contact = r, 0.35 * r
    elif category == "snowman":
        r1 = u * rng.uniform(0.32, 0.42)
        r2 = r1 * rng.uniform(0.55, 0.7)
        parts = (Sphere(x, r1, z, r1, main), Sphere(x, 2 * r1 + 0.6 * r2, z, r2, main))
        contact = 0.5 * r1
    elif category == "toy tree":
        trunk_r, trunk_h = u * 0.08, u * rng.uniform(0.2, 0.35)
        brown = _material(rng, COLOURS["brown"], "matte")
        parts = (Frustum(x, z, 0.0, trunk_h + 0.05 * u, trunk_r, trunk_r, brown),
                 Frustum(x, z, trunk_h, trunk_h + u * rng.uniform(0.8, 1.2), u * rng.uniform(0.3, 0.42), 0.0, main))
        foot_radius, contact = trunk_r, 0.6 * trunk_r
    elif category == "pawn":
        base_r = u * rng.uniform(0.26, 0.32)
        parts = (Frustum(x, z, 0.0, 0.12 * u, base_r, 0.75 * base_r, main),
                 Frustum(x, z, 0.12 * u, 0.62 * u, 0.6 * base_r, 0.3 * base_r, main),
                 Frustum(x, z, 0.58 * u, 0.64 * u, 0.55 * base_r, 0.55 * base_r, main),
                 Sphere(x, 0.64 * u + 0.45 * base_r, z, 0.55 * base_r, main))
        foot_radius, contact = base_r, 0.3 * base_r
    else:
        raise ValueError(f"unknown demo object category {category!r}; choose from {CATEGORIES}")
    return SceneObject(category, colour, finish, parts, x, z, foot_half, foot_radius, foot_angle, contact)


def _screen_box(camera: Camera, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float, float, float]:
    """Screen bounding box of a world box (its projection is inside the hull of its 8 corners)."""
    xs, ys, zs = np.meshgrid([lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]], indexing="ij")
    px, py = camera.project(xs.ravel(), ys.ravel(), zs.ravel())
    return float(px.min()), float(py.min()), float(px.max()), float(py.max())


def _radius(obj: SceneObject) -> float:
    lo, hi = obj.bounds()
    return 0.5 * float(max(hi[0] - lo[0], hi[2] - lo[2]))


def sample_scene(seed: int, index: int, size: int = 256) -> Scene:
    """Draw one scene's description from (seed, index) alone."""
    rng = np.random.default_rng([int(seed), int(index), _STREAM])
    camera = Camera(focal=size * rng.uniform(1.0, 1.5), cx=size / 2.0, horizon=size * rng.uniform(0.2, 0.4))
    ground = str(rng.choice(GROUNDS))
    wall_z = None if ground == "grass" else float(rng.uniform(7.0, 12.0))

    # Side light mostly: straight from behind the camera the shadow hides behind the object, and from
    # straight ahead the object's visible side is unlit.
    elevation = math.radians(rng.uniform(28.0, 55.0))
    azimuth = math.radians(rng.uniform(35.0, 125.0) * rng.choice([-1.0, 1.0]))  # 0: behind the camera
    light = (math.cos(elevation) * math.sin(azimuth), math.sin(elevation), -math.cos(elevation) * math.cos(azimuth))
    ambient_level = rng.uniform(0.2, 0.34)
    warm = rng.uniform(0.0, 0.08)
    sun = tuple(float(v) * (1.0 - ambient_level) for v in (1.0 + warm, 1.0, 1.0 - warm))
    ambient = tuple(float(v) * ambient_level for v in (1.0 - warm, 1.0, 1.0 + 1.5 * warm))
    # Exposure: a floor in full light comes out near albedo, whatever the sun's elevation.
    exposure = 1.0 / (ambient_level + (1.0 - ambient_level) * 0.75)
    sun = tuple(v * exposure for v in sun)
    ambient = tuple(v * exposure for v in ambient)

    objects: list[SceneObject] = []
    n_objects = 1 if rng.random() < 0.65 else 2
    margin = 0.04 * size
    for _ in range(n_objects):
        category = str(rng.choice(CATEGORIES))
        for attempt in range(30):
            scale = rng.uniform(0.55, 0.95) * (0.97 ** attempt)
            z = rng.uniform(2.8, 5.0)
            half_view = (size / 2 - margin) * z / camera.focal
            x = rng.uniform(-0.8, 0.8) * half_view
            candidate = _build_object(rng, category, float(x), float(z), float(scale))
            lo, hi = candidate.bounds()
            x0, y0, x1, y1 = _screen_box(camera, lo, hi)
            inside = x0 >= margin and x1 <= size - margin and y0 >= margin and y1 <= size - margin
            # Footprints at least 0.15 apart, so two objects never interpenetrate.
            apart = all(math.hypot(o.x - x, o.z - z) > _radius(o) + _radius(candidate) + 0.15 for o in objects)
            if inside and apart:
                objects.append(candidate)
                break
    if not objects:  # every placement failed (tiny sizes): a small sphere in the middle always fits
        objects.append(_build_object(rng, "sphere", 0.0, 4.0, 0.4))
    return Scene(size=size, camera=camera, light=light, sun=sun, ambient=ambient,
                 softness=float(rng.uniform(0.01, 0.04)), ground=ground, wall_z=wall_z,
                 objects=tuple(objects), ground_seed=int(rng.integers(2**31)))


# ----------------------------------------------------------------------------------------- textures
def _noise_tile(rng: np.random.Generator, n: int = 256, beta: float = 1.8) -> np.ndarray:
    """Tileable fractal noise (zero mean, unit std) from filtered white noise; FFT noise wraps, so
    sampling it with BORDER_WRAP has no seams."""
    white = rng.standard_normal((n, n))
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    k = np.sqrt(fx * fx + fy * fy)
    k[0, 0] = 1.0
    spectrum = np.fft.rfft2(white) / k ** (beta / 2)
    spectrum[0, 0] = 0.0
    tile = np.fft.irfft2(spectrum, s=(n, n))
    return (tile / tile.std()).astype(np.float32)


def _sample(tile: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = tile.shape[0]
    # Wrapping first keeps remap's fixed-point coordinates small near the horizon (where world
    # coordinates explode); floor() instead of np.mod because np.mod is ~40x slower on floats.
    u, v = np.broadcast_arrays(np.asarray(u, np.float32), np.asarray(v, np.float32))
    mx = u - n * np.floor(u * (1.0 / n))
    my = v - n * np.floor(v * (1.0 / n))
    return cv2.remap(tile, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def _fade(period: float, footprint: np.ndarray) -> np.ndarray:
    """Contrast left to a pattern of this world period when a pixel covers ``footprint`` world units:
    full when the period spans 6+ pixels, none below 2 (instead of aliasing into moire)."""
    return np.clip((period / footprint - 2.0) / 4.0, 0.0, 1.0).astype(np.float32)


def _line(distance: np.ndarray, width: float, footprint: np.ndarray) -> np.ndarray:
    """A pre-filtered line (grout, seam): widens and fades as pixels grow, keeping its average ink."""
    w = np.sqrt(width * width + footprint * footprint)
    return ((width / w) * np.exp(-((distance / w) ** 2))).astype(np.float32)


def _hash(table: np.ndarray, i: np.ndarray, j: np.ndarray | int = 0) -> np.ndarray:
    h = (i.astype(np.int64) * 73856093) ^ (np.asarray(j, dtype=np.int64) * 19349663)
    return table[np.mod(h, table.size)]


def _floor_albedo(scene: Scene, rng: np.random.Generator, x: np.ndarray, z: np.ndarray,
                  foot_x: np.ndarray, foot_z: np.ndarray) -> np.ndarray:
    """sRGB albedo of the floor at world points (x, z); foot_x / foot_z: world size of one pixel across
    and along the view direction (the latter grows with z^2: foreshortening)."""
    tile = _noise_tile(rng)
    table = rng.random(1024).astype(np.float32)
    big = _sample(tile, x * 3.0, z * 3.0) * 0.05  # slow dirt / lighting variation everywhere
    kind = scene.ground
    foot = np.maximum(foot_x, foot_z)
    if kind == "wood":
        palette = ((0.76, 0.58, 0.40), (0.47, 0.31, 0.20), (0.86, 0.70, 0.50), (0.62, 0.58, 0.52))
        base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float32)
        width, length = rng.uniform(0.14, 0.26), rng.uniform(1.0, 2.2)
        i = np.floor(x / width)
        offset = _hash(table, i) * length
        j = np.floor((z + offset) / length)
        # Per-board tone, faded where boards shrink below a few pixels (else it turns into noise).
        tone = 0.99 + 0.34 * (_hash(table, i, j + 7) - 0.5) * _fade(width, foot_x) * _fade(length, foot_z)
        grain = _sample(tile, x * 90.0, z * 5.0) * 0.09 * _fade(0.02, foot_x)
        across = (x / width - i) * width
        along = ((z + offset) / length - j) * length
        seams = np.maximum(_line(np.minimum(across, width - across), 0.004, foot_x),
                           _line(np.minimum(along, length - along), 0.004, foot_z))
        value = (tone * (1.0 + grain) * (1.0 - 0.45 * seams) + big)[..., None]
        return value * base
    if kind == "tiles":
        palette = ((0.92, 0.91, 0.88), (0.85, 0.78, 0.66), (0.74, 0.42, 0.30), (0.60, 0.62, 0.64), (0.56, 0.68, 0.78))
        base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float32)
        grout_colour = np.asarray((0.55, 0.53, 0.5) if base.mean() > 0.6 else (0.85, 0.84, 0.8), dtype=np.float32)
        size = rng.uniform(0.3, 0.6)
        i, j = np.floor(x / size), np.floor(z / size)
        tone = 1.0 + (0.12 * (_hash(table, i, j) - 0.5)) * _fade(size, foot)
        fx, fz = (x / size - i) * size, (z / size - j) * size
        grout = np.maximum(_line(np.minimum(fx, size - fx), 0.01, foot_x), _line(np.minimum(fz, size - fz), 0.01, foot_z))
        speck = _sample(tile, x * 60.0, z * 60.0) * 0.03 * _fade(0.05, foot)
        tiles = (tone + speck + big)[..., None] * base
        return tiles * (1.0 - grout[..., None]) + grout[..., None] * grout_colour
    if kind == "checker":
        palette = (((0.9, 0.9, 0.88), (0.12, 0.12, 0.13)), ((0.9, 0.86, 0.78), (0.55, 0.2, 0.16)),
                   ((0.88, 0.88, 0.9), (0.2, 0.3, 0.55)), ((0.85, 0.8, 0.7), (0.35, 0.45, 0.3)))
        a, b = (np.asarray(c, dtype=np.float32) for c in palette[rng.integers(len(palette))])
        size = rng.uniform(0.25, 0.5)
        # Pre-filtered square waves: sin() squashed to +-1 with a slope set by the pixel size.
        sx = np.clip(np.sin(np.pi * x / size) * size / (np.pi * foot_x * 0.8), -1, 1)
        sz = np.clip(np.sin(np.pi * z / size) * size / (np.pi * foot_z * 0.8), -1, 1)
        t = (0.5 + 0.5 * sx * sz).astype(np.float32)[..., None]
        return (a * t + b * (1.0 - t)) * (1.0 + big[..., None])
    if kind == "grass":
        dark, light = np.array((0.16, 0.32, 0.09), np.float32), np.array((0.45, 0.58, 0.18), np.float32)
        patches = 1.0 / (1.0 + np.exp(-1.2 * _sample(tile, x * 4.0, z * 4.0)))
        blades = _sample(tile, x * 70.0, z * 35.0) * 0.22 * _fade(0.03, foot)
        mix = patches[..., None]
        return (dark * (1 - mix) + light * mix) * (1.0 + blades + big)[..., None]
    if kind == "concrete":
        grey = np.float32(rng.uniform(0.5, 0.7))
        tint = np.asarray((1.0, 0.98, 0.95), np.float32)
        fine = _sample(tile, x * 40.0, z * 40.0) * 0.05 * _fade(0.04, foot)
        coarse = _sample(tile, x * 8.0, z * 8.0) * 0.06
        speck = np.clip(_sample(tile, x * 150.0 + 91.0, z * 150.0 + 17.0) - 2.0, 0, 1) * 0.5 * _fade(0.01, foot)
        value = grey * (1.0 + fine + coarse + big - speck)
        return value[..., None] * tint
    raise ValueError(f"unknown ground {kind!r}")


# -------------------------------------------------------------------------------------- background
@dataclass
class _Background:
    """The clean background at BACKGROUND_SUPERSAMPLE x, linear RGB, plus what shadows need."""

    linear: np.ndarray  # H2 x W2 x 3 float32 (lit, exposed)
    px: np.ndarray  # W2 sample x positions (1x pixel units)
    py: np.ndarray  # H2 sample y positions


def _render_background(scene: Scene, rng: np.random.Generator) -> _Background:
    ss = BACKGROUND_SUPERSAMPLE
    size, cam = scene.size, scene.camera
    # float32 throughout: the background is the bulk of the pixels and precision is ample.
    px = ((np.arange(size * ss) + 0.5) / ss).astype(np.float32)
    py = ((np.arange(size * ss) + 0.5) / ss).astype(np.float32)
    out = np.empty((size * ss, size * ss, 3), np.float32)
    sun, ambient = np.asarray(scene.sun, np.float32), np.asarray(scene.ambient, np.float32)
    light = scene.light

    floor_rows = py > scene.floor_top
    fy = py[floor_rows][:, None]
    depth = np.minimum(cam.focal * cam.height / (fy - cam.horizon), 1e4)
    fx_world = (px[None, :] - cam.cx) * depth / cam.focal
    z = np.broadcast_to(depth, fx_world.shape)
    foot_x = depth / cam.focal * np.ones_like(fx_world)
    foot_z = depth * depth / (cam.focal * cam.height) * np.ones_like(fx_world)
    albedo = _floor_albedo(scene, rng, fx_world, z, foot_x, foot_z)
    floor_light = (ambient + sun * light[1]).astype(np.float32)
    floor = _srgb_to_linear32(albedo) * floor_light
    if scene.wall_z is not None:
        # The corner where floor meets wall receives less ambient light.
        floor *= (1.0 - 0.3 * np.exp(-(scene.wall_z - z) / 0.12)).astype(np.float32)[..., None]
    else:
        haze = _srgb_to_linear(np.array((0.78, 0.84, 0.9))).astype(np.float32)
        fog = (1.0 - np.exp(-z / 40.0)).astype(np.float32)[..., None]
        floor = floor * (1 - fog) + haze * fog
    out[floor_rows] = floor

    upper = ~floor_rows
    uy = py[upper][:, None]
    if scene.wall_z is not None:
        wall_srgb = np.asarray(WALL_COLOURS[rng.integers(len(WALL_COLOURS))]) * rng.uniform(0.9, 1.05)
        wy = cam.height - (uy - cam.horizon) * scene.wall_z / cam.focal  # world height on the wall
        wx = (px[None, :] - cam.cx) * scene.wall_z / cam.focal
        tile = _noise_tile(rng, 128, beta=2.2)
        value = 1.0 + 0.015 * _sample(tile, wx * 6.0, wy * 6.0)
        value = value * (1.0 - 0.3 * np.exp(-wy / 0.1)) * (1.0 - 0.12 * np.clip(wy / 3.0, 0, 1))
        skirting = wy < 0.09
        colour = np.where(skirting[..., None], np.float32(0.9), np.asarray(wall_srgb, np.float32))
        wall_light = (ambient + sun * max(0.0, -light[2])).astype(np.float32)
        out[upper] = _srgb_to_linear32(colour * value[..., None]) * wall_light
    else:
        # Sky: emissive, so unlit; a gradient from hazy horizon to blue zenith with faint clouds.
        t = np.clip((cam.horizon - uy) / max(cam.horizon, 1.0), 0, 1) ** 0.6 * np.ones_like(px)[None, :]
        zenith, horizon = np.array((0.35, 0.55, 0.9)), np.array((0.78, 0.84, 0.9))
        tile = _noise_tile(rng, 128, beta=2.6)
        clouds = np.clip(_sample(tile, px[None, :] * 0.4 * np.ones_like(uy), uy * 1.2 * np.ones_like(px)[None, :]) * 0.5, 0, 1)
        sky = zenith * t[..., None] + horizon * (1 - t[..., None])
        sky = sky * (1 - clouds[..., None] * 0.6) + 0.95 * clouds[..., None] * 0.6
        out[upper] = _srgb_to_linear32(sky)
    return _Background(out, px, py)


# ------------------------------------------------------------------------------------------ shadows
def _shadow_corners(scene: Scene, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Where a world box's corners land when pushed away from the light onto floor or wall; also
    whether the shadow reaches the camera's feet (then it runs off the bottom of the image)."""
    L = np.asarray(scene.light)
    xs, ys, zs = (a.ravel() for a in np.meshgrid([lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]], indexing="ij"))
    t = ys / L[1]
    sx, sy, sz = xs - t * L[0], ys - t * L[1], zs - t * L[2]
    if scene.wall_z is not None and L[2] < 0:
        beyond = sz > scene.wall_z
        tw = (zs - scene.wall_z) / L[2]
        sx = np.where(beyond, xs - tw * L[0], sx)
        sy = np.where(beyond, ys - tw * L[1], sy)
        sz = np.where(beyond, scene.wall_z, sz)
    near_camera = bool((sz < _NEAREST_RECEIVER_Z).any())
    sz = np.maximum(sz, _NEAREST_RECEIVER_Z)
    return np.concatenate([sx, xs]), np.concatenate([sy, ys]), np.concatenate([sz, zs]), near_camera


_PENUMBRA_LEVELS = np.array([0.5, 1.5, 4.0, 10.0])  # penumbra blur levels, in 2x pixels


def _shadow_factor(scene: Scene, bg: _Background) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Per-pixel multiplier (H x W x 3 at 2x, over a region) that turns the clean background into the
    shadowed one: (ambient * (1 - occlusion) + sun * cos * visibility) / (ambient + sun * cos).
    Exactly 1.0 outside the shadows, so GT and source agree there bit for bit."""
    L = np.asarray(scene.light)
    region, part_boxes = _shadow_region(scene)
    x0, y0, x1, y1 = region
    if x1 <= x0 or y1 <= y0:
        return np.ones((0, 0, 3), np.float32), (0, 0, 0, 0)
    on_floor, receiver, depth, world = _receivers(scene, bg, region)
    t_hit = _occluder_distance(part_boxes, region, world, receiver, L)
    visibility = _penumbra_visibility(scene, t_hit, depth, receiver)
    unoccluded = _contact_unoccluded(scene, world, on_floor)

    sun, ambient = np.asarray(scene.sun, np.float32), np.asarray(scene.ambient, np.float32)
    cos = np.where(on_floor, L[1], max(0.0, -L[2]))[..., None]
    lit = ambient + sun * cos
    factor = (ambient * unoccluded[..., None] + sun * cos * visibility[..., None]) / np.maximum(lit, 1e-6)
    # Blur tails and the contact cutoff leave values a hair under 1; snap them so "no shadow" is exact.
    factor = np.where(factor > 1.0 - 1.0 / 4096, 1.0, factor).astype(np.float32)
    return factor, (x0, y0, x1, y1)


def _shadow_region(scene: Scene) -> tuple[tuple[int, int, int, int], list[tuple[Any, ...]]]:
    """The region (x0, y0, x1, y1 at 2x) holding every part's shadow and every object's contact shadow,
    padded by the widest blur; and each part's shadow box on screen (part, x0, y0, x1, y1 at 1x, whether
    it runs off the bottom)."""
    ss, cam, size = BACKGROUND_SUPERSAMPLE, scene.camera, scene.size
    xs, ys, full_height = [], [], False
    part_boxes = []
    for obj in scene.objects:
        for part in obj.parts:
            lo, hi = part.bounds()
            sx, sy, sz, near = _shadow_corners(scene, lo, hi)
            px, py = cam.project(sx, sy, sz)
            full_height |= near
            part_boxes.append((part, px.min(), py.min(), px.max(), py.max(), near))
            xs += [px.min(), px.max()]
            ys += [py.min(), py.max()]
        reach = obj.contact_width * ((0.6 / 0.004) ** (1 / 3) - 1)  # where the contact term hits its cutoff
        ext = max(obj.foot_half) + obj.foot_radius + reach
        px, py = cam.project(np.array([obj.x - ext, obj.x + ext, obj.x, obj.x]), np.zeros(4),
                             np.array([obj.z, obj.z, max(obj.z - ext, _NEAREST_RECEIVER_Z), obj.z + ext]))
        xs += [px.min(), px.max()]
        ys += [py.min(), py.max()]
    pad = 3 * _PENUMBRA_LEVELS[-1] / ss + 2
    x0 = int(max(0, math.floor(min(xs) - pad))) * ss
    x1 = int(min(size, math.ceil(max(xs) + pad))) * ss
    y0 = int(max(0, math.floor(max(min(ys) - pad, scene.floor_top if scene.wall_z is None else 0)))) * ss
    y1 = size * ss if full_height else int(min(size, math.ceil(max(ys) + pad))) * ss
    return (x0, y0, x1, y1), part_boxes


def _receivers(scene: Scene, bg: _Background, region: tuple[int, int, int, int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Vec]:
    """Over the region: which samples are floor, which receive shadows (floor or wall), their depth and
    their world position."""
    cam = scene.camera
    x0, y0, x1, y1 = region
    rx, ry = bg.px[x0:x1][None, :], bg.py[y0:y1][:, None]
    h, w = y1 - y0, x1 - x0
    on_floor = np.broadcast_to(ry > scene.floor_top, (h, w))
    on_wall = np.broadcast_to((ry <= scene.floor_top) & (scene.wall_z is not None), (h, w))
    floor_depth = cam.focal * cam.height / np.maximum(ry - cam.horizon, 1e-6)
    depth = np.where(on_floor, floor_depth, scene.wall_z if scene.wall_z is not None else 1.0) * np.ones((1, w), np.float32)
    wx = (rx - cam.cx) * depth / cam.focal
    wy = np.where(on_floor, 0.0, cam.height - (ry - cam.horizon) * depth / cam.focal)
    wz = depth
    return on_floor, on_floor | on_wall, depth, (wx, wy, wz)


def _occluder_distance(part_boxes: list[tuple[Any, ...]], region: tuple[int, int, int, int], world: Vec,
                       receiver: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Hard shadow: distance along the light to the nearest occluding part (inf where lit), part by part
    in its own box."""
    ss = BACKGROUND_SUPERSAMPLE
    x0, y0, x1, y1 = region
    wx, wy, wz = world
    t_hit = np.full((y1 - y0, x1 - x0), np.inf, np.float32)
    for part, bx0, by0, bx1, by1, near in part_boxes:
        c0 = max(x0, int(math.floor(bx0 * ss)) - 2) - x0
        c1 = min(x1, int(math.ceil(bx1 * ss)) + 2) - x0
        r0 = max(y0, int(math.floor(by0 * ss)) - 2) - y0
        r1 = (y1 if near else min(y1, int(math.ceil(by1 * ss)) + 2)) - y0
        if c1 <= c0 or r1 <= r0:
            continue
        sl = (slice(r0, r1), slice(c0, c1))
        t = part.intersect((wx[sl], wy[sl], wz[sl]), (L[0], L[1], L[2]))
        t_hit[sl] = np.minimum(t_hit[sl], np.where(receiver[sl], t, np.inf))
    return t_hit


def _penumbra_visibility(scene: Scene, t_hit: np.ndarray, depth: np.ndarray, receiver: np.ndarray) -> np.ndarray:
    """Sun visibility with a penumbra whose blur width grows with the occluder distance (in pixels:
    world width * focal / depth)."""
    ss, levels = BACKGROUND_SUPERSAMPLE, _PENUMBRA_LEVELS
    occluded = np.isfinite(t_hit).astype(np.float32)
    sigma = np.where(np.isfinite(t_hit), scene.softness * t_hit * scene.camera.focal * ss / depth, 0.0).astype(np.float32)
    spread_w = cv2.GaussianBlur(occluded, (0, 0), 6.0)
    spread = cv2.GaussianBlur(sigma * occluded, (0, 0), 6.0) / np.maximum(spread_w, 1e-6)
    level = np.interp(np.clip(spread, levels[0], levels[-1]), levels, np.arange(len(levels))).astype(np.float32)
    soft = np.zeros(t_hit.shape, np.float32)
    for k, s in enumerate(levels):  # linear blend of the two blur levels around each pixel's level
        weight = np.maximum(1.0 - np.abs(level - np.float32(k)), 0.0)
        soft += weight * cv2.GaussianBlur(occluded, (0, 0), float(s))
    return np.where(receiver, 1.0 - soft, 1.0)


def _contact_unoccluded(scene: Scene, world: Vec, on_floor: np.ndarray) -> np.ndarray:
    """Contact shadow: 1 - ambient occlusion around each footprint, cut to exactly 0 at a small value."""
    wx, _, wz = world
    unoccluded = np.ones(on_floor.shape, np.float32)
    for obj in scene.objects:
        d = obj.footprint_distance(wx, wz)
        ao = 0.6 / (1.0 + d / obj.contact_width) ** 3
        ao = np.where(on_floor, np.maximum(ao - 0.004, 0.0) / 0.996, 0.0)
        unoccluded *= 1.0 - ao
    return unoccluded


# ---------------------------------------------------------------------------------------- objects
def _render_objects(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied linear colour (H x W x 3) and coverage (H x W) of all objects at 1x, from
    OBJECT_SUPERSAMPLE^2 camera rays per pixel inside each object's box."""
    ss = OBJECT_SUPERSAMPLE
    size, cam = scene.size, scene.camera
    colour = np.zeros((size, size, 3), np.float32)
    coverage = np.zeros((size, size), np.float32)
    every_part = [(k, part) for k, obj in enumerate(scene.objects) for part in obj.parts]
    part_boxes = [_screen_box(cam, *part.bounds()) for _, part in every_part]
    for k, obj in enumerate(scene.objects):
        bx0, by0, bx1, by1 = _screen_box(cam, *obj.bounds())
        x0, y0 = max(0, int(math.floor(bx0))), max(0, int(math.floor(by0)))
        x1, y1 = min(size, int(math.ceil(bx1)) + 1), min(size, int(math.ceil(by1)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        rays, depth, which = _cast_camera_rays(cam, (x0, y0, x1, y1), every_part, part_boxes)
        own_parts = [n for n, (owner, _) in enumerate(every_part) if owner == k]
        mine = np.isin(which, own_parts)
        if not mine.any():
            continue
        samples = np.zeros(rays[0].shape + (3,), np.float32)
        samples[np.nonzero(mine)] = _shade_hits(scene, every_part, own_parts, rays, depth, which, mine)
        coverage[y0:y1, x0:x1] += _downsample(mine.astype(np.float32), ss)
        colour[y0:y1, x0:x1] += _downsample(samples, ss)
    return colour, coverage


def _cast_camera_rays(cam: Camera, box: tuple[int, int, int, int], every_part: list[tuple[int, Any]],
                      part_boxes: list[tuple[float, float, float, float]]) -> tuple[Vec, np.ndarray, np.ndarray]:
    """Camera rays through the supersamples of a pixel box: their directions, the depth of the nearest
    part they hit (inf for none) and which part that is (its index in ``every_part``, -1 for none)."""
    ss = OBJECT_SUPERSAMPLE
    x0, y0, x1, y1 = box
    sx = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    sy = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    dx, dy, dz = cam.directions(sx[None, :] * np.ones((sy.size, 1)), sy[:, None] * np.ones((1, sx.size)))
    depth = np.full(dx.shape, np.inf)
    which = np.full(dx.shape, -1, np.int64)
    for n, ((owner, part), (px0, py0, px1, py1)) in enumerate(zip(every_part, part_boxes)):
        # Only rays inside the part's own screen box can hit it; other objects count for occlusion.
        c0 = max(0, int(math.floor((px0 - x0) * ss)) - 1)
        c1 = min(sx.size, int(math.ceil((px1 - x0) * ss)) + 1)
        r0 = max(0, int(math.floor((py0 - y0) * ss)) - 1)
        r1 = min(sy.size, int(math.ceil((py1 - y0) * ss)) + 1)
        if c1 <= c0 or r1 <= r0:
            continue
        sl = (slice(r0, r1), slice(c0, c1))
        t = part.intersect(cam.origin, (dx[sl], dy[sl], dz[sl]))
        closer = t < depth[sl]
        depth[sl] = np.where(closer, t, depth[sl])
        which[sl] = np.where(closer, n, which[sl])
    return (dx, dy, dz), depth, which


def _shade_hits(scene: Scene, every_part: list[tuple[int, Any]], own_parts: list[int], rays: Vec,
                depth: np.ndarray, which: np.ndarray, mine: np.ndarray) -> np.ndarray:
    """Linear colour (N x 3) of the rays that hit one object (``mine``, in ``np.nonzero`` order): Blinn-Phong
    under the sun, with shadows from the other parts, plus a sky-weighted ambient term."""
    cam, L = scene.camera, np.asarray(scene.light)
    rows, cols = np.nonzero(mine)
    t = depth[rows, cols]
    ddx, ddy, ddz = (d[rows, cols] for d in rays)
    p = (cam.origin[0] + t * ddx, cam.origin[1] + t * ddy, cam.origin[2] + t * ddz)
    ids = which[rows, cols]
    normal, albedo, specular, shininess = _surface(every_part, own_parts, p, ids)
    n_dot_l = (np.maximum(normal[0] * L[0] + normal[1] * L[1] + normal[2] * L[2], 0.0)
               * _sun_visible(every_part, p, normal, ids, L))
    view_len = np.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
    hx, hy, hz = L[0] - ddx / view_len, L[1] - ddy / view_len, L[2] - ddz / view_len  # Blinn half vector
    h_len = np.sqrt(hx * hx + hy * hy + hz * hz) + 1e-12
    n_dot_h = np.maximum((normal[0] * hx + normal[1] * hy + normal[2] * hz) / h_len, 0.0)
    # Ambient: more from the sky above than from the floor below, less near the floor (contact).
    sky = (0.75 + 0.25 * normal[1]) * (0.55 + 0.45 * np.clip(p[1] / 0.15, 0.0, 1.0))
    sun, ambient = np.asarray(scene.sun), np.asarray(scene.ambient)
    shade = albedo * (ambient * sky[:, None] + sun * n_dot_l[:, None])
    shade += (specular * n_dot_h ** shininess * (n_dot_l > 0))[:, None] * sun
    return shade


def _surface(every_part: list[tuple[int, Any]], own_parts: list[int], p: Vec, ids: np.ndarray
             ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Normal (three components), albedo, specular weight and shininess at each hit point ``p`` on the
    part ``ids`` names."""
    t = p[0]
    normal = [np.zeros_like(t) for _ in range(3)]
    albedo = np.zeros((t.size, 3))
    specular = np.zeros_like(t)
    shininess = np.ones_like(t)
    for n in own_parts:
        sel = ids == n
        if not sel.any():
            continue
        part = every_part[n][1]
        nn = part.normal((p[0][sel], p[1][sel], p[2][sel]))
        for c in range(3):
            normal[c][sel] = nn[c]
        albedo[sel] = part.material.albedo
        specular[sel] = part.material.specular
        shininess[sel] = part.material.shininess
    return normal, albedo, specular, shininess


def _sun_visible(every_part: list[tuple[int, Any]], p: Vec, normal: list[np.ndarray], ids: np.ndarray,
                 L: np.ndarray) -> np.ndarray:
    """1 where the sun reaches a hit point, 0 where another part (of this object or another) is in the
    way; a convex part cannot shadow itself beyond what n.L already darkens."""
    visible = np.ones_like(p[0])
    start = tuple(p[c] + normal[c] * 1e-4 for c in range(3))
    for n, (_, part) in enumerate(every_part):
        sel = ids != n
        if sel.any():
            hit = np.isfinite(part.intersect(tuple(s[sel] for s in start), tuple(L)))
            visible[np.flatnonzero(sel)[hit]] = 0.0
    return visible


# ------------------------------------------------------------------------------------------ public
def _linear_to_srgb8(linear: np.ndarray) -> np.ndarray:
    return np.rint(np.power(np.clip(linear, 0.0, 1.0), 1.0 / 2.2) * 255.0).astype(np.uint8)


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    # INTER_AREA with an integer factor is the plain block mean (and much faster than numpy's).
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (w, h), interpolation=cv2.INTER_AREA)


def render_scene(seed: int, index: int, size: int = 256) -> dict[str, Any]:
    """Render scene ``index`` of generation ``seed`` without touching the disk.

    Returns ``source`` and ``GT`` (H x W x 3 uint8 RGB), ``mask`` (H x W uint8, 255 where an object
    covers at least half the pixel), ``coverage`` (H x W float32 object alpha in [0, 1]), ``shadow``
    (H x W float32 in [0, 1]: how much light the shadows and contact shadows take from the background;
    wherever it and ``coverage`` are both 0, source equals GT exactly), ``caption``, ``object``
    (categories joined by " and "), ``objects`` (list) and ``scene`` (the parameters, JSON-ready)."""
    if size < 32:
        raise ValueError(f"demo scenes need size >= 32, got {size}")
    scene = sample_scene(seed, index, size)
    rng = np.random.default_rng([int(seed), int(index), _STREAM, scene.ground_seed])
    bg = _render_background(scene, rng)
    ss = BACKGROUND_SUPERSAMPLE
    gt_linear = _downsample(bg.linear, ss)
    src_background = gt_linear.copy()
    factor, (x0, y0, x1, y1) = _shadow_factor(scene, bg)
    if factor.size:
        # The region is aligned to whole 1x pixels, so only its blocks change; the rest of the
        # source background is GT's own downsampled pixels, identical by construction.
        region = bg.linear[y0:y1, x0:x1] * factor
        src_background[y0 // ss:y1 // ss, x0 // ss:x1 // ss] = _downsample(region, ss)
    colour, coverage = _render_objects(scene)
    coverage = np.clip(coverage, 0.0, 1.0)
    source = _linear_to_srgb8(colour + (1.0 - coverage[..., None]) * src_background)
    gt = _linear_to_srgb8(gt_linear)
    shadow = np.zeros((size, size), np.float32)
    if factor.size:
        shadow_hi = np.zeros(bg.linear.shape[:2], np.float32)
        shadow_hi[y0:y1, x0:x1] = 1.0 - factor.mean(axis=2)
        shadow = _downsample(shadow_hi, ss).astype(np.float32)
    mask = np.where(coverage >= 0.5, 255, 0).astype(np.uint8)
    categories = [o.category for o in scene.objects]
    return {
        "source": source,
        "GT": gt,
        "mask": mask,
        "coverage": coverage.astype(np.float32),
        "shadow": shadow,
        "caption": scene.caption(),
        "object": " and ".join(categories),
        "objects": categories,
        "scene": _describe(scene),
    }


def _describe(scene: Scene) -> dict[str, Any]:
    cam = scene.camera
    return {
        "ground": scene.ground,
        "wall_z": scene.wall_z,
        "camera": {"focal": cam.focal, "cx": cam.cx, "horizon": cam.horizon, "height": cam.height},
        "light": list(scene.light),
        "softness": scene.softness,
        "objects": [{"category": o.category, "colour": o.colour, "finish": o.finish, "x": o.x, "z": o.z}
                    for o in scene.objects],
    }


def scene_id(index: int) -> str:
    return f"scene_{index:06d}"


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# Temporaries: ``files.write_atomic``'s ``.<name>.tmp-<8 hex>``, and ``.<name>.tmp<pid>`` from older layerloops.
_TMP_SUFFIX = r"\.tmp(?:-[0-9a-f]{8}|\d+)"
_DEMO_FILE = re.compile(rf"^(?:(?:source|GT|mask)/\.?scene_\d{{6}}\.png(?:{_TMP_SUFFIX})?|\.(?:meta|demo)\.json{_TMP_SUFFIX})$")


def demo_params(n: int, seed: int, size: int) -> dict[str, int]:
    """What ``demo.json`` records: a folder made with these parameters holds exactly these scenes."""
    return {"n": int(n), "seed": int(seed), "size": int(size), "generator_version": GENERATOR_VERSION}


def foreign_files(out_dir: str | Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` entries of ``out_dir`` that ``generate_demo_data`` did not make (relative paths).

    A folder with none is safe to (re)render into: it is missing, empty, a demo-data folder, or one whose
    generation was interrupted. Anything else (a ``meta.json`` without ``demo.json``, other files, a
    symbolic link anywhere) belongs to somebody else and is never written to or deleted."""
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return ["."]
    if not out.exists():
        return []
    stamped = (out / "demo.json").is_file()
    found: list[str] = []
    for path in out.rglob("*"):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink():
            found.append(rel)
        elif path.is_dir():
            if rel not in ("source", "GT", "mask"):
                found.append(rel + "/")
        elif not (_DEMO_FILE.match(rel) or rel == "demo.json" or (rel == "meta.json" and stamped)):
            found.append(rel)
        if len(found) >= limit:
            break
    return found


def demo_folder_state(path: str | Path, n: int, seed: int, size: int) -> str:
    """``"empty"`` (missing or an empty folder), ``"complete"`` (made by ``generate_demo_data`` with these
    parameters, every listed file present), or a sentence saying what else it is."""
    out = Path(path)
    if not out.exists():
        return "empty"
    if not out.is_dir():
        return f"{out} is a file, not a folder"
    if not any(out.iterdir()):
        return "empty"
    stamp, meta_path = out / "demo.json", out / "meta.json"
    if not stamp.is_file():
        return f"{out} holds no demo.json, so `layerloop demo-data` did not make it"
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return f"{stamp} cannot be read"
    params = demo_params(n, seed, size)
    if recorded != params:
        differ = ", ".join(f"{k}={recorded.get(k)!r}" for k in params if recorded.get(k) != params[k])
        return f"{out} was made with other parameters ({differ})"
    if not _complete(out, meta_path):
        return f"{out} is an incomplete demo-data folder (its generation was interrupted)"
    return "complete"


def _complete(out: Path, meta_path: Path) -> bool:
    try:
        return meta_path.is_file() and all(
            (out / entry[k]).is_file() for entry in json.loads(meta_path.read_text()) for k in ("source", "GT", "mask"))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # an unreadable stamp or listing means an unknown state


def generate_demo_data(out_dir: str | Path, n: int, seed: int = 0, size: int = 256) -> Path:
    """Write ``n`` scenes in the RORem layout under ``out_dir`` and return it.

    Idempotent: ``demo.json`` records (n, seed, size, generator version) and is written last, so when
    it matches and ``meta.json`` is present the call returns at once; otherwise every scene is
    (re)rendered. Files are written under temporary names and renamed, so an interrupted run never
    leaves a half-written PNG, and scene files from an earlier, larger generation are removed.
    A folder holding anything this function did not make (``foreign_files``) is refused before any
    write: it is somebody's data."""
    from layerloop.errors import UnsafePathError

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    params = demo_params(n, seed, size)
    stamp, meta_path = out / "demo.json", out / "meta.json"
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join("(the path itself)" if f == "." else f for f in foreign)
        raise UnsafePathError(f"{out} is not a demo-data folder: it holds {shown}, which `layerloop demo-data` "
                              f"did not make; refusing to write there. Give an empty or new folder.")
    if stamp.is_file() and meta_path.is_file():
        try:
            complete = json.loads(stamp.read_text()) == params and _complete(out, meta_path)
        except (OSError, ValueError):
            complete = False  # an unreadable stamp means an unknown state: render again
        if complete:
            return out
    for sub in ("source", "GT", "mask"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (out / sub).glob(".scene_*.png.tmp*"):  # from a generation killed mid-write (both namings)
            leftover.unlink()
    # From here on the folder is incomplete until the stamp returns; an old listing must not outlive
    # an interrupted re-render and describe files that no longer match it.
    stamp.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)

    entries = []
    for index in range(n):
        sid = scene_id(index)
        scene = render_scene(seed, index, size)
        for sub, key, mode in (("source", "source", "RGB"), ("GT", "GT", "RGB"), ("mask", "mask", "L")):
            write_atomic(out / sub / f"{sid}.png", _png_bytes(scene[key], mode), hidden=True)
        entries.append({"source": f"source/{sid}.png", "mask": f"mask/{sid}.png", "GT": f"GT/{sid}.png",
                        "caption": scene["caption"], "object": scene["object"], "objects": scene["objects"],
                        "id": sid})
    wanted = {f"{scene_id(i)}.png" for i in range(n)}
    for sub in ("source", "GT", "mask"):
        for stale in (out / sub).glob("scene_*.png"):
            if stale.name not in wanted:
                stale.unlink()
    write_atomic(meta_path, (json.dumps(entries, indent=1) + "\n").encode("utf-8"), hidden=True)
    write_atomic(stamp, (json.dumps(params, sort_keys=True) + "\n").encode("utf-8"), hidden=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``layerloop demo-data OUT --n N --seed S [--size PX]`` (also ``python -m`` this module)."""
    parser = argparse.ArgumentParser(prog="layerloop demo-data",
                                     description="Render demo scenes in the RORem layout (source/, GT/, mask/, meta.json).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n", type=int, default=64, help="number of scenes (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    args = parser.parse_args(argv)
    out = generate_demo_data(args.out, args.n, seed=args.seed, size=args.size)
    print(f"{args.n} demo scenes in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
