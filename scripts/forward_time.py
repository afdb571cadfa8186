"""Forward time per 224x224 crop of the default LoDa (ViT-B/16 + ResNet-50, random weights) on
this machine's CPU (or --device), in fp32, bf16 autocast, and bf16 autocast with a channels-last
CNN (what `loda score` runs), each after a warm-up, best of 3:

    python scripts/forward_time.py [--batch 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from loda_cli.config import LoDaConfig
from loda_cli.model import LoDa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LoDa(LoDaConfig()).eval().to(args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) / args.batch

    def bf16(inp):
        with torch.autocast(args.device, dtype=torch.bfloat16):
            return model(inp)

    with torch.inference_mode():
        ref = model(x)
        t_fp32 = best(lambda: model(x))
        t_bf16 = best(lambda: bf16(x))
        model.cnn.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        t_cl = best(lambda: bf16(x_cl))
        err = (bf16(x_cl).float() - ref).abs().max().item()
    print(f"per crop: fp32 {t_fp32 * 1000:.0f} ms, bf16 autocast {t_bf16 * 1000:.0f} ms, "
          f"bf16 autocast + channels-last CNN {t_cl * 1000:.0f} ms (max |d raw| vs fp32 {err:.4f}); "
          f"batch {args.batch}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
