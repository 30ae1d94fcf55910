"""Imported by every worker process of a local Ray that a stateless build starts, while Ray is still starting.

A plain Ray task of a stateless build (``executors.RayExecutor._run_tasks``) first imports layerloop's
pipeline, source, shard writer and stage modules and the libraries the stages call (pymatting, and numba's
cached functions through it: about 1 s of CPU in a fresh process). Ray prestarts one worker per CPU at
``ray.init``; ``RayExecutor.init_ray`` names this module in Ray's ``preload_python_modules``, so each of
those workers imports the modules listed in ``LAYERLOOP_RAY_PRELOAD`` (comma-separated, set for the nodes'
processes while ``ray.init`` starts them) as it starts, alongside Ray's own start-up, instead of in its
first task (issue #16, goal 3; benchmarks/RESULTS.md).

Ray imports the modules of ``preload_python_modules`` unguarded: one that fails to import kills every worker
it starts, over and over. So Ray is only ever given this module, which is part of layerloop and imports
nothing at its top but the standard library, and it imports the listed modules one by one and logs, never
raises, when one fails (the task that needs it then fails on its own import, naming the sample).
"""

from __future__ import annotations

import importlib
import logging
import os

PRELOAD_ENV = "LAYERLOOP_RAY_PRELOAD"

logger = logging.getLogger(__name__)


def preload(names: list[str]) -> None:
    """Import each module; log, never raise, when one fails."""
    for name in names:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as error:  # a module that exits at import must not end the worker either
            logger.warning("layerloop could not preload %s in this Ray worker: %s: %s", name,
                           type(error).__name__, error)


def listed(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


preload(listed(os.environ.get(PRELOAD_ENV)))
