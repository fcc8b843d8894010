"""Append new tiles (a new scene) to a finished store without recomputing what it holds.

``featcache extract SOURCE STORE --add`` where SOURCE yields the store's N tiles first (same
records, in order) and M new ones after them. The shard grid does not move (shard k = tiles
``[k*tps, (k+1)*tps)``), so every full stored shard keeps its files; the last stored shard, when
partial, is recomputed whole with the new tiles that fall in it, exactly as a fresh extraction
of the N+M tiles computes it (same tiles in the same batches). The result equals a fresh
extraction of the union file for file. A store that grew by ``extract --add`` (parts) keeps
its parts: each shard written is also recorded in every part's tables (checksum, provenance,
``done`` last), so it equals growing a fresh extraction of the union the same way.

Order of writes (each step idempotent, so a killed append resumes when the same command runs
again): the header first (union schema and fingerprint, complete=False: readers see an
unfinished store from here on), then every per-tile and per-shard array grows (zarr ``resize``
rewrites only its ``zarr.json``), the tile index is rewritten, the provenance of the kept shards
is set to the union's fingerprint, and every shard not wholly done is uncommitted; then the
pending shards are written by the ordinary machinery and ``finalize`` merges the stats over the
union and consolidates the metadata.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from featstore import layout as L
from featstore.codecs import get_codec
from featstore.faults import fault_point
from featstore.parts import OVERWRITE_HINT, AdditionError, finished_header, plan_addition
from featstore.schema import StoreSchema, TileRecord, fingerprint, fingerprint_parts
from featstore.writer import StoreWriter
from pipelines.extract import PCA_SAMPLE_TILES
from pipelines.shards import ExtractContext, process_shard

# Groups whose arrays describe the tiles as they were (selections, bank views): an append would
# leave them covering the old tiles only.
_REFUSED_GROUPS = {"partitions": "`featcache splits`", "bank": "`featcache bank`"}
_TILE_DIM, _SHARD_DIM = "tile", "shard"


def is_unfinished_append(url: str, requested: StoreSchema, records: Sequence[TileRecord]) -> bool:
    """Whether ``url`` holds an append of ``records`` that was killed (resume it)."""
    meta = L.read_header(L.open_root(url, "r"), url)
    return not meta.get("complete") and meta.get("fingerprint") == fingerprint(requested, records)


def check_append(
    url: str, requested: StoreSchema, stored_tiles: Sequence[TileRecord], n_records: int
) -> None:
    """Refuse what an append cannot do; the caller checked that SOURCE starts with the store's
    tiles.

    Raises:
        IncompleteStoreError: the store is not finished.
        AdditionError: other settings, other teachers or levels, parts, a bank, partitions,
            or a PCA basis fitted on fewer tiles than a fresh extraction of the union uses.
    """
    group = L.open_root(url, "r")
    meta = finished_header(group, url, "append tiles to it")
    stored = StoreSchema.from_dict(meta["schema"])
    _check_same_teachers(stored, requested, len(stored_tiles))
    _check_no_tile_groups(url, group, stored)
    _check_pca_sample(url, stored, len(stored_tiles), n_records)


def _check_same_teachers(stored: StoreSchema, requested: StoreSchema, n_stored: int) -> None:
    _union, part = plan_addition(stored, requested)  # dataset settings, teacher specs, codecs
    want = [(e.spec.name, [lv.key for lv in e.levels]) for e in stored.teachers]
    got = [(e.spec.name, [lv.key for lv in e.levels]) for e in requested.teachers]
    if part is not None or want != got:
        raise AdditionError(
            f"SOURCE has new tiles, which are appended with the store's teachers and levels "
            f"({_describe(want)}), but this run asks for {_describe(got)}: append the tiles "
            "first with the store's --teacher/--scales/--flip options, then add teachers or "
            "levels with a second `featcache extract --add`; or pass --limit "
            f"{n_stored} to add them to the stored tiles only"
        )


def _describe(teachers: list[tuple[str, list[str]]]) -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in teachers)


def _check_no_tile_groups(url: str, group: zarr.Group, stored: StoreSchema) -> None:
    for name, command in _REFUSED_GROUPS.items():
        if name in group or (name == "bank" and stored.bank is not None):
            raise AdditionError(
                f"store {url!r} has {name}/ (made by {command}), which covers the stored tiles "
                f"only; appending tiles to it is not supported: append to a copy of the store "
                f"made without {command}, or {OVERWRITE_HINT}"
            )


def _check_pca_sample(url: str, stored: StoreSchema, n_stored: int, n_records: int) -> None:
    """A PCA basis is fitted on the first PCA_SAMPLE_TILES tiles: with fewer stored, a fresh
    extraction of the union would fit another basis than the one the stored shards use."""
    if n_stored >= min(PCA_SAMPLE_TILES, n_records):
        return
    pca = [e.spec.name for e in stored.teachers if get_codec(e.codec).needs_fit]
    if pca:
        raise AdditionError(
            f"store {url!r} encodes {pca} with a PCA basis fitted on its {n_stored} tiles; a "
            f"store of {n_records} tiles fits it on its first {PCA_SAMPLE_TILES}, so the "
            "appended store would not be the one an extraction of SOURCE makes: extract SOURCE "
            f"into a new store, or {OVERWRITE_HINT}"
        )


def begin_append(url: str, union: StoreSchema, records: Sequence[TileRecord]) -> None:
    """Write the union header (complete=False), then grow the store to ``records``.

    The caller holds the store's writer lock. Idempotent: a killed call is finished by calling
    it again with the same arguments.
    """
    group = L.open_root(url, "r+")
    meta = L.read_header(group, url)
    fp = fingerprint(union, records)
    if meta.get("fingerprint") != fp or meta.get("complete"):
        group.attrs[L.ATTR_KEY] = dict(
            meta,
            schema=union.to_dict(),
            fingerprint=fp,
            fingerprint_parts=fingerprint_parts(union, records),
            package_version=L.package_version(),
            complete=False,
            stats=None,
        )
    fault_point("append.after_header")  # kill tests: the union header, arrays not grown
    grow_arrays(group, union, len(records))
    fault_point("append.after_resize")  # kill tests: arrays grown, the tile index still old
    if L.read_tiles(group) != list(records):
        L.write_tiles(group, records, overwrite=True)
    _claim_kept_shards(group, union, records)


def _arrays(group: zarr.Group) -> list[tuple[str, Any]]:
    with warnings.catch_warnings():
        # the writer's lock file (featcache.lock) beside the arrays is not a zarr node: skipped
        warnings.filterwarnings(
            "ignore", message="Object at .* is not recognized", category=UserWarning
        )
        members = list(group.members(max_depth=None))
    return [(p, a) for p, a in members if isinstance(a, zarr.Array)]


def grow_arrays(group: zarr.Group, schema: StoreSchema, n: int) -> None:
    """Resize every array with a tile (first) axis to ``n`` tiles and every array with a shard
    axis to ``schema.n_shards(n)``; the tile index (one chunk) is rewritten by the caller."""
    sizes = {_TILE_DIM: n, _SHARD_DIM: schema.n_shards(n)}
    for path, arr in _arrays(group):
        names = arr.metadata.dimension_names or ()
        if path.startswith("tiles/") or not names or names[0] not in sizes:
            continue
        size = sizes[names[0]]
        if arr.shape[0] != size:
            arr.resize((size, *arr.shape[1:]))


def _provenance(schema: StoreSchema, stage: int, tiles: Sequence[TileRecord]) -> str:
    """Fingerprint the shards of ``stage`` record (0: the root tables, n: part n's)."""
    return fingerprint(dataclasses.replace(schema.up_to_part(stage), bank=None), tiles)


def _bookkeeping(schema: StoreSchema) -> list[tuple[str, str]]:
    """(done path, provenance path) of the root tables and of every part's, in stage order."""
    out = [("done", L.SHARD_FINGERPRINT)]
    return out + [
        (L.part_path(p, L.PART_DONE), L.part_path(p, L.SHARD_FINGERPRINT)) for p in schema.parts
    ]


def _claim_kept_shards(
    group: zarr.Group, schema: StoreSchema, records: Sequence[TileRecord]
) -> None:
    """Done shards keep their data under the union's fingerprints (a fresh extraction of the
    union writes the same bytes into them); shards not wholly done (for every level) are
    uncommitted, so they are rewritten whole (the old partial last shard among them)."""
    n = len(records)
    done = L.read_done(group, schema)
    stages = _bookkeeping(schema)
    fps = [_provenance(schema, i, records) for i in range(len(stages))]
    for k in range(schema.n_shards(n)):
        r = schema.shard_range(k, n)
        for (done_path, prov_path), fp in zip(stages, fps, strict=True):
            if done[r.start : r.stop].all():
                if prov_path in group and str(group[prov_path][k]) != fp:
                    group[prov_path][k] = fp
            elif np.asarray(group[done_path][r.start : r.stop]).any():
                group[done_path][r.start : r.stop] = 0


def _commit_parts(group: zarr.Group, schema: StoreSchema, k: int, n: int) -> None:
    """Shard ``k`` was written whole (every level, the root tables): record it in the tables of
    the parts (levels added by `extract --add`) as a PartWriter would, ``done`` last."""
    r = schema.shard_range(k, n)
    sl = slice(r.start, r.stop)
    tiles = L.read_tiles(group)
    for i, part in enumerate(schema.parts, start=1):
        cols = L.part_checksum_arrays(schema, part)
        crcs = np.stack([L.tile_crcs(np.asarray(group[p][sl])) for p in cols], axis=1)
        group[L.part_path(part, L.PART_CHECKSUM)][sl] = crcs
        group[L.part_path(part, L.SHARD_FINGERPRINT)][k] = _provenance(schema, i, tiles)
        fault_point("append.before_part_done")  # kill tests: root done, this part's not yet
        group[L.part_path(part, L.PART_DONE)][sl] = 1


def write_appended(ctx: ExtractContext, url: str, run_id: str, progress: bool) -> None:
    """Write the pending shards of a grown store, then finalize it."""
    from tqdm.auto import tqdm

    writer = StoreWriter.open(url, run_id=run_id)
    group = L.open_root(url, "r+")
    shards = writer.pending_shards()
    n_pending = sum(len(writer.shard_tiles(k)) for k in shards)
    total = writer.n_tiles
    with tqdm(
        total=total, initial=total - n_pending, unit="tile", desc="append", disable=not progress
    ) as bar:
        for k in shards:
            bar.update(process_shard(ctx, writer, k))
            _commit_parts(group, writer.schema, k, total)
    fault_point("append.before_finalize")
    writer.finalize()


def run_append(
    ctx: ExtractContext,
    url: str,
    requested: StoreSchema,
    stored_tiles: Sequence[TileRecord],
    run_id: str,
    progress: bool,
) -> None:
    """Append ``ctx.records[len(stored_tiles):]`` to the store (resuming a killed append).

    The caller holds the writer lock and checked that the records start with the stored tiles.
    """
    records = list(ctx.records)
    if not is_unfinished_append(url, requested, records):
        check_append(url, requested, stored_tiles, len(records))
    # the stored parts: where the levels added later are bookkept (not in the fingerprint)
    meta = L.read_header(L.open_root(url, "r"), url)
    union = dataclasses.replace(requested, parts=StoreSchema.from_dict(meta["schema"]).parts)
    begin_append(url, union, records)
    write_appended(ctx, url, run_id, progress)


__all__ = [
    "begin_append",
    "check_append",
    "grow_arrays",
    "is_unfinished_append",
    "run_append",
    "write_appended",
]
