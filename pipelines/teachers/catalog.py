"""The teacher table: names → factories, filled by the modules that define teachers.

It sits below the teacher modules and imports none of them: the factories register here, and
``registry`` (which builds teachers by name) reads the table. So the dependencies run one way,
``registry → factories → catalog``, with no import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from featstore.errors import FeatcacheError
from pipelines.teachers.base import Teacher

TeacherFactory = Callable[..., Teacher]
DefaultWeights = Callable[[], "str | None"]
TIMM_PREFIX = "timm:"
_REGISTRY: dict[str, TeacherFactory] = {}
_DEFAULT_WEIGHTS: dict[str, DefaultWeights] = {}
_DEFAULT_HINTS: dict[str, str] = {}


class UnknownTeacherError(FeatcacheError, ValueError):
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
