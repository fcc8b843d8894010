"""A store's teacher, rebuilt: build it as extraction did and check it computes the same tokens.

Bank building, the audit, online training over a store and the demo all need the very teacher
that filled a store. :func:`teacher_for_store` builds it from the registry (random init is seeded,
so a random teacher is the same network again) and refuses it, naming the differing spec fields,
when it is not the teacher the store recorded (other weights, tiny flag, layer, input size ...).
"""

from __future__ import annotations

from typing import Any

import torch

from featstore.schema import TeacherSpec
from pipelines.teachers.base import Teacher
from pipelines.teachers.registry import create_teacher
from pipelines.teachers.weights import WeightsError

# A long field (e.g. a layer description) is cut in the message; the field name says enough.
_SHOWN_CHARS = 80


class TeacherSpecMismatchError(WeightsError):
    """A teacher built or given for a store differs from the teacher the store was filled with."""


def _fields(spec: TeacherSpec) -> dict[str, Any]:
    """Spec fields by name, each ``extra`` pair as its own ``extra.<key>`` field."""
    fields = spec.to_dict()
    del fields["extra"]
    return fields | {f"extra.{k}": v for k, v in spec.extra}


def spec_differences(stored: TeacherSpec, built: TeacherSpec) -> list[str]:
    """Names of the spec fields (``extra.<key>`` for extra pairs) that differ, sorted."""
    want, have = _fields(stored), _fields(built)
    return sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def check_store_teacher(store: Any, name: str, teacher: Teacher, origin: str = "") -> None:
    """Refuse ``teacher`` unless it is the teacher ``store`` recorded under ``name``.

    Args:
        store: An opened feature store (``featstore.open_store``).
        name: The stored teacher name.
        teacher: The teacher to check (its ``spec`` and ``base_size``).
        origin: Where it came from, for the message (e.g. ``"built with tiny=True"``).

    Raises:
        TeacherSpecMismatchError: the specs differ (the fields are named) or the canvas size does.
    """
    stored = store.schema.teacher(name).spec
    how = f" ({origin})" if origin else ""
    diff = spec_differences(stored, teacher.spec)
    if diff:
        want, have = _fields(stored), _fields(teacher.spec)
        details = "; ".join(
            f"{k}: stored {_shown(want.get(k))}, built {_shown(have.get(k))}" for k in diff
        )
        raise TeacherSpecMismatchError(
            f"teacher {name!r}{how} does not match the spec stored in {store.url!r}: it differs "
            f"in {', '.join(diff)} ({details}); pass the --weights {name}=PATH and --tiny flag "
            f"the store was extracted with (`featcache info {store.url}` shows the stored spec)"
        )
    base = int(getattr(teacher, "base_size", store.schema.base_size))
    if base != store.schema.base_size:
        raise TeacherSpecMismatchError(
            f"teacher {name!r}{how} works on {base} px canvases but {store.url!r} was extracted "
            f"at base_size {store.schema.base_size}; build it with base_size="
            f"{store.schema.base_size}"
        )


def teacher_for_store(
    store: Any,
    name: str,
    weights: str | None = None,
    tiny: bool = False,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
) -> Teacher:
    """The teacher ``store`` recorded under ``name``, rebuilt and checked against its spec.

    Args:
        store: An opened feature store (``featstore.open_store``).
        name: The stored teacher name (a registry name or ``timm:<model>:<index>``).
        weights: As for :func:`create_teacher` (CLI ``--weights NAME=PATH``).
        tiny: Build the tiny variant (the store must have been extracted with ``--tiny``).
        random_weights: Accept random init for a full-size teacher (CLI ``--random-weights``).
        device: Where the teacher runs.

    Raises:
        TeacherSpecMismatchError: the built teacher is not the one the store recorded.
        UnknownTeacherError, WeightsError: as :func:`create_teacher`.
    """
    teacher = create_teacher(
        name,
        weights=weights,
        tiny=tiny,
        device=device,
        base_size=store.schema.base_size,
        random_weights=random_weights,
    )
    check_store_teacher(store, name, teacher, f"built with weights={weights!r}, tiny={tiny}")
    return teacher
