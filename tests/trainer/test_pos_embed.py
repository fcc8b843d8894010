"""The student's position-embedding resampling follows DINOv2's official rule (issue 12, #1).

Official rule (``interpolate_pos_encoding`` in RS-MTDF's / UniMatch-V2's
``model/backbone/dinov2.py``, as in facebookresearch/dinov2): the learned ``M x M`` grid
(37 x 37 for ``img_size=518``) is returned as is for the native grid; any other ``h x w`` grid is
``F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")`` with
``align_corners=False`` and ``antialias=False``, and the result must be exactly ``h x w``. The
references below write that formula out; they never call timm's ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featviews.pos_embed import dinov2_pos_embed
from trainer.student import Student, StudentConfig, TeacherHead

DIM = 8
NATIVE = 37  # 518 / 14
TINY = {"embed_dim": DIM, "depth": 4, "num_heads": 2}


def synthetic_pos_embed(side: int = NATIVE, dim: int = DIM) -> torch.Tensor:
    """``[1, 1 + side^2, dim]``: a CLS entry and a field with fine detail (rough, like DINOv2's)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    waves = [torch.sin(0.9 * k * xx + 0.4 * yy) * torch.cos(0.7 * k * yy) for k in range(dim)]
    field = torch.stack(waves, dim=-1) + 0.5 * torch.randn(side, side, dim, generator=g)
    cls = torch.randn(1, 1, dim, generator=g)
    return torch.cat([cls, field.reshape(1, side * side, dim)], dim=1)


def official(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv2's formula written out: bicubic, scale (n + 0.1) / sqrt(N), no antialias."""
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
    assert out.shape[-2:] == (h, w)
    return torch.cat([pos[:, :1], out.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def tiny_student(**over: object) -> Student:
    kw: dict = dict(
        num_classes=3,
        img_size=NATIVE * 14,
        layers=(0, 1, 2, 3),
        model_kwargs=dict(TINY),
        teachers=(TeacherHead("clip", 6, "clip224"),),
        translator_hidden=8,
        features=8,
        out_channels=(4, 4, 8, 8),
        random_weights=True,
    )
    kw.update(over)
    torch.manual_seed(0)
    model = Student(StudentConfig(**kw)).eval()
    with torch.no_grad():
        model.backbone.pos_embed.copy_(synthetic_pos_embed())
    return model


@pytest.mark.parametrize("grid", [(16, 16), (74, 74), (20, 30), (5, 37)])
def test_resample_is_dinov2_formula(grid: tuple[int, int]) -> None:
    pos = synthetic_pos_embed()
    torch.testing.assert_close(dinov2_pos_embed(pos, grid, 1), official(pos, *grid))


def test_native_grid_untouched() -> None:
    pos = synthetic_pos_embed()
    assert dinov2_pos_embed(pos, (NATIVE, NATIVE), 1) is pos


def test_formula_differs_from_exact_size_antialiased() -> None:
    """Why it matters: the exact-size antialiased resize (timm's rule) is a different field."""
    pos = synthetic_pos_embed()
    grid = pos[:, 1:].reshape(1, NATIVE, NATIVE, DIM).permute(0, 3, 1, 2)
    timm_like = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)
    ours = dinov2_pos_embed(pos, (16, 16), 1)[:, 1:].reshape(1, 16, 16, DIM).permute(0, 3, 1, 2)
    cos = F.cosine_similarity(timm_like.flatten(), ours.flatten(), dim=0)
    assert cos < 0.99


def test_clip224_pass_adds_official_positions() -> None:
    """The 224 px pass of the real forward adds the official 16x16 grid to its patch tokens."""
    model = tiny_student()
    bb = model.backbone
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(2))
    seen: list[torch.Tensor] = []
    hook = bb.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    assert [s.shape[1] for s in seen] == [1 + 37 * 37, 1 + 16 * 16]  # full pass, then 224 pass
    x224 = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=True)
    with torch.no_grad():
        patches = bb.patch_embed(x224).reshape(1, 256, DIM)
        cls = bb.cls_token.reshape(1, 1, DIM)
        want = torch.cat([cls, patches], dim=1) + official(bb.pos_embed, 16, 16)
        want_native = torch.cat([cls, bb.patch_embed(x).reshape(1, -1, DIM)], 1) + bb.pos_embed
    torch.testing.assert_close(seen[1], want)
    torch.testing.assert_close(seen[0], want_native)


def test_full_pass_other_size_uses_formula() -> None:
    """Evaluation at another size (e.g. 280 px -> 20x20) resamples by the same rule."""
    model = tiny_student(teachers=())
    bb = model.backbone
    x = torch.randn(1, 3, 280, 420, generator=torch.Generator().manual_seed(3))
    seen: list[torch.Tensor] = []
    hook = bb.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    with torch.no_grad():
        patches = bb.patch_embed(x).reshape(1, 20 * 30, DIM)
        want = torch.cat([bb.cls_token.reshape(1, 1, DIM), patches], 1) + official(
            bb.pos_embed, 20, 30
        )
    torch.testing.assert_close(seen[0], want)


def test_ema_copy_resamples_its_own_positions() -> None:
    """The EMA model (a deep copy) must resample its own pos_embed, not the student's."""
    from trainer.ema import create_ema

    model = tiny_student()
    ema = create_ema(model).module
    with torch.no_grad():
        ema.backbone.pos_embed.mul_(-1.0)
        x = torch.zeros(1, 16, 16, DIM)
        got = ema.backbone._pos_embed(x)
    torch.testing.assert_close(got[:, 1:], official(-model.backbone.pos_embed, 16, 16)[:, 1:])
