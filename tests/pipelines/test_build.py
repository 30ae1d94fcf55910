"""End-to-end builds of the demo pipeline: executors agree byte for byte, kills resume to the same bytes,
shards read back with webdataset, Ray Data and Hugging Face datasets."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from layerloop.config import load_config
from layerloop.pipelines.build import build
from layerloop.pipelines.runs import RunDirectory, RunMismatchError
from layerloop.samples import composite_error

SMALL = ["source.n=8", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=2",
         "report.rows=4"]


def shard_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("demo-*")) if p.suffix in (".tar", ".parquet")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    result = build(load_config("demo", SMALL + ["executor=local"]), out=out, progress=False)
    return out, result


def test_demo_build_writes_valid_shards_and_report(local_run):
    out, result = local_run
    assert result.shards_total == 4 and result.ok + result.failed == 8 and result.ok >= 6
    assert (out / "run.json").exists() and (out / "failures.parquet").exists()
    assert (out / "report" / "contact_sheet.png").stat().st_size > 0
    assert (out / "report" / "stats.json").exists()
    from layerloop.datasets.shards import read_samples

    samples = list(read_samples(out))
    assert len(samples) == result.ok
    for sample in samples:
        sample.validate()
        assert composite_error(sample.composite, sample.foreground, sample.background) <= 1
        assert sample.caption and sample.meta["stages"]["matting"]["backend"] == "closed-form"


def test_shards_load_with_webdataset_ray_and_hf(local_run, ray_local):
    import webdataset as wds

    out, result = local_run
    tars = sorted(str(p) for p in out.glob("demo-*.tar"))
    records = list(wds.WebDataset(tars, shardshuffle=False))  # no decoder: raw member bytes
    assert len(records) == result.ok
    assert Image.open(io.BytesIO(records[0]["foreground.png"])).mode == "RGBA"
    assert Image.open(io.BytesIO(records[0]["mask.png"])).mode == "L"

    rows = ray_local.data.read_webdataset(tars).take_all()
    assert len(rows) == result.ok

    from datasets import load_dataset

    hf = load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert len(hf) == result.ok
    first = hf[0]
    fg = np.asarray(first["foreground.png"])
    bg = np.asarray(first["background.png"])
    comp = np.asarray(first["composite.png"])
    assert fg.shape[2] == 4 and composite_error(comp, fg, bg) <= 1


def test_local_and_ray_executors_give_identical_bytes(local_run, ray_local, tmp_path):
    out, _ = local_run
    ray_out = tmp_path / "ray"
    build(load_config("demo", SMALL + ["executor=ray"]), out=ray_out, progress=False)
    assert shard_bytes(ray_out) == shard_bytes(out)
    assert pq.read_table(ray_out / "failures.parquet").equals(pq.read_table(out / "failures.parquet"))


def test_rerun_skips_committed_shards(local_run):
    out, _ = local_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("demo-*.tar")}
    again = build(load_config("demo", SMALL + ["executor=local"]), out=out, progress=False)
    assert again.shards_skipped == 4 and again.shards_built == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("demo-*.tar")} == before


def test_killed_build_resumes_to_the_same_bytes(local_run, tmp_path):
    out, _ = local_run
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "layerloop.cli", "build", "demo", "--out", str(killed), "--executor",
               "local", "--no-progress", *SMALL]
    for _attempt in range(3):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not list(killed.glob("demo-*.parquet")):
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        status = RunDirectory(killed).read_run_json()["status"]
        if status == "running":
            break
    assert status == "running", "the build finished before it could be killed"
    committed = len(list(killed.glob("demo-*.parquet")))
    assert 1 <= committed < 4
    result = build(load_config("demo", SMALL + ["executor=local"]), out=killed, progress=False)
    assert result.shards_skipped == committed
    assert shard_bytes(killed) == shard_bytes(out)
    assert not list(killed.glob("*.tmp-*"))


def test_second_concurrent_build_refuses(tmp_path, capsys):
    from layerloop.cli import main

    with RunDirectory(tmp_path / "busy"):
        code = main(["build", "demo", "--out", str(tmp_path / "busy"), "--executor", "local", *SMALL])
    assert code == 2
    assert "in use by another layerloop run" in capsys.readouterr().err


def test_resume_with_another_config_refuses(local_run, capsys):
    from layerloop.cli import main

    out, _ = local_run
    code = main(["build", "demo", "--out", str(out), "--executor", "local", *SMALL, "seed=5"])
    assert code == 2 and "different config" in capsys.readouterr().err


def test_resume_with_other_pool_sizes_continues_and_earlier_fingerprints_are_accepted(local_run, tmp_path):
    """A stage's actor-pool size, CPUs and GPUs place the work but do not change the bytes: a run resumes
    with other values (a data engineer adds GPUs to a pool). A run.json written when they still counted in
    the fingerprint is accepted and rewritten with today's."""
    import json
    import shutil

    from layerloop.config import load_config as load

    out = tmp_path / "run"
    shutil.copytree(local_run[0], out)
    resized = load("demo", SMALL + ["executor=local", "stages.matting.concurrency=3", "stages.matting.cpus=2"])
    assert resized.fingerprint() == load("demo", SMALL + ["executor=local"]).fingerprint()
    result = build(resized, out=out, progress=False)
    assert result.shards_skipped == result.shards_total == 4
    assert shard_bytes(out) == shard_bytes(local_run[0])

    # run.json as a build before 2026-12-04 wrote it, with other pool sizes: the fingerprint then counted them
    earlier = load("demo", SMALL + ["executor=local", "stages.matting.concurrency=5"])
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "config": earlier.model_dump(mode="json"),
                                              "fingerprint": earlier._fingerprint(scheduling=True)}))
    assert build(resized, out=out, progress=False).shards_skipped == 4
    assert json.loads((out / "run.json").read_text())["fingerprint"] == resized.fingerprint()
    # another config is still refused, under either definition, and so is a record that does not add up
    other = load("demo", SMALL + ["executor=local", "seed=5", "stages.matting.concurrency=3"])
    for config, fingerprint in [(other, other._fingerprint(scheduling=True)), (other, other.fingerprint()),
                                (earlier, other._fingerprint(scheduling=True))]:
        (out / "run.json").write_text(json.dumps({**record, "config": config.model_dump(mode="json"),
                                                  "fingerprint": fingerprint}))
        with pytest.raises(RunMismatchError, match="different config"):
            build(resized, out=out, progress=False)


def test_messy_source_finishes_with_readable_failures(tmp_path):
    """Every kind of messy input: good ones land in shards, bad ones in failures.parquet with a reason."""
    from layerloop.datasets.shards import read_samples
    from tests.messy_inputs import make_messy_rorem

    expected = make_messy_rorem(tmp_path / "messy")
    config = load_config("demo", ["executor=local", "stages.load.short_side=64", "shards.samples_per_shard=4",
                                  "report.rows=3"])
    config.source = {"type": "rorem", "path": str(tmp_path / "messy"), "name": "messy"}
    result = build(config, out=tmp_path / "run", progress=False)

    failures = {row["key"]: row for row in pq.read_table(tmp_path / "run" / "failures.parquet").to_pylist()}
    written = {s.meta["source_id"] for s in read_samples(tmp_path / "run")}
    good = {sid for sid, reason in expected.items() if reason is None}
    bad = {sid: reason for sid, reason in expected.items() if reason is not None}
    assert good <= written, f"good inputs missing from the shards: {good - written}"
    assert result.ok == len(written) and result.failed == len(failures)
    messages = " | ".join(f"{r['stage']}: {r['message']}" for r in failures.values())
    for sid, reason in bad.items():
        assert sid not in written
        assert reason.lower() in messages.lower(), f"{sid}: expected a failure mentioning {reason!r}"
