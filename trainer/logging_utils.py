"""Run logging on rank 0: a tqdm bar, ``metrics.csv`` (per logged step), ``eval.jsonl``, and
TensorBoard scalars, all in the run's output folder."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm


def truncate_logs(out: Path, step: int) -> None:
    """Drop the rows of ``metrics.csv`` and ``eval.jsonl`` logged after ``step``.

    A run resumed from a checkpoint at ``step`` logs the later steps again; rows a killed run
    wrote after its last checkpoint would otherwise appear twice. Each file is rewritten through
    a temporary file and a rename, so a kill here leaves it whole.
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


def _rewrite(path: Path, kept: list[str], lines: list[str]) -> None:
    if kept == lines:
        return
    if not kept:
        path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        fh.write("".join(kept))
    os.replace(tmp, path)


class RunLogger:
    """Writes training curves; every method is a no-op when ``enabled`` is False (rank > 0).

    Args:
        out_dir: Run folder.
        total: Total iterations (progress bar length).
        start: Iterations already done (resume).
        enabled: Rank 0 only.
        progress: Show the tqdm bar.
        tensorboard: Also write TensorBoard event files.
    """

    def __init__(
        self,
        out_dir: str | Path,
        total: int,
        start: int = 0,
        enabled: bool = True,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
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
            self._csv_keys = list(row)
            if path.is_file():  # resume: keep the existing header
                with path.open() as fh:
                    header = fh.readline().strip().split(",")
                self._csv_keys = header if header != [""] else self._csv_keys
            else:
                with path.open("w", newline="") as fh:
                    csv.writer(fh).writerow(self._csv_keys)
        with path.open("a", newline="") as fh:
            csv.writer(fh).writerow([row.get(k, "") for k in self._csv_keys])
        if self._writer is not None:
            for k, v in scalars.items():
                self._writer.add_scalar(f"train/{k}", v, step)

    def evaluation(self, step: int, metrics: dict[str, dict[str, Any]]) -> None:
        """Append validation metrics to ``eval.jsonl`` and TensorBoard."""
        if not self.enabled:
            return
        with (self.out / "eval.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._writer is not None:
            for model, m in metrics.items():
                for k in ("miou", "mf1", "oa", "kappa"):
                    if k in m:
                        self._writer.add_scalar(f"val_{model}/{k}", m[k], step)
        msg = "  ".join(
            f"{name}: mIoU {m['miou'] * 100:.2f} OA {m['oa'] * 100:.2f}"
            for name, m in metrics.items()
        )
        self._bar.write(f"step {step}: {msg}")

    def close(self) -> None:
        """Flush and close."""
        if not self.enabled:
            return
        self._bar.close()
        if self._writer is not None:
            self._writer.close()


__all__ = ["RunLogger", "truncate_logs"]
