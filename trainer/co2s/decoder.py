"""Co2S cost-volume decoder (the official ``VLGHead``; design/co2s-reference.md §1.3).

A SemiVL/CAT-Seg-style decoder: the cosine similarity between the top feature map and the K
class embeddings is its *input*; per-class convolutions, two class-attention layers and two
up-blocks with skip features turn it into K logit maps at 1/4 of the input resolution.

Shapes (B images, K classes, top map ``[B, Cv, h, w]`` at stride 16):
cost volume ``[B, K, h, w]`` -> per class ``[B*K, 128, h, w]`` -> ... -> ``[B, K, 4h, 4w]``.
No BatchNorm anywhere (GroupNorm only), so train and eval modes compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.student import StudentConfigError

__all__ = ["CostVolumeDecoder", "DecoderSpec"]


@dataclass(frozen=True)
class DecoderSpec:
    """Hyper-parameters of the decoder; defaults are the official ones (both students).

    Attributes:
        channels: Width of the per-class volume.
        class_channels: Width of the class projection φ (concatenated to the volume tokens).
        conv1_kernel: Kernel of the first per-class convolution (1 -> ``channels``).
        aspp_rates: Dilations of the three 3x3 ASPP branches (plus a 1x1 and a pooling branch).
        num_layers: Class-attention layers.
        num_heads: Heads of each class-attention layer.
        pool: Side of the average pooling in front of the class attention.
        skip_channels: Output widths of the skip projections (skip-1, skip-2).
        up_channels: Output widths of the two up-blocks.
        channels_per_group: GroupNorm groups = width // this (8 groups at 128, 4 at 64, 2 at 32).
    """

    channels: int = 128
    class_channels: int = 128
    conv1_kernel: int = 7
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    num_layers: int = 2
    num_heads: int = 4
    pool: int = 4
    skip_channels: tuple[int, int] = (32, 16)
    up_channels: tuple[int, int] = (64, 32)
    channels_per_group: int = 16


def _norm_relu(channels: int, per_group: int) -> list[nn.Module]:
    return [nn.GroupNorm(channels // per_group, channels), nn.ReLU(inplace=True)]


class ResidualASPP(nn.Module):
    """ASPP on the per-class volume (1x1, three dilated 3x3, image pooling), fused, plus input."""

    def __init__(self, channels: int, rates: tuple[int, ...], per_group: int) -> None:
        super().__init__()
        branches = [nn.Conv2d(channels, channels, 1, bias=False)]
        branches += [
            nn.Conv2d(channels, channels, 3, padding=r, dilation=r, bias=False) for r in rates
        ]
        self.branches = nn.ModuleList(
            nn.Sequential(conv, *_norm_relu(channels, per_group)) for conv in branches
        )
        self.pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels, 1, bias=False),
            *_norm_relu(channels, per_group),
        )
        n_in = channels * (len(branches) + 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(n_in, channels, 1, bias=False), *_norm_relu(channels, per_group)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` -> ``[N, C, h, w]``."""
        pooled = F.interpolate(
            self.pooling(x), size=x.shape[-2:], mode="bilinear", align_corners=True
        )
        feats = [branch(x) for branch in self.branches] + [pooled]
        return x + self.fuse(torch.cat(feats, dim=1))


class ClassAttentionLayer(nn.Module):
    """Pre-LN transformer layer attending across the K classes at every pooled location.

    Tokens are ``concat(volume, φ(class))``; only the volume part of the output is kept,
    upsampled back (bilinear, align_corners=True as the official code) and added as a residual.
    """

    def __init__(self, channels: int, class_channels: int, heads: int, pool: int) -> None:
        super().__init__()
        dim = channels + class_channels
        self.channels = channels
        self.pool = pool
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        # FFN hidden = 4 x volume width (the official feedforward_channels), not 4 x token width
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * channels), nn.GELU(), nn.Linear(4 * channels, dim)
        )

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        y = self.norm1(tokens)
        # need_weights=False lets nn.MultiheadAttention dispatch to scaled_dot_product_attention
        tokens = tokens + self.attn(y, y, y, need_weights=False)[0]
        return tokens + self.ffn(self.norm2(tokens))

    def forward(self, volume: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``volume [B, K, C, h, w]``, ``classes [B, K, Cφ]`` -> ``[B, K, C, h, w]``."""
        b, k, c, h, w = volume.shape
        pooled = F.avg_pool2d(volume.reshape(b * k, c, h, w), self.pool)
        hp, wp = pooled.shape[-2:]
        # tokens: one sequence of K classes per (image, pooled location)
        tokens = pooled.reshape(b, k, c, hp * wp).permute(0, 3, 1, 2)  # [B, hp*wp, K, C]
        cls = classes[:, None].expand(b, hp * wp, k, classes.shape[-1])
        tokens = torch.cat([tokens, cls], dim=-1).reshape(b * hp * wp, k, -1)
        out = self._encode(tokens)[..., : self.channels]
        out = out.reshape(b, hp, wp, k, c).permute(0, 3, 4, 1, 2).reshape(b * k, c, hp, wp)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return volume + out.reshape(b, k, c, h, w)


class UpBlock(nn.Module):
    """Transposed conv x2, concat the (per-class repeated) skip map, two 3x3 conv + GN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int, per_group: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch - skip_ch, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            *_norm_relu(out_ch, per_group),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            *_norm_relu(out_ch, per_group),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x [B*K, C, h, w]``, ``skip [B, Cs, h', w']`` -> ``[B*K, out, 2h, 2w]``."""
        x = self.up(x)
        skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=True)
        skip = skip.repeat_interleave(x.shape[0] // skip.shape[0], dim=0)  # (b k) order
        return self.conv(torch.cat([x, skip], dim=1))


class CostVolumeDecoder(nn.Module):
    """The official VLG head.

    Args:
        embed_dim: Width ``Cv`` of the top map and of the class embeddings (512 CLIP, 768 DINOv3).
        skip_dims: Widths of the skip-1 (deeper) and skip-2 (shallower) maps.
        spec: Hyper-parameters (official defaults).
    """

    def __init__(
        self, embed_dim: int, skip_dims: tuple[int, int], spec: DecoderSpec | None = None
    ) -> None:
        super().__init__()
        spec = spec or DecoderSpec()
        self.spec = spec
        c, g = spec.channels, spec.channels_per_group
        self.conv1 = nn.Conv2d(1, c, spec.conv1_kernel, padding=spec.conv1_kernel // 2)
        self.aspp = ResidualASPP(c, spec.aspp_rates, g)
        self.class_proj = nn.Sequential(nn.Linear(embed_dim, spec.class_channels), nn.ReLU())
        self.layers = nn.ModuleList(
            ClassAttentionLayer(c, spec.class_channels, spec.num_heads, spec.pool)
            for _ in range(spec.num_layers)
        )
        self.skip_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, s, 3, padding=1), nn.ReLU())
            for d, s in zip(skip_dims, spec.skip_channels, strict=True)
        )
        up1, up2 = spec.up_channels
        self.up1 = UpBlock(c, up1, spec.skip_channels[0], g)
        self.up2 = UpBlock(up1, up2, spec.skip_channels[1], g)
        self.head = nn.Conv2d(up2, 1, 3, padding=1)

    def forward(
        self, top: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor], classes: torch.Tensor
    ) -> torch.Tensor:
        """Decode K logit maps.

        Args:
            top: ``[B, Cv, h, w]`` top feature map.
            skips: ``(skip1 [B, D1, h, w], skip2 [B, D2, h, w])`` (deeper first).
            classes: ``[B, K, Cv]`` class embeddings (text rows or learnable queries).

        Returns:
            Logits ``[B, K, 4h, 4w]``.
        """
        b, _, h, w = top.shape
        if min(h, w) < self.spec.pool:
            raise StudentConfigError(
                f"the Co2S decoder pools {self.spec.pool}x{self.spec.pool} tokens but the feature "
                f"map is {h}x{w}; use a crop of at least {16 * self.spec.pool} px (--crop-size)"
            )
        k = classes.shape[1]
        # The official head normalises the class embeddings once and feeds the *normalised*
        # rows to φ as well (its `text_feats` is reassigned before the projection).
        classes = F.normalize(classes, dim=-1)
        cost = torch.einsum("bchw,bkc->bkhw", F.normalize(top, dim=1), classes)
        volume = self.aspp(self.conv1(cost.reshape(b * k, 1, h, w)))
        volume = volume.reshape(b, k, -1, h, w)
        projected = self.class_proj(classes)
        for layer in self.layers:
            volume = layer(volume, projected)
        skip1, skip2 = (proj(s) for proj, s in zip(self.skip_proj, skips, strict=True))
        x = self.up1(volume.reshape(b * k, -1, h, w), skip1)
        x = self.up2(x, skip2)
        return self.head(x).reshape(b, k, 4 * h, 4 * w)
