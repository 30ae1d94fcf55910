"""Evaluate the matting stage's backends on real photos with ground-truth alpha.

For every ``NAME.png`` in the data folder that has ``NAME_alpha.png`` and ``NAME_trimap.png``, run the
``matting`` stage (the same code path as the pipeline: crop, optional downscale, pinning) with each
backend and setting, and report the usual matting errors, all over the trimap's unknown region only
(known pixels are pinned and would only dilute the numbers):

* SAD: sum of absolute alpha differences, divided by 1000 (alpha in [0, 1]);
* MSE: mean squared alpha difference;
* Grad: gradient error as in Rhemann et al. / Deep Image Matting: sum of squared differences of the
  gradient magnitudes (Gaussian derivative filters, sigma 1.4), divided by 1000;
* time: wall-clock seconds of the stage call (includes foreground estimation).

Usage: ``python scripts/eval_matting.py [--data DIR] [--backends closed-form knn] [--out results.md]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from layerloop.models.hub import ModelNotAvailable
from layerloop.samples import LayeredSample
from layerloop.stages import run_stage
from layerloop.stages.matting import BACKENDS, MattingStage

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "matting"
# (label, stage parameters besides the backend)
SETTINGS = [("default: crop, max_side 512", {}), ("crop, max_side 256", {"max_side": 256}),
            ("no crop, full resolution", {"crop": False, "max_side": None})]


def load_case(data: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (uint8 RGB), trimap (uint8 0/128/255) and ground-truth alpha (float64) of one photo."""
    # lemur.png is RGBA with an opaque alpha channel; dropping it is what the load stage's rules give here.
    image = np.asarray(Image.open(data / f"{name}.png").convert("RGB"))
    gray = np.asarray(Image.open(data / f"{name}_trimap.png").convert("L")).astype(np.float64) / 255.0
    # pymatting's own thresholds: <= 0.1 background, >= 0.9 foreground, anything between unknown.
    trimap = np.full(gray.shape, 128, np.uint8)
    trimap[gray <= 0.1] = 0
    trimap[gray >= 0.9] = 255
    alpha = np.asarray(Image.open(data / f"{name}_alpha.png").convert("L")).astype(np.float64) / 255.0
    return image, trimap, alpha


def gaussian_gradient_magnitude(alpha: np.ndarray, sigma: float = 1.4) -> np.ndarray:
    """Gradient magnitude with the derivative-of-Gaussian filters of the alphamatting.com evaluation
    (``gaussgradient.m``): kernel half-size from a 1e-2 cut-off, each kernel L2-normalised."""
    epsilon = 1e-2
    half = int(np.ceil(sigma * np.sqrt(-2 * np.log(np.sqrt(2 * np.pi) * sigma * epsilon))))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-offsets**2 / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi))
    dgauss = -offsets * gauss / sigma**2
    kernel_x = np.outer(gauss, dgauss)  # rows: y (smooth), columns: x (derivative)
    kernel_x /= np.sqrt((kernel_x**2).sum())
    grad_x = cv2.filter2D(alpha, cv2.CV_64F, kernel_x, borderType=cv2.BORDER_REPLICATE)
    grad_y = cv2.filter2D(alpha, cv2.CV_64F, kernel_x.T, borderType=cv2.BORDER_REPLICATE)
    return np.hypot(grad_x, grad_y)


def errors(predicted: np.ndarray, truth: np.ndarray, trimap: np.ndarray) -> dict[str, float]:
    unknown = trimap == 128
    diff = predicted.astype(np.float64) - truth
    grad = (gaussian_gradient_magnitude(predicted.astype(np.float64)) - gaussian_gradient_magnitude(truth)) ** 2
    return {"SAD": float(np.abs(diff)[unknown].sum() / 1000.0), "MSE": float((diff**2)[unknown].mean()),
            "Grad": float(grad[unknown].sum() / 1000.0)}


def evaluate(data: Path, backends: list[str], model: str | None = None) -> list[dict[str, object]]:
    rows = []
    names = sorted(p.name[: -len("_alpha.png")] for p in data.glob("*_alpha.png"))
    for name in names:
        if not (data / f"{name}.png").exists() or not (data / f"{name}_trimap.png").exists():
            continue
        image, trimap, truth = load_case(data, name)
        for backend in backends:
            for label, settings in SETTINGS:
                sample = LayeredSample(key=name, work={"image": image, "trimap": trimap})
                extra = {"model": model} if model and backend == "vitmatte" else {}
                stage = MattingStage(backend=backend, **settings, **extra)
                row: dict[str, object] = {"image": f"{name} ({image.shape[1]}x{image.shape[0]})",
                                          "backend": backend, "setting": label}
                try:
                    stage.ensure_setup()  # model backends load weights here
                except ModelNotAvailable as missing:
                    row["error"] = f"weights not available here ({missing.model_id}): {missing.reason.split('(')[0]}"
                    row["time_s"] = 0.0
                    rows.append(row)
                    print(f"{name:>8} {backend:>12} {label:<24} skipped: weights missing", file=sys.stderr)
                    continue
                start = time.perf_counter()
                [out] = run_stage(stage, [sample])
                row["time_s"] = time.perf_counter() - start
                seconds = row["time_s"]
                if out.ok:
                    row.update(errors(out.work["alpha"], truth, trimap))
                    row["scale"] = out.meta["stages"]["matting"].get("solve_scale", 1.0)
                else:
                    row["error"] = f"{out.failure.error_type}: {out.failure.message}"
                rows.append(row)
                print(f"{name:>8} {backend:>12} {label:<24} {seconds:6.2f}s", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| image | backend | setting | solve scale | SAD | MSE | Grad | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['image']} | {row['backend']} | {row['setting']} | failed: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['image']} | {row['backend']} | {row['setting']} | {row['scale']:.3f} | "
                     f"{row['SAD']:.3f} | {row['MSE']:.5f} | {row['Grad']:.3f} | {row['time_s']:.2f} |")
    lines.append("")
    lines.append("SAD and Grad are divided by 1000; all errors over the trimap's unknown region, alpha in [0, 1].")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"folder of test photos (default {DEFAULT_DATA})")
    parser.add_argument("--backends", nargs="+", default=sorted(BACKENDS), choices=sorted(BACKENDS))
    parser.add_argument("--model", help="ViTMatte weights: hub id or local folder (default: the stage's)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    if not args.data.is_dir() or not any(args.data.glob("*_alpha.png")):
        print(f"eval_matting: no matting data in {args.data} (expected NAME.png, NAME_alpha.png, "
              f"NAME_trimap.png); nothing to evaluate, skipping.", file=sys.stderr)
        return 0
    table = markdown(evaluate(args.data, args.backends, args.model))
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
