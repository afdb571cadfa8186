"""Scoring under hostile conditions: signals, SIGKILL, a shared cache, a full disk, odd names,
degenerate images, slow decoders.

Test hook: ``LODA_TEST_DECODE_DELAY=<seconds>`` makes the scorer sleep before each decode, so a
real subprocess can be interrupted in the middle of a run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli.cli.main import app

runner = CliRunner()
N_PHOTOS = 24


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_PHOTOS):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.jpg")
    return folder


def _cache_rows(home: Path) -> int:
    db = home / "cache.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _default_sigint():
    # A shell starts background jobs with SIGINT ignored, and children inherit that; a user's
    # Ctrl-C reaches a foreground `loda score`, so the test restores the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_score(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "loda_cli", "score", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for_cache(home: Path, proc, at_least: int = 3, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit  # a hang guard, not a performance threshold
    while _cache_rows(home) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "scoring never started"
        time.sleep(0.1)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_leaves_valid_partial_output_and_rerun_completes(photos, tiny_checkpoint, isolated_home, tmp_path, sig):
    out = tmp_path / "scores.csv"
    # One image per forward pass, so rows (and cache commits) arrive steadily, not in bursts.
    proc = _start_score([str(photos), "-m", str(tiny_checkpoint), "-o", str(out), "--batch-size", "3"],
                        {"LODA_TEST_DECODE_DELAY": "0.5"})
    _wait_for_cache(isolated_home, proc, at_least=1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    partial = _read_csv(out)
    assert 0 < len(partial) < N_PHOTOS
    assert all(r["score"] for r in partial)
    result = runner.invoke(app, ["score", str(photos), "-m", str(tiny_checkpoint), "-o", str(out), "-q"])
    assert result.exit_code == 0
    full = _read_csv(out)
    assert sorted(r["path"] for r in full) == sorted(str(p) for p in photos.iterdir())


def test_sigkill_leaves_the_cache_consistent(photos, tiny_checkpoint, isolated_home, tmp_path):
    proc = _start_score([str(photos), "-m", str(tiny_checkpoint), "-o", str(tmp_path / "s.csv")],
                        {"LODA_TEST_DECODE_DELAY": "0.25"})
    _wait_for_cache(isolated_home, proc)
    proc.kill()
    proc.communicate(timeout=60)
    with sqlite3.connect(isolated_home / "cache.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done = _cache_rows(isolated_home)
    assert 0 < done < N_PHOTOS
    out = tmp_path / "rerun.jsonl"
    result = runner.invoke(app, ["score", str(photos), "-m", str(tiny_checkpoint), "-o", str(out), "-q"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == N_PHOTOS == len({r["path"] for r in rows})
    assert _cache_rows(isolated_home) == N_PHOTOS


def test_two_processes_share_one_cache(photos, tiny_checkpoint, isolated_home, tmp_path):
    procs = [
        _start_score([str(photos), "-m", str(tiny_checkpoint), "-o", str(tmp_path / f"s{i}.csv"), "-q"],
                     {"LODA_TEST_DECODE_DELAY": "0.02"})
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "locked" not in err
    a, b = (_read_csv(tmp_path / f"s{i}.csv") for i in range(2))
    assert len(a) == len(b) == N_PHOTOS
    assert {r["path"]: r["score"] for r in a} == {r["path"]: r["score"] for r in b}
    assert _cache_rows(isolated_home) == N_PHOTOS


def test_full_disk_keeps_the_previous_output(photos, tiny_checkpoint, tmp_path):
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(photos), "-m", str(tiny_checkpoint), "-o", str(out), "-q"])
    assert result.exit_code == 0
    before = out.read_bytes()
    # A file-size limit of 200 bytes makes the next output write fail like a full disk would.
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))\n"
        "from loda_cli.cli.main import main\n"
        f"sys.argv = ['loda', 'score', {str(photos)!r}, '-m', {str(tiny_checkpoint)!r}, '-o', {str(out)!r}, '-q', '--no-cache']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    assert "cannot write" in proc.stderr and "previous file is unchanged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == before
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_odd_file_names_survive_csv_and_json(tmp_path, tiny_checkpoint):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["new\nline.jpg", "com,ma.jpg", 'quo"te.jpg', "-dash.jpg", "tab\tand space.jpg",
             os.fsdecode(b"latin\xe9-\xff.jpg")]
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name, "JPEG")
    expected = sorted(os.fsencode(folder / n) for n in names)
    for suffix in ("csv", "json", "jsonl"):
        out = tmp_path / f"odd.{suffix}"
        result = runner.invoke(app, ["score", str(folder), "-m", str(tiny_checkpoint), "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        if suffix == "csv":
            rows = _read_csv(out)
        elif suffix == "json":
            rows = json.loads(out.read_text())["rows"]
        else:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(os.fsencode(r["path"]) for r in rows) == expected
        assert all(os.path.exists(os.fsencode(r["path"])) for r in rows)
    # The plain listing on stdout keeps the bytes too.
    result = runner.invoke(app, ["score", str(folder), "-m", str(tiny_checkpoint), "-q"])
    assert result.exit_code == 0 and b"latin\xe9-\xff.jpg" in result.stdout_bytes


def test_degenerate_sizes(tmp_path, tiny_checkpoint):
    from loda_cli.scoring import Scorer

    folder = tmp_path / "sizes"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one.png")
    Image.new("RGB", (3, 2), (10, 200, 10)).save(folder / "tiny.png")
    Image.new("RGB", (1, 3000), (10, 10, 200)).save(folder / "strip.png")
    Image.new("RGB", (20, 300), (10, 10, 200)).save(folder / "tall.png")
    rows = {Path(r.path).name: r for r in Scorer(str(tiny_checkpoint), workers=0, cache=False).score_files([folder])}
    for name in ("one.png", "tiny.png", "tall.png"):
        assert rows[name].error is None and 0.0 <= rows[name].score <= 1.0
    assert rows["strip.png"].error.startswith("aspect ratio too extreme")


def test_slow_decode_becomes_an_error_row_and_the_run_continues(photos, tiny_checkpoint, monkeypatch):
    import loda_cli.scoring as scoring
    from loda_cli.scoring import Scorer

    real = scoring.decode_image

    def sometimes_hangs(path, **kw):
        if Path(path).name == "p03.jpg":
            time.sleep(30)
        return real(path, **kw)

    monkeypatch.setattr(scoring, "decode_image", sometimes_hangs)
    start = time.monotonic()
    rows = list(Scorer(str(tiny_checkpoint), workers=0, cache=False, decode_timeout=0.5).score_files([photos]))
    assert time.monotonic() - start < 25  # the hung file did not hold the run
    bad = [r for r in rows if r.error]
    assert [Path(r.path).name for r in bad] == ["p03.jpg"]
    assert "longer than 0.5 s" in bad[0].error
    assert len(rows) == N_PHOTOS


def test_running_out_of_memory_is_not_remembered_by_the_cache(photos, tiny_checkpoint, tmp_path, monkeypatch):
    """A decoder that runs out of memory (another program hogging RAM) fails that file for this
    run only: the cache keeps no error for it, so the next run scores it."""
    import loda_cli.images as images
    from loda_cli.scoring import Scorer

    real = images._decode_opened
    monkeypatch.setattr(images, "_decode_opened", lambda im, target: (_ for _ in ()).throw(MemoryError))
    cache = tmp_path / "cache.sqlite"
    first = list(Scorer(str(tiny_checkpoint), workers=0, cache=cache).score_files([photos / "p05.jpg"]))
    assert first[0].error == "out of memory decoding image"
    monkeypatch.setattr(images, "_decode_opened", real)
    again = list(Scorer(str(tiny_checkpoint), workers=0, cache=cache).score_files([photos / "p05.jpg"]))
    assert again[0].error is None and not again[0].cached and again[0].score is not None


def test_an_extreme_strip_is_refused_from_its_header(tmp_path, tiny_checkpoint, monkeypatch):
    """A 16-bit 60000x4 TIFF strip is refused before its pixels are decoded and converted."""
    import loda_cli.images as images
    from loda_cli.scoring import Scorer

    folder = tmp_path / "strips"
    folder.mkdir()
    Image.fromarray(np.full((4, 60000), 30000, dtype=np.uint16)).save(folder / "strip.tif")
    Image.new("RGB", (40, 30), (90, 120, 150)).save(folder / "fine.png")
    decoded = []
    real = images._decode_opened
    monkeypatch.setattr(images, "_decode_opened", lambda im, t: decoded.append(im.size) or real(im, t))
    rows = {Path(r.path).name: r for r in Scorer(str(tiny_checkpoint), workers=0, cache=False).score_files([folder])}
    assert rows["strip.tif"].error == "aspect ratio too extreme to score (60000x4)"
    assert rows["fine.png"].error is None
    assert decoded == [(40, 30)]


def test_c_decoder_messages_go_to_the_row_not_the_terminal(tmp_path, tiny_checkpoint, capfd):
    """libtiff prints straight to file descriptor 2; in worker processes that lands in the row."""
    from loda_cli.scoring import Scorer

    folder = tmp_path / "tiffs"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "good.tif", compression="tiff_lzw")
    data = (folder / "good.tif").read_bytes()
    (folder / "broken.tif").write_bytes(data[: len(data) // 2] + b"\0" * 100 + data[len(data) // 2 + 100 :])
    capfd.readouterr()
    rows = {Path(r.path).name: r for r in Scorer(str(tiny_checkpoint), workers=1, cache=False).score_files([folder])}
    err = capfd.readouterr().err
    assert "LZWDecode" not in err
    assert rows["good.tif"].error is None
    assert rows["broken.tif"].error.startswith("corrupt image") and "LZWDecode" in rows["broken.tif"].error
    assert any("LZWDecode" in w for w in rows["broken.tif"].warnings)
