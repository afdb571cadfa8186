"""A KADID-style synthetic distortion set: procedural references, 23 distortions, 5 levels each.

It serves the tests, the ``synthetic`` training dataset and the built-in model that the project
trains itself. Pure numpy, scipy.ndimage/signal and Pillow; no torch.

Four layers, each usable alone (each module imports only those above it):

- ``arrays``: the input checks and array helpers the next two share.
- ``distortions``: :data:`DISTORTIONS` maps a name to ``f(img, level, rng) -> img``;
  :data:`LEVEL_PARAMETERS` holds the strength table of each.
- ``references``: procedural images (:func:`dead_leaves`, :func:`texture`, :func:`gradient`,
  :func:`make_reference`), the colour photos bundled inside scikit-image
  (:func:`bundled_photos`), and a user's folder (:func:`load_reference_folder`).
- ``dataset``: :func:`quality_label` (a level and a PSNR-derived strength to a quality in
  [0, 1]), :func:`generate_samples`, :func:`write_dataset` (images plus a ``labels.csv``,
  ``path,mos,ref``, that the generic ``csv`` dataset reads), and the ``synthetic`` dataset of
  ``loda train`` / ``loda benchmark``, registered when this package is imported.

The names below are this package's API; they are defined in the modules above.
"""

from __future__ import annotations

from loda_cli.synthetic.arrays import LEVELS
from loda_cli.synthetic.dataset import (
    BUILTIN_GENERATION,
    GENERATED_DIR,
    GENERATOR_VERSION,
    SyntheticSample,
    effective_level,
    ensure_generated,
    generate_samples,
    pending_generation,
    psnr,
    quality_label,
    read_distortions,
    strength_from_psnr,
    synthetic_label_file,
    write_dataset,
)
from loda_cli.synthetic.distortions import (
    DISTORTIONS,
    LEVEL_PARAMETERS,
    UNAVAILABLE,
    apply_distortion,
    apply_random_mix,
)
from loda_cli.synthetic.references import (
    REFERENCE_KINDS,
    bundled_photos,
    bundled_references,
    dead_leaves,
    default_references,
    gradient,
    load_reference_folder,
    make_reference,
    photo_crops,
    procedural_references,
    texture,
    training_photos,
)

__all__ = [
    "BUILTIN_GENERATION",
    "DISTORTIONS",
    "GENERATED_DIR",
    "GENERATOR_VERSION",
    "LEVELS",
    "LEVEL_PARAMETERS",
    "REFERENCE_KINDS",
    "UNAVAILABLE",
    "SyntheticSample",
    "apply_distortion",
    "apply_random_mix",
    "bundled_photos",
    "bundled_references",
    "dead_leaves",
    "default_references",
    "effective_level",
    "ensure_generated",
    "generate_samples",
    "gradient",
    "load_reference_folder",
    "make_reference",
    "pending_generation",
    "photo_crops",
    "procedural_references",
    "psnr",
    "quality_label",
    "read_distortions",
    "strength_from_psnr",
    "synthetic_label_file",
    "texture",
    "training_photos",
    "write_dataset",
]
