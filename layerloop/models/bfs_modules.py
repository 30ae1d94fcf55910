"""Building blocks of the BFS generator: the information-sharing attention processor, the latent
compositor Phi, the RGBA VAE initialiser, and the Flux-Fill packing helpers.

`bfs.py` assembles these into the dual-branch generator; this file holds the parts that do not
depend on how the generator is loaded or trained.

Conventions (shared with diffusers' Flux pipelines):
- "latents" are VAE latents already normalised as Flux expects: `(z - shift_factor) * scaling_factor`.
- "packed" latents are Flux tokens: every 2x2 latent patch becomes one token of `4 * C` channels,
  shape (B, h/2 * w/2, 4C). `pack_latents` / `unpack_latents` mirror `FluxPipeline._pack_latents`.
- The two generator branches travel through the backbone as one batch `[C_0..C_{B-1}, F_0..F_{B-1}]`:
  the first half of the batch is the composite branch, the second half the foreground branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

# Name of the joint-attention kwarg through which the generator tells the single-stream blocks where
# the text tokens end. FluxAttention.forward only forwards kwargs that appear in the processor's
# `__call__` signature, so the name is also a parameter of `InformationSharingProcessor.__call__`.
TEXT_TOKENS_KWARG = "bfs_num_text_tokens"


# --------------------------------------------------------------------------------------------------
# Flux-Fill packing
# --------------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) Flux tokens, as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) Flux tokens -> (B, C, h, w); `height`/`width` are in latent pixels."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not tile a {height}x{width} latent in 2x2 patches")
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def pack_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) in [0, 1] -> (B, N, 4 s^2) tokens, as `FluxFillPipeline.prepare_mask_latents`.

    Flux-Fill does not downsample the mask: each s x s pixel block under one latent pixel (s = the VAE
    scale factor, 8 for FLUX) becomes s^2 channels, then 2x2 latent patches are packed like latents.
    """
    b, _, h_px, w_px = mask.shape
    if h_px % latent_height or w_px % latent_width or h_px // latent_height != w_px // latent_width:
        raise ValueError(
            f"mask of {h_px}x{w_px} pixels is not an integer multiple of the {latent_height}x{latent_width} latent"
        )
    s = h_px // latent_height
    m = mask[:, 0].reshape(b, latent_height, s, latent_width, s).permute(0, 2, 4, 1, 3)
    m = m.reshape(b, s * s, latent_height, latent_width)
    return pack_latents(m)


def fill_condition(background_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flux-Fill conditioning tokens: packed background latents then the packed pixel mask.

    The order (image latents, then mask) is the one `FluxFillPipeline` concatenates in, which the
    frozen `x_embedder` was trained on. `mask` is 1 inside the box.
    """
    _, _, h, w = background_latents.shape
    packed_mask = pack_mask(mask.to(background_latents.dtype), h, w)
    return torch.cat([pack_latents(background_latents), packed_mask], dim=-1)


def latent_image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE position ids (N, 3) of the packed tokens, as `FluxPipeline._prepare_latent_image_ids`."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE position ids (L, 3) of the text tokens: all zero, as in every Flux pipeline."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Information-sharing module
# --------------------------------------------------------------------------------------------------


class LoRADelta(nn.Module):
    """The low-rank update `(alpha / r) * B A x` of one frozen projection, without the projection.

    peft is not used because peft wraps `attn.to_q` in place, which would also change the block's own
    self-attention; here the update must apply only on the cross-branch path.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, dtype=dtype)
        self.scale = alpha / rank
        # Same init as peft: A kaiming-uniform, B zero, so the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Trainable weights may be fp32 while the frozen backbone runs in bf16: compute in the
        # weights' dtype and hand the result back in the activations' dtype.
        return (self.up(self.down(x.to(self.down.weight.dtype))) * self.scale).to(x.dtype)


class DirectionLoRA(nn.Module):
    """One direction's LoRA set on W_Q (applied to the receiving branch), W_K and W_V (sending branch)."""

    def __init__(self, query_dim: int, inner_dim: int, rank: int, alpha: float, dtype=torch.float32):
        super().__init__()
        self.q = LoRADelta(query_dim, inner_dim, rank, alpha, dtype)
        self.k = LoRADelta(query_dim, inner_dim, rank, alpha, dtype)
        self.v = LoRADelta(query_dim, inner_dim, rank, alpha, dtype)


class InformationSharingProcessor(nn.Module):
    """Flux attention processor that adds symmetric cross-branch attention to a block's self-attention.

    The block's batch is `[C, F]` (see the module docstring). On the image tokens x_C, x_F:

        Z_C->F = softmax(Q_F K_C^T / sqrt(d)) V_C,   Q_F = W_Q x_F + LoRA^{C->F}_Q x_F,
                                                      K_C = W_K x_C + LoRA^{C->F}_K x_C, V_C likewise
        Z_F->C = softmax(Q_C K_F^T / sqrt(d)) V_F    with the F->C LoRA set

    multi-head with the block's heads; W_Q, W_K, W_V are the block's own frozen projections (used by
    reference, not copied: they are frozen, so a copy would be identical in value and cost ~1.6 B extra
    parameters at FLUX size). As in the block's self-attention, Q and K pass the block's RMS norms and,
    by default, RoPE: C and F share one pixel grid, so with RoPE the frozen Q/K produce the relative-
    position logits the backbone was trained on and a token attends first to the same place in the
    other branch; without RoPE the copied projections would see position-free tokens they never saw.

    The messages are concatenated per token, `[Z_F->C, Z_C->F]`, mapped by the MLP g to two residuals
    and added to the C and F self-attention outputs (after `to_out` in double-stream blocks; before the
    shared `proj_out` in single-stream blocks, whose attention has no output projection of its own).
    g's last layer starts at zero, so an untrained module leaves the backbone's output unchanged.

    The self-attention itself is computed here (same operations as diffusers' FluxAttnProcessor) so
    that the frozen Q/K/V projections of the image tokens are computed once and reused by the
    cross-branch path.
    """

    # Read by diffusers' `set_attention_backend` / context-parallel machinery, as on FluxAttnProcessor.
    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        attn: FluxAttention,
        *,
        rank: int,
        alpha: float,
        mlp_hidden: int,
        use_rope: bool = True,
        dtype=torch.float32,
    ):
        super().__init__()
        if getattr(attn, "fused_projections", False):
            raise ValueError("InformationSharingProcessor needs unfused to_q/to_k/to_v projections")
        self.use_rope = use_rope
        inner = attn.inner_dim
        # The residual lives where the block's attention output lives: out_dim after to_out (double
        # stream), inner_dim for pre-only attention (single stream, projected later by proj_out).
        self.residual_dim = attn.inner_dim if attn.pre_only else attn.out_dim
        self.c2f = DirectionLoRA(attn.query_dim, inner, rank, alpha, dtype)
        self.f2c = DirectionLoRA(attn.query_dim, inner, rank, alpha, dtype)
        self.g = nn.Sequential(
            nn.Linear(2 * inner, mlp_hidden, dtype=dtype),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, 2 * self.residual_dim, dtype=dtype),
        )
        nn.init.zeros_(self.g[2].weight)
        nn.init.zeros_(self.g[2].bias)

    # -- cross-branch messages ---------------------------------------------------------------------

    def messages(
        self,
        attn: FluxAttention,
        image_tokens: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z_C->F, Z_F->C), each (B, N, inner), for normed image tokens (2B, N, query_dim) batched [C, F].

        `image_rotary_emb` is the (cos, sin) of the image tokens only; ignored when `use_rope` is False.
        """
        return self._messages(
            attn, image_tokens, attn.to_q(image_tokens), attn.to_k(image_tokens), attn.to_v(image_tokens),
            image_rotary_emb,
        )

    def _messages(self, attn, x, q_lin, k_lin, v_lin, image_rotary_emb):
        x_c, x_f = x.chunk(2, dim=0)
        q_c, q_f = q_lin.chunk(2, dim=0)
        k_c, k_f = k_lin.chunk(2, dim=0)
        v_c, v_f = v_lin.chunk(2, dim=0)
        rope = image_rotary_emb if self.use_rope else None
        z_c_to_f = self._attend(attn, q_f + self.c2f.q(x_f), k_c + self.c2f.k(x_c), v_c + self.c2f.v(x_c), rope)
        z_f_to_c = self._attend(attn, q_c + self.f2c.q(x_c), k_f + self.f2c.k(x_f), v_f + self.f2c.v(x_f), rope)
        return z_c_to_f, z_f_to_c

    def _attend(self, attn, query, key, value, rope):
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if rope is not None:
            query = apply_rotary_emb(query, rope, sequence_dim=1)
            key = apply_rotary_emb(key, rope, sequence_dim=1)
        out = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return out.flatten(2, 3).to(query.dtype)

    def residuals(self, z_c_to_f: torch.Tensor, z_f_to_c: torch.Tensor) -> torch.Tensor:
        """g([Z_F->C, Z_C->F]) split into the C and F residuals, returned batched [C, F]."""
        joint = torch.cat([z_f_to_c, z_c_to_f], dim=-1)
        first = self.g[0]
        out = self.g(joint.to(first.weight.dtype)).to(joint.dtype)
        r_c, r_f = out.chunk(2, dim=-1)
        return torch.cat([r_c, r_f], dim=0)

    # -- the attention processor -------------------------------------------------------------------

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        bfs_num_text_tokens: int | None = None,
    ):
        # `__call__` rather than `forward`: FluxAttention.forward filters kwargs by the signature of
        # `processor.__call__`, which for a plain nn.Module would be (*args, **kwargs).
        if hidden_states.shape[0] % 2:
            raise ValueError(
                f"the BFS processor expects a batch of [composite, foreground] halves, got batch {hidden_states.shape[0]}"
            )
        dual_stream = encoder_hidden_states is not None
        if dual_stream:
            num_text = encoder_hidden_states.shape[1]
            image_tokens = hidden_states
        else:
            if bfs_num_text_tokens is None:
                raise ValueError(
                    f"single-stream blocks need joint_attention_kwargs['{TEXT_TOKENS_KWARG}'] to find the image "
                    "tokens; call the transformer through BFSGenerator"
                )
            num_text = int(bfs_num_text_tokens)
            image_tokens = hidden_states[:, num_text:]

        # Self-attention, step for step as diffusers' FluxAttnProcessor (unfused projections).
        q_lin, k_lin, v_lin = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(q_lin.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(k_lin.unflatten(-1, (-1, attn.head_dim)))
        value = v_lin.unflatten(-1, (-1, attn.head_dim))
        if dual_stream:
            enc_q = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)

        # Cross-branch messages on the image tokens, reusing the frozen projections computed above.
        if dual_stream:
            img_q, img_k, img_v = q_lin, k_lin, v_lin
        else:
            img_q, img_k, img_v = q_lin[:, num_text:], k_lin[:, num_text:], v_lin[:, num_text:]
        image_rope = None
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            image_rope = (cos[num_text:], sin[num_text:])
        z_c_to_f, z_f_to_c = self._messages(attn, image_tokens, img_q, img_k, img_v, image_rope)
        residual = self.residuals(z_c_to_f, z_f_to_c)

        if dual_stream:
            context_out, image_out = out.split_with_sizes([num_text, out.shape[1] - num_text], dim=1)
            image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
            context_out = attn.to_add_out(context_out.contiguous())
            return image_out + residual, context_out
        return torch.cat([out[:, :num_text], out[:, num_text:] + residual], dim=1)


# --------------------------------------------------------------------------------------------------
# Latent compositor Phi
# --------------------------------------------------------------------------------------------------


class LatentCompositor(nn.Module):
    """Phi: (foreground latent, background latent) -> composite latent, all (B, C, h, w).

    Output = a * z_F + (1 - a) * z_B + r, with a spatial gate a = sigmoid(.) (one value per latent
    pixel, shared by all channels) and a residual r, both predicted by a small conv net from
    [z_F, z_B]. Why this shape: where the foreground is opaque or absent, the latent of an alpha
    composite is close to the latent of F or of B, which is exactly what the gate expresses; the VAE is
    not linear, so edges, semi-transparency and shadows need the residual. The last conv starts at
    zero, so an untrained Phi returns the even blend (z_F + z_B) / 2 rather than noise.
    """

    def __init__(self, latent_channels: int, hidden_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 2:
            raise ValueError("LatentCompositor needs at least 2 conv layers")
        self.latent_channels = latent_channels
        layers: list[nn.Module] = [nn.Conv2d(2 * latent_channels, hidden_channels, 3, padding=1), nn.SiLU()]
        for _ in range(num_layers - 2):
            layers += [nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.SiLU()]
        last = nn.Conv2d(hidden_channels, latent_channels + 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([foreground, background], dim=1))
        gate = torch.sigmoid(out[:, :1])
        return gate * foreground + (1 - gate) * background + out[:, 1:]


# --------------------------------------------------------------------------------------------------
# RGBA VAE
# --------------------------------------------------------------------------------------------------


def make_rgba_vae(rgb_vae: AutoencoderKL) -> AutoencoderKL:
    """A 4-channel (RGBA in, RGBA out) AutoencoderKL initialised from an RGB one.

    Every weight is copied except the two layers that touch pixels:
    - encoder.conv_in: RGB filters copied, alpha filters zero. At init the latent of an RGBA image is
      exactly the RGB VAE's latent of its RGB part, whatever the alpha, so the foreground branch starts
      in the latent space the frozen Flux backbone knows; fine-tuning then teaches alpha to the encoder.
    - decoder.conv_out: RGB filters copied; the alpha filter (and bias) is the mean of the RGB ones, so
      decoded alpha starts as the mean of decoded R, G, B (a grey-level guess that is in range) and the
      decoded RGB equals the RGB VAE's output exactly.
    Alpha uses the same [-1, 1] range as the colour channels.
    """
    if rgb_vae.config.in_channels != 3 or rgb_vae.config.out_channels != 3:
        raise ValueError(
            f"expected an RGB VAE (3 in / 3 out channels), got {rgb_vae.config.in_channels}/{rgb_vae.config.out_channels}"
        )
    config = dict(rgb_vae.config)
    config.update(in_channels=4, out_channels=4)
    param = next(rgb_vae.parameters())
    rgba = AutoencoderKL.from_config(config).to(device=param.device)
    if param.dtype != torch.float32:
        rgba.to(dtype=param.dtype)

    state = {k: v.clone() for k, v in rgb_vae.state_dict().items()}
    w_in = state["encoder.conv_in.weight"]  # (c, 3, k, k)
    state["encoder.conv_in.weight"] = torch.cat([w_in, torch.zeros_like(w_in[:, :1])], dim=1)
    w_out = state["decoder.conv_out.weight"]  # (3, c, k, k)
    b_out = state["decoder.conv_out.bias"]
    state["decoder.conv_out.weight"] = torch.cat([w_out, w_out.mean(dim=0, keepdim=True)], dim=0)
    state["decoder.conv_out.bias"] = torch.cat([b_out, b_out.mean(dim=0, keepdim=True)], dim=0)
    rgba.load_state_dict(state, strict=True)
    return rgba


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel, as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B, 3 or 4, H, W) -> normalised latents `(z - shift) * scale`.

    Without a generator the posterior mode is used, so the same image always gives the same latent;
    pass a generator to sample the posterior as `FluxFillPipeline` does.
    """
    dist = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    z = dist.mode() if generator is None else dist.sample(generator)
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images in [-1, 1], undoing `encode_latents`' normalisation."""
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    return vae.decode(z.to(next(vae.parameters()).dtype)).sample.clamp(-1, 1)
