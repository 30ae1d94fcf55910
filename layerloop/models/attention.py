"""Which fused attention kernels a training step may use.

``torch.nn.functional.scaled_dot_product_attention`` picks a kernel per call among flash, memory-efficient,
cuDNN and plain math. cuDNN's is left out of training steps (forward, backward and a gradient checkpoint's
recompute): on an H200 with torch 2.11 and its bundled cuDNN, the in-context step's backward under gradient
checkpointing failed inside it ("Expected mha_graph.execute(...).is_good() to be true"), and the illegal
memory access that followed ended the process; with flash attention the same step ran
(``benchmarks/RESULTS.md``, "GPU models"). A CPU step never picks cuDNN, so it is unchanged.
"""

from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

TRAINING_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def training_attention():
    """Context manager: scaled-dot-product attention inside uses only ``TRAINING_ATTENTION``'s kernels."""
    return sdpa_kernel(list(TRAINING_ATTENTION))
