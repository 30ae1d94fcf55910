"""Synthetic logo seed data for layer decomposition (issues 5 and 14): procedural logos printed on
procedural objects, with a non-linear image formation.

Each sample is a ``LayeredSample`` of kind ``rendered`` (docs/architecture.md, "The sample"):

* B, the clean object: a shaded mug, bottle, box or t-shirt over a plain or textured backdrop, or a
  textured surface (wood, concrete, fabric, paper) seen at an angle, under the scene's light;
* F, the logo layer: the design (emblem, ring, star, letters, stripes or a repeated-text pattern) *placed
  where it appears* (wrapped around a cylinder, seen in perspective on a flat face, rippled on cloth, cut
  at the object's silhouette) but free of the surface's influence: unlit, no shading, highlight, print
  texture, emboss or ink opacity; its colours are the design's named inks and its alpha is the design's
  own (antialiased) coverage;
* M, the region mask: the logo's support dilated by ``REGION_DILATION`` pixels (what a user would draw);
* C, the composite, *rendered* from (F, B, the formation parameters) by ``render_composite``; it is not
  ``a*F + (1-a)*B``, so the BFS quadruple invariant does not hold (kind ``rendered``, not ``quadruple``).

Image formation (``render_composite``), per pixel, values in [0, 1], F = (f, a), B the clean object::

    I   = irradiance * light          the surface's diffuse light (ambient included) times the scene
                                      light's tint and cast shadow (B was drawn under the same light)
    k   = a * o * t                   ink coverage: layer alpha x ink opacity o x print texture t
                                      (worn ink, halftone, paper grain, fabric weave)
    ink = (1 - m') f I + m' f B       body ink is lit like the surface (shading multiplied over the
                                      logo colours); an absorbing ink filters the lit surface instead
                                      (multiply blend): m' = m where the ink is darker than the surface
                                      (a light ink cannot darken-filter, it covers: m' = 0)
    D   = ((1 - k) B + k ink) e (1 - s)   embossed logos: e is the bevel shading n.L / L_z of the height
                                      map depth * blur(a), s the raised logo's drop shadow
    C   = 1 - (1 - D)(1 - h)          highlights added in screen mode (they saturate towards white,
                                      clipped): h = k g lobe * light + the emboss bevel's highlight
    C   = B outside M                 nothing outside the user's region changes

Categories (the Cycle paper's result categories), one per sample, ``CATEGORIES[index % 5]`` by default,
each adding its effect on top of the shading/highlight every sample has:

| category       | what is varied                                                                      |
|----------------|-------------------------------------------------------------------------------------|
| `lighting`     | low ambient, a tinted light (warm, cool, green, magenta), cast shadows (an edge or   |
|                | blinds) across object and logo, glossy ink with a strong highlight                  |
| `perspective`  | strong perspective (corner jitter 28 %, rotation up to 25 deg) on flat faces, logos  |
|                | wrapped far round a cylinder towards the grazing, darker side                       |
| `text`         | wordmarks and repeated-text patterns, always with a print texture                   |
| `emboss`       | "3D" logos: raised (drop shadow) or debossed, bevel lighting and bevel highlights    |
| `transparency` | ink opacity 0.35-0.7 and absorbing (multiply) inks that let the surface show through  |

Why this layer (geometry given, lighting learnt): the issue lets the layer be the flat design or the design
placed where it appears. We place it. With the flat design as the layer, decomposition would also have to
find where the logo sits and how the surface bends it, and output an image that is not pixel-aligned with
its input; the in-context canvas (C, F, B side by side, one region mask) and the per-pixel losses and
metrics (PSNR/SSIM, recomposition) all assume aligned panels, and the alignment error would swamp what the
cycle term is meant to teach. With the placed layer, F, B and C are pixel-aligned, and what separates C
from F and B is exactly the surface's influence: the *compose* direction (F, B, M -> C)
must learn the non-linear formation (the shading multiplied over the inks, the screen-added highlight, the
ink's opacity and absorption, the print texture, the bevel), and the *decompose* direction (C, M -> F, B)
must undo it: recover the design's full, unlit colours and its full alpha from a shaded, highlighted,
faint or textured print, and the clean object under it. A plain alpha blend of the true layers does not
reproduce C (``alpha_blend_gap``), so neither direction is linear.

How far the plain alpha blend of the ground-truth layers is from C (``alpha_blend_gap``: mean
``|round(a*F + (1-a)*B) - C|`` in 1/255 steps, every channel; "region" over the region mask M, "overall"
over the whole image, "ink" over the layer's support a > 0; "signal" is mean |C - B| in M, the logo's own
contrast), seed 0, 256 px, indices 0-199 (40 per category); the BFS quadruple invariant allows at most 1
at any pixel (``python -c`` over ``LogoSynthesizer(256, 0).make(i)``, 14 s on one core):

| category       | n   | region mean | region median | region min | ink mean | overall | signal |
|----------------|-----|-------------|---------------|------------|----------|---------|--------|
| `lighting`     |  40 |        23.4 |          19.6 |        2.7 |     41.3 |    2.20 |   17.3 |
| `perspective`  |  40 |        11.9 |          10.0 |        0.8 |     22.3 |    0.80 |   21.7 |
| `text`         |  40 |         7.0 |           6.2 |        1.6 |     19.1 |    0.43 |   10.1 |
| `emboss`       |  40 |        16.6 |          14.4 |        3.9 |     28.3 |    1.60 |   24.9 |
| `transparency` |  40 |        20.0 |          16.3 |        3.2 |     38.9 |    1.61 |   14.1 |
| all            | 200 |        15.8 |          12.3 |        0.8 |     30.0 |    1.33 |   17.6 |

So the alpha blend misses C by 16 steps on average over the region (30 over the ink itself), about as much
as the logo's own contrast against the object (17.6): a linear model explains little of what the
surface does to the print. It is smallest for `text` (thin strokes: most of the region is margin) and for
dark inks (shading barely changes black); the lowest single samples (region 0.8-1.7, ink 3.0-5.0) are
small wordmarks, text patterns or a thin black ring on mugs and bottles, mostly dark inks on the lit side. ``tests/datasets/test_logos.py`` asserts the gap on a
fixed 96 px set (seed 0, indices 0-19) and states its thresholds.

Every random draw is recorded in ``meta["logo"]`` (``category``, ``object``, ``warp``, ``light``,
``opacity``, ``ink``, ``specular``, ``emboss``, ``texture``), strict JSON, so an evaluation can tell the
cases apart (``datasets/shard_source.py`` keeps ``meta["logo"]`` of a held-out sample); a sample depends
on (seed, index) only (``layerloop.seeds.rng_for``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from layerloop.samples import LayeredSample, composite, quantise_foreground
from layerloop.seeds import rng_for

SOURCE = "logos"
KIND = "rendered"  # the sample kind: C is rendered, not alpha-blended (samples.py)
OBJECTS = ("mug", "bottle", "box", "tshirt", "surface")
LOGO_KINDS = ("emblem", "ring", "star", "letters", "stripes", "text pattern")
TEXT_KINDS = ("letters", "text pattern")  # what the `text` category draws
CATEGORIES = ("lighting", "perspective", "text", "emboss", "transparency")
SURFACES = ("wood", "concrete", "fabric", "paper")
PRINTS = ("clean", "worn", "halftone", "grain", "weave")
LOGO_NOUNS = {"emblem": "emblem logo", "ring": "ring logo", "star": "star logo", "letters": "wordmark logo",
              "stripes": "striped logo", "text pattern": "repeating text pattern"}
# Named colours (RGB 0..1): captions say the names, so the palette is small and unambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.94, 0.94, 0.92), "black": (0.08, 0.08, 0.09), "red": (0.80, 0.10, 0.12),
    "blue": (0.12, 0.30, 0.78), "navy": (0.08, 0.12, 0.35), "green": (0.12, 0.55, 0.25),
    "yellow": (0.96, 0.80, 0.12), "orange": (0.95, 0.48, 0.10), "purple": (0.45, 0.18, 0.60),
    "pink": (0.92, 0.45, 0.62), "teal": (0.05, 0.50, 0.52), "grey": (0.55, 0.56, 0.58),
}
# Light tints of the `lighting` category (RGB multipliers); the other categories are lit neutrally.
TINTS: dict[str, tuple[float, float, float]] = {
    "neutral": (1.0, 1.0, 1.0), "warm": (1.0, 0.84, 0.64), "cool": (0.74, 0.86, 1.0),
    "green": (0.84, 1.0, 0.78), "magenta": (1.0, 0.78, 0.94),
}
WORDS = ("ACME", "NOVA", "ORBIT", "PIXEL", "DELTA", "LUMEN", "ZEPHYR", "KOI", "ATLAS", "FOLK", "VOLT", "MOSS")
MIN_LUMA_GAP = 0.22  # a logo colour this close in luminance to its object would be nearly invisible
REGION_DILATION = 5  # pixels: the region mask a user draws is a little larger than the ink
EMBOSS_MAX_SIGMA = 1.5  # pixels: the bevel (3 sigma) stays inside the region mask
EMBOSS_MAX_SHIFT = 2.5  # pixels: how far a raised logo's drop shadow may fall


def _luma(rgb: Any) -> Any:
    """Rec. 601 luma of an RGB triple or of an ... x 3 array."""
    rgb = np.asarray(rgb, dtype=np.float64)
    value = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return float(value) if value.ndim == 0 else value


class LogoSynthesizer:
    """``make(index)``: one logo-on-object sample of kind ``rendered``, a pure function of (seed, index,
    constructor args).

    ``objects`` / ``logo_kinds`` / ``categories`` restrict what is drawn (sample ``index`` has category
    ``categories[index % len(categories)]``); ``opacity`` is the (min, max) ink opacity of every category
    but ``transparency``, which draws from ``transparency``; ``logo_scale`` the logo size relative to the
    printable face."""

    def __init__(self, size: int = 256, seed: int = 0, objects: tuple[str, ...] = OBJECTS,
                 logo_kinds: tuple[str, ...] = LOGO_KINDS, categories: tuple[str, ...] = CATEGORIES,
                 opacity: tuple[float, float] = (0.85, 1.0), transparency: tuple[float, float] = (0.35, 0.7),
                 logo_scale: tuple[float, float] = (0.55, 0.85), output_size: int | None = None):
        if size < 64:
            raise ValueError(f"size must be at least 64 pixels, got {size}")
        if output_size is not None and (output_size < 1 or size % output_size):
            raise ValueError(f"output_size must divide size {size} (a box downsampling by a whole factor), "
                             f"got {output_size}")
        for name, values, known in (("objects", objects, OBJECTS), ("logo_kinds", logo_kinds, LOGO_KINDS),
                                    ("categories", categories, CATEGORIES)):
            unknown = sorted(set(values) - set(known)) if values else ["(empty)"]
            if unknown:
                raise ValueError(f"{name}: unknown or empty {unknown}; choose from {known}")
        for name, (low, high) in (("opacity", opacity), ("transparency", transparency), ("logo_scale", logo_scale)):
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must be an ordered range in (0, 1], got {(low, high)}")
        self.size, self.seed = int(size), int(seed)
        self.output_size = None if output_size in (None, size) else int(output_size)
        self.objects, self.logo_kinds, self.categories = tuple(objects), tuple(logo_kinds), tuple(categories)
        self.opacity, self.transparency, self.logo_scale = tuple(opacity), tuple(transparency), tuple(logo_scale)

    def rng(self, index: int) -> np.random.Generator:
        return rng_for(SOURCE, self.seed, index)

    def category(self, index: int) -> str:
        return self.categories[index % len(self.categories)]

    def make(self, index: int) -> LayeredSample:
        rng = self.rng(index)
        category = self.category(index)
        params: dict[str, Any] = {}
        light = _draw_light(rng, category)
        obj = _draw_object(rng, self.size, self.objects, light, params)
        scene_light = _light_map(light, self.size)  # H x W x 3: tint x cast shadow
        background = _to_u8(obj["image"] * scene_light)
        kinds = tuple(k for k in self.logo_kinds if k in TEXT_KINDS) if category == "text" else self.logo_kinds
        # strong perspective moves the corners by up to 28 %: a smaller logo stays on the face
        scale = tuple(0.8 * s for s in self.logo_scale) if category == "perspective" else self.logo_scale
        logo = _draw_logo(rng, obj, kinds or self.logo_kinds, scale, params)
        rgb, coverage, warp = _place_logo(rng, obj, logo, category, params)
        foreground = quantise_foreground(rgb, coverage)  # the layer: placed, unlit, the design's own alpha
        support = (foreground[..., 3] > 0).astype(np.uint8)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * REGION_DILATION + 1,) * 2)
        mask = np.where(cv2.dilate(support, kernel) > 0, 255, 0).astype(np.uint8)
        opacity_range = self.transparency if category == "transparency" else self.opacity
        formation, maps = _draw_formation(rng, category, obj, logo, warp, light, scene_light, opacity_range, params)
        image = render_composite(foreground, background, mask, formation, maps)
        params["logo"].update(category=category, object=obj["kind"], light=light, **formation)
        logo_name = f"{params['logo']['colour']} {LOGO_NOUNS[params['logo']['kind']]}"
        emboss = formation["emboss"]
        if emboss is None:
            adjective = "translucent " if category == "transparency" else ""
            verb = "printed on"
        else:
            adjective, verb = ("embossed ", "raised on") if emboss["mode"] == "raised" else ("debossed ", "pressed into")
        logo_name = adjective + logo_name
        caption = f"{_article(logo_name)} {logo_name} {verb} {_article(obj['caption'])} {obj['caption']}"
        sample = LayeredSample(key=f"{SOURCE}_{index:06d}", kind=KIND, composite=image, background=background,
                               foreground=foreground, mask=mask, caption=caption,
                               meta={"source": SOURCE, "source_id": f"{index:06d}", "seed": self.seed,
                                     "size": self.size, **_plain(params)})
        if self.output_size is not None:
            sample = downsample(sample, self.size // self.output_size)
        sample.validate()
        return sample


def downsample(sample: LayeredSample, factor: int) -> LayeredSample:
    """The sample rendered at ``size`` and box-averaged by a whole ``factor`` (supersampling, for small
    training images): C and B averaged, the layer averaged with premultiplied alpha (no colour bleeds in from
    transparent pixels), the region max-pooled, so it still covers every pixel where C differs from B or the
    layer is not transparent. ``meta["output_size"]`` records the delivered size."""
    height, width = sample.composite.shape[:2]

    def boxes(array: np.ndarray) -> np.ndarray:
        return array.reshape(height // factor, factor, width // factor, factor, *array.shape[2:])

    def average(array: np.ndarray) -> np.ndarray:
        return boxes(array.astype(np.float64)).mean(axis=(1, 3))

    alpha = sample.foreground[..., 3].astype(np.float64) / 255.0
    premultiplied = average(sample.foreground[..., :3].astype(np.float64) / 255.0 * alpha[..., None])
    coverage = average(alpha)
    rgb = np.divide(premultiplied, coverage[..., None], out=np.zeros_like(premultiplied),
                    where=coverage[..., None] > 0)
    region = boxes(sample.mask).max(axis=(1, 3))
    meta = {**sample.meta, "output_size": height // factor}
    return LayeredSample(key=sample.key, kind=sample.kind, composite=_to_u8(average(sample.composite) / 255.0),
                         background=_to_u8(average(sample.background) / 255.0),
                         foreground=quantise_foreground(rgb, coverage), mask=region, caption=sample.caption,
                         meta=meta)


def logo_samples(n: int, seed: int = 0, size: int = 256, start: int = 0, **options: Any) -> Iterator[LayeredSample]:
    """Samples ``start .. start + n - 1`` of ``LogoSynthesizer(size, seed, **options)``."""
    synthesizer = LogoSynthesizer(size=size, seed=seed, **options)
    for index in range(start, start + n):
        yield synthesizer.make(index)


def alpha_blend_gap(sample: LayeredSample) -> dict[str, float]:
    """How far the plain alpha blend of a sample's layers is from its composite, in 1/255 steps:
    ``region`` / ``ink`` / ``overall``: mean ``|round(a*F + (1-a)*B) - C|`` (every channel) over the
    region mask's pixels / over the layer's support (alpha > 0) / over the whole image; ``max``: the
    largest; ``signal``: mean ``|C - B|`` over the region (the logo's own contrast, for scale). A
    quadruple has ``max <= 1``."""
    linear = composite(sample.foreground, sample.background).astype(np.int16)
    image = sample.composite.astype(np.int16)
    gap = np.abs(linear - image)
    region, ink = sample.mask > 0, sample.foreground[..., 3] > 0
    signal = np.abs(image - sample.background.astype(np.int16))[region]
    return {"region": _mean(gap[region]), "ink": _mean(gap[ink]), "overall": float(gap.mean()),
            "max": int(gap.max(initial=0)), "signal": _mean(signal)}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


# ============================================================================ the non-linear formation
def render_composite(foreground: np.ndarray, background: np.ndarray, region: np.ndarray,
                     formation: dict[str, Any], maps: dict[str, np.ndarray]) -> np.ndarray:
    """C (H x W x 3 uint8) from the layer F (RGBA uint8), the clean object B (RGB uint8), the region mask
    (H x W, > 0 inside), the formation's parameters (``opacity``, ``ink.absorption``, ``ink.surface_luma``,
    ``specular.gloss``, ``emboss``; as in ``meta["logo"]``) and its maps: ``light`` (H x W x 3, the
    surface's irradiance x the scene light), ``highlight`` (H x W x 3, the ink's specular lobe x the scene
    light) and ``texture`` (H x W, the print's coverage modulation). The model is in the module docstring."""
    f = foreground[..., :3].astype(np.float64) / 255.0
    a = foreground[..., 3].astype(np.float64) / 255.0
    b = background.astype(np.float64) / 255.0
    inside = np.asarray(region) > 0
    k = (a * formation["opacity"] * maps["texture"])[..., None]
    ink_spec = formation["ink"]
    absorbing = ink_spec["absorption"] * (_luma(f) < ink_spec["surface_luma"])[..., None]
    ink = (1.0 - absorbing) * f * maps["light"] + absorbing * f * b
    d = (1.0 - k) * b + k * ink
    highlight = k * formation["specular"]["gloss"] * maps["highlight"]
    emboss = formation["emboss"]
    if emboss is not None:
        bevel, shadow, sheen = _emboss_maps(a, emboss)
        d = d * bevel[..., None] * (1.0 - shadow[..., None])
        highlight = highlight + sheen[..., None] * maps["tint"]
    d = np.clip(d, 0.0, 1.0)
    c = 1.0 - (1.0 - d) * (1.0 - np.clip(highlight, 0.0, 1.0))  # screen: highlights saturate to white
    c = np.where(inside[..., None], c, b)
    return _to_u8(c)


def _emboss_maps(alpha: np.ndarray, emboss: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bevel shading e, drop shadow s, bevel highlight) of a logo embossed by the height map
    ``depth * blur(alpha, sigma)`` (negative depth: debossed) under the light ``emboss["light"]`` (x, y, z;
    image axes, z towards the viewer): e = n.L / L_z (1 on flat ground), the highlight is Blinn-Phong on
    the bevel minus its flat value, the shadow is the raised logo shifted away from the light."""
    sigma, depth = emboss["sigma"], emboss["depth"] * (1.0 if emboss["mode"] == "raised" else -1.0)
    height = depth * cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), sigma).astype(np.float64)
    gy, gx = np.gradient(height)
    normal = np.dstack([-gx, -gy, np.ones_like(height)])
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    light = np.asarray(emboss["light"], dtype=np.float64)
    light = light / np.linalg.norm(light)
    bevel = np.clip(normal @ light / light[2], 0.2, 2.0)
    half = light + np.array([0.0, 0.0, 1.0])
    half = half / np.linalg.norm(half)
    power = emboss["shininess"]
    sheen = emboss["bevel_gloss"] * np.clip((normal @ half).clip(0, 1) ** power - half[2] ** power, 0.0, 1.0)
    shadow = np.zeros_like(alpha, dtype=np.float64)
    if emboss["mode"] == "raised" and emboss["shadow"] > 0:
        dx, dy = -light[0] / light[2] * emboss["depth"], -light[1] / light[2] * emboss["depth"]
        reach = math.hypot(dx, dy)
        if reach > EMBOSS_MAX_SHIFT:  # the shadow stays inside the region mask
            dx, dy = dx * EMBOSS_MAX_SHIFT / reach, dy * EMBOSS_MAX_SHIFT / reach
        moved = cv2.warpAffine(alpha.astype(np.float32), np.float32([[1, 0, dx], [0, 1, dy]]),
                               (alpha.shape[1], alpha.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)
        moved = cv2.GaussianBlur(moved, (0, 0), sigma).astype(np.float64)
        shadow = emboss["shadow"] * np.clip(moved - alpha, 0.0, 1.0)
    return bevel, shadow, sheen


# ============================================================================ objects (the clean B)
def _draw_object(rng: np.random.Generator, size: int, objects: tuple[str, ...], light: dict[str, Any],
                 params: dict) -> dict[str, Any]:
    """The clean object image (under a white light; ``make`` multiplies the scene light's tint and cast
    shadow over it) plus what printing a logo on it needs: the printable face (a box in pixels), its kind
    of surface (``cylinder`` / ``flat`` / ``cloth``), its ``irradiance`` (H x W: the diffuse light the
    surface receives, ambient included, without its albedo texture), its ``specular`` map (H x W, added
    light), the ``highlight`` lobe a glossy ink on it shows (cylinders: the object's own band; others: None,
    placed around the logo later), its ``albedo`` (RGB) and its colour."""
    kind = str(rng.choice(objects))
    backdrop = _backdrop(rng, size, params)
    names = list(COLOURS)
    colour_name = str(rng.choice(names))
    colour = np.array(COLOURS[colour_name])
    light_x, ambient = light["x"], light["ambient"]  # horizontal light direction (-1 left .. 1 right)
    draw = {"object": kind, "object_colour": colour_name, "light_x": light_x, "ambient": ambient}
    if kind in ("mug", "bottle"):
        obj = _cylinder_object(rng, size, kind, colour, light_x, ambient, backdrop, draw)
    elif kind == "box":
        obj = _box_object(rng, size, colour, light_x, ambient, backdrop, draw)
    elif kind == "tshirt":
        obj = _tshirt_object(rng, size, colour, light_x, ambient, backdrop, draw)
    else:
        obj = _surface_object(rng, size, colour, light_x, ambient, draw)
        colour_name = draw["object_colour"]
    obj.setdefault("albedo", colour)
    obj.setdefault("highlight", None)
    obj.update(kind=kind, colour=COLOURS[colour_name], colour_name=colour_name)
    params["object"] = draw
    return obj


def _backdrop(rng: np.random.Generator, size: int, params: dict) -> np.ndarray:
    """A plain studio gradient or a soft textured wall behind the object."""
    tone = rng.uniform(0.55, 0.92, 3) * 0.6 + rng.uniform(0.55, 0.92) * 0.4
    style = str(rng.choice(["plain", "textured"]))
    y = np.linspace(0, 1, size)[:, None, None]
    image = tone[None, None, :] * (1.05 - 0.25 * y) * np.ones((size, size, 1))
    if style == "textured":
        texture = 1 + 0.08 * _smooth_noise(rng, size, 6) + 0.03 * _smooth_noise(rng, size, 40)
        image = image * texture[..., None]
    # a floor: the lower part slightly darker, the horizon where the object stands
    floor = float(rng.uniform(0.62, 0.78))
    image[int(floor * size):] *= 0.85
    params["backdrop"] = {"style": style, "tone": tone.round(4).tolist(), "floor": floor}
    return np.clip(image, 0, 1)


def _smooth_noise(rng: np.random.Generator, size: int | tuple[int, int], cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random cells x cells grid upsampled smoothly to ``size`` (square side or
    (height, width))."""
    height, width = (size, size) if isinstance(size, int) else size
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).clip(-1, 1).astype(np.float64)


def _cylinder_object(rng, size, kind, colour, light_x, ambient, backdrop, draw) -> dict[str, Any]:
    """A mug (wide, with a handle) or a bottle (narrow, shoulders, neck and cap): a vertical cylinder
    lit by a directional light (Lambert + a specular band), with elliptical top and bottom rims."""
    cx = size * rng.uniform(0.45, 0.55)
    if kind == "mug":
        radius = size * rng.uniform(0.22, 0.28)
        top, bottom = size * rng.uniform(0.2, 0.28), size * rng.uniform(0.78, 0.86)
    else:
        radius = size * rng.uniform(0.14, 0.18)
        top, bottom = size * rng.uniform(0.36, 0.42), size * rng.uniform(0.86, 0.92)
    tilt = rng.uniform(0.12, 0.22)  # rim ellipse height / width: the camera looks slightly down
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    nx = np.clip((xx - cx) / radius, -1, 1)
    nz = np.sqrt(1 - nx ** 2)
    lz = math.sqrt(1 - light_x ** 2)
    diffuse = np.clip(nx * light_x + nz * lz, 0, 1)
    shade = ambient + (1 - ambient) * diffuse
    gloss = rng.uniform(0.15, 0.45)
    highlight_x = light_x * 0.5  # the highlight sits halfway towards the light (viewer in front)
    band = np.exp(-((nx - highlight_x) / 0.12) ** 2)  # the highlight's shape, 0..1
    specular = gloss * band
    rim_b = radius * tilt
    body = (np.abs(xx - cx) <= radius) & (yy >= top) & (yy <= bottom + rim_b * nz)
    image = backdrop.copy()
    # contact shadow on the floor under the body, offset away from the light
    shadow_x = (xx - cx + light_x * radius * 0.4) / (radius * 1.3)
    shadow = np.exp(-(shadow_x ** 2 + ((yy - bottom - rim_b) / (rim_b * 2.2 + 2)) ** 2))
    image *= (1 - 0.45 * shadow)[..., None]
    extras = {}
    if kind == "mug":
        handle_side = 1 if rng.random() < 0.5 else -1
        hx = cx + handle_side * radius * 1.05
        hy, hr = (top + bottom) / 2, (bottom - top) * 0.26
        ring = np.abs(np.hypot((xx - hx) / 0.75, yy - hy) - hr) < hr * 0.28
        ring &= (xx - cx) * handle_side > radius * 0.9
        handle_shade = ambient + (1 - ambient) * np.clip(0.5 + 0.5 * light_x * handle_side, 0, 1)
        image[ring] = colour * handle_shade
        extras = {"handle_side": handle_side}
    else:
        neck_r, neck_top = radius * 0.38, top - size * 0.16
        shoulder = (yy < top) & (yy >= top - size * 0.08)
        frac = np.clip((top - yy) / (size * 0.08), 0, 1)
        shoulder &= np.abs(xx - cx) <= radius - (radius - neck_r) * frac
        neck = (yy < top - size * 0.08) & (yy >= neck_top) & (np.abs(xx - cx) <= neck_r)
        cap = (yy < neck_top) & (yy >= neck_top - size * 0.05) & (np.abs(xx - cx) <= neck_r * 1.15)
        upper = shoulder | neck
        image[upper] = (colour * (ambient + (1 - ambient) * diffuse[..., None] * 0.9))[upper]
        cap_colour = np.array(COLOURS[str(rng.choice(["black", "white", "grey", "red"]))])
        image[cap] = (cap_colour * shade[..., None])[cap]
    image[body] = np.clip(colour * shade[..., None] + specular[..., None], 0, 1)[body]
    if kind == "mug":
        # the rim: an ellipse showing the darker inside of the mug
        inside = (((xx - cx) / radius) ** 2 + ((yy - top) / rim_b) ** 2) <= 1
        lip = inside & ((((xx - cx) / (radius * 0.93)) ** 2 + ((yy - top) / (rim_b * 0.9)) ** 2) > 1)
        image[inside] = colour * 0.35
        image[lip] = colour * (ambient + 0.4)
    draw.update(cx=cx, radius=radius, top=top, bottom=bottom, tilt=tilt, gloss=gloss, **extras)
    # printable face: the front of the body, clear of the rims
    face = (cx - radius * 0.85, top + rim_b + size * 0.03, cx + radius * 0.85, bottom - size * 0.04)
    caption = f"{draw['object_colour']} {kind}"
    return {"image": np.clip(image, 0, 1), "irradiance": shade, "specular": specular * body,
            "highlight": band * body, "support": body, "face": face, "surface": "cylinder", "cx": cx,
            "radius": radius, "tilt": tilt, "caption": caption}


def _box_object(rng, size, colour, light_x, ambient, backdrop, draw) -> dict[str, Any]:
    """A cardboard-like box seen at an angle: a front face, a side face and a top face, each flat-shaded
    by its normal, the front with a soft gradient."""
    left, right = size * rng.uniform(0.18, 0.26), size * rng.uniform(0.66, 0.74)
    top, bottom = size * rng.uniform(0.3, 0.38), size * rng.uniform(0.8, 0.86)
    depth = size * rng.uniform(0.08, 0.14)
    side = 1 if light_x < 0 else -1  # show the side facing away from the light: it reads as a 3D box
    image = backdrop.copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    front_shade = ambient + (1 - ambient) * (0.85 + 0.15 * (1 - (xx - left) / (right - left) * (light_x < 0)))
    front_shade = front_shade * (1 - 0.12 * (yy - top) / (bottom - top))
    shade = np.clip(front_shade, 0, 1)
    side_edge = right if side > 0 else left
    quad_side = np.array([[side_edge, top], [side_edge + side * depth, top - depth * 0.6],
                          [side_edge + side * depth, bottom - depth * 0.6], [side_edge, bottom]], np.int32)
    # the top face is the front's top edge shifted back by the depth, towards the visible side
    quad_top = np.array([[left, top], [right, top], [right + side * depth, top - depth * 0.6],
                         [left + side * depth, top - depth * 0.6]], np.int32)
    faces = np.zeros((size, size), np.uint8)
    cv2.fillPoly(faces, [quad_side], 1)
    cv2.fillPoly(faces, [quad_top], 2)
    shadow_x = (xx - (left + right) / 2) / ((right - left) * 0.7)
    shadow = np.exp(-(shadow_x ** 2 + ((yy - bottom) / (size * 0.03)) ** 2))
    image *= (1 - 0.4 * shadow)[..., None]
    image[faces == 1] = colour * (ambient * 0.9)
    image[faces == 2] = colour * min(1.0, ambient + 0.5)
    front = (xx >= left) & (xx <= right) & (yy >= top) & (yy <= bottom)
    texture = 1 + 0.04 * _smooth_noise(rng, size, 24)
    image[front] = np.clip(colour * (shade * texture)[..., None], 0, 1)[front]
    draw.update(left=left, right=right, top=top, bottom=bottom, depth=depth, side=side)
    margin = size * 0.04
    face = (left + margin, top + margin, right - margin, bottom - margin)
    return {"image": np.clip(image, 0, 1), "irradiance": shade, "specular": np.zeros((size, size)),
            "support": front, "face": face, "surface": "flat",
            "caption": f"{draw['object_colour']} box"}


def _tshirt_object(rng, size, colour, light_x, ambient, backdrop, draw) -> dict[str, Any]:
    """A flat-lay t-shirt: torso and sleeves as one polygon, soft fabric folds in the shading and a fine
    weave texture, so a print on it picks up both."""
    s = size
    cx = s * rng.uniform(0.47, 0.53)
    w, top, bottom = s * rng.uniform(0.2, 0.24), s * 0.18, s * rng.uniform(0.9, 0.95)
    poly = np.array([[cx - w * 0.45, top], [cx - w * 1.55, top + s * 0.1], [cx - w * 1.75, top + s * 0.28],
                     [cx - w * 1.1, top + s * 0.32], [cx - w, bottom], [cx + w, bottom],
                     [cx + w * 1.1, top + s * 0.32], [cx + w * 1.75, top + s * 0.28], [cx + w * 1.55, top + s * 0.1],
                     [cx + w * 0.45, top]], np.int32)
    support = np.zeros((s, s), np.uint8)
    cv2.fillPoly(support, [poly], 1)
    neck = np.zeros((s, s), np.uint8)
    cv2.ellipse(neck, (int(cx), int(top)), (int(w * 0.45), int(s * 0.06)), 0, 0, 180, 1, -1)
    support = (support > 0) & (neck == 0)
    folds = 0.12 * _smooth_noise(rng, s, 5) + 0.05 * _smooth_noise(rng, s, 11)
    xx = np.arange(s, dtype=np.float64)[None, :]
    shade = np.clip(ambient + (1 - ambient) * (0.8 + folds + 0.1 * light_x * (xx - cx) / w / 2), 0, 1)
    shade = np.broadcast_to(shade, (s, s)).copy()
    weave = 1 + 0.035 * np.sign(np.sin(np.arange(s)[:, None] * 1.7) * np.sin(np.arange(s)[None, :] * 1.7))
    shade = shade * weave
    image = backdrop.copy()
    image[support] = np.clip(colour * shade[..., None], 0, 1)[support]
    draw.update(cx=cx, half_width=w, bottom=bottom)
    face = (cx - w * 0.8, top + s * 0.12, cx + w * 0.8, top + s * 0.5)
    return {"image": np.clip(image, 0, 1), "irradiance": shade, "specular": np.zeros((s, s)), "support": support,
            "face": face, "surface": "cloth", "caption": f"{draw['object_colour']} t-shirt"}


def _surface_object(rng, size, colour, light_x, ambient, draw) -> dict[str, Any]:
    """A textured surface filling the frame (wood, concrete, fabric or paper) under a light falloff:
    the logo is printed on it, seen at an angle."""
    material = str(rng.choice(SURFACES))
    base = {"wood": "orange", "concrete": "grey", "fabric": str(rng.choice(list(COLOURS))), "paper": "white"}[material]
    colour = np.array(COLOURS[base])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    if material == "wood":
        grain = np.sin((yy * 40 + 3 * _smooth_noise(rng, size, 4)) * math.pi)
        texture = 0.75 + 0.12 * grain + 0.05 * _smooth_noise(rng, size, 30)
        colour = colour * np.array([0.75, 0.6, 0.45]) + 0.1
    elif material == "concrete":
        texture = 0.9 + 0.06 * _smooth_noise(rng, size, 8) + 0.05 * rng.uniform(-1, 1, (size, size))
    elif material == "fabric":
        texture = 0.9 + 0.06 * np.sign(np.sin(np.arange(size)[:, None] * 1.9) * np.sin(np.arange(size)[None, :] * 1.9))
        texture = texture + 0.05 * _smooth_noise(rng, size, 6)
    else:
        texture = 0.97 + 0.02 * _smooth_noise(rng, size, 50)
    falloff = 1 - 0.35 * ((xx - (0.5 + 0.4 * light_x)) ** 2 + (yy - 0.3) ** 2)
    irradiance = np.clip(ambient + (1 - ambient) * falloff, 0, 1)
    image = np.clip(colour * (irradiance * texture)[..., None], 0, 1)
    draw.update(material=material, object_colour=base)
    m = size * 0.12
    return {"image": image, "irradiance": irradiance, "specular": np.zeros((size, size)), "albedo": colour,
            "support": np.ones((size, size), bool), "face": (m, m, size - m, size - m), "surface": "flat",
            "material": material, "caption": f"{material} surface"}


# ============================================================================ logos (flat RGBA)
def _draw_logo(rng, obj, kinds, scale_range, params) -> dict[str, Any]:
    """A flat logo: RGB (its ink colours) and coverage (antialiased, 0..1) on a canvas sized for the
    printable face. Drawn at 4x and downsampled for clean antialiased edges."""
    kind, scale, width, height = _logo_size(rng, obj, kinds, scale_range)
    colour_name, second_name = _logo_colours(rng, obj)
    up = 4
    canvas = _Canvas(Image.new("L", (width * up, height * up), 0),
                     Image.new("L", (width * up, height * up), 0))  # accent: where the second colour is used
    word = str(rng.choice(WORDS))
    detail = _LOGO_DRAWERS[kind](rng, canvas, word)
    coverage = _down(canvas.cover, width, height)
    accent_cov = _down(canvas.accent, width, height)
    if kind == "emblem":
        coverage = np.maximum(coverage, accent_cov)
    rgb = np.where(accent_cov[..., None] > 0.5, np.array(COLOURS[second_name]), np.array(COLOURS[colour_name]))
    if kind == "emblem" and second_name == colour_name:  # a one-colour emblem: the inner shape is cut out
        coverage = coverage * (1 - accent_cov)
    params["logo"] = {"kind": kind, "colour": colour_name, "second_colour": second_name, "word": word,
                      "width": width, "height": height, "scale": scale, **detail}
    return {"rgb": rgb, "coverage": coverage}


def _logo_size(rng, obj, kinds, scale_range) -> tuple[str, float, int, int]:
    """(kind, scale, width, height): the logo's kind and its canvas size in pixels, a ``scale`` fraction of
    the printable face (square, except for letters, stripes and text patterns)."""
    x0, y0, x1, y1 = obj["face"]
    scale = float(rng.uniform(*scale_range))
    width = max(16, int((x1 - x0) * scale))
    height = max(16, int((y1 - y0) * scale))
    kind = str(rng.choice(kinds))
    if kind in ("letters", "stripes", "text pattern"):
        height = max(16, int(min(height, width * rng.uniform(0.35, 0.7)) if kind == "letters" else height))
    else:
        height = width = min(width, height)
    return kind, scale, width, height


def _logo_colours(rng, obj) -> tuple[str, str]:
    """(main, second) ink colour names: both far enough in luminance from the object; the second differs
    from the main one half of the time."""
    names = [n for n in COLOURS if abs(_luma(COLOURS[n]) - _luma(obj["colour"])) >= MIN_LUMA_GAP]
    colour_name = str(rng.choice(names))
    second = [n for n in names if n != colour_name and abs(_luma(COLOURS[n]) - _luma(COLOURS[colour_name])) > 0.15]
    second_name = str(rng.choice(second)) if second and rng.random() < 0.5 else colour_name
    return colour_name, second_name


class _Canvas:
    """The 4x canvases a logo is drawn on: ``cover`` (its ink) and ``accent`` (where the second colour
    goes), with their drawing contexts and size ``W`` x ``H``."""

    def __init__(self, cover: Image.Image, accent: Image.Image):
        self.cover, self.accent = cover, accent
        self.draw_cover, self.draw_accent = ImageDraw.Draw(cover), ImageDraw.Draw(accent)
        self.W, self.H = cover.size


def _draw_emblem(rng, canvas: _Canvas, word: str) -> dict[str, Any]:
    W, H = canvas.W, canvas.H
    shape = str(rng.choice(["circle", "shield", "hexagon", "diamond"]))
    _polygon(canvas.draw_cover, shape, W, H, 1.0)
    inner = str(rng.choice(["letter", "star", "triangle"]))
    if inner == "letter":
        _text_centered(canvas.draw_accent, word[0], W, H, 0.6)
    else:
        _polygon(canvas.draw_accent, inner, W, H, 0.55)
    return {"shape": shape, "inner": inner, "letter": word[0]}


def _draw_ring(rng, canvas: _Canvas, word: str) -> dict[str, Any]:
    W, H, draw_cover = canvas.W, canvas.H, canvas.draw_cover
    thickness = float(rng.uniform(0.1, 0.2))
    draw_cover.ellipse([0, 0, W - 1, H - 1], fill=255)
    m = int(W * thickness)
    draw_cover.ellipse([m, m, W - 1 - m, H - 1 - m], fill=0)
    if rng.random() < 0.5:
        _text_centered(draw_cover, word[:2], W, H, 0.35)
    return {"thickness": thickness}


def _draw_star(rng, canvas: _Canvas, word: str) -> dict[str, Any]:
    points = int(rng.integers(5, 9))
    inner_ratio = float(rng.uniform(0.38, 0.55))
    _star(canvas.draw_cover, canvas.W, canvas.H, points, inner_ratio, float(rng.uniform(0, 2 * math.pi / points)))
    return {"points": points, "inner_ratio": inner_ratio}


def _draw_letters(rng, canvas: _Canvas, word: str) -> dict[str, Any]:
    W, H = canvas.W, canvas.H
    text = word if rng.random() < 0.7 else f"{word} {str(rng.choice(WORDS))}"
    _text_centered(canvas.draw_cover, text, W, H, 0.9)
    if rng.random() < 0.5:  # an underline bar in the second colour
        canvas.draw_accent.rectangle([int(W * 0.1), int(H * 0.86), int(W * 0.9), int(H * 0.96)], fill=255)
        canvas.draw_cover.rectangle([int(W * 0.1), int(H * 0.86), int(W * 0.9), int(H * 0.96)], fill=255)
    return {"text": text}


def _draw_stripes(rng, canvas: _Canvas, word: str) -> dict[str, Any]:
    W, H = canvas.W, canvas.H
    count = int(rng.integers(3, 7))
    angle = float(rng.choice([0.0, 30.0, 45.0, 90.0]))
    stripe = np.zeros((H, W), np.uint8)
    period = max(H, W) / count
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    coord = xx * math.sin(math.radians(angle)) + yy * math.cos(math.radians(angle))
    stripe[(coord % period) < period * 0.5] = 255
    canvas.cover.paste(Image.fromarray(stripe))
    canvas.accent.paste(Image.fromarray(np.where((coord // period) % 2 == 1, stripe, 0).astype(np.uint8)))
    return {"count": count, "angle": angle}


def _draw_text_pattern(rng, canvas: _Canvas, word: str) -> dict[str, Any]:
    """The word repeated in rows, alternate rows shifted."""
    W, H, draw_cover = canvas.W, canvas.H, canvas.draw_cover
    rows = int(rng.integers(2, 5))
    row_h = H / rows
    font = ImageFont.load_default(size=max(8, int(row_h * 0.7)))
    step = int(draw_cover.textlength(word + "  ", font=font))
    for r in range(rows):
        x = -step // 2 if r % 2 else 0  # odd rows shifted half a word: a brick pattern
        while x < W:
            draw_cover.text((x, r * row_h + row_h * 0.1), word, fill=255, font=font)
            x += step
    return {"rows": rows}


_LOGO_DRAWERS = {"emblem": _draw_emblem, "ring": _draw_ring, "star": _draw_star, "letters": _draw_letters,
                 "stripes": _draw_stripes, "text pattern": _draw_text_pattern}


def _down(image: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255.0


def _polygon(draw: ImageDraw.ImageDraw, shape: str, W: int, H: int, scale: float) -> None:
    cx, cy, r = W / 2, H / 2, min(W, H) / 2 * scale
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=255)
    else:
        pts = {"shield": [(-1, -1), (1, -1), (1, 0.1), (0, 1), (-1, 0.1)],
               "hexagon": [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]],
               "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
               "triangle": [(0, -1), (0.95, 0.75), (-0.95, 0.75)]}[shape]
        draw.polygon([(cx + r * x * 0.97, cy + r * y * 0.97) for x, y in pts], fill=255)


def _star(draw: ImageDraw.ImageDraw, W: int, H: int, points: int, inner: float, phase: float) -> None:
    cx, cy, r = W / 2, H / 2, min(W, H) / 2 * 0.98
    pts = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * inner
        ang = phase - math.pi / 2 + k * math.pi / points
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    draw.polygon(pts, fill=255)


def _text_centered(draw: ImageDraw.ImageDraw, text: str, W: int, H: int, fill_fraction: float) -> None:
    """Text as large as fits in ``fill_fraction`` of the box, centred (PIL's default scalable font)."""
    size = max(8, int(H * fill_fraction))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    fit = min(W * fill_fraction / max(1, right - left), H * fill_fraction / max(1, bottom - top))
    font = ImageFont.load_default(size=max(8, int(size * fit)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((W - (right - left)) / 2 - left, (H - (bottom - top)) / 2 - top), text, fill=255, font=font)


# ============================================================================ the scene light
def _draw_light(rng: np.random.Generator, category: str) -> dict[str, Any]:
    """The scene's light: direction (x right, y down, z towards the viewer; unit length, z >= 0.45),
    ambient level, intensity (a surface facing the light shows ``intensity`` x its albedo), tint and an
    optional cast shadow. The `lighting` category gets low ambient, a dimmer tinted light and (60 %) a
    cast shadow; the others a neutral light without shadow."""
    strong = category == "lighting"
    x = float(rng.uniform(-0.85, 0.85) if strong else rng.uniform(-0.7, 0.7))
    y = float(rng.uniform(-0.6, 0.1))
    planar = math.hypot(x, y)
    limit = math.sqrt(1 - 0.45 ** 2)
    if planar > limit:
        x, y = x * limit / planar, y * limit / planar
    z = math.sqrt(max(0.0, 1.0 - x * x - y * y))
    ambient = float(rng.uniform(0.15, 0.3) if strong else rng.uniform(0.35, 0.55))
    intensity = float(rng.uniform(0.55, 0.85) if strong else rng.uniform(0.75, 0.95))
    tint = str(rng.choice([name for name in TINTS if name != "neutral"])) if strong else "neutral"
    shadow = None
    if strong and rng.random() < 0.6:
        shadow = {"style": str(rng.choice(["edge", "blinds"])), "angle": float(rng.uniform(0, 180)),
                  "offset": float(rng.uniform(-0.2, 0.2)), "depth": float(rng.uniform(0.3, 0.55)),
                  "softness": float(rng.uniform(0.01, 0.04)), "period": float(rng.uniform(0.12, 0.25))}
    return {"x": x, "y": y, "z": z, "ambient": ambient, "intensity": intensity, "tint": tint,
            "tint_rgb": list(TINTS[tint]), "shadow": shadow}


def _light_map(light: dict[str, Any], size: int) -> np.ndarray:
    """H x W x 3 multiplier of the whole scene: the light's intensity and tint times its cast shadow (a
    soft edge or window blinds across the frame), applied to B and to the ink alike."""
    attenuation = np.ones((size, size))
    shadow = light["shadow"]
    if shadow is not None:
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size - 0.5
        angle = math.radians(shadow["angle"])
        distance = xx * math.cos(angle) + yy * math.sin(angle) - shadow["offset"]
        if shadow["style"] == "edge":
            covered = 0.5 + 0.5 * np.tanh(distance / shadow["softness"])
        else:
            covered = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * math.pi * distance / shadow["period"]))
        attenuation = 1.0 - shadow["depth"] * covered
    return attenuation[..., None] * (light["intensity"] * np.asarray(light["tint_rgb"], dtype=np.float64))


# ============================================================================ placing the logo (F)
Warp = Callable[[np.ndarray], np.ndarray]


def _place_logo(rng, obj, logo, category, params) -> tuple[np.ndarray, np.ndarray, Warp]:
    """The layer's geometry: the flat design warped onto the object's face (premultiplied, so no colour
    bleeds in from outside the design) and cut at the object's silhouette. Returns the layer's straight
    colour (H x W x 3, the design's inks, 0..1), its alpha (H x W, the design's coverage, 0..1) and the
    warp (logo canvas -> image) for whatever else lives on the print (its wear, its halftone)."""
    size = obj["image"].shape[0]
    x0, y0, x1, y1 = obj["face"]
    lh, lw = logo["coverage"].shape
    # where the logo's centre lands on the face (it must stay on it)
    cx = float(rng.uniform(x0 + lw / 2, max(x0 + lw / 2, x1 - lw / 2) + 1e-6))
    cy = float(rng.uniform(y0 + lh / 2, max(y0 + lh / 2, y1 - lh / 2) + 1e-6))
    strong = category == "perspective"
    placement: dict[str, Any] = {"surface": obj["surface"], "strong": strong}
    if obj["surface"] == "cylinder":
        if strong:  # far round the cylinder: foreshortened towards the silhouette
            cx = obj["cx"] + (1 if rng.random() < 0.5 else -1) * obj["radius"] * float(rng.uniform(0.45, 0.7))
        warp = _cylindrical_warp(obj, cx, cy, lh, lw, size, placement)
    else:
        jitter, rotation = (0.28, 25.0) if strong else (0.12, 12.0)
        warp = _perspective_warp(rng, cx, cy, lh, lw, size, obj["surface"] == "cloth", jitter, rotation, placement)
    placement["center"] = [cx, cy]
    cover = logo["coverage"]
    premultiplied = np.dstack([logo["rgb"] * cover[..., None], cover]).astype(np.float32)
    warped = warp(premultiplied).astype(np.float64)
    coverage = np.clip(warped[..., 3], 0, 1)
    rgb = np.clip(warped[..., :3] / np.maximum(coverage, 1e-6)[..., None], 0, 1)
    rgb[coverage <= 1e-6] = 0
    coverage = coverage * obj["support"]
    params["logo"]["warp"] = placement
    return rgb, coverage, warp


def _cylindrical_warp(obj, cx, cy, lh, lw, size, placement) -> Warp:
    """Wrap the logo around the vertical cylinder: a logo column at arc length s from the centre line
    lands at x = cx_cyl + R sin(theta0 + s / R); rows bend with the rim ellipse (y shifts by
    tilt * R * cos(theta)), so horizontal lines curve like a label seen from slightly above."""
    R, ccx, tilt = obj["radius"], obj["cx"], obj["tilt"]
    theta0 = math.asin(float(np.clip((cx - ccx) / R, -0.9, 0.9)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    sin_t = np.clip((xx - ccx) / R, -1, 1)
    theta = np.arcsin(sin_t)
    arc = (theta - theta0) * R  # arc length along the surface from the logo's centre column
    map_x = arc + lw / 2
    map_y = yy - (cy - lh / 2) - tilt * R * (np.cos(theta) - 1)
    visible = np.abs(xx - ccx) < R
    map_x = np.where(visible, map_x, -10).astype(np.float32)
    map_y = np.where(visible, map_y, -10).astype(np.float32)
    placement.update(theta0=theta0)
    return lambda image: cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=0)


def _perspective_warp(rng, cx, cy, lh, lw, size, ripple, jitter, rotation, placement) -> Warp:
    """A flat face seen at an angle: the logo rectangle's corners move independently by up to ``jitter``
    of its size, a rotation of up to ``rotation`` degrees on top (cv2.warpPerspective). On cloth a
    low-frequency ripple follows."""
    angle = math.radians(float(rng.uniform(-rotation, rotation)))
    moves = rng.uniform(-jitter, jitter, (4, 2)) * np.array([lw, lh])
    corners = np.array([[-lw / 2, -lh / 2], [lw / 2, -lh / 2], [lw / 2, lh / 2], [-lw / 2, lh / 2]])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = (corners + moves) @ rot.T + np.array([cx, cy])
    src = np.array([[0, 0], [lw, 0], [lw, lh], [0, lh]], np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    placement.update(rotation_deg=math.degrees(angle), corners=dst.round(2).tolist())
    maps = None
    if ripple:
        amp, freq = float(rng.uniform(1.0, 2.5)), float(rng.uniform(1.5, 3.0))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        maps = (xx + amp * np.sin(2 * math.pi * freq * yy / size).astype(np.float32),
                yy + amp * np.sin(2 * math.pi * freq * xx / size + 1.0).astype(np.float32))
        placement.update(ripple_amplitude=amp, ripple_frequency=freq)

    def apply(image: np.ndarray) -> np.ndarray:
        warped = cv2.warpPerspective(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if maps is not None:
            warped = cv2.remap(warped, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0)
        return warped

    return apply


# ============================================================================ the formation's parameters
def _draw_formation(rng, category, obj, logo, warp, light, scene_light, opacity_range,
                    params) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The parameters ``render_composite`` takes (what ``meta["logo"]`` records) and its maps."""
    size = obj["image"].shape[0]
    opacity = float(rng.uniform(*opacity_range))
    absorption = float(rng.uniform(0.65, 1.0) if category == "transparency" else rng.uniform(0.0, 0.2))
    ink = {"absorption": absorption, "surface_luma": _luma(obj["albedo"]),
           "rule": "multiply where the ink is darker than the surface, cover elsewhere"}
    texture, texture_info = _print_texture(rng, category, obj, logo, warp, size)
    gloss = float(rng.uniform(0.35, 0.7) if category == "lighting" else rng.uniform(0.1, 0.35))
    if obj["highlight"] is not None:
        lobe = obj["highlight"]
        specular: dict[str, Any] = {"gloss": gloss, "lobe": "cylinder band"}
    else:  # a flat or cloth face: a round lobe near the logo, towards the light
        lh, lw = logo["coverage"].shape
        extent = max(lh, lw)
        cx, cy = params["logo"]["warp"]["center"]
        reach = float(rng.uniform(0.1, 0.5)) * extent
        centre = [cx + light["x"] * reach, cy + light["y"] * reach]
        sigma = float(rng.uniform(0.25, 0.5)) * extent
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        lobe = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))
        specular = {"gloss": gloss, "lobe": "gaussian", "center": centre, "sigma": sigma}
    emboss = None
    if category == "emboss":
        raised = bool(rng.random() < 0.7)
        emboss = {"mode": "raised" if raised else "debossed", "depth": float(rng.uniform(1.5, 3.0)),
                  "sigma": float(rng.uniform(0.8, EMBOSS_MAX_SIGMA)), "bevel_gloss": float(rng.uniform(0.2, 0.5)),
                  "shininess": 24.0, "shadow": float(rng.uniform(0.25, 0.5)) if raised else 0.0,
                  "light": [light["x"], light["y"], light["z"]]}
    formation = {"opacity": opacity, "ink": ink, "specular": specular, "emboss": emboss, "texture": texture_info}
    maps = {"light": obj["irradiance"][..., None] * scene_light, "highlight": lobe[..., None] * scene_light,
            "texture": texture, "tint": scene_light}
    return formation, maps


def _print_texture(rng, category, obj, logo, warp, size) -> tuple[np.ndarray, dict[str, Any]]:
    """The print's coverage modulation t (H x W, 0..1) and its parameters. ``worn`` ink and ``halftone``
    dots belong to the print, so they are drawn on the logo canvas and warped with it; paper ``grain`` and
    fabric ``weave`` belong to the surface, so they are drawn in the image. Cloth prints take the weave
    (70 %); the `text` category always has a texture."""
    fabric = obj["kind"] == "tshirt" or obj.get("material") == "fabric"
    if fabric and rng.random() < 0.7:
        style = "weave"
    else:
        choices = ("worn", "halftone", "grain") if category == "text" else ("clean", "clean", "worn", "halftone", "grain")
        style = str(rng.choice(choices))
    info: dict[str, Any] = {"print": style}
    lh, lw = logo["coverage"].shape
    if style == "clean":
        return np.ones((size, size)), info
    if style in ("worn", "halftone"):
        if style == "worn":
            wear = float(rng.uniform(0.15, 0.4))
            speckle = cv2.GaussianBlur(rng.uniform(0, 1, (lh, lw)).astype(np.float32), (0, 0), 1.0).astype(np.float64)
            patches = _smooth_noise(rng, (lh, lw), 8) * 0.5 + 0.5
            flat = np.clip(1 - wear * (speckle * 2 + patches - 1.2) * 2.5, 0.15, 1)
            info["wear"] = wear
        else:
            period = float(rng.uniform(2.5, 4.0))
            yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float64)
            dots = (np.cos(2 * math.pi * xx / period) + np.cos(2 * math.pi * yy / period)) / 4 + 0.5
            flat = np.clip(0.7 + 0.5 * dots, 0, 1)
            info["period"] = period
        # warp (t - 1), so that outside the logo canvas t is 1, not 0
        return np.clip(1.0 + warp((flat - 1.0).astype(np.float32)).astype(np.float64), 0, 1), info
    if style == "grain":
        amount = float(rng.uniform(0.25, 0.5))
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 0.8).astype(np.float64)
        noise /= max(float(noise.std()), 1e-6)
        info["amount"] = amount
        return np.clip(1 - amount * np.clip(noise, 0, None), 0.1, 1), info
    period = float(rng.uniform(2.0, 3.2))
    amount = float(rng.uniform(0.25, 0.45))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    threads = 0.5 + 0.5 * np.sin(2 * math.pi * xx / period) * np.sin(2 * math.pi * yy / period)
    info.update(period=period, amount=amount)
    return 1 - amount * (1 - threads), info


# ============================================================================ helpers
def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _plain(value: Any) -> Any:
    """Metadata as plain JSON values: numpy scalars and arrays to Python numbers and lists, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
