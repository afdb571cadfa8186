"""The score cache's pass before the workers start: with the cache on, the main process walks the
tree and asks the cache, the cached rows come out at once, and the workers decode only the files
left. The rows must be those of a run without the pass."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loda_cli.cli.main import app
from tests.imagetree import make_image_tree, synthetic_photo

runner = CliRunner()


@pytest.fixture
def tree(tmp_path):
    return make_image_tree(tmp_path / "photos")


def _by_path(rows):
    return {r.path: r for r in rows}


class _Decodes:
    """Counts the images decoded in this process (workers=0)."""

    def __init__(self, monkeypatch):
        import loda_cli.scoring as scoring

        self.paths: list[str] = []
        real = scoring.decode_image

        def counting(path, *a, **k):
            self.paths.append(os.fspath(path))
            return real(path, *a, **k)

        monkeypatch.setattr(scoring, "decode_image", counting)


class _Handed:
    """The files handed to the workers in each run (None: they walk the tree themselves)."""

    def __init__(self, monkeypatch):
        from loda_cli.scoring import Scorer

        self.pending: list = []
        real = Scorer._prepared_items

        def prepared_items(scorer, spec):
            self.pending.append(None if spec.pending is None else [os.fspath(f.path) for f, _ in spec.pending])
            return real(scorer, spec)

        monkeypatch.setattr(Scorer, "_prepared_items", prepared_items)


def test_only_the_files_the_cache_lacks_are_decoded(tree, tiny_checkpoint, monkeypatch):
    from loda_cli.scoring import Scorer

    root, ckpt = tree["root"], str(tiny_checkpoint)
    first = _by_path(Scorer(ckpt, workers=0).score_files([root]))
    new = Path(root) / "sub" / "new photo.jpg"
    new.parent.mkdir(exist_ok=True)
    synthetic_photo(42).save(new)
    decodes = _Decodes(monkeypatch)
    handed = _Handed(monkeypatch).pending
    skipped: list = []
    rows = list(Scorer(ckpt, workers=0).score_files([root], on_skip=lambda p, r: skipped.append((p, r))))
    assert decodes.paths == [str(new)]
    assert handed == [[str(new)]]  # the workers get the new file alone, and walk nothing
    handed.clear()
    again = _by_path(rows)
    assert set(again) == set(first) | {str(new)}
    assert sorted(p for p, _ in skipped) == sorted(str(p) for p in tree["skipped"])
    for path, row in first.items():
        assert again[path].cached and again[path].score == row.score and again[path].crops == row.crops, path
        assert again[path].index == row.index  # the walk's order, for the ranking's ties
    assert not again[str(new)].cached and again[str(new)].score is not None
    # The same rows as a run that asks no cache.
    fresh = _by_path(Scorer(ckpt, workers=0, cache=False).score_files([root]))
    assert handed == [None]  # without a cache the workers walk
    assert set(fresh) == set(again)
    for path, row in fresh.items():  # batched with other photos: float rounding apart
        assert (again[path].score is None) == (row.score is None) and again[path].error == row.error, path
        assert row.score is None or again[path].score == pytest.approx(row.score, abs=1e-6), path


def test_forked_scoring_workers_take_the_files_left(tree, tiny_checkpoint, monkeypatch):
    from loda_cli.scoring import Scorer, can_fork_workers

    if not can_fork_workers():
        pytest.skip("no fork here")
    root, ckpt = tree["root"], str(tiny_checkpoint)
    first = _by_path(Scorer(ckpt, workers=0).score_files([root]))
    news = []
    for i in range(5):
        news.append(Path(root) / f"new {i}.jpg")
        synthetic_photo(50 + i).save(news[-1])
    handed = _Handed(monkeypatch)
    scorer = Scorer(ckpt, workers=2, precision="fp32")
    rows = _by_path(scorer.score_files([root]))
    assert [sorted(p) for p in handed.pending] == [sorted(str(p) for p in news)]
    assert set(rows) == set(first) | {str(p) for p in news}
    assert {p for p, r in rows.items() if not r.cached} == {str(p) for p in news}
    assert scorer.times.decoded == len(news)
    alone = _by_path(Scorer(ckpt, workers=0, cache=False, precision="fp32").score_files(news))
    for p in news:
        assert rows[str(p)].score == pytest.approx(alone[str(p)].score, abs=1e-5)


def test_a_shard_takes_its_own_files_from_the_cache_and_the_workers(tree, tiny_checkpoint, monkeypatch):
    from loda_cli.scoring import Scorer

    root, ckpt = tree["root"], str(tiny_checkpoint)
    no_cache = [_by_path(Scorer(ckpt, workers=0, cache=False).score_files([root], shard=(k, 2))) for k in (0, 1)]
    assert no_cache[0] and no_cache[1] and not set(no_cache[0]) & set(no_cache[1])
    list(Scorer(ckpt, workers=0).score_files([root], shard=(0, 2)))  # shard 0 cached, shard 1 not
    decodes = _Decodes(monkeypatch)
    for k in (0, 1):
        rows = _by_path(Scorer(ckpt, workers=0).score_files([root], shard=(k, 2)))
        assert set(rows) == set(no_cache[k])
        assert all(r.cached == (k == 0) or r.error is not None and not r.cached for r in rows.values())
    # Only shard 1's files were decoded (shard 0 came from the cache), each once.
    assert decodes.paths and set(decodes.paths) <= set(no_cache[1])
    assert len(decodes.paths) == len(set(decodes.paths))
    assert {p for p, r in no_cache[1].items() if r.ok} <= set(decodes.paths)


def test_the_command_makes_the_cache_pass_once_and_says_what_is_left(tree, tiny_checkpoint, tmp_path, monkeypatch):
    import loda_cli.scoring as scoring

    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert runner.invoke(app, ["score", root, "-m", ckpt, "-q", "--workers", "0"]).exit_code == 0
    synthetic_photo(77).save(Path(root) / "new.jpg")
    calls = []
    real = scoring.split_by_cache

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(scoring, "split_by_cache", counting)
    out = tmp_path / "s.csv"
    result = runner.invoke(app, ["score", root, "-m", ckpt, "-o", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    cached = len(tree["good"]) + len(tree["bad"])
    assert f"{cached} files from the score cache; 1 file to read" in result.stderr
    assert "1 scored now" in result.stderr
    # Not a terminal: no bar, and no empty line where a transient one was taken down.
    assert "" not in result.stderr.splitlines() and "━" not in result.stderr
    # An option the cache's pass before the model does not cover: the scorer makes its own.
    calls.clear()
    result = runner.invoke(app, ["score", root, "-m", ckpt, "-q", "--workers", "0", "--crops", "2"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1


def test_a_files_key_is_the_same_with_folders_resolved_once(tmp_path, monkeypatch):
    from loda_cli.cache import FileKey

    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    photo = real / "deep" / "a.jpg"
    synthetic_photo(1).save(photo)
    (real / "x").mkdir()
    os.symlink(real, tmp_path / "linked folder")
    os.symlink(photo, tmp_path / "linked.jpg")
    os.symlink("deep/a.jpg", real / "relative link.jpg")
    os.symlink(tmp_path / "linked folder" / "deep", real / "x" / "up")  # a folder link inside
    candidates = [photo, real / "x" / ".." / "deep" / "a.jpg", tmp_path / "linked folder" / "deep" / "a.jpg",
                  tmp_path / "linked.jpg", real / "relative link.jpg", real / "x" / "up" / "a.jpg",
                  real / "x" / "up" / ".." / "deep" / "a.jpg"]
    monkeypatch.chdir(real)
    candidates += [Path("deep/a.jpg"), Path("./deep/../deep/a.jpg")]
    resolved: dict[str, str] = {}
    for path in candidates * 2:  # the second time from the folders kept
        assert FileKey.of(path, resolved) == FileKey.of(path) == FileKey.of(photo), path
    with pytest.raises(OSError):
        FileKey.of(real / "missing.jpg", resolved)


@pytest.mark.parametrize("option", [[], ["--crops", "2"]])
def test_stopped_during_the_cache_pass_the_old_output_stays(tree, tiny_checkpoint, tmp_path, monkeypatch, option):
    import loda_cli.scoring as scoring

    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert runner.invoke(app, ["score", root, "-m", ckpt, "-q", "--workers", "0"]).exit_code == 0
    out = tmp_path / "scores.csv"
    out.write_text("path,score\nkept.jpg,0.5\n")

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "split_by_cache", stopped)
    result = runner.invoke(app, ["score", root, "-m", ckpt, "-o", str(out), "--workers", "0", *option])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and isinstance(result.exception, SystemExit)
    assert out.read_text() == "path,score\nkept.jpg,0.5\n"
    if option:  # stopped inside the scoring run: it says so
        assert f"0 images done and cached; run the same command again to finish. {out} was not written." in result.stderr


def test_a_cache_from_an_older_loda_answers_after_its_upgrade(tree, tiny_checkpoint):
    """A cache of schema 1 (no looks, crop scores) read by the pass before the model, through a
    read-only connection, would miss on every row and rescore the library: the pass leaves it
    to the scorer, which brings the cache up to date first."""
    import sqlite3

    from loda_cli.cache import default_cache_path

    root, ckpt = str(tree["root"]), str(tiny_checkpoint)
    assert runner.invoke(app, ["score", root, "-m", ckpt, "-q", "--workers", "0"]).exit_code == 0
    synthetic_photo(31).save(Path(root) / "new.jpg")
    with sqlite3.connect(default_cache_path()) as db:
        for column in ("look", "taken", "camera", "crops"):
            db.execute(f"ALTER TABLE scores DROP COLUMN {column}")
        db.execute("PRAGMA user_version=1")
    result = runner.invoke(app, ["score", root, "-m", ckpt, "--workers", "0"])
    assert result.exit_code == 0, result.output
    good = len(tree["good"])
    assert f"1 scored now, {good} from cache" in result.stderr  # decoded for their looks, not rescored


def test_a_split_is_used_once(tree, tiny_checkpoint):
    from loda_cli.scoring import Scorer

    root, ckpt = tree["root"], str(tiny_checkpoint)
    scorer = Scorer(ckpt, workers=0)
    first = _by_path(scorer.score_files([root]))
    synthetic_photo(12).save(Path(root) / "new.jpg")
    split = scorer.split_by_cache([root])
    assert split is not None and len(split.pending) == 1
    assert set(_by_path(scorer.score_files([root], split=split))) == set(first) | {str(Path(root) / "new.jpg")}
    # Consumed: a second run with it makes its own pass and still gives every row.
    assert not split.done and len(_by_path(scorer.score_files([root], split=split))) == len(first) + 1


def test_the_pass_gives_way_to_the_workers_when_it_is_not_worth_it(tree, tiny_checkpoint, monkeypatch, tmp_path):
    import loda_cli.scoring as scoring
    from loda_cli.scoring import Scorer

    root, ckpt = tree["root"], str(tiny_checkpoint)
    handed = _Handed(monkeypatch)
    first = _by_path(Scorer(ckpt, workers=0).score_files([root]))
    assert handed.pending == [None]  # nothing of this model cached yet: the workers walk at once
    more = tmp_path / "more"
    more.mkdir()
    for i in range(4):
        synthetic_photo(60 + i).save(more / f"m{i}.jpg")
    monkeypatch.setattr(scoring, "GIVE_UP_PENDING", 3)
    handed.pending.clear()
    # The new folder walked first: 3 files left before the first cached one, so the pass gives up.
    rows = _by_path(Scorer(ckpt, workers=0).score_files([more, root]))
    assert handed.pending == [None] and set(rows) == set(first) | {str(p) for p in more.iterdir()}
    assert sum(not r.cached for r in rows.values()) == 4
    # With as many files cached as left, the pass is made.
    synthetic_photo(70).save(more / "m9.jpg")
    handed.pending.clear()
    rows = _by_path(Scorer(ckpt, workers=0).score_files([root, more]))
    assert handed.pending == [[str(more / "m9.jpg")]]
