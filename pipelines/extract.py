"""The extraction stage: run frozen teachers once per tile and write their tokens into a store.

`run_extraction` validates everything that can fail (output path, source, teachers) before it
creates the store, fits a PCA basis when the codec needs one, then writes whole shard groups, in
this process or as dask tasks (`pipelines.distributed`). A shard is marked done only after it is
fully written, so re-running the same command resumes and reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from featstore import StoreSchema, TeacherEntry, create_store, get_codec
from featstore.faults import fault_point
from pipelines.config import ExtractConfig, parse_scheduler
from pipelines.shards import (
    SLEEP_ENV,
    ExtractContext,
    ExtractionError,
    check_device,
    compute_features,
    level_specs,
    load_teachers,
    load_tiles,
    make_context,
    process_shard,
    torch_threads,
)

PCA_SAMPLE_TILES = 64
PCA_MAX_TOKENS = 65536


def check_writable(url: str) -> None:
    """Fail early (before any work) when a local output path cannot be created or written."""
    if "://" in url and not url.startswith("file://"):
        return  # remote fsspec URL: the store layer reports its own errors
    path = Path(url.removeprefix("file://")).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ExtractionError(
            f"output path {str(path)!r} exists and is not a directory; choose another store path"
        )
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExtractionError(
            f"output path {str(path)!r} cannot be created: {str(ancestor)!r} "
            "is a file, not a directory; choose another store path"
        )
    try:
        # A real probe (not os.access): permissions, read-only mounts and root all behave right.
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise ExtractionError(
            f"output path {str(path)!r} is not writable ({err.strerror} in "
            f"{str(ancestor)!r}); choose a writable location"
        ) from None


def check_not_source(source: str, out: str) -> None:
    """Refuse a STORE that is the source dataset or a folder above it (it may be deleted)."""
    if "://" in out and not out.startswith("file://"):
        return
    if "://" in source and not source.startswith("file://"):
        return
    store = Path(out.removeprefix("file://")).expanduser().resolve()
    src = Path(source.removeprefix("file://")).expanduser().resolve()
    if store == src or store in src.parents:
        raise ExtractionError(
            f"STORE {out!r} is the source dataset {source!r} or a folder above it; extracting "
            "there would mix the store with the data (and --overwrite would delete the data): "
            "choose a STORE path outside the source"
        )


def open_tiles(cfg: ExtractConfig) -> tuple[Any, list[Any]]:
    """Open the source and take its first `cfg.limit` records (source errors propagate)."""
    from pipelines.sources import open_configured

    source = open_configured(cfg.source, cfg)
    records = list(source.records)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise ExtractionError(
            f"source {cfg.source!r} yielded no tiles; check the path, --layout and --split-file"
        )
    return source, records


def build_schema(ctx: ExtractContext) -> StoreSchema:
    """The store schema of this extraction (teacher specs, levels, codec, dataset facts)."""
    cfg = ctx.cfg
    levels = level_specs(cfg.scales, cfg.flip)
    entries = tuple(TeacherEntry(t.spec, levels, dict(cfg.codec)) for t in ctx.teachers.values())
    return StoreSchema(
        dataset=ctx.source.dataset,
        tile_size=cfg.tile_size,
        base_size=cfg.base_size,
        class_names=tuple(ctx.source.class_names),
        ignore_index=int(ctx.source.ignore_index),
        tiles_per_shard=cfg.tiles_per_shard,
        teachers=entries,
        store_pixels=cfg.store_pixels,
        padding_tokens="kept" if cfg.keep_padding else "cropped",
        class_colors=tuple(ctx.source.class_colors),
        class_sources=tuple(ctx.source.class_sources),
        label_rule=ctx.source.label_rule,
        edge_rule=ctx.source.edge_rule,
        eval_protocol=ctx.source.protocol.to_dict(),
        # the records are the source's first len(records) tiles (cfg.limit)
        label_stats=ctx.source.label_stats(range(len(ctx.records))),
    )


def pca_samples(ctx: ExtractContext, name: str) -> np.ndarray:
    """Deterministic PCA sample of one teacher: tokens `[m, C]` of the first tiles at scale 1."""
    n = min(PCA_SAMPLE_TILES, len(ctx.records))
    images, _ = load_tiles(ctx, range(n))
    levels = level_specs(ctx.cfg.scales, False)
    level = next((lv for lv in levels if lv.scale == 1.0), levels[0])
    sub = ExtractContext(ctx.cfg, ctx.source, ctx.records, {name: ctx.teachers[name]}, ctx.device)
    with torch_threads(ctx.cfg.threads):
        grids = compute_features(sub, images, [level])[name][level.key]
    tokens = grids.reshape(-1, grids.shape[-1])
    step = max(1, -(-len(tokens) // PCA_MAX_TOKENS))  # evenly spaced, at most PCA_MAX_TOKENS
    return tokens[::step]


def fit_pca(ctx: ExtractContext, writer: Any) -> None:
    """Fit and store each PCA teacher's basis, unless the store already holds one (resume)."""
    if not get_codec(ctx.cfg.codec).needs_fit:  # pca, pca-int8: a basis fitted on data
        return
    for name in ctx.teachers:
        if _has_pca(writer, name):
            continue
        mean, basis = get_codec(ctx.cfg.codec).fit(pca_samples(ctx, name))
        fault_point("extract.pca")  # kill tests: basis fitted, not yet stored
        writer.set_pca(name, mean, basis)


def _has_pca(writer: Any, name: str) -> bool:
    """Whether the store already holds a fitted basis for `name` (a resumed run)."""
    from featstore.errors import CodecError

    try:
        writer.codec(name)  # loads the stored basis; NaN (never fitted) raises CodecError
    except CodecError:
        return False
    return True


def _progress_bar(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="tile", desc="extract", disable=not enabled)


def _run_local(ctx: ExtractContext, writer: Any, shards: list[int], bar: Any) -> None:
    """Shards in order; a thread decodes the next shard's tiles while this one computes."""
    if not shards:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-load") as pool:
        nxt = pool.submit(load_tiles, ctx, writer.shard_tiles(shards[0]))
        for pos, k in enumerate(shards):
            pixels = nxt.result()
            if pos + 1 < len(shards):
                nxt = pool.submit(load_tiles, ctx, writer.shard_tiles(shards[pos + 1]))
            bar.update(process_shard(ctx, writer, k, pixels))


def run_extraction(cfg: ExtractConfig, progress: bool = True) -> str:
    """Extract teacher features of `cfg.source` into the store `cfg.out`; return its URL.

    Re-running with the same config resumes (done shards are skipped). A store with a different
    fingerprint raises `featstore.FingerprintMismatchError` unless `cfg.overwrite`. The run holds
    the store's writer lock until it returns or fails.
    """
    cfg.validate()
    if cfg.add:  # the addition imports this module: it is called by its caller, not from here
        raise ExtractionError(
            "ExtractConfig.add is run by pipelines.incremental.run_addition, not run_extraction"
        )
    mode, arg = parse_scheduler(cfg.scheduler)
    check_writable(cfg.out)
    check_not_source(cfg.source, cfg.out)
    if mode != "tcp":  # a remote cluster's workers check their own device
        check_device(cfg.device)
    run_id = uuid.uuid4().hex[:12]
    with contextlib.ExitStack() as stack:
        client, worker_cfg = None, cfg
        if mode != "local":
            from pipelines.distributed import connect, prepare_workers

            # Before the store exists: an unreachable scheduler, no worker or a path a worker
            # cannot read leaves nothing behind. Workers get absolute paths (their own cwd).
            client = stack.enter_context(connect(mode, arg, announce=progress))
            worker_cfg = prepare_workers(client, cfg)
        # Opened from the absolute path with dask: the source travels to the workers.
        source, records = open_tiles(worker_cfg)
        # The driver builds teachers for validation, the schema and the PCA fit; with dask it
        # may have no accelerator, so it uses the CPU there and workers use cfg.device.
        ctx = make_context(cfg, source, records, cfg.device if mode == "local" else "cpu")
        writer = create_store(
            cfg.out,
            build_schema(ctx),
            records,
            overwrite=cfg.overwrite,
            run_id=run_id,
            break_lock=cfg.break_lock,
        )
        stack.callback(writer.release_lock)
        fault_point("extract.after_create")
        _refuse_unfinished_append(cfg, writer, len(records))
        _refuse_damaged_complete_store(cfg, writer)
        with _disk_full_message(cfg.out):
            fit_pca(ctx, writer)
            shards = list(writer.pending_shards())
            n_pending = sum(len(writer.shard_tiles(k)) for k in shards)
            with _progress_bar(len(records), len(records) - n_pending, progress) as bar:
                if mode == "local":
                    _run_local(ctx, writer, shards, bar)
                elif shards:
                    del ctx  # free the driver's teachers before the workers load theirs
                    from pipelines.distributed import run_shards_dask

                    run_shards_dask(worker_cfg, source, shards, client, run_id, bar)
            fault_point("extract.before_finalize")
            writer.finalize()
    return cfg.out


def _refuse_unfinished_append(cfg: ExtractConfig, writer: Any, n_records: int) -> None:
    """A killed append of tiles (`extract --add`, pipelines.append) has the union's header before
    its arrays and tile index have grown: only the append itself finishes it."""
    if writer.n_tiles != n_records or len(writer.tiles) != n_records:
        raise ExtractionError(
            f"STORE {cfg.out!r} has an unfinished append of tiles ({len(writer.tiles)} tiles "
            f"stored, SOURCE yields {n_records}): finish it by running the same command with "
            "--add"
        )


def _refuse_damaged_complete_store(cfg: ExtractConfig, writer: Any) -> None:
    """A finished store has nothing to resume: when it is damaged, say so and name the fix
    (extract would otherwise print "wrote" over a store that fails verify)."""
    from featstore.verify import verify_store

    if not writer.complete or writer.pending_shards():
        return
    problems = verify_store(cfg.out)
    if problems:
        listed = "\n  - ".join(problems[:5])
        raise ExtractionError(
            f"STORE {cfg.out!r} is complete but damaged ({len(problems)} problem(s)):\n"
            f"  - {listed}\nrun the same command with `featcache repair` in place of "
            "`featcache extract` to re-extract the damaged shards"
        )


@contextlib.contextmanager
def _disk_full_message(store: str) -> Iterator[None]:
    """A full disk anywhere in the store writes (PCA basis, shards, header) says what to do;
    shard writes say it themselves (featstore.StoreWriteError)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ExtractionError(
            f"no space left on the device of STORE {store!r} ({err}); free space, then re-run "
            "the same command: finished shards are kept and the run resumes"
        ) from err


# The shard computation lives in `pipelines.shards` (shared with the dask workers of
# `pipelines.distributed`); its names stay importable from here, where callers found them.
__all__ = [
    "SLEEP_ENV",
    "ExtractContext",
    "ExtractionError",
    "build_schema",
    "check_device",
    "check_not_source",
    "check_writable",
    "compute_features",
    "fit_pca",
    "level_specs",
    "load_teachers",
    "load_tiles",
    "make_context",
    "open_tiles",
    "process_shard",
    "run_extraction",
    "torch_threads",
]
