"""Self-improvement rounds (docs/architecture.md, "Self-improvement rounds"): filter policies that turn
candidates' scores into accept/reject decisions with reasons (``policies.py``), the loop that trains,
generates, filters and feeds back (``loop.py``, its steps in ``steps.py`` and ``filter.py``), its reports
(``report.py``) and lineage tracing (``lineage.py``)."""

from layerloop.selfimprove.policies import (
    Decision,
    PolicyError,
    apply_policy,
    describe,
    dump_policy,
    load_policy,
)

__all__ = ["Decision", "PolicyError", "apply_policy", "describe", "dump_policy", "load_policy"]
