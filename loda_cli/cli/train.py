"""`loda train DATASET`: train LoDa with the paper's protocol (one or several GPUs, or the CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from loda_cli.cli.common import err_console, handle_errors

# The built-in model: LoDa's architecture with small backbones, trained from scratch (no
# pretrained weights exist offline) on the synthetic distortion set. See README, "Built-in model".
# Sized for a 2-core CPU: 2.6M parameters (10 MB as fp32), a half-width resnet10t and a ViT of
# 4 blocks of width 128; batches of 4 groups of 8 images of one reference cut at one place
# (per-group PLCC term), 3 epochs of 3 crops per image (~112k crops), a 5% warm-up, the
# gradient's global norm clipped to 1 (two runs: held-out SRCC 0.519 and 0.554, pairs 88.9% and
# 98.4%, against 0.438 / 93.7% unclipped; the PLCC loss is scale-free, and its gradient norm reaches
# 24-73 in an epoch, so at 1 nearly every step is clipped: each step moves by a bounded amount),
# 9 scoring crops (a 3x3 grid on a 4:3 photo; rank like 15 at SRCC 0.9975; 8 crops, a 2x4 grid
# without the middle row: 0.9949, under issue 3's 0.995; 9 crops score 9.9-11.1 twelve-megapixel
# JPEGs a second on this CPU, 8 crops 11.7-12.1).
# The set gives every reference JPEG, Gaussian blur and white noise plus 2 other types
# (synthetic.BUILTIN_GENERATION). Without --data it is generated once into $LODA_HOME/synthetic
# (a few minutes on 2 cores). scripts/eval_builtin.py measures a trained one (README).
# OMP_WAIT_POLICY=PASSIVE (the CLI's default) keeps it fast when other jobs share the cores.
BUILTIN_COMMAND = "loda train synthetic --preset builtin --out weights/loda-builtin.safetensors"
BUILTIN_PRESET = {
    "model": {
        "vit": "vit_tiny_patch16_224",
        "vit_kwargs": {"depth": 4, "embed_dim": 128, "num_heads": 4},
        "cnn": "resnet10t",
        "cnn_kwargs": {"channels": [32, 64, 128, 256]},
        "trainable": "full",
        "update_cnn_bn_stats": True,
    },
    "pretrained": False,
    "epochs": 3,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 5e-2,
    "crops_per_image": 3,
    "group_size": 8,
    "warmup": 0.05,
    "clip_grad": 1.0,
    "channels_last": True,
    "num_crops": 9,
    "test_crops": 3,
    "eval_every": 3,
    "calibration_images": 1000,
    "name": "loda-builtin",
    "description": (
        "trained on synthetic distortions; not a paper model. Reproduce (seed 3407): " + BUILTIN_COMMAND
    ),
}
PRESETS = {"builtin": BUILTIN_PRESET}


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)


@handle_errors
def train_cmd(
    dataset: Annotated[str, typer.Argument(help="koniq10k, kadid10k, spaq, live, livec, tid2013, flive, csv or synthetic (short names work: kadid, koniq, tid...).")],
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder (default: $LODA_DATA/<name>, ~/datasets/<name>). For csv: the CSV file or its folder.")] = None,
    split: Annotated[int, typer.Option(help="Which of the 10 seeded 80/20 splits to train on.")] = 0,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (paper: 10).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per optimiser step, over all GPUs (paper: 128).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (paper: 3e-4), cosine-annealed to 0.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (paper: 1e-2).")] = None,
    crops_per_image: Annotated[Optional[int], typer.Option(help="Random crops per image per epoch (paper: per dataset, 1-10).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the splits, crops and initialisation (paper: 3407).")] = 3407,
    train_fraction: Annotated[float, typer.Option(help="Keep this fraction of the training split (paper Table 5).")] = 1.0,
    vit: Annotated[Optional[str], typer.Option(help="timm ViT name (default: the paper's ViT-B/16 IN-21k).")] = None,
    cnn: Annotated[Optional[str], typer.Option(help="timm CNN name (default: resnet50).")] = None,
    vit_depth: Annotated[Optional[int], typer.Option(help="Override the ViT depth (small experiments).")] = None,
    method: Annotated[str, typer.Option(help="loda (the paper), or a comparison method: linear, full, adapter, lora, vpt, vit, add.")] = "loda",
    preset: Annotated[Optional[str], typer.Option(help="A named configuration: builtin (the shipped synthetic-data model).")] = None,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random backbone weights (offline experiments).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint path (default: $LODA_HOME/checkpoints/loda-<dataset>-split<K>.safetensors).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its last saved epoch.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 where native), fp32, bf16 or fp16.")] = "auto",
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
) -> None:
    """Train LoDa on a dataset split with the paper's protocol, then save a checkpoint `loda score` uses.

    Example: loda train kadid --data ~/datasets/kadid10k
    """
    from loda_cli.config import LoDaConfig, TrainConfig
    from loda_cli.errors import UsageError
    from loda_cli.train import train

    cfg = TrainConfig(dataset=dataset, split=split, seed=seed, method=method, grad_accum=grad_accum,
                      train_fraction=train_fraction, device=device, precision=precision,
                      path_column=path_column, mos_column=mos_column, lower_better=lower_better)
    if preset:
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        cfg.model = LoDaConfig(**values.pop("model"))
        for key, value in values.items():
            setattr(cfg, key, value)
    model_kw = cfg.model.to_dict()
    if vit:
        model_kw["vit"] = vit
    if cnn:
        model_kw["cnn"] = cnn
    if vit_depth:
        model_kw["vit_kwargs"] = {**model_kw["vit_kwargs"], "depth": vit_depth}
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
    cfg.data = str(data) if data else None
    cfg.out = str(out) if out else None
    cfg.resume = resume
    main_rank = int(os.environ.get("RANK", "0")) == 0
    reporter = _Reporter(quiet or not main_rank)
    try:
        path = train(cfg, reporter)
    finally:
        reporter.close()
    if main_rank:
        err_console.print(f"checkpoint: {path}")


class _Reporter:
    """Draws training events: a progress bar per epoch, a metrics table line per epoch."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None

    def __call__(self, event) -> None:
        if self.quiet:
            return
        d = event.data
        if event.kind == "notice":
            err_console.print(d["message"])
        elif event.kind == "start":
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
                    TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[ips]:.1f} img/s"),
                    TimeRemainingColumn(), console=err_console, transient=True,
                )
                self.progress.start()
            if self.task is None:
                self.task = self.progress.add_task("train", total=d["steps_per_epoch"], epoch=d["epoch"] + 1,
                                                   loss=d["loss"], lr=d["lr"], ips=d["images_per_s"])
            self.progress.update(self.task, completed=d["epoch_step"], epoch=d["epoch"] + 1, loss=d["loss"],
                                 lr=d["lr"], ips=d["images_per_s"])
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
                + f", {d['epoch_seconds']:.0f} s, {d['train_images_per_s']:.1f} crops/s)",
                markup=False,
            )
        elif event.kind == "done":
            err_console.print(f"calibration: {json.dumps(d['calibration'])}", markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
