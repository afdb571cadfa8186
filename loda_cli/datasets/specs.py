"""What each dataset is and where it lives: the specs, the registry, and a dataset's folder.

:class:`DatasetSpec` says what loda knows about a dataset before reading any file;
:class:`LabelSet` is what a reader returns. The readers of the distributed formats register
themselves (``loda_cli.datasets.readers``); ``synthetic`` registers from ``loda_cli.synthetic``
when first asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from loda_cli.datasets.archives import download_hint
from loda_cli.errors import DatasetError, UnsafePathError, UsageError

SHORT_SIDE = 384
PREPARED_DIR = f".loda-prepared-{SHORT_SIDE}"
DEFAULT_SEED = 3407

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each image; the library itself never prints."""


class UnknownDatasetError(DatasetError, UsageError):
    """A dataset name that is neither a canonical name nor an alias. Exit code 2 (a usage error)."""


class DatasetPathError(DatasetError, UnsafePathError):
    """A path in a label file escapes the dataset root (``..`` or an absolute path elsewhere)."""


@dataclass(frozen=True)
class DatasetSpec:
    """What loda knows about one dataset before reading any file.

    ``scale`` is the nominal label range; a reader may report another one in its LabelSet (the
    KonIQ sets file is on 0-100, and a ``csv`` dataset takes its range from its labels).
    ``kind`` is "authentic" (split by image) or "synthetic" (split by reference image).
    """

    name: str
    title: str
    scale: Optional[tuple[float, float]]
    lower_better: bool
    kind: str
    crops_per_image: int
    interpolation: str
    exif_transpose: bool
    expected_count: Optional[int]
    homepage: str
    layout: str
    aliases: tuple[str, ...] = ()
    # Only for the generic ``csv`` dataset: explicit column names (auto-detected when None).
    path_column: Optional[str] = None
    mos_column: Optional[str] = None
    ref_column: Optional[str] = None

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_better else "higher is better"


@dataclass(frozen=True)
class LabelItem:
    """One labelled image. ``name`` is exactly as written in the label file."""

    name: str
    path: Path
    mos: float
    ref: Optional[str] = None


@dataclass
class LabelSet:
    """The labels of one dataset, in the order of its label file.

    ``kind`` decides how :func:`make_splits` splits: it is the spec's kind, except that a ``csv``
    dataset with a reference column becomes "synthetic" (split by reference).
    """

    dataset: str
    root: Path
    label_file: Path
    items: list[LabelItem]
    scale: tuple[float, float]
    lower_better: bool
    kind: str

    def __len__(self) -> int:
        return len(self.items)

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_better else "higher is better"

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.items]

    @property
    def mos(self) -> list[float]:
        return [item.mos for item in self.items]

    def repeats(self) -> list[tuple[LabelItem, LabelItem]]:
        """(first row, later row) for every image listed again, under the same name or another
        spelling of the same file (``img/x.jpg`` and ``./img/x.jpg``)."""
        first: dict[str, LabelItem] = {}
        pairs = []
        for item in self.items:
            key = os.path.normcase(os.path.normpath(os.fspath(item.path)))
            if key in first:
                pairs.append((first[key], item))
            else:
                first[key] = item
        return pairs


Reader = Callable[[DatasetSpec, Path], LabelSet]

_SPECS: dict[str, DatasetSpec] = {}
_READERS: dict[str, Reader] = {}
_ALIASES: dict[str, str] = {}
# Datasets defined in another module, which registers them when imported (see register_dataset).
_LAZY_MODULES = {"synthetic": "loda_cli.synthetic"}


def register_dataset(spec: DatasetSpec, reader: Reader) -> None:
    """Add a dataset to the registry. ``loda_cli.synthetic`` calls this for ``synthetic``."""
    _SPECS[spec.name] = spec
    _READERS[spec.name] = reader
    for alias in (spec.name, *spec.aliases):
        _ALIASES[alias.lower()] = spec.name


def dataset_names() -> list[str]:
    """Canonical names, including the lazily registered ones."""
    return sorted(set(_SPECS) | set(_LAZY_MODULES))


def resolve_dataset(name: str) -> DatasetSpec:
    """The spec for a canonical name or alias (case-insensitive); suggests a name when unknown."""
    key = name.strip().lower()
    if key not in _ALIASES and key in _LAZY_MODULES:
        import importlib

        try:
            importlib.import_module(_LAZY_MODULES[key])
        except ModuleNotFoundError as exc:
            if exc.name != _LAZY_MODULES[key]:
                raise
        if key not in _ALIASES:
            raise UnknownDatasetError(f"dataset {name!r} is not available in this installation")
    if key in _ALIASES:
        return _SPECS[_ALIASES[key]]
    known = sorted(set(_ALIASES) | set(_LAZY_MODULES))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r}; {hint}known datasets: {', '.join(dataset_names())}"
    )


def read_labels(spec: DatasetSpec, root: Path) -> LabelSet:
    """Read a dataset's labels from its distributed files. Opens label files only, never images."""
    root = Path(root)
    if spec.name not in _READERS:
        raise UnknownDatasetError(f"no label reader for dataset {spec.name!r}")
    labels = _READERS[spec.name](spec, root)
    if not labels.items:
        raise DatasetError(f"{labels.label_file}: no labelled images")
    return labels


def csv_spec(
    path_column: Optional[str] = None,
    mos_column: Optional[str] = None,
    ref_column: Optional[str] = None,
    lower_better: Optional[bool] = None,
    scale: Optional[tuple[float, float]] = None,
) -> DatasetSpec:
    """The generic ``csv`` spec with explicit columns, direction or scale (None: auto/default)."""
    spec = _SPECS["csv"]
    return dataclasses.replace(
        spec,
        path_column=path_column,
        mos_column=mos_column,
        ref_column=ref_column,
        lower_better=spec.lower_better if lower_better is None else bool(lower_better),
        scale=scale if scale is None else (float(scale[0]), float(scale[1])),
    )


# --------------------------------------------------------------------------------------------
# Locating a dataset on disk


def dataset_root(spec: DatasetSpec, data: Optional[Path] = None) -> Path:
    """``data`` when given, else ``$LODA_DATA/<name>``, else ``~/datasets/<name>``; must exist.

    For ``csv``, ``data`` may be the CSV file itself or the folder holding ``labels.csv``.
    """
    if data is not None:
        root = Path(data).expanduser()
        where = f"{root}"
    else:
        base = os.environ.get("LODA_DATA")
        root = (Path(base) if base else Path.home() / "datasets").expanduser() / spec.name
        where = f"{root} (from {'$LODA_DATA' if base else 'the default ~/datasets'})"
    if not root.exists() and data is None and spec.name == "synthetic":
        # The synthetic set needs no download: an empty folder stands for the built-in
        # references, and the generated images are cached inside it.
        from loda_cli.home import loda_home

        root = loda_home() / "synthetic"
        root.mkdir(parents=True, exist_ok=True)
    if not root.exists():
        raise DatasetError(
            f"{spec.title} not found at {where}. {where_published(spec)}Unpack it so that its "
            f"folder holds {spec.layout}, then pass that folder with --data DIR (or set $LODA_DATA "
            f"to the folder that holds {spec.name}/)." + download_hint(spec, data)
        )
    return root


def where_published(spec: DatasetSpec) -> str:
    return f"It is published at {spec.homepage}. " if spec.homepage else ""
