"""CLI command `publish`: a read-only, consolidated copy of a store with a dataset card.

Thin by design: arguments -> `pipelines.publish.PublishConfig` -> `publish_store`.
"""

from __future__ import annotations

import click


@click.command("publish")
@click.argument("store")
@click.argument("out", type=click.Path())
@click.option("--zip", "as_zip", is_flag=True, help="Write one .zip file instead of a folder.")
@click.option(
    "--licence",
    help="Licence of the source imagery and labels, for the card (e.g. 'CC BY-NC-SA 4.0'). "
    "Not guessed: without it the card says 'not stated'.",
)
@click.option("--source", help="Where the imagery comes from (URL or citation), for the card.")
def publish_command(
    store: str, out: str, as_zip: bool, licence: str | None, source: str | None
) -> None:
    """Copy the finished STORE to OUT read-only, consolidated, with a README.md dataset card.

    Example: featcache publish runs/loveda.zarr pub/loveda.zip --zip --licence "CC BY-NC-SA 4.0"
    """
    from pipelines.publish import PublishConfig, publish_store

    if not licence:
        click.echo(
            "WARNING: no --licence given: the card says 'licence: not stated'; pass "
            "--licence TEXT with the source dataset's licence",
            err=True,
        )
    path = publish_store(PublishConfig(store, out, as_zip, licence, source))
    click.echo(f"published {store} -> {path} (read-only; card: featcache info {path})")


COMMANDS = [publish_command]
