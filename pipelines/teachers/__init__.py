"""Frozen teachers behind a registry: ``create_teacher(name, weights, tiny) -> Teacher``.

Built-in names: ``dinov2_vitb14``, ``clip_vitl14``, ``sam_vitb``, ``dinov3_vitb16``,
``efficientnet_lite0`` (real ImageNet weights by default, offline); any timm model as
``timm:<model>[:<feature_index>]``. A full-size teacher without weights is refused unless
``random_weights=True`` (CLI ``--random-weights``); ``tiny=True`` teachers are always random.
``teacher_for_store(store, name, ...)`` rebuilds the teacher a store was filled with and refuses
it when its spec differs from the stored one.

Modules, from the bottom: ``base`` (interface), ``weights``, ``spec`` (spec builder), ``catalog``
(the name table factories register into), the factories (``timm_vit``, ``clip``,
``timm_generic``), ``registry`` (``create_teacher``), ``store_teacher``.
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
from pipelines.teachers.store_teacher import (
    TeacherSpecMismatchError,
    check_store_teacher,
    teacher_for_store,
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
    "TeacherSpecMismatchError",
    "UnknownTeacherError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "create_teacher",
    "default_weights",
    "check_store_teacher",
    "efficientnet_lite0_weights_path",
    "list_teachers",
    "load_state_dict_by_position",
    "plan_weights",
    "register_teacher",
    "teacher_for_store",
]
