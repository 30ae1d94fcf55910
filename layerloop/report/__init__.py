"""What is in a run directory: ``report/`` (contact sheet + stats), ``layerloop inspect`` and lineage tracing.

Everything here reads the per-shard parquet index first and opens a tar shard only for the samples it
shows, so a report on a run of millions of samples reads the index plus a handful of shards, never the
images of the whole run. One module per job:

* ``scan``: ``scan_run(run_dir)`` reads every shard index and says which shards are damaged and why
  (``RunIndex``); ``load_index(run_dir)`` is its table, with a ``shard`` column (the shard stem,
  ``<name>-NNNNNN``) so a row leads to the tar that holds its sample; ``RunIndex.ok_keys()`` the ok keys
  of the intact shards; ``choose_samples`` the seeded choice of what a report shows; ``read_records`` the
  raw records of a few keys.
* ``stats``: ``run_stats(run_dir)``, counts and distributions from the index alone (``stats.json``).
* ``sheet``: ``render_contact_sheet`` and its ``SheetLayout``.
* ``write``: ``write_report(run_dir, rows, seed)``: ``report/contact_sheet.png`` and ``report/stats.json``.
* ``inspection``: ``inspect_run(run_dir, samples)``, a plain-text summary for the CLI, and
  ``trace_sample(run_dir, key)``, one sample's full ``json`` member and index row.

A damaged shard never stops a report: it is named with what is wrong (``stats.json``'s
``damaged_shards``, a ``damaged:`` section of ``inspect``, ``shard_damage`` in a trace), its rows are left
out of the counts (a resumed build rebuilds it), and the contact sheet takes its rows from intact shards.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported from their modules on first use (PEP 562), so ``layerloop inspect`` never loads
# ``sheet``/``write`` (Pillow, the sample decoder) that only ``report`` needs (issue #16, goal 2).
_MODULE_OF = {
    "inspect_run": "inspection", "trace_sample": "inspection",
    "DamagedShardError": "scan", "RunIndex": "scan", "UnknownSampleError": "scan", "choose_samples": "scan",
    "load_index": "scan", "read_records": "scan", "scan_run": "scan",
    "LAYOUT": "sheet", "SheetLayout": "sheet", "render_contact_sheet": "sheet",
    "run_stats": "stats",
    "write_report": "write",
}

__all__ = ["load_index", "scan_run", "RunIndex", "DamagedShardError", "run_stats", "choose_samples",
           "read_records", "write_report", "render_contact_sheet",
           "inspect_run", "trace_sample", "SheetLayout", "LAYOUT", "UnknownSampleError"]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
