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


_PLAN_SCRIPT = """
import sys, time
start = time.perf_counter()
from loda_cli.cli.main import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "timm") if m in sys.modules)
    print(f"PLAN-SECONDS {time.perf_counter() - start:.3f} HEAVY {heavy}", file=sys.stderr)
"""


def test_a_cached_cull_plan_needs_no_torch_and_takes_under_a_second(tmp_path, tiny_checkpoint):
    """Issue 16.6: once every photo is in the cache, `loda cull --below 0.4` plans without
    importing torch or timm. Target < 1 s; the bound here is generous for a loaded 2-core CI box."""
    root = _library(tmp_path / "lib")
    _ok("score", root, "--model", tiny_checkpoint, "--workers", "0", "--out", tmp_path / "s.csv")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", _PLAN_SCRIPT, "cull", str(root), "--below", "0.4", "--model",
               str(tiny_checkpoint)]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("PLAN-SECONDS"))
    print(f"\ncached `loda cull --below 0.4` plan: {line.split()[1]} s in-process, {wall:.2f} s "
          "wall with interpreter start-up")
    assert line.endswith("HEAVY []"), line  # the real guarantee: the model was never imported
    assert "score cache" in proc.stdout and "loda cull: plan (dry run)" in proc.stdout
    assert wall < 5.0
