"""The score cache: SQLite (stdlib) in $LODA_HOME, shared safely between processes.

A row is keyed by (resolved path, model checkpoint hash, preprocessing id) and is valid while the
file's size and mtime_ns are unchanged. Only the raw model output is stored: score and mos are
derived from it by the checkpoint's calibration, which the checkpoint hash already pins.

WAL mode lets one writer and many readers (DataLoader workers, a second `loda score`) work at once;
a busy timeout turns "database is locked" into a short wait.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
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
    PRIMARY KEY (path, model, prep)
);
"""


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
    def of(cls, path: str | os.PathLike[str]) -> FileKey:
        st = os.stat(path)
        # surrogateescape keeps undecodable (non-UTF-8) names distinct and round-trippable.
        resolved = os.fsencode(os.path.realpath(path)).decode("utf-8", "surrogateescape")
        return cls(resolved, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CachedResult:
    raw: float | None
    width: int | None
    height: int | None
    format: str | None
    error: str | None


def _db_text(text: str) -> str:
    # SQLite stores UTF-8; lone surrogates from undecodable names are escaped reversibly.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(text) else text


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


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
            self._conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            self._setup_schema()
        self._pending: list[tuple] = []
        self._last_commit = time.monotonic()

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

    def get(self, key: FileKey, model: str, prep: str) -> CachedResult | None:
        if self._conn is None:
            return None
        try:
            row = self._conn.execute(
                "SELECT size, mtime_ns, raw, width, height, format, error FROM scores "
                "WHERE path=? AND model=? AND prep=?",
                (_db_text(key.path), model, prep),
            ).fetchone()
        except sqlite3.OperationalError:
            return None  # a cache we cannot read is a cache miss, never a failed run
        if row is None or row[0] != key.size or row[1] != key.mtime_ns:
            return None
        return CachedResult(*row[2:])

    def put(self, key: FileKey, model: str, prep: str, result: CachedResult) -> None:
        """Queue a row; rows are committed in batches (at most ~1 s old) and on :meth:`flush`."""
        self._pending.append(
            (
                _db_text(key.path), model, prep, key.size, key.mtime_ns,
                result.raw, result.width, result.height, result.format, result.error, time.time(),
            )
        )
        if len(self._pending) >= 256 or time.monotonic() - self._last_commit > 1.0:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._conn is None:
            return
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO scores "
                "(path, model, prep, size, mtime_ns, raw, width, height, format, error, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                self._pending,
            )
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
