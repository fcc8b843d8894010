"""Frozen teachers behind a registry: ``create_teacher(name, weights, tiny) -> Teacher``.

Built-in names: ``dinov2_vitb14``, ``clip_vitl14``, ``sam_vitb``, ``dinov3_vitb16``,
``efficientnet_lite0`` (real ImageNet weights by default, offline); any timm model as
``timm:<model>[:<feature_index>]``. A full-size teacher without weights is refused unless
``random_weights=True`` (CLI ``--random-weights``); ``tiny=True`` teachers are always random.
"""

from pipelines.teachers.base import Teacher, TeacherInputError
from pipelines.teachers.registry import (
    UnknownTeacherError,
    create_teacher,
    default_weights,
    list_teachers,
    plan_weights,
    register_teacher,
)
from pipelines.teachers.weights import (
    RandomWeightsRefusedError,
    WeightsError,
    WeightsMismatchError,
    WeightsUnavailableError,
    efficientnet_lite0_weights_path,
    load_state_dict_by_position,
)

__all__ = [
    "RandomWeightsRefusedError",
    "Teacher",
    "TeacherInputError",
    "UnknownTeacherError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "create_teacher",
    "default_weights",
    "efficientnet_lite0_weights_path",
    "list_teachers",
    "load_state_dict_by_position",
    "plan_weights",
    "register_teacher",
]
