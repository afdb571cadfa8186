"""Temporary files that become a user's output by an atomic rename, and the lock beside a file
that several processes read, modify and write.

``tempfile.mkstemp`` creates its file readable by its owner alone (0600), and the rename hands
that mode to the output: a scores CSV or a checkpoint would be unreadable by the user's group and
by other tools running as another user, and an existing file would lose the mode it had. So the
temporary file gets the mode the output would have had if written directly: the existing file's
mode, else 0666 less the umask.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def output_mode(path: Path) -> int:
    """The permission bits ``path`` keeps (it exists) or would get from ``open`` (it does not)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder, to be renamed onto ``path``: its descriptor and
    name, with the mode ``path`` will need (:func:`output_mode`)."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        os.fchmod(fd, output_mode(path))
    except (OSError, AttributeError):  # no fchmod (Windows) or a file system without modes
        pass
    return fd, tmp


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], mode: str = "wb", *, sync: bool = True, **open_kw) -> Iterator[IO]:
    """A new temporary file beside ``path`` (a name of its own, made with O_EXCL, so never an
    existing file and never through a link someone left at a fixed name), open in ``mode``;
    fsynced (``sync``) and renamed onto ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            yield fh
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # our own temporary file, never the output
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (``<path>.lock``, flock) for a read-modify-write of ``path``, waiting for
    another holder. Where fcntl is missing, or the folder cannot be written, there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
