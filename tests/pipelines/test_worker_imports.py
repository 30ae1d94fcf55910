"""What the Ray workers of a stateless build import: not torch, nor webdataset (whose ``__init__`` imports it).

The method, and why it is not flaky: the build runs in a subprocess with a Ray of its own (the session's
``ray_local`` workers are reused by every test, and any earlier model test may have imported torch in them,
so looking into their ``sys.modules`` after the build would depend on test order). The subprocess puts a
``sitecustomize.py`` on ``PYTHONPATH``; every Python process started from it, Ray's workers included, loads
it at start-up. It installs an import watcher that appends the process's argv and the importing stack to a
log the moment ``torch`` is imported for the first time in that process, so nothing depends on which worker
ran which task, on worker reuse or on timing. A canary import in a Ray task after the build proves that the
watcher runs in the workers (otherwise an empty log would prove nothing).

The shard writer used to bring torch into every worker: it wrote with webdataset's ``TarWriter``, and
webdataset's ``__init__`` imports torch (webdataset 1.0: every submodule import runs the package
``__init__``); 2-3 s and ~470 MiB per worker process (issue #16, goal 3). It now writes the same bytes with
``tarfile`` (``shards.TarRecordWriter``, pinned to webdataset's bytes by ``tests/datasets/test_shards.py``),
so no import of torch or webdataset is allowed in a worker of a stateless build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WATCHER = '''
import os, sys, traceback

_LOG = os.environ.get("LAYERLOOP_TEST_IMPORT_LOG")
_WATCHED = ("torch", "webdataset", "layerloop_import_canary")


class _ImportWatcher:
    def find_spec(self, name, path=None, target=None):
        if _LOG and name in _WATCHED and name not in sys.modules:
            with open(os.path.join(_LOG, f"{os.getpid()}-{name}.log"), "a") as log:
                log.write(repr(sys.argv) + "\\n" + "".join(traceback.format_stack()) + "\\n")
        return None


sys.meta_path.insert(0, _ImportWatcher())
'''

BUILD = '''
import sys

import ray

from layerloop.config import load_config
from layerloop.pipelines.build import build

out = sys.argv[1]
config = load_config("demo", ["source.n=4", "source.size=64", "stages.load.short_side=64",
                              "shards.samples_per_shard=2", "executor=ray", "ray.num_cpus=2"])
result = build(config, out=out, executor="ray", progress=False, report=False)
assert result.ok + result.failed == 4, result.summary()


@ray.remote(num_cpus=1)
def canary():
    try:
        import layerloop_import_canary  # noqa: F401 - does not exist: only the watcher sees the attempt
    except ImportError:
        pass


ray.get([canary.remote() for _ in range(4)])
ray.shutdown()
'''



def _worker_logs(log_dir: Path, name: str) -> list[str]:
    return [text for path in sorted(log_dir.glob(f"*-{name}.log"))
            if "default_worker.py" in (text := path.read_text()).splitlines()[0]]


@pytest.mark.ray
def test_stateless_ray_build_imports_neither_torch_nor_webdataset_in_its_workers(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WATCHER)
    log_dir = tmp_path / "imports"
    log_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a Ray of its own
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[2]),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    env["LAYERLOOP_TEST_IMPORT_LOG"] = str(log_dir)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(BUILD), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]

    assert _worker_logs(log_dir, "layerloop_import_canary"), "the watcher did not run in the Ray workers"
    for name in ("torch", "webdataset"):
        stacks = _worker_logs(log_dir, name)
        assert not stacks, f"a Ray worker of a stateless build imported {name}:\n" + stacks[0][-3000:]


PIN = """
import sys
from layerloop.pipelines.executors import pin_threads
pin_threads(1)
assert "torch" not in sys.modules
pin_threads(3)
import torch
assert torch.get_num_threads() == 3, torch.get_num_threads()
assert type(torch.__spec__.loader).__module__ != "layerloop.pipelines.executors"  # torch's own loader
assert not any(type(f).__module__ == "layerloop.pipelines.executors" for f in sys.meta_path)
pin_threads(2)
assert torch.get_num_threads() == 2
"""


def test_pin_threads_pins_torch_when_it_is_imported_later():
    """``pin_threads`` in a fresh interpreter: torch is not imported, and gets the last pinned thread count
    the moment something imports it (a model stage's ``setup``, the evaluate stage's measures)."""
    done = subprocess.run([sys.executable, "-c", PIN], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


PRELOAD = '''
import os
import sys

import ray

from layerloop.config import RayConfig
from layerloop.pipelines.executors import RayExecutor
from layerloop.pipelines.worker_preload import PRELOAD_ENV

RayExecutor(RayConfig(num_cpus=1)).init_ray(preload=["preload_fails", "preload_ok", "no_such_module_here"])
assert PRELOAD_ENV not in os.environ, "the driver's environment was not restored"
assert "preload_ok" not in sys.modules, "the driver preloaded"


@ray.remote(num_cpus=1)
def seen():
    return sorted(name for name in ("preload_ok", "preload_fails") if name in sys.modules)


print("SEEN", ray.get([seen.remote() for _ in range(2)], timeout=120))
ray.shutdown()
'''


@pytest.mark.ray
def test_a_local_ray_preloads_the_pipelines_modules_in_its_workers_and_survives_a_failing_one(tmp_path):
    """``init_ray(preload=...)``: every worker of the local Ray imports the listed modules as it starts (the task
    only looks into ``sys.modules``), and a module that raises at import or does not exist is logged and
    skipped: Ray itself would kill every worker it starts on a failing preload."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "preload_ok.py").write_text("")
    (site / "preload_fails.py").write_text("raise RuntimeError('this module fails at import')\n")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a Ray of its own
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[2]),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELOAD)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SEEN [['preload_ok'], ['preload_ok']]" in done.stdout, done.stdout[-2000:]


def test_a_stateless_pipeline_names_what_its_workers_import_and_a_pipeline_with_actors_nothing(tmp_path):
    from layerloop.config import load_config
    from layerloop.pipelines.pipeline import Pipeline

    names = Pipeline.from_config(load_config("demo", []), tmp_path / "run").worker_imports()
    assert names[0] == "layerloop.pipelines.executors"
    assert {"layerloop.datasets.shards", "layerloop.stages.matting", "pymatting"} <= set(names)
    assert len(names) == len(set(names))
    assert not any(name == "torch" or name.startswith("torch.") for name in names)
    with_actor = load_config("demo", ["stages.matting.backend=vitmatte"])
    assert Pipeline.from_config(with_actor, tmp_path / "run").worker_imports() == []


def test_init_ray_joins_a_running_local_ray_without_the_preload(monkeypatch):
    """Without an address ``ray.init`` joins a Ray that ``ray start`` left running on the machine, and refuses a
    system config for it (Ray 2.60's message below): the build then joins it as it did before the preload."""
    import ray

    from layerloop.config import RayConfig
    from layerloop.pipelines.executors import RayExecutor

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs.get("_system_config"):
            raise ValueError("When connecting to an existing cluster, _system_config must not be provided.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    RayExecutor(RayConfig()).init_ray(preload=["json"])
    assert [sorted(call) for call in calls] == [
        ["_system_config", "ignore_reinit_error", "include_dashboard", "log_to_driver"],
        ["ignore_reinit_error", "include_dashboard", "log_to_driver"]]

    def refuses(**kwargs):
        raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.setattr(ray, "init", refuses)  # any other refusal is the user's to see
    with pytest.raises(ValueError, match="num_cpus"):
        RayExecutor(RayConfig(num_cpus=2)).init_ray(preload=["json"])
