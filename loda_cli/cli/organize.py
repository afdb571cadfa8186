"""`loda` commands of this group. (Filled in by the issue that builds them.)"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
