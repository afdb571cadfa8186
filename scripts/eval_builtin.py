"""Measure the built-in model against issue 7's quality targets and print a small table.

    python scripts/eval_builtin.py [--model weights/loda-builtin.safetensors] [--json out.json]
    python scripts/eval_builtin.py --model FILE --crops-sweep 5,8,9,12

1. Held-out synthetic set: procedural references drawn with a seed training never used, plus
   the held-out real photos, each with every distortion type at all 5 levels and the pristine
   image (``synthetic.generate_samples``, its own seed). SRCC of the score against the label,
   and of the variance-of-the-Laplacian sharpness statistic as a baseline.
2. Held-out real photos (photos shipped inside scikit-learn and matplotlib, never training
   material) against their strongly distorted versions (levels 3-5 of blur, noise and JPEG,
   applied at the photo's own size): the share of pairs in which the original scores higher
   (a tie counts as a miss). The variance-of-the-Laplacian sharpness statistic is measured on
   the same pairs as a baseline.
3. Optionally (``--crops-compare``) the rank agreement (SRCC) of the scores with the
   checkpoint's default crops against 15 crops, on every 8th image of the held-out synthetic set.

Scores go through the scorer's own path (``Scorer.preprocess``: resize to the short side, the
fixed grid of crops, the checkpoint's calibration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

HOLDOUT_SEED = 2024  # never used by training (its references and samples use 3407)
PAIR_TYPES = ("gaussian_blur", "lens_blur", "motion_blur", "white_noise", "color_noise",
              "camera_noise", "jpeg")  # fmt: skip
PAIR_LEVELS = (3, 4, 5)


def heldout_photos() -> list[tuple[str, np.ndarray]]:
    """Real photos that ship inside PyPI packages and are not training material: scikit-learn's
    china.jpg and flower.jpg (CC BY 2.0) and matplotlib's grace_hopper.jpg (public domain). Those
    whose package is not installed are left out; nothing is downloaded."""
    photos = []
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for filename, image in zip(sample.filenames, sample.images):
            photos.append((Path(filename).stem, np.ascontiguousarray(image, dtype=np.uint8)))
    except ImportError:
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            photos.append(("grace_hopper", np.asarray(Image.open(fh).convert("RGB"))))
    except (ImportError, OSError, ValueError):
        pass
    return photos


def _fit_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) <= short_side:
        return image
    scale = short_side / min(h, w)
    size = (round(w * scale), round(h * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def heldout_synthetic_set(procedural: int = 8, seed: int = HOLDOUT_SEED):
    """(images, labels, groups, samples) of the held-out synthetic set described in the module
    doc; ``samples`` holds each image's (reference, distortion, level)."""
    from loda_cli import synthetic

    references = synthetic.procedural_references(procedural, 384, 512, seed)
    references += [(f"photo_{name}", _fit_short_side(image, 384)) for name, image in heldout_photos()]
    images, labels, groups, samples = [], [], [], []
    for sample in synthetic.generate_samples(references, seed):
        images.append(sample.image)
        labels.append(sample.label)
        groups.append("photo" if sample.ref_id.startswith("photo_") else "procedural")
        samples.append((sample.ref_id, sample.distortion, sample.level))
    return images, labels, groups, samples


def drop_by_type(scores, samples) -> dict[str, list[float]]:
    """Per distortion type, the mean score change from the pristine image at each level 1..5
    (negative: the model sees the damage). Shows which distortions a model is blind to."""
    pristine = {ref: score for score, (ref, kind, _) in zip(scores, samples) if kind == "pristine"}
    sums: dict[str, list[list[float]]] = {}
    for score, (ref, kind, level) in zip(scores, samples):
        if kind != "pristine":
            sums.setdefault(kind, [[] for _ in range(5)])[level - 1].append(score - pristine[ref])
    return {kind: [float(np.mean(v)) if v else float("nan") for v in levels]
            for kind, levels in sorted(sums.items())}


def breakdown(scores, labels, samples) -> dict:
    """Where a held-out SRCC comes from: per distortion type, the SRCC of that type's images and
    the pristine ones pooled over references (can the model order it at all, across contents?);
    the mean SRCC within one reference (ordering one content's versions); and the range of the
    pristine images' scores (a model that ranks contents against each other well keeps it small:
    every pristine image has label 1)."""
    from loda_cli.metrics import srcc

    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
    refs = np.array([ref for ref, _, _ in samples])
    kinds = np.array([kind for _, kind, _ in samples])
    by_type = {}
    for kind in sorted(set(kinds) - {"pristine"}):
        keep = (kinds == kind) | (kinds == "pristine")
        by_type[kind] = srcc(scores[keep], labels[keep])
    within = [srcc(scores[refs == ref], labels[refs == ref]) for ref in sorted(set(refs))]
    pristine = scores[kinds == "pristine"]
    return {
        "srcc_by_type": by_type,
        "srcc_within_reference_mean": float(np.nanmean(within)),
        "pristine_score_range": [float(pristine.min()), float(pristine.max())] if pristine.size else None,
    }


#: Types that leave the luminance untouched (SSIM of the grey images 1.00 at every level): a
#: model sees them only through colour statistics, which vary between scenes anyway.
LUMINANCE_FREE_TYPES = ("desaturate", "color_diffusion")


def level_reader_ceilings(labels, samples) -> dict[str, float]:
    """What the held-out label lets a no-reference model reach at best: the SRCC of an oracle
    that reads every image's nominal level exactly (pristine 0), and of the same oracle when it
    cannot see the :data:`LUMINANCE_FREE_TYPES` (it takes them for pristine). Puts a model's
    SRCC in proportion: the label gives every level the same weight whatever the type."""
    from loda_cli.metrics import srcc

    levels = np.array([float(level) for _, _, level in samples])
    kinds = np.array([kind for _, kind, _ in samples])
    blind = levels.copy()
    blind[np.isin(kinds, LUMINANCE_FREE_TYPES)] = 0.0
    return {"level_reader": srcc(-levels, labels), "level_reader_blind_to_colour_only_types": srcc(-blind, labels)}


def real_photo_pairs(seed: int = HOLDOUT_SEED):
    """(photo name, original, [(distortion, level, distorted image), ...]) per held-out photo."""
    from loda_cli import synthetic

    out = []
    for index, (name, photo) in enumerate(heldout_photos()):
        versions = []
        for t, kind in enumerate(PAIR_TYPES):
            for level in PAIR_LEVELS:
                rng = np.random.default_rng([seed, index, t])
                versions.append((kind, level, synthetic.apply_distortion(photo, kind, level, rng)))
        out.append((name, photo, versions))
    return out


def laplacian_variance(image: np.ndarray) -> float:
    """The classic sharpness statistic: variance of the Laplacian of the grey image."""
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(ndimage.laplace(grey).var())


def make_scorer(model: str | None = None, crops: int | None = None, device: str = "cpu"):
    from loda_cli.scoring import Scorer

    return Scorer(model, device=device, crops=crops, cache=False, workers=0)


def score_arrays(scorer, images: list[np.ndarray], batch_crops: int = 60) -> list[float]:
    """Calibrated scores of in-memory RGB images through the scorer's preprocessing, with crops
    of many images batched together."""
    from loda_cli.transforms import scoring_crops

    raws: list[float] = []
    pending: list[np.ndarray] = []
    counts: list[int] = []

    def flush() -> None:
        if not pending:
            return
        flat = scorer._forward(np.concatenate(pending))
        start = 0
        for n in counts:
            raws.append(sum(flat[start : start + n]) / n)
            start += n
        pending.clear()
        counts.clear()

    for image in images:
        crops = scoring_crops(Image.fromarray(image), scorer.preprocess)
        pending.append(crops)
        counts.append(len(crops))
        if sum(counts) >= batch_crops:
            flush()
    flush()
    return [scorer.loaded.calibration.to_score(r) for r in raws]


def pair_accuracy(pairs, scores_of) -> tuple[float, int, list[str]]:
    """Share of (original, distorted) pairs where the original scores strictly higher."""
    wins, total, misses = 0, 0, []
    for name, original, versions in pairs:
        values = scores_of([original] + [image for _, _, image in versions])
        for (kind, level, _), value in zip(versions, values[1:]):
            total += 1
            if values[0] > value:
                wins += 1
            else:
                misses.append(f"{name} {kind}@{level}")
    return (wins / total if total else float("nan")), total, misses


def evaluate(model: str | None = None, crops_compare: bool = False, device: str = "cpu") -> dict:
    from loda_cli.metrics import srcc

    scorer = make_scorer(model, device=device)
    result: dict = {"model": str(scorer.loaded.path), "crops": scorer.preprocess.num_crops,
                    "parameters": sum(p.numel() for p in scorer.model.parameters())}
    t0 = time.perf_counter()
    images, labels, groups, samples = heldout_synthetic_set()
    scores = score_arrays(scorer, images)
    result["score_change_by_type"] = drop_by_type(scores, samples)
    result["synthetic"] = {
        "images": len(images),
        "srcc": srcc(scores, labels),
        "srcc_procedural": srcc(*_subset(scores, labels, groups, "procedural")),
        "laplacian_variance_srcc": srcc([laplacian_variance(im) for im in images], labels),
    }
    if "photo" in groups:
        result["synthetic"]["srcc_photos"] = srcc(*_subset(scores, labels, groups, "photo"))
    result["synthetic"].update(breakdown(scores, labels, samples))
    result["synthetic"]["ceilings"] = level_reader_ceilings(labels, samples)
    if crops_compare:
        # Every 8th image keeps the 15-crop pass affordable on a CPU.
        many = make_scorer(model, crops=15, device=device)
        subset = slice(0, None, 8)
        result["synthetic"]["srcc_vs_15_crops"] = srcc(scores[subset], score_arrays(many, images[subset]))
        result["synthetic"]["crops_compare_images"] = len(images[subset])
    pairs = real_photo_pairs()
    model_acc, total, misses = pair_accuracy(pairs, lambda ims: score_arrays(scorer, ims))
    lap_acc, _, _ = pair_accuracy(pairs, lambda ims: [laplacian_variance(im) for im in ims])
    result["real_pairs"] = {
        "photos": [name for name, _, _ in pairs],
        "pairs": total,
        "model": model_acc,
        "laplacian_variance": lap_acc,
        "model_misses": misses,
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def crops_sweep(model: str | None, counts: list[int], device: str = "cpu") -> dict[int, tuple[float, float]]:
    """Per crop count: (SRCC with 15 crops, max |score difference|), printed as it goes."""
    from loda_cli.metrics import srcc

    images = heldout_synthetic_set()[0][::4]
    images += [im for _, original, versions in real_photo_pairs() for im in [original] + [v[2] for v in versions]]
    reference = score_arrays(make_scorer(model, crops=15, device=device), images)
    print(f"{len(images)} images; agreement with 15 crops")
    out = {}
    for n in counts:
        scores = score_arrays(make_scorer(model, crops=n, device=device), images)
        out[n] = (srcc(scores, reference), float(np.max(np.abs(np.subtract(scores, reference)))))
        print(f"  {n:>2} crops: SRCC {out[n][0]:.4f}, max |d score| {out[n][1]:.4f}", flush=True)
    return out


def _subset(scores, labels, groups, group):
    keep = [i for i, g in enumerate(groups) if g == group]
    return [scores[i] for i in keep], [labels[i] for i in keep]


def print_table(result: dict) -> None:
    syn, real = result["synthetic"], result["real_pairs"]
    rows = [
        ("held-out synthetic SRCC (all)", f"{syn['srcc']:.4f}", f"{syn['images']} images", ">= 0.85"),
        ("  procedural references", f"{syn['srcc_procedural']:.4f}", "", ""),
    ]
    if "srcc_photos" in syn:
        rows.append(("  held-out photos", f"{syn['srcc_photos']:.4f}", "", ""))
    if "laplacian_variance_srcc" in syn:
        rows.append(("  Laplacian variance baseline", f"{syn['laplacian_variance_srcc']:.4f}", "", ""))
    if "srcc_within_reference_mean" in syn:
        rows.append(("  mean SRCC within one reference", f"{syn['srcc_within_reference_mean']:.4f}", "", ""))
    if syn.get("pristine_score_range"):
        low, high = syn["pristine_score_range"]
        rows.append(("  pristine images' scores", f"{low:.2f}-{high:.2f}", "", "(all label 1)"))
    if "ceilings" in syn:
        rows.append(("  oracle reading every level", f"{syn['ceilings']['level_reader']:.4f}", "", "(ceiling)"))
        rows.append(("  same, blind to " + " and ".join(LUMINANCE_FREE_TYPES),
                     f"{syn['ceilings']['level_reader_blind_to_colour_only_types']:.4f}", "", ""))
    if "srcc_vs_15_crops" in syn:
        rows.append((f"SRCC {result['crops']} crops vs 15", f"{syn['srcc_vs_15_crops']:.4f}", "", ""))
    rows += [
        ("real photos: original ranked above", f"{real['model']:.1%}", f"{real['pairs']} pairs", ">= 90%"),
        ("  Laplacian variance baseline", f"{real['laplacian_variance']:.1%}", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>8}  {'n':<12}  target")
    for name, value, n, target in rows:
        print(f"{name:<{width}}  {value:>8}  {n:<12}  {target}")
    if real["model_misses"]:
        print("model misses:", ", ".join(real["model_misses"]))
    if result.get("score_change_by_type"):
        by_type = syn.get("srcc_by_type", {})
        print("mean score change from the pristine image, held-out synthetic, levels 1..5"
              + (", and the type's SRCC with pristine images across references:" if by_type else ":"))
        for kind, changes in result["score_change_by_type"].items():
            tail = f"   SRCC {by_type[kind]:+.3f}" if kind in by_type else ""
            print(f"  {kind:<22}" + " ".join(f"{c:+.3f}" for c in changes) + tail)
    print(f"photos: {', '.join(real['photos'])}; model {result['model']}; {result['seconds']} s")


def write_manifest(path: Path, checkpoint: Path, result: dict, speed: dict | None = None) -> dict:
    """Add or replace the checkpoint's entry in ``weights/manifest.json`` (the built-in entry when
    the checkpoint says it is synthetic-only), with its checksum and the metrics just measured."""
    from loda_cli.weights import file_sha256, read_metadata

    meta = read_metadata(checkpoint)
    train = meta.get("train", {})
    description = meta.get("description", "")
    reproduce = description.split("Reproduce (seed", 1)[-1].split("): ", 1)[-1] if "Reproduce" in description else ""
    if reproduce and train.get("max_steps"):
        reproduce += f" --max-steps {train['max_steps']}"
    entry = {
        "name": meta["name"],
        "file": checkpoint.name,
        "builtin": bool(meta.get("synthetic_only")),
        "sha256": file_sha256(checkpoint),
        "size_bytes": checkpoint.stat().st_size,
        "dataset": meta.get("dataset", {}).get("name"),
        "seed": train.get("seed"),
        "backbones": meta.get("backbones", {}) | {"vit_kwargs": meta["config"].get("vit_kwargs"),
                                                  "cnn_kwargs": meta["config"].get("cnn_kwargs")},
        "parameters": result.get("parameters"),
        "preprocess": meta.get("preprocess"),
        "description": description.split(" Reproduce", 1)[0],
        "reproduce": reproduce,
        "metrics": {
            "test_split": meta.get("metrics", {}),
            "heldout_synthetic_srcc": round(result["synthetic"]["srcc"], 4),
            "heldout_synthetic_images": result["synthetic"]["images"],
            "heldout_synthetic_laplacian_baseline_srcc": round(
                result["synthetic"]["laplacian_variance_srcc"], 4),
            "real_photo_pairs_original_wins": round(result["real_pairs"]["model"], 4),
            "real_photo_pairs_laplacian_baseline": round(result["real_pairs"]["laplacian_variance"], 4),
            "real_photo_pairs": result["real_pairs"]["pairs"],
            "real_photos": result["real_pairs"]["photos"],
            "measured_by": "python scripts/eval_builtin.py --manifest weights/manifest.json",
        },
    }
    if "srcc_vs_15_crops" in result["synthetic"]:
        entry["metrics"]["srcc_default_crops_vs_15"] = round(result["synthetic"]["srcc_vs_15_crops"], 4)
    if speed:
        entry["metrics"]["speed"] = speed
    models = []
    if path.is_file():
        models = [m for m in json.loads(path.read_text())["models"] if m.get("name") != entry["name"]]
    models.insert(0, entry)
    path.write_text(json.dumps({"models": models}, indent=2) + "\n")
    return entry


def _crop_counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected crop counts such as 5,8,9, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"crop counts must be positive, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: what `loda score` resolves)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--crops-compare", action="store_true",
                        help="also score with 15 crops and report the rank agreement")
    parser.add_argument("--crops-sweep", metavar="N,N,...", type=_crop_counts,
                        help="only report, for each crop count, the rank agreement (SRCC) and the "
                             "largest score difference with 15 crops, on every 4th held-out synthetic "
                             "image and the real-photo pair sets (how a preset's crop count is chosen)")
    parser.add_argument("--manifest", help="write the results into this manifest.json entry")
    parser.add_argument("--speed-json", help="a JSON file of speed measurements to add to the entry")
    args = parser.parse_args(argv)
    if args.crops_sweep:
        crops_sweep(args.model, args.crops_sweep)
        return 0
    result = evaluate(args.model, crops_compare=args.crops_compare or bool(args.manifest))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.manifest:
        speed = json.loads(Path(args.speed_json).read_text()) if args.speed_json else None
        write_manifest(Path(args.manifest), Path(result["model"]), result, speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
