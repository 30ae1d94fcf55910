"""The CPU decomposition experiment of issue #14: `selfimprove_logos_cpu` and its two ablations, per seed.

Arms (each a `layerloop self-improve selfimprove_logos_cpu --rounds 3` with overrides):

* ``main``: the cycle term and the cycle-error filter (the packaged config);
* ``nocycle``: the same without the cycle term (``task.cycle_weight=0``), at equal steps;
* ``acceptall``: the same with every candidate accepted (the filter's ablation).

Runs every arm for every seed into ``OUT/<arm>-s<seed>`` (a finished loop is resumed, i.e. skipped), then
prints one markdown table: per arm, seed and round, the held-out layer and object PSNR / SSIM of the round's
LoRA (``round-NNN/eval.json``), the untrained start and the trivial baseline, the acceptance rate and the
loop's wall time. ``--summarize`` only reads loops that exist.

    OMP_NUM_THREADS=1 python benchmarks/selfimprove_logos_cpu.py --out runs/logos-cpu --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def no_cycle_overrides() -> list[str]:
    """The packaged config's ``train.overrides`` with the cycle term switched off, so the ablation differs
    from the main arm in that alone."""
    from layerloop.selfimprove.config import load_selfimprove_config

    train = load_selfimprove_config("selfimprove_logos_cpu").train
    return [f"train.overrides=[{', '.join([*train.overrides, 'task.cycle_weight=0'])}]"]


ARMS = {  # arm -> its overrides of the packaged config
    "main": lambda: [],
    "nocycle": no_cycle_overrides,
    "acceptall": lambda: ['policy={name: accept-all, threshold: {column: round, op: ">=", value: 0}}'],
}
METRICS = ("layer_psnr", "object_psnr", "layer_ssim", "object_ssim")


def arm_overrides(arm: str) -> list[str]:
    return ARMS[arm]()


def run_arm(arm: str, seed: int, out: Path, rounds: int) -> float:
    import torch

    from layerloop.selfimprove.loop import self_improve

    torch.set_num_threads(1)
    started = time.perf_counter()
    self_improve("selfimprove_logos_cpu", rounds=rounds, out=out, overrides=[f"seed={seed}", *arm_overrides(arm)],
                 progress=False)
    return time.perf_counter() - started


def loop_seconds(out: Path) -> float | None:
    """Wall time of the loop's first complete run: from its first event to the first "loop done"."""
    path = out / "events.jsonl"
    if not path.is_file():
        return None
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    done = [e["time"] for e in events if e["step"] == "loop" and e["event"] == "done"]
    return round(done[0] - events[0]["time"], 1) if done else None


def rows(out: Path, arm: str, seed: int) -> list[str]:
    lines = []
    for path in sorted((out / "rounds").glob("round-*/eval.json")):
        k = int(path.parent.name.split("-")[1])
        result = json.loads(path.read_text())["metrics"]
        info = json.loads((path.parent / "round.json").read_text()) if (path.parent / "round.json").exists() else {}
        methods = [("lora", f"round {k} LoRA")] + ([("start", "untrained start")] if k == 0 and "start" in result else [])
        for method, label in methods:
            cells = " | ".join(f"{result[method][m]:.2f}" if "psnr" in m else f"{result[method][m]:.3f}" for m in METRICS)
            rate = f"{info.get('acceptance_rate', 0):.2f}" if method == "lora" and info else ""
            lines.append(f"| {arm} | {seed} | {label} | {cells} | {rate} |")
        if k == 0:
            trivial = result["copy-input"]
            cells = " | ".join(f"{trivial[m]:.2f}" if "psnr" in m else f"{trivial[m]:.3f}" for m in METRICS)
            lines.append(f"| {arm} | {seed} | trivial baseline | {cells} | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--summarize", action="store_true", help="only read the loops that exist")
    args = parser.parse_args(argv)
    table = ["| arm | seed | model | layer PSNR | object PSNR | layer SSIM | object SSIM | accepted |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    times = []
    for arm in args.arms:
        for seed in args.seeds:
            out = args.out / f"{arm}-s{seed}"
            if not args.summarize:
                run_arm(arm, seed, out, args.rounds)
            if out.is_dir():
                table += rows(out, arm, seed)
                times.append(f"{arm} seed {seed}: {loop_seconds(out)} s")
    print("\n".join(table))
    print("\nwall time of each loop's first run: " + "; ".join(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
