"""A pipeline: one source, an ordered list of configured stages, one shard sink.

It only composes. ``plan()`` partitions the source's items into shard groups up front (deterministic:
consecutive groups of ``samples_per_shard`` in the source's order), and ``run_group()`` takes one group
from source to committed shard: read, every stage in order, write. Both executors call ``run_group`` (or
its three parts), so they produce the same bytes.

To follow one sample: ``datasets/sources.py`` (read) -> the stage files named in the config, in order
(``stages/load.py``, ``stages/trimap.py``, ...) -> ``datasets/shards.py`` (write).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerloop.config import BuildConfig
from layerloop.datasets.base import Source, SourceItem
from layerloop.datasets.shards import ShardSummary, ShardWriter
from layerloop.files import sha256_text
from layerloop.samples import Failure, LayeredSample
from layerloop.stages.base import Stage, run_stage
from layerloop.stages.registry import build_stage


@dataclass(frozen=True)
class ShardTask:
    index: int
    items: tuple[SourceItem, ...]


@dataclass(frozen=True)
class Plan:
    tasks: tuple[ShardTask, ...]
    listing_failures: tuple[Failure, ...]
    keys_digest: str  # identifies the partition: resuming with another source listing is refused

    @property
    def num_items(self) -> int:
        return sum(len(t.items) for t in self.tasks)


class Pipeline:
    def __init__(self, source: Source, stage_specs: list[dict[str, Any]], writer: ShardWriter,
                 seed: int = 0, samples_per_shard: int = 16):
        self.source = source
        self.stage_specs = [dict(spec) for spec in stage_specs]
        self.writer = writer
        self.seed = seed
        self.samples_per_shard = samples_per_shard
        self.build_stages()  # validate every stage's parameters before any work starts

    @classmethod
    def from_config(cls, config: BuildConfig, out_dir: str | Path) -> Pipeline:
        """Everything checked here happens before the build takes its lock or writes anything. ``out_dir``
        may be a ``storage.StorePath`` (a run on an object store: ``stored_source_config``)."""
        from layerloop import storage
        from layerloop.datasets.sources import build_source

        stored = storage.is_remote(out_dir)  # a StorePath, or a store URL
        if stored:
            out_dir = storage.location(out_dir)
        return cls(
            source=build_source((stored_source_config if stored else source_config)(config.source, out_dir)),
            stage_specs=config.stages,
            writer=ShardWriter(out_dir, config.shards.name, png_level=config.shards.png_compress_level,
                               png_encoder=config.shards.png_encoder),
            seed=config.seed,
            samples_per_shard=config.shards.samples_per_shard,
        )

    # ----------------------------------------------------------------- plan
    def plan(self) -> Plan:
        items = self.source.items()
        size = self.samples_per_shard
        tasks = tuple(ShardTask(i // size, tuple(items[i : i + size])) for i in range(0, len(items), size))
        digest = sha256_text("\n".join(item.key for item in items), 16)
        return Plan(tasks, tuple(self.source.listing_failures()), digest)

    # ------------------------------------------------------------ the parts
    def build_stages(self) -> list[Stage]:
        return [build_stage(spec, seed=self.seed) for spec in self.stage_specs]

    def worker_imports(self) -> list[str]:
        """The modules a plain Ray task of this pipeline imports before it can work: its source's, its shard
        writer's and its stages' own modules and the libraries the stages import on first use
        (``Stage.worker_imports``). Empty when a stage runs in an actor pool: such a pipeline runs on Ray Data,
        whose actors and tasks are not the workers a local Ray prestarts for plain tasks."""
        stages = self.build_stages()
        if any(stage.needs_actor for stage in stages):
            return []
        names = ["layerloop.pipelines.executors", type(self.source).__module__, type(self.writer).__module__]
        for stage in stages:
            names += [type(stage).__module__, *stage.worker_imports()]
        return list(dict.fromkeys(names))

    def read(self, items: tuple[SourceItem, ...] | list[SourceItem]) -> list[LayeredSample]:
        samples = []
        for item in items:
            try:
                samples.append(self.source.read(item))
            except Exception as error:  # a missing row or unreadable container member
                samples.append(LayeredSample(key=item.key, meta={"source": item.source,
                                                                 "source_id": item.source_id}).fail("read", error))
        return samples

    @staticmethod
    def process(samples: list[LayeredSample], stages: list[Stage]) -> list[LayeredSample]:
        for stage in stages:
            samples = run_stage(stage, samples)
        return samples

    def write(self, index: int, samples: list[LayeredSample]) -> ShardSummary:
        return self.writer.write(index, samples)

    def run_group(self, task: ShardTask, stages: list[Stage]) -> ShardSummary:
        committed = self.writer.committed_summary(task.index)  # a retried task after a verified commit
        if committed.summary is not None:
            return committed.summary
        return self.write(task.index, self.process(self.read(task.items), stages))


def source_config(source: Any, out_dir: str | Path) -> dict[str, Any]:
    """The source section a build reads from, with the paths only the run directory decides.

    * ``demo``: the scenes are rendered inside the run directory (``OUT/demo-data``), never elsewhere.
      A ``path`` outside it is only read: it must be a folder made by ``layerloop demo-data`` with the
      same ``n``/``seed``/``size`` (its ``demo.json`` says so), and is then listed as a RORem folder; an
      empty or missing one is ignored (rendered inside the run directory); anything else is refused
      before any write, because it is somebody's data.
    * ``hf`` without ``cache_dir``: ``datasets``' cache goes to ``OUT/.cache/hf``, not the user's home.

    ``source`` is the config's typed section (``BuildConfig.source``) or a mapping; the result is a
    mapping of the keys as written plus the paths decided here, which ``build_source`` validates.
    """
    from layerloop.datasets.demo_scenes import demo_folder_state
    from layerloop.errors import UnsafePathError

    source = source.as_written() if hasattr(source, "as_written") else dict(source)
    out = Path(os.path.abspath(out_dir))
    if source.get("type") == "hf" and not source.get("cache_dir"):
        source["cache_dir"] = str(out / ".cache" / "hf")
    if source.get("type") != "demo":
        return source
    inside = out / "demo-data"
    given = source.get("path")
    if not given:
        return {**source, "path": str(inside)}
    path = Path(os.path.abspath(os.path.expanduser(str(given))))
    if path == out or out in path.parents:
        return {**source, "path": str(path)}
    state = demo_folder_state(path, int(source.get("n", 0)), int(source.get("seed", 0)), int(source.get("size", 256)))
    if state == "empty":
        return {**source, "path": str(inside)}
    if state == "complete":
        return {"type": "rorem", "path": str(path), "name": source.get("name", "demo")}
    n, seed, size = source.get("n"), source.get("seed", 0), source.get("size", 256)
    raise UnsafePathError(
        f"source.path={given}: {state}. A demo source renders its scenes inside the run directory and only "
        f"reads a folder made by `layerloop demo-data {given} --n {n} --seed {seed} --size {size}`. To build "
        f"from your own data, use a source of its type, e.g. a config with `source: {{type: rorem, path: {given}}}`.")


def stored_source_config(source: Any, run_dir: Any) -> dict[str, Any]:
    """``source_config`` for a run whose directory is on an object store, where nothing can be
    rendered or cached: a demo source must read a folder made by ``layerloop demo-data`` (its
    ``source.path``), and a Hugging Face source must name its local ``cache_dir``; either is refused
    otherwise, before any write, with the command that fixes it."""
    import tempfile

    from layerloop.errors import UnsafePathError

    written = source.as_written() if hasattr(source, "as_written") else dict(source)
    kind = written.get("type")
    if kind == "hf" and not written.get("cache_dir"):
        raise UnsafePathError(f"--out {run_dir} is on an object store, where datasets' cache cannot live: give the "
                              f"Hugging Face source a local cache folder (source.cache_dir=/local/cache/hf)")
    # A local directory that cannot exist: source_config decides nothing inside it for other source types.
    nowhere = os.path.join(tempfile.gettempdir(), f"layerloop-store-run-{os.getpid()}-does-not-exist")
    resolved = source_config(source, nowhere)
    if kind == "demo" and str(resolved.get("path", "")).startswith(nowhere):
        n, seed, size = written.get("n"), written.get("seed", 0), written.get("size", 256)
        raise UnsafePathError(
            f"--out {run_dir} is on an object store: a demo source renders its scenes into the run directory, "
            f"which must be local. Render them first with `layerloop demo-data DIR --n {n} --seed {seed} "
            f"--size {size}` and build with source.path=DIR.")
    return resolved
