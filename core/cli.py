"""Shared behaviour of the entry scripts: a user error prints one actionable line on stderr and exits with code 2."""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager

from .data import DatasetError
from .models import ModelNotFoundError
from .registry import MethodNotImplementedError, UnknownMethodError

USER_ERRORS = (DatasetError, ModelNotFoundError, UnknownMethodError, MethodNotImplementedError, FileNotFoundError,
               FileExistsError, ValueError)


# Failures of the file system that a user fixes (a read-only folder, a full disk, a name too long, a path through a
# file): one line naming the path. Writes are atomic (core.io), so nothing half-written is left behind.
_FS_FIXES = {
    errno.EACCES: "choose a folder you can write to, or change its permissions",
    errno.EPERM: "choose a folder you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOSPC: "free space on that disk, or write to another one (a rerun resumes where this one stopped)",
    errno.EDQUOT: "free space within your quota, or write elsewhere (a rerun resumes where this one stopped)",
    errno.ENAMETOOLONG: "use a shorter path (each folder or file name at most 255 bytes)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file was expected: choose another path",
}


def file_system_error(e: OSError) -> str | None:
    """The one-line message for an OSError a user can fix (see ``_FS_FIXES``), or None for any other."""
    fix = _FS_FIXES.get(e.errno)
    if fix is None:
        return None
    where = e.filename if e.filename is not None else "a file"
    return f"cannot write or read {where}: {e.strerror or e}. Fix: {fix}."


@contextmanager
def exit_on_user_error():
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        message = file_system_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def smoke_config(cfg: dict, overrides: dict) -> dict:
    """A pretraining script's config as a plain dict, with its tiny ``overrides`` merged in when ``cfg['smoke']``."""
    from omegaconf import OmegaConf

    if not cfg.get("smoke"):
        return cfg
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(overrides)))


def run_resolved(run, cfg) -> None:
    """A pretraining script's Hydra main: ``run`` on the resolved config as a plain dict; a user error is one line
    on stderr and exit code 2 (:func:`exit_on_user_error`)."""
    from omegaconf import OmegaConf

    with exit_on_user_error():
        run(OmegaConf.to_container(cfg, resolve=True))


PATH_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "out_dir")


def path_problem(path: str) -> OSError | None:
    """Why ``path`` could not be created as a folder, without creating anything: a name over 255 bytes, a part of it
    that is a file, or a nearest existing folder that cannot be written. None when it looks writable."""
    p = os.path.abspath(os.path.expanduser(path))
    for part in p.split(os.sep):
        if len(part.encode()) > 255:
            return OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        return OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK) and probe != p:
        return OSError(errno.EACCES, os.strerror(errno.EACCES), probe)
    return None


def check_path_overrides(argv: list[str]) -> None:
    """Before Hydra starts: an output folder given on the command line (``hydra.run.dir=``, ``out_dir=``) that the
    file system would refuse is one line and exit 2, not the traceback of Hydra creating its run directory."""
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        value = value.strip().strip("'\"")
        if not eq or key not in PATH_KEYS or not value or "${" in value:
            continue
        problem = path_problem(value)
        if problem is not None:
            print(f"error: {key}={value}: {file_system_error(problem)}", file=sys.stderr)
            sys.exit(2)
