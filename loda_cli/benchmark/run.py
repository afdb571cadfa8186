"""Executing a benchmark plan: reuse finished results, test existing checkpoints, train missing
ones when asked, and store each run's result.

Test protocol (the paper's): every test image gives 15 random 224 crops from a generator seeded by
(seed 3407, image index), the prediction is the mean raw output over the image's crops, and
SRCC/PLCC/KRCC/RMSE come from :func:`loda_cli.metrics.evaluate` (PLCC and RMSE after the VQEG
logistic). These are the crops ``train`` evaluates each epoch with, so a run's benchmark SRCC
matches the last epoch's SRCC in the checkpoint's training log.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from loda_cli.benchmark.paper import DISTORTION_GROUPS, KADID_CATEGORIES, KADID_TYPES
from loda_cli.benchmark.plan import (
    BenchmarkSettings,
    Plan,
    Run,
    checkpoint_refusal,
    dataset_folder,
    file_fingerprint,
    reusable_result,
    run_identity,
    train_config,
)
from loda_cli.benchmark.report import Report, summarize, versions, write_json
from loda_cli.errors import BackboneUnavailableError, CheckpointError, DatasetError, UsageError


# --- evaluation ----------------------------------------------------------------------------------


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


# --- execution -----------------------------------------------------------------------------------


@dataclass
class BenchmarkEvent:
    """What :func:`execute` reports: "run" (starting one), "train" (a TrainEvent from ``train``),
    "evaluate" (testing begins), "done", "reused", "skipped"."""

    kind: str
    run: Run
    data: dict[str, Any] = field(default_factory=dict)


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
    with the reason; if no run at all could be done, the first reason is raised. A checkpoint
    already there that a run would refuse (:func:`checkpoint_refusal`) stops the plan before
    anything runs, not hours into it.
    """
    from loda_cli.scoring import resolve_device, resolve_precision

    emit = on_event or (lambda event: None)
    settings = plan.settings
    if settings.by_distortion and not any(r.test_dataset == "kadid10k" for r in plan.runs):
        raise UsageError("--by-distortion needs KADID-10k (its file names carry the distortion type)")
    for run in plan.runs:  # a checkpoint's header first; a stored result only for a refused one
        refusal = checkpoint_refusal(run, settings) if run.checkpoint.is_file() else None
        if refusal and reusable_result(run, settings) is None:
            raise CheckpointError(f"{refusal}; move it away or point --checkpoints elsewhere")
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
        previous = reusable_result(run, settings)
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
        absent = [str(path) for path in settings.data.values() if not Path(path).exists()]
        raise UsageError(
            f"no run of {plan.name} has a checkpoint in {settings.checkpoint_dir()}; pass --train to "
            f"train them, or --checkpoints DIR where loda-<dataset>-split<K>.safetensors files are"
            + (f". The --data folder does not exist either: {', '.join(absent)}" if absent else "")
        )
    summary = summarize(plan, results)
    return Report(plan, results, skipped, summary, time.perf_counter() - started)


class _Skip(Exception):
    """A run that cannot be done now (no checkpoint and no --train); not an error."""


def _do_run(run: Run, settings: BenchmarkSettings, context: _Context, device: str, precision: str,
            emit: Callable[[BenchmarkEvent], None]) -> dict[str, Any]:
    from loda_cli.datasets import make_splits
    from loda_cli.weights import file_sha256

    if not run.checkpoint.is_file():
        if not settings.train:
            raise _Skip(f"no checkpoint {run.checkpoint.name}; pass --train to train it")
        from loda_cli.train import train

        cfg = train_config(run, settings)
        train(cfg, on_event=lambda event: emit(BenchmarkEvent("train", run, {"event": event})))
    refusal = checkpoint_refusal(run, settings)
    if refusal:
        raise CheckpointError(f"{refusal}; move it away or point --checkpoints elsewhere")
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
        "identity": run_identity(run, settings),
        "run": run.describe(),
        "test_dataset": run.test_dataset,
        "protocol": settings.protocol(),
        "metrics": score_predictions(raw, mos),
        "checkpoint": str(run.checkpoint),
        "checkpoint_sha256": file_sha256(run.checkpoint),
        "checkpoint_file": file_fingerprint(run.checkpoint),
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
    write_json(run.result, result)
    return result
