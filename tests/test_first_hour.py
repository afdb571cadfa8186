"""Issue 16, "the first hour with loda": end-to-end checks of what a new user runs first: score,
cull, sort, rate and undo on one small library, the cached plan's speed, and the summaries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli.cli.main import app
from tests.test_organize import snapshot

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _library(root: Path) -> Path:
    """Camera JPEGs in two folders, a RAW+JPEG pair, a person's sidecar and a broken file."""
    for i in range(6):
        folder = root / ("day1" if i < 3 else "day2")
        folder.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((96, 72), 10 + 25 * i).convert("RGB").save(folder / f"IMG_{i}.JPG", quality=60 + 6 * i)
    (root / "day1" / "IMG_0.CR2").write_bytes(b"raw" * 40)
    (root / "day2" / "IMG_5.xmp").write_bytes(b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    (root / "day2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def _ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_score_skips_lodas_own_destinations(tmp_path, tiny_checkpoint, monkeypatch):
    """Issue 16.13: after a cull, `loda score .` does not score the culled photos again."""
    root = _library(tmp_path / "lib")
    monkeypatch.chdir(root)
    _ok("cull", "--worst", "2", "--model", tiny_checkpoint, "--apply")
    assert len(list((root / "_culled").rglob("*.JPG"))) == 2
    out = tmp_path / "s.csv"
    _ok("score", ".", "--model", tiny_checkpoint, "--out", out, "--workers", "0")
    text = out.read_text()
    assert "_culled" not in text and text.count(".JPG") == 4
    # naming the folder itself still scores it
    _ok("score", "_culled", "--model", tiny_checkpoint, "--out", out, "--workers", "0")
    assert out.read_text().count(".JPG") == 2
