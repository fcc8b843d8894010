"""Training configuration: nested dataclasses with YAML load/dump.

The defaults are the RS-MTDF recipe (AdamW 5e-6 backbone / x40 head, poly 0.9, EMA up to 0.996,
threshold 0.95, loss (x + u + distill) / 3, fusion 0.8/0.1/0.1) except for decisions that depart
from the official code, each a named option. ``trainer.presets.OFFICIAL`` is the one table of
official values (with what each departure changes); ``--preset official`` (``preset: official``)
applies it, and every run prints and records its departures. The paper's method is the default;
ours departs only where the official code has a bug:

* ``distill.masked = True``: padding tokens get weight 0 in the distillation loss (the official
  code trains on black padding, rs-mtdf-reference §9.13; ``False`` reproduces it). Cached targets
  have no values there: the cache holds the tile, not the padded canvas.
* ``eval.best_model = "student"`` (official); ``"ema"`` chooses ``best.pt`` on the EMA model.
* ``fixmatch.jitter_order = "sample"`` and ``fixmatch.blur = "pil"`` (official); ``"batch"`` and
  ``"gaussian"`` are the batched approximations.

``distill.standardize = True`` divides each target channel by the store's statistics so both
teachers weigh alike (off by default, as the official raw MSE).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from featstore.constants import DEFAULT_CROP, SCALE_RANGE
from trainer.durable import atomic_write
from trainer.errors import TrainConfigError

# Run mode -> whether it reads the store's cached targets. The one table of run modes: code asks
# `TrainConfig.reads_cache` / `target_source`, never compares mode strings.
MODES = {"cached": True, "online": False}
# registry keys of trainer.methods (torch-free here; tests pin this to the registry)
METHOD_NAMES = ("rs-mtdf", "supervised", "co2s")
# the student's patch size per method (the crop must be a multiple); others: the DINOv2 14
METHOD_PATCH = {"co2s": 16}
CO2S_FINETUNE = ("attn", "full", "frozen")  # attention-only (official), all, none of the backbone
CO2S_CLIP_ACTS = ("quickgelu", "gelu")  # OpenAI weights' QuickGELU; official code's exact GELU
CO2S_TEXT_VARIANTS = ("conceptavg", "single")  # K-row variants of `featcache text` (C1's store)
CO2S_DISTILL = ("none", "clip", "dinov3", "both")  # Co2S students given cached-teacher targets
ONLINE_SOURCE = "online"  # featviews.sources registry key of the online teachers
BRANCHES = ("full", "clip224")
EVAL_MODES = ("whole", "sliding")
# registry keys of the featviews.sources that read the cache (tests pin this to the registry)
TARGET_MODES = ("warp", "grid_aligned", "view_bank")
DEFAULT_TARGET_MODE = TARGET_MODES[0]
MODEL_CHOICES = ("student", "ema")
# what a method evaluates besides those (= its Method.evaluated_names; tests pin them)
METHOD_MODELS = {"co2s": ("clip", "dinov3", "fused")}
JITTER_ORDERS = ("batch", "sample")  # = trainer.augment.JITTER_ORDERS (no torch import here)
BLURS = ("gaussian", "pil")  # = trainer.augment.BLURS
EDGE_RULES = ("exact", "overlap_last", "pad")  # = pipelines.sources.EDGE_RULES
# config.yaml's record of the run's departures from the official recipe (not a config key)
RECORD_KEY = "departures"


# A ViT with 4 blocks of width 32 and a narrow head: seconds per step on a CPU.
TINY_STUDENT: dict[str, Any] = {
    "layers": (0, 1, 2, 3),
    "features": 16,
    "out_channels": (8, 16, 32, 32),
    "translator_hidden": 32,
    "model_kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2},
}


def default_branch(family: str) -> str:
    """The student branch a teacher of ``family`` is distilled on when none is given.

    The one rule for the CLI, YAML configs and the store's teachers alike: a CLIP teacher
    (``open_clip`` family) is matched by the official 224 px pass, every other one by the
    crop-size pass. The family comes from the teacher's spec (the store's, or the registry's
    in online mode), never from its name.
    """
    return "clip224" if family == "open_clip" else "full"


@dataclass
class TeacherConfig:
    """One distillation teacher.

    Attributes:
        name: Teacher name (the store's teacher name; a registry name in online mode).
        branch: Student tokens that predict it: "full" (the crop-size pass) or "clip224" (the
            second pass at 224 px, the official CLIP branch); None: the teacher's default
            (`default_branch` of its family, filled in when the run starts).
        weights: Weights path or tag (online mode only; the cached mode reads the store).
    """

    name: str
    branch: str | None = None
    weights: str | None = None


@dataclass
class DataConfig:
    """Where tiles come from and which tiles go where.

    ``fingerprint`` pins the store (a resumed run pins the one it started with).
    ``labeled``/``unlabeled``/``val`` each name split(s) of the tile index (comma separated) or a
    text file with one tile id per line. An empty string selects nothing. ``partition`` names a
    partition saved in the store by ``featcache splits`` (it gives all three sets; not together
    with ``labeled``/``unlabeled``/``val``). All four unset: the store's partition ``default``
    when it has one, else the splits named ``labeled``/``unlabeled``/``val``.
    ``edge_rule`` (``--source`` runs only; a store keeps the rule it was extracted with): how
    scene edges are tiled, ``exact`` | ``overlap_last`` | ``pad`` (DWL's cut of the official
    Potsdam/DeepGlobe data); None: the layout's (``pipelines.sources.tiling``).
    ``layout`` .. ``palette`` and ``bands`` say how a ``--source`` is read, with the meaning and
    defaults of the same fields of ``pipelines.config.ExtractConfig`` (a test keeps them equal):
    the layout, a split file, the label convention of generic layouts (``classes``,
    ``reduce_zero_label``, ``ignore_index``, ``palette``) and the bands used as RGB.
    """

    store: str | None = None
    fingerprint: str | None = None
    source: str | None = None
    layout: str = "auto"
    split_file: str | None = None
    tile_size: int = 512
    edge_rule: str | None = None
    bands: tuple[int, int, int] | None = None
    classes: str | None = None
    reduce_zero_label: bool | None = None
    ignore_index: int | None = None
    palette: str | None = None
    labeled: str | None = None
    unlabeled: str | None = None
    val: str | None = None
    partition: str | None = None
    scale_range: tuple[float, float] = SCALE_RANGE
    flip_p: float = 0.5
    num_workers: int = 2
    # a tile failing its checksum stops the run unless this is set (--skip-bad-tiles)
    skip_bad_tiles: bool = False


@dataclass
class ModelConfig:
    """Student and teachers.

    Attributes:
        teachers: Distillation teachers; None: every teacher the store holds (cached mode),
            each on its default branch. Plain FixMatch is ``distill.enabled = False``.
        num_classes: Expected class count (None: the store's / source's class list).
        pretrained: Backbone weights (a DINOv2 file or "timm[:tag]"); None: random init, which
            a full-size student refuses unless ``random_weights``.
        tiny: A tiny student for tests and smoke runs (see ``TINY_STUDENT``); always random.
        random_weights: Accept random init for a full-size student without ``pretrained`` and
            for online teachers without weights (``--random-weights``).
        student: Extra ``trainer.student.StudentConfig`` fields (arch, features, fusion_self,
            fusion_teacher, clip_size, clip_from_full, model_kwargs, ...).
    """

    teachers: list[TeacherConfig] | None = None
    num_classes: int | None = None
    pretrained: str | None = None
    tiny: bool = False
    random_weights: bool = False
    student: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW + poly schedule (official values)."""

    lr: float = 5e-6
    lr_multi: float = 40.0
    weight_decay: float = 0.01
    poly: float = 0.9


@dataclass
class FixMatchConfig:
    """Pseudo-labelling and the EMA teacher.

    ``photometric``: colour jitter, grayscale and blur on the strong views (official: on);
    ``False`` with ``cutmix_p = 0`` makes strong views equal the weak ones (exactness tests).
    ``jitter_order``: ``"batch"`` one colour-jitter op order per batch, ``"sample"`` one per
    sample (official torchvision ``ColorJitter``). ``blur``: ``"gaussian"`` (truncated at 3 sigma,
    mirrored borders) or ``"pil"`` (official PIL ``GaussianBlur``: 3 extended-box passes,
    repeated borders). See ``trainer.augment``.
    """

    conf_thresh: float = 0.95
    ema_max: float = 0.996
    cutmix_p: float = 0.5
    photometric: bool = True
    jitter_order: str = "sample"
    blur: str = "pil"


@dataclass
class DistillConfig:
    """Distillation from teacher features (cached or online).

    ``levels``: cached level keys the run samples from (None: every level the store holds);
    a key the store lacks is an error. ``level_stats``: level whose statistics standardise.
    ``target_mode``: "warp" (sample the nearest cached level through the view), "grid_aligned"
    (views snapped to cached token grids) or "view_bank" (views from the store's exact view bank
    with probability ``p_bank``, the rest warped; the bank's draw rule replaces
    ``data.scale_range``/``flip_p``). ``scale_blend`` (warp mode): kernel width in octaves of
    zoom over which neighbouring cached levels are mixed into the target
    (``trainer.geometry.blend_levels``: with the default 9 scales, 2-4 reads per item instead of
    one); 0: the nearest level only. Grid-aligned and bank views read exact levels, unmixed.
    ``enabled = False`` (``--no-distill``): plain FixMatch, no teacher at all.
    """

    enabled: bool = True
    masked: bool = True
    standardize: bool = False
    target_mode: str = DEFAULT_TARGET_MODE
    scale_blend: float = 0.25
    levels: list[str] | None = None
    level_stats: str = "s1.00"
    p_bank: float = 1.0


@dataclass
class Co2SConfig:
    """Options of ``--method co2s`` (co2s-reference §2.3-2.4); the other methods ignore them.

    ``stability_detach`` (``--stability-detach``): both sides of the stability loss detached, as
    the official code (a loss without gradient); off: the less confident student learns.
    Learning rates and weight decay of both students' AdamW groups (official: backbone
    attention 1e-6, head 1e-3, learnable queries 1e-4, wd 0.01; the poly power is
    ``optim.poly``). ``finetune``: backbone parameters trained, ``attn`` (official: attention
    projections only), ``full`` or ``frozen``. ``clip_act``: the CLIP tower's activation,
    ``quickgelu`` (what the OpenAI weights were trained with) or ``gelu`` (the official code).
    ``text_variant``: the stored class text embeddings the CLIP student uses (official:
    ``conceptavg``). ``clip_weights`` / ``dino_weights``: local weight files of the two backbones.
    ``distill`` (``--co2s-distill``, beyond both papers): the students that also learn RS-MTDF's
    cached-teacher targets (translators + MSE from the run's target source), ``none`` (official).
    """

    stability_detach: bool = False
    lr_backbone: float = 1e-6
    lr_head: float = 1e-3
    lr_queries: float = 1e-4
    weight_decay: float = 0.01
    finetune: str = CO2S_FINETUNE[0]
    clip_act: str = CO2S_CLIP_ACTS[0]
    text_variant: str = CO2S_TEXT_VARIANTS[0]
    clip_weights: str | None = None
    dino_weights: str | None = None
    distill: str = CO2S_DISTILL[0]


@dataclass
class ScheduleConfig:
    """Length of training: ``iters`` wins over ``epochs`` when both are set.

    ``eval_interval``/``ckpt_interval``: every N iterations (0: at each epoch end); both also
    happen at the end. ``stop_after``: leave after N iterations in total (checkpoint written), as
    if the run were killed there; a resumed run continues the same schedule.
    """

    batch_labeled: int = 8
    batch_unlabeled: int = 8
    iters: int | None = None
    epochs: int = 60
    eval_interval: int = 0
    ckpt_interval: int = 0
    log_interval: int = 10
    stop_after: int | None = None


@dataclass
class EvalConfig:
    """Validation: whole-image (resize to a multiple of 14) or sliding window."""

    mode: str = "whole"
    stride: int | None = None
    best_model: str = "student"
    best_metric: str = "miou"
    batch_size: int = 1
    # ids or names ("0,clutter", "none"); None: the protocol the store/source records
    exclude_classes: str | None = None


@dataclass
class RuntimeConfig:
    """Device, precision, seeds and output.

    ``resume``: a checkpoint path, or "auto" (``out_dir/latest.pt`` when it exists).
    """

    out_dir: str = "runs/train"
    device: str = "auto"
    seed: int = 0
    bf16: bool = False
    grad_checkpointing: bool = False
    progress: bool = True
    tensorboard: bool = True
    resume: str | None = None


@dataclass
class TrainConfig:
    """Everything ``trainer.engine.train`` needs; dumped as ``config.yaml`` beside checkpoints.

    ``preset``: "official" (``--preset official``) starts from the official recipe
    (``trainer.presets.OFFICIAL``) instead of our defaults; keys given beside it override it.
    ``config.yaml`` records the name together with every value, so reloading it gives the same
    config whatever the preset says (the explicit values win) and still names the preset.
    """

    preset: str | None = None
    method: str = METHOD_NAMES[0]
    mode: str = "cached"
    crop_size: int = DEFAULT_CROP
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fixmatch: FixMatchConfig = field(default_factory=FixMatchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    co2s: Co2SConfig = field(default_factory=Co2SConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> TrainConfig:
        """Check values that need no I/O; return self or raise `TrainConfigError`."""
        from trainer.presets import check_preset

        check_preset(self.preset)
        _choice("method (--method)", self.method, METHOD_NAMES)
        _choice("mode", self.mode, tuple(MODES))
        _choice("distill.target_mode", self.distill.target_mode, TARGET_MODES)
        _choice("eval.mode", self.eval.mode, EVAL_MODES)
        models = MODEL_CHOICES + METHOD_MODELS.get(self.method, ())
        _choice("eval.best_model", self.eval.best_model, models)
        _choice("fixmatch.jitter_order", self.fixmatch.jitter_order, JITTER_ORDERS)
        _choice("fixmatch.blur", self.fixmatch.blur, BLURS)
        if self.data.edge_rule is not None:
            _choice("data.edge_rule (--edge-rule)", self.data.edge_rule, EDGE_RULES)
        if self.reads_cache and not self.data.store:
            raise TrainConfigError("mode 'cached' needs data.store (--store URL)")
        if not self.reads_cache and not (self.data.source or self.data.store):
            raise TrainConfigError(
                "mode 'online' needs data.source (--source PATH) or a store "
                "with pixels (--store URL)"
            )
        if self.distill.target_mode != DEFAULT_TARGET_MODE and not self.reads_cache:
            raise TrainConfigError(
                f"distill.target_mode {self.distill.target_mode!r} reads the "
                "store's cache: use mode 'cached' (or target_mode 'warp')"
            )
        patch = METHOD_PATCH.get(self.method, 14)
        if self.crop_size % patch:
            raise TrainConfigError(
                f"--crop {self.crop_size}: must be a multiple of {patch} (the student's patch "
                f"size), e.g. {DEFAULT_CROP if patch == 14 else patch * 32} (config: crop_size)"
            )
        _choice("co2s.finetune (--co2s-finetune)", self.co2s.finetune, CO2S_FINETUNE)
        _choice("co2s.clip_act (--clip-act)", self.co2s.clip_act, CO2S_CLIP_ACTS)
        _choice("co2s.text_variant (--text-variant)", self.co2s.text_variant, CO2S_TEXT_VARIANTS)
        _choice("co2s.distill (--co2s-distill)", self.co2s.distill, CO2S_DISTILL)
        self._validate_teachers()
        self._validate_split_options()
        self._validate_numbers()
        if self.distill.standardize and not self.reads_cache and not self.data.store:
            raise TrainConfigError(
                "distill.standardize needs store statistics: pass --store "
                "or turn standardisation off"
            )
        return self

    def _validate_numbers(self) -> None:
        """Ranges of the numeric options, said in option words (config key in brackets)."""
        sch, d = self.schedule, self.distill
        checks = [  # (bad, option, value, rule, config key)
            (not self.optim.lr > 0, "--lr", self.optim.lr, "must be > 0, e.g. 5e-6", "optim.lr"),
            (
                sch.batch_labeled < 1,
                "--batch",
                sch.batch_labeled,
                "LABELED must be >= 1",
                "schedule.batch_labeled",
            ),
            (
                sch.batch_unlabeled < 0,
                "--batch",
                sch.batch_unlabeled,
                "UNLABELED must be >= 0",
                "schedule.batch_unlabeled",
            ),
            (
                sch.iters is not None and sch.iters < 1,
                "--iters",
                sch.iters,
                "must be >= 1 (or unset to train for --epochs)",
                "schedule.iters",
            ),
            (
                sch.iters is None and sch.epochs < 1,
                "--epochs",
                sch.epochs,
                "must be >= 1",
                "schedule.epochs",
            ),
            (
                sch.stop_after is not None and sch.stop_after < 1,
                "--stop-after",
                sch.stop_after,
                "must be >= 1",
                "schedule.stop_after",
            ),
            (
                sch.log_interval < 1,
                "--log-interval",
                sch.log_interval,
                "must be >= 1",
                "schedule.log_interval",
            ),
            (
                sch.eval_interval < 0,
                "--eval-interval",
                sch.eval_interval,
                "must be >= 0 (0: at each epoch end)",
                "schedule.eval_interval",
            ),
            (
                self.data.num_workers < 0,
                "--workers",
                self.data.num_workers,
                "must be 0 or more (0 reads tiles in the main process)",
                "data.num_workers",
            ),
            (
                not 0.0 <= d.scale_blend <= 4.0,
                "--scale-blend",
                d.scale_blend,
                "must be in [0, 4] octaves (0: nearest cached level only)",
                "distill.scale_blend",
            ),
            (
                not 0.0 <= d.p_bank <= 1.0,
                "--p-bank",
                d.p_bank,
                "must be in [0, 1] (the probability that a view comes from the view bank)",
                "distill.p_bank",
            ),
        ]
        for bad, option, value, rule, key in checks:
            if bad:
                raise TrainConfigError(f"{option} {value}: {rule} (config: {key})")

    def _validate_teachers(self) -> None:
        teachers = self.model.teachers
        if not self.distill.enabled:
            if teachers:
                raise TrainConfigError(
                    f"distillation is off (--no-distill, distill.enabled: "
                    f"false) but model.teachers names "
                    f"{[t.name for t in teachers]}: drop one of the two"
                )
            return
        if teachers is not None and not teachers:
            # An empty list used to mean plain FixMatch silently; now that is said out loud.
            raise TrainConfigError(
                "model.teachers is empty: for plain FixMatch pass --no-distill "
                "(distill.enabled: false); to distil from every teacher the "
                "store holds leave model.teachers unset"
            )
        if not self.reads_cache and not teachers:
            raise TrainConfigError(
                "online mode needs its teachers named: pass --teacher NAME "
                "(repeat for several), or --no-distill for plain FixMatch"
            )
        for t in teachers or []:
            if t.branch is not None:
                _choice(f"teacher {t.name!r} branch", t.branch, BRANCHES)
        names = [t.name for t in teachers or []]
        if len(set(names)) != len(names):
            raise TrainConfigError(f"model.teachers repeat a name: {names}")

    def _validate_split_options(self) -> None:
        d = self.data
        given = [k for k in ("labeled", "unlabeled", "val") if getattr(d, k) is not None]
        if d.partition is not None and given:
            opts = ", ".join(f"--{k}" for k in given)
            raise TrainConfigError(
                f"data.partition ({d.partition!r}) gives the labeled, "
                f"unlabeled and val sets; drop {opts} or drop --partition"
            )

    @property
    def reads_cache(self) -> bool:
        """Whether the run reads cached targets from a store (``mode: cached``)."""
        return MODES[self.mode]

    @property
    def target_source(self) -> str:
        """Registry key of the run's target source (``featviews.sources``)."""
        return self.distill.target_mode if self.reads_cache else ONLINE_SOURCE

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        """The configured teachers ([] when unset or distillation is off)."""
        return list(self.model.teachers or []) if self.distill.enabled else []

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for YAML and checkpoints."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys raise `TrainConfigError` naming them.

        A ``preset`` key is applied first, then every other key over it (precedence: preset,
        then the keys given). ``departures`` (written by `dump` as a record) is derived from the
        other keys and not read back.
        """
        d = {k: v for k, v in d.items() if k != RECORD_KEY}
        preset = d.get("preset")
        if preset is None:
            return _build(cls, d, "")
        from trainer.presets import apply_preset

        # the preset is the recipe of the method the keys name (Co2S has its own)
        method = d.get("method") if isinstance(d.get("method"), str) else METHOD_NAMES[0]
        base = apply_preset(cls(method=method), _to_str(preset, "preset"))
        return _build(cls, d, "", base)

    def dump(
        self,
        path: str | Path,
        header: list[str] | None = None,
        record: list[dict[str, Any]] | None = None,
    ) -> None:
        """Write YAML, ``header`` lines first as comments (``load`` ignores them).

        ``record``: the run's departures from the official recipe, written under ``departures``
        after the config (a record for readers; `from_dict` drops it).
        """
        lines = "".join(f"# {line}\n" for line in header or [])
        body = self.to_dict()
        if record is not None:
            body[RECORD_KEY] = record
        text = (lines + yaml.safe_dump(body, sort_keys=False)).encode()
        # whole or not at all (a full disk or a kill); a failure names the file and the fix
        atomic_write(path, lambda fh: fh.write(text), what="run config")

    @classmethod
    def load(cls, path: str | Path, preset: str | None = None) -> TrainConfig:
        """Read YAML written by `dump` (or by hand; missing keys take defaults).

        ``preset`` (``--preset`` beside ``--config``) replaces the file's ``preset`` key.
        """
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TrainConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(d, dict):
            raise TrainConfigError(f"config {path} must hold a mapping at the top level")
        if preset is not None:
            d["preset"] = preset
        try:
            return cls.from_dict(d)
        except TrainConfigError as err:
            raise TrainConfigError(f"config {path}: {err}") from err


def check_device(device: str, option: str = "--device") -> None:
    """Refuse a device torch cannot use here, naming ``option`` (``"auto"`` always works).

    Raises:
        TrainConfigError: the name is not a torch device, or CUDA / that GPU is not available.
    """
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise TrainConfigError(
            f"{option} {device}: not a device name; write auto, cpu, cuda or cuda:N"
        ) from err
    if dev.type not in ("cpu", "cuda"):
        raise TrainConfigError(
            f"{option} {device}: featcache runs on cpu or cuda; write auto, cpu, cuda or cuda:N"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError(
            f"{option} {device}: no CUDA GPU is available to torch here; "
            f"pass {option} cpu (or {option} auto: a GPU when there is one)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TrainConfigError(
            f"{option} {device}: this machine has "
            f"{torch.cuda.device_count()} GPU(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}; pick one of them"
        )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainConfigError(f"{name} = {value!r} is not one of {list(allowed)}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type, d: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """``cls`` from the keys ``d``; keys left out come from ``base`` (a preset) or the defaults."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise TrainConfigError(
            f"unknown config keys {[prefix + k for k in unknown]}; "
            f"allowed under {prefix or 'top level'}: {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = (
        {f.name: copy.deepcopy(getattr(base, f.name)) for f in dataclasses.fields(cls)}
        if base is not None
        else {}
    )
    for name, value in d.items():
        default = getattr(cls(), name) if _has_defaults(cls) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            section = getattr(base, name) if base is not None else None
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.", section)
        elif name == "teachers" and isinstance(value, list):  # names alone: default branch
            kwargs[name] = [
                _build(TeacherConfig, t, f"{prefix}teachers[{i}].")
                if isinstance(t, dict)
                else TeacherConfig(str(t))
                for i, t in enumerate(value)
            ]
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a field without default left out (a teacher without name)
        raise TrainConfigError(f"config section {prefix[:-1] or 'top level'}: {err}") from err


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the field type ``hint`` says, or `TrainConfigError` naming ``key``.

    PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string: a number field accepts the
    text of a number. Nothing else is guessed: a bool is never a number, a number never a bool.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if value is None:
        raise TrainConfigError(
            f"config key {key} is empty; give it a value or drop the key for the default"
        )
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(value) != len(args):
            raise TrainConfigError(f"config key {key} = {list(value)} needs {len(args)} values")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is list and isinstance(value, (list, tuple)) and args:
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint in _SCALARS:
        return _SCALARS[hint](value, key)
    if dataclasses.is_dataclass(hint):
        raise TrainConfigError(
            f"config key {key} = {value!r} must be a section of keys, e.g. {key}: {{...}}"
        )
    return value  # dicts (model.student) and nested types: checked where they are used


def _to_float(value: Any, key: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is not None and math.isfinite(number):
        return number
    raise TrainConfigError(
        f"config key {key} = {value!r} is not a finite number; write e.g. "
        f"{key.rpartition('.')[2]}: 0.001"
    )


def _to_int(value: Any, key: str) -> int:
    number = value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if (
        isinstance(number, (int, float))
        and not isinstance(number, bool)
        and (float(number).is_integer())
    ):
        return int(number)
    raise TrainConfigError(
        f"config key {key} = {value!r} is not a whole number; write e.g. "
        f"{key.rpartition('.')[2]}: 4"
    )


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise TrainConfigError(
        f"config key {key} = {value!r} is not true or false; write "
        f"{key.rpartition('.')[2]}: true (or false)"
    )


def _to_str(value: Any, key: str) -> str:
    # An int is a plain name as YAML reads it (a split "2020"); floats and bools would change
    # their text (1e3 -> "1000.0", yes -> "True"), so they must be quoted.
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise TrainConfigError(
        f"config key {key} = {value!r} is not text; quote it, e.g. "
        f'{key.rpartition(".")[2]}: "{value}"'
    )


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    float: _to_float,
    int: _to_int,
    bool: _to_bool,
    str: _to_str,
}


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


__all__ = [
    "Co2SConfig",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "FixMatchConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "TINY_STUDENT",
    "TeacherConfig",
    "TrainConfig",
    "TrainConfigError",
    "check_device",
    "default_branch",
]
