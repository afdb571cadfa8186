"""Groups: each scored photo with the companions that share its fate.

A group is a decision photo (the one that was scored; the JPEG where a RAW+JPEG pair exists) and
its companions (same folder, same stem: RAW, JPEG/HEIC, ``.xmp`` in both naming styles, ``.aae``,
a Live Photo ``.mov``). Every path is checked to lie under one of the roots, through its real
parent folder, so ``..`` and symlinked folders cannot escape. Symlinked files are skipped, whole
group: loda never moves, copies or writes through a link. Reads only.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional, Sequence

from loda_cli.images import HEIF_EXTENSIONS as HEIC_EXTENSIONS  # .heic, .heif and Canon's .hif
from loda_cli.images import RAW_EXTENSIONS, REVIEW_MARKER
from loda_cli.organize.journal import JOURNAL_PREFIX, TMP_PREFIX
from loda_cli.organize.paths import Skip, Skipped, is_under_resolved
from loda_cli.organize.scores import ScoreSource, failure_kind, is_broken_file_error

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
IMAGE_COMPANION_EXTENSIONS = RAW_EXTENSIONS | JPEG_EXTENSIONS | HEIC_EXTENSIONS
COMPANION_EXTENSIONS = IMAGE_COMPANION_EXTENSIONS | {".xmp", ".aae", ".mov"}


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
    burst: Optional[int] = None  # its burst or near-duplicate set (loda_cli.bursts), when asked
    rule: str = ""  # why a plan acts on it ("below 0.4", "burst: 2nd of 3"), set by selection

    @property
    def stem(self) -> str:
        return os.path.splitext(self.decision)[0]

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.decision)


#: The reason given for a scored path that is not on disk: moved or deleted since, or a relative
#: path looked for from the wrong folder (the command then says where it looked).
NOT_FOUND = "not found"


def _root_index(real_path: str, roots: Sequence[str]) -> Optional[int]:
    for index, root in enumerate(roots):
        if is_under_resolved(real_path, root):
            return index
    return None


def _locate(raw: str, roots: Sequence[str], bases: Sequence[str],
            resolved: Optional[dict[str, str]] = None) -> tuple[str, int]:
    """The real location of a scored path and its root, or Skipped with the reason.

    The parent folder is resolved by the kernel's rules (symlinks, then ``..``), so neither can
    lead out of the roots. The file itself is not followed: a symlink is refused. ``resolved``:
    a dict that keeps each folder's resolved path for one plan (resolving took two thirds of
    the time of locating a photo); the plan's moves name the resolved paths.
    """
    if not raw or "\x00" in raw:
        raise Skipped("not a usable path")
    candidates = [raw] if os.path.isabs(raw) else [os.path.join(base, raw) for base in bases]
    chosen = next((c for c in candidates if os.path.lexists(c)), None)
    if chosen is None:
        raise Skipped(NOT_FOUND)
    name = os.path.basename(chosen)
    if name in ("", ".", ".."):
        raise Skipped("not a file")
    folder = os.path.dirname(chosen) or "."
    parent = resolved.get(folder) if resolved is not None else None
    if parent is None:
        parent = os.path.realpath(folder)
        if resolved is not None:
            resolved[folder] = parent
    index = _root_index(parent, roots)
    if index is None:
        raise Skipped("outside the given folders (refused)")
    full = os.path.join(parent, name)
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        raise Skipped("a symlink (never moved or followed)")
    if not stat.S_ISREG(st.st_mode):
        raise Skipped("not a regular file")
    return full, index


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


def list_folder(folder: str) -> dict[str, str]:
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


#: The reason given for a photo under the roots that the scores file has no row for.
NOT_IN_SCORES = "not in the scores file"


def unlisted_photos(roots: Sequence[str], listed: set[str], exclude: Sequence[str] = ()) -> list[Skip]:
    """The photos under ``roots`` that a scores file does not list (it was made before they were
    added, or for another folder): each a Skip, so the plan says how many it left alone."""
    from loda_cli.images import iter_image_files

    missing = []
    real_folders: dict[str, str] = {}  # each folder resolved once, not each file
    for found in iter_image_files(list(roots)):
        folder, name = os.path.split(found.path)
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder)
        full = os.path.join(real_folders[folder], name)
        if full in listed or os.path.islink(found.path):  # a link is never acted on, listed or not
            continue
        if not any(is_under_resolved(full, excluded) for excluded in exclude):
            missing.append(Skip(str(found.path), NOT_IN_SCORES))
    return missing


def collect_groups(
    roots: Sequence[str],
    source: ScoreSource,
    *,
    exclude: Sequence[str] = (),
    include_failed: bool = False,
    seen: Optional[set[str]] = None,
) -> tuple[list[Group], list[Skip]]:
    """Group the scored photos with their companions. Paths under ``exclude`` are left out.
    ``seen``, when given, receives the full path of every row found on disk (scored or failed).

    Files that could not be scored are reported as skips with their error, unless
    ``include_failed``: then the broken ones (``is_broken_file_error``) come back as groups with
    ``error`` set and a score of 0, after the scored groups. A failed file with a scored companion
    (a truncated JPEG beside a good RAW) belongs to that companion's group, whatever is asked.
    """
    skips: list[Skip] = []
    located: dict[str, tuple[int, float, Optional[str]]] = {}
    bursts: dict[str, Optional[int]] = {}
    entries = [(raw, score, None) for raw, score in source.rows]
    entries += [(raw, 0.0, error) for raw, error in source.failed]
    resolved: dict[str, str] = {}
    for raw, score, error in entries:
        try:
            full, root = _locate(raw, roots, source.bases, resolved)
        except Skipped as why:
            skips.append(Skip(raw, str(why)))
            continue
        except OSError as exc:
            skips.append(Skip(raw, f"unreadable: {exc.strerror}"))
            continue
        if any(is_under_resolved(full, folder) for folder in exclude):  # (resolved: _culled and the dests)
            continue
        located.setdefault(full, (root, score, error))
        if seen is not None:
            seen.add(full)
        if source.bursts is not None and error is None:
            bursts.setdefault(full, source.bursts.get(raw))

    by_stem: dict[tuple[str, str], list[str]] = {}
    for full in located:
        folder, name = os.path.split(full)
        by_stem.setdefault((folder, os.path.splitext(name)[0]), []).append(name)

    real_roots = {os.path.realpath(r) for r in roots}  # a named previews folder is acted on
    listings: dict[str, dict[str, str]] = {}
    stem_index: dict[str, dict[str, list[str]]] = {}
    groups: list[Group] = []
    failed_groups: list[Group] = []
    for (folder, _stem), names in sorted(by_stem.items()):
        if folder not in listings:
            try:
                listings[folder] = list_folder(folder)
                stem_index[folder] = _by_stem(listings[folder])
            except OSError as exc:
                reason = f"folder unreadable: {exc.strerror}"
                skips.extend(Skip(os.path.join(folder, n), reason) for n in names)
                continue
        listing = listings[folder]
        if REVIEW_MARKER in listing and os.path.realpath(folder) not in real_roots:
            skips.extend(Skip(os.path.join(folder, n), "a preview `loda review` made") for n in names)
            continue
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
            burst = bursts.get(os.path.join(folder, name))
            group = Group(root, folder, "" if rel == "." else rel, name, members, score, error, burst)
            (failed_groups if error is not None else groups).append(group)
    groups.sort(key=lambda g: (g.score, g.path))
    failed_groups.sort(key=lambda g: g.path)
    return groups + failed_groups, skips
