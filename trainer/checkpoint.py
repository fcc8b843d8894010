"""Checkpoints: student + EMA + optimizer + position + RNG states + config. Never a teacher.

A checkpoint is written to a temporary file and renamed, so a kill mid-write leaves the previous
``latest.pt`` intact. ``load_student`` rebuilds the student from the architecture recorded in the
checkpoint; loading into a different architecture raises `CheckpointError` naming the fields.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore.schema import dict_differences
from trainer.student import Student, StudentConfig

FORMAT = "featcache-train/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def student_config_dict(cfg: StudentConfig) -> dict[str, Any]:
    """JSON-like dict of a `StudentConfig` (tuples as lists)."""
    d = dataclasses.asdict(cfg)
    d["teachers"] = [dataclasses.asdict(t) if not isinstance(t, dict) else t
                     for t in cfg.teachers]
    return _lists(d)


def _lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA when present) RNG states, torch.load-safe."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the latest.pt / best.pt of a "
                              "training run (its --out folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                              "it may be truncated or not a featcache checkpoint") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a featcache training checkpoint (format "
                              f"{FORMAT!r} expected)")
    return ckpt


def check_architecture(ckpt: dict[str, Any], cfg: StudentConfig, path: str | Path) -> None:
    """Refuse a checkpoint whose recorded student architecture differs from ``cfg``."""
    mine = student_config_dict(cfg)
    theirs = ckpt.get("student_config", {})
    ignore = {"backbone_weights", "grad_checkpointing"}  # no effect on the weights' shapes
    diffs = [d for d in dict_differences({k: v for k, v in theirs.items() if k not in ignore},
                                         {k: v for k, v in mine.items() if k not in ignore},
                                         "student")]
    if diffs:
        raise CheckpointError(f"checkpoint {path} holds another student architecture: "
                              f"{'; '.join(diffs[:6])}; use a checkpoint of this model or "
                              "the same model options")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{what} does not fit the model: {str(err)[:400]}; the checkpoint "
                              "was made for another architecture") from err


def load_student(path: str | Path, which: str = "ema",
                 device: torch.device | str = "cpu") -> tuple[Student, dict[str, Any]]:
    """Rebuild the student of a checkpoint (no teacher, no store needed).

    Args:
        path: ``latest.pt`` / ``best.pt``.
        which: ``"ema"`` or ``"student"`` weights.
        device: Target device.

    Returns:
        ``(model in eval mode, checkpoint dict)``.
    """
    ckpt = read_checkpoint(path)
    if which not in ("ema", "student"):
        raise CheckpointError(f"weights {which!r} must be 'ema' or 'student'")
    scfg = dict(ckpt["student_config"])
    scfg["backbone_weights"] = None  # weights come from the checkpoint, not the file
    model = Student(StudentConfig(**scfg))
    load_state(model, ckpt[which], f"{path} [{which}]")
    return model.to(device).eval(), ckpt


__all__ = ["CheckpointError", "FORMAT", "check_architecture", "load_state", "load_student",
           "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state",
           "student_config_dict"]
