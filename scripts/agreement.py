"""How much do scoring shortcuts change scores? Measures, on a varied image set:

1. bf16 autocast vs fp32: max |delta score| and the SRCC between the two rankings;
2. JPEG draft decoding (reduced-size DCT) vs a full decode followed by the same resize;
3. fewer crops vs the paper's 15: the SRCC of the ranking with N crops against 15.

    python scripts/agreement.py [--model NAME] [--images DIR] [--n 60] [--crops 1,3,5,9]

Without --images it builds a varied set once in $LODA_HOME/agreement-images: scikit-image's
bundled photos and procedural scenes, each clean and with KADID-style distortions at random
levels, saved as ~2000x1500 JPEGs (large enough for draft decoding to apply).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def build_image_set(folder: Path, n: int, seed: int = 7) -> list[Path]:
    from PIL import Image

    from loda_cli import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    rng = np.random.default_rng(seed)
    refs = [img for img in synthetic.bundled_photos()] + [
        synthetic.make_reference(480, 640, rng) for _ in range(6)
    ]
    names = sorted(synthetic.DISTORTIONS)
    paths = []
    for i in range(n):
        ref = refs[i % len(refs)]
        if i >= len(refs):
            name = names[int(rng.integers(len(names)))]
            ref = synthetic.apply_distortion(ref, name, int(rng.integers(1, 6)), rng)
        big = Image.fromarray(ref).resize((2000, 1500), Image.Resampling.BICUBIC)
        path = folder / f"img{i:03d}.jpg"
        big.save(path, quality=92)
        paths.append(path)
    return paths


def scores(scorer, paths, decode_full: bool = False) -> np.ndarray:
    import loda_cli.scoring as scoring

    if decode_full:
        real = scoring.decode_image
        scoring.decode_image = lambda p, **kw: real(p, target_short_side=None)
        try:
            rows = list(scorer.score_files([str(p) for p in paths]))
        finally:
            scoring.decode_image = real
    else:
        rows = list(scorer.score_files([str(p) for p in paths]))
    by_path = {r.path: r.score for r in rows}
    return np.array([by_path[str(p)] for p in paths], dtype=float)


def main() -> None:
    from loda_cli.metrics import srcc
    from loda_cli.scoring import Scorer
    from loda_cli.home import loda_home
    from loda_cli.weights import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--crops", default="1,3,5,9")
    args = ap.parse_args()
    paths = (sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
             if args.images else build_image_set(loda_home() / "agreement-images", args.n))
    loaded = load_model(args.model)
    kw = dict(workers=1, cache=False)
    print(f"model {loaded.name}, {len(paths)} images, default crops {loaded.preprocess.num_crops}")

    t = time.perf_counter()
    fp32 = scores(Scorer(loaded, precision="fp32", crops=15, **kw), paths)
    t_fp32 = time.perf_counter() - t
    t = time.perf_counter()
    bf16 = scores(Scorer(loaded, precision="bf16", crops=15, **kw), paths)
    t_bf16 = time.perf_counter() - t
    print(f"bf16 vs fp32 (15 crops): max |d score| {np.abs(bf16 - fp32).max():.4f}, "
          f"mean {np.abs(bf16 - fp32).mean():.4f}, SRCC {srcc(bf16, fp32):.4f} "
          f"(time fp32 {t_fp32:.1f} s, bf16 {t_bf16:.1f} s)")

    full = scores(Scorer(loaded, precision="fp32", crops=15, **kw), paths, decode_full=True)
    print(f"draft vs full decode (fp32, 15 crops): max |d score| {np.abs(fp32 - full).max():.4f}, "
          f"mean {np.abs(fp32 - full).mean():.4f}, SRCC {srcc(fp32, full):.4f}")

    for n in (int(c) for c in args.crops.split(",")):
        fewer = scores(Scorer(loaded, precision="fp32", crops=n, **kw), paths)
        print(f"{n:2d} crops vs 15 (fp32): SRCC {srcc(fewer, fp32):.4f}, max |d score| {np.abs(fewer - fp32).max():.4f}")


if __name__ == "__main__":
    main()
