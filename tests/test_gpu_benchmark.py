"""benchmarks/gpu_models.py in --smoke (CPU): every row it prints comes from a real call of the model wrapper,
a model that fails gets a FAILED row without taking the others down, and FLOPs are counted per operator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_models_under_test", BENCHMARKS / "gpu_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]


def test_smoke_rows_and_a_failing_model_leaves_the_others(capsys, monkeypatch):
    gpu_models = _load()
    assert gpu_models.main(["--smoke", "--iters", "1", "--models", "dino", "incontext-step"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [row.split(" | ")[0] for row in rows] == ["| DINOv2-base", "| in-context train step (Flux-Fill)"]
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)  # samples/s measured

    import gpu_workloads

    def broken(device, smoke):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_workloads, "dino", broken)
    assert gpu_models.main(["--smoke", "--iters", "1", "--models", "dino", "maniqa"]) == 1
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    assert rows[0].startswith("| MANIQA (KonIQ) |")
    assert rows[1].startswith("| dino | FAILED: RuntimeError: CUDA error: an illegal memory access")
    assert "dino failed after" in captured.err and "| MANIQA (KonIQ) |" in captured.err  # rows as they finish


def test_flops_are_counted_per_operator_through_a_checkpointed_backward():
    gpu_models = _load()
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert gpu_models.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.GELU(), torch.nn.Linear(32, 4, bias=False))
    x = torch.randn(8, 16, requires_grad=True)
    first, second = 2 * 8 * 16 * 32, 2 * 8 * 32 * 4  # each linear's forward product
    # forward, then for each linear the input and the weight gradient: three products of its size
    assert gpu_models.count_flops(lambda: net(x).sum().backward()) == 3 * (first + second)
    # checkpointed: the backward recomputes the forward up to the last tensor it saved (the GELU's output)
    checkpointed = lambda: torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False).sum().backward()  # noqa: E731
    assert gpu_models.count_flops(checkpointed) == 3 * (first + second) + first
