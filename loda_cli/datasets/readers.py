"""Reading each dataset's labels as distributed: one reader per format, registered on import.

KonIQ-10k, KADID-10k, SPAQ, LIVE, LIVEC, TID2013, FLIVE and the generic ``csv`` dataset. Every
image path a label file names is checked to stay inside the dataset folder.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from loda_cli.datasets.specs import (
    DatasetPathError,
    DatasetSpec,
    LabelItem,
    LabelSet,
    register_dataset,
    where_published,
)
from loda_cli.errors import DatasetError


def _label_file(spec: DatasetSpec, root: Path, *names: str, ignore_case: bool = False) -> Path:
    for name in names:
        found = _find_ci(root, name) if ignore_case else (root / name if (root / name).is_file() else None)
        if found is not None and found.is_file():
            return found
    raise DatasetError(
        f"{spec.title}: label file {' or '.join(names)} not found in {root}. "
        f"{where_published(spec)}The folder should hold {spec.layout}."
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
        items.append(LabelItem(name, _inside(root / "1024x768", name, label_file, line), mos))
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
        items.append(LabelItem(name, _inside(root / "images", name, label_file, line), mos, ref))
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
            items.append(LabelItem(name, _inside(root / "TestImage", name, label_file, line), value))
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
    entries = list(enumerate(zip(names, mos), start=1))[_LIVEC_TRAINING_IMAGES:]
    items = [
        LabelItem(name, _inside(root / "Images", name, names_file, entry), value)
        for entry, (name, value) in entries
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
        path = _inside(images, on_disk.get(name.lower(), name), label_file, line)
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
