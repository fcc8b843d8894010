"""Dask-distributed extraction: one task per shard group, teachers loaded once per worker.

Each task opens the store for writing in its worker, computes one whole shard group and marks it
done; nothing else writes that shard. A worker that dies mid-shard leaves the shard not done and
the scheduler re-runs the task elsewhere, so nothing is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

from pipelines.config import ExtractConfig
from pipelines.shards import ExtractContext, ExtractionError, make_context, process_shard

# Seconds to wait for a tcp:// scheduler: an unreachable address fails fast, not after 30 s.
CONNECT_TIMEOUT_S = 5
# Everything a LocalCluster listens on stays on this host (its dashboard too) unless asked.
LOCAL_HOST = "127.0.0.1"

# Per worker process: (config JSON, store URL) -> (context with loaded teachers, store writer).
_WORKER_STATE: dict[tuple[str, str], tuple[ExtractContext, Any]] = {}
_STATE_LOCK = threading.Lock()


def _worker_state(cfg: ExtractConfig, source: Any, run_id: str) -> tuple[ExtractContext, Any]:
    """Load the teachers and open the writer once per worker; later tasks reuse them."""
    from featstore import StoreWriter

    key = (cfg.to_json(), cfg.out)
    with _STATE_LOCK:
        if key not in _WORKER_STATE:
            # The worker keeps this thread count for good: equal counts everywhere give
            # bit-identical numerics between local, resumed and distributed runs.
            torch.set_num_threads(cfg.threads)
            _WORKER_STATE.clear()  # one extraction at a time per worker: drop older models
            records = list(source.records)[: cfg.limit]
            ctx = make_context(cfg, source, records, cfg.device)
            _WORKER_STATE[key] = (ctx, StoreWriter.open(cfg.out, run_id=run_id))
        ctx, writer = _WORKER_STATE[key]
        if writer.run_id != run_id:  # same config, a later run: keep the teachers
            writer = StoreWriter.open(cfg.out, run_id=run_id)
            _WORKER_STATE[key] = (ctx, writer)
        return ctx, writer


def extract_shard_task(cfg: ExtractConfig, source: Any, k: int, run_id: str) -> int:
    """Dask task: compute and write shard group `k`; returns its tile count.

    `source` is the driver's opened `TileSource` (scattered once), so workers do not re-read and
    re-hash the whole dataset. `run_id` is the client's run: the lock holder, recorded per shard.
    """
    ctx, writer = _worker_state(cfg, source, run_id)
    return process_shard(ctx, writer, k)


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


@contextlib.contextmanager
def connect(mode: str, arg: int | str | None) -> Iterator[Any]:
    """A dask client for `mode` ("cluster": a new LocalCluster; "tcp": an existing scheduler)."""
    cluster = _local_cluster(int(arg)) if mode == "cluster" else None  # type: ignore[arg-type]
    try:
        from distributed import Client

        client = Client(cluster) if cluster is not None else _client(str(arg))
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def run_shards_dask(
    cfg: ExtractConfig, source: Any, shards: list[int], client: Any, run_id: str, bar: Any
) -> None:
    """Run `shards` as dask tasks and advance `bar` by each finished shard's tiles."""
    from distributed import as_completed

    remote_source = client.scatter(source, broadcast=True)
    # Keys carry the run id: a shared scheduler may still hold an older run's.
    futures = [
        client.submit(
            extract_shard_task,
            cfg,
            remote_source,
            k,
            run_id,
            pure=False,
            key=f"featcache-shard-{k}-{run_id}",
        )
        for k in shards
    ]
    for future in as_completed(futures):
        bar.update(future.result())
