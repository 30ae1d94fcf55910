"""Ray Train across nodes that share no disk, with ``--out`` on S3 (moto's server on 127.0.0.1): each node
has its own staging base (``LAYERLOOP_STAGING_DIR`` set per node), so a worker can only see what the
store gives it. A run stopped after its first checkpoint resumes from the store on a driver that has no
staging folder any more, and ends with the weights of the same run written to a folder every node sees;
a run whose rank-0 node is killed after its first stored checkpoint resumes from it on a spare node.

Runs in a child process (its own three-node cluster and S3 server), started when the session collects
this test (``tests/conftest.py``), so its minutes overlap the rest of the suite."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.background import BackgroundChild

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


KILL_STEPS = 16


def _config(data_url: str, steps: int = 4):
    from layerloop.training import load_train_config

    return load_train_config({
        "name": "ray-nodes", "family": "bfs", "stage": "stage1", "model": "tiny", "steps": steps, "lr": 1e-2,
        "batch_size": 1, "checkpoint_every": 2, "keep": 2, "seed": 1, "executor": "ray", "num_workers": 2,
        "ray": {"cpus_per_worker": 1, "max_failures": 3}, "data": [{"name": "q", "run_dir": data_url}],
        "task": {"resolution": 16, "phi_checkpoint": "untrained"}})


def _kill_rank0_node(cluster, nodes: dict, work: Path, fs, prefix: str, staging_name: str, done) -> dict:
    """Wait for the first checkpoint on the store, then kill the node whose copy holds checkpoints (rank 0's:
    the writer) without warning; a spare node takes its place when Ray Train restarts the group."""
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not done.is_set():
        try:
            # complete checkpoints (trainer.pt is written, so uploaded, after the weights)
            stored = [name for name in fs.find(prefix) if "/checkpoints/step-" in name and name.endswith("trainer.pt")]
        except FileNotFoundError:
            stored = []
        if stored:
            for name, node in nodes.items():
                if (work / name / staging_name / "checkpoints").is_dir():
                    step = max(int(n.split("/checkpoints/step-")[1][:6]) for n in stored)
                    cluster.remove_node(node, allow_graceful=False)
                    return {"victim": name, "stored_step_at_kill": step}
        time.sleep(0.02)
    return {"victim": None, "stored_step_at_kill": None}


def _node_env(work: Path, name: str) -> dict[str, str]:
    """A node's own staging base and model cache: what it sees of the disk."""
    from layerloop import storage

    return {storage.STAGING_ENV: str(work / name), storage.CACHE_ENV: str(work / name / "cache")}


def _self_improve_on_nodes(work: Path, fs, bucket: str) -> dict:
    """One round of the tiny BFS loop with --out on S3 on the two live 1-CPU worker nodes, against the same
    loop run in this process into a local folder; then the same command on a driver without a staging
    folder, which finds the round done on the store."""
    import shutil

    import torch

    from layerloop import storage
    from layerloop.selfimprove.loop import read_events, self_improve
    from tests.selfimprove.test_selfimprove_loop import accepted_keys, bfs_config

    torch.set_num_threads(1)  # a Ray step's trainer runs one thread (it holds one CPU): outputs depend on it
    os.environ[storage.STAGING_ENV] = str(work / "loop-driver")
    reference = self_improve(bfs_config(), rounds=1, out=work / "loop-local", progress=False)
    url = f"s3://{bucket}/loop"
    with storage.Staged(url) as local:
        first = self_improve(bfs_config(executor="ray"), rounds=1, out=local, progress=False)
        events = read_events(local)
    name = storage.staging_dir(url).name
    scores = "rounds/round-000/scores.parquet"
    stored = sorted(n[len(f"{bucket}/loop/"):] for n in fs.find(f"{bucket}/loop"))
    result = {
        "reference": reference["rounds"], "first": first["rounds"], "stored": stored, "driver": _files(local),
        "accepted": sorted(accepted_keys(local / scores)), "reference_accepted":
            sorted(accepted_keys(work / "loop-local" / scores)),
        "pids": sorted({e["pid"] for e in events if e["event"] == "done" and e["round"] >= 0}),
        "copies": {node: _files(work / node / name) for node in ("head", "node-0", "node-1", "node-2")
                   if (work / node / name).is_dir()},
        "data_equal": all((local / n).read_bytes() == (work / "loop-local" / n).read_bytes()
                          for n in _files(local) if n.startswith("data/") and n.endswith((".tar", ".parquet")))}
    shutil.rmtree(work / "loop-driver")  # another machine: the store holds the loop
    with storage.Staged(url) as local:
        again = self_improve(bfs_config(executor="ray"), rounds=1, out=local, progress=False)
        result["again"] = again["rounds"]
        result["skipped"] = sorted({e["step"] for e in read_events(local)[len(events):] if e["event"] == "skip"})
    return result


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _orchestrate(work: Path) -> dict:
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    from layerloop import storage
    from layerloop.training import run_training
    from tests.test_storage import S3Server
    from tests.training.test_ray_train import write_shards

    server = S3Server()
    os.environ.update(server.env)  # the nodes started below inherit the endpoint and the fake credentials
    os.environ[storage.STAGING_ENV] = str(work / "driver")
    os.environ[storage.CACHE_ENV] = str(work / "driver-cache")
    bucket = server.bucket()
    data = write_shards(work / "data")
    fs = storage.filesystem("s3")
    for path in sorted(data.iterdir()):
        fs.put_file(str(path), f"{bucket}/data/{path.name}")
    data_url, out_url = f"s3://{bucket}/data", f"s3://{bucket}/train"

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * MB, "include_dashboard": False,
        "env_vars": _node_env(work, "head")})
    try:
        nodes = {f"node-{i}": cluster.add_node(num_cpus=1, object_store_memory=100 * MB,
                                               env_vars=_node_env(work, f"node-{i}"))
                 for i in range(2)}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        alive = len([n for n in ray.nodes() if n["Alive"]])
        shared = run_training(_config(data_url), work / "shared")  # a folder every node sees: the reference
        with storage.Staged(out_url) as local:
            first = run_training(_config(data_url), local, stop_at=2)
        shutil.rmtree(work / "driver")  # another machine: only the store holds the first two steps
        with storage.Staged(out_url) as local:
            second = run_training(_config(data_url), local)
        # Rank 0's node killed mid-training: the restarted group (a spare node in its place) resumes from the
        # last checkpoint rank 0 uploaded, and ends with the weights of an uninterrupted run.
        import threading

        nodes["node-2"] = cluster.add_node(num_cpus=1, object_store_memory=100 * MB,
                                           env_vars=_node_env(work, "node-2"))
        cluster.wait_for_nodes()
        kill_url = f"s3://{bucket}/train-kill"
        reference = run_training(_config(data_url, KILL_STEPS), work / "kill-reference")
        done, kill = threading.Event(), {}
        watcher = threading.Thread(target=lambda: kill.update(_kill_rank0_node(
            cluster, nodes, work, fs, f"{bucket}/train-kill", storage.staging_dir(kill_url).name, done)))
        watcher.start()
        try:
            with storage.Staged(kill_url) as kill_local:
                killed = run_training(_config(data_url, KILL_STEPS), kill_local)
        finally:
            done.set()
            watcher.join()
        kill_metrics = [json.loads(line)["step"] for line in
                        fs.cat_file(f"{bucket}/train-kill/metrics.jsonl").decode().splitlines()]
        loop = _self_improve_on_nodes(work, fs, bucket)
    finally:
        ray.shutdown()
        cluster.shutdown()
    prefix = f"{bucket}/train/"
    stored = sorted(name[len(prefix):] for name in fs.find(prefix.rstrip("/")))
    weights = {name: (fs.cat_file(prefix + name) == (work / "shared" / name).read_bytes())
               for name in stored if name.endswith(".safetensors")}
    metrics = [json.loads(line)["step"] for line in fs.cat_file(prefix + "metrics.jsonl").decode().splitlines()]
    copies = {name: _files(work / name / local.name) if (work / name / local.name).is_dir() else None
              for name in ("head", "node-0", "node-1")}
    kill.update(hash=fs.cat_file(f"{bucket}/train-kill/final/checkpoint_hash.txt").decode().strip(),
                reference_hash=reference["checkpoint_hash"], metrics=kill_metrics, summary=killed)
    server.stop()
    return {"nodes": alive, "kill": kill, "loop": loop, "shared_step": shared["step"], "first": first, "second": second, "stored": stored,
            "weights": weights, "metrics": metrics, "driver": _files(local), "copies": copies}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("RESULT " + json.dumps(_orchestrate(Path(sys.argv[1]))))
    sys.exit(0)


CHILD = BackgroundChild()


def start_in_background(work: Path) -> None:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    CHILD.start([sys.executable, __file__, str(work)], work, REPO, {"PYTHONPATH": path})


def stop_background() -> None:
    CHILD.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("moto.server")
    start_in_background(tmp_path_factory.mktemp("ray-train-nodes"))  # a no-op when the session started it
    return CHILD.result(timeout=600)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_on_nodes_without_a_shared_disk_writes_and_resumes_through_the_store(runs):
    run = runs
    assert run["nodes"] == 3 and run["shared_step"] == 4
    assert run["first"]["step"] == 2 and run["first"]["stopped"]
    assert run["second"]["resumed_from"] == 2 and run["second"]["step"] == 4
    driver = run["second"]["out_dir"]  # rank 0's node copy elsewhere; the summary names the command's folder
    assert run["second"]["final"] == driver + "/final" and "/driver/" in driver
    assert run["metrics"] == [1, 2, 3, 4]  # the resumed run appended to the stored log, nothing twice
    # the store holds the run (checkpoints, final weights, records), not Ray's copies, leases or temporaries
    assert "final/checkpoint_hash.txt" in run["stored"] and "train.json" in run["stored"]
    assert not [k for k in run["stored"] if k.startswith("ray/") or ".tmp-" in k or k.endswith("run.lease")]
    assert run["weights"] and all(run["weights"].values()), run["weights"]  # = the shared-folder run's bytes
    assert run["driver"] == run["stored"]  # the command's folder is the store again after the hand-off
    # The two worker nodes each made their own copy and resumed from the stored step-2 checkpoint; rank 0's
    # holds what it wrote (the final weights), the other's only what it read. The head (no CPU) ran none.
    copies = run["copies"]
    assert copies["head"] is None
    for name in ("node-0", "node-1"):
        assert copies[name] and "checkpoints/step-000002/trainer.pt" in copies[name], copies
    assert sum("final/checkpoint_hash.txt" in copies[name] for name in ("node-0", "node-1")) == 1, copies


@pytest.mark.ray
@pytest.mark.slow
def test_self_improvement_on_nodes_without_a_shared_disk_runs_through_the_store(runs):
    """Every step in a node copy of the loop's staging folder, its builds writing to the store: the round
    equals the same loop run in one process (checkpoint, accepted samples, built data byte for byte)."""
    loop = runs["loop"]
    assert loop["first"] == loop["reference"] == loop["again"], loop
    assert loop["accepted"] == loop["reference_accepted"] and loop["accepted"]
    assert loop["data_equal"]
    assert loop["driver"] == loop["stored"]  # the command's folder is the store again
    assert "rounds/round-000/steps/report.json" in loop["stored"] and "report/index.html" in loop["stored"]
    assert not [k for k in loop["stored"] if ".tmp-" in k or k.endswith("run.lease")]
    # Steps ran in copies on more than one node; the train step (it holds a CPU) on a worker node (the head
    # has none), in that node's own copy. (Copies of later steps hold the trained LoRA too: they pulled it.)
    trained = [n for n, files in loop["copies"].items() if "rounds/round-000/train/final/checkpoint_hash.txt" in files]
    assert len(loop["copies"]) >= 2 and set(trained) - {"head"}, loop["copies"].keys()
    assert {"data", "mix", "train", "generate", "filter", "report"} <= set(loop["skipped"]), loop["skipped"]


@pytest.mark.ray
@pytest.mark.slow
def test_rank0_node_killed_mid_training_resumes_from_the_store_to_the_same_weights(runs):
    kill = runs["kill"]
    assert kill["victim"], "no checkpoint reached the store before training ended"
    assert kill["stored_step_at_kill"] < KILL_STEPS, "the node was killed after training finished"
    assert kill["metrics"] == list(range(1, KILL_STEPS + 1)), "a step is missing or was logged twice"
    # the new group started from the store (a later checkpoint may have been uploaded before the node died)
    assert KILL_STEPS > kill["summary"]["resumed_from"] >= kill["stored_step_at_kill"]
    assert kill["hash"] == kill["reference_hash"] == kill["summary"]["checkpoint_hash"]
