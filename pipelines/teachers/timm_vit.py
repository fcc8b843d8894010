"""timm ViT teachers: DINOv2-B/14, DINOv3-B/16 and the SAM ViT-B image encoder."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from featstore.hub import hub_access
from featstore.schema import TeacherSpec
from featviews.pos_embed import POS_RESAMPLE_TAG, use_dinov2_pos_embed
from pipelines.teachers.base import DEFAULT_BASE_SIZE, Teacher, snap_down, tokens_to_grid
from pipelines.teachers.catalog import register_teacher
from pipelines.teachers.spec import NetBuild, teacher_spec
from pipelines.teachers.weights import (
    WeightsSource,
    load_weights_file,
    resolve_weights,
    unavailable,
)

SAM_NATIVE_INPUT = 1024  # SAM's encoder sees a 512 tile at ~2x (1024 px for a 518 canvas)
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
PRETRAINED_ALIASES = ("pretrained", "default")


def timm_filter_fn(model: nn.Module) -> Callable[..., Any] | None:
    """The ``checkpoint_filter_fn`` of the timm module defining ``model`` (remaps foreign keys)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def create_timm_model(
    arch: str, source: WeightsSource, allow_position: bool = False, **kwargs: Any
) -> tuple[nn.Module, str]:
    """Build a timm model and load ``source``; return it with how the weights were loaded.

    Raises:
        WeightsUnavailableError: a pretrained tag could not be fetched.
        WeightsMismatchError: a local file does not fit the architecture.
    """
    import timm

    if source.kind == "tag":
        name = arch if source.value in PRETRAINED_ALIASES else f"{arch}.{source.value}"
        with hub_access() as offline:
            try:
                return timm.create_model(name, pretrained=True, **kwargs), "pretrained"
            except (OSError, RuntimeError) as err:
                raise unavailable(source, "timm", err, offline) from err
    model = timm.create_model(arch, pretrained=False, **kwargs)
    how = "random"
    if source.kind == "file":
        how = load_weights_file(model, source, timm_filter_fn(model), allow_position)
    return model, how


class TimmTokenTeacher(Teacher):
    """Last block of a timm ViT through its final norm, prefix tokens (CLS, registers) dropped."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, base_size: int) -> None:
        super().__init__(spec, base_size)
        self.model = model
        self.patch = int(model.patch_embed.patch_size[0])
        self.prefix = int(model.num_prefix_tokens)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """forward_features = blocks + final norm; the prefix is sliced off."""
        tokens = self.model.forward_features(x)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        return tokens_to_grid(tokens, self.prefix, grid)


def _vit_teacher(
    name: str,
    arch: str,
    weights: str | None,
    tiny: bool,
    base_size: int,
    input_size: int,
    spec_extra: dict[str, str] | None = None,
    **kwargs: Any,
) -> TimmTokenTeacher:
    source = resolve_weights(weights)
    overrides = dict(TINY_VIT) if tiny else {}
    model, how = create_timm_model(arch, source, **overrides, **kwargs)
    if spec_extra and spec_extra.get("pos_resample") == POS_RESAMPLE_TAG:
        use_dinov2_pos_embed(model)
    net = NetBuild(arch, source, how, tiny, overrides)
    spec = teacher_spec(
        net,
        name,
        extra={"snap_to_stride": "1", **(spec_extra or {})},
        input_size=input_size,
        stride=int(model.patch_embed.patch_size[0]),
        channels=int(model.embed_dim),
        layer=f"blocks[{len(model.blocks) - 1}] + norm, prefix dropped",
        prefix_tokens_dropped=int(model.num_prefix_tokens),
        final_norm=True,
    )
    return TimmTokenTeacher(spec, model, base_size)


@register_teacher("dinov2_vitb14")
def dinov2_vitb14(
    weights: str | None = None, tiny: bool = False, base_size: int = DEFAULT_BASE_SIZE
) -> Teacher:
    """DINOv2-B/14 (timm ``vit_base_patch14_dinov2``), as RS-MTDF's ``get_intermediate_layers[-1]``.

    The canvas is used at its own size snapped down to a multiple of 14 (518 → 37×37 tokens).
    The model is built for that size; other sizes interpolate the position grid by DINOv2's own
    rule (bicubic, scale ``(n + 0.1) / 37``, no antialias: ``pipelines.teachers.pos_embed``;
    spec extra ``pos_resample=dinov2``) and fused SDPA attention is on (timm default).
    """
    input_size = snap_down(base_size, 14)
    return _vit_teacher(
        "dinov2_vitb14",
        "vit_base_patch14_dinov2",
        weights,
        tiny,
        base_size,
        input_size,
        spec_extra={"pos_resample": POS_RESAMPLE_TAG},
        img_size=input_size,
        dynamic_img_size=True,
    )


@register_teacher("dinov3_vitb16")
def dinov3_vitb16(
    weights: str | None = None, tiny: bool = False, base_size: int = DEFAULT_BASE_SIZE
) -> Teacher:
    """DINOv3-B/16 (timm ``vit_base_patch16_dinov3``): last block + norm, CLS + 4 registers dropped.

    Input: the canvas snapped down to a multiple of 16 (518 → 512 px, 32×32 tokens), so a token
    still covers about one DINOv2 token of the tile; RoPE positions need no interpolation.
    """
    input_size = snap_down(base_size, 16)
    return _vit_teacher(
        "dinov3_vitb16",
        "vit_base_patch16_dinov3",
        weights,
        tiny,
        base_size,
        input_size,
        img_size=input_size,
    )


class SamTeacher(Teacher):
    """SAM image encoder incl. its conv neck: NCHW [B, 256, g, g] → channels last."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, base_size: int) -> None:
        super().__init__(spec, base_size)
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """timm ``forward_features`` ends with the neck; the position grid is resampled."""
        return self.model.forward_features(x).permute(0, 2, 3, 1)


@register_teacher("sam_vitb")
def sam_vitb(
    weights: str | None = None, tiny: bool = False, base_size: int = DEFAULT_BASE_SIZE
) -> Teacher:
    """SAM ViT-B/16 image encoder (timm ``samvit_base_patch16``) with its neck → 256 channels.

    Input 1024 px for a 518 canvas (``base_size * 1024 / 518`` rounded to a multiple of 16
    otherwise); other canvases resample the position grid and relative positions (timm).
    """
    arch = "samvit_base_patch16"
    source = resolve_weights(weights)
    input_size = max(16, round(base_size * SAM_NATIVE_INPUT / DEFAULT_BASE_SIZE / 16) * 16)
    overrides: dict[str, Any] = {}
    if tiny:
        overrides = {**TINY_VIT, "global_attn_indexes": (1,), "neck_chans": 16, "window_size": 7}
    model, how = create_timm_model(arch, source, img_size=input_size, **overrides)
    spec = teacher_spec(
        NetBuild(arch, source, how, tiny, overrides),
        "sam_vitb",
        extra={"snap_to_stride": "1"},
        input_size=input_size,
        stride=int(model.patch_embed.patch_size[0]),
        channels=int(model.num_features),
        layer=f"blocks[{len(model.blocks) - 1}] + neck (conv 1x1, LN2d, conv 3x3, LN2d)",
        prefix_tokens_dropped=0,
        final_norm=True,
    )
    return SamTeacher(spec, model, base_size)
