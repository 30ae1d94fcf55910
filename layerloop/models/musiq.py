"""MUSIQ: a no-reference image-quality score (Ke et al. 2021, "MUSIQ: Multi-scale Image Quality
Transformer", ICCV).

MUSIQ looks at an image at its own resolution plus aspect-preserving resizes (longer side 224 and 384 for
the KonIQ model), cuts every version into 32x32 patches and feeds all of them, as one sequence, to a
Transformer encoder. Each patch becomes a token through a small ResNet stem (weight-standardised 7x7 conv,
GroupNorm, max-pool, one bottleneck block) and a linear projection; a token learns where it is from a
hash-based spatial embedding (a patch's row and column are mapped onto a fixed GxG grid, G=10, so any
image size shares the same table) and which version it came from from a scale embedding. The score is a
linear head on the class token. With the KonIQ-10k weights (the default) it predicts a MOS of roughly
0-100; higher is better.

Weights. The architecture here is written from the paper, with module and parameter names chosen so that
the PyTorch conversions of the official TensorFlow checkpoints published with pyiqa / IQA-PyTorch
(``musiq_koniq_ckpt-e95806b9.pth``, ``musiq_spaq_ckpt-358bb6af.pth``, ...; Hub repository
``chaofengc/IQA-PyTorch-Weights``) load by state_dict key. Those files are third-party releases: checking
that their licence terms fit your use is up to you. The AVA checkpoint (10-bin score histogram) loads with
``config={**KONIQ_CONFIG, "num_classes": 10}``; its score is then the histogram's mean, 1-10.

Preprocessing follows pyiqa's evaluation path, so scores are comparable with its ``musiq`` metric: pixels
in [-1, 1]; resizes with bicubic interpolation (the TensorFlow original uses a Gaussian-kernel resize, so
values differ slightly from Google's); TensorFlow "SAME" zero padding of each version to whole patches;
each resized version padded (masked tokens) or cut to ceil(L/32)^2 patches; all patches of the original
resolution kept. Images in one ``score`` batch are padded to a common sequence length with masked tokens,
which leaves each image's score unchanged (masked keys get exactly zero attention weight).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layerloop.models.iqa import Mlp, QualityScorer
from layerloop.models.wrappers import rgb_image

__all__ = ["MusiqScorer", "MusiqNet", "KONIQ_CONFIG", "TINY_CONFIG", "DEFAULT_ID", "DEFAULT_FILENAME"]

DEFAULT_ID = "chaofengc/IQA-PyTorch-Weights"
DEFAULT_FILENAME = "musiq_koniq_ckpt-e95806b9.pth"
CONFIG_NAME = "musiq_config.json"

# The published KonIQ-10k model. ``max_seq_len_from_original_res``: -1 keeps every patch of the original
# resolution, n >= 0 pads or cuts them to n, None leaves the original resolution out.
KONIQ_CONFIG: dict[str, Any] = {
    "patch_size": 32,
    "stem_width": 64,
    "hidden_size": 384,
    "mlp_dim": 1152,
    "num_heads": 6,
    "num_layers": 14,
    "hash_grid_size": 10,
    "num_classes": 1,
    "longer_side_lengths": [224, 384],
    "max_seq_len_from_original_res": -1,
}

# Same code at toy size: 16-pixel patches, 2 layers of width 32, versions with longer side 32 and 48.
TINY_CONFIG: dict[str, Any] = {
    "patch_size": 16,
    "stem_width": 32,
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_heads": 2,
    "num_layers": 2,
    "hash_grid_size": 4,
    "num_classes": 1,
    "longer_side_lengths": [32, 48],
    "max_seq_len_from_original_res": -1,
}

_MASKED_LOGIT = -1e3  # what a masked attention logit is set to (as in the reference implementation)


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------

def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero padding of TensorFlow's "SAME" mode: output size ceil(n / stride), odd padding goes at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (zero mean, unit std per output filter) and "SAME" padding,
    as in the BiT ResNet stem MUSIQ uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(self.weight, dim=(1, 2, 3), keepdim=True)
        weight = (self.weight - mean) / (std + 1e-5)
        x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, weight, self.bias, self.stride)


class Bottleneck(nn.Module):
    """Pre-activation-free ResNet bottleneck (1x1, 3x3, 1x1) with GroupNorm and a projected shortcut."""

    def __init__(self, channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.conv1 = StdConv2d(channels, channels, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels, eps=1e-4)
        self.conv2 = StdConv2d(channels, channels, 3, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels, eps=1e-4)
        self.conv3 = StdConv2d(channels, out_channels, 1, bias=False)
        self.gn3 = nn.GroupNorm(groups, out_channels, eps=1e-4)
        self.conv_proj = StdConv2d(channels, out_channels, 1, bias=False)
        self.gn_proj = nn.GroupNorm(groups, out_channels, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + shortcut)


class MaskedSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = q @ k.transpose(-1, -2) * (dim // self.num_heads) ** -0.5
        pair = mask[:, None, :, None] & mask[:, None, None, :]
        weights = logits.masked_fill(~pair, _MASKED_LOGIT).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = MaskedSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class HashSpatialEmbedding(nn.Module):
    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.position_emb = nn.Parameter(torch.empty(1, grid_size * grid_size, dim))
        nn.init.normal_(self.position_emb, std=0.02)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x + self.position_emb[0][index]


class ScaleEmbedding(nn.Module):
    def __init__(self, num_scales: int, dim: int):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.empty(num_scales, dim))
        nn.init.normal_(self.scale_emb, std=0.02)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x + self.scale_emb[index]


class Encoder(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, num_heads: int, num_layers: int, num_scales: int, grid_size: int):
        super().__init__()
        self.posembed_input = HashSpatialEmbedding(grid_size, dim)
        self.scaleembed_input = ScaleEmbedding(num_scales, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.transformer = nn.ModuleDict(
            {f"encoderblock_{i}": EncoderBlock(dim, mlp_dim, num_heads) for i in range(num_layers)})
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x = self.scaleembed_input(self.posembed_input(tokens, spatial), scale)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        for block in self.transformer.values():
            x = block(x, mask)
        return self.encoder_norm(x)


def num_scales(config: dict) -> int:
    return len(config["longer_side_lengths"]) + (config["max_seq_len_from_original_res"] is not None)


class MusiqNet(nn.Module):
    """MUSIQ on prepared token sequences (see ``multiscale_tokens``); returns one score per sequence."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        width, hidden = config["stem_width"], config["hidden_size"]
        self.patch_size = config["patch_size"]
        self.conv_root = StdConv2d(3, width, 7, stride=2, bias=False)
        self.gn_root = nn.GroupNorm(32, width, eps=1e-6)
        self.block1 = Bottleneck(width, 4 * width)
        # the stem reduces a patch by 4 (stride-2 conv, stride-2 pool); its cells are flattened channel-last
        self.embedding = nn.Linear(4 * width * (self.patch_size // 4) ** 2, hidden)
        self.transformer_encoder = Encoder(hidden, config["mlp_dim"], config["num_heads"], config["num_layers"],
                                           num_scales(config), config["hash_grid_size"])
        if config["num_classes"] > 1:  # a score histogram (AVA): linear + softmax, kept as "head.0"
            self.head = nn.Sequential(nn.Linear(hidden, config["num_classes"]), nn.Softmax(dim=-1))
        else:
            self.head = nn.Linear(hidden, 1)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(n, 3, P, P) patches in [-1, 1] -> (n, hidden) tokens."""
        x = F.relu(self.gn_root(self.conv_root(patches)))
        x = F.max_pool2d(_pad_same(x, 3, 2), 3, 2)
        x = self.block1(x)
        return self.embedding(x.permute(0, 2, 3, 1).flatten(1))

    def forward(self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """patches (B, L, 3, P, P), spatial / scale (B, L) int64 indices, mask (B, L) bool -> (B,) scores."""
        batch, length = mask.shape
        tokens = patches.new_zeros(batch, length, self.embedding.out_features)
        # Masked tokens never reach a real one (their attention weight is exactly 0), so the stem skips them.
        tokens[mask] = self.embed_patches(patches[mask])
        x = self.transformer_encoder(tokens, spatial, scale, mask)
        out = self.head(x[:, 0])
        if out.shape[-1] == 1:
            return out[:, 0]
        bins = torch.arange(1, out.shape[-1] + 1, device=out.device, dtype=out.dtype)
        return (out * bins).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------

def _hash_index(count: int, grid_size: int) -> torch.Tensor:
    """Grid cell (0..grid_size-1) of each of ``count`` patches along one axis: nearest-neighbour resampling
    of the grid onto the patch positions."""
    grid = torch.arange(grid_size, dtype=torch.float32).view(1, 1, grid_size)
    return F.interpolate(grid, size=count, mode="nearest").view(count).long()


def _patches(image: torch.Tensor, patch: int, grid_size: int, scale_id: int, max_len: int | None):
    """Patches of a (3, h, w) image with their hashed positions, scale id and mask; padded or cut to
    ``max_len`` tokens when it is >= 0."""
    x = _pad_same(image, patch, patch)
    rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
    patches = x.view(3, rows, patch, cols, patch).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, patch, patch)
    spatial = (_hash_index(rows, grid_size)[:, None] * grid_size + _hash_index(cols, grid_size)[None, :]).flatten()
    scale = torch.full_like(spatial, scale_id)
    mask = torch.ones_like(spatial, dtype=torch.bool)
    if max_len is not None and max_len >= 0:
        extra = max(max_len - len(spatial), 0)
        patches = torch.cat([patches, patches.new_zeros(extra, 3, patch, patch)])[:max_len]
        spatial = torch.cat([spatial, spatial.new_zeros(extra)])[:max_len]
        scale = torch.cat([scale, scale.new_zeros(extra)])[:max_len]
        mask = torch.cat([mask, mask.new_zeros(extra)])[:max_len]
    return patches, spatial, scale, mask


def multiscale_tokens(image: torch.Tensor, config: dict):
    """The multi-scale patch sequence of one (3, h, w) image with values in [-1, 1]: each resized version
    (sorted by longer side, scale ids 0, 1, ...) then the original resolution (last scale id)."""
    patch, grid = config["patch_size"], config["hash_grid_size"]
    h, w = image.shape[-2:]
    parts = []
    for scale_id, longer in enumerate(sorted(config["longer_side_lengths"])):
        ratio = longer / max(h, w)
        size = (round(h * ratio), round(w * ratio))
        resized = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)[0]
        parts.append(_patches(resized, patch, grid, scale_id, math.ceil(longer / patch) ** 2))
    original = config["max_seq_len_from_original_res"]
    if original is not None:
        parts.append(_patches(image, patch, grid, len(parts), original))
    return tuple(torch.cat(field) for field in zip(*parts))




# ----------------------------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------------------------

class MusiqScorer(QualityScorer, name="musiq", net=MusiqNet, filename=DEFAULT_FILENAME, config=KONIQ_CONFIG,
                  tiny=TINY_CONFIG):
    """MUSIQ (Ke et al. 2021): a multi-scale transformer over patches of the whole image at its own size
    and resized scales; the KonIQ-10k model scores about 0-100."""

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """MUSIQ score of each HxWx3 uint8 image (any size), float32."""
        scores = []
        for start in range(0, len(images), batch_size):
            sequences = [multiscale_tokens(torch.from_numpy(rgb_image(image)).permute(2, 0, 1).float() / 127.5 - 1.0,
                                           self.config) for image in images[start:start + batch_size]]
            length = max(len(seq[3]) for seq in sequences)
            patches, spatial, scale, mask = (torch.stack([_pad_to(seq[i], length) for seq in sequences]).to(self.device)
                                             for i in range(4))
            scores.append(self.net(patches.to(self.dtype), spatial, scale, mask).float().cpu())
        return torch.cat(scores).numpy().astype(np.float32) if scores else np.zeros(0, np.float32)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` with zeros appended along dim 0 up to ``length`` (padding tokens: mask False, index 0)."""
    return torch.cat([x, x.new_zeros(length - len(x), *x.shape[1:])])


