"""Build an exact view bank: K views per tile drawn with the official rule, teachers run on each.

The views follow the contract (docs/architecture.md, "Coordinates"): the tile resized to ``S``
with ``F.interpolate(bilinear, align_corners=False, antialias=True)``, padded black right/bottom
to at least ``crop``, cropped at ``(oy, ox)``, then h-flipped. Each teacher runs on the ``crop``
px view exactly as online mode runs it on the student's view, and the teacher's own output grid
is stored (``featstore.bank``); the trainer resamples it to the student grid with the same
function online mode uses (``trainer.viewbank``).

Entry points: ``build_view_bank`` adds a bank to a store whose tiles are written (resumable per
shard group); ``bank_shard_arrays`` computes one shard's params and tokens for an extraction
that writes the bank right after the levels (``BankWriter.write_bank_shard``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from featstore import BankSpec, BankWriter, add_bank, open_store
from featstore.constants import SCALE_RANGE
from featstore.errors import FeatcacheError
from featviews.bank import draw_bank_params
from featviews.render import render_tile_views
from pipelines.shards import torch_threads


class ViewBankError(FeatcacheError):
    """A view bank cannot be built; the message names the store/option and the fix."""


def _batches(n: int, k: int, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """(tile row, slot) pairs in tile-major order, in fixed batches (reproducible numerics)."""
    pairs = [(r, s) for r in range(n) for s in range(k)]
    for start in range(0, len(pairs), batch_size):
        yield pairs[start : start + batch_size]


@torch.inference_mode()
def compute_bank_features(
    teachers: Mapping[str, Any],
    images: np.ndarray,
    params: np.ndarray,
    crop: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Teacher tokens on every view: ``{name: float32 [n, K, g, g, C]}``.

    Views are rendered batch by batch (a shard's K views at once would not fit in memory) on
    ``device``; batches run in tile-major order so a shard's numbers do not depend on the run.
    """
    n, k = params.shape[:2]
    tiles = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    out: dict[str, np.ndarray] = {}
    for batch in _batches(n, k, max(1, int(batch_size))):
        views = torch.cat(
            [render_tile_views(tiles[r], params[r, s : s + 1], crop) for r, s in batch]
        )
        for name, teacher in teachers.items():
            grid = teacher(views).float().cpu().numpy()
            if name not in out:
                out[name] = np.empty((n, k, *grid.shape[1:]), np.float32)
            for (r, s), g in zip(batch, grid, strict=True):
                out[name][r, s] = g
    return out


def bank_shard_arrays(
    teachers: Mapping[str, Any],
    images: np.ndarray,
    tile_indices: Sequence[int],
    spec: BankSpec,
    tile_size: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Params and tokens of one shard group, ready for ``BankWriter.write_bank_shard``.

    Args:
        teachers: frozen teachers by store name (only those of the bank are run).
        images: uint8 ``[n, T, T, 3]`` of the shard's tiles.
        tile_indices: the shard's tile indices (they seed the draw).
        spec: the bank spec (``StoreSchema.bank``).
        tile_size: ``T``.
        batch_size: views per teacher forward.
        device: where views are rendered and teachers run.
    """
    params = draw_bank_params(tile_indices, spec, tile_size)
    feats = compute_bank_features(teachers, images, params, spec.crop, batch_size, device)
    return params, feats


def load_bank_teachers(
    store: Any,
    names: Sequence[str],
    weights: Mapping[str, str | None],
    tiny: bool,
    device: str,
    random_weights: bool = False,
) -> dict[str, Any]:
    """Build the teachers that filled the store and check their specs against it.

    Raises:
        TeacherSpecMismatchError: a teacher's spec differs from the one recorded in the store.
    """
    from pipelines.teachers import teacher_for_store

    return {
        name: teacher_for_store(
            store,
            name,
            weights=weights.get(name),
            tiny=tiny,
            random_weights=random_weights,
            device=device,
        )
        for name in names
    }


def _stored_names(store: Any, typed: Sequence[str]) -> tuple[str, ...]:
    """Store names of the teachers the user named (``timm:<model>`` finds ``timm:<model>:3``)."""
    from featstore.errors import MissingTeacherError
    from featstore.teacher_names import resolve_teacher_name

    try:
        return tuple(resolve_teacher_name(store.schema, name) for name in typed)
    except MissingTeacherError as err:
        raise ViewBankError(f"{err} (bank only stored teachers)") from None


def _check_store(store: Any, names: Sequence[str]) -> None:
    if not store.schema.store_pixels:
        raise ViewBankError(
            f"store {store.url!r} keeps no pixels (store_pixels=False): the bank "
            "renders views from the stored tiles; re-extract with pixels"
        )
    if not store.done().all():
        raise ViewBankError(
            f"store {store.url!r} has {int((~store.done()).sum())} tiles not "
            "done; finish (resume) the extraction before building a view bank"
        )
    unknown = sorted(set(names) - set(store.teacher_names))
    if unknown:
        raise ViewBankError(
            f"teachers {unknown} are not in {store.url!r} (it has "
            f"{list(store.teacher_names)}); bank only stored teachers"
        )


def build_view_bank(
    store_url: str,
    teacher_names: Sequence[str] | None = None,
    weights: Mapping[str, str | None] | None = None,
    tiny: bool = False,
    k: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    crop: int | None = None,
    scale_range: tuple[float, float] = SCALE_RANGE,
    flip_p: float = 0.5,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = False,
    random_weights: bool = False,
) -> str:
    """Add an exact view bank to a store whose tiles (with pixels) are written; resumable.

    Re-running with the same arguments skips bank shards already done; other bank parameters
    raise ``FingerprintMismatchError`` unless ``overwrite``. The store's fingerprint changes
    (the bank is part of the schema).

    Args:
        store_url: the store.
        teacher_names: teachers to bank (default: every teacher of the store); stored names or
            the names typed at extraction (see ``featstore.teacher_names``).
        weights: per-teacher weights, as given to the extraction (keyed like teacher_names).
        tiny: tiny random teachers (tests), as given to the extraction.
        k: views per tile.
        seed: seed of the view draws.
        batch_size: views per teacher forward.
        device: where views are rendered and teachers run.
        crop: view side ``V`` (default: the store's ``base_size``, the trainer's crop).
        scale_range: zoom range of the official draw.
        flip_p: h-flip probability.
        overwrite: replace an existing bank with other parameters.
        threads: torch intra-op threads (fixed for reproducible CPU numerics).
        progress: show a progress bar.
        random_weights: accept random init for full-size teachers without weights, as the
            extraction did (``--random-weights``).

    Returns:
        The store URL.
    """
    store = open_store(store_url)
    names = _stored_names(store, teacher_names) if teacher_names else store.teacher_names
    given = dict(weights or {})
    by_name = dict(zip(_stored_names(store, list(given)), given.values(), strict=True))
    _check_store(store, names)
    spec = BankSpec(
        k=k,
        seed=seed,
        crop=store.schema.base_size if crop is None else crop,
        scale_range=scale_range,
        flip_p=flip_p,
        teachers=() if tuple(names) == store.teacher_names else names,
    )
    # fixed thread counts keep CPU numerics reproducible on resume; None: leave torch as it is
    with torch_threads(threads) if threads else contextlib.nullcontext():
        teachers = load_bank_teachers(store, names, by_name, tiny, device, random_weights)
        writer = add_bank(store_url, spec, overwrite=overwrite)
        _write_pending(store, writer, teachers, batch_size, device, progress)
    writer.finalize()
    return str(store_url)


def _write_pending(
    store: Any,
    writer: BankWriter,
    teachers: Mapping[str, Any],
    batch_size: int,
    device: str,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    shards = writer.pending_shards()
    total = sum(len(writer.shard_tiles(s)) for s in shards)
    with tqdm(total=total, unit="tile", desc="view bank", disable=not progress) as bar:
        for s in shards:
            indices = list(writer.shard_tiles(s))
            images = np.stack([store.read_image(i) for i in indices])
            params, feats = bank_shard_arrays(
                teachers, images, indices, writer.spec, store.schema.tile_size, batch_size, device
            )
            writer.write_bank_shard(s, params, feats)
            bar.update(len(indices))


__all__ = [
    "ViewBankError",
    "bank_shard_arrays",
    "build_view_bank",
    "compute_bank_features",
    "load_bank_teachers",
]
