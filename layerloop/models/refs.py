"""Model references named by configs, and the one rule for turning them into loaded wrappers.

A stage that uses a model names it with a ``model`` parameter: a Hugging Face id, a local folder or file,
an open_clip architecture name, or ``tiny`` / ``tiny:SEED`` for the random tiny instance that tests and the
demo profile use. ``ModelRef`` carries that name with its revision and file so that ``layerloop models
list|pull`` and the pre-flight check of ``layerloop build`` can resolve every weight a config needs before
any work starts, by the same rules the wrappers load with (``hub.resolve``: local path, cache, download
once per node under a file lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerloop.models import hub

DTYPES = ("float16", "bfloat16", "float32")


def is_tiny(model: str) -> bool:
    """``tiny`` or ``tiny:SEED``: the random tiny instance of a model family."""
    return model == "tiny" or model.startswith("tiny:")


def tiny_seed(model: str) -> int:
    return int(model.split(":", 1)[1]) if ":" in model else 0


@dataclass(frozen=True)
class ModelRef:
    stage: str  # the stage (and backend) that needs it, for messages
    model: str
    revision: str | None = None
    filename: str | None = None  # one file of a repository (an HPS checkpoint)
    open_clip_tag: str | None = None  # open_clip architecture name + pretrained tag (CLIP score)
    allow_patterns: tuple[str, ...] | None = None

    @property
    def is_tiny(self) -> bool:
        return is_tiny(self.model)

    @property
    def tiny_seed(self) -> int:
        return tiny_seed(self.model)

    def label(self) -> str:
        what = self.model + (f" / {self.open_clip_tag}" if self.open_clip_tag else "")
        what += f" file {self.filename}" if self.filename else ""
        return what + (f" @ {self.revision}" if self.revision else "")

    def resolve(self, allow_download: bool = False, cache_dir: str | Path | None = None) -> Path | None:
        """Local path of the weights (None for tiny models); raises ``hub.ModelNotAvailable``."""
        if self.is_tiny:
            return None
        if self.open_clip_tag:
            from layerloop.models.clip_score import resolve_tag_weights

            return resolve_tag_weights(self.model, self.open_clip_tag, self.revision, cache_dir, allow_download)
        return hub.resolve(self.model, revision=self.revision, cache_dir=cache_dir, allow_download=allow_download,
                           filename=self.filename,
                           allow_patterns=list(self.allow_patterns) if self.allow_patterns else None)


def torch_dtype(name: str | None) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[name]


def inference_dtype(name: str, device: Any) -> Any:
    """A stage's ``dtype`` parameter as a torch dtype: ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch_dtype(name)


def load_wrapper(wrapper: Any, ref: ModelRef, device: str, dtype: str | None = None, **kwargs: Any) -> Any:
    """``wrapper.tiny(seed)`` for tiny refs, else ``wrapper.from_pretrained(model, revision, dtype, device)``."""
    if ref.is_tiny:
        return wrapper.tiny(seed=ref.tiny_seed, device=device)
    return wrapper.from_pretrained(ref.model, revision=ref.revision, dtype=torch_dtype(dtype), device=device,
                                   **kwargs)


def missing_models(refs: list[ModelRef], cache_dir: str | Path | None = None) -> list[tuple[ModelRef, str]]:
    """The refs that cannot be resolved without a download, with the reason."""
    missing = []
    for ref in refs:
        try:
            ref.resolve(allow_download=False, cache_dir=cache_dir)
        except hub.ModelNotAvailable as error:
            missing.append((ref, error.reason))
        except ValueError as error:  # e.g. an open_clip tag without Hub weights
            missing.append((ref, str(error)))
    return missing
