"""Shard integrity on real builds (local executor, tiny demo config): a resume verifies what it skips
(size and sha256 recorded in the parquet index) and rebuilds a damaged shard to the same bytes; a writer
of a driver that lost the run (killed, a new driver took the lock) refuses to commit."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from layerloop.config import load_config
from layerloop.datasets.shards import (TMP_MARK, RunOwner, RunOwnershipLost, ShardWriter, check_shard,
                                       parse_lock, read_samples)
from layerloop.pipelines.build import build
from layerloop.pipelines.pipeline import Pipeline
from layerloop.pipelines.runs import RunDirectory
from tests.test_samples import make_quadruple

OVERRIDES = ["source.n=8", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=4",
             "executor=local"]


def tiny_config():
    return load_config("demo", OVERRIDES)


def shard_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())
            if p.suffix in (".tar", ".parquet") and p.name != "failures.parquet"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "run"
    result = build(tiny_config(), out=out, executor="local", progress=False, report=False)
    assert (result.shards_total, result.ok) == (2, 8)
    return out


@pytest.fixture
def run_copy(built, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(built, out)
    return out


# ----------------------------------------------------------------------------------- the record
def test_built_indexes_record_their_tars(built):
    for index in sorted(built.glob("demo-*.parquet")):
        tar = index.with_suffix(".tar")
        metadata = pq.read_metadata(index).metadata
        assert int(metadata[b"layerloop.tar_size"]) == tar.stat().st_size
        assert metadata[b"layerloop.tar_sha256"].decode() == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert check_shard(tar, index).status == "ok"


# ------------------------------------------------------------------------------------- resume
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def forget_record(index: Path) -> None:
    pq.write_table(pq.read_table(index).replace_schema_metadata(None), index)


def test_resume_rebuilds_damaged_shards_to_the_same_bytes(built, run_copy):
    truncate(run_copy / "demo-000001.tar")
    flip(run_copy / "demo-000000.tar")
    result = build(tiny_config(), out=run_copy, executor="local", progress=False, report=False)
    assert (result.shards_built, result.shards_skipped, result.ok, result.failed) == (2, 0, 8, 0)
    assert shard_files(run_copy) == shard_files(built)
    assert [s.key for s in read_samples(run_copy)] == [s.key for s in read_samples(built)]

    result = build(tiny_config(), out=run_copy, executor="local", progress=False, report=False)
    assert (result.shards_built, result.shards_skipped) == (0, 2)  # intact now: verified and skipped


@pytest.mark.parametrize("damage", ["delete tar", "corrupt index", "index without record"])
def test_resume_rebuilds_what_it_cannot_verify(built, run_copy, damage):
    if damage == "delete tar":
        (run_copy / "demo-000001.tar").unlink()
    elif damage == "corrupt index":
        (run_copy / "demo-000001.parquet").write_bytes(b"PAR1 garbage")
    else:
        forget_record(run_copy / "demo-000001.parquet")
    result = build(tiny_config(), out=run_copy, executor="local", progress=False, report=False)
    assert (result.shards_built, result.shards_skipped, result.ok) == (1, 1, 8)
    assert shard_files(run_copy) == shard_files(built)


def test_retried_task_verifies_the_committed_shard(built, run_copy):
    """``Pipeline.run_group`` (what a retried Ray task runs) skips an intact shard, rebuilds a damaged one."""
    pipeline = Pipeline.from_config(tiny_config(), run_copy)
    task = pipeline.plan().tasks[1]
    stages = pipeline.build_stages()
    assert pipeline.run_group(task, stages).skipped
    truncate(run_copy / "demo-000001.tar")
    summary = pipeline.run_group(task, stages)
    assert not summary.skipped and summary.ok == 4
    assert list(run_copy.glob(f"*{TMP_MARK}*")) == []
    assert pipeline.writer.damaged[1].startswith("tar is ")
    assert shard_files(run_copy) == shard_files(built)


# ---------------------------------------------------------------------------------- ownership
def leftovers(run: Path, stem: str) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(stem))


def test_writer_of_a_replaced_driver_refuses_to_commit(tmp_path):
    def samples(shard: int) -> list:
        return [make_quadruple(f"t_{shard}_{i}", seed=i) for i in range(2)]

    first = RunDirectory(tmp_path).acquire()
    token_a = first.owner_token
    orphan = ShardWriter(tmp_path, "t", owner=first.owner)
    orphan = pickle.loads(pickle.dumps(orphan))  # as it travels to a Ray worker inside the pipeline
    assert orphan.write(0, samples(0)).ok == 2  # while its driver owns the run, it commits

    first.release()  # the driver is gone (SIGKILL releases the flock the same way) ...
    with RunDirectory(tmp_path) as second:  # ... and a new driver took the run
        token_b = second.owner_token
        assert token_b != token_a
        with pytest.raises(RunOwnershipLost) as lost:
            orphan.write(1, samples(1))
        message = str(lost.value)
        assert token_a in message and token_b in message and "commit shard t-000001" in message
        assert f"pid {os.getpid()}" in message
        assert leftovers(tmp_path, "t-000001") == []  # no tar, no index, no temporaries

        # nor may it remove a shard it finds damaged: that is the new owner's decision
        truncate(tmp_path / "t-000000.tar")
        with pytest.raises(RunOwnershipLost, match="remove damaged shard t-000000"):
            orphan.committed_summary(0)
        assert leftovers(tmp_path, "t-000000") == ["t-000000.parquet", "t-000000.tar"]

        owner = ShardWriter(tmp_path, "t", owner=second.owner)
        assert owner.write(1, samples(1)).ok == 2
        assert owner.committed_summary(0).problem.startswith("shard t-000000 rebuilt: tar is ")
        assert owner.write(0, samples(0)).ok == 2
    assert [s.key for s in read_samples(tmp_path)] == ["t_0_0", "t_0_1", "t_1_0", "t_1_1"]


def test_writer_without_owner_commits_unconditionally(tmp_path):
    with RunDirectory(tmp_path):
        assert ShardWriter(tmp_path, "t").write(0, [make_quadruple("t_0")]).ok == 1


def test_workers_of_a_killed_driver_cannot_commit_after_a_new_driver_starts(tmp_path):
    """A real driver process holds the run and is SIGKILLed; its token is what its workers carry."""
    code = ("import sys, time\nfrom layerloop.pipelines.runs import RunDirectory\n"
            "run = RunDirectory(sys.argv[1]).acquire()\nprint(run.owner_token, flush=True)\ntime.sleep(120)\n")
    driver = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        token_a = driver.stdout.readline().strip()
        assert parse_lock((tmp_path / "run.lock").read_text())[0] == token_a
        worker = ShardWriter(tmp_path, "t", owner=RunOwner(token_a, tmp_path / "run.lock", "the killed driver"))
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stdout.close()
    with RunDirectory(tmp_path) as new_driver:  # the kernel released the dead driver's flock
        with pytest.raises(RunOwnershipLost, match=f"{token_a}.*{new_driver.owner_token}"):
            worker.write(0, [make_quadruple("t_0")])
    assert leftovers(tmp_path, "t-") == []
