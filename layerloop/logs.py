"""Where the command line's output goes.

* The package's own log lines (``logging.getLogger("layerloop...")``) go to stderr as ``layerloop: ...``, at
  WARNING by default and INFO with ``-v``; when the command has a run directory, every line (DEBUG and up)
  also goes to ``OUT/logs/layerloop.log`` once the run holds its lock.
* Ray's driver-side output (its ``ray`` / ``ray.data`` loggers, the C++ core worker's lines written to the
  stderr file descriptor, the workers' output it forwards) goes to ``OUT/logs/ray.log`` (which names Ray's own
  session log directory) instead of the terminal; ``-v`` leaves Ray's output as Ray prints it.
* Progress bars and status lines go to the terminal's stderr, only when it is a TTY and the command was not
  given ``--no-progress``.

Nothing here is active until the CLI calls ``configure``: a library user keeps Ray's and ``logging``'s
behaviour unchanged. ``restore`` undoes everything (the CLI calls it when a command ends).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = "layerloop"
TERMINAL_FORMAT = "layerloop: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DIR = "logs"
RAY_LOG = "ray.log"
PACKAGE_LOG = "layerloop.log"
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"  # Ray Data's documented logging-config override


class _State:
    def __init__(self) -> None:
        self.configured = False
        self.verbose = False
        self.progress = True
        self.run_dir: Path | None = None
        self.handlers: list[tuple[logging.Logger, logging.Handler]] = []  # ours, removed by restore
        self.removed: list[tuple[logging.Logger, logging.Handler]] = []  # Ray's, put back by restore
        self.levels: list[tuple[logging.Logger, int, bool]] = []
        self.saved_fd: int | None = None
        self.saved_stderr: Any = None
        self.our_stderr: Any = None
        self.data_context: tuple[Any, bool] | None = None
        self.env: dict[str, str | None] = {}
        self.ray_log: Path | None = None
        self.store_logs: Any = None  # RUN/logs on an object store: the local log folder is uploaded there


_state = _State()


class _Terminal:
    """A file-like stderr that is always the terminal's, also after ``quiet_ray`` pointed the stderr file
    descriptor at the Ray log (it writes to whatever ``sys.stderr`` is when called)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def fileno(self) -> int:
        return sys.stderr.fileno()


TERMINAL = _Terminal()


class _TerminalHandler(logging.StreamHandler):
    """``logging`` to the current ``sys.stderr`` (as pytest or ``quiet_ray`` may have replaced it)."""

    def __init__(self) -> None:
        super().__init__(TERMINAL)


class _RunFileHandler(logging.Handler):
    """DEBUG lines into ``RUN/logs/layerloop.log``; held back until the run directory is a locked run (a
    build refuses an ``--out`` folder holding anything before its lock is taken)."""

    def __init__(self, run_dir: Path, ready: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.run_dir = run_dir
        self.ready = ready  # a folder of our own (the local logs of a run on a store): no lock to wait for
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter(FILE_FORMAT))

    def _open(self) -> logging.FileHandler | None:
        if self.file is None and (self.ready or (self.run_dir / "run.lock").exists()
                                  or (self.run_dir / "run.json").exists()):
            try:
                (self.run_dir / LOG_DIR).mkdir(exist_ok=True)
                self.file = logging.FileHandler(self.run_dir / LOG_DIR / PACKAGE_LOG, encoding="utf-8")
            except OSError:
                return None
            self.file.setFormatter(self.formatter)
        return self.file

    def emit(self, record: logging.LogRecord) -> None:
        file = self._open()
        if file is None:
            if len(self.pending) < 10_000:
                self.pending.append(record)
            return
        for held in self.pending:
            file.emit(held)
        self.pending = []
        file.emit(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def configure(verbose: bool = False, progress: bool = True) -> None:
    """The CLI's logging: ``layerloop: ...`` lines on stderr (WARNING, INFO with ``verbose``)."""
    restore()
    _state.configured, _state.verbose, _state.progress = True, verbose, progress
    logger = logging.getLogger(PACKAGE)
    _state.levels.append((logger, logger.level, logger.propagate))
    handler = _TerminalHandler()
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # a root handler (a notebook's, a test's) would print each line twice
    _state.handlers.append((logger, handler))


def set_run_dir(run_dir: Any) -> None:
    """The command's run directory: its ``logs/`` receives the package's DEBUG log and Ray's output.

    For a run on an object store (a ``StorePath``) the logs are written in a local folder
    (``storage.cache_dir(url, "logs")``, which starts from the store's ``logs/`` of an earlier run, so a
    resume on another machine appends to the same log) and uploaded to ``RUN/logs/`` by
    ``upload_store_logs``, which the build calls before it gives up its lease."""
    if not _state.configured or _state.run_dir is not None:
        return
    from layerloop import storage

    if storage.is_remote(run_dir):
        remote = storage.location(run_dir)
        local = storage.cache_dir(remote.url, "logs")
        _pull_store_logs(remote / LOG_DIR, local / LOG_DIR)
        local.mkdir(parents=True, exist_ok=True)
        _state.store_logs = remote / LOG_DIR
        _state.run_dir = local
        handler = _RunFileHandler(local, ready=True)
    else:
        _state.run_dir = Path(run_dir)
        handler = _RunFileHandler(_state.run_dir)
    logger = logging.getLogger(PACKAGE)
    logger.addHandler(handler)
    _state.handlers.append((logger, handler))


def _pull_store_logs(remote: Any, local: Path) -> None:
    """The log files of an earlier run on the store, into the local log folder (nothing when there are none
    or the store cannot be read: the build then names the store's problem itself)."""
    from layerloop import storage

    try:
        found = remote.files()
    except (OSError, storage.StoreError):
        return
    local.mkdir(parents=True, exist_ok=True)
    for obj in found:
        if obj.name in (PACKAGE_LOG, RAY_LOG):
            try:
                (local / obj.name).write_bytes(obj.read_bytes())
            except (OSError, storage.StoreError):
                pass


def upload_store_logs() -> None:
    """Upload the local log folder of a run on an object store to ``RUN/logs/`` (each file one PUT); a
    no-op for a local run. A failed upload is only logged (in the local copy): the log is not worth failing
    a build over, and when the store has just failed the build already says so in one line."""
    if _state.store_logs is None or _state.run_dir is None:
        return
    for handler in (h for _, h in _state.handlers):
        handler.flush()
    folder = _state.run_dir / LOG_DIR
    for name in (PACKAGE_LOG, RAY_LOG):
        if (folder / name).is_file():
            try:
                (_state.store_logs / name).put_file(folder / name)
            except OSError as error:
                logging.getLogger(PACKAGE).debug("the log %s was not uploaded to %s: %s", name,
                                                 _state.store_logs, error)


def verbose() -> bool:
    return _state.verbose


def progress_enabled(requested: bool = True) -> bool:
    """Whether to draw a bar or status line: asked for, not ``--no-progress``, and stderr is a terminal."""
    return bool(requested and _state.progress and TERMINAL.isatty())


def status(message: str, enabled: bool = True) -> None:
    """One status line ("starting Ray ...") on the terminal when progress is shown; DEBUG in the log."""
    logging.getLogger(f"{PACKAGE}.status").debug("%s", message)
    if progress_enabled(enabled):
        TERMINAL.write(f"layerloop: {message}\n")
        TERMINAL.flush()


def ray_quiet() -> bool:
    """Whether ``init_ray`` should keep Ray's output off the terminal (the CLI, without ``-v``)."""
    return _state.configured and not _state.verbose


def ray_log_path() -> Path:
    if _state.ray_log is None:
        if _state.run_dir is not None:
            _state.ray_log = _state.run_dir / LOG_DIR / RAY_LOG
        else:
            _state.ray_log = Path(tempfile.gettempdir()) / f"layerloop-ray-{os.getpid()}.log"
    return _state.ray_log


def quiet_ray() -> Path | None:
    """Before ``ray.init``: send Ray's driver-side output to ``ray_log_path()``. Returns that path, or None
    when nothing was changed (not the CLI, ``-v``, or already done)."""
    if not ray_quiet() or _state.saved_fd is not None:
        return None
    path = ray_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    formatter = logging.Formatter(FILE_FORMAT)
    import ray  # noqa: F401 - importing Ray installs its console handlers: before they are replaced
    import ray.data  # noqa: F401

    # Python: the "ray" logger (token-authentication warning, "Started a local Ray instance", ...).
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
        _state.removed.append((ray_logger, handler))
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(formatter)
    ray_logger.addHandler(file_handler)
    _state.handlers.append((ray_logger, file_handler))
    _state.levels.append((ray_logger, ray_logger.level, ray_logger.propagate))
    ray_logger.propagate = False

    # Ray Data reconfigures its "ray.data" logger (a console handler) for every dataset it runs, from the
    # YAML that RAY_DATA_LOGGING_CONFIG names: give it one that only writes its session file (ray-data.log).
    config = path.parent / "ray-data-logging.yaml"
    config.write_text(_ray_data_logging())
    _set_env(RAY_DATA_LOGGING_ENV, str(config))
    # Ray Data's own progress bars (the documented DataContext switch, and its env var for the workers):
    # the CLI draws its own bars.
    _set_env("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        context = ray.data.DataContext.get_current()
        _state.data_context = (context, context.enable_progress_bars)
        context.enable_progress_bars = False
    except AttributeError:
        pass
    data_logger = logging.getLogger("ray.data")
    for handler in list(data_logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            data_logger.removeHandler(handler)
            _state.removed.append((data_logger, handler))

    # C++: the core worker's glog lines go to the stderr file descriptor. Point fd 2 at the log and keep
    # Python's sys.stderr (bars, our messages, tracebacks) on a duplicate of the terminal's descriptor.
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    _state.saved_fd = saved
    _state.saved_stderr = sys.stderr
    if _is_fd2(sys.stderr):
        sys.stderr = _state.our_stderr = open(saved, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                          errors="backslashreplace", closefd=False)
    return path


def note_ray_session() -> None:
    """After ``ray.init``: name Ray's own session log directory in the Ray log (workers' logs live there)."""
    if _state.saved_fd is None:
        return
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()  # no public accessor
        logging.getLogger("ray").info("layerloop: Ray's session logs (workers, raylet, Ray Data) are in %s/logs",
                                      session)
        logging.getLogger(PACKAGE).debug("Ray's output goes to %s; its session logs are in %s/logs",
                                         ray_log_path(), session)
    except Exception:  # noqa: BLE001 - only a note
        pass


def _is_fd2(stream: Any) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, ValueError, OSError):
        return False


def _set_env(name: str, value: str) -> None:
    if name not in _state.env:
        _state.env[name] = os.environ.get(name)
    os.environ[name] = value


def restore() -> None:
    """Undo ``configure``, ``set_run_dir`` and ``quiet_ray`` (handlers, stderr descriptor, environment)."""
    if _state.saved_fd is not None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if _state.our_stderr is not None and sys.stderr is _state.our_stderr:
            sys.stderr = _state.saved_stderr
        if _state.our_stderr is not None:
            try:
                _state.our_stderr.close()  # closefd=False: the descriptor is closed below
            except (OSError, ValueError):
                pass
        os.dup2(_state.saved_fd, 2)
        os.close(_state.saved_fd)
    for logger, handler in _state.handlers:
        logger.removeHandler(handler)
        handler.close()
    for logger, handler in _state.removed:
        logger.addHandler(handler)
    for logger, level, propagate in reversed(_state.levels):
        logger.setLevel(level)
        logger.propagate = propagate
    if _state.data_context is not None:
        context, enabled = _state.data_context
        context.enable_progress_bars = enabled
    for name, value in _state.env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _state.__init__()


def _ray_data_logging() -> str:
    """Ray Data's default logging config without its console handler: its file handler (ray-data.log in
    Ray's session directory) where this Ray has it, else none (a config naming a class Ray lacks would fail
    every dataset)."""
    try:
        from ray.data._internal.logging import SessionFileHandler  # noqa: F401 - Ray's own default handler

        handler = "    class: ray.data._internal.logging.SessionFileHandler\n    formatter: ray\n    filename: ray-data.log\n"
    except ImportError:
        handler = "    class: logging.NullHandler\n"
    return _RAY_DATA_LOGGING.replace("{handler}", handler)


_RAY_DATA_LOGGING = """\
# Written by layerloop (logs.quiet_ray): Ray Data logs to its session file only, not the terminal.
version: 1
disable_existing_loggers: false
formatters:
  ray:
    format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"
handlers:
  file:
{handler}loggers:
  ray.data:
    level: DEBUG
    handlers: [file]
    propagate: false
"""
