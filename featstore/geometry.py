"""Where a cached level's tokens sit in tile pixels (the contract's coordinate convention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featstore.schema import LevelSpec, TeacherSpec


@dataclass(frozen=True)
class LevelGeometry:
    """Geometry of one cached level of one teacher.

    The tile (``tile_size`` px, h-flipped first when ``level.flipped``) is rendered at ``render``
    px, padded right/bottom to ``canvas`` px, resized to the teacher input ``input_px`` and
    encoded into a ``grid x grid`` token map, ``stride`` input px per token. Token ``j``'s centre
    is at input px ``(j + 0.5) * stride``.
    """

    tile_size: int
    level: LevelSpec
    render: int
    canvas: int
    input_px: int
    stride: int
    grid: int

    @classmethod
    def from_specs(
        cls,
        tile_size: int,
        base_size: int,
        level: LevelSpec,
        teacher: TeacherSpec,
        grid: int | None = None,
    ) -> LevelGeometry:
        """Build from the store's sizes and specs (``grid`` defaults to the spec's rule)."""
        canvas = level.canvas_px(base_size)
        if grid is None:
            grid = teacher.grid_size(canvas, base_size)
        return cls(
            tile_size=int(tile_size),
            level=level,
            render=level.render_px(base_size),
            canvas=canvas,
            input_px=teacher.input_px(canvas, base_size),
            stride=int(teacher.stride),
            grid=int(grid),
        )

    @property
    def flipped(self) -> bool:
        """Whether the level was computed on the h-flipped tile."""
        return self.level.flipped

    @property
    def tokens_per_tile_px(self) -> float:
        """Token units per tile pixel."""
        return self.render / self.tile_size * self.input_px / self.canvas / self.stride

    @property
    def valid_tokens(self) -> float:
        """Token coordinate of the tile's right/bottom edge: beyond it lies canvas padding."""
        return self.tile_size * self.tokens_per_tile_px

    def tile_to_token(self, y: Any, x: Any) -> tuple[Any, Any]:
        """Map tile px ``(y, x)`` to continuous token-index coordinates ``(ty, tx)``.

        Token ``j`` has coordinate ``j`` at its centre. Works on floats, numpy arrays and torch
        tensors alike (plain arithmetic only). Flipped levels first map ``x -> tile_size - x``.
        """
        f = self.tokens_per_tile_px
        if self.level.flipped:
            x = self.tile_size - x
        return y * f - 0.5, x * f - 0.5

    def token_to_tile(self, ty: Any, tx: Any) -> tuple[Any, Any]:
        """Inverse of ``tile_to_token``."""
        f = self.tokens_per_tile_px
        y, x = (ty + 0.5) / f, (tx + 0.5) / f
        if self.level.flipped:
            x = self.tile_size - x
        return y, x


__all__ = ["LevelGeometry"]
