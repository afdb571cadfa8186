"""Plans and applies cull/sort/rate actions, journals them, and undoes them. Never deletes a photo.

How the pieces fit (each module imports only those above it):

1. ``paths``: printing paths safely, the roots, :func:`is_under`.
2. ``fileops``: the only place that moves, links, copies or removes a file. A move is a hard
   link then an unlink on one filesystem (a link never replaces an existing name), a rename
   where the filesystem has no hard links (exFAT), or a copy, fsync, size and hash check, then
   the source's removal across filesystems.
3. ``journal``: the journal format; writing it, reading it back (a half-written last line is
   tolerated), finding journals, and undo's own log.
4. ``scores``: (path, score) pairs from a scores file or from the scoring library.
5. ``groups``: each scored photo with its companions (RAW, JPEG/HEIC, ``.xmp``, ``.aae``, a Live
   Photo ``.mov``), every path checked to lie under a root; symlinks are never followed.
6. ``plan``: ``select_cull`` picks what to cull, by score and by burst (the groups
   ``loda_cli.bursts`` made: all but the best of each); ``plan_cull`` / ``plan_sort`` /
   ``plan_rate`` build a ``Plan``; planning reads, never writes.
7. ``apply``: ``apply_plan`` checks the plan (``preflight``: permissions, free space), writes the
   journal (a header and one ``intent`` record per action, fsynced, file and folder) before the
   first action, then acts, appending a ``done`` record after each (moves on one filesystem:
   new names for a batch, their folders fsynced, then the old names dropped; renames for a
   batch, then their folders fsynced).
8. ``undo``: ``plan_undo`` / ``apply_undo`` reverse each action whose state on disk is
   unambiguous, so a killed run or a killed undo is undone by running undo (again).

This package's namespace is the API the CLI and tests use; the names below are defined in the
modules above.
"""

from loda_cli.organize.apply import ApplyReport, apply_plan, preflight
from loda_cli.organize.fileops import ACTION_DELAY_ENV
from loda_cli.organize.groups import (
    COMPANION_EXTENSIONS,
    IMAGE_COMPANION_EXTENSIONS,
    JPEG_EXTENSIONS,
    Group,
    collect_groups,
)
from loda_cli.organize.journal import (
    JOURNAL_PREFIX,
    JOURNAL_SUFFIX,
    JOURNAL_VERSION,
    TMP_PREFIX,
    UNDO_SUFFIX,
    Journal,
    JournalEntry,
    find_journals,
    journals_dir,
    latest_journal,
    own_folders,
    read_journal,
)
from loda_cli.organize.paths import CULLED_DIRNAME, Skip, display_path, is_under, resolve_roots
from loda_cli.organize.plan import (
    DEFAULT_EDGES,
    SIDECAR_STYLES,
    STAR_FOLDERS,
    Action,
    Plan,
    count_bins,
    cull_dests,
    cull_excludes,
    culled_folder,
    earlier_destinations,
    lopsided_bins,
    parse_edges,
    plan_cull,
    plan_rate,
    plan_sort,
    quantile_edges,
    select_bursts,
    select_cull,
    select_worst,
    sidecar_names,
    star_rating,
)
from loda_cli.organize.scores import (
    ScoreSource,
    failure_kind,
    glob_escape,
    is_broken_file_error,
    load_scores,
)
from loda_cli.organize.undo import UndoPlan, UndoReport, UndoStep, apply_undo, plan_undo

__all__ = [
    "ACTION_DELAY_ENV",
    "COMPANION_EXTENSIONS",
    "CULLED_DIRNAME",
    "DEFAULT_EDGES",
    "IMAGE_COMPANION_EXTENSIONS",
    "JOURNAL_PREFIX",
    "JOURNAL_SUFFIX",
    "JOURNAL_VERSION",
    "JPEG_EXTENSIONS",
    "SIDECAR_STYLES",
    "STAR_FOLDERS",
    "TMP_PREFIX",
    "UNDO_SUFFIX",
    "Action",
    "ApplyReport",
    "Group",
    "Journal",
    "JournalEntry",
    "Plan",
    "ScoreSource",
    "Skip",
    "UndoPlan",
    "UndoReport",
    "UndoStep",
    "apply_plan",
    "apply_undo",
    "collect_groups",
    "count_bins",
    "cull_dests",
    "cull_excludes",
    "culled_folder",
    "earlier_destinations",
    "display_path",
    "failure_kind",
    "find_journals",
    "glob_escape",
    "is_broken_file_error",
    "is_under",
    "journals_dir",
    "latest_journal",
    "load_scores",
    "lopsided_bins",
    "own_folders",
    "parse_edges",
    "plan_cull",
    "plan_rate",
    "plan_sort",
    "plan_undo",
    "preflight",
    "quantile_edges",
    "read_journal",
    "resolve_roots",
    "select_bursts",
    "select_cull",
    "select_worst",
    "sidecar_names",
    "star_rating",
]
