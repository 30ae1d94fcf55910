"""A Ray cluster with num_gpus=1 on one node: GPU stages run there (in an actor pool) and compute on the
CPU when CUDA is absent. Runs in a subprocess because it needs its own multi-node cluster, not the shared
local Ray of the other tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.background import BackgroundChild

SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

from layerloop.config import load_config
from layerloop.datasets.shards import read_samples
from layerloop.pipelines.build import build

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0,
                                                         "object_store_memory": 100 * 1024**2})
gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 1024**2)
ray.init(address=cluster.address, log_to_driver=False)
config = load_config("demo", ["executor=ray", "source.n=4", "source.size=64", "stages.load.short_side=64",
                              "shards.samples_per_shard=2", "report.enabled=false",
                              "stages.matting.backend=vitmatte", "stages.matting.model=tiny",
                              "stages.matting.gpus=1", "stages.matting.crop=false"])
result = build(config, out=sys.argv[1], progress=False)
# the GCS actor table (the state API needs the dashboard, which ray[data] does not install)
from ray._private.state import actors as actor_table
actors = [(a["ActorClassName"], a["Address"]["NodeID"]) for a in actor_table().values()]
devices = sorted({s.meta["stages"]["matting"].get("device", "?") for s in read_samples(sys.argv[1])})
print("RESULT " + json.dumps({"gpu_node": gpu_node.node_id, "actors": actors, "ok": result.ok,
                              "failed": result.failed, "devices": devices}))
ray.shutdown()
cluster.shutdown()
"""


CHILD = BackgroundChild()


def start_in_background(work: Path) -> None:
    """The cluster script, started when the session collects this test (``tests/conftest.py``): its minute
    of Ray start-up and actor scheduling overlaps the rest of the suite."""
    CHILD.start([sys.executable, "-c", SCRIPT, str(work / "run")], work, Path(__file__).resolve().parents[2])


def stop_background() -> None:
    CHILD.stop()


@pytest.mark.ray
def test_gpu_stage_runs_on_the_gpu_node_with_cpu_fallback(tmp_path):
    start_in_background(tmp_path)  # a no-op when the session started it
    result = CHILD.result(timeout=400)
    assert result["ok"] == 4 and result["failed"] == 0
    stage_actors = [node for name, node in result["actors"] if "_StageActor" in name]
    assert stage_actors, result["actors"]
    assert set(stage_actors) == {result["gpu_node"]}
    assert result["devices"] == ["cpu"]  # declared a GPU, no CUDA here: computed on the CPU
