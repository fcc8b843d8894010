"""CLIP ViT-L/14 teacher (open_clip visual tower) exactly as RS-MTDF taps it.

RS-MTDF (``clip_modifie``) returns the residual stream after the last resblock, CLS removed, before
``ln_post`` and without the projection, for a 224 px input made by ``bilinear(align_corners=True)``
without antialiasing from an ImageNet-normalised image. That is the default here
(``preprocess="rsmtdf"``); ``preprocess="openai"`` uses CLIP's own statistics and bicubic
antialiased resizing instead. Only the visual tower is built or kept (the text tower is 124 M
parameters RS-MTDF carries for nothing).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featstore.constants import CLIP_MEAN as OPENAI_MEAN
from featstore.constants import CLIP_STD as OPENAI_STD
from featstore.constants import IMAGENET_MEAN, IMAGENET_STD
from featstore.hub import hub_access
from featstore.schema import ResizeSpec, TeacherSpec
from pipelines.teachers.base import DEFAULT_BASE_SIZE, Teacher, tokens_to_grid
from pipelines.teachers.catalog import register_teacher
from pipelines.teachers.spec import NetBuild, teacher_spec
from pipelines.teachers.weights import (
    WeightsError,
    WeightsSource,
    load_strict,
    read_state_dict,
    resolve_weights,
    unavailable,
)

ARCH = "ViT-L-14"
CLIP_INPUT = 224
PREPROCESS = {
    "rsmtdf": (ResizeSpec("bilinear", True, False), IMAGENET_MEAN, IMAGENET_STD),
    "openai": (ResizeSpec("bicubic", False, True), OPENAI_MEAN, OPENAI_STD),
}
TINY_VISION = {"layers": 2, "width": 32, "head_width": 16}
TINY_EMBED_DIM = 16


def resize_pos_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g0², C] CLIP position table → [1 + grid², C] (bicubic, antialias, as open_clip)."""
    cls_pos, grid_pos = pos[:1], pos[1:]
    g0 = int(round(grid_pos.shape[0] ** 0.5))
    if g0 == grid:
        return pos
    img = grid_pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls_pos, img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


class ClipTeacher(Teacher):
    """open_clip ``VisionTransformer`` run block by block to tap the pre-``ln_post`` stream."""

    def __init__(self, spec: TeacherSpec, visual: nn.Module, base_size: int) -> None:
        super().__init__(spec, base_size)
        self.visual = visual

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 → [CLS] + tokens + (resized) positions → ln_pre → resblocks; CLS dropped."""
        v = self.visual
        x = v.conv1(x)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_grid(v.positional_embedding, grid).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)
        return tokens_to_grid(x, 1, (grid, grid))


def _vision_cfg(tiny: bool) -> tuple[int, dict[str, Any]]:
    import open_clip

    cfg = open_clip.get_model_config(ARCH)
    vision = dict(cfg["vision_cfg"])
    if tiny:
        return TINY_EMBED_DIM, {**vision, **TINY_VISION}
    return int(cfg["embed_dim"]), vision


def _visual_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Full CLIP checkpoints (open_clip or OpenAI) prefix the tower with "visual."; the text
    # tower and OpenAI's metadata entries are dropped.
    if any(k.startswith("visual.") for k in state_dict):
        return {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    return state_dict


def build_visual(source: WeightsSource, tiny: bool, quick_gelu: bool) -> nn.Module:
    """The visual tower of ``ViT-L-14`` with ``source`` loaded (text tower never kept).

    Raises:
        WeightsUnavailableError: a pretrained tag could not be fetched.
        WeightsMismatchError: a local file does not fit the tower.
    """
    import open_clip
    from open_clip.model import _build_vision_tower  # no public visual-only builder exists

    if source.kind == "tag":
        if tiny:
            raise WeightsError("tiny=True builds a random toy tower; pass weights=None with it")
        with hub_access() as offline:
            try:
                model = open_clip.create_model(ARCH, pretrained=source.value)
            except (OSError, RuntimeError) as err:
                raise unavailable(source, "open_clip", err, offline) from err
        return model.visual
    embed_dim, vision_cfg = _vision_cfg(tiny)
    visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
    if source.kind == "file":
        state = _visual_state(read_state_dict(source.path))
        load_strict(visual, state, f"file {source.value}")
    return visual


def _uses_quick_gelu(visual: nn.Module) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in visual.modules())


@register_teacher("clip_vitl14")
def clip_vitl14(
    weights: str | None = None,
    tiny: bool = False,
    base_size: int = DEFAULT_BASE_SIZE,
    preprocess: str = "rsmtdf",
    quick_gelu: bool = True,
) -> Teacher:
    """CLIP ViT-L/14 visual tower: pre-``ln_post`` residual stream, CLS dropped, 16×16×1024 at 224.

    Args:
        weights: None/"random", a local checkpoint (full CLIP or visual-only, OpenAI TorchScript
            accepted) or an open_clip pretrained tag (e.g. "openai").
        tiny: A 2-block, width-32 tower (tests).
        base_size: Canvas size that maps to the 224 px input (2× canvas → 448 px).
        preprocess: "rsmtdf" (official: bilinear align_corners, no antialias, ImageNet stats) or
            "openai" (CLIP stats, bicubic antialias).
        quick_gelu: QuickGELU activations, as OpenAI's weights were trained with.

    Raises:
        ValueError: unknown ``preprocess``.
    """
    if preprocess not in PREPROCESS:
        raise ValueError(f"clip_vitl14: preprocess={preprocess!r} not in {sorted(PREPROCESS)}")
    resize, mean, std = PREPROCESS[preprocess]
    source = resolve_weights(weights)
    visual = build_visual(source, tiny, quick_gelu)
    width = int(visual.conv1.out_channels)
    patch = int(visual.conv1.kernel_size[0])
    depth = len(visual.transformer.resblocks)
    how = {"file": "by_name", "tag": "pretrained"}.get(source.kind, "random")
    overrides = {"embed_dim": TINY_EMBED_DIM, **TINY_VISION} if tiny else {}
    spec = teacher_spec(
        NetBuild(ARCH, source, how, tiny, overrides, family="open_clip", part=".visual"),
        "clip_vitl14",
        extra={
            "preprocess": preprocess,
            "quick_gelu": "1" if _uses_quick_gelu(visual) else "0",
            "snap_to_stride": "1",
        },
        input_size=CLIP_INPUT,
        stride=patch,
        channels=width,
        layer=f"transformer.resblocks[{depth - 1}] residual stream, before ln_post, no proj, "
        "CLS dropped",
        resize=resize,
        mean=mean,
        std=std,
        prefix_tokens_dropped=1,
        final_norm=False,
    )
    return ClipTeacher(spec, visual, base_size)
