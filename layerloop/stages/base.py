"""The stage contract (docs/architecture.md, "Stages").

A stage is a small class that declares what it needs and does one thing:

* ``name``: the registry name configs use (``stage: matting``);
* ``Params``: a pydantic model of its configurable parameters (unknown keys are an error);
* ``resources``: cpus / gpus / memory one worker needs (GPU stages run in Ray actor pools);
* ``batch_size``: how many samples ``process_batch`` receives at once;
* ``setup()``: loads models once per worker or actor;
* ``process_batch(samples)``: returns the samples, each either filled in or marked failed.

Most CPU stages only implement ``process_sample``; the default ``process_batch`` calls it per sample and
turns an exception into a recorded failure. Model stages override ``process_batch`` to batch inference.
``run_stage`` is what executors call: it skips samples that already failed and falls back to one-by-one
processing when a whole batch raises, so one bad sample never takes its batch mates down.

Randomness: ``self.rng(sample)`` is seeded from (run seed, sample key, stage name) only, so results do not
depend on workers, batch composition or order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from layerloop.samples import LayeredSample
from layerloop.seeds import rng_for


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None  # bytes one worker needs, for Ray scheduling


class StageParams(BaseModel):
    """Base of every stage's parameters. ``batch_size`` and the resource fields override the class
    defaults from a config (for example ``gpus: 1`` on a cluster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int | None = None
    cpus: float | None = None
    gpus: float | None = None
    concurrency: int | None = None  # Ray actor pool size; None: the executor decides


class SamplerParams(StageParams):
    """Parameters every diffusion-sampling stage has (generate-bfs, decompose-incontext, fill-baseline)."""

    steps: int = Field(28, ge=1)  # Euler steps (FluxFillPipeline's default is 50; 28 as FLUX dev)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (tiny models are always float32)


class Stage:
    name: ClassVar[str] = "stage"
    Params: ClassVar[type[StageParams]] = StageParams
    resources: Resources = Resources()
    batch_size: int = 8
    # The ``work`` keys this stage reads, optional ones (``work.get``) included; None: not declared, so every
    # key is kept for it. Under Ray Data an op hands on only the keys a later stage reads (``work_read_by``):
    # ``work`` holds three quarters of a sample's bytes after matting (float alpha and colours).
    reads_work: ClassVar[frozenset[str] | None] = None

    def __init__(self, params: StageParams | None = None, seed: int = 0, **kwargs: Any):
        self.params = params if params is not None else self.Params(**kwargs)
        self.seed = int(seed)
        if self.params.batch_size is not None:
            self.batch_size = self.params.batch_size
        if self.params.cpus is not None or self.params.gpus is not None:
            self.resources = Resources(
                cpus=self.params.cpus if self.params.cpus is not None else self.resources.cpus,
                gpus=self.params.gpus if self.params.gpus is not None else self.resources.gpus,
                memory=self.resources.memory,
            )
        self._is_setup = False

    # ------------------------------------------------------------------ hooks
    @property
    def needs_actor(self) -> bool:
        """Stages that load something in ``setup`` or use GPUs run in actor pools under Ray."""
        return type(self).setup is not Stage.setup or self.resources.gpus > 0

    def setup(self) -> None:
        """Load models once per worker/actor. Default: nothing to load."""

    def worker_imports(self) -> tuple[str, ...]:
        """Modules this stage imports on its first call (libraries it imports where it uses them), which a
        local Ray's workers import as they start (``Pipeline.worker_imports``). Its own module is counted
        already. Default: none."""
        return ()

    def process_sample(self, sample: LayeredSample) -> LayeredSample:
        raise TypeError(f"{type(self).__name__} must implement process_sample or process_batch")

    def process_batch(self, samples: list[LayeredSample]) -> list[LayeredSample]:
        out = []
        for sample in samples:
            try:
                out.append(self.process_sample(sample))
            except Exception as error:  # one sample's failure is recorded, not raised
                out.append(sample.fail(self.name, error))
        return out

    # ---------------------------------------------------------------- helpers
    def ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()
            self._is_setup = True

    def rng(self, sample: LayeredSample) -> np.random.Generator:
        return sample_rng(self.seed, sample.key, self.name)

    def models(self) -> list[Any]:
        """``ModelRef``s of the weights this stage loads (``layerloop models list|pull``, pre-flight)."""
        return []

    @classmethod
    def score_columns(cls, params: dict[str, Any]) -> tuple[str, ...]:
        """Keys this stage writes to ``meta["scores"]`` with these (unvalidated, config) parameters; filter
        policies are checked against them before a self-improvement loop starts."""
        return ()

    def describe(self) -> dict[str, Any]:
        """Parameters recorded in each sample's metadata (excluding scheduling knobs)."""
        return self.params.model_dump(exclude={"batch_size", "cpus", "gpus", "concurrency"}, mode="json")

    @property
    def device(self) -> str:
        """The torch device this stage computes on: CUDA when it declared GPUs and CUDA exists."""
        if self.resources.gpus > 0:
            import torch

            if torch.cuda.is_available():
                return "cuda"
        return "cpu"


def work_read_by(stages: list[Stage]) -> frozenset[str] | None:
    """The ``work`` keys any of ``stages`` reads; None when one of them does not declare its reads."""
    keys: set[str] = set()
    for stage in stages:
        if stage.reads_work is None:
            return None
        keys |= stage.reads_work
    return frozenset(keys)


def keep_work(samples: list[LayeredSample], keys: frozenset[str] | None) -> list[LayeredSample]:
    """Drop each sample's ``work`` entries outside ``keys`` (None: keep all); ``work`` never reaches a shard."""
    if keys is not None:
        for sample in samples:
            for key in [key for key in sample.work if key not in keys]:
                del sample.work[key]
    return samples


def sample_rng(seed: int, key: str, stage: str) -> np.random.Generator:
    """The generator of one (run seed, sample key, stage): the same draws on any executor and resume."""
    return rng_for(seed, key, stage)


def run_stage(stage: Stage, samples: list[LayeredSample]) -> list[LayeredSample]:
    """Apply one stage to a list of samples in ``stage.batch_size`` chunks, keeping order.

    Failed samples pass through untouched. If ``process_batch`` itself raises (a batching stage that
    could not isolate the culprit), the batch is retried one sample at a time so that only the bad
    sample is marked failed."""
    stage.ensure_setup()
    out: list[LayeredSample] = []
    live = [s for s in samples if s.ok]
    results: dict[int, LayeredSample] = {}
    for start in range(0, len(live), max(1, stage.batch_size)):
        batch = live[start : start + stage.batch_size]
        try:
            processed = stage.process_batch(batch)
            if len(processed) != len(batch):
                raise RuntimeError(f"stage {stage.name} returned {len(processed)} samples for {len(batch)}")
        except Exception:
            processed = []
            for sample in batch:
                try:
                    processed.extend(stage.process_batch([sample]))
                except Exception as error:
                    processed.append(sample.fail(stage.name, error))
        for original, result in zip(batch, processed):
            results[id(original)] = result
    for sample in samples:
        out.append(results.get(id(sample), sample))
    return out
