"""The workloads of ``gpu_models.py``: each model at its real size with random weights (no download), driven
through its ``layerloop/models`` wrapper or its training loss as layerloop calls it, plus a tiny version of
the same code path for ``--smoke``. A builder returns a ``Workload``: one call = one batch (inference) or
one optimiser step (training).

The Flux rows share FLUX.1-Fill-dev's shapes (``FLUX_FILL``: 19 double + 38 single blocks, 3072 wide, Fill
token layout; its VAE ``FLUX_VAE``); parameters are created directly on the device in bf16 (12 B parameters
in fp32 on the CPU first would need 48 GB).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from layerloop.models.attention import training_attention


@dataclass
class Workload:
    name: str
    shape: str
    samples: int  # samples per call
    call: Callable[[], object]


def random_images(count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def box_masks(count: int, size: int) -> list[np.ndarray]:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    return [mask.copy() for _ in range(count)]


# ------------------------------------------------------------------------------------------ models
def frozen(module):
    """Inference only, as the stages run these models: no parameter requires a gradient, so no autograd
    graph is kept (``FlopCounterMode``'s module tracker, used before ``gpu_models.count_flops``, also
    tripped over BLIP-2's expanded query tokens when one did)."""
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


# ------------------------------------------------------------------------------ evaluation models
def musiq(device: str, smoke: bool) -> Workload:
    import torch

    from layerloop.models.musiq import KONIQ_CONFIG, MusiqNet, MusiqScorer

    torch.manual_seed(0)
    if smoke:
        scorer, size, batch = MusiqScorer.tiny(device=device), 64, 2
    else:  # the KonIQ-10k model (musiq_koniq_ckpt), bf16 weights (the stage's dtype: bfloat16)
        scorer, size, batch = MusiqScorer(MusiqNet(KONIQ_CONFIG), device=device, dtype=torch.bfloat16), 512, 8
    frozen(scorer.net)
    images = random_images(batch, size, 5)
    return Workload("MUSIQ (KonIQ)", f"{size}x{size}, batch {batch}", batch, lambda: scorer.score(images, batch_size=batch))


def maniqa(device: str, smoke: bool) -> Workload:
    import torch

    from layerloop.models.maniqa import KONIQ_CONFIG, ManiqaNet, ManiqaScorer

    torch.manual_seed(0)
    if smoke:
        scorer, size, batch = ManiqaScorer.tiny(device=device), 96, 2
    else:  # ViT-B/8 + MANIQA heads, 20 crops of 224 per image, bf16 weights
        scorer, size, batch = ManiqaScorer(ManiqaNet(KONIQ_CONFIG), device=device, dtype=torch.bfloat16), 512, 2
    frozen(scorer.net)
    images = random_images(batch, size, 6)
    crops = scorer.config["num_crops"]
    return Workload("MANIQA (KonIQ)", f"{size}x{size}, batch {batch} ({batch * crops} crops)", batch,
                    lambda: scorer.score(images, batch_size=batch))


def dino(device: str, smoke: bool) -> Workload:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from layerloop.models.dino import IMAGENET_MEAN, IMAGENET_STD, DinoEmbedder

    torch.manual_seed(0)
    if smoke:
        embedder, size, batch = DinoEmbedder.tiny(device=device), 64, 4
    else:  # facebook/dinov2-base: resize 256, centre crop 224, bf16 autocast
        config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                              image_size=518, patch_size=14)
        processor = BitImageProcessor(size={"shortest_edge": 256}, resample=3, crop_size={"height": 224, "width": 224},
                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        embedder, size, batch = DinoEmbedder(Dinov2Model(config), processor, device=device, dtype=torch.bfloat16), 512, 16
    frozen(embedder.model)
    images = random_images(batch, size, 7)
    return Workload("DINOv2-base", f"{size}x{size}, batch {batch}", batch, lambda: embedder.embed(images, batch_size=batch))


# ------------------------------------------------------------------------------------ Flux-Fill rows
FLUX_FILL = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)


@contextmanager
def building(device: str, dtype: Any) -> Iterator[None]:
    """Modules built inside are created on ``device`` in ``dtype``."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def fill_transformer(device: str, smoke: bool):
    """FLUX.1-Fill-dev's transformer (16 latent channels, VAE scale 8: 384 inputs), or its tiny shape."""
    import torch
    from diffusers import FluxTransformer2DModel

    with building(device, torch.float32 if smoke else torch.bfloat16):
        return FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, guidance_embeds=True,
                                      **(TINY_FLUX if smoke else FLUX_FILL))


class RandomText(torch.nn.Module):
    """Fixed random prompt embeddings in the shapes of Fill's T5 (tokens x 4096) and CLIP (pooled 768): the
    train steps leave text encoding out (frozen, no gradients; bfs_step does the same)."""

    def __init__(self, tokens: int, dim: int, pooled_dim: int, device: str, dtype: Any):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("embeds", torch.randn(tokens, dim, generator=generator).to(device, dtype))
        self.register_buffer("pooled", torch.randn(pooled_dim, generator=generator).to(device, dtype))

    def forward(self, prompts):
        from layerloop.models.text_encoders import TextEmbeddings

        b = len(prompts)
        return TextEmbeddings(self.embeds.expand(b, -1, -1), self.pooled.expand(b, -1),
                              torch.zeros(self.embeds.shape[0], 3, device=self.embeds.device))


def bfs_train_step(device: str, smoke: bool, resolution: int = 512, batch: int = 1, text_tokens: int = 512,
                   rank: int = 16, checkpointing: bool = False) -> tuple[Callable[[], float], dict]:
    """One BFS stage-1 training step (both branches forward, FM(C) + FM(F) + 0.1 L_comp through a frozen
    Phi, backward into the processors' LoRA + g, AdamW) on random latents and text embeddings; VAE and text
    encoding left out. Returns (step, facts)."""
    import torch

    from layerloop.models import bfs

    torch.manual_seed(0)
    transformer = fill_transformer(device, smoke)
    shape = TINY_FLUX if smoke else FLUX_FILL
    generator = bfs.BFSGenerator(transformer, bfs.BFSConfig(rank=rank, alpha=float(rank)))
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    phi = bfs.LatentCompositor(16).to(device).requires_grad_(False)
    params = generator.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    b, h = batch, resolution // 8
    z0_c, z0_f, z_b = (torch.randn(b, 16, h, h, device=device) for _ in range(3))
    mask = torch.zeros(b, 1, resolution, resolution, device=device)
    mask[..., resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    text = torch.randn(b, text_tokens, shape["joint_attention_dim"], device=device)
    pooled = torch.randn(b, shape["pooled_projection_dim"], device=device)
    cond = bfs.fill_condition(z_b, mask)
    img_ids, txt_ids = bfs.latent_image_ids(h, h, device=device), bfs.text_ids(text_tokens, device=device)

    def step() -> float:  # under the trainer's attention kernels, as training/loop.py runs a step
        t = torch.rand(b, device=device)
        z1_c, z1_f = torch.randn_like(z0_c), torch.randn_like(z0_f)
        with training_attention():
            v_c, v_f = generator(bfs.pack_latents(bfs.noisy_latents(z0_c, z1_c, t)),
                                 bfs.pack_latents(bfs.noisy_latents(z0_f, z1_f, t)), cond, t, text, pooled, 30.0,
                                 img_ids, txt_ids)
            loss = bfs.stage1_loss(phi, v_c=bfs.unpack_latents(v_c.float(), h, h),
                                   v_f=bfs.unpack_latents(v_f.float(), h, h),
                                   z0_c=z0_c, z0_f=z0_f, z1_c=z1_c, z1_f=z1_f, z_b=z_b, t=t)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    trainable = sum(p.numel() for p in params)
    facts = {"frozen_params_M": round((sum(p.numel() for p in transformer.parameters()) - trainable) / 1e6, 1),
             "trainable_params_M": round(trainable / 1e6, 1)}
    return step, facts


def bfs_step(device: str, smoke: bool) -> Workload:
    resolution, text_tokens = (32, 8) if smoke else (512, 512)
    step, _ = bfs_train_step(device, smoke, resolution=resolution, text_tokens=text_tokens)
    return Workload("BFS train step (Flux-Fill)", f"{resolution} px, batch 1, LoRA 16, stage 1", 1, step)


def incontext_step(device: str, smoke: bool, checkpointing: bool = True) -> Workload:
    """One in-context training step as ``training/incontext_task.py`` takes it: VAE-encode the four panels,
    FM(decompose) + FM(compose) + both cycle terms (six transformer passes, gradients through both cycle
    passes) into the one LoRA (rank 32), clip, AdamW. Text embeddings fixed (``RandomText``)."""
    import torch
    from diffusers import AutoencoderKL

    from layerloop.models.incontext import CanvasBatch, InContextConfig, InContextLoRA

    torch.manual_seed(0)
    if smoke:
        model, size = InContextLoRA.tiny(seed=0, rank=4), 16
        checkpointing = False
    else:
        with building(device, torch.bfloat16):
            vae = AutoencoderKL(in_channels=3, out_channels=3, **FLUX_VAE)
        model = InContextLoRA(fill_transformer(device, smoke).eval(), vae.eval(),
                              RandomText(512, 4096, 768, device, torch.bfloat16),
                              InContextConfig(rank=32, alpha=32.0, base_model="random"))
        size = 512
    if checkpointing:
        model.transformer.enable_gradient_checkpointing()
    params = model.lora_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(8)
    canvas = rng.integers(0, 256, (1, size, 4 * size, 3), dtype=np.uint8)
    region = np.zeros((1, size, size), bool)
    region[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    batch = CanvasBatch.from_canvases(canvas, region, ["a red logo on a white mug"])
    noise = torch.Generator().manual_seed(0)

    def step() -> float:  # under the trainer's attention kernels, as training/loop.py runs a step
        with training_attention():
            loss = model.training_loss(model.encode(batch), noise)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return Workload("in-context train step (Flux-Fill)",
                    f"{size} px panels (canvas {size}x{4 * size}), batch 1, LoRA 32, cycle on"
                    + (", grad. checkpointing" if checkpointing else ""), 1, step)


def flux_fill(device: str, smoke: bool, steps: int = 28) -> Workload:
    """The Flux-Fill inpainting baseline (``FluxFillInpainter.fill``, the ``fill-baseline`` stage): the whole
    pipeline, CLIP-L + T5-XXL text encoding, ``steps`` Euler steps, VAE decode."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from layerloop.models.flux_fill import FluxFillInpainter, tiny_t5_tokenizer
    from layerloop.models.inpaint import tiny_clip_tokenizer

    torch.manual_seed(0)
    if smoke:
        inpainter, size, steps = FluxFillInpainter.tiny(device=device, num_inference_steps=2), 16, 2
    else:  # tokenizers: offline stand-ins (the prompt's content does not change the work); models at real size
        clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        with building(device, torch.bfloat16):
            vae = AutoencoderKL(in_channels=3, out_channels=3, **FLUX_VAE)
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
            t5 = T5EncoderModel(T5Config(  # google/t5-v1_1-xxl's encoder
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dropout_rate=0.0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=t5_tok.pad_token_id))
        pipeline = FluxFillPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096),
            vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok,
            transformer=fill_transformer(device, smoke).eval())
        inpainter, size = FluxFillInpainter(pipeline, device=device, num_inference_steps=steps, model_id="random"), 512
    pipe = inpainter.pipeline
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        frozen(module)
    images, masks = random_images(1, size, 9), box_masks(1, size)
    return Workload("Flux-Fill (inpainting baseline)", f"{size} px, {steps} steps, batch 1", 1,
                    lambda: inpainter.fill(images, masks, ["a red chair"], [0]))
