"""GPU throughput of layerloop's models at real sizes with random weights: samples/s and fraction of the
GPU's dense bf16 peak, one row per model (issue #16 goal 5).

Each model is built from its real architecture (random initialisation, so no download) and driven through
its ``layerloop/models`` wrapper or training loss exactly as the stages and trainers call it, at the
``configs/rorem.yaml`` / ``configs/evaluate_bfs_rorem.yaml`` sizes (builders: ``gpu_workloads.py``):

| row | architecture | call, per batch or step |
|---|---|---|
| ViTMatte | ViTMatte-small (ViTDet 384 wide, 12 layers, windowed + residual blocks) | ``VitMatte.predict``, 512 x 512, batch 8 |
| BLIP-2 | ViT-g/14 + Q-Former + OPT-2.7B | ``Blip2Captioner.caption``, 30 new tokens (forced), batch 16 |
| CLIP | open_clip ViT-H-14 | ``ClipScorer.score``, batch 32 |
| HPS v2.1 | open_clip ViT-H-14 (same tower, HPS's scoring rule) | ``HpsScorer.score``, batch 32 |
| object removal | SDXL inpainting (RORem's architecture), 512 px, 50 steps | ``DiffusersInpainter.remove``, batch 4 |
| MUSIQ | the KonIQ model (ResNet stem + 14-layer transformer over 3 scales) | ``MusiqScorer.score``, 512 x 512, batch 8 |
| MANIQA | ViT-B/8 + transposed attention + Swin, 20 crops of 224 | ``ManiqaScorer.score``, 512 x 512, batch 2 |
| DINOv2 | dinov2-base (ViT-B/14, crop 224) | ``DinoEmbedder.embed``, batch 16 |
| Flux-Fill | FLUX.1-Fill-dev transformer (12 B) + VAE + CLIP-L + T5-XXL | ``FluxFillInpainter.fill``, 512 px, 28 steps, batch 1 |
| BFS step | Flux-Fill + BFS information-sharing LoRA (rank 16) + g | one stage-1 training step (``bfs_step.py``'s), 512 px, batch 1 |
| in-context step | Flux-Fill + one LoRA (rank 32) + Flux VAE | one training step (``training_loss``: 2 supervised + 4 cycle passes), 512 px panels, batch 1, gradient checkpointing |

FLOPs per call come from ``torch.utils.flop_counter``'s operator formulas over one call (matmuls, convolutions and
attention, forward and backward as executed, so a checkpointed step counts its recomputed forward; elementwise
work is not counted, so the fraction of peak is a lower bound). The peak is the dense (non-sparse) bf16
tensor-core figure of the detected GPU (H100/H200: 989 TFLOPS), or ``--peak-tflops``. Wrapper time includes
the wrapper's CPU work (preprocessing, PIL resizes, the generate loop), which is what a stage pays. Models
run under bf16 (autocast for ViTMatte, CLIP/HPS and DINOv2, bf16 weights for the rest; the train steps keep
their LoRA in fp32). The train steps leave text encoding out (fixed random T5/CLIP embeddings), as bfs_step
does; the in-context step VAE-encodes its panels, as its task does.

    python benchmarks/gpu_models.py                       # every row, needs CUDA (minutes: construction dominates)
    python benchmarks/gpu_models.py --models vitmatte clip --iters 5
    python benchmarks/gpu_models.py --smoke               # tiny versions of the same code paths on CPU

Without CUDA (and without ``--smoke``) it says so and exits with status 2. Prints a markdown table;
appends nothing anywhere. On CUDA the header also gives the measured rate of an 8192^3 bf16 matrix product (the
ceiling real code meets, under the data-sheet peak). Each row also goes to stderr as soon as it is measured, so
a run cut short keeps what it finished; a model that fails (an API change, out of memory) gets a FAILED row
with its error, the others are still measured (unless the error left the process's CUDA context unusable:
then the rest get "not run" rows), and the exit status is 1. ``bfs_step.py`` times the BFS step alone with its
memory and options.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

# Dense bf16 tensor-core peaks (TFLOPS) from NVIDIA's data sheets; more specific names first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
]
MODELS = ("vitmatte", "blip2", "clip", "hps", "inpaint", "musiq", "maniqa", "dino", "flux-fill", "bfs-step",
          "incontext-step")


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in device_name:
            return tflops
    return None


# --------------------------------------------------------------------------------------- measuring
def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one call, by ``torch.utils.flop_counter``'s per-operator formulas under a plain dispatch mode.
    Not ``FlopCounterMode`` itself: its module tracker hooks every module's outputs, which keeps alive the
    activations a checkpointed step would free (the in-context step ran out of 140 GB under it on an H200)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += formula(*args, **kwargs, out_val=out)
            return out

    with Counter():
        call()
    return Counter.total


def measure(workload, iters: int, synchronize: Callable[[], None]) -> tuple[float, int]:
    """(median seconds per call, FLOPs per call) after one untimed warm-up call."""
    workload.call()
    synchronize()
    flops = count_flops(workload.call)
    times = []
    for _ in range(iters):
        synchronize()
        started = time.perf_counter()
        workload.call()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), flops


def format_row(row: tuple, peak: float | None) -> str:
    name, shape, samples, seconds, flops, total, memory = row
    achieved = flops / seconds / 1e12
    fraction = f"{achieved / peak:.1%}" if peak else "n/a"
    return (f"| {name} | {shape} | {samples / seconds:.2f} | {seconds:.3f} | {flops / samples / 1e9:.1f} | "
            f"{achieved:.1f} | {fraction} | {f'{memory:.1f}' if memory is not None else 'n/a'} | {total:.0f} |")


def matmul_ceiling(torch, synchronize: Callable[[], None], n: int = 8192, repeats: int = 10) -> float:
    """TFLOPS of an n^3 bf16 matrix product on random data (mean of ``repeats`` after three warm-ups): what this
    GPU's tensor cores reach as measured, beside the data-sheet peak the fractions are taken against."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per model (median reported)")
    parser.add_argument("--steps", type=int, default=50, help="object removal denoising steps (RORem: 50)")
    parser.add_argument("--fill-steps", type=int, default=28, help="Flux-Fill denoising steps (the evaluation: 28)")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="in-context step without gradient checkpointing (six passes' activations: >140 GB)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not known")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny configs of the same architectures, on CPU if there is no CUDA: checks the code, "
                             "measures nothing meaningful")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_models.py: no CUDA device here (torch.cuda.is_available() is False). It measures GPU "
              "throughput of the real-size models; run it on a GPU node, or pass --smoke to run tiny versions "
              "of the same code paths on the CPU.", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name() if cuda else "CPU (smoke run)"
    peak = peak_tflops(device_name, args.peak_tflops) if cuda else None
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_workloads as w

    builders = {"vitmatte": w.vitmatte, "blip2": w.blip2, "musiq": w.musiq, "maniqa": w.maniqa, "dino": w.dino,
                "bfs-step": w.bfs_step, "inpaint": lambda d, s: w.inpaint(d, s, args.steps),
                "flux-fill": lambda d, s: w.flux_fill(d, s, args.fill_steps),
                "incontext-step": lambda d, s: w.incontext_step(d, s, checkpointing=not args.no_checkpointing)}
    ceiling = matmul_ceiling(torch, synchronize) if cuda else None
    rows, failures = [], []
    bundle = None
    for name in args.models:
        started = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            if name in ("clip", "hps"):
                bundle = bundle or w._vit_h_bundle(device, args.smoke)  # one ViT-H-14 serves both rows
                workload = (w.clip if name == "clip" else w.hps)(device, args.smoke, bundle)
            else:
                workload = builders[name](device, args.smoke)
            seconds, flops = measure(workload, args.iters, synchronize)
        except Exception as error:  # one model's failure (an API change, out of memory) leaves the others' rows
            failures.append((name, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]))
            print(f"gpu_models.py: {name} failed after {time.perf_counter() - started:.0f} s: {failures[-1][1]}",
                  file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
        else:
            memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            rows.append((workload.name, workload.shape, workload.samples, seconds, flops,
                         time.perf_counter() - started, memory))
            print(f"gpu_models.py: {format_row(rows[-1], peak)}", file=sys.stderr, flush=True)  # survives a timeout
            del workload  # frees the model before the next one is built (the ViT-H bundle stays for HPS)
        gc.collect()  # a diffusers pipeline is freed only by the cycle collector: 18 GiB of SDXL outlived `del`
        if cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as error:  # e.g. an illegal memory access: the process's CUDA context is lost
                rest = args.models[args.models.index(name) + 1:]
                failures.extend((later, f"not run: the CUDA context was lost after {name} "
                                        f"({type(error).__name__})") for later in rest)
                print(f"gpu_models.py: CUDA context lost after {name}; not run: {' '.join(rest) or 'none'}",
                      file=sys.stderr, flush=True)
                break

    matmul = f"; measured bf16 matmul ceiling (8192^3): {ceiling:.0f} TFLOPS" if ceiling else ""
    print(f"device: {device_name}; dense bf16 peak: {f'{peak:.0f} TFLOPS' if peak else 'unknown (--peak-tflops)'}"
          f"{matmul}; median of {args.iters} calls{'; SMOKE RUN: tiny configs, numbers mean nothing' if args.smoke else ''}\n")
    print("| model | workload | samples/s | s per call | GFLOP per sample | TFLOPS achieved | fraction of bf16 peak "
          "| peak GiB | build + measure s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(format_row(row, peak))
    for name, message in failures:
        print(f"| {name} | FAILED: {message.replace('|', '/')} | | | | | | | |")
    if failures:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
