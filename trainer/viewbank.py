"""Exact view bank in training (``target_mode="view_bank"``): views and targets from the bank.

A store with a bank (``featstore.bank``) holds K pre-drawn views per tile and each teacher's own
output grid on each view. An item either takes a bank view (probability ``p_bank``; slot uniform
over K) or a freshly drawn warped view whose targets come from the cached levels as usual. A
bank grid becomes a student-grid target with ``trainer.targets.resample_to_student``, the very
function online mode applies to the teacher run on the view, so bank targets equal online targets
up to the storage codec (fp16: ``2**-11`` relative). Photometric augmentation and CutMix go on top
exactly as in the cached mode (teachers see un-jittered views there too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec, TeacherSpec
from trainer.geometry import ViewGeometry, ViewParams, choose_level, draw_view, token_valid
from trainer.targets import cutmix_targets, resample_to_student, sample_targets

NO_SLOT = -1


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


class BankTargets:
    """Target provider of ``view_bank`` mode (same call signature as ``step.CachedTargets``).

    Batches carry ``bank_slot`` (int64 ``[B]``, -1 = warped view), ``grids[name]`` (one
    ``[g, g, C]`` tensor per item: the bank grid for banked teachers of bank views, else the
    cached level grid) and ``view`` (``ViewParams`` with ``levels`` of the level-read teachers).

    Args:
        level_geoms: ``{(teacher, level key): LevelGeometry}`` of the store.
        specs: teacher specs by name (store schema).
        bank_teachers: teachers that have a bank.
        base_size: the store's ``base_size``.
    """

    def __init__(
        self,
        level_geoms: Mapping[tuple[str, str], LevelGeometry],
        specs: Mapping[str, TeacherSpec],
        bank_teachers: Sequence[str],
        base_size: int,
    ) -> None:
        self.level_geoms = dict(level_geoms)
        self.specs = dict(specs)
        self.bank_teachers = set(bank_teachers)
        self.base_size = int(base_size)

    def targets(
        self, name: str, n: int, batch: Mapping[str, Any], geom: ViewGeometry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets [B, n, n, C], valid [B, n, n])`` of one batch before CutMix."""
        dev = geom.device
        slots = torch.as_tensor(batch["bank_slot"]).to(dev)
        banked = slots >= 0 if name in self.bank_teachers else torch.zeros_like(slots).bool()
        grids = [g.to(dev, non_blocking=True) for g in batch["grids"][name]]
        out: torch.Tensor | None = None
        for mask, fill in ((banked, self._from_bank), (~banked, self._from_levels)):
            idx = torch.nonzero(mask).flatten()
            if idx.numel() == 0:
                continue
            part = fill(
                name,
                n,
                [grids[i] for i in idx.tolist()],
                [batch["view"][i] for i in idx.tolist()],
                geom.select(idx),
            )
            if out is None:
                out = part.new_empty((len(geom), *part.shape[1:]))
            out[idx] = part
        if out is None:
            raise ValueError("BankTargets: empty batch")
        return out, token_valid(geom, n)

    def _from_bank(
        self,
        name: str,
        n: int,
        grids: list[torch.Tensor],
        views: list[ViewParams],
        geom: ViewGeometry,
    ) -> torch.Tensor:
        return bank_targets_to_student(
            torch.stack(grids).float(), self.specs[name], geom.crop, n, self.base_size
        )

    def _from_levels(
        self,
        name: str,
        n: int,
        grids: list[torch.Tensor],
        views: list[ViewParams],
        geom: ViewGeometry,
    ) -> torch.Tensor:
        geoms = [self.level_geoms[(name, v.levels[name].key)] for v in views]
        return sample_targets(grids, geoms, geom, n)[0]

    def __call__(
        self,
        name: str,
        n: int,
        views: Any,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_l, v_l = self.targets(name, n, batch_l, views.geom_l)
        if batch_u is None or views.geom_u is None or views.boxes is None:
            return t_l, v_l
        t_u, v_u = self.targets(name, n, batch_u, views.geom_u)
        t_u, v_u = cutmix_targets(t_u, v_u, views.boxes, views.geom_u.crop)
        return torch.cat([t_l, t_u]), torch.cat([v_l, v_u])


def bank_reuse(k: int, n_tiles: int, iterations: int, batch: int, p_bank: float = 1.0) -> float:
    """Expected uses of each bank view over a run: ``iterations * batch * p_bank / (n_tiles * k)``.

    E.g. 118 passes per tile with K = 8 views: each view is seen about 15 times.
    """
    if min(k, n_tiles) < 1:
        raise ValueError(f"bank_reuse needs k >= 1 and n_tiles >= 1, got k={k}, n_tiles={n_tiles}")
    return iterations * batch * p_bank / (n_tiles * k)


__all__ = [
    "NO_SLOT",
    "BankTargets",
    "bank_reuse",
    "bank_targets_to_student",
    "bank_view",
    "draw_bank_item",
    "load_bank_targets",
]
