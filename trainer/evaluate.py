"""Validation: dataset-level confusion matrices for the student and its EMA.

``whole`` (official ``original`` mode): the tile is resized (bilinear, align_corners=True) to the
nearest multiple of 14 (512 -> 518), segmented, and the logits are resized back; align_corners=True
maps corner pixel to corner pixel both ways, so the round trip keeps the border rows in place.
``sliding``: ``crop_size`` windows at ``stride`` over the tile at its own resolution (a tile
smaller than the window is padded by mirroring, not with black), logits averaged where windows
overlap.

Every result reports all classes and the data's test protocol (`resolve_protocol`: the store's
recorded protocol, or ``--exclude-classes``), see `trainer.metrics.ConfusionMatrix.report`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featstore.constants import DEFAULT_CROP, IGNORE_INDEX
from featstore.protocols import ALL_CLASSES, Protocol
from trainer.config import TrainConfigError
from trainer.metrics import ConfusionMatrix
from trainer.step import normalize


def nearest_multiple(x: int, m: int = 14) -> int:
    """The multiple of ``m`` nearest ``x``, halves rounded up, as the official evaluation.

    The official ``supervised.evaluate`` resizes to ``int(x / m + 0.5) * m``: a side at an odd
    multiple of ``m / 2`` goes up (35 -> 42 for ``m = 14``), where Python's ``round`` would go to
    the even quotient (35 -> 28). Integer arithmetic gives the same quotient without float
    error. The floor of ``m`` keeps sides below ``m / 2`` runnable (the official code gives 0).
    """
    return max(m, (2 * x + m) // (2 * m) * m)


def _forward(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(normalize(x), need_translated=False).logits.float()


@torch.no_grad()
def logits_whole(
    model: torch.nn.Module, x: torch.Tensor, patch: int = 14, bf16: bool = False
) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` of ``[B, 3, H, W]`` images in [0, 1] (run at ``patch`` multiples).

    The resize round trip keeps the border pixels in place (tests/trainer/test_predict_border.py).
    A barely trained student still often paints its outermost row another class: the head's
    coarsest border row (zero-padded 3x3 convolutions) is copied onto the outermost pixels by the
    final upsampling. Training removes it (tiny student, 64-px tiles: after 300 iterations the
    top/bottom row differs from its neighbour in 41 %/75 % of columns vs 1.4 % inside; after
    3000 iterations 4.9 %/3.6 % vs 5.6 %), so whole mode keeps the official protocol.
    """
    h, w = x.shape[-2:]
    size = (nearest_multiple(h, patch), nearest_multiple(w, patch))
    xr = x if size == (h, w) else F.interpolate(x, size, mode="bilinear", align_corners=True)
    out = _forward(model, xr, bf16)
    if out.shape[-2:] != (h, w):
        out = F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
    return out


def _starts(length: int, crop: int, stride: int) -> list[int]:
    last = max(length - crop, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def pad_mirrored(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Pad ``[B, C, H, W]`` right/bottom to ``ph x pw`` with mirrored pixels.

    Not black: a black strip beside the tile changes the predicted class of the last rows and
    columns, a border band on e.g. 512-px tiles in 518-px windows (tiny student trained 3000
    iterations on 64-px tiles, 70-px windows: error of the last row 0.51 with black padding,
    0.21 mirrored, interior 0.26). ``reflect`` needs the padding to be shorter than the image;
    beyond that the edge pixels are repeated.
    """
    h, w = x.shape[-2:]
    pad = (0, pw - w, 0, ph - h)
    if pad == (0, 0, 0, 0):
        return x
    return F.pad(x, pad, mode="reflect" if pw - w < w and ph - h < h else "replicate")


@torch.no_grad()
def logits_sliding(
    model: torch.nn.Module, x: torch.Tensor, crop: int, stride: int, bf16: bool = False
) -> torch.Tensor:
    """Logits by averaging ``crop`` windows at ``stride`` (images smaller than a window padded
    right/bottom by mirroring, see `pad_mirrored`)."""
    b, _, h, w = x.shape
    ph, pw = max(h, crop), max(w, crop)
    xp = pad_mirrored(x, ph, pw)
    acc: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=x.device)
    for y0 in _starts(ph, crop, stride):
        for x0 in _starts(pw, crop, stride):
            out = _forward(model, xp[..., y0 : y0 + crop, x0 : x0 + crop], bf16)
            if acc is None:
                acc = torch.zeros(b, out.shape[1], ph, pw, device=x.device)
            acc[..., y0 : y0 + crop, x0 : x0 + crop] += out
            count[..., y0 : y0 + crop, x0 : x0 + crop] += 1
    assert acc is not None  # at least one window always exists
    return (acc / count)[..., :h, :w]


def predict_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    mode: str,
    crop: int,
    stride: int | None = None,
    bf16: bool = False,
    patch: int = 14,
) -> torch.Tensor:
    """Dispatch on the evaluation mode (``whole`` | ``sliding``); ``patch``: the model's input
    multiple in whole mode (14; Co2S's students 16, `trainer.config.METHOD_PATCH`)."""
    if mode == "whole":
        return logits_whole(model, x, patch, bf16)
    if mode == "sliding":
        return logits_sliding(model, x, crop, stride or max(crop * 2 // 3, 1), bf16)
    raise ValueError(f"evaluation mode {mode!r} is not 'whole' or 'sliding'")


def _shard(indices: Sequence[int]) -> list[int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return list(indices)[rank::world]
    return list(indices)


def evaluate(
    models: Mapping[str, torch.nn.Module],
    reader: Any,
    indices: Sequence[int],
    num_classes: int,
    mode: str = "whole",
    crop: int = DEFAULT_CROP,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    ignore_index: int = IGNORE_INDEX,
    bf16: bool = False,
    progress: bool = False,
    exclude_classes: Sequence[int] = (),
    patch: int = 14,
) -> dict[str, dict[str, Any]]:
    """Metrics per model over the tiles ``indices`` of a store or source reader.

    Tiles are split over DDP ranks and the confusion matrices summed with ``all_reduce``.
    ``progress`` shows a bar over this rank's tiles. ``exclude_classes``: the protocol's
    excluded classes (`resolve_protocol`). ``patch``: see `predict_logits`.

    Returns:
        ``{model name: ConfusionMatrix.report(exclude_classes) dict}``: all classes, and the
        protocol's values under ``*_protocol``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    cms = {k: ConfusionMatrix(num_classes, ignore_index, device=device) for k in models}
    was = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    mine = _shard(indices)
    starts = range(0, len(mine), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        chunk = mine[start : start + batch_size]
        img = np.stack([reader.read_image(i) for i in chunk])
        mask = torch.from_numpy(np.stack([reader.read_mask(i) for i in chunk])).to(device)
        x = torch.from_numpy(img).to(device).permute(0, 3, 1, 2).float() / 255.0
        for k, m in models.items():
            logits = predict_logits(m, x, mode, crop, stride, bf16, patch)
            cms[k].update(logits.argmax(1), mask)
    for k, m in models.items():
        m.train(was[k])
    out = {}
    for k, cm in cms.items():
        cm.all_reduce()
        out[k] = cm.report(exclude_classes)
    return out


def recorded_protocol(reader: Any) -> Protocol:
    """The protocol the data records: a store's schema, or an opened source's convention.

    A store written before protocols were recorded reports all classes and says so (its dataset
    name is not used to guess one).
    """
    schema = getattr(reader, "schema", None)
    if schema is not None:
        recorded = getattr(schema, "eval_protocol", None)
        if recorded:
            return Protocol.from_dict(recorded)
        return Protocol(
            "all-classes",
            (),
            "the store records no protocol (written before protocols were kept); pass "
            "--exclude-classes to apply one",
        )
    source = getattr(reader, "source", None)
    protocol = getattr(source, "protocol", None)
    return protocol if isinstance(protocol, Protocol) else ALL_CLASSES


def parse_exclude(
    items: str | Sequence[str | int], class_names: Sequence[str], option: str
) -> tuple[int, ...]:
    """Class ids from ids or names (``"0,clutter"``, ``[0, "clutter"]``); ``"none"``: none.

    Raises:
        TrainConfigError: An unknown name or an id outside the classes, naming ``option``.
    """
    if isinstance(items, str):
        items = [] if items.strip().lower() in ("", "none") else items.split(",")
    ids = []
    for item in items:
        text = str(item).strip()
        if text.isdigit():
            ids.append(int(text))
        elif text in class_names:
            ids.append(list(class_names).index(text))
        else:
            raise TrainConfigError(
                f"{option} {text!r} is neither a class id nor a class name; the classes are "
                f"{', '.join(f'{i} {n}' for i, n in enumerate(class_names))} (write e.g. "
                f"{option} 0 or {option} none)"
            )
    bad = [i for i in ids if not 0 <= i < len(class_names)]
    if bad:
        raise TrainConfigError(
            f"{option} {bad}: class ids run 0..{len(class_names) - 1} ({', '.join(class_names)})"
        )
    return tuple(sorted(set(ids)))


def resolve_protocol(
    reader: Any,
    class_names: Sequence[str],
    override: str | Sequence[str | int] | None = None,
    option: str = "--exclude-classes",
) -> Protocol:
    """The protocol to report: ``override`` (the user's ``option``) or what the data records.

    Raises:
        TrainConfigError: A bad ``override``, or a recorded protocol naming a class the model
            does not have.
    """
    if override is None:
        protocol = recorded_protocol(reader)
        if any(c >= len(class_names) for c in protocol.exclude):
            raise TrainConfigError(
                f"the data's protocol {protocol.name} excludes classes {list(protocol.exclude)} "
                f"but the model has {len(class_names)} classes; pass {option} IDS (or none)"
            )
        return protocol
    exclude = parse_exclude(override, class_names, option)
    return Protocol("custom" if exclude else "all-classes", exclude, f"{option} (the user)")


def protocol_json(protocol: Protocol, class_names: Sequence[str]) -> dict[str, Any]:
    """What logs record of a protocol: name, excluded ids and names, its source."""
    return {
        "name": protocol.name,
        "exclude": list(protocol.exclude),
        "excluded": [class_names[c] for c in protocol.exclude if c < len(class_names)],
        "source": protocol.source,
    }


def _finite(value: Any) -> Any:
    """NaN / inf -> None (JSON null): a class absent from both target and prediction has no IoU."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _unique(names: Sequence[str]) -> list[str]:
    # Per-class metrics are keyed by name; two classes of one name must not merge into one key.
    seen = Counter(names)
    return [f"{n} ({i})" if seen[n] > 1 else n for i, n in enumerate(names)]


def named_metrics(metrics: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """One model's metrics with per-class lists keyed by class name and NaN as None."""
    names = _unique(class_names)
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            if len(value) != len(names):
                raise ValueError(
                    f"metric {key!r} has {len(value)} classes but {len(names)} "
                    "class names were given"
                )
            out[key] = {n: _finite(v) for n, v in zip(names, value, strict=True)}
        else:
            out[key] = _finite(value)
    return out


def metrics_json(
    metrics: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    protocol: Protocol | None = None,
) -> str:
    """Strict JSON of `evaluate`'s result: class names, per-class metrics by name, no bare NaN.

    Layout: ``{"class_names": [...], "protocol": {"name", "exclude", "excluded", "source"},
    "<model>": {"miou": .., "miou_protocol": .., "iou": {"<name>": .. | null}}}``.
    ``null`` marks a metric that is undefined (e.g. the IoU of a class absent from the val tiles
    and never predicted, or of a class the protocol excludes); ``allow_nan=False`` guarantees no
    ``NaN`` token reaches the file.
    """
    doc: dict[str, Any] = {"class_names": list(class_names)}
    if protocol is not None:
        doc["protocol"] = protocol_json(protocol, class_names)
    doc.update({model: named_metrics(m, class_names) for model, m in metrics.items()})
    return json.dumps(doc, indent=1, allow_nan=False)


__all__ = [
    "evaluate",
    "logits_sliding",
    "logits_whole",
    "metrics_json",
    "named_metrics",
    "nearest_multiple",
    "pad_mirrored",
    "parse_exclude",
    "predict_logits",
    "protocol_json",
    "recorded_protocol",
    "resolve_protocol",
]
