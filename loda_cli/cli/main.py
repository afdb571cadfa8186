"""The root `loda` Typer app. Command modules register themselves; torch is never imported here."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from loda_cli import __version__

app = typer.Typer(
    name="loda",
    help="Score the technical quality of photos with LoDa (CVPR 2024); cull, sort and rate them by "
    "score, safely and reversibly; train and benchmark the model with the paper's protocol.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"loda {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """loda: photo quality scores with the LoDa model."""


def _register() -> None:
    # Each module adds its commands to `app`. Importing them stays cheap: they import torch
    # inside the command functions only.
    from loda_cli.cli import benchmark, data, organize, score, train, weights

    for module in (score, weights, organize, data, train, benchmark):
        module.register(app)


_register()


def main() -> None:
    app()
