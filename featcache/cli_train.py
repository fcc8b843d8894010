"""CLI commands of the training stage: `train`, `evaluate`, `predict`.

Thin by design: options -> `TrainConfig` (over an optional YAML) -> `trainer` library call.
Typed library errors become `click.ClickException` (message, exit code 1, no traceback).
DDP: ``torchrun --nproc_per_node 2 -m featcache.cli train ...``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import click


def _user_error_types() -> tuple[type[BaseException], ...]:
    from featstore.errors import StoreError
    from trainer.checkpoint import CheckpointError
    from trainer.checks import DataCheckError
    from trainer.config import TrainConfigError
    from trainer.losses import NonFiniteLossError
    from trainer.predict import PredictError
    from trainer.student import BackboneWeightsError, StudentConfigError

    errors: list[type[BaseException]] = [StoreError, CheckpointError, DataCheckError,
                                         TrainConfigError, NonFiniteLossError, PredictError,
                                         BackboneWeightsError, StudentConfigError]
    with contextlib.suppress(ImportError):
        from pipelines.sources.errors import SourceError
        from pipelines.teachers.weights import WeightsError

        errors += [SourceError, WeightsError]
    return tuple(errors)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except _user_error_types() as err:
        raise click.ClickException(str(err)) from err


def parse_batch(text: str) -> tuple[int, int]:
    """``"8+8"`` -> (8, 8); ``"4"`` -> (4, 4)."""
    parts = text.split("+")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{text!r}: write LABELED+UNLABELED, e.g. 8+8") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or values[0] < 1 or values[1] < 0:
        raise click.BadParameter(f"{text!r}: write LABELED+UNLABELED with LABELED >= 1")
    return values[0], values[1]


def _teachers(items: tuple[str, ...], weights: tuple[str, ...]) -> list[Any]:
    from trainer.config import TeacherConfig

    w = {}
    for item in weights:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--weights {item!r}: write NAME=PATH_OR_TAG")
        w[name] = value
    out = []
    for item in items:
        name, _, branch = item.partition("@")
        if not branch:  # the official CLIP path is the 224 branch
            branch = "clip224" if name.startswith("clip") else "full"
        out.append(TeacherConfig(name, branch, w.get(name)))
    return out


def build_config(opts: dict[str, Any]) -> Any:
    """`TrainConfig` from a YAML (``--config``) overridden by the given options."""
    from trainer.config import TrainConfig

    cfg = TrainConfig.load(opts["config"]) if opts.get("config") else TrainConfig()
    set_if = {  # option -> (section, attribute)
        "store": ("data", "store"), "source": ("data", "source"), "labeled": ("data", "labeled"),
        "unlabeled": ("data", "unlabeled"), "val": ("data", "val"),
        "tile_size": ("data", "tile_size"), "workers": ("data", "num_workers"),
        "iters": ("schedule", "iters"), "epochs": ("schedule", "epochs"),
        "eval_interval": ("schedule", "eval_interval"),
        "stop_after": ("schedule", "stop_after"), "log_interval": ("schedule", "log_interval"),
        "out": ("runtime", "out_dir"), "device": ("runtime", "device"),
        "seed": ("runtime", "seed"), "resume": ("runtime", "resume"),
        "eval_mode": ("eval", "mode"), "num_classes": ("model", "num_classes"),
        "pretrained": ("model", "pretrained"), "lr": ("optim", "lr"),
        "standardize": ("distill", "standardize"), "masked": ("distill", "masked"),
        "target_mode": ("distill", "target_mode"), "p_bank": ("distill", "p_bank"),
        "scale_blend": ("distill", "scale_blend"),
    }
    for key, (section, attr) in set_if.items():
        if opts.get(key) is not None:
            setattr(getattr(cfg, section), attr, opts[key])
    for key, attr in (("mode", "mode"), ("crop", "crop_size")):
        if opts.get(key) is not None:
            setattr(cfg, attr, opts[key])
    if opts.get("teacher"):
        cfg.model.teachers = _teachers(opts["teacher"], opts.get("weights") or ())
    if opts.get("batch"):
        cfg.schedule.batch_labeled, cfg.schedule.batch_unlabeled = parse_batch(opts["batch"])
    for flag, (section, attr) in (("tiny", ("model", "tiny")), ("bf16", ("runtime", "bf16")),
                                  ("grad_ckpt", ("runtime", "grad_checkpointing"))):
        if opts.get(flag):
            setattr(getattr(cfg, section), attr, True)
    if opts.get("no_progress"):
        cfg.runtime.progress = False
    return cfg.validate()


@click.command("train")
@click.option("--config", type=click.Path(exists=True, dir_okay=False),
              help="YAML config (options below override it).")
@click.option("--store", help="Feature store URL (cached mode; also pixels for online mode).")
@click.option("--source", help="Image dataset folder (online mode without a store).")
@click.option("--teacher", multiple=True, help="Teacher NAME[@full|@clip224] (repeat).")
@click.option("--weights", multiple=True, help="Online teacher weights NAME=PATH_OR_TAG.")
@click.option("--mode", type=click.Choice(["cached", "online"]))
@click.option("--out", help="Run folder (checkpoints, logs, config.yaml).")
@click.option("--iters", type=int, help="Total iterations (overrides --epochs).")
@click.option("--epochs", type=int)
@click.option("--batch", help="Per-process batch LABELED+UNLABELED, e.g. 8+8.")
@click.option("--crop", type=int, help="Crop size (multiple of 14).")
@click.option("--labeled", help="Labeled split name(s) or tile-id file.")
@click.option("--unlabeled", help="Unlabeled split name(s) or tile-id file.")
@click.option("--val", help="Validation split name(s) or tile-id file.")
@click.option("--tile-size", type=int, help="Tile size for --source.")
@click.option("--num-classes", type=int)
@click.option("--pretrained", help="Student backbone weights (DINOv2 file or timm[:tag]).")
@click.option("--lr", type=float)
@click.option("--standardize/--no-standardize", default=None,
              help="Standardise targets with the store's statistics.")
@click.option("--target-mode", type=click.Choice(["warp", "grid_aligned", "view_bank"]),
              help="Cached targets: warp the cached levels (default), grid-aligned views, or "
                   "views from the store's exact view bank (see `featcache bank`).")
@click.option("--p-bank", type=float, help="view_bank: probability a view comes from the bank.")
@click.option("--scale-blend", type=float,
              help="Warped targets: kernel width (octaves of zoom, default 0.25) over which "
                   "neighbouring cached levels are mixed; 0: nearest level only.")
@click.option("--masked/--unmasked", default=None,
              help="Weight distillation by validity (default) or the official plain mean.")
@click.option("--eval-mode", type=click.Choice(["whole", "sliding"]))
@click.option("--eval-interval", type=int)
@click.option("--log-interval", type=int)
@click.option("--stop-after", type=int, help="Leave after N iterations (resume later).")
@click.option("--resume", help="Checkpoint to resume, or 'auto' (OUT/latest.pt if present).")
@click.option("--tiny", is_flag=True, help="Tiny student (and tiny online teachers).")
@click.option("--device", help="auto | cpu | cuda | cuda:N")
@click.option("--seed", type=int)
@click.option("--workers", type=int, help="DataLoader workers.")
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--grad-ckpt", is_flag=True, help="Activation checkpointing of the backbone.")
@click.option("--no-progress", is_flag=True)
def train_cmd(**opts: Any) -> None:
    """Train the student (FixMatch + EMA + distillation) from a store or online teachers."""
    import os

    from trainer.engine import train

    with _user_errors():
        result = train(build_config(opts))
    if int(os.environ.get("RANK", "0")) == 0:
            click.echo(json.dumps({"step": result.step, "best": result.best,
                               "out_dir": str(result.out_dir)}))


def _eval_reader(store: str | None, source: str | None, tile_size: int) -> Any:
    if store:
        from featstore import open_store

        return open_store(store)
    if source:
        from pipelines.sources import open_source
        from trainer.data import SourceTiles

        return SourceTiles(open_source(source, tile_size=tile_size))
    raise click.UsageError("give --store URL or --source PATH")


@click.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", help="Store with pixels and masks.")
@click.option("--source", help="Image dataset folder.")
@click.option("--split", help="Split name(s) or tile-id file (default: the run's val).")
@click.option("--tile-size", type=int, default=512, show_default=True)
@click.option("--weights", type=click.Choice(["ema", "student", "both"]), default="both",
              show_default=True)
@click.option("--mode", type=click.Choice(["whole", "sliding"]), default="whole",
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
def evaluate_cmd(checkpoint: str, store: str | None, source: str | None, split: str | None,
                 tile_size: int, weights: str, mode: str, device: str) -> None:
    """Print validation metrics (JSON) of a checkpoint's student and/or EMA."""
    from trainer.checkpoint import load_student
    from trainer.checks import select_tiles
    from trainer.evaluate import evaluate

    with _user_errors():
        names = ["student", "ema"] if weights == "both" else [weights]
        models, ckpt = {}, None
        for name in names:
            models[name], ckpt = load_student(checkpoint, name, device)
        reader = _eval_reader(store, source, tile_size)
        spec = split or ckpt["config"]["data"]["val"]
        indices = select_tiles(reader.tiles, spec, "--split")
        if not indices:
            raise click.UsageError(f"--split {spec!r} selects no tiles")
        metrics = evaluate(models, reader, indices, int(ckpt["student_config"]["num_classes"]),
                           mode, int(ckpt["config"]["crop_size"]), device=device)
    click.echo(json.dumps(metrics, indent=1))


@click.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Output folder.")
@click.option("--weights", type=click.Choice(["ema", "student"]), default="ema",
              show_default=True)
@click.option("--mode", type=click.Choice(["whole", "sliding"]), default="whole",
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-geotiff", is_flag=True, help="Only PNG masks.")
def predict_cmd(checkpoint: str, inputs: tuple[str, ...], out: str, weights: str, mode: str,
                device: str, no_geotiff: bool) -> None:
    """Segment images / folders / stores with a checkpoint (no teacher, no store needed)."""
    from trainer.predict import predict

    with _user_errors():
        files = predict(checkpoint, inputs, out, device, weights, mode, geotiff=not no_geotiff)
    click.echo(f"wrote {len(files)} files to {out}")


COMMANDS = [train_cmd, evaluate_cmd, predict_cmd]
