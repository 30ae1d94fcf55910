"""BFS training step at the real model size (FLUX.1-Fill-dev shapes, random weights): time and peak memory.

    python benchmarks/bfs_step.py [--resolution 512] [--batch 1] [--steps 5] [--checkpointing]

Builds the Flux-Fill transformer (19 double + 38 single blocks, 3072 wide, bf16, frozen) with the BFS
information-sharing processors (LoRA rank 16 + g, fp32) directly on the GPU (``gpu_workloads.bfs_train_step``,
also the BFS row of ``gpu_models.py``), then times full training
steps: both branches forward, the stage-1 loss (FM(C) + FM(F) + 0.1 L_comp through a frozen Phi),
backward into LoRA + g, AdamW. Inputs are random latents of the training resolution and random text
embeddings of T5's 512 tokens; VAE and text encoding are left out (they run without gradients and cost a
small fraction of a step). Needs CUDA: without it the script says so and exits with status 2.

Reports step time, samples/s, peak memory, and the fraction of the GPU's dense bf16 peak: FLOPs of one
full step (forward, backward, optimiser, a checkpoint's recompute) counted by ``gpu_models.count_flops``
(``torch.utils.flop_counter``'s formulas for matmuls and attention; elementwise work is not counted, so the
fraction is a lower bound), peak from
``gpu_models.PEAK_BF16_TFLOPS`` or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the backbone")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not known")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny transformer on the CPU through the same code (checks the script, not the GPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolution, args.text_tokens, args.steps = 32, 8, 1

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bfs_step.py measures the real-size BFS step on a GPU; CUDA is not available here "
              "(--smoke runs a tiny version on the CPU).", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_workloads import bfs_train_step

    device = torch.device("cpu" if args.smoke else "cuda")
    step, facts = bfs_train_step(device.type, args.smoke, resolution=args.resolution, batch=args.batch,
                                 text_tokens=args.text_tokens, rank=args.rank, checkpointing=args.checkpointing)

    for _ in range(2):
        step()
    from gpu_models import count_flops

    flops = count_flops(step)  # one more (untimed) step, counted
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    from gpu_models import peak_tflops

    median = sorted(times)[len(times) // 2]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    peak = peak_tflops(device_name, args.peak_tflops)
    achieved = flops / median / 1e12
    result = {
        "device": device_name,
        "resolution": args.resolution, "batch": args.batch, "text_tokens": args.text_tokens,
        "gradient_checkpointing": args.checkpointing, "lora_rank": args.rank,
        **facts,
        "step_s_median": round(median, 3), "step_s_all": [round(x, 3) for x in times],
        "samples_per_s": round(args.batch / median, 3), "tflop_per_step": round(flops / 1e12, 2),
        "achieved_tflops": round(achieved, 1), "peak_bf16_tflops": peak,
        "fraction_of_bf16_peak": round(achieved / peak, 3) if peak else None,
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
