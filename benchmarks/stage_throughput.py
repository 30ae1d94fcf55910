"""Per-stage throughput of the CPU stages (samples/s/core) on demo scenes.

Each stage runs on inputs pre-computed by the stages before it, so a row times that stage alone. Every
library is pinned to one thread (``--threads``, default 1) so that "per core" means one core: OpenCV,
numba and BLAS would otherwise fan out over every core and a row would mix stage speed with core count.
One sample per stage is processed first and not timed (numba JIT compilation, lazy imports, caches).

    python benchmarks/stage_throughput.py --sizes 256 512 --n 16

Prints a markdown table; appends nothing anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys


def pin_threads(threads: int) -> None:
    """Must run before numpy, OpenCV or numba are imported: they read these at import time."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                 "OPENCV_FOR_THREADS_NUM"):
        os.environ[name] = str(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="scene size and load.short_side, px")
    parser.add_argument("--n", type=int, default=16, help="timed samples per size")
    parser.add_argument("--threads", type=int, default=1, help="threads per library (1: per-core numbers)")
    parser.add_argument("--config", default="demo", help="pipeline config whose stages are timed")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    pin_threads(args.threads)

    import copy
    import tempfile
    import time
    from pathlib import Path

    import cv2

    from layerloop.config import load_config
    from layerloop.pipelines.pipeline import Pipeline
    from layerloop.stages.base import run_stage

    cv2.setNumThreads(args.threads)
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="layerloop-stages-"))
    rows = []
    for size in args.sizes:
        config = load_config(args.config, [f"source.n={args.n + 1}", f"source.size={size}",
                                           f"stages.load.short_side={size}", "executor=local"])
        config.source["path"] = str(scratch / f"scenes-{size}")
        (scratch / f"run-{size}").mkdir(parents=True, exist_ok=True)
        pipeline = Pipeline.from_config(config, scratch / f"run-{size}")
        items = [item for task in pipeline.plan().tasks for item in task.items]
        warm, samples = pipeline.read(items[:1]), pipeline.read(items[1:])
        stages = pipeline.build_stages()
        # the same stages once more, for an extra row: OpenCV inpainting instead of the clean plate
        variants = {"background": {"backend": "opencv"}}
        for stage in stages:
            warm = run_stage(stage, warm)  # untimed: JIT, imports, first-call caches
            variant = None
            if stage.name in variants:
                spec = next(s for s in pipeline.stage_specs if s["stage"] == stage.name)
                variant_stage = Pipeline(pipeline.source, [{**spec, **variants[stage.name]}], pipeline.writer,
                                         seed=pipeline.seed).build_stages()[0]
                variant = (variant_stage, copy.deepcopy(samples), copy.deepcopy(warm))
            live = sum(s.ok for s in samples)
            wall, cpu = time.perf_counter(), time.process_time()
            samples = run_stage(stage, samples)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append((size, stage.name, live, wall, cpu, True))
            if variant is not None:
                variant_stage, inputs, warm_inputs = variant
                run_stage(variant_stage, warm_inputs)
                wall, cpu = time.perf_counter(), time.process_time()
                run_stage(variant_stage, inputs)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rows.append((size, f"{stage.name} ({', '.join(f'{k}={v}' for k, v in variants[stage.name].items())})",
                             sum(s.ok for s in inputs), wall, cpu, False))  # not part of the chain
        pipeline.write(0, warm)  # untimed, like the stages' first sample
        live = sum(s.ok for s in samples)
        wall, cpu = time.perf_counter(), time.process_time()
        pipeline.write(1, samples)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append((size, "write (PNG encode + tar + parquet)", live, wall, cpu, True))
        failed = [s for s in samples if not s.ok]
        if failed:
            print(f"note: {len(failed)} of {len(samples)} samples at {size} px failed "
                  f"({failed[0].failure.stage}: {failed[0].failure.message})", file=sys.stderr)

    print(f"threads per library: {args.threads}; {args.n} timed samples per size\n")
    print("| size px | stage | samples | wall s | CPU s | samples/s/core | ms/sample |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size, name, count, wall, cpu, _ in rows:
        rate = count / wall if wall > 0 else float("inf")
        print(f"| {size} | {name} | {count} | {wall:.2f} | {cpu:.2f} | {rate:.1f} | {1000 * wall / max(count, 1):.1f} |")
    for size in args.sizes:
        chain = [r for r in rows if r[0] == size and r[5]]
        total = sum(r[3] for r in chain)
        count = chain[0][2] if chain else 0
        print(f"| {size} | **all stages + write** | {count} | {total:.2f} | {sum(r[4] for r in chain):.2f} | "
              f"{count / total:.2f} | {1000 * total / max(count, 1):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
