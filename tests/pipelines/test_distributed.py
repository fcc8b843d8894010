"""Dask-distributed extraction writes exactly what the single-process run writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from featstore import StoreWriter, open_store, verify_store
from pipelines.config import ExtractConfig, ExtractConfigError, parse_scheduler
from pipelines.extract import run_extraction
from pipelines.shards import ExtractionError
from pipelines.synthetic import generate_synthetic


def _walk(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    out = list(group.arrays())
    for name, sub in group.groups():
        out += [(f"{name}/{p}", a) for p, a in _walk(sub)]
    return out


def _arrays(url: Path) -> dict[str, np.ndarray]:
    """Every array of a store, read whole (raw stored values, before decoding)."""
    return {path: arr[...] for path, arr in _walk(zarr.open_group(str(url), mode="r"))}


@pytest.mark.dask
def test_local_cluster_matches_single_process(tmp_path: Path) -> None:
    source = generate_synthetic(tmp_path / "src", n_images=2, size=128, seed=5)
    common = dict(
        source=str(source),
        tile_size=64,
        teachers=("dinov2_vitb14",),
        tiny=True,
        base_size=70,
        scales=(1.0, 2.0),
        flip=True,
        tiles_per_shard=2,
        batch_size=2,
        limit=7,
    )
    local = run_extraction(ExtractConfig(out=str(tmp_path / "a.zarr"), **common), progress=False)
    dist = run_extraction(
        ExtractConfig(out=str(tmp_path / "b.zarr"), scheduler="local:2", **common), progress=False
    )
    a, b = _arrays(Path(local)), _arrays(Path(dist))
    assert sorted(a) == sorted(b) and "done" in a and "teachers/dinov2_vitb14/s2.00f" in a
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    assert open_store(dist).complete and verify_store(dist) == []
    # merged statistics are summed in shard order: identical, not just close
    assert zarr.open_group(local).attrs["featstore"] == zarr.open_group(dist).attrs["featstore"]


def test_scheduler_spec_parsing() -> None:
    assert parse_scheduler("local") == ("local", None)
    assert parse_scheduler("local:3") == ("cluster", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("tcp", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "cluster", "tcp://host", "local:x"):
        with pytest.raises(ExtractConfigError, match="--scheduler"):
            parse_scheduler(bad)


def _done_store(tmp_path: Path) -> tuple[ExtractConfig, Any, str]:
    """A finished 3-shard local store, its config (as workers get it) and its source."""
    from pipelines.distributed import worker_config
    from pipelines.extract import open_tiles

    source = generate_synthetic(tmp_path / "src", n_images=2, size=128, seed=5)
    cfg = ExtractConfig(
        source=str(source),
        out=str(tmp_path / "s.zarr"),
        tile_size=64,
        teachers=("dinov2_vitb14",),
        tiny=True,
        base_size=70,
        scales=(1.0,),
        flip=False,
        tiles_per_shard=3,
        batch_size=2,
    )
    run_extraction(cfg, progress=False)
    wcfg = worker_config(cfg)
    return wcfg, open_tiles(wcfg)[0], wcfg.out


def _unfinalize(url: str) -> None:
    """The header of a store whose shards are being written (tasks run before finalize)."""
    group = zarr.open_group(url, mode="r+")
    group.attrs["featstore"] = {**group.attrs["featstore"], "complete": False}


def _store_files(url: str) -> dict[str, bytes]:
    """Every file of a store but its lock files, by relative path."""
    root = Path(url)
    files = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("featcache."))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _task_events(log: Path) -> list[list[str]]:
    """(point, shard) of each task fault point the workers reached, in order."""
    lines = log.read_text().splitlines()
    return [ln.split()[:2] for ln in lines if ln.startswith("task.")]


def test_shard_task_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried task of a finished shard returns its tile count and writes nothing; a done
    shard whose data no longer match their checksums, and a half-written one (no done
    marker), are rewritten whole, to the bytes of the first run."""
    from pipelines.distributed import FAULT_LOG_ENV, extract_shard_task

    cfg, source, url = _done_store(tmp_path)
    log = tmp_path / "fault.log"
    monkeypatch.setenv(FAULT_LOG_ENV, str(log))
    finished = _store_files(url)
    _unfinalize(url)
    before = _store_files(url)
    assert extract_shard_task(cfg, source, 1, "retry") == 3
    assert _store_files(url) == before and _task_events(log) == [["task.kept", "1"]]

    group = zarr.open_group(url, mode="r+")
    feature = group["teachers/dinov2_vitb14/s1.00"]
    feature[3] = feature[3] + 1  # shard 1's first tile, still marked done
    group["done"][6:9] = 0  # shard 2: data written, done marker not
    assert extract_shard_task(cfg, source, 1, "retry") == 3
    assert extract_shard_task(cfg, source, 2, "retry") == 2  # 8 tiles: the last shard has 2
    StoreWriter.open(url).finalize()  # what the driver does once every task returned
    assert _store_files(url) == finished and verify_store(url) == []
    assert _task_events(log)[1:] == [
        ["task.start", "1"],
        ["task.written", "1"],
        ["task.start", "2"],
        ["task.written", "2"],
    ]


def test_shard_lock_waits_then_times_out_naming_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import distributed

    monkeypatch.setattr(distributed, "SHARD_LOCK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(distributed, "POLL_S", 0.1)
    store = str(tmp_path)
    with (
        distributed.shard_lock(store, 4, "run-a", "tcp://10.0.0.9:4000"),
        pytest.raises(ExtractionError, match=r"shard 4 .*tcp://10\.0\.0\.9:4000"),
        distributed.shard_lock(store, 4, "run-a", "tcp://10.0.0.8:4000"),
    ):
        pass
    with distributed.shard_lock(store, 4, "run-b", "w"):  # released: taken at once
        pass
    assert not list(tmp_path.iterdir())  # no lock file left behind


def test_shard_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    """The kernel releases the flock of a SIGKILLed holder: no stale-lock guessing."""
    import signal
    import subprocess
    import sys
    import time

    from pipelines import distributed

    code = (
        "import sys, time; from pipelines.distributed import shard_lock\n"
        f"with shard_lock({str(tmp_path)!r}, 0, 'r', 'w'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    start = time.monotonic()
    with distributed.shard_lock(str(tmp_path), 0, "r2", "w2"):
        assert time.monotonic() - start < 2 * distributed.POLL_S


class _FakeClient:
    """What `dashboard_line` asks a client: the scheduler's services, whether it has bokeh."""

    dashboard_link = "http://127.0.0.1:8787/status"

    def __init__(self, services: dict[str, int], bokeh: bool) -> None:
        self.services, self.bokeh = services, bokeh

    def scheduler_info(self, n_workers: int = -1) -> dict[str, Any]:
        return {"services": self.services}

    def run_on_scheduler(self, fn: Any) -> bool:
        return self.bokeh


def test_dashboard_line_gives_the_link_or_how_to_get_bokeh() -> None:
    from pipelines.distributed import dashboard_line

    with_bokeh = dashboard_line(_FakeClient({"dashboard": 8787}, bokeh=True))
    assert with_bokeh == "dask dashboard: http://127.0.0.1:8787/status"
    # Without bokeh the scheduler still serves a page (that says it needs bokeh): no link.
    for client in (_FakeClient({"dashboard": 8787}, False), _FakeClient({}, True)):
        assert "pip install 'featcache[dashboard]'" in dashboard_line(client)
