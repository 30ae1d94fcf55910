"""Self-improvement rounds (docs/architecture.md, "Self-improvement rounds"): filter policies that turn
candidates' scores into accept/reject decisions with reasons (``policies.py``)."""

from layerloop.selfimprove.policies import (
    Decision,
    PolicyError,
    apply_policy,
    describe,
    dump_policy,
    load_policy,
)

__all__ = ["Decision", "PolicyError", "apply_policy", "describe", "dump_policy", "load_policy"]
