"""ConfusionMatrix metrics against brute-force per-pixel counting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.metrics import ConfusionMatrix

IGN = 255


def brute(pred: np.ndarray, target: np.ndarray, k: int, exclude: tuple[int, ...] = ()) -> dict:
    """Metrics by counting pixel by pixel, straight from the definitions."""
    tp, n_target, n_pred = [0] * k, [0] * k, [0] * k
    n = agree = 0
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t == IGN or t in exclude:
            continue
        n += 1
        n_target[t] += 1
        n_pred[p] += 1
        if p == t:
            tp[t] += 1
            agree += 1
    nan = float("nan")

    def div(a: float, b: float) -> float:
        return a / b if b else nan

    iou = [div(tp[c], n_target[c] + n_pred[c] - tp[c]) for c in range(k)]
    prec = [div(tp[c], n_pred[c]) for c in range(k)]
    rec = [div(tp[c], n_target[c]) for c in range(k)]
    f1 = []
    for c in range(k):
        p_, r_ = prec[c], rec[c]
        if n_target[c] + n_pred[c] == 0:
            f1.append(nan)
        elif tp[c] == 0:
            f1.append(0.0)
        else:
            f1.append(2 * p_ * r_ / (p_ + r_))
    kept = [c for c in range(k) if c not in exclude]
    for arr in (iou, prec, rec, f1):
        for c in exclude:
            arr[c] = nan
    p0 = div(agree, n)
    pe = div(sum(n_target[c] * n_pred[c] for c in kept), n * n)
    kappa = (p0 - pe) / (1 - pe) if n and pe != 1 else nan

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else nan

    return {
        "iou": iou,
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "miou": mean(iou),
        "mf1": mean(f1),
        "oa": p0,
        "kappa": kappa,
        "pixels": n,
    }


def assert_same(got: dict, want: dict) -> None:
    for key, w in want.items():
        g = got[key]
        np.testing.assert_allclose(
            np.asarray(g, float),
            np.asarray(w, float),
            rtol=1e-12,
            atol=1e-12,
            equal_nan=True,
            err_msg=key,
        )


def random_maps(k: int, seed: int, shape: tuple[int, ...] = (3, 17, 13)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, k, shape))
    target[rng.random(shape) < 0.15] = IGN
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_brute_force(seed: int) -> None:
    k = 5
    pred, target = random_maps(k, seed)
    cm = ConfusionMatrix(k)
    for b in range(pred.shape[0]):  # several updates accumulate
        cm.update(torch.from_numpy(pred[b]), torch.from_numpy(target[b]).to(torch.uint8))
    assert_same(cm.compute(), brute(pred, target, k))


def test_merge_equals_single_pass() -> None:
    k = 4
    pred, target = random_maps(k, 3)
    a, b, whole = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    a.update(torch.from_numpy(pred[:1]), torch.from_numpy(target[:1]))
    b.update(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))
    whole.update(torch.from_numpy(pred), torch.from_numpy(target))
    a.merge(b)
    a.all_reduce()  # no process group: no-op
    assert torch.equal(a.matrix, whole.matrix)


def test_predictions_on_ignored_pixels_count_nowhere() -> None:
    target = torch.tensor([[0, 1, IGN, IGN]])
    cm_a, cm_b = ConfusionMatrix(3), ConfusionMatrix(3)
    cm_a.update(torch.tensor([[0, 1, 2, 2]]), target)
    cm_b.update(torch.tensor([[0, 1, 0, 1]]), target)
    assert torch.equal(cm_a.matrix, cm_b.matrix)
    got = cm_a.compute()
    assert got["precision"] == [1.0, 1.0, got["precision"][2]] and math.isnan(got["precision"][2])
    assert got["kappa"] == 1.0  # class 2 predicted only on ignored pixels: no chance term


def test_absent_class_is_nan_and_skipped() -> None:
    k = 4
    pred, target = random_maps(3, 4)  # class 3 never appears in either map
    cm = ConfusionMatrix(k)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = cm.compute()
    assert math.isnan(got["iou"][3]) and math.isnan(got["f1"][3])
    assert got["miou"] == pytest.approx(np.mean(got["iou"][:3]))
    assert_same(got, brute(pred, target, k))


def test_all_ignored_is_all_nan() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), IGN))
    got = cm.compute()
    assert got["pixels"] == 0
    for key in ("miou", "mf1", "oa", "kappa"):
        assert math.isnan(got[key])
    assert all(math.isnan(v) for v in got["iou"] + got["f1"])


def test_perfect_prediction() -> None:
    _, target = random_maps(4, 5)
    pred = np.where(target == IGN, 0, target)
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = cm.compute()
    assert got["iou"] == [1.0] * 4 and got["f1"] == [1.0] * 4
    assert got["miou"] == 1.0 and got["oa"] == 1.0 and got["kappa"] == pytest.approx(1.0)


def test_exclude_classes() -> None:
    k = 6
    pred, target = random_maps(k, 6)
    cm = ConfusionMatrix(k, exclude_classes=[0])
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = cm.compute()
    assert_same(got, brute(pred, target, k, exclude=(0,)))
    assert math.isnan(got["iou"][0])
    full = ConfusionMatrix(k)
    full.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert got["kappa"] != full.compute()["kappa"]


def test_bad_labels_raise() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="exclude_classes"):
        ConfusionMatrix(3, exclude_classes=[3])
