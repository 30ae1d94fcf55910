"""The trimap's unknown band against matting time and alpha error, on demo scenes with their true alpha
(issue #16 goal 1: "spend matting only where the trimap is unknown").

The demo renderer knows each pixel's object coverage (``demo_scenes.render_scene``: supersampled, so soft
only on the objects' antialiased edges) and writes the mask where coverage is at least one half. For each
band (a fraction of the shorter side, as the demo config's ``trimap.band``), this runs the ``trimap`` and
``matting`` stages exactly as a build does (closed-form, the demo's preconditioner, one thread) and reports
per sample: matting CPU time, unknown pixels, and the alpha's error against the true coverage (MSE x 1e3 and
SAD / 1000 over the image, as matting papers report them, and the share of pixels more than 8/255 off).

    OMP_NUM_THREADS=1 python benchmarks/matting_band.py --n 16 --size 512 --bands 0.02 0.01 0.005
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bands", type=float, nargs="+", default=[0.02, 0.015, 0.01, 0.005])
    parser.add_argument("--preconditioner", default="ichol-rcm")
    parser.add_argument("--repeats", type=int, default=2, help="best-of passes for the time")
    args = parser.parse_args(argv)

    import numpy as np

    from layerloop.datasets.demo_scenes import render_scene
    from layerloop.samples import LayeredSample
    from layerloop.stages import run_stage
    from layerloop.stages.matting import MattingStage
    from layerloop.stages.trimap import TrimapStage

    scenes = [render_scene(args.seed, i, args.size) for i in range(args.n)]
    matting = MattingStage(backend="closed-form", preconditioner=args.preconditioner)
    def with_trimap(index: int, trimap: TrimapStage) -> LayeredSample:
        scene = scenes[index]
        sample = LayeredSample(key=f"scene_{index:06d}", object_mask=scene["mask"], work={"image": scene["source"]})
        [sample] = run_stage(trimap, [sample])
        return sample

    run_stage(matting, [with_trimap(0, TrimapStage(band=args.bands[0]))])  # warm-up (numba's cached functions)
    print(f"{args.n} demo scenes at {args.size} px, closed-form ({args.preconditioner}), one thread\n")
    print("| trimap.band | band px | unknown px / sample | matting CPU ms / sample | alpha MSE x1e3 | SAD / 1000 "
          "| pixels > 8/255 off |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for band in args.bands:
        trimap = TrimapStage(band=band)
        samples = [with_trimap(i, trimap) for i in range(len(scenes))]
        times = []
        for _ in range(args.repeats):
            copies = [with_trimap(i, trimap) for i in range(len(scenes))]
            started = time.process_time()
            out = run_stage(matting, copies)
            times.append((time.process_time() - started) / len(copies))
        failed = [s.key for s in out if not s.ok]
        if failed:
            raise SystemExit(f"matting failed for {failed}")
        mse, sad, off = [], [], []
        for sample, scene in zip(out, scenes):
            error = sample.work["alpha"].astype(np.float64) - scene["coverage"]
            mse.append(float(np.mean(error ** 2)) * 1e3)
            sad.append(float(np.abs(error).sum()) / 1000)
            off.append(float(np.mean(np.abs(error) > 8 / 255)))
        unknown = statistics.mean(int((s.work["trimap"] == 128).sum()) for s in samples)
        band_px = samples[0].meta["stages"]["trimap"]["band_px"]
        print(f"| {band} | {band_px} | {unknown:.0f} | {min(times) * 1000:.1f} | {statistics.mean(mse):.3f} | "
              f"{statistics.mean(sad):.2f} | {100 * statistics.mean(off):.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
