"""How long a `loda train` run takes: before it starts, from measured throughput, and after its
first steps, from its own timing. Pure arithmetic; no torch.

The recorded figures are the paper's model (ViT-B/16 + ResNet-50 LoDa: forward, backward and the
AdamW step over its trainable parameters) timed by ``scripts/train_throughput.py``: one H100 in
bf16 at batch 128 trains 1,556 crops/s and tests (forward only) 2,671 crops/s; a 2-core CPU in
fp32 at batch 16 trains about 1 crop/s. Other models have no recorded figure: their estimate comes
from the run's first 10 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

H100_TRAIN_CROPS_PER_S = 1556.0
CPU_TRAIN_CROPS_PER_S_PER_CORE = 0.5
# A test crop (forward only) costs this much less than a training crop (2671 / 1556, H100).
EVAL_SPEEDUP = 1.72
MEASURED_STEPS = 10
# A CPU run of the paper's model longer than this gets the advice to use a GPU or a smaller model.
LONG_CPU_RUN_S = 6 * 3600
SMALLER_MODEL = "--vit vit_tiny_patch16_224.augreg_in21k_ft_in1k --cnn resnet18"


@dataclass
class Workload:
    """What a run computes: optimiser steps, training crops, and test crops (the evaluation after
    each epoch and the calibration on training images)."""

    steps: int
    train_crops: float
    eval_crops: float

    def seconds(self, train_crops_per_s: float) -> float:
        return (self.train_crops + self.eval_crops / EVAL_SPEEDUP) / train_crops_per_s


def workload(n_images: int, crops_per_image: int, epochs: int, batch_size: int, train_fraction: float = 1.0,
             test_crops: int = 15, num_crops: int = 15, calibration_images: int = 2000,
             max_steps: Optional[int] = None) -> Workload:
    """The run on a dataset of ``n_images`` split 80/20 (the split by reference is about the same)."""
    n_train = max(1, round(round(0.8 * n_images) * train_fraction))
    n_test = n_images - round(0.8 * n_images)
    steps_per_epoch = max(1, n_train * crops_per_image // batch_size)
    steps = epochs * steps_per_epoch
    if max_steps is not None:
        steps = min(steps, max_steps)
    epochs_run = math.ceil(steps / steps_per_epoch)
    return Workload(steps, steps * batch_size,
                    epochs_run * n_test * test_crops + min(n_train, calibration_images) * num_crops)


def duration(seconds: float) -> str:
    """``about 2.8 days``, ``about 3 h 10 min``, ``about 5 min``, ``under a minute``."""
    if seconds >= 2 * 86400:
        return f"about {seconds / 86400:.1f} days"
    if seconds >= 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"about {hours} h {minutes:02d} min"
    if seconds >= 60:
        return f"about {round(seconds / 60)} min"
    return "under a minute"


def recorded_rate(paper_model: bool, device: str, cpu_threads: int, gpu_name: str = "") -> Optional[tuple[float, str]]:
    """Training crops/s for the paper's model on ``device`` from the recorded measurements, and
    what it rests on; None where nothing is recorded (other models, MPS)."""
    if not paper_model:
        return None
    if device.startswith("cuda"):
        other = f"; {gpu_name} differs by its bf16 speed" if gpu_name and "H100" not in gpu_name else ""
        return H100_TRAIN_CROPS_PER_S, f"{H100_TRAIN_CROPS_PER_S:,.0f} crops/s measured on one H100 in bf16{other}"
    if device == "cpu":
        rate = CPU_TRAIN_CROPS_PER_S_PER_CORE * max(1, cpu_threads)
        return rate, (f"about {rate:g} crops/s on {cpu_threads} CPU threads, from "
                      f"{2 * CPU_TRAIN_CROPS_PER_S_PER_CORE:g} crop/s measured on 2 cores")
    return None


def preflight(dataset: str, n_images: int, load: Workload, paper_model: bool, device: str, cpu_threads: int,
              gpu_name: str = "") -> list[str]:
    """The lines printed before a run: its estimated time on this device, and on a CPU, when the
    paper's model would take that long, the advice to use a GPU or a smaller model."""
    recorded = recorded_rate(paper_model, device, cpu_threads, gpu_name)
    if recorded is None:
        return []
    rate, basis = recorded
    seconds = load.seconds(rate)
    where = f"this GPU ({gpu_name})" if gpu_name else ("this CPU" if device == "cpu" else device)
    lines = [f"estimated time on {where}: {duration(seconds)} for {load.steps:,} steps on {n_images:,} "
             f"{dataset} images ({basis}); the measured figure follows after {MEASURED_STEPS} steps"]
    if device == "cpu" and seconds > LONG_CPU_RUN_S:
        lines.append(
            f"warning: the paper's model (ViT-B/16 + ResNet-50) trains on a CPU for {duration(seconds)}. Use a "
            f"GPU (--device cuda on a machine with one), or a smaller model ({SMALLER_MODEL}), or try "
            f"--max-steps first; Ctrl-C stops, and --resume continues after the last finished epoch"
        )
    return lines


def remaining_seconds(seconds_per_step: float, batch_size: int, steps_left: int, evals_left: int, n_test: int,
                      test_crops: int, calibration_crops: int) -> float:
    """The rest of a run from its own measured time per step (decoding and loading included)."""
    per_crop = seconds_per_step / batch_size
    return steps_left * seconds_per_step + (evals_left * n_test * test_crops + calibration_crops) * per_crop / EVAL_SPEEDUP
