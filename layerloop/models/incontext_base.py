"""Tiny bases of the in-context LoRA: the random instances and the folders a pretraining run writes (issue 14).

Model ids (what ``model:`` of an in-context training config names), all in the ``tiny:`` namespace so that
every "is this a tiny model" check of the project (``refs.is_tiny``, the pre-flight, the decompose stage's
model list, evaluation's offline check) knows they need no weights:

| id                         | VAE                                   | lora.json ``base_model`` |
|----------------------------|---------------------------------------|--------------------------|
| ``tiny`` / ``tiny:SEED``   | random 2-level ``AutoencoderKL``      | ``tiny-SEED``            |
| ``tiny:s2d`` / ``tiny:s2d-SEED`` | exact ``SpaceToDepthAutoencoder`` (factor 2, 12 channels) | ``tiny-s2d-SEED`` |

Both have a random one-block-each transformer in the Fill token layout and the byte text encoder. ``tiny``
cannot reconstruct an image (its VAE is random); ``tiny:s2d`` can, exactly, so what a model learns on it
shows in pixels.

A **base folder** is what the ``incontext-base`` training task (``training/incontext_base_task.py``) saves:
a tiny Fill transformer pretrained as an inpainter, with the VAE and text encoder it was trained with::

    model_index.json      {"_class_name": BASE_CLASS, "format": BASE_FORMAT, ...}
    transformer/          FluxTransformer2DModel.save_pretrained
    vae/                  SpaceToDepthAutoencoder (or AutoencoderKL).save_pretrained
    text_encoder/         config.json + model.safetensors of the ByteTextEncoder's buffers

``InContextLoRA.from_pretrained(folder)`` loads it like a local FLUX.1-Fill folder (``model: runs/base/final``);
``base_hash`` (the transformer weights' digest) is recorded with every LoRA trained on it, and
``incontext_pipeline.load_model`` refuses a base folder whose weights changed since.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerloop.files import sha256_file, write_json_atomic
from layerloop.models.text_encoders import ByteTextEncoder

BASE_CLASS = "LayerloopTinyFill"  # model_index.json's _class_name of a base folder
# What a base's transformer predicts (model_index.json ``prediction``; FLUX.1-Fill-dev and every folder
# without the key: ``velocity``). See ``to_velocity``.
PREDICTIONS = ("velocity", "sample", "residual")
# Where the canvas's tokens sit for RoPE (model_index.json ``positions``; FLUX and every folder without the
# key: ``canvas``). See ``canvas_ids``.
POSITIONS = ("canvas", "panels")
T_MIN = 1e-3  # the smallest t an x0 prediction is divided by (samplers and training never go below it)
BASE_FORMAT = 1
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
VAE_VARIANTS = ("kl", "s2d")

_TINY_ID = re.compile(r"^tiny(?::(?:(?P<s2d>s2d)(?:-(?P<seed2>\d+))?|(?P<seed>\d+)))?$")
_TINY_NAME = re.compile(r"^tiny-(?:(?P<s2d>s2d)-)?(?P<seed>\d+)$")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices`` (``PREDICTIONS``, ``POSITIONS``), else ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
    return value


# --------------------------------------------------------------------------- prediction
def to_velocity(out: torch.Tensor, x_t: torch.Tensor, given: torch.Tensor, t: torch.Tensor,
                prediction: str) -> torch.Tensor:
    """The flow velocity ``v = noise - x0`` (what the samplers and losses take) from the transformer's output
    ``out`` (B x L x C), by what the base was trained to predict:

    * ``velocity``: ``out`` is v (FLUX.1-Fill-dev, and the random tiny bases);
    * ``sample``: ``out`` is x0, so ``v = (x_t - x0) / t``;
    * ``residual``: ``out`` is x0 minus ``given``, the Fill conditioning's image latents (B x L x C: the
      masked image, or the in-context task's given panels and first guesses), so that where a task changes
      nothing the answer is 0.

    A velocity has to carry the input noise through the network, which a transformer a few dozen channels
    wide cannot do next to the content (a 64-wide base trained with ``velocity`` still returned visible noise
    at t = 1); a tiny pretrained stand-in for the FLUX base therefore predicts ``residual`` (docs/fidelity.md)."""
    if prediction == "velocity":
        return out
    check_choice("prediction", prediction, PREDICTIONS)
    x0 = out + given if prediction == "residual" else out
    return (x_t - x0) / t.reshape(-1, 1, 1).to(x_t.dtype).clamp_min(T_MIN)


def flow_error(v: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
               prediction: str) -> torch.Tensor:
    """What the flow-matching loss squares: ``v - (noise - x0)``, times t for a base that predicts x0
    (``sample``, ``residual``): its loss is then the MSE of x0, where the velocity MSE would weigh small t by
    1 / t^2."""
    error = v - (noise - x0)
    if prediction == "velocity":
        return error
    return error * t.reshape(-1, 1, 1).to(error.dtype)


def base_prediction(folder: str | os.PathLike) -> str:
    """What a base folder's transformer predicts (``to_velocity``): model_index.json ``prediction``, else
    ``velocity`` (folders written before the key)."""
    return _index_choice(folder, "prediction", PREDICTIONS)


def base_positions(folder: str | os.PathLike) -> str:
    """How a base folder's transformer places the canvas for RoPE (``canvas_ids``): model_index.json
    ``positions``, else ``canvas`` (folders written before the key)."""
    return _index_choice(folder, "positions", POSITIONS)


def _index_choice(folder: str | os.PathLike, key: str, choices: tuple[str, ...]) -> str:
    index = json.loads((Path(folder).expanduser() / "model_index.json").read_text())
    value = index.get(key, choices[0])
    if value not in choices:
        raise ValueError(f"{folder}: {key} {value!r} in model_index.json is not one of {', '.join(choices)}")
    return value


# --------------------------------------------------------------------------- positions
def canvas_ids(rows: int, columns: int, panels: int, positions: str,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """RoPE position ids (rows * columns x 3: index, row, column) of a canvas of ``panels`` panels side by side,
    ``rows`` x ``columns`` tokens in all, in the packed token order:

    * ``canvas``: the canvas is one wide image (index 0, column 0 .. columns - 1), as FLUX places any image
      and as In-Context LoRA feeds FLUX its panels. A token's counterpart in another panel is a whole panel
      width away;
    * ``panels``: every panel is an image of its own at index = its number (0 .. panels - 1), rows and
      columns from 0 within it, as FLUX.1 Kontext places its reference images on the index axis. A token
      and its counterparts in the other panels then share their row and column, and differ only on the
      index axis. A tiny pretrained stand-in base uses it (docs/fidelity.md): its 6 RoPE channels per side
      cannot tell an offset of one panel width from its neighbours, so finding "the same pixel in the
      composite" is what it could not learn."""
    check_choice("positions", positions, POSITIONS)
    if columns % panels:
        raise ValueError(f"{columns} token columns do not split into {panels} panels")
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] += torch.arange(rows, device=device)[:, None]
    column = torch.arange(columns, device=device)
    if positions == "panels":
        width = columns // panels
        ids[..., 0] += (column // width)[None, :]
        ids[..., 2] += (column % width)[None, :]
    else:
        ids[..., 2] += column[None, :]
    return ids.reshape(rows * columns, 3)


# --------------------------------------------------------------------------- names
def parse_tiny_model(model: str) -> tuple[str, int] | None:
    """(vae variant, seed) of a tiny model id (``tiny``, ``tiny:SEED``, ``tiny:s2d``, ``tiny:s2d-SEED``); None
    for anything that is not in the ``tiny`` namespace; ValueError for a malformed ``tiny:...``."""
    model = str(model)
    if model != "tiny" and not model.startswith("tiny:"):
        return None
    match = _TINY_ID.match(model)
    if match is None:
        raise ValueError(f"unknown tiny in-context model {model!r}; use tiny, tiny:SEED, tiny:s2d or tiny:s2d-SEED")
    if match["s2d"]:
        return "s2d", int(match["seed2"] or 0)
    return "kl", int(match["seed"] or 0)


def tiny_model_id(variant: str, seed: int) -> str:
    return f"tiny:{seed}" if variant == "kl" else f"tiny:{variant}-{seed}"


def tiny_base_name(variant: str, seed: int) -> str:
    """What lora.json records as ``base_model`` for a tiny base (``tiny-SEED`` as before, ``tiny-s2d-SEED``)."""
    return f"tiny-{seed}" if variant == "kl" else f"tiny-{variant}-{seed}"


def parse_tiny_base_name(name: str | None) -> tuple[str, int] | None:
    """Inverse of ``tiny_base_name``; None for any other base (a hub id, a folder)."""
    match = _TINY_NAME.match(str(name or ""))
    if match is None:
        return None
    return ("s2d" if match["s2d"] else "kl"), int(match["seed"])


# --------------------------------------------------------------------------- components
def tiny_vae(variant: str) -> nn.Module:
    """The VAE of a tiny base: ``kl`` the random 2-level AutoencoderKL of ``InContextLoRA.tiny`` (draws from
    torch's global RNG, as it always did), ``s2d`` the exact space-to-depth autoencoder."""
    if variant == "kl":
        from diffusers import AutoencoderKL

        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                             scaling_factor=1.0, shift_factor=0.0)
    if variant == "s2d":
        from layerloop.models.space_to_depth import SpaceToDepthAutoencoder

        return SpaceToDepthAutoencoder(in_channels=3, factor=2)
    raise ValueError(f"unknown tiny VAE {variant!r}; known: {list(VAE_VARIANTS)}")


def vae_scale(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tiny_transformer(latent_channels: int, scale: int, layers: int = 1, single_layers: int = 1, heads: int = 2,
                     head_dim: int = 16, text_dim: int = 32) -> nn.Module:
    """A random FluxTransformer2DModel in the Fill token layout for a VAE of ``latent_channels`` and ``scale``
    (random weights from torch's global RNG). RoPE splits ``head_dim`` over (index, row, column) as FLUX's
    (16, 56, 56) does for 128, in multiples of 2."""
    from diffusers import FluxTransformer2DModel

    if head_dim < 8 or head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 and at least 8, got {head_dim}")
    first = max(2, (head_dim // 8) // 2 * 2)
    side = (head_dim - first) // 2
    side -= side % 2
    axes = (head_dim - 2 * side, side, side)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8 * latent_channels + 4 * scale * scale, out_channels=4 * latent_channels,
        num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
        guidance_embeds=True, axes_dims_rope=axes)


def tiny_components(variant: str, seed: int, **transformer: Any) -> tuple[nn.Module, nn.Module, ByteTextEncoder]:
    """(transformer, vae, text encoder) of a random tiny base; the same arguments give the same weights.
    ``variant="kl"`` with the default transformer is exactly ``InContextLoRA.tiny``'s historical model."""
    torch.manual_seed(seed)
    vae = tiny_vae(variant)
    text_dim = transformer.get("text_dim", 32)
    net = tiny_transformer(vae.config.latent_channels, vae_scale(vae), **transformer)
    text_encoder = ByteTextEncoder(text_dim, text_dim, max_length=64, seed=seed)
    return net.eval(), vae.eval(), text_encoder


# --------------------------------------------------------------------------- base folders
def is_base_folder(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` is a local folder written by ``save_base``."""
    if model is None:
        return False
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == BASE_CLASS
    except (OSError, ValueError):
        return False


def base_hash(folder: str | os.PathLike) -> str:
    """The id of a base folder: the first 16 hex digits of the sha256 of its transformer weights."""
    path = Path(folder) / TRANSFORMER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a tiny in-context base folder (no {TRANSFORMER_WEIGHTS})")
    return sha256_file(path)[:16]


def save_base(folder: str | os.PathLike, transformer: nn.Module, vae: nn.Module, text_encoder: ByteTextEncoder,
              info: dict[str, Any] | None = None, prediction: str = "velocity", positions: str = "canvas") -> Path:
    """Write a base folder (the layout in the module docstring); ``info`` is stored in model_index.json
    (what it was trained on, for people), ``prediction`` (``to_velocity``) when it is not ``velocity`` and
    ``positions`` (``canvas_ids``) when it is not ``canvas``, so that bases without either option keep the
    bytes of before. The transformer must be a plain FluxTransformer2DModel."""
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("positions", positions, POSITIONS)
    from safetensors.torch import save_file

    if not isinstance(text_encoder, ByteTextEncoder):
        raise TypeError(f"a tiny base folder holds a ByteTextEncoder, got {type(text_encoder).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    text_dir = folder / "text_encoder"
    text_dir.mkdir(exist_ok=True)
    table, projection = text_encoder.table, text_encoder.projection
    write_json_atomic(text_dir / "config.json", {"class": "ByteTextEncoder", "dim": int(table.shape[1]),
                                                 "pooled_dim": int(projection.shape[1]),
                                                 "max_length": int(text_encoder.max_length)})
    save_file({k: v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()},
              str(text_dir / TEXT_WEIGHTS))
    write_json_atomic(folder / "model_index.json", {
        "_class_name": BASE_CLASS, "format": BASE_FORMAT,
        "transformer": ["diffusers", type(transformer).__name__],
        "vae": [type(vae).__module__.split(".")[0], type(vae).__name__],
        "text_encoder": ["layerloop", "ByteTextEncoder"], "info": info or {},
        **({"prediction": prediction} if prediction != "velocity" else {}),
        **({"positions": positions} if positions != "canvas" else {})})
    return folder


def load_base(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module, ByteTextEncoder]:
    """(transformer, vae, text encoder) of a base folder, in eval mode. The transformer is in ``dtype``; the
    VAE of ``tiny:s2d`` is exact in any dtype, a KL VAE stays float32 (tiny, and bf16 would only lose)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import load_file

    from layerloop.models.space_to_depth import SpaceToDepthAutoencoder

    folder = Path(folder).expanduser()
    if not is_base_folder(folder):
        raise FileNotFoundError(f"{folder} is not a tiny in-context base folder (no model_index.json with "
                                f"_class_name {BASE_CLASS}); pass the final/ folder of an incontext-base run")
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("format") != BASE_FORMAT:
        raise ValueError(f"{folder}: base folder format {index.get('format')!r}, this version reads {BASE_FORMAT}")
    vae_class = {"SpaceToDepthAutoencoder": SpaceToDepthAutoencoder, "AutoencoderKL": AutoencoderKL}
    vae_name = index.get("vae", [None, None])[1]
    if vae_name not in vae_class:
        raise ValueError(f"{folder}: unknown VAE class {vae_name!r} in model_index.json")
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
    vae = vae_class[vae_name].from_pretrained(folder / "vae", torch_dtype=torch.float32)
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    text_encoder = ByteTextEncoder(text_config["dim"], text_config["pooled_dim"], text_config["max_length"])
    text_encoder.load_state_dict(load_file(str(folder / "text_encoder" / TEXT_WEIGHTS)))
    return transformer.to(device).eval(), vae.to(device).eval(), text_encoder.to(device)


def base_vae_scale(model: str) -> int:
    """The VAE downsampling factor of the base ``model`` names, without loading weights: 2 for the tiny ids
    and (from ``vae/config.json``) for a local folder, 8 (FLUX.1-Fill-dev) for a hub id."""
    if parse_tiny_model(model) is not None:
        return 2
    config = Path(model).expanduser() / "vae" / "config.json"
    if config.is_file():
        return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
    return 8


def is_small_base(model: str) -> bool:
    """A tiny random id or a tiny pretrained base folder (small LoRA defaults, float32)."""
    return parse_tiny_model(model) is not None or is_base_folder(model)
