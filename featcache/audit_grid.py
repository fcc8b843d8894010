"""Where the fidelity audit compares targets: the teacher's own token grid or the student grid.

*Teacher grid*: the tokens the teacher produces on the view itself. A teacher with stride ``s``
and input ``P`` px on a ``V`` px view has token ``j`` centred at view px ``(j + 0.5) s V / P``;
the online target is the teacher output as is (no resampling) and the cached target is read at
those same centres. This isolates what the cache changes. *Student grid*: the ``V / 14``
student tokens the loss reads; the online output is resampled onto it with
``resample_to_student`` (what online training does), so the figure also carries that resampling.

Also here: the exact view-bank check (a bank's stored grid vs the teacher run on the same view).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featstore import LevelGeometry
from featviews.bank import bank_targets_to_student
from featviews.draw import ViewParams
from featviews.geometry import ViewGeometry, token_centres, view_to_tile
from featviews.render import render_views
from featviews.sample import resample_to_student, sample_targets

GRIDS = ("teacher", "student")


@dataclass(frozen=True)
class CompareGrid:
    """An ``n x n`` grid of comparison points over a ``crop`` px view, ``pitch`` view px apart.

    Attributes:
        kind: ``"teacher"`` or ``"student"``.
        n: points per side.
        pitch: view px between neighbouring points (centre ``i`` at ``(i + 0.5) * pitch``).
        crop: view side ``V``.
    """

    kind: str
    n: int
    pitch: float
    crop: int

    @property
    def extent(self) -> float:
        """View px covered by the ``n`` cells (may exceed ``crop`` on a teacher grid)."""
        return self.pitch * self.n

    def centres(self, device: Any = None) -> torch.Tensor:
        """Float64 ``[n]`` point centres in view px."""
        if self.kind == "student":
            return token_centres(self.crop, self.n, device=device)
        return (torch.arange(self.n, device=device, dtype=torch.float64) + 0.5) * self.pitch


def make_grid(kind: str, teacher: Any, crop: int, n_student: int) -> CompareGrid:
    """The teacher's own grid on a ``crop`` px view, or the ``n_student`` student grid.

    Raises:
        ValueError: ``kind`` is neither ``"teacher"`` nor ``"student"``.
    """
    if kind == "student":
        return CompareGrid("student", int(n_student), crop / n_student, int(crop))
    if kind != "teacher":
        raise ValueError(
            f"audit grid must be one of {GRIDS}, got {kind!r}; pass --grid teacher "
            "or --grid student"
        )
    px = int(teacher.input_px(crop))
    return CompareGrid(
        "teacher", int(teacher.grid_size(crop)), teacher.spec.stride * crop / px, int(crop)
    )


def online_on(grid: CompareGrid, raw: torch.Tensor, teacher: Any) -> torch.Tensor:
    """The teacher output ``raw`` ``[B, g, g, C]`` on the views, expressed on ``grid``."""
    if grid.kind == "teacher":
        if raw.shape[1] != grid.n:
            raise ValueError(
                f"teacher returned {raw.shape[1]} tokens per side on a {grid.crop} "
                f"px view, its spec says {grid.n}"
            )
        return raw.float()
    return resample_to_student(
        raw, int(teacher.input_px(grid.crop)), int(teacher.spec.stride), grid.crop, grid.n
    )


def grid_valid(grid: CompareGrid, geom: ViewGeometry) -> torch.Tensor:
    """Float ``[B, n, n]``: 1 where the point is inside the view and not in its padding."""
    c = grid.centres(geom.device)
    n = grid.n
    _, _, valid = view_to_tile(geom, c.view(1, n, 1), c.view(1, 1, n))
    inside = c < grid.crop  # teacher tokens past the view edge see only the teacher's padding
    return (valid & inside.view(1, n, 1) & inside.view(1, 1, n)).to(torch.float32)


def sample_on(
    grid: CompareGrid,
    grids: Sequence[torch.Tensor],
    level_geoms: Sequence[LevelGeometry],
    geom: ViewGeometry,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached grids read at ``grid``'s points: ``(targets [B, n, n, C], valid [B, n, n])``.

    The student grid goes through ``trainer.targets.sample_targets`` (the trainer's own path);
    the teacher grid uses the same bilinear gather at the teacher's token centres.
    """
    if grid.kind == "student":
        return sample_targets(grids, level_geoms, geom, grid.n)
    return sample_targets(grids, level_geoms, geom, grid.n, centres=grid.centres(geom.device))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


@torch.no_grad()
def bank_fidelity(
    store: Any,
    name: str,
    teacher: Any,
    tiles: Sequence[int],
    n_student: int,
    max_views: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, tuple[float, int]]:
    """Bank grid vs the teacher run on the same (independently rendered) bank view.

    Views are rendered with the trainer's ``render_views`` from the stored params, the teacher
    runs on them, and the stored grid is compared on the teacher grid (as stored) and on the
    student grid (both sides through the trainer's resampling). Expected: 1 to codec precision.

    Returns:
        ``{"teacher": (cosine, tokens), "student": (cosine, tokens), "views": (n, n)}``.
    """
    bank = store.bank
    tile, crop = store.schema.tile_size, bank.spec.crop
    spec = store.schema.teacher(name).spec
    tgrid = make_grid("teacher", teacher, crop, n_student)
    sgrid = make_grid("student", teacher, crop, n_student)
    pairs = [(int(i), s) for i in tiles for s in range(bank.k)][:max_views]
    sums = {"teacher": [0.0, 0.0], "student": [0.0, 0.0]}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        params = [
            ViewParams(
                *(int(v) for v in bank.params(i)[s][:3]), bool(bank.params(i)[s][3]), tile, crop
            )
            for i, s in chunk
        ]
        geom = ViewGeometry.from_params(params, device)
        images = torch.from_numpy(np.stack([store.read_image(i) for i, _ in chunk]))
        views = render_views(images.permute(0, 3, 1, 2).contiguous().to(device), geom)
        raw = teacher(views)
        stored = torch.from_numpy(np.stack([bank.read(name, i, s) for i, s in chunk])).to(device)
        w = grid_valid(tgrid, geom)
        sums["teacher"][0] += float((_cos(stored, online_on(tgrid, raw, teacher)) * w).sum())
        sums["teacher"][1] += float(w.sum())
        on_s = online_on(sgrid, raw, teacher)
        st_s = bank_targets_to_student(stored, spec, crop, sgrid.n, store.schema.base_size)
        w = grid_valid(sgrid, geom)
        sums["student"][0] += float((_cos(st_s, on_s) * w).sum())
        sums["student"][1] += float(w.sum())
    out = {k: (s / w if w else float("nan"), int(w)) for k, (s, w) in sums.items()}
    out["views"] = (float(len(pairs)), len(pairs))
    return out


__all__ = [
    "GRIDS",
    "CompareGrid",
    "bank_fidelity",
    "grid_valid",
    "make_grid",
    "online_on",
    "sample_on",
]
