"""``layerloop --help`` and ``layerloop inspect`` import only what they need: none of the heavy libraries.

Each command runs in a fresh interpreter (a subprocess: this test process has imported everything) and
prints which of the watched modules ended up in ``sys.modules``. Not a timing test: the import of torch
(through webdataset), Ray, transformers or diffusers is what made ``--help`` take 1.4 s and 690 MB, and
pandas (pulled in by pyarrow's dataset reader and its converter from Python objects) is most of what
``inspect`` would take without them; ``benchmarks/cli_startup.py`` measures the time and memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from layerloop.datasets.shards import ShardWriter
from layerloop.samples import LayeredSample, composite

HEAVY = ("torch", "ray", "transformers", "diffusers", "webdataset", "pandas")
# What ``inspect RUN`` no longer imports either (issue #16, goal 2): it reads the indexes with pyarrow.parquet
# and numpy only. pyarrow.compute builds every compute function's wrapper on import (60-80 ms), np.median's NaN
# check imports numpy.ma (~50 ms), Pillow and the contact sheet are the report's, the loop's lineage module is
# imported only for a self-improvement directory.
INSPECT_LEAN = ("pyarrow.compute", "numpy.ma", "PIL", "PIL.Image", "cv2", "yaml", "pydantic", "layerloop.report.sheet",
                "layerloop.report.write", "layerloop.selfimprove.lineage", "layerloop.selfimprove.results")

PROBE = """
import contextlib, io, json, sys
from layerloop.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[2:])
    except SystemExit as exit:  # --help
        code = exit.code
print(json.dumps({"code": code, "imported": sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)}))
"""


def imported_by(*argv: str, watched: tuple[str, ...] = HEAVY) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(watched), *argv], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample(key: str, index: int) -> LayeredSample:
    background = np.full((32, 32, 3), (30 + 40 * index, 120, 90), np.uint8)
    foreground = np.zeros((32, 32, 4), np.uint8)
    foreground[8:24, 8:24] = (250, 60, 10, 255)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    return LayeredSample(key=key, composite=composite(foreground, background), background=background,
                         foreground=foreground, mask=mask, caption=f"an orange square {index}",
                         meta={"source": "demo", "source_id": str(index), "bbox": [8, 8, 24, 24]})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory of one shard written by the real ShardWriter (2 samples), plus its run.json."""
    out = tmp_path_factory.mktemp("cli_imports") / "run"
    out.mkdir()
    ShardWriter(out, "demo").write(0, [sample(f"demo_{i:04d}", i) for i in range(2)])
    (out / "run.json").write_text(json.dumps({"name": "demo", "status": "complete", "shards": 1, "seed": 0}))
    return out


def test_help_imports_no_heavy_library():
    for argv in (["--help"], ["inspect", "--help"], ["build", "--help"]):
        result = imported_by(*argv)
        assert result == {"code": 0, "imported": []}, argv


def test_inspect_imports_no_heavy_library(run_dir):
    for argv in (["inspect", str(run_dir)], ["inspect", str(run_dir), "--key", "demo_0001"]):
        result = imported_by(*argv)
        assert result == {"code": 0, "imported": []}, argv


def test_inspect_imports_neither_pyarrow_compute_nor_pillow_nor_the_report(run_dir):
    for argv in (["inspect", str(run_dir)], ["inspect", str(run_dir), "--key", "demo_0001"]):
        result = imported_by(*argv, watched=INSPECT_LEAN)
        assert result == {"code": 0, "imported": []}, argv


def test_inspect_of_a_missing_directory_imports_no_heavy_library(tmp_path):
    result = imported_by("inspect", str(tmp_path / "nowhere"))
    assert result["code"] != 0 and result["imported"] == []
