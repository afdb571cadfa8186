"""From a decoded image to model input: resize, crop, normalise.

Scoring uses a fixed crop layout, so the same file always gets the same score. Training and the
paper's test protocol use random crops from a seeded generator. Crops travel between processes as
uint8 (a quarter of the bytes of float32) and are normalised on the device.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Sequence

import numpy as np

from loda_cli.config import Preprocess
from loda_cli.errors import ImageError
from loda_cli.images import resize_short_side, short_side_size

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

# Past this ratio of long to short side, a 384-pixel short side would make a giant strip and the
# crops would see a sliver of the picture; such files get an error row instead.
MAX_ASPECT_RATIO = 20.0


def grid_positions(height: int, width: int, crop: int, n: int) -> list[tuple[int, int]]:
    """``n`` crop corners (top, left) on a grid that spans the whole image.

    The grid has about as many rows per column as the image's aspect ratio asks for; when
    ``rows * cols > n`` an evenly spaced subset of the grid (in row-major order) is kept.
    ``n == 1`` gives the centre crop.
    """
    if n < 1:
        raise ValueError("need at least one crop")
    if height < crop or width < crop:
        raise ValueError(f"image {width}x{height} is smaller than the {crop}px crop")
    if n == 1:
        return [((height - crop) // 2, (width - crop) // 2)]
    rows = max(1, min(n, round(math.sqrt(n * height / width))))
    cols = math.ceil(n / rows)
    tops = np.linspace(0, height - crop, rows).round().astype(int).tolist() if rows > 1 else [(height - crop) // 2]
    lefts = np.linspace(0, width - crop, cols).round().astype(int).tolist() if cols > 1 else [(width - crop) // 2]
    grid = [(t, left) for t in tops for left in lefts]
    if len(grid) > n:
        keep = np.linspace(0, len(grid) - 1, n).round().astype(int)
        grid = [grid[i] for i in keep]
    return grid


def detail_positions(height: int, width: int, preprocess: Preprocess) -> list[tuple[int, int]]:
    """The detail crops' corners (top, left) in a ``height`` x ``width`` detail view.

    "grid" spans the view as the 384 view's crops do. "centre" puts the first crop at the centre,
    where a photo's subject, and so its focus, most often is, and any others at the centres of
    the cells of a grid of ``detail_crops - 1`` cells, kept inside the view. Measured on two
    held-out folds of LIVE Challenge photos with the built-in model, 4 corner crops rank photos
    worst of the layouts tried (README, "Two views").
    """
    crop, n = preprocess.crop_size, preprocess.detail_crops
    if preprocess.detail_layout == "grid":
        return grid_positions(height, width, crop, n)
    if height < crop or width < crop:
        raise ValueError(f"image {width}x{height} is smaller than the {crop}px crop")
    positions = [((height - crop) // 2, (width - crop) // 2)]
    if n > 1:
        cells = n - 1
        rows = max(1, min(cells, round(math.sqrt(cells * height / width))))
        cols = math.ceil(cells / rows)
        for r in range(rows):
            for c in range(cols):
                if len(positions) == n:
                    break
                top = round((r + 0.5) * height / rows - crop / 2)
                left = round((c + 0.5) * width / cols - crop / 2)
                positions.append((min(max(0, top), height - crop), min(max(0, left), width - crop)))
    return positions


def random_positions(
    height: int, width: int, crop: int, n: int, rng: random.Random
) -> list[tuple[int, int]]:
    """``n`` uniformly random crop corners (the paper's train and test protocol)."""
    return [(rng.randint(0, height - crop), rng.randint(0, width - crop)) for _ in range(n)]


def prepare_image(image: Image, preprocess: Preprocess) -> np.ndarray:
    """Resize an RGB image so its short side is ``preprocess.short_side``: an HxWx3 uint8 array."""
    _check_aspect(image)
    resized = resize_short_side(image, preprocess.short_side, preprocess.interpolation)
    return np.asarray(resized.convert("RGB"), dtype=np.uint8)


def _check_aspect(image: Image) -> None:
    w, h = image.size
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio too extreme to score ({w}x{h})")


def cut_crops(array: np.ndarray, positions: Sequence[tuple[int, int]], crop: int, flips=None) -> np.ndarray:
    """Stack crops of an HxWx3 array into an Nx3xCxC uint8 array (channels first).

    ``flips`` optionally gives (horizontal, vertical) booleans per crop (training augmentation).
    """
    out = np.empty((len(positions), 3, crop, crop), dtype=np.uint8)
    for i, (top, left) in enumerate(positions):
        patch = array[top : top + crop, left : left + crop]
        if flips is not None:
            horizontal, vertical = flips[i]
            if horizontal:
                patch = patch[:, ::-1]
            if vertical:
                patch = patch[::-1]
        out[i] = patch.transpose(2, 0, 1)
    return out


def detail_view(image: Image, preprocess: Preprocess) -> np.ndarray:
    """The detail view: the image at a short side of ``detail_short_side``, never enlarged (a
    smaller photo is used as it is). An HxWx3 uint8 array at least one crop in size."""
    resized = resize_short_side(image, detail_target(min(image.size), preprocess), preprocess.interpolation)
    return np.asarray(resized.convert("RGB"), dtype=np.uint8)


def detail_target(short: int, preprocess: Preprocess) -> int:
    """The detail view's short side for a picture whose short side is ``short``: never enlarged,
    but at least one crop."""
    return max(preprocess.crop_size, min(short, preprocess.detail_short_side))


# Scoring resizes with torch's antialiased uint8 resampling, which is Pillow's (the same kernels,
# supports and fixed-point arithmetic) vectorised, from one copy of the picture for both views.
# On a 2-core AVX2 CPU a 24 MP photo's 3000x2000 draft becomes the detail view (2250x1500) in
# 30-60 ms and the 384 view in 9-15 ms, against Pillow's 110 and 55; every value equal to
# Pillow's or one apart (0.2-0.8% of them; two apart at most). Training keeps Pillow's own.
_TORCH_RESAMPLING = ("bicubic", "bilinear")


def _picture(image: Image, interpolation: str):
    """The RGB picture as a 1x3xHxW uint8 tensor (channels last, torch's vectorised layout), or
    None where scoring resizes with Pillow (another mode or interpolation)."""
    if image.mode != "RGB" or interpolation not in _TORCH_RESAMPLING:
        return None
    import warnings

    import torch

    array = np.asarray(image, dtype=np.uint8)  # one copy, read-only: the tensor is only read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": nothing writes to it
        return torch.from_numpy(array).permute(2, 0, 1)[None]


def _resized(picture, image: Image, short_side: int, interpolation: str) -> np.ndarray:
    """``image`` (``picture``: its tensor, or None) at a short side of ``short_side``, the long
    side truncated as :func:`loda_cli.images.resize_short_side` does: an HxWx3 uint8 array."""
    if picture is None:
        return np.asarray(resize_short_side(image, short_side, interpolation).convert("RGB"), dtype=np.uint8)
    import torch.nn.functional as F

    height, width = picture.shape[-2:]
    size = short_side_size(width, height, short_side)[::-1]
    if size != (height, width):
        picture = F.interpolate(picture, size=size, mode=interpolation, antialias=True, align_corners=False)
    return picture[0].permute(1, 2, 0).numpy()


def scoring_crops(image: Image, preprocess: Preprocess) -> np.ndarray:
    """The deterministic crops the scorer feeds the model for one image: ``num_crops`` of the
    short-side view, then (for a checkpoint with a detail view) ``detail_crops`` of that view."""
    return scoring_views(image, preprocess)[0]


def scoring_views(image: Image, preprocess: Preprocess) -> tuple[np.ndarray, list[tuple[float, ...]], np.ndarray]:
    """The crops of :func:`scoring_crops`, where each lies as a fraction of the picture
    ``(x, y, w, h)`` (the same in every view, so in displayed pixels too once multiplied by the
    displayed size), and the short-side view they were cut from (an HxWx3 uint8 array)."""
    _check_aspect(image)
    picture = _picture(image, preprocess.interpolation)
    array = _resized(picture, image, preprocess.short_side, preprocess.interpolation)
    h, w = array.shape[:2]
    crop = preprocess.crop_size
    positions = grid_positions(h, w, crop, preprocess.num_crops)
    crops = cut_crops(array, positions, crop)
    boxes = [(left / w, top / h, crop / w, crop / h) for top, left in positions]
    if not preprocess.has_detail_view:
        return crops, boxes, array
    detail = _resized(picture, image, detail_target(min(image.size), preprocess), preprocess.interpolation)
    dh, dw = detail.shape[:2]
    places = detail_positions(dh, dw, preprocess)
    detail_crops = cut_crops(detail, places, crop)
    boxes += [(left / dw, top / dh, crop / dw, crop / dh) for top, left in places]
    return np.concatenate([crops, detail_crops]), boxes, array


def crop_weights(preprocess: Preprocess, n_crops: int) -> np.ndarray:
    """Each crop's weight in the image's raw score (they sum to 1): the plain mean, or for a
    detail view (1 - w) shared by the view's crops and w by the detail crops."""
    if not preprocess.has_detail_view:
        return np.full(n_crops, 1.0 / n_crops)
    n_detail = preprocess.detail_crops
    n_view = n_crops - n_detail
    if n_view < 1:
        raise ValueError("a detail view needs at least one crop of the short-side view")
    w = preprocess.detail_weight
    return np.concatenate([np.full(n_view, (1.0 - w) / n_view), np.full(n_detail, w / n_detail)])


def normalize(crops: torch.Tensor, preprocess: Preprocess, dtype=None) -> torch.Tensor:
    """uint8 Nx3xHxW -> float, scaled to [0, 1] and standardised with the preprocessing's stats."""
    import torch

    dtype = dtype or torch.float32
    mean = torch.tensor(preprocess.mean, device=crops.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std, device=crops.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((crops.float() - mean) / std).to(dtype)
