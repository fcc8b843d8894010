"""DINOv3 ViT-B/16 student backbone of Co2S and its learnable class queries (reference §1.2).

timm's ``vit_base_patch16_dinov3_qkvb`` is the closest layout to the official vendored DINOv3
(q and v biases; the official k bias is masked to zero, timm keeps it as a zero buffer). Features:
the outputs of blocks 2, 7 and 11 through the final LayerNorm, prefix tokens dropped, as NCHW
maps (``forward_intermediates``). Attention is timm's fused (SDPA) path. Departures from the
official model, all small: LN eps 1e-5 (official 1e-6), RoPE in fp32 (official bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from trainer.student import _enable_sdpa

__all__ = ["DINO_ARCH", "DinoBackbone", "DinoSize", "LearnableQueries"]

DINO_ARCH = "vit_base_patch16_dinov3_qkvb"
QUERY_INIT_STD = 0.02


@dataclass(frozen=True)
class DinoSize:
    """ViT dimensions (timm overrides; empty = the real ViT-B) and the three blocks read."""

    blocks: tuple[int, int, int]
    width: int
    overrides: tuple[tuple[str, int], ...] = ()


class DinoBackbone(nn.Module):
    """DINOv3 ViT returning ``[skip2, skip1, top]`` normed block outputs, ``[B, width, h, w]``.

    Args:
        size: Dimensions and blocks.
        crop: Training crop (RoPE: no parameter depends on it).
    """

    def __init__(self, size: DinoSize, crop: int) -> None:
        super().__init__()
        self.blocks = size.blocks
        self.vit = timm.create_model(
            DINO_ARCH, pretrained=False, num_classes=0, img_size=crop, **dict(size.overrides)
        )
        _enable_sdpa(self.vit)
        self.embed_dim = size.width
        self.skip_dims = (size.width, size.width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm activation checkpointing of the blocks."""
        self.vit.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """ImageNet-normalised ``[B, 3, H, W]`` -> three ``[B, width, H/16, W/16]`` maps."""
        return self.vit.forward_intermediates(
            x,
            indices=list(self.blocks),
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
            stop_early=True,
        )


class LearnableQueries(nn.Module):
    """DINOv3's implicit class guidance: ``nn.Embedding(K, width)``, init N(0, 0.02²)."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, width)
        nn.init.normal_(self.embedding.weight, std=QUERY_INIT_STD)

    def forward(self, batch: int) -> torch.Tensor:
        """``[batch, K, width]`` (a broadcast view of the one table)."""
        table = self.embedding.weight
        if not torch.is_grad_enabled():
            # a view of a parameter made under no_grad still says requires_grad, with no
            # graph behind it (torch's FLOP counter and module tracker trip on it): cut it off
            table = table.detach()
        return table[None].expand(batch, -1, -1)
