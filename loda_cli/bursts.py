"""Bursts and near-duplicates: which photos are frames of one moment, and which frame is best.

Three parts, none of which needs torch:

* ``capture_of`` reads when and with which camera a photo was taken from the EXIF of the image
  the scorer already opened: ``DateTimeOriginal`` + ``SubSecTimeOriginal`` (+
  ``OffsetTimeOriginal``, which makes the time UTC), and make, model and body serial number.
  Odd EXIF never raises: what cannot be read is unknown.
* ``look_of`` is a photo's look: two 64-bit perceptual hashes (ImageHash's DCT ``phash`` and
  gradient ``dhash``) of the view the scorer already resized, so grouping costs no decode.
* ``group_records`` joins photos into groups (union-find). Two frames of one camera taken within
  ``burst_gap`` seconds of each other are one burst when their looks confirm it (both hashes
  within :data:`TIMED_BITS`); photos without EXIF time fall back to look alone, with the stricter
  :data:`UNTIMED_BITS`. A photo with a time is never joined by look alone: the same scene minutes
  later is another moment. ``assign_groups`` numbers the groups and ranks the frames of each.

Thresholds were chosen on ``scripts/eval_bursts.py``'s generated burst set (README, "Keep the
best of each burst"); the model's pooled features were measured there too, and do not tell
scenes apart (they are made to see quality, not content).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

DEFAULT_BURST_GAP = 2.0
#: Both hashes of two frames taken by one camera within the gap differ in at most this many bits
#: (of 64) to be one burst: loose, as time already says they belong together.
TIMED_BITS = 22
#: Without a time, both hashes must differ in at most this many bits: near-identical looks.
UNTIMED_BITS = 10

_DATETIME = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")
_EXIF_IFD = 0x8769
_MAKE, _MODEL = 0x010F, 0x0110
_DATETIME_ORIGINAL, _SUBSEC_ORIGINAL, _OFFSET_ORIGINAL = 0x9003, 0x9291, 0x9011
_BODY_SERIAL = 0xA431


# --- EXIF: when, and with which camera ----------------------------------------------------------


def _text(value: Any) -> str:
    """An EXIF value as clean text ("" when it is none): bytes decoded, NULs and spaces cut."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    return value.replace("\x00", " ").strip()


def parse_exif_time(original: Any, subsec: Any = None, offset: Any = None) -> Optional[float]:
    """Seconds since the epoch of an EXIF ``DateTimeOriginal`` ("2024:05:01 14:03:07"), with its
    sub-second digits and its UTC offset ("+02:00"). Without an offset the local time is taken
    as UTC, which keeps the differences between one camera's frames right. None when unusable
    (empty, "0000:00:00 00:00:00", out of range, not a date)."""
    match = _DATETIME.match(_text(original))
    if not match:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60 and year >= 1):
        return None
    try:
        seconds = float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None
    digits = re.match(r"\d+", _text(subsec))
    if digits:
        seconds += float("0." + digits.group(0)[:9])
    zone = _OFFSET.match(_text(offset))
    if zone:
        sign = 1 if zone.group(1) == "+" else -1
        hours, minutes = int(zone.group(2)), int(zone.group(3))
        if hours <= 14 and minutes < 60:
            seconds -= sign * (hours * 3600 + minutes * 60)
    return seconds


def capture_of(exif: Any) -> tuple[Optional[float], str]:
    """(time, camera) from a Pillow ``Exif``: the time as :func:`parse_exif_time` gives it, the
    camera as "make|model|serial" ("" when the EXIF names none). Never raises."""
    if exif is None:
        return None, ""
    try:
        try:
            sub = exif.get_ifd(_EXIF_IFD)
        except Exception:  # a broken Exif IFD pointer: IFD0 may still hold the camera
            sub = {}

        def tag(number: int) -> Any:
            value = sub.get(number)
            return value if value not in (None, "", b"") else exif.get(number)

        taken = parse_exif_time(tag(_DATETIME_ORIGINAL), tag(_SUBSEC_ORIGINAL), tag(_OFFSET_ORIGINAL))
        parts = [_text(exif.get(_MAKE)), _text(exif.get(_MODEL)), _text(tag(_BODY_SERIAL))]
        camera = "|".join(parts) if any(parts) else ""
        return taken, camera[:200]
    except Exception:  # odd EXIF is unknown EXIF, never a failed photo
        return None, ""


# --- the look ------------------------------------------------------------------------------------


def look_of(image: Any) -> str:
    """A photo's look, from an RGB Pillow image or an HxWx3 uint8 array (the scorer's resized
    view): its phash and dhash, 16 hex digits each."""
    import imagehash
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    grey = image.convert("L")
    return f"{imagehash.phash(grey)}{imagehash.dhash(grey)}"


def _look_bits(look: Optional[str]) -> Optional[tuple[int, int]]:
    if not look or len(look) != 32:
        return None
    try:
        return int(look[:16], 16), int(look[16:], 16)
    except ValueError:
        return None


# --- grouping ------------------------------------------------------------------------------------


@dataclass
class Look:
    """What grouping knows of one photo: its index, capture time, camera and look."""

    index: int
    taken: Optional[float]
    camera: str
    look: Optional[str]


class _Union:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _popcount(values):
    import numpy as np

    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(values.shape + (8,)).sum(axis=-1)


def _within(bits, i: int, others, limit: int):
    """Indices in ``others`` whose both hashes differ from photo ``i``'s in at most ``limit``."""
    import numpy as np

    others = np.asarray(others, dtype=np.int64)
    if not len(others):
        return others
    distance = _popcount(bits[others] ^ bits[i])  # (k, 2)
    return others[(distance <= limit).all(axis=1)]


def group_records(
    records: Sequence[Look],
    *,
    burst_gap: float = DEFAULT_BURST_GAP,
    similar: Optional[Callable[[int, int, bool], bool]] = None,
) -> list[int]:
    """A group number per record (equal numbers: one group), by time and look as the module says.

    ``similar(i, j, timed)``, when given, replaces the hash comparison (for measuring other
    similarities); records need no look then. Memory is a few arrays of the record count; time is
    about linear for timed photos and quadratic, in numpy chunks, for photos without time.
    """
    import numpy as np

    n = len(records)
    union = _Union(n)
    bits = np.zeros((n, 2), dtype=np.uint64)
    usable = np.zeros(n, dtype=bool)
    for k, record in enumerate(records):
        pair = _look_bits(record.look)
        if pair is not None:
            bits[k] = pair
            usable[k] = True
    if similar is not None:
        usable[:] = True
    _join_timed(records, bits, usable, union, burst_gap, similar)
    _join_untimed(records, bits, usable, union, similar)
    return [union.find(k) for k in range(n)]


def _join_timed(records, bits, usable, union: _Union, gap: float, similar) -> None:
    """Frames of one camera within ``gap`` seconds of each other whose looks agree."""
    import bisect

    by_camera: dict[str, list[tuple[float, int]]] = {}
    for k, record in enumerate(records):
        if record.taken is not None and usable[k]:
            by_camera.setdefault(record.camera, []).append((record.taken, k))
    for frames in by_camera.values():
        frames.sort()
        times = [t for t, _ in frames]
        for position, (taken, k) in enumerate(frames):
            end = bisect.bisect_right(times, taken + gap, lo=position + 1)
            others = [j for _, j in frames[position + 1 : end]]
            if similar is not None:
                matches = [j for j in others if similar(k, j, True)]
            else:
                matches = _within(bits, k, others, TIMED_BITS)
            for j in matches:
                union.join(k, int(j))


def _join_untimed(records, bits, usable, union: _Union, similar) -> None:
    """Photos without a time whose looks are near-identical: every pair, in chunks of about a
    million pairs (some 10 MB however many photos there are); the phash first, the dhash only
    for the pairs whose phash is close."""
    import numpy as np

    untimed = np.array([k for k, r in enumerate(records) if r.taken is None and usable[k]], dtype=np.int64)
    if similar is not None:
        for a, k in enumerate(untimed.tolist()):
            for j in untimed[a + 1 :].tolist():
                if similar(k, j, False):
                    union.join(k, j)
        return
    phash, dhash = bits[untimed, 0], bits[untimed, 1]
    chunk = max(16, 1_000_000 // max(1, len(untimed)))
    for start in range(0, len(untimed), chunk):
        # pairs (a, b) of the block's photo a and photo b from the block's first one on
        close = _popcount(phash[start : start + chunk, None] ^ phash[None, start:]) <= UNTIMED_BITS
        a, b = np.nonzero(close)
        a, b = a[b > a] + start, b[b > a] + start  # each pair once, never a photo with itself
        both = _popcount(dhash[a] ^ dhash[b]) <= UNTIMED_BITS
        for i, j in zip(untimed[a[both]].tolist(), untimed[b[both]].tolist()):
            union.join(i, j)


def assign_groups(rows: Iterable[Any], *, burst_gap: float = DEFAULT_BURST_GAP) -> list[Any]:
    """Set ``group`` and ``rank_in_group`` on every scored row; returns the rows.

    Rows need ``path``, ``score``, ``raw``, ``error``, ``taken``, ``camera`` and ``look``. Groups
    are numbered 1, 2, ... in the order of their best frame (group 1 holds the best photo), and
    frames within a group are ranked by score as ``rank`` ranks all photos (1 is the keeper).
    Rows that could not be scored get neither (None).
    """
    rows = list(rows)
    scored = [r for r in rows if r.error is None and r.score is not None]
    for row in rows:
        row.group, row.rank_in_group = None, None
    scored.sort(key=lambda r: (-r.score, -(r.raw or 0.0), r.path))
    records = [Look(k, r.taken, r.camera or "", r.look) for k, r in enumerate(scored)]
    roots = group_records(records, burst_gap=burst_gap)
    numbers: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for row, root in zip(scored, roots):
        number = numbers.setdefault(root, len(numbers) + 1)
        sizes[number] = sizes.get(number, 0) + 1
        row.group, row.rank_in_group = number, sizes[number]
    return rows


def check_burst_gap(value: float) -> float:
    """A usable --burst-gap (seconds, 0 to one hour), else UsageError."""
    import math

    from loda_cli.errors import UsageError

    if not math.isfinite(value) or not 0.0 <= value <= 3600.0:
        raise UsageError("--burst-gap is a number of seconds between 0 and 3600")
    return float(value)
