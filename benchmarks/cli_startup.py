"""Start-up of the command line: wall seconds and peak RSS of each command, the median of N runs.

    python benchmarks/cli_startup.py [--run DIR] [--selfimprove DIR] [--repeats 5]

Goal (issue #16, goal 2): ``layerloop --help`` and ``layerloop inspect`` in at most 0.3 s and 150 MB.
``report`` is measured too (no goal: it decodes images and draws the contact sheet).

Each command runs as the installed console script (``layerloop`` next to this Python; ``python -m
layerloop.cli`` without one) under GNU ``/usr/bin/time``, once to warm the page cache and then ``--repeats``
times; the peak RSS is what ``time`` reports (``%M``). Without ``--run`` a small run is built first
(``layerloop build demo --executor local source.n=4 source.size=64 stages.load.short_side=64``, not timed)
in a temporary directory.
``--selfimprove`` adds ``inspect`` of a self-improvement directory (``layerloop self-improve``'s output).
The load average is printed before and after: on a shared machine it says how much the times are worth.

Bytecode: an installed layerloop has its ``.pyc`` files, and so does a checkout once Python has written
them; this sandbox sets ``PYTHONDONTWRITEBYTECODE=1``, which makes every run compile layerloop's modules
from source (50-100 ms of ``inspect`` on this machine). ``--bytecode cached`` (the default) removes that
variable for the measured commands, so the warm-up run writes the ``.pyc`` files the later runs use;
``--bytecode none`` keeps the environment as it is (every run compiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 0.3
GOAL_MB = 150.0
TIME = "/usr/bin/time"  # GNU time


def command_prefix() -> list[str]:
    script = Path(sys.executable).parent / "layerloop"
    return [str(script)] if script.exists() else [sys.executable, "-m", "layerloop.cli"]


ENV = dict(os.environ)  # the measured commands' environment (``--bytecode``)


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run; stdout and stderr are discarded. The peak comes from
    ``/usr/bin/time``: a child forked from this process would start with this process's peak as its own
    (Linux carries ``maxrss`` across fork and exec), so the command must be forked by a small process."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        done = subprocess.run([TIME, "-f", "%M", "-o", report.name, *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}")
        return seconds, int(report.read().split()[-1]) / 1024  # %M is in KiB


def measure(argv: list[str], repeats: int) -> tuple[float, float]:
    run_once(argv)  # warm-up: page cache, .pyc files
    runs = [run_once(argv) for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs)


def build_small_run(out: Path) -> None:
    subprocess.run(command_prefix() + ["build", "demo", "--out", str(out), "--executor", "local", "source.n=4",
                                       "source.size=64", "stages.load.short_side=64", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run directory (default: build a small one)")
    parser.add_argument("--selfimprove", type=Path, help="a self-improvement directory to inspect as well")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bytecode", choices=("cached", "none"), default="cached",
                        help="cached: let Python write and use .pyc files (an installed package); none: keep "
                             "PYTHONDONTWRITEBYTECODE as the environment has it")
    args = parser.parse_args(argv)
    if args.bytecode == "cached":
        ENV.pop("PYTHONDONTWRITEBYTECODE", None)

    with tempfile.TemporaryDirectory(prefix="cli_startup_") as scratch:
        run = args.run
        if run is None:
            run = Path(scratch) / "run"
            build_small_run(run)
        commands: list[tuple[str, list[str], bool]] = [
            ("--help", ["--help"], True),
            ("inspect RUN", ["inspect", str(run)], True),
            ("inspect RUN --key KEY", ["inspect", str(run), "--key", first_key(run)], True),
        ]
        if args.selfimprove is not None:
            commands.append(("inspect SELFIMPROVE", ["inspect", str(args.selfimprove)], True))
        report_copy = Path(scratch) / "report_run"  # report rewrites report/: never the caller's run
        subprocess.run(["cp", "-r", str(run), str(report_copy)], check=True)
        commands.append(("report RUN", ["report", str(report_copy)], False))

        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; median of "
              f"{args.repeats} runs after one warm-up; bytecode {args.bytecode} "
              f"(PYTHONDONTWRITEBYTECODE={ENV.get('PYTHONDONTWRITEBYTECODE', 'unset')}); goal {GOAL_SECONDS} s and "
              f"{GOAL_MB:.0f} MB\n")
        print("| command | seconds | peak MB | goal |\n|---|---:|---:|---|")
        for label, command, has_goal in commands:
            seconds, mb = measure(command_prefix() + command, args.repeats)
            verdict = ("met" if seconds <= GOAL_SECONDS and mb <= GOAL_MB else "NOT met") if has_goal else "-"
            print(f"| `{label}` | {seconds:.2f} | {mb:.0f} | {verdict} |", flush=True)
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def first_key(run: Path) -> str:
    import pyarrow.parquet as pq

    index = sorted(p for p in run.glob("*.parquet") if p.name != "failures.parquet")[0]
    return pq.read_table(index, columns=["key"]).column("key")[0].as_py()


if __name__ == "__main__":
    sys.exit(main())
