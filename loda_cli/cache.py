"""The score cache: SQLite (stdlib) in $LODA_HOME, shared safely between processes.

A row is keyed by (resolved path, model checkpoint hash, preprocessing id) and is valid while the
file's size and mtime_ns are unchanged. Only the raw model output is stored: score and mos are
derived from it by the checkpoint's calibration, which the checkpoint hash already pins. So are
each crop's raw output where it lies (``crops``, JSON), and what burst grouping needs: the look
(``look``, hashes), the capture time (``taken``) and the camera.

Schema 2 added those four columns. A cache of schema 1 is migrated in place on first use (ALTER
TABLE ADD COLUMN: existing rows keep their scores, with NULL in the new columns), and such a row
stays a hit: the scorer decodes that file once more for its look and EXIF only and fills them in,
while its crop scores stay unknown (NULL) until it is scored again.

WAL mode lets one writer and many readers (DataLoader workers, a second `loda score`) work at once;
a busy timeout turns "database is locked" into a short wait.

The cache is loda's own and holds nothing that scoring again cannot give back. A file SQLite
cannot read (a disk fault, a copy cut short, another program's file in its place) never stops a
run: readers treat it as a miss, and the first writer sets it aside as
``cache.sqlite.damaged-<time>`` (renamed, with its ``-wal`` and ``-shm`` files, never deleted) and
starts an empty cache (:func:`set_aside_if_damaged`; the commands call it first, to say so).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
CROP_RAW_DIGITS = 6  # a crop's raw output as the cache keeps it (and the scorer rounds it)
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    path      TEXT    NOT NULL,
    model     TEXT    NOT NULL,
    prep      TEXT    NOT NULL,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    raw       REAL,
    width     INTEGER,
    height    INTEGER,
    format    TEXT,
    error     TEXT,
    created   REAL    NOT NULL,
    look      TEXT,
    taken     REAL,
    camera    TEXT,
    crops     TEXT,
    PRIMARY KEY (path, model, prep)
);
"""
# Columns added after schema 1, in order, for the migration of an older cache.
_ADDED_COLUMNS = (("look", "TEXT"), ("taken", "REAL"), ("camera", "TEXT"), ("crops", "TEXT"))


def default_cache_path() -> Path:
    from loda_cli.home import loda_home

    return loda_home() / "cache.sqlite"


@dataclass(frozen=True)
class FileKey:
    """Identity of a file's content for caching: its resolved path, size and mtime."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str], resolved_dirs: dict[str, str] | None = None) -> FileKey:
        """``resolved_dirs``: a dict this call may keep each folder's resolved path in, for a walk
        of many files (resolving the whole path took 6 lstat calls a file): a file that is not a
        symlink resolves to its folder's resolved path and its own name."""
        if resolved_dirs is None or os.name != "posix" or not isinstance(path, (str, Path)):
            # (elsewhere realpath also settles a name's case; bytes paths keep the long way)
            st = os.stat(path)
            real = os.path.realpath(path)
        else:
            path = os.fspath(path)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                st = os.stat(path)
                real = os.path.realpath(path)
            else:
                folder, name = os.path.split(path)
                real_folder = resolved_dirs.get(folder)
                if real_folder is None:
                    real_folder = resolved_dirs[folder] = os.path.realpath(folder or os.curdir)
                real = os.path.join(real_folder, name)
        # surrogateescape keeps undecodable (non-UTF-8) names distinct and round-trippable.
        resolved = os.fsencode(real).decode("utf-8", "surrogateescape")
        return cls(resolved, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CachedResult:
    raw: float | None
    width: int | None
    height: int | None
    format: str | None
    error: str | None
    look: str | None = None  # None: not known (a row from before schema 2)
    taken: float | None = None
    camera: str | None = None
    crops: list[list[float]] | None = None  # [[x, y, w, h, raw], ...] in displayed pixels


def _crops_text(crops: list[list[float]] | None) -> str | None:
    if not crops:
        return None
    return json.dumps([[int(x), int(y), int(w), int(h), round(float(raw), CROP_RAW_DIGITS)] for x, y, w, h, raw in crops])


def _crops_of(text: str | None) -> list[list[float]] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # a damaged cell is unknown crop scores, not a failed run
    if not isinstance(value, list):
        return None
    return [box for box in value if isinstance(box, list) and len(box) == 5]


def _db_text(text: str) -> str:
    # SQLite stores UTF-8; lone surrogates from undecodable names are escaped reversibly.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(text) else text


def _has_surrogates(text: str) -> bool:
    if text.isascii():
        return False
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _readable(path: Path) -> bool:
    """Whether SQLite reads ``path`` as a database (its header and schema); True when it is
    missing, or when another process holds it locked (busy is not damaged)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.OperationalError:
        return True  # missing, or a folder we cannot open: not ours to judge
    try:
        conn.execute("SELECT name FROM sqlite_master").fetchall()
        return True
    except sqlite3.OperationalError:
        return True
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def set_aside_if_damaged(path: Path) -> Path | None:
    """Rename a cache file SQLite cannot read to ``<name>.damaged-<time>`` (its ``-wal`` and
    ``-shm`` files beside it), so a fresh cache starts in its place; the new name, or None when
    the file is missing or readable. Under a lock, and checked again there, so that of two
    processes finding it damaged one moves it and the other uses the fresh cache."""
    from loda_cli.atomic import exclusive_lock

    if not path.is_file() or _readable(path):
        return None
    with exclusive_lock(path):
        if not path.is_file() or _readable(path):
            return None
        stem = f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, n = path.with_name(stem), 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{stem}-{n}")
        os.replace(path, aside)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        return aside


class ScoreCache:
    """One connection to the cache. ``readonly`` connections are for worker processes."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, readonly: bool = False):
        self.path = Path(path) if path else default_cache_path()
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                self._conn = None
                return
            uri = f"file:{self.path}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.set_aside = set_aside_if_damaged(self.path)
            self._conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            self._setup_schema()
        self._pending: list[tuple] = []
        self._last_commit = time.monotonic()

    set_aside: Path | None = None  # where a damaged cache file went (a writer found it so)

    def _setup_schema(self) -> None:
        """WAL mode and the table. Switching to WAL needs a moment of exclusive access, and SQLite
        answers "database is locked" at once (no busy wait) when a second `loda score` is creating
        the same cache, so this retries for up to BUSY_TIMEOUT_S."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        delay = 0.05
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
                self._migrate()
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._conn.commit()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _migrate(self) -> None:
        """Add the columns a cache of an older schema lacks; its rows keep their scores."""
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(scores)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in present:
                self._conn.execute(f"ALTER TABLE scores ADD COLUMN {name} {kind}")

    def answers(self, model: str, prep: str) -> bool:
        """Whether the cache can answer for this model and preprocessing: it has the current
        schema (a read-only connection cannot migrate an older one, and misses on every row of
        it) and holds at least one row of theirs."""
        if self._conn is None:
            return False
        try:
            present = {row[1] for row in self._conn.execute("PRAGMA table_info(scores)")}
            if not present or any(name not in present for name, _ in _ADDED_COLUMNS):
                return False
            return self._conn.execute("SELECT 1 FROM scores WHERE model=? AND prep=? LIMIT 1",
                                      (model, prep)).fetchone() is not None
        except sqlite3.DatabaseError:
            return False

    def get(self, key: FileKey, model: str, prep: str, *, crops: bool = True) -> CachedResult | None:
        """The file's cached result, or None. ``crops=False`` leaves its crop scores out (None)
        unread: decoding them is a third of a cached rerun's time when the output has no use
        for them (a CSV)."""
        if self._conn is None:
            return None
        try:
            row = self._conn.execute(
                "SELECT size, mtime_ns, raw, width, height, format, error, look, taken, camera, crops "
                "FROM scores WHERE path=? AND model=? AND prep=?",
                (_db_text(key.path), model, prep),
            ).fetchone()
        except sqlite3.DatabaseError:
            # a cache we cannot read is a cache miss, never a failed run: a damaged file (the
            # writer sets it aside), or an old schema read by a read-only connection before any
            # writer migrated it
            return None
        if row is None or row[0] != key.size or row[1] != key.mtime_ns:
            return None
        return CachedResult(*row[2:10], _crops_of(row[10]) if crops else None)

    def put(self, key: FileKey, model: str, prep: str, result: CachedResult) -> None:
        """Queue a row; rows are committed in batches (at most ~1 s old) and on :meth:`flush`."""
        if self._conn is None:
            return  # no cache (a damaged one stopped caching for this run)
        self._pending.append(
            (
                _db_text(key.path), model, prep, key.size, key.mtime_ns,
                result.raw, result.width, result.height, result.format, result.error, time.time(),
                result.look, result.taken, result.camera, _crops_text(result.crops),
            )
        )
        if len(self._pending) >= 256 or time.monotonic() - self._last_commit > 1.0:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._conn is None:
            return
        try:
            with self._conn:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO scores (path, model, prep, size, mtime_ns, raw, width, height, "
                    "format, error, created, look, taken, camera, crops) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    self._pending,
                )
        except sqlite3.OperationalError:
            raise  # locked past the timeout, disk full: the caller reports it
        except sqlite3.DatabaseError:
            # Damaged while in use: this run stops caching (its rows still reach the output);
            # the next run's writer sets the file aside.
            self._conn.close()
            self._conn = None
        self._pending.clear()
        self._last_commit = time.monotonic()

    def count(self) -> int:
        if self._conn is None:
            return 0
        return self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        if self._conn is not None:
            if not self.readonly:
                self.flush()
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
