"""SIGKILL in the middle of `cull --apply`, `sort --apply --move` and `undo`: undo still restores
every file byte-identical, even when the journal's last line is cut in half.

The runs are slowed with the test hook ``LODA_TEST_ACTION_DELAY`` (organize/fileops.py) so the kill lands
halfway; the kill comes once about half the new names are made.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loda_cli.cli.main import app
from tests.test_organize import photo_bytes, snapshot, write, write_scores

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _tree(tmp: Path, count: int = 200) -> tuple[Path, Path]:
    root = tmp / "photos"
    rows = []
    for i in range(count):
        folder = root / f"day{i % 4}"
        name = f"IMG_{i:04d}"
        write(folder / f"{name}.jpg", photo_bytes(i))
        if i % 5 == 0:
            write(folder / f"{name}.CR2", b"raw" * (50 + i))
            write(folder / f"{name}.CR2.xmp", b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
        if i % 7 == 0:
            write(folder / f"{name}.MOV", b"mov" * i)
        rows.append((f"photos/day{i % 4}/{name}.jpg", (i % 100) / 100))
    write(root / "_culled" / "day0" / "IMG_0000.jpg", b"an older cull keeps its name")
    return root, write_scores(tmp / "scores.csv", rows)


def _names(dest: Path) -> int:
    """Files under ``dest`` (loda's journals and temporary files aside)."""
    return sum(1 for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".loda-")) if dest.exists() else 0


def _done_records() -> int:
    from loda_cli import organize

    journals = sorted(Path(organize.journals_dir()).glob(".loda-journal-*.jsonl"))
    return journals[-1].read_bytes().count(b'"type":"done"') if journals else 0


def _run_and_kill(args: list[str], cwd: Path, dest: Path, kill_after: int, batch: int = 0) -> None:
    """Run loda, slowed, and SIGKILL it once ``kill_after`` new names exist under ``dest``. Moves
    on one filesystem make their new names for a batch of photos before dropping the old ones,
    so the kill lands with many photos under two names, or, across filesystems, halfway through
    the copies. With ``batch``, batches of that many and the kill once ``kill_after`` moves are
    journalled done: some batches finished, one waiting."""
    env = dict(os.environ, LODA_TEST_ACTION_DELAY="0.01", PYTHONPATH=str(REPO))
    if batch:
        env["LODA_TEST_FOLDER_SYNC_EVERY"] = str(batch)
    start = _names(dest)

    def progress() -> int:
        return _done_records() if batch else _names(dest) - start

    proc = subprocess.Popen([sys.executable, "-m", "loda_cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while progress() < kill_after:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run made no progress")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _cut_last_line(journal: Path) -> None:
    data = journal.read_bytes().rstrip(b"\n")
    start = data.rfind(b"\n") + 1
    journal.write_bytes(data[: start + (len(data) - start) // 2])


def _journal(folder: Path | None = None) -> Path:
    """The newest journal; they all live in $LODA_HOME/journals (issue 16.13), whatever the folder."""
    from loda_cli import organize

    return sorted(Path(organize.journals_dir()).glob(".loda-journal-*.jsonl"))[-1]


@pytest.mark.parametrize("cut, batch", [(False, 0), (True, 0), (False, 16), (True, 16)],
                         ids=["whole-journal", "last-line-cut", "batches-done", "batches-done-cut"])
def test_killed_cull_is_undone_completely(tmp_path, monkeypatch, cut, batch):
    root, scores = _tree(tmp_path)
    before = snapshot(root)
    older = (root / "_culled" / "day0" / "IMG_0000.jpg").read_bytes()
    _run_and_kill(["cull", "photos", "--below", "0.6", "--scores", str(scores), "--apply"], tmp_path,
                  root / "_culled", 50, batch=batch)
    journal = _journal(root / "_culled")
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert not any(r["type"] == "end" for r in records)  # really killed halfway
    done = sum(r["type"] == "done" for r in records)
    intents = sum(r["type"] == "intent" for r in records)
    assert (0 < done if batch else True) and done < intents and _names(root / "_culled") > 50
    if cut:
        _cut_last_line(journal)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["undo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert snapshot(root) == before
    assert (root / "_culled" / "day0" / "IMG_0000.jpg").read_bytes() == older
    assert _names(root / "_culled") == 1  # every name the killed run made is gone again
    assert not list(root.rglob(".loda-tmp-*"))


@pytest.mark.parametrize("cut", [False, True], ids=["whole-journal", "last-line-cut"])
def test_killed_sort_move_is_undone_completely(tmp_path, monkeypatch, cut):
    root, scores = _tree(tmp_path, count=120)
    before = snapshot(root)
    into = tmp_path / "sorted"
    _run_and_kill(["sort", "photos", "--into", str(into), "--move", "--scores", str(scores), "--apply"], tmp_path, into, 40)
    if cut:
        _cut_last_line(_journal(into))
    result = runner.invoke(app, ["undo", str(_journal(into))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert snapshot(root) == before
    leftovers = [p for p in into.rglob("*") if p.is_file() and not p.name.startswith(".loda-journal-")]
    assert leftovers == []


@pytest.mark.parametrize("batch", [0, 16], ids=["names-being-made", "batches-done"])
def test_killed_undo_is_finished_by_running_undo_again(tmp_path, monkeypatch, batch):
    root, scores = _tree(tmp_path, count=80)
    before = snapshot(root)
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["cull", "photos", "--below", "0.9", "--scores", str(scores), "--apply"]).exit_code == 0
    journal = _journal(root / "_culled")
    undo_log = Path(str(journal)[: -len(".jsonl")] + ".undo.jsonl")

    env = dict(os.environ, LODA_TEST_ACTION_DELAY="0.01", PYTHONPATH=str(REPO))
    if batch:  # batches of 16 moves back, the kill once 30 are logged undone
        env["LODA_TEST_FOLDER_SYNC_EVERY"] = str(batch)
    proc = subprocess.Popen([sys.executable, "-m", "loda_cli", "undo", str(journal)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60

    def back_in_place() -> int:  # photos with their old name again (moves back go in batches)
        return sum(1 for p in root.rglob("*.jpg") if "_culled" not in p.relative_to(root).parts)

    culled = sum(1 for _ in (root / "_culled").rglob("*.jpg")) - 1  # less the older cull's photo
    start = back_in_place()
    def undone() -> int:
        return undo_log.read_bytes().count(b'"type":"undone"') if undo_log.exists() else 0

    while (undone() if batch else back_in_place() - start) < 30:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert back_in_place() - start < culled and snapshot(root) != before  # really halfway
    assert undo_log.exists()
    result = runner.invoke(app, ["undo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert snapshot(root) == before


def test_killed_cross_device_cull_is_undone_completely(tmp_path, monkeypatch):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to move across")
    dest = shm / f"loda-crash-{os.getpid()}-{tmp_path.name}"
    try:
        root, scores = _tree(tmp_path, count=80)
        before = snapshot(root)
        _run_and_kill(["cull", "photos", "--below", "0.7", "--scores", str(scores), "--to", str(dest), "--apply"],
                      tmp_path, dest, 25)
        _cut_last_line(_journal(dest))
        result = runner.invoke(app, ["undo", str(_journal(dest))], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert snapshot(root) == before
        assert not [p for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".loda-journal-")]
    finally:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)


# --- kills at exact points inside one action, simulated in-process ---------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def _plan(root: Path, scores: Path, to: Path | None = None):
    from loda_cli import organize

    roots = organize.resolve_roots([root])
    dests = organize.cull_dests(roots, to)
    source = organize.load_scores(roots, scores)
    groups, _ = organize.collect_groups(roots, source, exclude=organize.cull_excludes(roots, dests))
    return organize.plan_cull(roots, organize.select_worst(groups, below=0.5), to=to)


@pytest.mark.parametrize("point", ["after-link", "after-verified-copy", "partial-tmp", "sidecar-tmp", "renames-unsynced"])
def test_kill_inside_an_action_leaves_a_state_undo_resolves(tmp_path, monkeypatch, point):
    import base64

    from loda_cli import organize
    from loda_cli.organize import fileops

    root, scores = _tree(tmp_path, count=30)
    before = snapshot(root)
    monkeypatch.chdir(tmp_path)
    real_link, real_unlink, real_fsync = os.link, os.unlink, os.fsync
    calls = {"unlink": 0, "fsync": 0}

    def no_cross_link(src, dst, *a, **k):
        if ".loda-tmp-" not in os.fsdecode(src):
            raise OSError(18, "Invalid cross-device link")  # EXDEV: take the copy path
        return real_link(src, dst, *a, **k)

    def dying_unlink(path, *a, **k):  # dies right before the 4th source removal
        if ".loda-tmp-" not in os.fsdecode(path):
            calls["unlink"] += 1
            if calls["unlink"] == 4:
                raise _Killed
        return real_unlink(path, *a, **k)

    def dying_fsync(fd):  # dies in the middle of the run's writes
        calls["fsync"] += 1
        if calls["fsync"] == 12:
            raise _Killed
        return real_fsync(fd)

    def no_link(src, dst, *a, **k):  # exFAT: a move is a rename
        if ".loda-tmp-" not in os.fsdecode(src):
            raise PermissionError(1, "Operation not permitted")
        return real_link(src, dst, *a, **k)

    def dying_folder_fsync(fd):  # dies among the folder fsyncs of a later batch of renames
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            calls["fsync"] += 1
            if calls["fsync"] == 9:
                raise _Killed
        return real_fsync(fd)

    plan = _plan(root, scores)
    if point == "renames-unsynced":
        monkeypatch.setattr(fileops, "FOLDER_SYNC_EVERY", 4)
        monkeypatch.setattr(fileops.os, "link", no_link)
    if point == "sidecar-tmp":
        plan = organize.plan_rate(organize.resolve_roots([root]), plan.groups)
    if point in ("after-verified-copy", "partial-tmp"):
        monkeypatch.setattr(fileops.os, "link", no_cross_link)
    if point in ("after-link", "after-verified-copy"):
        monkeypatch.setattr(fileops.os, "unlink", dying_unlink)
    else:
        monkeypatch.setattr(fileops.os, "fsync", dying_folder_fsync if point == "renames-unsynced" else dying_fsync)
    home = os.environ["LODA_HOME"]
    with pytest.raises(_Killed):
        organize.apply_plan(plan)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LODA_HOME", home)  # undo() also dropped the isolated home, journals live there

    base = root if point == "sidecar-tmp" else root / "_culled"
    journal = _journal(base)
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    if point == "renames-unsynced":  # renames made and not yet journalled as done
        moved = [p for p in (root / "_culled").rglob("*") if p.is_file()]
        done = sum(r["type"] == "done" for r in records)
        assert 4 <= done < len(moved) < sum(r["type"] == "intent" for r in records)
    if point == "after-link":  # one file has both names
        assert any(p.stat().st_nlink == 2 for p in root.rglob("*") if p.is_file() and "_culled" not in p.parts)
    if point == "after-verified-copy":  # a verified copy exists and its source does too
        assert any(r["type"] == "verified" for r in records)
    if point in ("partial-tmp", "sidecar-tmp"):
        # A real SIGKILL would not have run the clean-up handler: leave a partial temp file behind.
        intent = [r for r in records if r["type"] == "intent"][-1]
        ref = intent["path"] if point == "sidecar-tmp" else intent["dst"]
        target = base / os.fsdecode(base64.b64decode(ref[2]))
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / os.fsdecode(base64.b64decode(intent["tmp"]))).write_bytes(b"half a cop")
    result = runner.invoke(app, ["undo", str(journal)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert snapshot(root) == before
    assert not list(root.rglob(".loda-tmp-*"))
