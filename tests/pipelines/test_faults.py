"""Failure injection on a multi-node Ray cluster (three nodes on this machine).

* A worker node dies mid-build (after the first shard committed): the build still finishes through task
  retries, every source key ends exactly once in a shard or in ``failures.parquet``, and the shards are
  byte-identical to a local-executor run of the same config.
* The driver is SIGKILLed mid-build: re-running the same command resumes (committed shards skipped) to
  the same bytes as an uninterrupted run.

The cluster, the build drivers and the kills run in a child process (``python test_faults.py WORKDIR``,
the ``__main__`` block below): this test needs a cluster of its own, and the session's shared ``ray_local``
fixture may already have connected this pytest process to another Ray, which a driver cannot leave and
rejoin elsewhere. The pytest process only reads what the child left on disk.

* A worker node dies while a self-improvement loop (Ray executor) generates round 0's candidates (a node
  with a stage actor but not the step task, when there is one: Ray restarts the actor on the nodes left
  while the build goes on): the loop finishes, every candidate is scored once, and the rounds accept what a
  local run of the same config accepts. (``tests/pipelines/test_liveness.py`` checks the plan sizing that
  keeps a task slot after such a restart, and the stall guards, without a cluster.)

A failed assertion prints a short cause (last error line, running step, a few log lines) and the path of
the full log; the child runs with ``LAYERLOOP_RAY_STALL_TIMEOUT_S=90`` so that a stalled build or loop
ends with its own message well before the test's timeouts.
* A worker node hosting one of two Ray Train workers dies mid-training (after the first checkpoint): the
  worker group restarts on the remaining nodes, resumes from the newest checkpoint, finishes every step
  once, and ends with the same weights (checkpoint hash) as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.background import BackgroundChild

REPO = Path(__file__).resolve().parents[2]
# 12 shards of 2 samples: enough shards that a kill after the first commit lands mid-build on two
# 1-CPU workers, small enough (64 px) that each build takes seconds.
OVERRIDES = ["source.n=24", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=2",
             "report.enabled=false"]
NUM_SHARDS = 12
MB = 1024**2


# ----------------------------------------------------------------------- the child process (cluster)
def _committed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("demo-*.parquet"))


def _wait_for_first_commit(run_dir: Path, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _committed(run_dir):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _driver(run_dir: Path, address: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "layerloop.cli", "build", "demo", "--out", str(run_dir), "--executor", "ray",
               "--address", address, "--no-progress", *OVERRIDES]
    with open(run_dir.parent / f"{run_dir.name}.log", "ab") as log:  # the child keeps its own copy
        # cwd = repository root: a stray module in a scratch directory must not shadow a standard one
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, timeout: float) -> int | str:
    """The process's exit code, or "timeout" (and the process killed) when it runs past ``timeout``."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return "timeout"


ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Interrupt|Exit)\b|error:|Error:).*")


def cause(log: Path, events: Path | None = None, lines: int = 4) -> str:
    """A few lines that say why a run failed: the last error line of its log, the step that was running
    (a self-improvement loop's ``events.jsonl``), the log's last lines, and where the full log is."""
    text = log.read_text(errors="replace") if log.exists() else ""
    rows = [line.rstrip() for line in text.splitlines() if line.strip()]
    errors = [line.strip() for line in rows if ERROR_LINE.match(line)]
    out = [f"last error: {errors[-1][:400] if errors else '(none in the log)'}"]
    if events is not None and events.exists():
        open_steps: dict = {}
        for line in events.read_text().splitlines():
            event = json.loads(line)
            name = (event["round"], event["step"])
            if event["event"] == "start":
                open_steps[name] = event["time"]
            else:
                open_steps.pop(name, None)
        running = [f"round {k} {step} (started {time.time() - t:.0f} s ago)"
                   for (k, step), t in open_steps.items() if step != "loop"]
        out.append(f"running step: {', '.join(running) or 'none'}")
    out += ["last lines:", *(f"  {line[:200]}" for line in rows[-lines:])]
    out.append(f"full log: {log}")
    return "\n".join(out)


def _tail(run_dir: Path) -> str:
    return cause(run_dir.parent / f"{run_dir.name}.log")


def _kill_worker_scenario(cluster, work: Path) -> dict:
    out = work / "node_kill"
    process = _driver(out, cluster.address)
    started = _wait_for_first_commit(out, process, timeout=150)
    committed_at_kill = len(_committed(out))
    victim = next(iter(cluster.worker_nodes))
    if started and process.poll() is None:
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL raylet, object store and its workers
        removed = True
    else:
        removed = False
    rc = _wait(process, 150)
    return {"run_dir": str(out), "removed": removed, "committed_at_kill": committed_at_kill, "rc": rc,
            "log": _tail(out)}


def _kill_driver_scenario(cluster, work: Path) -> dict:
    for attempt in range(3):  # a very fast machine may finish before the kill; then try a fresh directory
        out = work / f"driver_kill_{attempt}"
        process = _driver(out, cluster.address)
        started = _wait_for_first_commit(out, process, timeout=150)
        process.send_signal(signal.SIGKILL)
        process.wait()
        status = json.loads((out / "run.json").read_text())["status"] if (out / "run.json").exists() else None
        if started and status == "running":
            break
    committed_after_kill = len(_committed(out))
    rerun = _driver(out, cluster.address)
    rc = _wait(rerun, 150)
    return {"run_dir": str(out), "status_after_kill": status, "committed_after_kill": committed_after_kill,
            "rc": rc, "log": _tail(out), "log_path": str(out.parent / f"{out.name}.log")}


TRAIN_STEPS = 16


def _train_config(work: Path, data: Path) -> Path:
    import yaml

    path = work / "train_fault.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fault-train", "family": "bfs", "stage": "stage1", "model": "tiny", "steps": TRAIN_STEPS,
        "lr": 1e-2, "batch_size": 1, "checkpoint_every": 2, "keep": 2, "seed": 1, "executor": "ray",
        "num_workers": 2, "ray": {"cpus_per_worker": 1, "max_failures": 3},
        "data": [{"name": "demo", "run_dir": str(data)}], "task": {"resolution": 16, "phi_checkpoint": "untrained"},
    }))
    return path


def _trainer(config: Path, out: Path, address: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "layerloop.cli", "train", str(config), "--out", str(out), f"ray.address={address}"]
    with open(out.parent / f"{out.name}.log", "ab") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _nodes_running(cluster, marker: str = "RayTrainWorker") -> list:
    """Worker nodes that host a process whose title contains ``marker`` (``ray::RayTrainWorker...``,
    ``ray::_run_one`` ...) below their raylet."""
    import psutil

    hosts = []
    for node in cluster.worker_nodes:
        pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
        for pid in pids:
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            titles = []
            for child in children:
                try:
                    titles.append(" ".join(child.cmdline()))
                except psutil.Error:
                    pass
            if any(marker in t for t in titles):
                hosts.append(node)
                break
    return hosts


def _kill_training_scenario(cluster, work: Path, data: Path) -> dict:
    config = _train_config(work, data)
    out = work / "train_kill"
    out.mkdir()
    process = _trainer(config, out, cluster.address)
    checkpoints = out / "checkpoints"
    deadline, victim, step_at_kill = time.time() + 240, None, None
    while time.time() < deadline and process.poll() is None:
        done = sorted(p.name for p in checkpoints.glob("step-*")) if checkpoints.is_dir() else []
        if done:
            hosts = _nodes_running(cluster)
            if hosts:
                victim, step_at_kill = hosts[0], int(done[-1].split("-")[1].split(".")[0])
                cluster.remove_node(victim, allow_graceful=False)
                break
        time.sleep(0.05)
    rc = _wait(process, 300)
    reference = work / "train_reference"
    reference.mkdir()
    ref_process = _trainer(config, reference, cluster.address)
    ref_rc = _wait(ref_process, 300)
    log = out.parent / f"{out.name}.log"
    return {"out": str(out), "reference": str(reference), "killed": victim is not None, "step_at_kill": step_at_kill,
            "rc": rc, "reference_rc": ref_rc, "log": cause(log)}


def loop_config() -> dict:
    """A tiny BFS self-improvement loop (the shape of tests/selfimprove's), on the Ray executor."""
    return {
        "name": "si-fault", "family": "bfs", "seed": 0, "executor": "ray",
        "base": [{"name": "base", "build": "demo",
                  "overrides": ["source.n=8", "source.size=64", "stages.load.short_side=64"]}],
        "held": {"name": "held", "build": "demo",
                 "overrides": ["source.n=6", "source.seed=1", "source.size=64", "stages.load.short_side=64",
                               "shards.samples_per_shard=2"]},
        "train": {"config": "train_bfs_demo", "overrides": ["steps=4", "checkpoint_every=2", "batch_size=2",
                                                           "shuffle_buffer=8"]},
        "generate": {"variants": 2, "samples_per_shard": 2, "stages": [
            {"stage": "load", "short_side": 32, "multiple_of": 16},
            {"stage": "box-mask", "padding": 0.05},
            {"stage": "generate-bfs", "steps": 2, "batch_size": 2}]},
        "scoring": [{"stage": "score", "metrics": ["recomposition"]}, {"stage": "alpha-sanity"},
                    {"stage": "dedupe", "threshold": 8}],
        "policy": {"name": "t", "all": [
            {"threshold": {"column": "alpha_empty", "op": "==", "value": False}},
            {"topk": {"column": "recomposition_mean", "k": 1, "by": "input_key", "keep": "bottom"}}]},
        "accepted_per_shard": 2,
    }


def _kill_loop_scenario(cluster, work: Path) -> dict:
    import yaml

    config = work / "si_fault.yaml"
    config.write_text(yaml.safe_dump(loop_config()))
    out = work / "loop_kill"
    out.mkdir()
    command = [sys.executable, "-m", "layerloop.cli", "self-improve", str(config), "--rounds", "2", "--out", str(out)]
    log_path = work / "loop_kill.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_ADDRESS": cluster.address})
    events = out / "events.jsonl"
    deadline, killed, generating_since = time.time() + 300, None, None
    while time.time() < deadline and process.poll() is None and killed is None:
        if generating_since is None and events.exists() and '"step": "generate"' in events.read_text():
            generating_since = time.time()
        if generating_since is not None:
            # A node with a stage actor but not the step task: the build goes on in the step while Ray
            # restarts the actor on the nodes left (the case that once hung: the restarted actor took the
            # CPU the tasks between the pools needed). After 30 s without one, the step's own node, if it is
            # a worker (the step is retried and resumes), or any node with an actor.
            step_hosts = _nodes_running(cluster, "selfimprove:round-000:generate")
            actor_hosts = _nodes_running(cluster, "MapWorker")
            victims = [n for n in actor_hosts if n not in step_hosts]
            if not victims and time.time() - generating_since > 30:
                victims = step_hosts + actor_hosts
            if victims:
                killed = "MapWorker" if victims[0] in actor_hosts else "selfimprove:round-000:generate"
                cluster.remove_node(victims[0], allow_graceful=False)
        time.sleep(0.1)
    rc = _wait(process, 400)
    return {"out": str(out), "killed": killed, "rc": rc, "log": cause(log_path, events)}


def _orchestrate(work: Path) -> dict:
    from ray.cluster_utils import Cluster

    # Fast health checks: the GCS declares a killed node dead in about a second instead of ~30 s, so
    # the retries start while the test is still short.
    system_config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                     "health_check_failure_threshold": 2}
    # The head has no CPU, so every task runs on the two 1-CPU workers and killing one hits real work.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * MB, "include_dashboard": False,
        "_system_config": system_config})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
        cluster.wait_for_nodes()
        node_kill = _kill_worker_scenario(cluster, work)
        cluster.add_node(num_cpus=1, object_store_memory=100 * MB)  # back to two workers
        cluster.wait_for_nodes()
        driver_kill = _kill_driver_scenario(cluster, work)
        cluster.add_node(num_cpus=1, object_store_memory=100 * MB)  # three: two trainers and a spare
        cluster.wait_for_nodes()
        train_kill = _kill_training_scenario(cluster, work, Path(node_kill["run_dir"]))
        cluster.add_node(num_cpus=1, object_store_memory=100 * MB)  # back to three workers
        cluster.wait_for_nodes()
        loop_kill = _kill_loop_scenario(cluster, work)
    finally:
        cluster.shutdown()
    return {"node_kill": node_kill, "driver_kill": driver_kill, "train_kill": train_kill, "loop_kill": loop_kill}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("RESULT " + json.dumps(_orchestrate(Path(sys.argv[1]))))
    sys.exit(0)


# ------------------------------------------------------------------------------- the tests (pytest)
def shard_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).glob("demo-*")) if p.suffix in (".tar", ".parquet")}


def tar_keys(run_dir: Path) -> list[str]:
    """Every sample key in the committed tars, duplicates kept (members share a key per sample)."""
    keys = []
    for tar_path in sorted(Path(run_dir).glob("demo-*.tar")):
        with tarfile.open(tar_path) as tar:
            keys.extend(m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json"))
    return keys


def source_keys(run_dir: Path) -> list[str]:
    from layerloop.datasets.sources import RoremSource

    return [item.key for item in RoremSource(Path(run_dir) / "demo-data", name="demo").items()]


CHILD = BackgroundChild()


def start_in_background(work: Path) -> None:
    """Start the child (the cluster and its scenarios) without waiting for it; ``fault_runs`` collects it.
    ``tests/conftest.py`` calls this when the session has collected these tests: the child spends its
    minutes mostly waiting on Ray (node deaths, retries, restarts), so it runs while the rest of the suite
    does."""
    # PYTHONPATH: the script's own imports (tests.background) resolve from the repository root
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    CHILD.start([sys.executable, __file__, str(work)], work, REPO,
                {"LAYERLOOP_RAY_STALL_TIMEOUT_S": "90", "PYTHONPATH": path})


def stop_background() -> None:
    CHILD.stop()


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    pytest.importorskip("ray")
    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    start_in_background(tmp_path_factory.mktemp("faults"))  # a no-op when the session started it
    runs = CHILD.result(timeout=900, explain=lambda: cause(CHILD.work / "child.err"))
    runs["seconds"] = time.perf_counter() - CHILD.started
    reference = tmp_path_factory.mktemp("faults") / "local"
    build(load_config("demo", OVERRIDES + ["executor=local"]), out=reference, progress=False)
    runs["reference"] = str(reference)
    return runs


@pytest.mark.ray
def test_worker_node_killed_mid_build_finishes_with_every_key_once(fault_runs):
    run = fault_runs["node_kill"]
    out = Path(run["run_dir"])
    assert run["removed"], f"the build ended before a worker node could be killed:\n{run['log']}"
    assert 1 <= run["committed_at_kill"] < NUM_SHARDS
    assert run["rc"] == 0, f"the build did not survive the node kill:\n{run['log']}"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["attempts"] == 1  # finished by retries, not by a re-run

    keys = source_keys(out)
    written = tar_keys(out)
    failed = pq.read_table(out / "failures.parquet").column("key").to_pylist()
    assert len(written) == len(set(written)), "a sample was written twice"
    assert len(failed) == len(set(failed)), "a failure was recorded twice"
    assert not set(written) & set(failed)
    assert sorted(written + failed) == sorted(keys)
    index_rows = [row for p in sorted(out.glob("demo-*.parquet")) for row in pq.read_table(p).to_pylist()]
    assert sorted(r["key"] for r in index_rows) == sorted(keys)

    assert shard_bytes(out) == shard_bytes(Path(fault_runs["reference"]))


@pytest.mark.ray
def test_killed_driver_resumes_to_the_same_bytes(fault_runs):
    run = fault_runs["driver_kill"]
    out = Path(run["run_dir"])
    assert run["status_after_kill"] == "running", "the build finished before the driver could be killed"
    assert 1 <= run["committed_after_kill"] < NUM_SHARDS
    assert run["rc"] == 0, f"the resumed build failed:\n{run['log']}"
    # the re-run's summary line; workers of the killed driver may still have committed a shard or two
    # after the count was taken, so the re-run skips at least what was committed by then
    log = Path(run["log_path"]).read_text(errors="replace")
    summary = re.findall(r"shards: (\d+) \((\d+) built now, (\d+) already committed\)", log)
    assert summary, f"no summary line in the re-run's log:\n{run['log']}"
    total, built, skipped = map(int, summary[-1])
    assert total == NUM_SHARDS and built + skipped == NUM_SHARDS and skipped >= run["committed_after_kill"]
    assert json.loads((out / "run.json").read_text())["attempts"] == 2
    assert shard_bytes(out) == shard_bytes(Path(fault_runs["reference"]))
    assert not list(out.glob("*.tmp-*"))


@pytest.mark.ray
def test_worker_node_killed_mid_training_resumes_to_the_same_weights(fault_runs):
    run = fault_runs["train_kill"]
    out, reference = Path(run["out"]), Path(run["reference"])
    assert run["killed"], f"no node hosting a training worker was found before training ended:\n{run['log']}"
    assert run["step_at_kill"] < TRAIN_STEPS, "the node was killed after training finished"
    assert run["rc"] == 0, f"training did not survive the node kill:\n{run['log']}"
    assert run["reference_rc"] == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1)), "a step is missing or was logged twice"
    hash_of = lambda d: (d / "final" / "checkpoint_hash.txt").read_text().strip()  # noqa: E731
    assert hash_of(out) == hash_of(reference)


@pytest.mark.ray
def test_worker_node_killed_mid_self_improvement_round_loses_nothing(fault_runs, tmp_path):
    from layerloop.selfimprove.loop import round_dir, self_improve

    run = fault_runs["loop_kill"]
    out = Path(run["out"])
    assert run["killed"], f"no worker node ran the generate step or its actors:\n{run['log']}"
    assert run["rc"] == 0, f"the loop did not survive the node kill:\n{run['log']}"
    # Model outputs on the CPU depend on torch's thread count (float reductions): the Ray steps and stage
    # actors hold one CPU each here and run one thread, so the local reference does too.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = self_improve({**loop_config(), "executor": "local"}, rounds=2, out=tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    for k in range(2):
        scores = pq.read_table(round_dir(out, k) / "scores.parquet").to_pylist()
        keys = [r["key"] for r in scores]
        assert len(keys) == len(set(keys)) == 12 and all(r["status"] == "ok" for r in scores)  # 6 inputs x 2
        written = [key for tar in sorted((round_dir(out, k) / "candidates").glob("candidates-*.tar"))
                   for key in _json_keys(tar)]
        assert sorted(written) == sorted(keys), "a candidate was lost or written twice"
        expected = pq.read_table(round_dir(tmp_path / "reference", k) / "scores.parquet").to_pylist()
        assert {r["key"] for r in scores if r["accepted"]} == {r["key"] for r in expected if r["accepted"]}
        info = json.loads((round_dir(out, k) / "round.json").read_text())
        assert info["checkpoint_hash"] == reference["rounds"][k]["checkpoint_hash"]


def _json_keys(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
