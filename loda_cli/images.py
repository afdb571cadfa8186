"""Finding image files and decoding them robustly.

Two halves, both used by scoring, training and organising:

* ``iter_image_files`` streams the image files under one or more paths in a deterministic order.
  Hidden and junk folders are skipped; symlink loops, broken links and unreadable folders are
  reported through ``on_skip`` and never raise.
* ``decode_image`` turns one file into an RGB Pillow image close to the size the model needs. Every
  failure (missing, empty, truncated, corrupt, not an image, too large, unsupported) becomes an
  ``ImageError`` with a short reason, so a scorer can turn it into an error row.

This module must stay importable without torch: DataLoader workers and ``loda --help`` import it.
Decoding uses ``warnings.catch_warnings``, which is process-global, so decode in worker processes
(as the DataLoader does) rather than in several threads of one process.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import math
import os
import re
import stat
import struct
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loda_cli.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_EXTENSIONS",
    "RAW_EXTENSIONS",
    "DecodedImage",
    "FoundFile",
    "SkipNotice",
    "decode_image",
    "image_size",
    "is_image_path",
    "iter_image_files",
    "resize_short_side",
]

# Camera RAW files LibRaw (rawpy) opens: Canon, Nikon, Sony, Fujifilm, Olympus/OM, Panasonic,
# Pentax, Samsung, Leica, Hasselblad, Phase One, Sigma, Minolta, Kodak, Epson, and DNG.
RAW_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".raf", ".orf",
        ".rw2", ".rwl", ".pef", ".srw", ".3fr", ".fff", ".iiq", ".x3f", ".mrw", ".kdc", ".dcr",
        ".erf", ".mos", ".mef",
    }
)
# HEIF as cameras write it: Canon's EOS R5/R6/R3/R7 family saves HEIF as .HIF; Sony's as .HIF too.
HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif", ".hif"})
IMAGE_EXTENSIONS: frozenset[str] = (
    frozenset(
        {
            ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif",
            ".avif",
        }
    )
    | HEIF_EXTENSIONS
    | RAW_EXTENSIONS
)
# Extensions of image formats loda does not decode; files with them are skipped, and counted in
# the summary so a folder of JPEG XL or Photoshop files is not passed over in silence.
UNREAD_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jxl", ".psd", ".psb", ".exr", ".hdr", ".jp2", ".j2k", ".jpf", ".jpx", ".svg", ".xcf",
        ".ico", ".icns", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".qoi", ".dds", ".raw", ".bay",
        ".cap", ".gpr", ".ari", ".heics", ".avifs", ".jxr", ".wdp", ".hdp", ".kra", ".afphoto",
    }
)


def unread_image_extension(name: str) -> str | None:
    """The lower-case extension of a file that looks like an image loda does not read, else None."""
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in UNREAD_IMAGE_EXTENSIONS else None

UNKNOWN_EXTENSION_REASON = "an image format loda does not read:"
#: The skip reason of a symlinked photo whose target was scanned under its real path.
LINKED_DUPLICATE_REASON = "a link to a file already scanned"

# Folders that photo tools, NAS boxes and operating systems leave inside photo collections. Names
# starting with "." (.thumbnails, .Trash-1000, ._x.jpg AppleDouble files) are skipped separately.
JUNK_FOLDER_NAMES: frozenset[str] = frozenset(
    {
        "@eaDir",  # Synology thumbnails
        "@__thumb",  # QNAP thumbnails
        "#recycle",  # Synology recycle bin
        "#snapshot",
        "$RECYCLE.BIN",
        "System Volume Information",
        "__MACOSX",  # AppleDouble files extracted from zips
        "lost+found",
    }
)


# --------------------------------------------------------------------------------------------
# Finding files


@dataclass(frozen=True)
class FoundFile:
    """An image file found under ``root``.

    ``path`` is ``root`` joined with the part below it, as ``find`` would write it; symlinks are
    not resolved, so moving ``path`` moves what the user sees. For a file given directly,
    ``root`` is its parent folder.
    """

    path: Path
    root: Path


@dataclass(frozen=True)
class SkipNotice:
    """Something that was not walked or not yielded, with a short reason for the user."""

    path: Path
    reason: str


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True when the file name has an image extension (case-insensitive); the file is not read."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _is_skipped_name(name: str) -> bool:
    # A file called "@eaDir" is no image either, so the junk names need no type check.
    return name.startswith(".") or name in JUNK_FOLDER_NAMES


class _Globs:
    """fnmatch patterns compiled once; a name matches when the relative path or basename does.

    Matching ignores case, so ``*.jpg`` also takes the ``IMG_0001.JPG`` every camera writes.
    """

    def __init__(self, patterns: str | Iterable[str]):
        if isinstance(patterns, str):
            patterns = [patterns]
        cleaned = [p.replace(os.sep, "/").removeprefix("./") for p in patterns if p]
        self._regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in cleaned), re.IGNORECASE)
            if cleaned
            else None
        )

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, relative: str, name: str) -> bool:
        if self._regex is None:
            return False
        return bool(self._regex.match(relative) or self._regex.match(name))


def _reason(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file or directory"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == errno.ELOOP:
        return "symlink loop"
    return (error.strerror or type(error).__name__).lower()


# The file `loda review` leaves in its previews folder (``<page>_files/``). A folder that holds it
# is not walked unless it is named itself: its JPEGs are previews, not photos.
REVIEW_MARKER = ".loda-review"


def iter_image_files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    recursive: bool = True,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    on_skip: Callable[[SkipNotice], None] | None = None,
) -> Iterator[FoundFile]:
    """Yield the image files under ``paths`` (files or folders), one at a time.

    Order is deterministic: the paths in the order given; inside a folder, its files sorted by
    name, then its subfolders sorted by name, depth first. Folders reached through a symlink are
    walked after the real trees of every argument, and symlinked files (found in folders or given)
    last, so a file reachable both ways is reported once, under its real path (hard links, two real
    names, stay two files). ``include``/``exclude`` are fnmatch globs tried against the path relative
    to the root and against the basename (case-insensitive); a folder matching ``exclude`` is not
    entered. Hidden names and junk folders (``@eaDir`` ...) are skipped silently, and so are
    non-image files inside folders. Missing arguments, broken links, symlink loops and unreadable
    folders are passed to ``on_skip`` and never raise.
    """
    included = _Globs(include)
    excluded = _Globs(exclude)

    def report(path: Path, reason: str) -> None:
        if on_skip is not None:
            on_skip(SkipNotice(path, reason))

    def wanted(relative: str, name: str) -> bool:
        if included and not included.matches(relative, name):
            return False
        return not excluded.matches(relative, name)

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    state = _WalkState()
    for argument in paths:
        path = Path(argument)
        try:
            info = os.stat(path)
        except OSError as error:
            broken = isinstance(error, FileNotFoundError) and os.path.islink(path)
            report(path, "broken symlink" if broken else _reason(error))
            continue
        if stat.S_ISDIR(info.st_mode):
            root_id = (info.st_dev, info.st_ino)
            if root_id in state.visited:
                report(path, "already scanned")
                continue
            state.visited.add(root_id)
            yield from _walk(_PendingFolder(path, path, "", ()), (root_id,), recursive, wanted, excluded, report, state)
        elif not stat.S_ISREG(info.st_mode):
            report(path, "not a regular file")
        elif not is_image_path(path):
            report(path, "not an image file")
        elif wanted(path.name, path.name):
            found = FoundFile(path, path.parent)
            if os.path.islink(path):
                state.links.append(found)
            else:
                state.add_real(path)
                yield found
    # Then the folders reached through a link (and the links found in them, in turn), and last the
    # linked files, each only where its target was not walked under a real path.
    while state.linked:
        folder = state.linked.popleft()
        try:
            info = os.stat(folder.path)
        except OSError as error:
            report(folder.path, _reason(error))
            continue
        folder_id = (info.st_dev, info.st_ino)
        if folder_id in folder.ancestors:
            report(folder.path, "symlink loop")
            continue
        if folder_id in state.visited:
            report(folder.path, "already scanned")
            continue
        state.visited.add(folder_id)
        yield from _walk(folder, (*folder.ancestors, folder_id), recursive, wanted, excluded, report, state)
    yield from state.take_links(report)


@dataclass
class _PendingFolder:
    path: Path
    root: Path  # the argument it was found under
    relative: str  # posix path below the root, "" for the root
    ancestors: tuple[tuple[int, int], ...]  # folder ids from the root down to this folder's parent


class _WalkState:
    """What one :func:`iter_image_files` call has seen: the folders walked (by device and inode),
    the real files yielded, and what waits until the real trees of every argument are done: the
    folders reached through a symlink and the symlinked image files. So a photo also reached
    under a real path is yielded once, under that path.

    Real files are only listed while walking; they are stat-ed (once each) only when there are
    symlinked files to compare with them, so a tree without file links costs nothing more. (A
    directory entry's inode is not used: on overlay and FUSE file systems it can differ from the
    file's st_ino.)"""

    def __init__(self) -> None:
        self.visited: set[tuple[int, int]] = set()
        self.linked: deque[_PendingFolder] = deque()
        self.links: list[FoundFile] = []
        self._real: list[str] = []  # str, not Path: a 50,000-file walk keeps them all

    def add_real(self, path: Path) -> None:
        self._real.append(os.fspath(path))

    def take_links(self, report: Callable[[Path, str], None]) -> Iterator[FoundFile]:
        if not self.links:
            return
        seen: set[tuple[int, int]] = set()
        for path in self._real:
            try:
                info = os.stat(path)
            except OSError:
                continue
            seen.add((info.st_dev, info.st_ino))
        for found in self.links:
            try:
                info = os.stat(found.path)
            except OSError as error:
                broken = isinstance(error, FileNotFoundError)
                report(found.path, "broken symlink" if broken else _reason(error))
                continue
            file_id = (info.st_dev, info.st_ino)
            if file_id in seen:
                report(found.path, LINKED_DUPLICATE_REASON)
                continue
            seen.add(file_id)
            yield found


def _walk(
    top: _PendingFolder,
    top_chain: tuple[tuple[int, int], ...],
    recursive: bool,
    wanted: Callable[[str, str], bool],
    excluded: _Globs,
    report: Callable[[Path, str], None],
    state: _WalkState,
) -> Iterator[FoundFile]:
    """The real tree below ``top`` (already marked visited), depth first; the symlinked folders
    and files found in it go to ``state`` for later."""
    stack: list[tuple[_PendingFolder, tuple[tuple[int, int], ...]]] = [(top, top_chain)]
    root = top.root
    while stack:
        folder, chain = stack.pop()
        try:
            with os.scandir(folder.path) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            report(folder.path, _reason(error))
            continue

        if folder.relative and any(entry.name == REVIEW_MARKER for entry in entries):
            report(folder.path, "loda review's previews")  # a page written inside the library
            continue
        real_subfolders: list[tuple[_PendingFolder, tuple[tuple[int, int], ...]]] = []
        for entry in entries:
            name = entry.name
            if _is_skipped_name(name):
                continue
            relative = f"{folder.relative}/{name}" if folder.relative else name
            entry_path = folder.path / name
            is_link = False
            try:
                is_link = entry.is_symlink()
                if is_link:
                    mode = entry.stat().st_mode  # follows the link
                    is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = not is_dir and entry.is_file(follow_symlinks=False)
            except OSError as error:
                broken = is_link and isinstance(error, FileNotFoundError)
                report(entry_path, "broken symlink" if broken else _reason(error))
                continue

            if is_file:
                if is_image_path(name):
                    if not wanted(relative, name):
                        continue
                    if is_link:
                        state.links.append(FoundFile(entry_path, root))
                        continue
                    state.add_real(entry_path)
                    yield FoundFile(entry_path, root)
                elif unread_image_extension(name) and wanted(relative, name):
                    report(entry_path, f"{UNKNOWN_EXTENSION_REASON} {unread_image_extension(name)}")
            elif is_dir and recursive and not excluded.matches(relative, name):
                pending = _PendingFolder(entry_path, root, relative, chain)
                if is_link:
                    state.linked.append(pending)
                else:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError as error:
                        report(entry_path, _reason(error))
                        continue
                    folder_id = (info.st_dev, info.st_ino)
                    if folder_id in state.visited:  # a bind mount or an earlier argument
                        report(entry_path, "already scanned")
                        continue
                    state.visited.add(folder_id)
                    real_subfolders.append((pending, (*chain, folder_id)))
        # Reversed so that popping the stack visits subfolders in name order.
        stack.extend(reversed(real_subfolders))


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass
class DecodedImage:
    """One decoded image, ready for ``resize_short_side``.

    ``image`` is RGB and already reduced (JPEG draft, integer box reduction) as long as its short
    side stays >= :data:`REDUCING_GAP` times the requested target; it is not resized to the
    target exactly. ``width`` and
    ``height`` are the original displayed size: after EXIF orientation, before any reduction.
    """

    image: PILImage.Image
    width: int
    height: int
    format: str
    warnings: list[str] = field(default_factory=list)
    #: The EXIF the decoder read anyway (for orientation): a Pillow ``Exif``, None when unreadable.
    exif: object = None


_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_IFD_TAG = 0x8769
_GREY_BACKGROUND = (128, 128, 128)
_RESAMPLING_NAMES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
_HEIF_SUFFIXES = HEIF_EXTENSIONS
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
)
_WARNING_LIMIT = 10
_heif_registered = False


def _register_heif_opener() -> bool:
    """Register pillow-heif with Pillow once, on first use; False when it is not installed."""
    global _heif_registered
    if not _heif_registered:
        try:
            import pillow_heif
        except ImportError:
            return False
        pillow_heif.register_heif_opener()
        _heif_registered = True
    return True


def _exif(im: PILImage.Image):
    """The image's EXIF (a Pillow ``Exif``), None when it cannot be read. Its Exif sub-IFD (capture
    time, serial number) is read now, while the file is open: a TIFF's is read from the file."""
    try:
        exif = im.getexif()
    except Exception:  # malformed EXIF must not cost the image: show it as stored
        warnings.warn("unreadable EXIF; orientation ignored", stacklevel=2)
        return None
    try:
        exif.get_ifd(_EXIF_IFD_TAG)
    except Exception:  # a broken sub-IFD leaves the rest of the EXIF usable
        pass
    return exif


def _orientation(im: PILImage.Image, exif=False) -> int:
    """The EXIF (or XMP) orientation, 1 when absent or unreadable. ``exif``: the image's EXIF
    when already read (None: unreadable)."""
    if exif is False:
        exif = _exif(im)
    try:
        value = exif.get(_EXIF_ORIENTATION_TAG, 1) if exif is not None else 1
    except Exception:
        return 1
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    # Orientations 5-8 store the picture turned by a quarter.
    return (size[1], size[0]) if orientation >= 5 else size


def _apply_orientation(im: PILImage.Image, orientation: int) -> PILImage.Image:
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return im if method is None else im.transpose(method)


def _open_header(fp: io.BufferedIOBase, max_pixels: int | None) -> PILImage.Image:
    """Identify the image and read its header; no pixel data is decoded.

    Pillow refuses images above twice its own ``MAX_IMAGE_PIXELS`` before we can see their size.
    Rather than change that process-wide setting, identify such a file again with Pillow's
    registered openers directly, which read the header only, and apply our own ``max_pixels``.
    """
    from PIL import Image

    try:
        im = Image.open(fp)
    except Image.DecompressionBombError:
        im = _open_without_pillow_limit(fp)
    if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
        raise ImageError(f"image too large: {im.size[0]}x{im.size[1]}")
    return im


def _open_without_pillow_limit(fp: io.BufferedIOBase) -> PILImage.Image:
    from PIL import Image

    Image.init()
    fp.seek(0)
    prefix = fp.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        if accept is not None and accept(prefix) is not True:
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, ValueError, OSError, struct.error):
            continue  # not this format; try the next opener, as Image.open does
    raise ImageError("not an image")


#: The cheap reductions (JPEG draft, integer box reduction) stop while the picture is still this
#: many times the target, leaving the rest to the antialiased resize (Pillow's "reducing gap").
REDUCING_GAP = 2.0


def draft_request(size: tuple[int, int], target_short_side: int) -> tuple[int, int] | None:
    """The size to ask a JPEG's draft for (it decodes at 1/2, 1/4 or 1/8 scale with both sides
    at least that), or None when the picture is not far enough above the target to reduce."""
    width, height = size
    short = min(width, height)
    keep = target_short_side * REDUCING_GAP
    if short < 2 * keep:
        return None
    return math.ceil(width * keep / short), math.ceil(height * keep / short)


def reduce_factor(size: tuple[int, int], target_short_side: int) -> int:
    """The whole factor of the box reduction after decoding (1: none)."""
    factor = int(min(size) // (target_short_side * REDUCING_GAP))
    return factor if factor >= 2 else 1


def _draft_for(im: PILImage.Image, target_short_side: int | None) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the picture is far above the target."""
    if target_short_side is None or im.format not in ("JPEG", "MPO"):
        return
    requested = draft_request(im.size, target_short_side)
    if requested is not None:
        im.draft("RGB", requested)


def _high_depth_to_8bit(im: PILImage.Image) -> PILImage.Image:
    """Scale integer or float single-channel images to 8 bits over their full range (not clip)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(im)
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
    elif values.dtype.kind == "f":
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(finite.min()), float(finite.max())
        if low >= 0.0 and high <= 1.0:  # the usual normalised float image
            low, high = 0.0, 1.0
        span = high - low or 1.0
        scaled = np.rint((finite - low) * (255.0 / span))
    else:
        # Mode "I" is 32-bit signed; data read from 16-bit files stays within 0..65535.
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high <= 65535:
            scaled = (values.astype(np.int64) * 255 + 32767) // 65535
        else:
            span = high - low or 1
            scaled = (values.astype(np.int64) - low) * 255 // span
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("P", "L", "1") and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("RGBa", "La"):  # premultiplied alpha
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode.startswith("I") or mode == "F":
        return _high_depth_to_8bit(im).convert("RGB")
    if im.mode in ("RGBA", "LA"):
        # A neutral background, so the model judges the photo rather than the checkerboard.
        background = Image.new("RGBA", im.size, (*_GREY_BACKGROUND, 255))
        background.alpha_composite(im.convert("RGBA"))
        return background.convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as error:
        raise ImageError(f"unsupported image mode: {mode}") from error


def _reduce_for(im: PILImage.Image, target_short_side: int | None) -> PILImage.Image:
    """Box-reduce by the largest whole factor that keeps the short side >= the target."""
    if target_short_side is None:
        return im
    factor = reduce_factor(im.size, target_short_side)
    return im.reduce(factor) if factor >= 2 else im


def _decode_opened(
    im: PILImage.Image, target_short_side: int | None
) -> tuple[PILImage.Image, int, int, object]:
    """Header to pixels: draft, load, orient, convert, reduce. Returns (rgb, width, height, exif)."""
    stored_size = im.size
    _draft_for(im, target_short_side)
    im.load()
    # Read orientation only now: PNG keeps EXIF after the pixels, and Pillow's getexif would
    # load them itself and swallow a decoding error on the way.
    exif = _exif(im)
    orientation = _orientation(im, exif)
    width, height = _displayed_size(stored_size, orientation)
    oriented = _apply_orientation(im, orientation)
    return _reduce_for(_to_rgb(oriented), target_short_side), width, height, exif


def _short_text(text: str) -> str:
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= 80 else first[:77] + "..."


def _short_message(error: BaseException) -> str:
    return _short_text(str(error)) or type(error).__name__


def _has_image_signature(head: bytes) -> bool:
    """True when the first bytes are those of a common image format, so that a file Pillow
    cannot identify is reported as damaged rather than as something else entirely."""
    return (
        head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM"))
        or head.startswith((b"II*\x00", b"MM\x00*"))
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
        or (head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS)
    )


def _as_image_error(
    error: Exception, im: PILImage.Image | None, signature: bytes | None = None
) -> ImageError:
    """Map whatever Pillow or a plugin raised to one short, user-facing reason."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, Image.DecompressionBombError):
        if im is not None:
            return ImageError(f"image too large: {im.size[0]}x{im.size[1]}")
        return ImageError("image too large")
    if isinstance(error, UnidentifiedImageError):
        if signature is not None and _has_image_signature(signature):
            return ImageError("corrupt image: unreadable header")
        return ImageError("not an image")
    if isinstance(error, MemoryError):
        return ImageError("out of memory decoding image", transient=True)
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return ImageError("truncated image")
    if isinstance(error, IsADirectoryError):
        return ImageError("not a file")
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return ImageError(_reason(error))
    return ImageError(f"corrupt image: {_short_message(error)}")


def _summarise_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    from PIL import Image

    messages: list[str] = []
    for record in caught:
        # Our own max_pixels check replaces Pillow's fixed threshold.
        if issubclass(record.category, Image.DecompressionBombWarning):
            continue
        text = _short_text(str(record.message))
        if text not in messages:
            messages.append(text)
        if len(messages) == _WARNING_LIMIT:
            break
    return messages


def _read_signature(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as fp:
            return fp.read(16)
    except OSError:
        return None


class _ClampedReader(io.BufferedReader):
    """A binary file whose large reads never ask for more than what is left of the file.

    CPython allocates the n bytes of ``read(n)`` before reading. Pillow skips a PNG's remaining
    IDAT with one ``read(length)``, so a few-KB file whose chunk length field says 2**31 asked for
    gigabytes, and became "out of memory" wherever memory is limited (ulimit -v, cgroups, strict
    overcommit) although its pixels had decoded. Small reads, the common case, pass untouched.
    """

    _CLAMP_ABOVE = 1 << 20

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > self._CLAMP_ABOVE:
            left = os.fstat(self.fileno()).st_size - self.tell()
            size = min(size, max(left, 0))
        return super().read(size)


def _open_clamped(path: Path) -> _ClampedReader:
    return _ClampedReader(io.FileIO(path, "rb"))


def _check_regular_file(path: Path) -> os.stat_result:
    try:
        info = os.stat(path)
    except OSError as error:
        if isinstance(error, FileNotFoundError) and os.path.islink(path):
            raise ImageError("broken symlink") from error
        raise ImageError(_reason(error)) from error
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader forever
        raise ImageError("not a file")
    if info.st_size == 0:
        raise ImageError("empty file")
    return info


def decode_image(
    path: str | os.PathLike[str],
    *,
    target_short_side: int | None = 384,
    max_pixels: int = 250_000_000,
    max_aspect: float | None = None,
) -> DecodedImage:
    """Decode one image file to RGB, reduced cheaply towards ``target_short_side``.

    The size is checked against ``max_pixels`` (and the aspect ratio against ``max_aspect``, when
    given) from the header, before any pixel is decoded.
    Python warnings raised while decoding are returned in ``DecodedImage.warnings`` and not shown.
    ``target_short_side=None`` keeps the full resolution. Raises ``ImageError`` with a short
    reason for every failure.
    """
    path = Path(path)
    _check_regular_file(path)
    if path.suffix.lower() in RAW_EXTENSIONS:
        return _decode_raw(path, target_short_side, max_pixels)
    heif_available = _register_heif_opener()

    im = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _open_clamped(path) as fp:
                im = _open_header(fp, max_pixels)
                if max_aspect is not None and max(im.size) / max(1, min(im.size)) > max_aspect:
                    # Refused before decoding: a 16-bit 100000x8 strip costs a gigabyte to convert.
                    raise ImageError(f"aspect ratio too extreme to score ({im.size[0]}x{im.size[1]})")
                rgb, width, height, exif = _decode_opened(im, target_short_side)
                image_format = im.format or "UNKNOWN"
        except ImageError:
            raise
        except Exception as error:  # any decoder failure becomes an error row, never a crash
            if not heif_available and path.suffix.lower() in _HEIF_SUFFIXES:
                message = "HEIC support needs pillow-heif: pip install pillow-heif"
                raise ImageError(message) from error
            raise _as_image_error(error, im, _read_signature(path)) from error
    return DecodedImage(rgb, width, height, image_format, _summarise_warnings(caught), exif)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The displayed (width, height) of an image, read from its header with orientation applied."""
    path = Path(path)
    _check_regular_file(path)
    if path.suffix.lower() in RAW_EXTENSIONS:
        return _raw_size(path)
    _register_heif_opener()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _open_clamped(path) as fp:
                im = _open_header(fp, None)
                if im.format == "PNG" and "exif" not in im.info:
                    return im.size  # an eXIf chunk after the pixels would cost a full decode
                return _displayed_size(im.size, _orientation(im))
        except ImageError:
            raise
        except Exception as error:
            raise _as_image_error(error, None) from error


# --------------------------------------------------------------------------------------------
# Camera RAW, through the optional rawpy extra

# LibRaw's sizes.flip to the EXIF orientation meaning the same turn.
_RAW_FLIP_TO_EXIF = {0: 1, 3: 3, 5: 8, 6: 6}


def _import_rawpy():
    try:
        import rawpy
    except ImportError as error:
        raise ImageError("RAW support needs the extra: pip install 'loda-cli[raw]'") from error
    return rawpy


@contextmanager
def _stderr_captured(lines: list[str]) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file while LibRaw runs; LibRaw prints its
    complaints there from C, where Python's warnings cannot catch them. Only used around RAW
    decoding, and restored before returning."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (pythonw): nothing to protect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4096).decode("utf-8", errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _raw_error(error: Exception, rawpy) -> ImageError:
    # rawpy's messages are bytes reprs ("b'Input/output error'"); the class says more.
    if isinstance(error, rawpy.LibRawFileUnsupportedError):
        return ImageError("unsupported RAW file")
    if isinstance(error, rawpy.LibRawIOError):
        return ImageError("truncated image")
    if isinstance(error, rawpy.LibRawTooBigError):
        return ImageError("image too large")
    if isinstance(error, rawpy.LibRawUnsufficientMemoryError):
        return ImageError("out of memory decoding image", transient=True)
    return ImageError(f"corrupt image: {type(error).__name__}")


def _raw_size(path: Path) -> tuple[int, int]:
    rawpy = _import_rawpy()
    stderr_lines: list[str] = []
    try:
        with _stderr_captured(stderr_lines), rawpy.imread(os.fspath(path)) as raw:
            orientation = _RAW_FLIP_TO_EXIF.get(raw.sizes.flip, 1)
            return _displayed_size((raw.sizes.width, raw.sizes.height), orientation)
    except rawpy.LibRawError as error:
        raise _raw_error(error, rawpy) from error


def _decode_raw(path: Path, target_short_side: int | None, max_pixels: int) -> DecodedImage:
    """Use the camera's embedded JPEG preview; develop the RAW itself only when the preview is
    missing or smaller than the target (at half size when that still covers the target)."""
    from PIL import Image

    rawpy = _import_rawpy()
    stderr_lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _stderr_captured(stderr_lines), rawpy.imread(os.fspath(path)) as raw:
                orientation = _RAW_FLIP_TO_EXIF.get(raw.sizes.flip, 1)
                width, height = _displayed_size((raw.sizes.width, raw.sizes.height), orientation)
                if width * height > max_pixels:
                    raise ImageError(f"image too large: {width}x{height}")
                preview = _raw_preview(raw, rawpy, target_short_side, orientation)
                if preview is None:
                    half_size = (
                        target_short_side is not None
                        and min(width, height) // 2 >= target_short_side
                    )
                    # postprocess applies the camera's flip itself.
                    developed = raw.postprocess(
                        half_size=half_size, use_camera_wb=True, output_bps=8
                    )
                    preview = Image.fromarray(developed)
                rgb = _reduce_for(_to_rgb(preview), target_short_side)
        except ImageError:
            raise
        except rawpy.LibRawError as error:
            raise _raw_error(error, rawpy) from error
        except Exception as error:  # the preview JPEG itself may be damaged
            raise _as_image_error(error, None) from error
    notes = _summarise_warnings(caught) + [_short_text(line) for line in stderr_lines]
    return DecodedImage(rgb, width, height, "RAW", notes[:_WARNING_LIMIT], _raw_exif(path))


def _raw_exif(path: Path):
    """A RAW file's EXIF, read from its TIFF header where it has one (CR2, NEF, ARW, DNG, PEF...):
    the first megabyte parsed as EXIF, no pixel decoded (Pillow cannot open most RAW files as
    images). None for the others (CR3, RAF) and on any failure."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open(path, "rb") as fp:
                head = fp.read(1 << 20)
            if head[:4] not in (b"II*\x00", b"MM\x00*"):
                return None
            exif = Image.Exif()
            exif.load(head)
        except Exception:  # a RAW whose header cannot be parsed keeps its score, without a time
            return None
        try:
            exif.get_ifd(_EXIF_IFD_TAG)
        except Exception:
            pass
        return exif


def _raw_preview(raw, rawpy, target_short_side: int | None, orientation: int):
    """The embedded preview, oriented, or None when it is missing or smaller than the target."""
    from PIL import Image

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        im = Image.open(io.BytesIO(thumb.data))
        _draft_for(im, target_short_side)
        im.load()
        own_orientation = _orientation(im)
        # Most previews carry no orientation of their own; the RAW's flip then applies.
        preview = _apply_orientation(im, own_orientation if own_orientation != 1 else orientation)
    else:
        preview = _apply_orientation(Image.fromarray(thumb.data), orientation)
    if target_short_side is not None and min(preview.size) < target_short_side:
        return None
    if target_short_side is None and preview.size != _displayed_size(
        (raw.sizes.width, raw.sizes.height), orientation
    ):
        return None  # full resolution asked for: only the RAW itself has it
    return preview


# --------------------------------------------------------------------------------------------
# Resizing


def resize_short_side(
    img: PILImage.Image, short_side: int, interpolation: str = "bicubic"
) -> PILImage.Image:
    """Resize so that ``min(width, height) == short_side``, keeping the aspect ratio.

    The long side is truncated (as torchvision's ``Resize(int)``, which prepared the paper's
    training data, so scoring sees the same geometry as training) and is at least 1. Returns
    ``img`` itself when it already
    has that size. ``interpolation`` is one of nearest, box, bilinear, hamming, bicubic, lanczos.
    """
    from PIL import Image

    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    if interpolation not in _RESAMPLING_NAMES:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; use one of {', '.join(_RESAMPLING_NAMES)}"
        )
    size = short_side_size(*img.size, short_side)
    if size == img.size:
        return img
    resample = Image.Resampling[interpolation.upper()]
    return img.resize(size, resample)


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``short_side``, the long side truncated and >= 1."""
    if width <= height:
        return short_side, max(1, int(height * short_side / width))
    return max(1, int(width * short_side / height)), short_side
