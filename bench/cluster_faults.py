"""SIGKILL dask workers of an extraction on a real loopback cluster; count the kills survived.

A `dask scheduler` and two `dask worker` processes (no nanny) run on 127.0.0.1; a supervisor
starts a replacement for every worker that dies, as an operator's would. Each case kills a
worker at one point, lets the run finish unattended and checks, against an independent
single-process extraction of the same source:

* the run completed (no hang: each case has a deadline) and ``verify`` passes;
* every array of the store is byte-identical to the single-process store's;
* every shard was written exactly once (the workers log each shard write through
  ``FEATCACHE_FAULT_LOG``): none twice, none left half-written.

Kill points are ``pipelines.distributed``'s (``worker.setup``, ``task.start@K``,
``task.written@K``: after shard K's data and done marker, before its task returns), fired once
per case (``FEATCACHE_FAULT_ONCE``), ``featstore.faults`` points inside a shard's computation and
write (``shard.forward``, ``write.array``, ...: the first workers only), and ``spawn``: a worker
SIGKILLed 1 s after it was started.

    python bench/cluster_faults.py            # all cases, prints the markdown table
    python bench/cluster_faults.py --cases 3  # the first 3

tests/pipelines/test_cluster_faults.py runs a subset with the same cluster helper.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/cluster_faults.py` from the repository root
    sys.path.insert(0, str(ROOT))

from featstore import open_store, verify_store  # noqa: E402
from featstore.faults import FAULT_ENV  # noqa: E402
from pipelines.config import ExtractConfig  # noqa: E402
from pipelines.distributed import FAULT_LOG_ENV, FAULT_ONCE_ENV  # noqa: E402
from pipelines.extract import run_extraction  # noqa: E402
from pipelines.synthetic import generate_synthetic  # noqa: E402

N_IMAGES = 3  # 128 px images cut into 64 px tiles: 12 tiles, 6 shards of 2
N_SHARDS = 6
SMALL: dict[str, Any] = dict(
    tile_size=64,
    teachers=("dinov2_vitb14",),
    tiny=True,
    base_size=70,
    scales=(1.0, 0.5),
    flip=False,
    tiles_per_shard=2,
    batch_size=2,
)
START_TIMEOUT_S = 60
CASE_TIMEOUT_S = 300

# (label, FEATCACHE_FAULT spec or "spawn"): where the kill lands.
CASES: list[tuple[str, str]] = [
    ("during setup, before the teachers load", "worker.setup:1"),
    ("as shard 2 starts", "task.start@2:1"),
    ("after shard 3 is written, before its task returns", "task.written@3:1"),
    ("as the last shard starts", f"task.start@{N_SHARDS - 1}:1"),
    ("1 s after the worker spawned", "spawn"),
    ("after shard 0 is written, before its task returns", "task.written@0:1"),
    ("as shard 0 starts", "task.start@0:1"),
    ("during a teacher forward", "shard.forward:1"),
    ("during a shard write (first array written)", "write.array:1"),
    ("during a shard write (mid-shard)", "write.array:3"),
    ("data written, checksums not", "write.before_checksum:1"),
    ("data and checksums written, done marker not", "write.before_done:1"),
    ("after the last shard is written", f"task.written@{N_SHARDS - 1}:1"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackCluster:
    """`dask scheduler` + `dask worker` subprocesses on 127.0.0.1; workers run in `cwd`."""

    def __init__(self, cwd: Path, log_dir: Path) -> None:
        self.cwd, self.log_dir = cwd, log_dir
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.workers: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}
        self._lock = threading.Lock()
        self.scheduler = self._spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            "scheduler",
            {},
        )
        self._wait_scheduler()

    def _spawn(self, args: list[str], name: str, extra: dict[str, str]) -> subprocess.Popen:
        # The project importable from the workers' cwd too (as an installed package would be).
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}
        log = self.log_dir / f"{name}-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            return subprocess.Popen(
                ["dask", *args], cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def _wait_scheduler(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited; see {self.log_dir}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"no dask scheduler on port {self.port} after {START_TIMEOUT_S} s")

    def start_worker(self, env: dict[str, str]) -> subprocess.Popen:
        """One `dask worker` (1 thread, no nanny: a killed worker stays dead)."""
        args = ["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--no-nanny"]
        proc = self._spawn([*args, "--no-dashboard", "--host", "127.0.0.1"], "worker", env)
        with self._lock:
            self.workers.append(proc)
        return proc

    def killed(self) -> int:
        """Workers that died by SIGKILL."""
        with self._lock:
            return sum(p.poll() == -signal.SIGKILL for p in self.workers)

    @contextlib.contextmanager
    def supervised(
        self, n: int, env: dict[str, str], keep_fault: bool = False
    ) -> Iterator[list[subprocess.Popen]]:
        """`n` workers with `env`; each dead one is replaced at once, by a worker without the
        fault (FEATCACHE_FAULT) unless `keep_fault` (safe only when every point fires once:
        per-process counts would kill every replacement again); all stopped at exit."""
        first = [self.start_worker(env) for _ in range(n)]
        calm = env if keep_fault else {k: v for k, v in env.items() if k != FAULT_ENV}
        stop = threading.Event()

        def supervise() -> None:
            replaced: set[int] = set()
            while not stop.wait(0.2):
                with self._lock:
                    dead = [p for p in self.workers if p.poll() is not None]
                for proc in dead:
                    if proc.pid not in replaced:
                        replaced.add(proc.pid)
                        self.start_worker(calm)

        thread = threading.Thread(target=supervise, daemon=True, name="supervisor")
        thread.start()
        try:
            yield first
        finally:
            stop.set()
            thread.join()
            self.stop_workers()

    def stop_workers(self) -> None:
        with self._lock:
            procs, self.workers = self.workers, []
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)

    def close(self) -> None:
        self.stop_workers()
        self.scheduler.kill()
        self.scheduler.wait(timeout=30)


def store_arrays(url: str | Path) -> dict[str, np.ndarray]:
    """Every array of a store, read whole (raw stored values, before decoding)."""

    def walk(group: zarr.Group, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
        for name, arr in group.arrays():
            yield prefix + name, arr[...]
        for name, sub in group.groups():
            yield from walk(sub, f"{prefix}{name}/")

    return dict(walk(zarr.open_group(str(url), mode="r"), ""))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and values; floats compared bit for bit (NaN marks "no transform")."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))


def store_differences(got: str | Path, want: dict[str, np.ndarray]) -> list[str]:
    """Arrays of `got` that differ from `want`, and what `verify` reports; empty = same."""
    arrays = store_arrays(got)
    out = [f"{p}: missing or extra" for p in sorted(set(arrays) ^ set(want))]
    out += [p for p in sorted(set(arrays) & set(want)) if not _same(arrays[p], want[p])]
    if not open_store(str(got)).complete:
        out.append("store not complete")
    return out + verify_store(str(got))


def fault_env(tmp: Path, spec: str) -> dict[str, str]:
    """The workers' environment of one case (log of every point; the fault fires once)."""
    env = {FAULT_ONCE_ENV: str(tmp / "fault.once"), FAULT_LOG_ENV: str(tmp / "fault.log")}
    if spec and spec != "spawn":
        env[FAULT_ENV] = spec
    return env


def shard_writes(log: Path) -> list[int]:
    """How many times each shard was written (``task.written`` lines of the fault log)."""
    lines = log.read_text().split() if log.exists() else []
    events = collections.Counter(zip(lines[0::3], lines[1::3], strict=True))
    return [events[("task.written", str(k))] for k in range(N_SHARDS)]


def make_reference(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The synthetic source and the arrays of its single-process (uninterrupted) store."""
    source = Path(generate_synthetic(root / "src", n_images=N_IMAGES, size=128, seed=11))
    ref = run_extraction(
        ExtractConfig(source=str(source), out=str(root / "ref.zarr"), **SMALL), progress=False
    )
    return source, store_arrays(ref)


def run_case(
    cluster: LoopbackCluster, source: Path, spec: str, tmp: Path
) -> tuple[str, int, list[int]]:
    """Run one case: (error or "", workers SIGKILLed, writes per shard)."""
    cfg = ExtractConfig(
        source=str(source), out=str(tmp / "s.zarr"), scheduler=cluster.address, **SMALL
    )
    with cluster.supervised(2, fault_env(tmp, spec)) as first:
        if spec == "spawn":
            time.sleep(1.0)  # the hang: a worker gone 1 s after spawn
            first[0].send_signal(signal.SIGKILL)
        error = ""
        try:
            run_extraction(cfg, progress=False)
        except Exception as err:  # noqa: BLE001  (a failed case is a row of the table)
            error = f"{type(err).__name__}: {err}"
        killed = cluster.killed()
    return error, killed, shard_writes(tmp / "fault.log")


HEADER = (
    "kill point",
    "fault",
    "workers killed",
    "writes per shard",
    "identical, verified, each shard once",
    "time",
    "note",
)


def main() -> None:
    from _common import markdown_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cluster-faults-"))
    (root / "workers").mkdir()
    (root / "logs").mkdir()
    source, ref = make_reference(root)
    cluster = LoopbackCluster(root / "workers", root / "logs")
    rows, records = [], []
    try:
        for i, (label, spec) in enumerate(CASES[: args.cases]):
            tmp = root / f"case{i}"
            tmp.mkdir()
            start = time.monotonic()
            error, killed, writes = run_case(cluster, source, spec, tmp)
            diffs = [] if error else store_differences(tmp / "s.zarr", ref)
            ok = not error and not diffs and killed >= 1 and writes == [1] * N_SHARDS
            note = error or "; ".join(diffs[:2]) or ("" if killed else "fault did not fire")
            seconds = time.monotonic() - start
            rows.append(
                (
                    label,
                    f"`{spec}`",
                    killed,
                    writes,
                    "yes" if ok else "NO",
                    f"{seconds:.0f} s",
                    note[:80],
                )
            )
            records.append(
                dict(
                    zip(
                        ("label", "spec", "killed", "writes", "ok", "seconds", "note"),
                        (label, spec, killed, writes, ok, seconds, note),
                        strict=True,
                    )
                )
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    survived = sum(r["ok"] for r in records)
    print()
    print(markdown_table(HEADER, rows))
    print(f"\n**kills survived / tried: {survived} / {len(records)}**")
    write_json("cluster_faults", {"survived": survived, "tried": len(records), "cases": records})


if __name__ == "__main__":
    main()
