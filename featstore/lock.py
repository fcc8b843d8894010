"""The writer lock of a local store: one extraction writes a store at a time.

The lock is a small JSON file inside the store (``featcache.lock``) naming its holder: owner
(user), PID, host, start time and run id. It is created with ``O_EXCL``, so of two writers that
race, exactly one wins. A lock whose holder runs on this host and is no longer alive (a killed
run) is stale and taken over, so an interrupted extraction still resumes with the same command.
A lock held from another host cannot be checked from here: only ``--break-lock`` removes it.

Dask workers do not take the lock: the client process holds it for the whole run, and workers
carry the client's run id and stop when the lock names another run (``StoreWriter``). Each
shard records the fingerprint of the extraction that wrote it, checked by ``verify``. A dask
task holds its shard's own lock file (``shard_lock_name``, an ``flock`` taken by
``pipelines.distributed.shard_lock``), so a retried or duplicate task never interleaves writes.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from featstore.errors import StoreLockedError

LOCK_FILE = "featcache.lock"
SHARD_LOCK_PREFIX = "featcache.shard-"


@dataclass(frozen=True)
class LockInfo:
    """Who holds a store's writer lock."""

    owner: str
    pid: int
    host: str
    started: str
    run_id: str
    # Start time of the PID in clock ticks since boot (Linux): tells a reused PID from the holder.
    pid_start: int | None = None
    # Dask worker address of a shard lock's holder ("" otherwise), for messages.
    worker: str = ""

    def describe(self) -> str:
        """One line naming the holder, for error messages."""
        where = f" on dask worker {self.worker}" if self.worker else ""
        return (
            f"run {self.run_id}{where} of {self.owner} (PID {self.pid} on host {self.host}, "
            f"started {self.started})"
        )


def _pid_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


def current(run_id: str, worker: str = "") -> LockInfo:
    """A lock record for this process."""
    pid = os.getpid()
    return LockInfo(
        owner=_owner(),
        pid=pid,
        host=socket.gethostname(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        run_id=run_id,
        pid_start=_pid_start(pid),
        worker=worker,
    )


def lock_path(store_dir: str, name: str = LOCK_FILE) -> str:
    """The lock file ``name`` (default: the writer lock) of a local store directory."""
    return os.path.join(store_dir, name)


def shard_lock_name(k: int) -> str:
    """File name of shard ``k``'s lock: held by the one dask task writing that shard, so a
    retried or duplicate task never interleaves its writes with another's."""
    return f"{SHARD_LOCK_PREFIX}{k}.lock"


def read_lock(store_dir: str, name: str = LOCK_FILE) -> LockInfo | None:
    """The lock of ``store_dir``, or None when there is none.

    An unreadable lock file (e.g. cut short by a crash between create and write) reads as a
    holder that cannot be identified: it is never taken over silently.
    """
    try:
        with open(lock_path(store_dir, name), encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        return LockInfo(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return LockInfo(owner="?", pid=-1, host="?", started="?", run_id="unreadable lock file")


def is_stale(info: LockInfo) -> bool:
    """Whether the holder provably no longer runs: same host and its PID gone (or reused)."""
    if info.host != socket.gethostname() or info.pid <= 0:
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    start = _pid_start(info.pid)
    return info.pid_start is not None and start is not None and start != info.pid_start


def write_lock(store_dir: str, info: LockInfo) -> None:
    """Create the lock file; ``FileExistsError`` when another writer holds one."""
    fd = os.open(lock_path(store_dir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(info), f)


def remove_lock(store_dir: str, run_id: str | None = None) -> None:
    """Remove the lock (only if ``run_id`` holds it, when given)."""
    if run_id is not None:
        held = read_lock(store_dir)
        if held is None or held.run_id != run_id:
            return
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path(store_dir))


def locked_message(store: str, holder: LockInfo) -> str:
    return (
        f"store {store!r} is locked by another writer: {holder.describe()}. Wait for it to "
        f"finish; if it is dead (e.g. on another host), re-run with --break-lock to remove "
        f"the lock ({lock_path(store)})"
    )


def acquire(store_dir: str, run_id: str, break_lock: bool = False) -> LockInfo:
    """Take the writer lock of an existing local store directory.

    Raises:
        StoreLockedError: another live (or unverifiable) writer holds it and not ``break_lock``.
    """
    info = current(run_id)
    for _ in range(3):  # a lost race with another taker is retried, then reported
        try:
            write_lock(store_dir, info)
            return info
        except FileExistsError:
            pass
        holder = read_lock(store_dir)
        if holder is None:
            continue  # released between our two calls
        if not (break_lock or is_stale(holder)):
            raise StoreLockedError(locked_message(store_dir, holder))
        remove_lock(store_dir, holder.run_id)
    holder = read_lock(store_dir) or info
    raise StoreLockedError(locked_message(store_dir, holder))


def held_by(store_dir: str, run_id: str) -> bool:
    """Whether ``run_id`` still holds the lock (False once another writer broke it)."""
    held = read_lock(store_dir)
    return held is not None and held.run_id == run_id


__all__ = [
    "LOCK_FILE",
    "SHARD_LOCK_PREFIX",
    "LockInfo",
    "acquire",
    "current",
    "held_by",
    "is_stale",
    "lock_path",
    "locked_message",
    "read_lock",
    "remove_lock",
    "shard_lock_name",
    "write_lock",
]
