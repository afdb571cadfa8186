"""Applying a plan: preflight, the journal written and fsynced before anything moves, then the
actions one by one, each followed by its ``done`` record (a move on one filesystem once its old
name is dropped, a batch at a time).

The files themselves are only touched through :mod:`loda_cli.organize.fileops`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Optional

from loda_cli.errors import LodaError, OutputError, UnsafePathError, UsageError
from loda_cli.organize import fileops
from loda_cli.organize.journal import (
    TMP_PREFIX,
    JournalWriter,
    encode_bytes,
    encode_path,
    header_record,
    path_ref,
    utc_now,
)
from loda_cli.organize.paths import Skip, Skipped, display_path, is_under
from loda_cli.organize.plan import Action, Plan

# Room kept free beyond the bytes to copy: the journal, folder entries, filesystem slack.
_SPACE_MARGIN = 16 << 20


# --- preflight -----------------------------------------------------------------------------------


def _writable(folder: str) -> bool:
    """Whether new names can be made in ``folder`` (a read-only mount fails this too)."""
    return os.access(folder, os.W_OK | os.X_OK)


def _existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def preflight(plan: Plan) -> None:
    """Find what would stop the plan halfway, before anything moves: raises OutputError."""
    checked: set[str] = set()
    needed_by_device: dict[int, tuple[str, int]] = {}
    for action in plan.actions:
        target_dir = os.path.dirname(action.dst)
        if target_dir not in checked:
            checked.add(target_dir)
            ancestor = _existing_ancestor(target_dir)
            if not os.path.isdir(ancestor):
                raise OutputError(
                    f"cannot create {display_path(target_dir)}: "
                    f"{display_path(ancestor)} is not a folder"
                )
            if not _writable(ancestor):
                raise OutputError(
                    f"no permission to write in {display_path(ancestor)} (or it is read-only); "
                    "nothing was changed"
                )
            real = os.path.realpath(ancestor)
            inside = any(is_under(real, d) or is_under(d, real) for d in plan.dests)
            if plan.command != "rate" and not inside:
                raise UnsafePathError(
                    f"{display_path(target_dir)} leads outside the destination through a symlink"
                )
        if action.kind == "move":
            source_dir = os.path.dirname(action.src)
            if source_dir not in checked:
                checked.add(source_dir)
                if not _writable(source_dir):
                    raise OutputError(
                        f"no permission to move files out of {display_path(source_dir)}; "
                        "nothing was changed"
                    )
        ancestor = _existing_ancestor(target_dir)
        device = os.stat(ancestor).st_dev
        copies = action.kind in ("copy", "write") or (
            action.kind == "move" and os.stat(os.path.dirname(action.src)).st_dev != device
        )
        if copies:
            where, total = needed_by_device.get(device, (ancestor, 0))
            needed_by_device[device] = (where, total + action.size)
    journal_anchor = _existing_ancestor(plan.journal_dir)
    if not _writable(journal_anchor):
        raise OutputError(
            f"no permission to write the journal in {display_path(journal_anchor)}; "
            "nothing was changed"
        )
    journal_device = os.stat(journal_anchor).st_dev
    where, total = needed_by_device.get(journal_device, (journal_anchor, 0))
    needed_by_device[journal_device] = (where, total + 1024 * len(plan.actions))
    for where, needed in needed_by_device.values():
        free = shutil.disk_usage(where).free
        if needed + _SPACE_MARGIN > free:
            raise OutputError(
                f"not enough free space at {display_path(where)}: "
                f"{needed + _SPACE_MARGIN} bytes needed, {free} free; nothing was changed"
            )


# --- apply ---------------------------------------------------------------------------------------


@dataclass
class ApplyReport:
    journal: Optional[str]
    done: int = 0
    bytes_done: int = 0
    skipped: list[Skip] = field(default_factory=list)


def apply_plan(
    plan: Plan,
    *,
    progress: Optional[Callable[[int, int], None]] = None,
    on_journal: Optional[Callable[[str], None]] = None,
) -> ApplyReport:
    """Carry out ``plan``: preflight, journal every intent (fsynced), then act one by one.

    ``on_journal`` is told the journal's path as soon as it exists, so a caller interrupted
    halfway (Ctrl-C) can still say which journal reverses what was done.
    """
    if not plan.actions:
        return ApplyReport(journal=None)
    preflight(plan)
    os.makedirs(plan.journal_dir, mode=0o700, exist_ok=True)
    used = {d for d in plan.dests if any(is_under(a.dst, d) for a in plan.actions)}
    created = _missing_folders(used)
    header = header_record(plan.command, plan.mode, plan.layout, plan.roots, plan.dests, created)
    writer = JournalWriter(plan.journal_dir, header)
    _make_destinations(used, writer)
    report = ApplyReport(journal=writer.path)
    if on_journal:
        on_journal(writer.path)
    # Sidecars `loda rate` writes, and copies and links, have their folders fsynced once a batch
    # (fileops.FolderSyncs): a name lost to a power cut leaves the sidecar's previous content or
    # no copy, which undo reads as not done, since it decides from the disk, never from "done"
    # alone. Moves on one filesystem make their new names (hard links) for up to
    # FOLDER_SYNC_EVERY photos, fsync those folders, then drop the old names (fileops.
    # PendingDrops): each new name is durable before its old one goes. Where there are no hard
    # links (exFAT) the moves are renames, and their folders are fsynced the same way, once a
    # batch. Moves across filesystems sync as they go.
    unsynced = fileops.FolderSyncs()
    pending = fileops.PendingDrops()
    try:
        prepared = _write_intents(plan, writer, report)
        for number, item in enumerate(prepared, start=1):
            fileops.pause_before_action()
            _act(item, writer, report, unsynced, pending)
            if pending.due():
                _drop_old_names(pending, writer, report)
            if progress:
                progress(number, len(prepared))
        _drop_old_names(pending, writer, report)
        unsynced.flush()
        end = {"type": "end", "time": utc_now(), "done": report.done, "skipped": len(report.skipped)}
        writer.write(end, sync=True)
    except (Exception, KeyboardInterrupt):
        # Ctrl-C or an error: finish the moves whose new names are made (a moment), so the
        # photos they concern each have one name, as after moves made one by one; then stop.
        with contextlib.suppress(OSError, LodaError):
            _drop_old_names(pending, writer, report)
        raise
    finally:
        with contextlib.suppress(OSError):
            unsynced.flush()  # an interrupted run still makes what it wrote durable
        writer.close()
    return report


def _drop_old_names(pending: fileops.PendingDrops, writer: JournalWriter, report: ApplyReport) -> None:
    """Drop the old names of the moves in ``pending`` (keyed by (action id, action)) and journal
    each as done, or as skipped where the old name now holds another file."""
    try:
        pending.drop(lambda key: _record_done(writer, report, key),
                     lambda key, why: _record_skipped(writer, report, key, why))
    except fileops.DropError as failure:
        _stop(writer, failure.key[0], failure.path, failure.error)  # type: ignore[index]


def _stop(writer: JournalWriter, action_id: int, src: str, exc: OSError) -> NoReturn:
    """Journal an action that failed with ``exc`` and stop the run: OutputError."""
    error = exc.strerror or str(exc)
    writer.write({"type": "failed", "id": action_id, "error": error}, sync=True)
    raise OutputError(
        f"{display_path(src)}: {error}; stopped. What was done so far is in "
        f"{display_path(writer.path)}, and `loda undo` reverses it"
    ) from None


def _missing_folders(destinations: set[str]) -> list[str]:
    """Destination folders that do not exist yet, and missing folders above them, outermost
    first. The header journals them, so undo can remove them again once they are empty."""
    created: list[str] = []
    for folder in sorted(destinations):
        missing = []
        while not os.path.lexists(folder) and folder not in created:
            missing.append(folder)
            folder = os.path.dirname(folder)
        created.extend(reversed(missing))
    return created


def _make_destinations(used: set[str], writer: JournalWriter) -> None:
    """Create the destination folders the header journalled; each must be a plain folder."""
    for folder in sorted(used):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            writer.close()
            raise OutputError(
                f"cannot create {display_path(folder)}: {exc.strerror or exc}; nothing was moved"
            ) from None
        if os.path.islink(folder) or not os.path.isdir(folder):
            writer.close()
            raise UnsafePathError(f"{display_path(folder)} is not a plain folder")


_Prepared = tuple[int, Action, tuple[int, int], str]  # id, action, (size, mtime_ns), tmp


def _act(prepared: _Prepared, writer: JournalWriter, report: ApplyReport,
         unsynced: fileops.FolderSyncs, pending: fileops.PendingDrops) -> None:
    """Carry out one journalled action and record how it went (``unsynced``, ``pending``: see
    apply_plan; a move left in ``pending`` is journalled as done when its old name is dropped)."""
    action_id, action, fingerprint, tmp = prepared
    try:
        complete = _perform(action, fingerprint, tmp, writer, action_id, unsynced, pending)
    except Skipped as why:
        _record_skipped(writer, report, (action_id, action), str(why))
    except OSError as exc:
        _stop(writer, action_id, action.src, exc)
    else:
        if complete:
            _record_done(writer, report, (action_id, action))


def _record_done(writer: JournalWriter, report: ApplyReport, key: tuple[int, Action]) -> None:
    action_id, action = key
    report.done += 1
    report.bytes_done += action.size
    writer.write({"type": "done", "id": action_id})


def _record_skipped(writer: JournalWriter, report: ApplyReport, key: tuple[int, Action], why: str) -> None:
    action_id, action = key
    report.skipped.append(Skip(action.src, why))
    writer.write({"type": "skipped", "id": action_id, "reason": why})


def _write_intents(plan: Plan, writer: JournalWriter, report: ApplyReport) -> list[_Prepared]:
    """Journal every action (and every folder to create) before touching anything; fsync."""
    dest_bases = plan.dests if plan.command != "rate" else plan.roots
    prepared = []
    for action_id, action in enumerate(plan.actions):
        tmp_name = f"{TMP_PREFIX}{writer.stamp}-{action_id}"
        try:
            record, fingerprint = _intent(plan, action_id, action, tmp_name, dest_bases)
        except Skipped as why:
            report.skipped.append(Skip(action.src, str(why)))
            continue
        except FileNotFoundError:
            report.skipped.append(Skip(action.src, "no longer exists"))
            continue
        except OSError as exc:
            report.skipped.append(Skip(action.src, f"unreadable: {exc.strerror or exc}"))
            continue
        writer.write(record)
        tmp = os.path.join(os.path.dirname(action.dst), tmp_name)
        prepared.append((action_id, action, fingerprint, tmp))

    to_create: list[str] = []
    for _, action, _, _ in prepared:
        folder = os.path.dirname(action.dst)
        missing = []
        while not os.path.lexists(folder) and folder not in to_create and folder not in plan.dests:
            missing.append(folder)
            folder = os.path.dirname(folder)
        to_create.extend(reversed(missing))
    for folder in to_create:
        writer.write({"type": "mkdir", "dir": path_ref(folder, dest_bases, "d")})
    writer.write({"type": "ready", "actions": len(prepared)})
    writer.sync()
    fileops.fsync_dir(os.path.dirname(writer.path))

    for folder in to_create:
        try:
            os.mkdir(folder)
        except OSError as exc:
            raise OutputError(
                f"cannot create {display_path(folder)}: {exc.strerror or exc}; nothing was moved"
            ) from None
        fileops.fsync_dir(os.path.dirname(folder))
    # A folder swapped for a symlink between planning and now must not redirect any file.
    for _, action, _, _ in prepared:
        folder = os.path.dirname(action.dst)
        if os.path.realpath(folder) != folder:
            raise UnsafePathError(
                f"{display_path(folder)} is now a symlink; stopped before moving anything"
            )
    return prepared


def _intent(
    plan: Plan, action_id: int, action: Action, tmp_name: str, dest_bases: list[str]
) -> tuple[dict[str, Any], tuple[int, int]]:
    """The intent record of one action and the (size, modification time) its source must still
    have when the action runs. Skipped (or OSError) when the file cannot be journalled.

    A moved or copied file is recorded by its size, modification time and the SHA-256 of its
    first and last 64 KiB (:func:`fileops.sample_sha256`), not by reading all of it: a cull of
    5,000 RAW files on one disk renames them without reading 125 GB first. What is copied is
    still checked whole (the copy against the bytes read), and undo removes nothing it has not
    compared byte for byte with the original."""
    record: dict[str, Any] = {
        "type": "intent",
        "id": action_id,
        "kind": action.kind,
        "group": action.group,
        "score": action.score,
    }
    if action.kind == "write":
        current = fileops.read_regular(action.src)
        if current != action.old_bytes:
            raise Skipped("the sidecar changed since it was planned")
        record.update(
            path=path_ref(action.src, plan.roots, "r"),
            old=None if action.old_bytes is None else encode_bytes(action.old_bytes),
            new_sha256=hashlib.sha256(action.new_bytes or b"").hexdigest(),
            tmp=encode_path(tmp_name),
            text=display_path(action.src),
        )
        return record, (0, 0)
    st = os.lstat(action.src)
    if not stat.S_ISREG(st.st_mode):
        raise Skipped("no longer a regular file")
    sample = fileops.sample_sha256(action.src) if action.kind in ("move", "copy") else ""
    after = os.lstat(action.src)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise Skipped("the file changed while it was being read")
    record.update(
        src=path_ref(action.src, plan.roots, "r"),
        dst=path_ref(action.dst, dest_bases, "d"),
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sample=sample,
        tmp=encode_path(tmp_name),
        text=f"{display_path(action.src)} -> {display_path(action.dst)}",
    )
    return record, (st.st_size, st.st_mtime_ns)


def _perform(
    action: Action,
    fingerprint: tuple[int, int],
    tmp: str,
    writer: JournalWriter,
    action_id: int,
    unsynced: fileops.FolderSyncs,
    pending: fileops.PendingDrops,
) -> bool:
    """Carry out one action; False when it is a move whose old name waits in ``pending``."""
    if action.kind == "write":
        current = fileops.read_regular(action.src)
        if current != action.old_bytes:
            raise Skipped("the sidecar changed since it was planned")
        mode = stat.S_IMODE(os.lstat(action.src).st_mode) if current is not None else None
        new = action.new_bytes or b""
        with unsynced.changing(os.path.dirname(action.src)):
            fileops.write_file(action.src, new, tmp, replace=current is not None, mode=mode,
                               sync_folder=False)
        return True
    size, mtime_ns = fingerprint
    if not fileops.same_file_state(action.src, size, mtime_ns):
        raise Skipped("the file changed after it was journalled")
    if action.kind == "move":
        def verified() -> None:
            writer.write({"type": "verified", "id": action_id}, sync=True)

        return fileops.move(action.src, action.dst, size, "", tmp, verified, mtime_ns=mtime_ns,
                            pending=pending, key=(action_id, action))
    if action.kind == "copy":
        with unsynced.changing(os.path.dirname(action.dst)):
            fileops.copy_verified(action.src, action.dst, size, "", tmp, sync_folder=False,
                                  mtime_ns=mtime_ns)
    elif action.kind == "link":
        with unsynced.changing(os.path.dirname(action.dst)):
            fileops.symlink(action.src, action.dst, sync_folder=False)
    else:
        raise UsageError(f"unknown action kind {action.kind!r}")
    return True
