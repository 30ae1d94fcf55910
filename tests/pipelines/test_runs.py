import os
import subprocess
import sys

import pytest

from layerloop.pipelines.runs import RunDirectory, RunLockedError, RunMismatchError


def test_second_writer_is_refused_in_process(tmp_path):
    with RunDirectory(tmp_path):
        with pytest.raises(RunLockedError, match="in use by another layerloop run"):
            RunDirectory(tmp_path).acquire()
    with RunDirectory(tmp_path):  # released: usable again
        pass


def test_second_writer_is_refused_across_processes(tmp_path):
    with RunDirectory(tmp_path):
        code = ("import sys; from layerloop.pipelines.runs import RunDirectory, RunLockedError\n"
                f"try:\n RunDirectory({str(tmp_path)!r}).acquire()\nexcept RunLockedError as e:\n print(e); sys.exit(3)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 3 and "pid" in result.stdout


def test_resume_checks_config_and_source(tmp_path):
    with RunDirectory(tmp_path) as run:
        info = run.start({"a": 1}, "fp1", "keys1", 2, 4, 0, "t")
        assert info["status"] == "running" and info["attempts"] == 1
        run.finish(samples_ok=4)
        assert run.read_run_json()["status"] == "complete"
        assert run.start({"a": 1}, "fp1", "keys1", 2, 4, 0, "t")["attempts"] == 2
        with pytest.raises(RunMismatchError, match="different config"):
            run.start({"a": 2}, "fp2", "keys1", 2, 4, 0, "t")
        with pytest.raises(RunMismatchError, match="lists different samples"):
            run.start({"a": 1}, "fp1", "keys2", 2, 5, 0, "t")


# --------------------------------------------------------------------------------- owner token
def test_acquire_writes_a_fresh_owner_token_next_to_the_readable_holder(tmp_path):
    from layerloop.datasets.shards import parse_lock

    with RunDirectory(tmp_path) as run:
        first = run.owner_token
        token, holder = parse_lock((tmp_path / "run.lock").read_text())
        assert token == first and len(first) == 32
        assert holder.startswith(f"pid {os.getpid()} on ") and " since " in holder
        assert run.owner.token == first and run.owner.lock_path == tmp_path / "run.lock"
    assert run.owner is None and run.owner_token is None  # released: no longer the owner
    with RunDirectory(tmp_path) as again:
        assert again.owner_token != first
        assert parse_lock((tmp_path / "run.lock").read_text())[0] == again.owner_token


def test_refusal_names_the_holder_not_the_token(tmp_path):
    with RunDirectory(tmp_path) as run:
        with pytest.raises(RunLockedError) as refused:
            RunDirectory(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(refused.value) and run.owner_token not in str(refused.value)


# ------------------------------------------------------------------------------- run.json: failed
def test_fail_records_status_error_and_time(tmp_path):
    with RunDirectory(tmp_path) as run:
        run.start({"a": 1}, "fp1", "keys1", 2, 4, 0, "t")
        assert run.fail("OSError: /x: No space left on device (ENOSPC)", shards_done=1) is True
        info = run.read_run_json()
        assert info["status"] == "failed" and info["error"] == "OSError: /x: No space left on device (ENOSPC)"
        assert info["shards_done"] == 1 and info["failed"] and info["fingerprint"] == "fp1"
        assert not (tmp_path / "run.json.tmp").exists()
        assert run.start({"a": 1}, "fp1", "keys1", 2, 4, 0, "t")["status"] == "running"  # resumable


def test_fail_never_raises_when_run_json_cannot_be_written(tmp_path):
    with RunDirectory(tmp_path) as run:
        (tmp_path / "run.json").mkdir()  # os.replace onto a directory fails
        assert run.fail("RuntimeError: boom") is False
        assert not (tmp_path / "run.json.tmp").exists()
    gone = RunDirectory(tmp_path / "deleted")
    assert gone.fail("anything") is False  # the directory does not exist at all


def test_fail_leaves_the_run_json_of_another_owner_alone(tmp_path):
    from layerloop.datasets.shards import format_lock

    with RunDirectory(tmp_path) as run:
        run.start({"a": 1}, "fp1", "keys1", 2, 4, 0, "t")
        before = (tmp_path / "run.json").read_text()
        # another driver took the run (e.g. run.lock was deleted and a new run created it again)
        (tmp_path / "run.lock").write_text(format_lock("pid 1 on elsewhere since then", "b" * 32))
        assert run.fail("RunOwnershipLost: ...") is False
        assert (tmp_path / "run.json").read_text() == before


def test_fail_replaces_an_unreadable_run_json(tmp_path):
    run = RunDirectory(tmp_path)
    (tmp_path / "run.json").write_text("{half")
    with pytest.raises(RunMismatchError, match="run.json is not valid JSON"):
        run.read_run_json()
    assert run.fail("ValueError: bad \udcff name") is True
    assert run.read_run_json()["error"] == "ValueError: bad \udcff name"


def test_check_config_refuses_another_config_before_listing(tmp_path):
    with RunDirectory(tmp_path) as run:
        run.check_config("fp1")  # no run.json yet: nothing to compare
        run.start({"a": 1}, "fp1", "keys1", 2, 4, 0, "t")
        run.check_config("fp1")
        with pytest.raises(RunMismatchError, match="different config"):
            run.check_config("fp2")


# ----------------------------------------------------------------------------- acquire: bad --out
def test_out_that_is_a_file_is_a_clear_oserror(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=f"the run directory is a file.*{path}"):
        RunDirectory(path).acquire()
    with pytest.raises((NotADirectoryError, FileExistsError), match=f"cannot create the run directory.*{path}/run"):
        RunDirectory(path / "run").acquire()
    assert path.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_that_is_not_writable_is_a_clear_oserror(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"cannot create the run directory.*{parent}/run"):
            RunDirectory(parent / "run").acquire()
        with pytest.raises(PermissionError, match=f"cannot open the run lock.*{parent}/run.lock"):
            RunDirectory(parent).acquire()
    finally:
        parent.chmod(0o755)


def test_unwritable_out_message_names_the_path(tmp_path, monkeypatch):
    """Root cannot be refused by permissions; a refusing mkdir/open is simulated, the wrapping is real."""
    from pathlib import Path

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match=f"cannot create the run directory: Permission denied.*{tmp_path}/r"):
        RunDirectory(tmp_path / "r").acquire()
    monkeypatch.undo()
    from layerloop.pipelines import runs

    monkeypatch.setattr(runs, "open", refuse, raising=False)  # the lock file's open() in acquire
    expected = f"cannot open the run lock: Permission denied.*{tmp_path}/run.lock"
    with pytest.raises(PermissionError, match=expected) as refused:
        RunDirectory(tmp_path).acquire()
    assert refused.value.errno == 13 and refused.value.filename == str(tmp_path / "run.lock")


# -------------------------------------------------------------------------------- failures.parquet
def test_failures_parquet_accepts_any_python_text(tmp_path):
    import pyarrow.parquet as pq

    from layerloop.samples import Failure

    listing = (Failure("k_\udcff", "source", "OSError", "cannot read caf\udce9.jpg"),)
    shard = {0: (("k_1", "load", "OSError", "bad \udcfe"),)}
    assert RunDirectory(tmp_path).write_failures("t", shard, listing) == 2
    rows = pq.read_table(tmp_path / "failures.parquet").to_pylist()
    assert rows == [
        {"key": "k_\\udcff", "stage": "source", "error_type": "OSError", "message": "cannot read caf\\udce9.jpg",
         "shard": ""},
        {"key": "k_1", "stage": "load", "error_type": "OSError", "message": "bad \\udcfe", "shard": "t-000000"},
    ]
