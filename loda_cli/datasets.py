"""The IQA datasets: what each one is, reading its labels as distributed, splits, checks, preparation.

Pure Python, numpy, scipy and openpyxl; importing this module never imports torch. The torch
``Dataset`` that feeds a DataLoader lives in ``loda_cli.data`` and builds on :func:`read_labels`
and :func:`load_training_image`.

The order of this file: the registry of specs, locating a dataset on disk, the label readers (one
per distributed format), splits and their JSON form, checking, and preparation (the resize cache).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import random
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

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


# --------------------------------------------------------------------------------------------
# Registry


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
        from loda_cli.weights import loda_home

        root = loda_home() / "synthetic"
        root.mkdir(parents=True, exist_ok=True)
    if not root.exists():
        from loda_cli.download import download_hint

        raise DatasetError(
            f"{spec.title} not found at {where}. {_where_published(spec)}Unpack it so that its "
            f"folder holds {spec.layout}, then pass that folder with --data DIR (or set $LODA_DATA "
            f"to the folder that holds {spec.name}/)." + download_hint(spec, data)
        )
    return root


def _where_published(spec: DatasetSpec) -> str:
    return f"It is published at {spec.homepage}. " if spec.homepage else ""


def _base_dir(root: Path) -> Path:
    """The folder image paths are relative to (a csv dataset's root may be the CSV file)."""
    return root.parent if root.is_file() else root


def _label_file(spec: DatasetSpec, root: Path, *names: str, ignore_case: bool = False) -> Path:
    for name in names:
        found = _find_ci(root, name) if ignore_case else (root / name if (root / name).is_file() else None)
        if found is not None and found.is_file():
            return found
    raise DatasetError(
        f"{spec.title}: label file {' or '.join(names)} not found in {root}. "
        f"{_where_published(spec)}The folder should hold {spec.layout}."
    )


def _find_ci(folder: Path, relative: str) -> Optional[Path]:
    """``folder/relative`` matched one component at a time, case-insensitively; None if absent."""
    current = folder
    for part in Path(relative).parts:
        exact = current / part
        if exact.exists():
            current = exact
            continue
        try:
            entries = os.listdir(current)
        except OSError:
            return None
        lowered = part.lower()
        match = next((e for e in sorted(entries) if e.lower() == lowered), None)
        if match is None:
            return None
        current = current / match
    return current


def _inside(base: Path, relative: str, label_file: Path, line: int) -> Path:
    """Join a path from a label file to ``base``, refusing any that lands outside ``base``."""
    candidate = Path(os.path.normpath(base / relative))
    base_norm = Path(os.path.normpath(base.absolute()))
    absolute = Path(os.path.normpath(candidate.absolute()))
    if absolute != base_norm and base_norm not in absolute.parents:
        raise DatasetPathError(
            f"{label_file}, line {line}: path {relative!r} is outside the dataset folder {base}"
        )
    return candidate


# --------------------------------------------------------------------------------------------
# Label readers, one per distributed format


def read_labels(spec: DatasetSpec, root: Path) -> LabelSet:
    """Read a dataset's labels from its distributed files. Opens label files only, never images."""
    root = Path(root)
    if spec.name not in _READERS:
        raise UnknownDatasetError(f"no label reader for dataset {spec.name!r}")
    labels = _READERS[spec.name](spec, root)
    if not labels.items:
        raise DatasetError(f"{labels.label_file}: no labelled images")
    return labels


def _number(text: Any, label_file: Path, line: int, what: str, unit: str = "line") -> float:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        raise DatasetError(f"{label_file}, {unit} {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{label_file}, {unit} {line}: {what} {text!r} is not a finite number")
    return value


def _read_csv(label_file: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header (stripped) and the (line number, row) pairs; tolerates CRLF and a UTF-8 BOM."""
    try:
        text = label_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{label_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{label_file}: cannot read ({exc.strerror})") from None
    reader = csv.reader(text.splitlines())
    try:
        header = [cell.strip() for cell in next(reader)]
    except StopIteration:
        raise DatasetError(f"{label_file}: empty file (expected a header row)") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    yield reader.line_num, row
        except csv.Error as exc:
            raise DatasetError(f"{label_file}, line {reader.line_num}: {exc}") from None

    return header, rows()


def _column(header: Sequence[str], candidates: Sequence[str], label_file: Path, what: str) -> int:
    """Index of the first candidate column present (case-insensitive)."""
    lowered = [h.lower() for h in header]
    for name in candidates:
        if name.lower() in lowered:
            return lowered.index(name.lower())
    raise DatasetError(
        f"{label_file}: no {what} column (looked for {', '.join(candidates)}; "
        f"the header has {', '.join(header) or 'nothing'})"
    )


def _cell(row: list[str], index: int, label_file: Path, line: int, column: str) -> str:
    if index >= len(row):
        raise DatasetError(f"{label_file}, line {line}: missing field {column!r}")
    return row[index].strip()


_KONIQ_SCORES = "koniq10k_scores_and_distributions.csv"
_KONIQ_SETS = "koniq10k_distributions_sets.csv"


def _read_koniq(spec: DatasetSpec, root: Path) -> LabelSet:
    # The official file has MOS on 1-5; the authors' sets file (their splits) has MOS on 0-100.
    # Which file it is decides the scale; the values are then checked against it.
    label_file = _label_file(spec, root, _KONIQ_SCORES, _KONIQ_SETS)
    scale = (1.0, 5.0) if label_file.name == _KONIQ_SCORES else (0.0, 100.0)
    header, rows = _read_csv(label_file)
    name_col = _column(header, ["image_name"], label_file, "image_name")
    mos_col = _column(header, ["MOS"], label_file, "MOS")
    items = []
    for line, row in rows:
        name = _cell(row, name_col, label_file, line, "image_name")
        mos = _number(_cell(row, mos_col, label_file, line, "MOS"), label_file, line, "MOS")
        if not scale[0] - 1e-6 <= mos <= scale[1] + 1e-6:
            raise DatasetError(
                f"{label_file}, line {line}: MOS {mos} is outside this file's scale "
                f"{scale[0]:g}-{scale[1]:g}"
            )
        items.append(LabelItem(name, root / "1024x768" / name, mos))
    return LabelSet(spec.name, root, label_file, items, scale, spec.lower_better, spec.kind)


def _read_kadid(spec: DatasetSpec, root: Path) -> LabelSet:
    label_file = _label_file(spec, root, "dmos.csv")
    header, rows = _read_csv(label_file)
    name_col = _column(header, ["dist_img"], label_file, "dist_img")
    ref_col = _column(header, ["ref_img"], label_file, "ref_img")
    mos_col = _column(header, ["dmos"], label_file, "dmos")
    items = []
    for line, row in rows:
        name = _cell(row, name_col, label_file, line, "dist_img")
        ref = _cell(row, ref_col, label_file, line, "ref_img")
        mos = _number(_cell(row, mos_col, label_file, line, "dmos"), label_file, line, "dmos")
        items.append(LabelItem(name, root / "images" / name, mos, ref))
    return LabelSet(spec.name, root, label_file, items, _scale(spec), spec.lower_better, spec.kind)


def _read_spaq(spec: DatasetSpec, root: Path) -> LabelSet:
    import openpyxl

    label_file = _label_file(spec, root, "Annotations/MOS and Image attribute scores.xlsx")
    try:
        workbook = openpyxl.load_workbook(label_file, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a damaged workbook
        raise DatasetError(f"{label_file}: not a readable .xlsx workbook ({exc})") from None
    try:
        sheet = workbook.worksheets[0]
        items = []
        for line, row in enumerate(sheet.iter_rows(values_only=True), start=1):
            if line == 1:
                continue  # the header row
            cells = list(row) + [None, None]
            name, mos = cells[0], cells[1]
            if name is None and mos is None:
                continue
            if name is None or str(name).strip() == "":
                raise DatasetError(f"{label_file}, row {line}: no image name in the first column")
            name = str(name).strip()
            value = _number(mos, label_file, line, "MOS", unit="row")
            items.append(LabelItem(name, root / "TestImage" / name, value))
    finally:
        workbook.close()
    return LabelSet(spec.name, root, label_file, items, _scale(spec), spec.lower_better, spec.kind)


def _load_mat(spec: DatasetSpec, path: Path, keys: Sequence[str]) -> dict[str, Any]:
    import scipy.io

    try:
        contents = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise DatasetError(f"{path}: MATLAB v7.3 files are not supported; re-save it with -v7") from None
    except Exception as exc:  # scipy raises ValueError/TypeError/etc. for damaged files
        raise DatasetError(f"{path}: not a readable .mat file ({exc})") from None
    for key in keys:
        if key not in contents:
            present = sorted(k for k in contents if not k.startswith("__"))
            raise DatasetError(f"{path}: no variable {key!r} (it holds {', '.join(present) or 'nothing'})")
    return contents


def _mat_numbers(array: Any, path: Path, key: str) -> list[float]:
    import numpy as np

    try:
        values = np.asarray(array, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: variable {key!r} is not numeric") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DatasetError(f"{path}: variable {key!r} entry {int(bad[0]) + 1} is not a finite number")
    return values.tolist()


def _mat_strings(array: Any, path: Path, key: str) -> list[str]:
    """A MATLAB cell array of strings, as loadmat returns it, flattened to a list of str."""
    import numpy as np

    def text(cell: Any) -> str:
        while isinstance(cell, np.ndarray):
            if cell.size != 1:
                if cell.dtype.kind == "U" and cell.ndim == 1:
                    return "".join(cell.tolist())
                raise DatasetError(f"{path}: variable {key!r} holds a cell that is not one string")
            cell = cell.reshape(-1)[0]
        if not isinstance(cell, str):
            raise DatasetError(f"{path}: variable {key!r} holds {type(cell).__name__}, not strings")
        return cell.strip()

    arr = np.asarray(array)
    if arr.dtype.kind == "U":  # a char matrix rather than a cell array
        return [str(s).strip() for s in arr.ravel()]
    return [text(cell) for cell in arr.ravel()]


_LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
_LIVE_TOTAL = sum(count for _, count in _LIVE_FOLDERS)


def _read_live(spec: DatasetSpec, root: Path) -> LabelSet:
    dmos_file = _label_file(spec, root, "dmos_realigned.mat")
    refs_file = _label_file(spec, root, "refnames_all.mat")
    dmos_mat = _load_mat(spec, dmos_file, ["dmos_new", "orgs"])
    dmos = _mat_numbers(dmos_mat["dmos_new"], dmos_file, "dmos_new")
    orgs = _mat_numbers(dmos_mat["orgs"], dmos_file, "orgs")
    refs = _mat_strings(_load_mat(spec, refs_file, ["refnames_all"])["refnames_all"], refs_file, "refnames_all")
    for label_file, key, values in ((dmos_file, "dmos_new", dmos), (dmos_file, "orgs", orgs), (refs_file, "refnames_all", refs)):
        if len(values) != _LIVE_TOTAL:
            raise DatasetError(
                f"{label_file}: variable {key!r} has {len(values)} entries; LIVE release 2 has "
                f"{_LIVE_TOTAL} (jp2k 227, jpeg 233, wn, gblur and fastfading 174 each)"
            )
    # The 982 entries follow the folders in this order, numbered from 1 within each folder.
    names = [f"{folder}/img{k}.bmp" for folder, count in _LIVE_FOLDERS for k in range(1, count + 1)]
    items = [
        LabelItem(name, root / name, mos, ref)
        for name, mos, org, ref in zip(names, dmos, orgs, refs)
        if org != 1  # orgs == 1 marks the pristine copies of the references
    ]
    return LabelSet(spec.name, root, dmos_file, items, _scale(spec), spec.lower_better, spec.kind)


_LIVEC_TRAINING_IMAGES = 7


def _read_livec(spec: DatasetSpec, root: Path) -> LabelSet:
    names_file = _label_file(spec, root, "Data/AllImages_release.mat")
    mos_file = _label_file(spec, root, "Data/AllMOS_release.mat")
    names = _mat_strings(_load_mat(spec, names_file, ["AllImages_release"])["AllImages_release"], names_file, "AllImages_release")
    mos = _mat_numbers(_load_mat(spec, mos_file, ["AllMOS_release"])["AllMOS_release"], mos_file, "AllMOS_release")
    if len(names) != len(mos):
        raise DatasetError(
            f"{names_file} lists {len(names)} images but {mos_file} has {len(mos)} scores"
        )
    # The first 7 entries are the training images shown to the raters; the release drops them.
    items = [
        LabelItem(name, root / "Images" / name, value)
        for name, value in list(zip(names, mos))[_LIVEC_TRAINING_IMAGES:]
    ]
    return LabelSet(spec.name, root, mos_file, items, _scale(spec), spec.lower_better, spec.kind)


def _read_tid2013(spec: DatasetSpec, root: Path) -> LabelSet:
    label_file = _label_file(spec, root, "mos_with_names.txt", ignore_case=True)
    images = _find_ci(root, "distorted_images") or root / "distorted_images"
    try:
        on_disk = {entry.lower(): entry for entry in os.listdir(images)} if images.is_dir() else {}
    except OSError:
        on_disk = {}
    try:
        text = label_file.read_text(encoding="utf-8-sig", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{label_file}: cannot read as text ({exc})") from None
    items = []
    for line, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetError(f"{label_file}, line {line}: expected 'mos name', got {raw.strip()!r}")
        mos_text, name = fields
        if line == 1 and not _is_number(mos_text) and "." not in name:
            continue  # tolerate a header such as "mos name"
        mos = _number(mos_text, label_file, line, "MOS")
        # The release names files in either case (i01_01_1.bmp, I01_01_1.BMP): match ignoring it.
        path = images / on_disk.get(name.lower(), name)
        items.append(LabelItem(name, path, mos, f"I{name[1:3]}"))
    return LabelSet(spec.name, root, label_file, items, _scale(spec), spec.lower_better, spec.kind)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_flive(spec: DatasetSpec, root: Path) -> LabelSet:
    label_file = _label_file(spec, root, "labels_image.csv")
    header, rows = _read_csv(label_file)
    name_col = _column(header, ["name", "name_image", "image_name"], label_file, "name")
    mos_col = _column(header, ["mos", "mos_image"], label_file, "mos")
    items = []
    for line, row in rows:
        name = _cell(row, name_col, label_file, line, header[name_col])
        mos = _number(_cell(row, mos_col, label_file, line, header[mos_col]), label_file, line, "mos")
        items.append(LabelItem(name, _inside(root, name, label_file, line), mos))
    return LabelSet(spec.name, root, label_file, items, _scale(spec), spec.lower_better, spec.kind)


_CSV_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_name", "image_path", "name")
_CSV_MOS_COLUMNS = ("mos", "score", "label", "dmos")
_CSV_REF_COLUMNS = ("ref", "reference", "ref_img", "ref_name")


def _read_csv_dataset(spec: DatasetSpec, root: Path) -> LabelSet:
    if root.is_file():
        label_file = root
    else:
        label_file = _label_file(spec, root, "labels.csv")
    base = label_file.parent
    header, rows = _read_csv(label_file)
    path_col = _column(header, [spec.path_column] if spec.path_column else _CSV_PATH_COLUMNS, label_file, "path")
    mos_col = _column(header, [spec.mos_column] if spec.mos_column else _CSV_MOS_COLUMNS, label_file, "MOS")
    ref_col: Optional[int] = None
    if spec.ref_column:
        ref_col = _column(header, [spec.ref_column], label_file, "reference")
    else:
        lowered = [h.lower() for h in header]
        ref_col = next((lowered.index(c) for c in _CSV_REF_COLUMNS if c in lowered), None)
    items = []
    for line, row in rows:
        name = _cell(row, path_col, label_file, line, header[path_col])
        if not name:
            raise DatasetError(f"{label_file}, line {line}: empty path")
        mos = _number(_cell(row, mos_col, label_file, line, header[mos_col]), label_file, line, header[mos_col])
        ref = None
        if ref_col is not None:
            ref = _cell(row, ref_col, label_file, line, header[ref_col])
            if not ref:
                raise DatasetError(f"{label_file}, line {line}: empty reference in column {header[ref_col]!r}")
        items.append(LabelItem(name, _inside(base, name, label_file, line), mos, ref))
    if spec.scale is not None:
        scale = spec.scale
    elif items:
        scale = (min(i.mos for i in items), max(i.mos for i in items))
    else:
        scale = (0.0, 1.0)
    kind = "synthetic" if ref_col is not None else spec.kind
    return LabelSet(spec.name, base, label_file, items, scale, spec.lower_better, kind)


def _scale(spec: DatasetSpec) -> tuple[float, float]:
    if spec.scale is None:
        raise DatasetError(f"{spec.name}: the spec has no label scale")
    return spec.scale


for _spec, _reader in (
    (
        DatasetSpec(
            "koniq10k", "KonIQ-10k", (1.0, 5.0), False, "authentic", 3, "bilinear", False, 10073,
            "http://database.mmsp-kn.de/koniq-10k-database.html",
            "1024x768/*.jpg and koniq10k_scores_and_distributions.csv (or the authors' "
            "koniq10k_distributions_sets.csv)",
            aliases=("koniq",),
        ),
        _read_koniq,
    ),
    (
        DatasetSpec(
            "kadid10k", "KADID-10k", (1.0, 5.0), False, "synthetic", 3, "bicubic", False, 10125,
            "http://database.mmsp-kn.de/kadid-10k-database.html",
            "images/I01_01_01.png ... and dmos.csv (dist_img, ref_img, dmos, var)",
            aliases=("kadid",),
        ),
        _read_kadid,
    ),
    (
        DatasetSpec(
            "spaq", "SPAQ", (0.0, 100.0), False, "authentic", 3, "bilinear", True, 11125,
            "https://github.com/h4nwei/SPAQ",
            "TestImage/*.jpg and Annotations/MOS and Image attribute scores.xlsx",
        ),
        _read_spaq,
    ),
    (
        DatasetSpec(
            "live", "LIVE (release 2)", (0.0, 100.0), True, "synthetic", 5, "bicubic", False, 779,
            "https://live.ece.utexas.edu/research/Quality/subjective.htm",
            "jp2k/ jpeg/ wn/ gblur/ fastfading/ (imgN.bmp), refimgs/, dmos_realigned.mat and "
            "refnames_all.mat",
        ),
        _read_live,
    ),
    (
        DatasetSpec(
            "livec", "LIVE In the Wild Challenge (LIVEC)", (0.0, 100.0), False, "authentic", 5,
            "bicubic", False, 1162,
            "https://live.ece.utexas.edu/research/ChallengeDB/index.html",
            "Images/*.bmp and Data/AllImages_release.mat, Data/AllMOS_release.mat, "
            "Data/AllStdDev_release.mat",
        ),
        _read_livec,
    ),
    (
        DatasetSpec(
            "tid2013", "TID2013", (0.0, 9.0), False, "synthetic", 10, "bicubic", False, 3000,
            "https://www.ponomarenko.info/tid2013.htm",
            "distorted_images/ (i01_01_1.bmp ..., any case) and mos_with_names.txt ('mos name' "
            "per line)",
            aliases=("tid",),
        ),
        _read_tid2013,
    ),
    (
        DatasetSpec(
            "flive", "FLIVE (PaQ-2-PiQ)", (0.0, 100.0), False, "authentic", 1, "bicubic", False,
            None,
            "https://github.com/baidut/PaQ-2-PiQ",
            "labels_image.csv (name, mos) with each name a path relative to the dataset folder",
        ),
        _read_flive,
    ),
    (
        DatasetSpec(
            "csv", "CSV dataset", None, False, "authentic", 3, "bicubic", False, None, "",
            "a CSV file with a path column (path, file, filename, image, image_name, name) and a "
            "MOS column (mos, score, label, dmos), optionally a ref column; paths relative to the "
            "CSV's folder (--data may be the CSV itself, or a folder holding labels.csv)",
        ),
        _read_csv_dataset,
    ),
):
    register_dataset(_spec, _reader)


# --------------------------------------------------------------------------------------------
# Splits (the release's protocol, PAPER-NOTES.md)


@dataclass(frozen=True)
class Split:
    """Indices into ``LabelSet.items``."""

    train: list[int]
    test: list[int]


def make_splits(
    labels: LabelSet,
    spec: Optional[DatasetSpec] = None,
    seed: int = DEFAULT_SEED,
    n_splits: int = 10,
    train_fraction: float = 1.0,
) -> list[Split]:
    """The release's 80/20 splits: seed once, then shuffle the same list again for each split.

    Authentic datasets shuffle ``list(range(N))`` and train on the first ``round(0.8 N)``
    indices, in shuffled order. Synthetic ones (``labels.kind``) shuffle the sorted reference
    names and train on the images of the first ``round(0.8 R)`` references; their indices are in
    label-file order. The shuffles are cumulative: split i shuffles the list split i-1 left.

    ``train_fraction < 1`` (paper Table 5) keeps, for split i, the first ``round(f * n_train)``
    (at least 1) of the training indices after shuffling a copy with ``random.Random(seed + i)``,
    sorted. The subsets are nested: 20% of a split is inside its 40%. Test sets never change.
    """
    if n_splits < 1:
        raise UsageError(f"the number of splits must be at least 1, not {n_splits}")
    if not 0.0 < train_fraction <= 1.0:
        raise UsageError(f"the training fraction must be in (0, 1], not {train_fraction}")
    n = len(labels.items)
    # random.Random(seed) yields the same sequence as random.seed(seed) + module-level calls.
    rng = random.Random(seed)
    splits = []
    if labels.kind == "synthetic":
        missing = [item.name for item in labels.items if not item.ref]
        if missing:
            raise DatasetError(f"{labels.dataset}: image {missing[0]!r} has no reference to split by")
        refs = sorted({item.ref for item in labels.items if item.ref})
        n_train = round(0.8 * len(refs))
        if n_train < 1 or n_train >= len(refs):
            raise DatasetError(f"{labels.dataset}: {len(refs)} reference images are too few to split 80/20")
        for _ in range(n_splits):
            rng.shuffle(refs)
            train_refs = set(refs[:n_train])
            train = [i for i, item in enumerate(labels.items) if item.ref in train_refs]
            test = [i for i, item in enumerate(labels.items) if item.ref not in train_refs]
            splits.append(Split(train, test))
    else:
        indices = list(range(n))
        n_train = round(0.8 * n)
        if n_train < 1 or n_train >= n:
            raise DatasetError(f"{labels.dataset}: {n} images are too few to split 80/20")
        for _ in range(n_splits):
            rng.shuffle(indices)
            splits.append(Split(indices[:n_train], indices[n_train:]))
    if train_fraction < 1.0:
        splits = [
            Split(_subset(split.train, train_fraction, seed + i), split.test)
            for i, split in enumerate(splits)
        ]
    return splits


def _subset(train: list[int], fraction: float, seed: int) -> list[int]:
    pool = list(train)
    random.Random(seed).shuffle(pool)
    keep = max(1, round(fraction * len(pool)))
    return sorted(pool[:keep])


def splits_to_json(
    labels: LabelSet, splits: Sequence[Split], dataset: str, seed: int, train_fraction: float = 1.0
) -> dict[str, Any]:
    """Splits by image name: ``{"dataset", "seed", "train_fraction", "splits": [{"train", "test"}]}``."""
    names = labels.names
    return {
        "dataset": dataset,
        "seed": seed,
        "train_fraction": train_fraction,
        "splits": [
            {"train": [names[i] for i in split.train], "test": [names[i] for i in split.test]}
            for split in splits
        ],
    }


def load_splits_json(path: Path) -> dict[str, Any]:
    """Read and validate a splits file written from :func:`splits_to_json` (JSON, never pickle)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the splits file ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a JSON splits file ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a splits file is a JSON object, not {type(data).__name__}")
    if not isinstance(data.get("dataset"), str):
        raise DatasetError(f"{path}: 'dataset' must be a string")
    if not isinstance(data.get("seed"), int) or isinstance(data.get("seed"), bool):
        raise DatasetError(f"{path}: 'seed' must be an integer")
    splits = data.get("splits")
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"{path}: 'splits' must be a non-empty list")
    for i, split in enumerate(splits):
        if not isinstance(split, dict):
            raise DatasetError(f"{path}: splits[{i}] must be an object with 'train' and 'test'")
        for part in ("train", "test"):
            names = split.get(part)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DatasetError(f"{path}: splits[{i}].{part} must be a list of image names")
        overlap = set(split["train"]) & set(split["test"])
        if overlap:
            raise DatasetError(f"{path}: splits[{i}] has {sorted(overlap)[0]!r} in both train and test")
    return data


def splits_from_json(labels: LabelSet, data: dict[str, Any]) -> list[Split]:
    """Map the names in a loaded splits file back to indices into ``labels.items``."""
    index = {name: i for i, name in enumerate(labels.names)}
    result = []
    for i, split in enumerate(data["splits"]):
        parts = []
        for part in ("train", "test"):
            unknown = [n for n in split[part] if n not in index]
            if unknown:
                raise DatasetError(
                    f"splits[{i}].{part} names {unknown[0]!r}, which is not in {labels.label_file}"
                )
            parts.append([index[n] for n in split[part]])
        result.append(Split(*parts))
    return result


# --------------------------------------------------------------------------------------------
# Checking


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``ok`` is False for any problem; a count that differs
    from the published one is only a warning (subsets and fixtures are legitimate)."""

    dataset: str
    root: Path
    label_file: Optional[Path] = None
    label_error: Optional[str] = None
    n_labels: int = 0
    expected_count: Optional[int] = None
    missing: list[str] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.label_error is None and not (self.missing or self.broken or self.duplicates)

    @property
    def count_matches(self) -> bool:
        return self.expected_count is None or self.expected_count == self.n_labels

    def summary(self) -> str:
        if self.label_error is not None:
            return f"{self.dataset}: {self.label_error}"
        parts = [f"{len(self.missing)} missing", f"{len(self.broken)} broken"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate names")
        return f"{self.dataset}: {', '.join(parts)} of {self.n_labels} labelled images"


def check_dataset(
    spec: DatasetSpec, root: Path, workers: Optional[int] = None, progress: Optional[Progress] = None
) -> CheckReport:
    """Validate the label file and decode every listed image (Pillow ``load()``)."""
    report = CheckReport(spec.name, Path(root), expected_count=spec.expected_count)
    try:
        labels = read_labels(spec, root)
    except DatasetError as exc:
        report.label_error = str(exc)
        return report
    report.label_file = labels.label_file
    report.n_labels = len(labels.items)
    seen: set[str] = set()
    for item in labels.items:
        if item.name in seen:
            report.duplicates.append(item.name)
        seen.add(item.name)
    present = []
    for item in labels.items:
        if item.path.is_file():
            present.append(item)
        else:
            report.missing.append(item.name)
    total = len(labels.items)
    done = len(report.missing)
    if progress is not None and done:
        progress(done, total)
    tasks = [(str(item.path),) for item in present]
    for index, error in _run_parallel(_decode_error, tasks, workers):
        if error is not None:
            report.broken.append((present[index].name, error))
        done += 1
        if progress is not None:
            progress(done, total)
    order = {item.name: i for i, item in enumerate(labels.items)}
    report.broken.sort(key=lambda pair: order[pair[0]])
    return report


def _decode_error(path: str) -> Optional[str]:
    """None when the file decodes completely, else a short reason. Runs in a worker process."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # any decoder failure makes the image unusable
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_parallel(
    fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], workers: Optional[int]
) -> Iterator[tuple[int, Any]]:
    """``(task index, fn(*task))`` in completion order, across processes when workers > 1."""
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if workers == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            yield i, fn(*task)
        return
    from concurrent.futures.process import BrokenProcessPool

    # A bounded number in flight keeps memory flat for 40,000-image datasets.
    limit = workers * 4
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: dict[Any, int] = {}
        queue = iter(enumerate(tasks))
        try:
            for i, task in queue:
                pending[pool.submit(fn, *task)] = i
                if len(pending) >= limit:
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
                for i, task in queue:
                    pending[pool.submit(fn, *task)] = i
                    if len(pending) >= limit:
                        break
        except BrokenProcessPool:
            raise DatasetError("a worker process died (out of memory?); rerun with fewer --workers") from None
        finally:
            for future in pending:
                future.cancel()


# --------------------------------------------------------------------------------------------
# Preparation: the shorter side resized to 384 once, cached as lossless PNG


@dataclass
class PrepareReport:
    dataset: str
    cache_dir: Path
    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def default_cache_dir(root: Path) -> Path:
    return _base_dir(Path(root)) / PREPARED_DIR


def prepared_path(spec: DatasetSpec, root: Path, item: LabelItem, cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`prepare_dataset` puts ``item``: its path under the root, plus ``.png``.

    The original suffix stays in the name so ``a.jpg`` and ``a.bmp`` cannot collide.
    """
    base = _base_dir(Path(root))
    cache = Path(cache_dir) if cache_dir is not None else base / PREPARED_DIR
    try:
        relative = Path(os.path.normpath(item.path.absolute())).relative_to(
            Path(os.path.normpath(base.absolute()))
        )
    except ValueError:
        raise DatasetPathError(f"{item.path} is outside the dataset folder {base}") from None
    return cache / relative.parent / (relative.name + ".png")


def resize_short_side(image: Any, short_side: int, interpolation: str) -> Any:
    """The one resize of the project (training and scoring must agree): see
    :func:`loda_cli.images.resize_short_side`."""
    from loda_cli.images import resize_short_side as resize

    return resize(image, short_side, interpolation)


def _load_resized(path: str, interpolation: str, exif_transpose: bool) -> Any:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        rgb = image.convert("RGB")
    return resize_short_side(rgb, SHORT_SIDE, interpolation)


def _prepare_one(src: str, dst: str, interpolation: str, exif_transpose: bool) -> Optional[str]:
    """Write one prepared image atomically; None on success, else the reason. Worker process."""
    try:
        resized = _load_resized(src, interpolation, exif_transpose)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        temporary = f"{dst}.{os.getpid()}.tmp"
        try:
            resized.save(temporary, format="PNG", compress_level=3)
            os.replace(temporary, dst)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except Exception as exc:  # one bad image must not stop the others
        return f"{type(exc).__name__}: {exc}"
    return None


def prepare_dataset(
    spec: DatasetSpec,
    root: Path,
    cache_dir: Optional[Path] = None,
    workers: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> PrepareReport:
    """Resize every labelled image to a shorter side of 384 into the cache; resumable.

    Images already in the cache are skipped; each file is written to a temporary name and renamed,
    so an interrupted run leaves no half-written image. SPAQ images are EXIF-transposed first.
    """
    labels = read_labels(spec, root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    report = PrepareReport(spec.name, cache, total=len(labels.items))
    tasks, names = [], []
    for item in labels.items:
        target = prepared_path(spec, root, item, cache)
        if target.is_file():
            report.skipped += 1
            continue
        tasks.append((str(item.path), str(target), spec.interpolation, spec.exif_transpose))
        names.append(item.name)
    done = report.skipped
    if progress is not None:
        progress(done, report.total)
    for index, error in _run_parallel(_prepare_one, tasks, workers):
        if error is None:
            report.written += 1
        else:
            report.failed.append((names[index], error))
        done += 1
        if progress is not None:
            progress(done, report.total)
    return report


def load_training_image(
    spec: DatasetSpec, root: Path, item: LabelItem, cache_dir: Optional[Path] = None
) -> Any:
    """The image as training sees it (RGB, shorter side 384): from the cache when prepared,
    otherwise decoded and resized the same way on the fly."""
    from PIL import Image

    cached = prepared_path(spec, root, item, cache_dir)
    if cached.is_file():
        with Image.open(cached) as image:
            return image.convert("RGB")
    return _load_resized(str(item.path), spec.interpolation, spec.exif_transpose)
