"""CLI command `export`: a checkpoint's weights for prediction only, as ``.safetensors``.

Thin by design: arguments -> `trainer.checkpoint.export_student`. The export keeps the student or
EMA weights and, in the file's metadata, what `predict` needs (student config, class names and
colours, crop size); no optimizer, RNG state or teacher.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--use",
    type=click.Choice(["ema", "student"]),
    help="Which weights of the checkpoint to keep. Default: the model the run chose best.pt "
    "on (eval.best_model: the student, as the official code).",
)
def export_cmd(checkpoint: str, out: str, use: str | None) -> None:
    """Write CHECKPOINT's weights to OUT (.safetensors) for `featcache predict`.

    Keeps one weight set (EMA or student) and what predict needs (student config, class names
    and colours, crop size); drops the optimizer, the other weight set and the RNG state.

    Example: featcache export runs/a/best.pt model.safetensors
    """
    from trainer.checkpoint import export_student

    path = export_student(checkpoint, out, use)
    before, after = Path(checkpoint).stat().st_size, path.stat().st_size
    click.echo(
        f"wrote {path} ({_mib(after)}; checkpoint {_mib(before)}, "
        f"{before / max(after, 1):.1f}x smaller)"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


COMMANDS = [export_cmd]
