"""Dask-distributed extraction: one task per shard group, teachers loaded once per worker.

The driver resolves every path to an absolute one, checks on every worker that it can read
them *before* the store exists (`prepare_workers`), and submits one task per pending shard.
Nothing is broadcast: the config travels by value with each task, and the opened source is one
ordinary task of the graph (`featcache-source-<run>`), which the scheduler recomputes from the
graph when the worker holding it dies, instead of losing it like scattered data.

A task is idempotent. Under the shard's lock file (an ``flock``, which the kernel releases when
its process dies) it keeps a shard that is done and whose data match their checksums, and
returns its tile count; it rewrites a shard whole otherwise. So a worker killed after writing a
shard but before its task returned costs nothing, a half-written shard is rewritten, and a
retried or duplicate task never interleaves its writes with another's.

Every wait has a timeout whose message names what it waited for: the scheduler
(CONNECT_TIMEOUT_S), the first worker (WORKERS_TIMEOUT_S), a connected worker or the scheduler
during the run (LOST_TIMEOUT_S), a shard lock (SHARD_LOCK_TIMEOUT_S). Done markers make a
re-run after any of these resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from featstore import layout as L
from featstore import lock
from featstore.errors import FeatcacheError
from featstore.faults import FAULT_ENV, fault_point, parse_fault_spec
from pipelines.config import ExtractConfig
from pipelines.shards import ExtractContext, ExtractionError, make_context, process_shard

# Seconds to wait for a tcp:// scheduler: an unreachable address fails fast, not after 30 s.
CONNECT_TIMEOUT_S = 5
# Seconds to wait for the first worker to join the scheduler.
WORKERS_TIMEOUT_S = 120
# Seconds a run goes on with no worker connected, or without its scheduler, before it stops.
LOST_TIMEOUT_S = 300
# Seconds a task waits for a shard lock that a live process holds (a duplicate task).
SHARD_LOCK_TIMEOUT_S = 3600
# Seconds between checks of the cluster while waiting for shards / for a shard lock.
POLL_S = 1.0
# Seconds for the end-of-run release of the workers' teachers and for closing the client.
RELEASE_TIMEOUT_S = 30
# Everything a LocalCluster listens on stays on this host (its dashboard too) unless asked.
LOCAL_HOST = "127.0.0.1"
DASHBOARD_HINT = "pip install 'featcache[dashboard]' (bokeh) where the scheduler runs"

# Test-only (tests/pipelines/test_cluster_faults.py, bench/cluster_faults.py): with
# FEATCACHE_FAULT_ONCE=PREFIX, each ":1" point of FEATCACHE_FAULT fires only in the first
# process that creates the file PREFIX.<point>, so the retried task survives on the next worker;
# FEATCACHE_FAULT_LOG=FILE gets one "POINT SHARD PID" line per fault point reached (the suite
# counts shard writes with it).
FAULT_ONCE_ENV = "FEATCACHE_FAULT_ONCE"
FAULT_LOG_ENV = "FEATCACHE_FAULT_LOG"

# Per worker process: (config JSON, store URL) -> (context with loaded teachers, store writer).
_WORKER_STATE: dict[tuple[str, str], tuple[ExtractContext, Any]] = {}
_STATE_LOCK = threading.Lock()


# --- paths: resolved on the driver, checked on every worker ---------------------------------


def _absolute(value: str) -> str:
    """An absolute local path (URLs other than file:// are left as they are)."""
    if "://" in value and not value.startswith("file://"):
        return value
    return os.path.abspath(os.path.expanduser(value.removeprefix("file://")))


def worker_config(cfg: ExtractConfig) -> ExtractConfig:
    """`cfg` with every path absolute, as workers (whose working directory differs) need it.

    Weights given as files become absolute; tags stay tags. `--classes` is a path only when it
    names an existing file (it may be a comma-separated list of names).
    """
    weights = {
        name: _absolute(value) if os.path.isfile(os.path.expanduser(value)) else value
        for name, value in cfg.weights.items()
    }
    classes = cfg.classes
    if classes is not None and os.path.isfile(os.path.expanduser(classes)):
        classes = _absolute(classes)
    return dataclasses.replace(
        cfg,
        source=_absolute(cfg.source),
        out=_absolute(cfg.out),
        split_file=_absolute(cfg.split_file) if cfg.split_file else None,
        palette=_absolute(cfg.palette) if cfg.palette else None,
        classes=classes,
        weights=weights,
    )


def _read_paths(cfg: ExtractConfig) -> dict[str, str]:
    """Option -> local path a worker must read (the store is checked apart: it may not exist)."""
    paths = {"SOURCE": cfg.source}
    if cfg.split_file:
        paths["--split-file"] = cfg.split_file
    if cfg.palette:
        paths["--palette"] = cfg.palette
    if cfg.classes and os.path.isabs(cfg.classes):
        paths["--classes"] = cfg.classes
    for name, value in cfg.weights.items():
        if os.path.isabs(value):
            paths[f"--weights {name}"] = value
    return {opt: p for opt, p in paths.items() if "://" not in p or p.startswith("file://")}


def unreachable_paths(cfg: ExtractConfig) -> list[str]:
    """What this process cannot read of `cfg` (runs on each worker): one line per path."""
    out = [
        f"{opt} {path!r}" for opt, path in _read_paths(cfg).items() if not os.access(path, os.R_OK)
    ]
    if L.is_local(cfg.out):
        ancestor = L.local_path(cfg.out)
        while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
        if not (os.path.isdir(ancestor) and os.access(ancestor, os.W_OK)):
            out.append(f"STORE {cfg.out!r} (not writable here: {ancestor!r})")
    return out


def _reach_message(worker: str, problems: list[str]) -> str:
    return (
        f"dask worker {worker} cannot reach {'; '.join(problems)}; every worker needs the "
        "same paths (a shared filesystem mounted at the same place, or URLs): mount them "
        "there or run the workers where they are"
    )


def prepare_workers(client: Any, cfg: ExtractConfig) -> ExtractConfig:
    """The workers' config (absolute paths), checked on every connected worker.

    Called before the store is created: a worker that cannot reach a path fails the run with
    nothing written. Workers that join later check again when they load their teachers.
    """
    wcfg = worker_config(cfg)
    answers = client.run(unreachable_paths, wcfg, on_error="return")
    for worker, problems in sorted(answers.items()):
        if isinstance(problems, BaseException):
            continue  # died meanwhile: the scheduler replaces it, the task checks again
        if problems:
            raise ExtractionError(_reach_message(worker, problems))
    return wcfg


# --- worker side ----------------------------------------------------------------------------


def _fault(point: str, k: int | None = None) -> None:
    """Test-only hooks (see FAULT_ONCE_ENV): log the point, and maybe SIGKILL this worker at
    `point` or at `point@k` (shard k)."""
    log = os.environ.get(FAULT_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:  # one short O_APPEND write: not torn
            fh.write(f"{point} {'-' if k is None else k} {os.getpid()}\n")
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    for name in (point,) if k is None else (point, f"{point}@{k}"):
        if once and name in parse_fault_spec(spec) and not _claim(f"{once}.{name}"):
            continue
        fault_point(name)


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def _worker_address() -> str:
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:  # not in a worker (a test calling the task directly)
        return f"pid {os.getpid()}"


def _open_writer(cfg: ExtractConfig, run_id: str, worker: str) -> Any:
    from featstore import StoreWriter

    try:
        return StoreWriter.open(cfg.out, run_id=run_id)
    except (OSError, FeatcacheError) as err:
        raise ExtractionError(_reach_message(worker, [f"STORE {cfg.out!r} ({err})"])) from None


def _check_weights(ctx: ExtractContext, writer: Any, cfg: ExtractConfig, worker: str) -> None:
    """Each worker's weights files must hash like the driver's (recorded in the store)."""
    for name, teacher in ctx.teachers.items():
        want = writer.schema.teacher(name).spec.weights_sha256
        got = teacher.spec.weights_sha256
        if want != got:
            given = cfg.weights.get(name, teacher.spec.weights)
            raise ExtractionError(
                f"dask worker {worker}: weights {given!r} of teacher {name!r} have sha256 "
                f"{str(got)[:16]}, the store records {str(want)[:16]}: the file at that path "
                "differs on this worker; make the same file reachable at the same path on "
                "every worker"
            )


def _worker_state(
    cfg: ExtractConfig, source: Any, run_id: str, worker: str
) -> tuple[ExtractContext, Any]:
    """Load the teachers and open the writer once per worker; later tasks reuse them."""
    key = (cfg.to_json(), cfg.out)
    with _STATE_LOCK:
        if key not in _WORKER_STATE:
            _fault("worker.setup")
            problems = unreachable_paths(cfg)
            if problems:
                raise ExtractionError(_reach_message(worker, problems))
            # The worker keeps this thread count for good: equal counts everywhere give
            # bit-identical numerics between local, resumed and distributed runs.
            torch.set_num_threads(cfg.threads)
            _WORKER_STATE.clear()  # one extraction at a time per worker: drop older models
            records = list(source.records)[: cfg.limit]
            ctx = make_context(cfg, source, records, cfg.device)
            writer = _open_writer(cfg, run_id, worker)
            _check_weights(ctx, writer, cfg, worker)
            _WORKER_STATE[key] = (ctx, writer)
        ctx, writer = _WORKER_STATE[key]
        if writer.run_id != run_id:  # same config, a later run: keep the teachers
            writer = _open_writer(cfg, run_id, worker)
            _WORKER_STATE[key] = (ctx, writer)
        return ctx, writer


def release_worker_state() -> int:
    """Drop this worker's teachers and writers (run on every worker at the end of a run);
    returns how many were held."""
    import gc

    with _STATE_LOCK:
        held = len(_WORKER_STATE)
        _WORKER_STATE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return held


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd` (not unlinked by the last holder)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _lock_file(path: str) -> int | None:
    """An fd holding the flock of `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if _same_file(fd, path):
        return fd
    os.close(fd)  # we locked a file its holder had just removed: lock the current one
    return None


@contextlib.contextmanager
def shard_lock(store: str, k: int, run_id: str, worker: str) -> Iterator[None]:
    """Hold shard `k`'s lock (local stores), waiting up to SHARD_LOCK_TIMEOUT_S.

    The lock is an ``flock`` on ``featcache.shard-K.lock`` in the store: the kernel releases it
    when its holder dies, so a killed worker never blocks the retry and there is no stale-lock
    guess. The file names the holder, for the timeout message. Object stores (no flock) have
    no shard lock: each chunk file is one atomic PUT there, and duplicates write equal bytes.
    """
    if not L.is_local(store):
        yield
        return
    root = L.local_path(store)
    name = lock.shard_lock_name(k)
    path = lock.lock_path(root, name)
    deadline = time.monotonic() + SHARD_LOCK_TIMEOUT_S
    while (fd := _lock_file(path)) is None:
        if time.monotonic() > deadline:
            holder = lock.read_lock(root, name)
            raise ExtractionError(
                f"shard {k} of STORE {store!r}: waited {SHARD_LOCK_TIMEOUT_S} s for its lock "
                f"{path!r}, held by {holder.describe() if holder else 'another process'}; "
                "if that process is gone, delete the file and re-run the same command"
            )
        time.sleep(POLL_S)
    try:
        info = lock.current(run_id, worker)
        os.ftruncate(fd, 0)  # a killed holder's file may still name it
        os.write(fd, json.dumps(dataclasses.asdict(info)).encode())
        yield
    finally:
        os.unlink(path)  # still holding it: a waiter that opened this file sees it is gone
        os.close(fd)


def remove_dead_shard_locks(store: str) -> int:
    """Delete the shard lock files whose holders died (SIGKILLed workers leave the file; the
    kernel already released its flock); a live holder's is kept. Returns how many went."""
    if not L.is_local(store):
        return 0
    root = L.local_path(store)
    removed = 0
    for path in glob.glob(glob.escape(root) + os.sep + lock.SHARD_LOCK_PREFIX + "*.lock"):
        fd = _lock_file(path)
        if fd is not None:
            os.unlink(path)
            os.close(fd)
            removed += 1
    return removed


def _write_or_keep(ctx: ExtractContext, writer: Any, k: int, worker: str) -> int:
    """Shard `k`'s tile count, writing it unless it is done and intact (idempotent)."""
    n = len(writer.shard_tiles(k))
    if writer.shard_done(k):
        if writer.shard_intact(k):
            _fault("task.kept", k)
            return n
        writer.uncommit_shard(k)  # done but damaged: rewritten whole below
    _fault("task.start", k)
    try:
        process_shard(ctx, writer, k)
    except OSError as err:  # e.g. a source file that this worker cannot read
        where = f" {err.filename!r}" if err.filename else ""
        raise ExtractionError(
            f"dask worker {worker} failed on shard {k} reading{where}: {err.strerror or err}; "
            "every worker needs the same paths (a shared filesystem mounted at the same place)"
        ) from None
    _fault("task.written", k)
    return n


def extract_shard_task(cfg: ExtractConfig, source: Any, k: int, run_id: str) -> int:
    """Dask task: make shard group `k` done and intact; returns its tile count.

    `source` is the driver's opened `TileSource` (absolute paths), the result of the run's
    source task, so workers do not re-read and re-hash the whole dataset. `run_id` is the
    driver's run: the store lock's holder, recorded with each shard lock.
    """
    worker = _worker_address()
    ctx, writer = _worker_state(cfg, source, run_id, worker)
    with shard_lock(cfg.out, k, run_id, worker):
        return _write_or_keep(ctx, writer, k, worker)


def _pass_through(value: Any) -> Any:
    return value


# --- driver side ----------------------------------------------------------------------------


def _local_cluster(n_workers: int) -> Any:
    """A LocalCluster of `n_workers` processes whose scheduler and dashboard bind to localhost
    (a ":0" dashboard would listen on every interface)."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host=LOCAL_HOST,
        dashboard_address=f"{LOCAL_HOST}:0",
        silence_logs=logging.ERROR,
    )


def _client(address: str) -> Any:
    """Connect to an existing scheduler, failing within CONNECT_TIMEOUT_S with the option."""
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        raise ExtractionError(
            f"--scheduler {address}: no dask scheduler answered within {CONNECT_TIMEOUT_S} s "
            f"({err}); start one there (`dask scheduler`), check the host and port, or use "
            "--scheduler local or local:N"
        ) from None


def _wait_for_workers(client: Any) -> None:
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise ExtractionError(
            f"--scheduler {client.scheduler.address}: no dask worker joined within "
            f"{WORKERS_TIMEOUT_S} s; start workers (`dask worker {client.scheduler.address}`) "
            "and re-run"
        ) from None


def dashboard_line(client: Any) -> str:
    """Where the cluster's dashboard is, or how to get one (without bokeh the scheduler serves
    only a page saying that it needs bokeh)."""
    services = client.scheduler_info(n_workers=0).get("services", {})
    try:  # a lambda travels by value: the scheduler need not import this project
        has_bokeh = client.run_on_scheduler(lambda: importlib.util.find_spec("bokeh") is not None)
    except Exception:  # noqa: BLE001  (an old or locked-down scheduler: only the link is known)
        has_bokeh = True
    if "dashboard" in services and has_bokeh:
        return f"dask dashboard: {client.dashboard_link}"
    return f"dask dashboard: none (bokeh is not installed); {DASHBOARD_HINT}"


def _release_workers(client: Any) -> None:
    """Free the teachers on every worker; bounded: a lost cluster does not block the exit."""
    if client.status != "running":
        return

    def release() -> None:
        with contextlib.suppress(Exception):  # best effort: the run's outcome is decided
            client.run(release_worker_state, on_error="ignore")

    thread = threading.Thread(target=release, daemon=True, name="featcache-release")
    thread.start()
    thread.join(RELEASE_TIMEOUT_S)


@contextlib.contextmanager
def connect(mode: str, arg: int | str | None, announce: bool = True) -> Iterator[Any]:
    """A dask client for `mode` ("cluster": a new LocalCluster; "tcp": an existing scheduler)
    with at least one worker; `announce` prints the dashboard line on stderr (beside the
    progress bar). At exit the workers release their teachers."""
    cluster = _local_cluster(int(arg)) if mode == "cluster" else None  # type: ignore[arg-type]
    try:
        from distributed import Client

        client = Client(cluster) if cluster is not None else _client(str(arg))
        try:
            _wait_for_workers(client)
            if announce:
                print(dashboard_line(client), file=sys.stderr, flush=True)
            yield client
        finally:
            _release_workers(client)
            with contextlib.suppress(Exception):  # a lost scheduler: nothing left to close
                client.close(timeout=RELEASE_TIMEOUT_S)
    finally:
        if cluster is not None:
            cluster.close()


class _Watch:
    """Stops a run whose cluster is gone: no scheduler, or no worker, for LOST_TIMEOUT_S."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.last_ok = time.monotonic()

    def check(self, n_pending: int) -> None:
        what = self._missing()
        if what is None:
            self.last_ok = time.monotonic()
        elif time.monotonic() - self.last_ok > LOST_TIMEOUT_S:
            raise ExtractionError(
                f"waited {LOST_TIMEOUT_S} s for {what} with {n_pending} shard(s) pending; "
                "start it again and re-run the same command: finished shards are kept and "
                "the run resumes"
            )

    def _missing(self) -> str | None:
        address = getattr(self.client.scheduler, "address", "?")
        if self.client.status != "running":
            return f"the dask scheduler {address} (connection lost)"
        try:
            workers = self.client.nthreads()
        except (OSError, TimeoutError):
            return f"the dask scheduler {address} (not answering)"
        return None if workers else f"a dask worker to join {address}"


def _shard_result(client: Any, future: Any, k: int) -> int:
    """A finished task's tile count; cluster failures become ExtractionError (errors the task
    raised itself propagate as they are: they end the run)."""
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    try:
        return int(future.result())
    except KilledWorker as err:
        raise ExtractionError(
            f"shard {k}: its task killed every worker that ran it ({err}); see the workers' "
            "logs (out of memory?), then re-run the same command: finished shards are kept"
        ) from None
    except FutureCancelledError as err:
        raise _cancelled(client, f"shard {k}", err) from None


def _cancelled(client: Any, what: str, err: BaseException) -> ExtractionError:
    """The error of tasks the cluster cancelled (typically: the scheduler was lost)."""
    why = "the cluster cancelled it"
    if client.status != "running" or "connection-lost" in str(err):
        why = f"the connection to the dask scheduler {client.scheduler.address} was lost"
    return ExtractionError(
        f"{what}: {why} ({str(err).splitlines()[0]}); start the scheduler (and workers) again "
        "and re-run the same command: finished shards are kept and the run resumes"
    )


def run_shards_dask(
    cfg: ExtractConfig, source: Any, shards: list[int], client: Any, run_id: str, bar: Any
) -> None:
    """Run `shards` as dask tasks and advance `bar` by each finished shard's tiles.

    `cfg` is the workers' config (`prepare_workers`). The first error ends the run and cancels
    the other tasks.
    """
    from distributed import wait
    from distributed.client import FuturesCancelledError

    # Keys carry the run id: a shared scheduler may still hold an older run's.
    remote_source = client.submit(
        _pass_through, source, key=f"featcache-source-{run_id}", pure=False
    )
    futures = {
        client.submit(
            extract_shard_task,
            cfg,
            remote_source,
            k,
            run_id,
            pure=False,
            key=f"featcache-shard-{k}-{run_id}",
        ): k
        for k in shards
    }
    pending, watch = set(futures), _Watch(client)
    try:
        while pending:
            try:
                done, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            except FuturesCancelledError as err:
                raise _cancelled(client, f"{len(pending)} pending shard(s)", err) from None
            for future in done:
                bar.update(_shard_result(client, future, futures[future]))
            watch.check(len(pending))
        # Every shard is done: lock files left by killed workers would only clutter the store.
        remove_dead_shard_locks(cfg.out)
    finally:
        if pending and client.status == "running":
            with contextlib.suppress(Exception):
                client.cancel([*pending, remote_source])
