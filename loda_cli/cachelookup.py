"""Scores from the score cache alone, without torch: what ``loda score`` reruns and cull, sort and
rate need when every photo was scored before.

Importing torch and timm and building the model take seconds; a folder whose every photo is in
the cache needs none of it. The cache's pass over the walk (:func:`loda_cli.scoring.split_by_cache`)
gives each cached raw output, mapped here through the checkpoint's calibration, read from its
metadata header: the rows are those the scorer would give. When files are left to decode, the
same pass goes to the scorer (``loda score``), which then decodes only those. With grouping on, a
row from before burst grouping (no look stored) needs decoding too, so the scorer fills the look
in. Reads only; never raises for a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from loda_cli.cache import ScoreCache, default_cache_path
from loda_cli import scoring
from loda_cli.scoring import CacheSplit, ScanSpec, ScoreRow, finished_row
from loda_cli.weights import load_model_info


def spec_for(paths: Iterable[str | os.PathLike[str]], loaded, *, recursive: bool = True,
             include: Iterable[str] = (), exclude: Iterable[str] = (), groups: bool = True,
             crops: bool = True) -> ScanSpec:
    """The walk a :class:`~loda_cli.scoring.Scorer` of ``loaded`` (a checkpoint's
    :class:`~loda_cli.weights.LoadedModel`, its model not needed) would make, for
    :func:`split_by_cache`. ``crops=False``: the cached rows come without crop scores."""
    return ScanSpec(paths=[os.fspath(Path(p).expanduser()) for p in paths], recursive=recursive,
                    include=tuple(include), exclude=tuple(exclude), preprocess=loaded.preprocess,
                    model_id=loaded.sha256, groups=groups, crops=crops)


def rows_of(split: CacheSplit, calibration) -> list[ScoreRow]:
    """The rows of a split's complete lookup items, as the scorer gives them; consumes them
    (:meth:`~loda_cli.scoring.CacheSplit.take_done`)."""
    return [finished_row(item, item.get("raw"), calibration, item.get("crop_raws"))[0] for item in split.take_done()]


def cache_split(paths: Iterable[str | os.PathLike[str]], loaded, *, cache_path: str | os.PathLike[str],
                recursive: bool = True, include: Iterable[str] = (), exclude: Iterable[str] = (),
                groups: bool = True, stop_at_miss: bool = False, crops: bool = True) -> CacheSplit | None:
    """The cache's pass (:func:`~loda_cli.scoring.split_by_cache`) for the walk a scorer of
    ``loaded`` would make, through a read-only connection; None without a cache file, or where
    the pass returns None. ``crops=False``: the split's cached rows have no crop scores, also
    when it is handed to :meth:`~loda_cli.scoring.Scorer.score_files` (for an output without
    them, such as a CSV)."""
    if not os.path.isfile(cache_path):
        return None
    spec = spec_for(paths, loaded, recursive=recursive, include=include, exclude=exclude, groups=groups,
                    crops=crops)
    with ScoreCache(cache_path, readonly=True) as cache:
        return scoring.split_by_cache(spec, cache, stop_at_miss=stop_at_miss)


def scores_from_cache(
    paths: Iterable[str | os.PathLike[str]],
    loaded,
    *,
    cache_path: str | os.PathLike[str],
    recursive: bool = True,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    groups: bool = True,
    crops: bool = True,
) -> tuple[list[ScoreRow], list[tuple[str, str]]] | None:
    """Every file's row from the score cache alone, and the paths the walk skipped; or None as
    soon as one file needs decoding (not cached, or cached before burst grouping while ``groups``
    asks for its look), when the caller scores the normal way.

    Needs neither torch nor the model's weights: ``loaded`` is the checkpoint's
    :class:`~loda_cli.weights.LoadedModel` from :func:`~loda_cli.weights.load_model_info`.
    The rows are those :class:`Scorer` gives for the same files, in walk order.
    """
    split = cache_split(paths, loaded, cache_path=cache_path, recursive=recursive, include=include,
                        exclude=exclude, groups=groups, stop_at_miss=True, crops=crops)
    if split is None:
        return None
    return rows_of(split, loaded.calibration), split.skipped


def cached_rows(
    paths: Iterable[str | os.PathLike[str]],
    *,
    model: Optional[str] = None,
    recursive: bool = True,
    exclude: Iterable[str] = (),
    looks: bool = False,
    crops: bool = True,
) -> Optional[list[ScoreRow]]:
    """A row for every image file under ``paths`` from the cache, or None when a file is not
    there (or there is no cache; or, with ``looks``, a scored file has no look stored yet).
    ``crops=False`` leaves the crop scores out (ScoreRow.crops None), where nothing reads them.
    Raises only what resolving ``model`` raises."""
    cache_path = default_cache_path()
    if not cache_path.is_file():
        return None
    found = scores_from_cache(paths, load_model_info(model), cache_path=cache_path,
                              recursive=recursive, exclude=exclude, groups=looks, crops=crops)
    return None if found is None else found[0]
