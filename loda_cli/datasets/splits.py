"""Train/test splits (the release's protocol, PAPER-NOTES.md) and their JSON form."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from loda_cli.datasets.specs import DEFAULT_SEED, DatasetSpec, LabelSet
from loda_cli.errors import DatasetError, UsageError

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
    _refuse_duplicates(labels)
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


def _refuse_duplicates(labels: LabelSet) -> None:
    """An image listed twice would land in both the training and the test set of some splits
    (and may carry two different scores): refused, as `loda data check` refuses it."""
    repeats = labels.repeats()
    if repeats:
        first, again = repeats[0]
        raise DatasetError(
            f"{labels.label_file}: {again.name!r} is listed more than once (MOS {first.mos:g} "
            f"and {again.mos:g}; {len(repeats)} repeated rows in all): a repeated image would be in "
            "both the training and the test set. Remove the repeats (`loda data check` lists them)"
        )


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
