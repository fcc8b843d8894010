"""Losses against brute-force per-pixel / per-token Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import (
    NonFiniteLossError,
    check_finite,
    distill_loss,
    supervised_loss,
    total_loss,
    unsupervised_loss,
)

G = torch.Generator().manual_seed(0)


def ce_pixel(logits: np.ndarray, b: int, i: int, j: int, label: int) -> float:
    z = logits[b, :, i, j].astype(np.float64)
    return float(math.log(np.exp(z).sum()) - z[label])


def test_supervised_loss_matches_loop() -> None:
    logits = torch.randn(2, 4, 3, 5, generator=G)
    mask = torch.randint(0, 4, (2, 3, 5), generator=G)
    mask[0, 0, :3] = 255
    mask[1, 2, 4] = 255
    lg, mk = logits.numpy(), mask.numpy()
    total, count = 0.0, 0
    for b, i, j in np.ndindex(mk.shape):
        if mk[b, i, j] != 255:
            total += ce_pixel(lg, b, i, j, int(mk[b, i, j]))
            count += 1
    assert supervised_loss(logits, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_supervised_loss_all_ignored_is_zero_with_graph() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = supervised_loss(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("bool_mask", [True, False])
def test_unsupervised_loss_official_normalisation(bool_mask: bool) -> None:
    logits = torch.randn(2, 3, 4, 4, generator=G)
    pseudo = torch.randint(0, 3, (2, 4, 4), generator=G)
    conf = torch.rand(2, 4, 4, generator=G) * 0.2 + 0.85  # straddles 0.95
    conf[0, 0, 0] = 0.95  # the threshold itself counts as confident
    ignored = torch.rand(2, 4, 4, generator=G) < 0.3
    ignore = ignored if bool_mask else ignored.to(torch.uint8) * 255
    lg = logits.numpy()
    total, valid = 0.0, 0
    for b, i, j in np.ndindex(2, 4, 4):
        if ignored[b, i, j]:
            continue
        valid += 1  # denominator: every non-ignored pixel, confident or not
        if conf[b, i, j] >= 0.95:
            total += ce_pixel(lg, b, i, j, int(pseudo[b, i, j]))
    got = unsupervised_loss(logits, pseudo, conf, ignore, thresh=0.95).item()
    assert got == pytest.approx(total / valid, rel=1e-5)


def test_unsupervised_loss_rejects_float_ignore() -> None:
    with pytest.raises(TypeError, match="ignore"):
        unsupervised_loss(
            torch.zeros(1, 2, 1, 1),
            torch.zeros(1, 1, 1, dtype=torch.long),
            torch.ones(1, 1, 1),
            torch.zeros(1, 1, 1),
        )


def _loop_mse(pred: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> float:
    num, den = 0.0, 0.0
    b_, h_, w_, c_ = pred.shape
    for b, i, j in np.ndindex(b_, h_, w_):
        w = 1.0 if weight is None else float(weight[b, i, j])
        for c in range(c_):
            num += w * (float(pred[b, i, j, c]) - float(target[b, i, j, c])) ** 2
            den += w
    return num / den


def test_distill_masked_fractional_weights() -> None:
    pred = torch.randn(2, 3, 3, 5, generator=G)
    target = torch.randn(2, 3, 3, 5, generator=G).half()  # cached targets may be fp16
    valid = torch.rand(2, 3, 3, generator=G)
    valid[0, 0] = 0.0  # padding row
    valid[1, 2, 2] = 1.0
    want = _loop_mse(pred.numpy(), target.float().numpy(), valid.numpy())
    assert distill_loss(pred, target, valid).item() == pytest.approx(want, rel=1e-5)


def test_distill_unmasked_is_plain_mean() -> None:
    pred = torch.randn(2, 3, 3, 4, generator=G)
    target = torch.randn(2, 3, 3, 4, generator=G)
    valid = torch.zeros(2, 3, 3)  # ignored when masked=False (official)
    want = _loop_mse(pred.numpy(), target.numpy(), None)
    assert distill_loss(pred, target, valid, masked=False).item() == pytest.approx(want, rel=1e-5)
    assert distill_loss(pred, target, None).item() == pytest.approx(want, rel=1e-5)


def test_distill_standardises_target_only() -> None:
    pred = torch.randn(1, 2, 2, 3, generator=G)
    target = torch.randn(1, 2, 2, 3, generator=G) * 10 + 4
    mean = torch.tensor([4.0, -1.0, 2.0])
    std = torch.tensor([10.0, 0.5, 3.0])
    valid = torch.tensor([[[1.0, 0.25], [0.0, 0.5]]])
    t = target.numpy().copy()
    for c in range(3):
        t[..., c] = (t[..., c] - float(mean[c])) / float(std[c])
    want = _loop_mse(pred.numpy(), t, valid.numpy())
    got = distill_loss(pred, target, valid, mean=mean, std=std).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_distill_edge_cases() -> None:
    pred = torch.randn(1, 2, 2, 3, requires_grad=True)
    loss = distill_loss(pred, torch.randn(1, 2, 2, 3), torch.zeros(1, 2, 2))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="differ"):
        distill_loss(pred, torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="both mean and std"):
        distill_loss(pred, torch.randn(1, 2, 2, 3), mean=torch.zeros(3))


def test_total_loss_official_weights() -> None:
    lx, lu = torch.tensor(1.5), torch.tensor(0.3)
    terms = total_loss(lx, lu, {"dino": torch.tensor(2.0), "clip": torch.tensor(4.0)})
    assert terms["loss"].item() == pytest.approx((1.5 + 0.3 + 0.5 * (2.0 + 4.0)) / 3)
    assert terms["distill"].item() == pytest.approx(3.0)
    assert terms["distill/clip"].item() == 4.0
    base = total_loss(lx, lu, {})
    assert base["loss"].item() == pytest.approx((1.5 + 0.3) / 2)
    assert "distill" not in base


def test_check_finite_names_everything() -> None:
    ok = {"loss_x": torch.tensor(1.0), "loss_u": torch.tensor(0.0)}
    check_finite(ok, step=3, batch_ids=["a"])
    bad = {
        "loss_x": torch.tensor(1.25),
        "distill/clip": torch.tensor(float("inf")),
        "loss": torch.tensor(float("nan")),
    }
    with pytest.raises(NonFiniteLossError) as err:
        check_finite(bad, step=17, batch_ids=["tile_7", "tile_9"])
    msg = str(err.value)
    for part in ("step 17", "loss_x=1.25", "distill/clip=inf", "loss=nan", "tile_7", "tile_9"):
        assert part in msg
