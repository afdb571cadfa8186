"""Training throughput of a LoDa configuration on random data (crops/s), for time estimates.

    python scripts/train_throughput.py --device cuda --batch-size 128 --steps 30
    python scripts/train_throughput.py --device cpu --batch-size 16 --steps 5 --tiny

Times forward + backward + AdamW step over the trainable parameters at the precision training
uses (bf16 autocast where native), after warm-up steps. Data loading is not included.
"""

from __future__ import annotations

import argparse
import time

import torch

from loda_cli.config import TINY_CONFIG_KW, LoDaConfig
from loda_cli.model import LoDa
from loda_cli.scoring import autocast_context, resolve_device, resolve_precision
from loda_cli.train import plcc_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="ViT-T depth 2 + ResNet-18 instead of ViT-B + ResNet-50")
    args = ap.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    config = LoDaConfig(**TINY_CONFIG_KW) if args.tiny else LoDaConfig()
    model = LoDa(config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
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
    rate = args.steps * args.batch_size / seconds
    name = "ViT-T(depth 2)+ResNet-18" if args.tiny else "ViT-B/16+ResNet-50"
    print(f"train throughput {rate:.1f} crops/s ({name}, {device} {precision}, batch {args.batch_size}, "
          f"{sum(p.numel() for p in params):,} trainable params)")


if __name__ == "__main__":
    main()
