"""Teacher registry: named factories plus the open ``timm:<model>[:<index>]`` form."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from pipelines.teachers.base import DEFAULT_BASE_SIZE, Teacher
from pipelines.teachers.catalog import (
    _DEFAULT_HINTS,
    _DEFAULT_WEIGHTS,
    _REGISTRY,
    TIMM_PREFIX,
    TeacherFactory,
    UnknownTeacherError,
    register_teacher,
)
from pipelines.teachers.weights import random_refused

RANDOM_INIT_SEED = 0
# Modules whose import registers the built-in teachers (imported on first use, so that
# `import pipelines.teachers` stays cheap and open_clip is only loaded when needed).
_BUILTIN_MODULES = (
    "pipelines.teachers.timm_vit",
    "pipelines.teachers.clip",
    "pipelines.teachers.timm_generic",
)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_teachers() -> list[str]:
    """Registered teacher names, sorted (``timm:<model>[:<index>]`` is accepted as well)."""
    _load_builtins()
    return sorted(_REGISTRY)


def _unknown(name: str) -> UnknownTeacherError:
    return UnknownTeacherError(
        f"unknown teacher {name!r}; known teachers: {', '.join(list_teachers())}, or "
        f"'{TIMM_PREFIX}<model>[:<feature_index>]' for any timm model "
        "(e.g. 'timm:tf_efficientnet_lite0', 'timm:resnet50:3')"
    )


def _factory(name: str) -> tuple[TeacherFactory, dict[str, Any]]:
    if name.startswith(TIMM_PREFIX):
        from pipelines.teachers.timm_generic import parse_timm_name, timm_teacher

        model, index = parse_timm_name(name)
        return timm_teacher, {"model_name": model, "index": index}
    _load_builtins()
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name], {}


def default_weights(name: str) -> str | None:
    """The weights ``name`` loads when none are given (None: it has none here)."""
    _load_builtins()
    find = _DEFAULT_WEIGHTS.get(name)
    return find() if find is not None else None


def _needs_consent(weights: str | None, tiny: bool) -> bool:
    # Explicit "random" is consent already; tiny networks are random by definition.
    return weights is None and not tiny


def plan_weights(name: str, weights: str | None = None, tiny: bool = False) -> str | None:
    """The weights a teacher will load: ``weights``, else its default (None: random init)."""
    if weights is not None or tiny:
        return weights
    return default_weights(name)


def create_teacher(
    name: str,
    weights: str | None = None,
    tiny: bool = False,
    device: str | torch.device = "cpu",
    base_size: int = DEFAULT_BASE_SIZE,
    random_weights: bool = False,
    **options: Any,
) -> Teacher:
    """Build a frozen teacher (eval mode, no gradients) on ``device``.

    Args:
        name: A registered name (see :func:`list_teachers`) or ``timm:<model>[:<index>]``.
        weights: A local checkpoint file, a pretrained tag, ``"random"`` (random init, asked for
            explicitly) or None: the teacher's default weights (:func:`default_weights`), else
            random init, which a full-size teacher refuses unless ``random_weights``.
        tiny: Small random architecture of the same family and code path (tests); never refused.
        device: Where the teacher runs.
        base_size: Canvas size that ``spec.input_size`` refers to.
        random_weights: Accept random init for a full-size teacher without weights (CLI
            ``--random-weights``); a teacher with default weights still loads them.
        **options: Teacher-specific options (e.g. ``preprocess="openai"`` for CLIP).

    Raises:
        UnknownTeacherError: the name is not known.
        RandomWeightsRefusedError: full size, no weights, no default and not ``random_weights``.
        WeightsError: the weights cannot be resolved or loaded.
    """
    factory, fixed = _factory(name)
    weights = plan_weights(name, weights, tiny)
    if _needs_consent(weights, tiny) and not random_weights:
        hint = _DEFAULT_HINTS.get(name, "")
        raise random_refused(name, hint)
    # Random init is drawn under a fixed seed, with the caller's RNG state left untouched, so
    # extraction workers, resumed runs and the online trainer all build the same network.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        teacher = factory(weights=weights, tiny=tiny, base_size=base_size, **fixed, **options)
    return teacher.to(device).freeze()


# register_teacher, UnknownTeacherError and TIMM_PREFIX live in `catalog` (below the teacher
# modules, which register into it) and are re-exported here, where callers have always found them.
__all__ = [
    "RANDOM_INIT_SEED",
    "TIMM_PREFIX",
    "TeacherFactory",
    "UnknownTeacherError",
    "create_teacher",
    "default_weights",
    "list_teachers",
    "plan_weights",
    "register_teacher",
]
