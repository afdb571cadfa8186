"""`loda train DATASET`: train LoDa with the paper's protocol (one or several GPUs, or the CPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from loda_cli.cli.common import announce_generation, err_console, handle_errors, plural

# The built-in model has its own recipe (loda_cli.builtin): LIVE Challenge human opinions over an
# ImageNet CNN, with a detail view. `--preset builtin` runs it; README, "Built-in model".
PRESETS = ("builtin",)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)


@handle_errors
def train_cmd(
    dataset: Annotated[str, typer.Argument(help="koniq10k, kadid10k, spaq, live, livec, tid2013, flive, csv or synthetic (short names work: kadid, koniq, tid...).")],
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder (default: $LODA_DATA/<name>, ~/datasets/<name>). For csv: the CSV file or its folder.")] = None,
    split: Annotated[int, typer.Option(help="Which of the 10 seeded 80/20 splits to train on.")] = 0,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (paper: 10).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training crops per optimiser step, over all GPUs (paper: 128); each image gives --crops-per-image of them an epoch.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (paper: 3e-4), cosine-annealed to 0.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (paper: 1e-2).")] = None,
    crops_per_image: Annotated[Optional[int], typer.Option(help="Random crops per image per epoch (paper: per dataset, 1-10).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the splits, crops and initialisation (paper: 3407).")] = 3407,
    train_fraction: Annotated[float, typer.Option(help="Keep this fraction of the training split (paper Table 5).")] = 1.0,
    vit: Annotated[Optional[str], typer.Option(help="timm ViT name (default: the paper's ViT-B/16 IN-21k).")] = None,
    cnn: Annotated[Optional[str], typer.Option(help="timm CNN name (default: resnet50).")] = None,
    vit_depth: Annotated[Optional[int], typer.Option(help="Override the ViT depth (small experiments).")] = None,
    vit_weights: Annotated[Optional[Path], typer.Option(help="Pretrained ViT weights from a local file (.safetensors, or a tensors-only .pth/.bin) instead of the Hugging Face cache.")] = None,
    cnn_weights: Annotated[Optional[Path], typer.Option(help="Pretrained CNN weights from a local file, as --vit-weights.")] = None,
    method: Annotated[str, typer.Option(help="loda (the paper), or a comparison method: linear, full, adapter, lora, vpt, vit, add.")] = "loda",
    preset: Annotated[Optional[str], typer.Option(help="builtin: rebuild the shipped built-in model from LIVE Challenge split 0's training photos (dataset livec; --data is a folder with labels.csv or the official release).")] = None,
    cross_validate: Annotated[bool, typer.Option("--cv/--no-cv", help="--preset builtin: first measure the recipe by 5-fold cross-validation inside the photos and record it in the checkpoint (scripts/eval_builtin.py --cv measures it apart).")] = False,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random backbone weights (offline experiments).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint path (default: $LODA_HOME/checkpoints/loda-<dataset>-split<K>.safetensors).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its last saved epoch.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16/fp16 on GPUs and AMX CPUs, else fp32), fp32, bf16 or fp16.")] = "auto",
    grad_accum: Annotated[int, typer.Option(help="Split each batch into this many micro-batches (each standardised on its own by the PLCC loss).")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimiser steps (smoke tests).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Synthetic data: batch groups of this many images of one reference, cut at one place, with a per-group PLCC term (0: off, the paper).")] = None,
    warmup: Annotated[Optional[float], typer.Option(help="Linear learning-rate warm-up over this fraction of the steps (paper: 0).")] = None,
    aux_weight: Annotated[Optional[float], typer.Option(help="Synthetic data: weight of a training-only head that names each image's distortions (0: off, the paper).")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(help="Clip the gradient's global norm to this before each step (0: off, the paper).")] = None,
    path_column: Annotated[Optional[str], typer.Option(help="csv dataset: the image path column.")] = None,
    mos_column: Annotated[Optional[str], typer.Option(help="csv dataset: the label column.")] = None,
    lower_better: Annotated[Optional[bool], typer.Option("--lower-better/--higher-better", help="csv dataset: label direction.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    download: Annotated[bool, typer.Option("--download", help="Fetch the dataset first when it is missing (KADID-10k, KonIQ-10k, TID2013; as `loda data download`). In a terminal loda asks instead.")] = False,
) -> None:
    """Train LoDa on a dataset split with the paper's protocol, then save a checkpoint `loda score` uses.

    Example: loda train kadid --download (on a fresh machine), or loda train kadid --data ~/datasets/kadid10k
    """
    from loda_cli.config import LoDaConfig, TrainConfig
    from loda_cli.errors import UsageError
    from loda_cli.train import train

    if preset == "builtin":
        _train_builtin(dataset, data, out, seed, epochs, resume, cross_validate, quiet)
        return
    cfg = TrainConfig(dataset=dataset, split=split, seed=seed, method=method, grad_accum=grad_accum,
                      train_fraction=train_fraction, device=device, precision=precision,
                      path_column=path_column, mos_column=mos_column, lower_better=lower_better)
    if preset:
        raise UsageError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    model_kw = cfg.model.to_dict()
    if vit:
        model_kw["vit"] = vit
    if cnn:
        model_kw["cnn"] = cnn
    if vit_depth is not None:
        model_kw["vit_kwargs"] = {**model_kw["vit_kwargs"], "depth": vit_depth}
    for key, file in (("vit_weights", vit_weights), ("cnn_weights", cnn_weights)):
        if file is not None:
            if not file.is_file():
                raise UsageError(f"--{key.replace('_', '-')}: no such file: {file}")
            model_kw[key] = str(file.resolve())
    if method in ("full", "vit"):
        model_kw["trainable"] = "full"
    cfg.model = LoDaConfig.from_dict(model_kw)
    if method != "loda" and lr is None:
        from loda_cli.baselines import METHOD_LR

        cfg.lr = METHOD_LR.get(method, cfg.lr)  # e.g. 2e-5 for full fine-tuning, not LoDa's 3e-4
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                       ("weight_decay", weight_decay), ("crops_per_image", crops_per_image),
                       ("workers", workers), ("max_steps", max_steps), ("group_size", group_size),
                       ("warmup", warmup), ("aux_weight", aux_weight), ("clip_grad", clip_grad)):
        if value is not None:
            setattr(cfg, key, value)
    if no_pretrained:
        cfg.pretrained = False
    _check_values(cfg, vit_depth)
    if out is not None:
        _check_out(out)  # before the run, not after its last epoch
    cfg.data = str(data) if data else None
    cfg.out = str(out) if out else None
    cfg.resume = resume
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        _prepare(cfg, download, quiet)
    reporter = _Reporter(quiet or not main_rank, cfg)
    try:
        path = train(cfg, reporter)
    finally:
        reporter.close()
    if main_rank:
        err_console.print(f"checkpoint: {path}")


def _check_values(cfg, vit_depth: Optional[int]) -> None:
    """UsageError for a value no run can use (a negative rate, no epochs), before anything loads."""
    from loda_cli.errors import UsageError

    at_least = {  # the option -> (its value, the smallest it may be); None: not given
        "--epochs": (cfg.epochs, 1), "--batch-size": (cfg.batch_size, 1), "--grad-accum": (cfg.grad_accum, 1),
        "--crops-per-image": (cfg.crops_per_image, 1), "--max-steps": (cfg.max_steps, 1),
        "--vit-depth": (vit_depth, 1), "--workers": (cfg.workers, 0), "--group-size": (cfg.group_size, 0),
        "--weight-decay": (cfg.weight_decay, 0), "--aux-weight": (cfg.aux_weight, 0),
        "--clip-grad": (cfg.clip_grad, 0),
    }
    for name, (value, low) in at_least.items():
        if value is not None and value < low:
            raise UsageError(f"{name} {value}: must be {'at least 1' if low else '0 or more'}")
    for name, value, ok, want in (("--lr", cfg.lr, cfg.lr > 0, "above 0"),
                                  ("--train-fraction", cfg.train_fraction, 0 < cfg.train_fraction <= 1,
                                   "above 0 and at most 1"),
                                  ("--warmup", cfg.warmup, 0 <= cfg.warmup < 1, "from 0 up to 1 (a fraction of the steps)")):
        if not ok:
            raise UsageError(f"{name} {value}: must be {want}")


def _check_out(out: Path) -> None:
    """The checkpoint's folder exists or can be made, and takes files."""
    from loda_cli.errors import UsageError

    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give the checkpoint's file name")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to write in {folder}")


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _prepare(cfg, download: bool, quiet: bool) -> None:
    """What comes before a run: its estimated time on this device (with advice where the paper's
    model would take days on a CPU), the dataset (fetched when missing and asked for, or agreed to
    at a prompt in a terminal), and the backbone weights (fetched into timm's cache with progress)."""
    from loda_cli import datasets
    from loda_cli import download as dl
    from loda_cli.errors import DatasetError, UsageError
    from loda_cli.train import _resolve_spec

    spec = _resolve_spec(cfg)
    data = Path(cfg.data) if cfg.data else None
    try:
        root: Optional[Path] = datasets.dataset_root(spec, data)
        missing_error = None
    except DatasetError as exc:
        if not dl.downloadable(spec.name) or not (download or _stdin_is_terminal()):
            raise
        root, missing_error = None, exc
    if not quiet:
        announce_generation(spec, root)
    count = (lambda: len(datasets.read_labels(spec, root))) if root is not None else (lambda: spec.expected_count or 0)
    for line in _estimate_lines(cfg, spec, count):
        if not quiet or line.startswith("warning"):
            err_console.print(line, markup=False, soft_wrap=True)
    if missing_error is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(f"fetch the dataset before starting several processes: loda data download {spec.name}")
        if not download:
            plan = dl.plan(spec, data)
            if not typer.confirm(f"{spec.title} is not in {plan.dest}. Download it now ({plan.describe()})?",
                                 default=True, err=True):
                raise missing_error
        from loda_cli.cli.data import fetch_and_check

        fetch_and_check(spec, data)
    if cfg.pretrained:
        _fetch_backbones(cfg)


def _estimate_lines(cfg, spec, count) -> list[str]:
    """The estimate before a run; ``count()`` gives the dataset's size, read only when there is a
    recorded throughput to estimate with (the paper's model on a CUDA GPU or a CPU)."""
    import torch

    from loda_cli import train_estimate
    from loda_cli.config import DEFAULT_CNN, DEFAULT_VIT
    from loda_cli.scoring import resolve_device

    device = resolve_device(cfg.device)
    paper_model = (cfg.method == "loda" and cfg.model.vit == DEFAULT_VIT and cfg.model.cnn == DEFAULT_CNN
                   and not cfg.model.vit_kwargs and cfg.model.trainable == "adapters")
    if train_estimate.recorded_rate(paper_model, device, 1) is None:
        return []
    n_images = count()
    if not n_images:
        return []
    load = train_estimate.workload(
        n_images, cfg.crops_per_image or spec.crops_per_image, cfg.epochs, cfg.batch_size, cfg.train_fraction,
        cfg.test_crops, cfg.num_crops, cfg.calibration_images, cfg.max_steps)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    return train_estimate.preflight(spec.name, n_images, load, paper_model, device, torch.get_num_threads(), gpu)


def _fetch_backbones(cfg) -> None:
    from loda_cli import backbones
    from loda_cli.cli.data import DownloadView

    names = [] if cfg.model.vit_weights else [cfg.model.vit]
    if cfg.method in ("loda", "add") and not cfg.model.cnn_weights:
        names.append(cfg.model.cnn)
    view = DownloadView()
    try:
        backbones.fetch(names, view)
    finally:
        view.close()


def _train_builtin(dataset: str, data: Optional[Path], out: Optional[Path], seed: int, epochs: Optional[int],
                   resume: bool, cross_validate: bool, quiet: bool) -> None:
    from loda_cli.builtin import BuiltinRecipe, train_builtin
    from loda_cli.errors import UsageError

    if dataset.strip().lower() not in ("livec", "live-challenge", "livechallenge", "csv"):
        raise UsageError("--preset builtin trains on LIVE Challenge: give the dataset livec")
    if data is None:
        raise UsageError("--preset builtin needs --data: a folder with labels.csv, or the official LIVE Challenge release")
    if out is None:
        raise UsageError("--preset builtin needs --out (for example weights/loda-builtin.safetensors)")
    recipe = BuiltinRecipe(seed=seed)
    if epochs is not None:
        recipe.epochs = epochs
    reporter = _BuiltinReporter(quiet)
    path = train_builtin(data, out, recipe, cross_validate_first=cross_validate, resume=resume, emit=reporter)
    err_console.print(f"checkpoint: {path}", markup=False)


class _BuiltinReporter:
    """One line per stage of the built-in recipe: photos read, crops banked, each epoch and fold."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, kind: str, d: dict) -> None:
        if kind == "problem":
            err_console.print(f"skipped: {d['message']}", markup=False)
        if self.quiet:
            return
        if kind == "start":
            err_console.print(f"built-in model: {d['source']}, {d['unreadable']} unreadable, "
                              f"{d['trainable_params']:,} trainable parameters", markup=False)
        elif kind == "bank" and (d["done"] % 100 == 0 or d["done"] == d["total"]):
            err_console.print(f"cutting crops: {d['done']}/{d['total']} photos", markup=False)
        elif kind == "bank_done":
            err_console.print(f"CNN features of {d['crops']:,} crops computed ({d['seconds'] / 60:.1f} min)", markup=False)
        elif kind == "statistics":
            err_console.print(f"teacher statistics of {d['crops']:,} crops computed ({d['seconds'] / 60:.1f} min)",
                              markup=False)
        elif kind == "epoch":
            where = f"fold {d['fold']}/{d['folds']} " if d.get("fold") else "final model "
            err_console.print(f"{where}epoch {d['epoch']}/{d['epochs']}: loss {d['loss']:.4f} ({d['seconds']:.0f} s)",
                              markup=False)
        elif kind == "fold":
            err_console.print(f"fold {d['fold'] + 1}: SRCC {d['srcc']:.4f}, PLCC {d['plcc']:.4f} ({d['n']} held-out "
                              f"photos scored as `loda score` does; on the training crops SRCC {d['bank_srcc']:.4f})",
                              markup=False)
        elif kind == "cv":
            err_console.print(f"cross-validation: median SRCC {d['median_srcc']:.4f}, median PLCC "
                              f"{d['median_plcc']:.4f}", markup=False)
        elif kind == "done":
            shares = d["metrics"]["training_photos_score_shares"]
            err_console.print("training photos below 0.2 / 0.4 / 0.6: " + " / ".join(
                f"{100 * shares[k]:.1f}%" for k in ("below_0.2", "below_0.4", "below_0.6"))
                + f"; {d['minutes']:.1f} min in all", markup=False)


class _Reporter:
    """Draws training events: a progress bar per epoch, a metrics table line per epoch, and after
    the first 10 steps the time the rest of the run needs at the speed measured."""

    def __init__(self, quiet: bool, cfg=None):
        self.quiet = quiet
        self.cfg = cfg
        self.progress = None
        self.task = None
        self.start: dict = {}
        self.timing: Optional[tuple[int, float]] = None  # (step, time) when timing began

    def _measured(self, step: int) -> None:
        """Time 10 steps (from the end of the first, which also builds the loader), then say how
        long the rest takes at that speed."""
        import time

        from loda_cli import train_estimate

        if self.cfg is None or not self.start:
            return
        if self.timing is None:
            self.timing = (step, time.perf_counter())
            return
        first, began = self.timing
        if step - first != train_estimate.MEASURED_STEPS:
            return
        per_step = (time.perf_counter() - began) / (step - first)
        d, cfg = self.start, self.cfg
        last = min(d["total_steps"], cfg.max_steps) if cfg.max_steps else d["total_steps"]
        # An epoch's evaluation follows its last step, so at an epoch's last step it is still to come.
        evals = -(-last // d["steps_per_epoch"]) - (step - 1) // d["steps_per_epoch"]
        seconds = train_estimate.remaining_seconds(
            per_step, cfg.batch_size, last - step, evals, d["test_images"], cfg.test_crops,
            min(d["train_images"], cfg.calibration_images) * cfg.num_crops)
        line = (f"measured over {step - first} steps: {cfg.batch_size / per_step:.1f} crops/s; the remaining "
                f"{last - step:,} {'step' if last - step == 1 else 'steps'} and {plural(evals, 'evaluation')} need "
                f"{train_estimate.duration(seconds)}")
        (self.progress.console if self.progress is not None else err_console).print(line, markup=False)

    def __call__(self, event) -> None:
        if self.quiet:
            return
        d = event.data
        if event.kind == "notice":
            err_console.print(d["message"])
        elif event.kind == "start":
            self.start = d
            err_console.print(
                f"training on {d['dataset']}: {d['train_images']} train / {d['test_images']} test images, "
                f"{d['crops_per_image']} crops each, {d['steps_per_epoch']} steps/epoch, "
                f"{d['trainable_params']:,} trainable parameters, {d['device']} {d['precision']}"
                + (f", {d['world']} processes" if d["world"] > 1 else "")
                + (", every epoch done: calibrating only" if d["start_epoch"] >= d["epochs"]
                   else f", resuming at epoch {d['start_epoch'] + 1}" if d["start_epoch"] else ""),
                markup=False,
            )
        elif event.kind == "step":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            if self.progress is None:
                self.progress = Progress(
                    TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[ips]:.1f} crops/s"),
                    TimeRemainingColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal,  # a log gets the epoch lines alone
                )
                self.progress.start()
            if self.task is None:
                self.task = self.progress.add_task("train", total=d["steps_per_epoch"], epoch=d["epoch"] + 1,
                                                   loss=d["loss"], lr=d["lr"], ips=d["crops_per_s"])
            self.progress.update(self.task, completed=d["epoch_step"], epoch=d["epoch"] + 1, loss=d["loss"],
                                 lr=d["lr"], ips=d["crops_per_s"])
            self._measured(d["step"])
        elif event.kind == "epoch":
            if self.progress is not None and self.task is not None:
                self.progress.remove_task(self.task)
                self.task = None
            m = d["metrics"]
            parts = [f"{k.upper()} {m[k]:.4f}" for k in ("srcc", "plcc", "krcc", "rmse") if isinstance(m.get(k), float)]
            err_console.print(
                f"epoch {d['epoch']}: {', '.join(parts) or 'no metrics'} "
                f"(loss {d.get('train_loss', float('nan')):.4f}"
                + (f", {d['clipped_steps']} steps clipped" if "clipped_steps" in d else "")
                + f", {d['epoch_seconds']:.0f} s, {d['train_crops_per_s']:.1f} crops/s)",
                markup=False,
            )
        elif event.kind == "done":
            err_console.print(f"calibration: {json.dumps(d['calibration'])}", markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
