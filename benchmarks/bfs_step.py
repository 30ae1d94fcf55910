"""BFS training step at the real model size (FLUX.1-Fill-dev shapes, random weights): time and peak memory.

    python benchmarks/bfs_step.py [--resolution 512] [--batch 1] [--steps 5] [--checkpointing]

Builds the Flux-Fill transformer (19 double + 38 single blocks, 3072 wide, bf16, frozen) with the BFS
information-sharing processors (LoRA rank 16 + g, fp32) directly on the GPU, then times full training
steps: both branches forward, the stage-1 loss (FM(C) + FM(F) + 0.1 L_comp through a frozen Phi),
backward into LoRA + g, AdamW. Inputs are random latents of the training resolution and random text
embeddings of T5's 512 tokens; VAE and text encoding are left out (they run without gradients and cost a
small fraction of a step). Needs CUDA: without it the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the backbone")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bfs_step.py measures the real-size BFS step on a GPU; CUDA is not available here.", file=sys.stderr)
        return 2
    from diffusers import FluxTransformer2DModel

    from layerloop.models import bfs

    device = torch.device("cuda")
    torch.manual_seed(0)
    # Build in bf16 directly on the GPU: an fp32 init of 12 B parameters would need 48 GB first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with device:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    torch.set_default_dtype(previous)
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
    text = torch.randn(b, args.text_tokens, 4096, device=device)
    pooled = torch.randn(b, 768, device=device)
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
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "device": torch.cuda.get_device_name(),
        "resolution": args.resolution, "batch": args.batch, "text_tokens": args.text_tokens,
        "gradient_checkpointing": args.checkpointing, "lora_rank": args.rank,
        "frozen_params_M": round(frozen / 1e6, 1), "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 1),
        "step_s_median": round(sorted(times)[len(times) // 2], 3), "step_s_all": [round(x, 3) for x in times],
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
