"""Ranked score outputs: CSV, JSON and JSONL files (atomic), and a JSONL stream.

File names are kept exactly: names that are not valid UTF-8 are written with surrogateescape in
CSV (the original bytes) and as ``\\udcXX`` escapes in JSON, which read back to the same ``str``
and therefore the same bytes through ``os.fsencode``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from loda_cli.atomic import temp_beside
from loda_cli.errors import OutputError, UsageError

# New columns go at the end, so that readers keyed by column name (or position) keep working.
COLUMNS = ("rank", "path", "score", "mos", "raw", "width", "height", "format", "error", "group", "rank_in_group")
FORMATS = ("csv", "json", "jsonl")


def output_format(path: str) -> str:
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UsageError(f"unknown output format for {path!r}: use a .csv, .json or .jsonl file, or - for stdout")
    return suffix


def check_writable_output(path: str) -> None:
    """UsageError unless ``path`` could be written: its folder exists and takes new files, and it
    is not a folder itself. Checked before scoring, so a typo does not cost the whole run."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder")
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: no permission to write in {folder}")


def mos_is_meaningful(calibration: Any, metadata: dict[str, Any]) -> bool:
    """Whether ``mos`` says more than ``score``: only for a checkpoint whose training labels have a
    native scale other than [0, 1] higher-is-better (KonIQ 1-5, LIVE DMOS, the built-in model's
    LIVE Challenge 0-100...). Checkpoints imported without ``--dataset`` have none, and their
    ``mos`` is left empty."""
    dataset = metadata.get("dataset") if isinstance(metadata, dict) else None
    if not isinstance(dataset, dict) or not dataset.get("scale"):
        return False
    unit = (calibration.label_min, calibration.label_max) == (0.0, 1.0)
    return not (unit and not calibration.lower_better)


def rank_rows(rows: Iterable[Any]) -> list[Any]:
    """Highest score first (ties broken by raw output, then path); failures last, by path."""
    scored = [r for r in rows if r.error is None and r.score is not None]
    failed = [r for r in rows if not (r.error is None and r.score is not None)]
    scored.sort(key=lambda r: (-r.score, -(r.raw or 0.0), r.path))
    failed.sort(key=lambda r: r.path)
    return scored + failed


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def row_record(row: Any, rank: int | None) -> dict[str, Any]:
    d = row.as_dict()
    return {
        "rank": rank,
        "path": d["path"],
        "score": _round(d["score"], 6),
        "mos": _round(d["mos"], 6),
        "raw": _round(d["raw"], 8),
        "width": d["width"],
        "height": d["height"],
        "format": d["format"],
        "error": d["error"],
        "group": d.get("group"),
        "rank_in_group": d.get("rank_in_group"),
        "crops": d.get("crops"),  # JSON and JSONL only: too bulky for a CSV cell
    }


def ranked_records(rows: Iterable[Any]) -> list[dict[str, Any]]:
    ranked = rank_rows(list(rows))
    return [row_record(r, i + 1 if r.error is None and r.score is not None else None) for i, r in enumerate(ranked)]


def _csv_value(value: Any) -> str:
    return "" if value is None else str(value)


# A spreadsheet runs a cell that begins with one of these as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_path(path: str) -> str:
    """A relative path a spreadsheet would take for a formula (a photo named ``=HYPERLINK(...).jpg``
    scored from inside its folder) is written as ``./=HYPERLINK(...).jpg``: the same file, and text."""
    return "./" + path if path.startswith(_FORMULA_STARTS) else path


def render(records: Sequence[dict[str, Any]], fmt: str, header: dict[str, Any] | None = None) -> str:
    if fmt == "csv":
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\n")
        # With "\n" as the line end, the csv module leaves a lone "\r" in a field unquoted, and
        # spreadsheets and readers end the row there: such a row has every field quoted.
        quoting = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(COLUMNS)
        for rec in records:
            values = [_csv_path(_csv_value(rec[c])) if c == "path" else _csv_value(rec[c]) for c in COLUMNS]
            (quoting if any("\r" in v for v in values) else writer).writerow(values)
        return buf.getvalue()
    if fmt == "json":
        return _json_document(records, header or {})
    if fmt == "jsonl":
        return "".join(json.dumps(rec) + "\n" for rec in records)
    raise UsageError(f"unknown output format {fmt!r}")


def _json_document(records: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    """``{"header": ..., "rows": [...]}``: the header indented, each row on a line of its own.
    Indenting the rows too put every crop's number on a line (4.5 million lines, 44 MB for
    40,000 photos) and took the json module's pure-Python encoder: 6 s of a cached rerun."""
    # (A JSON text holds no raw newline inside a string, so shifting its lines is safe.)
    head = json.dumps(header, indent=1).replace("\n", "\n ")
    rows = ",\n".join("  " + json.dumps(rec) for rec in records)
    return '{\n "header": ' + head + ',\n "rows": [' + ("\n" + rows + "\n " if rows else "") + "]\n}\n"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write to a temp file beside ``path``, fsync, then rename: readers see the old file or the
    new one, never a torn one. On failure (disk full) the old file stays intact."""
    path = Path(path)
    try:
        fd, tmp = temp_beside(path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)  # our own temp file, never the user's data
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; the previous file is unchanged") from exc


def write_scores(path: str, rows: Iterable[Any], header: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rank ``rows`` and write them to ``path`` (format from the suffix), atomically."""
    fmt = output_format(path)
    records = ranked_records(rows)
    atomic_write_text(path, render(records, fmt, header))
    return records


class JsonlStream:
    """Rows as JSON lines on a text stream, flushed one by one (``--out -``)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, row: Any) -> None:
        # Rows stream in completion order, before any ranking or grouping exists: no "rank",
        # "group" or "rank_in_group" key at all.
        record = row_record(row, None)
        for key in ("rank", "group", "rank_in_group"):
            del record[key]
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()
