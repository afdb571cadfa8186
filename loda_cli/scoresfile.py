"""Reading a scores file written by `loda score` (CSV, JSON or JSONL).

The columns (keys) are ``rank, path, score, mos, raw, width, height, format, error, group,
rank_in_group``; JSON and JSONL rows also hold ``crops`` (``[[x, y, w, h, score], ...]``). Files
from before burst grouping lack the last ones, and read as before. JSON is
``{"header": {...}, "rows": [...]}``; JSONL is one row object per line (a line holding only a
``header`` object is allowed). Rows that carry an error, or no usable score, are skipped and
counted, never guessed at.

File names may hold any bytes Linux allows. The CSV is read with ``surrogateescape`` so a name
that is not valid UTF-8 comes back as the same ``str`` that ``os.fsdecode`` gives, and JSON keeps
lone surrogates as ``\\udcXX`` escapes; either way ``os.fsencode(row.path)`` is the original bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from loda_cli.errors import UsageError

# Paths in a CSV can be long and odd; the csv module's default field limit (128 KiB) is plenty for
# paths, but a hostile file with a huge field must fail cleanly rather than exhaust memory.
_CSV_FIELD_LIMIT = 1 << 20


@dataclass(frozen=True)
class ScoreRecord:
    """One usable row of a scores file: a path and its score in [0, 1] (higher is better)."""

    path: str
    score: float
    mos: Optional[float] = None
    raw: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    format: Optional[str] = None
    group: Optional[int] = None  # the burst or near-duplicate set (loda_cli.bursts)
    rank_in_group: Optional[int] = None
    crops: Optional[tuple[tuple[float, ...], ...]] = None  # (x, y, w, h, score) per crop


@dataclass
class ScoresFile:
    """The usable rows of a scores file, plus what was skipped and why."""

    source: Path
    rows: list[ScoreRecord] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)
    skipped_errors: int = 0
    skipped_unscored: int = 0
    skipped_invalid: int = 0
    unusable_example: Optional[str] = None  # the first row with a path but no usable score
    # (path, error) of the files `loda score` could not score, in the file's order
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_groups(self) -> bool:
        """Whether the scored rows carry groups (a file from before grouping, or written with
        ``--no-groups``, does not)."""
        return bool(self.rows) and all(row.group is not None for row in self.rows)

    @property
    def skipped(self) -> int:
        return self.skipped_errors + self.skipped_unscored + self.skipped_invalid


def read_scores(path: os.PathLike[str] | str) -> ScoresFile:
    """Read every usable row of ``path``. Raises UsageError when it is missing or malformed."""
    source = Path(path)
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UsageError(f"scores file not found: {source}") from None
    except IsADirectoryError:
        raise UsageError(f"scores file is a folder: {source}") from None
    except OSError as exc:
        raise UsageError(f"cannot read scores file {source}: {exc.strerror}") from None

    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    kind = _detect_format(source, text)
    result = ScoresFile(source=source)
    if kind == "csv":
        raw_rows: Iterable[dict[str, Any]] = _csv_rows(text, source)
    elif kind == "json":
        raw_rows = _json_rows(text, source, result)
    else:
        raw_rows = _jsonl_rows(text, source, result)
    for raw_row in raw_rows:
        _add_row(result, raw_row)
    return result


def scores_bases(path: os.PathLike[str] | str, header: dict[str, Any]) -> list[str]:
    """The folders a relative path in a scores file is looked for in, in order: the current
    folder, the folder `loda score` ran in (a .json header's ``cwd``), each root it was given
    there, and the scores file's own folder."""
    bases = [os.getcwd()]
    ran_in = header.get("cwd") if isinstance(header, dict) else None
    if isinstance(ran_in, str) and os.path.isabs(ran_in):
        bases.append(ran_in)
        roots = header.get("roots")
        for root in roots if isinstance(roots, list) else []:
            if isinstance(root, str) and os.path.isdir(os.path.join(ran_in, root)):
                bases.append(os.path.normpath(os.path.join(ran_in, root)))
    bases.append(os.path.dirname(os.path.abspath(os.fspath(path))))
    return list(dict.fromkeys(bases))


def _detect_format(source: Path, text: str) -> str:
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".jsonl" or suffix == ".ndjson":
        return "jsonl"
    if suffix == ".json":
        return "json"
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n{" in stripped.strip():
        return "jsonl"
    if stripped.startswith("{") or stripped.startswith("["):
        return "json"
    return "csv"


def _csv_rows(text: str, source: Path) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    # Rows end only where the csv module says (str.splitlines would also break a quoted name at
    # a form feed, U+2028 or U+0085).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [name.strip().lower() for name in (reader.fieldnames or [])]
    if "path" not in fields or "score" not in fields:
        from loda_cli.images import is_image_path

        if is_image_path(source):
            raise UsageError(f"{source} is a photo, not a scores file: give the .csv or .json `loda score --out` wrote")
        raise UsageError(
            f"scores file {source} needs 'path' and 'score' columns (as `loda score` writes)"
        )
    reader.fieldnames = fields
    try:
        yield from reader
    except csv.Error as exc:
        raise UsageError(f"scores file {source} is not valid CSV: {exc}") from None


def _json_rows(text: str, source: Path, result: ScoresFile) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"scores file {source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"scores file {source} nests too deep to be a scores file") from None
    if isinstance(doc, dict):
        header = doc.get("header")
        if isinstance(header, dict):
            result.header = header
        rows = doc.get("rows")
    else:
        rows = doc
    if not isinstance(rows, list):
        raise UsageError(f"scores file {source} has no 'rows' list")
    return [row for row in rows if isinstance(row, dict)]


def _jsonl_rows(text: str, source: Path, result: ScoresFile) -> Iterator[dict[str, Any]]:
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            # A stream cut off mid-line (Ctrl-C, a full disk) leaves a partial last line: the rows
            # before it are still good. A bad line anywhere else means the file is damaged.
            if all(not rest.strip() for rest in lines[number:]):
                result.skipped_invalid += 1
                return
            raise UsageError(f"scores file {source} line {number} is not valid JSON") from None
        if not isinstance(obj, dict):
            continue
        if "header" in obj and "path" not in obj:
            if isinstance(obj["header"], dict):
                result.header = obj["header"]
            continue
        yield obj


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> Optional[int]:
    number = _number(value)
    return int(number) if number is not None else None


def _add_row(result: ScoresFile, row: dict[str, Any]) -> None:
    error = row.get("error")
    path = row.get("path")
    if error not in (None, "") and str(error).strip():
        result.skipped_errors += 1
        if isinstance(path, str) and path:
            result.failed.append((path, str(error).strip()))
        return
    if not isinstance(path, str) or not path:
        result.skipped_invalid += 1
        return
    raw_score = row.get("score")
    if raw_score is None or (isinstance(raw_score, str) and not raw_score.strip()):
        result.skipped_unscored += 1
        result.unusable_example = result.unusable_example or path
        return
    score = _number(raw_score)
    # A score outside [0, 1] is not one loda wrote; acting on it would be guessing.
    if score is None or not 0.0 <= score <= 1.0:
        result.skipped_invalid += 1
        result.unusable_example = result.unusable_example or path
        return
    fmt = row.get("format")
    result.rows.append(
        ScoreRecord(
            path=path,
            score=score,
            mos=_number(row.get("mos")),
            raw=_number(row.get("raw")),
            width=_integer(row.get("width")),
            height=_integer(row.get("height")),
            format=str(fmt) if fmt not in (None, "") else None,
            group=_integer(row.get("group")),
            rank_in_group=_integer(row.get("rank_in_group")),
            crops=_crops(row.get("crops")),
        )
    )


def _crops(value: Any) -> Optional[tuple[tuple[float, ...], ...]]:
    """``crops`` as `loda score` writes them; anything else (a CSV has none) is None."""
    if not isinstance(value, list):
        return None
    boxes = []
    for box in value:
        if isinstance(box, list) and len(box) == 5:
            numbers = tuple(_number(v) for v in box)
            if all(n is not None for n in numbers):
                boxes.append(numbers)
    return tuple(boxes) or None
