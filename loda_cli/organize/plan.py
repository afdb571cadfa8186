"""Plans: what cull, sort and rate would do, computed without writing anything.

``select_worst`` and the star bins decide which groups go where; ``plan_cull``, ``plan_sort`` and
``plan_rate`` turn them into a :class:`Plan` of actions. Collisions get a numbered suffix
(``IMG_1-1.jpg``), the same one for a photo and its companions. Planning reads, never writes.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from loda_cli import xmp
from loda_cli.errors import UnsafePathError, UsageError
from loda_cli.organize.groups import IMAGE_COMPANION_EXTENSIONS, Group, list_folder
from loda_cli.organize.journal import journals_dir, own_folders
from loda_cli.organize.paths import CULLED_DIRNAME, Skip, Skipped, display_path, is_under

DEFAULT_EDGES = (0.2, 0.4, 0.6, 0.8)
STAR_FOLDERS = {5: "5-stars", 4: "4-stars", 3: "3-stars", 2: "2-stars", 1: "1-star"}
SIDECAR_STYLES = ("auto", "darktable", "lightroom", "both")
# A sidecar is a few KB; anything this large is not one loda should rewrite.
_MAX_SIDECAR_BYTES = 16 << 20


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


def select_bursts(groups: Sequence[Group], keep: int = 1) -> list[Group]:
    """In each burst or near-duplicate set of two or more photos (``Group.burst``), the frames
    past the ``keep`` best by score; each one's ``rule`` says its place ("burst: #2 of 3")."""
    if keep < 1:
        raise UsageError("--keep must be 1 or more (a burst always keeps its best frame)")
    frames_of: dict[int, list[Group]] = {}
    for group in groups:
        if group.burst is not None and group.error is None:
            frames_of.setdefault(group.burst, []).append(group)
    culled: list[Group] = []
    for frames in frames_of.values():
        if len(frames) < 2:
            continue
        frames.sort(key=lambda g: (-g.score, g.path))
        for place, group in enumerate(frames[keep:], start=keep + 1):
            group.rule = f"burst: #{place} of {len(frames)}"
            culled.append(group)
    return culled


def select_cull(
    groups: Sequence[Group],
    *,
    below: Optional[float] = None,
    worst: Optional[int] = None,
    worst_percent: Optional[float] = None,
    bursts: bool = False,
    keep: int = 1,
) -> list[Group]:
    """The groups ``loda cull`` sets aside: by score (one of ``below``, ``worst``,
    ``worst_percent``), by burst (``bursts``: all but the ``keep`` best of each), or by both,
    when either rule says so. Each group's ``rule`` names the rule (or both) that culled it.
    Worst first."""
    by_score = any(v is not None for v in (below, worst, worst_percent))
    if not by_score and not bursts:
        raise UsageError("give one of --below, --worst, --worst-percent, or --bursts")
    for group in groups:
        group.rule = ""
    chosen: dict[int, Group] = {}
    if bursts:
        chosen.update((id(g), g) for g in select_bursts(groups, keep))
    if by_score:
        if below is not None:
            label = f"below {below:g}"
        elif worst is not None:
            label = f"among the {worst} worst"
        else:
            label = f"in the worst {worst_percent:g}%"
        for group in select_worst(groups, below=below, worst=worst, worst_percent=worst_percent):
            group.rule = f"{label}; {group.rule}" if group.rule else label
            chosen[id(group)] = group
    return sorted(chosen.values(), key=lambda g: (g.score, g.path))


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
        scores = [g.score for g in self.groups if g.error is None]  # an unreadable file has no score
        return (min(scores), max(scores)) if scores else None

    @property
    def companion_count(self) -> int:
        return sum(1 for a in self.actions if not a.decision)


def culled_folder(root: str) -> str:
    return os.path.join(root, CULLED_DIRNAME)


def _checked_dest(dest: str | os.PathLike[str], roots: Sequence[str]) -> str:
    real = os.path.realpath(os.fspath(dest))
    if any(is_under(root, real) for root in roots):
        raise UsageError(f"the destination {display_path(dest)} must not be a root or contain one")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise UsageError(f"the destination {display_path(dest)} is not a folder")
    inside = [root for root in roots if is_under(real, root)]
    if inside and _holds_files(real) and real not in own_folders(inside):
        # Its photos would be mixed with the culled or sorted ones, and `loda score` and the next
        # cull leave loda's destinations out: they would drop out of the library's scores.
        raise UsageError(
            f"the destination {display_path(dest)} lies inside {display_path(inside[0])} and already "
            "holds files of yours; name a new or empty folder (or one outside the photos)"
        )
    return real


def _holds_files(folder: str) -> bool:
    """Whether ``folder`` holds anything but hidden names (``.DS_Store``, loda's temporaries)."""
    try:
        with os.scandir(folder) as entries:
            return any(not entry.name.startswith(".") for entry in entries)
    except OSError:
        return False


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


ALREADY_THERE = {"copy": "already copied there", "link": "already linked there"}


def _member_size(path: str) -> int:
    return os.lstat(path).st_size


def _already_there(kind: str, sources: Sequence[str], targets: Sequence[str]) -> bool:
    """Whether an earlier run already put every member at its own name: for a copy, a regular
    file of the source's size and modification time (rsync's quick check; loda's copies keep the
    source's time); for a link, a symlink to the source. Then a second sort or copy-cull does not
    add ``-1`` duplicates of a whole library."""
    if kind not in ("copy", "link"):
        return False
    for source, target in zip(sources, targets):
        try:
            there, here = os.lstat(target), os.lstat(source)
        except OSError:
            return False
        if kind == "link":
            if not stat.S_ISLNK(there.st_mode) or os.path.realpath(target) != os.path.realpath(source):
                return False
        elif not stat.S_ISREG(there.st_mode) or (there.st_size, there.st_mtime_ns) != (here.st_size, here.st_mtime_ns):
            return False
    return True


def _transfer_actions(
    plan: Plan, groups: Sequence[Group], dest_folder: Callable[[Group], str], kind: str
) -> None:
    placer = _Placer()
    for group in groups:
        folder = dest_folder(group)
        sources = [os.path.join(group.folder, m) for m in group.members]
        if _already_there(kind, sources, [os.path.join(folder, m) for m in group.members]):
            plan.unchanged.append(Skip(group.path, ALREADY_THERE[kind]))
            continue
        try:
            targets = placer.place(folder, group)
            sizes = [_member_size(source) for source in sources]
        except OSError as exc:
            plan.skipped.append(Skip(group.path, f"unreadable: {exc.strerror}"))
            continue
        index = len(plan.groups)
        plan.groups.append(group)
        for member, source, target, size in zip(group.members, sources, targets, sizes):
            is_decision = member == group.decision
            plan.actions.append(Action(kind, source, target, size, index, group.score, is_decision))


def earlier_destinations(roots: Sequence[str], dests: Sequence[str]) -> list[str]:
    """The destinations of earlier cull and sort runs not undone yet under ``roots`` (`loda sort
    --into Sorted` inside the library), other than this run's ``dests`` and than folders holding a
    root: their photos are copies or rejects, left out as `loda score` leaves them out."""
    real_roots = [os.path.realpath(r) for r in roots]
    return [folder for folder in own_folders(roots)
            if folder not in dests and not any(is_under(r, folder) for r in real_roots)]


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


# --- sidecars ------------------------------------------------------------------------------------


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
    """A sidecar's bytes; OSError when unreadable, Skipped when too large to be XMP."""
    if os.lstat(path).st_size > _MAX_SIDECAR_BYTES:
        raise Skipped("sidecar too large to be XMP")
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
        except (OSError, Skipped, xmp.XmpError):
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
    claimed: dict[str, str] = {}  # sidecar path -> the photo whose rating it takes
    folders = _Listings()
    for group in groups:
        stars = star_rating(group.score, edges)
        group_label = label if (label and stars == 1) else None
        try:
            listing = folders.listing(group.folder)
        except OSError as exc:
            plan.skipped.append(Skip(group.path, f"folder unreadable: {exc.strerror}"))
            continue
        index = len(plan.groups)
        wrote = False
        person = None if force else _person_rating(group, listing)
        for wanted in sidecar_names(group, style):
            name = folders.existing_case(group.folder, wanted)
            path = os.path.join(group.folder, name)
            if path in claimed:
                if claimed[path] != group.path:  # IMG_1.JPG and IMG_1.PNG share IMG_1.xmp
                    plan.skipped.append(Skip(group.path, f"its sidecar {name} takes the rating of "
                                                         f"{os.path.basename(claimed[path])}, scored first"))
                continue
            claimed[path] = group.path
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
                except Skipped as why:
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


class _Listings:
    """Each folder listed once for a plan, with its names by lower case. Listing the folder for
    every photo, and scanning it for each sidecar's name, took time growing with the square of
    a folder's photos (30 s to plan 40,000 in folders of 400; minutes for one of 10,000)."""

    def __init__(self) -> None:
        self._listings: dict[str, dict[str, str] | OSError] = {}
        self._lowered: dict[str, dict[str, list[str]]] = {}

    def listing(self, folder: str) -> dict[str, str]:
        """name -> kind (:func:`~loda_cli.organize.groups.list_folder`); raises its OSError."""
        if folder not in self._listings:
            try:
                self._listings[folder] = list_folder(folder)
            except OSError as exc:
                self._listings[folder] = exc
        found = self._listings[folder]
        if isinstance(found, OSError):
            raise found
        return found

    def existing_case(self, folder: str, wanted: str) -> str:
        """An existing file whose name differs from ``wanted`` only in case (the first in
        sorted order), else ``wanted``."""
        listing = self.listing(folder)
        if wanted in listing:
            return wanted
        if folder not in self._lowered:
            lowered: dict[str, list[str]] = {}
            for name in sorted(listing):
                lowered.setdefault(name.lower(), []).append(name)
            self._lowered[folder] = lowered
        matches = self._lowered[folder].get(wanted.lower())
        return matches[0] if matches else wanted
