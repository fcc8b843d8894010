"""Add teachers or levels to a finished store without recomputing what it holds.

``featcache extract SOURCE STORE --teacher clip_vitl14 --add`` on a store of ``dinov2_vitb14``:
the requested schema is built exactly as an extraction would build it, merged with the stored
one (``featstore.parts.plan_addition``: stored teachers must keep their settings; new teachers
and new levels of stored teachers are added), and the new levels are computed shard by shard
into their own arrays (``featstore.parts.PartWriter``). The store's writer lock is held
throughout; a killed addition resumes when the same command runs again; the header's stats and
the consolidated metadata are rewritten for the union at the end.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from featstore import layout as L
from featstore import lock
from featstore.errors import IncompleteStoreError
from featstore.faults import fault_point
from featstore.parts import (
    AdditionError,
    PartWriter,
    begin_part,
    pending_part,
    plan_addition,
    take_lock,
)
from featstore.schema import StoreSchema, TileRecord, fingerprint
from pipelines.append import is_unfinished_append, run_append
from pipelines.config import ExtractConfig
from pipelines.extract import build_schema, check_device, fit_pca, open_tiles
from pipelines.shards import (
    ExtractContext,
    ExtractionError,
    compute_features,
    load_tiles,
    make_context,
    torch_threads,
)


def check_same_tiles(records: Sequence[TileRecord], stored: Sequence[TileRecord]) -> int:
    """The source must yield the store's tiles first, in order (id and pixel hash); tiles after
    them are new (appended by ``pipelines.append``). Returns how many new tiles it yields.

    Raises:
        ExtractionError: another tile list, or fewer tiles.
    """
    for i, (a, b) in enumerate(zip(stored, records, strict=False)):
        if (a.tile_id, a.pixel_hash) != (b.tile_id, b.pixel_hash):
            raise ExtractionError(
                f"SOURCE does not match the store's tile records: tile #{i} is {a.tile_id!r} "
                f"(pixel hash {a.pixel_hash[:12]}) in the store and {b.tile_id!r} (pixel hash "
                f"{b.pixel_hash[:12]}) in SOURCE; give the SOURCE, --layout, --split-file, "
                "--tile-size and --limit the store was extracted with (new tiles can only be "
                "appended after the stored ones)"
            )
    if len(records) < len(stored):
        raise ExtractionError(
            f"SOURCE yields {len(records)} tiles, the store holds {len(stored)}; give the SOURCE "
            "and --limit the store was extracted with"
        )
    return len(records) - len(stored)


def _open_writer(
    url: str, requested: StoreSchema, tiles: list[TileRecord], run_id: str
) -> PartWriter | None:
    """The writer of the addition: a new part, or the unfinished one of the same request
    (resume). None when the store already holds everything requested."""
    group = L.open_root(url, "r")
    meta = L.read_header(group, url)
    stored = StoreSchema.from_dict(meta["schema"])
    if meta.get("complete"):
        union, part = plan_addition(stored, requested)
        return None if part is None else begin_part(url, union, part, tiles, run_id)
    unfinished = pending_part(stored, group)
    if unfinished is None and stored.parts and L.read_done(group, stored).all():
        unfinished = stored.parts[-1]  # killed while finalizing: only the header is left
    if unfinished is None:
        raise IncompleteStoreError(
            f"store {url!r} is not complete: finish it first (re-run the `featcache extract` "
            "that made it, without --add), then add to it"
        )
    index = [p.name for p in stored.parts].index(unfinished.name)
    union, part = plan_addition(stored.up_to_part(index), requested)
    if part != unfinished or fingerprint(union, tiles) != meta["fingerprint"]:
        levels = ", ".join(f"{t}/{k}" for t, k in unfinished.levels)
        raise AdditionError(
            f"store {url!r} has an unfinished addition ({levels}); finish it first by "
            "re-running the `featcache extract --add` command that started it"
        )
    return PartWriter.open_part(url, unfinished.name, run_id)


def part_features(
    ctx: ExtractContext, writer: PartWriter, images: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """The part's levels of every teacher it adds to, cropped to the stored grids.

    Each teacher runs alone on the same canvases, batches and threads as an extraction of that
    teacher, so the tokens equal a fresh extraction's.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, keys in writer.levels.items():
        entry = writer.schema.teacher(name)
        levels = [entry.level(k) for k in keys]
        sub = ExtractContext(
            ctx.cfg, ctx.source, ctx.records, {name: ctx.teachers[name]}, ctx.device
        )
        with torch_threads(ctx.cfg.threads):
            grids = compute_features(sub, images, levels)[name]
        out[name] = {}
        for lv in levels:
            g = L.stored_geometry(writer.schema, entry.spec, lv).grid
            out[name][lv.key] = grids[lv.key][:, :g, :g]
    return out


def _progress_bar(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="tile", desc="add", disable=not enabled)


def _write_pending(ctx: ExtractContext, writer: PartWriter, progress: bool) -> None:
    shards = writer.pending_shards()
    n_pending = sum(len(writer.shard_tiles(k)) for k in shards)
    with _progress_bar(writer.n_tiles, writer.n_tiles - n_pending, progress) as bar:
        for k in shards:
            fault_point("shard.start")
            images, _ = load_tiles(ctx, writer.shard_tiles(k))
            features = part_features(ctx, writer, images)
            writer.write_shard(k, features=features)
            bar.update(len(writer.shard_tiles(k)))


def run_addition(cfg: ExtractConfig, progress: bool = True) -> str:
    """Add to the finished store ``cfg.out`` the teachers and levels of ``cfg`` it lacks, or
    the tiles SOURCE yields after the stored ones (``pipelines.append``; one kind at a time).

    Re-running the same config resumes a killed addition; asking for what the store holds
    already does nothing. Returns the store URL.

    Raises:
        AdditionError: a stored teacher asked with other settings, other dataset settings, or
            another addition left unfinished.
        IncompleteStoreError: the store itself is not finished.
        ExtractionError: SOURCE does not yield the store's tiles.
    """
    cfg.validate()
    if not cfg.add:
        raise ExtractionError("run_addition needs ExtractConfig.add=True (featcache extract --add)")
    check_device(cfg.device)
    source, records = open_tiles(cfg)
    run_id = uuid.uuid4().hex[:12]
    tiles = L.read_tiles(L.open_root(cfg.out, "r"))  # no store there: the reader's error
    n_new = check_same_tiles(records, tiles)
    with contextlib.ExitStack() as stack:
        take_lock(cfg.out, run_id, cfg.break_lock)
        if L.is_local(cfg.out):
            stack.callback(lock.remove_lock, L.local_path(cfg.out), run_id)
        ctx = make_context(cfg, source, records, cfg.device)
        requested = build_schema(ctx)
        if n_new or is_unfinished_append(cfg.out, requested, records):
            run_append(ctx, cfg.out, requested, tiles, run_id, progress)
            return cfg.out
        writer = _open_writer(cfg.out, requested, tiles, run_id)
        if writer is None:
            return cfg.out  # nothing to add: the store is left as it is
        fit_pca(ctx, writer)
        _write_pending(ctx, writer, progress)
        fault_point("add.before_finalize")
        writer.finalize()
    return cfg.out


__all__ = ["check_same_tiles", "part_features", "run_addition"]
