"""Configuration of the extraction stage: one frozen dataclass plus parsers for CLI-style text.

The CLI parses options into `ExtractConfig`; library users build it directly. Every check that
needs no I/O happens in `ExtractConfig.validate`, so a bad option fails before anything is opened.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from featstore.codecs import CODECS, get_codec
from featstore.constants import DEFAULT_CODEC, DEFAULT_CROP, IGNORE_INDEX, MULTI_SCALES
from featstore.errors import CodecError, FeatcacheError


class ExtractConfigError(FeatcacheError, ValueError):
    """An extraction option is invalid; the message names the option and how to fix it."""


EDGE_RULES = ("exact", "overlap_last", "pad")  # = pipelines.sources.EDGE_RULES (a test keeps them)
_TCP_RE = re.compile(r"^tcp://[^:/]+:\d+$")

# MULTI_SCALES (featstore.constants) stays importable from here too: benchmarks read it as
# ``pipelines.config.MULTI_SCALES``.


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `run_extraction` needs.

    Attributes:
        source: Dataset folder / scene file understood by `pipelines.sources.open_source`.
        out: Store URL (local path or fsspec URL).
        layout: Source layout name, or "auto".
        split_file: Optional file that assigns tiles to splits.
        tile_size: Tile edge in source pixels.
        edge_rule: Tiling edge rule (``pipelines.sources.tiling.EDGE_RULES``); None: the
            layout's (LoveDA exact, Potsdam overlap_last, others pad). ``"pad"`` cuts Potsdam and
            DeepGlobe as DWL does for the official data.
        bands: 1-based source bands to use as RGB (None: the first three).
        teachers: Teacher registry names.
        weights: Teacher name -> weights path or pretrained tag (missing: registry default).
        tiny: Build tiny random-init teachers (tests, smoke runs).
        random_weights: Accept random init for full-size teachers without weights (refused
            otherwise; a teacher with default weights, e.g. efficientnet_lite0, still loads them).
        scales: Cached scales (render = round(scale * base_size)). Default (library and CLI
            alike): `MULTI_SCALES` + flip, which covers RS-MTDF's 0.5-2.0 rescale range (see
            BENCHMARKS.md for what each option buys); ``(1.0,)`` without flip is the cheapest.
        flip: Also cache an h-flipped copy of each scale.
        keep_padding: Store every token of a zoom < 1 level's padded canvas (official
            behaviour, the default). False (``--crop-padding``): store only the tokens a tile
            point can read (``StoreSchema.padding_tokens="cropped"``): targets of valid tokens
            are the same bit for bit, but a CutMix cell that mixes a valid token with a padding
            one takes the level's edge token where the kept store has the padding token.
        codec: Codec dict, e.g. {"name": "fp16"} or {"name": "pca", "k": 64}; any codec
            registered in ``featstore.codecs`` (``register_codec``).
        batch_size: Canvases per teacher forward.
        device: Torch device of the teachers.
        scheduler: "local" (this process), "local:N" (LocalCluster of N processes) or
            "tcp://host:port" (an existing dask scheduler).
        tiles_per_shard: Tiles per shard group (one task, one writer).
        store_pixels: Store images and masks beside the features.
        overwrite: Delete any existing store at `out` and start over (needed when its
            fingerprint differs; without it a same-fingerprint store is resumed). Only a
            featcache store is ever deleted.
        add: Add the teachers and levels that the finished store at `out` lacks, in place
            (`pipelines.incremental.run_addition`): what it holds is kept byte for byte and
            not recomputed; given teachers it already holds must have their stored settings.
        break_lock: Remove another writer's lock on `out` (`featcache.lock`) and go on; for a
            lock left by a dead process on another host (same-host stale locks are taken over).
        threads: Torch intra-op threads per process. Fixed (not "all cores") so that a resumed or
            distributed run computes bit-identical features to an uninterrupted one.
        base_size: Canvas edge of the scale-1 rendering (the trainer's crop size).
        limit: Only the first N tiles of the source (smoke runs); None for all.
        classes: Class names of a generic layout: comma-separated, or a file with one name per
            line (None: classes.txt beside the data, or the --palette names).
        reduce_zero_label: Generic index masks: True = source 0 is ignore and v -> id v-1;
            False = values are ids; None = not stated (ambiguous masks warn or are refused).
        ignore_index: Generic index masks: one more source value that means ignore (255 always
            does).
        palette: Generic colour-coded masks: palette file, one `NAME R G B` line per class in id
            order (`ignore R G B` marks ignored colours), or JSON {"NAME": [R, G, B], ...}.
    """

    source: str
    out: str
    layout: str = "auto"
    split_file: str | None = None
    tile_size: int = 512
    edge_rule: str | None = None
    bands: tuple[int, ...] | None = None
    teachers: tuple[str, ...] = ("dinov2_vitb14",)
    weights: dict[str, str] = field(default_factory=dict)
    tiny: bool = False
    random_weights: bool = False
    scales: tuple[float, ...] = MULTI_SCALES
    flip: bool = True
    keep_padding: bool = True
    codec: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_CODEC})
    batch_size: int = 8
    device: str = "cpu"
    scheduler: str = "local"
    tiles_per_shard: int = 16
    store_pixels: bool = True
    overwrite: bool = False
    add: bool = False
    break_lock: bool = False
    threads: int = 1
    base_size: int = DEFAULT_CROP
    limit: int | None = None
    classes: str | None = None
    reduce_zero_label: bool | None = None
    ignore_index: int | None = None
    palette: str | None = None

    def validate(self) -> ExtractConfig:
        """Check option values (no I/O) and return self; raise `ExtractConfigError` otherwise."""
        if not self.teachers:
            raise ExtractConfigError(
                "no teacher given: pass at least one --teacher NAME (or teachers: in --config)"
            )
        if len(set(self.teachers)) != len(self.teachers):
            raise ExtractConfigError(f"--teacher names repeat: {list(self.teachers)}")
        unknown = sorted(set(self.weights) - set(self.teachers))
        if unknown:
            raise ExtractConfigError(
                f"--weights given for {unknown}, which are not among "
                f"--teacher {list(self.teachers)}"
            )
        if not self.scales or any(not (0.0 < s <= 8.0) for s in self.scales):
            raise ExtractConfigError(f"--scales must be in (0, 8], got {list(self.scales)}")
        if len(set(self.scales)) != len(self.scales):
            raise ExtractConfigError(f"--scales repeat: {list(self.scales)}")
        _check_positive("batch_size", self.batch_size)
        _check_positive("tiles_per_shard", self.tiles_per_shard)
        _check_positive("tile_size", self.tile_size)
        if self.edge_rule is not None and self.edge_rule not in EDGE_RULES:
            raise ExtractConfigError(
                f"--edge-rule {self.edge_rule!r} is unknown; choose one of {', '.join(EDGE_RULES)}"
            )
        _check_positive("base_size", self.base_size)
        _check_positive("threads", self.threads)
        if self.limit is not None:
            _check_positive("limit", self.limit)
        if self.ignore_index is not None and not 0 <= self.ignore_index <= IGNORE_INDEX:
            raise ExtractConfigError(
                f"--ignore-index {self.ignore_index} is not an 8-bit mask value; give 0..255"
            )
        parse_scheduler(self.scheduler)
        _check_codec(self.codec)
        self._check_add()
        return self

    def _check_add(self) -> None:
        if not self.add:
            return
        if self.overwrite:
            raise ExtractConfigError(
                "--add keeps the store and adds to it, --overwrite deletes it: give one of them"
            )
        if self.scheduler != "local":
            raise ExtractConfigError(
                f"--add runs in this process; drop --scheduler {self.scheduler} (or use local)"
            )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); also the key of the per-worker model cache."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        option = "--" + name.replace("_", "-")
        raise ExtractConfigError(f"{option} must be a positive integer, got {value!r}")


def codec_choices() -> str:
    """The codec names ``--codec`` accepts, read from featstore's registry at call time.

    Read when asked, not copied at import: a codec registered later (``register_codec``) is
    accepted like the built-in ones.
    """
    return ", ".join(f"{n}:K" if _cli_param(n) else n for n in sorted(CODECS))


def _cli_param(name: str) -> str | None:
    """The integer parameter ``--codec NAME:K`` sets (the codec's ``cli_param``), or None."""
    return getattr(CODECS.get(name), "cli_param", None)


def _check_codec(codec: dict[str, Any]) -> None:
    name = codec.get("name")
    if name not in CODECS:
        raise ExtractConfigError(f"--codec {name!r} is unknown; choose one of {codec_choices()}")
    param = _cli_param(name)
    if param and (not isinstance(codec.get(param), int) or codec[param] < 1):
        raise ExtractConfigError(
            f"--codec {name} needs a positive {param}, e.g. {name}:64; got {codec}"
        )
    try:  # the registry's factory is the judge of its parameters
        get_codec(codec)
    except CodecError as err:
        raise ExtractConfigError(f"--codec {name}: {err}") from err


def parse_codec(text: str) -> dict[str, Any]:
    """Parse a registered codec name ("fp16", "int8", ...) or "pca:K" into a codec dict.

    Codecs with a ``cli_param`` (pca, pca-int8: the component count k) take it as ``NAME:K``
    or ``NAME:k=K``; other codecs are named bare, with their factory's defaults.
    """
    name, _, arg = text.strip().partition(":")
    if name not in CODECS:
        raise ExtractConfigError(f"--codec {text!r} is unknown; choose one of {codec_choices()}")
    param = _cli_param(name)
    if param is None:
        if arg:
            with_arg = ", ".join(f"{n}:K" for n in sorted(CODECS) if _cli_param(n))
            raise ExtractConfigError(
                f"--codec {text!r}: {name} takes no argument (only {with_arg} do); "
                f"write --codec {name}"
            )
        return {"name": name}
    value = arg.removeprefix(f"{param}=")
    if not value.isdigit() or int(value) < 1:
        raise ExtractConfigError(
            f"--codec {text!r}: write {name}:K with K >= 1 (its {param}), e.g. {name}:64"
        )
    return {"name": name, param: int(value)}


def parse_scales(text: str) -> tuple[float, ...]:
    """Parse "1,2" or "0.5, 1" into a tuple of floats."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ExtractConfigError(
            f"--scales {text!r}: write comma-separated numbers, e.g. 1,2"
        ) from None


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """Parse "1,2,3" (1-based band numbers) or None."""
    if text is None or not text.strip():
        return None
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ExtractConfigError(
            f"--bands {text!r}: write 1-based band numbers, e.g. 1,2,3"
        ) from None
    if len(bands) != 3 or min(bands) < 1:
        raise ExtractConfigError(f"--bands {text!r}: give exactly three 1-based bands, e.g. 3,2,1")
    return bands


def parse_weights(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse repeated NAME=PATH_OR_TAG items into a dict."""
    weights: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ExtractConfigError(f"--weights {item!r}: write NAME=PATH or NAME=TAG")
        weights[name] = value
    return weights


def parse_scheduler(text: str) -> tuple[str, int | str | None]:
    """Split a scheduler spec into ("local", None), ("cluster", N) or ("tcp", address)."""
    if text == "local":
        return "local", None
    if text.startswith("local:"):
        count = text.partition(":")[2]
        if count.isdigit() and int(count) >= 1:
            return "cluster", int(count)
    elif _TCP_RE.match(text):
        return "tcp", text
    raise ExtractConfigError(
        f"--scheduler {text!r} is not understood; use local, local:N (N worker processes) "
        "or tcp://host:port (an existing dask scheduler)"
    )


# --- extraction config files (`featcache extract --config FILE`, written by `featcache plan`) ---

# Fields a config file may not set: SOURCE and STORE are the command's arguments.
_FILE_EXCLUDED = ("source", "out")


def extract_file_fields() -> tuple[str, ...]:
    """The ``ExtractConfig`` field names a config file may set (all but source and out)."""
    return tuple(f.name for f in dataclasses.fields(ExtractConfig) if f.name not in _FILE_EXCLUDED)


def _file_value(path: str, key: str, value: Any) -> Any:
    """One file value in the type ``ExtractConfig`` holds (YAML lists -> tuples, text codecs)."""
    where = f"--config {path}: {key}"
    if key == "scales":
        value = parse_scales(value) if isinstance(value, str) else value
        if not isinstance(value, list | tuple):
            raise ExtractConfigError(f"{where} must be a list of numbers, e.g. [0.5, 1.0, 2.0]")
        try:
            return tuple(float(s) for s in value)
        except (TypeError, ValueError):
            raise ExtractConfigError(f"{where} must be a list of numbers, got {value!r}") from None
    if key in ("teachers", "bands") and isinstance(value, list | tuple):
        return tuple(value)
    if key == "teachers" and isinstance(value, str):
        return (value,)
    if key == "codec" and isinstance(value, str):
        return parse_codec(value)
    if key in ("codec", "weights") and not isinstance(value, dict):
        raise ExtractConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def load_extract_config(path: str) -> dict[str, Any]:
    """The ``ExtractConfig`` fields set by the YAML file ``path`` (keys = field names).

    Values are checked later, by ``ExtractConfig.validate``, like option values; here only the
    file itself: readable, a mapping, known keys, list/text forms turned into the fields' types.
    """
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ExtractConfigError(f"--config {path}: cannot read it as YAML ({err})") from None
    if not isinstance(data, dict):
        raise ExtractConfigError(f"--config {path}: expected a mapping of ExtractConfig fields")
    allowed = extract_file_fields()
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        hint = " (give SOURCE and STORE as arguments)" if set(unknown) & set(_FILE_EXCLUDED) else ""
        raise ExtractConfigError(
            f"--config {path}: unknown keys {unknown}{hint}; allowed: {', '.join(allowed)}"
        )
    return {k: _file_value(path, k, v) for k, v in data.items()}


def extract_config_yaml(fields: dict[str, Any], comment: str = "") -> str:
    """YAML text of ``fields`` (ExtractConfig field names) that ``load_extract_config`` reads
    back to the same values; ``comment`` lines go first, as ``#`` comments."""
    import yaml

    bad = sorted(set(fields) - set(extract_file_fields()))
    if bad:
        raise ExtractConfigError(f"not settable in an extraction config file: {bad}")
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump(plain, sort_keys=False)
