"""Shared fixtures. One local Ray instance serves every test that needs Ray (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEPT_ENV_VAR_OVERRIDE_ON_DRIVER", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; a missing model must fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, shut down at the end of the session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def pytest_collection_finish(session):
    """A test module that defines ``start_in_background(folder)`` gets it called once, with a fresh folder
    of the session's temporary directory, when the session will run any of its tests: work that takes
    minutes of mostly waiting (the multi-node fault scenarios) then runs alongside the rest of the suite.
    Its ``stop_background()`` is called when the session ends."""
    modules = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_in_background"):
            modules.setdefault(id(module), module)
    factory = session.config._tmp_path_factory  # the tmp_path_factory fixture's object (set at configure)
    for module in modules.values():
        module.start_in_background(factory.mktemp(module.__name__.rsplit(".", 1)[-1]))
    session.config._layerloop_background = list(modules.values())


def pytest_sessionfinish(session):
    for module in getattr(session.config, "_layerloop_background", []):
        module.stop_background()
