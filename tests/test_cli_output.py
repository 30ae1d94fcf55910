"""What the command line prints: no Ray lines by default (they go to OUT/logs/ray.log), Ray's own output
with -v, the package's warnings through ``logging``, -v before or after the subcommand."""

import logging
import os
import subprocess
import sys

import pytest

from layerloop import logs
from layerloop.cli import main, make_parser

TINY = ["source.n=4", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=2",
        "report.enabled=false"]
RAY_MARKERS = ("Started a local Ray instance", "authentication_token_setup", "core_worker.cc", "worker.py:",
               "streaming_executor", "Progress bars disabled", "INFO ", "WARNING ")


def _ray_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(m in line for m in RAY_MARKERS)]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}  # always a fresh local Ray, never someone's cluster
    return subprocess.run([sys.executable, "-m", "layerloop.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("argv", [["-v", "build", "demo"], ["build", "demo", "-v"], ["build", "-v", "demo"],
                                  ["--verbose", "inspect", "x"], ["inspect", "x", "--verbose"]])
def test_verbose_parses_before_and_after_the_subcommand(argv):
    args, _ = make_parser().parse_known_args(argv)
    assert args.verbose is True


def test_verbose_defaults_off():
    args, _ = make_parser().parse_known_args(["build", "demo"])
    assert args.verbose is False


def test_ray_build_is_quiet_by_default_and_shows_ray_with_verbose(tmp_path):
    """A real Ray build in a subprocess: its stderr holds no Ray line (they are in OUT/logs/ray.log), and
    with -v Ray's own output is back. Both runs start their own local Ray (~15 s each on 2 CPUs)."""
    quiet = _cli("build", "demo", "--out", str(tmp_path / "q"), "--executor", "ray", *TINY)
    assert quiet.returncode == 0, quiet.stderr
    assert "2 built now" in quiet.stdout
    assert _ray_lines(quiet.stderr) == [], quiet.stderr
    assert quiet.stderr.strip() == ""  # not a terminal: no bar, no status line, nothing else
    ray_log = (tmp_path / "q" / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log and "session logs" in ray_log
    assert "starting Ray" in (tmp_path / "q" / "logs" / "layerloop.log").read_text()

    loud = _cli("build", "demo", "--out", str(tmp_path / "v"), "--executor", "ray", "-v", *TINY)
    assert loud.returncode == 0, loud.stderr
    assert any("Started a local Ray instance" in line for line in loud.stderr.splitlines()), loud.stderr
    assert "layerloop: starting Ray" in loud.stderr  # the package's INFO lines with -v


def test_package_warning_shows_on_stderr_and_in_the_run_log(tmp_path, capsys):
    """A damaged committed shard is rebuilt with a warning from build.py: the CLI's logging shows it."""
    out = tmp_path / "run"
    args = ["build", "demo", "--out", str(out), "--executor", "local", "--no-progress", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    shard = sorted(out.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # damaged: size and hash no longer match
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("layerloop: ")]
    assert any(shard.stem in line and "rebuilt" in line for line in warnings), captured.err
    assert "1 built now, 1 already committed" in captured.out
    assert f"shard {shard.stem} rebuilt" in (out / "logs" / "layerloop.log").read_text()


def test_logging_is_restored_after_a_command(tmp_path, capsys):
    assert main(["build", "demo", "--out", str(tmp_path / "r"), "--executor", "local", "--no-progress", *TINY]) == 0
    package = logging.getLogger("layerloop")
    assert not any(isinstance(h, (logs._TerminalHandler, logs._RunFileHandler)) for h in package.handlers)
    assert logs.ray_quiet() is False and os.environ.get(logs.RAY_DATA_LOGGING_ENV) is None


def test_info_lines_only_with_verbose(tmp_path, capsys):
    args = ["build", "demo", "--out", str(tmp_path / "r"), "--executor", "local", "--no-progress", *TINY]
    assert main(args) == 0
    assert "layerloop:" not in capsys.readouterr().err
    assert main(["-v", *args]) == 0
    assert "already committed, 0 to build" in capsys.readouterr().err


def test_quiet_ray_sends_native_stderr_and_ray_loggers_to_the_run_log(tmp_path, capfd):
    """Without starting Ray: what quiet_ray does to the stderr descriptor and the "ray" logger, and that
    restore undoes it (a later command, or pytest, gets its stderr back)."""
    (tmp_path / "run.lock").write_text("")
    logs.configure(verbose=False)
    try:
        logs.set_run_dir(tmp_path)
        path = logs.quiet_ray()
        assert path == tmp_path / "logs" / "ray.log"
        os.write(2, b"[E core_worker.cc] native line\n")
        logging.getLogger("ray").warning("ray logger line")
        logging.getLogger("layerloop.test").warning("package warning")
        assert os.environ[logs.RAY_DATA_LOGGING_ENV].endswith("ray-data-logging.yaml")
    finally:
        logs.restore()
    err = capfd.readouterr().err
    assert "native line" not in err and "ray logger line" not in err
    assert "layerloop: package warning" in err
    text = path.read_text()
    assert "native line" in text and "ray logger line" in text
    os.write(2, b"after restore\n")
    assert "after restore" in capfd.readouterr().err
    assert logs.RAY_DATA_LOGGING_ENV not in os.environ


def test_verbose_leaves_ray_alone(tmp_path):
    logs.configure(verbose=True)
    try:
        logs.set_run_dir(tmp_path)
        assert logs.quiet_ray() is None and not (tmp_path / "logs").exists()
    finally:
        logs.restore()
