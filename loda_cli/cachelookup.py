"""Scores from the score cache alone, without torch: what cull, sort and rate need when every
photo was scored before.

Importing torch and timm and building the model take seconds; a plan over a folder whose every
photo is in the cache needs none of it. ``cached_rows`` walks the folder, asks the cache, and maps
each cached raw output through the checkpoint's calibration, read from its metadata header. When
any file is missing from the cache it returns None, and the caller scores the normal way (the
scorer still takes every cached file from the cache). With ``looks``, a row from before burst
grouping (no look stored) counts as missing too, so the scorer fills the look in. Reads only;
never raises for a file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional


@dataclass
class CachedRow:
    """The fields of a scoring row that organising reads (see ``loda_cli.scoring.ScoreRow``)."""

    path: str
    root: str
    score: Optional[float]
    error: Optional[str]
    raw: Optional[float] = None
    cached: bool = True
    taken: Optional[float] = None  # what burst grouping needs (loda_cli.bursts)
    camera: Optional[str] = None
    look: Optional[str] = None


def cached_rows(
    paths: Iterable[str | os.PathLike[str]],
    *,
    model: Optional[str] = None,
    recursive: bool = True,
    exclude: Iterable[str] = (),
    looks: bool = False,
) -> Optional[list[CachedRow]]:
    """A row for every image file under ``paths`` from the cache, or None when a file is not
    there (or there is no cache; or, with ``looks``, a scored file has no look stored yet).
    Raises only what resolving ``model`` raises."""
    from loda_cli.cache import FileKey, ScoreCache, default_cache_path
    from loda_cli.config import Preprocess
    from loda_cli.images import iter_image_files
    from loda_cli.weights import Calibration, file_sha256, read_metadata, resolve_model

    cache_path = default_cache_path()
    if not cache_path.is_file():
        return None
    resolved = resolve_model(model)
    meta = read_metadata(resolved.path)
    model_id = file_sha256(resolved.path)
    prep_id = Preprocess.from_dict(meta["preprocess"]).digest()
    calibration = Calibration.from_dict(meta["calibration"])
    rows: list[CachedRow] = []
    with ScoreCache(cache_path, readonly=True) as cache:
        found = iter_image_files(
            [Path(p) for p in paths], recursive=recursive, exclude=tuple(exclude)
        )
        for item in found:
            try:
                key = FileKey.of(item.path)
            except OSError:
                return None  # the scorer reports it as it always does
            hit = cache.get(key, model_id, prep_id)
            if hit is None or (looks and hit.error is None and hit.look is None):
                return None
            path, root = os.fsdecode(item.path), os.fsdecode(item.root)
            if hit.error is not None or hit.raw is None:
                rows.append(CachedRow(path, root, None, hit.error or "no score", hit.raw))
            elif not math.isfinite(hit.raw):
                rows.append(CachedRow(path, root, None, "model produced a non-finite score"))
            else:
                rows.append(CachedRow(path, root, calibration.to_score(hit.raw), None, hit.raw,
                                      taken=hit.taken, camera=hit.camera, look=hit.look))
    return rows
