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
