"""The ``matting`` stage: alpha matte and halo-free foreground colours from the image and the trimap.

Reads ``work["image"]`` (H x W x 3 uint8) and ``work["trimap"]`` (H x W uint8, 0/128/255); writes
``work["alpha"]`` (H x W float32 in [0, 1]) and ``work["fg_rgb"]`` (H x W x 3 float32 in [0, 1])
(docs/stage-flow.md, step 3).

Backends
--------
``BACKENDS`` maps a backend name to a ``MattingBackend``. A backend only solves alpha on a (cropped,
possibly downscaled) float image and trimap; everything around it (cropping, scaling, pinning definite
regions, foreground colours, metadata) is shared, so every backend gets the same guarantees:

* classical backends (``closed-form``, ``knn``, ``lkm`` from pymatting) give ``solve(image, trimap) ->
  alpha`` and need nothing loaded;
* a model backend gives ``load(params, device) -> solver`` instead, called once in ``setup()`` (per
  worker or Ray actor), and usually ``batched=True`` so that the solver receives lists
  ``(images, trimaps) -> alphas`` for one forward pass per batch. ViTMatte plugs in as::

      def _load_vitmatte(params, device):
          from layerloop.models.vitmatte import VitMatte
          return VitMatte.from_pretrained(params.model, device=device).predict

      BACKENDS["vitmatte"] = MattingBackend(load=_load_vitmatte, batched=True)

  plus ``"vitmatte"`` in ``MattingParams.backend`` and the model fields (id, revision) it needs.
  ``needs_actor`` follows the backend, so classical backends keep running as plain Ray tasks.

Images reach a solver as float64 H x W x 3 in [0, 1]; trimaps as float64 H x W with 0 / 0.5 / 1.

Speed: crop and downscale
-------------------------
Matting cost grows with the number of pixels (closed-form builds a sparse Laplacian over the unknown
region and its neighbourhood; a model runs attention over the whole input), yet only the unknown band
carries information. The solve therefore runs on the bounding box of the non-background trimap plus a
margin of definite background (``crop_margin``, so the solver sees background colours next to the band),
and the result is pasted back: alpha 0 outside the crop, 1 in the definite foreground. If the crop would
contain no definite background (the object touches the image border on every side) the full image is
used, because every solver needs both anchors.

A crop whose longer side exceeds ``max_side`` is solved at reduced resolution (INTER_AREA) and the alpha
is upsampled bilinearly. This trades fine detail (single hairs get blurred) for bounded time and memory;
set ``max_side: null`` for full resolution. The downscaled trimap is conservative: a pixel is definite
only if every full-resolution pixel under it is, so the band never shrinks. If that leaves no definite
foreground (a hair-thin object), the crop is solved at full resolution instead.

Definite regions are pinned after the solve (alpha exactly 1 where the trimap says foreground, exactly 0
where it says background) so that the composite there reproduces the source pixel exactly, whatever the
solver or the resampling did.

Foreground colours
------------------
In the unknown band a pixel's colour is a mix ``a*F + (1-a)*B``; using the image as F would carry the
old background into the layer as a halo when it is composited onto a new one. pymatting's multi-level
``estimate_foreground_ml`` solves for smooth F (and B) that explain the image, at full crop resolution
(it is linear-time, unlike the alpha solve). F equals the image in the definite foreground (alpha 1
there, so F must be the pixel), and outside the crop, where alpha is 0 and F is invisible, F is the
image too: a deterministic, harmless value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import cv2
import numpy as np
from pydantic import Field

from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

# trimap codes, as written by the trimap stage
BACKGROUND, UNKNOWN, FOREGROUND = 0, 128, 255

AlphaSolver = Callable[[np.ndarray, np.ndarray], np.ndarray]
BatchAlphaSolver = Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]]


def _closed_form(image: np.ndarray, trimap: np.ndarray, preconditioner: str = "ichol") -> np.ndarray:
    from pymatting import estimate_alpha_cf

    return estimate_alpha_cf(image, trimap, preconditioner=PRECONDITIONERS[preconditioner]())


def _ichol_rcm(matrix):
    """pymatting's incomplete Cholesky preconditioner, computed on the matrix in reverse Cuthill-McKee order.

    The unknown pixels of a matting band are numbered row by row, so a pixel's neighbours in the Laplacian
    (its 3 x 3 windows' pixels) lie up to a whole band row apart: a wide profile, much fill-in for the
    thresholded factorisation. RCM renumbers them so that neighbours get close numbers; the factorisation then
    keeps fewer entries and is built faster. It is the same preconditioner of the same system up to the order
    (only which small entries the threshold drops changes), so CG converges to the same tolerance:
    ``benchmarks/RESULTS.md`` (issue #16 goal 1) measures ~30% less matting time, alphas within 1e-5, and a
    handful of pixels per 16 samples one 8-bit step apart."""
    from pymatting import ichol
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    matrix = matrix.tocsr()
    order = reverse_cuthill_mckee(matrix, symmetric_mode=True)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    factor = ichol(matrix[order][:, order].tocsc())
    return lambda vector: factor(vector[order])[inverse]


def _ichol():
    from pymatting import ichol

    return ichol


# closed-form's preconditioner of its CG solve: pymatting's default (the historical bytes), or the same in
# reverse Cuthill-McKee order (faster; a few 8-bit alphas differ). Each entry returns the preconditioner factory.
PRECONDITIONERS: dict[str, Callable[[], Callable]] = {"ichol": _ichol, "ichol-rcm": lambda: _ichol_rcm}


def _knn(image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    from pymatting import estimate_alpha_knn

    return estimate_alpha_knn(image, trimap)


LKM_RADIUS = 10  # pymatting's default window radius


def _lkm(image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    from pymatting import estimate_alpha_lkm

    # pymatting's box filters need at least 4 * radius + 1 pixels per side (a "valid" filter followed by
    # a "full" one), so small crops get a smaller window instead of an AssertionError.
    radius = min(LKM_RADIUS, (min(trimap.shape) - 1) // 4)
    if radius < 1:
        raise ValueError(f"lkm needs a crop of at least 5 x 5 pixels, got {trimap.shape}")
    return estimate_alpha_lkm(image, trimap, laplacian_kwargs={"radius": radius})


@dataclass(frozen=True)
class MattingBackend:
    """How one backend produces alpha. Give ``solve`` (nothing to load) or ``load`` (called once in
    ``setup()`` with the stage parameters and device; returns the solver). ``batched`` solvers take and
    return lists, one entry per sample of the batch."""

    solve: AlphaSolver | BatchAlphaSolver | None = None
    load: Callable[[Any, str], AlphaSolver | BatchAlphaSolver] | None = None
    batched: bool = False

    def __post_init__(self) -> None:
        if (self.solve is None) == (self.load is None):
            raise ValueError("a matting backend needs exactly one of solve= or load=")


def _load_vitmatte(params: "MattingParams", device: str) -> BatchAlphaSolver:
    """ViTMatte (``models/vitmatte.py``), loaded once per worker; takes the same float crops as the
    classical solvers and hands the model 8-bit images and 0/128/255 trimaps."""
    from layerloop.models.refs import load_wrapper
    from layerloop.models.vitmatte import VitMatte

    model = load_wrapper(VitMatte, vitmatte_ref(params), device, params.dtype)

    def solve(images: list[np.ndarray], trimaps: list[np.ndarray]) -> list[np.ndarray]:
        images8 = [np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8) for image in images]
        trimaps8 = [np.clip(np.rint(trimap * 255.0), 0, 255).astype(np.uint8) for trimap in trimaps]
        return model.predict(images8, trimaps8, batch_size=params.model_batch_size)

    return solve


def vitmatte_ref(params: "MattingParams"):
    from layerloop.models.refs import ModelRef

    return ModelRef(stage="matting/vitmatte", model=params.model, revision=params.revision)


BACKENDS: dict[str, MattingBackend] = {
    "closed-form": MattingBackend(solve=_closed_form),  # Levin et al. 2008: the reference quality
    "knn": MattingBackend(solve=_knn),  # Chen et al. 2013: non-local neighbours, reach across wide bands
    "lkm": MattingBackend(solve=_lkm),  # He et al. 2010: large windows, matrix-free (low memory)
    "vitmatte": MattingBackend(load=_load_vitmatte, batched=True),  # Yao et al. 2024, transformers
}


class MattingParams(StageParams):
    backend: Literal["closed-form", "knn", "lkm", "vitmatte"] = "closed-form"
    # model backends only: hub id, local folder, or tiny[:seed] for the random tiny instance
    model: str = "hustvl/vitmatte-small-composition-1k"
    revision: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # autocast dtype on GPU
    model_batch_size: int = Field(4, ge=1)
    crop: bool = True  # solve on the bounding box of the non-background trimap only
    crop_margin: float = Field(0.05, ge=0.0)  # background context around the box, fraction of shorter side
    max_side: int | None = Field(512, ge=16)  # downscale crops with a longer side; None: full resolution
    # closed-form's CG preconditioner, "ichol" (pymatting's, the historical bytes) or "ichol-rcm" (the same in
    # reverse Cuthill-McKee order: ~30% faster matting, a few 8-bit alphas one step apart; issue #16). Other backends
    # solve no such system: they ignore it and do not record it, so `matting.backend=vitmatte` on a config that
    # chose ichol-rcm (the demo) just works.
    preconditioner: Literal["ichol", "ichol-rcm"] = "ichol"


@dataclass
class _Job:
    """One sample's solve: the crop window and what the solver sees."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1 of the crop in the full image
    image: np.ndarray  # float64 crop at full resolution
    trimap: np.ndarray  # uint8 crop at full resolution
    solve_image: np.ndarray  # float64, possibly downscaled
    solve_trimap: np.ndarray  # float64 0 / 0.5 / 1, possibly downscaled
    scale: float  # solve size / full size (1.0: not downscaled)


def crop_box(trimap: np.ndarray, margin_px: int) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1; exclusive ends) of the non-background trimap plus ``margin_px``,
    or the whole image if the box would hold no definite background for the solver."""
    height, width = trimap.shape
    rows = np.flatnonzero((trimap != BACKGROUND).any(axis=1))
    cols = np.flatnonzero((trimap != BACKGROUND).any(axis=0))
    box = (max(0, rows[0] - margin_px), min(height, rows[-1] + 1 + margin_px),
           max(0, cols[0] - margin_px), min(width, cols[-1] + 1 + margin_px))
    y0, y1, x0, x1 = box
    if not (trimap[y0:y1, x0:x1] == BACKGROUND).any():
        return 0, height, 0, width
    return int(y0), int(y1), int(x0), int(x1)


def _float_trimap(trimap: np.ndarray) -> np.ndarray:
    out = np.full(trimap.shape, 0.5)
    out[trimap == BACKGROUND] = 0.0
    out[trimap == FOREGROUND] = 1.0
    return out


def _downscale(image: np.ndarray, trimap: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Image and conservative trimap at ``scale``; None if the small trimap keeps no definite foreground."""
    height, width = trimap.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small_image = np.clip(cv2.resize(image, size, interpolation=cv2.INTER_AREA), 0.0, 1.0)
    # Area-averaged indicator maps: 1.0 only where every source pixel under the small pixel is definite.
    fg = cv2.resize((trimap == FOREGROUND).astype(np.float32), size, interpolation=cv2.INTER_AREA)
    bg = cv2.resize((trimap == BACKGROUND).astype(np.float32), size, interpolation=cv2.INTER_AREA)
    small_trimap = np.full(fg.shape, 0.5)
    small_trimap[fg >= 0.999] = 1.0
    small_trimap[bg >= 0.999] = 0.0
    if not (small_trimap == 1.0).any() or not (small_trimap == 0.0).any():
        return None
    return small_image, small_trimap


def matte(image: np.ndarray, trimap: np.ndarray, alpha_of_crop: AlphaSolver,
          crop: bool = True, crop_margin: float = 0.05, max_side: int | None = 512) -> tuple[np.ndarray, np.ndarray]:
    """Alpha and foreground colours for one uint8 image and trimap with an unbatched solver; the same
    path the stage takes, for scripts and notebooks."""
    job = prepare(image, trimap, crop, crop_margin, max_side)
    if job is None:
        return finish_trivial(image, trimap)
    return finish(image, trimap, job, alpha_of_crop(job.solve_image, job.solve_trimap))


def prepare(image: np.ndarray, trimap: np.ndarray, crop: bool, crop_margin: float,
            max_side: int | None) -> _Job | None:
    """Crop (and downscale) one sample for the solver; None if the trimap has no unknown pixels."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    if trimap.shape != image.shape[:2]:
        raise ValueError(f"trimap is {trimap.shape}, image is {image.shape[:2]}")
    if not (trimap == FOREGROUND).any():
        raise ValueError("trimap has no definite foreground: nothing anchors alpha = 1")
    if not (trimap == BACKGROUND).any():
        raise ValueError("trimap has no definite background (the object fills the image): nothing anchors alpha = 0")
    if not ((trimap != FOREGROUND) & (trimap != BACKGROUND)).any():
        return None

    if crop:
        margin_px = max(1, int(round(crop_margin * min(trimap.shape))))
        y0, y1, x0, x1 = crop_box(trimap, margin_px)
    else:
        y0, y1, x0, x1 = 0, trimap.shape[0], 0, trimap.shape[1]
    crop_image = image[y0:y1, x0:x1].astype(np.float64) / 255.0
    crop_trimap = trimap[y0:y1, x0:x1]

    solve_image, solve_trimap, scale = crop_image, _float_trimap(crop_trimap), 1.0
    longest = max(crop_trimap.shape)
    if max_side is not None and longest > max_side:
        small = _downscale(crop_image, crop_trimap, max_side / longest)
        if small is not None:
            solve_image, solve_trimap = small
            scale = max_side / longest
    return _Job((y0, y1, x0, x1), crop_image, crop_trimap, solve_image, solve_trimap, scale)


def finish_trivial(image: np.ndarray, trimap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A trimap without unknown pixels is already the matte."""
    alpha = (trimap == FOREGROUND).astype(np.float32)
    return alpha, image.astype(np.float32) / 255.0


def finish(image: np.ndarray, trimap: np.ndarray, job: _Job, solved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upsample the solver's alpha, pin definite regions, paste into the full frame, estimate F."""
    from pymatting import estimate_foreground_ml

    solved = np.asarray(solved, dtype=np.float64)
    if solved.shape != job.solve_trimap.shape:
        raise ValueError(f"matting backend returned alpha {solved.shape} for a {job.solve_trimap.shape} input")
    height, width = job.trimap.shape
    crop_alpha = solved if job.scale == 1.0 else cv2.resize(solved, (width, height), interpolation=cv2.INTER_LINEAR)
    crop_alpha = np.clip(crop_alpha, 0.0, 1.0)
    crop_alpha[job.trimap == FOREGROUND] = 1.0
    crop_alpha[job.trimap == BACKGROUND] = 0.0

    crop_fg = estimate_foreground_ml(job.image, crop_alpha)
    crop_fg = np.clip(crop_fg, 0.0, 1.0)
    crop_fg[crop_alpha == 1.0] = job.image[crop_alpha == 1.0]

    alpha = np.zeros(trimap.shape, np.float32)  # the crop holds every non-background pixel
    fg_rgb = image.astype(np.float32) / 255.0
    y0, y1, x0, x1 = job.box
    alpha[y0:y1, x0:x1] = crop_alpha
    fg_rgb[y0:y1, x0:x1] = crop_fg
    return alpha, fg_rgb


@register_stage
class MattingStage(Stage):
    """Trimap -> alpha with a classical (pymatting) or model backend, plus halo-free foreground colours."""

    name = "matting"
    reads_work = frozenset({"image", "trimap"})
    Params = MattingParams
    batch_size = 4

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.backend = BACKENDS[self.params.backend]
        self._solver: AlphaSolver | BatchAlphaSolver | None = self.backend.solve
        if self.params.backend == "closed-form":
            self._solver = functools.partial(_closed_form, preconditioner=self.params.preconditioner)

    @property
    def needs_actor(self) -> bool:
        # Only a backend with a model to load is worth an actor; classical solvers run as plain tasks.
        return self.backend.load is not None or self.resources.gpus > 0

    def setup(self) -> None:
        if self.backend.load is not None:
            self._solver = self.backend.load(self.params, self.device)

    def models(self) -> list:
        return [vitmatte_ref(self.params)] if self.params.backend == "vitmatte" else []

    def worker_imports(self) -> tuple[str, ...]:
        return ("pymatting",)  # every backend's foreground colours (``finish``), and the classical solvers

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.backend.load is None:  # model fields mean nothing to a classical backend
            for field in ("model", "revision", "dtype", "model_batch_size"):
                described.pop(field, None)
        if self.params.preconditioner == "ichol" or self.params.backend != "closed-form":
            # the default is left out (samples keep their historical bytes), and so is what a backend ignores
            described.pop("preconditioner", None)
        return described

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        self.ensure_setup()
        jobs: list[tuple[LayeredSample, _Job]] = []
        for sample in samples:
            if not sample.ok:  # failed earlier in this batch before run_stage retried it on its own
                continue
            try:
                image, trimap = self._inputs(sample)
                job = prepare(image, trimap, self.params.crop, self.params.crop_margin, self.params.max_side)
                if job is None:
                    self._write(sample, *finish_trivial(image, trimap), solved=False)
                else:
                    jobs.append((sample, job))
            except Exception as error:  # one sample's failure is recorded, not raised
                sample.fail(self.name, error)

        if self.backend.batched and jobs:
            # One call for the whole batch; if it raises, run_stage retries sample by sample so that only
            # the culprit is marked failed.
            alphas = self._solver([job.solve_image for _, job in jobs], [job.solve_trimap for _, job in jobs])
            if len(alphas) != len(jobs):
                raise RuntimeError(f"matting backend returned {len(alphas)} alphas for {len(jobs)} inputs")
            for (sample, job), solved in zip(jobs, alphas):
                self._finish(sample, job, solved)
        else:
            for sample, job in jobs:
                try:
                    solved = self._solver(job.solve_image, job.solve_trimap)
                except Exception as error:
                    sample.fail(self.name, error)
                    continue
                self._finish(sample, job, solved)
        return samples

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _inputs(sample: LayeredSample) -> tuple[np.ndarray, np.ndarray]:
        for key in ("image", "trimap"):
            if key not in sample.work:
                raise ValueError(f"sample has no work[{key!r}]; the matting stage runs after load and trimap")
        return sample.work["image"], sample.work["trimap"]

    def _finish(self, sample: LayeredSample, job: _Job, solved: np.ndarray) -> None:
        try:
            image, trimap = self._inputs(sample)
            self._write(sample, *finish(image, trimap, job, solved), solved=True, job=job)
        except Exception as error:
            sample.fail(self.name, error)

    def _write(self, sample: LayeredSample, alpha: np.ndarray, fg_rgb: np.ndarray, solved: bool,
               job: _Job | None = None) -> None:
        sample.work["alpha"] = alpha
        sample.work["fg_rgb"] = fg_rgb
        extra: dict[str, Any] = {"solved": solved}
        if self.backend.load is not None:
            extra["device"] = self.device  # where the model ran (a GPU stage falls back to the CPU)
        if job is not None:
            extra["crop_box"] = list(job.box)
            extra["solve_scale"] = round(job.scale, 6)
        sample.record_stage(self.name, **self.describe(), **extra)
