"""The official RS-MTDF recipe as one table, and the departures from it a config is running with.

``OFFICIAL`` maps a dotted ``TrainConfig`` key to the value the official code uses and one line
saying what our value changes. ``--preset official`` (``preset: official`` in YAML) applies every
entry; ``departures(cfg)`` lists the entries a config differs from, which ``featcache train``
prints at the start and the run's ``config.yaml`` records.

What is (and is not) in the table:

* Departures from the *method*: every option whose official value the preset can set. Keys
  under ``model.student.`` are entries of the ``model.student`` dict (``StudentConfig`` fields;
  an absent entry means the ``StudentConfig`` default).
* Bug fixes are not options and not here: F1/precision and kappa leave ignored pixels out of the
  predicted counts, and a batch whose pixels are all ignored adds no loss (the official code
  counts ignored pixels and divides by zero).
* Properties of the *cache* are not in the table: ``mode: cached`` reads targets computed once
  per tile on the clean image and resampled to each view, where the official code runs the
  teachers on every augmented view (``--mode online`` does that). ``distill.target_mode`` and
  ``distill.scale_blend`` only choose how the cache is read. The preset leaves them alone (a
  store is what this tool is for); `departures` names cached mode as a cache property.
* Facts that no preset can set are reported by `departures` too: a student without pretrained
  weights (RANDOM init), the tiny test student, and a teacher set other than the official pair.
* The savings of rs-mtdf-reference.md section 8 (no EMA copy of the teachers, no unused second
  strong view, no barrier per step, ...) change no number the method computes: not departures.
  How a teacher sees its input (CLIP fed ImageNet-normalised pixels resized 518 -> 224 without
  antialiasing, section 9.4) is the extraction's business, recorded in the store's teacher spec.

How a run records it: ``config.yaml`` holds ``preset`` (the name or null) beside every value,
so reloading it gives the same config whatever the table says then (explicit keys win over the
preset), and a ``departures`` list (key, ours, official, changes, kind), which loading drops.

Per-GPU batch: the official batch 8+8 is per GPU on 4 GPUs; ours is per process too, so the
total batch is the official one only with 4 processes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.errors import TrainConfigError

if TYPE_CHECKING:
    from trainer.config import TrainConfig

PRESETS = ("official",)

# dotted config key -> (official value, what a different value changes)
OFFICIAL: dict[str, tuple[Any, str]] = {
    "crop_size": (518, "training crops of another size (the token grid is crop/14 a side)"),
    "data.scale_range": ((0.5, 2.0), "another range of random rescale of the long side"),
    "data.flip_p": (0.5, "another horizontal-flip probability"),
    "optim.lr": (5e-6, "another backbone learning rate"),
    "optim.lr_multi": (40.0, "another head/backbone learning-rate ratio"),
    "optim.weight_decay": (0.01, "another AdamW weight decay"),
    "optim.poly": (0.9, "another poly learning-rate decay power"),
    "fixmatch.conf_thresh": (0.95, "another pseudo-label confidence threshold"),
    "fixmatch.ema_max": (0.996, "another cap of the EMA teacher's momentum"),
    "fixmatch.cutmix_p": (0.5, "another probability of a CutMix box per strong view"),
    "fixmatch.photometric": (True, "strong views without colour jitter, grayscale and blur"),
    "fixmatch.jitter_order": ("sample", "one colour-jitter op order per batch, not per sample"),
    "fixmatch.blur": ("pil", "blur by a sampled Gaussian (3 sigma, mirrored borders), not PIL's"),
    "distill.enabled": (True, "no distillation at all: plain FixMatch"),
    "distill.masked": (False, "padding tokens get weight 0 in the distillation loss"),
    "distill.standardize": (False, "targets divided by the store's per-channel statistics"),
    "eval.mode": ("whole", "validation by sliding windows instead of the whole resized tile"),
    "eval.best_model": ("student", "best.pt is chosen on the EMA model's metric"),
    "eval.best_metric": ("miou", "best.pt is chosen on another metric than mIoU"),
    "eval.exclude_classes": (None, "protocol means leave out other classes than the data's"),
    "schedule.epochs": (60, "another training length"),
    "schedule.iters": (None, "training length set in iterations, not the official 60 epochs"),
    "schedule.batch_labeled": (8, "another labeled batch per process (official: 8 per GPU)"),
    "schedule.batch_unlabeled": (8, "another unlabeled batch per process (official: 8 per GPU)"),
    "model.student.arch": ("vit_small_patch14_dinov2", "another student backbone"),
    "model.student.layers": ((2, 5, 8, 11), "the DPT head reads other backbone blocks"),
    "model.student.features": (64, "another DPT head width"),
    "model.student.out_channels": ((48, 96, 192, 384), "other DPT reassemble widths"),
    "model.student.translator_hidden": (1024, "another translator hidden width"),
    "model.student.fusion_self": (0.8, "another weight of the student's own features in fusion"),
    "model.student.fusion_teacher": (0.1, "another weight of each translated teacher in fusion"),
    "model.student.clip_size": (224, "the CLIP branch's student pass at another size"),
    "model.student.clip_from_full": (
        False,
        "CLIP-branch tokens resampled from the full pass instead of a second pass at 224 px",
    ),
}

# Per method, the OFFICIAL entries that do not apply to it (key prefixes). The official
# supervised baseline (supervised.py) shares the recipe's data, optimiser, schedule and student,
# but has no unlabeled stream, no FixMatch and no teachers. Methods absent here use every entry.
# Co2S (co2s-reference.md) shares the view draw, the strong augmentations, the confidence
# threshold, CutMix and the poly power; it has no teachers, no EMA and not the DINOv2 student,
# and its optimiser rates are its own (`CO2S_OFFICIAL`).
NOT_APPLICABLE: dict[str, tuple[str, ...]] = {
    "supervised": (
        "fixmatch.",
        "distill.",
        "schedule.batch_unlabeled",
        "model.student.translator_hidden",
        "model.student.fusion_",
        "model.student.clip_",
    ),
    "co2s": (
        "distill.",
        "model.student.",
        "optim.lr",  # and optim.lr_multi: co2s.lr_* instead
        "optim.weight_decay",  # co2s.weight_decay instead
        "fixmatch.ema_max",
    ),
}
RECIPE_NAMES = {
    "supervised": "the official supervised-only baseline (supervised.py)",
    "co2s": "the official Co2S recipe (XavierJiezou/Co2S)",
}

# The official Co2S code's values (co2s-reference.md section in each comment), over the shared
# entries of `OFFICIAL` the method keeps. Per-dataset values name the common one (crop 512,
# 80 epochs, 1 image per GPU), the exceptions in the text.
CO2S_OFFICIAL: dict[str, tuple[Any, str]] = {
    "crop_size": (512, "training crops of another size (official 512; WHDLD 256)"),  # §2.5
    "schedule.epochs": (80, "another training length (official 80 epochs; MER 150)"),  # §2.5
    "schedule.iters": (None, "training length set in iterations, not the official epochs"),
    "schedule.batch_labeled": (
        1,
        "another labeled batch per process (official: 1 per GPU at crop 512, WHDLD 2)",
    ),  # §2.5
    "schedule.batch_unlabeled": (
        1,
        "another unlabeled batch per process (official: 1 per GPU at crop 512, WHDLD 2)",
    ),  # §2.5
    "eval.mode": ("sliding", "validation by whole tiles, not sliding windows"),  # §3
    "eval.best_model": ("clip", "best.pt is chosen on another model than the CLIP student"),
    "co2s.stability_detach": (
        True,
        "the stability loss has a gradient: the less confident student learns from the other "
        "(the official code detaches both sides, so the loss only shows in logs)",
    ),  # §2.3, §7.1
    "co2s.lr_backbone": (1e-6, "another backbone (attention) learning rate"),  # §2.4
    "co2s.lr_head": (1e-3, "another decoder learning rate"),  # §2.4
    "co2s.lr_queries": (1e-4, "another learning rate of the DINOv3 class queries"),  # §2.4
    "co2s.weight_decay": (0.01, "another AdamW weight decay"),  # §2.4
    "co2s.finetune": ("attn", "other backbone parameters train than the attention projections"),
    "co2s.clip_act": (
        "gelu",
        "QuickGELU in the CLIP tower (what the OpenAI weights were trained with), where the "
        "official code runs exact GELU",
    ),  # §1.1, §7.5
    "co2s.text_variant": ("conceptavg", "other class text rows than the concept average"),  # §1.4
    "runtime.bf16": (False, "bf16 autocast where the official code runs fp32"),  # §2.4
    "co2s.distill": ("none", "students also learn the store's teachers (beyond both papers)"),
}
METHOD_RECIPES = {"co2s": CO2S_OFFICIAL}

# Departures of the Co2S implementation that no option sets (key, ours, official, changes,
# kind): numerics of the backbones, bug fixes, and where the code follows the code, not the
# paper. Listed at the start of every co2s run.
CO2S_FIXED: tuple[tuple[str, Any, Any, str, str], ...] = (
    (
        "co2s.layernorm_eps",
        1e-5,
        1e-6,
        "CLIP (open_clip) and DINOv3 (timm) LayerNorms use eps 1e-5, the official ViTs 1e-6",
        "method",
    ),
    (
        "co2s.dinov3_rope_dtype",
        "float32",
        "bfloat16",
        "DINOv3's rotary embedding rotates q/k in fp32 (timm), the official config in bf16",
        "method",
    ),
    (
        "eval.best_split",
        "the run's val set",
        "the test split",
        "best.pt is chosen on the run's val set; the official code selects on its test split",
        "method",
    ),
    (
        "co2s.cutmix_partner",
        "same tile, another view drawn from the step's generator",
        "same tile ids, another view from a second loader iterator",
        "the same partner rule (UniMatch's 'other' batch) from another random stream",
        "rng",
    ),
    (
        "co2s.masked_ce_denominator",
        "valid pixels, at least 1",
        "valid pixels",
        "an all-padding batch adds no loss (the official code divides by zero)",
        "fix",
    ),
    (
        "co2s.phi_input",
        "L2-normalised class embeddings",
        "L2-normalised class embeddings",
        "follows the code: the paper's Eq. 6/8 apply phi to the raw embeddings and take logits "
        "from the similarity; the code feeds phi the normalised rows and decodes the cost volume",
        "paper",
    ),
)

# The teachers of the paper, each on its official student branch.
OFFICIAL_TEACHERS = (("dinov2_vitb14", "full"), ("clip_vitl14", "clip224"))


@dataclass(frozen=True)
class Departure:
    """One way a config differs from the official recipe.

    ``kind``: "method" (an `OFFICIAL` entry or another change of the method) or "cache" (a
    property of reading targets from the store rather than running the teachers).
    """

    key: str
    ours: Any
    official: Any
    changes: str
    kind: str = "method"

    def line(self) -> str:
        """``key: ours (official: value) -- what it changes``, for the run's first lines."""
        tag = f" [{self.kind}]" if self.kind != "method" else ""
        return (
            f"{self.key} = {_show(self.ours)} (official: {_show(self.official)}){tag}: "
            f"{self.changes}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``config.yaml`` (tuples as lists)."""
        return {
            "key": self.key,
            "ours": _plain(self.ours),
            "official": _plain(self.official),
            "changes": self.changes,
            "kind": self.kind,
        }


def check_preset(name: str | None) -> None:
    """Refuse an unknown preset name, in option words."""
    if name is not None and name not in PRESETS:
        raise TrainConfigError(
            f"--preset {name!r} is not one of {list(PRESETS)} (config: preset); "
            "write --preset official, or leave it out for our defaults"
        )


def recipe(method: str) -> dict[str, tuple[Any, str]]:
    """The official table of ``method``: the `OFFICIAL` entries that apply to it, then its own
    (`METHOD_RECIPES`, which win on a shared key)."""
    skip = NOT_APPLICABLE.get(method, ())
    shared = {k: v for k, v in OFFICIAL.items() if not k.startswith(skip)}
    return {**shared, **METHOD_RECIPES.get(method, {})}


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` (changed in place, and returned) with every entry of preset ``name`` set, for
    the method ``cfg`` names (`recipe`)."""
    check_preset(name)
    for key, (value, _) in recipe(cfg.method).items():
        set_value(cfg, key, value)
    cfg.preset = name
    return cfg


def get_value(cfg: TrainConfig, key: str) -> Any:
    """The value of dotted ``key`` in ``cfg`` (``model.student.X``: the dict, else the default)."""
    parts = key.split(".")
    if parts[:2] == ["model", "student"]:
        return cfg.model.student.get(parts[2], _student_default(parts[2]))
    obj: Any = cfg
    for part in parts:
        obj = getattr(obj, part)
    return obj


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg``.

    A ``model.student`` entry equal to the ``StudentConfig`` default is removed rather than
    written, so a preset over a config that never named it leaves the dict as it was (a YAML
    ``model.student`` section replaces the dict whole, and must give the same config).
    """
    parts = key.split(".")
    if parts[:2] == ["model", "student"]:
        if _same(value, _student_default(parts[2])):
            cfg.model.student.pop(parts[2], None)
        else:
            cfg.model.student[parts[2]] = copy.deepcopy(value)
        return
    obj: Any = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], copy.deepcopy(value))


def departures(cfg: TrainConfig, data: Sequence[Departure] = ()) -> list[Departure]:
    """Every departure from the official recipe ``cfg`` runs with, table entries first.

    ``data``: departures the opened data carries, which no config can see (a store's tiles cut
    by another edge rule than the official data's: ``trainer.prepare.data_departures``).
    """
    out = [
        Departure(key, get_value(cfg, key), official, changes)
        for key, (official, changes) in recipe(cfg.method).items()
        if not _same(get_value(cfg, key), official)
    ]
    facts = FACTS.get(cfg.method, _facts)(cfg)
    return out + facts + list(data)


def departure_lines(cfg: TrainConfig, data: Sequence[Departure] = ()) -> list[str]:
    """The run's first lines about the recipe: a heading, then one indented line each."""
    found = departures(cfg, data)
    preset = f"preset {cfg.preset}" if cfg.preset else "no preset (our defaults)"
    recipe = RECIPE_NAMES.get(cfg.method, "the official RS-MTDF recipe")
    if not found:
        return [f"recipe: {preset}; no departure from {recipe}"]
    head = f"recipe: {preset}; {len(found)} departure(s) from {recipe}:"
    return [head] + [f"  {d.line()}" for d in found]


def _facts(cfg: TrainConfig) -> list[Departure]:
    """Departures no preset can set: the student's init, the teachers, the cache."""
    out = []
    if cfg.model.tiny:
        out.append(
            Departure("model.tiny", True, False, "a tiny random test network as the student")
        )
    elif cfg.model.pretrained is None:
        out.append(
            Departure(
                "model.pretrained",
                "RANDOM init",
                "DINOv2 weights",
                "the student backbone starts from random weights (--random-weights)",
            )
        )
    teachers = cfg.model.teachers if cfg.distill.enabled else None
    if teachers is not None:
        ours = tuple((t.name, t.branch) for t in teachers)
        if ours != OFFICIAL_TEACHERS:
            out.append(
                Departure(
                    "model.teachers",
                    [f"{n}@{b}" if b else n for n, b in ours],
                    [f"{n}@{b}" for n, b in OFFICIAL_TEACHERS],
                    "distils from another set of teachers or branches",
                )
            )
    if cfg.distill.enabled and cfg.reads_cache:
        out.append(
            Departure(
                "mode",
                "cached",
                "online",
                "targets are the store's clean-tile teacher tokens resampled to each view, not "
                "the teachers run on the augmented view (--mode online runs them)",
                kind="cache",
            )
        )
    return out


def _co2s_facts(cfg: TrainConfig) -> list[Departure]:
    """Co2S's departures no preset sets: the students' init, then `CO2S_FIXED`."""
    out = []
    if cfg.model.tiny:
        out.append(Departure("model.tiny", True, False, "tiny random test networks as students"))
    else:
        for key, weights, what in (
            ("co2s.clip_weights", cfg.co2s.clip_weights, "OpenAI CLIP ViT-B/16 weights"),
            ("co2s.dino_weights", cfg.co2s.dino_weights, "DINOv3 ViT-B/16 LVD-1689M weights"),
        ):
            if weights is None:
                out.append(
                    Departure(key, "RANDOM init", what, "the backbone starts from random weights")
                )
        if cfg.co2s.dino_weights is not None:
            out.append(
                Departure(
                    "co2s.dino_weights (use)",
                    "loaded and kept",
                    "loaded, then likely re-initialised (co2s-reference §7.2)",
                    "the DINOv3 student starts from the pretrained weights; the official build "
                    "very probably wipes them",
                )
            )
    return out + [Departure(*row) for row in CO2S_FIXED]


# Per method, the departures no preset can set (default: RS-MTDF's `_facts`).
FACTS = {"co2s": _co2s_facts}


def _student_default(name: str) -> Any:
    from trainer.student import StudentConfig  # lazy: torch; only where a student key is read

    fields = {f.name: f for f in dataclasses.fields(StudentConfig)}
    if name not in fields:
        raise KeyError(f"StudentConfig has no field {name!r} (presets.OFFICIAL key)")
    return fields[name].default


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: tuples and lists alike (YAML writes tuples as lists)."""
    return _plain(a) == _plain(b)


def _plain(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _show(value: Any) -> str:
    return str(_plain(value)) if isinstance(value, (list, tuple)) else repr(value)


__all__ = [
    "CO2S_OFFICIAL",
    "METHOD_RECIPES",
    "OFFICIAL",
    "OFFICIAL_TEACHERS",
    "PRESETS",
    "Departure",
    "apply_preset",
    "check_preset",
    "departure_lines",
    "departures",
    "get_value",
    "recipe",
    "set_value",
]
