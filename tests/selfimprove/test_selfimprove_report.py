"""Round and summary reports on round directories built by hand: a scores.parquet from explicit rows, a
round.json, a metrics.jsonl and a candidates/ run directory written by the real ShardWriter. Every expected
number below is worked out by hand from the rows."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from layerloop.datasets.shards import ShardWriter
from layerloop.samples import LayeredSample, composite
from layerloop.selfimprove.report import (CANDIDATE_LAYOUT, reason_pattern, spread, write_round_report,
                                          write_summary_report)

SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("input_key", pa.string()), ("source_key", pa.string()), ("round", pa.int64()),
    ("status", pa.string()), ("error", pa.string()), ("accepted", pa.bool_()), ("rule", pa.string()),
    ("reasons", pa.list_(pa.string())), ("checkpoint_hash", pa.string()),
    ("recomposition_mean", pa.float64()), ("alpha_fragments", pa.int64()), ("hps", pa.float64()),
    ("clip_composite", pa.float64()),  # null in every row: the scorer was off
    ("alpha_empty", pa.bool_()), ("dup_of", pa.string()),
])
POLICY = "all: [recomposition_mean <= 2, alpha_empty == false]"
NOTE = "demo profile: CLIP/HPS scorers are tiny random models; only the model-free scores carry the decision"
ESCAPED_REASON = "alpha <b>empty</b> (coverage 0)"

# key, accepted, recomposition_mean, alpha_fragments, alpha_empty, dup_of, reasons
ROUND0 = [
    ("c0", True, 0.5, 1, False, None, []),
    ("c1", False, 3.5, 2, False, None, ["recomposition_mean 3.5 > 2"]),
    ("c2", True, 1.0, 1, False, None, []),
    ("c3", False, 4.25, 3, False, "c1", ["recomposition_mean 4.25 > 2", "duplicate of c1 (distance 0.01)"]),
    ("c4", True, 1.5, 1, False, None, []),
    ("c5", False, 0.25, 1, True, None, [ESCAPED_REASON]),
]
FAILED = ("c6", "CUDA out of memory")


def candidate(key: str, index: int, size: int = 32) -> LayeredSample:
    """A 32x32 candidate with flat, distinct colours: an opaque square in the centre over a plain backdrop."""
    background = np.empty((size, size, 3), np.uint8)
    background[:] = (30 + 20 * index, 200 - 15 * index, 90)
    foreground = np.zeros((size, size, 4), np.uint8)
    foreground[8:24, 8:24] = (250, 40 + 20 * index, 10, 255)
    mask = np.zeros((size, size), np.uint8)
    mask[8:24, 8:24] = 255
    return LayeredSample(key=key, kind="candidate", composite=composite(foreground, background),
                         background=background, foreground=foreground, mask=mask,
                         caption=f"an orange square number {index}")


def make_round(out_dir: Path, number: int, rows: list[tuple], failed: tuple | None = None,
               metrics: list[dict] | None = None, write_round_json: bool = True) -> Path:
    round_dir = out_dir / "rounds" / f"round-{number:03d}"
    (round_dir / "candidates").mkdir(parents=True)
    table = []
    samples = []
    for index, (key, accepted, recomposition, fragments, empty, dup_of, reasons) in enumerate(rows):
        table.append({"key": key, "input_key": f"in{index // 2}", "source_key": f"src{index}", "round": number,
                      "status": "ok", "error": None, "accepted": accepted, "rule": "all" if accepted else None,
                      "reasons": reasons, "checkpoint_hash": f"hash{number}", "recomposition_mean": recomposition,
                      "alpha_fragments": fragments, "hps": 0.5, "clip_composite": None, "alpha_empty": empty,
                      "dup_of": dup_of})
        samples.append(candidate(key, index))
    if failed:
        key, error = failed
        table.append({"key": key, "input_key": "in9", "source_key": "src9", "round": number, "status": "failed",
                      "error": error, "accepted": False, "rule": None, "reasons": [],
                      "checkpoint_hash": f"hash{number}", "recomposition_mean": None, "alpha_fragments": None,
                      "hps": None, "clip_composite": None, "alpha_empty": None, "dup_of": None})
        samples.append(LayeredSample(key=key, kind="candidate").fail("generate-bfs", RuntimeError(error)))
    pq.write_table(pa.Table.from_pylist(table, schema=SCORES_SCHEMA), round_dir / "scores.parquet")
    ShardWriter(round_dir / "candidates", "candidates").write(0, samples)
    if write_round_json:
        accepted = sum(1 for r in rows if r[1])
        (round_dir / "round.json").write_text(json.dumps({
            "round": number, "family": "bfs", "policy": POLICY, "model_free_only": True, "note": NOTE,
            "checkpoint_hash": f"hash{number}",
            "counts": {"candidates": len(table), "ok": len(rows), "failed": len(table) - len(rows),
                       "accepted": accepted, "rejected": len(rows) - accepted},
            "mix": [{"name": "base", "run_dir": "runs/base", "weight": 1.0, "samples": 100, "origin": "base",
                     "round": None},
                    {"name": f"accepted-r{number}", "run_dir": "x", "weight": 0.5, "samples": accepted,
                     "origin": "accepted", "round": number}]}))
    if metrics is not None:
        (round_dir / "train").mkdir()
        lines = [json.dumps(m) for m in metrics] + ['{"step": 99, "lo']  # a line cut short by a crash
        (round_dir / "train" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return round_dir


def metrics_rows(losses: list[float]) -> list[dict]:
    return [{"step": 10 * i, "loss": loss, "loss_alpha": loss / 2, "lr": 1e-4, "grad_norm": 1.0 + i,
             "samples_per_s": 3.0, "stream": "base" if i % 2 else "accepted"} for i, loss in enumerate(losses)]


def check_png(path: Path) -> Image.Image:
    assert path.exists(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 100 and image.height > 50
        return image.copy()


@pytest.fixture
def round0(tmp_path: Path) -> Path:
    return make_round(tmp_path, 0, ROUND0, failed=FAILED, metrics=metrics_rows([1.0, 0.8, 0.9, 0.5, 0.6]))


def test_round_report_files_and_numbers(round0: Path):
    stats = write_round_report(round0)
    report = round0 / "report"
    for name in ("scores.png", "accepted.png", "rejected.png", "loss.png"):
        check_png(report / name)
    assert json.loads((report / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert not list(report.glob("*.tmp*"))

    assert stats["round"] == 0
    assert stats["counts"] == {"candidates": 7, "ok": 6, "failed": 1, "accepted": 3, "rejected": 3}
    assert stats["acceptance"] == {"accepted_of_ok": 0.5, "accepted_of_all": round(3 / 7, 6)}
    assert stats["score_columns"] == {"numeric": ["recomposition_mean", "alpha_fragments", "hps", "clip_composite"],
                                      "boolean": ["alpha_empty"], "all_null": [], "skipped": ["dup_of"]}
    recomposition = stats["scores"]["recomposition_mean"]
    assert recomposition["accepted"] == {"count": 3, "missing": 0, "mean": 1.0, "median": 1.0, "min": 0.5,
                                         "max": 1.5}
    assert recomposition["rejected"]["mean"] == round(8 / 3, 6) and recomposition["rejected"]["median"] == 3.5
    assert recomposition["all"]["mean"] == round(11 / 6, 6)
    assert stats["scores"]["alpha_empty"]["rejected"]["mean"] == round(1 / 3, 6)  # a boolean's mean is a rate
    assert stats["scores"]["clip_composite"]["all"] == {"count": 0, "missing": 6, "mean": None, "median": None,
                                                       "min": None, "max": None}
    assert stats["scores"]["hps"]["all"]["min"] == stats["scores"]["hps"]["all"]["max"] == 0.5

    assert stats["reasons"] == [
        {"reason": "recomposition_mean # > #", "count": 2, "example": "recomposition_mean 3.5 > 2",
         "example_key": "c1"},
        {"reason": "alpha <b>empty</b> (coverage #)", "count": 1, "example": ESCAPED_REASON, "example_key": "c5"},
        {"reason": "duplicate of c# (distance #)", "count": 1, "example": "duplicate of c1 (distance 0.01)",
         "example_key": "c3"},
    ]
    assert stats["failures"] == [{"reason": "CUDA out of memory", "count": 1, "example": "CUDA out of memory",
                                  "example_key": "c6"}]
    training = stats["training"]
    assert training["present"] and training["records"] == 5 and training["bad_lines"] == 1
    assert training["loss"] == {"count": 5, "first": 1.0, "last": 0.6, "min": 0.5, "min_step": 30,
                                "first_step": 0, "last_step": 40}
    assert set(training["terms"]) == {"loss", "loss_alpha"} and training["streams"] == ["accepted", "base"]
    assert stats["shown"] == {"accepted": ["c0", "c2", "c4"], "rejected": ["c1", "c3", "c5"], "missing_images": []}
    assert stats["warnings"] == []
    assert [m["name"] for m in stats["mix"]] == ["base", "accepted-r0"]


def test_round_report_sheet_shows_the_candidates_images(round0: Path):
    write_round_report(round0, rows=2)
    stats = json.loads((round0 / "report" / "stats.json").read_text())
    assert stats["shown"]["accepted"] == ["c0", "c4"]  # evenly spread over the sorted keys: first and last
    sheet = check_png(round0 / "report" / "accepted.png").convert("RGB")
    assert sheet.size == (CANDIDATE_LAYOUT.width, CANDIDATE_LAYOUT.height(2))
    for row, (key, index) in enumerate([("c0", 0), ("c4", 4)]):
        x0, y0, _, _ = CANDIDATE_LAYOUT.cell_box(row, 0)
        expected = candidate(key, index).composite
        # 32 px enlarged 5x into a 160 px cell, nearest neighbour: the centre shows the opaque square.
        assert sheet.getpixel((x0 + 80, y0 + 80)) == tuple(int(v) for v in expected[16, 16])
        assert sheet.getpixel((x0 + 10, y0 + 10)) == tuple(int(v) for v in expected[2, 2])


def test_round_report_html(round0: Path):
    write_round_report(round0)
    page = (round0 / "report" / "index.html").read_text()
    assert "Round 000" in page
    assert html.escape(POLICY) in page and POLICY not in page  # "<=" is escaped
    assert html.escape(NOTE) in page and "class='note'" in page
    assert "&lt;b&gt;empty&lt;/b&gt;" in page and "<b>empty</b>" not in page
    assert "50.0%" in page and "42.9%" in page  # 3 of 6 ok, 3 of 7 in all
    assert "accepted-r0" in page and "runs/base" in page  # the mix table
    assert "CUDA out of memory" in page
    for name in ("scores.png", "accepted.png", "rejected.png", "loss.png"):
        assert f"src='{name}'" in page


def test_round_with_nothing_accepted_and_no_metrics(tmp_path: Path):
    rows = [(key, False, value, 1, False, None, [f"recomposition_mean {value} > 2"])
            for key, value in (("d0", 3.0), ("d1", 5.0))]
    round_dir = make_round(tmp_path, 3, rows, metrics=None, write_round_json=False)
    stats = write_round_report(round_dir)
    report = round_dir / "report"
    empty = check_png(report / "accepted.png")
    assert empty.height < check_png(report / "rejected.png").height
    check_png(report / "loss.png")
    check_png(report / "scores.png")
    assert stats["round"] == 3  # from the directory name: no round.json
    assert stats["counts"]["accepted"] == 0 and stats["acceptance"] == {"accepted_of_ok": 0.0,
                                                                        "accepted_of_all": 0.0}
    assert stats["training"] == {"present": False}
    assert stats["reasons"][0]["reason"] == "recomposition_mean # > #" and stats["reasons"][0]["count"] == 2
    assert stats["shown"]["accepted"] == []
    assert stats["warnings"]  # round.json is missing
    page = (report / "index.html").read_text()
    assert "no training metrics" in page and "0.0%" in page


def test_round_with_missing_candidate_images(round0: Path):
    for path in (round0 / "candidates").iterdir():
        path.unlink()
    stats = write_round_report(round0, rows=1)
    assert stats["shown"]["missing_images"] == ["c0", "c1"]
    check_png(round0 / "report" / "accepted.png")


def test_summary_report_over_two_rounds(tmp_path: Path):
    round0 = make_round(tmp_path, 0, ROUND0, failed=FAILED, metrics=metrics_rows([1.0, 0.8]))
    round1_rows = [("e0", True, 0.5, 1, False, None, []),
                   ("e1", False, 0.5, 1, True, None, ["alpha empty"]),
                   ("e2", False, 1.0, 2, False, None, ["not in top-1 of input in1 by hps (rank 2, hps 0.5)"]),
                   ("e3", False, 2.0, 1, False, None, ["not in top-1 of input in1 by hps (rank 3, hps 0.5)"])]
    round1 = make_round(tmp_path, 1, round1_rows, metrics=metrics_rows([0.7, 0.4, 0.3]))
    write_round_report(round0)  # round 1 gets no report: its link is left out

    stats = write_summary_report(tmp_path)
    report = tmp_path / "report"
    for name in ("acceptance.png", "drift.png", "loss.png"):
        check_png(report / name)
    assert json.loads((report / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert [e["round"] for e in stats["rounds"]] == [0, 1]
    assert [e["acceptance"]["accepted_of_ok"] for e in stats["rounds"]] == [0.5, 0.25]
    assert [e["acceptance"]["accepted_of_all"] for e in stats["rounds"]] == [round(3 / 7, 6), 0.25]
    assert [e["mix_samples"] for e in stats["rounds"]] == [103, 101]
    assert [e["loss"]["last"] for e in stats["rounds"]] == [0.8, 0.3]
    assert stats["first_round"] == 0
    # Means over ok candidates: round 0 (0.5+3.5+1+4.25+1.5+0.25)/6, round 1 (0.5+0.5+1+2)/4 = 1.
    assert stats["drift"]["recomposition_mean"] == [
        {"round": 0, "mean": round(11 / 6, 6), "change": 0.0},
        {"round": 1, "mean": 1.0, "change": round(1.0 - round(11 / 6, 6), 6)}]
    assert stats["drift"]["alpha_empty"][1] == {"round": 1, "mean": 0.25, "change": round(0.25 - round(1 / 6, 6), 6)}
    assert stats["rounds"][0]["report"] == "../rounds/round-000/report/index.html"
    assert stats["rounds"][1]["report"] is None

    page = (report / "index.html").read_text()
    assert "href='../rounds/round-000/report/index.html'" in page
    assert "round 001 <span class='muted'>(no report)</span>" in page
    assert "hash0" in page and "hash1" in page and "25.0%" in page and html.escape(NOTE) in page
    assert "1 (-0.8333)" in page  # round 1's mean recomposition and its change vs round 0
    for name in ("acceptance.png", "drift.png", "loss.png"):
        assert f"src='{name}'" in page

    only_one = write_summary_report(tmp_path, round_dirs=[round1])
    assert [e["round"] for e in only_one["rounds"]] == [1] and only_one["first_round"] == 1


def test_summary_report_without_rounds(tmp_path: Path):
    stats = write_summary_report(tmp_path)
    assert stats["rounds"] == [] and stats["drift"] == {}
    for name in ("acceptance.png", "drift.png", "loss.png"):
        check_png(tmp_path / "report" / name)


def test_reason_pattern_and_spread():
    assert (reason_pattern("not in top-2 of input bg_000031 by hps (rank 4, hps 0.1)")
            == "not in top-# of input bg_# by hps (rank #, hps #)")
    assert reason_pattern("clip_foreground nan < 2.5e-01") == "clip_foreground # < #"
    assert spread(list(range(10)), 3) == [0, 4, 9]
    assert spread([1, 2], 5) == [1, 2] and spread([1, 2], 0) == []


def test_inferred_schema_null_column_and_non_finite_values(tmp_path: Path):
    """A table written without a schema: a score that is None everywhere is typed null (type unknown, listed,
    not plotted); NaN and infinity count as missing."""
    round_dir = tmp_path / "round-007"
    round_dir.mkdir()
    rows = [{"key": f"k{i}", "input_key": "in", "round": 7, "status": "ok", "accepted": i == 0, "reasons": [],
             "clip_foreground": None, "hps": value, "dup_of": None}
            for i, value in enumerate([0.25, float("nan"), float("inf"), 0.75])]
    pq.write_table(pa.Table.from_pylist(rows), round_dir / "scores.parquet")
    stats = write_round_report(round_dir, rows=3)  # no round.json, no candidates/, no metrics
    assert stats["round"] == 7
    assert stats["score_columns"]["all_null"] == ["clip_foreground", "dup_of"]
    assert stats["scores"]["hps"]["all"] == {"count": 2, "missing": 2, "mean": 0.5, "median": 0.5, "min": 0.25,
                                             "max": 0.75}
    assert stats["reasons"] == [{"reason": "(no reason recorded)", "count": 3, "example": "(no reason recorded)",
                                 "example_key": "k1"}]
    assert stats["shown"]["missing_images"] == ["k0", "k1", "k2", "k3"]
    for name in ("scores.png", "accepted.png", "rejected.png", "loss.png"):
        check_png(round_dir / "report" / name)


def sheet_cells(sheet: Image.Image, row: int, sample: LayeredSample) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixels shown, pixels expected) of the four image cells of ``row`` for ``sample``."""
    from layerloop.report.sheet import thumbnails

    cells = []
    for column, thumb in enumerate(thumbnails(sample, CANDIDATE_LAYOUT.cell)):
        x0, y0, _, _ = CANDIDATE_LAYOUT.cell_box(row, column)
        x, y = x0 + (CANDIDATE_LAYOUT.cell - thumb.width) // 2, y0 + (CANDIDATE_LAYOUT.cell - thumb.height) // 2
        shown = sheet.convert("RGB").crop((x, y, x + thumb.width, y + thumb.height))
        cells.append((np.asarray(shown), np.asarray(thumb.convert("RGB"))))
    return cells


def test_accepted_sheet_shows_what_the_accepted_shards_store(round0: Path):
    """The accepted sheet shows the accepted samples as accepted/ stores them (the quadruples training reads),
    not the candidates they were made from."""
    from layerloop.datasets.shards import read_samples

    stored = []
    for index, key in enumerate(["c0", "c2", "c4"]):
        sample = candidate(key, 7 + index)  # other colours than the candidate of the same key
        sample.kind = "quadruple"
        stored.append(sample)
    (round0 / "accepted").mkdir()
    ShardWriter(round0 / "accepted", "accepted").write(0, stored)

    stats = write_round_report(round0, rows=3)
    assert stats["shown"]["accepted"] == ["c0", "c2", "c4"] and stats["shown"]["missing_images"] == []
    sheet = check_png(round0 / "report" / "accepted.png")
    decoded = {s.key: s for s in read_samples(round0 / "accepted")}
    for row, (key, index) in enumerate([("c0", 0), ("c2", 2), ("c4", 4)]):
        for column, (shown, expected) in enumerate(sheet_cells(sheet, row, decoded[key])):
            assert np.array_equal(shown, expected), (key, column)
        shown, candidate_composite = sheet_cells(sheet, row, candidate(key, index))[0]
        assert not np.array_equal(shown, candidate_composite)  # not the candidate it was made from
