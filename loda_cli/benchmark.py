"""The paper's accuracy protocol and its tables: plan the runs, train what is missing, evaluate, and
report medians beside the paper's numbers. The library side of ``loda benchmark``; it never prints.

A *run* is one (training dataset, split, variant[, test dataset]). Its checkpoint is
``<checkpoints>/loda-<dataset>-split<K>[-<variant>].safetensors`` (plain LoDa uses ``train``'s
default name, so checkpoints trained with ``loda train`` are found) and its result is
``<results>/runs/<run id>.json``. Runs share checkpoints and results across tables: Table 1's
KADID LoDa runs are also Table 3's IN-21K row, Table 4's ViT-B row, Table 6's and Table 7's LoDa
rows, and Table 2 tests Table 1's checkpoints on other datasets.

Test protocol (the paper's): every test image gives 15 random 224 crops from a generator seeded by
(seed 3407, image index), the prediction is the mean raw output over the image's crops, and
SRCC/PLCC/KRCC/RMSE come from :func:`loda_cli.metrics.evaluate` (PLCC and RMSE after the VQEG
logistic). These are the crops ``train`` evaluates each epoch with, so a run's benchmark SRCC
matches the last epoch's SRCC in the checkpoint's training log. A table reports the median over
splits.

Order of this file: the paper's numbers and the table presets (data), splits, planning, time
estimates, evaluation, execution, summaries and rendering.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from loda_cli.config import DEFAULT_CNN, DEFAULT_VIT, VIT_PRETRAINING, VIT_SIZES, LoDaConfig, TrainConfig
from loda_cli.errors import BackboneUnavailableError, CheckpointError, DatasetError, UsageError

# ---------------------------------------------------------------------------------------------
# The paper's numbers (Xu et al., CVPR 2024): {table: {(row, column): {metric: value}}}. Rows are
# variant keys, columns dataset names ("train->test" for Table 2).


def _pairs(row: str, values: dict[str, tuple[float, ...]]) -> dict[tuple[str, str], dict[str, float]]:
    out = {}
    for column, numbers in values.items():
        out[(row, column)] = dict(zip(("srcc", "plcc"), numbers))
    return out


PAPER: dict[int, dict[tuple[str, str], dict[str, float]]] = {
    1: _pairs("loda", {
        "live": (0.975, 0.979), "tid2013": (0.869, 0.901), "kadid10k": (0.931, 0.936),
        "livec": (0.876, 0.899), "koniq10k": (0.932, 0.944), "spaq": (0.925, 0.928),
        "flive": (0.578, 0.679),
    }),
    2: _pairs("loda", {
        "flive->koniq10k": (0.763,), "flive->livec": (0.805,),
        "livec->koniq10k": (0.745,), "koniq10k->livec": (0.811,),
    }),
    3: {
        **_pairs("mae", {"kadid10k": (0.917, 0.924), "koniq10k": (0.927, 0.938)}),
        **_pairs("clip", {"kadid10k": (0.897, 0.902), "koniq10k": (0.909, 0.923)}),
        **_pairs("in1k", {"kadid10k": (0.912, 0.920), "koniq10k": (0.920, 0.933)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944)}),
    },
    4: {
        **_pairs("tiny", {"kadid10k": (0.892, 0.900), "koniq10k": (0.914, 0.926), "spaq": (0.922, 0.927)}),
        **_pairs("small", {"kadid10k": (0.915, 0.922), "koniq10k": (0.928, 0.939), "spaq": (0.924, 0.928)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944), "spaq": (0.925, 0.928)}),
    },
    5: {
        **_pairs("frac0.2", {"koniq10k": (0.907, 0.923), "livec": (0.815, 0.854)}),
        **_pairs("frac0.4", {"koniq10k": (0.922, 0.935), "livec": (0.849, 0.879)}),
        **_pairs("frac0.6", {"koniq10k": (0.928, 0.940), "livec": (0.869, 0.891)}),
    },
    6: {
        **_pairs("linear", {"kadid10k": (0.676, 0.701), "koniq10k": (0.796, 0.833), "spaq": (0.861, 0.867)}),
        **_pairs("full", {"kadid10k": (0.889, 0.899), "koniq10k": (0.874, 0.891), "spaq": (0.918, 0.922)}),
        **_pairs("adapter", {"kadid10k": (0.914, 0.920), "koniq10k": (0.926, 0.939), "spaq": (0.925, 0.928)}),
        **_pairs("lora", {"kadid10k": (0.913, 0.921), "koniq10k": (0.921, 0.934), "spaq": (0.924, 0.928)}),
        **_pairs("vpt", {"kadid10k": (0.889, 0.900), "koniq10k": (0.919, 0.932), "spaq": (0.923, 0.926)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944), "spaq": (0.925, 0.928)}),
    },
    7: {
        **_pairs("full", {"kadid10k": (0.889, 0.899), "koniq10k": (0.874, 0.891)}),
        **_pairs("add", {"kadid10k": (0.915, 0.921), "koniq10k": (0.925, 0.936)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944)}),
    },
}

DATASET_TITLES = {
    "live": "LIVE", "tid2013": "TID2013", "kadid10k": "KADID-10k", "livec": "LIVEC",
    "koniq10k": "KonIQ-10k", "spaq": "SPAQ", "flive": "FLIVE",
}
# Image counts for estimates when a dataset is not on disk (FLIVE: the paper's count).
NOMINAL_SIZES = {
    "live": 779, "tid2013": 3000, "kadid10k": 10125, "livec": 1162, "koniq10k": 10073,
    "spaq": 11125, "flive": 39810,
}


# ---------------------------------------------------------------------------------------------
# Table presets


@dataclass(frozen=True)
class Variant:
    """One row of a table: a training method, a ViT (a key of VIT_SIZES / VIT_PRETRAINING; None is
    the paper's default) and a training fraction."""

    key: str
    title: str
    method: str = "loda"
    vit_key: Optional[str] = None
    train_fraction: float = 1.0

    @property
    def vit(self) -> str:
        if self.vit_key is None:
            return DEFAULT_VIT
        return {**VIT_SIZES, **VIT_PRETRAINING}[self.vit_key]

    @property
    def tag(self) -> str:
        """The variant's part of checkpoint and run names; empty for the paper's LoDa."""
        parts = []
        if self.method != "loda":
            parts.append(self.method)
        if self.vit != DEFAULT_VIT:
            parts.append(f"vit-{self.vit_key}")
        if self.train_fraction != 1.0:
            parts.append(f"frac{self.train_fraction:g}")
        return "-".join(parts)


LODA = Variant("loda", "LoDa")


@dataclass(frozen=True)
class TableSpec:
    number: int
    title: str
    variants: tuple[Variant, ...]
    datasets: tuple[str, ...] = ()  # columns: the training datasets
    cross: tuple[tuple[str, str], ...] = ()  # Table 2: (train, test) columns instead
    metrics: tuple[str, ...] = ("srcc", "plcc")
    row_header: str = "Method"

    def columns(self) -> list[str]:
        return [f"{a}->{b}" for a, b in self.cross] if self.cross else list(self.datasets)


TABLES: dict[int, TableSpec] = {
    1: TableSpec(1, "Performance comparison measured by medians of SRCC and PLCC", (LODA,),
                 datasets=("live", "tid2013", "kadid10k", "livec", "koniq10k", "spaq", "flive")),
    2: TableSpec(2, "SRCC on the cross datasets validation", (LODA,),
                 cross=(("flive", "koniq10k"), ("flive", "livec"), ("livec", "koniq10k"), ("koniq10k", "livec")),
                 metrics=("srcc",)),
    3: TableSpec(3, "Impact of large-scale pretrained models", (
        Variant("mae", "MAE", vit_key="mae"),
        Variant("clip", "Multi-Modal", vit_key="clip"),
        Variant("in1k", "ImageNet-1K", vit_key="in1k"),
        Variant("loda", "ImageNet-21K"),
    ), datasets=("kadid10k", "koniq10k"), row_header="Pre-train"),
    4: TableSpec(4, "Impact of large-scale pretrained model sizes", (
        Variant("tiny", "ViT-T", vit_key="tiny"),
        Variant("small", "ViT-S", vit_key="small"),
        Variant("loda", "ViT-B"),
    ), datasets=("kadid10k", "koniq10k", "spaq"), row_header="Backbone"),
    5: TableSpec(5, "Data-efficient learning with 20%, 40% and 60% of the training set", (
        Variant("frac0.2", "20% LoDa", train_fraction=0.2),
        Variant("frac0.4", "40% LoDa", train_fraction=0.4),
        Variant("frac0.6", "60% LoDa", train_fraction=0.6),
    ), datasets=("koniq10k", "livec"), row_header="Mode"),
    6: TableSpec(6, "Comparisons with different fine-tuning methods", (
        Variant("linear", "ViT (Linear Probe)", method="linear"),
        Variant("full", "ViT (Full fine-tune)", method="full"),
        Variant("adapter", "Adapter-ViT", method="adapter"),
        Variant("lora", "LoRA-ViT", method="lora"),
        Variant("vpt", "VPT-ViT", method="vpt"),
        LODA,
    ), datasets=("kadid10k", "koniq10k", "spaq"), row_header="Fine-tuning Methods"),
    # Table 7's "ViT" is the fully fine-tuned ViT (the paper reports Table 6's full fine-tune
    # numbers for it), so it shares Table 6's "full" checkpoints.
    7: TableSpec(7, "Ablation experiments", (
        Variant("full", "ViT", method="full"),
        Variant("add", "ViT + Extractor", method="add"),
        LODA,
    ), datasets=("kadid10k", "koniq10k"), row_header="Module"),
}


# ---------------------------------------------------------------------------------------------
# KADID-10k distortion types (paper Figure 4)

KADID_TYPES: dict[int, str] = {
    1: "gaussian blur", 2: "lens blur", 3: "motion blur", 4: "color diffusion", 5: "color shift",
    6: "color quantization", 7: "color saturation 1", 8: "color saturation 2", 9: "jpeg2000",
    10: "jpeg", 11: "white noise", 12: "white noise in color component", 13: "impulse noise",
    14: "multiplicative noise", 15: "denoise", 16: "brighten", 17: "darken", 18: "mean shift",
    19: "jitter", 20: "non-eccentricity patch", 21: "pixelate", 22: "quantization",
    23: "color block", 24: "high sharpen", 25: "contrast change",
}
# Figure 4 groups "the 25 distortion types of KADID-10k into nine typical types, as outlined in
# [54]" (LIQE). LIQE maps KADID's types onto 11 classes: blur (01-03 and 05, which LIQE calls
# "shifting"), color (04, 07, 08), quantization (06, 22), JPEG2000 (09), JPEG (10), noise
# (11-15), overexposure (16), underexposure (17), other (18), spatial (19-21, 23) and contrast
# (24, 25). Nine of them come from merging JPEG with JPEG2000 (compression) and over- with
# underexposure (brightness): our reading, since the figure's labels are not in the paper's text.
DISTORTION_GROUPS: dict[str, tuple[int, ...]] = {
    "blur": (1, 2, 3, 5),
    "color": (4, 7, 8),
    "compression": (9, 10),
    "noise": (11, 12, 13, 14, 15),
    "brightness": (16, 17),
    "other": (18,),
    "spatial": (19, 20, 21, 23),
    "quantization": (6, 22),
    "contrast": (24, 25),
}
# KADID-10k's own seven categories (its paper), reported in the JSON beside the above.
KADID_CATEGORIES: dict[str, tuple[int, ...]] = {
    "blurs": (1, 2, 3),
    "color distortions": (4, 5, 6, 7, 8),
    "compression": (9, 10),
    "noise": (11, 12, 13, 14, 15),
    "brightness change": (16, 17, 18),
    "spatial distortions": (19, 20, 21, 22, 23),
    "sharpness and contrast": (24, 25),
}
_KADID_NAME = re.compile(r"^I\d+_(\d{2})_\d{2}\.", re.IGNORECASE)


def kadid_type(name: str) -> Optional[int]:
    """The distortion type (1-25) in a KADID file name ``Iaa_bb_cc.png``; None for others."""
    match = _KADID_NAME.match(Path(name).name)
    return int(match.group(1)) if match else None


def distortion_breakdown(names: Sequence[str], raw: Sequence[float], mos: Sequence[float]) -> dict[str, Any]:
    """SRCC and PLCC (after the logistic fit) within each KADID distortion type and group.

    A group with fewer than 3 images, or constant labels or predictions, gets ``None`` metrics
    and its image count, rather than a number that means nothing.
    """
    types = [kadid_type(n) for n in names]
    if not any(t is not None for t in types):
        raise UsageError("--by-distortion needs KADID-10k test images (Iaa_bb_cc.png names)")

    def measure(members: Sequence[int]) -> dict[str, Any]:
        idx = [i for i, t in enumerate(types) if t in members]
        out: dict[str, Any] = {"n": len(idx), "srcc": None, "plcc": None}
        if len(idx) >= 3:
            from loda_cli.metrics import evaluate

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = evaluate([raw[i] for i in idx], [mos[i] for i in idx])
            if len({mos[i] for i in idx}) > 1 and len({raw[i] for i in idx}) > 1:
                out.update(srcc=m["srcc"], plcc=m["plcc"])
        return out

    return {
        "groups": {g: measure(members) for g, members in DISTORTION_GROUPS.items()},
        "kadid_categories": {g: measure(members) for g, members in KADID_CATEGORIES.items()},
        "types": {f"{t:02d} {KADID_TYPES[t]}": measure((t,)) for t in KADID_TYPES},
    }


# ---------------------------------------------------------------------------------------------
# Splits


def parse_splits(text: str) -> list[int]:
    """``"10"`` (a count: splits 0-9), ``"0-9"`` (a range) or ``"0,3,5"`` (a list; ranges may
    appear in it: ``"0-2,7"``). Returns sorted unique split indices."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        count = int(text)
        if count < 1:
            raise UsageError("--splits must name at least one split")
        return list(range(count))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise UsageError(f"--splits range {part!r} runs backwards")
            chosen.update(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            chosen.add(int(part))
        else:
            raise UsageError(f"--splits {text!r}: use a count (10), a range (0-9) or a list (0,3,5)")
    return sorted(chosen)


def format_splits(splits: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``; a lone split ``k`` is ``"k-k"`` (a bare number is a count)."""
    if len(splits) == 1:
        return f"{splits[0]}-{splits[0]}"
    parts, run = [], []
    for s in sorted(splits):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def median(values: Sequence[float]) -> Optional[float]:
    """The median the paper reports (mean of the two middle values for an even count)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(values)) if values else None


# ---------------------------------------------------------------------------------------------
# Settings and planning


@dataclass
class BenchmarkSettings:
    """Where things are and how runs train and test. The defaults are the paper's protocol."""

    data_root: Optional[Path] = None  # folder holding every dataset as <root>/<canonical name>
    data: dict[str, Path] = field(default_factory=dict)  # explicit folders, by canonical name
    checkpoints: Optional[Path] = None  # default: $LODA_HOME/checkpoints
    results: Path = Path("results")
    train: bool = False
    deterministic_crops: bool = False
    test_crops: int = 15
    seed: int = 3407
    n_splits: int = 10
    by_distortion: bool = False
    # Training overrides (smoke runs). vit/cnn/vit_kwargs replace every variant's backbones.
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    vit: Optional[str] = None
    vit_kwargs: Optional[dict[str, Any]] = None
    cnn: Optional[str] = None
    pretrained: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig field
    device: str = "auto"
    precision: str = "auto"
    workers: Optional[int] = None

    def checkpoint_dir(self) -> Path:
        if self.checkpoints is not None:
            return Path(self.checkpoints).expanduser()
        from loda_cli.home import checkpoints_dir

        return checkpoints_dir()

    def protocol(self) -> dict[str, Any]:
        return {"crops": self.test_crops, "grid": self.deterministic_crops, "seed": self.seed}


@dataclass
class Run:
    id: str
    dataset: str  # the training dataset
    split: int
    variant: Variant
    column: str  # the table column this run fills
    checkpoint: Path
    result: Path
    test_on: Optional[str] = None  # cross-dataset: test on every image of this dataset

    @property
    def test_dataset(self) -> str:
        return self.test_on or self.dataset

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "dataset": self.dataset, "split": self.split, "variant": self.variant.key,
                "method": self.variant.method, "train_fraction": self.variant.train_fraction,
                "test_on": self.test_on, "checkpoint": str(self.checkpoint)}


@dataclass
class Plan:
    name: str
    title: str
    spec: TableSpec
    splits: list[int]
    runs: list[Run]
    settings: BenchmarkSettings
    paper_table: Optional[int]  # which of PAPER the cells compare with

    def paper_value(self, row: str, column: str, metric: str) -> Optional[float]:
        if self.paper_table is None:
            return None
        return PAPER[self.paper_table].get((row, column), {}).get(metric)


def _canonical(name: str) -> str:
    from loda_cli.datasets import resolve_dataset

    return resolve_dataset(name).name


def _make_run(dataset: str, split: int, variant: Variant, settings: BenchmarkSettings,
              test_on: Optional[str] = None) -> Run:
    tag = f"-{variant.tag}" if variant.tag else ""
    checkpoint = settings.checkpoint_dir() / f"loda-{dataset}-split{split}{tag}.safetensors"
    run_id = f"{dataset}-split{split}{tag}"
    if test_on:
        run_id += f"-on-{test_on}"
    if settings.deterministic_crops:
        run_id += "-grid"
    if settings.test_crops != 15:
        run_id += f"-c{settings.test_crops}"
    column = f"{dataset}->{test_on}" if test_on else dataset
    result = Path(settings.results) / "runs" / f"{run_id}.json"
    return Run(run_id, dataset, split, variant, column, checkpoint, result, test_on)


def plan_table(number: int, splits: Sequence[int], settings: BenchmarkSettings,
               variants: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None) -> Plan:
    """Every run of a paper table: its datasets (or Table 2's pairs) x splits x variants.

    ``variants`` and ``datasets`` restrict the preset (by variant key / dataset name), for partial
    reproductions and fast tests; the table keeps the paper's layout with the rest left empty.
    """
    if number not in TABLES:
        raise UsageError(f"--table must be 1-7, not {number}")
    spec = TABLES[number]
    chosen = [v for v in spec.variants if variants is None or v.key in variants]
    if variants is not None and len(chosen) != len(set(variants)):
        known = ", ".join(v.key for v in spec.variants)
        raise UsageError(f"table {number} has variants {known}; got {', '.join(variants)}")
    keep = None if datasets is None else {_canonical(d) for d in datasets}
    runs = []
    if spec.cross:
        # Grouped by checkpoint, so each trained model is loaded once for all its test sets.
        for source in dict.fromkeys(a for a, _ in spec.cross):
            for variant in chosen:
                for split in splits:
                    for a, b in spec.cross:
                        if a == source and (keep is None or a in keep or b in keep):
                            runs.append(_make_run(a, split, variant, settings, test_on=b))
    else:
        for dataset in spec.datasets:
            if keep is not None and dataset not in keep:
                continue
            for variant in chosen:
                for split in splits:
                    runs.append(_make_run(dataset, split, variant, settings))
    return Plan(f"table{number}", f"Table {number}: {spec.title}", spec, list(splits), runs, settings, number)


def plan_dataset(dataset: str, splits: Sequence[int], settings: BenchmarkSettings,
                 test_on: Optional[str] = None) -> Plan:
    """LoDa on one dataset (``loda benchmark kadid``), or trained on it and tested on every image
    of ``test_on`` (the cross-dataset protocol of Table 2)."""
    dataset = _canonical(dataset)
    if dataset in ("csv", "synthetic"):
        raise UsageError(f"the accuracy benchmark runs on the paper's datasets, not {dataset!r}")
    if test_on is not None:
        test_on = _canonical(test_on)
        if test_on == dataset:
            raise UsageError("--test-on names the training dataset itself; drop it for the usual protocol")
    runs = [_make_run(dataset, split, LODA, settings, test_on=test_on) for split in splits]
    if test_on:
        spec = TableSpec(2, "cross-dataset SRCC", (LODA,), cross=((dataset, test_on),))
        name = f"{dataset}-on-{test_on}"
        title = f"Cross-dataset SRCC: trained on {column_title(dataset)}, tested on {column_title(test_on)}"
        paper = 2 if ("loda", f"{dataset}->{test_on}") in PAPER[2] else None
    else:
        spec = TableSpec(1, "median SRCC and PLCC", (LODA,), datasets=(dataset,))
        name, title, paper = dataset, f"{column_title(dataset)}: median SRCC and PLCC", 1
    return Plan(name, title, spec, list(splits), runs, settings, paper)


def dataset_folder(dataset: str, settings: BenchmarkSettings) -> Path:
    """``settings.data[dataset]``, else ``<data_root>/<dataset>``, else $LODA_DATA/~/datasets."""
    from loda_cli import datasets

    spec = datasets.resolve_dataset(dataset)
    if dataset in settings.data:
        return datasets.dataset_root(spec, settings.data[dataset])
    if settings.data_root is not None:
        return datasets.dataset_root(spec, Path(settings.data_root).expanduser() / spec.name)
    return datasets.dataset_root(spec, None)


def train_config(run: Run, settings: BenchmarkSettings) -> TrainConfig:
    """The TrainConfig of a run: the paper's protocol, the variant, then the smoke overrides."""
    from loda_cli.baselines import METHOD_LR

    method = run.variant.method
    model = LoDaConfig(
        vit=settings.vit or run.variant.vit,
        vit_kwargs=dict(settings.vit_kwargs or {}),
        cnn=settings.cnn or DEFAULT_CNN,
        trainable="full" if method in ("full", "vit") else "adapters",
    )
    cfg = TrainConfig(
        dataset=run.dataset, data=str(dataset_folder(run.dataset, settings)), split=run.split,
        n_splits=max(settings.n_splits, run.split + 1), seed=settings.seed, lr=METHOD_LR[method],
        train_fraction=run.variant.train_fraction, test_crops=settings.test_crops, model=model,
        pretrained=settings.pretrained, method=method, out=str(run.checkpoint), resume=True,
        workers=settings.workers, device=settings.device, precision=settings.precision,
    )
    if settings.epochs is not None:
        cfg.epochs = settings.epochs
    if settings.batch_size is not None:
        cfg.batch_size = settings.batch_size
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in settings.train_overrides.items():
        if key not in names:
            raise UsageError(f"unknown training setting {key!r}")
        setattr(cfg, key, value)
    return cfg


def expected_identity(run: Run, settings: BenchmarkSettings) -> dict[str, Any]:
    """What a run's checkpoint must have been trained as (compared with its metadata)."""
    method = run.variant.method
    identity: dict[str, Any] = {
        "method": "full" if method == "vit" else method,
        "vit": settings.vit or run.variant.vit,
        "cnn": settings.cnn or DEFAULT_CNN,
        "dataset": run.dataset,
        "split": run.split,
        "train_fraction": run.variant.train_fraction,
    }
    if settings.epochs is not None:
        identity["epochs"] = settings.epochs
    return identity


def checkpoint_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The same fields read from a checkpoint's metadata; absent ones are None (not compared)."""
    method = meta.get("method") or "loda"
    dataset = meta.get("dataset") or {}
    config = meta.get("config") or {}
    return {
        "method": "full" if method == "vit" else method,
        "vit": config.get("vit"),
        "cnn": config.get("cnn"),
        "dataset": dataset.get("name"),
        "split": dataset.get("split"),
        "train_fraction": dataset.get("train_fraction"),
        "epochs": (meta.get("train") or {}).get("epochs"),
    }


def identity_mismatch(run: Run, settings: BenchmarkSettings, meta: dict[str, Any]) -> Optional[str]:
    expected = expected_identity(run, settings)
    found = checkpoint_identity(meta)
    wrong = [f"{k} {found[k]!r} (expected {v!r})" for k, v in expected.items()
             if found.get(k) is not None and found[k] != v]
    return ", ".join(wrong) if wrong else None


# ---------------------------------------------------------------------------------------------
# Status and time estimates

# Throughput assumed for --dry-run estimates, in 224x224 crops per second. Measured for this code
# on one H100 80GB (torch 2.11, bf16, random weights, model only: no decoding): LoDa ViT-B/16 +
# ResNet-50 trains at 1556 crops/s (batch 128, forward + backward + AdamW) and tests at 2671
# crops/s (``predict``'s batches of 60 crops). A run on real data adds decoding (use the 384 px
# cache of ``loda data prepare``); other GPUs scale roughly with their bf16 throughput.
TRAIN_CROPS_PER_S = 1500.0
EVAL_CROPS_PER_S = 2600.0
# Cost of a crop relative to ViT-B LoDa, from the same measurement (training, test).
VIT_COST = {"tiny": (0.66, 0.82), "small": (0.69, 0.68)}
METHOD_COST = {
    "linear": (0.19, 0.35), "full": (0.66, 0.37), "vit": (0.66, 0.37), "adapter": (0.57, 0.43),
    "lora": (0.57, 0.44), "vpt": (0.54, 0.39), "add": (0.95, 0.88),
}


def run_status(run: Run, settings: BenchmarkSettings) -> str:
    """"done" (a result exists), "evaluate" (a checkpoint exists), "train" (will be trained) or
    "missing" (no checkpoint and training not asked for)."""
    if _reusable_result(run, settings) is not None:
        return "done"
    if run.checkpoint.is_file():
        return "evaluate"
    return "train" if settings.train else "missing"


def dataset_sizes(names: Sequence[str], settings: BenchmarkSettings) -> dict[str, tuple[int, bool]]:
    """Image count per dataset: (count, True) read from its labels when on disk, else the
    nominal count and False."""
    from loda_cli import datasets

    out = {}
    for name in names:
        try:
            labels = datasets.read_labels(datasets.resolve_dataset(name), dataset_folder(name, settings))
            out[name] = (len(labels), True)
        except DatasetError:
            out[name] = (NOMINAL_SIZES.get(name, 1000), False)
    return out


def estimate_seconds(run: Run, settings: BenchmarkSettings, sizes: dict[str, tuple[int, bool]],
                     status: Optional[str] = None) -> float:
    """Seconds a run needs at the throughput assumed above: training (epochs x train images x
    crops per image), the per-epoch test and the calibration inside ``train``, then the benchmark's
    own test. A done run costs nothing and an existing checkpoint only the test."""
    from loda_cli.datasets import resolve_dataset

    status = status or run_status(run, settings)
    if status == "done":
        return 0.0
    n = sizes[run.dataset][0]
    n_test_own = n - round(0.8 * n)
    n_test = sizes[run.test_dataset][0] if run.test_on else n_test_own
    vit_train, vit_eval = VIT_COST.get(run.variant.vit_key or "", (1.0, 1.0))
    method_train, method_eval = METHOD_COST.get(run.variant.method, (1.0, 1.0))
    crops = settings.test_crops
    eval_cost = vit_eval * method_eval / EVAL_CROPS_PER_S
    seconds = n_test * crops * eval_cost
    if status == "evaluate":
        return seconds
    epochs = settings.epochs or 10
    n_train = round(0.8 * n) * run.variant.train_fraction
    k = resolve_dataset(run.dataset).crops_per_image
    train_cost = vit_train * method_train / TRAIN_CROPS_PER_S
    seconds += epochs * n_train * k * train_cost
    seconds += epochs * n_test_own * crops * eval_cost  # train evaluates every epoch
    seconds += min(n_train, 2000) * 15 * eval_cost  # calibration on the training images
    return seconds


@dataclass
class DryRunRow:
    run: Run
    status: str
    seconds: float


def dry_run(plan: Plan) -> tuple[list[DryRunRow], dict[str, Any]]:
    """Every run with its status and estimated time, and the totals; nothing is run."""
    names = sorted({r.dataset for r in plan.runs} | {r.test_dataset for r in plan.runs})
    sizes = dataset_sizes(names, plan.settings)
    rows = []
    if_trained = 0.0  # the total had --train been given
    trained: set[Path] = set()
    for run in plan.runs:
        status = run_status(run, plan.settings)
        hypothetical = "train" if status == "missing" else status
        if hypothetical == "train" and run.checkpoint in trained:
            # Another run of this plan trains the checkpoint first (Table 2 tests one twice).
            hypothetical = "evaluate"
            status = "evaluate" if status == "train" else status
        if hypothetical == "train":
            trained.add(run.checkpoint)
        seconds = estimate_seconds(run, plan.settings, sizes, hypothetical)
        if_trained += seconds
        # A missing run shows what it would take with --train.
        rows.append(DryRunRow(run, status, seconds if status == "missing" else
                              estimate_seconds(run, plan.settings, sizes, status)))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    totals = {
        "runs": len(rows), "by_status": counts,
        "seconds": sum(r.seconds for r in rows if r.status != "missing"),
        "seconds_if_trained": if_trained,
        "sizes": {k: {"images": v[0], "from_labels": v[1]} for k, v in sizes.items()},
        "assumption": (f"{TRAIN_CROPS_PER_S:g} training / {EVAL_CROPS_PER_S:g} test crops per second for "
                       f"ViT-B + ResNet-50 LoDa (measured model-only on one H100, bf16; scaled per "
                       f"method and ViT), {plan.settings.epochs or 10} epochs, "
                       f"{plan.settings.test_crops} test crops"),
    }
    return rows, totals


# ---------------------------------------------------------------------------------------------
# Evaluation


def predict_items(model, items, source, settings: BenchmarkSettings, device: str, precision: str) -> list[float]:
    """Mean raw prediction per item, in item order (the paper's random crops, or the grid)."""
    from loda_cli.config import Preprocess
    from loda_cli.data import TestCrops, predict

    dataset = TestCrops(items, source, n=settings.test_crops, seed=settings.seed, grid=settings.deterministic_crops)
    workers = settings.workers if settings.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    raw = predict(model, dataset, Preprocess(), device, precision, workers=workers)
    return [raw[i] for i in range(len(items))]


def score_predictions(raw: Sequence[float], mos: Sequence[float]) -> dict[str, Any]:
    """SRCC, PLCC, KRCC and RMSE (logistic fit, fallback recorded) of one run."""
    from loda_cli.metrics import MetricWarning, evaluate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        metrics = evaluate(raw, mos)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, MetricWarning)})
    if notes:
        metrics["warnings"] = notes
    return metrics


# ---------------------------------------------------------------------------------------------
# Execution


@dataclass
class BenchmarkEvent:
    """What :func:`execute` reports: "run" (starting one), "train" (a TrainEvent from ``train``),
    "evaluate" (testing begins), "done", "reused", "skipped"."""

    kind: str
    run: Run
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    plan: Plan
    results: dict[str, dict[str, Any]]  # run id -> result
    skipped: dict[str, str]  # run id -> why
    summary: dict[str, Any]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan.settings).items()}
        settings["data"] = {k: str(v) for k, v in plan.settings.data.items()}
        settings["checkpoints"] = str(plan.settings.checkpoint_dir())
        from loda_cli.baselines import HYPERPARAMETERS

        return {
            "name": plan.name, "title": plan.title,
            "table": plan.paper_table if plan.name.startswith("table") else None,
            "splits": plan.splits, "settings": settings, "protocol": plan.settings.protocol(),
            "hyperparameters": HYPERPARAMETERS, "summary": self.summary,
            "runs": [{**run.describe(), "status": "done" if run.id in self.results else "skipped",
                      "reason": self.skipped.get(run.id),
                      "result": str(run.result) if run.id in self.results else None,
                      "metrics": _headline(self.results.get(run.id)),
                      "checkpoint_sha256": (self.results.get(run.id) or {}).get("checkpoint_sha256")}
                     for run in plan.runs],
            "versions": versions(), "elapsed_s": round(self.elapsed_s, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _headline(result: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not result:
        return None
    return {k: result["metrics"].get(k) for k in ("n", "srcc", "plcc", "krcc", "rmse", "fit_method")}


def versions() -> dict[str, Any]:
    from importlib import metadata

    from loda_cli import __version__

    out: dict[str, Any] = {"loda": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "timm", "numpy", "scipy", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def _file_fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _run_identity(run: Run, settings: BenchmarkSettings) -> dict[str, Any]:
    return {**expected_identity(run, settings), "test_on": run.test_on, "protocol": settings.protocol()}


def _reusable_result(run: Run, settings: BenchmarkSettings) -> Optional[dict[str, Any]]:
    """A stored result for this exact run and protocol, still matching its checkpoint file."""
    if not run.result.is_file():
        return None
    try:
        result = json.loads(run.result.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("identity") != json.loads(json.dumps(_run_identity(run, settings))):
        return None
    if run.checkpoint.is_file():
        if result.get("checkpoint_file") != _file_fingerprint(run.checkpoint):
            from loda_cli.weights import file_sha256

            if result.get("checkpoint_sha256") != file_sha256(run.checkpoint):
                return None  # retrained since: test again
    return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Context:
    """Labels, splits and image sources, read once per dataset; the last model loaded."""

    def __init__(self, settings: BenchmarkSettings):
        self.settings = settings
        self.labels: dict[str, Any] = {}
        self.model_path: Optional[Path] = None
        self.model = None
        self.meta: dict[str, Any] = {}

    def dataset(self, name: str):
        if name not in self.labels:
            from loda_cli import datasets
            from loda_cli.data import ImageSource

            spec = datasets.resolve_dataset(name)
            root = dataset_folder(name, self.settings)
            labels = datasets.read_labels(spec, root)
            cache = datasets.default_cache_dir(root)
            self.labels[name] = (spec, root, labels, ImageSource(spec, root, cache if cache.is_dir() else None))
        return self.labels[name]

    def load(self, path: Path, device: str):
        if self.model_path != path:
            from loda_cli.weights import load_checkpoint

            self.model = None  # free the previous one first
            self.model, self.meta = load_checkpoint(path, device=device)
            self.model_path = path
        return self.model, self.meta


def execute(plan: Plan, on_event: Optional[Callable[[BenchmarkEvent], None]] = None) -> Report:
    """Run a plan: reuse finished results, test existing checkpoints, train missing ones when
    ``settings.train`` (``train`` resumes a killed run), then summarise.

    A run whose dataset is not on disk, or whose pretrained backbone is unavailable, is skipped
    with the reason; if no run at all could be done, the first reason is raised.
    """
    from loda_cli.scoring import resolve_device, resolve_precision

    emit = on_event or (lambda event: None)
    settings = plan.settings
    if settings.by_distortion and not any(r.test_dataset == "kadid10k" for r in plan.runs):
        raise UsageError("--by-distortion needs KADID-10k (its file names carry the distortion type)")
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    if precision == "fp16" and device == "cpu":
        precision = "bf16"
    context = _Context(settings)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    errors: list[Exception] = []
    started = time.perf_counter()
    for run in plan.runs:
        emit(BenchmarkEvent("run", run, {"index": len(results) + len(skipped), "total": len(plan.runs)}))
        previous = _reusable_result(run, settings)
        if previous is not None:
            results[run.id] = previous
            emit(BenchmarkEvent("reused", run, {"result": previous}))
            continue
        try:
            results[run.id] = _do_run(run, settings, context, device, precision, emit)
        except _Skip as skip:
            skipped[run.id] = str(skip)
            emit(BenchmarkEvent("skipped", run, {"reason": str(skip)}))
        except (DatasetError, BackboneUnavailableError) as exc:
            errors.append(exc)
            skipped[run.id] = str(exc)
            emit(BenchmarkEvent("skipped", run, {"reason": str(exc)}))
        else:
            emit(BenchmarkEvent("done", run, {"result": results[run.id]}))
    if not results:
        if errors:
            raise errors[0]
        raise UsageError(
            f"no run of {plan.name} has a checkpoint in {settings.checkpoint_dir()}; pass --train to "
            f"train them, or --checkpoints DIR where loda-<dataset>-split<K>.safetensors files are"
        )
    summary = summarize(plan, results)
    return Report(plan, results, skipped, summary, time.perf_counter() - started)


class _Skip(Exception):
    """A run that cannot be done now (no checkpoint and no --train); not an error."""


def _do_run(run: Run, settings: BenchmarkSettings, context: _Context, device: str, precision: str,
            emit: Callable[[BenchmarkEvent], None]) -> dict[str, Any]:
    from loda_cli.datasets import make_splits
    from loda_cli.weights import file_sha256, read_metadata

    if not run.checkpoint.is_file():
        if not settings.train:
            raise _Skip(f"no checkpoint {run.checkpoint.name}; pass --train to train it")
        from loda_cli.train import train

        cfg = train_config(run, settings)
        train(cfg, on_event=lambda event: emit(BenchmarkEvent("train", run, {"event": event})))
    meta = read_metadata(run.checkpoint)
    wrong = identity_mismatch(run, settings, meta)
    if wrong:
        raise CheckpointError(
            f"{run.checkpoint} was trained with {wrong}; move it away or point --checkpoints elsewhere"
        )
    t0 = time.perf_counter()
    spec, _, labels, source = context.dataset(run.test_dataset)
    if run.test_on:
        indices = list(range(len(labels)))  # cross-dataset: every image, no adaptation
    else:
        splits = make_splits(labels, spec, seed=settings.seed, n_splits=max(settings.n_splits, run.split + 1))
        indices = splits[run.split].test
    items = [labels.items[i] for i in indices]
    emit(BenchmarkEvent("evaluate", run, {"images": len(items)}))
    model, meta = context.load(run.checkpoint, device)
    raw = predict_items(model, items, source, settings, device, precision)
    mos = [item.mos for item in items]
    result = {
        "id": run.id,
        "identity": _run_identity(run, settings),
        "run": run.describe(),
        "test_dataset": run.test_dataset,
        "protocol": settings.protocol(),
        "metrics": score_predictions(raw, mos),
        "checkpoint": str(run.checkpoint),
        "checkpoint_sha256": file_sha256(run.checkpoint),
        "checkpoint_file": _file_fingerprint(run.checkpoint),
        "checkpoint_metadata": {k: meta.get(k) for k in ("name", "kind", "config", "backbones", "dataset",
                                                         "metrics", "method", "train", "loda_version", "created")},
        "device": device,
        "precision": precision,
        "predictions": {"names": [item.name for item in items], "raw": raw, "mos": mos},
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if run.test_dataset == "kadid10k":
        result["by_distortion"] = distortion_breakdown(result["predictions"]["names"], raw, mos)
    _write_json(run.result, result)
    return result


# ---------------------------------------------------------------------------------------------
# Summaries


METRICS = ("srcc", "plcc", "krcc", "rmse")


def summarize(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Medians over splits for every (row, column) cell, the paper's values and the differences,
    and (for KADID) the per-distortion-group medians."""
    cells = []
    for variant in plan.spec.variants:
        for column in plan.spec.columns():
            runs = [r for r in plan.runs if r.variant.key == variant.key and r.column == column]
            if not runs:
                continue
            done = [results[r.id] for r in runs if r.id in results]
            cell: dict[str, Any] = {"row": variant.key, "title": variant.title, "column": column,
                                    "splits": [r.split for r in runs if r.id in results]}
            for metric in METRICS:
                value = median([d["metrics"].get(metric) for d in done])
                cell[metric] = value
                paper = plan.paper_value(variant.key, column, metric)
                if paper is not None:
                    cell[f"paper_{metric}"] = paper
                    cell[f"diff_{metric}"] = None if value is None else value - paper
            if any("by_distortion" in d for d in done):
                cell["by_distortion"] = _median_breakdown([d["by_distortion"] for d in done if "by_distortion" in d])
            cells.append(cell)
    return {"cells": cells}


def _median_breakdown(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("groups", "kadid_categories", "types"):
        out[section] = {}
        for name in parts[0][section]:
            values = [p[section][name] for p in parts]
            out[section][name] = {
                "srcc": median([v["srcc"] for v in values]),
                "plcc": median([v["plcc"] for v in values]),
                "n": int(sum(v["n"] for v in values)),
            }
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell_text(cell: Optional[dict[str, Any]], metric: str, paper: Optional[float]) -> str:
    value = None if cell is None else cell.get(metric)
    if paper is None:
        return _fmt(value)
    if value is None:
        return f"- ({paper:.3f})"
    return f"{value:.3f} ({paper:.3f}, {value - paper:+.3f})"


def column_title(column: str) -> str:
    if "->" in column:
        a, b = column.split("->")
        return f"{DATASET_TITLES.get(a, a)} -> {DATASET_TITLES.get(b, b)}"
    return DATASET_TITLES.get(column, column)


def render_markdown(report: Report) -> str:
    """The table in the paper's layout (each cell: our median, then the paper's value and the
    difference), every run, the KADID distortion groups when asked for, and a footer with the
    protocol, the baselines' hyper-parameters and the versions."""
    from loda_cli.baselines import HYPERPARAMETERS

    plan, summary = report.plan, report.summary
    spec = plan.spec
    by_key = {(c["row"], c["column"]): c for c in summary["cells"]}
    lines = [f"## {plan.title}", ""]
    splits_text = format_splits(plan.splits)
    if plan.paper_table is not None:
        lines += [f"Each cell: our median over splits {splits_text} (the paper's value, our difference).", ""]
    else:
        lines += [f"Median over splits {splits_text}.", ""]
    header = [spec.row_header]
    for column in spec.columns():
        header += [f"{column_title(column)} {m.upper()}" for m in spec.metrics]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for variant in spec.variants:
        row = [variant.title]
        for column in spec.columns():
            cell = by_key.get((variant.key, column))
            for metric in spec.metrics:
                row.append(_cell_text(cell, metric, plan.paper_value(variant.key, column, metric)))
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "### Runs", "", "| run | split | test images | SRCC | PLCC | KRCC | RMSE | fit |",
              "|---|---|---|---|---|---|---|---|"]
    for run in plan.runs:
        result = report.results.get(run.id)
        if result is None:
            lines.append(f"| {run.id} | {run.split} | - | - | - | - | - | {report.skipped.get(run.id, 'not run')} |")
            continue
        m = result["metrics"]
        lines.append(f"| {run.id} | {run.split} | {m['n']} | {_fmt(m['srcc'])} | {_fmt(m['plcc'])} | "
                     f"{_fmt(m['krcc'])} | {m['rmse']:.4g} | {m['fit_method']} |")

    if plan.settings.by_distortion:
        lines += _render_distortions(plan, summary)

    s = plan.settings
    crop_word = "crop" if s.test_crops == 1 else "crops"
    crops_text = (f"the scorer's grid of {s.test_crops} 224 {crop_word} per test image" if s.deterministic_crops
                  else f"{s.test_crops} random 224 {crop_word} per test image (seed {s.seed})")
    backbone = s.vit or ("per row" if any(v.vit_key for v in spec.variants) else DEFAULT_VIT)
    hp = HYPERPARAMETERS
    lines += [
        "",
        "---",
        f"- Protocol: {crops_text}, mean "
        "raw output per image; SRCC and KRCC on those means, PLCC and RMSE after the 4-parameter "
        "logistic (VQEG); the median over splits. Splits: 80/20, seeded, by reference image for "
        "LIVE/TID2013/KADID." + (" Cross-dataset runs test on every image of the test dataset, "
                                 "without adaptation." if any(r.test_on for r in plan.runs) else ""),
        f"- Training: the paper's protocol (AdamW, PLCC loss, cosine schedule, batch "
        f"{s.batch_size or 128}, {s.epochs or 10} epoch{'' if s.epochs == 1 else 's'}, seed {s.seed}); ViT "
        f"{backbone}, CNN "
        f"{s.cnn or DEFAULT_CNN}{'' if s.pretrained else ', random backbones (not a paper result)'}.",
        f"- Baselines: Houlsby adapters after attention and MLP, bottleneck {hp['adapter_bottleneck']}; "
        f"LoRA on attn.qkv, rank {hp['lora_rank']}, alpha {hp['lora_alpha']:g}; deep VPT, "
        f"{hp['vpt_prompts_per_block']} prompts per block; the same cosine head everywhere; lr "
        f"{hp['lr']['loda']:g} (frozen-backbone methods and LoDa), {hp['lr']['full']:g} (full "
        "fine-tune). \"ViT + Extractor\" adds LoDa's 196 distortion tokens, up-projected, to the "
        "196 patch tokens one to one before every block (no cross-attention).",
    ]
    done = len(report.results)
    if done < len(plan.runs):
        lines.append(f"- {len(plan.runs) - done} of {len(plan.runs)} runs have no result (see Runs).")
    v = versions()
    lines.append(f"- loda {v['loda']}, torch {v['torch']}, timm {v['timm']}, python {v['python']}.")
    return "\n".join(lines) + "\n"


def _render_distortions(plan: Plan, summary: dict[str, Any]) -> list[str]:
    cells = [c for c in summary["cells"] if "by_distortion" in c]
    if not cells:
        return []
    lines = ["", "### KADID-10k by distortion group (paper Figure 4: PLCC; SRCC beside it)", "",
             "Groups: LIQE's classes as the paper says, JPEG + JPEG2000 as compression and over- + "
             "underexposure as brightness, giving nine. The figure's values are not in the paper's "
             "text, so no paper column.", ""]
    header = ["group", "types"]
    for c in cells:
        header += [f"{c['title']} PLCC", f"{c['title']} SRCC"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for group, members in DISTORTION_GROUPS.items():
        row = [group, ", ".join(f"{t:02d}" for t in members)]
        for c in cells:
            g = c["by_distortion"]["groups"][group]
            row += [_fmt(g["plcc"]), _fmt(g["srcc"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(report: Report) -> dict[str, Path]:
    """``<results>/<plan>.json`` (every number) and ``<results>/<plan>.md`` (the table)."""
    folder = Path(report.plan.settings.results)
    paths = {"json": folder / f"{report.plan.name}.json", "markdown": folder / f"{report.plan.name}.md"}
    _write_json(paths["json"], report.to_dict())
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    return paths
