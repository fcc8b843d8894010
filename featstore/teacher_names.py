"""The names a stored teacher answers to: its stored name and the names a user would type.

A store keeps each teacher under its spec name, which for a timm teacher is the canonical
``timm:<model>:<index>`` even when the user typed ``timm:<model>``; the registered
``efficientnet_lite0`` is stored as typed, and is also ``timm:tf_efficientnet_lite0:3``. Audit,
bank and train look names up here, so each of those names finds the stored teacher. Aliases are
read from the stored spec alone (no registry, no model build): featstore knows no teachers.
"""

from __future__ import annotations

from featstore.errors import MissingTeacherError
from featstore.schema import StoreSchema, TeacherSpec

TIMM_PREFIX = "timm:"


def teacher_aliases(spec: TeacherSpec) -> tuple[str, ...]:
    """``spec.name``, plus ``timm:<arch>:<index>`` and ``timm:<arch>`` for a timm feature level.

    Tiny variants (an arch with ``[tiny:...]``) have no alias: no user types their arch.
    """
    names = [spec.name]
    index = dict(spec.extra).get("feature_index")
    if spec.family == "timm" and index is not None and "[" not in spec.arch:
        names += [f"{TIMM_PREFIX}{spec.arch}:{index}", f"{TIMM_PREFIX}{spec.arch}"]
    return tuple(dict.fromkeys(names))


def resolve_teacher_name(schema: StoreSchema, name: str) -> str:
    """The stored name of the teacher the user called ``name``.

    An exact stored name wins; otherwise ``name`` must be an alias of exactly one stored teacher
    (``timm:<model>`` without an index finds the one stored level of that model).

    Raises:
        MissingTeacherError: no stored teacher answers to ``name``, or several do.
    """
    stored = schema.teacher_names
    if name in stored:
        return name
    matches = [s for s in stored if name in teacher_aliases(schema.teacher(s).spec)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise MissingTeacherError(
            f"teacher {name!r} matches several teachers in the store: {matches}; "
            "pass one of those names with --teacher"
        )
    known = "; ".join(_described(schema.teacher(s).spec) for s in stored)
    raise MissingTeacherError(
        f"teacher {name!r} is not in the store; it holds: {known or 'no teacher'}. Pass one of "
        "those names with --teacher, or extract this teacher into the store first"
    )


def _described(spec: TeacherSpec) -> str:
    aliases = teacher_aliases(spec)
    return f"{aliases[0]} (also {', '.join(aliases[1:])})" if len(aliases) > 1 else aliases[0]
