"""`loda data download`: fetch a dataset that has a public direct download, verify it, unpack it
safely and put it where `loda train` looks for it.

The order of this file: the table of official archives, where things go (the destination, its
``.part`` folder, mirrors), fetching (HTTP with resume, or a copy of a local file), verifying (the
size, the sha256 where one is recorded), and unpacking into a scratch folder that becomes the
dataset by one rename (the safe unpacking of each archive is ``loda_cli.unpack``).

The library never prints. It reports through ``emit(kind, data)`` and raises
:class:`~loda_cli.errors.DownloadError` with a one-line message. It writes and deletes only inside
``<dest>.part/``, a folder it made and marked as its own; the dataset folder appears by a rename,
so it is either absent or complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import quote, urlparse
from urllib.request import url2pathname

from loda_cli.atomic import replacing
from loda_cli.datasets.archives import ARCHIVES, NO_DIRECT_DOWNLOAD, Archive, downloadable  # noqa: F401
from loda_cli.errors import DownloadError, UsageError
from loda_cli.unpack import (CHUNK, RAR_TOOLS, content_root, discard, disk_error, extract_with_tool,
                             extract_zip, into_place, merge, rar_tool, zip_entries)

Emit = Callable[[str, dict], None]
"""Called as ``emit(kind, data)``: "download", "bytes", "retry", "notice", "verify", "unpack"."""

PART_SUFFIX = ".part"
PART_MARK = ".loda-part"  # in a .part folder: loda made it, so loda may delete in it
MARKER = ".loda-download.json"  # in a dataset folder: loda unpacked it (and whether it was checked)
# Without an exact figure (RAR, or before a zip's own directory can be read), unpacking is taken
# to need the archive's size plus a tenth.
UNPACK_FACTOR = 1.1
SPACE_MARGIN = 64 << 20


# --------------------------------------------------------------------------------------------
# The official archives


# The table itself is data in loda_cli.datasets.archives, which the dataset layer's own
# "not found" message reads without importing this module.


# --------------------------------------------------------------------------------------------
# Where things go


def default_dest(spec: Any) -> Path:
    """``$LODA_DATA/<name>``, else ``~/datasets/<name>``: where ``loda train`` looks."""
    base = os.environ.get("LODA_DATA")
    return (Path(base) if base else Path.home() / "datasets").expanduser() / spec.name


def part_dir(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


def mirror_variables(spec: Any) -> list[str]:
    return [f"LODA_DATA_URL_{re.sub(r'[^A-Z0-9]', '_', name.upper())}" for name in (spec.name, *spec.aliases)]


def archive_urls(spec: Any, archives: Sequence[Archive], url: Optional[str] = None) -> list[tuple[Archive, str]]:
    """Each archive with the URL it is fetched from: ``url`` (``--url``), else the first
    ``$LODA_DATA_URL_<NAME>`` set, else the official one.

    A mirror is the archive's own URL (one-archive datasets), or a folder (``.../``, or any URL
    for datasets of several archives) to which the archive's file name is added. A local path or
    ``file://`` URL (a copy on a NAS) works the same way.
    """
    override = url or next((os.environ[v] for v in mirror_variables(spec) if os.environ.get(v)), None)
    if not override:
        return [(a, a.url) for a in archives]
    scheme = urlparse(override).scheme.lower()
    if scheme in ("http", "https"):
        if len(archives) == 1 and not override.endswith("/"):
            return [(archives[0], override)]
        base = override if override.endswith("/") else override + "/"
        return [(a, base + quote(a.file)) for a in archives]
    if scheme == "file" or len(scheme) <= 1:  # a path (or a Windows drive letter)
        path = Path(url2pathname(urlparse(override).path) if scheme == "file" else override).expanduser()
        if len(archives) == 1 and not path.is_dir():
            return [(archives[0], path.absolute().as_uri())]
        return [(a, (path / a.file).absolute().as_uri()) for a in archives]
    raise UsageError(f"--url {override!r}: give an http(s) URL, a file:// URL or a local path")


@dataclass
class Plan:
    """What ``loda data download`` will do. ``state``: "missing" (fetch and unpack), "unchecked"
    (loda unpacked it; the check is still to pass), "done" (unpacked and checked: nothing to do)
    or "present" (a complete copy loda did not make: left alone)."""

    spec: Any
    dest: Path
    archives: list[tuple[Archive, str]]
    state: str

    @property
    def part(self) -> Path:
        return part_dir(self.dest)

    @property
    def size(self) -> Optional[int]:
        sizes = [a.size for a, _ in self.archives]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]

    def describe(self) -> str:
        """``3.1 GB from datasets.vqa.mmsp-kn.de``, for messages and the prompt."""
        size = human_size(self.size) if self.size is not None else "archives of unrecorded size"
        return f"{size} from {', '.join(self.sources())}"

    def sources(self) -> list[str]:
        """The hosts (or local folders) the archives come from, for messages."""
        found = []
        for _, url in self.archives:
            parsed = urlparse(url)
            where = parsed.hostname if parsed.scheme != "file" else str(Path(url2pathname(parsed.path)).parent)
            if where not in found:
                found.append(where or url)
        return found

    def by_hand(self) -> str:
        """How to place the dataset without loda's download."""
        return (f"place it by hand: download {' and '.join(url for _, url in self.archives)}, unpack it so "
                f"that {self.dest} holds {self.spec.layout}, then run loda data check {self.spec.name}")


def plan(spec: Any, dest: Optional[Path] = None, url: Optional[str] = None) -> Plan:
    """Where ``spec`` goes, from where, and what is already there. Refuses datasets without a
    direct download (saying where to get them) and a destination that holds something else."""
    archives = ARCHIVES.get(spec.name)
    dest = Path(dest).expanduser() if dest is not None else default_dest(spec)
    if archives is None:
        if spec.name in ("csv", "synthetic"):
            what = "your own labels" if spec.name == "csv" else "generated by loda on first use"
            raise UsageError(f"the {spec.name} dataset is {what}: there is nothing to download")
        how = NO_DIRECT_DOWNLOAD.get(spec.name, "its publisher")
        raise DownloadError(
            f"{spec.title} has no public direct download; it is published through {how} at "
            f"{spec.homepage}: get it there, unpack it so that {dest} holds {spec.layout}, then run "
            f"loda data check {spec.name}"
        )
    return Plan(spec, dest, archive_urls(spec, archives, url), _state(spec, dest))


def _state(spec: Any, dest: Path) -> str:
    if not os.path.lexists(dest) or (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
        return "missing"  # an empty folder is taken over
    marker = read_marker(dest)
    if marker is not None:
        return "done" if marker.get("checked") else "unchecked"
    from loda_cli import datasets
    from loda_cli.errors import DatasetError

    try:
        datasets.read_labels(spec, dest)
    except DatasetError as exc:
        raise DownloadError(
            f"{dest} exists but is not a complete {spec.title} ({exc}); loda unpacks only into a new "
            f"folder: move it aside, or give another --data"
        ) from None
    return "present"


def read_marker(dest: Path) -> Optional[dict]:
    try:
        doc = json.loads((Path(dest) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def mark_checked(dest: Path) -> None:
    """Record in the dataset's marker that ``loda data check`` passed: a rerun then does nothing."""
    doc = read_marker(dest) or {}
    doc.update(checked=True, checked_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_json(Path(dest) / MARKER, doc)


def _write_json(path: Path, doc: dict) -> None:
    with replacing(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, indent=1) + "\n")


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def human_size(n: Optional[float]) -> str:
    if n is None:
        return "an unknown size"
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# The whole download


def fetch(plan: Plan, emit: Optional[Emit] = None, retries: int = 3, timeout: float = 60.0) -> None:
    """Download, verify and unpack ``plan``'s archives into ``plan.dest``; resumes what an
    earlier run left in ``<dest>.part/``. Does nothing unless ``plan.state`` is "missing"."""
    emit = emit or (lambda kind, data: None)
    if plan.state != "missing":
        return
    tool = None
    if any(a.kind == "rar" for a, _ in plan.archives):
        tool = rar_tool()
        if tool is None:
            raise DownloadError(
                f"{plan.spec.title} comes as a RAR archive and no RAR extractor is on PATH ("
                f"{', '.join(RAR_TOOLS)}; on Debian or Ubuntu: apt install 7zip or libarchive-tools); "
                f"or {plan.by_hand()}"
            )
    part = _open_part(plan.part)
    with _locked(part):
        try:
            paths = []
            for index, (archive, url) in enumerate(plan.archives):
                path = part / archive.file
                _download(plan, index, path, emit, retries, timeout)
                _verify(archive, path, emit)
                paths.append(path)
            _unpack_all(plan, paths, tool, emit)
        except BaseException:
            _tidy_part(part)
            raise
        # Only loda's own marked folder (_open_part refuses any other): the verified archives,
        # now unpacked into dest, and the lock.
        shutil.rmtree(part)


def _tidy_part(part: Path) -> None:
    """Remove the .part folder again when a failure left nothing worth resuming in it."""
    with contextlib.suppress(OSError):
        if {entry.name for entry in part.iterdir()} <= {PART_MARK, ".lock"}:
            shutil.rmtree(part)


def _open_part(part: Path) -> Path:
    """The ``.part`` folder, made and marked by loda; refuses a folder of that name loda did not make."""
    if os.path.lexists(part):
        if part.is_symlink() or not (part / PART_MARK).is_file():
            raise DownloadError(f"{part} exists and was not made by loda; move it aside and rerun")
        return part
    try:
        part.mkdir(parents=True)
        (part / PART_MARK).write_text("made by loda data download: downloads in progress; safe to delete\n")
    except OSError as exc:
        raise DownloadError(f"cannot create {part}: {exc.strerror}") from None
    return part


@contextlib.contextmanager
def _locked(part: Path) -> Iterator[None]:
    """One download per destination at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(part / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(f"another loda is downloading into {part}; wait for it to finish") from None
        yield


def _check_space(folder: Path, need: float, what: str) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need + SPACE_MARGIN > free:
        raise DownloadError(
            f"not enough free space in {folder}: {what} needs about {human_size(need)} and "
            f"{human_size(free)} is free; free some space, or give --data a folder on another disk"
        )


# --------------------------------------------------------------------------------------------
# Fetching, with resume


class _Dropped(Exception):
    """The transfer stopped part way; what arrived is kept and a retry resumes after it."""


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _download(plan: Plan, index: int, path: Path, emit: Emit, retries: int, timeout: float) -> None:
    archive = plan.archives[index][0]
    attempt = 0
    while True:
        try:
            _download_once(plan, index, path, emit, timeout)
            return
        except _Dropped as exc:
            if attempt >= retries:
                raise DownloadError(f"{exc}; what arrived is kept in {path.parent}: rerun the same command to "
                                    f"resume") from None
            attempt += 1
            wait = min(2 ** attempt, 30)
            emit("retry", {"file": archive.file, "attempt": attempt, "retries": retries, "wait": wait,
                           "reason": str(exc)})
            _sleep(wait)


@dataclass
class _Response:
    """An open transfer: ``start`` is the byte its body begins at, ``total`` the whole file's size."""

    stream: Any
    start: int
    total: Optional[int]
    validator: Optional[str]
    source: str  # the host, or the local file, for messages


def _download_once(plan: Plan, index: int, path: Path, emit: Emit, timeout: float) -> None:
    archive, url = plan.archives[index]
    meta_path = path.with_name(path.name + ".json")
    for _ in range(2):  # a second pass only after the server refused a resume and the part was reset
        offset = path.stat().st_size if path.exists() else 0
        if archive.size is not None and offset > archive.size:
            path.unlink()  # longer than the real archive: not a prefix of it
            offset = 0
        if archive.size is not None and offset == archive.size:
            return
        meta = _read_json(meta_path)
        validator = meta.get("validator") if meta.get("url") == url else None
        response = _open(url, offset, validator, timeout, plan)
        if response.stream is None:  # 416: nothing left after offset
            if response.total == offset:
                return
            path.unlink()
            continue
        break
    else:  # pragma: no cover - the server refused twice
        raise DownloadError(f"{url}: the server refuses to send {archive.file}")
    with contextlib.closing(response.stream):
        total = response.total
        if archive.size is not None and total is not None and total != archive.size:
            raise DownloadError(
                f"{url} is {total:,} bytes, but {archive.file} is {archive.size:,} bytes: not the expected "
                f"file, refused"
            )
        if response.start == 0 and offset:
            emit("notice", {"message": f"{response.source} sent {archive.file} from its start (it changed, or "
                                       f"it does not resume); starting over"})
        _check_space(path.parent, _space_needed(plan, index, total, response.start),
                     f"downloading and unpacking {plan.spec.title}")
        _write_json(meta_path, {"url": url, "validator": response.validator, "total": total})
        emit("download", {"file": archive.file, "url": url, "start": response.start, "total": total})
        _receive(response, path, archive, emit)


def _space_needed(plan: Plan, index: int, total: Optional[int], start: int) -> float:
    """Bytes still to arrive (this archive from ``start``, the later ones as recorded) plus the
    unpacked size of them all, as far as their sizes are known."""
    sizes: list[Optional[int]] = []
    for i, (archive, _) in enumerate(plan.archives):
        on_disk = plan.part / archive.file
        sizes.append(total if i == index else on_disk.stat().st_size if i < index and on_disk.exists()
                     else archive.size)
    to_come = (total or start) - start + sum(size or 0 for size in sizes[index + 1 :])
    return to_come + UNPACK_FACTOR * sum(size or 0 for size in sizes)


def _receive(response: _Response, path: Path, archive: Archive, emit: Emit) -> None:
    done, total, limit = response.start, response.total, archive.size
    try:
        out = open(path, "ab" if response.start else "wb", buffering=0)
    except OSError as exc:
        raise disk_error(exc, path.parent, f"downloading {archive.file}", "nothing was written") from None
    with out:
        while True:
            try:
                chunk = response.stream.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise _Dropped(f"the transfer from {response.source} stopped after {done:,} of "
                               f"{_of(total)} bytes ({_reason(exc)})") from None
            if not chunk:
                break
            if limit is not None and done + len(chunk) > limit:
                raise DownloadError(f"{response.source} sends more than the {limit:,} bytes {archive.file} has: "
                                    f"not the expected file, refused")
            view = memoryview(chunk)
            try:
                while view:
                    view = view[out.write(view) :]
            except OSError as exc:
                raise disk_error(exc, path.parent, f"downloading {archive.file}",
                                  f"the {done:,} bytes before are kept and resume") from None
            done += len(chunk)
            emit("bytes", {"done": done, "total": total})
    if total is not None and done < total:
        raise _Dropped(f"the transfer from {response.source} stopped after {done:,} of {total:,} bytes")


def _of(total: Optional[int]) -> str:
    return f"{total:,}" if total is not None else "?"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return str(text)


def _open(url: str, offset: int, validator: Optional[str], timeout: float, plan: Plan) -> _Response:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return _open_file(Path(url2pathname(parsed.path)), offset)
    from loda_cli import __version__

    host = parsed.hostname or url
    headers = {"User-Agent": f"loda/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416 and offset:
                return _Response(None, offset, _range_total(exc.headers.get("Content-Range")), validator, host)
            raise DownloadError(f"{url}: the server answered HTTP {exc.code} {exc.reason}; {plan.by_hand()}, "
                                f"or give a mirror with --url") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(f"cannot reach {host} ({_reason(exc)}); {plan.by_hand()}, or give a mirror with "
                            f"--url") from None
    fresh = response.headers.get("ETag") or response.headers.get("Last-Modified")
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != offset:
            response.close()
            raise DownloadError(f"{url}: asked to resume at byte {offset:,}, the server sent from {start}")
        return _Response(response, start, total, fresh, host)
    if response.status == 200:
        length = response.headers.get("Content-Length")
        return _Response(response, 0, int(length) if length and length.isdigit() else None, fresh, host)
    response.close()
    raise DownloadError(f"{url}: unexpected HTTP {response.status}")


def _open_file(path: Path, offset: int) -> _Response:
    try:
        handle = open(path, "rb")
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise DownloadError(f"cannot read the mirror file {path}: {exc.strerror}") from None
    if offset > size:
        handle.close()
        return _Response(None, offset, size, None, str(path))
    handle.seek(offset)
    stamp = os.fstat(handle.fileno())
    return _Response(handle, offset, size, f"{stamp.st_size}-{stamp.st_mtime_ns}", str(path))


def _content_range(header: Optional[str]) -> tuple[int, Optional[int]]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    if not match:
        raise DownloadError(f"the server answered a resume with a bad Content-Range {header!r}")
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _range_total(header: Optional[str]) -> Optional[int]:
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", header or "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# Verifying


def _verify(archive: Archive, path: Path, emit: Emit) -> None:
    """The recorded size and sha256. A mismatch deletes the download (it is useless) and says so."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        discard(path)
        raise DownloadError(f"{archive.file} is {size:,} bytes, not {archive.size:,}; deleted it: rerun to "
                            f"download it again")
    if not archive.sha256:
        return
    meta_path = path.with_name(path.name + ".json")
    meta = _read_json(meta_path)
    stamp = [size, path.stat().st_mtime_ns]
    if meta.get("verified") == stamp:
        return
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            emit("verify", {"file": archive.file, "done": done, "total": size})
    if digest.hexdigest() != archive.sha256.lower():
        discard(path)
        raise DownloadError(
            f"{archive.file} is damaged: its sha256 is {digest.hexdigest()[:16]}..., expected "
            f"{archive.sha256[:16]}...; deleted it and unpacked nothing: rerun to download it again"
        )
    _write_json(meta_path, {**meta, "verified": stamp})


# --------------------------------------------------------------------------------------------
# Unpacking


def _unpack_all(plan: Plan, paths: list[Path], tool: Optional[str], emit: Emit) -> None:
    """Every archive into ``.part/staging`` (through ``.part/unpack``), then one rename to ``dest``.
    On any failure both scratch folders go, so no half-unpacked dataset is ever left."""
    part = plan.part
    staging, scratch = part / "staging", part / "unpack"
    for folder in (staging, scratch):
        if os.path.lexists(folder):
            shutil.rmtree(folder)  # left by an interrupted run
    try:
        entries = {}
        need = 0.0
        for (archive, _), path in zip(plan.archives, paths):
            if archive.kind == "zip":
                entries[path] = zip_entries(archive, path)
                need += sum(info.file_size for info in entries[path])
            else:
                need += UNPACK_FACTOR * path.stat().st_size
        _check_space(part, need, f"unpacking {plan.spec.title}")
        staging.mkdir()
        for (archive, _), path in zip(plan.archives, paths):
            scratch.mkdir()
            if archive.kind == "zip":
                extract_zip(archive, path, entries[path], scratch, emit)
            else:
                extract_with_tool(tool or "", archive, path, scratch, emit)
            merge(content_root(scratch, archive, plan.spec), staging, archive)
            shutil.rmtree(scratch)
        _write_json(staging / MARKER, {
            "dataset": plan.spec.name, "unpacked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checked": False,
            "archives": [{"file": a.file, "url": url, "size": p.stat().st_size, "sha256": a.sha256}
                         for (a, url), p in zip(plan.archives, paths)],
        })
        into_place(staging, plan.dest)
    except BaseException:
        for folder in (scratch, staging):
            shutil.rmtree(folder, ignore_errors=True)
        raise
