"""A child process that a test module starts when the session collects its tests and collects when its
test runs (``tests/conftest.py`` calls the module's ``start_in_background(folder)`` and, at the end of the
session, ``stop_background()``). For work that takes minutes of mostly waiting (a multi-node Ray cluster
of its own): it then overlaps the rest of the suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


class BackgroundChild:
    """``argv`` run once, with stdout/stderr in ``work/child.out`` and ``work/child.err``, a private short Ray
    temp dir (``RAY_TMPDIR``: a cluster must not publish its address machine-wide, where an address-less
    ``ray.init()`` elsewhere would join it, and Ray's socket paths must stay under 107 characters), and its own
    process group (a kill reaches the Ray processes it started)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.work: Path | None = None
        self.ray_tmp: str | None = None
        self.started = 0.0

    def start(self, argv: list[str], work: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        if self.process is not None:
            return
        self.work = Path(work)
        self.ray_tmp = tempfile.mkdtemp(prefix="llbg-", dir="/tmp")
        with open(self.work / "child.out", "wb") as out, open(self.work / "child.err", "wb") as err:
            self.process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, start_new_session=True,
                                            env={**os.environ, **(env or {}), "RAY_TMPDIR": self.ray_tmp})
        self.started = time.perf_counter()

    def wait(self, timeout: float) -> tuple[int | None, str, str]:
        """(exit code or None when it ran past ``timeout`` seconds from its start and was killed, stdout,
        stderr)."""
        assert self.process is not None and self.work is not None, "start() first"
        try:
            self.process.wait(timeout=max(1.0, timeout - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
        self.cleanup()
        code = self.process.returncode
        return (None if code is not None and code < 0 else code, (self.work / "child.out").read_text(),
                (self.work / "child.err").read_text())

    def result(self, timeout: float, explain: Callable[[], str] | None = None) -> Any:
        """The JSON on the child's last ``RESULT `` line (``wait`` first); fails the test when it printed none,
        with ``explain()`` or else the tails of the child's output."""
        code, stdout, stderr = self.wait(timeout)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, (f"background child failed (rc {code}):\n"
                       + (explain() if explain is not None else f"{stdout[-3000:]}\n{stderr[-5000:]}"))
        return json.loads(lines[-1][len("RESULT "):])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def cleanup(self) -> None:
        if self.ray_tmp:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def stop(self) -> None:
        """The session's end: a child nobody collected is killed; the Ray temp dir goes (``work`` stays, with
        the session's other folders, for its logs)."""
        self.kill()
        self.cleanup()
