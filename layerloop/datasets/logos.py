"""Synthetic logo seed data for layer decomposition (issue 5): procedural logos printed on procedural objects.

Each sample is a quadruple in the project's one schema (docs/architecture.md, "The sample"):

* B, the clean object: a shaded mug, bottle, box or t-shirt over a plain or textured backdrop, or a
  textured surface (wood, concrete, fabric, paper) seen at an angle;
* F, the logo layer *as it appears on the object*: the flat logo (emblem, ring, star, letters, stripes or
  a repeated-text pattern) warped onto the surface (cylindrical for mugs and bottles, perspective for flat
  faces, a gentle ripple for cloth), multiplied by the object's shading and given its specular highlight
  (so the logo follows the light), with a global opacity and a print texture (worn ink speckle or halftone)
  in alpha;
* M, the region mask: the logo's support, dilated by a few pixels (what a user would draw around it);
* C = ``composite(F, B)``, so the quadruple invariant holds exactly.

What a decomposition model must learn from these is the inverse of exactly those effects: undo the
shading and highlight on the layer, the warp stays (F is the layer in place), and fill in the object
behind it. Every random draw is recorded in ``meta["logo"]`` and a sample depends on (seed, index) only.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from layerloop.samples import LayeredSample, composite
from layerloop.seeds import rng_for

SOURCE = "logos"
OBJECTS = ("mug", "bottle", "box", "tshirt", "surface")
LOGO_KINDS = ("emblem", "ring", "star", "letters", "stripes", "text pattern")
SURFACES = ("wood", "concrete", "fabric", "paper")
PRINTS = ("clean", "worn", "halftone")
LOGO_NOUNS = {"emblem": "emblem logo", "ring": "ring logo", "star": "star logo", "letters": "wordmark logo",
              "stripes": "striped logo", "text pattern": "repeating text pattern"}
# Named colours (RGB 0..1): captions say the names, so the palette is small and unambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.94, 0.94, 0.92), "black": (0.08, 0.08, 0.09), "red": (0.80, 0.10, 0.12),
    "blue": (0.12, 0.30, 0.78), "navy": (0.08, 0.12, 0.35), "green": (0.12, 0.55, 0.25),
    "yellow": (0.96, 0.80, 0.12), "orange": (0.95, 0.48, 0.10), "purple": (0.45, 0.18, 0.60),
    "pink": (0.92, 0.45, 0.62), "teal": (0.05, 0.50, 0.52), "grey": (0.55, 0.56, 0.58),
}
WORDS = ("ACME", "NOVA", "ORBIT", "PIXEL", "DELTA", "LUMEN", "ZEPHYR", "KOI", "ATLAS", "FOLK", "VOLT", "MOSS")
MIN_LUMA_GAP = 0.22  # a logo colour this close in luminance to its object would be nearly invisible
REGION_DILATION = 5  # pixels: the region mask a user draws is a little larger than the ink


def _luma(rgb: tuple[float, float, float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


class LogoSynthesizer:
    """``make(index)``: one logo-on-object quadruple, a pure function of (seed, index, constructor args).

    ``objects`` / ``logo_kinds`` restrict what is drawn; ``opacity`` and ``logo_scale`` are (min, max)
    ranges for the global ink opacity and the logo size relative to the printable face."""

    def __init__(self, size: int = 256, seed: int = 0, objects: tuple[str, ...] = OBJECTS,
                 logo_kinds: tuple[str, ...] = LOGO_KINDS, opacity: tuple[float, float] = (0.75, 1.0),
                 logo_scale: tuple[float, float] = (0.55, 0.85)):
        if size < 64:
            raise ValueError(f"size must be at least 64 pixels, got {size}")
        for name, values, known in (("objects", objects, OBJECTS), ("logo_kinds", logo_kinds, LOGO_KINDS)):
            unknown = sorted(set(values) - set(known)) if values else ["(empty)"]
            if unknown:
                raise ValueError(f"{name}: unknown or empty {unknown}; choose from {known}")
        if not 0 < opacity[0] <= opacity[1] <= 1 or not 0 < logo_scale[0] <= logo_scale[1] <= 1:
            raise ValueError(f"opacity and logo_scale must be ordered ranges in (0, 1], got {opacity}, {logo_scale}")
        self.size, self.seed = int(size), int(seed)
        self.objects, self.logo_kinds = tuple(objects), tuple(logo_kinds)
        self.opacity, self.logo_scale = tuple(opacity), tuple(logo_scale)

    def rng(self, index: int) -> np.random.Generator:
        return rng_for(SOURCE, self.seed, index)

    def make(self, index: int) -> LayeredSample:
        rng = self.rng(index)
        params: dict[str, Any] = {}
        obj = _draw_object(rng, self.size, self.objects, params)
        logo = _draw_logo(rng, obj, self.logo_kinds, self.logo_scale, params)
        fg_rgb, alpha = _place_logo(rng, obj, logo, self.opacity, params)
        foreground = np.dstack([_to_u8(fg_rgb), _to_u8(alpha)])
        foreground[foreground[..., 3] == 0, :3] = 0  # invisible colour carries nothing: keep it canonical
        background = _to_u8(obj["image"])
        support = (foreground[..., 3] > 0).astype(np.uint8)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * REGION_DILATION + 1,) * 2)
        mask = np.where(cv2.dilate(support, kernel) > 0, 255, 0).astype(np.uint8)
        logo = f"{params['logo']['colour']} {LOGO_NOUNS[params['logo']['kind']]}"
        caption = f"{_article(logo)} {logo} printed on {_article(obj['caption'])} {obj['caption']}"
        key = f"{SOURCE}_{index:06d}"
        sample = LayeredSample(key=key, kind="quadruple", composite=composite(foreground, background),
                               background=background, foreground=foreground, mask=mask, caption=caption,
                               meta={"source": SOURCE, "source_id": f"{index:06d}", "seed": self.seed,
                                     "size": self.size, **params})
        sample.validate()
        return sample


def logo_samples(n: int, seed: int = 0, size: int = 256, start: int = 0, **options: Any) -> Iterator[LayeredSample]:
    """Samples ``start .. start + n - 1`` of ``LogoSynthesizer(size, seed, **options)``."""
    synthesizer = LogoSynthesizer(size=size, seed=seed, **options)
    for index in range(start, start + n):
        yield synthesizer.make(index)


# ============================================================================ objects (the clean B)
def _draw_object(rng: np.random.Generator, size: int, objects: tuple[str, ...], params: dict) -> dict[str, Any]:
    """The clean object image plus what placing a logo on it needs: the printable face (a box in
    pixels), its kind of surface (``cylinder`` / ``flat`` / ``cloth``), its shading and specular maps
    (H x W, the light the logo must receive) and its colour."""
    kind = str(rng.choice(objects))
    backdrop = _backdrop(rng, size, params)
    names = list(COLOURS)
    colour_name = str(rng.choice(names))
    colour = np.array(COLOURS[colour_name])
    light_x = float(rng.uniform(-0.7, 0.7))  # horizontal light direction (-1 left .. 1 right)
    ambient = float(rng.uniform(0.35, 0.55))
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


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random cells x cells grid upsampled smoothly."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(-1, 1).astype(np.float64)


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
    specular = gloss * np.exp(-((nx - highlight_x) / 0.12) ** 2)
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
    return {"image": np.clip(image, 0, 1), "shade": shade, "specular": specular, "support": body,
            "face": face, "surface": "cylinder", "cx": cx, "radius": radius, "tilt": tilt, "caption": caption}


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
    return {"image": np.clip(image, 0, 1), "shade": shade * texture, "specular": np.zeros((size, size)),
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
    return {"image": np.clip(image, 0, 1), "shade": shade, "specular": np.zeros((s, s)), "support": support,
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
    shade = np.clip(ambient + (1 - ambient) * falloff, 0, 1) * texture
    image = np.clip(colour * shade[..., None], 0, 1)
    draw.update(material=material, object_colour=base)
    m = size * 0.12
    return {"image": image, "shade": shade, "specular": np.zeros((size, size)),
            "support": np.ones((size, size), bool), "face": (m, m, size - m, size - m), "surface": "flat",
            "caption": f"{material} surface"}


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


# ============================================================================ placing the logo
def _place_logo(rng, obj, logo, opacity_range, params) -> tuple[np.ndarray, np.ndarray]:
    """Warp the flat logo onto the object's face, then light it and apply the print effects. Returns the
    layer's straight colour (H x W x 3, 0..1) and alpha (H x W, 0..1)."""
    size = obj["image"].shape[0]
    x0, y0, x1, y1 = obj["face"]
    lh, lw = logo["coverage"].shape
    # where the logo's centre lands on the face (it must stay on it)
    cx = float(rng.uniform(x0 + lw / 2, max(x0 + lw / 2, x1 - lw / 2) + 1e-6))
    cy = float(rng.uniform(y0 + lh / 2, max(y0 + lh / 2, y1 - lh / 2) + 1e-6))
    flat = np.dstack([logo["rgb"], logo["coverage"]]).astype(np.float32)
    placement: dict[str, Any] = {"surface": obj["surface"], "center": [cx, cy]}
    if obj["surface"] == "cylinder":
        warped = _cylindrical_warp(flat, obj, cx, cy, size, placement)
    else:
        warped = _perspective_warp(rng, flat, cx, cy, size, obj["surface"] == "cloth", placement)
    rgb, coverage = warped[..., :3].astype(np.float64), np.clip(warped[..., 3].astype(np.float64), 0, 1)
    coverage *= obj["support"]
    # lighting: ink is lit like the object under it (its shading), and a glossy object's highlight shows
    # on the ink too (added light, not multiplied)
    lit = np.clip(rgb * obj["shade"][..., None] + obj["specular"][..., None], 0, 1)
    opacity = float(rng.uniform(*opacity_range))
    style = str(rng.choice(PRINTS))
    ink = np.ones((size, size))
    if style == "worn":
        wear = float(rng.uniform(0.15, 0.4))
        speckle = cv2.GaussianBlur(rng.uniform(0, 1, (size, size)).astype(np.float32), (0, 0), 1.0).astype(np.float64)
        patches = _smooth_noise(rng, size, 8) * 0.5 + 0.5
        ink = np.clip(1 - wear * (speckle * 2 + patches - 1.2) * 2.5, 0.15, 1)
        placement["wear"] = wear
    elif style == "halftone":
        period = float(rng.uniform(2.5, 4.0))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        dots = (np.cos(2 * math.pi * xx / period) + np.cos(2 * math.pi * yy / period)) / 4 + 0.5
        ink = np.clip(0.7 + 0.5 * dots, 0, 1)
        placement["period"] = period
    alpha = coverage * opacity * ink
    placement.update(opacity=opacity, print=style)
    params["logo"]["placement"] = placement
    return lit, alpha


def _cylindrical_warp(flat, obj, cx, cy, size, placement) -> np.ndarray:
    """Wrap the logo around the vertical cylinder: a logo column at arc length s from the centre line
    lands at x = cx_cyl + R sin(theta0 + s / R); rows bend with the rim ellipse (y shifts by
    tilt * R * cos(theta)), so horizontal lines curve like a label seen from slightly above."""
    lh, lw = flat.shape[:2]
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
    return cv2.remap(flat, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _perspective_warp(rng, flat, cx, cy, size, ripple, placement) -> np.ndarray:
    """A flat face seen at an angle: the logo rectangle's corners move independently by up to 12 % of
    its size, a small rotation on top (cv2.warpPerspective). On cloth a low-frequency ripple follows."""
    lh, lw = flat.shape[:2]
    angle = math.radians(float(rng.uniform(-12, 12)))
    jitter = rng.uniform(-0.12, 0.12, (4, 2)) * np.array([lw, lh])
    corners = np.array([[-lw / 2, -lh / 2], [lw / 2, -lh / 2], [lw / 2, lh / 2], [-lw / 2, lh / 2]])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = (corners + jitter) @ rot.T + np.array([cx, cy])
    src = np.array([[0, 0], [lw, 0], [lw, lh], [0, lh]], np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    warped = cv2.warpPerspective(flat, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    placement.update(rotation_deg=math.degrees(angle), corners=dst.round(2).tolist())
    if ripple:
        amp, freq = float(rng.uniform(1.0, 2.5)), float(rng.uniform(1.5, 3.0))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        map_x = xx + amp * np.sin(2 * math.pi * freq * yy / size).astype(np.float32)
        map_y = yy + amp * np.sin(2 * math.pi * freq * xx / size + 1.0).astype(np.float32)
        warped = cv2.remap(warped, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        placement.update(ripple_amplitude=amp, ripple_frequency=freq)
    return warped


# ============================================================================ helpers
def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"
