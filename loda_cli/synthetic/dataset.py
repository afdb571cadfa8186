"""Synthetic datasets: labels, samples, the writer, and the ``synthetic`` training dataset.

:func:`quality_label` turns a level and a PSNR-derived strength into a quality in [0, 1].
:func:`generate_samples` yields :class:`SyntheticSample` deterministically for a seed;
:func:`write_dataset` writes them as images plus a ``labels.csv`` (``path,mos,ref``) that the
generic ``csv`` dataset reads. Splits are by reference, made by the trainer. Importing this
module registers the ``synthetic`` dataset of ``loda train`` and ``loda benchmark``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loda_cli import datasets
from loda_cli.atomic import replacing
from loda_cli.errors import DatasetError, OutputError, UsageError
from loda_cli.synthetic.arrays import LEVELS, check_image, check_level
from loda_cli.synthetic.distortions import (
    DISTORTIONS,
    LEVEL_PARAMETERS,
    apply_components,
    resolve_names,
)
from loda_cli.synthetic.references import default_references, load_reference_folder, reference_files

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

#: PSNR (dB) at or above which a distortion counts as invisible, and at or below which as total.
PSNR_CLEAN = 45.0
PSNR_WORST = 15.0
#: Weight of the nominal level in the label; the rest is the measured strength.
LEVEL_WEIGHT = 0.6


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape 8-bit images; ``inf`` if identical."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise UsageError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def strength_from_psnr(psnr_db: float) -> float:
    """Measured distortion strength in [0, 1]: ``(45 - PSNR) / (45 - 15)``, clipped.

    0 at 45 dB or more (invisible), 1 at 15 dB or less.
    """
    if math.isnan(psnr_db):
        raise UsageError("PSNR is NaN")
    return float(np.clip((PSNR_CLEAN - psnr_db) / (PSNR_CLEAN - PSNR_WORST), 0.0, 1.0))


def effective_level(components: Sequence[tuple[str, int]]) -> float:
    """The level of a mix: ``min(5, sqrt(sum of squared levels))``; one component's own level."""
    return min(5.0, math.sqrt(sum(level * level for _, level in components)))


def quality_label(level: float, measured_strength: float) -> float:
    """The quality label of a synthetic image, in [0, 1], higher is better.

    ``label = 1 - 0.6 * level / 5 - 0.4 * measured_strength``, clipped to [0, 1].

    ``level`` is the nominal level (0 for the pristine reference, 1..5, or a mix's
    :func:`effective_level`) and ``measured_strength`` the :func:`strength_from_psnr` of the
    result against its reference. The pristine image gets exactly 1.0. The level term keeps the
    KADID ordering (each level costs 0.12), so the label falls with the level for every type; the
    measured term ranks types against each other within a level by how much they actually changed
    the image (a level-3 blur of a flat sky is milder than a level-3 blur of foliage).
    """
    if not 0.0 <= level <= 5.0:
        raise UsageError(f"level must lie in [0, 5], got {level}")
    if not 0.0 <= measured_strength <= 1.0:
        raise UsageError(f"measured_strength must lie in [0, 1], got {measured_strength}")
    label = 1.0 - LEVEL_WEIGHT * level / 5.0 - (1.0 - LEVEL_WEIGHT) * measured_strength
    return float(np.clip(label, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Samples and datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image and its label.

    ``distortion`` is ``"pristine"``, a name from :data:`DISTORTIONS`, or names joined by ``+``
    for a mix; ``level`` is 0 for pristine, else the level the sample was generated at (a mix's
    first component); ``components`` lists every ``(name, level)`` applied, in order.
    """

    image: np.ndarray
    ref_id: str
    distortion: str
    level: int
    label: float
    components: tuple[tuple[str, int], ...] = ()
    psnr: float = math.inf


def _stable_key(ref_id: str) -> int:
    # Seeds must not depend on Python's salted str hash, nor on the reference's list position.
    return zlib.crc32(ref_id.encode("utf-8"))


def _check_references(references: Sequence[tuple[str, np.ndarray]]) -> None:
    seen = set()
    for item in references:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise UsageError("references must be (ref_id, image) pairs")
        ref_id, image = item
        if not isinstance(ref_id, str) or not ref_id:
            raise UsageError(f"reference ids must be non-empty strings, got {ref_id!r}")
        if ref_id in seen:
            raise UsageError(f"duplicate reference id {ref_id!r}")
        seen.add(ref_id)
        check_image(image)


def generate_samples(
    references: Sequence[tuple[str, np.ndarray]],
    seed: int,
    per_reference: int | None = None,
    levels: Sequence[int] = LEVELS,
    types: Iterable[str] | None = None,
    include_pristine: bool = True,
    mix_probability: float = 0.0,
    always_types: Sequence[str] = (),
) -> Iterator[SyntheticSample]:
    """Yield labelled distorted versions of each reference, deterministically for ``seed``.

    For each reference, in order: the pristine image (label 1.0) when ``include_pristine``, then
    ``per_reference`` distortion types (default: all of ``types``, like KADID; more than there
    are types cycles through them again), each at every level in ``levels``. Types are picked by
    a per-reference shuffle. With probability ``mix_probability`` a pick becomes a mix: the
    picked type at the level, plus one or two other types at fixed random levels 1..3.
    ``always_types`` are given to every reference, first and in that order; ``per_reference``
    then counts the picks from the other types.

    Every random draw is seeded from ``(seed, ref_id, pick)``, never from the reference's
    position or the order of iteration, and one pick's random fields are the same at all its
    levels, so the levels of one pick differ only in strength.
    """
    _check_references(references)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    names = resolve_names(types)
    always = list(always_types)
    unknown = [name for name in always if name not in names]
    if unknown or len(set(always)) != len(always):
        raise UsageError(f"always_types must be distinct distortion types in use, got {always!r}")
    levels = tuple(check_level(level) for level in levels)
    if not levels:
        raise UsageError("levels is empty")
    if per_reference is None:
        per_reference = len(names) - len(always)
    if isinstance(per_reference, bool) or int(per_reference) != per_reference or per_reference < 0:
        raise UsageError(f"per_reference must be a non-negative integer, got {per_reference!r}")
    if not 0.0 <= mix_probability <= 1.0:
        raise UsageError(f"mix_probability must lie in [0, 1], got {mix_probability}")
    return _generate(
        references, seed, int(per_reference), levels, names, include_pristine, mix_probability,
        always,
    )


def _generate(
    references, seed, per_reference, levels, names, include_pristine, mix_probability, always
):
    # A generator behind a plain function, so bad arguments raise at the call, not on first next().
    for ref_id, reference in references:
        key = _stable_key(ref_id)
        if include_pristine:
            yield SyntheticSample(reference, ref_id, "pristine", 0, 1.0, ())
        picker = np.random.default_rng([seed, key, 0])
        others = [name for name in names if name not in always] or names
        order: list[str] = []
        while len(order) < per_reference:
            order.extend(others[i] for i in picker.permutation(len(others)))
        for pick, name in enumerate(always + order[:per_reference]):
            extras: list[tuple[str, int]] = []
            if picker.random() < mix_probability and len(names) > 1:
                others = [other for other in names if other != name]
                count = min(len(others), int(picker.integers(1, 3)))
                for i in picker.choice(len(others), size=count, replace=False):
                    extras.append((others[i], int(picker.integers(1, 4))))
            for level in levels:
                components = [(name, level), *extras]
                rng = np.random.default_rng([seed, key, 1, pick])
                image = apply_components(reference, components, rng)
                value = psnr(image, reference)
                label = quality_label(effective_level(components), strength_from_psnr(value))
                yield SyntheticSample(
                    image,
                    ref_id,
                    "+".join(component for component, _ in components),
                    level,
                    label,
                    tuple(components),
                    value,
                )


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(text: str) -> str:
    return _UNSAFE_CHARS.sub("_", text).strip("._") or "ref"


def _unique_name(ref_id: str, taken: Iterable[str]) -> str:
    """A file-system-safe name for ``ref_id`` that no other reference uses ("a b" vs "a_b")."""
    taken_lower = {name.lower() for name in taken}
    base = _safe_name(ref_id)
    name, suffix = base, 1
    while name.lower() in taken_lower:
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def _write_samples(
    root: Path,
    references: Sequence[tuple[str, np.ndarray]],
    folders: dict[str, str],
    seed: int,
    suffix: str,
    save_params: dict[str, object],
    generate_kwargs: dict[str, object],
) -> list[tuple[str, str, str]]:
    """Generate and save the samples of some references; their ``labels.csv`` rows, in order."""
    rows = []
    counters: dict[str, int] = {}
    for sample in generate_samples(references, seed, **generate_kwargs):
        ref_name = folders[sample.ref_id]
        index = counters.get(sample.ref_id, 0)
        counters[sample.ref_id] = index + 1
        relative = (
            f"images/{ref_name}/"
            f"{ref_name}_{index:04d}_{_safe_name(sample.distortion)}_{sample.level}{suffix}"
        )
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.image).save(target, **save_params)
        components = ";".join(f"{name}:{level}" for name, level in sample.components)
        rows.append((relative, f"{sample.label:.6f}", sample.ref_id, components))
    return rows


def read_distortions(label_file: str | os.PathLike) -> dict[str, tuple[tuple[str, int], ...]]:
    """The ``distortions`` column of a generated ``labels.csv``: path -> ``((name, level), ...)``
    (empty for the pristine images). Empty when the file has no such column (older sets)."""
    out: dict[str, tuple[tuple[str, int], ...]] = {}
    with open(label_file, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            text = row.get("distortions")
            if text is None:
                return {}
            parts = [part.rsplit(":", 1) for part in text.split(";") if part]
            out[row["path"]] = tuple((name, int(level)) for name, level in parts)
    return out


def _write_samples_star(args: tuple) -> list[tuple[str, str, str]]:
    return _write_samples(*args)


def write_dataset(
    out_dir: str | os.PathLike,
    references: Sequence[tuple[str, np.ndarray]],
    seed: int,
    *,
    image_format: str = "png",
    overwrite: bool = False,
    manifest_extra: dict[str, object] | None = None,
    workers: int = 1,
    **generate_kwargs: object,
) -> Path:
    """Generate samples (see :func:`generate_samples`) and write them as a ``csv`` dataset.

    Layout::

        out_dir/labels.csv            path,mos,ref,distortions  (path relative to out_dir,
                                      "/"-separated; distortions "name:level;..." or empty)
        out_dir/synthetic.json        how it was generated, for reproducing it
        out_dir/images/<ref>/<ref>_<nnnn>_<distortion>_<level>.png

    ``mos`` is :func:`quality_label` (0..1, higher is better) and ``ref`` the reference id, which
    the trainer splits by. ``image_format`` is ``"png"`` (lossless; the default, so storage adds
    no distortion of its own) or ``"jpeg"`` (quality 95). ``manifest_extra`` adds keys to
    ``synthetic.json``. ``workers > 1`` generates the references in that many processes; the
    files and rows are the same as with one, since every sample is seeded by its reference.
    Returns the path of ``labels.csv``. Raises UsageError if ``out_dir`` already holds a dataset
    and ``overwrite`` is False, and OutputError when writing fails.
    """
    fmt = image_format.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise UsageError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be a positive integer, got {workers!r}")
    suffix, save_params = (
        (".png", {"format": "PNG", "compress_level": 3})
        if fmt == "png"
        else (".jpg", {"format": "JPEG", "quality": 95})
    )
    root = Path(out_dir)
    labels_path = root / "labels.csv"
    if labels_path.exists() and not overwrite:
        raise UsageError(f"{labels_path} already exists; pass overwrite=True to replace it")
    generate_samples(references, seed, **generate_kwargs)  # validates the arguments first
    folders: dict[str, str] = {}  # ref_id -> its folder name, unique even on case-blind disks
    for ref_id, _ in references:
        folders[ref_id] = _unique_name(ref_id, folders.values())
    try:
        if workers == 1 or len(references) < 2:
            rows = _write_samples(root, references, folders, seed, suffix, save_params, generate_kwargs)
        else:
            from concurrent.futures import ProcessPoolExecutor

            # Small chunks in reference order keep both processes busy to the end; map returns
            # them in order, so the rows are those of a single process.
            size = max(1, math.ceil(len(references) / (workers * 8)))
            chunks = [references[i : i + size] for i in range(0, len(references), size)]
            jobs = [(root, chunk, folders, seed, suffix, save_params, generate_kwargs) for chunk in chunks]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                rows = [row for part in pool.map(_write_samples_star, jobs) for row in part]
        manifest = {
            "generator": "loda_cli.synthetic",
            "seed": seed,
            "references": [ref_id for ref_id, _ in references],
            "options": {
                key: list(value) if isinstance(value, tuple) else value
                for key, value in generate_kwargs.items()
            },
            "distortions": {name: list(LEVEL_PARAMETERS[name]) for name in DISTORTIONS},
            "label": "1 - 0.6 * level / 5 - 0.4 * clip((45 - psnr) / 30, 0, 1)",
            "images": len(rows),
            **(manifest_extra or {}),
        }
        with replacing(root / "synthetic.json", "w", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest, indent=2, default=str) + "\n")
        with replacing(labels_path, "w", newline="", encoding="utf-8") as handle:  # last: the set is whole
            writer = csv.writer(handle)
            writer.writerow(["path", "mos", "ref", "distortions"])
            writer.writerows(rows)
    except OSError as exc:
        raise OutputError(f"could not write the synthetic dataset to {root}: {exc}") from exc
    return labels_path


# ---------------------------------------------------------------------------------------------
# The ``synthetic`` dataset of ``loda train`` / ``loda benchmark``
# ---------------------------------------------------------------------------------------------

#: Where a reference folder's generated set is cached, inside that folder (hidden, like the
#: ``.loda-prepared-384`` resize cache).
GENERATED_DIR = ".loda-synthetic"
#: Bumped whenever a change here changes the generated images or labels, so caches regenerate.
GENERATOR_VERSION = 3
#: How the set of the built-in references is generated (an empty reference folder): each
#: reference gets 4 distortion types at all 5 levels, a quarter of them mixed with one or two
#: more. Many references with a few types each teach more than a few references with all types.
#: JPEG, Gaussian blur and white noise go to every reference besides 2 picks from the other
#: types: with 4 random picks, a reference's batch group rarely held the commonest faults of
#: photos side by side, and the model never learnt to see JPEG; trained on just those three,
#: it learns all three (and generalises to JPEG 2000, downscaling, other blurs) within 20k crops.
BUILTIN_GENERATION: dict[str, object] = {
    "per_reference": 2,
    "always_types": ["jpeg", "gaussian_blur", "white_noise"],
    "mix_probability": 0.25,
}


def _fingerprint(files: Sequence[Path], root: Path) -> list[list[object]]:
    return [
        [path.relative_to(root).as_posix(), path.stat().st_size, path.stat().st_mtime_ns]
        for path in files
    ]


def _generated_set(root: Path, seed: int) -> tuple[list[Path], dict[str, object], Path]:
    """The reference files of ``root``, what the generated set must have been made from, and
    where its ``labels.csv`` goes."""
    if not root.is_dir():
        raise DatasetError(f"synthetic dataset folder not found: {root}")
    files = reference_files(root)
    source = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sources": _fingerprint(files, root) if files else "built-in",
        "options": {} if files else BUILTIN_GENERATION,
    }
    return files, source, root / GENERATED_DIR / "labels.csv"


def _is_current(labels_path: Path, source: dict[str, object]) -> bool:
    manifest_path = labels_path.parent / "synthetic.json"
    if not (labels_path.is_file() and manifest_path.is_file()):
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("source") == source


def pending_generation(root: str | os.PathLike, seed: int = datasets.DEFAULT_SEED) -> str | None:
    """What reading the ``synthetic`` dataset at ``root`` is about to generate, in one line for
    the user, or None when the set is already there (or ``root`` is a ``labels.csv`` or a folder
    holding one). Generating the built-in set writes about 3.3 GB of PNGs and takes about 8
    minutes on a 2-core CPU, so a command that would do it says so first."""
    root = Path(root)
    if root.is_file() or (root / "labels.csv").is_file():
        return None
    files, source, labels_path = _generated_set(root, seed)
    if _is_current(labels_path, source):
        return None
    what = (f"{len(files)} reference photos (every distortion type at 5 levels: about "
            f"{len(files) * (len(DISTORTIONS) * 5 + 1):,} images)" if files else
            "the built-in references (about 3.3 GB of PNGs, about 8 minutes on a 2-core CPU)")
    return (f"generating the synthetic set once from {what} into {labels_path.parent}; later runs reuse it "
            f"while the references stay the same")


def ensure_generated(root: str | os.PathLike, seed: int = datasets.DEFAULT_SEED) -> Path:
    """The ``labels.csv`` of the synthetic set generated from the references in ``root``.

    ``root`` is a folder of pristine photos; an empty folder stands for the built-in references
    (:func:`default_references`, generated with :data:`BUILTIN_GENERATION`). The set (all types
    for a folder's photos, 5 levels, pristine included, references at a 384 short side; in
    parallel processes) is written once to ``root/.loda-synthetic`` and reused while the
    reference files (names, sizes, mtimes), the seed and :data:`GENERATOR_VERSION` are the same.
    """
    root = Path(root)
    files, source, labels_path = _generated_set(root, seed)
    if _is_current(labels_path, source):
        return labels_path
    out_dir = labels_path.parent
    short_side = datasets.SHORT_SIDE
    if files:
        references = load_reference_folder(root, short_side=short_side)
        options: dict[str, object] = {}
    else:
        references = default_references(short_side=short_side, seed=seed)
        options = dict(BUILTIN_GENERATION)
    logger.info("generating the synthetic set from %d references in %s", len(references), out_dir)
    return write_dataset(
        out_dir, references, seed, overwrite=True, manifest_extra={"source": source},
        workers=max(1, min(4, os.cpu_count() or 1)), **options,
    )


def synthetic_label_file(root: str | os.PathLike) -> Path:
    """The ``labels.csv`` a ``synthetic`` dataset path stands for: the file itself, the one in the
    folder, or the set :func:`ensure_generated` makes from the folder's reference photos."""
    root = Path(root)
    if root.is_file():
        return root
    if (root / "labels.csv").is_file():
        return root / "labels.csv"
    return ensure_generated(root)


def _read_synthetic(spec: datasets.DatasetSpec, root: Path) -> datasets.LabelSet:
    """Reader of the ``synthetic`` dataset.

    ``root`` may be a ``labels.csv`` (or a folder holding one) written by :func:`write_dataset`,
    or a folder of pristine reference photos (or an empty folder, for the built-in references),
    from which :func:`ensure_generated` makes the set.
    """
    label_file = synthetic_label_file(root)
    csv_spec = datasets.csv_spec(path_column="path", mos_column="mos", ref_column="ref")
    labels = datasets.read_labels(csv_spec, label_file)
    return dataclasses.replace(
        labels,
        dataset=spec.name,
        scale=(0.0, 1.0),
        lower_better=False,
        kind="synthetic",
    )


SYNTHETIC_SPEC = datasets.DatasetSpec(
    "synthetic",
    "Synthetic distortions (loda)",
    (0.0, 1.0),
    False,
    "synthetic",
    3,
    "bicubic",
    False,
    None,
    "",
    "labels.csv (path,mos,ref) written by loda_cli.synthetic.write_dataset, or pristine "
    "reference photos to generate it from (an empty folder: the built-in references)",
)
datasets.register_dataset(SYNTHETIC_SPEC, _read_synthetic)
