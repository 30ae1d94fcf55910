"""``layerloop build``: run a synthesis pipeline into a run directory, resumably.

Steps: check the config (source, stages, models, paths) -> take the run lock -> refuse a different run in
the directory -> delete temporaries of an interrupted run -> list the source and partition it into shard
groups -> write/check ``run.json`` -> skip committed shards that verify (size, sha256), rebuild damaged
ones -> run the rest on the chosen executor with a progress bar -> ``failures.parquet`` -> mark the run
complete -> ``report/``. A failure after the lock is taken is recorded in ``run.json`` (status "failed").
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from layerloop import logs, storage
from layerloop.config import BuildConfig
from layerloop.datasets.shards import ShardSummary, remove_stale_temporaries
from layerloop.errors import attach_path, describe_os_error, unwrap
from layerloop.pipelines.executors import LocalExecutor, RayExecutor
from layerloop.pipelines.pipeline import Pipeline
from layerloop.pipelines.runs import RunDirectory

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    run_dir: Path
    shards_total: int
    shards_built: int
    shards_skipped: int
    ok: int
    failed: int
    seconds: float
    failures_by_reason: Counter = field(default_factory=Counter)
    samples_built: int = 0  # samples of the shards built by this call (ok and failed)
    rebuilt: tuple[str, ...] = ()  # committed shards found damaged and rebuilt, with the reason

    @property
    def samples_per_second(self) -> float:
        """Throughput of this call: the samples of the shards it built, over its wall time."""
        return self.samples_built / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        speed = (f"{self.samples_per_second:.2f} samples/s over {self.seconds:.1f} s" if self.shards_built
                 else f"nothing to build, {self.seconds:.1f} s")
        lines = [
            f"run: {self.run_dir}",
            f"shards: {self.shards_total} ({self.shards_built} built now, {self.shards_skipped} already committed)",
            f"samples written: {self.ok}, failed: {self.failed}, {speed}",
        ]
        lines.extend(f"  {problem}" for problem in self.rebuilt)
        for (stage, error_type), count in self.failures_by_reason.most_common():
            lines.append(f"  failed in {stage}: {error_type} x{count}")
        return "\n".join(lines)


def make_executor(name: str, config: BuildConfig):
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(config.ray)
    raise ValueError(f"unknown executor {name!r}: use local or ray")


def run_dir_for(config: BuildConfig, out: str | Path | None) -> Path:
    """The run directory: a ``Path``, or a ``storage.StorePath`` for ``--out s3://bucket/prefix`` (any
    fsspec store URL; ``file://`` is a local path)."""
    return storage.location(out or config.out or Path("runs") / config.name)


def build(config: BuildConfig, out: str | Path | None = None, executor: str | None = None,
          progress: bool = True, report: bool | None = None) -> BuildResult:
    """Every check of the config (stages, source, models, demo paths, a different run in ``out``) comes
    before the first write; every failure after the lock is taken is recorded in ``run.json``."""
    from layerloop.pipelines.preflight import check_models

    run_dir = run_dir_for(config, out)
    staged = storage.staging_of(run_dir) if isinstance(run_dir, Path) else None
    if staged is not None and (executor or config.executor) == "ray":
        return _build_through_store(config, *staged, executor, progress, report)
    check_run_dir(run_dir)
    pipeline = Pipeline.from_config(config, run_dir)  # validates the source and every stage; writes nothing
    check_models(config)  # offline and a model missing: say so before taking the lock or listing anything
    runner = make_executor(executor or config.executor, config)
    started = time.perf_counter()
    with RunDirectory(run_dir) as run:
        # before listing: a demo source renders while listing
        run.check_config(config.fingerprint(), config.matches_record)
        try:
            result = _build_locked(config, run, pipeline, runner, started, progress)
        except BaseException as error:
            cause = unwrap(error)
            # an OSError that names no file gets the run directory it was writing
            named = attach_path(cause, str(run_dir)) if isinstance(cause, OSError) else cause
            run.fail(_failure_text(named))
            logs.upload_store_logs()  # under the lease still: the log of a failed run is on the store too
            if named is cause:
                raise
            raise named from error
        if report if report is not None else config.report.enabled:
            from layerloop.report import write_report

            write_report(run_dir, rows=config.report.rows, seed=config.seed)
        logs.upload_store_logs()
    return result


def _build_through_store(config: BuildConfig, staged: storage.Staged, relative: str, executor: str | None,
                         progress: bool, report: bool | None) -> BuildResult:
    """A Ray build whose output folder is inside a staging folder (a step of ``self-improve --out s3://...``,
    an ``evaluate`` method): its tasks may run on nodes that cannot see that folder, so it is the build of
    the same config to the folder's store URL (workers write their shards straight to the store and read
    what the config names inside the folder from it: ``storage.canonical``), and the folder then downloads
    what it wrote. The fingerprint is the same either way (``config.fingerprint_of``)."""
    url = staged.remote.url if relative == "." else (staged.remote / relative).url
    data = config.model_dump(mode="json")
    rendered = _render_demo_here(config, staged.local / relative)
    if rendered is not None:  # a demo source renders into the run directory: here, then read from the store
        staged.push()
        data["source"] = {"type": "rorem", "path": str(rendered), "name": config.source.get("name", "demo")}
    config = BuildConfig.model_validate(storage.canonical(data))
    result = build(config, out=url, executor=executor, progress=progress, report=report)
    staged.pull()
    return result


def _render_demo_here(config: BuildConfig, run_dir: Path) -> Path | None:
    """For a demo source that would render its scenes into the run directory (``source_config``): render
    them now into ``<run dir>.scenes`` beside it (inside the same staging folder, so they go to the store
    with it; the run directory on the store must hold only the run) and return that folder; None for any
    other source. The build then reads it as the RORem folder it is, which gives the tars of a build that
    renders itself."""
    from layerloop.pipelines.pipeline import source_config

    if config.source.get("type") != "demo":
        return None
    resolved = source_config(config.source, run_dir)
    folder = Path(resolved.get("path", ""))
    if resolved.get("type") != "demo" or (folder != run_dir and run_dir not in folder.parents):
        return None
    from layerloop.datasets.demo_scenes import generate_demo_data

    target = run_dir.with_name(run_dir.name + ".scenes")
    generate_demo_data(target, int(resolved["n"]), seed=int(resolved.get("seed", 0)),
                       size=int(resolved.get("size", 256)))
    return target


def check_run_dir(run_dir: Path) -> None:
    """Refuse an output folder that already holds something other than a layerloop run: a build writes
    shards there and deletes its own temporaries and damaged shards, so it must not be somebody's data
    folder given as ``--out`` by mistake. Missing, empty, or a run (``run.json`` / ``run.lock``) is fine."""
    from layerloop.errors import UnsafePathError

    if isinstance(run_dir, storage.StorePath):
        storage.check_bucket(run_dir)  # a missing bucket or credentials: one line, before anything else
    if not run_dir.is_dir() or (run_dir / "run.json").exists() or (run_dir / "run.lock").exists() \
            or (isinstance(run_dir, storage.StorePath) and (run_dir / storage.LEASE_NAME).exists()):
        return  # a file in the way is reported by the lock, with its errno
    shown = sorted(p.name for _, p in zip(range(4), run_dir.iterdir()))
    if shown:
        raise UnsafePathError(f"--out {run_dir} is not a layerloop run directory: it holds {', '.join(shown[:3])}"
                              f"{' ...' if len(shown) > 3 else ''} and no run.json. Give a new or empty folder.")


def _failure_text(error: BaseException) -> str:
    error = unwrap(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, OSError):
        return describe_os_error(error)
    return f"{type(error).__name__}: {error}"


def _listing_text(config: BuildConfig, run_dir: Path) -> str:
    source = config.source
    kind = getattr(source, "type", "")
    if kind == "demo" and getattr(source, "path", None) is None and not (run_dir / "demo-data").exists():
        return f"listing the source (rendering {source.n} demo scenes)"
    return f"listing the {kind} source" if kind else "listing the source"


def _status(bar: tqdm, text: str) -> None:
    """What the build does now: the bar's postfix on a terminal, a DEBUG line in the run's log."""
    logger.debug("%s", text)
    bar.set_postfix_str(text + "...")


def _build_locked(config: BuildConfig, run: RunDirectory, pipeline: Pipeline, runner, started: float,
                  progress: bool) -> BuildResult:
    run_dir = run.path
    remove_stale_temporaries(run_dir)
    pipeline.writer.owner = run.owner  # a worker of a dead driver must not commit into this run
    # One bar from the start: its postfix says what the build waits for before the first shard (listing or
    # rendering the source, checking committed shards, starting Ray); stderr, only on a terminal.
    bar = tqdm(total=None, unit="shard", disable=not logs.progress_enabled(progress), file=logs.TERMINAL,
               desc=f"build {config.name} ({runner.name})", dynamic_ncols=True)
    with bar:
        _status(bar, _listing_text(config, run_dir))
        plan = pipeline.plan()
        run.start(config.model_dump(mode="json"), config.fingerprint(), plan.keys_digest, len(plan.tasks),
                  plan.num_items, config.seed, config.name, config.matches_record)

        _status(bar, f"checking {len(plan.tasks)} committed shard(s)")
        summaries: dict[int, ShardSummary] = {}
        pending = []
        rebuilt: list[str] = []
        for task in plan.tasks:
            committed = pipeline.writer.committed_summary(task.index)
            if committed.summary is not None:
                summaries[task.index] = committed.summary
            else:
                pending.append(task)
                if committed.problem:
                    rebuilt.append(committed.problem)
        for problem in rebuilt:
            logger.warning("%s", problem)
        skipped = len(summaries)
        bar.reset(total=len(plan.tasks))
        bar.initial = bar.n = bar.last_print_n = skipped  # as tqdm(initial=skipped): not in the rate
        bar.refresh()
        logger.info("%s: %d shard group(s), %d already committed, %d to build on the %s executor", run_dir,
                    len(plan.tasks), skipped, len(pending), runner.name)
        if pending and hasattr(runner, "init_ray"):
            _status(bar, "starting Ray")
            runner.init_ray(preload=pipeline.worker_imports())
        if pending:
            _status(bar, f"building {len(pending)} shard group(s)")
        for summary in runner.run(pipeline, pending):
            summaries[summary.index] = summary
            bar.update(1)
            bar.set_postfix(ok=sum(s.ok for s in summaries.values()),
                            failed=sum(s.failed for s in summaries.values()))
    remove_stale_temporaries(run_dir)  # a worker that died mid-write leaves its temporary files
    missing = [t.index for t in plan.tasks if t.index not in summaries]
    if missing:
        raise RuntimeError(f"the executor returned no result for shards {missing}; re-run to resume")

    failures = {i: s.failures for i, s in summaries.items() if s.failures}
    run.write_failures(config.shards.name, failures, plan.listing_failures)
    reasons = Counter((f[1], f[2]) for s in summaries.values() for f in s.failures)
    reasons.update((f.stage, f.error_type) for f in plan.listing_failures)
    result = BuildResult(
        run_dir=run_dir,
        shards_total=len(plan.tasks),
        shards_built=len(plan.tasks) - skipped,
        shards_skipped=skipped,
        ok=sum(s.ok for s in summaries.values()),
        failed=sum(s.failed for s in summaries.values()) + len(plan.listing_failures),
        seconds=time.perf_counter() - started,
        failures_by_reason=reasons,
        samples_built=sum(summaries[t.index].ok + summaries[t.index].failed for t in pending),
        rebuilt=tuple(rebuilt),
    )
    run.finish(samples_ok=result.ok, samples_failed=result.failed, seconds=round(result.seconds, 2))
    return result
