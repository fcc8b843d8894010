"""Durable writes of a run's files: a full disk or a kill never leaves a half-written file.

`atomic_write` writes to ``<name>.tmp`` beside the target, flushes, ``fsync``s, renames over the
target and ``fsync``s the folder, so after a crash (SIGKILL, power loss) the target is either the
previous version or the new one, whole. A write that fails (no space left, quota, I/O error)
removes its temporary file and raises `RunWriteError` naming the file and the fix; the previous
version is untouched. `append_durably` appends a log line the same way a resume can trust: the
line is on the disk before the next checkpoint names a later step.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from featstore.errors import FeatcacheError
from featstore.faults import fault_point

__all__ = [
    "RunWriteError",
    "append_durably",
    "atomic_write",
    "check_writable_folder",
    "fsync_dir",
]

# errno values of a full disk or an exhausted quota: the fix is to free space.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
RESUME_HINT = "then resume with the same `featcache train` command and --resume auto"


class RunWriteError(FeatcacheError):
    """A run file (checkpoint, metrics log) could not be written; the message names it and the
    fix (free space, a writable --out)."""


class _FaultableFile:
    """A binary file whose every ``write`` is a fault point (``checkpoint.write``), so the
    reliability suite can SIGKILL a run in the middle of writing a checkpoint."""

    def __init__(self, raw: IO[bytes], point: str) -> None:
        self.raw = raw
        self.point = point

    def write(self, data: Any) -> int:
        fault_point(self.point)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems without folder fsync
            raise
    finally:
        os.close(fd)


def describe_failure(path: Path, err: OSError, what: str, kept: str) -> str:
    """The message of a failed write of ``path``: cause, what is still intact, the fix."""
    if err.errno in NO_SPACE:
        cause = f"no space left on the device of {path.parent} ({err.strerror})"
        fix = f"free space on that disk (or move the run folder to one with space), {RESUME_HINT}"
    else:
        cause = f"{type(err).__name__}: {err.strerror or err}"
        fix = f"check that {path.parent} is writable and its disk is healthy, {RESUME_HINT}"
    return f"could not write {what} {path}: {cause}; {kept}. Fix: {fix}"


def _os_error(failure: BaseException) -> OSError | None:
    """The `OSError` behind ``failure``, if any: torch's zip writer answers a failed write with
    its own RuntimeError ("unexpected pos") raised while closing, chained to the real cause."""
    seen: BaseException | None = failure
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[Any], None], what: str = "file") -> None:
    """Replace ``path`` by what ``write(file)`` writes, atomically and durably.

    Args:
        path: Target file.
        write: Writes the whole content into the binary file object it is given.
        what: What the file is, for the message (e.g. ``"checkpoint"``).

    Raises:
        RunWriteError: the write, flush, fsync or rename failed; the temporary file is removed
            and ``path`` still holds its previous content (if it had one).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    point = f"{what}.write"
    try:
        with open(tmp, "wb") as raw:
            write(_FaultableFile(raw, point))
            raw.flush()
            os.fsync(raw.fileno())
        fault_point(f"{what}.before_rename")
        os.replace(tmp, path)
    except Exception as failure:
        tmp.unlink(missing_ok=True)
        err = _os_error(failure)
        if err is None:
            raise
        kept = (
            f"{path.name} still holds the previous {what}"
            if path.is_file()
            else f"no {what} was written before, none is left half-written"
        )
        raise RunWriteError(describe_failure(path, err, what, kept)) from failure
    fault_point(f"{what}.after_rename")
    fsync_dir(path.parent)


def check_writable_folder(folder: str | Path, option: str) -> None:
    """Fail before any work when ``folder`` cannot be created or written in.

    A real probe (a temporary file in the nearest existing folder), not ``os.access``:
    permissions, read-only mounts and root all behave as they will for the run.

    Raises:
        RunWriteError: naming ``option``, the folder and the fix.
    """
    folder = Path(folder).absolute()
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return  # a file in the way: the run-folder check names it
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise RunWriteError(
            f"{option} {folder}: cannot write in {ancestor} ({err.strerror}); choose a "
            f"writable folder for {option}, or make {ancestor} writable"
        ) from err


def append_durably(path: str | Path, text: str, what: str = "log") -> None:
    """Append ``text`` to ``path`` and ``fsync`` it (a resume trusts what the log holds).

    Raises:
        RunWriteError: naming the file and the fix (a torn last line is dropped on resume).
    """
    path = Path(path)
    try:
        with open(path, "a", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        kept = "the rows logged before are kept; a partly written row is dropped on resume"
        raise RunWriteError(describe_failure(path, err, what, kept)) from err
