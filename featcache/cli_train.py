"""CLI commands of the training stage: `train`, `evaluate`, `predict`.

Thin by design: options -> `TrainConfig` (over an optional YAML) -> `trainer` library call.
Library errors reach the user through `featcache.cli` (message, exit code 1, no traceback).
DDP: ``torchrun --nproc_per_node 2 -m featcache.cli train ...``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from featcache.cli_source import source_options, source_values
from trainer.config import (  # cheap: no torch
    CO2S_CLIP_ACTS,
    CO2S_DISTILL,
    CO2S_FINETUNE,
    CO2S_TEXT_VARIANTS,
    METHOD_MODELS,
    METHOD_NAMES,
    MODEL_CHOICES,
    MODES,
    TARGET_MODES,
)
from trainer.presets import PRESETS  # cheap: no torch

# --use: the models of every method's checkpoints (student / ema; Co2S's clip, dinov3, fused)
USE_MODELS = (*MODEL_CHOICES, *(m for models in METHOD_MODELS.values() for m in models))


def parse_batch(text: str) -> tuple[int, int]:
    """``"8+8"`` -> (8, 8); ``"4"`` -> (4, 4)."""
    parts = text.split("+")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"--batch {text!r}: write LABELED+UNLABELED, e.g. 8+8") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or values[0] < 1 or values[1] < 0:
        raise click.BadParameter(
            f"--batch {text!r}: write LABELED+UNLABELED with LABELED >= 1 "
            "and UNLABELED >= 0, e.g. 8+8"
        )
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
        # no @branch: None, the teacher's default from its spec (trainer.config.default_branch)
        out.append(TeacherConfig(name, branch or None, w.get(name)))
    return out


def build_config(opts: dict[str, Any]) -> Any:
    """`TrainConfig`: the preset (``--preset``), then the YAML (``--config``), then the options.

    An option given here overrides both; where it differs from the official value it is listed
    among the run's departures (`trainer.presets.departures`).
    """
    from trainer.config import TrainConfig

    preset = opts.get("preset")
    if opts.get("config"):
        cfg = TrainConfig.load(opts["config"], preset=preset)
    else:  # the preset is the recipe of --method (Co2S has its own)
        method = {"method": opts["method"]} if opts.get("method") else {}
        cfg = TrainConfig.from_dict({"preset": preset, **method} if preset else {})
    set_if = {  # option -> (section, attribute)
        "store": ("data", "store"),
        "source": ("data", "source"),
        "labeled": ("data", "labeled"),
        "unlabeled": ("data", "unlabeled"),
        "val": ("data", "val"),
        "tile_size": ("data", "tile_size"),
        "workers": ("data", "num_workers"),
        "edge_rule": ("data", "edge_rule"),
        "iters": ("schedule", "iters"),
        "epochs": ("schedule", "epochs"),
        "eval_interval": ("schedule", "eval_interval"),
        "stop_after": ("schedule", "stop_after"),
        "log_interval": ("schedule", "log_interval"),
        "out": ("runtime", "out_dir"),
        "device": ("runtime", "device"),
        "seed": ("runtime", "seed"),
        "resume": ("runtime", "resume"),
        "eval_mode": ("eval", "mode"),
        "num_classes": ("model", "num_classes"),
        "pretrained": ("model", "pretrained"),
        "lr": ("optim", "lr"),
        "standardize": ("distill", "standardize"),
        "masked": ("distill", "masked"),
        "target_mode": ("distill", "target_mode"),
        "p_bank": ("distill", "p_bank"),
        "scale_blend": ("distill", "scale_blend"),
        "partition": ("data", "partition"),
        "co2s_finetune": ("co2s", "finetune"),
        "clip_act": ("co2s", "clip_act"),
        "text_variant": ("co2s", "text_variant"),
        "clip_weights": ("co2s", "clip_weights"),
        "dino_weights": ("co2s", "dino_weights"),
        "co2s_distill": ("co2s", "distill"),
        "exclude_classes": ("eval", "exclude_classes"),
    }
    for key, (section, attr) in set_if.items():
        if opts.get(key) is not None:
            setattr(getattr(cfg, section), attr, opts[key])
    for field, value in source_values(opts).items():  # how a --source is read
        if value is not None:
            setattr(cfg.data, field, value)
    for key, attr in (("method", "method"), ("mode", "mode"), ("crop", "crop_size")):
        if opts.get(key) is not None:
            setattr(cfg, attr, opts[key])
    if opts.get("teacher"):
        if opts.get("no_distill"):
            raise click.UsageError("--teacher and --no-distill contradict: drop one")
        cfg.model.teachers = _teachers(opts["teacher"], opts.get("weights") or ())
    if opts.get("no_distill"):
        cfg.model.teachers, cfg.distill.enabled = None, False
    if opts.get("batch"):
        cfg.schedule.batch_labeled, cfg.schedule.batch_unlabeled = parse_batch(opts["batch"])
    for flag, (section, attr) in (
        ("tiny", ("model", "tiny")),
        ("bf16", ("runtime", "bf16")),
        ("random_weights", ("model", "random_weights")),
        ("grad_ckpt", ("runtime", "grad_checkpointing")),
        ("skip_bad_tiles", ("data", "skip_bad_tiles")),
        ("stability_detach", ("co2s", "stability_detach")),
    ):
        if opts.get(flag):
            setattr(getattr(cfg, section), attr, True)
    if opts.get("no_progress"):
        cfg.runtime.progress = False
    return cfg.validate()


EXCLUDE_HELP = (
    "Classes the protocol means leave out, e.g. 0 or clutter,car or none (metrics "
    "over all classes are reported too). Default: the dataset's protocol recorded "
    "in the store (Potsdam/Vaihingen: 0 impervious_surface; DeepGlobe: 6 unknown)."
)


@click.command("train")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML config (options below override it).",
)
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    help="official: start from the official RS-MTDF recipe everywhere it differs from "
    "our defaults (then --config, then these options). Every run prints its "
    "departures from the official recipe.",
)
@click.option("--store", help="Feature store URL (cached mode; also pixels for online mode).")
@click.option("--source", help="Image dataset folder (online mode without a store).")
@click.option(
    "--teacher",
    multiple=True,
    help="Distil from teacher NAME[@full|@clip224] only (repeat). Default: every "
    "teacher the store holds, CLIP on @clip224, others on @full.",
)
@click.option(
    "--no-distill",
    is_flag=True,
    help="Plain FixMatch: train without any teacher (no distillation).",
)
@click.option(
    "--weights",
    multiple=True,
    metavar="NAME=PATH",
    help="Online-mode teacher weights: a local file or a pretrained tag (repeat).",
)
@click.option(
    "--method",
    type=click.Choice(list(METHOD_NAMES)),
    help="Training method: rs-mtdf (default; FixMatch + distillation, plain FixMatch with "
    "--no-distill), supervised (the supervised-only baseline: labeled views, CE) or co2s "
    "(CLIP + DINOv3 students, UniMatch streams, stability loss; needs `featcache text`).",
)
@click.option(
    "--mode",
    type=click.Choice(list(MODES)),
    help="Distillation targets from the store's cache, or teachers run on each view.",
)
@click.option("--out", help="Run folder (checkpoints, logs, config.yaml).")
@click.option("--iters", type=int, help="Total iterations (overrides --epochs).")
@click.option(
    "--epochs",
    type=int,
    help="Training length in passes over the unlabeled set (as the official code).",
)
@click.option("--batch", help="Per-process batch LABELED+UNLABELED, e.g. 8+8.")
@click.option("--crop", type=int, help="Crop size (multiple of 14).")
@click.option("--labeled", help="Labeled split name(s) or tile-id file.")
@click.option("--unlabeled", help="Unlabeled split name(s) or tile-id file.")
@click.option("--val", help="Validation split name(s) or tile-id file.")
@click.option(
    "--partition",
    help="A labeled/unlabeled/val partition saved by `featcache splits` (default: the "
    "store's partition 'default' when no --labeled/--unlabeled/--val is given).",
)
@click.option("--tile-size", type=int, help="Tile size for --source.")
@click.option(
    "--edge-rule",
    type=click.Choice(("exact", "overlap_last", "pad")),
    help="Scene edges for --source: pad = DWL's cut of the official Potsdam/DeepGlobe "
    "tiles (default: the layout's; a store keeps its extraction's rule).",
)
@source_options(with_defaults=False)
@click.option(
    "--num-classes", type=int, help="Expected class count (checked against the data's class list)."
)
@click.option(
    "--pretrained",
    help="Student backbone weights: a DINOv2 .pth/.safetensors file, or timm[:tag] "
    "where the model hub is reachable. Required unless --tiny/--random-weights.",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Accept random init for a full-size student without --pretrained and for "
    "online teachers without --weights (refused otherwise).",
)
@click.option("--lr", type=float, help="Backbone learning rate (the head's is lr_multi times).")
@click.option(
    "--standardize/--no-standardize",
    default=None,
    help="Standardise targets with the store's statistics.",
)
@click.option(
    "--target-mode",
    type=click.Choice(list(TARGET_MODES)),
    help="Cached targets: warp the cached levels (default), grid-aligned views, or "
    "views from the store's exact view bank (see `featcache bank`).",
)
@click.option("--p-bank", type=float, help="view_bank: probability a view comes from the bank.")
@click.option(
    "--scale-blend",
    type=float,
    help="Warped targets: kernel width (octaves of zoom, default 0.25) over which "
    "neighbouring cached levels are mixed; 0: nearest level only.",
)
@click.option(
    "--masked/--unmasked",
    default=None,
    help="Weight distillation by validity (default) or the official plain mean.",
)
@click.option(
    "--eval-mode",
    type=click.Choice(["whole", "sliding"]),
    help="Validation: resize each tile to a multiple of 14, or crop-size windows.",
)
@click.option("--eval-interval", type=int, help="Validate every N iterations.")
@click.option("--exclude-classes", metavar="IDS|NAMES|none", help=EXCLUDE_HELP)
@click.option("--log-interval", type=int, help="Log losses every N iterations.")
@click.option("--stop-after", type=int, help="Leave after N iterations (resume later).")
@click.option("--resume", help="Checkpoint to resume, or 'auto' (OUT/latest.pt if present).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete the training run already in --out and start over (only a folder "
    "that is recognisably a featcache run).",
)
@click.option(
    "--tiny",
    is_flag=True,
    help="Tiny random student for smoke runs; online teachers a store does not hold "
    "are tiny too (a stored teacher is rebuilt as the store records it).",
)
@click.option(
    "--stability-detach",
    is_flag=True,
    help="co2s: detach both sides of the stability loss, as the official code (no gradient).",
)
@click.option(
    "--co2s-finetune",
    type=click.Choice(CO2S_FINETUNE),
    help="co2s: backbone parameters trained: attn (official: attention only), full, frozen.",
)
@click.option(
    "--clip-act",
    type=click.Choice(CO2S_CLIP_ACTS),
    help="co2s: CLIP activation, quickgelu (the OpenAI weights') or gelu (the official code).",
)
@click.option(
    "--text-variant",
    type=click.Choice(CO2S_TEXT_VARIANTS),
    help="co2s: stored class text embeddings of the CLIP student (official: conceptavg).",
)
@click.option("--clip-weights", help="co2s: local CLIP ViT-B/16 weights file.")
@click.option("--dino-weights", help="co2s: local DINOv3 ViT-B/16 weights file.")
@click.option(
    "--co2s-distill",
    type=click.Choice(CO2S_DISTILL),
    help="co2s: students that also distil the store's teachers (translators + MSE from the "
    "run's target source; --teacher picks them, default all): none (official), clip, dinov3, "
    "both.",
)
@click.option("--device", help="auto | cpu | cuda | cuda:N")
@click.option("--seed", type=int, help="Seed of the run (views, init, sampling).")
@click.option("--workers", type=int, help="DataLoader workers.")
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--grad-ckpt", is_flag=True, help="Activation checkpointing of the backbone.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--skip-bad-tiles",
    is_flag=True,
    help="Leave out (and log) tiles that fail their checksum instead of stopping; "
    "see `featcache verify STORE`.",
)
def train_cmd(**opts: Any) -> None:
    """Train the student (FixMatch + EMA + distillation) from a store or online teachers."""
    import os

    from trainer.engine import train

    result = train(build_config(opts), echo=click.echo, overwrite=opts["overwrite"])
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(
            json.dumps({"step": result.step, "best": result.best, "out_dir": str(result.out_dir)})
        )


def _eval_reader(store: str | None, source: str | None, tile_size: int) -> Any:
    if store:
        from featstore import open_store

        return open_store(store)
    if source:
        from pipelines.sources import open_source
        from trainer.data import SourceTiles

        return SourceTiles(open_source(source, tile_size=tile_size))
    raise click.UsageError("give --store URL or --source PATH")


def _ignore_index(reader: Any) -> int:
    """The mask value to skip: a store keeps it in its schema, a source reader on itself."""
    schema = getattr(reader, "schema", None)
    return int(schema.ignore_index if schema is not None else reader.ignore_index)


@click.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", help="Store with pixels and masks to evaluate on.")
@click.option("--source", help="Image dataset folder to evaluate on (instead of --store).")
@click.option("--split", help="Split name(s) or tile-id file (default: the run's val).")
@click.option(
    "--tile-size", type=int, default=512, show_default=True, help="Tile size for --source."
)
@click.option(
    "--use",
    type=click.Choice(["all", *USE_MODELS, "both"]),
    default="all",
    show_default=True,
    help="Which models of the checkpoint to evaluate: all (student and EMA; a co2s run's "
    "clip, dinov3 and fused), one of them, or both (student and EMA).",
)
@click.option(
    "--mode",
    type=click.Choice(["whole", "sliding"]),
    help="whole: resize the tile to a multiple of the patch (14; co2s 16); sliding: crop-size "
    "windows. Default: the run's evaluation (co2s: sliding at stride 5/6 crop); an export: whole.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option(
    "--out",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the metrics JSON to this file.",
)
@click.option(
    "--exclude-classes",
    metavar="IDS|NAMES|none",
    help=EXCLUDE_HELP + " A run trained with --exclude-classes keeps its choice.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def evaluate_cmd(
    checkpoint: str,
    store: str | None,
    source: str | None,
    split: str | None,
    tile_size: int,
    use: str,
    mode: str | None,
    device: str,
    json_out: str | None,
    exclude_classes: str | None,
    no_progress: bool,
) -> None:
    """Print validation metrics (strict JSON, classes by name) of a checkpoint's models."""
    from pathlib import Path

    from trainer.checkpoint import check_class_count, class_names
    from trainer.checks import recorded_val, select_tiles
    from trainer.config import check_device
    from trainer.evaluate import evaluate, metrics_json, resolve_protocol
    from trainer.predict import inference_protocol, load_models

    check_device(device)
    models, ckpt = load_models(checkpoint, use, device)
    run = inference_protocol(ckpt, mode)
    reader = _eval_reader(store, source, tile_size)
    schema = getattr(reader, "schema", None)  # a store names its classes in its schema
    data_classes = schema.class_names if schema is not None else reader.class_names
    check_class_count(ckpt, data_classes, checkpoint, f"the data ({store or source})")
    if not split and "data" not in ckpt["config"]:
        raise click.UsageError(
            f"{checkpoint} is an export and records no val split; pass "
            "--split NAME (see `featcache splits STORE`)"
        )
    if split:
        spec, indices = f"--split {split!r}", select_tiles(reader.tiles, split, "--split")
    else:  # the run's val: its partition's val set, or its val selection
        spec = "the run's val set"
        indices = recorded_val(reader.tiles, ckpt["config"].get("data", {}), store)
    if not indices:
        raise click.UsageError(f"{spec} selects no tiles; pass --split NAME")
    if exclude_classes is None:  # the run's own choice, else the data's protocol
        exclude_classes = ckpt["config"].get("eval", {}).get("exclude_classes")
    protocol = resolve_protocol(reader, class_names(ckpt), exclude_classes)
    metrics = evaluate(
        models,
        reader,
        indices,
        int(ckpt["student_config"]["num_classes"]),
        run.mode,
        run.crop,
        run.stride,
        device=device,
        ignore_index=_ignore_index(reader),
        progress=not no_progress,
        exclude_classes=protocol.exclude,
        patch=run.patch,
    )
    text = metrics_json(metrics, class_names(ckpt), protocol)
    click.echo(text)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")


@click.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Output folder (masks, GeoTIFFs, legend).")
@click.option(
    "--use",
    type=click.Choice(list(USE_MODELS)),
    help="Which model of the checkpoint to use: student or ema weights; a co2s run's clip, "
    "dinov3 or fused students. Default: the model the run chose best.pt on (eval.best_model: "
    "the student, as the official code; co2s: clip); an export holds one set.",
)
@click.option(
    "--mode",
    type=click.Choice(["whole", "sliding"]),
    help="whole: resize the image to a multiple of the patch (14; co2s 16); sliding: crop-size "
    "windows. Default: the run's evaluation (co2s: sliding at stride 5/6 crop); an export: whole.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option("--no-geotiff", is_flag=True, help="Only PNG masks.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def predict_cmd(
    checkpoint: str,
    inputs: tuple[str, ...],
    out: str,
    use: str,
    mode: str | None,
    device: str,
    no_geotiff: bool,
    no_progress: bool,
) -> None:
    """Segment images / folders / stores with a checkpoint or export (no teacher needed).

    CHECKPOINT is a run's best.pt / latest.pt or a `featcache export` .safetensors file.
    """
    from pathlib import Path

    from trainer.config import check_device
    from trainer.predict import predict

    if Path(out).exists() and not Path(out).is_dir():
        raise click.UsageError(f"--out {out} is a file; pass a folder for the masks")
    check_device(device)
    files = predict(
        checkpoint, inputs, out, device, use, mode, geotiff=not no_geotiff, progress=not no_progress
    )
    click.echo(f"wrote {len(files)} files to {out}")


COMMANDS = [train_cmd, evaluate_cmd, predict_cmd]
