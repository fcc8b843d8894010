"""Checkpoints: student + EMA + optimizer + position + RNG states + config. Never a teacher.

A checkpoint is written to a temporary file, fsynced and renamed (`trainer.durable`), so a kill
or a full disk mid-write leaves the previous ``latest.pt`` intact. ``load_student`` rebuilds the
student from the architecture recorded in the checkpoint; loading into a different architecture
raises `CheckpointError` naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore.errors import FeatcacheError
from featstore.schema import dict_differences
from trainer.durable import atomic_write
from trainer.student import Student, StudentConfig

FORMAT = "featcache-train/1"
EXPORT_FORMAT = "featcache-export/1"


class CheckpointError(FeatcacheError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def student_config_dict(cfg: StudentConfig) -> dict[str, Any]:
    """JSON-like dict of a `StudentConfig` (tuples as lists)."""
    d = dataclasses.asdict(cfg)
    d["teachers"] = [dataclasses.asdict(t) if not isinstance(t, dict) else t for t in cfg.teachers]
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
    """Write ``state`` atomically and durably (`trainer.durable.atomic_write`: temporary file,
    fsync, rename, fsync of the folder).

    Raises:
        RunWriteError: the disk is full or not writable; the message names ``path`` and the fix,
            the previous checkpoint at ``path`` is intact and no temporary file is left.
    """
    payload = {"format": FORMAT, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh), what="checkpoint")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; pass the latest.pt / best.pt of a "
            "training run (its --out folder)"
        )
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive, not a featcache training checkpoint; featcache "
            "never loads TorchScript (it runs the code inside the file). Pass the latest.pt / "
            "best.pt of a training run; plain weights are saved with "
            "torch.save(model.state_dict(), path)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:300]}); it may "
            "be truncated or not a featcache checkpoint. Pass another checkpoint of the run "
            "(its best.pt, or latest.pt), or re-run the training"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a featcache training checkpoint (format {FORMAT!r} expected); pass "
            "the latest.pt / best.pt of a training run (its --out folder)"
        )
    return ckpt


def _is_torchscript(path: Path) -> bool:
    # a zip with constants.pkl or code/: what torch.jit.save writes (torch.save never does)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # not a zip: torch.load below says what it is
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


# What resuming reads from a checkpoint (evaluate / predict / export need less).
RESUME_KEYS = ("student", "ema", "optimizer", "run", "rng", "config", "student_config")


def require_keys(ckpt: dict[str, Any], keys: tuple[str, ...], path: str | Path, to: str) -> None:
    """Refuse a checkpoint that lacks a section ``to`` (e.g. "resume a run") reads.

    Raises:
        CheckpointError: naming the file and the missing sections.
    """
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {', '.join(repr(k) for k in missing)} section(s), which "
            f"it needs to {to}; it was edited or written by another tool. Use the latest.pt / "
            "best.pt of a featcache training run"
        )


def student_config_from(ckpt: dict[str, Any], path: str | Path) -> StudentConfig:
    """The `StudentConfig` recorded in a checkpoint or export, checked field by field.

    Raises:
        CheckpointError: the record is missing, names fields this featcache does not know, or
            holds values the student refuses.
    """
    scfg = ckpt.get("student_config")
    if not isinstance(scfg, dict):
        raise CheckpointError(
            f"checkpoint {path} records no student_config (the student architecture); it was "
            "edited or written by another tool"
        )
    if "method" in scfg:  # another method's model record (e.g. Co2S's students), not ours
        raise CheckpointError(
            f"checkpoint {path} holds a {scfg['method']!r} model, not the rs-mtdf/supervised "
            f"student: resume it with --method {scfg['method']}; `featcache predict` and "
            "`featcache evaluate` read it, `featcache export` does not yet (predict from the "
            "checkpoint itself)"
        )
    known = {f.name for f in dataclasses.fields(StudentConfig)}
    unknown = sorted(set(scfg) - known)
    if unknown:
        raise CheckpointError(
            f"checkpoint {path}: student_config has field(s) {unknown} this featcache does not "
            "know; it was written by another featcache version or edited. Use that version, or "
            "a checkpoint of this one"
        )
    scfg = dict(scfg)
    scfg["backbone_weights"] = None  # weights come from the checkpoint, not the file
    scfg["random_weights"] = True  # the init is overwritten at once: nothing to refuse
    try:
        return StudentConfig(**scfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: student_config is not valid: {err}") from err


def check_architecture(ckpt: dict[str, Any], cfg: StudentConfig, path: str | Path) -> None:
    """Refuse a checkpoint whose recorded student architecture differs from ``cfg``."""
    mine = student_config_dict(cfg)
    theirs = ckpt.get("student_config", {})
    # No effect on the weights' shapes.
    ignore = {"backbone_weights", "random_weights", "grad_checkpointing"}
    diffs = [
        d
        for d in dict_differences(
            {k: v for k, v in theirs.items() if k not in ignore},
            {k: v for k, v in mine.items() if k not in ignore},
            "student",
        )
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} holds another student architecture: "
            f"{'; '.join(diffs[:6])}; use a checkpoint of this model or "
            "the same model options"
        )


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{what} does not fit the model: {str(err)[:400]}; the checkpoint "
            "was made for another architecture, or its recorded student_config was edited. "
            "Fix: use a checkpoint of this model (the run's best.pt / latest.pt), or train "
            "with the same model options"
        ) from err


def check_class_count(
    ckpt: dict[str, Any], data_classes: Sequence[str], path: str | Path, data: str
) -> None:
    """Refuse to evaluate a checkpoint on data with more classes than it predicts.

    Its masks may hold labels the model has no output for, which no metric can count (the
    confusion matrix would refuse them mid-run).

    Raises:
        CheckpointError: naming the checkpoint, the data and both class counts.
    """
    n = int(ckpt["student_config"]["num_classes"])
    if len(data_classes) <= n:
        return
    raise CheckpointError(
        f"checkpoint {path} predicts {n} classes ({', '.join(class_names(ckpt)[:8])}) but "
        f"{data} has {len(data_classes)} ({', '.join(list(data_classes)[:8])}); the checkpoint "
        "was trained on other data. Fix: evaluate it on the store it was trained on (--store), "
        f"or use a checkpoint trained on this data (--num-classes {len(data_classes)})"
    )


def default_weights(ckpt: dict[str, Any]) -> str:
    """The weight set a run's own rule picks: the model its ``best.pt`` was chosen on.

    ``eval.best_model`` of the run's config (the official rule, and our default, is the
    student); an export holds one set and names it; a checkpoint that records neither (written
    before the rule was recorded) gives ``"ema"``, what those versions used.
    """
    if "export" in ckpt:
        return str(ckpt["export"].get("use", "ema"))
    return str(ckpt.get("config", {}).get("eval", {}).get("best_model", "ema"))


def load_student(
    path: str | Path, which: str | None = None, device: torch.device | str = "cpu"
) -> tuple[Student, dict[str, Any]]:
    """Rebuild the student of a checkpoint or of an exported file (no teacher, no store needed).

    Args:
        path: ``latest.pt`` / ``best.pt`` of a run, or a ``.safetensors`` from `export_student`.
        which: ``"ema"`` or ``"student"`` weights (``--use``); None: the run's rule
            (`default_weights`). An export holds one set only; asking it for the other is an
            error.
        device: Target device.

    Returns:
        ``(model in eval mode, checkpoint dict)``; for an export the dict has the fields predict
        reads (``config.crop_size``, ``student_config``, ``class_names``, ``class_colors``).
    """
    if which not in ("ema", "student", None):
        raise CheckpointError(f"--use {which!r}: choose 'ema' or 'student'")
    if Path(path).suffix == ".safetensors":
        ckpt, state = read_export(path, which)
        which = ckpt["export"]["use"]
    else:
        ckpt = read_checkpoint(path)
        require_keys(ckpt, ("config", "student_config"), path, "rebuild its student")
        which = which or default_weights(ckpt)
        state = weight_set(ckpt, which, path)
    ckpt["weights_used"] = which
    model = Student(student_config_from(ckpt, path))
    load_state(model, state, f"{path} [{which}]")
    return model.to(device).eval(), ckpt


def weight_set(ckpt: dict[str, Any], which: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The ``ema`` / ``student`` state dict of a checkpoint, or a message naming ``--use``."""
    state = ckpt.get(which)
    if isinstance(state, dict) and state:
        return state
    other = "student" if which == "ema" else "ema"
    hint = f"pass --use {other}" if isinstance(ckpt.get(other), dict) else "use another checkpoint"
    raise CheckpointError(
        f"checkpoint {path} holds no {which!r} weights (--use {which}); {hint}. The file was "
        "edited or written by another tool"
    )


def class_names(ckpt: dict[str, Any]) -> list[str]:
    """One name per output class: the run's names, ``class_<i>`` for classes it did not name."""
    n = int(ckpt["student_config"]["num_classes"])
    names = [str(c) for c in ckpt.get("class_names") or []][:n]
    return names + [f"class_{i}" for i in range(len(names), n)]


def class_colors(ckpt: dict[str, Any]) -> list[tuple[int, int, int]] | None:
    """RGB per class recorded with the run (the store schema's ``class_colors``), else None.

    Training saves the store schema into every checkpoint, so the dataset's palette comes along
    without a separate field; an export or a later checkpoint may carry ``class_colors`` itself.
    """
    colours = ckpt.get("class_colors")
    if colours is None:
        colours = ((ckpt.get("store") or {}).get("schema") or {}).get("class_colors")
    if not colours:
        return None
    return [(int(c[0]), int(c[1]), int(c[2])) for c in colours]


def _export_metadata(ckpt: dict[str, Any], which: str, source: Path) -> dict[str, str]:
    """What predict needs besides the weights (safetensors metadata is ``str -> str``)."""
    return {
        "format": EXPORT_FORMAT,
        "use": which,
        "student_config": json.dumps(ckpt["student_config"]),
        "class_names": json.dumps(class_names(ckpt)),
        "class_colors": json.dumps(class_colors(ckpt)),
        "crop_size": str(int(ckpt["config"]["crop_size"])),
        "step": str(int((ckpt.get("run") or {}).get("step", -1))),
        "source": source.name,
    }


def export_student(checkpoint: str | Path, out: str | Path, which: str | None = None) -> Path:
    """Write one weight set of a checkpoint as ``.safetensors``: no optimizer, RNG or teacher.

    The student's translators and projections stay: the fused deepest level feeds the head, so
    prediction needs them. Tensors keep their dtype, so the export predicts bit for bit like the
    checkpoint.

    Args:
        checkpoint: ``latest.pt`` / ``best.pt`` of a run.
        out: Output file; must end in ``.safetensors``.
        which: ``"ema"`` or ``"student"`` (``--use``); None: the run's rule (`default_weights`).

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"export file {out} must end in .safetensors, e.g. model.safetensors")
    if which not in ("ema", "student", None):
        raise CheckpointError(f"--use {which!r}: choose 'ema' or 'student'")
    ckpt = read_checkpoint(checkpoint)
    which = which or default_weights(ckpt)
    student_config_from(ckpt, checkpoint)  # an export must rebuild its student
    require_keys(ckpt, ("config",), checkpoint, "be exported")
    # clone: safetensors refuses tensors that share storage, and a state dict may hold views
    state = {
        k: v.detach().clone().contiguous() for k, v in weight_set(ckpt, which, checkpoint).items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=_export_metadata(ckpt, which, Path(checkpoint)))
    os.replace(tmp, out)
    return out


def read_export(
    path: str | Path, which: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(checkpoint-like dict, state dict)`` of an `export_student` file (``which`` None: the
    set it holds)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"exported model {path} not found; write one with `featcache "
            "export RUN/best.pt model.safetensors`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read as safetensors ({err})") from err
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path} is not a featcache export (format {EXPORT_FORMAT!r} "
            "expected); write one with `featcache export RUN/best.pt OUT`"
        )
    try:
        ckpt = {
            "student_config": json.loads(meta["student_config"]),
            "class_names": json.loads(meta["class_names"]),
            "class_colors": json.loads(meta["class_colors"]),
            "config": {"crop_size": int(meta["crop_size"])},
            "run": {"step": int(meta["step"])},
            "export": meta,
        }
    except (KeyError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path}: the export's metadata is incomplete or edited ({type(err).__name__}: "
            f"{err}); export it again with `featcache export RUN/best.pt OUT`"
        ) from err
    if which is not None and meta.get("use") != which:
        raise CheckpointError(
            f"{path} holds the {meta.get('use')} weights only; pass --use "
            f"{meta.get('use')}, or export the {which} weights with --use {which}"
        )
    return ckpt, state


__all__ = [
    "CheckpointError",
    "EXPORT_FORMAT",
    "FORMAT",
    "RESUME_KEYS",
    "check_architecture",
    "check_class_count",
    "class_colors",
    "class_names",
    "default_weights",
    "export_student",
    "load_state",
    "load_student",
    "read_export",
    "read_checkpoint",
    "require_keys",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "student_config_dict",
    "student_config_from",
    "weight_set",
]
