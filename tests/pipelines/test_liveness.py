"""A Ray Data build must not wait forever after a worker node dies.

The hang these guard against (tests/pipelines/test_faults.py, self-improvement node kill): the round's
generation build (load/box-mask tasks -> generate-bfs actor -> score tasks -> dedupe actor -> write task) was
planned on three 1-CPU nodes as "1 + 1 CPU for the two actors, 1 for tasks", which used every CPU. A node with
an actor died, Ray restarted the actor on the CPU the tasks had used, and the tasks between the pools waited
for a CPU forever (``ray.available_resources()`` without CPU, both actors alive, one with one restart; Ray
Data's log: ``MapBatches(_read_and_process) ... Queued blocks: 3 ... backpressured:tasks(ResourceBudget)
... budget=(cpu=0.0`` for 400 s).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from layerloop.pipelines import executors
from layerloop.pipelines.executors import plan_cpus, stage_groups


def fake_stage(name: str, actor: bool, cpus: float = 1.0, concurrency: int | None = None):
    return SimpleNamespace(name=name, needs_actor=actor, resources=SimpleNamespace(cpus=cpus, gpus=0.0),
                           params=SimpleNamespace(concurrency=concurrency))


# The self-improvement loop's generation + scoring build, as its stage list groups.
GENERATE = [fake_stage("load", False), fake_stage("box-mask", False), fake_stage("generate-bfs", True),
            fake_stage("score", False), fake_stage("alpha-sanity", False), fake_stage("dedupe", True)]


def demands(stages, quantum):
    groups = stage_groups(stages)
    actors = [quantum or stages[i[0]].resources.cpus
              for kind, i in groups if kind == "actor" for _ in range(stages[i[0]].params.concurrency or 1)]
    task = quantum or max(stages[i].resources.cpus for kind, idx in groups if kind == "tasks" for i in idx)
    return actors, task


def task_room_after_losing(nodes: list[float], lost: int, actors: list[float], task: float) -> bool:
    """Whether, with node ``lost`` dead and every actor (re)started on the nodes left in the worst order
    Ray could choose, some node still has room for a task. Tries every placement (the plans are small)."""
    left = [cpus for i, cpus in enumerate(nodes) if i != lost]

    def place(k: int, free: list[float]) -> bool:  # True when every placement leaves a task room
        if k == len(actors):
            return any(f >= task - 1e-9 for f in free)
        options = [i for i, f in enumerate(free) if f >= actors[k] - 1e-9]
        if not options:
            return False  # the actor itself cannot restart: that waits forever too
        return all(place(k + 1, [f - actors[k] if j == i else f for j, f in enumerate(free)]) for i in options)

    return place(0, left)


@pytest.mark.parametrize("nodes", [[1, 1, 1], [1, 1, 1, 1], [2, 2], [2, 1, 1], [4, 4, 4], [8, 8]])
@pytest.mark.parametrize("stages", [GENERATE, GENERATE[:3], [fake_stage("gen", True, concurrency=2),
                                                             fake_stage("clip", True), fake_stage("t", False)]],
                         ids=["generate+score+dedupe", "generate", "pool-of-two"])
def test_plan_leaves_a_task_room_after_any_node_dies(nodes, stages):
    quantum = plan_cpus(stages, stage_groups(stages), [float(n) for n in nodes])
    actors, task = demands(stages, quantum)
    for lost in range(len(nodes)):
        assert task_room_after_losing(nodes, lost, actors, task), (
            f"nodes {nodes}, node {lost} dies: actors {actors} can take every CPU left, a {task} CPU task waits")
    if quantum is not None:  # equal fractions of whole CPUs: 1/m with m an integer
        assert math.isclose(1 / quantum, round(1 / quantum))


def test_the_plan_that_hung_is_no_longer_made():
    """Three 1-CPU nodes, generator + dedupe actors: sized on every CPU the plan was (1, 1) + 1 for tasks,
    and the loss of any node starved the tasks. Now every op asks for half a CPU."""
    actors, task = demands(GENERATE, None)
    assert sum(actors) + task == 3 and not task_room_after_losing([1, 1, 1], 0, actors, task)  # the old plan
    assert plan_cpus(GENERATE, stage_groups(GENERATE), [1.0, 1.0, 1.0]) == 0.5
    assert plan_cpus(GENERATE, stage_groups(GENERATE), [8.0]) is None  # one node: nothing to lose but all


def test_the_write_after_a_last_actor_pool_gets_a_cpu_on_the_whole_cluster():
    """A model stage last (the demo chain + a GPU model, benchmarks/model_pool.py): its shard-write task runs
    after the pool. On one 2-CPU node the actor (1) and a stage task (1) took both CPUs and Ray Data reserved
    none for the write op (shards written only after the last stage task; the pool idled once the object
    store's budget bound): every op now asks for half a CPU. Where the write fits, nothing changes."""
    model_last = [fake_stage("load", False), fake_stage("model", True)]
    model_inside = [fake_stage("load", False), fake_stage("model", True), fake_stage("box-mask", False)]
    assert plan_cpus(model_last, stage_groups(model_last), [2.0]) == 0.5
    assert plan_cpus(model_inside, stage_groups(model_inside), [2.0]) is None  # the write is fused into a task
    assert plan_cpus(model_last, stage_groups(model_last), [1.0, 1.0, 1.0]) is None  # 1 + 1 + 0.5 <= 3
    assert plan_cpus(model_last, stage_groups(model_last), [4.0]) is None


def test_alive_node_cpus_skips_dead_and_cpu_less_nodes(monkeypatch):
    ray = pytest.importorskip("ray")
    nodes = [{"Alive": True, "Resources": {"CPU": 0.0, "node:__internal_head__": 1.0}},  # a head without CPUs
             {"Alive": True, "Resources": {"CPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 1.0}},  # killed, still listed
             {"Alive": True, "Resources": {"CPU": 2.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert executors.alive_node_cpus() == [2.0, 1.0]
    assert executors.RayExecutor._task_concurrency(10) == 3


@pytest.mark.ray
def test_a_build_that_cannot_run_fails_with_one_clear_message(ray_local, tmp_path, monkeypatch):
    """A stage pool that waits for a resource the cluster does not have (a GPU on a CPU-only Ray) ends the
    build with BuildStalledError after the stall timeout, naming what the plan waits for."""
    from layerloop.config import load_config
    from layerloop.pipelines.build import build

    import ray.data

    monkeypatch.setenv(executors.STALL_TIMEOUT_ENV, "10")
    config = load_config("demo", ["source.n=2", "source.size=32", "stages.load.short_side=32",
                                  "shards.samples_per_shard=2", "report.enabled=false", "stages.caption.gpus=1",
                                  "executor=ray"])
    current = ray.data.DataContext.get_current()
    before = (current.execution_no_progress_timeout_s, current.max_errored_blocks, current.enable_progress_bars)
    with pytest.raises(executors.BuildStalledError) as raised:
        build(config, out=tmp_path / "out", progress=False)
    # the timeout is the build's own (its dataset's context): other datasets of the process keep theirs
    current = ray.data.DataContext.get_current()
    assert (current.execution_no_progress_timeout_s, current.max_errored_blocks,
            current.enable_progress_bars) == before
    message = str(raised.value)
    assert message.startswith("Ray Data build made no progress for 10 s")
    # 2 CPUs: the caption pool, a task and the shard write after the pool ask for half a CPU each (plan_cpus)
    assert "caption 1 x 0.5 CPU + 1 GPU" in message and "0 GPUs alive" in message
    assert len(message) < 1500


def test_a_loop_step_no_alive_node_can_run_fails_with_one_clear_message(tmp_path, monkeypatch):
    """The loop's driver does not wait forever for a step whose resources no alive node has (a local-trainer
    train step that asks for a CPU after the CPU nodes died): it names the step and what it waits for."""
    ray = pytest.importorskip("ray")
    from layerloop.selfimprove import loop

    for k, name in loop.plan_steps(1)[:2]:  # data and mix done: train is the step that runs now
        marker = loop._marker(tmp_path, k, name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    monkeypatch.setenv(executors.STALL_TIMEOUT_ENV, "0.2")
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: ([], refs))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 0.0}},
                                              {"Alive": False, "Resources": {"CPU": 1.0}}])
    requests = {step: {"CPU": 0.0, "GPU": 0.0} for step in loop.plan_steps(1)}
    requests[(0, "train")] = {"CPU": 1.0, "GPU": 0.0}
    with pytest.raises(loop.StepCannotRunError, match=r"step train of round 0 has waited 0 s for 1 CPU on one node; "
                                                       r"none of the 1 alive nodes has that"):
        loop._wait_for_steps(object(), tmp_path, 1, requests)
