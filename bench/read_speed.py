"""Benchmark: random tile reads of a store against the plain-read limit, side by side in one run.

The store is bench 3's (``bench/loader.py::build_store``): 37x37x768 fp16 tiles (2.1 MB each,
DINOv2-B-sized), shards of 16 tiles with one uncompressed chunk per tile, page cache warm (just
written). Every method reads the same batches of 16 random tiles; the methods take turns
(interleaved repetitions), so a change of machine load hits all of them alike:

* ``read_half`` one tile per call (today's path, checksum verified);
* ``read_batch_half`` (16 tiles per call) through zarr-python's pipeline and through the
  ``zarrs`` pipeline (when installed), checksum verification on (default) and off;
* the LIMIT: ``os.pread`` of each tile's chunk bytes from the same shard files, at the byte
  range the shard index gives (index read once per shard, outside the timing), and one copy
  into a reused numpy buffer; also the same plus crc32 (the limit of verified reads).

Batched reads and the limit write into one reused output buffer; ``read_half`` allocates per
tile, as the datasets do today. Usage: ``python bench/read_speed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import loader  # noqa: E402

NAME, BATCH = loader.NAME, 16
PATH = f"teachers/{NAME}/s1.00"
LIMIT = "LIMIT: os.pread + copy"
try:  # the checksum function the reader uses (featstore.reader): ISA-L's when installed
    from isal.isal_zlib import crc32 as CRC32

    CRC_NAME = "ISA-L crc32"
except ImportError:
    CRC32, CRC_NAME = zlib.crc32, "zlib crc32"


class ShardFiles:
    """Byte ranges of each tile's chunk, read from the shard indexes (zarr v3 sharding spec:
    at the end of each shard file, ``(offset, nbytes)`` little-endian uint64 per inner chunk in
    C order, then a 4-byte crc32c)."""

    def __init__(self, url: str, n_tiles: int) -> None:
        import zarr

        arr = zarr.open_array(f"{url}/{PATH}", mode="r")
        if arr.shards is None or arr.chunks[1:] != arr.shape[1:] or arr.chunks[0] != 1:
            raise SystemExit(f"{url}/{PATH}: expected shards of one-tile chunks, got {arr.chunks}")
        self.tps = arr.shards[0]
        self.fds: dict[int, int] = {}
        self.ranges = np.zeros((n_tiles, 2), np.int64)
        for s in range(-(-n_tiles // self.tps)):
            fd = os.open(f"{url}/{PATH}/c/{s}/0/0/0", os.O_RDONLY)
            size = os.fstat(fd).st_size
            index = np.frombuffer(os.pread(fd, self.tps * 16, size - self.tps * 16 - 4), "<u8")
            rows = slice(s * self.tps, min(n_tiles, (s + 1) * self.tps))
            self.ranges[rows] = index.reshape(self.tps, 2)[: rows.stop - rows.start]
            self.fds[s] = fd

    def read(self, indices: np.ndarray, out: np.ndarray, crc: bool) -> None:
        flat = out.reshape(len(out), -1).view(np.uint8)
        for k, i in enumerate(indices):
            offset, _ = self.ranges[i]  # the chunk also holds its 4-byte crc32c (issue 16)
            tile = flat.shape[1]
            flat[k] = np.frombuffer(os.pread(self.fds[i // self.tps], tile, offset), np.uint8)
            if crc:
                CRC32(flat[k])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def methods(
    url: str, url_no_crc32c: str, shards: ShardFiles, out: np.ndarray
) -> dict[str, Callable[[Any], Any]]:
    """Name -> function reading one batch of tile indices."""
    from featstore import open_store

    on, off = open_store(url), open_store(url, verify_reads=False)
    pipes = ["zarr"] + (["zarrs"] if importlib.util.find_spec("zarrs") else [])
    out_m: dict[str, Callable[[Any], Any]] = {
        "read_half, 1 tile per call (today)": lambda ix: [on.read_half(NAME, i) for i in ix],
    }
    stores = [("on", on, ""), ("off", off, "")]
    # the same store written without the chunks' crc32c (stores before issue 16): its cost
    stores += [
        (v, open_store(url_no_crc32c, verify_reads=v == "on"), ", no chunk crc32c")
        for v in ("on", "off")
    ]
    for pipe in pipes:
        for verify, store, what in stores:
            out_m[f"read_batch_half, {pipe}, verify {verify}{what}"] = lambda ix, s=store, p=pipe: (
                s.read_batch_half(NAME, ix, pipeline=p, out=out)
            )
    out_m[LIMIT] = lambda ix: shards.read(ix, out, False)
    out_m[f"os.pread + copy + {CRC_NAME}"] = lambda ix: shards.read(ix, out, True)
    return out_m


def measure(url: str, url_no_crc32c: str, n_tiles: int, reps: int, batches: int) -> dict[str, Any]:
    """Tiles/s of each method: ``reps`` interleaved rounds of ``batches`` batches each."""
    shards = ShardFiles(url, n_tiles)
    out = np.empty((BATCH, loader.GRID, loader.GRID, loader.CH), np.float16)
    fns = methods(url, url_no_crc32c, shards, out)
    rng = np.random.default_rng(0)
    for fn in fns.values():  # warm-up: open arrays, start thread pools
        fn([int(i) for i in rng.choice(n_tiles, BATCH, replace=False)])
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        sets = [[int(i) for i in rng.choice(n_tiles, BATCH, replace=False)] for _ in range(batches)]
        for name, fn in fns.items():  # the same batches for every method
            t0 = time.perf_counter()
            for ix in sets:
                fn(ix)
            rates[name].append(batches * BATCH / (time.perf_counter() - t0))
    shards.close()
    return rates


def summarise(rates: dict[str, list[float]], tile_bytes: int) -> list[dict[str, Any]]:
    limit = C.median(rates[LIMIT])
    return [
        {
            "method": name,
            "tiles_per_s_median": C.median(r),
            "tiles_per_s_best": max(r),
            "gb_per_s_median": C.median(r) * tile_bytes / 1e9,
            "ratio_to_limit": C.median(r) / limit,
            "runs": r,
        }
        for name, r in rates.items()
    ]


def table(rows: list[dict[str, Any]]) -> str:
    return C.markdown_table(
        ["reader (16 random tiles per batch)", "tiles/s (median)", "GB/s", "share of limit"],
        [
            [
                r["method"],
                f"{r['tiles_per_s_median']:,.0f}",
                f"{r['gb_per_s_median']:.2f}",
                f"{100 * r['ratio_to_limit']:.0f} %",
            ]
            for r in rows
        ],
    )


@contextlib.contextmanager
def without_chunk_crc32c() -> Iterator[None]:
    """Stores created inside are written as before issue 16: no crc32c in the chunks' codecs
    (a benchmark-only switch: the layout has no option for it)."""
    import featstore.layout as L

    saved = L.CHUNK_CHECKSUM, L.PIXEL_COMPRESSORS
    L.CHUNK_CHECKSUM, L.PIXEL_COMPRESSORS = (), L.PIXEL_COMPRESSORS[:1]
    try:
        yield
    finally:
        L.CHUNK_CHECKSUM, L.PIXEL_COMPRESSORS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 tiles, 3 repetitions")
    args = ap.parse_args()
    n_tiles, reps, batches = (32, 3, 4) if args.quick else (128, 15, 16)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        url, url_no_crc32c = f"{tmp}/store.zarr", f"{tmp}/no-crc32c.zarr"
        loader.build_store(url, n_tiles)
        with without_chunk_crc32c():
            loader.build_store(url_no_crc32c, n_tiles)
        rates = measure(url, url_no_crc32c, n_tiles, reps, batches)
    tile_bytes = loader.GRID * loader.GRID * loader.CH * 2
    rows = summarise(rates, tile_bytes)
    from featstore.reader import default_batch_pipeline

    # the goal is for what a user gets: the default pipeline, checksums verified
    name = f"read_batch_half, {default_batch_pipeline()}, verify on"
    default = next(r for r in rows if r["method"] == name)
    text = table(rows)
    goal = C.markdown_table(
        ["goal", "value", "target", "status"],
        [
            [
                f"verified batched read ({default['method']}) / plain read, one process",
                f"{100 * default['ratio_to_limit']:.0f} %",
                ">= 50 %",
                C.goal(default["ratio_to_limit"], 0.5, False),
            ]
        ],
    )
    load_after = os.getloadavg()
    print(f"{text}\n\n{goal}\n\nload average before/after: {load_before} / {load_after}")
    C.write_json(
        "read_speed",
        {
            "tiles": n_tiles,
            "tiles_per_shard": 16,
            "batch": BATCH,
            "reps": reps,
            "batches_per_rep": batches,
            "tile_bytes": tile_bytes,
            "limit_byte_ranges": "from the shard index (one pread per tile chunk)",
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": rows,
            "markdown": f"{text}\n\n{goal}\n",
        },
    )


if __name__ == "__main__":
    main()
