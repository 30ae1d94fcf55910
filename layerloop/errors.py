"""The errors the command line turns into one line and a documented exit code.

Exit codes (README, "What layerloop guarantees"):

* 0 the command did what it was asked;
* 1 ``models list``: some weights are missing (the list says which);
* 2 refused before any work: an invalid config, argument or override, an unknown config name, a run
  directory in use by another live run (``run.lock``) or holding another run, model weights missing
  while offline, a source path a source must not write to, an input or run directory that is not what
  the command needs (no such run, no committed shards, not a checkpoint);
* 3 the run stopped because another run took its directory over (its lock's owner changed);
* 4 the environment failed: the system could not read or write a file or folder (disk full, read-only
  file system, permission denied, a path that is a file where a folder is needed, an I/O error). The message
  names the path and the cause; ``run.json`` records the failure; re-running the same command after the
  cause is fixed resumes the run;
* 130 interrupted (Ctrl-C).

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno as _errno
import os

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_REFUSED = 2
EXIT_OWNERSHIP_LOST = 3
EXIT_ENVIRONMENT = 4
EXIT_INTERRUPTED = 130


class LayerloopError(Exception):
    """Base class: an error whose message is written for the user, with the exit code it maps to."""

    exit_code = EXIT_REFUSED


class ConfigError(LayerloopError, ValueError):
    """A config, override or argument that cannot be used; raised before any side effect."""


class UnsafePathError(ConfigError):
    """A path a command must not write to (somebody's data given as a demo source path or as --out)."""


class EnvironmentFailure(LayerloopError, OSError):
    """A file system operation failed (see ``describe_os_error``)."""

    exit_code = EXIT_ENVIRONMENT


def unwrap(error: BaseException) -> BaseException:
    """The user's error behind an executor's wrapper (a Ray task error carries it as ``cause``)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            error = cause
            continue
        break
    return error


def attach_path(error: OSError, path: str | os.PathLike, what: str | None = None) -> OSError:
    """``error`` naming ``path``. Without ``what``: ``error`` itself when it names a path, else the same
    OSError type and errno naming ``path`` (a failed ``write()`` on an open file, or pyarrow's writer, says
    "No space left on device" and no file). With ``what`` ("cannot open the run lock"): always the same
    type and errno, saying what failed: ``[Errno 13] cannot open the run lock: Permission denied: '/out/run.lock'``."""
    if what is not None:
        cause = error.strerror or str(error) or type(error).__name__
        return type(error)(error.errno, f"{what}: {cause}", os.fspath(path))
    if error.filename is not None:
        return error
    code = error.errno
    if code is None:  # pyarrow: "[Errno 28] Error writing bytes to file. Detail: ..." without errno set
        for candidate in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG, _errno.EROFS, _errno.EACCES, _errno.EIO):
            if f"[Errno {candidate}]" in str(error) or f"[errno {candidate}]" in str(error):
                code = candidate
                break
    if code is None:
        return OSError(f"{os.fspath(path)}: {error}")
    cause = error.strerror if error.errno is not None and error.strerror else os.strerror(code)
    cls = type(error) if error.errno is not None else OSError
    return cls(code, cause, os.fspath(path))


def describe_os_error(error: OSError) -> str:
    """``cannot write /out/x.tar: No space left on device (ENOSPC)``: the path and the cause in one line."""
    code = error.errno
    name = _errno.errorcode.get(code, "") if code is not None else ""
    cause = error.strerror or str(error) or type(error).__name__
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in paths)
    hint = {
        _errno.ENOSPC: "free some space, then re-run the same command to resume",
        _errno.EDQUOT: "free some space, then re-run the same command to resume",
        _errno.EFBIG: "the file size limit was reached; raise it, then re-run the same command to resume",
        _errno.EROFS: "the file system is read-only; choose another --out, or re-run once it is writable",
        _errno.EACCES: "permission denied; fix the permissions or choose another --out",
        _errno.EPERM: "operation not permitted; fix the permissions or choose another --out",
        _errno.ENOTDIR: "a path on the way is a file, not a folder; choose another --out",
        _errno.EEXIST: "a file is in the way; choose another --out",
        _errno.EISDIR: "a folder was given where a file is needed",
        _errno.EIO: "the device reported an I/O error",
    }.get(code)
    text = f"{where}: {cause}" if where else cause
    if name:
        text += f" ({name})"
    return f"{text}; {hint}" if hint else text
