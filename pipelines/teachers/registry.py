"""Teacher registry: named factories plus the open ``timm:<model>[:<index>]`` form."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from pipelines.teachers.base import DEFAULT_BASE_SIZE, Teacher
from pipelines.teachers.weights import random_refused

TeacherFactory = Callable[..., Teacher]
DefaultWeights = Callable[[], "str | None"]
TIMM_PREFIX = "timm:"
RANDOM_INIT_SEED = 0
# Modules whose import registers the built-in teachers (imported on first use, so that
# `import pipelines.teachers` stays cheap and open_clip is only loaded when needed).
_BUILTIN_MODULES = (
    "pipelines.teachers.timm_vit",
    "pipelines.teachers.clip",
    "pipelines.teachers.timm_generic",
)
_REGISTRY: dict[str, TeacherFactory] = {}
_DEFAULT_WEIGHTS: dict[str, DefaultWeights] = {}
_DEFAULT_HINTS: dict[str, str] = {}


class UnknownTeacherError(ValueError):
    """The requested teacher name is neither registered nor ``timm:<model>``."""


def register_teacher(
    name: str, default_weights: DefaultWeights | None = None, default_hint: str = ""
) -> Callable[[TeacherFactory], TeacherFactory]:
    """Decorator registering ``factory(weights=, tiny=, base_size=, **options) -> Teacher``.

    Args:
        name: Registry name.
        default_weights: Returns the weights used when none are given (a local file that ships
            with an installed package), or None when it has none on this machine.
        default_hint: How to get the default weights, told when they are missing.

    Raises:
        ValueError: the name is taken or uses the reserved ``timm:`` prefix.
    """
    if name.startswith(TIMM_PREFIX) or "/" in name:
        raise ValueError(f"teacher name {name!r} may not start with {TIMM_PREFIX!r} or hold '/'")

    def decorate(factory: TeacherFactory) -> TeacherFactory:
        if _REGISTRY.get(name, factory) is not factory:
            raise ValueError(f"teacher {name!r} is already registered; pick another name")
        _REGISTRY[name] = factory
        if default_weights is not None:
            _DEFAULT_WEIGHTS[name] = default_weights
            _DEFAULT_HINTS[name] = default_hint
        return factory

    return decorate


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
