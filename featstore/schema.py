"""Frozen, JSON-round-trippable description of a store: teachers, levels, codecs, tiles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from featstore.codecs import get_codec
from featstore.constants import DEFAULT_CROP, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SCALE_RANGE
from featstore.errors import MissingTeacherError

FORMAT_VERSION = 1
FAMILIES = ("timm", "open_clip")


def _floats(values: Iterable[float], n: int, what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n:
        raise ValueError(f"{what} needs {n} values, got {len(out)}")
    return out


@dataclass(frozen=True)
class ResizeSpec:
    """How images are resized: ``torch.nn.functional.interpolate`` arguments on [0, 1] floats."""

    mode: str = "bilinear"
    align_corners: bool = False
    antialias: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"mode": self.mode, "align_corners": self.align_corners, "antialias": self.antialias}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResizeSpec:
        """Inverse of ``to_dict``."""
        return cls(str(d["mode"]), bool(d["align_corners"]), bool(d["antialias"]))


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines a frozen teacher's output tokens.

    ``input_size`` is the teacher input in px for a ``base_size`` canvas; ``stride`` is input px
    per output token. ``extra`` holds sorted ``(key, value)`` string pairs; recognised keys:
    ``snap_to_stride="1"`` (ViTs: input snapped down to a stride multiple) and
    ``grid_rounding="floor"`` (grid = input // stride instead of the default ceil).
    """

    name: str
    family: str
    arch: str
    weights: str | None
    weights_sha256: str | None
    input_size: int
    stride: int
    channels: int
    layer: str = "last"
    resize: ResizeSpec = field(default_factory=ResizeSpec)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    prefix_tokens_dropped: int = 0
    final_norm: bool = True
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(
                f"teacher name {self.name!r} must be non-empty, without '/' or a leading '.'"
            )
        if self.family not in FAMILIES:
            raise ValueError(f"teacher {self.name!r}: family {self.family!r} not in {FAMILIES}")
        for attr in ("input_size", "stride", "channels"):
            if int(getattr(self, attr)) < 1:
                raise ValueError(f"teacher {self.name!r}: {attr} must be >= 1")
        object.__setattr__(self, "mean", _floats(self.mean, 3, "TeacherSpec.mean"))
        object.__setattr__(self, "std", _floats(self.std, 3, "TeacherSpec.std"))
        extra = tuple(sorted((str(k), str(v)) for k, v in self.extra))
        object.__setattr__(self, "extra", extra)

    @property
    def extra_dict(self) -> dict[str, str]:
        """``extra`` as a dict."""
        return dict(self.extra)

    def input_px(self, canvas: int, base_size: int) -> int:
        """Teacher input size (px) for a square ``canvas`` rendered against ``base_size``."""
        px = round(canvas * self.input_size / base_size)
        if self.extra_dict.get("snap_to_stride") == "1":
            px = max(self.stride, px // self.stride * self.stride)
        return int(px)

    def grid_size(self, canvas: int, base_size: int) -> int:
        """Output tokens per side for that canvas (ceil unless ``grid_rounding=floor``)."""
        px = self.input_px(canvas, base_size)
        if self.extra_dict.get("grid_rounding") == "floor":
            return max(1, px // self.stride)
        return -(-px // self.stride)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["resize"] = self.resize.to_dict()
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["extra"] = [list(kv) for kv in self.extra]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSpec:
        """Inverse of ``to_dict``."""
        kw = dict(d)
        kw["resize"] = ResizeSpec.from_dict(kw["resize"])
        kw["extra"] = tuple(tuple(kv) for kv in kw.get("extra", ()))
        return cls(**kw)


@dataclass(frozen=True)
class LevelSpec:
    """A cached rendering of the tile: ``scale`` of ``base_size``, optionally h-flipped first."""

    scale: float
    flipped: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"LevelSpec.scale must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "flipped", bool(self.flipped))

    @property
    def key(self) -> str:
        """Array name: ``"s1.00"``, ``"s0.50f"`` (more digits only when 2 are not exact)."""
        s = f"{self.scale:.2f}" if round(self.scale, 2) == self.scale else f"{self.scale:.6g}"
        return f"s{s}{'f' if self.flipped else ''}"

    @classmethod
    def from_key(cls, key: str) -> LevelSpec:
        """Parse ``"s1.00"`` / ``"s1.00f"``."""
        flipped = key.endswith("f")
        body = key[1:-1] if flipped else key[1:]
        if not key.startswith("s") or not body:
            raise ValueError(f"bad level key {key!r}; expected like 's1.00' or 's0.50f'")
        try:
            return cls(float(body), flipped)
        except ValueError as err:
            raise ValueError(f"bad level key {key!r}; expected like 's1.00' or 's0.50f'") from err

    def render_px(self, base_size: int) -> int:
        """Rendered tile size in px: ``round(scale * base_size)``."""
        return int(round(self.scale * base_size))

    def canvas_px(self, base_size: int) -> int:
        """Canvas side: the render padded right/bottom up to ``base_size``."""
        return max(self.render_px(base_size), base_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"scale": self.scale, "flipped": self.flipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LevelSpec:
        """Inverse of ``to_dict``."""
        return cls(float(d["scale"]), bool(d["flipped"]))


@dataclass(frozen=True)
class TileRecord:
    """One tile: its id, where it came from (window = row, col, h, w in the source), split, hash."""

    tile_id: str
    source: str
    window: tuple[int, int, int, int]
    split: str
    pixel_hash: str
    transform: tuple[float, ...] | None = None
    crs: str | None = None

    def __post_init__(self) -> None:
        window = tuple(int(v) for v in self.window)
        if len(window) != 4:
            raise ValueError(f"tile {self.tile_id!r}: window must be (row, col, h, w)")
        object.__setattr__(self, "window", window)
        if self.transform is not None:
            object.__setattr__(self, "transform", _floats(self.transform, 6, "transform"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["window"] = list(self.window)
        d["transform"] = None if self.transform is None else list(self.transform)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileRecord:
        """Inverse of ``to_dict``."""
        return cls(**d)


@dataclass(frozen=True)
class TeacherEntry:
    """A teacher in a store: its spec, the cached levels and the codec parameters."""

    spec: TeacherSpec
    levels: tuple[LevelSpec, ...] = (LevelSpec(1.0),)
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "fp16"})

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        keys = [lv.key for lv in levels]
        if not levels or len(set(keys)) != len(keys):
            raise ValueError(f"teacher {self.spec.name!r}: levels must be non-empty and unique")
        object.__setattr__(self, "levels", levels)
        # Canonical codec dict (defaults filled in) so equal codecs fingerprint equally.
        object.__setattr__(self, "codec", get_codec(self.codec).to_dict())

    def level(self, key: str) -> LevelSpec:
        """The level with that key (KeyError when absent)."""
        for lv in self.levels:
            if lv.key == key:
                return lv
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "spec": self.spec.to_dict(),
            "levels": [lv.to_dict() for lv in self.levels],
            "codec": dict(self.codec),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherEntry:
        """Inverse of ``to_dict``."""
        return cls(
            TeacherSpec.from_dict(d["spec"]),
            tuple(LevelSpec.from_dict(lv) for lv in d["levels"]),
            dict(d["codec"]),
        )


@dataclass(frozen=True)
class BankSpec:
    """An exact view bank: ``k`` views per tile drawn with ``rule``, teachers run on each view.

    Views follow the official RS-MTDF draw (``S`` uniform integer in ``[int(lo T), int(hi T)]``,
    pad right/bottom to ``crop``, offsets uniform in ``[0, max(S, crop) - crop]``, h-flip with
    ``flip_p``), seeded per tile by ``(seed, tile index)``. ``teachers`` empty = every teacher.
    """

    k: int
    seed: int = 0
    crop: int = DEFAULT_CROP
    scale_range: tuple[float, float] = SCALE_RANGE
    flip_p: float = 0.5
    teachers: tuple[str, ...] = ()
    rule: str = "rs-mtdf-official"

    def __post_init__(self) -> None:
        if int(self.k) < 1 or int(self.crop) < 1:
            raise ValueError(f"BankSpec.k and crop must be >= 1, got k={self.k}, crop={self.crop}")
        lo, hi = _floats(self.scale_range, 2, "BankSpec.scale_range")
        if not 0 < lo <= hi:
            raise ValueError(f"BankSpec.scale_range must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise ValueError(f"BankSpec.flip_p must be in [0, 1], got {self.flip_p}")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "scale_range", (lo, hi))
        object.__setattr__(self, "flip_p", float(self.flip_p))
        object.__setattr__(self, "teachers", tuple(str(t) for t in self.teachers))

    def size_range(self, tile_size: int) -> tuple[int, int]:
        """Inclusive range of the zoomed size ``S`` for tiles of ``tile_size`` px."""
        lo, hi = self.scale_range
        return int(lo * tile_size), int(hi * tile_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "k": self.k,
            "seed": self.seed,
            "crop": self.crop,
            "scale_range": list(self.scale_range),
            "flip_p": self.flip_p,
            "teachers": list(self.teachers),
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BankSpec:
        """Inverse of ``to_dict``."""
        kw = dict(d)
        kw["scale_range"] = tuple(kw["scale_range"])
        kw["teachers"] = tuple(kw.get("teachers", ()))
        return cls(**kw)


@dataclass(frozen=True)
class StorePart:
    """Teacher levels added to a finished store (``extract --add``), with their own bookkeeping.

    The arrays of ``levels`` (``(teacher, level key)`` pairs) are covered by
    ``parts/<name>/checksum`` and ``parts/<name>/done`` instead of the root ``checksum`` and
    ``done``, so adding them writes none of the store's existing chunks. Where the levels are
    kept is layout, not content: parts are left out of the fingerprint, so a store grown by
    additions has the fingerprint of a fresh extraction of the same teachers and levels.
    """

    name: str
    levels: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        levels = tuple((str(t), str(k)) for t, k in self.levels)
        if not self.name or "/" in self.name or not levels:
            raise ValueError(f"StorePart {self.name!r} needs a plain name and at least one level")
        object.__setattr__(self, "levels", levels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"name": self.name, "levels": [list(tk) for tk in self.levels]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StorePart:
        """Inverse of ``to_dict``."""
        return cls(str(d["name"]), tuple(tuple(tk) for tk in d["levels"]))


# Recorded statistics, not identity: left out of the fingerprint (see ``fingerprint``).
# Left out of the fingerprint: they describe the data or how to report on it, not what is
# computed, so recording them never blocks resuming an identical extraction.
# ``edge_rule`` too: the tile ids (window offsets) and pixel hashes already pin how scenes were cut.
# ``parts`` too: they say where added levels are bookkept, not what the store holds.
_STATS_FIELDS = ("label_stats", "eval_protocol", "edge_rule", "parts")

# What a level stores of its canvas: "kept" every token of the padded canvas (official
# behaviour, and every store written before the choice existed); "cropped" only the top-left
# tokens a tile point can read (``featstore.layout.stored_geometry``).
PADDING_TOKENS = ("kept", "cropped")


def default_class_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    """Fixed display colours for ``n`` classes without a palette: the Pascal VOC colour map.

    VOC's bit-interleaved map is deterministic, distinct for all 256 ids and familiar from
    mmseg/torchvision, so the same class id always gets the same colour.
    """
    colours = []
    for k in range(n):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


@dataclass(frozen=True)
class StoreSchema:
    """What a store holds (everything except the tile list).

    The label-convention fields describe the class table (empty / None in stores written before
    they existed): ``class_colors`` the display colour ``[r, g, b]`` of each class (the dataset's
    palette), ``class_sources`` what each class id was in the source masks (a value or a colour),
    ``label_rule`` how source masks became ids, ``label_stats`` the stored masks' pixel counts
    ``{"class_pixels": [K], "ignore_pixels", "labeled_tiles", "unlabeled_tiles"}``.
    ``eval_protocol`` the dataset's test protocol ``{"name", "exclude": [ids], "source"}``
    (`featstore.protocols.Protocol`; None in stores written before it was kept).
    ``edge_rule`` the tiling edge rule the scenes were cut with (``pipelines.sources.tiling``;
    ``""`` in stores written before it was kept).
    ``padding_tokens`` what zoom < 1 levels store of their padded canvas (``PADDING_TOKENS``;
    ``"kept"`` in stores written before it was recorded; extraction writes ``"cropped"`` unless
    ``--keep-padding``).
    """

    dataset: str
    tile_size: int
    base_size: int = DEFAULT_CROP
    class_names: tuple[str, ...] = ()
    ignore_index: int = IGNORE_INDEX
    tiles_per_shard: int = 64
    teachers: tuple[TeacherEntry, ...] = ()
    store_pixels: bool = True
    bank: BankSpec | None = None
    class_colors: tuple[tuple[int, int, int], ...] = ()
    class_sources: tuple[str, ...] = ()
    label_rule: str = ""
    label_stats: dict[str, Any] | None = None
    eval_protocol: dict[str, Any] | None = None
    edge_rule: str = ""
    padding_tokens: str = "kept"
    parts: tuple[StorePart, ...] = ()

    def __post_init__(self) -> None:
        for attr in ("tile_size", "base_size", "tiles_per_shard"):
            if int(getattr(self, attr)) < 1:
                raise ValueError(f"StoreSchema.{attr} must be >= 1, got {getattr(self, attr)!r}")
        if self.padding_tokens not in PADDING_TOKENS:
            raise ValueError(
                f"StoreSchema.padding_tokens must be one of {PADDING_TOKENS}, "
                f"got {self.padding_tokens!r}"
            )
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "teachers", tuple(self.teachers))
        object.__setattr__(self, "parts", tuple(self.parts))
        self._check_label_fields()
        names = [t.spec.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"StoreSchema.teachers has duplicate names: {names}")
        self._check_parts()
        if self.bank is not None:
            unknown = sorted(set(self.bank.teachers) - set(names))
            if unknown:
                raise ValueError(
                    f"BankSpec.teachers {unknown} are not teachers of the schema ({names}); "
                    "bank only stored teachers"
                )

    def _check_parts(self) -> None:
        """Every level a part names is a level of the schema, added by one part only."""
        have = {(t.spec.name, lv.key) for t in self.teachers for lv in t.levels}
        named = [tk for p in self.parts for tk in p.levels]
        unknown = sorted(set(named) - have)
        if unknown or len(set(named)) != len(named):
            raise ValueError(
                f"StoreSchema.parts name levels the schema lacks ({unknown}) or a level twice"
            )

    def _check_label_fields(self) -> None:
        colors = tuple(tuple(int(v) for v in c) for c in self.class_colors)
        object.__setattr__(self, "class_colors", colors)
        object.__setattr__(self, "class_sources", tuple(str(s) for s in self.class_sources))
        k = len(self.class_names)
        for attr in ("class_colors", "class_sources"):
            value = getattr(self, attr)
            if value and len(value) != k:
                raise ValueError(f"StoreSchema.{attr} has {len(value)} entries for {k} classes")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
            raise ValueError(f"StoreSchema.class_colors must be [r, g, b] in 0..255: {colors}")

    @property
    def display_colors(self) -> tuple[tuple[int, int, int], ...]:
        """Colour (r, g, b) to draw each class with: ``class_colors``, or for stores written
        before they were recorded, ``default_class_colors``."""
        return self.class_colors or default_class_colors(len(self.class_names))

    @property
    def bank_teachers(self) -> tuple[str, ...]:
        """Teachers with a view bank (all of them when ``bank.teachers`` is empty)."""
        if self.bank is None:
            return ()
        return self.bank.teachers or self.teacher_names

    def part_of(self, teacher: str, key: str) -> StorePart | None:
        """The part that added level ``key`` of ``teacher`` (None: the original extraction)."""
        return next((p for p in self.parts if (teacher, key) in p.levels), None)

    def up_to_part(self, n: int) -> StoreSchema:
        """The schema as it was after the first ``n`` parts (0: the original extraction).

        Its fingerprint is the one the shards of that stage were written under (provenance).
        """
        later = {tk for p in self.parts[n:] for tk in p.levels}
        entries = []
        for entry in self.teachers:
            levels = tuple(lv for lv in entry.levels if (entry.spec.name, lv.key) not in later)
            if levels:
                entries.append(dataclasses.replace(entry, levels=levels))
        return dataclasses.replace(self, teachers=tuple(entries), parts=self.parts[:n])

    @property
    def teacher_names(self) -> tuple[str, ...]:
        """Teacher names in schema order."""
        return tuple(t.spec.name for t in self.teachers)

    def teacher(self, name: str) -> TeacherEntry:
        """The entry of teacher ``name``."""
        for t in self.teachers:
            if t.spec.name == name:
                return t
        raise MissingTeacherError(
            f"teacher {name!r} is not in the store (it has {list(self.teacher_names)}); "
            "extract it into the store or pick one of those"
        )

    def n_shards(self, n_tiles: int) -> int:
        """Number of shard groups for ``n_tiles`` tiles (the last may be partial)."""
        return -(-n_tiles // self.tiles_per_shard)

    def shard_range(self, k: int, n_tiles: int) -> range:
        """Tile indices of shard group ``k`` (``0 <= k < n_shards``; the last may be partial)."""
        tps = self.tiles_per_shard
        return range(k * tps, min((k + 1) * tps, n_tiles))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``bank`` and the label fields only when set, so stores without them
        keep their fingerprints)."""
        d = {
            "dataset": self.dataset,
            "tile_size": self.tile_size,
            "base_size": self.base_size,
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
            "tiles_per_shard": self.tiles_per_shard,
            "teachers": [t.to_dict() for t in self.teachers],
            "store_pixels": self.store_pixels,
        }
        if self.bank is not None:
            d["bank"] = self.bank.to_dict()
        if self.class_colors:
            d["class_colors"] = [list(c) for c in self.class_colors]
        if self.class_sources:
            d["class_sources"] = list(self.class_sources)
        if self.label_rule:
            d["label_rule"] = self.label_rule
        if self.label_stats is not None:
            d["label_stats"] = dict(self.label_stats)
        if self.eval_protocol is not None:
            d["eval_protocol"] = dict(self.eval_protocol)
        if self.edge_rule:
            d["edge_rule"] = self.edge_rule
        # "kept" is left out so that stores written before the field keep their fingerprints;
        # "cropped" is in the fingerprint (it changes the stored arrays' shapes).
        if self.padding_tokens != "kept":
            d["padding_tokens"] = self.padding_tokens
        if self.parts:
            d["parts"] = [p.to_dict() for p in self.parts]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSchema:
        """Inverse of ``to_dict``."""
        kw = dict(d)
        kw["class_names"] = tuple(kw["class_names"])
        kw["class_colors"] = tuple(tuple(c) for c in kw.get("class_colors", ()))
        kw["class_sources"] = tuple(kw.get("class_sources", ()))
        kw["teachers"] = tuple(TeacherEntry.from_dict(t) for t in kw["teachers"])
        if kw.get("bank") is not None:
            kw["bank"] = BankSpec.from_dict(kw["bank"])
        kw["parts"] = tuple(StorePart.from_dict(p) for p in kw.get("parts", ()))
        return cls(**kw)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _fingerprint_payload(schema: StoreSchema, tiles: Sequence[TileRecord]) -> dict[str, Any]:
    schema_dict = schema.to_dict()
    for attr in _STATS_FIELDS:
        schema_dict.pop(attr, None)
    return {
        "format_version": FORMAT_VERSION,
        "schema": schema_dict,
        "tiles": [[t.tile_id, t.pixel_hash] for t in tiles],
    }


def fingerprint(schema: StoreSchema, tiles: Sequence[TileRecord]) -> str:
    """sha256 of the canonical JSON of format version + schema + tile ids + pixel hashes.

    Recorded statistics (``label_stats``) are left out: they describe the data, they do not
    decide what is computed, so recording them never blocks resuming an identical extraction.
    """
    payload = _fingerprint_payload(schema, tiles)
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _leaves(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _leaves(value[k], f"{path}.{k}", out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _leaves(v, f"{path}[{i}]", out)
    else:  # scalars and lists of scalars (class names, mean, the tile list) are one field
        out[path] = value


def fingerprint_parts(schema: StoreSchema, tiles: Sequence[TileRecord]) -> dict[str, str]:
    """Short sha256 of each field the fingerprint hashes (``"schema.class_names"``, ...).

    Recorded beside the fingerprint so that ``verify_store`` can name the field that was edited
    instead of saying only that the fingerprint differs.
    """
    leaves: dict[str, Any] = {}
    payload = _fingerprint_payload(schema, tiles)
    for key in sorted(payload):
        _leaves(payload[key], key, leaves)
    return {k: _short_hash(v) for k, v in leaves.items()}


def _short_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


def dict_differences(old: Any, new: Any, path: str = "schema") -> list[str]:
    """Human-readable list of the leaves where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            if k not in old or k not in new:
                out.append(f"{path}.{k}: only in the {'new' if k not in old else 'stored'} schema")
            else:
                out += dict_differences(old[k], new[k], f"{path}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in dict_differences(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [f"{path}: stored {old!r} != requested {new!r}"]


__all__ = [
    "FORMAT_VERSION",
    "PADDING_TOKENS",
    "BankSpec",
    "LevelSpec",
    "ResizeSpec",
    "StorePart",
    "StoreSchema",
    "TeacherEntry",
    "TeacherSpec",
    "TileRecord",
    "canonical_json",
    "default_class_colors",
    "dict_differences",
    "fingerprint",
    "fingerprint_parts",
]
