"""The docs are pinned: every command has help text and appears in the README."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from loda_cli.cli.main import app

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
runner = CliRunner()


def _commands():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        yield name, cmd
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            yield f"{name} {sub_name}", sub


def test_every_command_has_help_and_is_documented():
    names = []
    for name, cmd in _commands():
        names.append(name)
        assert (cmd.help or "").strip(), f"`loda {name}` has no help text"
        assert f"loda {name}" in README, f"`loda {name}` is not in the README"
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
    assert {"score", "cull", "sort", "rate", "undo", "review", "train", "benchmark", "weights list",
            "data check"} <= set(names)


def test_version_and_python_module():
    from loda_cli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"loda {__version__}"
