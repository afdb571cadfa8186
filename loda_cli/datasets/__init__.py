"""The IQA datasets: what each one is, reading its labels as distributed, splits, checks, preparation.

Pure Python, numpy, scipy and openpyxl; importing this package never imports torch. The torch
``Dataset`` that feeds a DataLoader lives in ``loda_cli.data`` and builds on :func:`read_labels`
and :func:`load_training_image`.

Modules, each importing only those before it:

- ``specs``: the specs, the registry (:func:`resolve_dataset`, :func:`read_labels`) and a
  dataset's folder on disk.
- ``readers``: one label reader per distributed format, registered on import.
- ``splits``: train/test splits and their JSON form.
- ``parallel``: one function over many images, across processes.
- ``check``: every label parses and every listed image decodes.
- ``prepare``: the 384 px resize cache, and loading an image as training sees it.

The names below are this package's API; they are defined in the modules above.
"""

from __future__ import annotations

from loda_cli.datasets import readers  # noqa: F401  (importing it registers the readers)
from loda_cli.datasets.check import CheckReport, check_dataset
from loda_cli.datasets.prepare import (
    PrepareReport,
    default_cache_dir,
    load_training_image,
    prepare_dataset,
    prepared_path,
    resize_short_side,
)
from loda_cli.datasets.specs import (
    DEFAULT_SEED,
    PREPARED_DIR,
    SHORT_SIDE,
    DatasetPathError,
    DatasetSpec,
    LabelItem,
    LabelSet,
    Progress,
    Reader,
    UnknownDatasetError,
    csv_spec,
    dataset_names,
    dataset_root,
    read_labels,
    register_dataset,
    resolve_dataset,
)
from loda_cli.datasets.splits import (
    Split,
    load_splits_json,
    make_splits,
    splits_from_json,
    splits_to_json,
)

__all__ = [
    "DEFAULT_SEED",
    "PREPARED_DIR",
    "SHORT_SIDE",
    "CheckReport",
    "DatasetPathError",
    "DatasetSpec",
    "LabelItem",
    "LabelSet",
    "PrepareReport",
    "Progress",
    "Reader",
    "Split",
    "UnknownDatasetError",
    "check_dataset",
    "csv_spec",
    "dataset_names",
    "dataset_root",
    "default_cache_dir",
    "load_splits_json",
    "load_training_image",
    "make_splits",
    "prepare_dataset",
    "prepared_path",
    "read_labels",
    "register_dataset",
    "resize_short_side",
    "resolve_dataset",
    "splits_from_json",
    "splits_to_json",
]
