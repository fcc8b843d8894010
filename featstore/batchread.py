"""Batched reads of whole tiles: one selection per batch, checksums, the read pipelines.

``FeatureStore.read_batch_encoded`` / ``read_batch_half`` read a batch's chunks through here.
The ``zarrs`` codec pipeline (optional extra ``fast``) decodes a batch's chunks in parallel in
Rust; without it zarr-python's pipeline is used. ISA-L's crc32 (also in ``fast``) computes the
same CRC-32 as zlib at several times its speed, so verification costs less than the read.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.indexing import ChunkProjection

# Batched reads (`FeatureStore.read_batch_half`): "zarrs" is the Rust codec pipeline of the
# optional `zarrs` package (extra `featcache[fast]`), "zarr" zarr-python's own pipeline.
BATCH_PIPELINES = ("zarrs", "zarr")
try:  # ISA-L's crc32 (extra `featcache[fast]`): zlib's CRC-32, ~10x faster (SIMD)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    _crc32 = zlib.crc32


# zarrs' Rust thread pool does not survive fork(): a process forked after its parent read
# through zarrs hangs on its first zarrs read. Such a child (a DataLoader worker) reads
# through zarr-python instead: the same values, slower.
_ZARRS_FORK = {"used": False, "unsafe": False}


def default_batch_pipeline() -> str:
    """``"zarrs"`` when the optional `zarrs` package is importable and usable in this process
    (not forked from a parent that read through it), else ``"zarr"``."""
    if _ZARRS_FORK["unsafe"] or importlib.util.find_spec("zarrs") is None:
        return "zarr"
    return "zarrs"


def _batch_pipeline(name: str | None) -> str:
    if name is None:
        return default_batch_pipeline()
    if name not in BATCH_PIPELINES:
        raise ValueError(f"unknown read pipeline {name!r}; choose one of {BATCH_PIPELINES}")
    if name == "zarrs" and importlib.util.find_spec("zarrs") is None:
        raise ValueError(
            "read pipeline 'zarrs' needs the zarrs package: pip install 'featcache[fast]' "
            "(or use pipeline='zarr')"
        )
    if name == "zarrs" and _ZARRS_FORK["unsafe"]:
        raise ValueError(
            "read pipeline 'zarrs' cannot run in a process forked after its parent read through "
            "zarrs (its thread pool is gone; it would hang): start workers with 'spawn' or "
            "'forkserver' (DataLoader multiprocessing_context), or use pipeline=None / 'zarr'"
        )
    return name


def _out_buffer(out: np.ndarray | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``out`` checked against ``shape``/``dtype``, or a new buffer."""
    if out is None:
        return np.empty(shape, dtype)
    if (
        not isinstance(out, np.ndarray)
        or out.shape != shape
        or out.dtype != np.dtype(dtype)
        or not out.flags.c_contiguous
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(
            f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got {got}; "
            "pass out=None or allocate np.empty(shape, dtype)"
        )
    return out


_CRC_POOL: ThreadPoolExecutor | None = None


def _crc_pool() -> ThreadPoolExecutor:
    global _CRC_POOL
    if _CRC_POOL is None:
        _CRC_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2))
    return _CRC_POOL


def _after_fork_in_child() -> None:
    global _CRC_POOL
    _CRC_POOL = None  # a forked child (DataLoader worker) inherits no threads: start a new pool
    _ZARRS_FORK["unsafe"] = _ZARRS_FORK["used"]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _TilesIndexer:
    """Zarr indexer of whole tiles: tile ``i`` (one shard row) goes to output row ``first[i]``."""

    def __init__(self, tiles_per_shard: int, first: dict[int, int], shape: tuple[int, ...]) -> None:
        self.tps, self.first = tiles_per_shard, first
        self.shape, self.drop_axes = shape, ()
        self._full = tuple(slice(0, n) for n in shape[1:])

    def __iter__(self) -> Any:
        zeros = (0,) * len(self._full)
        for i, k in sorted(self.first.items()):  # shard by shard
            row = i % self.tps
            yield ChunkProjection(
                (i // self.tps, *zeros),
                (slice(row, row + 1), *self._full),
                (slice(k, k + 1), *self._full),
                False,
            )


async def _read_tiles_at_once(arr: Any, tps: int, first: dict[int, int], buf: np.ndarray) -> None:
    # zarr-python's own entry point for one selection (private in zarr 3.1): any failure falls
    # back to one public read per tile in the caller, so a changed signature costs only speed.
    indexer = _TilesIndexer(tps, first, buf.shape)
    out = NDBuffer.from_numpy_array(buf)
    await arr._get_selection(indexer, prototype=default_buffer_prototype(), out=out)


def _checksums(buf: np.ndarray, first: dict[int, int]) -> dict[int, int]:
    """crc32 of row ``first[i]`` of ``buf``, per tile ``i``."""
    if _crc32 is not zlib.crc32:  # ISA-L: a few microseconds a tile, less than a thread hand-off
        return {i: int(_crc32(buf[k])) for i, k in first.items()}
    # zlib's crc32 releases the GIL: the cores share the tiles
    crcs = list(_crc_pool().map(zlib.crc32, [buf[k] for k in first.values()]))
    return dict(zip(first, crcs, strict=True))


async def _read_jobs(jobs: list[tuple[Any, np.ndarray, int, bool]]) -> list[Any]:
    """Read each job's row into its view, all in flight at once; per job its crc32 (or None
    when not asked) or the exception that stopped it."""
    loop = asyncio.get_running_loop()

    async def one(arr: Any, view: np.ndarray, row: int, crc: bool) -> int | None:
        await arr.get_orthogonal_selection(
            (slice(row, row + 1),), out=NDBuffer.from_numpy_array(view)
        )
        if not crc:
            return None
        if _crc32 is not zlib.crc32:  # ISA-L: a few microseconds, less than a thread hand-off
            return int(_crc32(view))
        # zlib's crc32 releases the GIL: other tiles keep being read while this one is checked
        return await loop.run_in_executor(_crc_pool(), zlib.crc32, view)

    return await asyncio.gather(*(one(*job) for job in jobs), return_exceptions=True)
