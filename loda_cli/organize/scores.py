"""Scores for the organize commands: from a scores file, or from the scoring library (cache first).

Importing this module never imports torch; scoring does, only when the cache cannot answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from loda_cli.errors import LodaError
from loda_cli.organize.paths import display_path, is_under

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
    # path (as in ``rows``) -> its burst or near-duplicate set, when bursts were asked for
    bursts: Optional[dict[str, int]] = None
    skipped_example: Optional[str] = None  # a path of one of the ``skipped`` rows, where it had one


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
    burst_gap: Optional[float] = None,
) -> ScoreSource:
    """Scores from ``scores_file``, else from the scoring library (through its cache).

    ``progress`` is called with each scored row. Folders in ``exclude`` (absolute) are not scored:
    the scorer is asked to skip them, and ``collect_groups`` leaves them out whatever it returns.
    With ``burst_gap`` (seconds), ``bursts`` says which burst each photo belongs to: the groups a
    scores file has, or those :func:`loda_cli.bursts.assign_groups` makes.
    """
    if scores_file is not None:
        return _from_file(scores_file, bursts=burst_gap is not None)
    globs = sorted(
        {
            glob_escape(os.path.relpath(folder, root))
            for folder in exclude
            for root in roots
            if is_under(folder, root) and folder != root
        }
    )
    rows = []
    failed: list[tuple[str, str]] = []
    from loda_cli.cachelookup import cached_rows

    # The cache first: a folder scored before is planned without importing torch (about 6 s).
    found: Iterable[Any] | None = cached_rows(
        roots, model=model, recursive=True, exclude=tuple(globs), looks=burst_gap is not None,
        crops=False,  # a plan reads scores and groups, never a crop's score
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
    found = list(found)
    bursts: Optional[dict[str, int]] = None
    if burst_gap is not None:
        from loda_cli.bursts import assign_groups

        assign_groups(found, burst_gap=burst_gap)
        bursts = {}
    for row in found:
        path = row.path
        if not os.path.isabs(path) and row.root and not os.path.lexists(path):
            path = os.path.join(row.root, path)
        if row.error or row.score is None:
            failed.append((path, str(row.error or "no score")))
            continue
        rows.append((path, float(row.score)))
        if bursts is not None and row.group is not None:
            bursts[path] = row.group
    return ScoreSource(rows, [os.getcwd()], description, 0, failed, bursts=bursts)


def _from_file(scores_file: str | os.PathLike[str], *, bursts: bool) -> ScoreSource:
    """The rows of a scores file; with ``bursts``, its groups too (a file without them is a
    usage error: it was written before grouping, or with --no-groups)."""
    from loda_cli.errors import UsageError
    from loda_cli.scoresfile import read_scores, scores_bases

    parsed = read_scores(scores_file)
    if not parsed.rows and not parsed.failed and not parsed.skipped:
        raise UsageError(f"{display_path(scores_file)} lists no photos: write it with `loda score ... --out FILE`")
    rows = [(row.path, row.score) for row in parsed.rows]
    unusable = parsed.skipped - len(parsed.failed)
    bases = scores_bases(scores_file, parsed.header)
    groups = None
    if bursts:
        if parsed.rows and not parsed.has_groups:
            raise UsageError(
                f"{display_path(scores_file)} has no group column: score again with this loda "
                "(without --no-groups), or leave out --scores"
            )
        groups = {row.path: row.group for row in parsed.rows if row.group is not None}
    return ScoreSource(
        rows, bases, display_path(scores_file), unusable, list(parsed.failed), from_file=True,
        bursts=groups, skipped_example=parsed.unusable_example,
    )


def glob_escape(path: str) -> str:
    """A relative path as an fnmatch pattern matching only itself."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in path)
