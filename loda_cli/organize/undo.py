"""Undo: read a journal, look at what is on disk now, and reverse each action whose state is
unambiguous.

Undo decides from what it finds on disk (a half-written last journal line is tolerated), so a
run killed at any point, or an undo killed at any point, is undone by running undo (again). It
removes a copy or duplicate only while an identical original exists. With any conflict it
changes nothing, unless asked for a partial undo.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Optional

from loda_cli.errors import JournalError, LodaError, NothingToUndoError, UnsafePathError
from loda_cli.organize import fileops
from loda_cli.organize.journal import (
    TMP_PREFIX,
    Journal,
    JournalEntry,
    UndoLog,
    read_journal,
    undo_log_path,
    utc_now,
)
from loda_cli.organize.paths import Skipped, display_path

@dataclass
class UndoStep:
    entry: JournalEntry
    # restore, remove-duplicate, remove-copy, remove-link, restore-sidecar, remove-sidecar,
    # none (nothing to do) or conflict (left alone)
    action: str
    message: str


_SETTLED_NS = 1_000_000_000


def _stamp(path: str) -> Optional[tuple[int, ...]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Comparisons:
    """Byte-for-byte comparisons of a copy with its original, made while planning and reused
    while acting when neither file changed in between: same inode, size, modification time and
    change time (which every write and every rename moves on to the present, and no program can
    set back). Only files last changed more than a second before the comparison are remembered,
    so a write in the same clock tick as the stamp cannot hide. A sorted folder's undo reads
    each file once, not twice."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], tuple[tuple[object, ...], bool]] = {}

    def same(self, a: str, b: str) -> bool:
        stamps = (_stamp(a), _stamp(b))
        known = self.known.get((a, b))
        if known is not None and known[0] == stamps:
            return known[1]
        settled = time.time_ns() - _SETTLED_NS
        result = fileops.same_content(a, b)
        if (_stamp(a), _stamp(b)) == stamps and all(s is not None and s[4] < settled for s in stamps):
            self.known[(a, b)] = (stamps, result)
        return result


@dataclass
class UndoPlan:
    journal: Journal
    steps: list[UndoStep]
    comparisons: Comparisons = field(default_factory=Comparisons)

    @property
    def conflicts(self) -> list[UndoStep]:
        return [s for s in self.steps if s.action == "conflict"]

    @property
    def changes(self) -> list[UndoStep]:
        return [s for s in self.steps if s.action not in ("none", "conflict")]


@dataclass
class UndoReport:
    journal: str
    restored: int = 0
    removed: int = 0
    unchanged: int = 0
    conflicts: list[UndoStep] = field(default_factory=list)
    complete: bool = False


def _check_no_symlinks(entry: JournalEntry) -> None:
    for base, path in entry.bases:
        rel_folder = os.path.relpath(os.path.dirname(path), base)
        expected = os.path.normpath(os.path.join(os.path.realpath(base), rel_folder))
        if os.path.realpath(os.path.dirname(path)) != expected:
            raise UnsafePathError(
                f"a folder on the way to {display_path(path)} is now a symlink; refusing to undo"
            )


def _decide(entry: JournalEntry, comparisons: Comparisons) -> UndoStep:
    """What undoing ``entry`` means given what is on disk now. Reads only."""
    _check_no_symlinks(entry)
    src, dst = display_path(entry.src), display_path(entry.dst)
    if entry.kind == "write":
        return _decide_write(entry)
    if entry.kind == "link":
        if os.path.islink(entry.dst) and os.readlink(entry.dst) == entry.src:
            return UndoStep(entry, "remove-link", f"remove the link {dst}")
        if os.path.lexists(entry.dst) and entry.done:
            return UndoStep(entry, "conflict", f"{dst} is no longer the link loda made")
        return UndoStep(entry, "none", f"no link at {dst}")
    s = fileops.file_state(entry.src, entry.fingerprint)
    d = fileops.file_state(entry.dst, entry.fingerprint)
    # A journal knows each file by its size, time and sampled hash (version 2; version 1 by the
    # whole file's hash): enough to put a file back, never to remove one. Before a copy or
    # duplicate is removed, its bytes are compared with the original's, which also refuses one
    # name seen twice (a case-insensitive disk).
    if entry.kind == "copy":
        if d == "absent":
            return UndoStep(entry, "none", f"no copy at {dst}")
        if d == "match":
            if s == "match":
                if not comparisons.same(entry.src, entry.dst):
                    why = f"the copy {dst} no longer holds the same bytes as {src}; both stay"
                    return UndoStep(entry, "conflict", why)
                return UndoStep(entry, "remove-copy", f"remove the copy {dst}")
            why = f"the original {src} is missing or changed; keeping the copy {dst}"
            return UndoStep(entry, "conflict", why)
        if entry.done:
            return UndoStep(entry, "conflict", f"the copy {dst} was changed after it was made")
        return UndoStep(entry, "none", f"{dst} is not loda's copy")
    # move
    if s == "match":
        if d == "absent":
            return UndoStep(entry, "none", f"{src} is in place")
        if d == "match":
            if not comparisons.same(entry.src, entry.dst):
                why = f"{src} is in place and {dst} is not an identical second copy; both stay"
                return UndoStep(entry, "conflict", why)
            why = f"{src} is in place; remove the identical {dst}"
            return UndoStep(entry, "remove-duplicate", why)
        return UndoStep(entry, "none", f"{src} is in place; {dst} is another file, left alone")
    if s == "absent":
        if d == "match":
            return UndoStep(entry, "restore", f"move {dst} back to {src}")
        if d == "absent":
            why = f"{src} is in neither place (moved or renamed after the cull?)"
            return UndoStep(entry, "conflict", why)
        return UndoStep(entry, "conflict", f"{dst} was changed after the move")
    if d == "match":
        why = f"{src} is now occupied by a different file; {dst} stays"
        return UndoStep(entry, "conflict", why)
    if entry.done:
        why = f"{src} is a different file and {dst} is not the moved file"
        return UndoStep(entry, "conflict", why)
    return UndoStep(entry, "none", f"{src} was not moved")


def _decide_write(entry: JournalEntry) -> UndoStep:
    path = display_path(entry.src)
    try:
        current = fileops.read_regular(entry.src)
    except Skipped:
        return UndoStep(entry, "conflict", f"{path} is no longer a regular file")
    if current is not None and hashlib.sha256(current).hexdigest() == entry.new_sha256:
        if entry.old_bytes is None:
            return UndoStep(entry, "remove-sidecar", f"remove {path}, which loda created")
        return UndoStep(entry, "restore-sidecar", f"restore the previous {path}")
    if current == entry.old_bytes:
        return UndoStep(entry, "none", f"{path} already holds its previous content")
    if current is None:
        return UndoStep(entry, "restore-sidecar", f"recreate the previous {path}")
    if entry.done:
        return UndoStep(entry, "conflict", f"{path} was changed after loda wrote it")
    return UndoStep(entry, "none", f"{path} was not written by this run")


def plan_undo(journal_path: str | os.PathLike[str]) -> UndoPlan:
    """Read a journal and decide, per entry, what undo would do. Changes nothing."""
    journal = read_journal(journal_path)
    if journal.undo_complete:
        raise NothingToUndoError(journal.path, journal.undone_at)
    comparisons = Comparisons()
    steps = [_decide(entry, comparisons) for entry in reversed(journal.entries)]
    return UndoPlan(journal, steps, comparisons)


def apply_undo(plan: UndoPlan, *, partial: bool = False) -> UndoReport:
    """Reverse what the journal did. With conflicts, nothing changes unless ``partial``."""
    journal = plan.journal
    report = UndoReport(journal.path, conflicts=plan.conflicts)
    if plan.conflicts and not partial:
        raise JournalError(
            f"{len(plan.conflicts)} entr{'y' if len(plan.conflicts) == 1 else 'ies'} cannot be "
            f"undone safely (first: {plan.conflicts[0].message}); nothing was changed. "
            "Resolve them, or pass --partial"
        )
    lock_fd = os.open(journal.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(
                f"{display_path(journal.path)} is in use by a running loda"
            ) from None
        log = UndoLog(undo_log_path(journal.path))
        try:
            remaining_conflicts = _undo_steps(plan, report, log)
        finally:
            log.close()
    finally:
        os.close(lock_fd)
    if remaining_conflicts and not partial:
        raise JournalError(
            f"{len(remaining_conflicts)} entries changed during undo and were left alone; "
            "run undo again"
        )
    return report


def _undo_steps(plan: UndoPlan, report: UndoReport, log: UndoLog) -> list[UndoStep]:
    """Carry out the undo plan, logging each step; returns the conflicts left."""
    journal = plan.journal
    log.write({"type": "undo-start", "time": utc_now(), "journal": os.path.basename(journal.path)})
    remaining_conflicts: list[UndoStep] = []
    # Removals and rewritten sidecars have their folders fsynced once a batch, and all of them
    # before the folders this run made are removed and before the complete "undo-end" record:
    # one lost to a power cut before then leaves loda's copy or sidecar in place, and the next
    # undo, which decides from the disk, handles it again. Moves back on one filesystem make the
    # old names again (hard links) for a batch of photos, fsync those folders, then drop the
    # culled names (fileops.PendingDrops), as the run's own moves did (renames without hard
    # links, synced a batch at a time too); moves across filesystems sync as they go.
    unsynced = fileops.FolderSyncs()
    pending = fileops.PendingDrops()

    def finished(step: UndoStep) -> None:
        if step.action in ("restore", "restore-sidecar"):
            report.restored += 1
        else:
            report.removed += 1
        log.write({"type": "undone", "id": step.entry.id, "action": step.action})

    def kept(step: UndoStep, why: str) -> None:
        message = f"{display_path(step.entry.dst)} was replaced while it moved back; both versions stay"
        remaining_conflicts.append(UndoStep(step.entry, "conflict", message))

    try:
        for step in plan.steps:
            if step.action == "conflict":
                remaining_conflicts.append(step)
                continue
            # Look again right before acting: the disk may have changed since planning.
            fresh = _decide(step.entry, plan.comparisons)
            if fresh.action == "conflict":
                remaining_conflicts.append(fresh)
                continue
            _cleanup_tmp(step.entry)
            if fresh.action == "none":
                report.unchanged += 1
                continue
            fileops.pause_before_action()
            try:
                complete = _undo_one(fresh, unsynced, pending)
            except OSError as exc:
                raise _stopped(fresh.entry.dst, exc) from None
            if complete:
                finished(fresh)
            elif pending.due():
                _drop(pending, finished, kept)
        _drop(pending, finished, kept)
        unsynced.flush()
    except (Exception, KeyboardInterrupt):
        with contextlib.suppress(OSError, LodaError):
            _drop(pending, finished, kept)  # each photo moved back has one name again; then stop
        raise
    finally:
        with contextlib.suppress(OSError):
            unsynced.flush()  # an interrupted undo still makes what it did durable
    for folder in [*reversed(journal.mkdirs), *reversed(journal.created)]:
        fileops.remove_empty_folder(folder)  # only folders this run made
    report.conflicts = remaining_conflicts
    report.complete = not remaining_conflicts
    log.write({"type": "undo-end", "time": utc_now(), "complete": report.complete}, sync=True)
    return remaining_conflicts


def _make_folder(folder: str) -> None:
    """Make ``folder`` (a photo's old folder, removed since the run) and the missing folders
    above it, each made durable in its parent before a photo is moved into it."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for made in reversed(missing):
        os.makedirs(made, exist_ok=True)
        fileops.fsync_dir(os.path.dirname(made))


def _stopped(path: str, exc: OSError) -> JournalError:
    return JournalError(
        f"{display_path(path)}: {exc.strerror or exc}; undo stopped. "
        "What was undone is recorded; run `loda undo` again once this is fixed"
    )


def _drop(pending: fileops.PendingDrops, finished, kept) -> None:
    """Drop the culled names of the photos moved back whose old names are made again. One whose
    culled name now holds another file keeps both names: a conflict (``kept``)."""
    try:
        pending.drop(finished, kept)
    except fileops.DropError as failure:
        raise _stopped(failure.path, failure.error) from None


def _cleanup_tmp(entry: JournalEntry) -> None:
    """Remove temporary files a killed run (or a killed undo) left behind: partial or duplicate
    copies, removed only while an intact copy of the same bytes exists elsewhere."""
    candidates = []
    if entry.tmp:
        candidates.append(os.path.join(os.path.dirname(entry.dst), entry.tmp))
    candidates.append(os.path.join(os.path.dirname(entry.src), f"{TMP_PREFIX}undo-{entry.id}"))
    for tmp in candidates:
        try:
            if not stat.S_ISREG(os.lstat(tmp).st_mode):
                continue
        except FileNotFoundError:
            continue
        if entry.kind in ("move", "copy"):
            intact = fileops.file_state(entry.src, entry.fingerprint) == "match" or (
                fileops.file_state(entry.dst, entry.fingerprint) == "match"
            )
            if not intact:
                continue
        fileops.remove_tmp(tmp)


def _undo_one(step: UndoStep, unsynced: fileops.FolderSyncs, pending: fileops.PendingDrops) -> bool:
    """Carry out one undo step; False when it is a move back whose culled name waits in
    ``pending`` (logged as undone once that name is dropped)."""
    entry = step.entry
    if step.action == "restore":
        folder = os.path.dirname(entry.src)
        _make_folder(folder)
        tmp = os.path.join(folder, f"{TMP_PREFIX}undo-{entry.id}")
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            fileops.remove_tmp(tmp)
        try:
            return fileops.move(entry.dst, entry.src, entry.size, entry.sha256, tmp, lambda: None,
                                pending=pending, key=step)
        except Skipped:
            raise JournalError(
                f"{display_path(entry.src)} was taken while undoing; "
                f"{display_path(entry.dst)} stays"
            ) from None
    elif step.action in ("remove-duplicate", "remove-copy", "remove-link", "remove-sidecar"):
        with unsynced.changing(os.path.dirname(entry.dst)):
            fileops.remove(entry.dst, sync_folder=False)
    elif step.action == "restore-sidecar":
        tmp = os.path.join(os.path.dirname(entry.src), f"{TMP_PREFIX}undo-{entry.id}")
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            fileops.remove_tmp(tmp)
        exists = os.path.lexists(entry.src)
        mode = stat.S_IMODE(os.lstat(entry.src).st_mode) if exists else None
        with unsynced.changing(os.path.dirname(entry.src)):
            fileops.write_file(entry.src, entry.old_bytes or b"", tmp, replace=exists, mode=mode,
                               sync_folder=False)
    return True
