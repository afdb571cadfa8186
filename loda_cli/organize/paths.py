"""Paths in the organize commands: printing them safely, the roots, and what is left alone.

Every path loda acts on lies under a root the user named or a destination they chose;
:func:`is_under` is the one test for that (:func:`is_under_resolved`, its faster form, where both
paths are resolved). Paths are printed through :func:`display_path` only.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Sequence

from loda_cli.errors import UsageError

# The folder inside each root that cull moves photos into (unless --to).
CULLED_DIRNAME = "_culled"


# Characters a terminal or page must not receive raw from a file name: controls (ESC starts a
# terminal escape sequence), line and paragraph separators, and the bidirectional overrides and
# isolates that make "photo<RLO>gpj.exe" read as "photoexe.jpg".
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") or ch in _BIDI_CONTROLS


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that is safe to print: undecodable bytes as ``\\xff``, and controls, line
    separators and bidirectional overrides as ``\\x1b``-style escapes. Everything else, the
    narrow no-break space of a macOS screenshot's name and the joiners inside an emoji
    included, is shown as it is."""
    text = os.fsencode(path).decode("utf-8", errors="backslashreplace")
    if text.isprintable():  # nearly every path: the same text, without a look at each character
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if _unsafe(ch) else ch for ch in text)


def is_under(path: str, folder: str) -> bool:
    """Whether absolute ``path`` is ``folder`` or inside it (both already normalised)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


def is_under_resolved(real_path: str, real_folder: str) -> bool:
    """:func:`is_under` for two resolved paths (realpath's: absolute, normalised), as a prefix
    test: a tenth of its time, for a plan that asks twice for each of 40,000 photos."""
    prefix = real_folder if real_folder.endswith(os.sep) else real_folder + os.sep
    return real_path == real_folder or real_path.startswith(prefix)


def resolve_roots(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The real paths of the root folders; a root inside another root is dropped."""
    if not paths:
        paths = [os.getcwd()]
    real: list[str] = []
    for given in paths:
        path = os.path.realpath(os.fspath(given))
        if not os.path.isdir(path):
            raise UsageError(f"not a folder: {display_path(given)}")
        if path not in real:
            real.append(path)
    return [r for r in real if not any(o != r and is_under(r, o) for o in real)]


@dataclass(frozen=True)
class Skip:
    """Something left alone, and why."""

    path: str
    reason: str


class Skipped(Exception):
    """One action cannot be taken safely; it is recorded and the run goes on."""
