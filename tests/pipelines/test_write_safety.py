"""Writes stay inside ``--out``; config checks come before any side effect; environment failures are one
line, a documented exit code and a failed ``run.json``, and a re-run after the cause is fixed resumes to
the same bytes.

Every test works in a sandbox folder that also holds the user's data, snapshots the whole sandbox (paths,
sizes, mtimes, contents' sha256) before a command and checks afterwards that nothing outside ``--out``
changed. Disk-full and read-only file systems are real: a size-limited tmpfs and a read-only bind mount
in a private mount namespace (``unshare -m``, root only; skipped where the kernel refuses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerloop.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["source.n=4", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=2",
        "report.enabled=false"]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links) except those under ``skip``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if skip is not None and path == skip:
                continue
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            state[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return state


def user_rorem(root: Path) -> Path:
    """A user's RORem folder (made with the demo renderer, then made theirs: no demo.json, own files)."""
    assert main(["demo-data", str(root), "--n", "3", "--seed", "5", "--size", "64"]) == 0
    (root / "demo.json").unlink()
    (root / "notes.txt").write_text("my annotations\n")
    return root


def shard_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.suffix in (".tar", ".parquet")
            and p.name != "failures.parquet"}


# ------------------------------------------------------------------------------- demo source paths
def test_demo_source_path_on_user_data_is_refused_before_any_write(tmp_path, capsys):
    data = user_rorem(tmp_path / "RORem")
    before = snapshot(tmp_path)
    code = main(["build", "demo", "--out", str(tmp_path / "run"), "--executor", "local",
                 f"source.path={data}", *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "source.path=" in err and "no demo.json" in err and "type: rorem" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before, "a refused build changed files"
    assert not (tmp_path / "run").exists(), "a refused build created its run directory"


def test_demo_source_reads_a_matching_demo_data_folder_without_writing_it(tmp_path, capsys):
    data = tmp_path / "scenes"
    assert main(["demo-data", str(data), "--n", "4", "--seed", "0", "--size", "64"]) == 0
    before = snapshot(tmp_path)
    assert main(["build", "demo", "--out", str(tmp_path / "run"), "--executor", "local",
                 f"source.path={data}", *TINY]) == 0
    assert snapshot(tmp_path, skip=tmp_path / "run") == before
    assert "samples written: 4, failed: 0" in capsys.readouterr().out
    assert not (tmp_path / "run" / "demo-data").exists()

    # the same folder made with other parameters is not read as if it were this config's
    code = main(["build", "demo", "--out", str(tmp_path / "run2"), "--executor", "local",
                 f"source.path={data}", *TINY, "source.seed=3"])
    assert code == 2 and "other parameters (seed=0)" in capsys.readouterr().err
    assert snapshot(tmp_path, skip=tmp_path / "run") == before


def test_empty_demo_source_path_renders_inside_the_run_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build", "demo", "--out", str(tmp_path / "run"), "--executor", "local",
                 f"source.path={empty}", *TINY]) == 0
    assert not any(empty.iterdir())
    assert len(json.loads((tmp_path / "run" / "demo-data" / "meta.json").read_text())) == 4


def test_refused_rerun_does_not_touch_the_runs_demo_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["build", "demo", "--out", str(out), "--executor", "local", *TINY]) == 0
    before = snapshot(tmp_path)
    code = main(["build", "demo", "--out", str(out), "--executor", "local", *TINY, "source.n=6"])
    assert code == 2 and "different config" in capsys.readouterr().err
    after = snapshot(tmp_path)
    for state in (before, after):
        state.pop("run/run.lock")  # taking the lock writes its owner there; nothing else may change
    assert after == before, "the refused re-run re-rendered or rewrote something"


def test_demo_data_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    data = user_rorem(tmp_path / "RORem")
    before = snapshot(tmp_path)
    code = main(["demo-data", str(data), "--n", "2", "--seed", "1", "--size", "64"])
    assert code == 2 and "not a demo-data folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_invalid_stage_parameter_creates_no_run_directory(tmp_path, capsys):
    code = main(["build", "demo", "--out", str(tmp_path / "run"), "--executor", "local", *TINY,
                 "stages.matting.backend=nonsense"])
    assert code == 2 and "nonsense" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_hf_source_cache_stays_in_the_run_directory(tmp_path, monkeypatch):
    """``datasets`` writes its Arrow cache under ``HF_HOME`` unless told otherwise: a build puts it in OUT."""
    pytest.importorskip("datasets")
    from PIL import Image

    data = tmp_path / "hf"
    data.mkdir()
    rows = []
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 120)).save(data / f"img{i}.png")
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        mask.save(data / f"mask{i}.png")
        rows.append({"file_name": f"img{i}.png", "mask_file_name": f"mask{i}.png", "text": f"thing {i}"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    config = tmp_path / "hf.yaml"
    config.write_text(
        f"name: hfrun\nexecutor: local\nsource: {{type: hf, path: {data}, caption_column: text}}\n"
        "stages:\n  - {stage: load, short_side: 64}\n  - {stage: trimap}\n  - {stage: matting}\n"
        "  - {stage: background, backend: opencv}\n  - {stage: recompose}\n  - {stage: box-mask}\n"
        "  - {stage: caption}\nreport: {enabled: false}\n")
    before = snapshot(tmp_path)
    assert main(["build", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert snapshot(tmp_path, skip=tmp_path / "run") == before
    assert (tmp_path / "run" / ".cache" / "hf").is_dir()


# ------------------------------------------------------------------------- environment failures
def test_config_path_that_is_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    code = main(["build", str(tmp_path / "configs"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and "demo" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_mistyped_config_name_lists_the_packaged_ones(capsys):
    assert main(["build", "demoo"]) == 2
    err = capsys.readouterr().err
    assert "demoo" in err and "demo," in err and "rorem" in err


def test_out_that_is_a_file_is_one_line_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    code = main(["build", "demo", "--out", str(out), "--executor", "local", *TINY])
    err = capsys.readouterr().err
    assert code == 4 and str(out) in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "not a folder"


def _in_namespace(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace; skip when this kernel or user may not."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()[:120]}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def _cli(*args: str) -> str:
    quoted = " ".join(f"'{a}'" for a in args)
    return f"'{sys.executable}' -m layerloop.cli {quoted}"


def test_disk_full_is_one_line_recorded_and_resumes_to_the_same_bytes(tmp_path):
    reference = tmp_path / "reference"
    assert main(["build", "demo", "--out", str(reference), "--executor", "local", "--no-progress", *TINY]) == 0
    out, saved = tmp_path / "full", tmp_path / "saved"
    out.mkdir()
    build = _cli("build", "demo", "--out", str(out), "--executor", "local", "--no-progress", *TINY)
    # 160 KiB hold the rendered scenes and a shard or two, not the whole run: the disk fills mid-build.
    result = _in_namespace(
        f"mount -t tmpfs -o size=160k tmpfs '{out}' || exit 90\n"
        f"{build} >'{tmp_path}/first.out' 2>'{tmp_path}/first.err'; echo $? >'{tmp_path}/first.rc'\n"
        f"cp -a '{out}' '{tmp_path}/after_failure'\n"
        f"mount -o remount,size=64m '{out}' || exit 91\n"
        f"{build} >'{tmp_path}/second.out' 2>'{tmp_path}/second.err'; echo $? >'{tmp_path}/second.rc'\n"
        f"cp -a '{out}' '{saved}'\n")
    assert result.returncode == 0, result.stderr
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "4", err
    lines = [line for line in err.splitlines() if line.startswith("layerloop:")]
    assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0] and str(out) in lines[0], err
    assert "Traceback" not in err
    failed = json.loads((tmp_path / "after_failure" / "run.json").read_text())
    assert failed["status"] == "failed" and "ENOSPC" in failed["error"]
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert json.loads((saved / "run.json").read_text())["status"] == "complete"
    assert shard_bytes(saved) == shard_bytes(reference)


def test_read_only_out_is_one_line_and_resumes_when_writable(tmp_path):
    reference = tmp_path / "reference"
    assert main(["build", "demo", "--out", str(reference), "--executor", "local", "--no-progress", *TINY]) == 0
    out = tmp_path / "run"
    assert main(["build", "demo", "--out", str(out), "--executor", "local", "--no-progress", *TINY,
                 ]) == 0
    # a half-built run: drop two shards, then make the folder read-only and resume it
    for path in sorted(out.glob("demo-00000[01].*")):
        path.unlink()
    json_before = (out / "run.json").read_bytes()
    build = _cli("build", "demo", "--out", str(out), "--executor", "local", "--no-progress", *TINY)
    result = _in_namespace(
        f"mount --bind '{out}' '{out}' && mount -o remount,bind,ro '{out}' || exit 90\n"
        f"{build}; echo $? >'{tmp_path}/rc'\n")
    err = result.stderr
    assert (tmp_path / "rc").read_text().strip() == "4", err
    lines = [line for line in err.splitlines() if line.startswith("layerloop:")]
    assert len(lines) == 1 and "Read-only file system (EROFS)" in lines[0] and str(out) in lines[0], err
    assert "Traceback" not in err
    assert (out / "run.json").read_bytes() == json_before  # nothing could be written, nothing was
    assert main(["build", "demo", "--out", str(out), "--executor", "local", "--no-progress", *TINY]) == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_out_that_holds_somebodys_files_is_refused(tmp_path, capsys):
    data = user_rorem(tmp_path / "RORem")
    before = snapshot(tmp_path)
    code = main(["build", "demo", "--out", str(data), "--executor", "local", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "not a layerloop run directory" in err and "meta.json" in err
    assert snapshot(tmp_path) == before
