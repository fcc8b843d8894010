"""A run folder's safety rules: never train over another run, resume only the same recipe.

``train --out DIR`` writes ``config.yaml``, ``latest.pt``, ``best.pt``, ``metrics.csv``,
``eval.jsonl`` and ``tb/``. A second run into the same folder would replace the checkpoints and
interleave the logs, so a folder holding any of them is refused unless the run resumes it
(``--resume``) or the user asks to replace it (``--overwrite``, which deletes only a folder that
is recognisably a featcache run: nothing but the files a run writes, and a readable
``config.yaml`` or checkpoint among them).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, TrainConfigError

# What a run writes into its folder (``*.tmp``: a checkpoint or log being replaced).
RUN_FILES = ("config.yaml", "latest.pt", "best.pt", "metrics.csv", "eval.jsonl", "tb")
CHECKPOINTS = ("latest.pt", "best.pt")

# Fields that change what a resumed run computes: option words for the message, per config key.
RECIPE = {
    "optim.lr": "--lr",
    "optim.lr_multi": "optim.lr_multi",
    "optim.weight_decay": "optim.weight_decay",
    "optim.poly": "optim.poly",
    "schedule.batch_labeled": "--batch",
    "schedule.batch_unlabeled": "--batch",
    "runtime.seed": "--seed",
    "crop_size": "--crop",
    "mode": "--mode",
    "fixmatch.conf_thresh": "fixmatch.conf_thresh",
    "fixmatch.ema_max": "fixmatch.ema_max",
    "fixmatch.cutmix_p": "fixmatch.cutmix_p",
    "fixmatch.photometric": "fixmatch.photometric",
    "fixmatch.jitter_order": "fixmatch.jitter_order",
    "fixmatch.blur": "fixmatch.blur",
    "distill.masked": "--masked/--unmasked",
    "distill.standardize": "--standardize/--no-standardize",
    "distill.target_mode": "--target-mode",
    "distill.scale_blend": "--scale-blend",
    "distill.p_bank": "--p-bank",
    "method": "--method",
    "co2s.stability_detach": "--stability-detach",
    "co2s.lr_backbone": "co2s.lr_backbone",
    "co2s.lr_head": "co2s.lr_head",
    "co2s.lr_queries": "co2s.lr_queries",
    "co2s.weight_decay": "co2s.weight_decay",
    "co2s.finetune": "--co2s-finetune",
    "co2s.clip_act": "--clip-act",
    "co2s.text_variant": "--text-variant",
    "co2s.distill": "--co2s-distill",
}


def run_files(out: Path) -> list[str]:
    """Names in ``out`` that a training run writes (empty: no run there)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name in RUN_FILES)


def check_out_dir(out: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds a run this one would overwrite.

    Raises:
        TrainConfigError: naming the folder, what is in it, and the three ways on.
    """
    if out.exists() and not out.is_dir():
        raise TrainConfigError(
            f"--out {out} is a file; pass a folder for the run (it will hold "
            "config.yaml, checkpoints and logs)"
        )
    if resuming and overwrite:
        raise TrainConfigError(
            "--resume and --overwrite contradict: --resume continues the run "
            f"in {out}, --overwrite deletes it; drop one"
        )
    found = run_files(out)
    if found and not resuming and not overwrite:
        raise TrainConfigError(
            f"--out {out} already holds a training run ({', '.join(found)}); training again would "
            "replace its checkpoints and mix its logs. Pass --resume auto to continue it, a new "
            "--out for a new run, or --overwrite to delete it and start over"
        )


def check_deletable(out: Path) -> None:
    """``--overwrite``: refuse unless ``out`` is absent or recognisably a featcache run.

    Raises:
        TrainConfigError: ``out`` holds other files too, or no readable config / checkpoint.
    """
    if not out.exists():
        return
    others = sorted(
        p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp")
    )
    if others:
        raise TrainConfigError(
            f"--overwrite: {out} holds files a training run does not write ({_few(others)}); "
            "nothing was deleted. Move them away, or pass a new --out"
        )
    if not _recognised(out):
        raise TrainConfigError(
            f"--overwrite: {out} holds no readable featcache config.yaml or checkpoint, so it "
            "is not recognisably a training run; nothing was deleted. Delete it yourself or "
            "pass a new --out"
        )


def delete_run(out: Path) -> None:
    """``--overwrite``: delete the run in ``out`` (`check_deletable` first)."""
    check_deletable(out)
    if out.exists():
        shutil.rmtree(out)


def remove_run_files(out: Path, remove_dir: bool) -> None:
    """Remove what a run wrote into ``out`` (and ``out`` itself if ``remove_dir`` and empty)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    if remove_dir and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _recognised(out: Path) -> bool:
    from trainer.checkpoint import CheckpointError, read_checkpoint

    if (out / "config.yaml").is_file():
        try:
            TrainConfig.load(out / "config.yaml")
            return True
        except TrainConfigError:
            pass
    for name in CHECKPOINTS:
        if (out / name).is_file():
            try:
                read_checkpoint(out / name)
                return True
            except CheckpointError:
                pass
    return False


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def recipe_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """What differs between the checkpoint's config and this run's, in option words."""
    now = cfg.to_dict()
    out = []
    for key, option in RECIPE.items():
        old, new = _get(saved, key), _get(now, key)
        if old is _MISSING or old == new:  # an older checkpoint without the field: no claim
            continue
        out.append(f"{option} ({key}) was {old!r} and is now {new!r}")
    return out


def check_resume_recipe(saved: dict[str, Any], cfg: TrainConfig, path: str | Path) -> None:
    """Refuse to resume ``path`` with another learning rate, batch, seed or loss setting.

    Raises:
        TrainConfigError: listing each change with both values.
    """
    changes = recipe_changes(saved, cfg)
    if changes:
        raise TrainConfigError(
            f"--resume {path}: the run was started with other settings: {'; '.join(changes)}. "
            "Resume with the run's own settings (--config OUT/config.yaml --resume auto, or "
            "the same options), or start a new run with a new --out"
        )


_MISSING = object()


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


__all__ = [
    "RUN_FILES",
    "check_deletable",
    "check_out_dir",
    "check_resume_recipe",
    "delete_run",
    "recipe_changes",
    "remove_run_files",
    "run_files",
]
