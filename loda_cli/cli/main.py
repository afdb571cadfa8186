"""The root `loda` Typer app. Command modules register themselves; torch is never imported here."""

from __future__ import annotations

import os
import warnings
from typing import Annotated, Optional

import typer

from loda_cli import __version__
from loda_cli.errors import MetricWarning

# OpenMP threads that spin while they wait steal the CPU from the DataLoader workers and from
# anything else running: on a loaded 2-core machine training ran 4.5 crops/s spinning and 21-25
# crops/s passive, with identical results. Set before torch is imported; the user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_PYTHON_SHOWWARNING = warnings.showwarning

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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """loda's own warnings (a metric that had to fall back, say) as one 'warning:' line, not
    Python's file:line report; every other warning as Python shows it."""
    if file is None and issubclass(category, MetricWarning):
        from loda_cli.cli.common import err_console

        err_console.print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """loda: photo quality scores with the LoDa model."""
    warnings.showwarning = _show_warning


def _register() -> None:
    # Each module adds its commands to `app`. Importing them stays cheap: they import torch
    # inside the command functions only.
    from loda_cli.cli import benchmark, data, organize, score, train, weights

    for module in (score, weights, organize, data, train, benchmark):
        module.register(app)


_register()


def main() -> None:
    app()
