"""DINOv2's own position-grid resampling for timm DINOv2 students and teachers.

The official DINOv2 code (``interpolate_pos_encoding``, ``interpolate_offset=0.1``,
``interpolate_antialias=False``) resizes the learned ``M x M`` grid for any other ``h x w`` grid
bicubically with ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)``, ``align_corners=False`` and
no antialias. timm's ``dynamic_img_size`` resizes to the exact size with antialias on instead.
The official RS-MTDF teacher only ever runs at its native 518 px (37 x 37) grid, where both
agree; cache levels at other scales (e.g. 2x renders, 74 x 74) use DINOv2's rule through this.

The student (``trainer.student``) and the DINOv2 teachers (``pipelines.teachers.timm_vit``) both
use this one copy. timm's ``resample_abs_pos_embed`` (exact size, antialiased) gives a visibly
different field when shrinking 37 -> 16 (the 224 px CLIP pass), so it is not used.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

# DINOv2's ``interpolate_offset``: the grid is resized by a scale factor computed from
# ``side + 0.1`` (not to an exact size) to dodge float error (facebookresearch/dino#8).
DINOV2_POS_OFFSET = 0.1
POS_RESAMPLE_TAG = "dinov2"  # TeacherSpec.extra "pos_resample": fingerprints the rule


def dinov2_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Position embedding ``[1, prefix + h*w, D]`` for a ``grid`` of patches, DINOv2's rule."""
    n = pos_embed.shape[1] - num_prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    if tuple(grid) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, num_prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = tuple((g + DINOV2_POS_OFFSET) / math.sqrt(n) for g in grid)
    out = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != tuple(grid):  # the official code asserts this too
        raise RuntimeError(f"position grid resized to {tuple(out.shape[-2:])}, expected {grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :num_prefix], out], dim=1)


def _pos_embed_step(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` (dynamic size, NHWC in) with DINOv2's resize."""
    b, h, w, c = x.shape
    prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    pos = dinov2_pos_embed(self.pos_embed, (h, w), prefix)
    x = x.view(b, h * w, c)
    extra = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:  # positions cover patches only; prefix tokens are added unshifted
        return self.pos_drop(torch.cat([*extra, x + pos], dim=1))
    return self.pos_drop(torch.cat([*extra, x], dim=1) + pos)


def use_dinov2_pos_embed(model: nn.Module) -> None:
    """Route a timm ViT's position step through :func:`dinov2_pos_embed` (this instance only).

    Raises:
        ValueError: the model has no learned position grid or no dynamic image size.
    """
    if getattr(model, "pos_embed", None) is None or not getattr(model, "dynamic_img_size", False):
        raise ValueError(f"{type(model).__name__} has no dynamically resized learned position grid")
    model._pos_embed = types.MethodType(_pos_embed_step, model)
