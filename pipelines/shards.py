"""Computing shard groups: what a local extraction and a dask worker both run.

A process builds an :class:`ExtractContext` (opened source, loaded teachers) with
:func:`make_context`, then :func:`process_shard` renders every level of a shard group's tiles,
runs the teachers and writes the tokens. ``pipelines.extract`` (the driver) and
``pipelines.distributed`` (the dask tasks) both import this module and not each other.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featstore import LevelSpec
from featstore.errors import FeatcacheError
from featstore.faults import fault_point
from featviews.render import render_level
from pipelines.config import ExtractConfig, ExtractConfigError

# Hidden test hook: seconds to sleep after each written shard, so a test can kill a run mid-way.
SLEEP_ENV = "FEATCACHE_TEST_SLEEP_AFTER_SHARD"


class ExtractionError(FeatcacheError):
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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch intra-op threads (fixed counts keep CPU numerics reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
                fault_point("shard.forward")  # kill tests: during a teacher forward
                grid = teacher(canvas).float().cpu().numpy()
                out[name][level.key].append(grid)
    return {n: {k: np.concatenate(v) for k, v in lv.items()} for n, lv in out.items()}


def crop_padding(
    features: dict[str, dict[str, np.ndarray]], schema: Any
) -> dict[str, dict[str, np.ndarray]]:
    """Keep the top-left ``g x g`` tokens of each level that the store keeps
    (``featstore.layout.stored_geometry``): all of them unless the schema crops padding.

    The teachers still see the whole padded canvas (a token's value depends on its context);
    only tokens that no tile point reads are dropped.
    """
    from featstore.layout import stored_geometry

    out: dict[str, dict[str, np.ndarray]] = {}
    for entry in schema.teachers:
        name = entry.spec.name
        out[name] = {}
        for lv in entry.levels:
            g = stored_geometry(schema, entry.spec, lv).grid
            out[name][lv.key] = features[name][lv.key][:, :g, :g]
    return out


def process_shard(
    ctx: ExtractContext, writer: Any, k: int, pixels: tuple[np.ndarray, np.ndarray] | None = None
) -> int:
    """Compute and write shard group `k` (tiles loaded here unless `pixels` is given)."""
    indices = writer.shard_tiles(k)
    fault_point("shard.start")
    images, masks = pixels if pixels is not None else load_tiles(ctx, indices)
    levels = level_specs(ctx.cfg.scales, ctx.cfg.flip)
    with torch_threads(ctx.cfg.threads):
        features = compute_features(ctx, images, levels)
    features = crop_padding(features, writer.schema)
    fault_point("shard.before_write")
    if ctx.cfg.store_pixels:
        writer.write_shard(k, features=features, images=images, masks=masks)
    else:
        writer.write_shard(k, features=features)
    fault_point("shard.after_write")
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return len(indices)
