"""CLIP ViT-B/16 student backbone of Co2S: the MaskCLIP value path (co2s-reference.md §1.1).

The ViT is open_clip's ``VisionTransformer`` (the OpenAI layout: ``conv1`` without bias, CLS,
learned position embedding, ``ln_pre``, fused-QKV ``nn.MultiheadAttention`` blocks, ``ln_post``,
``proj``), held as ``self.visual`` so the ``visual.*`` keys of an OpenAI/open_clip checkpoint
load by name. Attention runs through ``nn.MultiheadAttention(need_weights=False)``, which
dispatches to ``F.scaled_dot_product_attention``.

Dense maps (the "value path" of a block): ``v = out_proj(V(ln_1(x))) + x; v = v + mlp(ln_2(v))``,
i.e. the block with attention replaced by identity on V. Blocks 0 and 4 give the skip maps; block
11's value path goes through ``ln_post`` and the visual projection (768 -> 512, no bias) and is
L2-normalised over channels. The ordinary output of the last block is unused by Co2S, so it is
not computed (the official code computes and discards it; the gradients are the same: its q/k
rows get none either way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.student import StudentConfigError

__all__ = [
    "CLIP_ACTIVATIONS",
    "ClipBackbone",
    "ClipSize",
    "resize_pos_embed",
    "value_path",
]

PATCH = 16

# Activation of the MLPs. OpenAI's CLIP weights were trained with QuickGELU; the official Co2S
# code builds MaskCLIP's ViT with exact GELU (a departure kept as an option).
CLIP_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"quickgelu": QuickGELU, "gelu": nn.GELU}


@dataclass(frozen=True)
class ClipSize:
    """ViT dimensions, the three blocks read (skip-2, skip-1, top), and the projection width
    (``None``: the width of the text embeddings it is built with, for tiny test towers)."""

    width: int
    layers: int
    heads: int
    blocks: tuple[int, int, int]
    output_dim: int | None = None


def value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's value path of one open_clip ``ResidualAttentionBlock`` on tokens ``[B, L, C]``."""
    attn = block.attn
    c = x.shape[-1]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * c :], attn.in_proj_bias[2 * c :])
    v = attn.out_proj(v) + x
    return v + block.mlp(block.ln_2(v))


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[1 + g*g, C]`` CLS + square grid position embedding to ``grid`` (bicubic).

    The official (MaskCLIP/mmseg) rule: bicubic, ``align_corners=False``, no antialias; the CLS
    row is kept.
    """
    side = round((pos.shape[0] - 1) ** 0.5)
    if (side, side) == tuple(grid):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False)
    patch = patch.to(pos.dtype).flatten(2).transpose(1, 2)[0]
    return torch.cat([pos[:1], patch], dim=0)


class ClipBackbone(nn.Module):
    """OpenAI CLIP image tower returning the three MaskCLIP value-path maps.

    Args:
        size: ViT dimensions and blocks.
        crop: Training crop; the position embedding holds ``(crop/16)^2 + 1`` rows (resized from
            the checkpoint's grid at load, as the official code does).
        output_dim: Width of the visual projection (512 for ViT-B/16, the text width).
        act: ``"quickgelu"`` (matches the OpenAI weights) or ``"gelu"`` (the official code).
    """

    def __init__(self, size: ClipSize, crop: int, output_dim: int, act: str = "quickgelu") -> None:
        super().__init__()
        if act not in CLIP_ACTIVATIONS:
            raise StudentConfigError(
                f"clip_act={act!r} is not known; use one of {sorted(CLIP_ACTIVATIONS)} "
                "(quickgelu matches the OpenAI weights, gelu is the official Co2S code)"
            )
        if crop % PATCH:
            raise StudentConfigError(f"crop {crop} must be a multiple of the CLIP patch {PATCH}")
        self.blocks = size.blocks
        self.visual = VisionTransformer(
            image_size=crop,
            patch_size=PATCH,
            width=size.width,
            layers=size.layers,
            heads=size.heads,
            mlp_ratio=4.0,
            output_dim=output_dim,
            act_layer=CLIP_ACTIVATIONS[act],
        )
        self.embed_dim = output_dim
        self.skip_dims = (size.width, size.width)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks (and value paths) in backward."""
        self.grad_checkpointing = enable

    def _run(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        v = self.visual
        x = v.conv1(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resize_pos_embed(v.positional_embedding, grid).to(x.dtype)
        return v.ln_pre(torch.cat([cls, x], dim=1) + pos), grid

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """ImageNet-normalised ``[B, 3, H, W]`` -> ``[skip2, skip1, top]``.

        ``skip2``/``skip1``: ``[B, width, H/16, W/16]`` value paths of the two shallow blocks;
        ``top``: ``[B, output_dim, H/16, W/16]``, L2-normalised over channels.
        """
        tokens, (gh, gw) = self._embed(x)
        blocks = self.visual.transformer.resblocks
        maps: list[torch.Tensor] = []
        for i in range(self.blocks[-1] + 1):
            if i in self.blocks:
                maps.append(self._run(value_path, blocks[i], tokens))
            if i < self.blocks[-1]:  # the last block's own output is unused
                tokens = self._run(blocks[i], tokens)
        top = self.visual.ln_post(maps[-1]) @ self.visual.proj
        maps[-1] = top
        out = [m[:, 1:].transpose(1, 2).reshape(m.shape[0], -1, gh, gw) for m in maps]
        out[-1] = F.normalize(out[-1], dim=1)
        return out
