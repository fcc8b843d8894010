"""Online-teacher mode: teachers from the ``pipelines`` registry run on the view tensors.

This is the A/B baseline of the cached trainer and the fallback for users without a store. The
teachers see the labeled views and the CutMixed strong views as the student does (un-normalised
[0, 1]; each teacher resizes and normalises inside, a CLIP-like teacher shrinks the view to its own
input). Their token grids are resampled onto the student's grid with the same rule as the cached
mode, so the loss code is shared. ``pipelines`` is imported lazily here and nowhere else in
``trainer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trainer.config import TeacherConfig
from trainer.step import Views, view_validity
from trainer.targets import resample_to_student


def load_teachers(teachers: Sequence[TeacherConfig], tiny: bool, device: torch.device,
                  base_size: int, random_weights: bool = False) -> dict[str, torch.nn.Module]:
    """Build the frozen teachers named in the config (registry names).

    A full-size teacher without weights is refused unless ``random_weights``
    (``model.random_weights``, CLI ``--random-weights``).

    `create_teacher` seeds random init, so a random (tiny) teacher here is the very network that
    filled a store: online and cached runs stay comparable.
    """
    from pipelines.teachers import create_teacher  # lazy: trainer must not need pipelines

    out: dict[str, torch.nn.Module] = {}
    for t in teachers:
        out[t.name] = create_teacher(t.name, weights=t.weights, tiny=tiny, device=str(device),
                                     base_size=base_size, random_weights=random_weights)
    return out


class OnlineTargets:
    """Targets computed by running the teachers on the rendered views.

    Args:
        teachers: Frozen teacher modules by name (``Teacher`` from ``pipelines``).
        masked: Return geometric validity (padding = 0); otherwise all ones.
    """

    def __init__(self, teachers: Mapping[str, torch.nn.Module], masked: bool = True) -> None:
        self.teachers = dict(teachers)
        self.masked = masked

    def grid(self, name: str, views: Views) -> torch.Tensor:
        """Teacher tokens ``[B, g, g, C]`` on ``cat(labeled, strong)``."""
        return self.teachers[name](views.student_input.float())

    def __call__(self, name: str, n: int, views: Views, batch_l: Mapping[str, Any],
                 batch_u: Mapping[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.teachers[name]
        crop = views.x_l.shape[-1]
        grid = self.grid(name, views)
        target = resample_to_student(grid, teacher.input_px(crop), teacher.spec.stride, crop, n)
        if self.masked:
            valid = view_validity(views, n)
        else:
            valid = torch.ones(target.shape[:3], device=target.device)
        return target, valid


def teacher_channels(teachers: Mapping[str, torch.nn.Module]) -> dict[str, int]:
    """Token width per teacher (to size the student's translators)."""
    return {name: int(t.spec.channels) for name, t in teachers.items()}


__all__ = ["OnlineTargets", "load_teachers", "teacher_channels"]
