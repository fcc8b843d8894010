"""CLI commands of the application layer: `audit` (cache fidelity) and `demo` (end to end).

Thin by design: options → library call (`featcache.audit.audit_store`, `featcache.demo.run_demo`).
Library errors reach the user through `featcache.cli` (message, exit code 1, no traceback).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from featcache.cli_source import LAYOUT_CHOICES

# `demo --method`: the demo of each method ("module:function", imported when run)
DEMOS = {"rs-mtdf": "featcache.demo:run_demo", "co2s": "featcache.demo_co2s:run_co2s_demo"}


def _parse_level_sets(items: tuple[str, ...]) -> dict[str, list[str]] | None:
    """``LABEL=k1,k2`` items → ``{label: [keys]}`` (None when none given)."""
    if not items:
        return None
    sets: dict[str, list[str]] = {}
    for item in items:
        label, sep, keys = item.partition("=")
        parsed = [k.strip() for k in keys.split(",") if k.strip()]
        if not sep or not label.strip() or not parsed:
            raise click.BadParameter(
                f"{item!r}: write LABEL=KEY[,KEY...], e.g. 'two scales=s1.00,s2.00'",
                param_hint="--levels",
            )
        sets[label.strip()] = parsed
    return sets


def _teacher_weights(teacher: str, items: tuple[str, ...]) -> str | None:
    """The --weights NAME=PATH entry of the audited teacher (the only NAME allowed)."""
    from pipelines.config import ExtractConfigError, parse_weights

    try:
        weights = parse_weights(items)
    except ExtractConfigError as err:
        raise click.BadParameter(str(err), param_hint="--weights") from None
    others = sorted(set(weights) - {teacher})
    if others:
        raise click.BadParameter(
            f"{others} is not the audited teacher; write --weights "
            f"{teacher}=PATH (NAME as given to --teacher)",
            param_hint="--weights",
        )
    return weights.get(teacher)


@click.command("audit")
@click.argument("store")
@click.option(
    "--teacher",
    "-t",
    required=True,
    help="Teacher in the store: its stored name or the name given to extract.",
)
@click.option(
    "--weights",
    multiple=True,
    metavar="NAME=PATH",
    help="Weights the teacher was extracted with: a local file or a pretrained tag, "
    "as given to extract (NAME is the --teacher).",
)
@click.option("--tiny", is_flag=True, help="The store was extracted with --tiny teachers.")
@click.option(
    "--random-weights",
    is_flag=True,
    help="The store was extracted with --random-weights (accept random init).",
)
@click.option("--views", default=64, show_default=True, type=int, help="Random views to draw.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the view draws, CutMix boxes and colour jitter.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option(
    "--levels",
    "level_sets",
    multiple=True,
    metavar="LABEL=K1,K2",
    help="A cache configuration to compare (repeatable); default: s1.00 only / all "
    "scales / all scales + flip.",
)
@click.option("--crop-size", default=None, type=int, help="View side (default: base size).")
@click.option(
    "--batch-size", default=8, show_default=True, type=int, help="Views per teacher forward."
)
@click.option("--grid-aligned", is_flag=True, help="Draw views on the cached token grid.")
@click.option(
    "--aligned-views",
    default=None,
    type=int,
    help="Also audit this many grid-aligned views and report them beside the "
    "official views (default: half of --views; 0: skip).",
)
@click.option("--no-ceiling", is_flag=True, help="Skip the exact-scale ceiling (saves time).")
@click.option(
    "--scale-blend",
    default=0.25,
    show_default=True,
    type=float,
    help="Kernel width (octaves of zoom) over which neighbouring cached levels are "
    "mixed, as the trainer's distill.scale_blend; 0: nearest level only.",
)
@click.option(
    "--grid",
    type=click.Choice(["teacher", "student"]),
    default="teacher",
    show_default=True,
    help="Compare on the teacher's own tokens (cache fidelity "
    "alone) or on the student grid the loss reads.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the result as JSON here.",
)
@click.option(
    "--markdown",
    "md_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the markdown tables here.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def audit_command(
    store: str,
    teacher: str,
    weights: tuple[str, ...],
    tiny: bool,
    random_weights: bool,
    views: int,
    seed: int,
    device: str,
    level_sets: tuple[str, ...],
    crop_size: int | None,
    batch_size: int,
    grid_aligned: bool,
    aligned_views: int | None,
    no_ceiling: bool,
    scale_blend: float,
    grid: str,
    json_out: str | None,
    md_out: str | None,
    quiet: bool,
) -> None:
    """Measure how close targets sampled from STORE are to the teacher run on each view."""
    from featcache.audit import audit_store

    sets = _parse_level_sets(level_sets)
    result = audit_store(
        store,
        teacher,
        weights=_teacher_weights(teacher, weights),
        tiny=tiny,
        random_weights=random_weights,
        n_views=views,
        seed=seed,
        level_sets=sets,
        device=device,
        crop_size=crop_size,
        batch_size=batch_size,
        grid_aligned=grid_aligned,
        ceiling=not no_ceiling,
        grid=grid,
        scale_blend=scale_blend,
        aligned_views=views // 2 if aligned_views is None else aligned_views,
        progress=not quiet,
    )
    md = result.to_markdown()
    click.echo(md)
    for path, text in ((json_out, result.to_json()), (md_out, md)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


@click.command("demo")
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder (data, store, runs, report/).",
)
@click.option(
    "--data",
    default=None,
    type=click.Path(exists=True),
    help="A dataset (LoveDA, Potsdam, DeepGlobe or images/+masks/ folder) instead of "
    "the synthetic one.",
)
@click.option(
    "--layout",
    default="auto",
    show_default=True,
    type=click.Choice(LAYOUT_CHOICES),
    help="Layout of --data (as in `extract`).",
)
@click.option("--quick", is_flag=True, help="Smallest settings (about a minute on 2 cores).")
@click.option(
    "--method",
    default="rs-mtdf",
    show_default=True,
    type=click.Choice(list(DEMOS)),
    help="rs-mtdf: cached, online and no-distill runs compared; co2s: a short Co2S run "
    "(tiny students, tiny text tower), mIoU of each student and of their fusion.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the data, splits and training runs.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="Torch CPU threads for every phase (default 1: keeps the three runs' "
    "times comparable on a shared CPU).",
)
def demo_command(
    out: str,
    data: str | None,
    layout: str,
    quick: bool,
    method: str,
    device: str,
    seed: int,
    threads: int | None,
) -> None:
    """Data → teacher cache → cached, online and no-distill training → report with plots
    (--method co2s: data → store → class text rows → a short Co2S run → mIoU)."""
    module, name = DEMOS[method].split(":")
    run_demo = getattr(importlib.import_module(module), name)
    report = run_demo(
        out,
        data=data,
        quick=quick,
        device=device,
        seed=seed,
        layout=layout,
        echo=click.echo,
        threads=threads,
    )
    click.echo(f"report: {report}")


COMMANDS = [audit_command, demo_command]
