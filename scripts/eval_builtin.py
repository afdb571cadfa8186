"""Measure the built-in model against what its users need, and print a small table.

    python scripts/eval_builtin.py [--model weights/loda-builtin.safetensors] [--fullsize DIR]
                                   [--crops-compare] [--json out.json] [--manifest weights/manifest.json]

1. Agreement with people (``--cv DIR``): 5-fold cross-validation of the built-in recipe inside
   LIVE Challenge split 0's 930 training photos, by photo (median SRCC and PLCC over the folds);
   without ``--cv``, what the checkpoint recorded (`loda train ... --cv`), if anything.
2. Real-photo pairs: photos that ship inside PyPI packages (scikit-image, scikit-learn,
   matplotlib; never training material) against their level 3-5 blur, noise and JPEG versions,
   made at the photo's own size. The share of pairs in which the original scores higher (a tie is
   a miss), beside the variance-of-the-Laplacian sharpness statistic on the same pairs.
3. Full-size pairs (``--fullsize DIR``): photos of 3 MP or more at their own resolution against
   Gaussian blur with sigma = long side / 1000, Gaussian noise sigma 20 and JPEG quality 10, made
   at full size and scored from files through `loda score`'s own path (decode, views, crops).
4. ``--noise-sweep DIR``: each distinct photo of 3 MP or more under DIR (the same picture at
   several resolutions counts once, at its largest) saved as a camera would, JPEG quality 92,
   against itself with Gaussian noise of sigma 10, 20 and 35 added at full size, saved the same
   way: the share in which the clean photo scores higher, by sigma, and the misses.
5. ``--crops-compare``: the rank agreement (SRCC) of the default crops with 15 crops of the
   384-pixel view, over every image of 2 and 3.

Scores go through the scorer (``Scorer.preprocess``: both views, the fixed grids of crops, the
checkpoint's crop weights and calibration).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

HOLDOUT_SEED = 2024
PAIR_TYPES = ("gaussian_blur", "lens_blur", "motion_blur", "white_noise", "color_noise",
              "camera_noise", "jpeg")  # fmt: skip
PAIR_LEVELS = (3, 4, 5)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
FULLSIZE_MIN_PIXELS = 3_000_000


def heldout_photos() -> list[tuple[str, np.ndarray]]:
    """Colour photographs shipped inside PyPI packages: scikit-image's astronaut, chelsea, coffee,
    rocket and motorcycle_left; scikit-learn's china and flower (CC BY 2.0); matplotlib's
    grace_hopper (public domain). Those whose package is missing are left out; nothing is
    downloaded. None of them is LIVE Challenge material."""
    photos = []
    try:
        from skimage import data

        for name in SKIMAGE_PHOTOS:
            try:
                photos.append((name, np.ascontiguousarray(getattr(data, name)()[..., :3], dtype=np.uint8)))
            except Exception:  # a data file scikit-image would have to download
                pass
    except ImportError:
        pass
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


def fullsize_damage(image: np.ndarray, seed: int) -> list[tuple[str, np.ndarray | bytes]]:
    """The three full-size damages: blur (sigma = long side / 1000), noise (sigma 20), JPEG 10.
    The JPEG version is returned as the encoded file's bytes."""
    import io

    sigma = max(image.shape[:2]) / 1000.0
    blurred = np.empty_like(image)
    for c in range(3):
        blurred[..., c] = np.clip(ndimage.gaussian_filter(image[..., c].astype(np.float32), sigma), 0, 255).round()
    rng = np.random.default_rng(seed)
    noisy = np.clip(image.astype(np.float32) + rng.normal(0.0, 20.0, image.shape), 0, 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=10)
    return [("blur", blurred), ("noise", noisy), ("jpeg10", buffer.getvalue())]


def fullsize_photos(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff"))
    keep = []
    for path in files:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] >= FULLSIZE_MIN_PIXELS:
                keep.append(path)
    return keep


def laplacian_variance(image: np.ndarray) -> float:
    """The classic sharpness statistic: variance of the Laplacian of the grey image."""
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(ndimage.laplace(grey).var())


def make_scorer(model: str | None = None, crops: int | None = None, device: str = "cpu"):
    from loda_cli.scoring import Scorer

    return Scorer(model, device=device, crops=crops, cache=False, workers=0)


def score_arrays(scorer, images: list[np.ndarray], batch_crops: int = 64) -> list[float]:
    """Calibrated scores of in-memory RGB images through the scorer's preprocessing (both views
    and the checkpoint's crop weights), with crops of many images batched together."""
    from loda_cli.transforms import crop_weights, scoring_crops

    raws: list[float] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if not pending:
            return
        flat = scorer._forward(np.concatenate(pending))
        start = 0
        for crops in pending:
            weights = crop_weights(scorer.preprocess, len(crops))
            raws.append(float(np.dot(flat[start : start + len(crops)], weights)))
            start += len(crops)
        pending.clear()

    for image in images:
        pending.append(scoring_crops(Image.fromarray(image), scorer.preprocess))
        if sum(len(c) for c in pending) >= batch_crops:
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


def score_fullsize(scorer, photos: list[Path]) -> dict:
    """Write each photo's original (as PNG, so every version shares one decoder path apart from
    the JPEG) and its damaged versions to files, score them with the scorer, and count wins."""
    from loda_cli.images import decode_image

    wins, total, misses, per_type = 0, 0, [], {}
    lap_wins = 0
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = []
        for i, path in enumerate(photos):
            image = np.asarray(decode_image(path, target_short_side=None).image)
            stem = f"{i:02d}_{path.stem}"
            Image.fromarray(image).save(folder / f"{stem}.png", compress_level=1)
            lap = {"original": laplacian_variance(image)}
            for kind, damaged in fullsize_damage(image, seed=i):
                if isinstance(damaged, bytes):
                    (folder / f"{stem}__{kind}.jpg").write_bytes(damaged)
                    lap[kind] = laplacian_variance(np.asarray(Image.open(folder / f"{stem}__{kind}.jpg").convert("RGB")))
                else:
                    Image.fromarray(damaged).save(folder / f"{stem}__{kind}.png", compress_level=1)
                    lap[kind] = laplacian_variance(damaged)
            names.append((stem, image.shape[1], image.shape[0], lap))
        for row in scorer.score_files([folder]):
            scores[Path(row.path).stem] = row.score
        for stem, w, h, lap in names:
            for kind in ("blur", "noise", "jpeg10"):
                total += 1
                won = scores[stem] > scores[f"{stem}__{kind}"]
                wins += won
                lap_wins += lap["original"] > lap[kind]
                per_type.setdefault(kind, []).append(bool(won))
                if not won:
                    misses.append(f"{stem} {kind} ({scores[stem]:.3f} vs {scores[f'{stem}__{kind}']:.3f})")
    return {
        "photos": [f"{s} ({w}x{h})" for s, w, h, _ in names],
        "pairs": total,
        "model": wins / total if total else float("nan"),
        "laplacian_variance": lap_wins / total if total else float("nan"),
        "by_type": {k: float(np.mean(v)) for k, v in per_type.items()},
        "misses": misses,
        "scores": scores,
    }


NOISE_SIGMAS = (10, 20, 35)


def distinct_photos(photos: list[Path]) -> list[Path]:
    """One file per picture: the largest of those whose 16 x 16 grey thumbnails differ by less
    than 4 of 255 on average (a wallpaper package ships one picture at a dozen resolutions and
    crops of slightly different aspect)."""
    kept: list[tuple[np.ndarray, int, Path]] = []
    for path in photos:
        with Image.open(path) as im:
            pixels = im.size[0] * im.size[1]
            thumb = np.asarray(im.convert("L").resize((16, 16), Image.BOX), dtype=np.float32)
        same = next((k for k, (other, _, _) in enumerate(kept) if np.abs(other - thumb).mean() < 4), None)
        if same is None:
            kept.append((thumb, pixels, path))
        elif pixels > kept[same][1]:
            kept[same] = (thumb, pixels, path)
    return sorted(path for _, _, path in kept)


def noise_sweep(scorer, photos: list[Path]) -> dict:
    """Clean JPEG (quality 92) against noisy JPEGs (sigma 10, 20, 35), all made at full size."""
    from loda_cli.images import decode_image

    wins: dict[int, list[bool]] = {s: [] for s in NOISE_SIGMAS}
    misses: dict[int, list[str]] = {s: [] for s in NOISE_SIGMAS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, path in enumerate(photos):
            image = np.asarray(decode_image(path, target_short_side=None).image)
            Image.fromarray(image).save(folder / f"{i:03d}_clean.jpg", quality=92)
            rng = np.random.default_rng(i)
            for sigma in NOISE_SIGMAS:
                noisy = np.clip(image.astype(np.float32) + rng.normal(0.0, sigma, image.shape), 0, 255)
                Image.fromarray(noisy.round().astype(np.uint8)).save(folder / f"{i:03d}_noise{sigma}.jpg", quality=92)
        scores = {Path(row.path).stem: row.score for row in scorer.score_files([folder])}
    for i, path in enumerate(photos):
        clean = scores[f"{i:03d}_clean"]
        for sigma in NOISE_SIGMAS:
            noisy = scores[f"{i:03d}_noise{sigma}"]
            wins[sigma].append(clean > noisy)
            if not clean > noisy:
                misses[sigma].append(f"{path.name} ({clean:.3f} vs {noisy:.3f})")
    return {"photos": len(photos), "clean_wins": {s: float(np.mean(w)) for s, w in wins.items()}, "misses": misses}


SHARE_THRESHOLDS = (0.2, 0.4, 0.6)  # the --below values the README's shares are given for


def livec_agreement(scorer, folder: Path) -> dict:
    """SRCC and PLCC with people's scores on a LIVE Challenge folder (labels.csv or the official
    layout), for a model that never trained on it (the previous built-in model, a baseline)."""
    from loda_cli.builtin import read_training_photos
    from loda_cli.images import decode_image
    from loda_cli.metrics import evaluate as metrics

    photos, source = read_training_photos(folder)
    rows = {Path(row.path).resolve(): row for row in scorer.score_files([p.path for p in photos])}
    pred = [rows[p.path.resolve()].score for p in photos]
    lap = [laplacian_variance(np.asarray(decode_image(p.path, target_short_side=None).image)) for p in photos]
    mos = [p.mos for p in photos]
    m, ml = metrics(pred, mos), metrics(lap, mos)
    scores, people = np.asarray(pred), np.asarray(mos) / 100
    return {"source": source, "photos": len(photos), "srcc": m["srcc"], "plcc": m["plcc"],
            "laplacian_variance_srcc": ml["srcc"],
            **{f"share_below_{t}": float(np.mean(scores < t)) for t in SHARE_THRESHOLDS},
            **{f"mos_share_below_{t}": float(np.mean(people < t)) for t in SHARE_THRESHOLDS}}


def save_fold_model(folder: Path, k: int, model, recipe) -> Path:
    """A fold's model as a checkpoint (no calibration, the built-in preprocessing, the recipe and
    the fold in its metadata): for :func:`rescore_folds`, or `loda score --model`."""
    from loda_cli import builtin

    folder.mkdir(parents=True, exist_ok=True)
    return builtin.save_fold_checkpoint(model, folder / f"fold{k + 1}.safetensors", builtin.BUILTIN_PREPROCESS,
                                        name=f"cross-validation-fold-{k + 1}", recipe=recipe.to_dict(), fold=k)


def rescore_folds(folder: Path, models: Path, precision: str = "auto") -> dict:
    """The cross-validation of fold models kept by an earlier ``--cv ... --cv-models DIR`` run,
    scored again through today's scorer and built-in preprocessing (crop counts, layouts), with
    no training. Each model's held-out photos are its fold's under the recipe it records."""
    from dataclasses import replace

    from loda_cli import builtin
    from loda_cli.metrics import evaluate as metrics
    from loda_cli.scoring import Scorer
    from loda_cli.weights import load_model

    photos, source = builtin.read_training_photos(folder)
    photos, _, _ = builtin.load_photos(photos)
    mos = np.array([p.mos for p in photos])
    results, recipes = [], []
    for path in sorted(models.glob("fold*.safetensors")):
        loaded = replace(load_model(str(path)), preprocess=builtin.BUILTIN_PREPROCESS)
        recorded = loaded.metadata.get("recipe")
        recipe = builtin.BuiltinRecipe(**recorded) if recorded else builtin.BuiltinRecipe()
        k = int(loaded.metadata.get("fold", int(path.stem[len("fold"):]) - 1))
        test = builtin.kfold(len(mos), recipe.folds, recipe.seed)[k]
        scorer = Scorer(loaded, device="cpu", precision=precision, cache=False, groups=False)
        m = metrics(builtin.heldout_raws(scorer, [photos[i].path for i in test]).tolist(), mos[test].tolist())
        results.append({"fold": k, "n": int(len(test)), "srcc": float(m["srcc"]), "plcc": float(m["plcc"]),
                        "measured_on": "scorer"})
        recipes.append(recipe.to_dict())
        print(f"  fold {k + 1}: SRCC {m['srcc']:.4f}, PLCC {m['plcc']:.4f}", flush=True)
    if not results:
        raise SystemExit(f"--cv-models {models}: no foldN.safetensors there")
    if any(r != recipes[0] for r in recipes):
        raise SystemExit(f"--cv-models {models}: the fold models come from different recipes")
    out = builtin.summarise_folds(results)
    out.update(source=source, photos=len(photos), recipe=recipes[0], folds_total=recipes[0]["folds"],
               preprocess=builtin.BUILTIN_PREPROCESS.to_dict())
    return out


def cross_validation(folder: Path, folds: int | None = None, only: list[int] | None = None,
                     models: Path | None = None) -> dict:
    """K-fold cross-validation of the built-in recipe inside LIVE Challenge split 0's training
    photos (by photo): each fold trains a fresh model on the other folds, exactly as `loda train
    livec --preset builtin` trains the shipped one, and scores its held-out photos' files through
    the scorer, as `loda score` would. ``only``: these folds (0-based), for splitting the run
    between processes; merge their --json outputs with --cv-json."""
    from dataclasses import replace

    from loda_cli import builtin

    recipe = builtin.BuiltinRecipe()
    if folds:
        recipe = replace(recipe, folds=folds)
    t0 = time.perf_counter()
    photos, source = builtin.read_training_photos(folder)
    photos, images, problems = builtin.load_photos(photos)
    mos = np.array([p.mos for p in photos])
    model, _ = builtin.new_model(recipe.seed)
    bank = builtin.build_bank(images, model, recipe, builtin.BUILTIN_PREPROCESS)
    del images
    result = builtin.cross_validate(
        bank, mos, recipe, builtin.BUILTIN_PREPROCESS, only=only,
        on_model=None if models is None else lambda k, model: save_fold_model(models, k, model, recipe),
        predict=builtin.scorer_predictor([p.path for p in photos], builtin.BUILTIN_PREPROCESS),
        on_fold=lambda f, _: print(f"  fold {f['fold'] + 1}: SRCC {f['srcc']:.4f}, PLCC {f['plcc']:.4f} "
                                   f"(on the training crops: SRCC {f['bank_srcc']:.4f})", flush=True),
    )
    result.update(source=source, photos=len(photos), recipe=recipe.to_dict(), folds_total=recipe.folds,
                  minutes=round((time.perf_counter() - t0) / 60, 1))
    return result


def merge_cross_validations(parts: list[dict]) -> dict:
    """One cross-validation from the --json outputs of runs that each measured some folds of the
    same recipe. A fold measured twice must agree; the training is deterministic."""
    from loda_cli import builtin

    recipes = {json.dumps(p.get("recipe"), sort_keys=True) for p in parts}
    if len(recipes) != 1:
        raise SystemExit("--cv-json: the files cross-validate different recipes")
    folds: dict[int, dict] = {}
    for part in parts:
        for f in part["folds"]:
            if f["fold"] not in folds:
                folds[f["fold"]] = f
            elif abs(folds[f["fold"]]["srcc"] - f["srcc"]) > 1e-6:
                # The same model scored twice can differ a little when --precision auto chose
                # differently; the first file given wins.
                print(f"warning: fold {f['fold'] + 1} measured twice: SRCC {folds[f['fold']]['srcc']:.4f} "
                      f"(kept) and {f['srcc']:.4f}", file=sys.stderr)
    merged = builtin.summarise_folds(list(folds.values()))
    total = parts[0].get("folds_total")
    merged.update(source=parts[0].get("source"), photos=parts[0].get("photos"), recipe=parts[0].get("recipe"),
                  folds_total=total, minutes=round(sum(p.get("minutes", 0) for p in parts), 1))
    if total and len(folds) != total:
        print(f"warning: {len(folds)} of {total} folds measured", file=sys.stderr)
    return merged


def evaluate(model: str | None, fullsize: Path | None, crops_compare: bool, device: str = "cpu",
             livec: Path | None = None, cv: Path | None = None, cv_folds: list[int] | None = None,
             cv_models: Path | None = None, noise: Path | None = None) -> dict:
    from loda_cli.metrics import srcc
    from loda_cli.weights import load_checkpoint, read_metadata

    t0 = time.perf_counter()
    scorer = make_scorer(model, device=device)
    meta = read_metadata(scorer.loaded.path)
    result: dict = {
        "model": str(scorer.loaded.path),
        # Counted on the checkpoint's own model: the scorer's may hold int8-packed Linear layers.
        "parameters": sum(p.numel() for p in load_checkpoint(scorer.loaded.path)[0].parameters()),
        "cross_validation": meta.get("metrics", {}).get("cross_validation", {}),
    }
    if cv is not None:
        result["cross_validation"] = cross_validation(cv, only=cv_folds, models=cv_models)
    pairs = real_photo_pairs()
    accuracy, total, misses = pair_accuracy(pairs, lambda images: score_arrays(scorer, images))
    lap, _, _ = pair_accuracy(pairs, lambda images: [laplacian_variance(im) for im in images])
    result["real_pairs"] = {"model": accuracy, "laplacian_variance": lap, "pairs": total, "misses": misses,
                            "photos": [name for name, _, _ in pairs]}
    if fullsize is not None:
        photos = fullsize_photos(fullsize)
        if not photos:
            raise SystemExit(f"no photos of {FULLSIZE_MIN_PIXELS / 1e6:.0f} MP or more under {fullsize}")
        result["fullsize_pairs"] = score_fullsize(scorer, photos)
    if noise is not None:
        photos = distinct_photos(fullsize_photos(noise))
        if not photos:
            raise SystemExit(f"no photos of {FULLSIZE_MIN_PIXELS / 1e6:.0f} MP or more under {noise}")
        result["noise_sweep"] = noise_sweep(scorer, photos)
    if livec is not None:
        result["livec_agreement"] = livec_agreement(scorer, livec)
    if crops_compare:
        images = [im for _, original, versions in pairs for im in [original] + [v for _, _, v in versions]]
        default = score_arrays(scorer, images)
        fifteen = score_arrays(make_scorer(model, crops=15, device=device), images)
        result["srcc_default_crops_vs_15"] = srcc(default, fifteen)
        result["crops_compared_images"] = len(images)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def print_table(result: dict) -> None:
    cv = result.get("cross_validation") or {}
    if cv:
        folds = ", ".join(f"{f['srcc']:.3f}" for f in cv.get("folds", []))
        where = {"scorer": "held-out files scored as `loda score` does"}.get(
            cv.get("measured_on", "bank crops"), "held-out photos' training crops")
        bank = f"; on the training crops {cv['median_bank_srcc']:.4f}" if "median_bank_srcc" in cv and \
            cv.get("measured_on") == "scorer" else ""
        print(f"{len(cv.get('folds', []))}-fold cross-validation (LIVE Challenge, {cv.get('photos', 930)} photos; "
              f"{where}): median SRCC {cv['median_srcc']:.4f}, median PLCC {cv['median_plcc']:.4f} "
              f"(folds: {folds}{bank})")
    real = result["real_pairs"]
    print(f"real-photo pairs: original wins {100 * real['model']:.1f}% of {real['pairs']} "
          f"(Laplacian variance {100 * real['laplacian_variance']:.1f}%); misses: {', '.join(real['misses']) or 'none'}")
    full = result.get("fullsize_pairs")
    if full:
        by_type = ", ".join(f"{k} {100 * v:.0f}%" for k, v in full["by_type"].items())
        print(f"full-size pairs: original wins {100 * full['model']:.1f}% of {full['pairs']} ({by_type}; "
              f"Laplacian variance {100 * full['laplacian_variance']:.1f}%); misses: {', '.join(full['misses']) or 'none'}")
    sweep = result.get("noise_sweep")
    if sweep:
        shares = ", ".join(f"sigma {s}: {100 * w:.1f}%" for s, w in sweep["clean_wins"].items())
        misses = sweep["misses"].get(20) or sweep["misses"].get("20") or []  # keys are strings once read from JSON
        print(f"noise sweep ({sweep['photos']} photos, JPEG 92): clean above noisy {shares}; misses at sigma 20: "
              f"{', '.join(misses) or 'none'}")
    agreement = result.get("livec_agreement")
    if agreement:
        print(f"LIVE Challenge ({agreement['source']}): SRCC {agreement['srcc']:.4f}, PLCC {agreement['plcc']:.4f} "
              f"(Laplacian variance SRCC {agreement['laplacian_variance_srcc']:.4f}); scored below "
              + ", ".join(f"{t}: {100 * agreement[f'share_below_{t}']:.1f}%"
                          + (f" (people {100 * agreement[f'mos_share_below_{t}']:.1f}%)"
                             if f"mos_share_below_{t}" in agreement else "")
                          for t in SHARE_THRESHOLDS if f"share_below_{t}" in agreement))
    if "srcc_default_crops_vs_15" in result:
        print(f"default crops vs 15: SRCC {result['srcc_default_crops_vs_15']:.4f} "
              f"({result['crops_compared_images']} images)")
    print(f"model {result['model']}; {result['parameters']:,} parameters; {result['seconds']} s")


def second_seed_entry(result: dict) -> dict:
    """The manifest's record of another training seed of the same recipe, from the --json output
    of ``eval_builtin.py --model THAT.safetensors --fullsize PHOTOS``."""
    from loda_cli.weights import file_sha256, read_metadata

    meta = read_metadata(Path(result["model"]))
    seed = meta.get("dataset", {}).get("seed")
    entry = {
        "seed": seed,
        "command": f"loda train livec --preset builtin --seed {seed} --data DIR --out seed{seed}.safetensors; "
                   f"python scripts/eval_builtin.py --model seed{seed}.safetensors --fullsize PHOTOS",
        "sha256": file_sha256(Path(result["model"])),
        "real_photo_pairs_original_wins": round(result["real_pairs"]["model"], 4),
        "real_photo_pairs": result["real_pairs"]["pairs"],
        "training_photos_score_shares": {k: round(v, 3) for k, v in
                                         (meta.get("metrics", {}).get("training_photos_score_shares") or {}).items()},
    }
    full = result.get("fullsize_pairs")
    if full:
        entry |= {"fullsize_pairs_original_wins": round(full["model"], 4), "fullsize_pairs": full["pairs"],
                  "fullsize_pairs_by_type": {k: round(v, 4) for k, v in full["by_type"].items()},
                  "fullsize_misses": full["misses"]}
    return entry


def write_manifest(path: Path, checkpoint: Path, result: dict, speed: dict | None = None,
                   previous: dict | None = None, second_seed: dict | None = None) -> dict:
    """Add or replace the built-in entry of ``weights/manifest.json`` with the checkpoint's
    checksum and the figures just measured."""
    from loda_cli.weights import file_sha256, read_metadata

    meta = read_metadata(checkpoint)
    cv = result["cross_validation"]
    metrics = {} if not cv.get("folds") else {
        "cross_validation_median_srcc": round(cv["median_srcc"], 4),
        "cross_validation_median_plcc": round(cv["median_plcc"], 4),
        "cross_validation_folds": cv["folds"],
        # "scorer": each fold's model scored its held-out photos' files as `loda score` does;
        # "bank crops" (figures before 2026-12): from random crops of the training bank.
        "cross_validation_measured_on": cv.get("measured_on", "bank crops"),
    }
    metrics |= {
        "real_photo_pairs_original_wins": round(result["real_pairs"]["model"], 4),
        "real_photo_pairs_laplacian_baseline": round(result["real_pairs"]["laplacian_variance"], 4),
        "real_photo_pairs": result["real_pairs"]["pairs"],
        "real_photos": result["real_pairs"]["photos"],
        "training_photos_score_shares": meta.get("metrics", {}).get("training_photos_score_shares"),
        "measured_by": "python scripts/eval_builtin.py --cv LIVEC_DIR --fullsize DIR --crops-compare --manifest weights/manifest.json "
                       "(the folds may be split between processes with --cv-folds and merged with --cv-json)",
    }
    if "fullsize_pairs" in result:
        full = result["fullsize_pairs"]
        metrics["fullsize_pairs_original_wins"] = round(full["model"], 4)
        metrics["fullsize_pairs_laplacian_baseline"] = round(full["laplacian_variance"], 4)
        metrics["fullsize_pairs"] = full["pairs"]
        metrics["fullsize_pairs_by_type"] = {k: round(v, 4) for k, v in full["by_type"].items()}
        metrics["fullsize_photos"] = full["photos"]
    if "srcc_default_crops_vs_15" in result:
        metrics["srcc_default_crops_vs_15"] = round(result["srcc_default_crops_vs_15"], 4)
    agreement = result.get("livec_agreement") or {}
    if "share_below_0.2" in agreement:
        # The same shares as the checkpoint's (which come from its training crops), as `loda score`
        # scores the --livec photos' files.
        metrics["livec_photos_score_shares_as_scored"] = {
            "photos": agreement["photos"],
            **{f"below_{t}": round(agreement[f"share_below_{t}"], 4) for t in SHARE_THRESHOLDS},
            **{f"people_below_{t}": round(agreement[f"mos_share_below_{t}"], 4) for t in SHARE_THRESHOLDS}}
    if speed:
        metrics["speed"] = speed
    if second_seed:
        metrics["second_seed"] = second_seed_entry(second_seed)
    entry = {
        "name": meta["name"],
        "file": checkpoint.name,
        "builtin": True,
        "sha256": file_sha256(checkpoint),
        "size_bytes": checkpoint.stat().st_size,
        "dataset": meta.get("dataset", {}).get("name"),
        "seed": meta.get("dataset", {}).get("seed"),
        "backbones": meta.get("backbones", {}) | {"vit_kwargs": meta["config"].get("vit_kwargs"),
                                                  "cnn_weights": meta.get("cnn_weights")},
        "parameters": result.get("parameters"),
        "preprocess": meta.get("preprocess"),
        "description": meta.get("description", ""),
        "reproduce": meta.get("reproduce", ""),
        "metrics": metrics,
    }
    if cv.get("measured_on") == "scorer":
        metrics["cross_validation_note"] = (
            "each fold trained by builtin.fit on the crop bank `loda train livec --preset builtin` builds "
            f"(seed {meta.get('dataset', {}).get('seed')}), saved as a checkpoint, and its held-out photos' files "
            "scored through loda's Scorer as `loda score` scores them (grid crops, --precision auto); bank_srcc: "
            "the same model on the held-out photos' random training crops, how the figures were measured before")
    if previous:
        entry["previous_builtin"] = previous
    models = []
    if path.is_file():
        models = json.loads(path.read_text())["models"]
        # The same checkpoint measured again keeps what this run did not measure (speed, a
        # second seed, the recipe before, ...).
        for old in models:
            if old.get("name") == entry["name"] and old.get("sha256") == entry["sha256"]:
                entry["metrics"] = {**old.get("metrics", {}), **metrics}
                if not previous and "previous_builtin" in old:
                    entry["previous_builtin"] = old["previous_builtin"]
        models = [m for m in models if m.get("name") != entry["name"]]
    models.insert(0, entry)
    from loda_cli.weights import _atomic_write_bytes

    _atomic_write_bytes(path, (json.dumps({"models": models}, indent=2) + "\n").encode())
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: what `loda score` resolves)")
    parser.add_argument("--fullsize", type=Path, help="a folder of photos of 3 MP or more (not LIVE Challenge)")
    parser.add_argument("--noise-sweep", type=Path, metavar="DIR",
                        help="a folder of photos of 3 MP or more: each against its noise sigma 10/20/35 versions")
    parser.add_argument("--crops-compare", action="store_true", help="SRCC of the default crops against 15")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--manifest", help="write the results into this manifest.json entry")
    parser.add_argument("--speed-json", help="a JSON file of speed measurements to add to the entry")
    parser.add_argument("--previous-json", help="a JSON file of the previous built-in model's figures to keep beside")
    parser.add_argument("--second-seed-json", help="the --json output of this script for the same recipe trained "
                                                   "with another seed, to record beside")
    parser.add_argument("--cv", type=Path, metavar="DIR",
                        help="LIVE Challenge split 0's training photos (labels.csv folder or the official "
                             "release): run the built-in recipe's 5-fold cross-validation (~75 min, 2 cores)")
    parser.add_argument("--cv-folds", metavar="N,N",
                        help="with --cv: only these folds (1-5), to split the run between processes")
    parser.add_argument("--cv-json", type=Path, metavar="FILE", action="append",
                        help="take the cross-validation from this --json output of an earlier --cv run; "
                             "repeat it to merge runs that measured different folds")
    parser.add_argument("--cv-models", type=Path, metavar="DIR",
                        help="with --cv: keep each fold's model as DIR/foldN.safetensors; without --cv: score "
                             "the held-out photos of the fold models kept there again, with today's scorer and "
                             "preprocessing (no training), from the photos of --cv-photos")
    parser.add_argument("--cv-photos", type=Path, metavar="DIR", help="the photos --cv-models's folds came from")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="measure nothing: take the results from this --json output of an earlier run "
                             "(to write the manifest from measurements already made)")
    parser.add_argument("--livec", type=Path,
                        help="LIVE Challenge photos the model never trained on: SRCC with people's scores")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name, folder in (("--fullsize", args.fullsize), ("--noise-sweep", args.noise_sweep)):
        if folder is not None and not folder.is_dir():
            parser.error(f"{name}: no such folder: {folder}")
    cv_folds = None
    if args.cv_folds:
        try:
            cv_folds = sorted({int(n) - 1 for n in args.cv_folds.split(",")})
        except ValueError:
            parser.error(f"--cv-folds: expected fold numbers such as 1,4, got {args.cv_folds!r}")
        if args.cv is None or min(cv_folds) < 0:
            parser.error("--cv-folds needs --cv and fold numbers from 1")
    if args.cv is not None and args.cv_json:
        parser.error("--cv and --cv-json: use one of them")
    parts = []
    for path in args.cv_json or []:
        try:
            parts.append(json.loads(path.read_text())["cross_validation"])
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--cv-json {path}: not the --json output of a --cv run ({e})")
    if args.cv_models is not None and args.cv is None and args.cv_photos is None:
        parser.error("--cv-models needs --cv (train and keep) or --cv-photos (score kept models again)")
    if args.from_json is not None:
        if args.cv is not None or args.fullsize is not None or args.livec is not None or args.crops_compare:
            parser.error("--from-json measures nothing: drop --cv, --fullsize, --livec and --crops-compare")
        try:
            result = json.loads(args.from_json.read_text())
            result["real_pairs"]
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--from-json {args.from_json}: not the --json output of this script ({e})")
    else:
        result = evaluate(args.model, args.fullsize, args.crops_compare, args.device, args.livec, args.cv, cv_folds,
                          args.cv_models, args.noise_sweep)
    if parts:
        result["cross_validation"] = merge_cross_validations(parts)
    elif args.cv is None and args.cv_models is not None:
        result["cross_validation"] = rescore_folds(args.cv_photos, args.cv_models)
    print_table(result)
    if args.json:
        from loda_cli.weights import _atomic_write_bytes

        _atomic_write_bytes(Path(args.json), (json.dumps(result, indent=2, default=float) + "\n").encode())
    if args.manifest:
        speed = json.loads(Path(args.speed_json).read_text()) if args.speed_json else None
        previous = json.loads(Path(args.previous_json).read_text()) if args.previous_json else None
        second = json.loads(Path(args.second_seed_json).read_text()) if args.second_seed_json else None
        write_manifest(Path(args.manifest), Path(result["model"]), result, speed, previous, second)
    return 0


if __name__ == "__main__":
    from loda_cli.errors import LodaError

    try:
        sys.exit(main())
    except LodaError as exc:  # a missing folder, a malformed labels file, an unreadable model
        sys.exit(f"eval_builtin: {exc}")
