"""Exact view bank: its draw rule, and how an item takes a bank view and its stored grids.

A store with a bank (``featstore.bank``) holds K pre-drawn views per tile and each teacher's own
output grid on each view. An item either takes a bank view (probability ``p_bank``; slot uniform
over K) or a freshly drawn warped view whose targets come from the cached levels as usual. A
bank grid becomes a student-grid target with ``featviews.sample.resample_to_student``, the very
function online mode applies to the teacher run on the view, so bank targets equal online targets
up to the storage codec (fp16: ``2**-11`` relative). Photometric augmentation and CutMix go on top
exactly as in the cached mode (teachers see un-jittered views there too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from featstore.schema import BankSpec, LevelSpec, TeacherSpec
from featviews.draw import ViewParams, draw_view
from featviews.levels import choose_level
from featviews.sample import resample_to_student

NO_SLOT = -1


def draw_bank_params(tile_indices: Sequence[int], spec: BankSpec, tile_size: int) -> np.ndarray:
    """Draw ``spec.k`` views per tile with the official RS-MTDF rule (numpy, torch-free).

    Same rule as ``trainer.geometry.draw_view`` without grid alignment: ``S`` uniform integer in
    ``[int(lo T), int(hi T)]`` inclusive, offsets uniform inclusive in ``[0, max(S, V) - V]``,
    flip with ``flip_p``. Tile ``i`` uses ``np.random.default_rng([seed, i])``, so the draw does
    not depend on shard layout, process or resume.

    Returns:
        int32 ``[n, K, 4]`` rows ``(S, oy, ox, flip)``.
    """
    lo, hi = spec.size_range(tile_size)
    out = np.empty((len(tile_indices), spec.k, 4), np.int32)
    for row, i in enumerate(tile_indices):
        rng = np.random.default_rng([spec.seed, int(i)])
        flip = rng.random(spec.k) < spec.flip_p
        size = rng.integers(lo, hi + 1, size=spec.k)
        span = np.maximum(size, spec.crop) - spec.crop
        oy = rng.integers(0, span + 1)  # per-element inclusive upper bound
        ox = rng.integers(0, span + 1)
        out[row] = np.stack([size, oy, ox, flip.astype(np.int64)], axis=1)
    return out


def bank_view(
    store: Any, tile_index: int, rng: np.random.Generator, p_bank: float = 1.0
) -> tuple[ViewParams, int]:
    """Draw an item's view: a bank view with probability ``p_bank``, else a warped view.

    Warped views use the bank's own draw parameters (scale range, flip probability, crop), so
    mixing changes where targets come from, not the view distribution. One ``rng.random()`` and
    then either a slot or a ``draw_view`` are consumed (deterministic per seeded generator).

    Returns:
        ``(view, slot)``; ``slot`` is ``NO_SLOT`` (-1) for a warped view. ``view.levels`` is empty.
    """
    bank = store.bank
    spec, tile = bank.spec, store.schema.tile_size
    if not 0.0 <= p_bank <= 1.0:
        raise ValueError(f"p_bank must be in [0, 1], got {p_bank}; set view_bank.p_bank")
    if rng.random() >= p_bank:
        return draw_view(rng, tile, spec.crop, spec.scale_range, spec.flip_p), NO_SLOT
    slot = int(rng.integers(0, bank.k))
    size, oy, ox, flip = (int(v) for v in bank.params(tile_index)[slot])
    return ViewParams(size, oy, ox, bool(flip), tile, spec.crop), slot


def load_bank_targets(store: Any, teacher: str, tile_index: int, slot: int) -> np.ndarray:
    """The teacher's decoded output grid float32 ``[g, g, C]`` on bank view ``slot``."""
    return store.bank.read(teacher, tile_index, slot)


def bank_targets_to_student(
    grid: torch.Tensor | np.ndarray, teacher_spec: TeacherSpec, crop: int, n: int, base_size: int
) -> torch.Tensor:
    """Resample bank grids onto the ``n x n`` student grid exactly as online mode does.

    Args:
        grid: ``[g, g, C]`` or ``[B, g, g, C]`` bank grids of one teacher.
        teacher_spec: the teacher's spec (store schema).
        crop: view side ``V``.
        n: student tokens per side (``V / 14`` for the full branch, 16 for ``clip224``).
        base_size: the store's ``base_size`` (the teacher's canvas reference).

    Returns:
        float32 ``[B, n, n, C]`` (``B = 1`` for a single grid).
    """
    g = torch.as_tensor(grid)
    if g.dim() == 3:
        g = g.unsqueeze(0)
    input_px = teacher_spec.input_px(crop, base_size)
    return resample_to_student(g, input_px, teacher_spec.stride, crop, n)


def draw_bank_item(
    store: Any,
    tile_index: int,
    rng: np.random.Generator,
    levels_by_teacher: Mapping[str, Sequence[LevelSpec]],
    p_bank: float = 1.0,
) -> tuple[ViewParams, int, dict[str, np.ndarray]]:
    """One dataset item of ``view_bank`` mode: view, slot and the grid to read per teacher.

    Banked teachers of a bank view read their bank grid; every other (teacher, item) pair reads
    the cached level nearest the view (``choose_level``), recorded in ``view.levels``.

    Returns:
        ``(view, slot, grids)``, ``grids[name]`` float32 ``[g, g, C]``.
    """
    view, slot = bank_view(store, tile_index, rng, p_bank)
    banked = set(store.bank.teachers) if slot != NO_SLOT else set()
    schema = store.schema
    levels = {
        name: choose_level(lv, view.size, view.flip, schema.tile_size, schema.base_size)
        for name, lv in levels_by_teacher.items()
        if name not in banked
    }
    grids = {
        name: (
            load_bank_targets(store, name, tile_index, slot)
            if name in banked
            else store.read_half(name, tile_index, levels[name].key)
        )
        for name in levels_by_teacher
    }
    return view.with_levels(levels), slot, grids


def bank_reuse(k: int, n_tiles: int, iterations: int, batch: int, p_bank: float = 1.0) -> float:
    """Expected uses of each bank view over a run: ``iterations * batch * p_bank / (n_tiles * k)``.

    E.g. 118 passes per tile with K = 8 views: each view is seen about 15 times.
    """
    if min(k, n_tiles) < 1:
        raise ValueError(f"bank_reuse needs k >= 1 and n_tiles >= 1, got k={k}, n_tiles={n_tiles}")
    return iterations * batch * p_bank / (n_tiles * k)


__all__ = [
    "NO_SLOT",
    "draw_bank_params",
    "bank_reuse",
    "bank_targets_to_student",
    "bank_view",
    "draw_bank_item",
    "load_bank_targets",
]
