"""Dask-distributed extraction: one task per shard group, teachers loaded once per worker.

Each task opens the store for writing in its worker, computes one whole shard group and marks it
done; nothing else writes that shard. A worker that dies mid-shard leaves the shard not done and
the scheduler re-runs the task elsewhere, so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import torch

from pipelines.config import ExtractConfig
from pipelines.extract import ExtractContext, make_context, process_shard

# Per worker process: (config JSON, store URL) -> (context with loaded teachers, store writer).
_WORKER_STATE: dict[tuple[str, str], tuple[ExtractContext, Any]] = {}
_STATE_LOCK = threading.Lock()


def _worker_state(cfg: ExtractConfig, source: Any) -> tuple[ExtractContext, Any]:
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
            _WORKER_STATE[key] = (ctx, StoreWriter.open(cfg.out))
        return _WORKER_STATE[key]


def extract_shard_task(cfg: ExtractConfig, source: Any, k: int) -> int:
    """Dask task: compute and write shard group `k`; returns its tile count.

    `source` is the driver's opened `TileSource` (scattered once), so workers do not re-read and
    re-hash the whole dataset.
    """
    ctx, writer = _worker_state(cfg, source)
    return process_shard(ctx, writer, k)


def _connect(mode: str, arg: int | str | None) -> tuple[Any, Any]:
    """A (client, cluster) pair; cluster is None when joining an existing scheduler."""
    from distributed import Client, LocalCluster

    if mode == "cluster":
        cluster = LocalCluster(n_workers=int(arg), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        return Client(cluster), cluster
    return Client(str(arg)), None


def run_shards_dask(cfg: ExtractConfig, source: Any, shards: list[int], mode: str,
                    arg: int | str | None, bar: Any) -> None:
    """Run `shards` as dask tasks and advance `bar` by each finished shard's tiles."""
    from distributed import as_completed

    client, cluster = _connect(mode, arg)
    run_id = uuid.uuid4().hex[:8]  # unique keys: a shared scheduler may hold an older run's
    try:
        remote_source = client.scatter(source, broadcast=True)
        futures = [client.submit(extract_shard_task, cfg, remote_source, k, pure=False,
                                 key=f"featcache-shard-{k}-{run_id}") for k in shards]
        for future in as_completed(futures):
            bar.update(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
