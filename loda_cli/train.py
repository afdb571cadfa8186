"""Training with the paper's protocol: ``train(cfg) -> checkpoint path``.

Reads top to bottom: the loss and the schedule (small pure functions), setup (data, model,
optimizer, resume), the loop (train an epoch, evaluate, log, save a resumable state), and the end
(calibration on the training predictions, the safetensors checkpoint with all metadata).

Works alone or under ``torchrun`` (DDP, one process per GPU; gloo on the CPU). Rank 0 alone logs
and writes files; evaluation gathers every rank's predictions and orders them by image index.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from loda_cli.atomic import replacing
from loda_cli.config import Preprocess, TrainConfig
from loda_cli.errors import DatasetError, UsageError

# ---------------------------------------------------------------------------------------------
# Loss and schedule


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The PLCC-induced loss: on batch-standardised values, ``l0 = mean((p - y)^2) / 4`` (which
    equals (1 - PLCC) / 2) and ``l1 = mean((rho * p - y)^2) / 4``; the loss is their mean."""
    pred, target = pred.float().flatten(), target.float().flatten()
    p = (pred - pred.mean()) / (pred.std(unbiased=False) + eps)
    y = (target - target.mean()) / (target.std(unbiased=False) + eps)
    l0 = F.mse_loss(p, y) / 4
    rho = (p * y).mean()
    l1 = F.mse_loss(rho * p, y) / 4
    return (l0 + l1) / 2


def grouped_plcc_loss(pred: torch.Tensor, target: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`plcc_loss` over the batch plus its mean over each group of ``group_size``
    consecutive items (images of one reference): the batch term keeps scores comparable across
    contents, the group term makes the model order the distortions of one content."""
    pred, target = pred.float().flatten(), target.float().flatten()
    groups = pred.numel() // group_size
    p = pred[: groups * group_size].view(groups, group_size)
    y = target[: groups * group_size].view(groups, group_size)
    p = (p - p.mean(1, keepdim=True)) / (p.std(1, unbiased=False, keepdim=True) + 1e-8)
    y = (y - y.mean(1, keepdim=True)) / (y.std(1, unbiased=False, keepdim=True) + 1e-8)
    l0 = ((p - y) ** 2).mean(1) / 4
    rho = (p * y).mean(1, keepdim=True)
    l1 = ((rho * p - y) ** 2).mean(1) / 4
    return plcc_loss(pred, target) + ((l0 + l1) / 2).mean()


def distortion_targets(components, names: list[str]) -> "np.ndarray":
    """The auxiliary target of one synthetic image: per known distortion type, its level / 5
    (0 where absent; the pristine image is all zeros)."""
    import numpy as np

    target = np.zeros(len(names), dtype=np.float32)
    index = {name: i for i, name in enumerate(names)}
    for name, level in components:
        if name in index:
            target[index[name]] = max(target[index[name]], level / 5.0)
    return target


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Cosine annealing from ``base_lr`` to 0 over ``total_steps`` (stepped every batch), after
    an optional linear warm-up over the first ``warmup_steps`` (the paper uses none)."""
    if total_steps <= 0:
        return base_lr
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


# ---------------------------------------------------------------------------------------------
# Setup helpers


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Wait for every rank, then leave the process group (nothing to do alone)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def default_out(cfg: TrainConfig, dataset: str) -> Path:
    from loda_cli.home import checkpoints_dir

    name = cfg.name or f"loda-{dataset}-split{cfg.split}"
    return checkpoints_dir() / f"{name}.safetensors"


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


def log_path(out: Path) -> Path:
    return out.with_name(out.name + ".log.jsonl")


def build_model(cfg: TrainConfig):
    """The network a method trains. "loda" is the paper's model; the baselines live elsewhere."""
    from loda_cli.model import LoDa

    if cfg.method != "loda":
        from loda_cli.baselines import build_baseline

        return build_baseline(cfg)
    return LoDa(cfg.model, pretrained=cfg.pretrained)


def unfuse_attention(model: torch.nn.Module) -> int:
    """Make timm's self-attention use plain matmuls + softmax instead of the fused kernel; returns
    how many attention layers changed. Same arithmetic, but on the CPU the fused kernel's backward
    is the single slowest op of a training step: the built-in preset trains 9-12% faster without
    it (35.7 -> 39.0 crops/s, ``python scripts/train_throughput.py --preset builtin --compare-attention``)."""
    changed = 0
    for module in model.modules():
        if getattr(module, "fused_attn", False):
            module.fused_attn = False
            changed += 1
    return changed


def _resolve_spec(cfg: TrainConfig):
    from loda_cli import datasets

    if datasets.resolve_dataset(cfg.dataset).name == "csv":
        return datasets.csv_spec(
            path_column=cfg.path_column, mos_column=cfg.mos_column, lower_better=cfg.lower_better
        )
    return datasets.resolve_dataset(cfg.dataset)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainEvent:
    """What the loop reports to its caller (the CLI draws progress from these)."""

    kind: str  # "start", "step", "epoch", "done"
    data: dict[str, Any]


def train(cfg: TrainConfig, on_event: Callable[[TrainEvent], None] | None = None) -> Path:
    """Train one split of one dataset; returns the checkpoint path (rank 0's file)."""
    from loda_cli.allocator import hold_freed_memory
    from loda_cli.threads import fit_threads

    hold_freed_memory()  # every batch's activations would otherwise come back as fresh pages
    fit_threads()
    emit = on_event or (lambda event: None)
    run = _set_up(cfg, emit)
    for epoch in range(run.start_epoch, cfg.epochs):
        stats = _train_epoch(run, epoch, emit)
        last_epoch = epoch == cfg.epochs - 1 or run.reached_max_steps
        if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
            run.metrics = _evaluate(run)
        _end_epoch(run, epoch, stats, emit)
        if last_epoch:
            break
    calibration = _calibrate(run)
    if run.dist.main:
        _save(run, calibration, emit)
    run.dist.close()
    return run.out


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass
class _Data:
    """The split's labelled images and the crop datasets built on them."""

    spec: Any
    root: Path
    labels: Any
    train_items: list
    test_items: list
    crops_per_image: int
    source: Any
    train_set: Any
    test_set: Any
    unit: int  # crops per dataset item: one, or a group of one reference's images
    aux: list | None
    aux_names: list[str]


@dataclass
class _Run:
    """Everything the epochs, the evaluation and the finish share; ``step``, ``history`` and
    ``metrics`` change as training goes."""

    cfg: TrainConfig
    dist: Distributed
    data: _Data
    device: str
    precision: str
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    aux_head: torch.nn.Module | None
    params: list
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    items_per_step: int
    items_per_rank: int
    items_per_micro: int
    out: Path
    workers: int
    preprocess: Preprocess
    start_epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps


def _set_up(cfg: TrainConfig, emit: Callable[[TrainEvent], None]) -> _Run:
    """Data, model and optimiser, then the saved state when resuming; emits "start"."""
    from loda_cli.scoring import resolve_device, resolve_precision

    if not cfg.clip_grad >= 0:  # also refuses NaN
        raise UsageError(f"--clip-grad must be 0 (off) or positive, got {cfg.clip_grad}")
    dist = Distributed.from_env()
    data = _load_data(cfg, dist)
    device = resolve_device(cfg.device)
    if device.startswith("cuda") and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device)
    if precision == "fp16":
        precision = "bf16" if device == "cpu" else precision
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, aux_head, params = _build(cfg, data, device)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank_batch = cfg.batch_size // dist.world
    if per_rank_batch < 2 or per_rank_batch % cfg.grad_accum:
        raise UsageError("--batch-size must give each process at least 2 images and divide by --grad-accum")
    micro = per_rank_batch // cfg.grad_accum
    unit = data.unit
    if micro % unit:
        raise UsageError(f"each micro-batch ({micro} images) must hold whole groups of --group-size {unit}")
    items_per_step, items_per_rank, items_per_micro = cfg.batch_size // unit, per_rank_batch // unit, micro // unit
    steps_per_epoch = len(data.train_set) // items_per_step  # the last partial batch is dropped
    if steps_per_epoch < 1:
        raise UsageError(
            f"the training split has {len(data.train_set) * unit} crops, fewer than one batch of {cfg.batch_size}; "
            "lower --batch-size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    ddp_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    run = _Run(
        cfg=cfg, dist=dist, data=data, device=device, precision=precision, model=model,
        ddp_model=ddp_model, aux_head=aux_head, params=params, optimizer=optimizer,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        warmup_steps=round(cfg.warmup * total_steps), items_per_step=items_per_step,
        items_per_rank=items_per_rank, items_per_micro=items_per_micro,
        out=Path(cfg.out) if cfg.out else default_out(cfg, data.spec.name),
        workers=_default_workers() if cfg.workers is None else cfg.workers,
        preprocess=Preprocess(interpolation=data.spec.interpolation, num_crops=cfg.num_crops),
    )
    _resume(run, emit)
    emit(TrainEvent("start", {
        "dataset": data.spec.name, "root": str(data.root), "train_images": len(data.train_items),
        "test_images": len(data.test_items), "crops_per_image": data.crops_per_image,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "trainable_params": sum(p.numel() for p in params), "device": device, "precision": precision,
        "out": str(run.out), "start_epoch": run.start_epoch, "epochs": cfg.epochs, "world": dist.world,
    }))
    return run


def _refuse_missing_images(spec, root: Path, cache_dir, items) -> None:
    """Before any training: every image of the split is on disk (or prepared), so a missing file
    is one line now, not a failure hours later. Decoding errors surface when an image is read
    (``load_training_image`` names the file); `loda data check` decodes every image up front."""
    from loda_cli import datasets

    missing = [it for it in items
               if not it.path.is_file() and not datasets.prepared_path(spec, root, it, cache_dir).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the split's {len(items)} images are missing (first: {missing[0].path}); "
            f"`loda data check {spec.name} --data {root}` lists them"
        )


def _load_data(cfg: TrainConfig, dist: Distributed) -> _Data:
    """The labels, the split, and the training and test crop datasets."""
    from loda_cli import datasets
    from loda_cli.data import GroupedTrainCrops, ImageSource, TestCrops, TrainCrops

    spec = _resolve_spec(cfg)
    root = datasets.dataset_root(spec, Path(cfg.data) if cfg.data else None)
    labels = datasets.read_labels(spec, root)
    splits = datasets.make_splits(labels, spec, seed=cfg.seed, n_splits=cfg.n_splits, train_fraction=cfg.train_fraction)
    if not 0 <= cfg.split < len(splits):
        raise UsageError(f"--split {cfg.split} is out of range 0..{len(splits) - 1}")
    split = splits[cfg.split]
    train_items = [labels.items[i] for i in split.train]
    test_items = [labels.items[i] for i in split.test]
    crops_per_image = cfg.crops_per_image or spec.crops_per_image
    source = ImageSource(spec, root, datasets.default_cache_dir(root) if datasets.default_cache_dir(root).is_dir() else None)
    _refuse_missing_images(spec, root, source.cache_dir, train_items + test_items)
    aux, aux_names = None, []
    if cfg.aux_weight:
        aux, aux_names = _aux_targets(spec, root, train_items)
        if dist.world > 1:
            raise UsageError("the auxiliary distortion head trains in one process only")
    if cfg.group_size:
        if cfg.group_size < 2:
            raise UsageError("--group-size must be 0 (off) or at least 2")
        if labels.kind != "synthetic":
            raise UsageError("--group-size needs a dataset with reference images (synthetic, KADID, TID, LIVE)")
        train_set = GroupedTrainCrops(train_items, [it.mos for it in train_items], source, crops_per_image,
                                      cfg.group_size, seed=cfg.seed, aux=aux)
    else:
        train_set = TrainCrops(train_items, [it.mos for it in train_items], source, crops_per_image,
                               seed=cfg.seed, aux=aux)
    test_set = TestCrops(test_items, source, n=cfg.test_crops, seed=cfg.seed)
    return _Data(spec, root, labels, train_items, test_items, crops_per_image, source, train_set, test_set,
                 cfg.group_size or 1, aux, aux_names)


def _build(cfg: TrainConfig, data: _Data, device: str) -> tuple[torch.nn.Module, torch.nn.Module | None, list]:
    """The model on its device, the auxiliary head (when asked for), and the trainable parameters."""
    model = build_model(cfg).to(device)
    if cfg.channels_last and hasattr(model, "cnn"):
        model.cnn.to(memory_format=torch.channels_last)  # oneDNN/cuDNN convolutions run faster
    if device == "cpu":
        unfuse_attention(model)
    params = [p for p in model.parameters() if p.requires_grad]
    aux_head = None
    if data.aux is not None:
        # Training only, never saved: a linear layer on LoDa's pooled feature that names the
        # distortions in the image and their levels. It gives every image a rich signal about
        # *which* distortion it carries, which a scalar PLCC over the batch does not.
        aux_head = torch.nn.Linear(model.vit.embed_dim, len(data.aux_names)).to(device)
        params += list(aux_head.parameters())
    return model, aux_head, params


def _resume(run: _Run, emit: Callable[[TrainEvent], None]) -> None:
    """Continue from the state of the last finished epoch, when asked and one exists."""
    cfg, out = run.cfg, run.out
    if cfg.resume and state_path(out).is_file():
        state = torch.load(state_path(out), map_location="cpu", weights_only=True)
        differ = _resume_conflicts(json.loads(state["config"]), _resume_identity(cfg))
        if differ:
            raise UsageError(f"{state_path(out)} was written by a different configuration "
                             f"({', '.join(differ)}); cannot resume")
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.start_epoch, run.step, run.history = state["epoch"], state["step"], json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])
    elif cfg.resume and run.dist.main:
        emit(TrainEvent("notice", {"message": f"no state to resume at {state_path(out)}; starting fresh"}))
    run.metrics = run.history[-1]["metrics"] if run.history else {}


# ---------------------------------------------------------------------------------------------
# The epochs


@dataclass
class _EpochStats:
    seconds: float = 0.0
    seen: int = 0  # crops this rank trained on
    loss: float = 0.0  # summed over the optimiser steps
    steps: int = 0
    clipped: int = 0
    norm_max: float = 0.0


def _train_epoch(run: _Run, epoch: int, emit: Callable[[TrainEvent], None]) -> _EpochStats:
    """One pass over this rank's share of the epoch's shuffled crops (or up to ``max_steps``)."""
    from torch.utils.data import DataLoader

    cfg, dist, data = run.cfg, run.dist, run.data
    data.train_set.set_epoch(epoch)
    order = _epoch_order(len(data.train_set), cfg.seed, epoch, run.steps_per_epoch * run.items_per_step)
    mine = [order[s * run.items_per_step + dist.rank * run.items_per_rank + j]
            for s in range(run.steps_per_epoch) for j in range(run.items_per_rank)]
    loader = DataLoader(
        torch.utils.data.Subset(data.train_set, mine), batch_size=run.items_per_micro, shuffle=False,
        num_workers=run.workers, pin_memory=run.device.startswith("cuda"), drop_last=False,
        persistent_workers=False,
    )
    run.model.train()
    stats, t_epoch, loss_sum = _EpochStats(), time.perf_counter(), 0.0
    run.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        loss, crops = _batch_loss(run, batch)
        loss = loss / cfg.grad_accum
        loss.backward()
        loss_sum += loss.item()
        stats.seen += crops
        if (i + 1) % cfg.grad_accum:
            continue
        lr = _optimizer_step(run, stats)
        stats.loss += loss_sum
        stats.steps += 1
        if dist.main:
            elapsed = time.perf_counter() - t_epoch
            emit(TrainEvent("step", {"epoch": epoch, "step": run.step, "loss": loss_sum, "lr": lr,
                                     "crops_per_s": stats.seen * dist.world / max(elapsed, 1e-9),
                                     "epoch_step": (i + 1) // cfg.grad_accum,
                                     "steps_per_epoch": run.steps_per_epoch}))
        loss_sum = 0.0
        if run.reached_max_steps:
            break
    stats.seconds = time.perf_counter() - t_epoch
    return stats


def _batch_loss(run: _Run, batch) -> tuple[torch.Tensor, int]:
    """The loss of one micro-batch and its number of crops. PLCC (grouped by reference when
    asked), plus the auxiliary distortion loss when the auxiliary head trains."""
    from loda_cli.scoring import autocast_context

    cfg, model, aux_head = run.cfg, run.model, run.aux_head
    crops, target = batch[0], batch[1]
    aux_target = batch[2] if aux_head is not None else None
    if cfg.group_size:  # (groups, K, C, S, S) -> (groups * K, C, S, S), a group's images adjacent
        crops, target = crops.flatten(0, 1), target.flatten()
        aux_target = aux_target.flatten(0, 1) if aux_target is not None else None
    x = _normalize(crops.to(run.device, non_blocking=True), run.preprocess)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = target.to(run.device)
    with autocast_context(run.device, run.precision):
        if aux_head is None:
            pred = run.ddp_model(x)
        else:
            from loda_cli.model import pooled_feature

            tokens = model.forward_features(x)
            pred = model.forward_head(tokens)
            aux_logits = aux_head(pooled_feature(model.vit, tokens))
    if cfg.group_size:
        loss = grouped_plcc_loss(pred, target, cfg.group_size)
    else:
        loss = plcc_loss(pred, target)
    if aux_head is not None:
        loss = loss + cfg.aux_weight * F.binary_cross_entropy_with_logits(
            aux_logits.float(), aux_target.to(run.device))
    return loss, len(crops)


def _optimizer_step(run: _Run, stats: _EpochStats) -> float:
    """Set the scheduled learning rate, clip, step; returns the learning rate."""
    cfg = run.cfg
    lr = cosine_lr(run.step, run.total_steps, cfg.lr, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if cfg.clip_grad > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad))
        stats.clipped += norm > cfg.clip_grad
        stats.norm_max = max(stats.norm_max, norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return lr


def _end_epoch(run: _Run, epoch: int, stats: _EpochStats, emit: Callable[[TrainEvent], None]) -> None:
    """Record the epoch in the history and the log, save a resume point, emit "epoch"."""
    cfg, dist = run.cfg, run.dist
    record = {"epoch": epoch + 1, "step": run.step, "epoch_seconds": round(stats.seconds, 2),
              "train_crops_per_s": round(stats.seen * dist.world / max(stats.seconds, 1e-9), 2),
              "train_loss": round(stats.loss / max(stats.steps, 1), 5), "metrics": run.metrics}
    if cfg.clip_grad > 0:
        record["clipped_steps"] = stats.clipped
        record["grad_norm_max"] = round(stats.norm_max, 4)
    run.history.append(record)
    if dist.main:
        _append_jsonl(log_path(run.out), record)
        if run.step == (epoch + 1) * run.steps_per_epoch:
            # Only a finished epoch is a resume point; a run stopped inside one (--max-steps)
            # keeps the previous state so a resume never skips batches.
            _save_state(run.out, run.model, run.optimizer, epoch + 1, run.step, run.history, cfg)
        emit(TrainEvent("epoch", record))


# ---------------------------------------------------------------------------------------------
# Evaluation and the finish


def _evaluate(run: _Run) -> dict[str, Any]:
    """SRCC, PLCC, KRCC and RMSE on the test split, every rank's predictions gathered in order."""
    from loda_cli.data import predict
    from loda_cli.metrics import evaluate

    dist, test_set = run.dist, run.data.test_set
    indices = list(range(len(test_set)))[dist.rank :: dist.world]
    parts = dist.gather(predict(run.model, test_set, run.preprocess, run.device, run.precision,
                                workers=run.workers, indices=indices))
    raw = {k: v for part in parts for k, v in part.items()}
    order = sorted(raw)
    preds = [raw[i] for i in order]
    mos = [test_set.items[i].mos for i in order]
    if len(preds) < 3:
        return {"n": len(preds)}
    result = evaluate(preds, mos)
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in result.items()}


def _calibrate(run: _Run):
    """The calibration fitted on the model's raw outputs for (up to ``calibration_images``)
    training images, scored as ``loda score`` scores them."""
    from loda_cli.data import TestCrops, predict
    from loda_cli.weights import Calibration

    cfg, dist, data = run.cfg, run.dist, run.data
    calib_idx = list(range(len(data.train_items)))
    if len(calib_idx) > cfg.calibration_images:
        calib_idx = sorted(random.Random(cfg.seed).sample(calib_idx, cfg.calibration_images))
    calib_set = TestCrops(data.train_items, data.source, n=cfg.num_crops, grid=True)
    mine = calib_idx[dist.rank :: dist.world]
    raw_parts = dist.gather(predict(run.model, calib_set, run.preprocess, run.device, run.precision,
                                    workers=run.workers, indices=mine))
    raw = {k: v for part in raw_parts for k, v in part.items()}
    order_idx = sorted(raw)
    lo, hi = _label_range(data.labels)
    return Calibration.fit([raw[i] for i in order_idx], [data.train_items[i].mos for i in order_idx],
                           float(lo), float(hi), bool(data.labels.lower_better))


def _label_range(labels) -> tuple[float, float]:
    return labels.scale if labels.scale else (min(labels.mos), max(labels.mos))


def _save(run: _Run, calibration, emit: Callable[[TrainEvent], None]) -> None:
    """The checkpoint with its metadata (rank 0 only); emits "done"."""
    from loda_cli.weights import build_metadata, save_checkpoint

    cfg, data, out = run.cfg, run.data, run.out
    lo, hi = _label_range(data.labels)
    run.model.eval()
    meta = build_metadata(
        run.model, name=out.stem, kind="adapters", calibration=calibration, preprocess=run.preprocess,
        dataset={"name": data.spec.name, "split": cfg.split, "n_splits": cfg.n_splits, "seed": cfg.seed,
                 "train_fraction": cfg.train_fraction, "scale": [lo, hi],
                 "lower_better": bool(data.labels.lower_better), "train_images": len(data.train_items),
                 "test_images": len(data.test_items)},
        metrics=run.metrics, description=cfg.description,
        extra={"train": cfg.to_dict() | {"steps": run.step}, "method": cfg.method,
               "synthetic_only": data.spec.name == "synthetic"},
    )
    save_checkpoint(run.model, out, meta)
    emit(TrainEvent("done", {"out": str(out), "metrics": run.metrics, "calibration": calibration.to_dict()}))


# ---------------------------------------------------------------------------------------------
# Pieces of the loop


def _default_workers() -> int:
    from loda_cli.threads import available_cpus

    return max(0, min(8, available_cpus() - 1))


def _normalize(crops: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    from loda_cli.transforms import normalize

    return normalize(crops, preprocess)


def _epoch_order(n: int, seed: int, epoch: int, keep: int) -> list[int]:
    """The epoch's shuffled crop order; the same for every rank, so ranks split it."""
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    return torch.randperm(n, generator=g)[:keep].tolist()


def _aux_targets(spec, root: Path, items) -> tuple[list, list[str]]:
    """Per training image, :func:`distortion_targets` from the generated set's ``distortions``
    column (synthetic dataset only)."""
    from loda_cli import synthetic

    if spec.name != "synthetic":
        raise UsageError("--aux-weight needs the synthetic dataset (it names each image's distortions)")
    recorded = synthetic.read_distortions(synthetic.synthetic_label_file(root))
    if not recorded:
        raise UsageError("this synthetic set records no distortions (an older set); regenerate it")
    names = sorted(synthetic.DISTORTIONS)
    return [distortion_targets(recorded.get(item.name, ()), names) for item in items], names


#: Settings that only shape what happens after the last epoch (the calibration fit and the
#: checkpoint's metadata), so a finished run resumed with new values re-calibrates without
#: retraining, and ends exactly where a fresh run with those values would.
_AFTER_TRAINING = ("num_crops", "calibration_images", "name", "description")


def _resume_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the state."""
    d = cfg.to_dict()
    for key in ("resume", "workers", "out", "max_steps", "device", *_AFTER_TRAINING):
        d.pop(key, None)
    return d


def _resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings in which a saved state and this run differ. A setting the state predates
    (added to the code since) matches when this run leaves it at its default."""
    defaults = json.loads(json.dumps(_resume_identity(TrainConfig())))
    current = json.loads(json.dumps(current))  # tuples as the saved JSON holds them: lists
    keys = (set(saved) | set(current)) - set(_AFTER_TRAINING)
    return sorted(key for key in keys if saved.get(key, defaults.get(key)) != current.get(key, defaults.get(key)))


def _save_state(out: Path, model, optimizer, epoch: int, step: int, history: list, cfg: TrainConfig) -> None:
    """Everything a resume needs, loadable with ``weights_only=True`` (tensors, numbers, strings)."""
    state = {
        "model": {k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "history": json.dumps(history),
        "config": json.dumps(_resume_identity(cfg), sort_keys=True),
        "torch_rng": torch.get_rng_state(),
    }
    path = state_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as fh:
        torch.save(state, fh)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
