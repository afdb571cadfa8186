"""Scores from the score cache alone, without torch: what ``loda score`` reruns and cull, sort and
rate need when every photo was scored before.

Importing torch and timm and building the model take seconds; a folder whose every photo is in
the cache needs none of it. :func:`scores_from_cache` walks the folder, asks the cache, and maps
each cached raw output through the checkpoint's calibration, read from its metadata header: the
rows are those the scorer would give. When any file needs decoding it returns None, and the
caller scores the normal way (the scorer still takes every cached file from the cache). With
grouping on, a row from before burst grouping (no look stored) needs decoding too, so the scorer
fills the look in. Reads only; never raises for a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from loda_cli.cache import ScoreCache, default_cache_path
from loda_cli.images import iter_image_files
from loda_cli.scoring import ScanSpec, ScoreRow, finished_row, item_complete, lookup_item
from loda_cli.weights import load_model_info


def scores_from_cache(
    paths: Iterable[str | os.PathLike[str]],
    loaded,
    *,
    cache_path: str | os.PathLike[str],
    recursive: bool = True,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    groups: bool = True,
) -> tuple[list[ScoreRow], list[tuple[str, str]]] | None:
    """Every file's row from the score cache alone, and the paths the walk skipped; or None as
    soon as one file needs decoding (not cached, or cached before burst grouping while
    ``groups`` asks for its look), when the caller scores the normal way.

    Needs neither torch nor the model's weights: ``loaded`` is the checkpoint's
    :class:`~loda_cli.weights.LoadedModel` from :func:`~loda_cli.weights.load_model_info`.
    The rows are those :class:`Scorer` gives for the same files, in walk order.
    """
    if not os.path.isfile(cache_path):
        return None
    spec = ScanSpec(paths=[os.fspath(Path(p).expanduser()) for p in paths], recursive=recursive,
                    include=tuple(include), exclude=tuple(exclude), preprocess=loaded.preprocess,
                    model_id=loaded.sha256, groups=groups)
    rows: list[ScoreRow] = []
    skips: list = []
    with ScoreCache(cache_path, readonly=True) as cache:
        files = iter_image_files([Path(p) for p in spec.paths], recursive=recursive, include=spec.include,
                                 exclude=spec.exclude, on_skip=skips.append)
        try:
            for index, found in enumerate(files):
                item = lookup_item(found, index, spec, cache)
                if not item_complete(item):
                    return None
                rows.append(finished_row(item, item.get("raw"), loaded.calibration, item.get("crop_raws"))[0])
        finally:
            files.close()
    return rows, [(os.fsdecode(n.path), n.reason) for n in skips]


def cached_rows(
    paths: Iterable[str | os.PathLike[str]],
    *,
    model: Optional[str] = None,
    recursive: bool = True,
    exclude: Iterable[str] = (),
    looks: bool = False,
) -> Optional[list[ScoreRow]]:
    """A row for every image file under ``paths`` from the cache, or None when a file is not
    there (or there is no cache; or, with ``looks``, a scored file has no look stored yet).
    Raises only what resolving ``model`` raises."""
    cache_path = default_cache_path()
    if not cache_path.is_file():
        return None
    found = scores_from_cache(paths, load_model_info(model), cache_path=cache_path,
                              recursive=recursive, exclude=exclude, groups=looks)
    return None if found is None else found[0]
