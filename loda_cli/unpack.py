"""Unpacking a downloaded archive safely, for ``loda_cli.download``: every entry checked before
anything is written (no absolute paths, no ``..``, no links or devices, no encryption or
duplicates, no zip bombs), zip entries written one by one as new files into a scratch folder,
RAR through a system tool (7z, bsdtar or unrar) with its listing checked first and its result
checked after, and the finished folder moved into place by one rename.

Failures raise :class:`~loda_cli.errors.DownloadError` with one line. An archive found damaged or
unsafe is deleted (it lives in loda's own ``.part`` folder), so a rerun fetches it again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import subprocess
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

from loda_cli.errors import DownloadError

Emit = Callable[[str, dict], None]

CHUNK = 1 << 20
# Zip-bomb guards: an entry above 1 MiB may expand at most 100 times; everything together at most
# 20 times the archive (images hardly compress: the real archives expand about 1x).
MAX_ENTRY_RATIO = 100
MAX_TOTAL_RATIO = 20
RAR_TOOLS = ("7z", "7zz", "bsdtar", "unrar")


def discard(path: Path) -> None:
    """Delete a download loda made in its .part folder, with its state file."""
    for victim in (path, path.with_name(path.name + ".json")):
        with contextlib.suppress(FileNotFoundError):
            victim.unlink()


def disk_error(exc: OSError, where: Path, doing: str, kept: str) -> DownloadError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        return DownloadError(f"the disk is full ({exc.strerror}) while {doing} in {where}; {kept}: free some "
                             f"space and rerun")
    return DownloadError(f"cannot write in {where} while {doing}: {exc.strerror or exc}; {kept}")



# --------------------------------------------------------------------------------------------
# Zip archives, and what every archive shares


def name_problem(name: str) -> Optional[str]:
    """Why an archive entry's name is unsafe to write under a folder, or None."""
    if "\x00" in name or "\\" in name:
        return "a backslash or NUL in its name"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        return "a path out of its folder"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' path component"
    return None


def zip_entries(archive: Any, path: Path) -> list[zipfile.ZipInfo]:
    """Every entry, refused as a whole when one is unsafe (a path out of the folder, a symlink, a
    device, encryption, a duplicate) or when the archive expands like a zip bomb."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _damaged(archive, path, exc) from None
    seen: set[str] = set()
    for info in infos:
        problem = name_problem(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode) if info.create_system == 3 else 0
        if problem is None and kind == stat.S_IFLNK:
            problem = "a symbolic link"
        elif problem is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            problem = "a device or other special file"
        elif problem is None and info.flag_bits & 0x1:
            problem = "encryption"
        elif problem is None and info.filename.rstrip("/") in seen:
            problem = "a second entry of the same name"
        elif (problem is None and info.file_size > (1 << 20)
              and info.file_size > MAX_ENTRY_RATIO * max(info.compress_size, 1)):
            problem = f"a {info.file_size / max(info.compress_size, 1):.0f}-fold expansion (a zip bomb?)"
        if problem:
            raise _unsafe(archive, path, info.filename, problem)
        seen.add(info.filename.rstrip("/"))
    total = sum(info.file_size for info in infos)
    if total > MAX_TOTAL_RATIO * max(path.stat().st_size, 1):
        raise _unsafe(archive, path, "(all)", f"{total:,} bytes unpacked from {path.stat().st_size:,} (a zip "
                                              f"bomb?)")
    return infos


def _damaged(archive: Any, path: Path, exc: BaseException) -> DownloadError:
    discard(path)
    return DownloadError(f"{archive.file} is damaged ({str(exc) or type(exc).__name__}); deleted it and unpacked "
                         f"nothing: rerun to download it again")


def _unsafe(archive: Any, path: Path, name: str, problem: str) -> DownloadError:
    discard(path)
    return DownloadError(f"{archive.file} holds an unsafe entry {name!r} ({problem}); refused: nothing was "
                         f"unpacked and the download was deleted (use another --url, or unpack it by hand)")


def extract_zip(archive: Any, path: Path, infos: list[zipfile.ZipInfo], scratch: Path, emit: Emit) -> None:
    """Write each entry under ``scratch`` ourselves: new files only (``O_EXCL``), never through a
    link; zipfile checks each CRC as the entry's last byte is read."""
    total = sum(info.file_size for info in infos)
    emit("unpack", {"file": archive.file, "entries": len(infos), "total": total})
    done = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in infos:
                target = scratch.joinpath(*info.filename.rstrip("/").split("/"))
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with os.fdopen(os.open(target, flags, 0o644), "wb") as out, zf.open(info) as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        emit("bytes", {"done": done, "total": total})
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _damaged(archive, path, exc) from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        name = os.path.relpath(exc.filename, scratch) if exc.filename else "?"
        raise _unsafe(archive, path, name, "a file and a folder of the same name") from None
    except OSError as exc:
        raise disk_error(exc, scratch, f"unpacking {archive.file}",
                          f"removed what was unpacked; {archive.file} stays in {path.parent}") from None


def content_root(scratch: Path, archive: Any, spec: Any) -> Path:
    """The folder inside ``scratch`` that holds ``archive.holds`` (matched ignoring case), at
    most two folders deep; exactly one must."""
    level, found = [scratch], []
    for _ in range(3):
        found = [folder for folder in level if _holds(folder, archive.holds)]
        if found:
            break
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and not child.is_symlink()]
    if len(found) != 1:
        where = "in more than one folder" if found else "anywhere"
        raise DownloadError(f"{archive.file} does not hold {archive.holds} where a {spec.title} archive does "
                            f"(found {where}); is it the right file?")
    return found[0]


def _holds(folder: Path, relative: str) -> bool:
    current = folder
    for part in relative.split("/"):
        try:
            names = os.listdir(current)
        except OSError:
            return False
        match = part if part in names else next((n for n in sorted(names) if n.lower() == part.lower()), None)
        if match is None:
            return False
        current = current / match
    return True


def merge(content: Path, staging: Path, archive: Any) -> None:
    for child in sorted(content.iterdir()):
        if child.name == "__MACOSX":  # resource forks a Mac adds to zips it makes: not data
            continue
        target = staging / child.name
        if os.path.lexists(target):
            raise DownloadError(f"{archive.file} and another archive of the dataset both hold {child.name}")
        os.rename(child, target)


def into_place(staging: Path, dest: Path) -> None:
    try:
        if dest.is_dir() and not dest.is_symlink():
            dest.rmdir()  # only an empty folder (a full one was refused before anything was fetched)
        os.rename(staging, dest)
    except OSError as exc:
        raise DownloadError(f"cannot move the unpacked dataset to {dest} ({exc.strerror}); left {dest} as it "
                            f"is: move it aside and rerun") from None


# --------------------------------------------------------------------------------------------
# RAR, through a system tool


def rar_tool() -> Optional[str]:
    """The first RAR extractor on PATH, or None."""
    for name in RAR_TOOLS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="surrogateescape")
    except OSError as exc:
        raise DownloadError(f"cannot run {command[0]}: {exc.strerror}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def tool_listing(tool: str, path: Path) -> list[tuple[str, str]]:
    """The archive's entries as (name, kind), kind being "file", "dir", "link" or "other"
    ("file" where the tool's listing does not say), read with the tool's own listing."""
    name = Path(tool).name
    if name == "bsdtar":
        names = _run([tool, "-tf", str(path)])
        verbose = _run([tool, "-tvf", str(path)])
        if names.returncode or verbose.returncode:
            raise DownloadError(f"{name} cannot read {path.name}: {_last_line(names.stderr or verbose.stderr)}")
        entries = names.stdout.splitlines()
        kinds = [line[:1] for line in verbose.stdout.splitlines()]
        if len(kinds) != len(entries):
            kinds = ["-"] * len(entries)
        table = {"-": "file", "d": "dir", "l": "link", "h": "link"}
        return [(entry, table.get(kind, "other")) for entry, kind in zip(entries, kinds)]
    if name == "unrar":
        done = _run([tool, "lt", "-idc", str(path)])
        if done.returncode:
            raise DownloadError(f"unrar cannot read {path.name}: {_last_line(done.stderr or done.stdout)}")
        result: list[tuple[str, str]] = []
        for line in done.stdout.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "Name":
                result.append((value, "file"))
            elif key == "Type" and result:
                kind = value.strip().lower()
                result[-1] = (result[-1][0], "dir" if kind == "directory" else "file" if kind == "file"
                              else "link" if "link" in kind else "other")
        return result
    done = _run([tool, "l", "-slt", str(path)])  # 7z, 7zz
    if done.returncode:
        raise DownloadError(f"{name} cannot read {path.name}: {_last_line(done.stderr or done.stdout)}")
    blocks = done.stdout.split("\n----------\n", 1)[-1].split("\n\n")
    result = []
    for block in blocks:
        fields = dict(line.partition(" = ")[::2] for line in block.splitlines() if " = " in line)
        if "Path" not in fields:
            continue
        attributes = fields.get("Attributes", "")
        if fields.get("Folder") == "+" or attributes.startswith("D"):
            kind = "dir"
        elif fields.get("Symbolic Link") or fields.get("Hard Link") or re.search(r"\bl[rwx-]{9}\b", attributes):
            kind = "link"
        elif re.search(r"\b[cbps][rwx-]{9}\b", attributes):
            kind = "other"
        else:
            kind = "file"
        result.append((fields["Path"], kind))
    return result


def tree_problem(folder: Path) -> Optional[str]:
    """The first entry under ``folder`` that is not a plain file or folder (a symlink, a hard
    link, a device), as "path: what", or None."""
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            entry = Path(current) / name
            info = os.lstat(entry)
            relative = entry.relative_to(folder).as_posix()
            if stat.S_ISLNK(info.st_mode):
                return f"{relative}: a symbolic link"
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                return f"{relative}: a device or other special file"
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                return f"{relative}: a hard link"
    return None


def extract_with_tool(tool: str, archive: Any, path: Path, scratch: Path, emit: Emit) -> None:
    """List with the tool and refuse unsafe names and links first; extract into ``scratch``; then
    refuse the result if it holds anything but plain files and folders, or expands like a bomb."""
    name = Path(tool).name
    listing = tool_listing(tool, path)
    for entry, kind in listing:
        problem = name_problem(entry) or {"link": "a link", "other": "a device or other special file"}.get(kind)
        if problem:
            raise _unsafe(archive, path, entry, problem)
    emit("unpack", {"file": archive.file, "entries": len(listing), "total": None, "tool": name})
    if name == "bsdtar":
        command = [tool, "-x", "-f", str(path), "-C", str(scratch), "--no-same-owner"]
    elif name == "unrar":
        command = [tool, "x", "-y", "-o-", "-idq", str(path), str(scratch) + os.sep]
    else:
        command = [tool, "x", "-y", "-bd", f"-o{scratch}", str(path)]
    done = _run(command)
    if done.returncode:
        raise DownloadError(
            f"{name} could not unpack {archive.file} ({_last_line(done.stderr or done.stdout)}); removed what was "
            f"unpacked. If the disk is full, free space and rerun; if the archive is damaged, delete {path} and rerun"
        )
    problem = tree_problem(scratch)
    if problem:
        raise _unsafe(archive, path, problem.split(": ")[0], problem.split(": ", 1)[1])
    unpacked = sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file())
    if unpacked > MAX_TOTAL_RATIO * max(path.stat().st_size, 1):
        raise _unsafe(archive, path, "(all)", f"{unpacked:,} bytes unpacked (a bomb?)")
