"""Training throughput of a LoDa configuration on random data (crops/s), for time estimates.

    python scripts/train_throughput.py --device cuda --batch-size 128 --steps 30
    python scripts/train_throughput.py --device cpu --batch-size 16 --steps 5 --tiny
    python scripts/train_throughput.py --device cpu --preset builtin --batch-size 32 --steps 10 --compare-attention

Times forward + backward + AdamW step over the trainable parameters at the precision training
uses (bf16 autocast where native), after warm-up steps. Data loading is not included.
``--compare-attention`` times the fused attention kernel and the plain matmul path (what ``loda
train`` uses on the CPU) in one run and prints their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from loda_cli.config import TINY_CONFIG_KW, LoDaConfig
from loda_cli.model import LoDa
from loda_cli.scoring import autocast_context, resolve_device, resolve_precision
from loda_cli.train import plcc_loss, unfuse_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="ViT-T depth 2 + ResNet-18 instead of ViT-B + ResNet-50")
    ap.add_argument("--preset", choices=["builtin"], help="the built-in model's architecture (all trainable)")
    ap.add_argument("--compare-attention", action="store_true",
                    help="time fused attention and the plain matmul path, and print the ratio")
    args = ap.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.preset:
        from loda_cli.cli.train import PRESETS

        config, name = LoDaConfig(**PRESETS[args.preset]["model"]), f"preset {args.preset}"
    elif args.tiny:
        config, name = LoDaConfig(**TINY_CONFIG_KW), "ViT-T(depth 2)+ResNet-18"
    else:
        config, name = LoDaConfig(), "ViT-B/16+ResNet-50"
    if args.compare_attention:
        fused = measure(config, device, precision, args, unfused=False)
        plain = measure(config, device, precision, args, unfused=True)
        print(f"train throughput {name}, {device} {precision}, batch {args.batch_size}: fused attention "
              f"{fused:.1f} crops/s, matmul attention {plain:.1f} crops/s, ratio {plain / fused:.2f}x")
        return
    rate = measure(config, device, precision, args, unfused=device == "cpu")
    print(f"train throughput {rate:.1f} crops/s ({name}, {device} {precision}, batch {args.batch_size})")


def measure(config: LoDaConfig, device: str, precision: str, args, unfused: bool) -> float:
    """Crops per second of forward + backward + AdamW step, after warm-up steps."""
    torch.manual_seed(0)
    model = LoDa(config, pretrained=False).to(device).train()
    channels_last = bool(args.preset)  # as the built-in preset trains
    if channels_last:
        model.cnn.to(memory_format=torch.channels_last)
    if unfused:
        unfuse_attention(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.rand(args.batch_size, device=device)

    def step() -> None:
        with autocast_context(device, precision):
            pred = model(x)
        loss = plcc_loss(pred, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return args.steps * args.batch_size / seconds


if __name__ == "__main__":
    main()
