"""Run logging on rank 0: a tqdm bar, ``metrics.csv`` (per logged step), ``eval.jsonl``, and
TensorBoard scalars, all in the run's output folder."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.durable import append_durably, atomic_write


def truncate_logs(out: Path, step: int) -> None:
    """Drop the rows of ``metrics.csv`` and ``eval.jsonl`` logged after ``step``.

    A run resumed from a checkpoint at ``step`` logs the later steps again; rows a killed run
    wrote after its last checkpoint would otherwise appear twice. Each file is rewritten through
    a temporary file, fsync and a rename (`trainer.durable.atomic_write`), so a kill here leaves
    it whole.
    """
    csv_path, jsonl_path = out / "metrics.csv", out / "eval.jsonl"
    if csv_path.is_file():
        lines = _lines(csv_path)
        kept = lines[:1] + [ln for ln in lines[1:] if _csv_step(ln) <= step]
        _rewrite(csv_path, kept if step > 0 else [], lines)
    if jsonl_path.is_file():
        lines = _lines(jsonl_path)
        _rewrite(jsonl_path, [ln for ln in lines if _json_step(ln) <= step], lines)


def _lines(path: Path) -> list[str]:
    # newline="": the csv module ends rows with \r\n; kept rows keep their bytes
    with path.open(newline="") as fh:
        return fh.read().splitlines(keepends=True)


def _csv_step(line: str) -> float:
    # a line without its newline was torn by a kill mid-write: dropped like a later step
    try:
        return int(line.split(",", 1)[0]) if line.endswith("\n") else float("inf")
    except ValueError:
        return float("inf")


def _json_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"]) if line.endswith("\n") else float("inf")
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _csv_line(values: Sequence[Any]) -> str:
    """One ``metrics.csv`` row as the csv module writes it (``\\r\\n`` ended)."""
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue()


def _rewrite(path: Path, kept: list[str], lines: list[str]) -> None:
    if kept == lines:
        return
    if not kept:
        path.unlink()
        return
    data = "".join(kept).encode()
    atomic_write(path, lambda fh: fh.write(data), what="log")


class RunLogger:
    """Writes training curves; every method is a no-op when ``enabled`` is False (rank > 0).

    Args:
        out_dir: Run folder.
        total: Total iterations (progress bar length).
        start: Iterations already done (resume).
        enabled: Rank 0 only.
        progress: Show the tqdm bar.
        tensorboard: Also write TensorBoard event files.
        eval_columns: Validation columns of ``metrics.csv`` (`eval_columns`), in the header
            from the first row on (empty on steps without an evaluation).
    """

    def __init__(
        self,
        out_dir: str | Path,
        total: int,
        start: int = 0,
        enabled: bool = True,
        progress: bool = True,
        tensorboard: bool = True,
        eval_columns: Sequence[str] = (),
    ) -> None:
        self.enabled = enabled
        self.eval_columns = list(eval_columns)
        self.out = Path(out_dir)
        self._csv_keys: list[str] | None = None
        self._writer: Any = None
        self._bar: Any = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        truncate_logs(self.out, start)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events after the resumed step were logged by the run that died
            self._writer = SummaryWriter(str(self.out / "tb"), purge_step=start + 1)
        self._bar = tqdm(
            total=total, initial=start, disable=not progress, dynamic_ncols=True, desc="train"
        )

    def step(self, step: int, scalars: dict[str, float], write: bool) -> None:
        """Advance the bar; on ``write`` append a CSV row and TensorBoard scalars."""
        if not self.enabled:
            return
        self._bar.update(1)
        if not write:
            return
        self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}")
        row = {"step": step, **scalars}
        path = self.out / "metrics.csv"
        if self._csv_keys is None:
            self._csv_keys = list(row) + [c for c in self.eval_columns if c not in row]
            if path.is_file():  # resume: keep the existing header
                with path.open() as fh:
                    header = fh.readline().strip().split(",")
                self._csv_keys = header if header != [""] else self._csv_keys
            else:
                append_durably(path, _csv_line(self._csv_keys), "metrics log")
        append_durably(path, _csv_line([row.get(k, "") for k in self._csv_keys]), "metrics log")
        if self._writer is not None:
            for k, v in scalars.items():
                if k not in self.eval_columns:  # validation goes to val_<model>/ (evaluation)
                    self._writer.add_scalar(f"train/{k}", v, step)

    def evaluation(
        self,
        step: int,
        metrics: dict[str, dict[str, Any]],
        protocol: dict[str, Any] | None = None,
    ) -> None:
        """Append validation metrics to ``eval.jsonl`` and TensorBoard, and print one line.

        ``protocol`` (`trainer.evaluate.protocol_json`) is recorded beside the metrics and
        named in the printed line with its means (``*_protocol`` keys).
        """
        if not self.enabled:
            return
        head = {"step": step} if protocol is None else {"step": step, "protocol": protocol}
        append_durably(self.out / "eval.jsonl", json.dumps({**head, **metrics}) + "\n", "eval log")
        if self._writer is not None:
            for model, m in metrics.items():
                for k in ("miou", "mf1", "oa", "kappa"):
                    for key in (k, k + "_protocol"):
                        if key in m:
                            self._writer.add_scalar(f"val_{model}/{key}", m[key], step)
        self._bar.write(eval_line(step, metrics, protocol))

    def close(self) -> None:
        """Flush and close."""
        if not self.enabled:
            return
        self._bar.close()
        if self._writer is not None:
            self._writer.close()


CSV_METRICS = ("miou", "mf1", "oa")


def eval_columns(models: Sequence[str], protocol: str) -> list[str]:
    """``metrics.csv`` validation columns: ``ema_miou`` (all classes) and
    ``ema_miou[rs-mtdf-potsdam]`` (the protocol, named in the header), per model and metric."""
    return [
        col
        for model in models
        for k in CSV_METRICS
        for col in (f"{model}_{k}", f"{model}_{k}[{protocol}]")
    ]


def eval_scalars(metrics: dict[str, dict[str, Any]], protocol: str) -> dict[str, float]:
    """The values of `eval_columns` from `trainer.evaluate.evaluate`'s result."""
    out = {}
    for model, m in metrics.items():
        for k in CSV_METRICS:
            out[f"{model}_{k}"] = m[k]
            if f"{k}_protocol" in m:
                out[f"{model}_{k}[{protocol}]"] = m[f"{k}_protocol"]
    return out


def eval_line(
    step: int, metrics: dict[str, dict[str, Any]], protocol: dict[str, Any] | None = None
) -> str:
    """``step 4: student: mIoU 51.20 OA 80.00 | rs-mtdf-potsdam: mIoU 55.00 OA 82.10  ema: ..``"""

    def pct(m: dict[str, Any], key: str) -> str:
        return f"{m[key] * 100:.2f}" if key in m else "n/a"

    parts = []
    for name, m in metrics.items():
        text = f"{name}: mIoU {pct(m, 'miou')} OA {pct(m, 'oa')}"
        if protocol is not None:
            text += (
                f" | {protocol['name']}: mIoU {pct(m, 'miou_protocol')} OA {pct(m, 'oa_protocol')}"
            )
        parts.append(text)
    return f"step {step}: {'  '.join(parts)}"


__all__ = ["RunLogger", "eval_columns", "eval_line", "eval_scalars", "truncate_logs"]
