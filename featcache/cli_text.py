"""CLI command `text`: Co2S class text embeddings into a store (``pipelines.text.run_text``).

Thin: options -> ``TextConfig`` -> ``run_text`` -> one summary line. torch and open_clip are
imported inside the command, so ``featcache --help`` stays light.
"""

from __future__ import annotations

import click

_HELP = """Write class text embeddings (Co2S) into STORE's text/ group.

Encodes "a photo of a {concept}" with the CLIP ViT-B/16 text tower (open_clip, QuickGELU,
OpenAI weights from --weights) and stores three float32 matrices: single (class names),
concepts (every concept) and conceptavg (L2-normalised mean of each class's unnormalised
concept embeddings; what Co2S trains with), with the prompts, model, tokenizer and weights
sha256. Re-running with the same inputs does nothing; other inputs need --overwrite.

\b
Classes: the store's class table, in label order (--classes only states or checks it, or
supplies it for a store that records none).
\b
--concepts: builtin   the shipped list of the store's dataset (loveda, potsdam, whdld,
                      gid15, mer, msl); refused for other datasets
            NAME      one of those shipped lists by name
            names     each class's name only (conceptavg then equals single)
            FILE      your own list, JSON (or YAML by .yaml/.yml suffix):
                      {"classes": [{"name": "building", "concepts": ["building",
                      "high-rise", ...]}, ...]}  one entry per store class, in order;
                      concepts are used as given (the shipped lists start with the name)
"""


@click.command("text", help=_HELP)
@click.argument("store")
@click.option(
    "--classes",
    default=None,
    help="Class names in label order: NAME,NAME,..., a file (one per line) or a shipped "
    "dataset name. Default: the store's class table (which they must equal when it has one).",
)
@click.option(
    "--concepts",
    default="builtin",
    show_default=True,
    help="Concept lists: builtin, a shipped name (loveda, potsdam, whdld, gid15, mer, msl), "
    "names, or a JSON/YAML FILE (format above).",
)
@click.option(
    "--weights",
    default=None,
    metavar="PATH",
    help="Local CLIP ViT-B/16 checkpoint with the OpenAI weights (open_clip's "
    "open_clip_pytorch_model.bin or .safetensors, or an OpenAI state dict; not TorchScript). "
    "Required unless --random-weights or --tiny.",
)
@click.option(
    "--random-weights",
    "--random-init",
    "random_weights",
    is_flag=True,
    help="Accept a randomly initialised full-size tower (smoke runs; the embeddings are "
    "meaningless).",
)
@click.option(
    "--tiny",
    is_flag=True,
    help="The tiny random text tower (tests); with --weights, a checkpoint of that tower.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda.")
@click.option("--overwrite", is_flag=True, help="Replace text embeddings made from other inputs.")
def text_command(
    store: str,
    classes: str | None,
    concepts: str,
    weights: str | None,
    random_weights: bool,
    tiny: bool,
    device: str,
    overwrite: bool,
) -> None:
    from pipelines.text import TextConfig, run_text

    cfg = TextConfig(
        store=store,
        classes=classes,
        concepts=concepts,
        weights=weights,
        random_weights=random_weights,
        tiny=tiny,
        device=device,
        overwrite=overwrite,
    )
    result = run_text(cfg)
    inputs = result.inputs
    n = sum(len(g) for g in inputs.concepts)
    if inputs.weights_sha256.startswith("random"):
        click.echo("WARNING: random text tower: the class embeddings carry no meaning")
    what = "wrote text/" if result.written else "text/ already up to date (same inputs)"
    click.echo(
        f"{what} in {store}: {len(inputs.class_names)} classes, {n} concepts "
        f"({result.concepts_source}), {inputs.model}, weights {inputs.weights_sha256[:16]}"
    )


COMMANDS = [text_command]
