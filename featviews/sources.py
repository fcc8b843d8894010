"""Target sources: where the distillation targets of a view come from, one registered per mode.

A source plays two parts. On the CPU, per item, it draws the item's view and names the grids to
read for it (``read_item``). On the device, per batch, it turns what was read into targets on
the student's ``n x n`` token grid, for ``cat(labeled views, CutMixed strong views)``
(``__call__``). The trainer and the audit only ever talk to a source; adding a mode means adding
one class here with ``@register_source``.

* ``warp``: the official view draw; the nearest cached level (and, with the scale blend, its
  neighbours) sampled through the view's geometry.
* ``grid_aligned``: views snapped to one teacher's cached token grid, read exactly.
* ``view_bank``: bank views with the teacher's stored grid on them, else warped views.
* ``online``: the teachers run on the rendered views (no store read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from featstore.constants import SCALE_RANGE
from featstore.geometry import LevelGeometry
from featstore.schema import LevelSpec, TeacherSpec
from featviews.bank import bank_targets_to_student, draw_bank_item
from featviews.decode import decode_on_device
from featviews.draw import GridAlign, ViewParams, draw_view
from featviews.geometry import ViewGeometry, token_valid
from featviews.levels import blend_levels
from featviews.sample import cutmix_targets, mix_levels, resample_to_student, sample_targets


@dataclass(frozen=True)
class EncodedGrid:
    """A cached grid as stored: the codec's ``data`` and per-tile ``aux`` (None for fp16).

    Items carry grids encoded, so the host never widens them (int8 stays 1 byte a value, PCA
    stays k coefficients); the source decodes them on the training device after the batch is
    moved (``featviews.decode``).
    """

    data: torch.Tensor
    aux: torch.Tensor | None = None

    @classmethod
    def from_numpy(cls, data: np.ndarray, aux: np.ndarray | None) -> EncodedGrid:
        """Wrap arrays read from the store (no copy)."""
        return cls(torch.from_numpy(data), None if aux is None else torch.from_numpy(aux))

    def pin_memory(self) -> EncodedGrid:
        """Page-locked copy (the DataLoader's ``pin_memory`` calls it), so the move to the GPU
        can overlap compute as for plain tensors."""
        return EncodedGrid(
            self.data.pin_memory(), None if self.aux is None else self.aux.pin_memory()
        )


@dataclass(frozen=True)
class ViewSampling:
    """How views are drawn: tile and view sides, the store's base size, zoom range, flip, blend.

    ``scale_blend``: kernel width in octaves (``featviews.levels.blend_levels``); the sources
    whose views are exact (grid-aligned, bank) never mix levels.
    """

    tile_size: int
    crop_size: int
    base_size: int
    scale_range: tuple[float, float] = SCALE_RANGE
    flip_p: float = 0.5
    scale_blend: float = 0.0


@dataclass
class Views:
    """A rendered batch: labeled views + masks, weak/strong unlabeled views, CutMix boxes."""

    x_l: torch.Tensor
    y_l: torch.Tensor
    geom_l: ViewGeometry
    x_w: torch.Tensor | None = None
    x_s: torch.Tensor | None = None
    pad_u: torch.Tensor | None = None
    geom_u: ViewGeometry | None = None
    boxes: torch.Tensor | None = None

    @property
    def student_input(self) -> torch.Tensor:
        """``cat(labeled, strong)`` in [0, 1] (normalise before the student)."""
        return self.x_l if self.x_s is None else torch.cat([self.x_l, self.x_s])

    @property
    def mixed(self) -> bool:
        """Whether the batch has CutMixed strong views."""
        return self.geom_u is not None and self.boxes is not None


@dataclass
class SourceContext:
    """What a source may need; each source reads its own fields.

    Attributes:
        sampling: the view draw.
        levels: cached levels to choose from per teacher (empty: no grid is read).
        level_geoms: ``{(teacher, level key): LevelGeometry}`` of those levels.
        store: the feature store items read (cached sources).
        p_bank: ``view_bank``: probability of a bank view.
        teachers: ``online``: frozen teacher modules by name.
        masked: ``online``: return geometric validity (padding = 0), else all ones.
    """

    sampling: ViewSampling
    levels: Mapping[str, Sequence[LevelSpec]] = field(default_factory=dict)
    level_geoms: Mapping[tuple[str, str], LevelGeometry] = field(default_factory=dict)
    store: Any = None
    p_bank: float = 1.0
    teachers: Mapping[str, torch.nn.Module] = field(default_factory=dict)
    masked: bool = True


SOURCES: dict[str, type[TargetSource]] = {}


def register_source(cls: type[TargetSource]) -> type[TargetSource]:
    """Class decorator: make a source available under ``cls.name``."""
    SOURCES[cls.name] = cls
    return cls


def source_class(name: str) -> type[TargetSource]:
    """The source registered as ``name``.

    Raises:
        ValueError: no such source (the message lists the registered ones).
    """
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown target source {name!r}; choose one of {sorted(SOURCES)}"
        ) from None


class TargetSource:
    """Base of the sources: the official draw, nearest-level reads, CutMix on the strong stream.

    Class attributes a source sets:
        name: its registry key (the ``--target-mode`` value, or ``online``).
        reads_cache: items read cached grids from the store.
        blends: views may mix neighbouring levels (``sampling.scale_blend``).
        needs_bank: items read the store's view bank.
    """

    name: ClassVar[str] = ""
    reads_cache: ClassVar[bool] = True
    blends: ClassVar[bool] = False
    needs_bank: ClassVar[bool] = False

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.levels = {k: tuple(v) for k, v in ctx.levels.items()} if self.reads_cache else {}

    # ------------------------------------------------------------------ CPU, per item

    def grid_align(self) -> GridAlign | None:
        """The token grid views are snapped to (None: the official draw)."""
        return None

    def draw(self, rng: np.random.Generator) -> ViewParams:
        """A view drawn with ``rng``, with its level choice per teacher."""
        s = self.ctx.sampling
        view = draw_view(
            rng, s.tile_size, s.crop_size, tuple(s.scale_range), s.flip_p, self.grid_align()
        )
        return self.assign_levels(view)

    def assign_levels(self, view: ViewParams) -> ViewParams:
        """``view`` with, per teacher, its nearest cached level and the levels blended in."""
        s = self.ctx.sampling
        width = s.scale_blend if self.blends else 0.0
        chosen, blend = {}, {}
        for name, lv in self.levels.items():
            mix = blend_levels(lv, view.size, view.flip, s.tile_size, s.base_size, width)
            chosen[name] = mix[0][0]
            if len(mix) > 1:
                blend[name] = mix[1:]
        return view.with_levels(chosen, blend)

    def read_item(self, tile_index: int, rng: np.random.Generator) -> dict[str, Any]:
        """The item's ``view``, ``grids`` per teacher and ``blend_grids`` (levels mixed in),
        the cached grids encoded (`EncodedGrid`)."""
        return self.read_items([tile_index], [rng])[0]

    def decoded(self, name: str, grid: Any, device: torch.device) -> torch.Tensor:
        """A grid of teacher ``name`` on ``device``, decoded to float32 when it is encoded."""
        if not isinstance(grid, EncodedGrid):  # already decoded (tests, the view bank)
            return grid.to(device, non_blocking=True)
        data = grid.data.to(device, non_blocking=True)
        aux = None if grid.aux is None else grid.aux.to(device, non_blocking=True)
        return decode_on_device(self.ctx.store.codec(name), data, aux)

    def read_items(
        self, tile_indices: Sequence[int], rngs: Sequence[np.random.Generator]
    ) -> list[dict[str, Any]]:
        """``read_item`` for a batch of items: the same views and grids, but each (teacher,
        level) the batch needs is one selection, all read at once (``read_batches_encoded``)."""
        return self._read_views(tile_indices, [self.draw(rng) for rng in rngs])

    def _read_views(
        self, tile_indices: Sequence[int], views: Sequence[ViewParams]
    ) -> list[dict[str, Any]]:
        uses: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
        for k, view in enumerate(views):
            for name, lv in view.levels.items():
                uses.setdefault((name, lv.key), []).append((k, None))
            for name, mix in view.blend.items():
                for j, (lv, _) in enumerate(mix):
                    uses.setdefault((name, lv.key), []).append((k, j))
        items = [
            {
                "view": v,
                "grids": {},
                "blend_grids": {n: [None] * len(mix) for n, mix in v.blend.items()},
            }
            for v in views
        ]
        requests = [
            (name, key, [int(tile_indices[k]) for k, _ in where])
            for (name, key), where in uses.items()
        ]
        reads = self.ctx.store.read_batches_encoded(requests) if requests else []
        for ((name, _), where), (data, aux) in zip(uses.items(), reads, strict=True):
            for r, (k, j) in enumerate(where):
                grid = EncodedGrid.from_numpy(data[r], None if aux is None else aux[r])
                if j is None:
                    items[k]["grids"][name] = grid
                else:
                    items[k]["blend_grids"][name][j] = grid
        return items

    def read_batch(
        self, tile_indices: Sequence[int], views: Sequence[ViewParams]
    ) -> dict[str, Any]:
        """Given views of given tiles, read as a batch (the audit's entry): ``view``, ``grids``
        (per teacher, one tensor per view) and ``blend_grids`` (None for views without)."""
        reads = self._read_views(tile_indices, [self.assign_levels(v) for v in views])
        return {
            "view": [r["view"] for r in reads],
            "grids": {n: [r["grids"][n] for r in reads] for n in self.levels},
            "blend_grids": {n: [r["blend_grids"].get(n) for r in reads] for n in self.levels},
        }

    # ------------------------------------------------------------------ device, per batch

    def stream_targets(
        self,
        name: str,
        n: int,
        batch: Mapping[str, Any],
        geom: ViewGeometry,
        centres: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets [B, n, n, C], valid [B, n, n])`` of one stream of views, before CutMix.

        ``centres``: ``[n]`` view-px sample positions per axis (default: the student token
        centres; the audit passes a teacher's own token centres).
        """
        views = batch["view"]
        geoms = [self.ctx.level_geoms[(name, v.levels[name].key)] for v in views]
        grids = [self.decoded(name, g, geom.device) for g in batch["grids"][name]]
        targets, valid = sample_targets(grids, geoms, geom, n, centres)
        if any(name in v.blend for v in views):  # scale blend: mix in the other levels
            mix_levels(targets, self._extras(name, batch, geom), _sampler(n, centres), geom)
        return targets, valid

    def _extras(
        self, name: str, batch: Mapping[str, Any], geom: ViewGeometry
    ) -> list[list[tuple[torch.Tensor, LevelGeometry, float]]]:
        extra = batch["blend_grids"][name]
        return [
            [
                (
                    self.decoded(name, extra[b][k], geom.device),
                    self.ctx.level_geoms[(name, lv.key)],
                    w,
                )
                for k, (lv, w) in enumerate(v.blend.get(name, ()))
            ]
            for b, v in enumerate(batch["view"])
        ]

    def __call__(
        self,
        name: str,
        n: int,
        views: Views,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets and validity of ``cat(labeled, strong)`` for teacher ``name``."""
        t_l, v_l = self.stream_targets(name, n, batch_l, views.geom_l)
        if batch_u is None or not views.mixed:
            return t_l, v_l
        t_u, v_u = self.stream_targets(name, n, batch_u, views.geom_u)
        t_u, v_u = cutmix_targets(t_u, v_u, views.boxes, views.geom_u.crop)
        return torch.cat([t_l, t_u]), torch.cat([v_l, v_u])


def _sampler(n: int, centres: torch.Tensor | None) -> Any:
    """``mix_levels``' reader: the grids sampled at the same ``n x n`` points."""
    return lambda grids, geoms, sub: sample_targets(grids, geoms, sub, n, centres)[0]


@register_source
class WarpSource(TargetSource):
    """The official draw; the nearest cached level, blended with its neighbours."""

    name = "warp"
    blends = True


@register_source
class GridAlignedSource(TargetSource):
    """Views snapped to the first teacher's cached token grid: its targets are cached tokens."""

    name = "grid_aligned"

    def __init__(self, ctx: SourceContext) -> None:
        super().__init__(ctx)
        if not self.levels:
            raise ValueError("distill.target_mode 'grid_aligned' needs cached mode and a teacher")
        first = next(iter(self.levels))
        self._align = GridAlign.from_levels(
            [ctx.level_geoms[(first, lv.key)] for lv in self.levels[first]]
        )

    def grid_align(self) -> GridAlign:
        return self._align


@register_source
class ViewBankSource(TargetSource):
    """Bank views with the teachers' stored grids (probability ``p_bank``), else warped views.

    Items carry ``bank_slot`` (-1: warped view); ``grids[name]`` is the bank grid for banked
    teachers of a bank view, else the cached level's grid.
    """

    name = "view_bank"
    needs_bank = True

    def __init__(self, ctx: SourceContext) -> None:
        super().__init__(ctx)
        store = ctx.store
        self.bank_teachers = set(store.bank.teachers)
        self.specs: dict[str, TeacherSpec] = {
            name: store.schema.teacher(name).spec for name in self.levels
        }
        self.base_size = int(store.schema.base_size)

    def read_items(
        self, tile_indices: Sequence[int], rngs: Sequence[np.random.Generator]
    ) -> list[dict[str, Any]]:
        """Item by item: a bank item reads bank grids or levels depending on its own draw."""
        return [self.read_item(int(i), rng) for i, rng in zip(tile_indices, rngs, strict=True)]

    def read_item(self, tile_index: int, rng: np.random.Generator) -> dict[str, Any]:
        view, slot, grids = draw_bank_item(
            self.ctx.store, tile_index, rng, self.levels, self.ctx.p_bank
        )
        return {"view": view, "grids": grids, "bank_slot": slot}

    def stream_targets(
        self, name: str, n: int, batch: Mapping[str, Any], geom: ViewGeometry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = geom.device
        slots = torch.as_tensor(batch["bank_slot"]).to(dev)
        banked = slots >= 0 if name in self.bank_teachers else torch.zeros_like(slots).bool()
        grids = [self.decoded(name, g, dev) for g in batch["grids"][name]]
        out: torch.Tensor | None = None
        for mask, fill in ((banked, self._from_bank), (~banked, self._from_levels)):
            idx = torch.nonzero(mask).flatten()
            if idx.numel() == 0:
                continue
            rows = idx.tolist()
            views = [batch["view"][i] for i in rows]
            part = fill(name, n, [grids[i] for i in rows], views, geom.select(idx))
            if out is None:
                out = part.new_empty((len(geom), *part.shape[1:]))
            out[idx] = part
        if out is None:
            raise ValueError("view_bank source: empty batch")
        return out, token_valid(geom, n)

    def _from_bank(
        self, name: str, n: int, grids: list[torch.Tensor], views: list[ViewParams], geom: Any
    ) -> torch.Tensor:
        return bank_targets_to_student(
            torch.stack(grids).float(), self.specs[name], geom.crop, n, self.base_size
        )

    def _from_levels(
        self, name: str, n: int, grids: list[torch.Tensor], views: list[ViewParams], geom: Any
    ) -> torch.Tensor:
        geoms = [self.ctx.level_geoms[(name, v.levels[name].key)] for v in views]
        return sample_targets(grids, geoms, geom, n)[0]


def view_validity(views: Views, n: int) -> torch.Tensor:
    """Token validity ``[B_l + B_u, n, n]`` of ``cat(labeled, strong)`` from the geometry."""
    v_l = token_valid(views.geom_l, n)
    if not views.mixed:
        return v_l
    v_u = token_valid(views.geom_u, n)
    _, v_u = cutmix_targets(v_u.unsqueeze(-1), v_u, views.boxes, views.geom_u.crop)
    return torch.cat([v_l, v_u])


@register_source
class OnlineSource(TargetSource):
    """The teachers run on the rendered views (labeled and CutMixed strong, un-normalised).

    Each teacher resizes and normalises inside (a CLIP-like teacher shrinks the view to its
    own input); its grid is resampled onto the student grid with ``resample_to_student``.
    """

    name = "online"
    reads_cache = False

    def grid(self, name: str, views: Views) -> torch.Tensor:
        """Teacher tokens ``[B, g, g, C]`` on ``cat(labeled, strong)``."""
        return self.ctx.teachers[name](views.student_input.float())

    def __call__(
        self,
        name: str,
        n: int,
        views: Views,
        batch_l: Mapping[str, Any],
        batch_u: Mapping[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.ctx.teachers[name]
        crop = views.x_l.shape[-1]
        grid = self.grid(name, views)
        target = resample_to_student(grid, teacher.input_px(crop), teacher.spec.stride, crop, n)
        if self.ctx.masked:
            return target, view_validity(views, n)
        return target, torch.ones(target.shape[:3], device=target.device)


def make_source(name: str, ctx: SourceContext) -> TargetSource:
    """The source registered as ``name``, built on ``ctx`` (one registry lookup)."""
    return source_class(name)(ctx)


__all__ = [
    "SOURCES",
    "EncodedGrid",
    "GridAlignedSource",
    "OnlineSource",
    "SourceContext",
    "TargetSource",
    "ViewBankSource",
    "ViewSampling",
    "Views",
    "WarpSource",
    "make_source",
    "register_source",
    "source_class",
    "view_validity",
]
