"""Run preparation: open and check the data, build the student, the datasets and samplers.

Everything here runs before the first step, so a bad store, split or class count fails fast
with a `DataCheckError` naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from featstore.errors import MissingTeacherError, TileDataError
from featstore.geometry import LevelGeometry
from featstore.partitions import (
    DEFAULT_NAME,
    SETS,
    count_line,
    list_partitions,
    read_partition,
)
from featstore.protocols import edge_rule_departure
from featstore.schema import LevelSpec, TileRecord
from featstore.teacher_names import resolve_teacher_name
from featviews.sources import SourceContext, TargetSource, ViewSampling, make_source, source_class
from trainer.checks import (
    DataCheckError,
    batch_fit_message,
    check_classes,
    check_done,
    check_fingerprint,
    check_labeled,
    check_splits,
    check_stats,
    check_store_arrays,
    check_store_files,
    check_unmasked_padding,
    mask_labels,
    resolve_levels,
    select_sets,
)
from trainer.config import METHOD_PATCH, TINY_STUDENT, TeacherConfig, TrainConfig, default_branch
from trainer.data import (
    EpochSampler,
    SourceTiles,
    StoreDataset,
    collate,
    iters_per_epoch,
    log_bad_tile,
    repeat_to,
)
from trainer.distributed import DistInfo
from trainer.presets import Departure, departure_lines
from trainer.student import Student, StudentConfig, TeacherHead


@dataclass
class RunData:
    """Opened data of a run (store and/or source) with the checked tile selections."""

    reader: Any
    store: Any
    tiles: list[TileRecord]
    sets: dict[str, list[int]]
    class_names: tuple[str, ...]
    num_classes: int
    ignore_index: int
    tile_size: int
    base_size: int
    levels: dict[str, tuple[LevelSpec, ...]] = field(default_factory=dict)
    level_geoms: dict[tuple[str, str], LevelGeometry] = field(default_factory=dict)
    sets_origin: str = ""
    teachers_origin: str = ""

    def store_meta(self) -> dict[str, Any]:
        """Fingerprint and schema of the store (recorded in checkpoints)."""
        if self.store is None:
            return {}
        return {"fingerprint": self.store.fingerprint, "schema": self.store.schema.to_dict()}


def _open_source(cfg: TrainConfig) -> SourceTiles:
    from pipelines.sources import open_configured  # lazy: only runs without a store

    return SourceTiles(open_configured(cfg.data.source, cfg.data))


def splits_fix(url: str | None) -> str:
    """The commands that list a store's splits and make a partition train uses by itself."""
    if not url:
        return (
            "fix: name splits or tile-id files with --labeled / --unlabeled / --val "
            "(a partition needs a store: --store URL)"
        )
    return (
        f"fix: see the splits with `featcache splits {url}`, then make a partition that "
        f"train uses by default: `featcache splits {url} --labeled 1/8 --val 0.1 --seed 0` "
        "(or name splits / tile-id files with --labeled / --unlabeled / --val)"
    )


def _sets_line(sets: dict[str, list[int]], tiles: list[TileRecord]) -> str:
    return ", ".join(f"{k} {count_line(tiles, sets[k])}" for k in SETS)


def select_run_sets(
    cfg: TrainConfig, tiles: list[TileRecord], store: Any
) -> tuple[dict[str, list[int]], str]:
    """(sets, where they came from): a saved partition, or split names / tile-id files.

    With no set option at all, the store's partition ``default`` is used when it exists (and
    ``data.partition`` is set to it, so config.yaml and a resume name it); otherwise the splits
    named ``labeled`` / ``unlabeled`` / ``val``. Every problem is reported in one error.
    """
    d = cfg.data
    url = d.store if store is not None else None
    given = [k for k in SETS if getattr(d, k) is not None]
    origin = ""
    unnamed = d.partition is None and not given and store is not None
    if unnamed and DEFAULT_NAME in list_partitions(store.url):
        d.partition = DEFAULT_NAME
        origin = (
            f"partition {DEFAULT_NAME!r} saved in the store (no --partition, --labeled, "
            "--unlabeled or --val given)"
        )
    if d.partition is not None:
        if store is None:
            raise DataCheckError(
                f"data.partition {d.partition!r} is saved in a store: pass "
                "--store URL (or name the sets with --labeled/--unlabeled/--val)"
            )
        sets = read_partition(store.url, d.partition).indices(tiles, store.url)
        check_splits(tiles, sets, splits_fix(url))
        return sets, origin or f"partition {d.partition!r} of the store (--partition)"
    specs = {k: getattr(d, k) if getattr(d, k) is not None else k for k in SETS}
    sets = select_sets(tiles, specs, splits_fix(url))
    shown = ", ".join(f"{k}={specs[k]!r}" for k in SETS)
    return sets, f"splits / tile-id files {shown}"


def run_teachers(cfg: TrainConfig, store: Any) -> tuple[list[TeacherConfig], str]:
    """The run's teachers by name, and where they came from (branches: `resolve_branches`)."""
    if not cfg.distill.enabled:
        return [], "off"
    if cfg.model.teachers is not None:
        return _stored_teachers(cfg, store), "as named (--teacher / model.teachers)"
    names = list(store.schema.teacher_names) if store is not None else []
    if not names:
        raise DataCheckError(
            f"store {cfg.data.store} holds no teacher to distil from: extract "
            "one (featcache extract --teacher NAME), or train plain FixMatch "
            "with --no-distill"
        )
    return [TeacherConfig(n) for n in names], "every teacher the store holds"


def _stored_teachers(cfg: TrainConfig, store: Any) -> list[TeacherConfig]:
    """The named teachers under their stored names in cached mode (``timm:m`` → ``timm:m:3``)."""
    teachers = list(cfg.model.teachers or [])
    if not cfg.reads_cache or store is None:
        return teachers
    try:
        return [replace(t, name=resolve_teacher_name(store.schema, t.name)) for t in teachers]
    except MissingTeacherError as err:
        raise DataCheckError(str(err)) from None


def resolve_branches(cfg: TrainConfig, store: Any, online: dict[str, Any] | None) -> None:
    """Give each teacher without a branch its default (`default_branch` of its spec's family).

    The spec is the online teacher's in online mode, else the store's; so the CLI, a YAML
    config and the store's own list all end on the same branch for the same teacher.
    """
    for t in cfg.model.teachers or []:
        if t.branch is not None:
            continue
        spec = online[t.name].spec if online else store.schema.teacher(t.name).spec
        t.branch = default_branch(spec.family)


def _target_mode_line(cfg: TrainConfig) -> str:
    """The target mode, with the scale blend of a source that blends levels."""
    blends = source_class(cfg.target_source).blends
    return cfg.distill.target_mode + (f" (scale blend {cfg.distill.scale_blend})" if blends else "")


def run_summary(cfg: TrainConfig, data: RunData, method: Any) -> list[str]:
    """The run's first lines: method or teachers, sets, student weights, recipe departures.

    ``method``: the run's method class (``trainer.methods``).
    """
    teachers = cfg.teacher_list
    if not method.distils:
        lines = [f"method {method.name}: {method.summary}"]
    elif not teachers:
        lines = ["distillation: off (--no-distill): plain FixMatch, no teacher"]
    else:
        lines = [
            f"distillation: {len(teachers)} teacher(s), {data.teachers_origin}; {cfg.mode} targets"
        ]
        for t in teachers:
            where = (
                "levels " + ", ".join(lv.key for lv in data.levels[t.name])
                if cfg.reads_cache
                else "computed online"
            )
            lines.append(f"  {t.name}: branch {t.branch}, {where}")
        if cfg.reads_cache:
            lines.append(f"  target mode: {_target_mode_line(cfg)}")
    lines.append(f"sets: {data.sets_origin}: {_sets_line(data.sets, data.tiles)}")
    if not method.unlabeled:
        lines.append(f"  (method {method.name} trains on the labeled set only; unlabeled unused)")
    lines.append(_student_line(cfg))
    lines += method.data_lines(cfg, data)
    lines += _padding_warning(cfg, data.tile_size)
    return lines + departure_lines(cfg, data_departures(data))


def _padding_warning(cfg: TrainConfig, tile: int) -> list[str]:
    """A WARNING line when the tiles are too small for the crop: even the largest zoom of the
    view draw leaves padding in every view (512 px tiles and the official 518 crop do not)."""
    largest = int(cfg.data.scale_range[1] * tile)
    if largest >= cfg.crop_size:
        return []
    patch = METHOD_PATCH.get(cfg.method, 14)
    fit = max(patch, tile // patch * patch)
    padding = 1 - (largest / cfg.crop_size) ** 2
    return [
        f"WARNING: tiles are {tile} px and views --crop {cfg.crop_size} px: even at the largest "
        f"zoom ({largest} px) every view is at least {padding:.0%} padding; pass --crop {fit} "
        "(a multiple of the student's patch, at most the tile side) for these tiles, or "
        "extract larger tiles (extract --tile-size)"
    ]


def data_departures(data: RunData) -> list[Departure]:
    """Departures the data carries: tiles cut by another edge rule than the official data's."""
    if data.store is not None:
        dataset, rule = data.store.schema.dataset, data.store.schema.edge_rule
    elif getattr(data.reader, "source", None) is not None:
        dataset, rule = data.reader.source.dataset, data.reader.source.edge_rule
    else:
        return []
    found = edge_rule_departure(dataset, rule)
    out = [Departure("data.edge_rule", *found, kind="data")] if found else []
    if data.store is not None and data.store.schema.padding_tokens == "cropped":
        out.append(
            Departure(
                "store padding_tokens",
                "cropped (extract --crop-padding)",
                "kept",
                "a CutMix cell that mixes a valid token with a padding one takes the level's edge "
                "token where the official canvas has the teacher's token for black padding",
                kind="cache",
            )
        )
    return out


def _co2s_student_line(cfg: TrainConfig) -> str:
    """Co2S's two students and where their backbone weights come from (random said out loud)."""
    if cfg.model.tiny:
        return "students: tiny CLIP and DINOv3 test networks (--tiny)"
    parts = [
        f"{name} ({'weights ' + w if w else 'RANDOM init'})"
        for name, w in (
            ("CLIP ViT-B/16", cfg.co2s.clip_weights),
            ("DINOv3 ViT-B/16", cfg.co2s.dino_weights),
        )
    ]
    line = f"students: {parts[0]}, {parts[1]}; backbones train {cfg.co2s.finetune!r}"
    if cfg.co2s.clip_weights and cfg.co2s.dino_weights:
        return line
    return (
        f"WARNING: {line} (--random-weights; no --clip-weights / --dino-weights): expect far "
        "lower accuracy than from pretrained weights"
    )


def _student_line(cfg: TrainConfig) -> str:
    """Where the student's backbone weights come from; random init is said out loud."""
    if cfg.method in STUDENT_LINES:
        return STUDENT_LINES[cfg.method](cfg)
    if cfg.model.tiny:
        return "student: tiny test network (--tiny)"
    arch = cfg.model.student.get("arch", StudentConfig.arch)
    if cfg.model.pretrained is None:
        return (
            f"WARNING: student: {arch}, RANDOM init (--random-weights; no --pretrained): expect "
            "far lower accuracy than from DINOv2 weights"
        )
    return f"student: {arch}, weights {cfg.model.pretrained}"


# Per method, its own student line (default: the DINOv2 student's, `_student_line`).
STUDENT_LINES = {"co2s": _co2s_student_line}


def open_data(cfg: TrainConfig, pinned: dict[str, Any] | None = None) -> RunData:
    """Open the store / source of ``cfg`` and run every pre-training check.

    Fills in what the config leaves to the data: ``cfg.model.teachers`` (every teacher the
    store holds when unset; [] without distillation) and ``cfg.data.partition`` (``default``
    when the store has it and no set was named).

    Args:
        cfg: The run config (updated in place, see above).
        pinned: ``{"fingerprint", "schema"}`` of the store a resumed run started with.
    """
    store = None
    if cfg.data.store:
        from featstore import open_store

        store = open_store(cfg.data.store)
        fp = (pinned or {}).get("fingerprint") or cfg.data.fingerprint
        check_fingerprint(store, fp, (pinned or {}).get("schema"))
    if store is not None and (store.schema.store_pixels or not cfg.data.source):
        if not store.schema.store_pixels:
            raise DataCheckError(
                f"store {cfg.data.store} holds no pixels (store_pixels=False); "
                "pass the image source too (--source PATH)"
            )
        reader: Any = store
        class_names, ignore = store.schema.class_names, store.schema.ignore_index
        tile_size, base_size = store.schema.tile_size, store.schema.base_size
    else:
        reader = _open_source(cfg)
        class_names, ignore = reader.class_names, reader.ignore_index
        tile_size, base_size = reader.tile_size, cfg.crop_size
    tiles = list(reader.tiles)
    sets, sets_origin = select_run_sets(cfg, tiles, store)
    cfg.model.teachers, teachers_origin = run_teachers(cfg, store)
    data = RunData(
        reader,
        store,
        tiles,
        sets,
        tuple(class_names),
        0,
        int(ignore),
        int(tile_size),
        int(base_size),
        sets_origin=sets_origin,
        teachers_origin=teachers_origin,
    )
    if store is not None:
        check_done(store, sorted({i for s in sets.values() for i in s}))
    if cfg.reads_cache:
        names = [t.name for t in cfg.model.teachers]
        data.levels = resolve_levels(store, names, cfg.distill.levels)
    if store is not None:  # before any read: a mis-typed array would be misread, not fail
        check_store_arrays(store, data.levels)
        if not cfg.data.skip_bad_tiles:  # skipped tiles are logged as they are read
            check_store_files(store, data.levels, sorted({i for s in sets.values() for i in s}))
    if cfg.reads_cache:
        # a view bank with p_bank = 1 never reads the levels (bank views keep their padding)
        bank_only = source_class(cfg.target_source).needs_bank and cfg.distill.p_bank >= 1
        check_unmasked_padding(store, data.levels, cfg.distill.masked or bank_only)
        data.level_geoms = {
            (n, lv.key): store.level_geometry(n, lv.key)
            for n, lvs in data.levels.items()
            for lv in lvs
        }
    if cfg.reads_cache and source_class(cfg.target_source).needs_bank:
        check_view_bank(cfg, store, sets["labeled"] + sets["unlabeled"])
    tops = _scan_masks(cfg, data)
    checked = data.sets["labeled"] + data.sets["val"]
    data.num_classes = check_classes(
        cfg.model.num_classes, class_names, reader, checked, data.ignore_index, tops
    )
    check_labeled(tops, data.sets["labeled"], sets_origin, cfg.data.store, data.ignore_index)
    return data


def _scan_masks(cfg: TrainConfig, data: RunData) -> dict[int, int]:
    """`mask_labels` of the labeled and val tiles; under ``--skip-bad-tiles`` the tiles that
    fail their checksum (masks, and val images: evaluation reads them) are logged and dropped.
    """
    checked = data.sets["labeled"] + data.sets["val"]
    if not cfg.data.skip_bad_tiles:
        return mask_labels(data.reader, checked, None, data.ignore_index)
    bad: set[int] = set()

    def on_bad(err: TileDataError) -> None:
        bad.add(err.index)
        log_bad_tile(err)

    tops = mask_labels(data.reader, checked, on_bad, data.ignore_index)
    for i in data.sets["val"]:
        try:
            data.reader.read_image(i)
        except TileDataError as err:
            on_bad(err)
    data.sets = {k: [i for i in v if i not in bad] for k, v in data.sets.items()}
    if not data.sets["labeled"]:
        raise DataCheckError(
            f"--skip-bad-tiles left no labeled tile: every one fails its checksum; check the "
            f"store with `featcache verify {cfg.data.store}` and re-extract it"
        )
    return tops


def check_view_bank(cfg: TrainConfig, store: Any, train_ids: list[int]) -> None:
    """Refuse ``view_bank`` mode without a usable bank: none, other crop, tiles not banked."""
    url = cfg.data.store
    if store is None or not store.has_bank:
        raise DataCheckError(
            f"--target-mode view_bank needs a store with a view bank; {url} has none: "
            f"build one with `featcache bank {url} --k 8`, or use --target-mode warp"
        )
    bank = store.bank
    if bank.spec.crop != cfg.crop_size:
        raise DataCheckError(
            f"the view bank of {url} holds {bank.spec.crop} px views but "
            f"crop_size is {cfg.crop_size}: set crop_size {bank.spec.crop} or "
            f"rebuild the bank with crop={cfg.crop_size}"
        )
    names = [t.name for t in cfg.model.teachers]
    if not set(names) & set(bank.teachers):
        raise DataCheckError(
            f"none of the distillation teachers {names} has a view bank in "
            f"{url} (banked: {list(bank.teachers)}); bank them or use 'warp'"
        )
    done = bank.done()
    missing = [store.tiles[i].tile_id for i in train_ids if not done[i]]
    if missing:
        raise DataCheckError(
            f"the view bank of {url} is incomplete: {len(missing)} training "
            f"tiles have no bank views yet, e.g. {missing[:10]}; resume "
            "build_view_bank with the same arguments before training"
        )


def student_config(cfg: TrainConfig, num_classes: int, channels: dict[str, int]) -> StudentConfig:
    """The student architecture of a run (teachers sized by their channels)."""
    heads = tuple(TeacherHead(t.name, int(channels[t.name]), t.branch) for t in cfg.model.teachers)
    kwargs: dict[str, Any] = dict(TINY_STUDENT) if cfg.model.tiny else {}
    kwargs.update(cfg.model.student)
    for key in ("layers", "out_channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return StudentConfig(
        num_classes=num_classes,
        img_size=cfg.crop_size,
        teachers=heads,
        grad_checkpointing=cfg.runtime.grad_checkpointing,
        backbone_weights=cfg.model.pretrained,
        random_weights=cfg.model.random_weights or cfg.model.tiny,
        **kwargs,
    )


def teacher_channels(
    cfg: TrainConfig, data: RunData, online: dict[str, Any] | None
) -> dict[str, int]:
    """Token width of each configured teacher (store spec, or the online teacher's spec)."""
    if online:
        return {name: int(t.spec.channels) for name, t in online.items()}
    return {
        t.name: int(data.store.schema.teacher(t.name).spec.channels) for t in cfg.model.teachers
    }


def build_student(cfg: TrainConfig, data: RunData, online: dict[str, Any] | None) -> Student:
    """A fresh student (seeded by ``runtime.seed`` so every rank starts identical)."""
    torch.manual_seed(cfg.runtime.seed)
    return Student(student_config(cfg, data.num_classes, teacher_channels(cfg, data, online)))


@dataclass
class Loaders:
    """Datasets and samplers of the labeled and unlabeled streams."""

    ds_l: StoreDataset
    ds_u: StoreDataset | None
    sampler_l: EpochSampler
    sampler_u: EpochSampler | None
    per_epoch: int

    def epoch(self, cfg: TrainConfig, epoch: int, skip_iters: int) -> tuple[Any, Any]:
        """Loaders of ``epoch`` that start after ``skip_iters`` iterations (resume)."""
        out = []
        for ds, sampler, bs in (
            (self.ds_l, self.sampler_l, cfg.schedule.batch_labeled),
            (self.ds_u, self.sampler_u, cfg.schedule.batch_unlabeled),
        ):
            if ds is None or sampler is None:
                out.append(None)
                continue
            ds.set_epoch(epoch)
            sampler.set_epoch(epoch, skip_iters * bs)
            out.append(
                DataLoader(
                    ds,
                    batch_size=bs,
                    sampler=sampler,
                    collate_fn=collate,
                    num_workers=cfg.data.num_workers,
                    drop_last=True,
                    pin_memory=torch.cuda.is_available(),
                )
            )
        return out[0], out[1]


def build_source(
    cfg: TrainConfig, data: RunData, teachers: dict[str, Any] | None = None
) -> TargetSource:
    """The run's target source (``featviews.sources``): one registry lookup, by name."""
    sampling = ViewSampling(
        data.tile_size,
        cfg.crop_size,
        data.base_size,
        tuple(cfg.data.scale_range),
        cfg.data.flip_p,
        cfg.distill.scale_blend,
    )
    ctx = SourceContext(
        sampling,
        data.levels,
        data.level_geoms,
        data.store,
        cfg.distill.p_bank,
        teachers or {},
        cfg.distill.masked,
    )
    try:
        return make_source(cfg.target_source, ctx)
    except ValueError as err:
        raise DataCheckError(str(err)) from None


def build_loaders(
    cfg: TrainConfig, data: RunData, info: DistInfo, source: TargetSource, labeled_only: bool
) -> Loaders:
    """Labeled ids repeated to the unlabeled length (official); samplers sharded by rank.

    ``labeled_only``: the method trains on labeled views alone (no unlabeled loader).
    """
    lab, unl = data.sets["labeled"], data.sets["unlabeled"]
    use_u = bool(unl) and cfg.schedule.batch_unlabeled > 0 and not labeled_only
    n = len(unl) if use_u else len(lab)
    seed, skip = cfg.runtime.seed, cfg.data.skip_bad_tiles
    ds_l = StoreDataset(data.reader, repeat_to(lab, n), source, True, seed, stream=0, skip_bad=skip)
    ds_u = (
        StoreDataset(data.reader, unl, source, False, seed, stream=1, skip_bad=skip)
        if use_u
        else None
    )
    s_l = EpochSampler(len(ds_l), seed, info.rank, info.world)
    s_u = EpochSampler(len(ds_u), seed + 7919, info.rank, info.world) if ds_u else None
    per = iters_per_epoch(len(ds_l), info.world, cfg.schedule.batch_labeled)
    if ds_u is not None:
        per = min(per, iters_per_epoch(len(ds_u), info.world, cfg.schedule.batch_unlabeled))
    if per < 1:
        per_rank = {"labeled": iters_per_epoch(len(ds_l), info.world, 1)}
        batch = {"labeled": cfg.schedule.batch_labeled, "unlabeled": cfg.schedule.batch_unlabeled}
        if ds_u is not None:
            per_rank["unlabeled"] = iters_per_epoch(len(ds_u), info.world, 1)
        raise DataCheckError(batch_fit_message(per_rank, batch, info.world))
    return Loaders(ds_l, ds_u, s_l, s_u, per)


def store_stats(
    cfg: TrainConfig, data: RunData, device: torch.device
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-channel target statistics for standardisation (None when off)."""
    if not cfg.distill.standardize:
        return None
    if data.store is None:
        raise DataCheckError("distill.standardize needs a store (its statistics); pass --store")
    out = {}
    for t in cfg.model.teachers:
        mean, std = data.store.stats(t.name, cfg.distill.level_stats)
        check_stats(data.store.url, t.name, cfg.distill.level_stats, mean, std)
        out[t.name] = (
            torch.as_tensor(mean, dtype=torch.float32, device=device),
            torch.as_tensor(std, dtype=torch.float32, device=device).clamp_min(1e-6),
        )
    return out


__all__ = [
    "Loaders",
    "RunData",
    "build_loaders",
    "build_source",
    "build_student",
    "check_view_bank",
    "open_data",
    "resolve_branches",
    "run_summary",
    "run_teachers",
    "select_run_sets",
    "splits_fix",
    "store_stats",
    "student_config",
    "teacher_channels",
]
