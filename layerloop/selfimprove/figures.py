"""The figures of the round and summary reports (PNG bytes). matplotlib's ``Figure`` with the Agg canvas is
used directly, so nothing here touches pyplot's global state."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from layerloop.selfimprove.stats import RoundData, finite_values, is_number, loss_terms, metric_series

# metrics.jsonl keys that are numbers but not loss terms: plotted in their own panel.
OPTIMISER_KEYS = ("lr", "grad_norm")
DPI = 100
ACCEPTED_COLOUR, REJECTED_COLOUR = "#2a9d5c", "#d1495b"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _message_figure(title: str, message: str) -> bytes:
    figure = _figure(6, 2.2)
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#666666", transform=ax.transAxes)
    return _png(figure)


def _panels(figure: Figure, count: int, columns: int) -> list[Any]:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_axis_off()
    return list(axes[:count])


def _bin_edges(values: list[float]) -> np.ndarray:
    low, high = min(values), max(values)
    if low == high:  # one distinct value: a single bar around it
        half = abs(low) * 0.05 or 0.5
        return np.array([low - half, high + half])
    if all(v == int(v) for v in values) and high - low <= 40:  # small integers: one bar per integer
        return np.arange(low - 0.5, high + 1.5)
    return np.histogram_bin_edges(values, bins=int(min(30, max(6, math.sqrt(len(values)) * 2))))


def _no_values(ax: Any, text: str = "no values") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#666666", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def scores_figure(data: RoundData) -> bytes:
    columns = data.numeric
    if not columns:
        return _message_figure(f"round {data.number}: scores", "no numeric score columns")
    figure = _figure(3.4 * min(4, len(columns)), 2.5 * math.ceil(len(columns) / 4) + 0.3)
    figure.suptitle(f"round {data.number}: scores of ok candidates, accepted vs rejected")
    accepted_rows, rejected_rows = data.accepted, data.rejected
    for ax, column in zip(_panels(figure, len(columns), 4), columns):
        accepted, accepted_missing = finite_values(accepted_rows, column)
        rejected, rejected_missing = finite_values(rejected_rows, column)
        missing = accepted_missing + rejected_missing
        ax.set_title(column + (f"  ({missing} missing)" if missing else ""), fontsize=10)
        if not accepted and not rejected:
            _no_values(ax)
            continue
        edges = _bin_edges(accepted + rejected)
        for values, colour, label in ((rejected, REJECTED_COLOUR, "rejected"),
                                      (accepted, ACCEPTED_COLOUR, "accepted")):
            if values:
                ax.hist(values, bins=edges, color=colour, alpha=0.55, histtype="stepfilled",
                        edgecolor=colour, label=f"{label} ({len(values)})")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    return _png(figure)


def training_figure(title: str, metrics: tuple[list[dict[str, Any]], int] | None) -> bytes:
    if metrics is None or not metrics[0]:
        return _message_figure(title, "no training metrics" if metrics is None else "metrics.jsonl is empty")
    records = metrics[0]
    terms = loss_terms(records)
    optimiser = [name for name in OPTIMISER_KEYS if any(is_number(r.get(name)) for r in records)]
    figure = _figure(6.5 if not optimiser else 10, 3.4)
    figure.suptitle(title)
    axes = _panels(figure, 2 if optimiser else 1, 2)
    ax = axes[0]
    streams = sorted({str(r["stream"]) for r in records if r.get("stream") is not None})
    if not terms:
        _no_values(ax, "no loss values")
    for name in terms:
        if name == "loss" and len(streams) > 1:  # interleaved streams: one line each, not a zigzag
            for stream in streams:
                steps, values = metric_series([r for r in records if str(r.get("stream")) == stream], name)
                ax.plot(steps, values, label=f"loss [{stream}]", lw=1.4)
        else:
            steps, values = metric_series(records, name)
            ax.plot(steps, values, label=name, lw=1.4 if name == "loss" else 1.0)
    all_values = [v for name in terms for v in metric_series(records, name)[1]]
    if all_values and min(all_values) > 0 and max(all_values) / min(all_values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss terms", fontsize=10)
    if terms:
        ax.legend(fontsize=7, frameon=False)
    if optimiser:
        ax = axes[1]
        ax.set_title(" / ".join(optimiser), fontsize=10)
        ax.set_xlabel("step")
        twin = ax.twinx() if len(optimiser) == 2 else None
        for target, name, colour in zip((ax, twin), optimiser, ("#3366aa", "#aa6633")):
            steps, values = metric_series(records, name)
            target.plot(steps, values, color=colour, lw=1.0)
            target.set_ylabel(name, color=colour)
    return _png(figure)


def acceptance_figure(entries: list[dict[str, Any]]) -> bytes:
    if not entries:
        return _message_figure("acceptance per round", "no rounds")
    figure = _figure(max(5.0, 1.0 + 0.8 * len(entries)), 3.6)
    ax = figure.add_subplot()
    labels = [f"r{e['round']}" for e in entries]
    positions = np.arange(len(entries))
    of_ok = [100 * (e["acceptance"]["accepted_of_ok"] or 0) for e in entries]
    of_all = [100 * (e["acceptance"]["accepted_of_all"] or 0) for e in entries]
    bars = ax.bar(positions, of_ok, color=ACCEPTED_COLOUR, alpha=0.8, label="accepted / ok")
    ax.plot(positions, of_all, "o--", color="#333333", label="accepted / all")
    for bar, entry in zip(bars, entries):
        counts = entry["counts"]
        ax.annotate(f"{counts['accepted']}/{counts['ok']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(positions, labels)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of candidates")
    ax.set_title("acceptance per round (labels: accepted / ok)")
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return _png(figure)


def drift_figure(rounds: list[RoundData], columns: list[str]) -> bytes:
    if not rounds or not columns:
        return _message_figure("score drift", "no rounds" if not rounds else "no numeric score columns")
    figure = _figure(3.4 * min(3, len(columns)) + 0.4, 2.7 * math.ceil(len(columns) / 3) + 0.3)
    figure.suptitle("score distributions of ok candidates per round (boxes), means (line)")
    labels = [f"r{d.number}" for d in rounds]
    for ax, column in zip(_panels(figure, len(columns), 3), columns):
        per_round = [finite_values(d.ok, column)[0] for d in rounds]
        ax.set_title(column, fontsize=10)
        present = [i for i, values in enumerate(per_round) if values]
        if not present:
            _no_values(ax)
            continue
        ax.boxplot([per_round[i] for i in present], positions=present, widths=0.5, showfliers=True,
                   flierprops={"markersize": 3})
        ax.plot(present, [float(np.mean(per_round[i])) for i in present], "o-", color="#d1495b", ms=4, lw=1)
        ax.set_xticks(range(len(rounds)), labels)
        ax.set_xlim(-0.6, len(rounds) - 0.4)
        ax.tick_params(labelsize=8)
    return _png(figure)


def summary_loss_figure(rounds: list[tuple[int, tuple[list[dict[str, Any]], int] | None]]) -> bytes:
    curves = [(number, metric_series(metrics[0], "loss")) for number, metrics in rounds if metrics and metrics[0]]
    curves = [(number, series) for number, series in curves if series[0]]
    if not curves:
        return _message_figure("training loss per round", "no training metrics")
    figure = _figure(7, 3.6)
    ax = figure.add_subplot()
    for number, (steps, values) in curves:
        ax.plot(steps, values, label=f"round {number}", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss per round")
    ax.legend(fontsize=8, frameon=False)
    return _png(figure)


def evaluation_figure(evals: list[tuple[int, dict[str, Any]]]) -> bytes:
    """Every held-out metric by round (``round-NNN/eval.json``), one panel per metric, a line per method."""
    if not evals:
        return _message_figure("held-out evaluation per round", "no round was evaluated")
    metrics = list(dict.fromkeys(m for _, e in evals for values in e["metrics"].values() for m in values))
    methods = list(dict.fromkeys(name for _, e in evals for name in e["metrics"]))
    figure = _figure(3.4 * min(3, len(metrics)) + 0.4, 2.7 * math.ceil(len(metrics) / 3) + 0.5)
    figure.suptitle(f"held-out metrics by round (n = {evals[-1][1].get('n')}; models: "
                    f"{', '.join(sorted(set(evals[-1][1].get('models', {}).values())))})", fontsize=10)
    rounds = [number for number, _ in evals]
    for ax, metric in zip(_panels(figure, len(metrics), 3), metrics):
        ax.set_title(metric, fontsize=10)
        drawn = False
        for method in methods:
            points = [(number, e["metrics"].get(method, {}).get(metric)) for number, e in evals]
            points = [(x, y) for x, y in points if is_number(y)]
            if points:
                ax.plot(*zip(*points), "o-", ms=4, lw=1.2, label=method)
                drawn = True
        if not drawn:
            _no_values(ax, "missing weights" if metric in evals[-1][1].get("missing", {}) else "no values")
            continue
        ax.set_xticks(rounds, [f"r{n}" for n in rounds])
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    return _png(figure)
