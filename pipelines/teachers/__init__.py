"""Frozen teachers behind a registry: ``create_teacher(name, weights, tiny) -> Teacher``.

Built-in names: ``dinov2_vitb14``, ``clip_vitl14``, ``sam_vitb``, ``dinov3_vitb16``; any timm
model as ``timm:<model>[:<feature_index>]``.
"""

from pipelines.teachers.base import Teacher, TeacherInputError
from pipelines.teachers.registry import (
    UnknownTeacherError,
    create_teacher,
    list_teachers,
    register_teacher,
)
from pipelines.teachers.weights import (
    WeightsError,
    WeightsMismatchError,
    WeightsUnavailableError,
    efficientnet_lite0_weights_path,
    load_state_dict_by_position,
)

__all__ = [
    "Teacher",
    "TeacherInputError",
    "UnknownTeacherError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "create_teacher",
    "efficientnet_lite0_weights_path",
    "list_teachers",
    "load_state_dict_by_position",
    "register_teacher",
]
