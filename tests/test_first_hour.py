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
    said = _ok("score", ".", "--model", tiny_checkpoint, "--out", out, "--workers", "0")
    text = out.read_text()
    assert "_culled" not in text and text.count(".JPG") == 4
    # ... and says so, rather than leaving the photos unaccounted for
    assert "not scored: loda's own folder _culled" in " ".join(said.split())
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


def test_a_bad_out_folder_is_refused_before_any_scoring(tmp_path, tiny_checkpoint, monkeypatch):
    """Issue 16.7: exit 2 with one line, and no photo is decoded first."""
    root = _library(tmp_path / "lib")
    import loda_cli.scoring as scoring

    def never(*a, **k):
        raise AssertionError("scored before checking --out")

    monkeypatch.setattr(scoring.Scorer, "__init__", never)
    (tmp_path / "folder.csv").mkdir()
    for out in (tmp_path / "missing" / "dir" / "x.csv", tmp_path / "folder.csv"):
        result = runner.invoke(app, ["score", str(root), "--model", str(tiny_checkpoint), "--no-cache",
                                     "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "cannot write" in result.output and len(result.output.strip().splitlines()) == 1


def test_summary_counts_add_up_pluralise_and_rate_only_the_work_done(tmp_path, tiny_checkpoint):
    """Issue 16.8: scored now + from cache + failed = files found."""
    from loda_cli.cli.score import summary_counts
    from types import SimpleNamespace as Row

    rows = [Row(error=None, score=0.5, cached=True)] * 61 + [Row(error="truncated image", score=None, cached=True)] * 4
    assert summary_counts(rows, 0.1) == "65 files: 0 scored now, 61 from cache, 4 failed in 0.1 s"
    one = summary_counts([Row(error=None, score=0.5, cached=False)], 2.0)
    assert one == "1 file: 1 scored now, 0 failed in 2.0 s (0.50 img/s for the 1 file read now)"

    root = _library(tmp_path / "lib")
    first = runner.invoke(app, ["score", str(root), "--model", str(tiny_checkpoint), "--workers", "0"])
    assert "8 files: 6 scored now, 2 failed" in first.stderr, first.stderr
    again = runner.invoke(app, ["score", str(root), "--model", str(tiny_checkpoint), "--workers", "0"])
    assert "8 files: 0 scored now, 6 from cache, 2 failed" in again.stderr and "img/s" not in again.stderr
    if hasattr(os, "symlink"):
        # A folder of links to favourites: scored once, under the real paths, and not called a problem.
        (root / "favourites").mkdir()
        for i in (1, 4):
            os.symlink(next(root.rglob(f"IMG_{i}.JPG")), root / "favourites" / f"fav_{i}.JPG")
        linked = runner.invoke(app, ["score", str(root), "--model", str(tiny_checkpoint), "--workers", "0"])
        assert "8 files: 0 scored now, 6 from cache, 2 failed" in linked.stderr, linked.stderr
        assert "2 links to photos scored under their real paths, not again" in linked.stderr
        assert "skipped" not in linked.stderr


def test_stderr_to_a_log_is_not_wrapped_and_paths_are_never_cut(tmp_path, tiny_checkpoint):
    """Issue 16.9: no wrapping when stderr is not a terminal; no path loses its tail."""
    from loda_cli.cli.common import middle_ellipsis

    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / ("and-another-one-" * 4)
    deep.mkdir(parents=True)
    Image.effect_noise((64, 48), 30).convert("RGB").save(deep / "IMG_0001_with_a_long_name.jpg")
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="80")
    proc = subprocess.run([sys.executable, "-m", "loda_cli", "score", str(deep), "--model", str(tiny_checkpoint),
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(deep / "IMG_0001_with_a_long_name.jpg") in proc.stderr  # whole, on one line
    assert "…" not in proc.stderr
    cut = middle_ellipsis("/home/me/Photos/2024/wedding/IMG_0001.jpg", 24)
    assert len(cut) == 24 and cut.endswith("IMG_0001.jpg") and cut.startswith("/home/")


def test_streamed_rows_carry_no_rank_and_mos_is_empty_without_a_dataset_scale(tmp_path, tiny_checkpoint):
    """Issue 16.14 and 16.15."""
    import json

    from loda_cli.output import mos_is_meaningful
    from loda_cli.weights import Calibration

    root = _library(tmp_path / "lib")
    result = runner.invoke(app, ["score", str(root), "--model", str(tiny_checkpoint), "--workers", "0", "--out", "-"])
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows and all("rank" not in r for r in rows)
    assert any(r["mos"] is not None for r in rows)  # the tiny checkpoint has a 1-5 scale
    assert not mos_is_meaningful(Calibration("logistic4", [1, 0, 0, 1], 0.0, 1.0, False),
                                 {"dataset": {"name": "synthetic", "scale": [0.0, 1.0]}})
    assert not mos_is_meaningful(Calibration(), {"dataset": {}})
    assert mos_is_meaningful(Calibration("none", [], 1.0, 5.0, False), {"dataset": {"scale": [1, 5]}})
    # the built-in model predicts LIVE Challenge's 0-100 opinion scores: mos is that, score / 100
    out = tmp_path / "b.csv"
    _ok("score", root / "day1", "--workers", "0", "--out", out)
    import csv

    rows = [r for r in csv.DictReader(out.open()) if r["score"]]
    assert rows and all(min(100.0, max(0.0, float(r["mos"]))) == pytest.approx(100 * float(r["score"]), abs=0.01)
                        for r in rows)


def test_canon_hif_is_scored_and_unknown_image_extensions_are_counted(tmp_path, tiny_checkpoint):
    """Issue 16.17."""
    from loda_cli.images import iter_image_files

    pillow_heif = pytest.importorskip("pillow_heif")
    root = tmp_path / "card"
    root.mkdir()
    pillow_heif.register_heif_opener()
    Image.effect_noise((64, 48), 30).convert("RGB").save(root / "IMG_0001.HIF", format="HEIF")
    for name in ("a.jxl", "b.jxl", "c.psd", "notes.txt"):
        (root / name).write_bytes(b"x")
    assert [f.path.name for f in iter_image_files(root)] == ["IMG_0001.HIF"]
    result = runner.invoke(app, ["score", str(root), "--model", str(tiny_checkpoint), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "IMG_0001.HIF" in result.stdout and "error" not in result.stdout
    assert "3 files skipped: image formats loda does not read: .jxl (2), .psd (1)" in result.stderr


def test_readme_names_only_models_that_exist_or_says_where_they_come_from():
    """Issue 16.16: every model a README example names is the built-in one, or is marked as what
    `loda train` makes. Issue 16.18: the CPU-only install note is there."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for line in readme.splitlines():
        for name in re.findall(r"(?:--model|weights info|Scorer\()\s*\"?([A-Za-z][\w.-]*)(?![\w./-])", line):
            if name in ("NAME", "FILE", "loda-builtin") or "/" in name:
                continue
            assert "loda train" in line, f"README names model {name!r} without saying where it comes from: {line}"
    assert "CPU-only machines" in readme and "download.pytorch.org/whl/cpu" in readme


def test_cull_undo_sort_undo_rate_undo_leaves_the_library_byte_identical(tmp_path, tiny_checkpoint, monkeypatch):
    """Issue 16 acceptance: the whole cycle leaves every byte, every name and no extra folder."""
    root = _library(tmp_path / "lib")
    sorted_dir = tmp_path / "Sorted"
    monkeypatch.chdir(root)
    before = snapshot(root, skip_loda=False)
    _ok("score", ".", "--model", tiny_checkpoint, "--workers", "0")

    _ok("cull", "--worst", "3", "--include-failed", "--model", tiny_checkpoint, "--apply")
    assert (root / "_culled").is_dir()
    _ok("undo")
    assert snapshot(root, skip_loda=False) == before

    _ok("sort", "--into", sorted_dir, "--model", tiny_checkpoint, "--quantiles", "--move", "--apply")
    assert snapshot(root, skip_loda=False) != before
    _ok("undo")
    assert snapshot(root, skip_loda=False) == before and not sorted_dir.exists()

    _ok("rate", "--model", tiny_checkpoint, "--quantiles", "--label", "Red", "--apply")
    assert (root / "day1" / "IMG_1.JPG.xmp").exists() and (root / "day2" / "IMG_5.xmp").read_bytes() != before[b"day2/IMG_5.xmp"][1]
    _ok("undo")
    assert snapshot(root, skip_loda=False) == before
    assert "Nothing left to undo" in _ok("undo")


def test_a_narrow_terminal_cuts_a_paths_middle_never_folds_its_file_name():
    """A plan's path columns in a 50- or 70-column terminal: each path on one line, its file name
    whole while there is room for it."""
    import io

    from rich.console import Console
    from rich.table import Table

    from loda_cli.cli.common import PathCell

    paths = ["library/2024/a rather long trip folder/58.png", "library/2024/trip/IMG_2043.JPG", "p1.jpg"]
    for width in (50, 70):
        console = Console(file=io.StringIO(), width=width, force_terminal=False)
        table = Table()
        table.add_column("score")
        table.add_column("file", overflow="fold")
        table.add_column("why")
        table.add_column("to", overflow="fold")
        for path in paths:
            table.add_row("0.123", PathCell(path, " (truncated image)" if path == "p1.jpg" else ""),
                          "below 0.4", PathCell("library/_culled/" + path.split("/", 1)[-1]))
        console.print(table)
        rows = [line for line in console.file.getvalue().splitlines() if "0.123" in line]
        assert len(rows) == 3  # one line per photo: nothing folded onto a second line
        assert max(len(line) for line in rows) <= width
        text = console.file.getvalue()
        if width == 70:
            assert "/58.png" in text and "/IMG_2043.JPG" in text and "p1.jpg (truncated" in text


def test_an_interrupted_run_without_the_cache_does_not_promise_a_quick_rerun(capsys):
    from loda_cli.cli.score import _report_interrupted

    _report_interrupted([object()] * 9, None, cached=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "9 images done, not cached (--no-cache); a rerun scores every file again" in err
    assert "cached;" not in err
    _report_interrupted([object()] * 9, None, cached=True)
    assert "9 images done and cached; run the same command again to finish" in " ".join(capsys.readouterr().err.split())


def test_a_folder_without_photos_fails_before_the_model_loads(tmp_path, monkeypatch):
    """Seconds of torch and model loading only to say there is nothing to score; also when
    every photo sits in loda's own folders, which the error names."""
    from loda_cli.cli import score as score_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(score_cli, "_open_scorer", no_model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    result = runner.invoke(app, ["score", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no image files found" in result.output, result.output
    culled = tmp_path / "lib" / "_culled"
    culled.mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(culled / "IMG_1.jpg")
    result = runner.invoke(app, ["score", str(tmp_path / "lib")])
    assert result.exit_code == 1 and "no image files found" in result.output
    assert "not scored: loda's own folder" in result.output and "_culled" in result.output
