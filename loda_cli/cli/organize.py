"""`loda cull`, `sort`, `rate`, `undo` and `review`: acting on scores, safely and reversibly.

Every command that changes files is a dry run unless `--apply` is given, and journals what it does
so `loda undo` can reverse it. The library (loda_cli.organize) does the work and the checks; this
module parses options, shows plans and progress, and turns errors into messages. File names are
always printed through `Text`, never as markup.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from loda_cli.cli.common import PathCell, err_console, handle_errors, notice, out_console, own_folders_note, plural

if TYPE_CHECKING:
    from loda_cli.organize import Plan, ScoreSource

PathsArg = Annotated[
    Optional[list[Path]],
    typer.Argument(
        help="Folders to work on (the roots). Default: the current folder.", show_default=False
    ),
]
ScoresOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--scores",
        help="Scores file written by `loda score` (CSV, JSON or JSONL). Without it, photos are "
        "scored through the score cache.",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", help="Checkpoint to score with when there is no --scores file.",
        show_default=False,
    ),
]
ApplyOpt = Annotated[
    bool, typer.Option("--apply", help="Act. Without it, only show the plan (a dry run).")
]
ListOpt = Annotated[
    bool, typer.Option("--list", help="List every photo the plan acts on, not only the first few.")
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Only show the plan: the default, spelled out. Excludes --apply."
    ),
]
IncludeFailedOpt = Annotated[
    bool,
    typer.Option(
        "--include-failed",
        help="Also cull files that are not readable images (empty, not an image, corrupt, "
        "truncated). Files loda merely lacks a decoder for are never moved.",
    ),
]
EdgesOpt = Annotated[
    str,
    typer.Option(
        "--edges",
        help="Score edges of the star bins: below the first is 1 star, from the last up 5 stars.",
    ),
]
QuantilesOpt = Annotated[
    bool,
    typer.Option(
        "--quantiles", help="Put a fifth of the photos in each star bin instead of using --edges."
    ),
]
BelowOpt = Annotated[
    Optional[float],
    typer.Option(
        "--below", help="Cull photos whose score is below this (0-1).", show_default=False
    ),
]
WorstOpt = Annotated[
    Optional[int],
    typer.Option("--worst", help="Cull the N lowest-scored photos.", show_default=False),
]
WorstPercentOpt = Annotated[
    Optional[float],
    typer.Option(
        "--worst-percent", help="Cull the worst P percent (rounded down).", show_default=False
    ),
]
ToOpt = Annotated[
    Optional[Path],
    typer.Option("--to", help="Destination folder. Default: <root>/_culled.", show_default=False),
]
IntoOpt = Annotated[
    Path,
    typer.Option(
        "--into", help="Folder to sort into: DIR/5-stars ... DIR/1-star.", show_default=False
    ),
]
SidecarOpt = Annotated[
    str,
    typer.Option(
        "--sidecar",
        help="auto: update the sidecars a photo has, in either naming, and create IMG_1.CR2.xmp "
        "(darktable, digiKam) only where it has none; darktable (IMG_1.CR2.xmp), lightroom "
        "(IMG_1.xmp, read by Lightroom for RAW files) or both.",
    ),
]
LabelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--label", help="Also write this xmp:Label (e.g. Red) on the 1-star photos.",
        show_default=False,
    ),
]
JournalArg = Annotated[
    Optional[Path],
    typer.Argument(
        help="The journal to undo, or a folder: the newest run on it, in it, or on a folder "
        "that holds it (the whole run is undone). Default: the current folder.",
        show_default=False,
    ),
]

_EXAMPLES = 5
_NAMING = {
    "auto": "update the sidecars a photo has (either naming); create IMG_1.JPG.xmp only where "
    "none exists (darktable and digiKam read it; for Lightroom, --sidecar lightroom)",
    "darktable": "IMG_1.JPG.xmp, IMG_1.CR2.xmp (darktable, digiKam)",
    "lightroom": "IMG_1.xmp (Lightroom, for RAW files)",
    "both": "IMG_1.JPG.xmp and IMG_1.xmp",
}
_DEFAULT_EDGES = "0.2,0.4,0.6,0.8"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _show(path: str) -> Text:
    """A path for people: relative to the current folder when inside it, escaped, never markup."""
    from loda_cli.organize import display_path

    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:
        pass
    return Text(display_path(path))


def _journal_path(path: str) -> Text:
    """A journal's path in full: the "Undo with:" line must work from any folder later."""
    from loda_cli.organize import display_path

    return Text(display_path(os.path.abspath(path)))


def _load(
    roots: list[str], scores: Optional[Path], model: Optional[str], exclude: list[str],
    burst_gap: Optional[float] = None,
) -> "ScoreSource":
    from loda_cli.organize import load_scores

    if scores is not None:
        return load_scores(roots, scores, burst_gap=burst_gap)
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from loda_cli.cli.common import check_score_cache

    check_score_cache()

    columns = (SpinnerColumn(), TextColumn("scoring: {task.completed} photos"))
    with Progress(*columns, console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("scoring", total=None)
        return load_scores(
            roots, None, model=model, exclude=exclude, progress=lambda row: bar.advance(task),
            burst_gap=burst_gap,
        )


def _print_plan(plan: "Plan", source: "ScoreSource", applying: bool, list_all: bool = False) -> None:
    verbs = {"move": "move to", "copy": "copy to", "link": "symlink into"}
    title = f"loda {plan.command}: plan" + ("" if applying else " (dry run)")
    summary = Table(title=title, show_header=False)
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    summary.add_row("scores from", Text(source.description))
    if plan.command == "rate":
        summary.add_row("action", Text(f"write xmp:Rating into sidecars ({plan.mode})"))
        summary.add_row("sidecar naming", Text(_NAMING[plan.mode]))
        summary.add_row("photos", str(len(plan.groups)))
        summary.add_row("sidecars to write", str(len(plan.actions)))
        summary.add_row("sidecars left as they are", str(len(plan.unchanged)))
    else:
        for dest in plan.dests:
            summary.add_row(verbs.get(plan.mode, plan.mode), _show(dest))
        failed = sum(1 for g in plan.groups if g.error)
        photos = str(len(plan.groups) - failed)
        if failed:
            photos += f" + {failed} unreadable (--include-failed)"
        summary.add_row("photos", photos)
        summary.add_row("files", f"{len(plan.actions)} ({plan.companion_count} companions)")
        summary.add_row("bytes", _size(plan.total_bytes))
        rules = _rule_counts(plan)
        if rules:
            summary.add_row("culled by", Text(rules))
    if plan.score_range:
        low, high = plan.score_range
        summary.add_row("score range", f"{low:.3f} - {high:.3f}")
    if plan.edges:
        summary.add_row("star edges", ", ".join(f"{e:.3f}" for e in plan.edges))
    if plan.bin_counts:
        bins = "  ".join(f"{stars}\u2605 {n}" for stars, n in plan.bin_counts.items())
        scored = sum(plan.bin_counts.values())
        if scored != len(plan.groups):  # some are left as they are: say the bins count them too
            bins += f"  (all {scored} scored photos)"
        summary.add_row("photos per bin", bins)
        from loda_cli.organize import lopsided_bins

        warning = lopsided_bins(plan.bin_counts)
        if warning and plan.command in ("sort", "rate"):
            hint = f"{warning} with these edges; --quantiles puts a fifth in each bin"
            summary.add_row("note", hint)
    summary.add_row("skipped", str(len(plan.skipped) + source.skipped))
    out_console.print(summary)

    with_stars = plan.command in ("sort", "rate")
    examples = Table(title="examples")
    examples.add_column("score", justify="right")
    if with_stars:
        examples.add_column("stars", justify="right")
    examples.add_column("file", overflow="fold")
    with_rules = any(g.rule for g in plan.groups)
    if with_rules:
        examples.add_column("why", overflow="fold")
    if plan.command != "rate":
        examples.add_column("to", overflow="fold")
    decisions = [a for a in plan.actions if a.decision]
    failed = [a for a in decisions if plan.groups[a.group].error]
    scored = [a for a in decisions if not plan.groups[a.group].error]
    shown = scored + failed if list_all else scored[:_EXAMPLES] + failed[:_EXAMPLES]
    if len(shown) < len(decisions):
        examples.title = f"examples ({len(shown)} of {len(decisions)} photos; --list shows every one)"
    elif list_all:
        examples.title = f"every photo ({len(decisions)})"
    for action in shown:
        error = plan.groups[action.group].error
        cells: list = [f"{action.score:.3f}" if not error else "failed"]
        if with_stars:
            cells.append(str(action.stars))
        suffix = f" ({organize_failure_kind(error)})" if error else ""
        cells.append(PathCell(_show(action.src).plain, suffix))
        if with_rules:
            cells.append(Text(plan.groups[action.group].rule))
        if plan.command != "rate":
            cells.append(PathCell(_show(action.dst).plain))
        examples.add_row(*cells)
    if plan.actions:
        out_console.print(examples)
    _print_not_acted_on(plan, source)


def _rule_counts(plan: "Plan") -> str:
    """How many photos each cull rule set aside ("burst 12, below 0.4 3, both 2"), or ""."""
    counts: Counter[str] = Counter()
    for group in plan.groups:
        if not group.rule:
            continue
        kinds = sorted({"burst" if part.startswith("burst") else part for part in group.rule.split("; ")})
        counts[" and ".join(kinds)] += 1
    return ", ".join(f"{rule} {n}" for rule, n in counts.most_common())


def organize_display(path: str) -> str:
    from loda_cli.organize import display_path

    return display_path(path)


def organize_failure_kind(error: str) -> str:
    from loda_cli.organize import failure_kind

    return failure_kind(error)


def _print_not_acted_on(plan: "Plan", source: "ScoreSource") -> None:
    reasons: Counter[str] = Counter()
    example: dict[str, str] = {}
    for skip in plan.skipped:
        reasons[skip.reason] += 1
        example.setdefault(skip.reason, skip.path)
    for skip in plan.unchanged:
        reason = f"left alone: {skip.reason}"
        reasons[reason] += 1
        example.setdefault(reason, skip.path)
    if source.skipped:
        reasons["no usable score in the scores file"] += source.skipped
        if source.skipped_example:
            example["no usable score in the scores file"] = source.skipped_example
    if not reasons:
        return
    why = Table(title="not acted on")
    why.add_column("reason", overflow="fold")
    why.add_column("files", justify="right")
    why.add_column("example", overflow="fold")
    for reason, count in reasons.most_common():
        path = example.get(reason)
        why.add_row(Text(reason), str(count), PathCell(_show(path).plain) if path else Text(""))
    out_console.print(why)
    _warn_relative_not_found(plan, source)


def _warn_relative_not_found(plan: "Plan", source: "ScoreSource") -> None:
    """Where relative paths were looked for, when some of a scores file's were not found: most
    often the command runs from another folder than `loda score` did, not lost photos."""
    from loda_cli.organize.groups import NOT_FOUND

    missing = [s.path for s in plan.skipped if s.reason == NOT_FOUND]
    relative = [p for p in missing if not os.path.isabs(p)]
    # A file or two deleted since scoring is the table's "not found" row; most of the scores
    # file's paths missing is the sign of a command run from another folder.
    if not source.from_file or not relative or 2 * len(missing) < len(source.rows) + len(source.failed):
        return
    looked = ", ".join(organize_display(b) for b in source.bases)
    err_console.print(
        Text(
            f"warning: {plural(len(missing), 'scored file')} {'was' if len(missing) == 1 else 'were'} "
            "not found; relative paths were looked "
            f"for in {looked}. Run from the folder `loda score` ran in, or use its .json "
            "output (it records that folder).",
            style="yellow",
        ),
        soft_wrap=True,
    )


def _run(plan: "Plan", source: "ScoreSource", apply: bool, list_all: bool = False) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from loda_cli.organize import apply_plan

    _print_plan(plan, source, apply, list_all)
    if not plan.actions:
        out_console.print("Nothing to do.")
        return
    if not apply:
        out_console.print("Dry run: nothing was changed. Add --apply to act.")
        return
    columns = (TextColumn(plan.command), BarColumn(), MofNCompleteColumn())
    journal: list[str] = []
    try:
        with Progress(*columns, console=err_console, transient=True,
                      disable=not err_console.is_terminal) as bar:
            task = bar.add_task(plan.command, total=len(plan.actions))
            report = apply_plan(
                plan,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                on_journal=journal.append,
            )
    except KeyboardInterrupt:
        if journal:
            err_console.print(
                Text("Stopped. What was done is journalled; undo it with: loda undo ").append(
                    _journal_path(journal[0])
                )
            )
        raise
    verb = {"move": "Moved", "copy": "Copied", "link": "Linked"}.get(plan.mode, "Wrote")
    line = Text(f"{verb} {plural(report.done, 'file')} ({_size(report.bytes_done)}).")
    if report.skipped:
        first = report.skipped[0]
        line.append(f" Skipped {len(report.skipped)} that changed meanwhile (first: ")
        line.append(_show(first.path)).append(f": {first.reason}).")
    out_console.print(line)
    if report.journal:
        out_console.print(Text("Journal: ").append(_journal_path(report.journal)))
        out_console.print(Text("Undo with: loda undo ").append(_journal_path(report.journal)))


def _check_dry_run(apply: bool, dry_run: bool) -> None:
    from loda_cli.errors import UsageError

    if apply and dry_run:
        raise UsageError("--apply and --dry-run exclude each other")


def _scored_groups(roots: list[str], dests: list[str], scores, model, burst_gap=None, **group_kw):
    """The scores (a file, the cache or the model) and the groups they make; every root's
    _culled and the destinations are left out. With ``burst_gap``, each group knows its burst."""
    from loda_cli import organize
    from loda_cli.organize.groups import unlisted_photos

    own = organize.earlier_destinations(roots, dests)
    present = [folder for folder in own if os.path.isdir(folder)]
    if present:
        err_console.print(own_folders_note(present, "acted on"), markup=False, soft_wrap=True)
    excludes = organize.cull_excludes(roots, dests) + own
    source = _load(roots, scores, model, excludes, burst_gap)
    seen: set[str] = set()
    groups, skips = organize.collect_groups(roots, source, exclude=excludes, seen=seen, **group_kw)
    if scores is not None:  # a scores file may predate photos added since: say how many it lacks
        listed = seen | {os.path.join(g.folder, m) for g in groups for m in g.members}
        skips += unlisted_photos(roots, listed, excludes)
    return source, groups, skips


def register(app: typer.Typer) -> None:
    """Add cull, sort, rate, undo and review to the root app."""
    for command in (cull, sort, rate, undo, review):
        app.command()(command)


@handle_errors
def cull(
    paths: PathsArg = None,
    below: BelowOpt = None,
    worst: WorstOpt = None,
    worst_percent: WorstPercentOpt = None,
    scores: ScoresOpt = None,
    model: ModelOpt = None,
    to: ToOpt = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy instead of moving.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Make symlinks, not moves.")] = False,
    include_failed: IncludeFailedOpt = False,
    bursts: Annotated[bool, typer.Option("--bursts", help="In each burst or near-duplicate set, keep the --keep best by score and cull the rest (combines with --below, --worst, --worst-percent: culled if either rule says so).")] = False,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Frames --bursts keeps of each burst. [default: 1]", show_default=False)] = None,
    burst_gap: Annotated[float, typer.Option("--burst-gap", help="Seconds between frames of one camera that can still be one burst (ignored with --scores: the file's groups count).")] = 2.0,
    apply: ApplyOpt = False,
    dry_run: DryRunOpt = False,
    list_all: ListOpt = False,
) -> None:
    """Set aside the lowest-scored photos, or all but the best frame of each burst (with their
    RAW, sidecars, Live Photo video): a dry run unless --apply; journalled, so `loda undo` puts
    everything back."""
    from loda_cli import organize
    from loda_cli.bursts import check_burst_gap
    from loda_cli.errors import UsageError

    if copy and link:
        raise UsageError("--copy and --link exclude each other")
    if keep is not None and not bursts:
        raise UsageError("--keep goes with --bursts")
    _check_dry_run(apply, dry_run)
    # Check the selection before scoring, which can take a while.
    selection = dict(below=below, worst=worst, worst_percent=worst_percent, bursts=bursts, keep=1 if keep is None else keep)
    organize.select_cull([], **selection)
    roots = organize.resolve_roots(paths or [])
    dests = organize.cull_dests(roots, to)
    gap = check_burst_gap(burst_gap) if bursts else None
    source, groups, skips = _scored_groups(roots, dests, scores, model, gap, include_failed=include_failed)
    selected = organize.select_cull([g for g in groups if g.error is None], **selection)
    failed = [g for g in groups if g.error is not None]
    for group in failed:
        group.rule = "unreadable (--include-failed)"
    selected += failed
    mode = "copy" if copy else "link" if link else "move"
    plan = organize.plan_cull(roots, selected, mode=mode, to=to)
    plan.skipped[:0] = skips
    _run(plan, source, apply, list_all)


@handle_errors
def sort(
    into: IntoOpt,
    paths: PathsArg = None,
    move: Annotated[bool, typer.Option("--move", help="Move instead of copying.")] = False,
    edges: EdgesOpt = _DEFAULT_EDGES,
    quantiles: QuantilesOpt = False,
    scores: ScoresOpt = None,
    model: ModelOpt = None,
    apply: ApplyOpt = False,
    dry_run: DryRunOpt = False,
    list_all: ListOpt = False,
) -> None:
    """Copy (or --move) photos into star folders by score, keeping their relative paths: a dry
    run unless --apply; journalled for `loda undo`."""
    from loda_cli import organize

    _check_dry_run(apply, dry_run)
    bin_edges = organize.parse_edges(edges)
    roots = organize.resolve_roots(paths or [])
    dests = organize.cull_dests(roots, into)  # checks the destination before scoring
    source, groups, skips = _scored_groups(roots, dests, scores, model)
    if quantiles:
        bin_edges = organize.quantile_edges([g.score for g in groups])
    mode = "move" if move else "copy"
    plan = organize.plan_sort(roots, groups, into=into, mode=mode, edges=bin_edges)
    plan.skipped[:0] = skips
    _run(plan, source, apply, list_all)


@handle_errors
def rate(
    paths: PathsArg = None,
    sidecar: SidecarOpt = "auto",
    label: LabelOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite ratings and labels a person set.")
    ] = False,
    edges: EdgesOpt = _DEFAULT_EDGES,
    quantiles: QuantilesOpt = False,
    scores: ScoresOpt = None,
    model: ModelOpt = None,
    apply: ApplyOpt = False,
    dry_run: DryRunOpt = False,
    list_all: ListOpt = False,
) -> None:
    """Write star ratings (xmp:Rating 1-5) from scores into XMP sidecars: a dry run unless
    --apply; ratings set by a person are kept unless --force; journalled for `loda undo`."""
    from loda_cli import organize
    from loda_cli.errors import UsageError

    _check_dry_run(apply, dry_run)
    bin_edges = organize.parse_edges(edges)
    if sidecar not in organize.SIDECAR_STYLES:
        styles = ", ".join(organize.SIDECAR_STYLES)
        raise UsageError(f"--sidecar is one of {styles}, not {sidecar!r}")
    from loda_cli.xmp import check_label

    check_label(label)  # before the photos are read or scored
    roots = organize.resolve_roots(paths or [])
    source, groups, skips = _scored_groups(roots, [], scores, model)
    if quantiles:
        bin_edges = organize.quantile_edges([g.score for g in groups])
    plan = organize.plan_rate(
        roots, groups, edges=bin_edges, style=sidecar, label=label, force=force
    )
    plan.skipped[:0] = skips
    _run(plan, source, apply, list_all)


@handle_errors
def undo(
    journal: JournalArg = None,
    partial: Annotated[
        bool,
        typer.Option(
            "--partial", help="Undo what can be undone even if some entries conflict."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only show what undo would do.")
    ] = False,
) -> None:
    """Reverse a cull, sort or rate run from its journal. Refuses anything ambiguous (a file
    changed since, a path now occupied) and then changes nothing, unless --partial."""
    from loda_cli import organize

    from loda_cli.errors import NothingToUndoError

    try:
        if journal is None or journal.is_dir():
            # `loda undo ~/Photos` after `loda cull ~/Photos`: a folder names the runs on it.
            path = organize.latest_journal(journal)
        else:
            path = str(journal)
        plan = organize.plan_undo(path)
    except NothingToUndoError as done:
        out_console.print(
            Text("Nothing left to undo; the last journal, ")
            .append(_show(done.journal))
            .append(f", was undone at {done.undone_at}.")
        )
        return
    found = plan.journal
    notice(f"Undoing {organize.display_path(found.path)} ({found.command}, {found.time})")
    if not organize.is_under(os.path.realpath(found.path), os.path.realpath(organize.journals_dir())):
        notice("It is not in loda's journal folder; undo follows it because you named it.")
    if found.truncated:
        notice("Its last line was cut short (the run was killed); undo works from the disk.")
    _print_undo_plan(plan, dry_run, partial)
    if dry_run:
        out_console.print("Dry run: nothing was changed.")
        if plan.conflicts and not partial:
            # Say what the real run will do: refuse everything, not just these entries.
            n = len(plan.conflicts)
            out_console.print(
                f"`loda undo` would change nothing while {plural(n, 'entry', 'entries')} "
                f"{'conflicts' if n == 1 else 'conflict'}; `loda undo --partial` undoes the rest and "
                f"leaves {'it' if n == 1 else 'them'} alone."
            )
        return
    report = organize.apply_undo(plan, partial=partial)
    out_console.print(
        f"Restored {report.restored}, removed {report.removed} copies/links/created sidecars, "
        f"{report.unchanged} already as before, {len(report.conflicts)} left alone."
    )
    if not report.complete:
        out_console.print(
            "Undo is partial; run `loda undo` on this journal again after resolving the "
            "conflicts."
        )


@handle_errors
def review(
    scores: Annotated[
        Path, typer.Argument(help="Scores file written by `loda score`.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="The page to write; thumbnails go to <name>_files/ beside it."
        ),
    ] = Path("review.html"),
    below: Annotated[
        Optional[float],
        typer.Option(
            "--below", help="Highlight the photos `loda cull --below` would cull.",
            show_default=False,
        ),
    ] = None,
    thumb_size: Annotated[
        int, typer.Option("--thumb-size", help="Longest side of the thumbnails, in pixels.")
    ] = 256,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing page that loda did not write.")
    ] = False,
    keep: Annotated[
        int, typer.Option("--keep", help="Frames of each burst marked as kept (as `loda cull --bursts --keep`).")
    ] = 1,
) -> None:
    """Write an HTML contact sheet (thumbnails sorted by score, bursts as rows with the keeper
    marked, a crop-map toggle, a histogram, a folder filter) that opens from disk with no server
    or network."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from loda_cli.output import check_writable_output
    from loda_cli.review import build_review

    check_writable_output(os.fspath(out))  # its folder must exist: a typo makes no folders
    columns = (TextColumn("thumbnails"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("thumbnails", total=None)
        report = build_review(
            scores, out, below=below, thumb_size=thumb_size, force=force, keep=keep,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    details = f": {plural(report.photos, 'photo')}, {plural(report.thumbs, 'preview')}"
    if report.failed:
        details += f", {report.failed} without preview"
    if report.unscored:
        details += f" ({report.unscored} could not be scored, shown marked at the end)"
    if below is not None:
        details += f", {report.below} below {below:g}"
    if report.bursts:
        details += f", {plural(report.bursts, 'burst')} shown as {'a row' if report.bursts == 1 else 'rows'}"
    if report.maps:
        details += f", {plural(report.maps, 'crop map')}"
    out_console.print(Text("Wrote ").append(_show(report.page)).append(details + "."))
    if report.missing:
        looked = ", ".join(organize_display(b) for b in report.bases)
        err_console.print(
            Text(
                f"warning: {report.missing} of {report.photos} files were not found; relative "
                f"paths were looked for in {looked}. Run review from the folder `loda score` "
                "ran in, or score with absolute paths.",
                style="yellow",
            ),
            soft_wrap=True,
        )


def _print_undo_plan(plan, dry_run: bool, partial: bool) -> None:
    labels = {
        "restore": "move back",
        "remove-duplicate": "remove duplicates (original in place)",
        "remove-copy": "remove copies",
        "remove-link": "remove symlinks",
        "restore-sidecar": "restore sidecars",
        "remove-sidecar": "remove created sidecars",
        "none": "already as before",
        "conflict": "conflicts",
    }
    counts = Counter(step.action for step in plan.steps)
    table = Table(title="undo plan" + (" (dry run)" if dry_run else ""), show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, text in labels.items():
        if counts.get(key):
            table.add_row(text, str(counts[key]))
    if table.row_count:  # an empty table stretches to the whole width (10,000 columns in a log)
        out_console.print(table)
    if plan.conflicts:
        conflicts = Table(title="conflicts (left alone)" if partial else "conflicts")
        conflicts.add_column("entry", justify="right")
        conflicts.add_column("why", overflow="fold")
        for step in plan.conflicts[:20]:
            conflicts.add_row(str(step.entry.id), Text(step.message))
        if len(plan.conflicts) > 20:
            conflicts.add_row("", Text(f"... and {len(plan.conflicts) - 20} more"))
        out_console.print(conflicts)
