"""MANIQA: a no-reference image-quality score (Yang et al. 2022, "MANIQA: Multi-dimension Attention Network
for No-Reference Image Quality Assessment", CVPR workshops; winner of the NTIRE 2022 NR-IQA challenge).

MANIQA reads a 224x224 crop with a ViT-B/8 (timm ``vit_base_patch8_224``) and concatenates the patch tokens
of blocks 6, 7, 8 and 9 (0-based), a 28x28 grid of 4x768 channels. Two stages then follow, each a pair of
transposed attention blocks (attention between channels, each channel's 784 positions being its vector),
a 1x1 convolution that reduces the channels (3072 -> 768, then 768 -> 384) and a stack of Swin Transformer
layers (window 4, shifted every other block, each layer closed by a 3x3 convolution and added back to its
input with weight ``scale``). The score is dual-branch: for every patch one head predicts a score (ReLU)
and another a weight (sigmoid); the image score is the weight-averaged patch score. With the KonIQ-10k
weights (the default) scores lie roughly in 0-1; higher is better.

Weights. The architecture here is written from the paper, with module and parameter names chosen so that
the checkpoints pyiqa / IQA-PyTorch loads (``ckpt_koniq10k.pt``, ``ckpt_kadid10k.pt`` from the MANIQA
authors, ``MANIQA_PIPAL-ae6d356b.pth``; Hub repository ``chaofengc/IQA-PyTorch-Weights``) load by state_dict
key; they include the ViT weights, so the backbone is built with ``pretrained=False`` and nothing else is
downloaded. Those files are third-party releases: checking that their licence terms fit your use is up to
you. The residual weight ``scale`` is not stored in a checkpoint: 0.8 for the KonIQ and KADID weights,
0.13 for PIPAL (``config={**KONIQ_CONFIG, "scale": 0.13}``), as pyiqa configures them.

Preprocessing and crops follow pyiqa's evaluation path so scores are comparable with its ``maniqa``
metric: pixels normalised with mean 0.5 / std 0.5; an image whose shorter side is at most 224 is first
upscaled (bilinear) by (224 + 1) / shorter side; then ``num_crops`` = 20 crops of 224x224 on a fixed grid
(offsets ``i * step_h, j * step_w`` with ``step = (size - 224) // floor(sqrt(20))``, rows i and columns j in
0..4, row-major, the first 20). The crops are deterministic, so a score does not change from run to run;
older pyiqa releases and the training code drew random crops instead, and the MANIQA authors' own inference
script averages five fixed crops (corners and centre). As in pyiqa, the weighted average runs over the
patches of all crops of an image together rather than averaging per-crop scores.

The ViT runs only up to block 9 (the last one whose output is used); blocks 10-11, its final norm and its
classifier head are kept only so that checkpoints load strictly. timm is imported directly.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from layerloop.models.iqa import Mlp, QualityScorer
from layerloop.models.wrappers import rgb_image

__all__ = ["ManiqaScorer", "ManiqaNet", "KONIQ_CONFIG", "TINY_CONFIG", "DEFAULT_ID", "DEFAULT_FILENAME",
           "crop_offsets"]

DEFAULT_ID = "chaofengc/IQA-PyTorch-Weights"
DEFAULT_FILENAME = "ckpt_koniq10k.pt"
CONFIG_NAME = "maniqa_config.json"

# The published KonIQ-10k model. "vit" holds timm.create_model's arguments; "embed_dim" must equal the
# ViT width.
KONIQ_CONFIG: dict[str, Any] = {
    "vit": {"model_name": "vit_base_patch8_224"},
    "feature_blocks": [6, 7, 8, 9],
    "embed_dim": 768,
    "crop_size": 224,
    "num_tab": 2,
    "depths": [2, 2],
    "num_heads": [4, 4],
    "window_size": 4,
    "dim_mlp": 768,
    "scale": 0.8,
    "num_crops": 20,
}

# Same code at toy size: a 10-block ViT of width 32 on 64x64 crops (an 8x8 token grid, so the shifted Swin
# windows and their mask are exercised), 4 crops.
TINY_CONFIG: dict[str, Any] = {
    "vit": {"model_name": "vit_base_patch8_224", "img_size": 64, "embed_dim": 32, "depth": 10, "num_heads": 2,
            "mlp_ratio": 2.0, "num_classes": 10},
    "feature_blocks": [6, 7, 8, 9],
    "embed_dim": 32,
    "crop_size": 64,
    "num_tab": 2,
    "depths": [2, 2],
    "num_heads": [2, 2],
    "window_size": 4,
    "dim_mlp": 32,
    "scale": 0.8,
    "num_crops": 4,
}

_MEAN = 0.5  # MANIQA normalises with the "inception" constants: mean 0.5, std 0.5 on every channel
_STD = 0.5


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------

class TransposedAttention(nn.Module):
    """Transposed attention block (TAB): attention across channels, with each channel's whole spatial map
    (``dim`` = number of positions) as its query / key / value vector, plus a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.c_q = nn.Linear(dim, dim)
        self.c_k = nn.Linear(dim, dim)
        self.c_v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, N) -> (B, C, N)."""
        batch, channels, positions = x.shape
        weights = (self.c_q(x) @ self.c_k(x).transpose(1, 2) * positions ** -0.5).softmax(dim=-1)
        mixed = weights @ self.c_v(x)
        # The published weights were trained with this exact reordering: the (B, C, N) result is read as
        # (B, N, C) memory and reshaped back to (B, C, N), not transposed back.
        return mixed.transpose(1, 2).reshape(batch, channels, positions) + x


def _windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/size * W/size, size * size, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c)


def _unwindow(windows: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative-position bias (Swin)."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, window^2)
        offset = coords[:, :, None] - coords[:, None, :] + (window - 1)  # both in 0..2*window-2
        self.register_buffer("relative_position_index", offset[0] * (2 * window - 1) + offset[1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (windows * B, N, C); mask: (windows, N, N) additive, or None."""
        count, n, dim = x.shape
        q, k, v = self.qkv(x).view(count, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q * (dim // self.num_heads) ** -0.5) @ k.transpose(-1, -2)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()].view(n, n, -1)
        logits = logits + bias.permute(2, 0, 1)
        if mask is not None:
            logits = (logits.view(-1, mask.shape[0], self.num_heads, n, n) + mask[None, :, None]).view(
                count, self.num_heads, n, n)
        return self.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(count, n, dim))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int, dim_mlp: int):
        super().__init__()
        if resolution <= window:  # one window covers the grid: no partition, nothing to shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim_mlp)
        self.register_buffer("attn_mask", self._shift_mask() if shift else None)

    def _shift_mask(self) -> torch.Tensor:
        """After the cyclic shift a window can hold pixels from up to four image regions that were not
        neighbours; pairs from different regions get -100 so that they do not attend to each other."""
        region = torch.zeros(1, self.resolution, self.resolution, 1)
        bands = [(0, self.resolution - self.window), (self.resolution - self.window, self.resolution - self.shift),
                 (self.resolution - self.shift, self.resolution)]
        for i, (top, bottom) in enumerate(bands):
            for j, (left, right) in enumerate(bands):
                region[:, top:bottom, left:right] = 3 * i + j
        labels = _windows(region, self.window)[..., 0]  # (windows, window^2)
        different = labels[:, None, :] != labels[:, :, None]
        return torch.zeros(different.shape).masked_fill(different, -100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C)."""
        b, _, c = x.shape
        y = self.norm1(x).view(b, self.resolution, self.resolution, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = _unwindow(self.attn(_windows(y, self.window), self.attn_mask), self.window, self.resolution,
                      self.resolution)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, -1, c)
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """Swin blocks (regular, shifted, ...) followed by a 3x3 convolution + ReLU on the token grid."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window: int, dim_mlp: int):
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            [SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, dim_mlp)
             for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        b, _, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution)
        return F.relu(self.conv(grid)).flatten(2).transpose(1, 2)


class SwinStage(nn.Module):
    """The Swin part of one MANIQA stage: ``x = scale * layer(x) + x`` for each layer, on (B, C, H, W)."""

    def __init__(self, dim: int, resolution: int, depths: Sequence[int], num_heads: Sequence[int], window: int,
                 dim_mlp: int, scale: float):
        super().__init__()
        self.scale = scale
        # Present in the published checkpoints but never applied in the forward pass; kept for strict loading.
        self.downsample = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList([SwinLayer(dim, resolution, depth, heads, window, dim_mlp)
                                     for depth, heads in zip(depths, num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, h, w)


def _head(dim: int, final: nn.Module) -> nn.Sequential:
    # Linear, ReLU, Dropout, Linear, final: the Dropout slot keeps the checkpoint's indices (0 and 3).
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(dim, 1), final)


class ManiqaNet(nn.Module):
    """MANIQA on normalised crops; ``forward`` returns each crop's per-patch scores and weights."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = json.loads(json.dumps(config))  # a deep copy
        vit_args = dict(config["vit"])
        self.vit = timm.create_model(vit_args.pop("model_name"), pretrained=False, **vit_args)
        patch = self.vit.patch_embed.patch_size[0]
        self.grid = config["crop_size"] // patch
        dim, positions = config["embed_dim"], self.grid ** 2
        swin = dict(resolution=self.grid, depths=config["depths"], num_heads=config["num_heads"],
                    window=config["window_size"], dim_mlp=config["dim_mlp"], scale=config["scale"])
        blocks = len(config["feature_blocks"])
        self.tablock1 = nn.ModuleList([TransposedAttention(positions) for _ in range(config["num_tab"])])
        self.conv1 = nn.Conv2d(blocks * dim, dim, 1)
        self.swintransformer1 = SwinStage(dim, **swin)
        self.tablock2 = nn.ModuleList([TransposedAttention(positions) for _ in range(config["num_tab"])])
        self.conv2 = nn.Conv2d(dim, dim // 2, 1)
        self.swintransformer2 = SwinStage(dim // 2, **swin)
        self.fc_score = _head(dim // 2, nn.ReLU())
        self.fc_weight = _head(dim // 2, nn.Sigmoid())

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised crops -> (B, len(feature_blocks) * C, grid * grid) ViT patch tokens."""
        tokens = self.vit.forward_intermediates(crops, indices=list(self.config["feature_blocks"]), stop_early=True,
                                                output_fmt="NLC", intermediates_only=True)
        return torch.cat(tokens, dim=2).transpose(1, 2)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised crops -> per-patch (scores, weights), each (B, grid * grid)."""
        b, g = crops.shape[0], self.grid
        x = self.features(crops)
        for tab in self.tablock1:
            x = tab(x)
        x = self.swintransformer1(self.conv1(x.view(b, -1, g, g)))
        x = x.flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.swintransformer2(self.conv2(x.view(b, -1, g, g)))
        x = x.flatten(2).transpose(1, 2)
        return self.fc_score(x)[..., 0], self.fc_weight(x)[..., 0]


# ----------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------

def crop_offsets(height: int, width: int, size: int, count: int) -> list[tuple[int, int]]:
    """Top-left corners of the ``count`` evaluation crops: a grid with steps (side - size) // floor(sqrt(n)),
    ceil(sqrt(n)) rows and columns, taken row-major (pyiqa's deterministic crop set)."""
    step_h = (height - size) // int(math.sqrt(count))
    step_w = (width - size) // int(math.sqrt(count))
    side = math.ceil(math.sqrt(count))
    return [(i * step_h, j * step_w) for i in range(side) for j in range(side)][:count]


def image_crops(image: np.ndarray, size: int, count: int) -> torch.Tensor:
    """(count, 3, size, size) normalised crops of an HxWx3 uint8 image."""
    x = (torch.from_numpy(rgb_image(image)).permute(2, 0, 1)[None].float() / 255.0 - _MEAN) / _STD
    if min(x.shape[-2:]) <= size:
        x = F.interpolate(x, scale_factor=(size + 1) / min(x.shape[-2:]), mode="bilinear")
    h, w = x.shape[-2:]
    return torch.cat([x[..., top:top + size, left:left + size] for top, left in crop_offsets(h, w, size, count)])




# ----------------------------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------------------------

class ManiqaScorer(QualityScorer, name="maniqa", net=ManiqaNet, filename=DEFAULT_FILENAME, config=KONIQ_CONFIG,
                   tiny=TINY_CONFIG):
    """MANIQA (Yang et al. 2022): ViT-B/8 features of blocks 6-9, transposed-attention and Swin blocks, a
    patch-weighted score averaged over a fixed grid of crops; the KonIQ-10k model scores about 0-1."""

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], batch_size: int = 2) -> np.ndarray:
        """MANIQA score of each HxWx3 uint8 image (any size), float32. ``batch_size`` counts images; each
        contributes ``num_crops`` crops to a forward pass."""
        size, count = self.config["crop_size"], self.config["num_crops"]
        scores = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            crops = torch.cat([image_crops(image, size, count) for image in chunk]).to(self.device, self.dtype)
            patch_scores, patch_weights = (t.float().view(len(chunk), -1) for t in self.net(crops))
            scores.append(((patch_weights * patch_scores).sum(-1) / (patch_weights.sum(-1) + 1e-8)).cpu())
        return torch.cat(scores).numpy().astype(np.float32) if scores else np.zeros(0, np.float32)


