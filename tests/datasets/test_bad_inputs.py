"""The bad-input corpus (``tests/bad_inputs.py``) through a real build: every bad input becomes one clear
recorded failure, in the right stage, with a message a person can act on; every good input still lands;
every listed key is accounted for exactly once."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from layerloop.config import load_config
from layerloop.datasets.base import make_key
from layerloop.datasets.shards import read_samples
from layerloop.datasets.sources import RoremSource
from layerloop.pipelines.build import build
from layerloop.samples import composite_error
from tests.bad_inputs import make_bad_rorem, record_opens

NAME = "bad"
WDS_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    corpus = make_bad_rorem(root / "corpus")
    config = load_config("demo", ["executor=local", "stages.load.short_side=64", "shards.samples_per_shard=8",
                                  "report.rows=3"])
    config.source = {"type": "rorem", "path": str(corpus.root), "name": NAME}
    out = root / "run"
    with record_opens(corpus.outside_dir) as opened:
        result = build(config, out=out, progress=False)
    corpus.opened_outside = opened
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    samples = list(read_samples(out))
    index_rows = [row for path in sorted(out.glob("*.parquet")) if path.name != "failures.parquet"
                  for row in pq.read_table(path).to_pylist()]
    return corpus, result, failures, samples, index_rows, out


def failures_for(failures: list[dict], source_id: str) -> list[dict]:
    key = make_key(NAME, source_id)
    return [row for row in failures if row["key"] == key]


def test_good_inputs_land_under_safe_keys(bad_run):
    corpus, result, _, samples, _, _ = bad_run
    written = {s.meta["source_id"]: s for s in samples}
    assert corpus.good <= set(written), f"good inputs missing from the shards: {corpus.good - set(written)}"
    assert result.ok == len(samples) == len(corpus.good)
    for sample in samples:
        sample.validate()
        assert WDS_KEY.match(sample.key), sample.key
        assert composite_error(sample.composite, sample.foreground, sample.background) <= 1
    # non-ASCII ids survive in the metadata while the key is made safe
    assert written["données-猫"].key.startswith(f"{NAME}_donn")
    assert written["emoji 🙂.x"].meta["source_id"] == "emoji 🙂.x"
    # ids that clean to the same text keep distinct keys
    assert written["dup é"].key != written["dup è"].key


def test_each_bad_input_is_one_clear_load_failure(bad_run):
    corpus, _, failures, samples, _, _ = bad_run
    written = {s.meta["source_id"] for s in samples}
    problems = []
    for sid, expected in sorted(corpus.failing.items()):
        rows = failures_for(failures, sid)
        if sid in written:
            problems.append(f"{sid}: landed in a shard")
        if len(rows) != 1:
            problems.append(f"{sid}: {len(rows)} failure rows")
        elif rows[0]["stage"] != "load" or rows[0]["error_type"] != "InputError" or expected not in rows[0]["message"]:
            problems.append(f"{sid}: expected load/InputError mentioning {expected!r}, got {rows[0]}")
    assert not problems, "\n".join(problems)
    assert len(corpus.failing) >= 20  # the messy kinds plus this corpus's additions


def test_unreadable_meta_lines_are_listing_failures_naming_the_line(bad_run):
    corpus, _, failures, _, _, _ = bad_run
    assert len(corpus.listing) >= 5
    for line_id, expected in corpus.listing.items():
        rows = failures_for(failures, line_id)
        assert len(rows) == 1, (line_id, rows)
        row = rows[0]
        number = line_id.rsplit("-", 1)[1]
        assert row["stage"] == "list" and row["shard"] == "", row
        assert expected in row["message"] and f"line {number}" in row["message"], row


def test_paths_outside_the_root_are_listing_failures_and_never_opened(bad_run):
    corpus, _, failures, samples, _, _ = bad_run
    assert len(corpus.outside) >= 5
    written = {s.meta["source_id"] for s in samples}
    for sid, expected in corpus.outside.items():
        rows = failures_for(failures, sid)
        assert len(rows) == 1, (sid, rows)
        assert rows[0]["stage"] == "list" and rows[0]["error_type"] == "OutsideRoot", rows[0]
        assert expected in rows[0]["message"], (expected, rows[0]["message"])
        assert sid not in written
    assert "alias_inside" in written  # a symlink that resolves inside the root is fine
    assert corpus.opened_outside == [], "files outside the root were opened"


def test_duplicate_id_keeps_the_first_entry_and_reports_the_second(bad_run):
    corpus, _, failures, samples, _, _ = bad_run
    for sid, expected in corpus.duplicates.items():
        landed = [s for s in samples if s.meta["source_id"] == sid]
        assert len(landed) == 1
        assert landed[0].caption == "a yellow box on a dark wall"  # the first entry's caption, not the duplicate's
        rows = failures_for(failures, sid)
        assert len(rows) == 1 and rows[0]["error_type"] == "DuplicateKey" and rows[0]["stage"] == "list"
        assert expected in rows[0]["message"] and "good_again.png" in rows[0]["message"]


def test_every_listed_key_is_accounted_for_exactly_once(bad_run):
    corpus, result, failures, samples, index_rows, out = bad_run
    listed = [item.key for item in RoremSource(corpus.root, name=NAME).items()]
    assert len(listed) == len(set(listed))
    index_keys = [row["key"] for row in index_rows]
    assert sorted(index_keys) == sorted(listed), "every listed item has exactly one row in a shard index"
    written = [s.key for s in samples]
    load_failed = [row["key"] for row in failures if row["shard"]]
    assert len(written) == len(set(written)) and len(load_failed) == len(set(load_failed))
    assert sorted(written + load_failed) == sorted(listed)
    assert result.failed == len(failures)
    assert not list(out.glob("*.tmp-*"))
