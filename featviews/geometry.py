"""A batch of drawn views on the device, and the map from view px to tile px.

View px ``(vy, vx)`` maps to zoomed px ``(vy + oy, vx' + ox)`` with ``vx' = V - vx`` when
flipped, and to tile px by ``T / S`` (docs/architecture.md, "Coordinates").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from featviews.draw import ViewParams


@dataclass
class ViewGeometry:
    """A batch of views as device tensors ``[B]`` (``S``, ``oy``, ``ox`` int64, ``flip`` bool)."""

    size: torch.Tensor
    oy: torch.Tensor
    ox: torch.Tensor
    flip: torch.Tensor
    tile: int
    crop: int

    @classmethod
    def from_params(
        cls, params: Sequence[ViewParams], device: torch.device | str | None = None
    ) -> ViewGeometry:
        """Collate per-item ``ViewParams`` (all with the same tile and crop size)."""
        if not params:
            raise ValueError("ViewGeometry.from_params needs at least one ViewParams")
        tiles, crops = {p.tile for p in params}, {p.crop for p in params}
        if len(tiles) != 1 or len(crops) != 1:
            raise ValueError(
                f"a batch must share tile and crop size, got tiles {sorted(tiles)} "
                f"crops {sorted(crops)}; resize tiles when building the store"
            )
        ints = torch.tensor([[p.size, p.oy, p.ox, int(p.flip)] for p in params], dtype=torch.int64)
        ints = ints.to(device) if device is not None else ints
        return cls(ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3].bool(), tiles.pop(), crops.pop())

    def __len__(self) -> int:
        return int(self.size.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.size.device

    def to(self, device: torch.device | str) -> ViewGeometry:
        """Copy to ``device``."""
        return ViewGeometry(
            self.size.to(device),
            self.oy.to(device),
            self.ox.to(device),
            self.flip.to(device),
            self.tile,
            self.crop,
        )

    def select(self, index: Sequence[int] | torch.Tensor) -> ViewGeometry:
        """The views at ``index`` (a sub-batch)."""
        idx = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        return ViewGeometry(
            self.size[idx], self.oy[idx], self.ox[idx], self.flip[idx], self.tile, self.crop
        )

    def per_sample(self, ndim: int) -> tuple[torch.Tensor, ...]:
        """``(S, oy, ox, flip)`` viewed as ``[B, 1, ..., 1]`` with ``ndim`` trailing dims."""
        shape = (-1,) + (1,) * ndim
        return tuple(t.view(shape) for t in (self.size, self.oy, self.ox, self.flip))


def view_to_tile(
    geom: ViewGeometry, vy: torch.Tensor, vx: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map continuous view px to tile px, with validity (not in padding).

    Args:
        geom: the batch geometry.
        vy: view rows, shape ``[B or 1, *]`` (broadcast against the batch).
        vx: view columns, same rank as ``vy``.
        dtype: floating dtype of the computation (float64 keeps identity views exact).

    Returns:
        ``(ty, tx, valid)`` broadcast to ``[B, *]``; ``valid`` is bool, true iff the zoomed point
        lies in ``[0, S)^2``.
    """
    if vy.dim() != vx.dim() or vy.dim() < 1:
        raise ValueError("view_to_tile: vy and vx need the same rank >= 1 with a batch dim first")
    size, oy, ox, flip = (
        t.to(dtype) if t.dtype != torch.bool else t for t in geom.per_sample(vy.dim() - 1)
    )
    vy, vx = vy.to(dtype), vx.to(dtype)
    zy = vy + oy
    zx = torch.where(flip, geom.crop - vx, vx) + ox
    valid = (zy >= 0) & (zy < size) & (zx >= 0) & (zx < size)
    scale = geom.tile / size
    ty, tx = zy * scale, zx * scale
    ty, tx = torch.broadcast_tensors(ty, tx)
    return ty, tx, valid.expand_as(ty)


def token_centres(
    view_size: int, n: int, device: Any = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Centres ``(i + 0.5) * V / n`` of an ``n``-token student grid over a ``V`` px view."""
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) * (view_size / n)


def token_valid(geom: ViewGeometry, n: int) -> torch.Tensor:
    """Float ``[B, n, n]``: 1 where the student token centre is inside the rendered area."""
    c = token_centres(geom.crop, n, device=geom.device)
    _, _, valid = view_to_tile(geom, c.view(1, n, 1), c.view(1, 1, n))
    return valid.to(torch.float32)


__all__ = ["ViewGeometry", "token_centres", "token_valid", "view_to_tile"]
