"""The extraction stage: run frozen teachers once per tile and write their tokens into a store.

`run_extraction` validates everything that can fail (output path, source, teachers) before it
creates the store, fits a PCA basis when the codec needs one, then writes whole shard groups, in
this process or as dask tasks (`pipelines.distributed`). A shard is marked done only after it is
fully written, so re-running the same command resumes and reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featstore import LevelSpec, StoreSchema, TeacherEntry, create_store, get_codec
from pipelines.config import ExtractConfig, ExtractConfigError, parse_scheduler

# Hidden test hook: seconds to sleep after each written shard, so a test can kill a run mid-way.
SLEEP_ENV = "FEATCACHE_TEST_SLEEP_AFTER_SHARD"
PCA_SAMPLE_TILES = 64
PCA_MAX_TOKENS = 65536


class ExtractionError(Exception):
    """Extraction cannot start or continue; the message names the path/option and the fix."""


@dataclass
class ExtractContext:
    """What a process needs to compute shards: the opened source and the loaded teachers."""

    cfg: ExtractConfig
    source: Any
    records: list[Any]
    teachers: dict[str, Any]
    device: torch.device


def level_specs(scales: Sequence[float], flip: bool) -> tuple[LevelSpec, ...]:
    """Cached levels: every scale, each followed by its flipped copy when `flip`."""
    levels = []
    for scale in scales:
        levels.append(LevelSpec(float(scale), False))
        if flip:
            levels.append(LevelSpec(float(scale), True))
    return tuple(levels)


def render_level(images: torch.Tensor, level: Any, base_size: int) -> torch.Tensor:
    """Render uint8 tiles `[n, T, T, 3]` as the float canvases `[n, 3, c, c]` of one level.

    The tile (h-flipped first for flipped levels) is resized to `round(scale * base_size)` with
    bilinear antialias interpolation and placed top-left on a black `base_size` canvas when smaller.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if level.flipped:
        x = torch.flip(x, dims=(3,))
    render = round(level.scale * base_size)
    if render != x.shape[-1]:
        x = F.interpolate(
            x, size=(render, render), mode="bilinear", align_corners=False, antialias=True
        )
    if render >= base_size:
        return x.contiguous()
    canvas = x.new_zeros((x.shape[0], 3, base_size, base_size))
    canvas[:, :, :render, :render] = x
    return canvas


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch intra-op threads (fixed counts keep CPU numerics reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def check_device(device: str) -> None:
    """Fail before any work when `--device` names a device torch cannot use here."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ExtractionError(
            f"--device {device!r} is not a torch device ({err}); use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionError(
                f"--device {device}: no CUDA GPU is usable here (torch sees none: no GPU, no "
                "driver, a CPU-only torch build, or CUDA_VISIBLE_DEVICES hides it); use "
                "--device cpu, or run where a GPU is visible"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ExtractionError(
                f"--device {device}: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}; pick one of them"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ExtractionError(
            f"--device {device}: Apple MPS is not available here; use --device cpu"
        )


def open_tiles(cfg: ExtractConfig) -> tuple[Any, list[Any]]:
    """Open the source and take its first `cfg.limit` records (source errors propagate)."""
    from pipelines.sources import open_source

    source = open_source(
        cfg.source,
        layout=cfg.layout,
        split_file=cfg.split_file,
        tile_size=cfg.tile_size,
        edge_rule=cfg.edge_rule,
        bands=cfg.bands,
        class_names=cfg.classes,
        reduce_zero_label=cfg.reduce_zero_label,
        ignore_index=cfg.ignore_index,
        palette=cfg.palette,
    )
    records = list(source.records)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise ExtractionError(
            f"source {cfg.source!r} yielded no tiles; check the path, --layout and --split-file"
        )
    return source, records


def load_teachers(cfg: ExtractConfig, device: str) -> dict[str, Any]:
    """Create every teacher of `cfg` on `device` (unknown names raise the registry's error).

    Random-init weights are seeded inside `create_teacher`, so every process builds the same
    network.
    """
    from pipelines.teachers import create_teacher

    teachers: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        for name in cfg.teachers:
            teacher = create_teacher(
                name,
                weights=cfg.weights.get(name),
                tiny=cfg.tiny,
                device=device,
                base_size=cfg.base_size,
                random_weights=cfg.random_weights,
            )
            # The store names a teacher by its canonical spec name (e.g. "timm:m" -> "timm:m:3").
            if teacher.spec.name in teachers:
                raise ExtractConfigError(
                    f"--teacher {name!r} is the same teacher as another "
                    f"one ({teacher.spec.name!r}); give it once"
                )
            teachers[teacher.spec.name] = teacher
    return teachers


def make_context(
    cfg: ExtractConfig, source: Any, records: list[Any], device: str
) -> ExtractContext:
    """Context over an opened source with freshly loaded teachers."""
    check_device(device)  # also in dask workers, whose device may differ from the client's
    return ExtractContext(cfg, source, records, load_teachers(cfg, device), torch.device(device))


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
        class_colors=tuple(ctx.source.class_colors),
        class_sources=tuple(ctx.source.class_sources),
        label_rule=ctx.source.label_rule,
        edge_rule=ctx.source.edge_rule,
        eval_protocol=ctx.source.protocol.to_dict(),
        # the records are the source's first len(records) tiles (cfg.limit)
        label_stats=ctx.source.label_stats(range(len(ctx.records))),
    )


def load_tiles(ctx: ExtractContext, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked uint8 images `[n, T, T, 3]` and masks `[n, T, T]` (ignore where unlabelled)."""
    images, masks = [], []
    for i in indices:
        image, mask = ctx.source.load(int(i))
        images.append(image)
        if mask is None:
            mask = np.full(image.shape[:2], ctx.source.ignore_index, np.uint8)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


@torch.inference_mode()
def compute_features(
    ctx: ExtractContext, images: np.ndarray, levels: Sequence[Any]
) -> dict[str, dict[str, np.ndarray]]:
    """Teacher tokens of every level: `{teacher: {level_key: float32 [n, g, g, C]}}`.

    Tiles go through the teachers in fixed batches of `batch_size` in tile order, so a shard's
    numbers do not depend on which process or run computes it.
    """
    bs = ctx.cfg.batch_size
    tiles = torch.from_numpy(images).to(ctx.device)
    out: dict[str, dict[str, list[np.ndarray]]] = {
        n: {lv.key: [] for lv in levels} for n in ctx.teachers
    }
    for level in levels:
        for start in range(0, len(tiles), bs):
            canvas = render_level(tiles[start : start + bs], level, ctx.cfg.base_size)
            for name, teacher in ctx.teachers.items():
                grid = teacher(canvas).float().cpu().numpy()
                out[name][level.key].append(grid)
    return {n: {k: np.concatenate(v) for k, v in lv.items()} for n, lv in out.items()}


def process_shard(
    ctx: ExtractContext, writer: Any, k: int, pixels: tuple[np.ndarray, np.ndarray] | None = None
) -> int:
    """Compute and write shard group `k` (tiles loaded here unless `pixels` is given)."""
    indices = writer.shard_tiles(k)
    images, masks = pixels if pixels is not None else load_tiles(ctx, indices)
    levels = level_specs(ctx.cfg.scales, ctx.cfg.flip)
    with torch_threads(ctx.cfg.threads):
        features = compute_features(ctx, images, levels)
    if ctx.cfg.store_pixels:
        writer.write_shard(k, features=features, images=images, masks=masks)
    else:
        writer.write_shard(k, features=features)
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return len(indices)


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
    if ctx.cfg.codec.get("name") != "pca":
        return
    for name in ctx.teachers:
        if _has_pca(writer, name):
            continue
        mean, basis = get_codec(ctx.cfg.codec).fit(pca_samples(ctx, name))
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
    mode, arg = parse_scheduler(cfg.scheduler)
    check_writable(cfg.out)
    check_not_source(cfg.source, cfg.out)
    if mode != "tcp":  # a remote cluster's workers check their own device
        check_device(cfg.device)
    run_id = uuid.uuid4().hex[:12]
    with contextlib.ExitStack() as stack:
        client = None
        if mode != "local":
            from pipelines.distributed import connect

            # Before the store exists: an unreachable scheduler leaves nothing behind.
            client = stack.enter_context(connect(mode, arg))
        source, records = open_tiles(cfg)
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

                    run_shards_dask(cfg, source, shards, client, run_id, bar)
            writer.finalize()
    return cfg.out


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
