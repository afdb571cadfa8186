"""`loda score` and the Scorer: every file accounted for, ranking, cache, resume, shards, crops."""

from __future__ import annotations

import csv
import io
import os
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli.cli.main import app
from loda_cli.config import Preprocess
from loda_cli.transforms import grid_positions
from tests.imagetree import make_image_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("photos"))


def _scorer(checkpoint, **kw):
    from loda_cli.scoring import Scorer

    kw.setdefault("workers", 0)
    return Scorer(str(checkpoint), **kw)


def test_grid_layout_covers_the_image_deterministically():
    for h, w, n in [(384, 576, 15), (576, 384, 15), (384, 384, 5), (384, 3000, 15), (384, 512, 1), (224, 224, 3)]:
        pos = grid_positions(h, w, 224, n)
        assert len(pos) == n and pos == grid_positions(h, w, 224, n)
        assert all(0 <= t <= h - 224 and 0 <= left <= w - 224 for t, left in pos)
        if n >= 4:
            covered = np.zeros((h, w), bool)
            for t, left in pos:
                covered[t : t + 224, left : left + 224] = True
            assert covered.mean() > (0.9 if w < 2000 else 0.5)
    assert grid_positions(384, 576, 224, 1) == [(80, 176)]


def test_detail_layouts_place_the_crops_where_their_names_say():
    from loda_cli.transforms import detail_positions

    grid = Preprocess(num_crops=9, detail_short_side=1500, detail_crops=4, detail_weight=0.5)
    # "grid", what checkpoints without a layout get: the 4 corners of the view.
    assert detail_positions(1500, 2250, grid) == [(0, 0), (0, 2026), (1276, 0), (1276, 2026)]
    centre = replace(grid, detail_layout="centre", detail_crops=5)
    places = detail_positions(1500, 2250, centre)
    assert places[0] == (638, 1013)  # the centre, then the centres of a 2 x 2 grid's cells
    assert places[1:] == [(263, 450), (263, 1576), (1013, 450), (1013, 1576)]
    for h, w, n in [(1500, 2250, 1), (224, 224, 5), (500, 500, 4), (1500, 9000, 7), (300, 240, 3)]:
        places = detail_positions(h, w, replace(centre, detail_crops=n))
        assert len(places) == n and places[0] == ((h - 224) // 2, (w - 224) // 2)
        assert all(0 <= t <= h - 224 and 0 <= left <= w - 224 for t, left in places)
    # Old checkpoints read back as "grid", and "grid" is not written: their cache keys stay.
    assert "detail_layout" not in grid.to_dict() and Preprocess.from_dict(grid.to_dict()) == grid
    assert centre.to_dict()["detail_layout"] == "centre" and Preprocess.from_dict(centre.to_dict()) == centre
    assert grid.digest() != replace(grid, detail_layout="centre").digest()
    with pytest.raises(ValueError, match="layout"):
        replace(grid, detail_layout="corners")


def test_score_cli_accounts_for_every_file(tree, tiny_checkpoint, tmp_path):
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(tree["root"]), "--model", str(tiny_checkpoint), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    # the first nine columns as before; the group columns were added at the end (issue 19)
    assert list(rows[0]) == ["rank", "path", "score", "mos", "raw", "width", "height", "format", "error",
                             "group", "rank_in_group"]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))
    expected = {str(p) for p in tree["good"]} | {str(p) for p in tree["bad"]}
    assert set(paths) == expected
    by_path = {r["path"]: r for r in rows}
    for path, reason in tree["bad"].items():
        assert by_path[str(path)]["error"].startswith(reason), (path, by_path[str(path)]["error"])
        assert by_path[str(path)]["score"] == ""
    for path, (w, h) in tree["good"].items():
        row = by_path[str(path)]
        assert row["error"] == "" and (int(row["width"]), int(row["height"])) == (w, h)
    scores = [float(r["score"]) for r in rows if r["score"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores)
    n_good = len(tree["good"])
    assert [r["rank"] for r in rows[:n_good]] == [str(i) for i in range(1, n_good + 1)]
    assert all(r["error"] for r in rows[n_good:])
    assert "failed" in result.stderr


def test_a_run_that_scores_nothing_writes_its_rows_and_exits_1(tree, tiny_checkpoint, tmp_path):
    """`loda score broken.jpg && ...` must not go on; a run with a good photo among bad ones does."""
    bad = sorted(tree["bad"])
    out = tmp_path / "bad.csv"
    result = runner.invoke(app, ["score", *map(str, bad), "-m", str(tiny_checkpoint), "-o", str(out), "--workers", "0"])
    assert result.exit_code == 1 and "error: no file could be scored" in result.stderr
    assert len(list(csv.DictReader(out.open(newline="", encoding="utf-8")))) == len(bad)
    good = sorted(tree["good"])[0]
    mixed = runner.invoke(app, ["score", str(good), *map(str, bad), "-m", str(tiny_checkpoint), "-o", str(out),
                                "--workers", "0"])
    assert mixed.exit_code == 0, mixed.output


def test_ctrl_c_while_the_model_loads_says_nothing_was_written(tree, tiny_checkpoint, tmp_path, monkeypatch):
    import loda_cli.cli.score as score_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_cli, "_open_scorer", interrupted)
    out = tmp_path / "s.csv"
    result = runner.invoke(app, ["score", str(tree["root"]), "-m", str(tiny_checkpoint), "-o", str(out), "--no-cache"])
    assert result.exit_code == 130 and "before any photo was scored" in result.stderr and "was not written" in result.stderr
    assert not out.exists()


def test_json_and_jsonl_outputs_parse(tree, tiny_checkpoint, tmp_path):
    out = tmp_path / "scores.json"
    result = runner.invoke(app, ["score", str(tree["root"]), "-m", str(tiny_checkpoint), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["header"]["model"] == "tiny" and len(doc["header"]["checkpoint_sha256"]) == 64
    assert doc["header"]["preprocess"]["num_crops"] == 3
    assert len(doc["rows"]) == len(tree["good"]) + len(tree["bad"])
    # A row a line, its crops on it, after the indented header: a text tool finds a photo's row.
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[1] == ' "header": {' and text.endswith("\n ]\n}\n")
    first = lines.index(' "rows": [') + 1
    assert [json.loads(line.rstrip(",")) for line in lines[first:first + len(doc["rows"])]] == doc["rows"]
    result = runner.invoke(app, ["score", str(tree["root"]), "-m", str(tiny_checkpoint), "--out", "-"])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(doc["rows"])
    assert "scoring" not in result.stdout and "files:" in result.stderr


def test_same_file_same_score_across_workers_and_runs(tree, tiny_checkpoint):
    # fp32: --precision auto times each layout with its own thread count and may choose
    # differently (within its 0.005 agreement).
    kw = dict(cache=False, precision="fp32")
    a = {r.path: r.raw for r in _scorer(tiny_checkpoint, **kw).score_files([tree["root"]])}
    b = {r.path: r.raw for r in _scorer(tiny_checkpoint, **kw, workers=1).score_files([tree["root"]])}
    c = {r.path: r.raw for r in _scorer(tiny_checkpoint, **kw, batch_size=5).score_files([tree["root"]])}
    # With a worker, it also scores (on the CPU), one image's crops at a time on one thread: the
    # same arithmetic up to float rounding.
    assert a.keys() == b.keys() and all((a[k] is None) == (b[k] is None) for k in a)
    assert all(abs((a[k] or 0) - (b[k] or 0)) < 1e-6 for k in a)
    assert all(abs((a[k] or 0) - (c[k] or 0)) < 1e-3 for k in a)
    again = {r.path: r.raw for r in _scorer(tiny_checkpoint, **kw, workers=1).score_files([tree["root"]])}
    assert again == b


def test_second_run_decodes_nothing(tree, tiny_checkpoint, monkeypatch):
    import loda_cli.scoring as scoring

    calls = []
    real = scoring.decode_image
    monkeypatch.setattr(scoring, "decode_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = list(_scorer(tiny_checkpoint).score_files([tree["root"]]))
    assert len(calls) == len(first)
    calls.clear()
    scorer = _scorer(tiny_checkpoint)
    second = list(scorer.score_files([tree["root"]]))
    assert calls == [] and scorer.times.decoded == 0 and scorer.times.cached == len(first)
    assert {r.path: r.score for r in first} == {r.path: r.score for r in second}
    # A changed file is decoded again.
    good = sorted(tree["good"])[0]
    Image.open(good).save(good)
    list(_scorer(tiny_checkpoint).score_files([tree["root"]]))
    assert len(calls) == 1


def test_interrupted_run_resumes_without_duplicates(tree, tiny_checkpoint):
    gen = _scorer(tiny_checkpoint).score_files([tree["root"]])
    partial = [next(gen) for _ in range(4)]
    gen.close()  # what Ctrl-C does: the cache keeps what is done
    scorer = _scorer(tiny_checkpoint)
    full = list(scorer.score_files([tree["root"]]))
    assert scorer.times.cached >= len(partial)
    paths = [r.path for r in full]
    assert len(paths) == len(set(paths)) == len(tree["good"]) + len(tree["bad"])


def test_shards_partition_the_files(tree, tiny_checkpoint):
    whole = {r.path for r in _scorer(tiny_checkpoint, cache=False).score_files([tree["root"]])}
    parts = [{r.path for r in _scorer(tiny_checkpoint, cache=False).score_files([tree["root"]], shard=(k, 3))} for k in range(3)]
    assert set().union(*parts) == whole
    assert sum(len(p) for p in parts) == len(whole)
    assert all(parts)


def test_shard_option_and_errors(tree, tiny_checkpoint, tmp_path):
    out = tmp_path / "s.jsonl"
    r = runner.invoke(app, ["score", str(tree["root"]), "-m", str(tiny_checkpoint), "--shard", "1/2", "-o", str(out), "-q"])
    assert r.exit_code == 0
    assert 0 < len(out.read_text().splitlines()) < len(tree["good"]) + len(tree["bad"])
    for bad in (["--shard", "2/2"], ["--shard", "x"], ["--crops", "0"], ["--device", "tpu"], ["--out", "s.txt"]):
        r = runner.invoke(app, ["score", str(tree["root"]), "-m", str(tiny_checkpoint), *bad])
        assert r.exit_code == 2 and r.output.count("\n") <= 2 and "Traceback" not in r.output, (bad, r.output)


def test_bad_invocations_are_one_line_errors(tmp_path, tiny_checkpoint):
    r = runner.invoke(app, ["score", str(tmp_path / "missing"), "-m", str(tiny_checkpoint)])
    assert r.exit_code == 2 and "no such file" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["score", str(tmp_path / "empty"), "-m", str(tiny_checkpoint)])
    assert r.exit_code == 1 and "no image files found" in r.output
    r = runner.invoke(app, ["score", str(tmp_path), "-m", "no-such-model"])
    assert r.exit_code == 2 and "unknown model" in r.output


def test_crops_option_changes_the_layout(tree, tiny_checkpoint):
    scorer = _scorer(tiny_checkpoint, crops=1, cache=False)
    rows = list(scorer.score_files([tree["root"]]))
    assert scorer.times.crops == len([r for r in rows if r.error is None])


def test_python_api(tree, tiny_checkpoint):
    from loda_cli import score_paths

    seen = []
    rows = list(score_paths([tree["root"]], model=str(tiny_checkpoint), progress=seen.append, workers=0))
    assert len(seen) == len(rows) and any(r.error for r in rows)
    assert all(isinstance(r.score, float) for r in rows if r.error is None)


def test_a_csv_of_odd_names_reads_back_row_for_row_and_is_no_formula(tmp_path):
    """Names with a carriage return, a form feed, U+2028, U+0085 or a non-UTF-8 byte stay one row
    each (the csv module leaves a lone CR unquoted when rows end in LF, and splitlines breaks at the
    others); a relative path a spreadsheet would run as a formula is written as ./ and the same file."""
    from loda_cli.output import render
    from loda_cli.scoresfile import read_scores

    names = ["cr\rret.jpg", "ff\x0cfeed.jpg", "fs\x1csep.jpg", "ls\u2028sep.jpg", "nel\u0085x.jpg",
             os.fsdecode(b"bad\xff.jpg"), "=HYPERLINK(\"http://x\",\"y\").jpg", "@at.jpg", "-minus.jpg",
             "/abs/=fine.jpg", "plain, \"quoted\".jpg"]
    records = [{"rank": i + 1, "path": name, "score": 0.9 - i / 100, "mos": None, "raw": 0.1, "width": 10,
                "height": 10, "format": "JPEG", "error": None, "group": None, "rank_in_group": None}
               for i, name in enumerate(names)]
    out = tmp_path / "s.csv"
    out.write_bytes(render(records, "csv").encode("utf-8", "surrogateescape"))
    rows = read_scores(out).rows
    written = [row.path for row in rows]
    assert len(written) == len(names) and [row.score for row in rows] == [r["score"] for r in records]
    expected = [("./" + n if n[0] in "=@-" else n) for n in names]
    assert written == expected
    assert all(os.path.normpath(w) == os.path.normpath(n) for w, n in zip(written, names))
    for line in csv.reader(io.StringIO(out.read_text(encoding="utf-8", errors="surrogateescape"), newline="")):
        assert not line[1].startswith(("=", "+", "-", "@"))
