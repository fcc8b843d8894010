"""Extraction on a real loopback dask cluster survives killed workers (issue 15).

The fixture starts `dask scheduler` and `dask worker` processes (no nanny: a killed worker stays
dead until the supervisor starts a replacement, as an operator's would). Workers die by SIGKILL
at the fault points of `pipelines.distributed` (FEATCACHE_FAULT, once per run through
FEATCACHE_FAULT_ONCE) or by the test right after they spawn. Each run must finish unattended
with the arrays of an independent single-process extraction, every shard written exactly once
(counted through FEATCACHE_FAULT_LOG) and `verify` passing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from cluster_faults import (  # noqa: E402  (bench/cluster_faults.py: the suite's cluster)
    N_SHARDS,
    SMALL,
    LoopbackCluster,
    fault_env,
    make_reference,
    shard_writes,
    store_arrays,
    store_differences,
)

from pipelines.config import ExtractConfig  # noqa: E402
from pipelines.extract import run_extraction  # noqa: E402
from pipelines.shards import ExtractionError  # noqa: E402

pytestmark = pytest.mark.dask


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The synthetic source and its independent single-process store's arrays (the reference)."""
    return make_reference(tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    root = tmp_path_factory.mktemp("loopback")
    (root / "workers").mkdir()
    (root / "logs").mkdir()
    cl = LoopbackCluster(root / "workers", root / "logs")
    try:
        yield cl
    finally:
        cl.close()


def _config(
    source: Path | str, out: Path | str, cluster: LoopbackCluster, **kw: object
) -> ExtractConfig:
    return ExtractConfig(
        source=str(source), out=str(out), scheduler=cluster.address, **{**SMALL, **kw}
    )


# Kill points, each firing once, in one run: during setup (before the teachers load), as a
# mid-run shard starts, after a shard's data and done marker are written but before its task
# returns, as the last shard starts. bench/cluster_faults.py runs each alone, and more (inside a
# forward, inside a shard's array writes, ...).
KILLS = ["worker.setup:1", "task.start@2:1", "task.written@3:1", f"task.start@{N_SHARDS - 1}:1"]


def test_workers_killed_at_four_points_run_completes_identical(
    data: tuple[Path, dict], cluster: LoopbackCluster, tmp_path: Path
) -> None:
    source, ref = data
    cfg = _config(source, tmp_path / "s.zarr", cluster)
    with cluster.supervised(2, fault_env(tmp_path, ",".join(KILLS)), keep_fault=True):
        run_extraction(cfg, progress=False)
        assert cluster.killed() == len(KILLS)  # every fault fired, once
    assert store_differences(cfg.out, ref) == []
    # Every shard written exactly once: none twice, none left half (verify and the bytes).
    assert shard_writes(tmp_path / "fault.log") == [1] * N_SHARDS
    assert "task.kept 3 " in (tmp_path / "fault.log").read_text()  # the retry kept shard 3
    assert not list(Path(cfg.out).glob("featcache.*"))  # killed holders' locks cleaned up


def test_worker_killed_right_after_spawn(
    data: tuple[Path, dict], cluster: LoopbackCluster, tmp_path: Path
) -> None:
    """The issue's hang: a worker gone 1 s after it spawned, as the run starts."""
    source, ref = data
    cfg = _config(source, tmp_path / "s.zarr", cluster)
    with cluster.supervised(2, fault_env(tmp_path, "")) as first:
        time.sleep(1.0)
        first[0].send_signal(signal.SIGKILL)
        run_extraction(cfg, progress=False)
        assert cluster.killed() == 1
    assert store_differences(cfg.out, ref) == []
    assert shard_writes(tmp_path / "fault.log") == [1] * N_SHARDS


def test_relative_paths_from_another_directory(
    data: tuple[Path, dict],
    cluster: LoopbackCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Store, source and weights given relative to the driver's cwd, which is not the
    workers' cwd; the weights file is a real one (hashed by every worker)."""
    from pipelines.teachers import create_teacher

    torch.manual_seed(3)
    teacher = create_teacher("dinov2_vitb14", tiny=True, base_size=SMALL["base_size"])
    (tmp_path / "w").mkdir()
    torch.save(teacher.model.state_dict(), tmp_path / "w" / "dino.pth")
    os.symlink(data[0], tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    weights = {"dinov2_vitb14": "w/dino.pth"}
    local = run_extraction(
        ExtractConfig(source="src", out="local.zarr", weights=weights, **SMALL), progress=False
    )
    cfg = _config("src", "rel.zarr", cluster, weights=weights)
    with cluster.supervised(2, {}):
        assert run_extraction(cfg, progress=False) == "rel.zarr"
    assert not list(cluster.cwd.glob("*.zarr"))  # nothing resolved in the workers' cwd
    assert store_differences("rel.zarr", store_arrays(local)) == []
    stored = zarr.open_group("rel.zarr").attrs["featstore"]
    assert stored == zarr.open_group(local).attrs["featstore"]  # weights recorded as given


def test_path_a_worker_cannot_read_fails_at_once_naming_it(
    data: tuple[Path, dict],
    cluster: LoopbackCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A source the driver reads but the workers cannot fails the run before the store
    exists, naming the path and the worker. ``/proc/self/cwd/src`` is one absolute path that
    names the source in the driver's working directory and nothing in the workers' (a path
    that differs between machines, on one host)."""
    os.symlink(data[0], tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    cfg = _config("/proc/self/cwd/src", tmp_path / "s.zarr", cluster)
    with cluster.supervised(1, {}):
        start = time.monotonic()
        with pytest.raises(ExtractionError) as err:
            run_extraction(cfg, progress=False)
        assert time.monotonic() - start < 60
    assert "SOURCE '/proc/self/cwd/src'" in str(err.value)
    assert "dask worker tcp://127.0.0.1:" in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


def test_lost_scheduler_stops_then_a_rerun_resumes(
    data: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler dies mid-run: the driver stops within LOST_TIMEOUT_S, saying what it
    waited for; the same command against a new cluster finishes the store, identical, every
    shard written once over both runs."""
    from pipelines import distributed

    source, ref = data
    monkeypatch.setattr(distributed, "LOST_TIMEOUT_S", 3)
    (tmp_path / "logs").mkdir()
    log = tmp_path / "fault.log"
    env = fault_env(tmp_path, "")
    first = LoopbackCluster(tmp_path, tmp_path / "logs")
    try:
        with first.supervised(2, env):
            stopper = threading.Thread(
                target=_kill_scheduler_once_a_shard_starts, args=(first, log)
            )
            stopper.start()
            start = time.monotonic()
            with pytest.raises(ExtractionError, match="dask scheduler .* re-run the same command"):
                run_extraction(_config(source, tmp_path / "s.zarr", first), progress=False)
            assert time.monotonic() - start < 60
            stopper.join()
    finally:
        first.close()
    second = LoopbackCluster(tmp_path, tmp_path / "logs")
    try:
        with second.supervised(2, fault_env(tmp_path, "")):
            run_extraction(_config(source, tmp_path / "s.zarr", second), progress=False)
    finally:
        second.close()
    assert store_differences(tmp_path / "s.zarr", ref) == []
    assert shard_writes(log) == [1] * N_SHARDS
    assert not list((tmp_path / "s.zarr").glob("featcache.*"))  # no lock left in the store


def _kill_scheduler_once_a_shard_starts(cluster: LoopbackCluster, log: Path) -> None:
    """SIGKILL the scheduler while the first shard computes: the driver cannot have every
    result yet, and the workers' running tasks still finish (their writes are counted)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "task.start" not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.05)
    cluster.scheduler.kill()
