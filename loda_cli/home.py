"""Where loda keeps the user's state: ``$LODA_HOME`` (default ``~/.cache/loda``) and its folders.

Checkpoints, the score cache, the precision cache, journals and generated images all live under
it. This module imports nothing of the package, so every layer can ask where home is.
"""

from __future__ import annotations

import os
from pathlib import Path


def loda_home() -> Path:
    """User state: checkpoints, the score cache. ``$LODA_HOME``, default ``~/.cache/loda``."""
    return Path(os.environ.get("LODA_HOME") or Path.home() / ".cache" / "loda").expanduser()


def checkpoints_dir() -> Path:
    return loda_home() / "checkpoints"
