"""DPT segmentation head (the UniMatch-V2 / RS-MTDF variant, written from its description).

Four ViT token maps on one patch grid are projected, resized to a 4x/2x/1x/0.5x pyramid,
mapped to ``features`` channels and fused top-down by RefineNet-style blocks. No BatchNorm
(the reference builds the head with ``use_bn=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DPTHead", "FusionBlock", "ResidualConvUnit"]


class ResidualConvUnit(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 3x3 conv, plus the identity.

    Args:
        features: Channel count (in = out).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: the un-activated input is the residual.
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class FusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined skip, refine, upsample, 1x1 conv.

    Args:
        features: Channel count.
        has_skip: Whether the block receives a lateral (skip) input. The deepest block does not,
            so it gets no unit for it (the reference builds one and never uses it; an unused
            parameter would break DDP without ``find_unused_parameters``).
    """

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if has_skip else None
        self.unit = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        skip: torch.Tensor | None = None,
        size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Fuse ``x`` with ``skip`` and upsample to ``size`` (or x2 when ``size`` is None)."""
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("FusionBlock was built with has_skip=False but got a skip input")
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _resize_layer(channels: int, factor: float) -> nn.Module:
    """Resampler of one pyramid level: x4 / x2 transposed conv, identity, or stride-2 conv."""
    if factor == 4:
        return nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=4)
    if factor == 2:
        return nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
    if factor == 1:
        return nn.Identity()
    if factor == 0.5:
        return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
    raise ValueError(f"unsupported DPT resize factor {factor}; use 4, 2, 1 or 0.5")


class DPTHead(nn.Module):
    """DPT head over four equally sized token maps.

    Args:
        in_channels: Channel count of the backbone maps (ViT embed dim).
        num_classes: Output classes.
        features: Width of the fusion path (64 in RS-MTDF).
        out_channels: Per-level projection widths (48, 96, 192, 384 in RS-MTDF).
    """

    FACTORS = (4, 2, 1, 0.5)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        features: int = 64,
        out_channels: Sequence[int] = (48, 96, 192, 384),
    ) -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"DPTHead needs 4 out_channels, got {tuple(out_channels)}")
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, c, 1) for c in out_channels)
        self.resize_layers = nn.ModuleList(
            _resize_layer(c, f) for c, f in zip(out_channels, self.FACTORS, strict=True)
        )
        self.layer_rn = nn.ModuleList(
            nn.Conv2d(c, features, 3, padding=1, bias=False) for c in out_channels
        )
        # refine[0] is the shallowest (finest) block, refine[3] the deepest.
        self.refine = nn.ModuleList(FusionBlock(features, has_skip=i < 3) for i in range(4))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, num_classes, 1),
        )

    def forward(self, feats: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Segment from four NCHW maps (shallow to deep) on one grid.

        Args:
            feats: Four tensors ``[B, in_channels, h, w]``.
            out_size: ``(H, W)`` of the logits (the input image size).

        Returns:
            Logits ``[B, num_classes, H, W]``.
        """
        if len(feats) != 4:
            raise ValueError(f"DPTHead expects 4 feature maps, got {len(feats)}")
        stages = zip(self.projects, self.resize_layers, self.layer_rn, strict=True)
        pyramid = [rn(resize(proj(f))) for f, (proj, resize, rn) in zip(feats, stages, strict=True)]
        path = self.refine[3](pyramid[3], size=pyramid[2].shape[-2:])
        path = self.refine[2](path, pyramid[2], size=pyramid[1].shape[-2:])
        path = self.refine[1](path, pyramid[1], size=pyramid[0].shape[-2:])
        path = self.refine[0](path, pyramid[0])
        out = self.output_conv(path)
        return F.interpolate(out, size=tuple(out_size), mode="bilinear", align_corners=True)
