"""Online-teacher mode: build the teachers from the ``pipelines`` registry.

This is the A/B baseline of the cached trainer and the fallback for users without a store; the
teachers run on the views in ``featviews.sources.OnlineSource``. ``pipelines`` is imported
lazily here and nowhere else in ``trainer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from featstore.errors import MissingTeacherError
from featstore.teacher_names import resolve_teacher_name
from trainer.config import TeacherConfig


def load_teachers(
    teachers: Sequence[TeacherConfig],
    tiny: bool,
    device: torch.device,
    base_size: int,
    random_weights: bool = False,
    store: Any = None,
) -> dict[str, torch.nn.Module]:
    """Build the frozen teachers named in the config (registry names).

    A full-size teacher without weights is refused unless ``random_weights``
    (``model.random_weights``, CLI ``--random-weights``). With a ``store``, a teacher the store
    records is built by ``pipelines.teachers.teacher_for_store``: it must have the stored spec,
    so online targets are the ones the store's cached targets came from (a teacher the store does
    not hold has nothing to be checked against).

    `create_teacher` seeds random init, so a random (tiny) teacher here is the very network that
    filled a store: online and cached runs stay comparable.

    Raises:
        TeacherSpecMismatchError: a teacher differs from the one the store recorded.
    """
    # lazy: trainer must not need pipelines
    from pipelines.teachers import create_teacher, teacher_for_store

    out: dict[str, torch.nn.Module] = {}
    for t in teachers:
        stored = _stored_name(store, t.name)
        if stored is not None:
            # the store records whether its teacher was the tiny test network; `--tiny` of the
            # run sizes the student (and teachers a store does not hold), never a stored teacher
            out[t.name] = teacher_for_store(
                store,
                stored,
                weights=t.weights,
                tiny=_stored_tiny(store, stored),
                random_weights=random_weights,
                device=str(device),
            )
            continue
        out[t.name] = create_teacher(
            t.name,
            weights=t.weights,
            tiny=tiny,
            device=str(device),
            base_size=base_size,
            random_weights=random_weights,
        )
    return out


def _stored_tiny(store: Any, name: str) -> bool:
    """Whether the store's teacher ``name`` was extracted as the tiny test network."""
    return dict(store.schema.teacher(name).spec.extra).get("tiny") == "1"


def _stored_name(store: Any, name: str) -> str | None:
    """The store's name of teacher ``name`` (None: no store, or the store does not hold it)."""
    if store is None:
        return None
    try:
        return resolve_teacher_name(store.schema, name)
    except MissingTeacherError:
        return None


def teacher_channels(teachers: Mapping[str, torch.nn.Module]) -> dict[str, int]:
    """Token width per teacher (to size the student's translators)."""
    return {name: int(t.spec.channels) for name, t in teachers.items()}


__all__ = ["load_teachers", "teacher_channels"]
