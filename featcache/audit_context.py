"""What every batch of the fidelity audit needs, and the checks that need nothing else.

``AuditContext``: the store, the teacher, the sizes, the cache configurations and the
comparison grids of one audit (``featcache.audit.audit_store`` builds it). The checks here are
config-free: identity views whose cached target must equal the online one (to codec precision),
and the exact view bank on its own views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featcache.audit_grid import (
    CompareGrid,
    bank_fidelity,
    grid_valid,
    make_grid,
    online_on,
    sample_on,
)
from featcache.audit_result import Check
from featstore import LevelGeometry, LevelSpec
from featstore.codecs import FeatureCodec
from featviews.draw import ViewParams
from featviews.geometry import ViewGeometry
from featviews.render import render_views

# A cache configuration: (levels, scale blend width, candidate codec label or None for the
# store's own codec).
Config = tuple[tuple[LevelSpec, ...], float, str | None]


@dataclass
class AuditContext:
    """What every batch needs: the store, the teacher and the sizes."""

    store: Any
    name: str
    teacher: Any
    device: torch.device
    tile: int
    base: int
    crop: int
    n: int
    configs: dict[str, Config]
    grid: CompareGrid
    other: CompareGrid
    codecs: dict[str, FeatureCodec] = field(default_factory=dict)  # candidate codecs by label
    geoms: dict[str, LevelGeometry] = field(default_factory=dict)

    def geom(self, key: str) -> LevelGeometry:
        if key not in self.geoms:
            self.geoms[key] = self.store.level_geometry(self.name, key)
        return self.geoms[key]

    def online(self, views: torch.Tensor, grid: CompareGrid | None = None) -> torch.Tensor:
        """Teacher on ``[B, 3, V, V]`` views, expressed on ``grid`` (default: the audit's)."""
        return online_on(grid or self.grid, self.teacher(views), self.teacher)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine ``[...]`` of ``[..., C]`` tensors (0 where either is all zero)."""
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return num / den.clamp(min=1e-12)


def tile_images(ctx: AuditContext, idx: Sequence[int]) -> torch.Tensor:
    """The stored pixels of tiles ``idx`` as uint8 ``[B, 3, T, T]`` on the audit's device."""
    arr = np.stack([ctx.store.read_image(int(i)) for i in idx])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(ctx.device)


def _identity_cases(ctx: AuditContext) -> list[tuple[str, str, ViewParams, str]]:
    """(label, level key, view, note): views whose cached target must equal the online one."""
    s2 = LevelSpec(2.0).render_px(ctx.base)
    exact, mirrored = (
        "must be 1.0 (to codec precision)",
        "reference: below 1 unless the teacher is flip-invariant",
    )
    zoom = (
        "1.0 when tokens depend only on nearby pixels at a size-independent phase; "
        "below 1: context cut by the crop, or size-dependent (TF SAME) padding"
    )
    return [
        (
            "identity view vs s1.00",
            "s1.00",
            ViewParams(ctx.base, 0, 0, False, ctx.tile, ctx.base),
            exact,
        ),
        (
            "flipped identity vs s1.00f",
            "s1.00f",
            ViewParams(ctx.base, 0, 0, True, ctx.tile, ctx.base),
            exact,
        ),
        (
            "flipped identity vs s1.00 (mirrored read)",
            "s1.00",
            ViewParams(ctx.base, 0, 0, True, ctx.tile, ctx.base),
            mirrored,
        ),
        (
            f"zoom identity (S={s2}, origin crop) vs s2.00",
            "s2.00",
            ViewParams(s2, 0, 0, False, ctx.tile, ctx.base),
            zoom,
        ),
    ]


def identity_checks(ctx: AuditContext, tiles: Sequence[int]) -> list[Check]:
    """Identity, flipped identity (and the mirrored read) and zoom identity checks."""
    keys = {lv.key for lv in ctx.store.levels(ctx.name)}
    checks = []
    for label, key, p, note in _identity_cases(ctx):
        if key not in keys:
            checks.append(Check(label, float("nan"), 0, note=f"store has no level {key}"))
            continue
        lg = ctx.geom(key)
        # student grid: n = the level's own grid so both sides read whole tokens (the zoomed
        # view's tokens are not the level's: there, the student grid the loss reads)
        grid = make_grid(ctx.grid.kind, ctx.teacher, ctx.base, ctx.n if key == "s2.00" else lg.grid)
        geom = ViewGeometry.from_params([p] * len(tiles), ctx.device)
        online = ctx.online(render_views(tile_images(ctx, tiles), geom), grid)
        grids = [torch.from_numpy(ctx.store.read(ctx.name, int(i), key)) for i in tiles]
        target, tv = sample_on(grid, grids, [lg] * len(tiles), geom)
        w = tv * grid_valid(grid, geom)
        cos = cosine(target, online)
        checks.append(Check(label, _wmean(cos, w), int(w.sum()), note=note))
        if key == "s2.00":
            c = grid.centres(ctx.device) < ctx.base / 2  # away from the crop's right/bottom
            quarter = w * (c.view(1, -1, 1) & c.view(1, 1, -1))
            checks.append(
                Check(
                    "  same, top-left quarter of the view",
                    _wmean(cos, quarter),
                    int(quarter.sum()),
                    note="context effects are smaller here",
                )
            )
    return checks


def _wmean(cos: torch.Tensor, w: torch.Tensor) -> float:
    total = float(w.sum())
    return float((cos * w).sum()) / total if total else float("nan")


def bank_checks(
    ctx: AuditContext, tiles: Sequence[int], max_views: int, batch_size: int
) -> list[Check]:
    """The exact view bank on its own views (empty when the store has no bank of the teacher)."""
    store = ctx.store
    if max_views <= 0 or not store.has_bank or ctx.name not in store.bank.teachers:
        return []
    banked = [int(i) for i in tiles if store.bank.done()[int(i)]]
    res = bank_fidelity(
        store, ctx.name, ctx.teacher, banked, ctx.n, max_views, batch_size, ctx.device
    )
    note = "must be 1.0 (to codec precision)"
    return [
        Check(f"bank grid vs teacher on the bank view ({g} grid)", *res[g], note=note)
        for g in (ctx.grid.kind, ctx.other.kind)
    ]


__all__ = ["AuditContext", "Config", "bank_checks", "cosine", "identity_checks", "tile_images"]
