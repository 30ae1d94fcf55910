"""GPU throughput of the model wrappers at real sizes with random weights: samples/s and fraction of the
GPU's dense bf16 peak.

Each model is built from its real architecture (random initialisation, so no download) and driven through
its ``layerloop/models`` wrapper exactly as the stages call it, at the ``configs/rorem.yaml`` sizes:

| model | architecture | call, per batch |
|---|---|---|
| ViTMatte | ViTMatte-small (ViTDet 384 wide, 12 layers, windowed + residual blocks) | ``VitMatte.predict``, 512 x 512, batch 8 |
| BLIP-2 | ViT-g/14 + Q-Former + OPT-2.7B | ``Blip2Captioner.caption``, 30 new tokens (forced), batch 16 |
| CLIP | open_clip ViT-H-14 | ``ClipScorer.score``, batch 32 |
| HPS v2.1 | open_clip ViT-H-14 (same tower, HPS's scoring rule) | ``HpsScorer.score``, batch 32 |
| object removal | SDXL inpainting (RORem's architecture), 512 px, 50 steps | ``DiffusersInpainter.remove``, batch 4 |

FLOPs per batch come from ``torch.utils.flop_counter.FlopCounterMode`` over one call (matmuls and
convolutions; elementwise work is not counted, so the fraction of peak is a lower bound). The peak is the
dense (non-sparse) bf16 tensor-core figure of the detected GPU, or ``--peak-tflops``. Wrapper time
includes the wrapper's CPU work (preprocessing, PIL resizes, the generate loop), which is what a stage
pays. Models run under bf16 (autocast for ViTMatte and CLIP/HPS, bf16 weights for BLIP-2 and SDXL).

    python benchmarks/gpu_models.py                       # every model, needs CUDA
    python benchmarks/gpu_models.py --models vitmatte clip --iters 5
    python benchmarks/gpu_models.py --smoke               # tiny versions of the same code paths on CPU

Without CUDA (and without ``--smoke``) it says so and exits with status 2. Prints a markdown table;
appends nothing anywhere. The Flux LoRA training step has its own script: `benchmarks/bfs_step.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Dense bf16 tensor-core peaks (TFLOPS) from NVIDIA's data sheets; more specific names first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
]
MODELS = ("vitmatte", "blip2", "clip", "hps", "inpaint")


@dataclass
class Workload:
    name: str
    shape: str
    samples: int  # samples per call
    call: Callable[[], object]


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in device_name:
            return tflops
    return None


def random_images(count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def box_masks(count: int, size: int) -> list[np.ndarray]:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    return [mask.copy() for _ in range(count)]


# ------------------------------------------------------------------------------------------ models
def frozen(module):
    """Inference only: no parameter requires a gradient. FlopCounterMode's module tracker otherwise
    hooks every tensor that requires one and trips over BLIP-2's expanded query tokens."""
    return module.requires_grad_(False)


def vitmatte(device: str, smoke: bool) -> Workload:
    import torch
    from transformers import VitDetConfig, VitMatteConfig, VitMatteForImageMatting, VitMatteImageProcessor

    from layerloop.models.vitmatte import VitMatte

    if smoke:
        backbone = VitDetConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                patch_size=16, num_channels=4, window_block_indices=[0, 2],
                                residual_block_indices=[1, 3], use_relative_position_embeddings=True,
                                window_size=2, out_features=["stage4"])
        config = VitMatteConfig(backbone_config=backbone, hidden_size=32, convstream_hidden_sizes=[4, 8, 16],
                                fusion_hidden_sizes=[16, 8, 8, 4])
        size, batch = 64, 2
    else:  # hustvl/vitmatte-small-composition-1k
        backbone = VitDetConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                image_size=512, pretrain_image_size=224, patch_size=16, num_channels=4,
                                window_block_indices=[0, 1, 3, 4, 6, 7, 9, 10], residual_block_indices=[2, 5, 8, 11],
                                use_relative_position_embeddings=True, window_size=14, out_features=["stage12"])
        # lists, not transformers' tuple defaults, which VitMatteDetailCaptureModule cannot concatenate
        config = VitMatteConfig(backbone_config=backbone, hidden_size=384, convstream_hidden_sizes=[48, 96, 192],
                                fusion_hidden_sizes=[256, 128, 64, 32])
        size, batch = 512, 8
    torch.manual_seed(0)
    model = VitMatte(frozen(VitMatteForImageMatting(config)), VitMatteImageProcessor(), device=device,
                     dtype=torch.bfloat16)
    images = random_images(batch, size, 0)
    trimaps = []
    for mask in box_masks(batch, size):
        trimap = mask.astype(np.uint8) * 255
        trimap[size // 4 - 8 : 3 * size // 4 + 8, size // 3 - 8 : size // 3 + 8] = 128  # an unknown band
        trimaps.append(trimap)
    return Workload("ViTMatte", f"{size}x{size}, batch {batch}", batch,
                    lambda: model.predict(images, trimaps, batch_size=batch))


def blip2(device: str, smoke: bool) -> Workload:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from layerloop.models.blip2 import Blip2Captioner, tiny_tokenizer

    tokenizer = tiny_tokenizer()  # random weights need no real vocabulary; ids stay below OPT's vocab size
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if smoke:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       encoder_hidden_size=32, vocab_size=len(tokenizer))
        text = dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=2, word_embed_proj_dim=32, **special)
        image_size, batch, queries, dtype = 32, 2, 4, torch.float32
    else:  # Salesforce/blip2-opt-2.7b
        vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                      image_size=224, patch_size=14)
        qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522)
        text = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                    num_attention_heads=32, word_embed_proj_dim=2560, max_position_embeddings=2048, **special)
        image_size, batch, queries, dtype = 224, 16, 32, torch.bfloat16
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build 3.8B parameters directly in bf16 on the GPU: fp32 on CPU is slow
    try:
        with torch.device(device):
            model = frozen(Blip2ForConditionalGeneration(config))
    finally:
        torch.set_default_dtype(default_dtype)
    tokens = 3 if smoke else 30
    # Random weights would emit EOS at random steps; forcing the length makes every call the same work.
    model.generation_config.min_new_tokens = tokens
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=queries)
    captioner = Blip2Captioner(model, processor, device=device)
    crops = random_images(batch, 512 if not smoke else 64, 1)
    return Workload("BLIP-2 (OPT-2.7B)", f"{tokens} new tokens, batch {batch}", batch,
                    lambda: captioner.caption(crops, max_new_tokens=tokens, batch_size=batch))


def _vit_h_bundle(device: str, smoke: bool):
    import torch

    from layerloop.models.clip_score import TINY_OPEN_CLIP_CONFIG, OpenClipBundle

    config = TINY_OPEN_CLIP_CONFIG if smoke else {  # open_clip's ViT-H-14.json
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    }
    bundle = OpenClipBundle.from_config(config, seed=0, device=device)
    frozen(bundle.model)
    if bundle.autocast_dtype is not None:
        bundle.autocast_dtype = torch.bfloat16
    return bundle


def clip(device: str, smoke: bool, bundle=None) -> Workload:
    from layerloop.models.clip_score import ClipScorer

    scorer = ClipScorer(bundle or _vit_h_bundle(device, smoke))
    batch = 4 if smoke else 32
    images = random_images(batch, 64 if smoke else 512, 2)
    captions = ["a red chair on a wooden floor next to a window"] * batch
    return Workload("CLIP ViT-H-14", f"batch {batch}", batch, lambda: scorer.score(images, captions, batch_size=batch))


def hps(device: str, smoke: bool, bundle=None) -> Workload:
    from layerloop.models.hps import HpsScorer

    scorer = HpsScorer(bundle or _vit_h_bundle(device, smoke))
    batch = 4 if smoke else 32
    images = random_images(batch, 64 if smoke else 512, 3)
    prompts = ["a red chair on a wooden floor next to a window"] * batch
    return Workload("HPS v2.1 (ViT-H-14)", f"batch {batch}", batch,
                    lambda: scorer.score(images, prompts, batch_size=batch))


def inpaint(device: str, smoke: bool, steps: int) -> Workload:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from layerloop.models.inpaint import DiffusersInpainter, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()  # offline; prompt content does not change the work per step
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if smoke:
        text_1 = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, **ids)
        text_2 = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                projection_dim=32, **ids)
        unet = dict(block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                    attention_head_dim=(2, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8)
        vae = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2)
        resolution, batch, steps, dtype = 64, 2, 2, torch.float32
    else:  # SDXL 1.0 inpainting, the architecture RORem fine-tunes
        text_1 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                hidden_act="quick_gelu", **ids)
        text_2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                                projection_dim=1280, hidden_act="gelu", **ids)
        unet = dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)
        vae = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024, scaling_factor=0.13025)
        resolution, batch, dtype = 512, 4, torch.bfloat16
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipeline = StableDiffusionXLInpaintPipeline(
                vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **vae),
                text_encoder=CLIPTextModel(text_1), text_encoder_2=CLIPTextModelWithProjection(text_2),
                tokenizer=tokenizer, tokenizer_2=tokenizer,
                unet=UNet2DConditionModel(in_channels=9, out_channels=4, addition_embed_type="text_time",
                                          use_linear_projection=True, **unet),
                scheduler=DDIMScheduler(steps_offset=1), requires_aesthetics_score=False,
                force_zeros_for_empty_prompt=True, add_watermarker=False,
            )
    finally:
        torch.set_default_dtype(default_dtype)
    for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        frozen(component)
    remover = DiffusersInpainter(pipeline, device=device, resolution=resolution, num_inference_steps=steps)
    size = resolution
    images, masks = random_images(batch, size, 4), box_masks(batch, size)
    return Workload("object removal (SDXL inpaint)", f"{resolution} px, {steps} steps, batch {batch}", batch,
                    lambda: remover.remove(images, masks, seed=0, batch_size=batch))


# --------------------------------------------------------------------------------------- measuring
def count_flops(call: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


def measure(workload: Workload, iters: int, synchronize: Callable[[], None]) -> tuple[float, int]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per model (median reported)")
    parser.add_argument("--steps", type=int, default=50, help="object removal denoising steps (RORem: 50)")
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

    rows = []
    bundle = None
    for name in args.models:
        started = time.perf_counter()
        if name in ("clip", "hps"):
            bundle = bundle or _vit_h_bundle(device, args.smoke)  # one ViT-H-14 serves both rows
            workload = (clip if name == "clip" else hps)(device, args.smoke, bundle)
        elif name == "inpaint":
            workload = inpaint(device, args.smoke, args.steps)
        else:
            workload = {"vitmatte": vitmatte, "blip2": blip2}[name](device, args.smoke)
        seconds, flops = measure(workload, args.iters, synchronize)
        rows.append((workload.name, workload.shape, workload.samples, seconds, flops,
                     time.perf_counter() - started))
        del workload  # frees the model before the next one is built (the ViT-H bundle stays for HPS)
        if cuda:
            torch.cuda.empty_cache()

    print(f"device: {device_name}; dense bf16 peak: {f'{peak:.0f} TFLOPS' if peak else 'unknown (--peak-tflops)'}; "
          f"median of {args.iters} calls{'; SMOKE RUN: tiny configs, numbers mean nothing' if args.smoke else ''}\n")
    print("| model | workload | samples/s | s per call | GFLOP per sample | TFLOPS achieved | fraction of bf16 peak "
          "| build + measure s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, shape, samples, seconds, flops, total in rows:
        achieved = flops / seconds / 1e12
        fraction = f"{achieved / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {shape} | {samples / seconds:.2f} | {seconds:.3f} | {flops / samples / 1e9:.1f} | "
              f"{achieved:.1f} | {fraction} | {total:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
