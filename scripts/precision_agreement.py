"""How far the scores of a reduced precision lie from fp32's, on one device and one folder.

    python scripts/precision_agreement.py --device cuda [--images DIR] [--model loda-builtin]

Scores every file in fp32 and in each ``--precision`` asked for (default: ``auto``, which on a
GPU is the fixed bf16/fp16 rule and on the CPU the measured choice) with the same model, device
and decoding, and prints the largest and mean |Δscore| against fp32 and the rank agreement (SRCC).
The CPU's ``auto`` only ever takes a precision that agreed within 0.005 on its probe crops; on a
GPU nothing checks that, so this is the check. Without ``--images`` it writes a folder of
photo-like pictures of several sizes, each also blurred, noisy and JPEG-compressed, so that the
scores spread. Exits 1 when a precision differs from fp32 by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_folder(folder: Path, n: int = 6) -> Path:
    from PIL import Image, ImageFilter

    from loda_cli.benchmark_speed import photo_like

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(4000, 3000), (3000, 2000), (2000, 1500), (1600, 1200), (1024, 768), (640, 480)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image = photo_like(w, h, seed=i)
        image.save(folder / f"p{i}.jpg", quality=92)
        image.filter(ImageFilter.GaussianBlur(max(w, h) / 1000)).save(folder / f"p{i}_blur.jpg", quality=92)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"p{i}_noise.jpg", quality=92)
        image.save(folder / f"p{i}_jpeg10.jpg", quality=10)
    return folder


def compare(reference: dict, other: dict) -> dict:
    from scipy.stats import spearmanr

    common = [p for p in reference if p in other and reference[p] is not None and other[p] is not None]
    deltas = np.array([abs(reference[p] - other[p]) for p in common])
    srcc = float(spearmanr([reference[p] for p in common], [other[p] for p in common])[0]) if len(common) > 2 \
        else float("nan")
    return {"files": len(common), "max_abs_delta": float(deltas.max()) if len(deltas) else 0.0,
            "mean_abs_delta": float(deltas.mean()) if len(deltas) else 0.0, "srcc_with_fp32": srcc}


def main(argv: list[str] | None = None) -> int:
    from loda_cli.scoring import Scorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--precision", action="append", help="compare this precision with fp32 (repeatable; "
                                                        "default: auto)")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    folder = args.images or make_folder(Path(tempfile.mkdtemp(prefix="loda-precision-")) / "photos")
    report: dict = {"images": str(folder), "tolerance": args.tolerance, "precisions": {}}
    scores: dict[str, dict] = {}
    for precision in ["fp32"] + (args.precision or ["auto"]):
        scorer = Scorer(args.model, device=args.device, precision=precision, cache=False, groups=False)
        scores[precision] = {r.path: (r.score if r.ok else None) for r in scorer.score_files([folder])}
        if not any(v is not None for v in scores[precision].values()):
            print(f"precision_agreement: no photo in {folder} could be scored", file=sys.stderr)
            return 2
        report.update(device=scorer.device, model=scorer.name)
        if precision != "fp32":
            entry = compare(scores["fp32"], scores[precision])
            entry["ran_in"] = scorer.precision
            entry["chosen"] = scorer.precision_choice.describe()
            report["precisions"][precision] = entry
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    bad = [p for p, e in report["precisions"].items() if not e["max_abs_delta"] <= args.tolerance]
    for p in bad:
        print(f"{p} ({report['precisions'][p]['ran_in']}) differs from fp32 by up to "
              f"{report['precisions'][p]['max_abs_delta']:.4f} > {args.tolerance}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    from loda_cli.errors import LodaError

    try:
        sys.exit(main())
    except LodaError as exc:
        sys.exit(f"precision_agreement: {exc}")
