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
