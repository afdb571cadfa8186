"""File operations: the only place in loda_cli.organize that moves, links, copies or removes a file.

A destination name is never replaced. A move is a hard link then an unlink on one filesystem,
or, across filesystems, a copy that is fsynced and checked by size and SHA-256 before the source
is removed: the only place a source file is removed. New content is written to a temporary file
(``.loda-tmp-*``), fsynced, then named. The other removals are loda's own temporary files and
what undo found to be loda's own copy, link or sidecar. An operation that cannot be done safely
raises :class:`~loda_cli.organize.paths.Skipped`; the run records it and goes on.

Test hooks: the environment variable ``LODA_TEST_ACTION_DELAY`` (seconds, a float) makes
:func:`pause_before_action` sleep, so tests can kill a run or an undo halfway, and
``LODA_TEST_FOLDER_SYNC_EVERY`` makes the batches smaller. They have no other effect.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from loda_cli.errors import OutputError
from loda_cli.organize.paths import Skipped, display_path

_CHUNK = 1 << 20
ACTION_DELAY_ENV = "LODA_TEST_ACTION_DELAY"

# A folder's fsync makes the names made or removed in it durable. Where loda makes or removes
# files whose fate undo decides by looking at them, and whose loss loses nothing (sidecars `loda
# rate` writes, copies and links `loda sort` makes, what undo removes or rewrites), it fsyncs each
# folder once for up to this many of them rather than once a file, and always before the record
# that says the run (or the undo) is complete. Each new file's content is still fsynced before it
# is named. A change lost to a power cut in between leaves the previous state (no copy, the old
# sidecar), which the next `loda undo` reads from the disk and handles again. Moves on one
# filesystem batch differently (PendingDrops): a photo's new name is durable before its old one
# is dropped.
FOLDER_SYNC_EVERY = 256
PENDING_SECONDS = 1.0
SYNC_EVERY_ENV = "LODA_TEST_FOLDER_SYNC_EVERY"  # a smaller batch, for tests that kill a run
try:
    FOLDER_SYNC_EVERY = max(1, int(os.environ.get(SYNC_EVERY_ENV) or FOLDER_SYNC_EVERY))
except ValueError:
    pass


class FolderSyncs:
    """The folders changed since their last fsync, synced once every :data:`FOLDER_SYNC_EVERY`
    changes and all by :meth:`flush`."""

    def __init__(self) -> None:
        self.folders: set[str] = set()
        self.changes = 0

    @contextmanager
    def changing(self, folder: str) -> Iterator[None]:
        """Around one change in ``folder``: marked before it, so a change that fails halfway is
        still synced; counted after it."""
        self.folders.add(folder)
        yield
        self.changes += 1
        if self.changes % FOLDER_SYNC_EVERY == 0:
            self.flush()

    def flush(self) -> None:
        for folder in sorted(self.folders):
            fsync_dir(folder)
        self.folders.clear()


# --- reading -------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


SAMPLE_BYTES = 64 << 10


def sample_sha256(path: str) -> str:
    """SHA-256 of a file's size, its first and its last 64 KiB: what a journal records of a file
    instead of reading all of it (128 KiB of a 25 MB RAW)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.sha256(size.to_bytes(8, "little"))
        digest.update(fh.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            fh.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What a journal knows of a file it moves or copies: the size, and either the modification
    time and :func:`sample_sha256` (journal version 2) or the SHA-256 of all of it (version 1)."""

    size: int
    mtime_ns: Optional[int] = None  # any integer: a file can be dated before 1970
    sample: str = ""
    sha256: str = ""


def same_content(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are two regular files, or two names of one file, holding the same
    bytes, compared byte for byte. Two names of one file (a move halfway leaves them) are the
    same without reading; one name seen twice (a case-insensitive disk: ``IMG.jpg`` and
    ``img.jpg``) is not two of anything, so never a duplicate to remove."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_size != sb.st_size:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return sa.st_nlink >= 2 and a != b and _two_names(a, b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(_CHUNK)
            if chunk != fb.read(_CHUNK):
                return False
            if not chunk:
                return True


def _two_names(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are listed as entries of their folders under exactly these names
    (a case-insensitive disk answers a lookup of ``img.jpg`` for ``IMG.jpg``, but lists one)."""
    try:
        return all(os.path.basename(p) in os.listdir(os.path.dirname(p) or ".") for p in (a, b))
    except OSError:
        return False


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows shares) cannot fsync a folder; the data is synced
    finally:
        os.close(fd)


def read_regular(path: str) -> Optional[bytes]:
    """The bytes of a regular file, None when absent; Skipped for links and other things."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise Skipped("no longer a regular file")
    with open(path, "rb") as fh:
        return fh.read()


def same_file_state(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns == mtime_ns


def file_state(path: str, expected: Fingerprint) -> str:
    """'absent', 'match' (a regular file that is still the journalled one), or 'other'.

    With a whole-file SHA-256 (journal version 1) the file is read and hashed. Otherwise the
    size must be equal and then the modification time (a rename keeps it, so a file moved on one
    disk is recognised without reading it), or, where only the time changed, the sampled hash.
    Nothing is removed on this evidence alone: undo compares the bytes of both files first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISREG(st.st_mode) or st.st_size != expected.size:
        return "other"
    if expected.sha256:
        return "match" if sha256_file(path) == expected.sha256 else "other"
    if expected.mtime_ns is not None and st.st_mtime_ns == expected.mtime_ns:
        return "match"
    return "match" if expected.sample and sample_sha256(path) == expected.sample else "other"


# --- writing, never over an existing name --------------------------------------------------------

@contextmanager
def _new_file(tmp: str, mode: int) -> Iterator[int]:
    """A new file ``tmp`` (never an existing name, never through a link) to write to: fsynced and
    closed when the block ends, closed and removed when it fails."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        yield fd
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_NO_HARDLINKS = {
    errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EACCES
}


_AT_FDCWD = -100
_renamer: Optional[Callable[[str, str], int]] = None


def _exclusive_renamer() -> Callable[[str, str], int]:
    """The C library's rename that refuses an existing destination, as f(src, dst) -> errno
    (0: done), found once (:func:`_load_exclusive_renamer`)."""
    global _renamer
    if _renamer is None:
        _renamer = _load_exclusive_renamer()
    return _renamer


def _load_exclusive_renamer() -> Callable[[str, str], int]:
    """Linux ``renameat2`` with RENAME_NOREPLACE, macOS ``renamex_np`` with RENAME_EXCL; one
    that answers ENOSYS where there is neither."""
    import ctypes
    import ctypes.util
    import sys

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            call = libc.renameat2
            call.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
            args = lambda src, dst: (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), 1)  # noqa: E731
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            call = libc.renamex_np
            call.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint)
            args = lambda src, dst: (os.fsencode(src), os.fsencode(dst), 0x4)  # noqa: E731
        else:
            return lambda src, dst: errno.ENOSYS
    except (OSError, AttributeError):
        return lambda src, dst: errno.ENOSYS
    return lambda src, dst: 0 if call(*args(src, dst)) == 0 else ctypes.get_errno()


def rename_new(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` where the filesystem has no hard links, never replacing a file
    at ``dst``: in one step where the system can refuse an existing name, else by looking first
    (a file made at ``dst`` in between would be replaced: FAT through FUSE, old kernels)."""
    error = _exclusive_renamer()(src, dst)
    if error == 0:
        return
    if error == errno.EEXIST:
        raise Skipped("the destination name was taken meanwhile")
    if error not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        raise OSError(error, os.strerror(error), src, None, dst)
    if os.path.lexists(dst):
        raise Skipped("the destination name was taken meanwhile")
    os.rename(src, dst)


def place(tmp: str, dst: str) -> None:
    """Give the finished file ``tmp`` the name ``dst``, never replacing an existing ``dst``."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        os.unlink(tmp)
        raise Skipped("the destination name was taken meanwhile") from None
    except OSError as exc:
        if exc.errno not in _NO_HARDLINKS:
            raise
        # Filesystems without hard links (FAT, exFAT, some shares).
        try:
            rename_new(tmp, dst)
        except Skipped:
            os.unlink(tmp)
            raise
        return
    os.unlink(tmp)


def copy_verified(
    src: str, dst: str, size: int, sha256: str, tmp: str, *, sync_folder: bool = True,
    mtime_ns: Optional[int] = None,
) -> None:
    """Copy to ``tmp``, fsync, check size and hash (of the bytes read and of the bytes on disk),
    then name it ``dst``. The source is untouched. ``sha256`` is the journalled hash of the
    source, or "" where the journal holds its modification time instead (``mtime_ns``, checked
    before the read; the source's size and time must also be the same after it, and the source
    read again must hash as the bytes copied). The copy must read back as the bytes that were
    read. ``sync_folder=False`` leaves the folder's fsync (which makes the new name durable) to
    the caller: never for a move."""
    digest = hashlib.sha256()
    written = 0
    mode = stat.S_IMODE(os.stat(src).st_mode)
    with open(src, "rb") as fin, _new_file(tmp, 0o600) as fd:
        before = os.fstat(fin.fileno())
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            _write_all(fd, chunk)
            written += len(chunk)
        after = os.fstat(fin.fileno())
    unchanged = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
    if mtime_ns is not None and before.st_mtime_ns != mtime_ns:
        unchanged = False
    if written != size or not unchanged or (sha256 and digest.hexdigest() != sha256):
        os.unlink(tmp)
        raise Skipped("the file changed after it was journalled")
    if os.path.getsize(tmp) != size or sha256_file(tmp) != digest.hexdigest():
        os.unlink(tmp)
        raise OutputError(
            f"the copy of {display_path(src)} does not read back identical; the source is untouched"
        )
    if not sha256 and sha256_file(src) != digest.hexdigest():
        # Without a journalled hash, the source read again (from the cache, mostly) shows a
        # writer that changed it during the copy and kept its time: the copy may be torn.
        os.unlink(tmp)
        raise Skipped("the file changed while it was copied")
    try:
        shutil.copystat(src, tmp)
    except OSError:
        os.chmod(tmp, mode)
    place(tmp, dst)
    if sync_folder:
        fsync_dir(os.path.dirname(dst))


def move(
    src: str, dst: str, size: int, sha256: str, tmp: str, verified: Callable[[], None],
    mtime_ns: Optional[int] = None, pending: Optional["PendingDrops"] = None, key: object = None,
) -> bool:
    """Give ``src`` the name ``dst`` and drop the old name. Across filesystems: a verified copy
    (through ``tmp``), ``verified()`` (the caller journals it), then the source's removal.

    With ``pending``, a move on one filesystem stops once the new name is made (a hard link):
    ``pending`` drops the old name later, with others, after fsyncing the new names' folders.
    Where the filesystem has no hard links (exFAT, FAT) the move is a rename, and ``pending``
    fsyncs both folders later, with others. True when the move is complete, False when it waits
    in ``pending`` (as ``key``)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise Skipped("the destination name was taken meanwhile") from None
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            copy_verified(src, dst, size, sha256, tmp, mtime_ns=mtime_ns)
            verified()
            os.unlink(src)
            fsync_dir(os.path.dirname(src))
            return True
        if exc.errno not in _NO_HARDLINKS:
            raise
        rename_new(src, dst)
        if pending is not None:
            pending.add(key, src, dst, renamed=True)
            return False
        fsync_dir(os.path.dirname(dst))
        fsync_dir(os.path.dirname(src))
        return True
    # Both names now point at the same file; dropping the old name loses nothing.
    if pending is not None:
        pending.add(key, src, dst)
        return False
    fsync_dir(os.path.dirname(dst))
    os.unlink(src)
    fsync_dir(os.path.dirname(src))
    return True


class DropError(Exception):
    """An old name :meth:`PendingDrops.drop` could not remove: ``key`` and ``path`` say which,
    ``error`` why."""

    def __init__(self, key: object, path: str, error: OSError) -> None:
        super().__init__(str(error))
        self.key, self.path, self.error = key, path, error


class PendingDrops:
    """Moves on one filesystem whose new name (a hard link) is made and whose old name is still
    there. :meth:`drop` fsyncs every new name's folder, then removes the old names, then fsyncs
    their folders: each photo's new name is durable before its old one is dropped, as when moves
    go one by one, with two folder fsyncs a folder and batch instead of two a photo (on a USB
    hard disk, 10-30 ms each). Until then both names hold the same file, which undo resolves.
    :meth:`due` says when to drop: :data:`FOLDER_SYNC_EVERY` moves, or the oldest waiting
    :data:`PENDING_SECONDS` (a run that also copies across disks does not hold names long).

    On a filesystem without hard links a move is a rename, done at once; it waits here only for
    its two folders' fsyncs, made in the same order (new names' folders, then old names'), so
    that an external exFAT disk's 5,000 culled photos cost two fsyncs a folder and batch, not
    10,000. A power cut before them leaves each of those photos under one of its two names, as it
    could the one photo in flight when each move was synced alone; undo finds it under either."""

    def __init__(self) -> None:
        self.moves: deque[tuple[object, str, str, bool]] = deque()
        self.since = 0.0

    def __len__(self) -> int:
        return len(self.moves)

    def add(self, key: object, src: str, dst: str, *, renamed: bool = False) -> None:
        """A move whose new name ``dst`` is made; ``renamed``: by a rename, so ``src`` is gone."""
        if not self.moves:
            self.since = time.monotonic()
        self.moves.append((key, src, dst, renamed))

    def due(self) -> bool:
        return bool(self.moves) and (
            len(self.moves) >= FOLDER_SYNC_EVERY or time.monotonic() - self.since >= PENDING_SECONDS
        )

    def drop(self, dropped: Callable[[object], None], kept: Callable[[object, str], None]) -> None:
        """Drop every old name, calling ``dropped(key)`` after each. An old name that no longer
        holds the linked file (an editor saved a new version over it meanwhile) stays, and so
        does the new name: ``kept(key, why)``. An OSError stops it (DropError); that move keeps
        both names, the ones after it stay pending."""
        for folder in sorted({os.path.dirname(dst) for _, _, dst, _ in self.moves}):
            fsync_dir(folder)
        synced: set[str] = set()
        try:
            while self.moves:
                key, src, dst, renamed = self.moves.popleft()
                synced.add(os.path.dirname(src))
                if renamed:  # the old name went with the rename; its folder is synced below
                    dropped(key)
                    continue
                try:
                    if not _one_file(src, dst):
                        kept(key, "the photo was replaced while it moved; both versions stay")
                        continue
                    os.unlink(src)
                except OSError as exc:
                    raise DropError(key, src, exc) from None
                dropped(key)
        finally:
            for folder in sorted(synced):
                fsync_dir(folder)


def _one_file(a: str, b: str) -> bool:
    """Whether names ``a`` and ``b`` are links to one file (same device and inode)."""
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def write_file(
    path: str, data: bytes, tmp: str, *, replace: bool, mode: Optional[int] = None,
    sync_folder: bool = True,
) -> None:
    """Write ``data`` to ``tmp``, fsync, then name it ``path`` (replacing only if ``replace``).
    ``sync_folder=False`` leaves the folder's fsync (which makes the new name durable) to the
    caller, who may then sync a folder once for many files."""
    with _new_file(tmp, 0o644 if mode is None else mode) as fd:
        _write_all(fd, data)
    if replace:
        os.replace(tmp, path)
    else:
        place(tmp, path)
    if sync_folder:
        fsync_dir(os.path.dirname(path))


def symlink(target: str, dst: str, *, sync_folder: bool = True) -> None:
    """Make ``dst`` a symlink to ``target``; Skipped when the name is taken."""
    try:
        os.symlink(target, dst)
    except FileExistsError:
        raise Skipped("the destination name was taken meanwhile") from None
    if sync_folder:
        fsync_dir(os.path.dirname(dst))


# --- removing ------------------------------------------------------------------------------------


def remove(path: str, *, sync_folder: bool = True) -> None:
    """Remove a name undo found to be loda's own and redundant: a copy or duplicate whose
    original is in place, a symlink loda made, a sidecar loda created. ``sync_folder=False``
    leaves the folder's fsync (which makes the removal durable) to the caller."""
    os.unlink(path)
    if sync_folder:
        fsync_dir(os.path.dirname(path))


def remove_tmp(path: str) -> None:
    """Remove one of loda's temporary files (``.loda-tmp-*``) that a killed run left behind."""
    os.unlink(path)


def remove_empty_folder(folder: str) -> None:
    """Remove ``folder`` if it is an empty plain folder; anything else stays, silently."""
    try:
        if os.path.isdir(folder) and not os.path.islink(folder):
            os.rmdir(folder)  # only ever removes an empty folder
    except OSError:
        pass


# --- the test hook -------------------------------------------------------------------------------


def pause_before_action() -> None:
    """Sleep ``$LODA_TEST_ACTION_DELAY`` seconds, when set (tests kill runs halfway)."""
    try:
        delay = max(0.0, float(os.environ.get(ACTION_DELAY_ENV, "0") or 0))
    except ValueError:
        delay = 0.0
    if delay:
        time.sleep(delay)
