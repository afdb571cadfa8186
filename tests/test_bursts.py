"""Bursts and near-duplicates (issue 19): EXIF time and camera, the look, grouping, the cache
migration, the outputs, `loda cull --bursts`, and a small version of scripts/eval_bursts.py."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli.bursts import Look, assign_groups, capture_of, group_records, look_of, parse_exif_time
from loda_cli.cli.main import app
from tests.scripts import load_script

runner = CliRunner()


def _eval_bursts():
    return load_script("eval_bursts")


# --- EXIF ---------------------------------------------------------------------------------------


def test_exif_time_reads_subseconds_and_offsets_and_refuses_garbage():
    base = parse_exif_time("2023:11:14 22:13:20")
    assert base == 1_700_000_000.0  # no offset: the local time is taken as UTC
    assert parse_exif_time("2023:11:14 23:13:20", "25", "+01:00") == pytest.approx(1_700_000_000.25)
    assert parse_exif_time(b"2023:11:14 22:13:20\x00", b"5\x00", "-00:30") == pytest.approx(base + 1800.5)
    assert parse_exif_time("2023:11:14 22:13:20", "  ", "bogus") == base  # odd fields are ignored
    for bad in ("", "0000:00:00 00:00:00", "2023:13:40 99:00:00", "yesterday", None, 12, (), b"\xff\xfe"):
        assert parse_exif_time(bad) is None


def test_capture_reads_camera_and_time_and_never_raises():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon\x00", b"EOS R5"
    ifd = exif.get_ifd(0x8769)
    ifd[0x9003], ifd[0x9291], ifd[0xA431] = "2023:11:14 22:13:20", "120", "0123"
    assert capture_of(exif) == (pytest.approx(1_700_000_000.12), "Canon|EOS R5|0123")
    assert capture_of(None) == (None, "")

    class Hostile:
        def get_ifd(self, tag):
            raise ValueError("broken IFD pointer")

        def get(self, tag):
            raise RuntimeError("worse")

    assert capture_of(Hostile()) == (None, "")


def _jpeg_with_app1(path: Path, payload: bytes) -> None:
    """A valid JPEG whose first segment is an APP1 Exif block holding ``payload``."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (300, 240), (120, 90, 60)).save(buffer, "JPEG")
    data = buffer.getvalue()
    segment = b"Exif\x00\x00" + payload
    path.write_bytes(data[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + data[2:])


def odd_exif_photos(folder: Path) -> list[Path]:
    """Photos with broken EXIF: garbage, a TIFF header pointing nowhere, odd time fields."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "garbage.jpg", folder / "nowhere.jpg", folder / "odd_fields.jpg", folder / "no_subsec.jpg"]
    _jpeg_with_app1(paths[0], b"\x00\x01garbage" * 10)
    _jpeg_with_app1(paths[1], b"II*\x00\xff\xff\xff\x7f")
    odd = Image.Exif()
    odd[0x010F] = b"\xff\xfe\x00"
    ifd = odd.get_ifd(0x8769)
    ifd[0x9003], ifd[0x9291], ifd[0x9011] = "2023:02:30 25:61:00", "abc", "+99:99"
    Image.new("RGB", (300, 240), (10, 200, 60)).save(paths[2], exif=odd)
    plain = _eval_bursts().exif_bytes(1_700_000_000.3, {"make": "X", "model": "Y"}, subsec=False)
    Image.new("RGB", (300, 240), (200, 20, 60)).save(paths[3], exif=plain)
    return paths


def test_odd_exif_never_costs_the_photo(tmp_path):
    from loda_cli.images import decode_image

    for path in odd_exif_photos(tmp_path):
        decoded = decode_image(path)
        taken, camera = capture_of(decoded.exif)
        assert decoded.image.size[0] > 0 and isinstance(camera, str)
        if path.name == "no_subsec.jpg":
            assert taken == 1_700_000_000.0 and camera == "X|Y|"  # whole seconds still group
        else:
            assert taken is None


# --- grouping -----------------------------------------------------------------------------------


def _look(photo: str, shift: int = 0) -> str:
    from skimage import data

    image = getattr(data, photo)()
    if image.ndim == 2:
        image = image[..., None].repeat(3, axis=2)
    return look_of(Image.fromarray(image[:, shift : shift + image.shape[1] - 20, :3]))


def test_frames_group_by_camera_time_and_look():
    pytest.importorskip("skimage")
    cat, cat2, coffee, rocket = _look("chelsea"), _look("chelsea", 8), _look("coffee"), _look("rocket")
    records = [
        Look(0, 100.0, "A", cat),
        Look(1, 100.4, "A", cat2),  # a burst with 0
        Look(2, 100.6, "B", cat),  # the same look from another camera: never one burst
        Look(3, 100.2, "A", coffee),  # the clock jumped back: same time, another scene
        Look(4, 400.0, "A", cat),  # the same scene minutes later
        Look(5, None, "", rocket),  # no time: look alone
        Look(6, None, "", rocket),
        Look(7, None, "", cat),  # no time, but the look of a timed photo: not joined to it
        Look(8, 101.0, "A", None),  # no look: alone
    ]
    groups = group_records(records, burst_gap=2.0)
    assert groups[0] == groups[1]
    assert len({groups[0], groups[2], groups[3], groups[4], groups[5], groups[7], groups[8]}) == 7
    assert groups[5] == groups[6]
    # chaining: frames 1.5 s apart each join a burst longer than the gap
    chain = [Look(k, 10.0 + 1.5 * k, "A", cat) for k in range(4)]
    assert len(set(group_records(chain, burst_gap=2.0))) == 1
    assert len(set(group_records(chain, burst_gap=1.0))) == 4


def test_assign_groups_numbers_by_best_frame_and_ranks_within():
    class Row:
        def __init__(self, path, score, taken, look, error=None):
            self.path, self.score, self.raw, self.error = path, score, score, error
            self.taken, self.camera, self.look = taken, "A", look

    look = "0" * 32
    rows = [Row("a", 0.2, 1.0, look), Row("b", 0.9, 1.5, look), Row("c", 0.5, 500.0, look),
            Row("d", None, 1.2, look, error="truncated image")]
    assign_groups(rows)
    assert [(r.group, r.rank_in_group) for r in rows] == [(1, 2), (1, 1), (2, 1), (None, None)]


def test_grouping_50000_records_keeps_memory_flat():
    """50,000 records, a third without time: the grouping's own peak memory stays in megabytes
    (the pairwise look comparison runs in chunks)."""
    import random
    import tracemalloc

    rng = random.Random(1)
    records = []
    for k in range(50_000):
        look = f"{rng.getrandbits(64):016x}{rng.getrandbits(64):016x}"
        taken = None if k % 3 == 0 else 1_700_000_000.0 + k * 0.7
        records.append(Look(k, taken, "A", look))
    tracemalloc.start()
    groups = group_records(records)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(groups) == 50_000
    assert peak < 80 * 2**20, peak


# --- the cache ----------------------------------------------------------------------------------


def test_a_schema_1_cache_is_migrated_and_its_rows_keep_their_scores(tmp_path, tiny_checkpoint):
    from loda_cli.cache import FileKey, ScoreCache
    from loda_cli.scoring import Scorer

    photo = tmp_path / "p" / "a.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (320, 240), (90, 120, 200)).save(photo, exif=_eval_bursts().exif_bytes(1_700_000_000.5, {"make": "M", "model": "N"}))
    scorer = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", workers=0, cache=tmp_path / "c.sqlite")
    old = sqlite3.connect(tmp_path / "c.sqlite")  # schema 1, as loda wrote it before grouping
    old.execute("CREATE TABLE scores (path TEXT NOT NULL, model TEXT NOT NULL, prep TEXT NOT NULL, "
                "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, raw REAL, width INTEGER, height INTEGER, "
                "format TEXT, error TEXT, created REAL NOT NULL, PRIMARY KEY (path, model, prep))")
    key = FileKey.of(photo)
    old.execute("INSERT INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (key.path, scorer.model_id, scorer.preprocess.digest(), key.size, key.mtime_ns, 0.123, 320, 240, "JPEG", None, 0.0))
    old.execute("PRAGMA user_version=1")
    old.commit()
    old.close()

    rows = list(scorer.score_files([photo.parent]))
    assert rows[0].cached and rows[0].raw == pytest.approx(0.123)  # the old score stands
    assert rows[0].taken == pytest.approx(1_700_000_000.5) and rows[0].camera == "M|N|" and rows[0].look
    assert rows[0].crops is None  # unknown until it is scored again
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        hit = cache.get(key, scorer.model_id, scorer.preprocess.digest())
        assert hit.raw == pytest.approx(0.123) and hit.look == rows[0].look and hit.camera == "M|N|"
        assert cache._conn.execute("PRAGMA user_version").fetchone()[0] == 2
    again = list(scorer.score_files([photo.parent]))
    assert again[0].cached and again[0].look == rows[0].look  # regrouping at no cost


# --- outputs ------------------------------------------------------------------------------------


@pytest.fixture
def burst_folder(tmp_path):
    """Two bursts (three frames of one scene, two of another) from one camera, and a photo with
    odd EXIF."""
    pytest.importorskip("skimage")
    from skimage import data

    eb = _eval_bursts()
    folder = tmp_path / "card"
    eb.make_burst_set(folder, [("chelsea", data.chelsea()), ("coffee", data.coffee())], frames=(3, 3), seed=3)
    (folder / "truth.json").unlink()
    odd_exif_photos(folder / "odd")
    return folder


def test_score_writes_groups_last_and_crops_in_json_only(burst_folder, tiny_checkpoint, tmp_path):
    outs = {fmt: tmp_path / f"s.{fmt}" for fmt in ("csv", "json", "jsonl")}
    for out in outs.values():
        result = runner.invoke(app, ["score", str(burst_folder), "--model", str(tiny_checkpoint), "--out", str(out),
                                     "--workers", "0", "--precision", "fp32"])
        assert result.exit_code == 0, result.output
    with open(outs["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[-2:] == ["group", "rank_in_group"] and "crops" not in table[0]
    doc = json.loads(outs["json"].read_text())
    lines = [json.loads(line) for line in outs["jsonl"].read_text().splitlines()]
    assert doc["header"]["burst_gap"] == 2.0
    for rows in (doc["rows"], lines, table):
        assert all(str(r["group"]) not in ("", "None") for r in rows)  # odd EXIF still groups
    by_name = {Path(r["path"]).name: r for r in doc["rows"]}
    assert by_name["A_chelsea_s0_0.jpg"]["group"] == by_name["A_chelsea_s0_2.jpg"]["group"]
    assert by_name["A_chelsea_s0_0.jpg"]["group"] != by_name["A_coffee_s0_0.jpg"]["group"]
    crops = by_name["A_chelsea_s0_0.jpg"]["crops"]
    width, height = by_name["A_chelsea_s0_0.jpg"]["width"], by_name["A_chelsea_s0_0.jpg"]["height"]
    assert len(crops) == 3 and all(len(c) == 5 and 0 <= c[4] <= 1 for c in crops)
    assert all(0 <= x and x + w <= width and 0 <= y and y + h <= height for x, y, w, h, _ in crops)
    ranks = sorted(r["rank_in_group"] for r in doc["rows"] if r["group"] == by_name["A_chelsea_s0_0.jpg"]["group"])
    assert ranks == [1, 2, 3, 4][: len(ranks)]
    # a cached rerun regroups the same, and keeps the crop scores
    rerun = tmp_path / "again.json"
    runner.invoke(app, ["score", str(burst_folder), "--model", str(tiny_checkpoint), "--out", str(rerun), "--workers", "0",
                        "--precision", "fp32"])
    assert [(r["path"], r["group"], r["crops"]) for r in json.loads(rerun.read_text())["rows"]] == \
        [(r["path"], r["group"], r["crops"]) for r in doc["rows"]]
    off = tmp_path / "off.csv"
    runner.invoke(app, ["score", str(burst_folder), "--model", str(tiny_checkpoint), "--out", str(off), "--no-groups",
                        "--workers", "0", "--precision", "fp32"])
    with open(off, newline="") as fh:
        assert all(row["group"] == "" for row in csv.DictReader(fh))
    shard = tmp_path / "shard.csv"  # a shard holds a fraction of each burst: no groups there
    runner.invoke(app, ["score", str(burst_folder), "--model", str(tiny_checkpoint), "--out", str(shard), "--shard", "0/2",
                        "--workers", "0", "--precision", "fp32"])
    with open(shard, newline="") as fh:
        assert all(row["group"] == "" for row in csv.DictReader(fh))
    assert runner.invoke(app, ["score", str(burst_folder), "--burst-gap", "-1"]).exit_code == 2


# --- cull --bursts ------------------------------------------------------------------------------


def test_cull_bursts_keeps_the_best_frame_names_the_rule_and_undoes(burst_folder, tiny_checkpoint, tmp_path, monkeypatch):
    scores = tmp_path / "s.json"
    result = runner.invoke(app, ["score", str(burst_folder), "--model", str(tiny_checkpoint), "--out", str(scores),
                                 "--workers", "0", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    rows = json.loads(scores.read_text())["rows"]
    sizes: dict[int, list] = {}
    for row in rows:
        sizes.setdefault(row["group"], []).append(row)
    in_bursts = [r for frames in sizes.values() if len(frames) > 1 for r in frames]
    keepers = {Path(r["path"]).name for r in in_bursts if r["rank_in_group"] == 1}
    expected = {Path(r["path"]).name for r in in_bursts} - keepers
    monkeypatch.setenv("COLUMNS", "250")

    plan = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--scores", str(scores)])
    assert plan.exit_code == 0, plan.output
    assert "burst: #" in plan.output and f"burst {len(expected)}" in plan.output
    median = sorted(r["score"] for r in rows)[len(rows) // 2]
    both = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--below", f"{median}", "--scores", str(scores)])
    assert "below" in both.output and "burst" in both.output

    applied = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--scores", str(scores), "--apply"])
    assert applied.exit_code == 0, applied.output
    culled = {p.name for p in (burst_folder / "_culled").rglob("*.jpg")}
    assert culled == expected and not (keepers & culled)
    monkeypatch.chdir(burst_folder)
    undone = runner.invoke(app, ["undo"])
    assert undone.exit_code == 0, undone.output
    assert not list((burst_folder / "_culled").rglob("*.jpg"))

    # --keep 2 keeps two of each; --keep without --bursts, or a file without groups, is refused
    two = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--keep", "2", "--scores", str(scores)])
    assert "burst: #2 of" not in two.output and "burst: #3 of" in two.output
    assert runner.invoke(app, ["cull", str(burst_folder), "--keep", "2", "--below", "0.5"]).exit_code == 2
    assert runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--keep", "0"]).exit_code == 2
    old = tmp_path / "old.csv"
    old.write_text("rank,path,score,error\n" + "".join(f"1,{r['path']},{r['score']},\n" for r in rows))
    refused = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--scores", str(old)])
    assert refused.exit_code == 2 and "no group column" in refused.output


def test_cull_bursts_from_the_cache_needs_no_scores_file(burst_folder, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    first = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--model", str(tiny_checkpoint)])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["cull", str(burst_folder), "--bursts", "--model", str(tiny_checkpoint)])
    assert "the score cache" in second.output and "burst: #" in second.output


# --- the measured acceptance, small ------------------------------------------------------------


def test_generated_bursts_group_with_high_precision_and_recall_and_keep_a_clean_frame(tmp_path):
    """scripts/eval_bursts.py on three scenes with the built-in model: pairwise precision and
    recall >= 0.95, the best frame of each burst is a clean one, distinct photos are singletons."""
    pytest.importorskip("skimage")
    from skimage import data

    eb = _eval_bursts()
    photos = [("astronaut", data.astronaut()), ("chelsea", data.chelsea()), ("coffee", data.coffee()),
              ("rocket", data.rocket())]
    result = eb.evaluate(tmp_path, seed=11, frames=(2, 4), photos=photos, untimed_scenes=1)
    assert result["precision"] >= 0.95 and result["recall"] >= 0.95, result
    assert result["keeper_total"] >= 3 and not result["keeper_failures"], result
    assert result["singletons_ok"] and result["distinct_photos"] == 4


def test_a_raw_file_gives_its_camera_from_its_tiff_header(tmp_path):
    """RAW files: the EXIF comes from the TIFF header (no pixel decoded), so a DNG burst groups by
    camera and time like JPEGs."""
    pytest.importorskip("rawpy")
    from tests.imagetree import write_test_dng

    from loda_cli.images import decode_image

    path = tmp_path / "IMG_0001.dng"
    write_test_dng(path, size=(64, 48))
    assert capture_of(decode_image(path).exif)[1] == "Loda|Test|"
