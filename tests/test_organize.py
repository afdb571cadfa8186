"""cull, sort, rate and undo: every command and flag through the CLI, and the library's safety
checks (paths outside the roots, symlinks, tampered journals, preflight, cross-device moves)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import types
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli import organize
from loda_cli.cli.main import app
from loda_cli.organize import apply as apply_module
from loda_cli.organize import fileops
from loda_cli.organize import undo as undo_module
from loda_cli.errors import JournalError, UnsafePathError
from loda_cli.organize.paths import Skipped

runner = CliRunner()


# --- helpers shared with the property and crash tests ------------------------------------------


def photo_bytes(seed: int) -> bytes:
    """A small, real JPEG whose bytes differ per seed."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buf, "JPEG")
    return buf.getvalue() + seed.to_bytes(4, "big")  # trailing bytes keep equal colours apart


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_scores(path: Path, rows: list[tuple[str, float | None]], fmt: str = "csv", errors: dict | None = None) -> Path:
    """A scores file like `loda score` writes; ``errors`` maps paths to an error text."""
    errors = errors or {}
    records = [
        {"rank": i + 1, "path": p, "score": "" if s is None else s, "mos": "", "raw": "", "width": 16,
         "height": 12, "format": "JPEG", "error": errors.get(p, "")}
        for i, (p, s) in enumerate(rows)
    ]
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["path", "score"])
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "json":
        for r in records:
            r["score"] = None if r["score"] == "" else r["score"]
        path.write_text(json.dumps({"header": {"model": "test"}, "rows": records}), encoding="utf-8")
    else:
        for r in records:
            r["score"] = None if r["score"] == "" else r["score"]
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def snapshot(folder: Path, skip_loda: bool = True) -> dict[bytes, tuple[str, bytes]]:
    """Every entry under ``folder`` (links not followed): relative path bytes -> (kind, content)."""
    result: dict[bytes, tuple[str, bytes]] = {}
    base = os.fsencode(folder)
    for dirpath, dirnames, filenames in os.walk(base):
        if skip_loda:
            dirnames[:] = [d for d in dirnames if d != b"_culled"]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            if skip_loda and name.startswith(b".loda-"):
                continue
            if os.path.islink(full):
                result[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                result[rel] = ("dir", b"")
            else:
                with open(full, "rb") as fh:
                    result[rel] = ("file", fh.read())
    return result


def originals(snap: dict[bytes, tuple[str, bytes]]) -> dict[bytes, bytes]:
    return {k: v[1] for k, v in snap.items() if v[0] == "file"}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: object):
    """Invoke the CLI and require success."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def shoot(tmp_path, monkeypatch):
    """A wedding folder: pairs, sidecars, Live Photos, a sub-folder, and a scores file."""
    root = tmp_path / "wedding"
    files = {
        "IMG_1.JPG": photo_bytes(1), "IMG_1.CR2": b"raw-1" * 50, "IMG_1.CR2.xmp": b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>",
        "IMG_1.xmp": b"<lr/>", "IMG_1.JPG.xmp": b"<dt/>",
        "IMG_2.heic": photo_bytes(2), "IMG_2.MOV": b"live" * 20, "IMG_2.AAE": b"<aae/>",
        "IMG_3.jpg": photo_bytes(3), "IMG_4.jpg": photo_bytes(4), "IMG_40.jpg": photo_bytes(40),
        "ceremony/IMG_5.jpg": photo_bytes(5), "ceremony/IMG_5.nef": b"nef" * 30, "ceremony/IMG_6.jpg": photo_bytes(6),
        "notes.txt": b"not a photo",
    }
    for rel, data in files.items():
        write(root / rel, data)
    scores = write_scores(
        tmp_path / "scores.csv",
        [
            ("wedding/IMG_1.JPG", 0.10), ("wedding/IMG_1.CR2", 0.95),  # the RAW's own score is ignored
            ("wedding/IMG_2.heic", 0.20), ("wedding/IMG_3.jpg", 0.90), ("wedding/IMG_4.jpg", 0.50),
            ("wedding/IMG_40.jpg", 0.70), ("wedding/ceremony/IMG_5.jpg", 0.30),
            ("wedding/ceremony/IMG_6.jpg", 0.80), ("wedding/broken.jpg", None),
        ],
        errors={"wedding/broken.jpg": "cannot decode"},
    )
    monkeypatch.chdir(tmp_path)
    return types.SimpleNamespace(root=root, scores=scores, tmp=tmp_path, files=files)


# --- cull ----------------------------------------------------------------------------------------


def test_cull_dry_run_changes_nothing_and_shows_the_plan(shoot):
    before = snapshot(shoot.tmp, skip_loda=False)
    result = invoke("cull", "wedding", "--below", "0.4", "--scores", shoot.scores)
    assert result.exit_code == 0, result.output
    assert snapshot(shoot.tmp, skip_loda=False) == before
    out = result.output
    assert "dry run" in out and "Dry run: nothing was changed" in out
    assert "photos" in out and "│ 3 " in out  # IMG_1, IMG_2, IMG_5
    assert "0.100 - 0.300" in out
    assert "IMG_1.JPG" in out


def test_cull_apply_moves_photos_with_every_companion_and_undo_restores(shoot):
    before = snapshot(shoot.root)
    result = invoke("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    culled = shoot.root / "_culled"
    moved = {"IMG_1.JPG", "IMG_1.CR2", "IMG_1.CR2.xmp", "IMG_1.xmp", "IMG_1.JPG.xmp", "IMG_2.heic", "IMG_2.MOV",
             "IMG_2.AAE", "ceremony/IMG_5.jpg", "ceremony/IMG_5.nef"}
    for rel in moved:
        assert not (shoot.root / rel).exists(), rel
        assert (culled / rel).read_bytes() == shoot.files[rel]
    for rel in set(shoot.files) - moved:
        assert (shoot.root / rel).read_bytes() == shoot.files[rel]
    assert not list(culled.glob(".loda-journal-*.jsonl"))  # journals live in $LODA_HOME/journals
    journals = [_journal()]

    result = invoke("undo")
    assert result.exit_code == 0, result.output
    assert "Undoing" in result.output and journals[0].name in result.output.replace("\n", "")
    assert snapshot(shoot.root) == before
    assert not culled.exists()  # the folders the cull created are removed once empty (16.13)
    assert snapshot(shoot.root, skip_loda=False) == before

    again = invoke("undo")  # a second undo is not an error: it says what was undone when
    assert again.exit_code == 0 and "Nothing left to undo" in again.output
    assert journals[0].name in again.output.replace("\n", "") and "was undone at" in again.output
    explicit = invoke("undo", journals[0])
    assert explicit.exit_code == 0 and "Nothing left to undo" in explicit.output


def test_undo_given_the_folder_that_was_culled_finds_its_journal_from_anywhere(shoot, monkeypatch):
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    elsewhere = shoot.tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    nothing = invoke("undo", elsewhere)  # a folder no run touched: the same one-line error as before
    assert nothing.exit_code != 0 and "no journal to undo under" in nothing.output
    assert snapshot(shoot.root) != before
    ok("undo", shoot.root / "ceremony", "--dry-run")  # a folder inside the run's root names it too
    assert snapshot(shoot.root) != before
    result = ok("undo", shoot.root)
    assert "Undoing" in result.output and snapshot(shoot.root, skip_loda=False) == before
    assert "Nothing left to undo" in ok("undo", shoot.root).output


def test_cull_copy_and_link_leave_originals_and_undo_removes_only_what_it_made(shoot):
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--worst", "2", "--scores", shoot.scores, "--copy", "--apply")
    culled = shoot.root / "_culled"
    assert (culled / "IMG_1.JPG").read_bytes() == shoot.files["IMG_1.JPG"]
    assert (culled / "IMG_2.MOV").read_bytes() == shoot.files["IMG_2.MOV"]
    assert originals(snapshot(shoot.root)) == originals(before)
    ok("undo")
    assert snapshot(shoot.root) == before

    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--link", "--apply")
    link = culled / "IMG_1.JPG"
    assert link.is_symlink() and os.readlink(link) == str((shoot.root / "IMG_1.JPG").resolve())
    ok("undo")
    assert snapshot(shoot.root) == before


def test_cull_to_another_folder_worst_percent_and_flags_that_exclude_each_other(shoot):
    before = snapshot(shoot.root)
    dest = shoot.tmp / "rejects"
    result = invoke("cull", "wedding", "--worst-percent", "34", "--scores", shoot.scores, "--to", dest, "--apply")
    assert result.exit_code == 0, result.output
    # 7 decision photos; 34% rounds down to 2: IMG_1 (0.1) and IMG_2 (0.2)
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(
        ["IMG_1.JPG", "IMG_1.CR2", "IMG_1.CR2.xmp", "IMG_1.xmp", "IMG_1.JPG.xmp", "IMG_2.heic", "IMG_2.MOV", "IMG_2.AAE"]
    )
    ok("undo", _journal())
    assert not dest.exists()  # --to made it, undo removes it once empty
    assert snapshot(shoot.root) == before

    assert invoke("cull", "wedding", "--scores", shoot.scores).exit_code == 2
    assert invoke("cull", "wedding", "--below", "0.4", "--worst", "3", "--scores", shoot.scores).exit_code == 2
    bad = invoke("cull", "wedding", "--below", "0.4", "--copy", "--link", "--scores", shoot.scores)
    assert bad.exit_code == 2 and "exclude each other" in bad.output
    inside = invoke("cull", "wedding", "--below", "0.4", "--to", shoot.tmp, "--scores", shoot.scores)
    assert inside.exit_code == 2 and "must not be a root" in inside.output


def test_cull_with_no_path_works_on_the_current_folder_and_ignores_the_destination(shoot, monkeypatch):
    monkeypatch.chdir(shoot.root)
    write(shoot.root / "_culled" / "old.jpg", photo_bytes(99))
    rows = [("IMG_3.jpg", 0.1), ("_culled/old.jpg", 0.0), ("IMG_4.jpg", 0.9)]
    scores = write_scores(shoot.tmp / "local.jsonl", rows, fmt="jsonl")
    result = invoke("cull", "--below", "0.4", "--scores", scores, "--apply")
    assert result.exit_code == 0, result.output
    assert (shoot.root / "_culled" / "IMG_3.jpg").exists()
    assert (shoot.root / "_culled" / "old.jpg").read_bytes() == photo_bytes(99)  # never considered again
    assert (shoot.root / "IMG_4.jpg").exists()


def test_collisions_get_one_numbered_suffix_for_the_photo_and_its_companions(shoot):
    culled = shoot.root / "_culled"
    write(culled / "IMG_1.JPG", b"an earlier cull")
    write(culled / "IMG_1-1.CR2", b"another earlier cull")
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    assert (culled / "IMG_1.JPG").read_bytes() == b"an earlier cull"
    assert (culled / "IMG_1-1.CR2").read_bytes() == b"another earlier cull"
    for name in ("IMG_1-2.JPG", "IMG_1-2.CR2", "IMG_1-2.CR2.xmp", "IMG_1-2.xmp", "IMG_1-2.JPG.xmp"):
        assert (culled / name).exists(), name
    ok("undo")
    assert (shoot.root / "IMG_1.JPG").read_bytes() == shoot.files["IMG_1.JPG"]
    assert (culled / "IMG_1.JPG").read_bytes() == b"an earlier cull"


def test_decision_photo_is_the_jpeg_even_when_the_raw_scores_differently(shoot):
    # IMG_1.CR2 scored 0.95 in the file, but the JPEG (0.10) decides for the pair.
    result = invoke("cull", "wedding", "--below", "0.15", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0
    assert (shoot.root / "_culled" / "IMG_1.CR2").exists()
    result = invoke("undo")
    scores = write_scores(shoot.tmp / "raw.csv", [("wedding/IMG_1.CR2", 0.01), ("wedding/IMG_1.JPG", 0.9)])
    ok("cull", "wedding", "--below", "0.5", "--scores", scores, "--apply")
    assert (shoot.root / "IMG_1.CR2").exists() and (shoot.root / "IMG_1.JPG").exists()


def test_scores_in_json_and_error_rows_are_skipped(shoot):
    scores = write_scores(
        shoot.tmp / "s.json", [("wedding/IMG_3.jpg", 0.1), ("wedding/IMG_4.jpg", None)],
        fmt="json", errors={"wedding/IMG_4.jpg": "broken"},
    )
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", scores, "--apply")
    assert result.exit_code == 0, result.output
    assert (shoot.root / "_culled" / "IMG_3.jpg").exists() and (shoot.root / "IMG_4.jpg").exists()


def test_without_scores_file_photos_are_scored_through_the_library(shoot, monkeypatch):
    calls = {}

    def score_paths(paths, *, model=None, recursive=True, include=(), exclude=(), progress=None):
        calls["model"] = model
        calls["exclude"] = exclude
        for path in sorted(Path(paths[0]).rglob("*.jpg")):
            rel = str(path.relative_to(paths[0]))
            row = types.SimpleNamespace(path=str(path), root=str(paths[0]), score=0.1 if "IMG_3" in rel else 0.9,
                                        mos=None, raw=None, width=16, height=12, format="JPEG", error=None)
            if progress:
                progress(row)
            yield row

    monkeypatch.setattr("loda_cli.scoring.score_paths", score_paths)
    result = invoke("cull", "wedding", "--below", "0.5", "--model", "tiny", "--apply")
    assert result.exit_code == 0, result.output
    assert calls["model"] == "tiny" and calls["exclude"] == ("_culled",)
    assert (shoot.root / "_culled" / "IMG_3.jpg").exists() and (shoot.root / "IMG_4.jpg").exists()


# --- paths and security --------------------------------------------------------------------------


def test_scores_cannot_reach_outside_the_roots(shoot):
    outside = write(shoot.tmp / "outside.jpg", photo_bytes(77))
    elsewhere = write(shoot.tmp / "elsewhere" / "x.jpg", photo_bytes(78))
    os.symlink(outside, shoot.root / "link.jpg")
    os.symlink(elsewhere.parent, shoot.root / "linkdir")
    rows = [("/etc/passwd", 0.0), ("wedding/../outside.jpg", 0.0), (str(outside), 0.0), ("wedding/link.jpg", 0.0),
            ("wedding/linkdir/x.jpg", 0.0), ("../../outside.jpg", 0.0), ("wedding/ceremony/../../outside.jpg", 0.0)]
    scores = write_scores(shoot.tmp / "evil.csv", rows)
    before = snapshot(shoot.tmp, skip_loda=False)
    for mode in ([], ["--copy"], ["--link"]):
        result = invoke("cull", "wedding", "--below", "0.5", "--scores", scores, "--apply", *mode)
        assert result.exit_code == 0, result.output
        assert "Nothing to do" in result.output
    assert snapshot(shoot.tmp, skip_loda=False) == before
    assert os.path.exists("/etc/passwd")
    plan_skips = organize.collect_groups([str(shoot.root.resolve())], organize.load_scores([], scores))[1]
    reasons = {s.path: s.reason for s in plan_skips}
    assert "outside" in reasons["/etc/passwd"] and "symlink" in reasons["wedding/link.jpg"]
    assert "outside" in reasons["wedding/linkdir/x.jpg"] and "outside" in reasons["wedding/../outside.jpg"]


def test_a_symlinked_companion_keeps_its_group_in_place(shoot):
    target = write(shoot.tmp / "elsewhere.xmp", b"not yours")
    os.symlink(target, shoot.root / "IMG_3.xmp")
    scores = write_scores(shoot.tmp / "s.csv", [("wedding/IMG_3.jpg", 0.0)])
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", scores, "--apply")
    assert "companion file is a symlink" in result.output
    assert (shoot.root / "IMG_3.jpg").exists() and target.read_bytes() == b"not yours"


def test_a_culled_folder_that_is_a_symlink_is_refused(shoot):
    os.symlink(shoot.tmp, shoot.root / "_culled")
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 1 and "symlink" in result.output
    assert (shoot.root / "IMG_1.JPG").exists()


def _journal(folder: Path | None = None) -> Path:
    """The newest journal; they all live in $LODA_HOME/journals (issue 16.13), whatever the folder."""
    from loda_cli import organize

    return sorted(Path(organize.journals_dir()).glob(".loda-journal-*.jsonl"))[-1]


def _edit_journal(path: Path, edit) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(r)) + "\n" for r in lines))


@pytest.mark.parametrize("evil", [b"../../outside.jpg", b"/etc/passwd", b"a/../../../x"])
def test_undo_refuses_a_journal_edited_to_point_outside_its_roots(shoot, evil):
    outside = write(shoot.tmp / "outside.jpg", photo_bytes(3))  # same bytes as IMG_3
    ok("cull", "wedding", "--worst", "3", "--scores", shoot.scores, "--apply")
    journal = _journal(shoot.root / "_culled")

    def edit(record):
        if record.get("type") == "intent" and record["id"] == 0:
            record["src"][2] = base64.b64encode(evil).decode()
        return record

    _edit_journal(journal, edit)
    before = snapshot(shoot.tmp, skip_loda=False)
    result = invoke("undo", journal)
    assert result.exit_code == 1 and "outside" in result.output
    assert snapshot(shoot.tmp, skip_loda=False) == before
    assert outside.read_bytes() == photo_bytes(3)
    with pytest.raises(UnsafePathError):
        organize.plan_undo(journal)


def test_undo_refuses_a_journal_whose_roots_were_edited_or_that_sits_elsewhere(shoot):
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    journal = _journal(shoot.root / "_culled")
    moved = shoot.tmp / "moved.jsonl"
    shutil.copy(journal, moved)
    with pytest.raises(UnsafePathError):
        organize.plan_undo(moved)

    def edit(record):
        if record.get("type") == "header":
            record["roots"] = [base64.b64encode(b"/etc").decode()]
        return record

    _edit_journal(journal, edit)
    with pytest.raises(UnsafePathError):
        organize.plan_undo(journal)


def test_undo_never_picks_up_a_journal_that_arrived_among_the_photos(shoot):
    """A journal says where files go and what to write. One that came with a folder of photos (a
    download, a client's zip) is not loda's own: `loda undo` does not find it, and named by its
    path it may rewrite nothing but an XMP sidecar."""
    victim = shoot.tmp / "home"
    victim.mkdir()
    ok("rate", "wedding", "--scores", shoot.scores, "--apply")
    real = _journal()
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731

    def hostile(record):
        if record.get("type") == "header":
            record.update(command="sort", dests=[b64(os.fsencode(victim))])
        elif record.get("kind") == "write":
            record.update(path=["d", 0, b64(b".bash_aliases")], old=b64(b"echo pwned\n"))
        return record

    stranger = shoot.root / ".loda-journal-29990101T000000000000Z.jsonl"  # newer than any run
    stranger.write_text("".join(json.dumps(hostile(json.loads(line))) + "\n" for line in real.read_text().splitlines()))
    ok("undo")  # the real run, not the stranger
    result = ok("undo")
    assert "Nothing left to undo" in result.output and stranger.name not in result.output
    result = invoke("undo", stranger)
    assert result.exit_code != 0 and "not an XMP sidecar; refusing to undo" in " ".join(result.output.split())
    assert not (victim / ".bash_aliases").exists()

    # A journal of loda's own, copied among the photos and named there, is followed, with a word.
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    copy = shoot.root / "_culled" / "kept.jsonl"
    shutil.move(_journal(), copy)
    result = ok("undo", copy)
    assert "not in loda's journal folder; undo follows it because you named it" in " ".join(result.output.split())
    copy.unlink()
    assert snapshot(shoot.root) == before


@pytest.mark.parametrize("damage", [
    lambda r: {**r, "size": float("inf")} if r.get("type") == "intent" else r,
    lambda r: {**r, "roots": [base64.b64encode(b"/a\x00b").decode()]} if r.get("type") == "header" else r,
    lambda r: {**r, "tmp": base64.b64encode(b".loda-tmp-" + b"x" * 300).decode()} if r.get("type") == "intent" else r,
    lambda r: {**r, "dst": [r["dst"][0], r["dst"][1], base64.b64encode(b"y" * 300).decode()]}
    if r.get("type") == "intent" else r,
], ids=["infinite-size", "nul-in-root", "long-tmp-name", "long-name"])
def test_a_damaged_journal_is_one_line_and_does_not_hide_the_others(shoot, damage):
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    journal = _journal()
    text = journal.read_text()
    journal.write_text("".join(json.dumps(damage(json.loads(line)), allow_nan=True) + "\n" for line in text.splitlines()))
    result = invoke("undo", journal)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.count("\n") <= 2, result.output
    newer = journal.with_name(".loda-journal-29990101T000000000000Z.jsonl")
    journal.rename(newer)  # the damaged journal is now the newest; the next run's undo still works
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    assert "Restored" in ok("undo").output


@pytest.mark.parametrize("header", ['{"type":"header","dests":null}', "[" * 100_000, '{"type":"header","dests":[5]}'],
                         ids=["null-dests", "deep-nesting", "number-dest"])
def test_a_damaged_journal_hides_no_folder_from_scoring(shoot, header):
    """`loda score` leaves out the folders live runs filled, read from every journal; one
    damaged journal must not stop it."""
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    broken = Path(organize.journals_dir()) / ".loda-journal-20000101T000000000000Z.jsonl"
    broken.write_text(header + "\n")
    assert organize.own_folders([shoot.root]) == [str(shoot.root / "_culled")]


@pytest.mark.parametrize("text", ['{"header": {"cwd": "/", "roots": 5}, "rows": []}', "[" * 100_000,
                                  '{"header": 1}\n' + "[" * 100_000 + "\n{}"], ids=["number-roots", "deep-json", "deep-jsonl"])
def test_a_hostile_scores_file_gives_a_one_line_answer(shoot, text):
    bad = write(shoot.tmp / ("bad.jsonl" if "\n" in text else "bad.json"), text.encode())
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", bad)  # raises if it crashed
    assert result.exit_code == 0 or result.output.count("\n") <= 2, result.output


def test_undo_refuses_a_modified_destination_and_partial_restores_the_rest(shoot):
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    culled = shoot.root / "_culled"
    (culled / "IMG_2.heic").write_bytes(b"edited after the cull")
    state = snapshot(shoot.tmp, skip_loda=False)
    result = invoke("undo")
    assert result.exit_code == 1
    assert "changed after the move" in result.output and "nothing was changed" in result.output
    assert snapshot(shoot.tmp, skip_loda=False) == state

    result = invoke("undo", "--partial")
    assert result.exit_code == 0, result.output
    assert "left alone" in result.output
    after = snapshot(shoot.root)
    assert (culled / "IMG_2.heic").read_bytes() == b"edited after the cull"
    for rel, value in before.items():
        if rel != b"IMG_2.heic":
            assert after[rel] == value, rel


def test_undo_refuses_when_the_original_path_is_occupied(shoot):
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    write(shoot.root / "IMG_1.JPG", b"a new photo with the old name")
    result = invoke("undo", "--dry-run")
    assert result.exit_code == 0 and "conflicts" in result.output and "occupied" in result.output
    # The dry run says what the real run will do: refuse everything, not only the conflict.
    out = " ".join(result.output.split())
    assert "left alone" not in out
    assert "`loda undo` would change nothing while 1 entry conflicts;" in out and "--partial" in out
    partial = " ".join(invoke("undo", "--dry-run", "--partial").output.split())
    assert "conflicts (left alone)" in partial and "would change nothing" not in partial
    result = invoke("undo")
    assert result.exit_code == 1
    assert (shoot.root / "IMG_1.JPG").read_bytes() == b"a new photo with the old name"
    assert (shoot.root / "_culled" / "IMG_1.JPG").read_bytes() == shoot.files["IMG_1.JPG"]
    assert (shoot.root / "_culled" / "IMG_1.CR2").exists()  # nothing moved back: all or nothing


def test_undo_keeps_a_copy_whose_original_is_gone(shoot):
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--copy", "--apply")
    (shoot.root / "IMG_1.JPG").unlink()  # the user deleted the original after copying
    result = invoke("undo", "--partial")
    assert result.exit_code == 0
    assert (shoot.root / "_culled" / "IMG_1.JPG").read_bytes() == shoot.files["IMG_1.JPG"]


def test_journal_with_half_a_last_line_is_undoable_and_a_damaged_middle_line_is_refused(shoot):
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    journal = _journal(shoot.root / "_culled")
    data = journal.read_bytes()
    lines = data.split(b"\n")
    damaged = b"\n".join(lines[:3] + [b"{garbage"] + lines[3:])
    journal.write_bytes(damaged)
    with pytest.raises(JournalError, match="damaged"):
        organize.plan_undo(journal)
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: last_start + (len(data) - last_start) // 2])
    result = invoke("undo", journal)
    assert result.exit_code == 0, result.output
    assert "cut short" in result.output
    assert snapshot(shoot.root) == before


def test_undo_of_a_journal_that_recorded_no_step_prints_no_empty_plan(shoot):
    """A run killed right after its journal's header: nothing to undo, and in a log or a pipe no
    empty plan table stretched to the unwrapped width (it printed 10,000-column borders)."""
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    journal = _journal(shoot.root / "_culled")
    header = journal.read_bytes().split(b"\n")[0]
    journal.write_bytes(header + b"\n" + b'{"id": 1, "op"')  # the first step cut short
    result = invoke("undo", journal)
    assert result.exit_code == 0, result.output
    assert "Restored 0" in result.output and "undo plan" not in result.output
    assert max(len(line) for line in result.output.splitlines()) < 300
    assert any((shoot.root / "_culled").glob("IMG_*"))  # undo acts only on what was journalled


# --- preflight and cross-device -------------------------------------------------------------------


def test_preflight_read_only_destination_moves_nothing(shoot, monkeypatch):
    dest = shoot.tmp / "ro"
    dest.mkdir()
    dest.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere; make the check see what a user would
        real = apply_module._writable
        monkeypatch.setattr(apply_module, "_writable", lambda folder: False if Path(folder) == dest else real(folder))
    before = snapshot(shoot.tmp, skip_loda=False)
    result = invoke("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--to", dest, "--apply")
    dest.chmod(0o755)
    assert result.exit_code == 1 and "no permission" in result.output and "nothing was changed" in result.output
    assert snapshot(shoot.tmp, skip_loda=False) == before


def test_preflight_not_enough_space_moves_nothing(shoot, monkeypatch):
    monkeypatch.setattr(apply_module.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1, used=1, free=1000))
    before = snapshot(shoot.tmp, skip_loda=False)
    result = invoke("sort", "wedding", "--into", shoot.tmp / "sorted", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 1 and "not enough free space" in result.output
    assert snapshot(shoot.tmp, skip_loda=False) == before


def _other_device_dir(tmp_path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    return shm


def test_cross_device_cull_copies_verifies_then_removes_and_undo_brings_back(shoot):
    shm = _other_device_dir(shoot.tmp)
    if shm is None:
        pytest.skip("no second filesystem to move across")
    dest = Path(shm) / f"loda-test-{os.getpid()}-{shoot.tmp.name}"
    try:
        before = snapshot(shoot.root)
        result = invoke("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--to", dest, "--apply")
        assert result.exit_code == 0, result.output
        assert (dest / "IMG_1.CR2").read_bytes() == shoot.files["IMG_1.CR2"]
        assert not (shoot.root / "IMG_1.CR2").exists()
        records = [json.loads(line) for line in _journal(dest).read_text().splitlines()]
        assert sum(r["type"] == "verified" for r in records) == 10  # every file checked before removal
        assert not list(dest.rglob(".loda-tmp-*"))
        ok("undo", _journal(dest))
        assert snapshot(shoot.root) == before
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# --- what a journal knows of a file, and what cull and undo read ---------------------------------


class _WatchedFile:
    """A file object whose every read is passed to ``on_read`` (to count or to interfere)."""

    def __init__(self, fh, on_read):
        self.fh, self.on_read = fh, on_read

    def read(self, n=-1):
        data = self.fh.read(n)
        self.on_read(data)
        return data

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _count_reads(monkeypatch) -> list[int]:
    """Bytes read through ``open`` inside fileops, one entry per read: the photos' content."""
    reads: list[int] = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return _WatchedFile(fh, lambda data: reads.append(len(data))) if "r" in mode else fh

    monkeypatch.setattr(fileops, "open", counting_open, raising=False)
    return reads


def test_a_cull_on_one_disk_and_its_undo_read_no_photo_whole(shoot, monkeypatch):
    """A cull journals each file by size, time and its first and last 64 KiB, and renames it; its
    undo recognises the files by size and time: 5,000 RAWs are not read (125 GB) either way."""
    write(shoot.root / "IMG_1.CR2", os.urandom(3 << 20))  # a RAW-sized file
    before = snapshot(shoot.root)
    reads = _count_reads(monkeypatch)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    records = [json.loads(line) for line in _journal().read_text().splitlines()]
    intents = [r for r in records if r["type"] == "intent"]
    assert records[0]["version"] == 2 and len(intents) == 10
    assert all(r["mtime_ns"] > 0 and len(r["sample"]) == 64 and "sha256" not in r for r in intents)
    assert 0 < sum(reads) <= len(intents) * 2 * fileops.SAMPLE_BYTES
    assert max(reads) <= fileops.SAMPLE_BYTES
    reads.clear()
    ok("undo")
    assert sum(reads) == 0
    assert snapshot(shoot.root) == before


def test_undo_puts_back_a_file_whose_time_alone_changed_and_refuses_one_whose_ends_changed(shoot):
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    culled = shoot.root / "_culled"
    os.utime(culled / "IMG_1.JPG", ns=(1, 1))  # touched: same bytes, recognised by the sample
    edited = bytearray(shoot.files["IMG_2.heic"])
    edited[-1] ^= 0xFF  # same size, a new last byte, a new time
    (culled / "IMG_2.heic").write_bytes(bytes(edited))
    result = invoke("undo")
    assert result.exit_code == 1 and "IMG_2.heic was changed after the move" in " ".join(result.output.split())
    ok("undo", "--partial")
    after = snapshot(shoot.root)
    assert after[b"IMG_1.JPG"] == before[b"IMG_1.JPG"]
    assert (culled / "IMG_2.heic").read_bytes() == bytes(edited) and b"IMG_2.heic" not in after


def _flip_middle_byte_keeping_size_and_time(path: Path, data: bytes | None = None) -> bytes:
    """Write ``data`` (default: the file's own bytes) with its middle byte flipped to ``path``,
    then give it back its modification time: what only a byte comparison can tell."""
    changed = bytearray(path.read_bytes() if data is None else data)
    changed[len(changed) // 2] ^= 0xFF
    stamp = path.stat().st_mtime_ns
    path.write_bytes(bytes(changed))
    os.utime(path, ns=(stamp, stamp))
    return bytes(changed)


def test_undo_removes_a_copy_or_duplicate_only_when_its_bytes_equal_the_original(shoot):
    """Size, time and sample say which file is which; only a byte-for-byte comparison lets undo
    remove one. Here the copies keep their size and time but a middle byte differs."""
    ok("cull", "wedding", "--worst", "2", "--scores", shoot.scores, "--copy", "--apply")
    culled = shoot.root / "_culled"
    copy = culled / "IMG_1.CR2"
    data = _flip_middle_byte_keeping_size_and_time(copy)
    result = invoke("undo")
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "no longer holds the same bytes" in out
    ok("undo", "--partial")
    assert copy.read_bytes() == data  # kept: it is not a copy of the original any more
    assert (shoot.root / "IMG_1.CR2").read_bytes() == shoot.files["IMG_1.CR2"]
    assert not (culled / "IMG_1.JPG").exists()  # the true copies were removed

    # A moved file whose original name holds a file of the same size and time: removed as a
    # duplicate only when the bytes are equal.
    copy.unlink()
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    moved, original = culled / "IMG_1.JPG", shoot.root / "IMG_1.JPG"
    shutil.copy2(moved, original)
    other = _flip_middle_byte_keeping_size_and_time(original)
    result = invoke("undo")
    assert result.exit_code == 1 and "is not an identical second copy; both stay" in " ".join(result.output.split())
    assert moved.exists() and original.read_bytes() == other
    _flip_middle_byte_keeping_size_and_time(original)  # flipped back: the same bytes again
    steps = {s.entry.dst: s.action for s in organize.plan_undo(_journal()).steps}
    assert steps[str(moved)] == "remove-duplicate"


def test_the_sample_covers_the_size_and_both_ends_and_a_copy_is_checked_whole(tmp_path, monkeypatch):
    from loda_cli.errors import OutputError
    from loda_cli.organize.paths import Skipped

    big = bytearray(os.urandom(3 * fileops.SAMPLE_BYTES))
    src = write(tmp_path / "a.raw", bytes(big))
    first = fileops.sample_sha256(str(src))
    big[len(big) // 2] ^= 1  # the middle is not sampled (undo never removes on the sample alone)
    src.write_bytes(bytes(big))
    assert fileops.sample_sha256(str(src)) == first
    for where in (0, -1):
        changed = bytearray(big)
        changed[where] ^= 1
        src.write_bytes(bytes(changed))
        assert fileops.sample_sha256(str(src)) != first
    src.write_bytes(bytes(big) + b"x")
    assert fileops.sample_sha256(str(src)) != first
    src.write_bytes(bytes(big))

    st = src.stat()
    tmp, dst = str(tmp_path / ".loda-tmp-x"), str(tmp_path / "b.raw")
    with pytest.raises(Skipped):  # the journal's time is not the file's
        fileops.copy_verified(str(src), dst, st.st_size, "", tmp, mtime_ns=st.st_mtime_ns + 1)
    with pytest.raises(Skipped):  # nor its size
        fileops.copy_verified(str(src), dst, st.st_size + 1, "", tmp, mtime_ns=st.st_mtime_ns)
    with pytest.raises(Skipped):  # nor its whole-file hash (version 1)
        fileops.copy_verified(str(src), dst, st.st_size, "0" * 64, tmp)
    real_hash = fileops.sha256_file
    monkeypatch.setattr(fileops, "sha256_file", lambda path: "0" * 64)
    with pytest.raises(OutputError, match="does not read back identical"):
        fileops.copy_verified(str(src), dst, st.st_size, "", tmp, mtime_ns=st.st_mtime_ns)
    monkeypatch.setattr(fileops, "sha256_file", real_hash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.raw"]
    fileops.copy_verified(str(src), dst, st.st_size, "", tmp, mtime_ns=st.st_mtime_ns)
    assert Path(dst).read_bytes() == bytes(big) and Path(dst).stat().st_mtime_ns == st.st_mtime_ns


def test_undo_of_copies_reads_each_file_once_and_still_sees_a_change_after_planning(shoot, monkeypatch):
    """The byte comparison made while planning is reused while acting only for files unchanged
    since (inode, size, times including the change time, which no program sets back)."""
    import time

    from loda_cli.organize import undo as undo_module

    monkeypatch.setattr(undo_module, "_SETTLED_NS", -10**12)  # the test's files are seconds old
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--copy", "--apply")
    copies = [p for p in (shoot.root / "_culled").rglob("*") if p.is_file()]
    reads = _count_reads(monkeypatch)
    plan = organize.plan_undo(_journal())
    assert sum(reads) == 2 * sum(p.stat().st_size for p in copies)  # copy and original, once
    reads.clear()
    time.sleep(0.05)  # past the clock tick of the comparisons
    copy = shoot.root / "_culled" / "IMG_1.CR2"
    data = _flip_middle_byte_keeping_size_and_time(copy)  # only the change time moves on
    report = organize.apply_undo(plan, partial=True)
    assert sum(reads) == 2 * len(data)  # only the changed pair was read again
    assert [c.entry.dst for c in report.conflicts] == [str(copy)]
    assert copy.read_bytes() == data
    assert sorted(p.name for p in (shoot.root / "_culled").rglob("*") if p.is_file()) == ["IMG_1.CR2"]


def test_a_comparison_of_files_changed_within_the_last_second_is_not_remembered(tmp_path, monkeypatch):
    from loda_cli.organize import undo as undo_module

    a, b = write(tmp_path / "a", b"same bytes"), write(tmp_path / "b", b"same bytes")
    reads = _count_reads(monkeypatch)
    comparisons = undo_module.Comparisons()
    assert comparisons.same(str(a), str(b)) and comparisons.same(str(a), str(b))
    assert sum(reads) == 4 * len(b"same bytes") and not comparisons.known


def test_a_photo_dated_before_1970_is_journalled_and_undone(shoot):
    """Scans dated from their capture (exiftool "-FileModifyDate<DateTimeOriginal") can be older
    than 1970: a negative modification time."""
    before = snapshot(shoot.root)
    old = -(5 * 365 * 86400 * 10**9)  # 1965
    os.utime(shoot.root / "IMG_1.JPG", ns=(old, old))
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    intent = [json.loads(line) for line in _journal().read_text().splitlines()
              if '"intent"' in line and "IMG_1.JPG" in line][0]
    assert intent["mtime_ns"] == old
    ok("undo")
    assert snapshot(shoot.root) == before
    assert (shoot.root / "IMG_1.JPG").stat().st_mtime_ns == old


def test_same_content_compares_every_byte_and_never_calls_one_name_two_copies(tmp_path):
    data = bytearray(os.urandom(3 * (1 << 20) + 5))
    a, b = write(tmp_path / "a.raw", bytes(data)), write(tmp_path / "b.raw", bytes(data))
    assert fileops.same_content(str(a), str(b))
    data[len(data) // 2] ^= 1  # past the first chunk read
    b.write_bytes(bytes(data))
    assert not fileops.same_content(str(a), str(b))
    data[-1] ^= 1
    assert not fileops.same_content(str(a), str(tmp_path / "missing"))
    os.link(a, tmp_path / "c.raw")  # two names of one file, as a move halfway leaves them
    assert fileops.same_content(str(a), str(tmp_path / "c.raw"))
    os.unlink(tmp_path / "c.raw")
    (tmp_path / "alias").symlink_to(tmp_path)  # one name reached two ways, like IMG.jpg / img.jpg
    assert not fileops.same_content(str(a), str(tmp_path / "alias" / "a.raw"))
    assert not fileops.same_content(str(a), str(a))


def test_a_source_rewritten_during_a_copy_with_its_time_kept_is_not_moved(tmp_path, monkeypatch):
    """A writer that changes a file while it is copied and keeps its time (a 2-second FAT clock,
    a late mmap time update) would leave a torn copy; the source read again shows it."""
    from loda_cli.organize.paths import Skipped

    data = os.urandom(3 * (1 << 20))
    src = write(tmp_path / "a.raw", data)
    st = src.stat()
    real_open = open

    def rewrite_once(data):
        if not opened[1:]:  # after the first chunk: rewrite the part already copied
            opened.append("rewritten")
            with real_open(src, "r+b") as out:
                out.write(os.urandom(1 << 20))
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))

    opened = []

    def rewriting_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if path == str(src) and not opened:  # the copy's read of the source
            opened.append(path)
            return _WatchedFile(fh, rewrite_once)
        return fh

    monkeypatch.setattr(fileops, "open", rewriting_open, raising=False)
    tmp, dst = str(tmp_path / ".loda-tmp-x"), str(tmp_path / "b.raw")
    with pytest.raises(Skipped, match="changed while it was copied"):
        fileops.copy_verified(str(src), dst, st.st_size, "", tmp, mtime_ns=st.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.raw"]


def test_a_version_1_journal_with_whole_file_hashes_still_undoes(shoot):
    """Journals written before version 2 record each file's SHA-256; undo checks it."""
    import hashlib

    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    journal = _journal()
    culled = shoot.root / "_culled"

    def to_version_1(record):
        if record["type"] == "header":
            record["version"] = 1
        if record["type"] == "intent" and record["kind"] == "move":
            rel = os.fsdecode(base64.b64decode(record["dst"][2]))
            record["sha256"] = hashlib.sha256((culled / rel).read_bytes()).hexdigest()
            if rel == "IMG_2.heic":
                record["sha256"] = "0" * 64  # not the file's hash: undo must refuse it
            del record["mtime_ns"], record["sample"]
        return record

    _edit_journal(journal, to_version_1)
    result = invoke("undo")
    assert result.exit_code == 1 and "IMG_2.heic was changed after the move" in " ".join(result.output.split())
    ok("undo", "--partial")
    after = snapshot(shoot.root)
    assert all(after[k] == v for k, v in before.items() if not k.startswith(b"IMG_2.heic"))
    assert (culled / "IMG_2.heic").exists()


def test_a_journal_of_a_newer_version_or_without_fingerprints_is_refused(shoot):
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    journal = _journal()
    original = journal.read_text()
    _edit_journal(journal, lambda r: {**r, "version": 3} if r["type"] == "header" else r)
    with pytest.raises(JournalError, match="journal version 3; this loda reads 1 and 2"):
        organize.plan_undo(journal)
    journal.write_text(original)
    _edit_journal(journal, lambda r: {k: v for k, v in r.items() if k != "sample"})
    with pytest.raises(JournalError, match="damaged intent record"):
        organize.plan_undo(journal)
    journal.write_text(original)
    ok("undo")


# --- odd names -------------------------------------------------------------------------------------


def test_names_with_newlines_quotes_and_non_utf8_bytes_round_trip(shoot):
    names = [b"new\nline.jpg", b'quote"s,comma.jpg', b"caf\xe9-latin1.jpg", b"-leading-dash.jpg", b"\xff\xfe.jpg"]
    root = os.fsencode(shoot.root)
    for i, name in enumerate(names):
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(photo_bytes(100 + i))
    before = snapshot(shoot.root)
    rows = [(os.fsdecode(b"wedding/" + n), 0.01) for n in names]
    for fmt in ("csv", "json"):
        scores = write_scores(shoot.tmp / f"odd.{fmt}", rows, fmt=fmt)
        result = invoke("cull", "wedding", "--below", "0.05", "--scores", scores, "--apply")
        assert result.exit_code == 0, result.output
        for name in names:
            assert os.path.exists(os.path.join(root, b"_culled", name))
        result = invoke("undo")
        assert result.exit_code == 0, result.output
        assert snapshot(shoot.root) == before


# --- sort -------------------------------------------------------------------------------------------


def test_sort_copies_into_star_folders_and_undo_removes_the_copies(shoot):
    before = snapshot(shoot.tmp, skip_loda=False)
    sorted_dir = shoot.tmp / "sorted"
    dry = invoke("sort", "wedding", "--into", sorted_dir, "--scores", shoot.scores)
    assert dry.exit_code == 0 and "Dry run" in dry.output and not sorted_dir.exists()
    result = invoke("sort", "wedding", "--into", sorted_dir, "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    expect = {"1-star/IMG_1.JPG", "1-star/IMG_1.CR2", "2-stars/IMG_2.heic", "2-stars/IMG_2.MOV", "5-stars/IMG_3.jpg",
              "3-stars/IMG_4.jpg", "4-stars/IMG_40.jpg", "2-stars/ceremony/IMG_5.jpg", "2-stars/ceremony/IMG_5.nef",
              "5-stars/ceremony/IMG_6.jpg"}
    for rel in expect:
        src = rel.split("/", 1)[1]
        assert (sorted_dir / rel).read_bytes() == shoot.files[src], rel
    assert originals(snapshot(shoot.root)) == originals(snapshot(shoot.root))
    ok("undo", _journal(sorted_dir))
    after = snapshot(shoot.tmp, skip_loda=False)
    leftovers = {k for k in after if k not in before}
    assert not leftovers, leftovers  # the star folders and --into itself are gone


def test_sorting_or_copy_culling_again_adds_no_duplicates_and_a_changed_photo_is_copied_anew(shoot):
    sorted_dir = shoot.tmp / "sorted"
    ok("sort", "wedding", "--into", sorted_dir, "--scores", shoot.scores, "--apply")
    first = snapshot(sorted_dir)
    again = ok("sort", "wedding", "--into", sorted_dir, "--scores", shoot.scores, "--apply")
    assert "already copied there" in again.output and "Nothing to do" in again.output
    assert "(all 7 scored photos)" in again.output  # the bins count the photos left alone too
    assert snapshot(sorted_dir) == first  # no IMG_1-1.JPG copies of the whole library
    # A photo edited since (new time) is a new version: copied beside the old one, never over it.
    os.utime(shoot.root / "IMG_3.jpg", ns=(1_000_000_000, 1_000_000_000))
    ok("sort", "wedding", "--into", sorted_dir, "--scores", shoot.scores, "--apply")
    assert (sorted_dir / "5-stars" / "IMG_3-1.jpg").read_bytes() == shoot.files["IMG_3.jpg"]
    assert snapshot(sorted_dir, skip_loda=True).items() >= first.items()

    for mode in ("--copy", "--link"):
        to = shoot.tmp / f"culled{mode}"
        ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, mode, "--to", to, "--apply")
        made = snapshot(to)
        repeat = ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, mode, "--to", to, "--apply")
        assert "already" in repeat.output and "Nothing to do" in repeat.output, repeat.output
        assert snapshot(to) == made


def test_sort_move_edges_and_quantiles(shoot):
    before = snapshot(shoot.root)
    sorted_dir = shoot.tmp / "s"
    result = invoke("sort", "wedding", "--into", sorted_dir, "--move", "--edges", "0.5,0.6,0.7,0.8",
                    "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    assert (sorted_dir / "1-star" / "IMG_1.JPG").exists() and not (shoot.root / "IMG_1.JPG").exists()
    assert (sorted_dir / "2-stars" / "IMG_4.jpg").exists()
    assert (sorted_dir / "4-stars" / "IMG_40.jpg").exists()  # 0.7 is on the edge: the higher bin
    assert (sorted_dir / "5-stars" / "IMG_3.jpg").exists()
    ok("undo", _journal(sorted_dir))
    assert snapshot(shoot.root) == before

    q = shoot.tmp / "q"
    ok("sort", "wedding", "--into", q, "--quantiles", "--scores", shoot.scores, "--apply")
    photos = {".jpg", ".heic"}
    counts = {d.name: sum(f.suffix.lower() in photos for f in d.rglob("*")) for d in q.iterdir() if d.is_dir()}
    assert sum(counts.values()) == 7 and max(counts.values()) <= 2
    assert invoke("sort", "wedding", "--into", q, "--edges", "0.5,0.4,0.6,0.8", "--scores", shoot.scores).exit_code == 2
    assert invoke("sort", "wedding", "--into", q, "--edges", "nope", "--scores", shoot.scores).exit_code == 2


def test_sort_into_a_folder_inside_the_root_skips_what_is_already_sorted(shoot):
    result = invoke("sort", "wedding", "--into", shoot.root / "stars", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0
    again_rows = [("wedding/stars/5-stars/IMG_3.jpg", 0.9)]
    scores = write_scores(shoot.tmp / "again.csv", again_rows)
    again = invoke("sort", "wedding", "--into", shoot.root / "stars", "--scores", scores, "--apply")
    assert "Nothing to do" in again.output


def test_cull_sort_and_rate_leave_out_the_folders_earlier_runs_filled_inside_the_library(shoot):
    """As `loda score` does: sorted copies inside the library are not culled, sorted again or
    rated, and the plan says which folder it left out; named as a path, such a folder is used."""
    ok("sort", "wedding", "--into", shoot.root / "Sorted", "--scores", shoot.scores, "--apply")
    rows = [(f"wedding/Sorted/{stars}/{name}", score) for stars, name, score in
            [("1-star", "IMG_1.JPG", 0.1), ("2-stars", "IMG_2.heic", 0.2), ("5-stars", "IMG_3.jpg", 0.9)]]
    both = write_scores(shoot.tmp / "both.csv", [("wedding/IMG_1.JPG", 0.1), ("wedding/IMG_3.jpg", 0.9), *rows])
    for command in (["cull", "wedding", "--below", "0.6"], ["sort", "wedding", "--into", shoot.root / "Sorted2"],
                    ["rate", "wedding"]):
        result = ok(*command, "--scores", both, "--list")
        out = " ".join(result.output.split())
        assert "Sorted/" not in out.replace("Sorted2/", ""), out
        assert "not acted on: loda's own folder" in out and "Sorted" in out
    named = ok("cull", shoot.root / "Sorted", "--below", "0.6", "--scores", both, "--list")
    assert "IMG_1.JPG" in named.output and "loda's own folder" not in named.output


def test_cull_or_sort_refuse_a_destination_inside_the_library_that_holds_photos(shoot):
    """`--to wedding/ceremony` would mix the culled photos with the ceremony's own, and the folder,
    now a loda destination, would drop out of every later score."""
    for command in (["cull", "wedding", "--below", "0.6", "--to", shoot.root / "ceremony"],
                    ["sort", "wedding", "--into", shoot.root / "ceremony"]):
        result = invoke(*command, "--scores", shoot.scores)
        assert result.exit_code == 2 and "already holds files of yours" in " ".join(result.output.split())
    (shoot.root / "rejects").mkdir()
    (shoot.root / "rejects" / ".DS_Store").write_bytes(b"")
    ok("cull", "wedding", "--below", "0.4", "--to", shoot.root / "rejects", "--scores", shoot.scores, "--apply")
    # Its own destination, not undone yet, takes a second cull.
    ok("cull", "wedding", "--below", "0.6", "--to", shoot.root / "rejects", "--scores", shoot.scores)


def test_a_plan_from_a_scores_file_counts_the_photos_it_does_not_list(shoot):
    """A scores file made before photos were added leaves them alone; the plan says how many."""
    stale = write_scores(shoot.tmp / "stale.csv", [("wedding/IMG_1.JPG", 0.1), ("wedding/IMG_3.jpg", 0.9),
                                                   ("wedding/IMG_2.heic", 0.2), ("wedding/IMG_4.jpg", 0.5)])
    out = " ".join(ok("cull", "wedding", "--below", "0.6", "--scores", stale).output.split())
    # IMG_40, ceremony/IMG_5.jpg, its .nef (no scored photo to go with) and IMG_6; IMG_1.CR2 goes with IMG_1.JPG
    assert "not in the scores file │ 4 │" in out
    full = " ".join(ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores).output.split())
    assert "not in the scores file" not in full


def test_a_scores_file_without_rows_or_a_photo_given_as_one_is_a_one_line_error(shoot):
    empty = write(shoot.tmp / "empty.csv", b"path,score\n")
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", empty)
    assert result.exit_code == 2 and "lists no photos" in result.output
    photo = shoot.root / "IMG_3.jpg"
    for command in (["cull", "wedding", "--below", "0.5", "--scores", photo], ["review", photo]):
        result = invoke(*command)
        assert result.exit_code == 2 and "is a photo, not a scores file" in " ".join(result.output.split())


def test_a_row_without_a_usable_score_is_counted_with_an_example(shoot):
    odd = write(shoot.tmp / "odd.csv", b"path,score\nwedding/IMG_1.JPG,0.1\nwedding/IMG_3.jpg,high\nwedding/IMG_4.jpg,7\n")
    out = " ".join(ok("cull", "wedding", "--below", "0.5", "--scores", odd).output.split())
    assert "no usable score in the scores file │ 2 │ wedding/IMG_3.jpg" in out


def test_previews_of_a_review_page_inside_the_library_are_never_culled(shoot):
    thumbs = shoot.root / "review_files"
    thumbs.mkdir()
    (thumbs / ".loda-review").write_text("loda review")
    write(thumbs / "09b03664.jpg", photo_bytes(7))
    scores = write_scores(shoot.tmp / "with-previews.csv", [("wedding/review_files/09b03664.jpg", 0.01),
                                                            ("wedding/IMG_1.JPG", 0.1)])
    result = ok("cull", "wedding", "--below", "0.5", "--scores", scores, "--list")
    assert "IMG_1.JPG" in result.output and "09b03664" not in result.output.split("not acted on")[0]


# --- rate --------------------------------------------------------------------------------------------


def test_rate_writes_both_sidecar_styles_keeps_human_ratings_and_undo_restores(shoot):
    """--sidecar both; a person's rating in one naming keeps loda out of the other (issue 16.1)."""
    from loda_cli import xmp

    human = xmp.new_sidecar(5).replace(b' loda:Rating="5"', b"").replace(b'\n    loda:Rating="5"', b"")
    write(shoot.root / "IMG_4.xmp", human)
    assert xmp.read_state(human).rating_set_by_person
    before = snapshot(shoot.root)
    dry = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "both")
    assert dry.exit_code == 0 and "Dry run" in dry.output and snapshot(shoot.root) == before

    result = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "both", "--label", "Red",
                    "--apply")
    assert result.exit_code == 0, result.output
    state = lambda name: xmp.read_state((shoot.root / name).read_bytes())  # noqa: E731
    assert state("IMG_3.jpg.xmp").rating == 5 and state("IMG_3.xmp").rating == 5
    assert state("IMG_40.jpg.xmp").rating == 4
    assert state("ceremony/IMG_5.nef.xmp").rating == 2 and state("ceremony/IMG_5.jpg.xmp").rating == 2
    assert state("IMG_2.heic.xmp").rating == 2
    assert state("IMG_4.xmp").rating == 5  # a person's rating is kept
    assert not (shoot.root / "IMG_4.jpg.xmp").exists()  # the other naming must not contradict it
    assert "set by a person" in result.output
    # existing non-XMP sidecars (IMG_1.CR2.xmp is XMP, IMG_1.xmp is not) are never rewritten
    assert state("IMG_1.CR2.xmp").rating == 1 and state("IMG_1.CR2.xmp").label == "Red"
    assert (shoot.root / "IMG_1.xmp").read_bytes() == shoot.files["IMG_1.xmp"]
    assert state("IMG_3.xmp").label is None

    ok("undo", _journal(shoot.root))
    assert snapshot(shoot.root) == before

    forced = invoke("rate", "wedding", "--scores", shoot.scores, "--force", "--sidecar", "lightroom", "--apply")
    assert forced.exit_code == 0
    assert state("IMG_4.xmp").rating == 3 and not (shoot.root / "IMG_4.jpg.xmp").exists()
    ok("undo")
    assert (shoot.root / "IMG_4.xmp").read_bytes() == human


@pytest.mark.parametrize("run", [
    ("rate", "wedding", "--sidecar", "both", "--force"),
    ("cull", "wedding", "--below", "0.95", "--copy", "--to", "picked"),
    ("cull", "wedding", "--below", "0.95", "--link", "--to", "picked"),
])
def test_sidecars_copies_and_links_fsync_each_folder_once_a_batch_and_all_before_the_journal_ends(
    shoot, monkeypatch, run
):
    """Each sidecar or copy is fsynced before it is named; its folder once for many of them, and
    every folder after its last new name and before the journal's end record."""
    from loda_cli.organize import fileops
    from loda_cli.organize.journal import JournalWriter

    events: list[tuple[str, str]] = []
    real_sync, real_record = fileops.fsync_dir, JournalWriter.write

    def sync(folder):
        events.append(("sync", folder))
        return real_sync(folder)

    def recorded(name):
        real = getattr(fileops, name)

        def made(*args, **kwargs):
            real(*args, **kwargs)
            path = args[0] if name == "write_file" else args[1]  # (path, data) or (src, dst)
            events.append(("file", os.path.dirname(path)))
        return made

    def record(self, entry, sync=False):
        events.append((entry["type"], ""))
        return real_record(self, entry, sync=sync)

    monkeypatch.setattr(fileops, "fsync_dir", sync)
    for name in ("write_file", "copy_verified", "symlink"):
        monkeypatch.setattr(fileops, name, recorded(name))
    monkeypatch.setattr(JournalWriter, "write", record)
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 3)
    result = invoke(*run, "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    _assert_synced_in_batches(events, every=3, before=("end",))
    ok("undo", _journal(shoot.root))


def _assert_synced_in_batches(events: list[tuple[str, str]], every: int, before: tuple[str, ...]) -> None:
    """``events``: ("file", folder) for each name made or removed, ("sync", folder) for each folder
    fsync, and others. Fewer syncs than files; a sync after every ``every`` files; and each file's
    folder synced after it and before the first event of a kind in ``before``."""
    deadline = next(i for i, (kind, _) in enumerate(events) if kind in before)
    files = [i for i, (kind, _) in enumerate(events) if kind == "file"]
    syncs = [i for i in range(files[0], deadline) if events[i][0] == "sync"]
    assert len(files) >= 5 and len(syncs) < len(files), events  # not one a file
    for n in range(every, len(files), every):  # once a batch, not only at the end
        assert any(events[j][0] == "sync" for j in range(files[n - 1], files[n])), (n, events)
    for i in files:  # each change made durable by its folder's fsync before the deadline
        assert any(events[j] == ("sync", events[i][1]) for j in syncs if j > i), events



def test_moves_on_one_disk_make_new_names_durable_before_dropping_old_ones_a_batch_at_a_time(
    shoot, monkeypatch
):
    """Hard links for a batch of photos, their folders fsynced, then the old names dropped and
    their folders fsynced: two folder fsyncs a folder and batch, not two a photo, and no photo
    loses its old name before its new one is durable. Undo moves back the same way."""
    from loda_cli.organize.journal import JournalWriter

    events = _record_links_and_syncs(monkeypatch)
    real_record = JournalWriter.write
    monkeypatch.setattr(JournalWriter, "write", lambda self, entry, sync=False: (
        events.append((entry["type"], "")), real_record(self, entry, sync=sync))[1])
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    records = [json.loads(line) for line in _journal().read_text().splitlines()]
    intents = {r["id"]: r for r in records if r["type"] == "intent"}
    assert len(intents) == 11 and sum(r["type"] == "done" for r in records) == 11
    _assert_new_names_durable_before_old_ones_go(events, moves=11, batch=4)
    end = events.index(("end", ""))
    assert max(i for i, (kind, _) in enumerate(events) if kind in ("unlink", "sync")) < end
    culled = str(shoot.root / "_culled")
    assert all(path.startswith(culled) for kind, path in events if kind == "link")
    events.clear()
    ok("undo")
    assert snapshot(shoot.root) == before
    _assert_new_names_durable_before_old_ones_go(events, moves=11, batch=4)


def test_moves_without_hard_links_are_renames_whose_folders_are_fsynced_a_batch_at_a_time(shoot, monkeypatch):
    """exFAT and FAT have no hard links, so a move is a rename. Its new folder is fsynced before
    it is journalled as done, and its old folder before the run's end record, once a folder and
    batch instead of twice a photo. Ctrl-C first syncs the renames made; undo moves back the
    same way."""
    from loda_cli.organize.journal import JournalWriter

    events: list[tuple[str, str, str]] = []
    real_sync, real_rename = fileops.fsync_dir, fileops.rename_new

    def no_link(src, dst, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    def rename(src, dst):
        real_rename(src, dst)
        events.append(("rename", src, dst))

    monkeypatch.setattr(fileops.os, "link", no_link)
    monkeypatch.setattr(fileops, "rename_new", rename)
    monkeypatch.setattr(fileops, "fsync_dir", lambda folder: (events.append(("sync", folder, "")), real_sync(folder)))
    real_record = JournalWriter.write
    monkeypatch.setattr(JournalWriter, "write", lambda self, entry, sync=False: (
        events.append((entry["type"], "", "")), real_record(self, entry, sync=sync))[1])
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)

    def check_renames(moves: int, done: str, end: str) -> None:
        renames = [i for i, event in enumerate(events) if event[0] == "rename"]
        dones = [i for i, event in enumerate(events) if event[0] == done]
        assert len(renames) == len(dones) == moves
        assert sum(event[0] == "sync" for event in events) <= 2 * 2 * 3  # 2 folders each way, 3 batches
        assert renames[4] > dones[0] and renames[3] < dones[0]  # a batch of renames, then synced
        last = events.index((end, "", ""))
        for n, i in enumerate(renames):
            _, src, dst = events[i]
            assert ("sync", os.path.dirname(dst), "") in events[i:dones[n]], (n, events)
            assert ("sync", os.path.dirname(src), "") in events[i:last], (n, events)

    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    check_renames(11, "done", "end")
    events.clear()
    monkeypatch.setattr(JournalWriter, "write", real_record)
    real_append = undo_module.UndoLog.write
    monkeypatch.setattr(undo_module.UndoLog, "write", lambda self, entry, sync=False: (
        events.append((entry["type"], "", "")), real_append(self, entry, sync=sync))[1])
    ok("undo")
    assert snapshot(shoot.root) == before
    check_renames(11, "undone", "undo-end")

    real_perform = _ctrl_c_at_action(monkeypatch, 7)  # 4 renames synced as a batch, 2 made and waiting
    events.clear()
    assert invoke("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply").exit_code == 130
    records = [json.loads(line) for line in _journal().read_text().splitlines()]
    assert sum(r["type"] == "done" for r in records) == 6
    renamed = [event for event in events if event[0] == "rename"]
    assert len(renamed) == 6 and all(("sync", os.path.dirname(dst), "") in events for _, _, dst in renamed[4:])
    monkeypatch.setattr(apply_module, "_perform", real_perform)
    ok("undo")
    assert snapshot(shoot.root) == before


@pytest.mark.parametrize("exclusive", [True, False], ids=["renameat2", "look-then-rename"])
def test_a_rename_without_hard_links_never_replaces_a_file(tmp_path, monkeypatch, exclusive):
    """Where the system cannot refuse an existing name in the rename itself (FUSE, old kernels
    return EINVAL), loda looks first; either way a file at the destination stays."""
    if not exclusive:
        monkeypatch.setattr(fileops, "_renamer", lambda src, dst: 22)  # EINVAL
    elif fileops._exclusive_renamer()(str(tmp_path / "none"), str(tmp_path / "none2")) in (22, 38, 95):
        pytest.skip("no exclusive rename on this system")
    write(tmp_path / "a.jpg", b"moving")
    write(tmp_path / "b.jpg", b"already there")
    with pytest.raises(Skipped):
        fileops.rename_new(str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))
    assert (tmp_path / "a.jpg").read_bytes() == b"moving" and (tmp_path / "b.jpg").read_bytes() == b"already there"
    fileops.rename_new(str(tmp_path / "a.jpg"), str(tmp_path / "c.jpg"))
    assert (tmp_path / "c.jpg").read_bytes() == b"moving" and not (tmp_path / "a.jpg").exists()


def test_a_move_waits_at_most_a_second_for_its_batch(shoot, monkeypatch):
    """A run that also copies across disks (one by one) must not hold photos under two names
    for long: a pending move is finished once it has waited PENDING_SECONDS."""
    events = _record_links_and_syncs(monkeypatch)
    monkeypatch.setattr(fileops, "PENDING_SECONDS", 0.0)
    ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    _assert_new_names_durable_before_old_ones_go(events, moves=11, batch=1)


def test_a_photo_replaced_while_its_move_waits_keeps_both_versions(shoot, monkeypatch):
    """An editor saving a new version over a photo (a new file renamed over the old name) while
    the photo's move waits for its batch: the old name is not removed, both versions stay."""
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)
    real_perform, calls = apply_module._perform, []

    def editing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # IMG_1.JPG's move is made and waits: a new version is saved
            write(shoot.tmp / "saved.jpg", b"the edited version")
            os.replace(shoot.tmp / "saved.jpg", shoot.root / "IMG_1.JPG")
        return real_perform(*args, **kwargs)

    monkeypatch.setattr(apply_module, "_perform", editing)
    result = invoke("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    assert "replaced while it moved" in " ".join(result.output.split())
    assert (shoot.root / "IMG_1.JPG").read_bytes() == b"the edited version"
    assert (shoot.root / "_culled" / "IMG_1.JPG").read_bytes() == shoot.files["IMG_1.JPG"]
    monkeypatch.setattr(apply_module, "_perform", real_perform)
    result = invoke("undo", "--partial")
    assert result.exit_code == 0, result.output
    assert (shoot.root / "IMG_1.JPG").read_bytes() == b"the edited version"
    assert (shoot.root / "_culled" / "IMG_1.JPG").read_bytes() == shoot.files["IMG_1.JPG"]
    assert (shoot.root / "IMG_1.CR2").read_bytes() == shoot.files["IMG_1.CR2"]  # the rest went back


def test_a_run_stopped_by_an_error_first_finishes_the_moves_whose_names_are_made(shoot, monkeypatch):
    """So a second cull after fixing the problem does not find photos under two names (which
    would get second names in _culled)."""
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)
    real_link, links = os.link, []

    def failing_link(src, dst, *args, **kwargs):
        links.append(dst)
        if len(links) == 7:
            raise OSError(5, "Input/output error")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileops.os, "link", failing_link)
    before = snapshot(shoot.root)
    result = invoke("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 1 and "Input/output error; stopped" in " ".join(result.output.split())
    files = [p for p in shoot.root.rglob("*") if p.is_file()]
    assert all(p.stat().st_nlink == 1 for p in files)
    assert len([p for p in files if "_culled" in p.parts]) == 6
    monkeypatch.setattr(fileops.os, "link", real_link)
    ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    culled = [p for p in (shoot.root / "_culled").rglob("*") if p.is_file()]
    assert len(culled) > 6 and not any("-1." in p.name or p.stat().st_nlink != 1 for p in culled)
    ok("undo")
    ok("undo")
    assert snapshot(shoot.root) == before


def test_a_culled_photo_replaced_while_it_moves_back_keeps_both_versions(shoot, monkeypatch):
    ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    real_undo_one, steps = undo_module._undo_one, []

    def editing(step, unsynced, pending):
        steps.append(step)
        if len(steps) == 2:  # the first photo's old name is made again and waits: a new version
            write(shoot.tmp / "saved.bin", b"the edited version")
            os.replace(shoot.tmp / "saved.bin", steps[0].entry.dst)
        return real_undo_one(step, unsynced, pending)

    monkeypatch.setattr(undo_module, "_undo_one", editing)
    result = invoke("undo")
    assert result.exit_code == 1 and "left alone" in result.output
    first = steps[0].entry
    assert Path(first.dst).read_bytes() == b"the edited version"
    assert Path(first.src).read_bytes() == shoot.files[os.path.relpath(first.src, shoot.root)]


def test_undo_makes_a_removed_folder_durable_before_moving_a_photo_back_into_it(shoot, monkeypatch):
    before = snapshot(shoot.root)
    ok("cull", "wedding", "--below", "0.31", "--scores", shoot.scores, "--apply")  # IMG_5, ceremony/
    for name in os.listdir(shoot.root / "ceremony"):  # the user moves the rest away and removes it
        os.rename(shoot.root / "ceremony" / name, shoot.tmp / name)
    (shoot.root / "ceremony").rmdir()
    events = _record_links_and_syncs(monkeypatch)
    ok("undo")
    link = events.index(("link", str(shoot.root / "ceremony" / "IMG_5.jpg")))
    assert ("sync", str(shoot.root)) in events[:link]  # the new folder's name is durable first
    assert (shoot.root / "ceremony" / "IMG_5.jpg").read_bytes() == before[b"ceremony/IMG_5.jpg"][1]


def _ctrl_c_at_action(monkeypatch, n: int):
    """Ctrl-C as a run's n-th action starts; returns the real ``_perform`` to put back."""
    real_perform, calls = apply_module._perform, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_perform(*args, **kwargs)

    monkeypatch.setattr(apply_module, "_perform", interrupted)
    return real_perform


def _record_links_and_syncs(monkeypatch) -> list[tuple[str, str]]:
    """("link", new name), ("unlink", name) and ("sync", folder) as fileops makes them."""
    events: list[tuple[str, str]] = []
    real_sync, real_link, real_unlink = fileops.fsync_dir, os.link, os.unlink

    def sync(folder):
        events.append(("sync", folder))
        return real_sync(folder)

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        events.append(("link", dst))

    def unlink(path, *args, **kwargs):
        events.append(("unlink", path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(fileops, "fsync_dir", sync)
    monkeypatch.setattr(fileops.os, "link", link)
    monkeypatch.setattr(fileops.os, "unlink", unlink)
    return events


def _assert_new_names_durable_before_old_ones_go(events, moves: int, batch: int) -> None:
    links = [i for i, (kind, _) in enumerate(events) if kind == "link"]
    unlinks = [i for i, (kind, _) in enumerate(events) if kind == "unlink"]
    assert len(links) == len(unlinks) == moves
    batches = -(-moves // batch)
    if batch == 1:  # one at a time: each old name goes before the next new name is made
        assert all(unlinks[n] < links[n + 1] for n in range(moves - 1))
    assert sum(kind == "sync" for kind, _ in events) <= 2 * 3 * batches  # folders x batches, not 2 a move
    assert links[batch] > unlinks[0] and links[batch - 1] < unlinks[0]  # a batch of links, then drops
    for n, i in enumerate(links):  # each new name's folder synced after it, before its old name goes
        folder = os.path.dirname(events[i][1])
        assert any(events[j] == ("sync", folder) for j in range(i, unlinks[n])), (n, events)
    for i in unlinks:  # each old name's folder synced after it (its removal made durable)
        assert any(events[j] == ("sync", os.path.dirname(events[i][1])) for j in range(i, len(events)))


def test_ctrl_c_or_a_failed_removal_in_a_batch_of_moves_leaves_every_photo_recoverable(shoot, monkeypatch):
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)
    before = snapshot(shoot.root)
    real_perform = _ctrl_c_at_action(monkeypatch, 7)  # 4 moves done as a batch, 2 linked and waiting
    result = invoke("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 130
    # The two waiting moves were finished: every photo has one name, 6 in _culled.
    files = [p for p in shoot.root.rglob("*") if p.is_file()]
    assert all(p.stat().st_nlink == 1 for p in files)
    assert len([p for p in files if "_culled" in p.parts]) == 6
    assert sum('"type":"done"' in line for line in _journal().read_text().splitlines()) == 6
    monkeypatch.setattr(apply_module, "_perform", real_perform)
    ok("undo")
    assert snapshot(shoot.root) == before

    # The same for undo: moves back whose old names are made are finished on Ctrl-C.
    ok("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    real_undo_one, steps = undo_module._undo_one, []

    def interrupted_undo(step, unsynced, pending):
        steps.append(step)
        if len(steps) == 7:
            raise KeyboardInterrupt
        return real_undo_one(step, unsynced, pending)

    monkeypatch.setattr(undo_module, "_undo_one", interrupted_undo)
    result = invoke("undo")
    assert result.exit_code == 130, result.output
    files = [p for p in shoot.root.rglob("*") if p.is_file()]
    assert all(p.stat().st_nlink == 1 for p in files)
    assert len([p for p in files if "_culled" in p.parts]) == 11 - 6
    monkeypatch.setattr(undo_module, "_undo_one", real_undo_one)
    ok("undo")
    assert snapshot(shoot.root) == before

    real_unlink = os.unlink
    removals = []

    def failing_unlink(path, *args, **kwargs):
        if ".loda-" not in os.fsdecode(path):
            removals.append(path)
            if len(removals) == 2:
                raise PermissionError(13, "Permission denied")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(fileops.os, "unlink", failing_unlink)
    result = invoke("cull", "wedding", "--below", "0.6", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 1 and "Permission denied; stopped" in " ".join(result.output.split())
    records = [json.loads(line) for line in _journal().read_text().splitlines()]
    # The batch's other moves were finished; the one whose old name could not go is journalled
    # as failed and keeps both names.
    assert sum(r["type"] == "done" for r in records) == 3
    failed = [r for r in records if r["type"] == "failed"]
    intent = next(r for r in records if r["type"] == "intent" and r["id"] == failed[0]["id"])
    assert len(failed) == 1 and os.fsencode(shoot.root / "x")[:-1] + base64.b64decode(intent["src"][2]) == os.fsencode(removals[1])
    assert [p.name for p in shoot.root.rglob("*") if p.is_file() and p.stat().st_nlink == 2] == [
        os.path.basename(removals[1])] * 2
    monkeypatch.setattr(fileops.os, "unlink", real_unlink)
    ok("undo")  # the photo left with two names loses its new one again
    assert snapshot(shoot.root) == before
    assert not [p for p in shoot.root.rglob("*") if p.is_file() and p.stat().st_nlink != 1]


@pytest.mark.parametrize("command", ["rate", "sort"])
def test_undo_fsyncs_each_folder_once_a_batch_and_every_folder_before_undo_ends(shoot, monkeypatch, command):
    """Undo of a rate run (sidecars removed or restored) and of a sorted copy (copies removed):
    each changed folder fsynced once for many files, and after its last change and before the
    complete "undo-end" record, which makes a later undo say there is nothing left."""
    from loda_cli.organize import fileops
    from loda_cli.organize.journal import UndoLog

    human = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
    write(shoot.root / "IMG_3.jpg.xmp", human)  # an existing sidecar: undo restores it
    before = {p: p.read_bytes() for p in shoot.tmp.rglob("*") if p.is_file()}
    if command == "rate":
        result = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "both", "--force", "--apply")
    else:
        result = invoke("sort", "wedding", "--scores", shoot.scores, "--into", "sorted", "--apply")
    assert result.exit_code == 0, result.output

    events: list[tuple[str, str]] = []
    real_sync, real_remove, real_file, real_log = (
        fileops.fsync_dir, fileops.remove, fileops.write_file, UndoLog.write)

    def sync(folder):
        events.append(("sync", folder))
        return real_sync(folder)

    def remove(path, **kwargs):
        real_remove(path, **kwargs)
        events.append(("file", os.path.dirname(path)))

    def write_file(path, *args, **kwargs):
        real_file(path, *args, **kwargs)
        events.append(("file", os.path.dirname(path)))

    def log(self, entry, sync=False):
        events.append((entry["type"], ""))
        return real_log(self, entry, sync=sync)

    def rmdir(folder):
        events.append(("rmdir", folder))
        return real_rmdir(folder)

    real_rmdir = fileops.remove_empty_folder
    monkeypatch.setattr(fileops, "fsync_dir", sync)
    monkeypatch.setattr(fileops, "remove", remove)
    monkeypatch.setattr(fileops, "write_file", write_file)
    monkeypatch.setattr(fileops, "remove_empty_folder", rmdir)
    monkeypatch.setattr(UndoLog, "write", log)
    monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)
    journal = _journal(shoot.root)
    ok("undo", journal)
    # before the folders the run made are removed, and before the complete undo-end record
    _assert_synced_in_batches(events, every=4, before=("rmdir", "undo-end"))
    assert ("rmdir", str(shoot.tmp / "sorted")) in events or command == "rate"
    assert {p: p.read_bytes() for p in shoot.tmp.rglob("*") if p.is_file()} == before
    assert not (shoot.tmp / "sorted").exists()
    assert "Nothing left to undo" in ok("undo", journal).output

def test_rate_person_rating_in_either_naming_protects_both_and_force_overrides(shoot):
    """Issue 16.1: a.xmp rated 5 by a person; the default run must not create a.jpg.xmp rated 3."""
    from loda_cli import xmp

    human = xmp.new_sidecar(5).replace(b'\n    loda:Rating="5"', b"")
    write(shoot.root / "IMG_4.xmp", human)
    result = invoke("rate", "wedding", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    assert (shoot.root / "IMG_4.xmp").read_bytes() == human
    assert not (shoot.root / "IMG_4.jpg.xmp").exists()
    assert "set by a person in IMG_4.xmp" in result.output.replace("\n", "")
    # the darktable naming holding the person's rating protects the Lightroom naming too
    write(shoot.root / "IMG_40.jpg.xmp", human)
    result = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "lightroom", "--apply")
    assert result.exit_code == 0, result.output
    assert not (shoot.root / "IMG_40.xmp").exists()
    forced = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "lightroom", "--force",
                    "--apply")
    assert forced.exit_code == 0, forced.output
    assert xmp.read_state((shoot.root / "IMG_40.xmp").read_bytes()).rating == 4


def test_rate_auto_updates_the_existing_naming_and_creates_one_only_where_none_exists(shoot):
    """Issue 16.2: the default writes one sidecar per photo, not two."""
    from loda_cli import xmp

    write(shoot.root / "IMG_3.xmp", xmp.new_sidecar(2))  # loda's own, Lightroom naming
    before = {p.name for p in shoot.root.rglob("*")}
    dry = invoke("rate", "wedding", "--scores", shoot.scores)
    assert "sidecar naming" in dry.output and "auto" in dry.output
    result = invoke("rate", "wedding", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 0, result.output
    created = {p.name for p in shoot.root.rglob("*") if not p.name.startswith(".loda-")} - before
    assert xmp.read_state((shoot.root / "IMG_3.xmp").read_bytes()).rating == 5  # updated in place
    assert "IMG_3.jpg.xmp" not in created and "IMG_3.xmp" not in created
    # photos without a sidecar get exactly one per image file, in the darktable naming
    assert {"IMG_4.jpg.xmp", "IMG_40.jpg.xmp", "IMG_2.heic.xmp", "IMG_5.jpg.xmp", "IMG_5.nef.xmp",
            "IMG_6.jpg.xmp"} == created
    ok("undo")
    assert {p.name for p in shoot.root.rglob("*") if not p.name.startswith(".loda-")} == before


def test_rate_darktable_only_and_edges(shoot):
    from loda_cli import xmp

    result = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "darktable", "--edges",
                    "0.05,0.1,0.15,0.2", "--apply")
    assert result.exit_code == 0, result.output
    assert xmp.read_state((shoot.root / "IMG_4.jpg.xmp").read_bytes()).rating == 5
    assert not (shoot.root / "IMG_4.xmp").exists()
    assert invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "capture-one").exit_code == 2


def test_rate_says_which_photo_a_shared_lightroom_sidecar_takes_its_rating_from(tmp_path, monkeypatch):
    """IMG_3.JPG and IMG_3.PNG (not a RAW+JPEG pair: two photos) both name IMG_3.xmp in the
    Lightroom naming: one rating goes in, and the other photo is reported, not dropped quietly."""
    from loda_cli import xmp

    root = tmp_path / "lib"
    write(root / "IMG_3.JPG", photo_bytes(1))
    Image.new("RGB", (16, 12), (9, 9, 9)).save(root / "IMG_3.PNG")
    scores = write_scores(tmp_path / "s.csv", [("lib/IMG_3.JPG", 0.9), ("lib/IMG_3.PNG", 0.1)])
    monkeypatch.chdir(tmp_path)
    result = invoke("rate", "lib", "--scores", scores, "--sidecar", "lightroom", "--apply")
    assert result.exit_code == 0, result.output
    written = xmp.read_state((root / "IMG_3.xmp").read_bytes()).rating
    said = " ".join(result.output.split())
    first, other = ("IMG_3.JPG", "IMG_3.PNG") if written == 5 else ("IMG_3.PNG", "IMG_3.JPG")
    assert written in (1, 5) and f"its sidecar IMG_3.xmp takes the rating of {first}, scored first" in said, said
    assert other in said


def test_rate_refuses_a_label_no_sidecar_can_hold_before_planning(shoot):
    before = snapshot(shoot.root)
    for label in ("Red\x01", os.fsdecode(b"Red\xff"), "two\nlines"):
        result = invoke("rate", "wedding", "--scores", shoot.scores, "--label", label, "--apply")
        assert result.exit_code == 2 and "--label" in result.output and "Traceback" not in result.output, result.output
    assert snapshot(shoot.root) == before


def test_rate_writes_an_existing_sidecar_whose_name_differs_in_case(shoot):
    """A sidecar named in another case (a camera's or an app's IMG_40.JPG.XMP) is the one updated,
    not joined by a second; of two such names the first in sorted order. Each folder is listed
    once per plan, so every photo of a folder must still find its own."""
    from loda_cli import xmp

    write(shoot.root / "IMG_40.JPG.XMP", xmp.new_sidecar(1))
    write(shoot.root / "ceremony" / "IMG_6.jpg.XMP", xmp.new_sidecar(1))
    write(shoot.root / "ceremony" / "IMG_6.JPG.XMP", xmp.new_sidecar(1))
    result = invoke("rate", "wedding", "--scores", shoot.scores, "--sidecar", "darktable", "--apply")
    assert result.exit_code == 0, result.output
    assert xmp.read_state((shoot.root / "IMG_40.JPG.XMP").read_bytes()).rating == 4
    assert xmp.read_state((shoot.root / "ceremony" / "IMG_6.JPG.XMP").read_bytes()).rating == 5
    assert xmp.read_state((shoot.root / "ceremony" / "IMG_6.jpg.XMP").read_bytes()).rating == 1
    names = {p.name for p in shoot.root.rglob("*")}
    assert "IMG_40.jpg.xmp" not in names and "IMG_6.jpg.xmp" not in names
    assert {"IMG_3.jpg.xmp", "IMG_4.jpg.xmp", "IMG_5.jpg.xmp"} <= names  # their folders' others


def test_rate_twice_is_unchanged_and_updates_its_own_rating(shoot):
    from loda_cli import xmp

    ok("rate", "wedding", "--scores", shoot.scores, "--apply")
    again = invoke("rate", "wedding", "--scores", shoot.scores, "--apply")
    assert "Nothing to do" in again.output
    moved = write_scores(shoot.tmp / "new.csv", [("wedding/IMG_3.jpg", 0.1)])
    ok("rate", "wedding", "--scores", moved, "--apply")
    assert xmp.read_state((shoot.root / "IMG_3.jpg.xmp").read_bytes()).rating == 1  # loda's own: updated


# --- library details ---------------------------------------------------------------------------------


def test_star_rating_and_quantile_edges():
    edges = organize.DEFAULT_EDGES
    assert [organize.star_rating(s, edges) for s in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)] == [1, 1, 2, 3, 4, 5, 5]
    q = organize.quantile_edges([i / 9 for i in range(10)])
    assert all(a <= b for a, b in zip(q, q[1:])) and q[0] == pytest.approx(0.2)


def test_display_path_escapes_control_characters_and_bad_bytes():
    assert organize.display_path(os.fsdecode(b"a\nb\xff.jpg")) == "a\\nb\\xff.jpg"
    result = organize.display_path("[bold]x[/bold].jpg")
    assert result == "[bold]x[/bold].jpg"  # printed through Text, so markup is shown, not applied
    # A name's terminal escape (set the title, colour the rest) and a bidi override are escaped ...
    assert organize.display_path("esc\x1b]0;pwned\x07\x1b[31mred.jpg") == "esc\\x1b]0;pwned\\x07\\x1b[31mred.jpg"
    assert organize.display_path("photo\u202egpj.exe") == "photo\\u202egpj.exe"
    assert organize.display_path("a\u2028b.jpg") == "a\\u2028b.jpg"
    # ... but a macOS screenshot's narrow no-break space and an emoji's joiner are shown as they are.
    for name in ("Screenshot 9.41.20\u202fPM.png", "family \U0001F468\u200d\U0001F469.jpg", "café.jpg"):
        assert organize.display_path(name) == name


def test_the_score_summary_escapes_what_a_terminal_would_obey():
    from loda_cli.cli.common import shown

    assert shown("esc\x1b[31mred.jpg") == "esc\\x1b[31mred.jpg"
    assert shown(os.fsdecode(b"bad\xff.jpg")) == "bad\\xff.jpg"


def test_markup_in_file_names_is_printed_literally(shoot):
    name = "[red]not markup[/red].jpg"
    write(shoot.root / name, photo_bytes(200))
    scores = write_scores(shoot.tmp / "m.csv", [(f"wedding/{name}", 0.0)])
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", scores)
    assert "[red]not" in result.output


def test_undo_refuses_a_journal_owned_by_another_user(shoot):
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    ok("cull", "wedding", "--worst", "1", "--scores", shoot.scores, "--apply")
    journal = _journal(shoot.root / "_culled")
    os.chown(journal, 12345, 12345)
    result = invoke("undo", journal)
    assert result.exit_code == 1 and "another user" in result.output
    assert (shoot.root / "_culled" / "IMG_1.JPG").exists()


def test_cull_scores_real_photos_with_a_checkpoint_end_to_end(tmp_path, monkeypatch, tiny_checkpoint):
    """No scores file: the real scoring library and cache score the photos first."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        Image.effect_noise((64, 48), 20 + 40 * i).convert("RGB").save(root / f"IMG_{i}.jpg")
    write(root / "IMG_0.CR2", b"raw")
    before = snapshot(root)
    monkeypatch.chdir(tmp_path)
    result = invoke("cull", "photos", "--worst", "1", "--model", tiny_checkpoint, "--apply")
    assert result.exit_code == 0, result.output
    culled = [p.name for p in (root / "_culled").iterdir() if not p.name.startswith(".")]
    assert len([n for n in culled if n.endswith(".jpg")]) == 1
    ok("undo")
    assert snapshot(root) == before


def test_ctrl_c_halfway_names_the_journal_and_undo_restores(shoot, monkeypatch):
    before = snapshot(shoot.root)
    real = apply_module._perform
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_module, "_perform", interrupted)
    result = invoke("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    assert result.exit_code == 130
    assert "undo it with: loda undo" in result.output.replace("\n", "")
    assert snapshot(shoot.root) != before
    monkeypatch.setattr(apply_module, "_perform", real)
    ok("undo")
    assert snapshot(shoot.root) == before


def _fake_scoring(monkeypatch, scores: dict[str, float]) -> dict:
    """Stand in for loda_cli.scoring: scores photos by file name, records the call."""
    calls: dict = {}

    def score_paths(paths, *, model=None, recursive=True, include=(), exclude=(), progress=None):
        calls.update(model=model, exclude=exclude)
        for root in paths:
            for path in sorted(Path(root).rglob("*")):
                if path.name in scores and "_culled" not in path.parts:
                    row = types.SimpleNamespace(path=str(path), root=str(root), score=scores[path.name],
                                                error=None)
                    if progress:
                        progress(row)
                    yield row

    monkeypatch.setattr("loda_cli.scoring.score_paths", score_paths)
    return calls


def test_sort_and_rate_score_through_the_library_with_model(shoot, monkeypatch):
    from loda_cli import xmp

    calls = _fake_scoring(monkeypatch, {"IMG_3.jpg": 0.95, "IMG_4.jpg": 0.05, "IMG_40.jpg": 0.5})
    into = shoot.tmp / "stars"
    result = invoke("sort", "wedding", "--into", into, "--model", "m1", "--apply")
    assert result.exit_code == 0, result.output
    assert calls["model"] == "m1"
    assert (into / "5-stars" / "IMG_3.jpg").exists() and (into / "1-star" / "IMG_4.jpg").exists()
    result = invoke("rate", "wedding", "--model", "m2", "--quantiles", "--apply")
    assert result.exit_code == 0, result.output
    assert calls["model"] == "m2"
    ratings = {n: xmp.read_state((shoot.root / f"{n}.jpg.xmp").read_bytes()).rating for n in ("IMG_3", "IMG_4", "IMG_40")}
    assert ratings == {"IMG_3": 5, "IMG_4": 1, "IMG_40": 3}


def test_every_command_has_help():
    for command in ("cull", "sort", "rate", "undo", "review"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
        assert len(result.output.splitlines()) > 5


def test_review_force_replaces_a_page_loda_did_not_write(shoot):
    page = shoot.tmp / "page.html"
    page.write_text("somebody's page")
    scores = write_scores(shoot.tmp / "r.csv", [("wedding/IMG_3.jpg", 0.5)])
    refused = invoke("review", scores, "--out", page)
    assert refused.exit_code == 1 and page.read_text() == "somebody's page"
    forced = invoke("review", scores, "--out", page, "--force")
    assert forced.exit_code == 0 and "loda review" in page.read_text()


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_scores_written_by_loda_score_round_trip_odd_names_into_cull(shoot, fmt):
    """The scores writer (output.py) and this reader agree on every byte of a name."""
    from loda_cli.output import write_scores as write_output
    from loda_cli.scoresfile import read_scores

    names = [b"new\nline.jpg", b'q"uote,comma.jpg', b"caf\xe9.jpg", b"\xff.jpg"]
    rows = []
    for i, name in enumerate(names):
        path = os.path.join(os.fsencode(shoot.root), name)
        with open(path, "wb") as fh:
            fh.write(photo_bytes(300 + i))
        rel = os.fsdecode(os.path.relpath(path, os.fsencode(shoot.tmp)))
        values = dict(path=rel, score=0.01 * (i + 1), mos=None, raw=0.1, width=16, height=12,
                      format="JPEG", error=None)
        rows.append(types.SimpleNamespace(**values, as_dict=lambda v=values: dict(v)))
    broken = dict(path="wedding/broken.jpg", score=None, mos=None, raw=None, width=None, height=None,
                  format=None, error="cannot decode")
    rows.append(types.SimpleNamespace(**broken, as_dict=lambda v=broken: dict(v)))
    out = shoot.tmp / f"scores.{fmt}"
    write_output(str(out), rows, header={"model": "test"})
    parsed = read_scores(out)
    assert sorted(os.fsencode(r.path) for r in parsed.rows) == sorted(b"wedding/" + n for n in names)
    assert parsed.skipped_errors == 1
    before = snapshot(shoot.root)
    result = invoke("cull", "wedding", "--below", "0.5", "--scores", out, "--apply")
    assert result.exit_code == 0, result.output
    for name in names:
        assert os.path.exists(os.path.join(os.fsencode(shoot.root), b"_culled", name))
    ok("undo")
    assert snapshot(shoot.root) == before


def test_several_roots_each_get_their_culled_folder_or_a_subfolder_of_to(shoot):
    other = shoot.tmp / "reception"
    write(other / "sub" / "IMG_9.jpg", photo_bytes(9))
    write(other / "IMG_3.jpg", photo_bytes(33))  # same name as in the first root
    scores = write_scores(shoot.tmp / "two.csv", [("wedding/IMG_3.jpg", 0.1), ("reception/IMG_3.jpg", 0.1),
                                                  ("reception/sub/IMG_9.jpg", 0.2)])
    before = snapshot(shoot.tmp)
    ok("cull", "wedding", "reception", "--below", "0.5", "--scores", scores, "--apply")
    assert (shoot.root / "_culled" / "IMG_3.jpg").read_bytes() == photo_bytes(3)
    assert (other / "_culled" / "IMG_3.jpg").read_bytes() == photo_bytes(33)
    assert (other / "_culled" / "sub" / "IMG_9.jpg").exists()
    ok("undo")
    assert snapshot(shoot.tmp) == before

    dest = shoot.tmp / "rejects"
    ok("cull", "wedding", "reception", "--below", "0.5", "--scores", scores, "--to", dest, "--apply")
    assert (dest / "wedding" / "IMG_3.jpg").read_bytes() == photo_bytes(3)
    assert (dest / "reception" / "sub" / "IMG_9.jpg").exists()
    ok("undo", _journal(dest))
    assert {k: v for k, v in snapshot(shoot.tmp).items() if not k.startswith(b"rejects")} == before


def test_unreadable_source_is_skipped_and_an_io_error_during_undo_stops_cleanly(shoot, monkeypatch):
    before = snapshot(shoot.root)
    real_hash = fileops.sample_sha256

    def failing_hash(path):
        if path.endswith("IMG_2.heic"):
            raise PermissionError(13, "Permission denied")
        return real_hash(path)

    monkeypatch.setattr(fileops, "sample_sha256", failing_hash)
    result = ok("cull", "wedding", "--below", "0.4", "--scores", shoot.scores, "--apply")
    assert "Permission denied" in result.output.replace("\n", " ")
    assert (shoot.root / "IMG_2.heic").exists() and not (shoot.root / "IMG_1.JPG").exists()
    monkeypatch.setattr(fileops, "sample_sha256", real_hash)

    real_undo_one = undo_module._undo_one
    calls = []

    def failing_undo_one(step, unsynced, pending):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_undo_one(step, unsynced, pending)

    monkeypatch.setattr(undo_module, "_undo_one", failing_undo_one)
    result = invoke("undo")
    assert result.exit_code == 1 and "Input/output error" in result.output and "again" in result.output
    assert all(p.stat().st_nlink == 1 for p in shoot.root.rglob("*") if p.is_file())  # the first went back
    monkeypatch.setattr(undo_module, "_undo_one", real_undo_one)
    ok("undo")
    assert snapshot(shoot.root) == before


# --- issue 16: first-hour defects ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["cull", "sort", "rate"])
def test_dry_run_is_accepted_as_the_explicit_default(shoot, command):
    """Issue 16.10: --dry-run on cull, sort and rate; it excludes --apply."""
    extra = {"cull": ["--below", "0.4"], "sort": ["--into", shoot.tmp / "stars"], "rate": []}[command]
    before = snapshot(shoot.root)
    result = invoke(command, "wedding", *extra, "--scores", shoot.scores, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Dry run" in result.output and snapshot(shoot.root) == before
    both = invoke(command, "wedding", *extra, "--scores", shoot.scores, "--dry-run", "--apply")
    assert both.exit_code == 2 and "exclude each other" in both.output


def _broken_files(shoot) -> Path:
    write(shoot.root / "empty.jpg", b"")
    write(shoot.root / "cut.jpg", photo_bytes(9)[:60])
    write(shoot.root / "cut.xmp", b"<x/>")
    write(shoot.root / "phone.heic", photo_bytes(10))
    rows = [("wedding/IMG_3.jpg", 0.9), ("wedding/IMG_4.jpg", 0.1), ("wedding/empty.jpg", None),
            ("wedding/cut.jpg", None), ("wedding/phone.heic", None)]
    errors = {"wedding/empty.jpg": "empty file", "wedding/cut.jpg": "truncated image",
              "wedding/phone.heic": "HEIC support needs pillow-heif: pip install pillow-heif"}
    return write_scores(shoot.tmp / "failed.csv", rows, errors=errors)


def test_cull_plan_names_failed_files_by_their_error_and_include_failed_moves_only_broken_ones(shoot):
    """Issue 16.11: failed files are labelled by what went wrong, with an example; --include-failed
    culls the unreadable ones with their companions, never a file loda only lacks a decoder for."""
    scores = _broken_files(shoot)
    before = snapshot(shoot.root)
    dry = invoke("cull", "wedding", "--below", "0.4", "--scores", scores)
    assert dry.exit_code == 0, dry.output
    assert "error rows" not in dry.output
    assert "could not be scored (empty file)" in dry.output and "wedding/empty.jpg" in dry.output
    assert "could not be scored (truncated image)" in dry.output
    result = invoke("cull", "wedding", "--below", "0.4", "--scores", scores, "--include-failed", "--apply")
    assert result.exit_code == 0, result.output
    culled = shoot.root / "_culled"
    assert {"IMG_4.jpg", "empty.jpg", "cut.jpg", "cut.xmp"} <= {p.name for p in culled.iterdir()}
    assert (shoot.root / "phone.heic").exists() and not (culled / "phone.heic").exists()
    assert "the file itself may be fine" in result.output
    assert "failed" in result.output and "2 unreadable" in result.output
    ok("undo")
    assert snapshot(shoot.root) == before


def test_failed_files_scored_through_the_library_are_not_called_scores_file_rows(shoot, monkeypatch):
    def score_paths(paths, *, model=None, recursive=True, include=(), exclude=(), progress=None):
        yield types.SimpleNamespace(path=str(shoot.root / "IMG_3.jpg"), root=str(paths[0]), score=0.1, error=None)
        yield types.SimpleNamespace(path=str(shoot.root / "notes.jpg"), root=str(paths[0]), score=None,
                                    error="not an image")

    write(shoot.root / "notes.jpg", b"hello")
    monkeypatch.setattr("loda_cli.scoring.score_paths", score_paths)
    result = invoke("cull", "wedding", "--below", "0.4", "--model", "m")
    assert result.exit_code == 0, result.output
    assert "scores file" not in result.output and "could not be scored (not an image)" in result.output


def test_sort_and_rate_plans_count_photos_per_bin_and_suggest_quantiles(shoot):
    """Issue 16.12: the plan says how many photos land in each star bin, and when the edges leave
    bins empty (or one bin holds nearly all) it suggests --quantiles."""
    result = invoke("sort", "wedding", "--into", shoot.tmp / "stars", "--scores", shoot.scores,
                    "--edges", "0.92,0.94,0.96,0.98")
    assert result.exit_code == 0, result.output
    assert "photos per bin" in result.output and "5★ 0  4★ 0  3★ 0  2★ 0  1★ 7" in result.output
    assert "7 of 7 photos get 1 star" in result.output and "--quantiles" in result.output
    rated = invoke("rate", "wedding", "--scores", shoot.scores, "--edges", "0.05,0.15,0.5,0.95")
    assert "5★ 0  4★ 4  3★ 2  2★ 1  1★ 0" in rated.output
    assert "no photo gets 1 or 5 stars" in rated.output
    even = invoke("rate", "wedding", "--scores", shoot.scores, "--quantiles")
    assert "photos per bin" in even.output and "--quantiles puts" not in even.output


def test_undo_of_a_file_that_is_not_a_journal_says_so(shoot):
    """Not "line 1 is damaged": a scores file given by mistake is not a damaged journal."""
    result = invoke("undo", shoot.scores)
    assert result.exit_code == 1
    assert "is not a loda journal" in result.output and "damaged" not in result.output
    assert result.output.count("\n") <= 2


def test_cull_from_another_folder_says_where_relative_paths_were_looked_for(shoot, monkeypatch):
    """A CSV's paths are relative to where `loda score` ran: from elsewhere none resolve, and the
    plan says where it looked instead of calling a whole library gone."""
    elsewhere = shoot.tmp / "exports" / "scores.csv"  # neither beside the photos nor where it ran
    elsewhere.parent.mkdir()
    shutil.copy(shoot.scores, elsewhere)
    monkeypatch.chdir(shoot.root)
    before = snapshot(shoot.tmp, skip_loda=False)
    result = invoke("cull", ".", "--below", "0.4", "--scores", elsewhere)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "not found" in out and "no longer exists" not in out
    assert "9 scored files were not found; relative paths were looked for in" in out
    assert "Run from the folder `loda score` ran in" in out
    assert snapshot(shoot.tmp, skip_loda=False) == before
    # From the right folder, no warning.
    monkeypatch.chdir(shoot.tmp)  # where it ran: only wedding/broken.jpg is missing, no warning
    assert "were not found" not in ok("cull", "wedding", "--below", "0.4", "--scores", elsewhere).output


def test_a_plan_says_how_many_photos_its_examples_leave_out_and_list_shows_every_one(shoot):
    dry = " ".join(ok("cull", "wedding", "--below", "0.95", "--scores", shoot.scores).output.split())
    assert "examples (5 of 7 photos; --list shows every one)" in dry
    assert "IMG_3.jpg" not in dry  # the 6th and 7th lowest are left out ...
    full = " ".join(ok("cull", "wedding", "--below", "0.95", "--scores", shoot.scores, "--list").output.split())
    assert "every photo (7)" in full
    for name in ("IMG_1.JPG", "IMG_2.heic", "IMG_3.jpg", "IMG_4.jpg", "IMG_40.jpg", "IMG_5.jpg", "IMG_6.jpg"):
        assert name in full, name  # ... and --list shows them
    few = " ".join(ok("cull", "wedding", "--worst", "2", "--scores", shoot.scores).output.split())
    assert "examples" in few and "of 2 photos" not in few
