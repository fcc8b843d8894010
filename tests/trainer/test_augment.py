"""Batched view rendering, photometric ops and CutMix against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from featviews.draw import ViewParams
from featviews.geometry import ViewGeometry
from featviews.render import pixel_valid, render_masks, render_views
from featviews.sample import cutmix_targets
from trainer.augment import (
    PhotometricParams,
    adjust_hue,
    apply_photometric,
    box_mask,
    cutmix_boxes,
    cutmix_pixels,
    gaussian_blur,
    strong_photometric,
)

T, V, N = 64, 70, 5
VIEWS = [
    ViewParams(64, 0, 0, False, T, V),
    ViewParams(70, 0, 0, True, T, V),
    ViewParams(100, 13, 30, False, T, V),
    ViewParams(128, 58, 1, True, T, V),
    ViewParams(91, 21, 0, True, T, V),
    ViewParams(50, 0, 0, False, T, V),
    ViewParams(32, 0, 0, True, T, V),
    ViewParams(45, 0, 0, False, T, V),
]


def _reference_view(img: torch.Tensor, p: ViewParams, mode: str) -> torch.Tensor:
    """Resize the whole tile to S with F.interpolate, pad right/bottom, crop, flip."""
    x = img.unsqueeze(0)
    if mode == "bilinear":
        z = F.interpolate(
            x.float() / 255,
            size=(p.size, p.size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        fill = 0.0
    else:
        z = F.interpolate(x.float(), size=(p.size, p.size), mode="nearest-exact")
        fill = 255.0
    side = max(p.size, V)
    canvas = torch.full((1, x.shape[1], side, side), fill)
    canvas[..., : p.size, : p.size] = z
    crop = canvas[..., p.oy : p.oy + V, p.ox : p.ox + V]
    return (crop.flip(-1) if p.flip else crop)[0]


def test_render_views_matches_interpolate_crop_flip() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (len(VIEWS), 3, T, T), dtype=torch.uint8, generator=g)
    out = render_views(imgs, ViewGeometry.from_params(VIEWS))
    assert out.shape == (len(VIEWS), 3, V, V) and out.dtype == torch.float32
    for b, p in enumerate(VIEWS):
        ref = _reference_view(imgs[b], p, "bilinear")
        # S >= T: plain bilinear; S < T: the antialiased filter, reproduced exactly too
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0, msg=f"view {p}")


def test_padding_is_black_and_pixel_valid_by_loop() -> None:
    imgs = torch.full((len(VIEWS), 3, T, T), 200, dtype=torch.uint8)
    geom = ViewGeometry.from_params(VIEWS)
    out, valid = render_views(imgs, geom), pixel_valid(geom)
    for b, p in enumerate(VIEWS):
        exp = np.zeros((V, V), dtype=bool)
        for r in range(V):
            for c in range(V):
                cu = V - 1 - c if p.flip else c
                exp[r, c] = r + p.oy < p.size and cu + p.ox < p.size
        np.testing.assert_array_equal(valid[b].numpy(), exp)
        assert torch.all(out[b][:, ~valid[b]] == 0)
        torch.testing.assert_close(
            out[b][:, valid[b]], torch.full_like(out[b][:, valid[b]], 200 / 255), atol=1e-6, rtol=0
        )


def test_render_masks_nearest() -> None:
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 7, (len(VIEWS), T, T), dtype=torch.uint8, generator=g)
    out = render_masks(masks, ViewGeometry.from_params(VIEWS), pad_value=255)
    assert out.dtype == torch.int64
    for b, p in enumerate(VIEWS):
        ref = _reference_view(masks[b].unsqueeze(0), p, "nearest")[0].long()
        assert torch.equal(out[b], ref), f"view {p}"
    ignore = render_masks(torch.zeros_like(masks), ViewGeometry.from_params(VIEWS), 255)
    assert set(ignore.unique().tolist()) == {0, 255}


def test_cutmix_boxes_follow_rule() -> None:
    view, bsz = 70, 400
    boxes = cutmix_boxes(bsz, view, torch.Generator().manual_seed(2))
    assert boxes.shape == (bsz, 4) and boxes.dtype == torch.int64
    y, x, h, w = boxes.T
    applied = h > 0
    assert 0.4 < applied.float().mean() < 0.6
    assert torch.all(boxes[~applied] == 0)
    y, x, h, w = y[applied], x[applied], h[applied], w[applied]
    assert torch.all((y >= 0) & (x >= 0) & (y + h <= view) & (x + w <= view))
    area = (h * w).double()
    assert torch.all(area <= 0.4 * view * view)
    assert torch.all(area + h + w + 1 >= 0.02 * view * view)  # floor loses < h + w + 1
    ratio = h.double() / w.double()
    assert torch.all((ratio > 0.3 * (1 - 1 / w.double()) - 1e-9) & (ratio < 1 / 0.3 * w / (w - 1)))
    assert (area / view**2).max() > 0.3 and (area / view**2).min() < 0.05
    none = cutmix_boxes(10, view, torch.Generator().manual_seed(0), p=0.0)
    assert torch.all(none == 0)


def test_cutmix_pixels_labels_and_targets_share_box_and_partner() -> None:
    bsz, cell = 5, V // N
    g = torch.Generator().manual_seed(3)
    # images constant on each 14x14 token cell: the pooled mixed image is then exactly the
    # area-weighted token mix, tying the pixel and target paths together
    tokens = torch.rand(bsz, 3, N, N, generator=g, dtype=torch.float64)
    imgs = tokens.repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    labels = (imgs[:, 0] * 7).long()
    boxes = torch.tensor(
        [[3, 9, 30, 41], [0, 0, 70, 70], [0, 0, 0, 0], [14, 14, 14, 28], [60, 1, 10, 5]]
    )
    mixed = cutmix_pixels(imgs, boxes)
    for b in range(bsz):
        yy, xx, hh, ww = boxes[b].tolist()
        ref = imgs[b].clone()
        ref[:, yy : yy + hh, xx : xx + ww] = imgs[bsz - 1 - b, :, yy : yy + hh, xx : xx + ww]
        assert torch.equal(mixed[b], ref)
    assert torch.equal(cutmix_pixels(labels, boxes), (mixed[:, 0] * 7).long())
    conf = imgs[:, 1]
    assert torch.equal(cutmix_pixels(conf, boxes), mixed[:, 1])
    tg, _ = cutmix_targets(
        tokens.permute(0, 2, 3, 1), torch.ones(bsz, N, N, dtype=torch.float64), boxes, V
    )
    pooled = F.avg_pool2d(mixed, cell).permute(0, 2, 3, 1)
    torch.testing.assert_close(tg, pooled, atol=1e-12, rtol=0)
    assert box_mask(boxes, V)[1].all() and not box_mask(boxes, V)[2].any()


def _identity_params(bsz: int, order: tuple[int, ...] = (0, 1, 2, 3)) -> PhotometricParams:
    one = torch.ones(bsz, dtype=torch.float64)
    return PhotometricParams(
        one, one.clone(), one.clone(), 0 * one, order, torch.zeros(bsz, dtype=torch.bool), 0 * one
    )


def test_identity_photometric_params_are_exact() -> None:
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    for order in [(0, 1, 2, 3), (3, 2, 1, 0)]:
        assert torch.equal(apply_photometric(x, _identity_params(3, order), 6), x)
    out = strong_photometric(
        x, torch.Generator().manual_seed(0), p_jitter=0.0, p_gray=0.0, p_blur=0.0
    )
    assert torch.equal(out, x)


def test_per_sample_jitter_matches_torchvision() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    facs = torch.tensor([0.6, 1.0, 1.4], dtype=torch.float64)
    hues = torch.tensor([-0.2, 0.0, 0.13], dtype=torch.float64)
    refs = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    for op, ref_fn in refs.items():
        p = _identity_params(3, (op,))
        setattr(p, ("brightness", "contrast", "saturation")[op], facs)
        out = apply_photometric(x, p, 6)
        for b in range(3):
            torch.testing.assert_close(out[b], ref_fn(x[b], float(facs[b])), atol=1e-5, rtol=0)
    out = adjust_hue(x, hues)
    for b in range(3):
        torch.testing.assert_close(out[b], TF.adjust_hue(x[b], float(hues[b])), atol=1e-5, rtol=0)
    assert torch.equal(out[1], x[1])


def test_grayscale_is_luma() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    p = _identity_params(2)
    p.gray = torch.tensor([True, False])
    out = apply_photometric(x, p, 6)
    luma = 0.2989 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2]
    for c in range(3):
        torch.testing.assert_close(out[0, c], luma, atol=1e-6, rtol=0)
    assert torch.equal(out[1], x[1])


def test_blur_per_sample_kernel() -> None:
    radius, sigma = 4, 1.3
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = gaussian_blur(x, torch.tensor([sigma, 0.0]), radius)
    assert torch.equal(out[1], x[1])  # sigma 0: untouched
    k = np.array([np.exp(-(t * t) / (2 * sigma * sigma)) for t in range(-radius, radius + 1)])
    k /= k.sum()

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    img = x[0].numpy()
    h, w = img.shape[1:]
    tmp = np.zeros_like(img)
    for r in range(h):
        for c in range(w):
            tmp[:, r, c] = sum(
                k[t + radius] * img[:, r, reflect(c + t, w)] for t in range(-radius, radius + 1)
            )
    ref = np.zeros_like(img)
    for r in range(h):
        for c in range(w):
            ref[:, r, c] = sum(
                k[t + radius] * tmp[:, reflect(r + t, h), c] for t in range(-radius, radius + 1)
            )
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-12)
    const = torch.full((3, 3, 16, 16), 0.37)
    blurred = gaussian_blur(const, torch.tensor([0.1, 1.0, 2.0]), 6)
    torch.testing.assert_close(blurred.mean((1, 2, 3)), torch.full((3,), 0.37), atol=1e-6, rtol=0)
    torch.testing.assert_close(blurred, const, atol=1e-6, rtol=0)


def test_strong_photometric_batch() -> None:
    x = torch.rand(16, 3, V, V, generator=torch.Generator().manual_seed(8))
    out = strong_photometric(x, torch.Generator().manual_seed(9))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - x).abs().flatten(1).max(1).values > 1e-6
    assert 0 < changed.sum() < 16 or changed.all()
    again = strong_photometric(x, torch.Generator().manual_seed(9))
    assert torch.equal(out, again)
    with pytest.raises(RuntimeError, match="no box fitted"):
        cutmix_boxes(
            4, 10, torch.Generator().manual_seed(0), p=1.0, size_min=2.0, size_max=3.0, max_rounds=5
        )
