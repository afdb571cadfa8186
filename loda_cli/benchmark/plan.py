"""Planning benchmark runs: the settings, the runs of a table or a dataset, the training
configuration and identity of each run, the results already stored, and dry-run estimates.

A *run* is one (training dataset, split, variant[, test dataset]). Its checkpoint is
``<checkpoints>/loda-<dataset>-split<K>[-<variant>].safetensors`` (plain LoDa uses ``train``'s
default name, so checkpoints trained with ``loda train`` are found) and its result is
``<results>/runs/<run id>.json``. Runs share checkpoints and results across tables: Table 1's
KADID LoDa runs are also Table 3's IN-21K row, Table 4's ViT-B row, Table 6's and Table 7's LoDa
rows, and Table 2 tests Table 1's checkpoints on other datasets.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from loda_cli.benchmark.paper import LODA, NOMINAL_SIZES, PAPER, TABLES, TableSpec, Variant, column_title
from loda_cli.config import DEFAULT_CNN, LoDaConfig, TrainConfig
from loda_cli.errors import DatasetError, LodaError, UsageError


# --- splits --------------------------------------------------------------------------------------


def parse_splits(text: str) -> list[int]:
    """``"10"`` (a count: splits 0-9), ``"0-9"`` (a range) or ``"0,3,5"`` (a list; ranges may
    appear in it: ``"0-2,7"``). Returns sorted unique split indices."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        count = int(text)
        if count < 1:
            raise UsageError("--splits 0 asks for no splits (a lone number is a count); "
                             "for split 0 alone write --splits 0-0")
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


# --- settings, runs and plans ------------------------------------------------------------------


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


def canonical_name(name: str) -> str:
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
    keep = None if datasets is None else {canonical_name(d) for d in datasets}
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
    dataset = canonical_name(dataset)
    if dataset in ("csv", "synthetic"):
        raise UsageError(f"the accuracy benchmark runs on the paper's datasets, not {dataset!r}")
    if test_on is not None:
        test_on = canonical_name(test_on)
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
        # The seed draws the split: split 0 of another seed shares most of its test images with
        # this split's training images, so a checkpoint of another seed would score seen images.
        "seed": settings.seed,
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
        "seed": dataset.get("seed"),
        "train_fraction": dataset.get("train_fraction"),
        "epochs": (meta.get("train") or {}).get("epochs"),
    }


def identity_mismatch(run: Run, settings: BenchmarkSettings, meta: dict[str, Any]) -> Optional[str]:
    expected = expected_identity(run, settings)
    found = checkpoint_identity(meta)
    wrong = [f"{k} {found[k]!r} (expected {v!r})" for k, v in expected.items()
             if found.get(k) is not None and found[k] != v]
    return ", ".join(wrong) if wrong else None


# --- results already stored ---------------------------------------------------------------------


def file_fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_identity(run: Run, settings: BenchmarkSettings) -> dict[str, Any]:
    return {**expected_identity(run, settings), "test_on": run.test_on, "protocol": settings.protocol()}


def reusable_result(run: Run, settings: BenchmarkSettings) -> Optional[dict[str, Any]]:
    """A stored result for this exact run and protocol, still matching its checkpoint file."""
    if not run.result.is_file():
        return None
    try:
        result = json.loads(run.result.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("identity") != json.loads(json.dumps(run_identity(run, settings))):
        return None
    if run.checkpoint.is_file():
        if result.get("checkpoint_file") != file_fingerprint(run.checkpoint):
            from loda_cli.weights import file_sha256

            if result.get("checkpoint_sha256") != file_sha256(run.checkpoint):
                return None  # retrained since: test again
    return result


# --- status and dry-run estimates ---------------------------------------------------------------

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
    """"done" (a result exists), "evaluate" (a checkpoint exists), "refused" (a checkpoint exists
    that the run would refuse: see :func:`checkpoint_refusal`), "train" (will be trained) or
    "missing" (no checkpoint and training not asked for)."""
    if reusable_result(run, settings) is not None:
        return "done"
    if run.checkpoint.is_file():
        return "refused" if checkpoint_refusal(run, settings) else "evaluate"
    return "train" if settings.train else "missing"


def checkpoint_refusal(run: Run, settings: BenchmarkSettings) -> Optional[str]:
    """Why the run would refuse its existing checkpoint (unreadable, or trained on another dataset,
    split, seed or architecture), in the words the run itself stops with; None when it is usable."""
    from loda_cli.weights import read_metadata

    try:
        meta = read_metadata(run.checkpoint)
    except (LodaError, OSError) as error:
        return str(error)
    wrong = identity_mismatch(run, settings, meta)
    return f"{run.checkpoint} was trained with {wrong}" if wrong else None


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
    if status in ("done", "refused"):
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
    reason: str = ""  # why a "refused" run would stop


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
                              estimate_seconds(run, plan.settings, sizes, status),
                              (checkpoint_refusal(run, plan.settings) or "") if status == "refused" else ""))
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
