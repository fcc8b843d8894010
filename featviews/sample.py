"""Distillation targets sampled from cached token grids at the student's token grid.

Student token ``(i, j)`` of an ``n x n`` grid over a ``V`` px view has its centre at view px
``((i + 0.5) V / n, (j + 0.5) V / n)``; it maps to tile px through the view geometry (flip
included), to a continuous token coordinate of the cached level (``LevelGeometry.tile_to_token``)
and is read bilinearly with border clamping. Coordinates are computed in float64 and snapped to
integers within ``1e-6`` token so that identity and grid-aligned views read cached tokens exactly.

Sampling is a direct bilinear gather on channel-last grids (``[N, C]`` rows): it is the same
arithmetic as ``grid_sample(align_corners=False, padding_mode="border")`` in token-index space,
but needs no channel-first copy of the grids, handles per-sample grid sizes in one pass over a
concatenated table, and gives exact weights 0/1 at integer coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from featstore.geometry import LevelGeometry
from featviews.geometry import ViewGeometry, token_centres, view_to_tile

_SNAP = 1e-6


def _snap(u: torch.Tensor) -> torch.Tensor:
    r = torch.round(u)
    return torch.where((u - r).abs() < _SNAP, r, u)


def _bilinear_gather(
    table: torch.Tensor, base: torch.Tensor, gsize: torch.Tensor, uy: torch.Tensor, ux: torch.Tensor
) -> torch.Tensor:
    """Bilinear read of per-sample grids stored as rows of ``table``.

    Args:
        table: ``[N, C]``, sample ``b``'s grid rows start at ``base[b]``, row-major ``g_b x g_b``.
        base: int64 ``[B]`` first row of each sample.
        gsize: int64 ``[B]`` grid side of each sample.
        uy: float64 ``[B, n, m]`` token row coordinates (token centre = integer).
        ux: float64 ``[B, n, m]`` token column coordinates.

    Returns:
        ``[B, n, m, C]`` in ``table``'s dtype, border-clamped.
    """
    bsz, n, m = uy.shape
    g = gsize.view(-1, 1, 1)
    gmax = (g - 1).to(uy.dtype)
    uy = _snap(torch.minimum(uy.clamp(min=0), gmax))
    ux = _snap(torch.minimum(ux.clamp(min=0), gmax))
    y0 = torch.minimum(uy.floor().long(), (g - 2).clamp(min=0))
    x0 = torch.minimum(ux.floor().long(), (g - 2).clamp(min=0))
    fy = (uy - y0).to(table.dtype).unsqueeze(-1)
    fx = (ux - x0).to(table.dtype).unsqueeze(-1)
    y1, x1 = torch.minimum(y0 + 1, g - 1), torch.minimum(x0 + 1, g - 1)
    rows = base.view(-1, 1, 1)

    def read(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        idx = (rows + yy * g + xx).reshape(-1)
        return table.index_select(0, idx).view(bsz, n, m, -1)

    # accumulate corner by corner: peak memory is two [B, n, m, C] tensors
    out = read(y0, x0) * ((1 - fy) * (1 - fx))
    out.addcmul_(read(y0, x1), (1 - fy) * fx)
    out.addcmul_(read(y1, x0), fy * (1 - fx))
    out.addcmul_(read(y1, x1), fy * fx)
    return out


def _as_table(grids: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate per-sample ``[g, g, C]`` grids into ``[N, C]`` rows (no copy if stacked)."""
    if isinstance(grids, torch.Tensor):
        if grids.dim() != 4 or grids.shape[1] != grids.shape[2]:
            raise ValueError(f"grids must be [B, g, g, C], got {tuple(grids.shape)}")
        return grids.reshape(-1, grids.shape[-1]), [int(grids.shape[1])] * grids.shape[0]
    sides = []
    for k, gr in enumerate(grids):
        if gr.dim() != 3 or gr.shape[0] != gr.shape[1]:
            raise ValueError(f"grids[{k}] must be [g, g, C], got {tuple(gr.shape)}")
        sides.append(int(gr.shape[0]))
    if len({int(gr.shape[-1]) for gr in grids}) > 1:
        raise ValueError("all grids of one teacher must have the same channel count")
    return torch.cat([gr.reshape(-1, gr.shape[-1]) for gr in grids]), sides


def _group_by_level(level_geoms: Sequence[LevelGeometry]) -> dict[LevelGeometry, list[int]]:
    groups: dict[LevelGeometry, list[int]] = {}
    for b, lg in enumerate(level_geoms):
        groups.setdefault(lg, []).append(b)
    return groups


def sample_targets(
    grids: torch.Tensor | Sequence[torch.Tensor],
    level_geoms: LevelGeometry | Sequence[LevelGeometry],
    geom: ViewGeometry,
    n: int,
    centres: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample cached grids at the student token centres of each view.

    Args:
        grids: per-sample cached grids ``[g_b, g_b, C]`` (list) or a stacked ``[B, g, g, C]``.
        level_geoms: the level each grid was cached at (one per sample, or one for all).
        geom: the views' geometry (on the target device).
        n: student tokens per side.
        centres: ``[n]`` view-px sample positions per axis; default the student token centres
            ``(i + 0.5) * V / n`` (the audit passes a teacher's own token centres).

    Returns:
        ``(targets float32 [B, n, n, C], valid float32 [B, n, n])``; valid is 1 where the token
        centre lies in the rendered (non-padding) part of the view.
    """
    bsz = len(geom)
    if isinstance(level_geoms, LevelGeometry):
        level_geoms = [level_geoms] * bsz
    table, sides = _as_table(grids)
    if len(sides) != bsz or len(level_geoms) != bsz:
        raise ValueError(
            f"sample_targets: {len(sides)} grids and {len(level_geoms)} levels for "
            f"a batch of {bsz} views; pass one of each per sample"
        )
    for b, (side, lg) in enumerate(zip(sides, level_geoms, strict=True)):
        if side != lg.grid:
            raise ValueError(
                f"grids[{b}] is {side}x{side} but its level {lg.level.key} expects "
                f"{lg.grid}x{lg.grid}; pass the grid read for that level"
            )
        if lg.tile_size != geom.tile:
            raise ValueError(
                f"level {lg.level.key} has tile_size {lg.tile_size} but the views "
                f"were drawn for tile size {geom.tile}"
            )
    device = geom.device
    table = table.to(device=device, dtype=torch.float32)
    c = token_centres(geom.crop, n, device=device) if centres is None else centres.to(device)
    ty, tx, valid = view_to_tile(geom, c.view(1, n, 1), c.view(1, 1, n))
    uy, ux = torch.empty_like(ty), torch.empty_like(tx)
    # one call per distinct level (a handful), not per sample
    for lg, idx in _group_by_level(level_geoms).items():
        sel = torch.tensor(idx, device=device)
        gy, gx = lg.tile_to_token(ty.index_select(0, sel), tx.index_select(0, sel))
        uy.index_copy_(0, sel, gy)
        ux.index_copy_(0, sel, gx)
    gsize = torch.tensor(sides, device=device, dtype=torch.int64)
    base = torch.cumsum(gsize * gsize, 0) - gsize * gsize
    targets = _bilinear_gather(table, base, gsize, uy, ux)
    return targets, valid.to(torch.float32)


def mix_levels(
    targets: torch.Tensor,
    extras: Sequence[Sequence[tuple[Any, LevelGeometry, float]]],
    sample: Callable[[list[Any], list[LevelGeometry], ViewGeometry], torch.Tensor],
    geom: ViewGeometry,
) -> torch.Tensor:
    """Mix further cached levels into each sample's targets (``featviews.levels.blend_levels``).

    ``t[b] = (1 - sum_k w_bk) * t[b] + sum_k w_bk * sample(grid_bk)``; samples without extras
    are left bit-exact.

    Args:
        targets: ``[B, n, m, C]`` from each sample's nearest level (updated in place).
        extras: per sample, ``(grid, level geometry, weight)`` of each further level.
        sample: reads grids at the views' points: ``(grids, level geoms, sub-batch geometry)
            -> [K, n, m, C]`` (``sample_targets`` at the wanted grid).
        geom: geometry of the whole batch.

    Returns:
        ``targets``.
    """
    rounds = max((len(e) for e in extras), default=0)
    if rounds == 0:
        return targets
    own = [1.0 - sum(w for _, _, w in e) for e in extras]
    targets.mul_(torch.tensor(own, dtype=targets.dtype, device=targets.device).view(-1, 1, 1, 1))
    for r in range(rounds):  # one batched read per rank of extra level, not per sample
        sel = [b for b, e in enumerate(extras) if len(e) > r]
        got = sample(
            [extras[b][r][0] for b in sel], [extras[b][r][1] for b in sel], geom.select(sel)
        )
        w = torch.tensor(
            [extras[b][r][2] for b in sel], dtype=targets.dtype, device=targets.device
        ).view(-1, 1, 1, 1)
        idx = torch.tensor(sel, dtype=torch.int64, device=targets.device)
        targets.index_add_(0, idx, got.to(targets.dtype) * w)
    return targets


def _cell_overlap(lo: torch.Tensor, length: torch.Tensor, view: int, n: int) -> torch.Tensor:
    """Fraction ``[B, n]`` of each token cell ``[i V/n, (i+1) V/n)`` inside ``[lo, lo+length)``."""
    edges = torch.arange(n + 1, device=lo.device, dtype=torch.float64) * (view / n)
    a0, a1 = edges[:-1].view(1, n), edges[1:].view(1, n)
    b0 = lo.to(torch.float64).view(-1, 1)
    b1 = b0 + length.to(torch.float64).view(-1, 1)
    inter = (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0)
    return inter / (view / n)


def cutmix_weights(boxes: torch.Tensor, view: int, n: int) -> torch.Tensor:
    """Float64 ``[B, n, n]``: area fraction of each token cell inside the sample's CutMix box."""
    wy = _cell_overlap(boxes[:, 0], boxes[:, 2], view, n)
    wx = _cell_overlap(boxes[:, 1], boxes[:, 3], view, n)
    return wy.unsqueeze(2) * wx.unsqueeze(1)


def cutmix_targets(
    targets: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor, view: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix targets like the pixels: ``(1 - a) * own + a * partner``, partner = batch reversed.

    Args:
        targets: ``[B, n, n, C]``.
        valid: ``[B, n, n]``.
        boxes: int ``[B, 4]`` boxes ``(y, x, h, w)`` in view px (``h = w = 0``: no CutMix).
        view: view side ``V``.

    Returns:
        Mixed ``(targets, valid)``; ``a`` is the exact area fraction of each token cell in the box.
    """
    n = targets.shape[1]
    a = cutmix_weights(boxes.to(targets.device), view, n)
    # (1 - a) * own + a * partner (not lerp) keeps a = 0 / 1 tokens bit-exact
    at = a.to(targets.dtype).unsqueeze(-1)
    mixed = targets * (1 - at) + targets.flip(0) * at
    av = a.to(valid.dtype)
    return mixed, valid * (1 - av) + valid.flip(0) * av


def resample_to_student(
    grid: torch.Tensor, input_px: int, stride: int, view: int, n: int
) -> torch.Tensor:
    """Online mode: resample a teacher's grid computed on the whole view onto the student grid.

    The teacher saw the ``V`` px view resized to ``input_px``; its token ``j`` is centred at input
    px ``(j + 0.5) * stride``. Student centre ``(i + 0.5) V / n`` is at input px
    ``(i + 0.5) * input_px / n``, i.e. token coordinate ``(i + 0.5) * input_px / (n * stride) -
    0.5``; read bilinearly with border clamping (identity when ``input_px / stride == n == g``).

    Args:
        grid: ``[B, g, g, C]`` teacher tokens.
        input_px: teacher input side in px.
        stride: teacher input px per token.
        view: view side ``V`` (cancels; kept to mirror ``sample_targets``).
        n: student tokens per side.

    Returns:
        ``[B, n, n, C]`` float32.
    """
    if view < 1 or input_px < 1 or stride < 1:
        raise ValueError("resample_to_student: view, input_px and stride must be >= 1")
    bsz, g = grid.shape[0], grid.shape[1]
    u = (torch.arange(n, device=grid.device, dtype=torch.float64) + 0.5) * (
        input_px / (n * stride)
    ) - 0.5
    uy = u.view(1, n, 1).expand(bsz, n, n)
    ux = u.view(1, 1, n).expand(bsz, n, n)
    gsize = torch.full((bsz,), g, device=grid.device, dtype=torch.int64)
    base = torch.arange(bsz, device=grid.device, dtype=torch.int64) * g * g
    table = grid.reshape(-1, grid.shape[-1]).to(torch.float32)
    return _bilinear_gather(table, base, gsize, uy, ux)


__all__ = [
    "cutmix_targets",
    "cutmix_weights",
    "mix_levels",
    "resample_to_student",
    "sample_targets",
]
