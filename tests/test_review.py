"""The HTML review page: escaping, thumbnails, histogram, filter, and a real render in Chromium."""

from __future__ import annotations

import csv
import html.parser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli.cli.main import app
from loda_cli.errors import OutputError, UsageError
from loda_cli.review import build_review

HOSTILE = "<img src=x onerror=alert(1)>.jpg"
runner = CliRunner()


@pytest.fixture
def scored(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "ceremony").mkdir(parents=True)
    (photos / "party").mkdir()
    rows = []
    specs = [("ceremony/IMG_1.jpg", 0.12), ("ceremony/IMG_2.jpg", 0.81), (f"party/{HOSTILE}", 0.33),
             ("party/IMG_4.png", 0.55), ("party/rotated.jpg", 0.25), ("party/broken.jpg", 0.9)]
    for i, (rel, score) in enumerate(specs):
        path = photos / rel
        if "broken" in rel:
            path.write_bytes(b"not an image")
        else:
            image = Image.new("RGB", (300, 200), (40 * i, 200 - 30 * i, 90))
            if "rotated" in rel:
                exif = image.getexif()
                exif[0x0112] = 6  # stored landscape, shown portrait
                image.save(path, exif=exif)
            else:
                image.save(path)
        rows.append({"rank": i + 1, "path": f"photos/{rel}", "score": score, "error": ""})
    rows.append({"rank": 7, "path": "photos/party/failed.jpg", "score": "", "error": "decode failed"})
    scores = tmp_path / "scores.csv"
    with open(scores, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["rank", "path", "score", "error"])
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.chdir(tmp_path)
    return tmp_path, scores


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_escapes_names_and_holds_only_its_own_markup(scored):
    tmp, scores = scored
    report = build_review(scores, tmp / "review.html", below=0.4)
    text = Path(report.page).read_text(encoding="utf-8")
    assert HOSTILE not in text
    assert html_escaped(HOSTILE) in text
    parser = _Tags()
    parser.feed(text)
    imgs = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(imgs) == report.thumbs == 5
    assert not any(k.startswith("on") for _, attrs in parser.tags for k in attrs)
    assert all(a["src"].startswith("review_files/") for a in imgs)
    assert [tag for tag, _ in parser.tags].count("script") == 1
    assert "http://" not in text and "https://" not in text  # nothing from the network


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_thumbnails_sorted_by_score_with_histogram_threshold_and_folder_filter(scored):
    tmp, scores = scored
    report = build_review(scores, tmp / "out" / "review.html", below=0.4, thumb_size=128)
    # the failed row is shown too, marked, after the scored photos (issue 16.5)
    assert (report.photos, report.thumbs, report.failed, report.below) == (7, 5, 2, 3)
    assert (report.unscored, report.missing) == (1, 1)
    thumbs = sorted(Path(report.thumbs_dir).glob("*.jpg"))
    assert len(thumbs) == 5 and Path(report.thumbs_dir) == tmp / "out" / "review_files"
    sizes = {Image.open(t).size for t in thumbs}
    assert (85, 128) in sizes  # the EXIF-rotated photo is upright (portrait)
    assert all(max(s) <= 128 for s in sizes)
    text = Path(report.page).read_text(encoding="utf-8")
    scores_in_order = [float(s) for s in re.findall(r'data-score="([0-9.]+)"', text)]
    assert scores_in_order == sorted(scores_in_order)
    assert text.count('class="photo cull"') == 3
    assert 'class="threshold"' in text and "below 0.4: 3" in text
    # Every photo lies in photos/: the filter names it once, and each folder below it.
    assert '<label>Folder in photos <select id="folder">' in text
    assert '<option value="photos/ceremony">ceremony (2)</option>' in text
    assert "no preview" in text


def test_rerun_reuses_thumbnails_and_never_overwrites_foreign_files(scored):
    tmp, scores = scored
    first = build_review(scores, tmp / "review.html")
    stamp = {p: p.stat().st_mtime_ns for p in Path(first.thumbs_dir).glob("*.jpg")}
    build_review(scores, tmp / "review.html")
    assert {p: p.stat().st_mtime_ns for p in Path(first.thumbs_dir).glob("*.jpg")} == stamp

    foreign = tmp / "notes.html"
    foreign.write_text("my own notes")
    with pytest.raises(OutputError, match="not written by loda"):
        build_review(scores, foreign)
    assert foreign.read_text() == "my own notes"
    (tmp / "other_files").mkdir()
    (tmp / "other_files" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        build_review(scores, tmp / "other.html")
    assert not (tmp / "other.html").exists()


def test_a_page_whose_name_is_not_utf8_is_written_and_its_previews_found(scored):
    tmp, scores = scored
    page = Path(os.fsdecode(os.fsencode(str(tmp)) + b"/rev\xff.html"))
    for _ in range(2):  # the second run reuses the thumbnails folder by its marker
        built = build_review(scores, page)
    text = page.read_text(encoding="utf-8")
    assert 'src="rev%FF_files/' in text and Path(built.thumbs_dir).is_dir()


def test_a_link_left_at_a_temporary_name_is_never_written_through(scored):
    """The page and its previews are written to new files of their own (O_EXCL), never to a
    fixed name such as ``review.html.part`` that a link could already hold."""
    tmp, scores = scored
    victim = tmp / "victim.txt"
    victim.write_text("mine")
    (tmp / "review.html.part").symlink_to(victim)
    build_review(scores, tmp / "review.html")
    assert victim.read_text() == "mine" and not (tmp / "review.html").is_symlink()
    assert "<html" in (tmp / "review.html").read_text()


def test_review_cli(scored):
    tmp, scores = scored
    result = runner.invoke(app, ["review", str(scores), "--out", "r.html", "--below", "0.3", "--thumb-size", "64"])
    assert result.exit_code == 0, result.output
    assert "7 photos" in result.output and "2 below 0.3" in result.output
    assert "1 could not be scored" in result.output and "1 of 7 files were not found" in result.output
    assert (tmp / "r.html").exists() and len(list((tmp / "r_files").glob("*.jpg"))) == 5
    bad = runner.invoke(app, ["review", str(scores), "--below", "2"])
    assert bad.exit_code == 2
    nowhere = runner.invoke(app, ["review", str(scores), "--out", str(tmp / "no" / "such" / "r.html")])
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.output and not (tmp / "no").exists()
    # Off a terminal no bar is drawn, so a bad file's error is the first line, not after an
    # empty one where the bar was taken down.
    cut = tmp / "cut.json"
    cut.write_text('{"header": {}, "rows": [', encoding="utf-8")
    broken = runner.invoke(app, ["review", str(cut), "--out", "c.html"])
    assert broken.exit_code != 0 and broken.output.startswith("error: scores file"), repr(broken.output)



def test_previews_past_the_first_ones_load_lazily_and_a_small_page_loads_whole(scored, monkeypatch):
    """A page of one shoot loads every preview at once (ready to print); past EAGER_PREVIEWS the
    browser loads them as the window comes near (a 40,000-photo page opened at once)."""
    from loda_cli import review

    tmp, scores = scored
    small = Path(build_review(scores, tmp / "small.html").page).read_text(encoding="utf-8")
    images = re.findall(r"<img [^>]*>", small)
    assert len(images) == 5 and not any("loading=" in i for i in images)
    assert "load as you scroll" not in small

    monkeypatch.setattr(review, "EAGER_PREVIEWS", 2)
    report = build_review(scores, tmp / "big.html")
    big = Path(report.page).read_text(encoding="utf-8")
    images = re.findall(r"<img [^>]*>", big)
    assert ['loading="lazy"' in i for i in images] == [False, False, True, True, True]
    assert f"of {report.thumbs}; the rest load as you scroll to them." in big
    # printing starts loading the rest
    assert "img[loading=\"lazy\"]" in big and "beforeprint" in big
    if _chromium() is None:
        return
    # The page's script runs under its CSP and counts lazy previews as they load (headless
    # Chromium loads them all, with no window to scroll).
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
            "--enable-logging=stderr", "--v=0"]
    run = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", Path(report.page).as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert f'data-loaded-images="{report.thumbs}"' in run.stdout, run.stdout[:400]
    assert "Uncaught" not in run.stderr and "Content Security Policy" not in run.stderr, run.stderr[-2000:]

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium_and_every_thumbnail_loads(scored):
    tmp, scores = scored
    report = build_review(scores, tmp / "review.html", below=0.4)
    url = Path(report.page).as_uri()
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}"]
    dom = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90).stdout
    # the page's own script counts images with naturalWidth > 0 after load
    assert f'data-loaded-images="{report.thumbs}"' in dom, dom[:400]
    assert html_escaped(HOSTILE) in dom  # the hostile name stayed text
    shot = tmp / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=90)
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # not a blank page
    assert os.path.getsize(shot) > 5000


def test_failed_rows_are_shown_marked_after_the_scored_ones(scored):
    """Issue 16.5: the review page shows the files `loda score` could not score, marked, last."""
    tmp, scores = scored
    report = build_review(scores, tmp / "r.html")
    text = Path(report.page).read_text(encoding="utf-8")
    figures = re.findall(r'<figure class="([^"]+)"[^>]*data-score="([^"]*)"', text)
    assert figures[-1] == ("photo failed", "")
    assert all(score for _, score in figures[:-1])
    assert "decode failed" in text and "1 could not be scored" in text
    # The count at the top is every photo shown, as "Showing N" counts them, failures included.
    assert f"<p>{len(figures)} photos, worst first." in text


def test_heic_photos_get_previews_through_the_scoring_decoder(tmp_path, monkeypatch):
    """Issue 16.3: thumbnails go through the decoder `loda score` uses, so HEIC/HEIF (and .HIF)
    photos get a preview."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    for name in ("a.heic", "b.HIF"):
        Image.new("RGB", (120, 80), (200, 40, 40)).save(tmp_path / name, format="HEIF")
    scores = tmp_path / "s.csv"
    scores.write_text("rank,path,score,error\n1,a.heic,0.8,\n2,b.HIF,0.7,\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    report = build_review(scores, tmp_path / "r.html")
    assert (report.photos, report.thumbs, report.failed) == (2, 2, 0)


def test_relative_paths_resolve_where_loda_score_ran_and_missing_files_are_counted(tmp_path, monkeypatch):
    """Issue 16.4: `loda score . --out ../x.json` reviewed from elsewhere finds the photos through
    the header's record of where scoring ran; what cannot be found is counted and said."""
    import json

    lib = tmp_path / "lib"
    lib.mkdir()
    Image.new("RGB", (60, 40)).save(lib / "a.jpg")
    doc = {"header": {"cwd": str(lib), "roots": ["."]},
           "rows": [{"rank": 1, "path": "a.jpg", "score": 0.5, "error": None},
                    {"rank": 2, "path": "gone.jpg", "score": 0.4, "error": None}]}
    scores = tmp_path / "x.json"
    scores.write_text(json.dumps(doc), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["review", str(scores), "--out", "r.html"])
    assert result.exit_code == 0, result.output
    assert "2 photos, 1 preview," in result.output
    assert "1 of 2 files were not found" in result.output and str(lib) in result.output


@pytest.fixture
def grouped(tmp_path, monkeypatch):
    """A JSON scores file as `loda score` writes it since issue 19: a burst of three frames, a
    single photo, crop scores (a 3x3 grid and two small detail crops) on every row."""
    import json

    rows = []
    specs = [("b1.jpg", 0.71, 1, 2), ("b2.jpg", 0.80, 1, 1), ("b3.jpg", 0.35, 1, 3), ("single.jpg", 0.5, 2, 1)]
    for i, (name, score, group, rank) in enumerate(specs):
        Image.new("RGB", (600, 400), (60 * i, 120, 200 - 40 * i)).save(tmp_path / name)
        crops = [[x, y, 250, 250, round(0.1 + 0.1 * (k % 9), 2)]
                 for k, (x, y) in enumerate((x, y) for y in (0, 75, 150) for x in (0, 175, 350))]
        crops += [[40, 40, 60, 60, 0.9], [480, 300, 60, 60, 0.2]]
        rows.append({"rank": i + 1, "path": name, "score": score, "width": 600, "height": 400, "error": None,
                     "group": group, "rank_in_group": rank, "crops": crops})
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"header": {}, "rows": rows}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path, scores


def test_bursts_are_rows_with_the_keeper_marked_and_a_crop_map_per_photo(grouped):
    tmp, scores = grouped
    report = build_review(scores, tmp / "review.html")
    assert (report.bursts, report.maps) == (1, 4)
    text = Path(report.page).read_text(encoding="utf-8")
    assert "1 burst or near-duplicate set is shown as a row, best first" in text
    row = text[text.index('<div class="burst"'):text.index("</section>")]
    assert re.findall(r'<figure class="([^"]+)"', row) == ["photo frame keeper", "photo frame", "photo frame"]
    assert row.index("b2.jpg") < row.index("b1.jpg") < row.index("b3.jpg")  # best frame first
    assert "single.jpg" in text[text.index('<main id="grid">'):]
    maps = re.findall(r'<div class="map" data-cells="([^"]*)"></div>', text)
    cells = [cell.split(" ") for encoded in maps for cell in encoded.split(";")]
    assert len(maps) == 4 and all(len(cell) == 8 for cell in cells)
    assert [cell[7] for cell in cells].count("0") == 4 * 9 and [cell[7] for cell in cells].count("1") == 4 * 2
    assert all(0 <= float(v) <= 100 for cell in cells for v in cell[:4]) and 'class="cell' not in text
    two = Path(build_review(scores, tmp / "two.html", keep=2).page).read_text(encoding="utf-8")
    assert two.count("photo frame keeper") == 2
    with pytest.raises(UsageError):
        build_review(scores, tmp / "r.html", keep=0)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_groups_render_the_keeper_is_marked_and_the_map_toggles_in_headless_chromium(grouped):
    tmp, scores = grouped
    report = build_review(scores, tmp / "review.html")
    url = Path(report.page).as_uri()
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}"]

    def dom(address: str) -> str:
        return subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", address],
                              capture_output=True, text=True, timeout=90).stdout

    plain, mapped = dom(url), dom(url + "#cropmap")  # #cropmap ticks the toggle, as a click does
    assert 'data-loaded-images="4"' in plain and 'data-maps-shown="0"' in plain, plain[:400]
    assert 'data-maps-shown="4"' in mapped and '<body class="maps">' in mapped, mapped[:400]
    # the cells are made when the map is shown, not before
    assert 'class="cell' not in plain
    assert mapped.count('class="cell"') == 4 * 9 and mapped.count('class="cell detail"') == 4 * 2
    assert 'title="crop score ' in mapped
    assert plain.count('class="photo frame keeper"') == 1 and plain.count('class="burst"') == 1
    shots = {}
    for name, address in (("plain", url), ("mapped", url + "#cropmap")):
        shots[name] = tmp / f"{name}.png"
        subprocess.run(base + [f"--screenshot={shots[name]}", "--window-size=1200,900", address],
                       capture_output=True, timeout=90)
    with Image.open(shots["plain"]) as a, Image.open(shots["mapped"]) as b:
        from PIL import ImageChops

        changed = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox()
        assert changed is not None  # the map is drawn over the thumbnails
        # the keeper's green outline is on the page
        assert any(g > 120 and r < 80 and b_ < 110 for _, (r, g, b_) in a.convert("RGB").getcolors(1 << 20))


def test_burst_rows_come_worst_keeper_first_like_the_single_photos():
    from loda_cli.review import ReviewItem, _bursts

    def item(name, score, group):
        return ReviewItem(name, name, ".", score, found=True, group=group)

    rows = _bursts([item("a", 0.9, 1), item("b", 0.2, 1), item("c", 0.5, 2), item("d", 0.4, 2), item("e", 0.1, 3)])
    assert [[i.path for i in frames] for frames in rows] == [["c", "d"], ["a", "b"]]  # keepers 0.5, then 0.9
