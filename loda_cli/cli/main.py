"""The root `loda` Typer app. Command modules register themselves; torch is never imported here."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from loda_cli import __version__

# OpenMP threads that spin while they wait steal the CPU from the DataLoader workers and from
# anything else running: on a loaded 2-core machine training ran 4.5 crops/s spinning and 21-25
# crops/s passive, with identical results. Set before torch is imported; the user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
