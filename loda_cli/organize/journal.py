"""The journal: what cull, sort and rate write before they act, and what undo reads back.

One journal is a JSON-lines file in ``$LODA_HOME/journals``: a header (the command, the roots and
destinations, the folders it will create), one ``intent`` record per action with the file's size,
modification time and sampled SHA-256 (version 2; version 1, still read, held the SHA-256 of the
whole file), ``mkdir`` records, ``ready``, then a ``done`` (or ``skipped``, ``verified``,
``failed``) record per action and an ``end``. Paths are stored as [tag, base index, base64 of the
path relative to that base], so a journal can name nothing outside its folders. Undo appends its
own log beside the journal (``.undo.jsonl``), which also says whether the last undo was complete.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from loda_cli import __version__
from loda_cli.errors import JournalError, LodaError, NothingToUndoError, OutputError, UnsafePathError
from loda_cli.organize.fileops import Fingerprint, fsync_dir
from loda_cli.organize.paths import CULLED_DIRNAME, display_path, is_under

JOURNAL_PREFIX = ".loda-journal-"
JOURNAL_SUFFIX = ".jsonl"
UNDO_SUFFIX = ".undo.jsonl"
TMP_PREFIX = ".loda-tmp-"
NAME_MAX = 255  # bytes in one file name, on Linux and macOS filesystems alike
JOURNAL_VERSION = 2
READABLE_VERSIONS = (1, 2)


# --- where journals live, and how paths are written in them ------------------------------------


def journals_dir() -> str:
    """The one place every journal goes: ``$LODA_HOME/journals``. Outside the photo folders, so
    an undo can leave them exactly as they were, and one place to look for what loda did."""
    return os.path.join(os.path.abspath(os.environ.get("LODA_HOME") or _default_home()), "journals")


def _default_home() -> str:
    from loda_cli.home import loda_home

    return os.fspath(loda_home())


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def encode_path(path: str) -> str:
    return base64.b64encode(os.fsencode(path)).decode("ascii")


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise JournalError("journal record holds a malformed path")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise JournalError("journal record holds a malformed path") from None


def path_ref(path: str, bases: Sequence[str], tag: str) -> list[Any]:
    for index, base in enumerate(bases):
        if is_under(path, base) and path != base:
            return [tag, index, encode_path(os.path.relpath(path, base))]
    raise UnsafePathError(f"{display_path(path)} is outside the command's folders")


# --- writing -------------------------------------------------------------------------------------


def header_record(
    command: str,
    mode: str,
    layout: str,
    roots: Sequence[str],
    dests: Sequence[str],
    created: Sequence[str],
) -> dict[str, Any]:
    """The first record: what ran, on which folders, and the folders it creates (``created``,
    outermost first), which undo removes again once they are empty."""
    return {
        "type": "header",
        "version": JOURNAL_VERSION,
        "command": command,
        "mode": mode,
        "layout": layout,
        "roots": [encode_path(r) for r in roots],
        "dests": [encode_path(d) for d in dests],
        "time": utc_now(),
        "loda": __version__,
        "roots_text": [display_path(r) for r in roots],
        "dests_text": [display_path(d) for d in dests],
        "created": [encode_path(folder) for folder in created],
    }


class JournalWriter:
    """Appends one JSON object per line; ``sync`` fsyncs it. Holds an exclusive lock while open."""

    def __init__(self, folder: str, header: dict[str, Any]) -> None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        self.stamp = stamp
        n = 0
        while True:
            name = f"{JOURNAL_PREFIX}{stamp}{'' if n == 0 else f'-{n}'}{JOURNAL_SUFFIX}"
            path = os.path.join(folder, name)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
                self.fd = os.open(path, flags, 0o644)
                break
            except FileExistsError:
                n += 1
            except OSError as exc:
                raise OutputError(
                    f"cannot create the journal in {display_path(folder)}: {exc.strerror}"
                ) from None
        self.path = path
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.write(header)
        self.sync()
        fsync_dir(folder)

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        data = (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
            if sync:
                os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(
                f"cannot write the journal {display_path(self.path)}: {exc.strerror}; "
                f"what was done so far is recorded, and `loda undo` reverses it"
            ) from None

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(
                f"cannot sync the journal {display_path(self.path)}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        os.close(self.fd)


# --- reading -------------------------------------------------------------------------------------


@dataclass
class JournalEntry:
    id: int
    kind: str
    src: str  # for write: the sidecar
    dst: str  # for write: the sidecar too
    size: int
    sha256: str
    tmp: Optional[str]
    old_bytes: Optional[bytes] = None
    new_sha256: str = ""
    done: bool = False
    bases: tuple[tuple[str, str], ...] = ()  # (base, path) pairs to re-check for symlinks
    mtime_ns: Optional[int] = None  # version 2: the source's modification time and sampled hash
    sample: str = ""

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.size, self.mtime_ns, self.sample, self.sha256)


@dataclass
class Journal:
    path: str
    header: dict[str, Any]
    roots: list[str]
    dests: list[str]
    entries: list[JournalEntry]
    mkdirs: list[str]
    truncated: bool
    undo_complete: bool
    finished: bool
    created: list[str] = field(default_factory=list)  # folders the run made, outermost first
    undone_at: str = ""  # when the last complete undo ended

    @property
    def command(self) -> str:
        return str(self.header.get("command", "?"))

    @property
    def time(self) -> str:
        return str(self.header.get("time", ""))


def _parse_lines(data: bytes, what: str) -> tuple[list[dict[str, Any]], bool]:
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    truncated = False
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except (ValueError, RecursionError):
            # Only the last line can be cut short by a crash; damage anywhere else is refused.
            if number == last and records:
                truncated = True
                continue
            if not records:  # a journal's first line is always a complete header
                raise JournalError(f"{what} is not a loda journal") from None
            raise JournalError(f"{what} line {number + 1} is damaged; refusing to guess") from None
        records.append(record)
    return records, truncated


def _resolve_ref(ref: Any, roots: Sequence[str], dests: Sequence[str]) -> tuple[str, str]:
    """(base, absolute path) for a journal path reference; UnsafePathError if it could escape."""
    well_formed = isinstance(ref, list) and len(ref) == 3 and ref[0] in ("r", "d")
    if not (well_formed and isinstance(ref[1], int)):
        raise JournalError("journal record holds a malformed path")
    bases = roots if ref[0] == "r" else dests
    if not 0 <= ref[1] < len(bases):
        raise JournalError("journal record refers to an unknown folder")
    rel = decode_bytes(ref[2])
    parts = rel.split(b"/")
    if rel.startswith(b"/") or b"\x00" in rel or any(p in (b"", b".", b"..") for p in parts):
        raise UnsafePathError(
            f"journal entry {display_path(rel)} points outside the journal's folders; "
            "refusing to undo"
        )
    if any(len(p) > NAME_MAX for p in parts):
        raise JournalError(f"journal entry {display_path(rel)} names a file no folder can hold")
    base = bases[ref[1]]
    return base, os.path.join(base, os.fsdecode(rel))


def read_journal(path: str | os.PathLike[str]) -> Journal:
    """Read and validate a journal; raises JournalError or UnsafePathError, never guesses."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise JournalError(f"{display_path(path)} is not a regular file")
        # Undo moves files where a journal says; one written by another user could aim them
        # anywhere that user cannot write but we can.
        if st.st_uid != os.geteuid():
            raise UnsafePathError(
                f"{display_path(path)} belongs to another user; undo only trusts your own journals"
            )
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise JournalError(f"no journal at {display_path(path)}") from None
    except OSError as exc:
        raise JournalError(f"cannot read {display_path(path)}: {exc.strerror}") from None
    records, truncated = _parse_lines(data, display_path(path))
    if not records or records[0].get("type") != "header":
        raise JournalError(f"{display_path(path)} is not a loda journal")
    header = records[0]
    version = header.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise JournalError(
            f"{display_path(path)} has journal version {header.get('version')!r}; "
            f"this loda reads {' and '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        roots = [os.fsdecode(decode_bytes(r)) for r in header["roots"]]
        dests = [os.fsdecode(decode_bytes(d)) for d in header["dests"]]
    except (KeyError, TypeError):
        raise JournalError(f"{display_path(path)} has a damaged header") from None
    if not roots or not all(
        os.path.isabs(p) and os.path.normpath(p) == p and "\x00" not in p for p in roots + dests
    ):
        raise UnsafePathError(
            f"{display_path(path)} names folders that are not absolute, normalised paths"
        )
    real_journal = os.path.realpath(path)
    homes = [os.path.realpath(journals_dir())]
    if not any(is_under(real_journal, os.path.realpath(folder)) for folder in roots + dests + homes):
        raise UnsafePathError(
            f"{display_path(path)} lies outside the folders it names; refusing to undo"
        )
    layout = header.get("layout")
    if layout == "culled" and dests != [os.path.join(r, CULLED_DIRNAME) for r in roots]:
        raise UnsafePathError(
            f"{display_path(path)}: its folders do not match a cull into _culled; refusing to undo"
        )
    if header.get("command") == "rate":
        if dests:
            raise UnsafePathError(
                f"{display_path(path)}: a rate journal names destinations; refusing to undo"
            )
        dests = list(roots)

    try:
        created = [os.fsdecode(decode_bytes(c)) for c in header.get("created", [])]
    except TypeError:
        raise JournalError(f"{display_path(path)} has a damaged header") from None
    for folder in created:
        # Only a destination or a folder above one: undo removes these when empty, nothing else.
        if not (
            os.path.isabs(folder)
            and os.path.normpath(folder) == folder
            and any(is_under(d, folder) for d in dests)
        ):
            raise UnsafePathError(f"{display_path(path)} names a folder it did not create")
    entries: dict[int, JournalEntry] = {}
    mkdirs: list[str] = []
    finished = False
    for record in records[1:]:
        kind = record.get("type")
        try:
            if kind == "intent":
                entry = _entry_from(record, roots, dests)
                entries[entry.id] = entry
            elif kind == "done" and record.get("id") in entries:
                entries[record["id"]].done = True
            elif kind == "mkdir":
                mkdirs.append(_resolve_ref(record.get("dir"), roots, dests)[1])
            elif kind == "end":
                finished = True
        except (KeyError, TypeError, ValueError, OverflowError):
            raise JournalError(f"{display_path(path)} has a damaged {kind} record") from None
    undone_at = _undo_complete(path)
    return Journal(
        path, header, roots, dests, sorted(entries.values(), key=lambda e: e.id), mkdirs, truncated,
        bool(undone_at), finished, created, undone_at,
    )


def _entry_from(record: dict[str, Any], roots: Sequence[str], dests: Sequence[str]) -> JournalEntry:
    kind = record["kind"]
    entry_id = int(record["id"])
    tmp = os.fsdecode(decode_bytes(record["tmp"])) if record.get("tmp") else None
    if tmp is not None and (os.sep in tmp or "\x00" in tmp or len(os.fsencode(tmp)) > NAME_MAX
                            or not tmp.startswith(TMP_PREFIX)):
        raise UnsafePathError(
            "journal names a temporary file outside loda's naming; refusing to undo"
        )
    if kind == "write":
        base, path = _resolve_ref(record["path"], roots, dests)
        if not path.lower().endswith(".xmp"):  # `loda rate` writes XMP sidecars, nothing else
            raise UnsafePathError(
                f"journal rewrites {display_path(path)}, which is not an XMP sidecar; refusing to undo"
            )
        old = record.get("old")
        return JournalEntry(
            entry_id, kind, path, path, 0, "", tmp,
            old_bytes=None if old is None else decode_bytes(old),
            new_sha256=str(record["new_sha256"]), bases=((base, path),),
        )
    if kind not in ("move", "copy", "link"):
        raise JournalError(f"journal holds an unknown action {kind!r}")
    src_base, src = _resolve_ref(record["src"], roots, dests)
    dst_base, dst = _resolve_ref(record["dst"], roots, dests)
    sha256, sample = str(record.get("sha256") or ""), str(record.get("sample") or "")
    mtime_ns = record.get("mtime_ns")
    if mtime_ns is not None and (not isinstance(mtime_ns, int) or isinstance(mtime_ns, bool)):
        raise ValueError("mtime_ns")
    if kind != "link" and not (sha256 or (sample and mtime_ns is not None)):
        raise ValueError("no fingerprint")  # reported as a damaged record
    return JournalEntry(
        entry_id, kind, src, dst, int(record["size"]), sha256, tmp,
        bases=((src_base, src), (dst_base, dst)), mtime_ns=mtime_ns, sample=sample,
    )


# --- the undo log --------------------------------------------------------------------------------


def undo_log_path(journal: str) -> str:
    if journal.endswith(JOURNAL_SUFFIX):
        return journal[: -len(JOURNAL_SUFFIX)] + UNDO_SUFFIX
    return journal + ".undo"


def _undo_complete(journal: str) -> str:
    """When the last undo of ``journal`` finished complete ("" when it has not)."""
    try:
        with open(undo_log_path(journal), "rb") as fh:
            data = fh.read()
    except OSError:
        return ""
    complete = ""
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the undo log is a record for people and for this flag only
        if isinstance(record, dict) and record.get("type") == "undo-end":
            complete = str(record.get("time") or "?") if record.get("complete") else ""
    return complete


class UndoLog:
    """Undo's own record beside the journal: appended to by every undo, never trusted for paths."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        data = (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")
        while data:
            data = data[os.write(self.fd, data) :]
        if sync:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# --- finding journals ----------------------------------------------------------------------------


def find_journals() -> list[str]:
    """The journals in :func:`journals_dir`, the one place loda writes them; newest first.

    Journals elsewhere (among photos, from a download) are never picked up by themselves: a
    journal says where files go, so only one the user names is trusted from another place."""
    folder = journals_dir()
    try:
        with os.scandir(folder) as entries:
            found = [e.path for e in entries if _is_journal_name(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    return sorted(found, key=lambda p: (os.path.basename(p), p), reverse=True)


def own_folders(roots: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Folders under ``roots`` that loda itself filled and has not undone: the destinations of
    cull and sort runs in the journals. ``loda score`` leaves them out, as ``cull`` does."""
    real_roots = [os.path.realpath(os.fspath(r)) for r in roots]
    found: list[str] = []
    try:
        names = sorted(os.listdir(journals_dir()))
    except OSError:
        return found
    for name in names:
        if not _is_journal_name(name):
            continue
        path = os.path.join(journals_dir(), name)
        try:
            with open(path, "rb") as fh:
                header = json.loads(fh.readline())
            dests = [os.fsdecode(decode_bytes(d)) for d in header.get("dests", [])]
        except (OSError, ValueError, AttributeError, TypeError, RecursionError, JournalError):
            continue  # a damaged journal (undo says so when it is named) hides no folder
        if _undo_complete(path):
            continue
        for dest in dests:
            if dest not in found and any(is_under(dest, r) and dest != r for r in real_roots):
                found.append(dest)
    return found


def _is_journal_name(name: str) -> bool:
    return (
        name.startswith(JOURNAL_PREFIX)
        and name.endswith(JOURNAL_SUFFIX)
        and not name.endswith(UNDO_SUFFIX)
    )


def latest_journal(start: str | os.PathLike[str] | None = None) -> str:
    """The newest journal in :func:`journals_dir` that is not fully undone and whose folders hold
    ``start`` (default: the current folder) or lie under it; JournalError when none."""
    here = os.path.realpath(os.fspath(start or os.getcwd()))
    undone: Optional[Journal] = None
    for path in find_journals():
        try:
            journal = read_journal(path)
            folders = [os.path.realpath(f) for f in journal.roots + journal.dests]
        except (LodaError, OSError, ValueError):
            continue
        if not any(is_under(here, f) or is_under(f, here) for f in folders):
            continue
        if not journal.undo_complete:
            return path
        undone = undone or journal
    if undone is not None:
        raise NothingToUndoError(undone.path, undone.undone_at)
    raise JournalError(f"no journal to undo under {display_path(here)}; pass the journal's path")
