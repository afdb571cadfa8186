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


def test_the_readme_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python block, with its folder and file pointed at generated photos (HOME is
    the test's, so ``~/Photos`` is one); it once used PIL without importing it."""
    import re

    from PIL import Image

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## Python API\n```python\n(.*?)```", readme, re.S).group(1)
    photos = tmp_path / "Photos"
    photos.mkdir()
    for i in range(2):
        Image.effect_noise((320, 240), 20 + 30 * i).convert("RGB").save(photos / f"IMG_{i}.jpg")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LODA_HOME", str(tmp_path / "loda-home"))
    monkeypatch.chdir(photos)
    Image.effect_noise((320, 240), 40).convert("RGB").save(photos / "a.jpg")
    exec(compile(block, "README.md", "exec"), {})
