"""`loda score` over a tree whose every photo is in the cache: the rows come from the cache
without torch or the model, and are the rows the model's path gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loda_cli.cli.main import app
from tests.imagetree import make_image_tree, synthetic_photo

runner = CliRunner()


@pytest.fixture
def tree(tmp_path):
    return make_image_tree(tmp_path / "photos")


def _score(*args: str):
    return runner.invoke(app, ["score", *args])


class _Opened:
    """Counts the Scorers built: the model's path opens one, the cache's does not."""

    def __init__(self, monkeypatch):
        import loda_cli.scoring as scoring

        self.count = 0
        real = scoring.Scorer.__init__

        def counting(scorer, *a, **k):
            self.count += 1
            real(scorer, *a, **k)

        monkeypatch.setattr(scoring.Scorer, "__init__", counting)


def test_a_rerun_takes_every_row_from_the_cache_without_the_model(tree, tiny_checkpoint, tmp_path, monkeypatch):
    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    result = _score(root, "-m", ckpt, "-o", str(first), "--workers", "0")
    assert result.exit_code == 0, result.output
    opened = _Opened(monkeypatch)
    result = _score(root, "-m", ckpt, "-o", str(second))
    assert result.exit_code == 0, result.output
    assert opened.count == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    # The same rows, errors included (a corrupt file's error is cached; an unreadable one needs
    # no model), ranked the same way, with the same crops and groups.
    assert a["rows"] == b["rows"] and len(b["rows"]) == len(tree["good"]) + len(tree["bad"])
    assert any(r["error"] for r in b["rows"]) and any(r["crops"] for r in b["rows"])
    assert b["header"]["precision"] is None and b["header"]["device"] is None
    assert b["header"]["precision_choice"] is None and b["header"]["complete"] is True
    assert a["header"]["model"] == b["header"]["model"] and a["header"]["checkpoint_sha256"] == b["header"]["checkpoint_sha256"]
    n = len(b["rows"])
    assert f"{n} files: 0 scored now" in result.stderr and "all from the cache, model tiny" in result.stderr
    # CSV and JSONL (--out -) from the cache match the model's path too.
    csv_a, csv_b = tmp_path / "a.csv", tmp_path / "b.csv"
    monkeypatch.undo()
    assert _score(root, "-m", ckpt, "-o", str(csv_a), "--crops", "3", "-q").exit_code == 0  # the model's path
    opened = _Opened(monkeypatch)
    assert _score(root, "-m", ckpt, "-o", str(csv_b), "-q").exit_code == 0
    assert opened.count == 0 and csv_a.read_text() == csv_b.read_text()
    streamed = _score(root, "-m", ckpt, "--out", "-", "-q")
    assert streamed.exit_code == 0 and opened.count == 0
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(r["path"] for r in b["rows"])
    assert all("rank" not in line for line in lines)


def test_rows_from_the_cache_equal_the_scorers(tree, tiny_checkpoint):
    from loda_cli.cache import default_cache_path
    from loda_cli.cachelookup import scores_from_cache
    from loda_cli.scoring import Scorer
    from loda_cli.weights import load_model_info

    root = str(tree["root"])
    loaded = load_model_info(str(tiny_checkpoint))
    assert loaded.model is None
    assert scores_from_cache([root], loaded, cache_path=default_cache_path()) is None  # no cache yet
    scorer = Scorer(str(tiny_checkpoint), workers=0)
    skipped: list = []
    scored = {r.path: r for r in scorer.score_files([root], on_skip=lambda p, r: skipped.append((p, r)))}
    again = Scorer(str(tiny_checkpoint), workers=0)
    from_scorer = {r.path: r for r in again.score_files([root])}
    found = scores_from_cache([root], loaded, cache_path=default_cache_path())
    assert found is not None
    rows, skips = found
    assert sorted(skips) == sorted(skipped) and len(skips) == len(tree["skipped"])
    assert {r.path for r in rows} == set(scored)
    for row in rows:
        other = from_scorer[row.path]
        assert row == other, row.path  # every field: score, mos, raw, crops, look, index, cached
        assert row.score == scored[row.path].score


def test_one_photo_not_in_the_cache_takes_the_model_path(tree, tiny_checkpoint, tmp_path, monkeypatch):
    root, ckpt = tree["root"], str(tiny_checkpoint)
    assert _score(str(root), "-m", ckpt, "-q", "--workers", "0").exit_code == 0
    new = Path(root) / "new photo.jpg"
    synthetic_photo(99).save(new)
    opened = _Opened(monkeypatch)
    out = tmp_path / "scores.json"
    result = _score(str(root), "-m", ckpt, "-o", str(out), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert opened.count == 1
    rows = json.loads(out.read_text())["rows"]
    assert str(new) in {r["path"] for r in rows} and "1 scored now" in result.stderr
    # A file changed since it was scored is not in the cache under its new size and time.
    assert _score(str(root), "-m", ckpt, "-q").exit_code == 0 and opened.count == 1
    synthetic_photo(7).save(new, quality=60)
    assert _score(str(root), "-m", ckpt, "-q").exit_code == 0 and opened.count == 2


def test_a_row_without_its_look_needs_the_model_only_when_grouping(tree, tiny_checkpoint):
    from loda_cli.cache import FileKey, ScoreCache, default_cache_path
    from loda_cli.cachelookup import scores_from_cache
    from loda_cli.weights import load_model_info

    root = str(tree["root"])
    assert _score(root, "-m", str(tiny_checkpoint), "-q", "--workers", "0").exit_code == 0
    loaded = load_model_info(str(tiny_checkpoint))
    good = sorted(tree["good"])[0]
    key, prep = FileKey.of(good), loaded.preprocess.digest()
    with ScoreCache(default_cache_path()) as cache:
        hit = cache.get(key, loaded.sha256, prep)
        from dataclasses import replace

        cache.put(key, loaded.sha256, prep, replace(hit, look=None))  # as a cache from before grouping
    assert scores_from_cache([root], loaded, cache_path=default_cache_path(), groups=True) is None
    rows, _ = scores_from_cache([root], loaded, cache_path=default_cache_path(), groups=False)
    assert str(good) in {r.path for r in rows}


@pytest.mark.parametrize("option", [["--crops", "2"], ["--shard", "0/2"], ["--no-cache"]])
def test_options_that_change_the_run_take_the_model_path(tree, tiny_checkpoint, monkeypatch, option):
    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert _score(root, "-m", ckpt, "-q", "--workers", "0").exit_code == 0
    opened = _Opened(monkeypatch)
    result = _score(root, "-m", ckpt, "-q", "--workers", "0", *option)
    assert result.exit_code == 0, result.output
    assert opened.count == 1


@pytest.mark.parametrize(
    "option, message",
    [
        (["--workers", "-1"], "--workers must be 0 or more"),
        (["--precision", "fp64"], "unknown precision 'fp64'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--decode", "gpu"], "unknown decode 'gpu'"),
    ],
)
def test_bad_options_are_refused_even_when_everything_is_cached(tree, tiny_checkpoint, option, message):
    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert _score(root, "-m", ckpt, "-q", "--workers", "0").exit_code == 0
    result = _score(root, "-m", ckpt, *option)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_cached_rerun_does_not_import_torch(tree, tiny_checkpoint, tmp_path, isolated_home):
    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert _score(root, "-m", ckpt, "-q", "--workers", "0").exit_code == 0
    out = tmp_path / "again.csv"
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['loda', 'score', {root!r}, '-m', {ckpt!r}, '-o', {str(out)!r}, '-q']\n"
        "try:\n"
        "    runpy.run_module('loda_cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    env = dict(os.environ, LODA_HOME=str(isolated_home))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    assert out.read_text().count("\n") == 1 + len(tree["good"]) + len(tree["bad"])


def test_a_damaged_cache_is_set_aside_and_the_run_goes_on(tree, tiny_checkpoint, tmp_path):
    from loda_cli.cache import default_cache_path

    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert _score(root, "-m", ckpt, "-q", "--workers", "0").exit_code == 0
    damaged = b"not a database at all" * 300
    cache = default_cache_path()
    cache.write_bytes(damaged)
    out = tmp_path / "scores.csv"
    result = _score(root, "-m", ckpt, "-o", str(out), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("is damaged") == 1 and "set aside as cache.sqlite.damaged-" in result.stderr
    asides = list(cache.parent.glob("cache.sqlite.damaged-*"))
    assert len(asides) == 1 and asides[0].read_bytes() == damaged  # renamed, never deleted
    assert out.read_text().count("\n") == 1 + len(tree["good"]) + len(tree["bad"])
    # The fresh cache works: the next run takes every row from it, and says nothing of damage.
    again = _score(root, "-m", ckpt, "-o", str(tmp_path / "again.csv"))
    assert again.exit_code == 0 and "all from the cache" in again.stderr and "is damaged" not in again.stderr
    # cull reads the cache the same way.
    cache.write_bytes(damaged)
    culled = runner.invoke(app, ["cull", root, "--below", "0.5", "--model", ckpt])
    assert culled.exit_code == 0, culled.output
    # The old cache's -wal and -shm files go with it: applied to a fresh cache they would harm it.
    asides = [a for a in cache.parent.glob("cache.sqlite.damaged-*") if not a.name.endswith(("-wal", "-shm"))]
    assert "is damaged" in culled.stderr and len(asides) == 2


def test_a_damaged_cache_is_a_miss_for_readers_and_moved_once(tmp_path):
    import threading

    from loda_cli.cache import FileKey, ScoreCache, set_aside_if_damaged

    photo = tmp_path / "a.jpg"
    synthetic_photo(1).save(photo)
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"\x00garbage" * 1000)
    with ScoreCache(path, readonly=True) as reader:
        assert reader.get(FileKey.of(photo), "m", "p") is None
    moved: list = []
    threads = [threading.Thread(target=lambda: moved.append(set_aside_if_damaged(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(m is not None for m in moved) == 1 and not path.exists()
    # A readable cache, or none at all, is left where it is.
    with ScoreCache(path) as writer:
        assert writer.set_aside is None and writer.count() == 0
    assert set_aside_if_damaged(path) is None and path.is_file()
    assert set_aside_if_damaged(tmp_path / "missing.sqlite") is None


def test_a_cache_damaged_during_a_run_stops_caching_not_the_run(tmp_path):
    import sqlite3

    from loda_cli.cache import CachedResult, FileKey, ScoreCache

    photo = tmp_path / "a.jpg"
    synthetic_photo(1).save(photo)

    class Damaged:
        """A connection whose file went bad after it opened."""

        closed = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def executemany(self, *a):
            raise sqlite3.DatabaseError("database disk image is malformed")

        def close(self):
            self.closed = True

    writer = ScoreCache(tmp_path / "cache.sqlite")
    real, writer._conn = writer._conn, Damaged()
    writer.put(FileKey.of(photo), "m", "p", CachedResult(0.5, 8, 8, "JPEG", None))
    writer.flush()  # no exception: the run goes on without the cache
    assert writer._conn is None and writer._pending == []
    writer.put(FileKey.of(photo), "m", "p", CachedResult(0.5, 8, 8, "JPEG", None))
    writer.close()
    real.close()
    # A lock or a full disk is not damage: it still reaches the caller.
    writer = ScoreCache(tmp_path / "other.sqlite")
    real = writer._conn

    class Locked(Damaged):
        def executemany(self, *a):
            raise sqlite3.OperationalError("database is locked")

    writer._conn = Locked()
    writer.put(FileKey.of(photo), "m", "p", CachedResult(0.5, 8, 8, "JPEG", None))
    with pytest.raises(sqlite3.OperationalError):
        writer.flush()
    writer._conn = real
    writer._pending.clear()
    writer.close()


def test_a_crops_score_is_the_same_scored_now_and_read_from_the_cache():
    """A crop's raw was kept in the cache to 6 digits while the first run used all of them: a
    score at the edge of its 4th digit read one way in the first run and the other in every
    rerun (0.68 and 0.6799 on a 12 MP photo)."""
    from loda_cli.cache import CROP_RAW_DIGITS, _crops_of, _crops_text
    from loda_cli.scoring import finished_row
    from loda_cli.weights import Calibration

    calibration = Calibration("none", [], 0.0, 1.0, False)  # score = (raw + 1) / 2
    raw = 0.5155002293328734  # scores 0.7578 from the full raw, 0.7577 from its 6 digits
    assert round((raw + 1) / 2, 4) != round((round(raw, 6) + 1) / 2, 4)
    item = {"index": 0, "path": "a.jpg", "root": ".", "width": 1000, "height": 800,
            "boxes": [(0.1, 0.1, 0.5, 0.5)]}
    fresh, placed = finished_row(item, raw, calibration, [raw])
    assert placed[0][4] == round(raw, CROP_RAW_DIGITS)
    cached_item = {"index": 0, "path": "a.jpg", "root": ".", "width": 1000, "height": 800, "cached": True}
    cached, _ = finished_row(cached_item, raw, calibration, _crops_of(_crops_text(placed)))
    assert fresh.crops == cached.crops == [[100, 80, 500, 400, round((round(raw, 6) + 1) / 2, 4)]]


class _CropReads:
    """Counts the cached rows whose crop scores were decoded."""

    def __init__(self, monkeypatch):
        import loda_cli.cache as cache

        self.count = 0
        real = cache._crops_of

        def counting(text):
            self.count += 1
            return real(text)

        monkeypatch.setattr(cache, "_crops_of", counting)


def test_crop_scores_are_read_from_the_cache_only_for_outputs_that_write_them(tree, tiny_checkpoint, tmp_path,
                                                                              monkeypatch):
    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    first = tmp_path / "first.json"
    assert _score(root, "-m", ckpt, "-o", str(first), "--workers", "0", "-q").exit_code == 0
    reads = _CropReads(monkeypatch)
    assert _score(root, "-m", ckpt, "-o", str(tmp_path / "a.csv"), "-q").exit_code == 0
    assert _score(root, "-m", ckpt, "-q").exit_code == 0  # the listing on stdout
    assert reads.count == 0
    second = tmp_path / "second.json"
    assert _score(root, "-m", ckpt, "-o", str(second), "-q").exit_code == 0
    rows = json.loads(second.read_text())["rows"]
    assert reads.count == len(rows) and rows == json.loads(first.read_text())["rows"]
    reads.count = 0
    plan = runner.invoke(app, ["cull", root, "--below", "0.9", "--model", ckpt])
    assert plan.exit_code == 0, plan.output
    assert "Dry run" in plan.output and reads.count == 0


def test_a_row_decoded_again_for_its_look_keeps_its_crop_scores_in_a_csv_run(tree, tiny_checkpoint, tmp_path):
    from dataclasses import replace

    from loda_cli.cache import FileKey, ScoreCache, default_cache_path
    from loda_cli.weights import load_model_info

    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert _score(root, "-m", ckpt, "-q", "--workers", "0", "--no-groups").exit_code == 0
    loaded = load_model_info(ckpt)
    good = sorted(tree["good"])[0]
    key, prep = FileKey.of(good), loaded.preprocess.digest()
    with ScoreCache(default_cache_path()) as cache:
        hit = cache.get(key, loaded.sha256, prep)
        assert hit.crops and hit.look is None  # scored without grouping: crop scores, no look
    result = _score(root, "-m", ckpt, "-o", str(tmp_path / "grouped.csv"), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "0 scored now" in result.stderr  # each row decoded again for its look only
    with ScoreCache(default_cache_path(), readonly=True) as cache:
        again = cache.get(key, loaded.sha256, prep)
    assert again.look is not None and again.crops == hit.crops
    assert replace(again, look=None, taken=None, camera=None) == replace(hit, taken=None, camera=None)
