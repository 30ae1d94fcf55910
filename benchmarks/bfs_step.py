"""BFS training step at the real model size (FLUX.1-Fill-dev shapes, random weights): time and peak memory.

    python benchmarks/bfs_step.py [--resolution 512] [--batch 1] [--steps 5] [--checkpointing]

Builds the Flux-Fill transformer (19 double + 38 single blocks, 3072 wide, bf16, frozen) with the BFS
information-sharing processors (LoRA rank 16 + g, fp32) directly on the GPU, then times full training
steps: both branches forward, the stage-1 loss (FM(C) + FM(F) + 0.1 L_comp through a frozen Phi),
backward into LoRA + g, AdamW. Inputs are random latents of the training resolution and random text
embeddings of T5's 512 tokens; VAE and text encoding are left out (they run without gradients and cost a
small fraction of a step). Needs CUDA: without it the script says so and exits with status 2.

Reports step time, samples/s, peak memory, and the fraction of the GPU's dense bf16 peak: FLOPs of one
full step (forward, backward, optimiser) counted with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls and attention; elementwise work is not counted, so the fraction is a lower bound), peak from
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
    from diffusers import FluxTransformer2DModel

    from layerloop.models import bfs

    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    # Build in bf16 directly on the GPU: an fp32 init of 12 B parameters would need 48 GB first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if args.smoke else torch.bfloat16)
    shape = (dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)) if args.smoke else
             dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)))
    with device:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, guidance_embeds=True,
                                             **shape)
    torch.set_default_dtype(previous)
    text_dim, pooled_dim = shape["joint_attention_dim"], shape["pooled_projection_dim"]
    generator = bfs.BFSGenerator(transformer, bfs.BFSConfig(rank=args.rank, alpha=float(args.rank)))
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    phi = bfs.LatentCompositor(16).to(device).requires_grad_(False)
    params = generator.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    frozen = sum(p.numel() for p in transformer.parameters()) - sum(p.numel() for p in params)

    b, h = args.batch, args.resolution // 8
    z0_c, z0_f, z_b = (torch.randn(b, 16, h, h, device=device) for _ in range(3))
    mask = torch.zeros(b, 1, args.resolution, args.resolution, device=device)
    mask[..., args.resolution // 4: 3 * args.resolution // 4, args.resolution // 4: 3 * args.resolution // 4] = 1
    text = torch.randn(b, args.text_tokens, text_dim, device=device)
    pooled = torch.randn(b, pooled_dim, device=device)
    cond = bfs.fill_condition(z_b, mask)
    img_ids, txt_ids = bfs.latent_image_ids(h, h, device=device), bfs.text_ids(args.text_tokens, device=device)

    def step() -> float:
        t = torch.rand(b, device=device)
        z1_c, z1_f = torch.randn_like(z0_c), torch.randn_like(z0_f)
        v_c, v_f = generator(bfs.pack_latents(bfs.noisy_latents(z0_c, z1_c, t)),
                             bfs.pack_latents(bfs.noisy_latents(z0_f, z1_f, t)), cond, t, text, pooled, 30.0,
                             img_ids, txt_ids)
        loss = bfs.stage1_loss(phi, v_c=bfs.unpack_latents(v_c.float(), h, h), v_f=bfs.unpack_latents(v_f.float(), h, h),
                               z0_c=z0_c, z0_f=z0_f, z1_c=z1_c, z1_f=z1_f, z_b=z_b, t=t)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    for _ in range(2):
        step()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # one more (untimed) step, counted
        step()
    flops = counter.get_total_flops()
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_models import peak_tflops

    median = sorted(times)[len(times) // 2]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    peak = peak_tflops(device_name, args.peak_tflops)
    achieved = flops / median / 1e12
    result = {
        "device": device_name,
        "resolution": args.resolution, "batch": args.batch, "text_tokens": args.text_tokens,
        "gradient_checkpointing": args.checkpointing, "lora_rank": args.rank,
        "frozen_params_M": round(frozen / 1e6, 1), "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 1),
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
