"""The one renderer of views: extraction's level canvases, the bank's views, the trainer's views.

Every view of the contract (``featviews.draw``) is rendered here, with two batched matrix
products per batch, ``out = Wy @ tile @ Wx^T``: ``Wy``/``Wx`` ``[B, V, T]`` hold the per-sample
separable weights of ``F.interpolate(bilinear, align_corners=False, antialias=True)`` to ``S``
restricted to the crop rows/columns, zero in padding, with the flip folded into ``Wx``. This is
the exact antialiased resize at every zoom (a triangle filter widened by ``T / S`` when
shrinking, plain bilinear when enlarging), so a view never aliases, and since extraction, the
view bank and the trainer all call it, a view drawn at a cached render size shows the teacher
exactly the pixels the cached level was computed from. With TF32 matmuls enabled globally the
render error grows to ~1e-3 (a quarter of a uint8 level).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from featstore.constants import IGNORE_INDEX
from featstore.schema import LevelSpec
from featviews.draw import ViewParams
from featviews.geometry import ViewGeometry


def _zoomed_index(geom: ViewGeometry, columns: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoomed px index ``[B, V]`` of each view row (or column) and whether it is not padding."""
    v = geom.crop
    r = torch.arange(v, device=geom.device)
    if columns:
        r = torch.where(geom.flip.view(-1, 1), v - 1 - r, r)
        z = r + geom.ox.view(-1, 1)
    else:
        z = r.view(1, -1) + geom.oy.view(-1, 1)
    return z, z < geom.size.view(-1, 1)


def _resize_weights(geom: ViewGeometry, columns: bool) -> torch.Tensor:
    """Float32 ``[B, V, T]`` antialiased-bilinear weights of the view rows (or columns).

    Output index ``z`` of a resize ``T -> S`` has its centre at input px ``(z + 0.5) T / S``; the
    triangle filter has half-width ``max(1, T / S)`` input px. The distance is formed from exact
    integers, ``((2j + 1) S - (2z + 1) T) / (2 max(S, T))``, so float32 keeps it to one rounding.
    """
    t = geom.tile
    z, inside = _zoomed_index(geom, columns)
    size = geom.size.view(-1, 1, 1).to(torch.float32)
    j2 = (2 * torch.arange(t, device=geom.device) + 1).to(torch.float32).view(1, 1, -1)
    z2 = (2 * z + 1).to(torch.float32).unsqueeze(-1)
    dist = (j2 * size - z2 * t) / (2 * torch.clamp(size, min=t))
    w = (1 - dist.abs()).clamp_(min=0)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return w * inside.unsqueeze(-1)


def render_views(images: torch.Tensor, geom: ViewGeometry) -> torch.Tensor:
    """Render the views of a batch of tiles.

    Args:
        images: uint8 ``[B, 3, T, T]`` tiles (on the training device).
        geom: the views' geometry (same device).

    Returns:
        float32 ``[B, 3, V, V]`` in ``[0, 1]``, black (0) in padding.
    """
    if images.dim() != 4 or images.shape[-1] != geom.tile or images.shape[-2] != geom.tile:
        raise ValueError(
            f"render_views: images must be [B, C, {geom.tile}, {geom.tile}], got "
            f"{tuple(images.shape)}"
        )
    wy = _resize_weights(geom, columns=False) * (1.0 / 255.0)
    wx = _resize_weights(geom, columns=True)
    x = images.to(torch.float32)
    out = torch.matmul(wy.unsqueeze(1), x)
    out = torch.matmul(out, wx.transpose(1, 2).unsqueeze(1))
    return out.clamp_(0, 1)


def _nearest_index(geom: ViewGeometry, columns: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile px ``floor((z + 0.5) T / S)`` of each view row/column (integer arithmetic)."""
    z, inside = _zoomed_index(geom, columns)
    size = geom.size.view(-1, 1)
    idx = ((2 * z + 1) * geom.tile) // (2 * size)
    return idx.clamp(0, geom.tile - 1), inside


def pixel_valid(geom: ViewGeometry) -> torch.Tensor:
    """Bool ``[B, V, V]``: true where the view pixel shows the tile (false in padding)."""
    _, iy = _zoomed_index(geom, columns=False)
    _, ix = _zoomed_index(geom, columns=True)
    return iy.unsqueeze(2) & ix.unsqueeze(1)


def render_masks(
    masks: torch.Tensor, geom: ViewGeometry, pad_value: int = IGNORE_INDEX
) -> torch.Tensor:
    """Render label masks with nearest sampling (pixel containing the view pixel's centre).

    Args:
        masks: uint8 ``[B, T, T]``.
        geom: the views' geometry.
        pad_value: label written in padding (255 = ignore for labeled views; for unlabeled views
            render a zero mask with 255 to get the ignore mask of the padding).

    Returns:
        int64 ``[B, V, V]``.
    """
    iy, vy = _nearest_index(geom, columns=False)
    ix, vx = _nearest_index(geom, columns=True)
    b = torch.arange(masks.shape[0], device=masks.device).view(-1, 1, 1)
    out = masks[b, iy.unsqueeze(2), ix.unsqueeze(1)].long()
    return out.masked_fill_(~(vy.unsqueeze(2) & vx.unsqueeze(1)), pad_value)


def render_level(images: torch.Tensor, level: LevelSpec, base_size: int) -> torch.Tensor:
    """Render uint8 tiles ``[n, T, T, 3]`` as the float canvases ``[n, 3, c, c]`` of one level.

    The level's view is the whole tile at ``render = round(scale * base_size)`` px (h-flipped
    for flipped levels), placed top-left on a black ``base_size`` canvas when smaller
    (``c = max(render, base_size)``).
    """
    n, tile = images.shape[0], int(images.shape[1])
    render = level.render_px(base_size)
    view = ViewParams(render, 0, 0, bool(level.flipped), tile, render)
    geom = ViewGeometry.from_params([view] * n, images.device)
    x = render_views(images.permute(0, 3, 1, 2), geom)
    if render >= base_size:
        return x
    canvas = x.new_zeros((n, 3, base_size, base_size))
    canvas[:, :, :render, :render] = x
    return canvas


def render_tile_views(tile: Any, params: Any, crop: int) -> torch.Tensor:
    """Render views ``(S, oy, ox, flip)`` of one uint8 ``[T, T, 3]`` tile (numpy or torch).

    Returns:
        float32 ``[K, 3, V, V]`` in ``[0, 1]``, black in padding (on the tile's device).
    """
    t = torch.as_tensor(np.asarray(tile)) if not isinstance(tile, torch.Tensor) else tile
    rows = np.asarray(params, np.int64).reshape(-1, 4).tolist()
    size = int(t.shape[0])
    views: Sequence[ViewParams] = [
        ViewParams(s, oy, ox, bool(f), size, crop) for s, oy, ox, f in rows
    ]
    geom = ViewGeometry.from_params(views, t.device)
    images = t.permute(2, 0, 1).unsqueeze(0).expand(len(views), -1, -1, -1)
    return render_views(images, geom)


__all__ = ["pixel_valid", "render_level", "render_masks", "render_tile_views", "render_views"]
