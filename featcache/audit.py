"""Fidelity audit: how close is a target sampled from the cache to the teacher run on the view?

For random RS-MTDF views of a store's tiles, the *cached* target is sampled from the nearest
cached level (``choose_level`` over an allowed level set) and the *online* target is the teacher
run on the rendered view itself. The audit reports the mean per-token cosine between the two over
valid tokens, overall and by factor (zoom, crop, flip, CutMix, colour), for several cache
configurations side by side, plus identity checks that must give 1.0, config-free references
(exact-scale cache, colour alone, CutMix token mixing) and, when the store has one, the exact
view bank's fidelity on its own views. See docs/design "Fidelity".

Comparison grid (``grid``, see ``featcache.audit_grid``): ``"teacher"`` (default) compares at the
teacher's own token centres on the view, so the online side is the teacher output untouched and
the figure measures the cache alone (the design notes' calibration is on this grid);
``"student"`` compares on the 37x37 student grid the loss reads, with the online output resampled
onto it as online training does. Every result also carries the overall row of the other grid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featcache.audit_context import (
    AuditContext,
    Config,
    bank_checks,
    cosine,
    identity_checks,
    tile_images,
)
from featcache.audit_grid import CompareGrid, grid_valid, make_grid, online_on, sample_on
from featcache.audit_reads import BatchReads, ReencodedReads
from featcache.audit_result import AuditResult, Check, FactorRow
from featstore import LevelGeometry, LevelSpec, open_store
from featstore.codecs import FeatureCodec
from featstore.constants import SCALE_RANGE
from featstore.errors import FeatcacheError, MissingTeacherError
from featstore.teacher_names import resolve_teacher_name
from featviews.draw import GridAlign, ViewParams, draw_view
from featviews.geometry import ViewGeometry
from featviews.render import render_views
from featviews.sample import cutmix_targets
from featviews.sources import SourceContext, ViewSampling, WarpSource
from trainer.augment import cutmix_boxes, cutmix_pixels, strong_photometric

OFFICIAL_SCALE_RANGE = SCALE_RANGE  # the official draw's range (featstore.constants)
STUDENT_PATCH = 14
ZOOM_BINS = (
    (0.0, 0.75, "zoom < 0.75"),
    (0.75, 1.25, "0.75 <= zoom < 1.25"),
    (1.25, 1.75, "1.25 <= zoom < 1.75"),
    (1.75, float("inf"), "zoom >= 1.75"),
)


class AuditError(FeatcacheError, ValueError):
    """The audit cannot run on this store / teacher; the message says how to fix it."""


def default_level_sets(keys: Sequence[str]) -> dict[str, list[str]]:
    """``s1.00 only`` / ``all scales`` / ``all scales + flip`` (duplicates dropped)."""
    levels = [LevelSpec.from_key(k) for k in keys]
    plain = [lv.key for lv in levels if not lv.flipped]
    one = ["s1.00"] if "s1.00" in plain else plain[:1]
    sets: dict[str, list[str]] = {}
    for label, chosen in (
        ("s1.00 only", one),
        ("all scales", plain),
        ("all scales + flip", list(keys)),
    ):
        if chosen and all(sorted(chosen) != sorted(v) for v in sets.values()):
            sets[label] = chosen
    return sets


NEAREST = " (nearest level)"
CODEC_SEP = " | "


def config_label(level_set: str, codec: str | None) -> str:
    """A configuration's column label: the level set's, with the candidate codec's after
    ``CODEC_SEP`` when the audit re-encodes the store (``audit_store(codecs=...)``)."""
    return level_set if codec is None else f"{level_set}{CODEC_SEP}{codec}"


def _with_blend(
    sets: dict[str, tuple[LevelSpec, ...]], blend: float, codecs: Sequence[str] = ()
) -> dict[str, Config]:
    """Every set with the blend rule; when blending, each set of several scales is also
    reported with its nearest level only (just before it), so the table shows what mixing buys.
    With candidate ``codecs`` every such configuration is repeated under each codec."""
    out: dict[str, Config] = {}
    for codec in codecs or [None]:
        for label, levels in sets.items():
            if blend > 0 and len({lv.scale for lv in levels}) > 1:
                out[config_label(label + NEAREST, codec)] = (levels, 0.0, codec)
            out[config_label(label, codec)] = (levels, blend, codec)
    return out


def _resolve_sets(
    store: Any, name: str, level_sets: Mapping[str, Sequence[str]] | None
) -> dict[str, tuple[LevelSpec, ...]]:
    have = [lv.key for lv in store.levels(name)]
    sets = dict(level_sets) if level_sets else default_level_sets(have)
    out = {}
    for label, keys in sets.items():
        missing = [k for k in keys if k not in have]
        if not keys or missing:
            raise AuditError(
                f"level set {label!r} = {list(keys)} names levels the store lacks "
                f"({missing}); teacher {name!r} has {have}"
            )
        out[label] = tuple(LevelSpec.from_key(k) for k in keys)
    return out


def _store_teacher(
    store: Any,
    name: str,
    teacher: Any,
    weights: str | None,
    tiny: bool,
    device: torch.device,
    random_weights: bool,
) -> Any:
    """The store's teacher rebuilt, or the given one moved to ``device``; both checked."""
    from pipelines.teachers import check_store_teacher, teacher_for_store

    if teacher is None:
        return teacher_for_store(
            store, name, weights=weights, tiny=tiny, random_weights=random_weights, device=device
        )
    check_store_teacher(store, name, teacher, "the teacher given")
    return teacher.to(device).eval()


# ----------------------------------------------------------------------------- per batch


def _source(ctx: AuditContext, levels: Sequence[LevelSpec], blend: float, reads: Any) -> Any:
    """The trainer's warp target source for one configuration (levels, blend width)."""
    sampling = ViewSampling(ctx.tile, ctx.crop, ctx.base, scale_blend=blend)
    geoms = {(ctx.name, lv.key): ctx.geom(lv.key) for lv in levels}
    return WarpSource(SourceContext(sampling, {ctx.name: levels}, geoms, reads))


def _targets_on(
    src: Any, ctx: AuditContext, batch: dict[str, Any], grid: CompareGrid, geom: ViewGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's targets of the views, read at ``grid``'s points."""
    return src.stream_targets(ctx.name, grid.n, batch, geom, grid.centres(geom.device))


def _near_edge(boxes: torch.Tensor, grid: CompareGrid) -> torch.Tensor:
    """Bool ``[B, n, n]``: token centre within one token pitch of the CutMix box outline."""
    c = grid.centres(boxes.device)
    p = grid.pitch
    y, x, h, w = (boxes[:, k].to(torch.float64).view(-1, 1) for k in range(4))

    def band(lo: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outer = (c >= lo - p) & (c <= lo + length + p)
        inner = (c > lo + p) & (c < lo + length - p)
        return outer, inner

    oy, iy = band(y, h)
    ox, ix = band(x, w)
    near = (oy.unsqueeze(2) & ox.unsqueeze(1)) & ~(iy.unsqueeze(2) & ix.unsqueeze(1))
    return near & (boxes[:, 2:].prod(1) > 0).view(-1, 1, 1)


def _exact_scale(
    ctx: AuditContext, images: torch.Tensor, params: Sequence[ViewParams], geom: ViewGeometry
) -> torch.Tensor:
    """Targets from a cache rendered at exactly each view's scale (best one-level warp)."""
    from featviews.render import render_level

    grids, lgs = [], []
    nhwc = images.permute(0, 2, 3, 1)
    for b, p in enumerate(params):
        level = LevelSpec(p.size / ctx.base, p.flip)
        grid = ctx.teacher(render_level(nhwc[b : b + 1], level, ctx.base))[0]
        grids.append(grid)
        lgs.append(
            LevelGeometry.from_specs(
                ctx.tile, ctx.base, level, ctx.teacher.spec, int(grid.shape[0])
            )
        )
    return sample_on(ctx.grid, grids, lgs, geom)[0]


def _audit_batch(
    ctx: AuditContext,
    idx: Sequence[int],
    params: Sequence[ViewParams],
    gen: torch.Generator,
    acc: dict[str, Any],
    ceiling: bool,
) -> None:
    """Accumulate per-view token sums of one batch of views into ``acc``."""
    geom = ViewGeometry.from_params(params, ctx.device)
    images = tile_images(ctx, idx)
    views = render_views(images, geom)
    raw = ctx.teacher(views)
    online = online_on(ctx.grid, raw, ctx.teacher)
    online_other = online_on(ctx.other, raw, ctx.teacher)
    valid = grid_valid(ctx.grid, geom)
    valid_other = grid_valid(ctx.other, geom)
    boxes = cutmix_boxes(len(params), ctx.crop, gen, p=1.0)
    mixed_online = ctx.online(cutmix_pixels(views, boxes))
    colour_online = ctx.online(strong_photometric(views, gen))
    edge = _near_edge(boxes, ctx.grid)
    extent = ctx.grid.extent  # CutMix cells = the comparison grid's cells

    def add(key: str, cos: torch.Tensor, w: torch.Tensor) -> None:
        acc.setdefault(key, []).append(torch.stack([(cos * w).sum((1, 2)), w.sum((1, 2))], 1))

    # the store's grids are read once per batch; each candidate codec re-encodes them once
    reads = BatchReads(ctx.store)
    readers: dict[str | None, Any] = {None: reads}
    readers.update({c: ReencodedReads(reads, {ctx.name: codec}) for c, codec in ctx.codecs.items()})
    for label, (levels, blend, codec) in ctx.configs.items():
        src = _source(ctx, levels, blend, readers[codec])
        batch = src.read_batch(idx, params)
        target, tvalid = _targets_on(src, ctx, batch, ctx.grid, geom)
        add(f"{label}|plain", cosine(target, online), valid * tvalid)
        add(f"{label}|colour", cosine(target, colour_online), valid * tvalid)
        mt, mv = cutmix_targets(target, tvalid * valid, boxes, extent)
        mixed_cos = cosine(mt, mixed_online)
        add(f"{label}|cutmix", mixed_cos, mv)
        add(f"{label}|cutmix_edge", mixed_cos, mv * edge)
        t2, v2 = _targets_on(src, ctx, batch, ctx.other, geom)
        add(f"{label}|other", cosine(t2, online_other), v2 * valid_other)
    add("ref|colour", cosine(colour_online, online), valid)
    mo, mv = cutmix_targets(online, valid, boxes, extent)
    add("ref|cutmix", cosine(mo, mixed_online), mv)
    add("ref|cutmix_edge", cosine(mo, mixed_online), mv * edge)
    if ceiling:
        add("ref|exact_scale", cosine(_exact_scale(ctx, images, params, geom), online), valid)
    acc.setdefault("zoom", []).extend(p.size / p.tile for p in params)
    acc.setdefault("partial", []).extend(p.size > p.crop for p in params)
    acc.setdefault("flip", []).extend(p.flip for p in params)


# ----------------------------------------------------------------------------- public


def audit_store(
    store_url: str,
    teacher_name: str,
    weights: str | None = None,
    tiny: bool = False,
    n_views: int = 64,
    seed: int = 0,
    level_sets: Mapping[str, Sequence[str]] | None = None,
    teacher: Any = None,
    device: str | torch.device = "cpu",
    crop_size: int | None = None,
    n_tokens: int | None = None,
    batch_size: int = 8,
    grid_aligned: bool = False,
    ceiling: bool = True,
    identity_tiles: int = 8,
    grid: str = "teacher",
    bank_views: int = 64,
    scale_blend: float = 0.25,
    aligned_views: int = 0,
    progress: bool = False,
    random_weights: bool = False,
    codecs: Mapping[str, FeatureCodec] | None = None,
    tiles: Sequence[int] | None = None,
    views: Sequence[tuple[int, ViewParams]] | None = None,
) -> AuditResult:
    """Audit the fidelity of cached targets against the teacher run on the views.

    Args:
        store_url: A store with pixels (``store_pixels``).
        teacher_name: Teacher name in the store, or the name typed at extraction
            (``timm:<model>`` finds ``timm:<model>:<index>``; see ``featstore.teacher_names``).
        weights: Weights the store was extracted with (ignored when ``teacher`` is given).
        tiny: Tiny random teacher, as extracted with ``--tiny``.
        n_views: Random views to draw.
        seed: Seed of the view draws, CutMix boxes and colour jitter.
        level_sets: Cache configurations ``{label: [level keys]}`` to compare (default:
            ``s1.00 only`` / ``all scales`` / ``all scales + flip``, whichever the store has).
        teacher: An already created teacher (same spec as the store's) instead of the registry.
        device: Torch device.
        crop_size: View side ``V`` (default: the store's ``base_size``).
        n_tokens: Student tokens per side (default ``V // 14``).
        batch_size: Views per teacher forward.
        grid_aligned: Draw views on the cached token grid (``GridAlign``) instead of the
            official rule.
        ceiling: Also run the teacher on a cache rendered at each view's exact scale.
        identity_tiles: Tiles used by the identity checks.
        grid: ``"teacher"`` (default: the teacher's own tokens on the view, no resampling of the
            online output, so the figure isolates the cache) or ``"student"`` (the ``V / 14``
            grid the loss reads, online output resampled as online training does). The other
            grid's overall row is reported too.
        bank_views: Bank views to check when the store has an exact view bank (0: skip).
        scale_blend: Kernel width (octaves of zoom) over which neighbouring cached levels are
            mixed into the target, as the trainer's ``distill.scale_blend`` (warp mode); the
            main (last) set is also reported with its nearest level only. 0: nearest only.
            Grid-aligned views read exact levels (no mixing), as in training.
        aligned_views: Also audit this many grid-aligned views (same store and sets) and add
            the main set's overall cosine on them to the references (0: skip).
        progress: Show a progress bar over the drawn views.
        random_weights: Accept random init for a full-size teacher without weights, as the
            extraction did (``--random-weights``).
        codecs: Candidate codecs ``{label: codec}`` (fitted when they need a fit): every
            configuration is audited under each, its cached grids re-encoded from the store
            with the codec and decoded on the device as training decodes them
            (``featcache.audit_reads.ReencodedReads``); columns ``config_label(set, label)``.
            The teacher still runs once per view for all of them. Identity checks stay
            codec-free. None: the store's own codec.
        tiles: Tile indices the views are drawn from (and the identity checks use); default
            every done tile. The planner passes the tiles its PCA bases were not fitted on.
        views: Exactly these ``(tile index, view)`` pairs instead of ``n_views`` random draws
            (e.g. identity views, whose answer is known).

    Returns:
        The audit result (``to_markdown`` / ``to_json``).

    Raises:
        AuditError: the store lacks pixels, levels or the teacher.
        TeacherSpecMismatchError: the teacher differs from the one the store was extracted with.
    """
    t0 = time.perf_counter()
    store = open_store(store_url)
    try:
        teacher_name = resolve_teacher_name(store.schema, teacher_name)
    except MissingTeacherError as err:
        raise AuditError(f"{store_url}: {err}") from None
    if not store.schema.store_pixels:
        raise AuditError(
            f"store {store_url} holds no pixels; re-extract without --no-pixels "
            "so the audit can render the views"
        )
    if views is not None:
        n_views = len(views)
    if n_views < 1 or batch_size < 1:
        raise AuditError(f"--views ({n_views}) and batch size ({batch_size}) must be >= 1")
    dev = torch.device(device)
    teacher = _store_teacher(store, teacher_name, teacher, weights, tiny, dev, random_weights)
    sch = store.schema
    crop = int(crop_size or sch.base_size)
    n = int(n_tokens or max(1, crop // STUDENT_PATCH))
    if grid not in ("teacher", "student"):
        raise AuditError(f"grid must be 'teacher' or 'student', got {grid!r} (--grid)")
    other = "student" if grid == "teacher" else "teacher"
    ctx = AuditContext(
        store,
        teacher_name,
        teacher,
        dev,
        sch.tile_size,
        sch.base_size,
        crop,
        n,
        _with_blend(
            _resolve_sets(store, teacher_name, level_sets),
            0.0 if grid_aligned else scale_blend,
            list(codecs or {}),
        ),
        make_grid(grid, teacher, crop, n),
        make_grid(other, teacher, crop, n),
        dict(codecs or {}),
    )
    done = _view_tiles(store, store_url, tiles)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    align = None
    if grid_aligned:
        align = GridAlign.from_levels([ctx.geom(lv.key) for lv in store.levels(teacher_name)])
    acc: dict[str, Any] = {}
    with torch.no_grad():
        identity = identity_checks(ctx, [int(i) for i in done[:identity_tiles]])
        bar = tqdm(total=n_views, desc="audit", unit="view", disable=not progress)
        for idx, params in _view_batches(ctx, rng, done, n_views, batch_size, align, views):
            _audit_batch(ctx, idx, params, gen, acc, ceiling)
            bar.update(len(idx))
        bar.close()
        all_done = np.flatnonzero(store.done())
        bank = bank_checks(ctx, [int(i) for i in all_done], bank_views, batch_size)
    result = _summarise(ctx, acc, identity, ceiling)
    result.bank = bank
    if aligned_views > 0 and not grid_aligned:
        result.references.append(
            _aligned_reference(
                store_url,
                teacher_name,
                teacher,
                aligned_views,
                seed,
                level_sets,
                dev,
                crop_size,
                n_tokens,
                batch_size,
                grid,
            )
        )
    result.meta.update(
        grid=grid,
        grid_n=ctx.grid.n,
        other_grid_n=ctx.other.n,
        store=str(store_url),
        teacher=teacher_name,
        n_views=n_views,
        seed=seed,
        tile_size=ctx.tile,
        base_size=ctx.base,
        crop_size=crop,
        n_tokens=ctx.n,
        grid_aligned=grid_aligned,
        seconds=round(time.perf_counter() - t0, 2),
        scale_blend=0.0 if grid_aligned else scale_blend,
        level_sets={k: [lv.key for lv in v[0]] for k, v in ctx.configs.items()},
        codecs={k: c.to_dict() for k, c in ctx.codecs.items()},
        view_tiles=[int(i) for i in done],
    )
    return result


def _view_tiles(store: Any, store_url: str, tiles: Sequence[int] | None) -> np.ndarray:
    """The done tiles views are drawn from: all of them, or those of ``tiles``."""
    done = np.flatnonzero(store.done())
    if done.size == 0:
        raise AuditError(f"store {store_url} has no done tiles; run the extraction first")
    if tiles is None:
        return done
    chosen = np.asarray(sorted({int(i) for i in tiles}), dtype=np.int64)
    missing = np.setdiff1d(chosen, done)
    if chosen.size == 0 or missing.size:
        raise AuditError(
            f"audit tiles {chosen.tolist()} of {store_url}: {missing.tolist()} are not done "
            f"tiles (done: {done.tolist()}); choose done tiles"
        )
    return chosen


def _view_batches(
    ctx: AuditContext,
    rng: np.random.Generator,
    pool: np.ndarray,
    n_views: int,
    batch_size: int,
    align: GridAlign | None,
    views: Sequence[tuple[int, ViewParams]] | None,
) -> Any:
    """Batches ``(tile indices, views)``: the given ``views``, else random draws from ``pool``."""
    for start in range(0, n_views, batch_size):
        if views is not None:
            chunk = views[start : start + batch_size]
            yield [int(i) for i, _ in chunk], [p for _, p in chunk]
            continue
        count = min(batch_size, n_views - start)
        idx = [int(i) for i in rng.choice(pool, size=count)]
        draw = [draw_view(rng, ctx.tile, ctx.crop, OFFICIAL_SCALE_RANGE, 0.5, align) for _ in idx]
        yield idx, draw


def _aligned_reference(
    store_url: str,
    name: str,
    teacher: Any,
    n_views: int,
    seed: int,
    level_sets: Mapping[str, Sequence[str]] | None,
    device: torch.device,
    crop_size: int | None,
    n_tokens: int | None,
    batch_size: int,
    grid: str,
) -> Check:
    """The main set's overall cosine on grid-aligned views (exact reads on the token grid)."""
    sub = audit_store(
        store_url,
        name,
        teacher=teacher,
        n_views=n_views,
        seed=seed,
        level_sets=level_sets,
        device=device,
        crop_size=crop_size,
        n_tokens=n_tokens,
        batch_size=batch_size,
        grid_aligned=True,
        ceiling=False,
        identity_tiles=1,
        grid=grid,
        bank_views=0,
    )
    main = sub.configs[-1]
    row = sub.row("all views", "overall")
    return Check(
        f"grid-aligned views ({n_views}), {main}: exact reads on the token grid",
        row.cosine[main],
        row.tokens,
    )


def _summarise(
    ctx: AuditContext, acc: dict[str, Any], identity: list[Check], ceiling: bool
) -> AuditResult:
    zoom = np.asarray(acc["zoom"])
    masks: list[tuple[str, str, np.ndarray]] = [("all views", "overall", np.ones_like(zoom, bool))]
    masks += [("rescale", label, (zoom >= lo) & (zoom < hi)) for lo, hi, label in ZOOM_BINS]
    partial, flip = np.asarray(acc["partial"], bool), np.asarray(acc["flip"], bool)
    masks += [
        ("crop", "part of the tile (S > V)", partial),
        ("crop", "whole tile (S <= V)", ~partial),
        ("flip", "flipped", flip),
        ("flip", "not flipped", ~flip),
    ]
    sums = {k: torch.cat(v).cpu().numpy() for k, v in acc.items() if isinstance(v[0], torch.Tensor)}
    labels = list(ctx.configs)
    rows = []

    def mean(key: str, m: np.ndarray) -> tuple[float, int]:
        s = sums[key][m]
        w = float(s[:, 1].sum())
        return (float(s[:, 0].sum()) / w if w > 0 else float("nan")), int(round(w))

    main = labels[-1]
    for factor, case, m in masks:
        rows.append(
            FactorRow(
                factor,
                case,
                {lb: mean(f"{lb}|plain", m)[0] for lb in labels},
                mean(f"{main}|plain", m)[1],
                int(m.sum()),
            )
        )
    alls = np.ones_like(zoom, bool)
    rows.append(
        FactorRow(
            "other grid",
            f"{ctx.other.kind} grid ({ctx.other.n}x{ctx.other.n}), overall",
            {lb: mean(f"{lb}|other", alls)[0] for lb in labels},
            mean(f"{main}|other", alls)[1],
            int(alls.sum()),
        )
    )
    for kind, case in (
        ("cutmix", "all tokens"),
        ("cutmix_edge", "within 1 token of box edge"),
        ("colour", "strong colour on the online view"),
    ):
        rows.append(
            FactorRow(
                kind.split("_")[0],
                case,
                {lb: mean(f"{lb}|{kind}", alls)[0] for lb in labels},
                mean(f"{main}|{kind}", alls)[1],
                int(alls.sum()),
            )
        )
    refs = [
        Check("colour alone: online clean vs online jittered", *mean("ref|colour", alls)),
        Check(
            "CutMix token mixing of online targets vs teacher on mixed view",
            *mean("ref|cutmix", alls),
        ),
        Check("  same, within 1 token of the box edge", *mean("ref|cutmix_edge", alls)),
    ]
    if ceiling:
        refs.insert(
            0,
            Check(
                "cache at exactly the view's scale (best one-level warp)",
                *mean("ref|exact_scale", alls),
            ),
        )
    return AuditResult(identity=identity, factors=rows, references=refs, configs=labels)


__all__ = [
    "CODEC_SEP",
    "AuditError",
    "AuditResult",
    "audit_store",
    "config_label",
    "cosine",
    "default_level_sets",
]
