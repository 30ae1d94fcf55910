"""What an evaluation writes from its methods' shards: per-sample rows, set metrics, the table, the sheets.

* ``per_sample.parquet``: one row per (method, sample key) with every per-sample metric (null where a
  metric does not apply or its reference is missing);
* ``metrics.json``: ``{"metrics": {method: {metric: value}}, "n": ..., "models": {metric: model},
  "missing": {metric: why}, "family": ..., "labels": {method: row label}, "kid_std": {method: ...}}``.
  A per-sample metric is the mean over the samples it applies to; ``kid_x1000`` is KID x1000 between the
  method's judged composites and the ground-truth composites, on the DINOv2 features the ``evaluate``
  stage stored;
* ``table.md``: the paper-shaped table (a row per method; "missing weights" where a metric could not run);
* ``sheets/<method>/<metric>.png``: the best and the worst samples of that method by that metric, showing
  the stored (judged) images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from layerloop.files import atomic_path, write_atomic, write_json_atomic

# metric -> (table header, higher is better)
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "fg_clip": ("FG CLIP ↑", True), "musiq": ("MUSIQ ↑", True), "maniqa": ("MANIQA ↑", True),
    "kid_x1000": ("KID×1000 ↓", False), "dino": ("DINO ↑", True), "hps": ("HPS ↑", True),
    "layer_psnr": ("layer PSNR ↑", True), "object_psnr": ("object PSNR ↑", True),
    "layer_ssim": ("layer SSIM ↑", True), "object_ssim": ("object SSIM ↑", True),
    "recomposition_error": ("recomposition ↓", False),
}


def method_rows(run_dir: Path, method: str) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Per-sample rows of one method's build, and the stored KID features (method, reference)."""
    from layerloop.datasets.shards import read_samples

    rows, mine, theirs = [], [], []
    for sample in read_samples(run_dir):
        record = sample.meta.get("eval") or {}
        rows.append({"method": method, "key": sample.key, "caption": sample.caption,
                     **{k: v for k, v in (record.get("metrics") or {}).items()}})
        features = record.get("features")
        if features:
            mine.append(features["method"])
            theirs.append(features["reference"])
    features = {"method": np.asarray(mine, np.float64), "reference": np.asarray(theirs, np.float64)}
    return rows, features


def summarise(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, float | None]:
    summary: dict[str, float | None] = {}
    for metric in metrics:
        values = [r.get(metric) for r in rows if r.get(metric) is not None]
        summary[metric] = round(float(np.mean(values)), 6) if values else None
    return summary


def aggregate(cfg, out_dir: Path, skipped: dict[str, str], models: dict[str, str]):
    """Read every method's shards and write the evaluation's outputs; returns an ``Evaluation``."""
    from layerloop.evaluation.run import Evaluation
    from layerloop.stages.evaluate import EvaluateParams

    chosen = EvaluateParams.model_validate({**cfg.metrics, "family": cfg.family}).chosen()
    all_rows: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    kid_std: dict[str, float | None] = {}
    counts = {}
    for method in cfg.methods:
        rows, features = method_rows(out_dir / "methods" / method.name, method.name)
        all_rows.extend(rows)
        counts[method.name] = len(rows)
        summary = summarise(rows, tuple(m for m in chosen if m != "kid_x1000"))
        if "kid_x1000" in chosen and "kid_x1000" not in skipped:  # a skipped metric has no values: None
            summary["kid_x1000"], kid_std[method.name] = _kid(features, cfg)
        metrics[method.name] = {m: summary.get(m) for m in chosen}
    result = {"metrics": metrics, "n": max(counts.values(), default=0), "n_by_method": counts,
              "models": {m: models.get(m, "-") for m in chosen}, "missing": dict(skipped), "family": cfg.family,
              "labels": {m.name: m.label or m.name for m in cfg.methods}, "kid_std": kid_std,
              "kid": {"features": "DINOv2 CLS", "subset_size": cfg.kid_subset_size, "subsets": cfg.kid_subsets}}
    write_json_atomic(out_dir / "metrics.json", result, sort_keys=False, default=_none_for_nan)
    _write_rows(out_dir / "per_sample.parquet", all_rows, chosen)
    table = markdown_table(result)
    write_atomic(out_dir / "table.md", table)
    write_sheets(cfg, out_dir, all_rows, chosen)
    return Evaluation(out=out_dir, metrics=result, table=table)


def _kid(features: dict[str, np.ndarray], cfg) -> tuple[float | None, float | None]:
    from layerloop.evaluation.measures import kid_x1000

    real, fake = features["reference"], features["method"]
    if len(real) < 2 or len(fake) < 2:
        return None, None
    mean, std = kid_x1000(real, fake, subset_size=cfg.kid_subset_size, subsets=cfg.kid_subsets, seed=cfg.seed)
    return round(float(mean), 6), round(float(std), 6)


def _none_for_nan(value: Any) -> Any:
    return None


def _write_rows(path: Path, rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> None:
    columns = {"method": pa.string(), "key": pa.string(), "caption": pa.string(),
               **{m: pa.float64() for m in metrics if m != "kid_x1000"}}
    schema = pa.schema(list(columns.items()))
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _cell(value: Any, metric: str, missing: dict[str, str]) -> str:
    if metric in missing:
        return "missing weights" if missing[metric].startswith("missing weights") else "n/a"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}"


def markdown_table(result: dict[str, Any], title: str | None = None) -> str:
    """The paper-shaped table of one evaluation: a row per method, a column per metric."""
    metrics = list(next(iter(result["metrics"].values()), {}).keys())
    header = "| method | " + " | ".join(METRIC_INFO.get(m, (m, True))[0] for m in metrics) + " |"
    lines = [f"## {title}" if title else f"## {result['family']} evaluation, n = {result['n']}", "", header,
             "|" + "---|" * (len(metrics) + 1)]
    for method, values in result["metrics"].items():
        label = result.get("labels", {}).get(method, method)
        lines.append(f"| {label} | " + " | ".join(_cell(values.get(m), m, result.get("missing", {}))
                                                  for m in metrics) + " |")
    lines += ["", "Models: " + ", ".join(f"{m}: {result['models'].get(m, '-')}" for m in metrics) + "."]
    if result.get("missing"):
        lines += ["", "Not computed: " + "; ".join(f"{m} ({why})" for m, why in result["missing"].items()) + "."]
    if "kid_x1000" in metrics:
        kid = result.get("kid") or {}
        lines += ["", f"KID on {kid.get('features', 'DINOv2')} features, subsets of {kid.get('subset_size')} "
                      "(fewer when n is smaller)."]
    return "\n".join(lines) + "\n"


def write_sheets(cfg, out_dir: Path, rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> None:
    """``sheets/<method>/<metric>.png``: the best ``sheet_rows`` then the worst ``sheet_rows`` samples."""
    from layerloop.report.sheet import png_bytes, render_contact_sheet
    from layerloop.samples import LayeredSample

    for method in cfg.methods:
        run_dir = out_dir / "methods" / method.name
        mine = [r for r in rows if r["method"] == method.name]
        for metric in metrics:
            scored = [r for r in mine if r.get(metric) is not None]
            if not scored:
                continue
            higher = METRIC_INFO.get(metric, (metric, True))[1]
            ordered = sorted(scored, key=lambda r: r[metric], reverse=higher)
            k = cfg.sheet_rows
            chosen = ordered[:k] + [r for r in ordered[-k:] if r not in ordered[:k]]
            records = _records(run_dir, [r["key"] for r in chosen])
            shown = []
            for row in chosen:
                if row["key"] in records:
                    sample = LayeredSample.from_wds(records[row["key"]])
                    rank = "best" if row in ordered[:k] else "worst"
                    sample.meta["scores"] = {metric: row[metric]}
                    shown.append((rank, sample))
            sheet = render_contact_sheet(shown, {}, (f"{method.label or method.name}: {metric}",
                                                     f"best {k} then worst {k} of {len(scored)}"))
            folder = out_dir / "sheets" / method.name
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / f"{metric}.png", png_bytes(sheet))


def _records(run_dir: Path, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The stored records of ``keys`` from the run's committed tars."""
    from layerloop.datasets.shards import shard_paths
    from layerloop.report.scan import read_records

    wanted, found = set(keys), {}
    for tar in shard_paths(run_dir):
        found.update(read_records(tar, wanted - set(found)))
        if len(found) == len(wanted):
            break
    return found


def read_metrics(path: str | Path) -> dict[str, Any]:
    """``metrics.json`` of an evaluation directory (or the file itself)."""
    path = Path(path)
    return json.loads((path / "metrics.json" if path.is_dir() else path).read_text())
