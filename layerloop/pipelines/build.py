"""``layerloop build``: run a synthesis pipeline into a run directory, resumably.

Steps: take the run lock -> delete temporaries of an interrupted run -> list the source and partition it
into shard groups -> write/check ``run.json`` -> skip committed shards -> run the rest on the chosen
executor with a progress bar -> ``failures.parquet`` -> ``report/`` -> mark the run complete.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from layerloop.config import BuildConfig
from layerloop.datasets.shards import ShardSummary, remove_stale_temporaries, summary_from_index
from layerloop.pipelines.executors import LocalExecutor, RayExecutor
from layerloop.pipelines.pipeline import Pipeline
from layerloop.pipelines.runs import RunDirectory


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

    @property
    def samples_per_second(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"run: {self.run_dir}",
            f"shards: {self.shards_total} ({self.shards_built} built now, {self.shards_skipped} already committed)",
            f"samples written: {self.ok}, failed: {self.failed}, "
            f"{self.samples_per_second:.2f} samples/s over {self.seconds:.1f} s",
        ]
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
    return Path(out or config.out or Path("runs") / config.name)


def build(config: BuildConfig, out: str | Path | None = None, executor: str | None = None,
          progress: bool = True, report: bool | None = None) -> BuildResult:
    from layerloop.pipelines.preflight import check_models

    run_dir = run_dir_for(config, out)
    check_models(config)  # offline and a model missing: say so before taking the lock or listing anything
    started = time.perf_counter()
    with RunDirectory(run_dir) as run:
        remove_stale_temporaries(run_dir)
        pipeline = Pipeline.from_config(config, run_dir)
        plan = pipeline.plan()
        run.start(config.model_dump(mode="json"), config.fingerprint(), plan.keys_digest, len(plan.tasks),
                  plan.num_items, config.seed, config.name)

        summaries: dict[int, ShardSummary] = {}
        pending = []
        for task in plan.tasks:
            _, index_path = pipeline.writer.paths(task.index)
            if index_path.exists():
                summaries[task.index] = summary_from_index(task.index, index_path)
            else:
                pending.append(task)
        skipped = len(summaries)

        runner = make_executor(executor or config.executor, config)
        with tqdm(total=len(plan.tasks), initial=skipped, unit="shard", disable=not progress,
                  desc=f"build {config.name} ({runner.name})") as bar:
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
        )
        run.finish(samples_ok=result.ok, samples_failed=result.failed, seconds=round(result.seconds, 2))
        if report if report is not None else config.report.enabled:
            from layerloop.report import write_report

            write_report(run_dir, rows=config.report.rows, seed=config.seed)
    return result
