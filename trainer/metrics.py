"""Segmentation metrics from a device-side confusion matrix.

Every metric comes from one ``[K, K]`` matrix (rows = target, columns = prediction) that holds
only pixels whose target is not ``ignore_index``. Unlike the official test scripts, predictions on
ignored pixels count nowhere (precision, F1 and kappa's chance term included).

Conventions:
* Values are fractions in [0, 1] (multiply by 100 for the paper's tables).
* A class absent from both target and prediction has NaN IoU/F1 (0/0) and is left out of the
  means (nanmean); the official in-training mIoU would count it as 0 (irrelevant over a whole
  split, where every class occurs). Precision is NaN when a class is never predicted, recall when
  it never occurs. F1 uses ``2 I / (target + predicted)`` (defined whenever either is non-zero).
* ``exclude_classes`` (DeepGlobe "unknown", the Potsdam test protocol) treats pixels of those
  target classes as ignored, drops the classes from all means and from kappa's chance term, and
  reports NaN for them; predicting an excluded class on a kept pixel is an error.
* No valid pixel at all: every metric is NaN.
* `ConfusionMatrix.report` gives both readings of one matrix: every class (``miou``, ...; what
  the official in-training validation and best-checkpoint choice use) and the test protocol
  (``miou_protocol``, ...; what the official test scripts and the paper's tables report).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist

from featstore.constants import IGNORE_INDEX

__all__ = ["PROTOCOL_KEYS", "ConfusionMatrix"]

# Metrics reported a second time under the protocol, with this suffix.
PROTOCOL_KEYS = ("miou", "mf1", "oa", "kappa", "iou", "f1", "pixels")
PROTOCOL_SUFFIX = "_protocol"


class ConfusionMatrix:
    """Accumulates a confusion matrix on the prediction's device.

    Args:
        num_classes: Number of classes ``K``.
        ignore_index: Target value to skip.
        exclude_classes: Classes dropped from the means and kappa (test protocols).
        device: Device of the matrix (default: set by the first ``update``).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        exclude_classes: Iterable[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.exclude_classes = self._checked(exclude_classes)
        self.matrix = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.int64, device=device
        )

    def _checked(self, classes: Iterable[int]) -> tuple[int, ...]:
        out = tuple(sorted({int(c) for c in classes}))
        bad = [c for c in out if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"exclude_classes {bad} outside [0, {self.num_classes})")
        return out

    def report(self, exclude: Iterable[int] = ()) -> dict[str, float | list[float]]:
        """Every-class metrics plus the protocol's (``exclude`` left out) under ``*_protocol``.

        Returns:
            `compute` over all classes, and ``miou_protocol``, ``mf1_protocol``,
            ``oa_protocol``, ``kappa_protocol``, ``iou_protocol``, ``f1_protocol`` and
            ``pixels_protocol`` (the protocol's OA counts no pixel of an excluded class, as the
            official scripts, which set those labels to ignore).
        """
        out = self.compute(exclude=())
        protocol = self.compute(exclude=exclude)
        out.update({k + PROTOCOL_SUFFIX: protocol[k] for k in PROTOCOL_KEYS})
        return out

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of class-index maps (same shape, any leading dims)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred {tuple(pred.shape)} != target {tuple(target.shape)}"
            )
        k = self.num_classes
        if self.matrix.device != pred.device:
            self.matrix = self.matrix.to(pred.device)
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).to(pred.device).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        # One host sync: out-of-range labels would silently alias into other cells.
        if pred.numel() and bool(((pred < 0) | (pred >= k) | (target < 0) | (target >= k)).any()):
            raise ValueError(
                f"ConfusionMatrix.update: labels outside [0, {k}) (ignore_index "
                f"{self.ignore_index}); check num_classes and the mask encoding"
            )
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).view(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts in place; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError("ConfusionMatrix.merge: different num_classes")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self, exclude: Iterable[int] | None = None) -> dict[str, float | list[float]]:
        """Metrics from the accumulated counts.

        Args:
            exclude: Classes to leave out (default: the constructor's ``exclude_classes``).

        Returns:
            ``iou``, ``precision``, ``recall``, ``f1`` (per class lists), ``miou``, ``mf1``,
            ``oa``, ``kappa`` (floats) and ``pixels`` (valid pixels counted).
        """
        excluded = self.exclude_classes if exclude is None else self._checked(exclude)
        m = self.matrix.detach().cpu().double().numpy()
        kept = np.ones(self.num_classes, dtype=bool)
        kept[list(excluded)] = False
        m = m * kept[:, None]  # pixels whose target class is excluded are ignored
        inter = np.diag(m)
        target = m.sum(1)
        predicted = m.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (target + predicted - inter)
            precision = inter / predicted
            recall = inter / target
            f1 = 2 * inter / (target + predicted)
        for arr in (iou, precision, recall, f1):
            arr[~kept] = np.nan
        n = m.sum()
        oa, kappa = _oa_kappa(inter[kept].sum(), target[kept], predicted[kept], n)
        return {
            "iou": iou.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "miou": _nanmean(iou),
            "mf1": _nanmean(f1),
            "oa": oa,
            "kappa": kappa,
            "pixels": int(n),
        }


def _nanmean(x: np.ndarray) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


def _oa_kappa(
    correct: float, target: np.ndarray, predicted: np.ndarray, n: float
) -> tuple[float, float]:
    """Overall accuracy and Cohen's kappa ``(p0 - pe) / (1 - pe)`` (NaN when undefined)."""
    if n == 0:
        return float("nan"), float("nan")
    p0 = correct / n
    pe = float((target * predicted).sum()) / (n * n)
    # pe == 1 (one class everywhere in both maps): kappa is 0/0, reported as NaN.
    kappa = (p0 - pe) / (1 - pe) if pe < 1 else float("nan")
    return float(p0), float(kappa)
