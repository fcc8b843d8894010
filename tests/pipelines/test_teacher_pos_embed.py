"""DINOv2-B teacher: off its native grid, positions follow DINOv2's own rule (issue 12, #1).

The official RS-MTDF teacher only runs at its native 518 px grid (37 x 37), where nothing is
resampled. Cache levels at other scales run it on other grids; there we use DINOv2's own
``interpolate_pos_encoding`` (bicubic, ``scale_factor = (n + 0.1) / M``, no antialias), written
out below, rather than timm's exact-size antialiased resize.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from featviews.pos_embed import dinov2_pos_embed
from pipelines.teachers import create_teacher

BASE = 112  # tiny teacher: 112 px is its native input (8 x 8 grid)


def official(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv2's formula written out (CLS entry first, then the resized patch grid)."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid,
        scale_factor=((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n)),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    return torch.cat([pos[:, :1], out.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def _teacher():
    torch.manual_seed(0)
    teacher = create_teacher("dinov2_vitb14", tiny=True, base_size=BASE)
    with torch.no_grad():  # a rough field: smooth random init hides resize differences
        teacher.model.pos_embed.normal_(generator=torch.Generator().manual_seed(1))
    return teacher


def _block0_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        hook.remove()
    return seen[0]


def test_spec_names_the_rule() -> None:
    assert _teacher().spec.extra_dict["pos_resample"] == "dinov2"


def test_double_scale_level_uses_dinov2_rule() -> None:
    teacher = _teacher()
    model = teacher.model
    assert model.pos_embed.shape[1] == 1 + 8 * 8
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # 16 x 16
    got = _block0_input(model, x)
    with torch.no_grad():
        patches = model.patch_embed(x).reshape(1, 256, -1)
        want = torch.cat([model.cls_token, patches], dim=1) + official(model.pos_embed, 16, 16)
    torch.testing.assert_close(got, want)


def test_native_grid_adds_positions_unchanged() -> None:
    model = _teacher().model
    x = torch.randn(1, 3, BASE, BASE, generator=torch.Generator().manual_seed(3))
    got = _block0_input(model, x)
    with torch.no_grad():
        patches = model.patch_embed(x).reshape(1, 64, -1)
        want = torch.cat([model.cls_token, patches], dim=1) + model.pos_embed
    torch.testing.assert_close(got, want)


def test_helper_matches_formula_when_shrinking() -> None:
    pos = torch.randn(1, 1 + 37 * 37, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(dinov2_pos_embed(pos, (16, 16), 1), official(pos, 16, 16))
