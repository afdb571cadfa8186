"""Plans and applies cull/sort/rate actions, journals them, and undoes them. Never deletes a photo.

How the pieces fit:

1. ``load_scores`` gives (path, score) pairs, from a scores file or from the scoring library.
2. ``collect_groups`` turns them into groups: a decision photo (the one that was scored; the JPEG
   where a RAW+JPEG pair exists) and its companions (same folder, same stem: RAW, JPEG/HEIC,
   ``.xmp`` in both naming styles, ``.aae``, a Live Photo ``.mov``). Every path is checked to lie
   under one of the roots, through its real parent folder, so ``..`` and symlinked folders cannot
   escape. Symlinked files are skipped, whole group: loda never moves, copies or writes through a
   link.
3. ``plan_cull`` / ``plan_sort`` / ``plan_rate`` build a ``Plan`` of actions. Planning reads, never
   writes. Collisions get a numbered suffix (``IMG_1-1.jpg``), the same one for a photo and its
   companions.
4. ``apply_plan`` checks the plan (``preflight``: permissions, free space), then writes the journal:
   a header and one ``intent`` record per action, each with the file's size and sha256, fsynced
   (file and folder) before the first action. Then it acts, appending a ``done`` record after
   each action. A move is a hard link then an unlink on one filesystem (a link never replaces an
   existing name), or a copy, fsync, size and hash check, then the source's removal across
   filesystems: the only place a source file is removed.
5. ``plan_undo`` / ``apply_undo`` read a journal (a half-written last line is tolerated), look at
   what is on disk now, and reverse each action whose state is unambiguous. Undo decides from what
   it finds on disk, so a run killed at any point, or an undo killed at any point, is undone by
   running undo (again). It removes a copy or duplicate only while an identical original exists.

Test hook: the environment variable ``LODA_TEST_ACTION_DELAY`` (seconds, a float) makes
``apply_plan`` and ``apply_undo`` sleep before each action, so tests can kill a run halfway. It has
no other effect.
"""

from __future__ import annotations

import base64
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from loda_cli import __version__, xmp
from loda_cli.errors import (
    JournalError,
    LodaError,
    NothingToUndoError,
    OutputError,
    UnsafePathError,
    UsageError,
)
from loda_cli.images import HEIF_EXTENSIONS as HEIC_EXTENSIONS  # .heic, .heif and Canon's .hif
from loda_cli.images import RAW_EXTENSIONS

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
IMAGE_COMPANION_EXTENSIONS = RAW_EXTENSIONS | JPEG_EXTENSIONS | HEIC_EXTENSIONS
COMPANION_EXTENSIONS = IMAGE_COMPANION_EXTENSIONS | {".xmp", ".aae", ".mov"}

CULLED_DIRNAME = "_culled"
JOURNAL_PREFIX = ".loda-journal-"
JOURNAL_SUFFIX = ".jsonl"
UNDO_SUFFIX = ".undo.jsonl"
TMP_PREFIX = ".loda-tmp-"
JOURNAL_VERSION = 1
ACTION_DELAY_ENV = "LODA_TEST_ACTION_DELAY"
DEFAULT_EDGES = (0.2, 0.4, 0.6, 0.8)
STAR_FOLDERS = {5: "5-stars", 4: "4-stars", 3: "3-stars", 2: "2-stars", 1: "1-star"}
SIDECAR_STYLES = ("auto", "darktable", "lightroom", "both")
# A sidecar is a few KB; anything this large is not one loda should rewrite.
_MAX_SIDECAR_BYTES = 16 << 20
# Room kept free beyond the bytes to copy: the journal, folder entries, filesystem slack.
_SPACE_MARGIN = 16 << 20
_CHUNK = 1 << 20


# --- small helpers ------------------------------------------------------------------------------


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that is safe to print: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", errors="backslashreplace")
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _enc(path: str) -> str:
    return base64.b64encode(os.fsencode(path)).decode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dec_bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise JournalError("journal record holds a malformed path")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise JournalError("journal record holds a malformed path") from None


def _is_under(path: str, folder: str) -> bool:
    """Whether absolute ``path`` is ``folder`` or inside it (both already normalised)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows shares) cannot fsync a folder; the data is synced
    finally:
        os.close(fd)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class _Skipped(Exception):
    """One action cannot be taken safely; it is recorded and the run goes on."""


# --- roots and paths ----------------------------------------------------------------------------


def resolve_roots(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The real paths of the root folders; a root inside another root is dropped."""
    if not paths:
        paths = [os.getcwd()]
    real: list[str] = []
    for given in paths:
        path = os.path.realpath(os.fspath(given))
        if not os.path.isdir(path):
            raise UsageError(f"not a folder: {display_path(given)}")
        if path not in real:
            real.append(path)
    return [r for r in real if not any(o != r and _is_under(r, o) for o in real)]


def _root_index(real_path: str, roots: Sequence[str]) -> Optional[int]:
    for index, root in enumerate(roots):
        if _is_under(real_path, root):
            return index
    return None


def _locate(raw: str, roots: Sequence[str], bases: Sequence[str]) -> tuple[str, int]:
    """The real location of a scored path and its root, or _Skipped with the reason.

    The parent folder is resolved by the kernel's rules (symlinks, then ``..``), so neither can
    lead out of the roots. The file itself is not followed: a symlink is refused.
    """
    if not raw or "\x00" in raw:
        raise _Skipped("not a usable path")
    candidates = [raw] if os.path.isabs(raw) else [os.path.join(base, raw) for base in bases]
    chosen = next((c for c in candidates if os.path.lexists(c)), None)
    if chosen is None:
        raise _Skipped("no longer exists")
    name = os.path.basename(chosen)
    if name in ("", ".", ".."):
        raise _Skipped("not a file")
    parent = os.path.realpath(os.path.dirname(chosen) or ".")
    index = _root_index(parent, roots)
    if index is None:
        raise _Skipped("outside the given folders (refused)")
    full = os.path.join(parent, name)
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        raise _Skipped("a symlink (never moved or followed)")
    if not stat.S_ISREG(st.st_mode):
        raise _Skipped("not a regular file")
    return full, index


# --- scores --------------------------------------------------------------------------------------


@dataclass
class ScoreSource:
    """(path, score) pairs, and the folders relative paths are resolved against (in order).

    ``failed`` holds (path, error) for the files that could not be scored; ``skipped`` counts the
    rows of a scores file that were unusable for another reason (no score, an invalid value).
    """

    rows: list[tuple[str, float]]
    bases: list[str]
    description: str
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    from_file: bool = False


# Errors that say the file itself is broken, as opposed to loda lacking a decoder (HEIC without
# pillow-heif, RAW without rawpy), the file being too large, unreadable by this user, or slow.
_BROKEN_FILE_ERRORS = ("empty file", "not an image", "corrupt image", "truncated image")


def is_broken_file_error(error: str) -> bool:
    """Whether a scoring error says the file is unreadable as an image whatever the decoder
    (zero bytes, not an image, corrupt, truncated): only those can be culled (--include-failed)."""
    return error.strip().lower().startswith(_BROKEN_FILE_ERRORS)


def failure_kind(error: str) -> str:
    """The short kind of a scoring error ("truncated image", "corrupt image"), for grouping."""
    kind = error.split(":", 1)[0].split(" (", 1)[0].strip()
    return kind or "error"


def load_scores(
    roots: Sequence[str],
    scores_file: Optional[str | os.PathLike[str]] = None,
    *,
    model: Optional[str] = None,
    progress: Optional[Callable[[Any], None]] = None,
    exclude: Sequence[str] = (),
) -> ScoreSource:
    """Scores from ``scores_file``, else from the scoring library (through its cache).

    ``progress`` is called with each scored row. Folders in ``exclude`` (absolute) are not scored:
    the scorer is asked to skip them, and ``collect_groups`` leaves them out whatever it returns.
    """
    if scores_file is not None:
        from loda_cli.scoresfile import read_scores

        from loda_cli.scoresfile import scores_bases

        parsed = read_scores(scores_file)
        rows = [(row.path, row.score) for row in parsed.rows]
        unusable = parsed.skipped - len(parsed.failed)
        bases = scores_bases(scores_file, parsed.header)
        return ScoreSource(
            rows, bases, display_path(scores_file), unusable, list(parsed.failed),
            from_file=True,
        )
    globs = sorted(
        {
            _glob_escape(os.path.relpath(folder, root))
            for folder in exclude
            for root in roots
            if _is_under(folder, root) and folder != root
        }
    )
    rows = []
    failed: list[tuple[str, str]] = []
    from loda_cli.cachelookup import cached_rows

    # The cache first: a folder scored before is planned without importing torch (about 6 s).
    found: Iterable[Any] | None = cached_rows(
        roots, model=model, recursive=True, exclude=tuple(globs)
    )
    description = "the score cache" + (f" (model {model})" if model else "")
    if found is None:
        try:
            from loda_cli.scoring import score_paths
        except ModuleNotFoundError as exc:
            if exc.name != "loda_cli.scoring":
                raise
            raise LodaError("no scores: pass --scores FILE (written by `loda score`)") from None
        found = score_paths(
            [Path(r) for r in roots],
            model=model,
            recursive=True,
            exclude=tuple(globs),
            progress=progress,
        )
        description = "the model" + (f" {model}" if model else "")
    for row in found:
        path = row.path
        if not os.path.isabs(path) and row.root and not os.path.lexists(path):
            path = os.path.join(row.root, path)
        if row.error or row.score is None:
            failed.append((path, str(row.error or "no score")))
            continue
        rows.append((path, float(row.score)))
    return ScoreSource(rows, [os.getcwd()], description, 0, failed)


def _glob_escape(path: str) -> str:
    """A relative path as an fnmatch pattern matching only itself."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in path)


# --- groups of companion files -------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """Something left alone, and why."""

    path: str
    reason: str


@dataclass
class Group:
    """A decision photo and the companions that share its fate."""

    root: int
    folder: str  # real path of the folder holding the files
    rel_folder: str  # the folder relative to its root ("" at the top)
    decision: str  # file name of the scored photo
    members: list[str]  # file names, decision photo first
    score: float
    error: Optional[str] = None  # why the decision photo could not be scored (score is 0 then)

    @property
    def stem(self) -> str:
        return os.path.splitext(self.decision)[0]

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.decision)


def _preference(name: str) -> int:
    ext = os.path.splitext(name)[1].lower()
    if ext in JPEG_EXTENSIONS:
        return 0
    if ext in HEIC_EXTENSIONS:
        return 1
    if ext in RAW_EXTENSIONS:
        return 2
    return 3


def _is_companion(name: str, decision: str) -> bool:
    stem, ext = os.path.splitext(decision)
    if name == decision or not name.startswith(stem + "."):
        return False
    rest = name[len(stem) :].lower()
    if rest in COMPANION_EXTENSIONS:
        return True
    # darktable style: IMG_1.CR2.xmp, IMG_1.JPG.xmp
    inner = rest[: -len(".xmp")]
    if not rest.endswith(".xmp") or inner.count(".") != 1:
        return False
    return inner in IMAGE_COMPANION_EXTENSIONS or inner == ext.lower()


def _by_stem(listing: dict[str, str]) -> dict[str, list[str]]:
    """Names indexed by the stems they could be companions of (``IMG_1.CR2.xmp`` under both
    ``IMG_1.CR2`` and ``IMG_1``), so finding a photo's companions does not scan the folder."""
    index: dict[str, list[str]] = {}
    for name in listing:
        first = os.path.splitext(name)[0]
        index.setdefault(first, []).append(name)
        second = os.path.splitext(first)[0]
        if second != first:
            index.setdefault(second, []).append(name)
    return index


def _list_folder(folder: str) -> dict[str, str]:
    """name -> "file", "link" or "other" for one folder (loda's own files left out)."""
    kinds: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith((JOURNAL_PREFIX, TMP_PREFIX)):
                continue
            if entry.is_symlink():
                kinds[entry.name] = "link"
            elif entry.is_file(follow_symlinks=False):
                kinds[entry.name] = "file"
            else:
                kinds[entry.name] = "other"
    return kinds


def collect_groups(
    roots: Sequence[str],
    source: ScoreSource,
    *,
    exclude: Sequence[str] = (),
    include_failed: bool = False,
) -> tuple[list[Group], list[Skip]]:
    """Group the scored photos with their companions. Paths under ``exclude`` are left out.

    Files that could not be scored are reported as skips with their error, unless
    ``include_failed``: then the broken ones (``is_broken_file_error``) come back as groups with
    ``error`` set and a score of 0, after the scored groups. A failed file with a scored companion
    (a truncated JPEG beside a good RAW) belongs to that companion's group, whatever is asked.
    """
    skips: list[Skip] = []
    located: dict[str, tuple[int, float, Optional[str]]] = {}
    entries = [(raw, score, None) for raw, score in source.rows]
    entries += [(raw, 0.0, error) for raw, error in source.failed]
    for raw, score, error in entries:
        try:
            full, root = _locate(raw, roots, source.bases)
        except _Skipped as why:
            skips.append(Skip(raw, str(why)))
            continue
        except OSError as exc:
            skips.append(Skip(raw, f"unreadable: {exc.strerror}"))
            continue
        if any(_is_under(full, folder) for folder in exclude):
            continue
        located.setdefault(full, (root, score, error))

    by_stem: dict[tuple[str, str], list[str]] = {}
    for full in located:
        folder, name = os.path.split(full)
        by_stem.setdefault((folder, os.path.splitext(name)[0]), []).append(name)

    listings: dict[str, dict[str, str]] = {}
    stem_index: dict[str, dict[str, list[str]]] = {}
    groups: list[Group] = []
    failed_groups: list[Group] = []
    for (folder, _stem), names in sorted(by_stem.items()):
        if folder not in listings:
            try:
                listings[folder] = _list_folder(folder)
                stem_index[folder] = _by_stem(listings[folder])
            except OSError as exc:
                reason = f"folder unreadable: {exc.strerror}"
                skips.extend(Skip(os.path.join(folder, n), reason) for n in names)
                continue
        listing = listings[folder]
        claimed: set[str] = set()

        def order(name: str) -> tuple[bool, int, str]:
            failed = located[os.path.join(folder, name)][2] is not None
            return (failed, _preference(name), name)

        for name in sorted(names, key=order):
            if name in claimed:
                continue
            nearby = stem_index[folder].get(os.path.splitext(name)[0], [])
            companions = sorted(n for n in nearby if n not in claimed and _is_companion(n, name))
            members = [name, *companions]
            claimed.update(members)
            root, score, error = located[os.path.join(folder, name)]
            if error is not None and not (include_failed and is_broken_file_error(error)):
                reason = f"could not be scored ({failure_kind(error)})"
                if include_failed:
                    reason += "; not moved: the file itself may be fine"
                skips.append(Skip(os.path.join(folder, name), reason))
                continue
            if any(listing.get(m) == "link" for m in members):
                reason = "a companion file is a symlink (group left alone)"
                skips.append(Skip(os.path.join(folder, name), reason))
                continue
            members = [m for m in members if listing.get(m) == "file"]
            if name not in members:
                continue
            rel = os.path.relpath(folder, roots[root])
            group = Group(root, folder, "" if rel == "." else rel, name, members, score, error)
            (failed_groups if error is not None else groups).append(group)
    groups.sort(key=lambda g: (g.score, g.path))
    failed_groups.sort(key=lambda g: g.path)
    return groups + failed_groups, skips


# --- selection and star bins ---------------------------------------------------------------------


def select_worst(
    groups: Sequence[Group],
    *,
    below: Optional[float] = None,
    worst: Optional[int] = None,
    worst_percent: Optional[float] = None,
) -> list[Group]:
    """The groups to cull: score below a threshold, the N worst, or the worst P percent."""
    given = [v is not None for v in (below, worst, worst_percent)]
    if sum(given) != 1:
        raise UsageError("give exactly one of --below, --worst, --worst-percent")
    ranked = sorted(groups, key=lambda g: (g.score, g.path))
    if below is not None:
        if not 0.0 <= below <= 1.0:
            raise UsageError("--below is a score in [0, 1]")
        return [g for g in ranked if g.score < below]
    if worst is not None:
        if worst < 0:
            raise UsageError("--worst must be 0 or more")
        return ranked[:worst]
    if worst_percent is None or not 0.0 <= worst_percent <= 100.0:
        raise UsageError("--worst-percent is between 0 and 100")
    # Rounded down: when in doubt, cull fewer.
    return ranked[: int(math.floor(len(ranked) * worst_percent / 100.0 + 1e-9))]


def parse_edges(text: str) -> tuple[float, float, float, float]:
    """Four increasing star-bin edges in [0, 1], from ``"0.2,0.4,0.6,0.8"``."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--edges needs four numbers like 0.2,0.4,0.6,0.8, not {text!r}") from None
    if len(values) != 4 or not all(0.0 <= v <= 1.0 for v in values):
        raise UsageError(f"--edges needs four numbers in [0, 1], not {text!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--edges must increase, not {text!r}")
    return values  # type: ignore[return-value]


def quantile_edges(scores: Sequence[float]) -> tuple[float, float, float, float]:
    """Edges that put a fifth of the photos in each star bin (linear interpolation)."""
    if not scores:
        return DEFAULT_EDGES
    ordered = sorted(scores)
    edges = []
    for q in (0.2, 0.4, 0.6, 0.8):
        pos = q * (len(ordered) - 1)
        low = int(math.floor(pos))
        high = min(low + 1, len(ordered) - 1)
        edges.append(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))
    return tuple(edges)  # type: ignore[return-value]


def count_bins(groups: Sequence[Group], edges: Sequence[float]) -> dict[int, int]:
    """Photos per star bin, 5 stars first, empty bins included."""
    counts = {stars: 0 for stars in (5, 4, 3, 2, 1)}
    for group in groups:
        counts[star_rating(group.score, edges)] += 1
    return counts


def lopsided_bins(counts: dict[int, int]) -> Optional[str]:
    """Why the bins deserve a second look (some empty, or one holding nearly all), else None."""
    total = sum(counts.values())
    if total < 5:
        return None
    empty = [stars for stars, n in counts.items() if n == 0]
    full = [stars for stars, n in counts.items() if n >= 0.9 * total]
    if full:
        return f"{counts[full[0]]} of {total} photos get {full[0]} star{'s' if full[0] > 1 else ''}"
    if empty:
        names = " or ".join(str(s) for s in sorted(empty))
        return f"no photo gets {names} star{'s' if empty != [1] else ''}"
    return None


def star_rating(score: float, edges: Sequence[float]) -> int:
    """1 star below the first edge, 5 stars at or above the last."""
    return 1 + sum(1 for edge in edges if score >= edge)


# --- plans ---------------------------------------------------------------------------------------


@dataclass
class Action:
    """One file operation. ``kind`` is move, copy, link (a symlink) or write (a sidecar)."""

    kind: str
    src: str
    dst: str
    size: int
    group: int
    score: float
    decision: bool = True
    stars: Optional[int] = None
    old_bytes: Optional[bytes] = None
    new_bytes: Optional[bytes] = None


@dataclass
class Plan:
    """Everything a command would do, computed without writing anything."""

    command: str
    mode: str
    roots: list[str]
    dests: list[str]
    journal_dir: str
    actions: list[Action] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    unchanged: list[Skip] = field(default_factory=list)
    edges: Optional[tuple[float, ...]] = None
    # "culled": each root's own _culled; "dest": one chosen folder; "in-place": rate
    layout: str = "dest"
    # sort and rate: photos per star bin (5 down to 1), over every scored photo
    bin_counts: dict[int, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(a.size for a in self.actions)

    @property
    def score_range(self) -> Optional[tuple[float, float]]:
        scores = [g.score for g in self.groups]
        return (min(scores), max(scores)) if scores else None

    @property
    def companion_count(self) -> int:
        return sum(1 for a in self.actions if not a.decision)


def journals_dir() -> str:
    """The one place every journal goes: ``$LODA_HOME/journals``. Outside the photo folders, so
    an undo can leave them exactly as they were, and one place to look for what loda did."""
    return os.path.join(os.path.abspath(os.environ.get("LODA_HOME") or _default_home()), "journals")


def _default_home() -> str:
    from loda_cli.home import loda_home

    return os.fspath(loda_home())


def culled_folder(root: str) -> str:
    return os.path.join(root, CULLED_DIRNAME)


def _checked_dest(dest: str | os.PathLike[str], roots: Sequence[str]) -> str:
    real = os.path.realpath(os.fspath(dest))
    if any(_is_under(root, real) for root in roots):
        raise UsageError(f"the destination {display_path(dest)} must not be a root or contain one")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise UsageError(f"the destination {display_path(dest)} is not a folder")
    return real


def _default_culled(root: str) -> str:
    folder = culled_folder(root)
    if os.path.islink(folder):
        raise UnsafePathError(
            f"{display_path(folder)} is a symlink; loda will not move photos through it"
        )
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{display_path(folder)} exists and is not a folder")
    return folder


def _root_subfolders(roots: Sequence[str]) -> list[str]:
    """Names that keep several roots apart inside one destination."""
    names: list[str] = []
    for root in roots:
        base = os.path.basename(root) or "root"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


class _Placer:
    """Chooses free destination names: a collision gets ``-1``, ``-2``... on the stem, the same
    number for every member of a group. Names are compared case-folded, so a case-insensitive
    destination (exFAT, macOS) cannot collide either."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def place(self, folder: str, group: Group) -> list[str]:
        stem = group.stem
        n = 0
        while True:
            names = [m if n == 0 else f"{stem}-{n}{m[len(stem):]}" for m in group.members]
            paths = [os.path.join(folder, name) for name in names]
            if all(p.casefold() not in self.taken and not os.path.lexists(p) for p in paths):
                self.taken.update(p.casefold() for p in paths)
                return paths
            n += 1


def _member_size(path: str) -> int:
    return os.lstat(path).st_size


def _transfer_actions(
    plan: Plan, groups: Sequence[Group], dest_folder: Callable[[Group], str], kind: str
) -> None:
    placer = _Placer()
    for group in groups:
        try:
            targets = placer.place(dest_folder(group), group)
            sizes = [_member_size(os.path.join(group.folder, m)) for m in group.members]
        except OSError as exc:
            plan.skipped.append(Skip(group.path, f"unreadable: {exc.strerror}"))
            continue
        index = len(plan.groups)
        plan.groups.append(group)
        for member, target, size in zip(group.members, targets, sizes):
            source = os.path.join(group.folder, member)
            is_decision = member == group.decision
            plan.actions.append(Action(kind, source, target, size, index, group.score, is_decision))


def cull_excludes(roots: Sequence[str], dests: Sequence[str]) -> list[str]:
    """Folders whose files are never considered: every root's _culled and the destinations."""
    return [*(culled_folder(r) for r in roots), *dests]


def plan_cull(
    roots: Sequence[str],
    selected: Sequence[Group],
    *,
    mode: str = "move",
    to: Optional[str | os.PathLike[str]] = None,
) -> Plan:
    """Move (or copy, or symlink) the selected groups to ``<root>/_culled`` or ``to``."""
    if mode not in ("move", "copy", "link"):
        raise UsageError(f"unknown cull mode {mode!r}")
    dests = cull_dests(roots, to)
    subfolders = _root_subfolders(roots) if to is not None and len(roots) > 1 else None

    def dest_folder(group: Group) -> str:
        base = dests[0] if to is not None else dests[group.root]
        if subfolders:
            base = os.path.join(base, subfolders[group.root])
        return os.path.join(base, group.rel_folder) if group.rel_folder else base

    layout = "dest" if to is not None else "culled"
    plan = Plan("cull", mode, list(roots), dests, journals_dir(), layout=layout)
    _transfer_actions(plan, selected, dest_folder, mode)
    return plan


def cull_dests(roots: Sequence[str], to: Optional[str | os.PathLike[str]]) -> list[str]:
    if to is not None:
        return [_checked_dest(to, roots)]
    return [_default_culled(root) for root in roots]


def plan_sort(
    roots: Sequence[str],
    groups: Sequence[Group],
    *,
    into: str | os.PathLike[str],
    mode: str = "copy",
    edges: Sequence[float] = DEFAULT_EDGES,
) -> Plan:
    """Copy (or move) every group into ``into/N-stars/<relative path>``."""
    if mode not in ("copy", "move"):
        raise UsageError(f"unknown sort mode {mode!r}")
    dest = _checked_dest(into, roots)
    subfolders = _root_subfolders(roots) if len(roots) > 1 else None

    def dest_folder(group: Group) -> str:
        base = os.path.join(dest, STAR_FOLDERS[star_rating(group.score, edges)])
        if subfolders:
            base = os.path.join(base, subfolders[group.root])
        return os.path.join(base, group.rel_folder) if group.rel_folder else base

    plan = Plan("sort", mode, list(roots), [dest], journals_dir(), edges=tuple(edges))
    _transfer_actions(plan, groups, dest_folder, mode)
    for action in plan.actions:
        action.stars = star_rating(action.score, edges)
    plan.bin_counts = count_bins(groups, edges)
    return plan


def sidecar_names(group: Group, style: str) -> list[str]:
    """The sidecar file names a group's rating goes to (before matching existing files' case).

    ``auto`` updates the sidecars the group already has, in whichever naming, and creates
    ``<photo>.<ext>.xmp`` for each image file only when it has none: that is the name darktable
    and digiKam read and write by default, and the only one that cannot be confused between a RAW
    and a JPEG of the same stem. Lightroom reads ``<stem>.xmp``, and only for RAW files; ask for
    it with ``lightroom`` (or ``both``).
    """
    if style not in SIDECAR_STYLES:
        raise UsageError(f"--sidecar is one of {', '.join(SIDECAR_STYLES)}, not {style!r}")
    if style == "auto":
        existing = [m for m in group.members if m.lower().endswith(".xmp")]
        if existing:
            return existing
        style = "darktable"
    names: list[str] = []
    if style in ("darktable", "both"):
        images = [
            m
            for m in group.members
            if m == group.decision
            or os.path.splitext(m)[1].lower() in IMAGE_COMPANION_EXTENSIONS
        ]
        names += [f"{m}.xmp" for m in images]
    if style in ("lightroom", "both"):
        names.append(f"{group.stem}.xmp")
    return names


def _read_sidecar(path: str) -> bytes:
    """A sidecar's bytes; OSError when unreadable, _Skipped when too large to be XMP."""
    if os.lstat(path).st_size > _MAX_SIDECAR_BYTES:
        raise _Skipped("sidecar too large to be XMP")
    with open(path, "rb") as fh:
        return fh.read()


def _person_rating(group: Group, listing: dict[str, str]) -> Optional[tuple[int, str]]:
    """(rating, sidecar name) of a rating a person set in any of the group's sidecars.

    darktable and Lightroom each read only their own naming, so a person's rating in one naming
    must keep loda out of the other too: a loda rating beside it would contradict the person in
    the other program.
    """
    for name in group.members:
        if not name.lower().endswith(".xmp") or listing.get(name) != "file":
            continue
        try:
            state = xmp.read_state(_read_sidecar(os.path.join(group.folder, name)))
        except (OSError, _Skipped, xmp.XmpError):
            continue  # reported when (if) loda would write to it
        if state.rating_set_by_person and state.rating is not None:
            return state.rating, name
    return None


def plan_rate(
    roots: Sequence[str],
    groups: Sequence[Group],
    *,
    edges: Sequence[float] = DEFAULT_EDGES,
    style: str = "auto",
    label: Optional[str] = None,
    force: bool = False,
) -> Plan:
    """Write xmp:Rating (and xmp:Label for the worst bin) into each group's sidecars.

    A rating a person set in any sidecar of a group leaves every sidecar of that group alone
    (unless ``force``), whatever the naming.
    """
    plan = Plan(
        "rate", style, list(roots), [], journals_dir(), edges=tuple(edges), layout="in-place"
    )
    claimed: set[str] = set()
    for group in groups:
        stars = star_rating(group.score, edges)
        group_label = label if (label and stars == 1) else None
        try:
            listing = _list_folder(group.folder)
        except OSError as exc:
            plan.skipped.append(Skip(group.path, f"folder unreadable: {exc.strerror}"))
            continue
        index = len(plan.groups)
        wrote = False
        person = None if force else _person_rating(group, listing)
        for wanted in sidecar_names(group, style):
            name = _existing_case(listing, wanted)
            path = os.path.join(group.folder, name)
            if path in claimed:
                continue
            claimed.add(path)
            if person is not None:
                rating, where = person
                reason = f"rating {rating} set by a person in {where} (use --force)"
                if name != where:
                    reason = f"rating {rating} set by a person in {where}, kept in every naming"
                plan.unchanged.append(Skip(path, reason))
                continue
            kind = listing.get(name)
            if kind == "link":
                plan.skipped.append(Skip(path, "sidecar is a symlink (never written through)"))
                continue
            if kind == "other":
                plan.skipped.append(Skip(path, "sidecar name is taken by a folder"))
                continue
            old = None
            if kind == "file":
                try:
                    old = _read_sidecar(path)
                except _Skipped as why:
                    plan.skipped.append(Skip(path, str(why)))
                    continue
                except OSError as exc:
                    plan.skipped.append(Skip(path, f"unreadable: {exc.strerror}"))
                    continue
            try:
                update = xmp.plan_rating(old, stars, group_label, force=force)
            except xmp.XmpError as exc:
                plan.skipped.append(Skip(path, str(exc)))
                continue
            if update.new_bytes is None:
                plan.unchanged.append(Skip(path, update.reason or update.action))
                continue
            wrote = True
            new = update.new_bytes
            plan.actions.append(
                Action("write", path, path, len(new), index, group.score, True, stars, old, new)
            )
        if wrote:
            plan.groups.append(group)
    plan.bin_counts = count_bins(groups, edges)
    return plan


def _existing_case(listing: dict[str, str], wanted: str) -> str:
    """An existing file whose name differs from ``wanted`` only in case, else ``wanted``."""
    if wanted in listing:
        return wanted
    matches = sorted(n for n in listing if n.lower() == wanted.lower())
    return matches[0] if matches else wanted


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
            inside = any(_is_under(real, d) or _is_under(d, real) for d in plan.dests)
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


# --- the journal writer --------------------------------------------------------------------------


class _JournalWriter:
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
        _fsync_dir(folder)

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


# --- file operations that never overwrite --------------------------------------------------------

_NO_HARDLINKS = {
    errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EACCES
}


def _place(tmp: str, dst: str) -> None:
    """Give the finished file ``tmp`` the name ``dst``, never replacing an existing ``dst``."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        os.unlink(tmp)
        raise _Skipped("the destination name was taken meanwhile") from None
    except OSError as exc:
        if exc.errno not in _NO_HARDLINKS:
            raise
        # Filesystems without hard links (FAT, exFAT, some shares): check, then rename.
        if os.path.lexists(dst):
            os.unlink(tmp)
            raise _Skipped("the destination name was taken meanwhile") from None
        os.rename(tmp, dst)
        return
    os.unlink(tmp)


def _copy_verified(src: str, dst: str, size: int, sha256: str, tmp: str) -> None:
    """Copy to ``tmp``, fsync, check size and hash (of the bytes read and of the bytes on disk),
    then name it ``dst``. The source is untouched."""
    digest = hashlib.sha256()
    written = 0
    mode = stat.S_IMODE(os.stat(src).st_mode)
    with open(src, "rb") as fin:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                written += len(chunk)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
    if written != size or digest.hexdigest() != sha256:
        os.unlink(tmp)
        raise _Skipped("the file changed after it was journalled")
    if os.path.getsize(tmp) != size or _sha256_file(tmp) != sha256:
        os.unlink(tmp)
        raise OutputError(
            f"the copy of {display_path(src)} does not read back identical; the source is untouched"
        )
    try:
        shutil.copystat(src, tmp)
    except OSError:
        os.chmod(tmp, mode)
    _place(tmp, dst)
    _fsync_dir(os.path.dirname(dst))


def _same_file_state(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns == mtime_ns


def _move(
    src: str, dst: str, size: int, sha256: str, tmp: str, verified: Callable[[], None]
) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        raise _Skipped("the destination name was taken meanwhile") from None
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            _copy_verified(src, dst, size, sha256, tmp)
            verified()
            os.unlink(src)
            _fsync_dir(os.path.dirname(src))
            return
        if exc.errno not in _NO_HARDLINKS:
            raise
        if os.path.lexists(dst):
            raise _Skipped("the destination name was taken meanwhile") from None
        os.rename(src, dst)
        _fsync_dir(os.path.dirname(dst))
        _fsync_dir(os.path.dirname(src))
        return
    # Both names now point at the same file; dropping the old name loses nothing.
    _fsync_dir(os.path.dirname(dst))
    os.unlink(src)
    _fsync_dir(os.path.dirname(src))


def _read_regular(path: str) -> Optional[bytes]:
    """The bytes of a regular file, None when absent; _Skipped for links and other things."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _Skipped("no longer a regular file")
    with open(path, "rb") as fh:
        return fh.read()


def _write_file(
    path: str, data: bytes, tmp: str, *, replace: bool, mode: Optional[int] = None
) -> None:
    """Write ``data`` to ``tmp``, fsync, then name it ``path`` (replacing only if ``replace``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o644 if mode is None else mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    if replace:
        os.replace(tmp, path)
    else:
        _place(tmp, path)
    _fsync_dir(os.path.dirname(path))


# --- apply ---------------------------------------------------------------------------------------


@dataclass
class ApplyReport:
    journal: Optional[str]
    done: int = 0
    bytes_done: int = 0
    skipped: list[Skip] = field(default_factory=list)


def _ref(path: str, bases: Sequence[str], tag: str) -> list[Any]:
    for index, base in enumerate(bases):
        if _is_under(path, base) and path != base:
            return [tag, index, _enc(os.path.relpath(path, base))]
    raise UnsafePathError(f"{display_path(path)} is outside the command's folders")


def _action_delay() -> float:
    try:
        return max(0.0, float(os.environ.get(ACTION_DELAY_ENV, "0") or 0))
    except ValueError:
        return 0.0


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
    # Destination folders that do not exist yet (and missing folders above them) are journalled
    # in the header, so undo can remove them again once they are empty.
    used = {d for d in plan.dests if any(_is_under(a.dst, d) for a in plan.actions)}
    created: list[str] = []
    for folder in sorted(used):
        missing = []
        while not os.path.lexists(folder) and folder not in created:
            missing.append(folder)
            folder = os.path.dirname(folder)
        created.extend(reversed(missing))
    header = {
        "type": "header",
        "version": JOURNAL_VERSION,
        "command": plan.command,
        "mode": plan.mode,
        "layout": plan.layout,
        "roots": [_enc(r) for r in plan.roots],
        "dests": [_enc(d) for d in plan.dests],
        "time": _now(),
        "loda": __version__,
        "roots_text": [display_path(r) for r in plan.roots],
        "dests_text": [display_path(d) for d in plan.dests],
        "created": [_enc(folder) for folder in created],
    }
    writer = _JournalWriter(plan.journal_dir, header)
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
    report = ApplyReport(journal=writer.path)
    if on_journal:
        on_journal(writer.path)
    try:
        prepared = _write_intents(plan, writer, report)
        for number, (action_id, action, fingerprint, tmp) in enumerate(prepared, start=1):
            delay = _action_delay()
            if delay:
                time.sleep(delay)
            try:
                _perform(action, fingerprint, tmp, writer, action_id)
            except _Skipped as why:
                report.skipped.append(Skip(action.src, str(why)))
                writer.write({"type": "skipped", "id": action_id, "reason": str(why)})
            except OSError as exc:
                error = exc.strerror or str(exc)
                writer.write({"type": "failed", "id": action_id, "error": error}, sync=True)
                raise OutputError(
                    f"{display_path(action.src)}: {error}; stopped. What was done so far is in "
                    f"{display_path(writer.path)}, and `loda undo` reverses it"
                ) from None
            else:
                report.done += 1
                report.bytes_done += action.size
                writer.write({"type": "done", "id": action_id})
            if progress:
                progress(number, len(prepared))
        end = {"type": "end", "time": _now(), "done": report.done, "skipped": len(report.skipped)}
        writer.write(end, sync=True)
    finally:
        writer.close()
    return report


_Prepared = tuple[int, Action, tuple[int, int, str], str]  # id, action, (size, mtime, sha), tmp


def _write_intents(plan: Plan, writer: _JournalWriter, report: ApplyReport) -> list[_Prepared]:
    """Journal every action (and every folder to create) before touching anything; fsync."""
    dest_bases = plan.dests if plan.command != "rate" else plan.roots
    prepared = []
    for action_id, action in enumerate(plan.actions):
        tmp_name = f"{TMP_PREFIX}{writer.stamp}-{action_id}"
        record: dict[str, Any] = {
            "type": "intent",
            "id": action_id,
            "kind": action.kind,
            "group": action.group,
            "score": action.score,
        }
        try:
            if action.kind == "write":
                current = _read_regular(action.src)
                if current != action.old_bytes:
                    raise _Skipped("the sidecar changed since it was planned")
                record.update(
                    path=_ref(action.src, plan.roots, "r"),
                    old=None if action.old_bytes is None else _b64(action.old_bytes),
                    new_sha256=hashlib.sha256(action.new_bytes or b"").hexdigest(),
                    tmp=_enc(tmp_name),
                    text=display_path(action.src),
                )
                fingerprint = (0, 0, "")
            else:
                st = os.lstat(action.src)
                if not stat.S_ISREG(st.st_mode):
                    raise _Skipped("no longer a regular file")
                digest = _sha256_file(action.src) if action.kind in ("move", "copy") else ""
                after = os.lstat(action.src)
                if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                    raise _Skipped("the file changed while it was being read")
                fingerprint = (st.st_size, st.st_mtime_ns, digest)
                record.update(
                    src=_ref(action.src, plan.roots, "r"),
                    dst=_ref(action.dst, dest_bases, "d"),
                    size=st.st_size,
                    sha256=digest,
                    tmp=_enc(tmp_name),
                    text=f"{display_path(action.src)} -> {display_path(action.dst)}",
                )
        except _Skipped as why:
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
        writer.write({"type": "mkdir", "dir": _ref(folder, dest_bases, "d")})
    writer.write({"type": "ready", "actions": len(prepared)})
    writer.sync()
    _fsync_dir(os.path.dirname(writer.path))

    for folder in to_create:
        try:
            os.mkdir(folder)
        except OSError as exc:
            raise OutputError(
                f"cannot create {display_path(folder)}: {exc.strerror or exc}; nothing was moved"
            ) from None
        _fsync_dir(os.path.dirname(folder))
    # A folder swapped for a symlink between planning and now must not redirect any file.
    for _, action, _, _ in prepared:
        folder = os.path.dirname(action.dst)
        if os.path.realpath(folder) != folder:
            raise UnsafePathError(
                f"{display_path(folder)} is now a symlink; stopped before moving anything"
            )
    return prepared


def _perform(
    action: Action,
    fingerprint: tuple[int, int, str],
    tmp: str,
    writer: _JournalWriter,
    action_id: int,
) -> None:
    if action.kind == "write":
        current = _read_regular(action.src)
        if current != action.old_bytes:
            raise _Skipped("the sidecar changed since it was planned")
        mode = stat.S_IMODE(os.lstat(action.src).st_mode) if current is not None else None
        new = action.new_bytes or b""
        _write_file(action.src, new, tmp, replace=current is not None, mode=mode)
        return
    size, mtime_ns, digest = fingerprint
    if not _same_file_state(action.src, size, mtime_ns):
        raise _Skipped("the file changed after it was journalled")
    if action.kind == "move":
        def verified() -> None:
            writer.write({"type": "verified", "id": action_id}, sync=True)

        _move(action.src, action.dst, size, digest, tmp, verified)
    elif action.kind == "copy":
        _copy_verified(action.src, action.dst, size, digest, tmp)
    elif action.kind == "link":
        try:
            os.symlink(action.src, action.dst)
        except FileExistsError:
            raise _Skipped("the destination name was taken meanwhile") from None
        _fsync_dir(os.path.dirname(action.dst))
    else:
        raise UsageError(f"unknown action kind {action.kind!r}")


# --- reading journals ----------------------------------------------------------------------------


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
        except ValueError:
            # Only the last line can be cut short by a crash; damage anywhere else is refused.
            if number == last:
                truncated = True
                continue
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
    rel = _dec_bytes(ref[2])
    parts = rel.split(b"/")
    if rel.startswith(b"/") or b"\x00" in rel or any(p in (b"", b".", b"..") for p in parts):
        raise UnsafePathError(
            f"journal entry {display_path(rel)} points outside the journal's folders; "
            "refusing to undo"
        )
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
    if header.get("version") != JOURNAL_VERSION:
        raise JournalError(
            f"{display_path(path)} has journal version {header.get('version')!r}; "
            f"this loda reads {JOURNAL_VERSION}"
        )
    try:
        roots = [os.fsdecode(_dec_bytes(r)) for r in header["roots"]]
        dests = [os.fsdecode(_dec_bytes(d)) for d in header["dests"]]
    except (KeyError, TypeError):
        raise JournalError(f"{display_path(path)} has a damaged header") from None
    if not roots or not all(os.path.isabs(p) and os.path.normpath(p) == p for p in roots + dests):
        raise UnsafePathError(
            f"{display_path(path)} names folders that are not absolute, normalised paths"
        )
    real_journal = os.path.realpath(path)
    homes = [os.path.realpath(journals_dir())]
    if not any(_is_under(real_journal, os.path.realpath(folder)) for folder in roots + dests + homes):
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
        created = [os.fsdecode(_dec_bytes(c)) for c in header.get("created", [])]
    except TypeError:
        raise JournalError(f"{display_path(path)} has a damaged header") from None
    for folder in created:
        # Only a destination or a folder above one: undo removes these when empty, nothing else.
        if not (
            os.path.isabs(folder)
            and os.path.normpath(folder) == folder
            and any(_is_under(d, folder) for d in dests)
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
        except (KeyError, TypeError, ValueError):
            raise JournalError(f"{display_path(path)} has a damaged {kind} record") from None
    undone_at = _undo_complete(path)
    return Journal(
        path, header, roots, dests, sorted(entries.values(), key=lambda e: e.id), mkdirs, truncated,
        bool(undone_at), finished, created, undone_at,
    )


def _entry_from(record: dict[str, Any], roots: Sequence[str], dests: Sequence[str]) -> JournalEntry:
    kind = record["kind"]
    entry_id = int(record["id"])
    tmp = os.fsdecode(_dec_bytes(record["tmp"])) if record.get("tmp") else None
    if tmp is not None and (os.sep in tmp or not tmp.startswith(TMP_PREFIX)):
        raise UnsafePathError(
            "journal names a temporary file outside loda's naming; refusing to undo"
        )
    if kind == "write":
        base, path = _resolve_ref(record["path"], roots, dests)
        old = record.get("old")
        return JournalEntry(
            entry_id, kind, path, path, 0, "", tmp,
            old_bytes=None if old is None else _dec_bytes(old),
            new_sha256=str(record["new_sha256"]), bases=((base, path),),
        )
    if kind not in ("move", "copy", "link"):
        raise JournalError(f"journal holds an unknown action {kind!r}")
    src_base, src = _resolve_ref(record["src"], roots, dests)
    dst_base, dst = _resolve_ref(record["dst"], roots, dests)
    return JournalEntry(
        entry_id, kind, src, dst, int(record["size"]), str(record.get("sha256", "")), tmp,
        bases=((src_base, src), (dst_base, dst)),
    )


def _undo_log_path(journal: str) -> str:
    if journal.endswith(JOURNAL_SUFFIX):
        return journal[: -len(JOURNAL_SUFFIX)] + UNDO_SUFFIX
    return journal + ".undo"


def _undo_complete(journal: str) -> str:
    """When the last undo of ``journal`` finished complete ("" when it has not)."""
    try:
        with open(_undo_log_path(journal), "rb") as fh:
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


def find_journals(start: str | os.PathLike[str] | None = None, depth: int = 3) -> list[str]:
    """Journals in ``start`` (default: the current folder) and up to ``depth`` levels below it,
    plus those in each parent folder and its ``_culled``; newest first."""
    start = os.path.abspath(os.fspath(start or os.getcwd()))
    found: set[str] = set()

    def scan(folder: str) -> Iterable[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as entries:
                return list(entries)
        except OSError:
            return []

    def add(folder: str) -> None:
        for entry in scan(folder):
            if _is_journal_name(entry.name) and entry.is_file(follow_symlinks=False):
                found.add(entry.path)

    frontier = [start]
    for _ in range(depth + 1):
        next_frontier = []
        for folder in frontier:
            for entry in scan(folder):
                if _is_journal_name(entry.name) and entry.is_file(follow_symlinks=False):
                    found.add(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    next_frontier.append(entry.path)
        frontier = next_frontier
    parent = os.path.dirname(start)
    while parent and parent != os.path.dirname(parent):
        add(parent)
        add(os.path.join(parent, CULLED_DIRNAME))
        parent = os.path.dirname(parent)
    add(journals_dir())
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
            dests = [os.fsdecode(_dec_bytes(d)) for d in header.get("dests", [])]
        except (OSError, ValueError, AttributeError, JournalError):
            continue
        if _undo_complete(path):
            continue
        for dest in dests:
            if dest not in found and any(_is_under(dest, r) and dest != r for r in real_roots):
                found.append(dest)
    return found


def _is_journal_name(name: str) -> bool:
    return (
        name.startswith(JOURNAL_PREFIX)
        and name.endswith(JOURNAL_SUFFIX)
        and not name.endswith(UNDO_SUFFIX)
    )


def latest_journal(start: str | os.PathLike[str] | None = None) -> str:
    """The newest journal near ``start`` that is not fully undone; JournalError when none."""
    here = os.path.realpath(os.fspath(start or os.getcwd()))
    undone: Optional[Journal] = None
    for path in find_journals(here):
        try:
            journal = read_journal(path)
        except LodaError:
            continue
        folders = [os.path.realpath(f) for f in journal.roots + journal.dests]
        if not any(_is_under(here, f) or _is_under(f, here) for f in folders):
            continue
        if not journal.undo_complete:
            return path
        undone = undone or journal
    if undone is not None:
        raise NothingToUndoError(undone.path, undone.undone_at)
    raise JournalError(f"no journal to undo under {display_path(here)}; pass the journal's path")


# --- undo ----------------------------------------------------------------------------------------


@dataclass
class UndoStep:
    entry: JournalEntry
    # restore, remove-duplicate, remove-copy, remove-link, restore-sidecar, remove-sidecar,
    # none (nothing to do) or conflict (left alone)
    action: str
    message: str


@dataclass
class UndoPlan:
    journal: Journal
    steps: list[UndoStep]

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


def _state(path: str, size: int, sha256: str) -> str:
    """'absent', 'match' (a regular file with that size and hash), or 'other'."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return "other"
    return "match" if _sha256_file(path) == sha256 else "other"


def _check_no_symlinks(entry: JournalEntry) -> None:
    for base, path in entry.bases:
        rel_folder = os.path.relpath(os.path.dirname(path), base)
        expected = os.path.normpath(os.path.join(os.path.realpath(base), rel_folder))
        if os.path.realpath(os.path.dirname(path)) != expected:
            raise UnsafePathError(
                f"a folder on the way to {display_path(path)} is now a symlink; refusing to undo"
            )


def _decide(entry: JournalEntry) -> UndoStep:
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
    s = _state(entry.src, entry.size, entry.sha256)
    d = _state(entry.dst, entry.size, entry.sha256)
    if entry.kind == "copy":
        if d == "absent":
            return UndoStep(entry, "none", f"no copy at {dst}")
        if d == "match":
            if s == "match":
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
        current = _read_regular(entry.src)
    except _Skipped:
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
    steps = [_decide(entry) for entry in reversed(journal.entries)]
    return UndoPlan(journal, steps)


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
        log = _UndoLog(_undo_log_path(journal.path))
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


def _undo_steps(plan: UndoPlan, report: UndoReport, log: "_UndoLog") -> list[UndoStep]:
    """Carry out the undo plan, logging each step; returns the conflicts left."""
    journal = plan.journal
    log.write({"type": "undo-start", "time": _now(), "journal": os.path.basename(journal.path)})
    remaining_conflicts: list[UndoStep] = []
    for step in plan.steps:
        if step.action == "conflict":
            remaining_conflicts.append(step)
            continue
        # Look again right before acting: the disk may have changed since planning.
        fresh = _decide(step.entry)
        if fresh.action == "conflict":
            remaining_conflicts.append(fresh)
            continue
        _cleanup_tmp(step.entry)
        if fresh.action == "none":
            report.unchanged += 1
            continue
        delay = _action_delay()
        if delay:
            time.sleep(delay)
        try:
            _undo_one(fresh)
        except OSError as exc:
            raise JournalError(
                f"{display_path(fresh.entry.dst)}: {exc.strerror or exc}; undo stopped. "
                "What was undone is recorded; run `loda undo` again once this is fixed"
            ) from None
        if fresh.action in ("restore", "restore-sidecar"):
            report.restored += 1
        else:
            report.removed += 1
        log.write({"type": "undone", "id": fresh.entry.id, "action": fresh.action})
    for folder in [*reversed(journal.mkdirs), *reversed(journal.created)]:
        try:
            if os.path.isdir(folder) and not os.path.islink(folder):
                os.rmdir(folder)  # only ever removes an empty folder, and only one loda made
        except OSError:
            pass
    report.conflicts = remaining_conflicts
    report.complete = not remaining_conflicts
    log.write({"type": "undo-end", "time": _now(), "complete": report.complete}, sync=True)
    return remaining_conflicts


class _UndoLog:
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
            intact = _state(entry.src, entry.size, entry.sha256) == "match" or (
                _state(entry.dst, entry.size, entry.sha256) == "match"
            )
            if not intact:
                continue
        os.unlink(tmp)


def _undo_one(step: UndoStep) -> None:
    entry = step.entry
    if step.action == "restore":
        folder = os.path.dirname(entry.src)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TMP_PREFIX}undo-{entry.id}")
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            os.unlink(tmp)
        try:
            _move(entry.dst, entry.src, entry.size, entry.sha256, tmp, lambda: None)
        except _Skipped:
            raise JournalError(
                f"{display_path(entry.src)} was taken while undoing; "
                f"{display_path(entry.dst)} stays"
            ) from None
    elif step.action in ("remove-duplicate", "remove-copy", "remove-link", "remove-sidecar"):
        os.unlink(entry.dst)
        _fsync_dir(os.path.dirname(entry.dst))
    elif step.action == "restore-sidecar":
        tmp = os.path.join(os.path.dirname(entry.src), f"{TMP_PREFIX}undo-{entry.id}")
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            os.unlink(tmp)
        exists = os.path.lexists(entry.src)
        mode = stat.S_IMODE(os.lstat(entry.src).st_mode) if exists else None
        _write_file(entry.src, entry.old_bytes or b"", tmp, replace=exists, mode=mode)
