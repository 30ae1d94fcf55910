"""Self-improvement rounds (docs/architecture.md, "Self-improvement rounds"): filter policies that turn
candidates' scores into accept/reject decisions with reasons (``policies.py``), the loop that trains,
generates, filters and feeds back (``loop.py``, its steps in ``steps.py`` and ``filter.py``), its reports
(``report.py``) and lineage tracing (``lineage.py``).

The names below are ``policies``' and are imported on first use: ``layerloop inspect`` imports
``selfimprove.lineage`` and needs none of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerloop.selfimprove.policies import (Decision, PolicyError, apply_policy, describe, dump_policy,
                                                load_policy)

__all__ = ["Decision", "PolicyError", "apply_policy", "describe", "dump_policy", "load_policy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from layerloop.selfimprove import policies

        return getattr(policies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
