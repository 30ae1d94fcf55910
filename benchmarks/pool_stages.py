"""Benchmark-only stages for ``model_pool.py`` (issue #16 goal 4). Not shipped: registered when this module
is imported, which ``BenchPipeline`` makes every Ray worker do.

* ``model-wait``: stands in for a GPU model. It declares itself a model stage as the real ones do (a
  ``setup()`` that "loads the model", so it runs in an actor pool under Ray; ``resources``/``gpus``,
  ``batch_size`` and ``concurrency`` from its parameters; ``models()``: none to pull) and sleeps
  ``wait_s`` per batch of ``batch_size`` samples, as a host thread waits for its GPU: no CPU used. Each
  batch's wall-clock start and end go to ``<log_dir>/busy-<pid>-<n>.jsonl``, one file per stage instance
  (= per pool actor under Ray). Samples pass through unchanged, so the shards equal the chain's without it.
* ``feed-stamp``: a stateless CPU stage put right before ``model-wait``: it records when a shard group's
  CPU stages finished (``<log_dir>/feed-<pid>.jsonl``), so that an idle gap of the pool can be split into
  "its input was not computed yet" and "hand-over" (pickling, object store, Ray Data scheduling).

Timestamps are ``time.time()``: every process of the benchmark (also the simulated cluster's nodes) runs on
this machine, so they share one clock.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from pydantic import Field

from layerloop.pipelines.pipeline import Pipeline
from layerloop.samples import LayeredSample
from layerloop.stages.base import Stage, StageParams
from layerloop.stages.registry import register_stage

_INSTANCES = itertools.count()


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


class ModelWaitParams(StageParams):
    wait_s: float = Field(0.2, ge=0.0)  # seconds per batch of batch_size samples (the "model" time)
    log_dir: str | None = None  # where each actor writes its busy intervals; None: nowhere


@register_stage
class ModelWaitStage(Stage):
    name = "model-wait"
    Params = ModelWaitParams
    reads_work = frozenset()  # as the real model stages that end a build (caption, score)
    batch_size = 8  # as the real model stages (matting 8, BLIP-2 16, CLIP/HPS 32 in configs/rorem.yaml)

    def models(self) -> list:
        return []  # nothing to pull: the stand-in has no weights

    def setup(self) -> None:
        """The "model load": only opens this instance's log (an overridden setup() is what makes a stage
        an actor-pool stage under Ray)."""
        self._log = None
        if self.params.log_dir:
            self._log = Path(self.params.log_dir) / f"busy-{os.getpid()}-{next(_INSTANCES)}.jsonl"
            _append(self._log, {"setup": time.time()})

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        self.ensure_setup()
        start = time.time()
        time.sleep(self.params.wait_s)
        end = time.time()
        if self._log is not None:
            _append(self._log, {"start": start, "end": end, "n": len(samples), "key": samples[0].key})
        return samples

    def describe(self) -> dict:
        return {"wait_s": self.params.wait_s}


class FeedStampParams(StageParams):
    log_dir: str


@register_stage
class FeedStampStage(Stage):
    name = "feed-stamp"
    Params = FeedStampParams
    reads_work = frozenset()
    batch_size = 1 << 30  # one call per shard group: the moment the group's CPU stages are done

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        _append(Path(self.params.log_dir) / f"feed-{os.getpid()}.jsonl",
                {"ready": time.time(), "key": samples[0].key, "n": len(samples)})
        return samples


class BenchPipeline(Pipeline):
    """A ``Pipeline`` whose pickle names this module, so unpickling it in a Ray worker imports the module
    and registers the stages above before the worker builds its stages. Ray puts the driver script's folder
    (``benchmarks/``) on its workers' ``sys.path``, so ``pool_stages`` is importable there.

    With ``log_dir`` set, it also records when each shard group's read starts and when its write starts
    and ends (``<log_dir>/io-<pid>.jsonl``): where the CPU side spends its time."""

    log_dir: str | None = None

    def _io(self, what: str, key: str, started: float) -> None:
        if self.log_dir:
            _append(Path(self.log_dir) / f"io-{os.getpid()}.jsonl",
                    {"io": what, "start": started, "end": time.time(), "key": key})

    def read(self, items):
        started = time.time()
        samples = super().read(items)
        self._io("read", items[0].key if items else "", started)
        return samples

    def write(self, index, samples):
        started = time.time()
        summary = super().write(index, samples)
        self._io("write", samples[0].key if samples else "", started)
        return summary
