"""Reference images for the synthetic set: procedural ones (:func:`dead_leaves`, :func:`texture`,
:func:`gradient`, :func:`make_reference`), the colour photos bundled inside scikit-image
(:func:`bundled_photos`), and a user's folder (:func:`load_reference_folder`)."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loda_cli.errors import DatasetError, UsageError
from loda_cli.synthetic.arrays import blur, from_ycc, to_uint8, to_ycc

logger = logging.getLogger(__name__)

REFERENCE_KINDS = ("dead_leaves", "texture", "gradient")


def _check_size(h: int, w: int) -> None:
    if int(h) < 1 or int(w) < 1:
        raise UsageError(f"image size must be positive, got {h}x{w}")


def dead_leaves(
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    r_min: float | None = None,
    r_max: float | None = None,
    exponent: float = 3.0,
    max_discs: int = 50_000,
) -> np.ndarray:
    """The dead-leaves model: occluding discs of random colour until the canvas is covered.

    Radii follow the scale-invariant power law ``p(r) ~ r ** -exponent`` on [r_min, r_max]
    (defaults: ``min(h, w) / 100`` but at least 1, and ``min(h, w) / 4``), which gives the 1/f
    spectrum and edge statistics of natural images. Discs are drawn front to back, each painting
    only the pixels still uncovered; each disc costs one slice of its bounding box, never a
    per-pixel loop. A light anti-aliasing blur finishes the image.
    """
    _check_size(h, w)
    short = min(h, w)
    r_min = max(1.0, short / 100) if r_min is None else float(r_min)
    r_max = max(r_min * 1.01, short / 4) if r_max is None else float(r_max)
    canvas = np.empty((h, w, 3), dtype=np.uint8)
    canvas[:] = rng.integers(0, 256, size=3, dtype=np.uint8)  # shows only if max_discs runs out
    free = np.ones((h, w), dtype=bool)
    remaining = h * w
    a, b = r_min ** (1 - exponent), r_max ** (1 - exponent)
    drawn, batch = 0, 1024
    while remaining and drawn < max_discs:
        # Inverse-CDF sampling of the truncated power law, in batches for speed.
        u = rng.random(batch)
        radii = (a - u * (a - b)) ** (1 / (1 - exponent))
        centres_y = rng.uniform(-0.5, h - 0.5, size=batch)
        centres_x = rng.uniform(-0.5, w - 0.5, size=batch)
        colours = rng.integers(0, 256, size=(batch, 3), dtype=np.uint8)
        for r, cy, cx, colour in zip(radii, centres_y, centres_x, colours):
            y0, y1 = max(0, math.ceil(cy - r)), min(h, math.floor(cy + r) + 1)
            x0, x1 = max(0, math.ceil(cx - r)), min(w, math.floor(cx + r) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            ys = np.arange(y0, y1)[:, None] - cy
            xs = np.arange(x0, x1)[None, :] - cx
            window = free[y0:y1, x0:x1]
            paint = (ys * ys + xs * xs <= r * r) & window
            count = int(paint.sum())
            if count:
                canvas[y0:y1, x0:x1][paint] = colour
                window[paint] = False
                remaining -= count
                if not remaining:
                    break
        drawn += batch
    return to_uint8(blur(canvas.astype(np.float64), 0.5))


def _frequency_radius(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fy * fy + fx * fx)


def texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A natural-looking random texture: Gaussian noise shaped to a ``1/f ** beta`` amplitude
    spectrum (beta random in 0.9..1.6), as a luma plane plus two weaker chroma planes, so the
    colours are correlated the way a photo's are."""
    _check_size(h, w)
    radius = _frequency_radius(h, w)
    radius[0, 0] = 1.0
    planes = []
    for _ in range(3):
        beta = rng.uniform(0.9, 1.6)
        spectrum = np.fft.rfft2(rng.standard_normal((h, w))) / radius**beta
        spectrum[0, 0] = 0.0
        plane = np.fft.irfft2(spectrum, s=(h, w))
        std = plane.std()
        planes.append(plane / std if std > 0 else plane)
    luma, chroma_b, chroma_r = planes
    ycc = np.stack(
        [
            rng.uniform(70, 180) + rng.uniform(30, 55) * luma,
            128 + rng.uniform(-30, 30) + rng.uniform(5, 22) * chroma_b,
            128 + rng.uniform(-30, 30) + rng.uniform(5, 22) * chroma_r,
        ],
        axis=-1,
    )
    return to_uint8(from_ycc(ycc))


def _linear_ramp(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A ramp from 0 to 1 across the image in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w]
    t = xs * math.cos(angle) + ys * math.sin(angle)
    span = np.ptp(t)
    return (t - t.min()) / span if span > 0 else np.zeros((h, w))


def _ramp_fill(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    ramp = _linear_ramp(h, w, rng)[..., None]
    start, end = rng.uniform(0, 255, size=(2, 3))
    return start + ramp * (end - start)


def gradient(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients with a few sharp-edged shapes on top.

    The background is a linear ramp between two random colours plus a soft radial glow; then 2-5
    ellipses, rectangles and half-planes, each filled with its own ramp, give hard edges. It is
    the easy case of a photo: smooth areas where banding and blockiness show, and clean edges
    where blur shows.
    """
    _check_size(h, w)
    image = _ramp_fill(h, w, rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    spread = rng.uniform(0.15, 0.5) * max(h, w)
    glow = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * spread**2))
    image += rng.uniform(-80, 80, size=3) * glow[..., None]
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.integers(3)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.08, 0.35, size=2) * np.array([h, w])
        if kind == 0:
            mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
        elif kind == 1:
            mask = (np.abs(ys - cy) <= ry) & (np.abs(xs - cx) <= rx)
        else:
            angle = rng.uniform(0, 2 * math.pi)
            mask = (ys - cy) * math.cos(angle) - (xs - cx) * math.sin(angle) > 0
        image = np.where(mask[..., None], _ramp_fill(h, w, rng), image)
    return to_uint8(blur(image, 0.5))


_REFERENCE_MAKERS = {"dead_leaves": dead_leaves, "texture": texture, "gradient": gradient}


def make_reference(h: int, w: int, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A procedural reference image of ``kind`` (one of :data:`REFERENCE_KINDS`), or of a kind
    drawn from ``rng`` when None."""
    if kind is None:
        kind = REFERENCE_KINDS[int(rng.integers(len(REFERENCE_KINDS)))]
    if kind not in _REFERENCE_MAKERS:
        close = difflib.get_close_matches(kind, REFERENCE_KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown reference kind {kind!r}{hint}")
    return _REFERENCE_MAKERS[kind](h, w, rng)


def procedural_references(
    count: int, h: int, w: int, seed: int, kind: str | None = None
) -> list[tuple[str, np.ndarray]]:
    """``count`` procedural references ``("procedural_000", image)``..., deterministic for seed.

    Each reference has its own generator, so the first k are the same whatever ``count`` is.
    """
    return [
        (f"procedural_{i:03d}", make_reference(h, w, np.random.default_rng([seed, i]), kind))
        for i in range(count)
    ]


# Colour photos that ship inside scikit-image's wheel (no download): file name -> reference id.
_BUNDLED_PHOTOS = {
    "astronaut.png": "skimage_astronaut",
    "chelsea.png": "skimage_chelsea",
    "coffee.png": "skimage_coffee",
    "rocket.jpg": "skimage_rocket",
    "motorcycle_left.png": "skimage_motorcycle",
}

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pnm"}


def _read_rgb(path: Path, short_side: int | None) -> np.ndarray:
    with Image.open(path) as opened:
        if short_side is not None:
            # JPEG draft decoding: no need to decode 24 MP to get 384 px.
            opened.draft("RGB", (short_side * 2, short_side * 2))
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if short_side is not None and min(image.size) > short_side:
        scale = short_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image)


def _skimage_data_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def bundled_references(short_side: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The natural colour photos bundled in scikit-image, as ``(ref_id, image)`` pairs.

    Read straight from the installed package's data folder with Pillow, so nothing is ever
    downloaded. Empty when scikit-image is not installed. ``short_side`` downsizes larger photos.
    """
    data_dir = _skimage_data_dir()
    if data_dir is None:
        return []
    pairs = []
    for filename, ref_id in _BUNDLED_PHOTOS.items():
        path = data_dir / filename
        if path.is_file():
            pairs.append((ref_id, _read_rgb(path, short_side)))
        else:
            logger.debug("scikit-image photo %s is not bundled in this version", filename)
    return pairs


def bundled_photos(short_side: int | None = None) -> list[np.ndarray]:
    """The images of :func:`bundled_references` (astronaut, chelsea, coffee, rocket, motorcycle
    where bundled); ``[]`` without scikit-image."""
    return [image for _, image in bundled_references(short_side)]


def reference_files(root: Path, recursive: bool = True) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(
        path
        for path in root.glob(pattern)
        if path.suffix.lower() in _IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    )


# More pictures inside scikit-image's wheel that the built-in model learns from (never used as
# test material): a second view of the motorcycle, a stained tissue section, and grey photos and
# textures (cameraman, brick, grass, gravel, coins), which photo_crops tints.
_TRAINING_EXTRA_PHOTOS = {
    "motorcycle_right.png": "skimage_motorcycle_right",
    "ihc.png": "skimage_ihc",
    "camera.png": "skimage_camera",
    "brick.png": "skimage_brick",
    "grass.png": "skimage_grass",
    "gravel.png": "skimage_gravel",
    "coins.png": "skimage_coins",
}


def training_photos() -> list[tuple[str, np.ndarray]]:
    """Every scikit-image picture :func:`photo_crops` cuts references from, at full size: the
    :func:`bundled_references` photos and the extra training pictures (grey ones as RGB)."""
    data_dir = _skimage_data_dir()
    if data_dir is None:
        return []
    pairs = []
    for filename, ref_id in {**_BUNDLED_PHOTOS, **_TRAINING_EXTRA_PHOTOS}.items():
        path = data_dir / filename
        if path.is_file():
            pairs.append((ref_id, _read_rgb(path, None)))
    return pairs


def _tint(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey picture given a faint random colour cast that varies with brightness, so grey
    material does not teach the model that colourless means pristine."""
    ycc = to_ycc(grey.astype(np.float64))
    luma = (ycc[..., :1] - 128.0) / 128.0
    offset, slope = rng.uniform(-14, 14, size=2), rng.uniform(-10, 10, size=2)
    ycc[..., 1:] = 128.0 + offset + slope * luma
    return to_uint8(from_ycc(ycc))


def photo_crops(
    count: int,
    short_side: int = 384,
    seed: int = 3407,
    photos: Sequence[tuple[str, np.ndarray]] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """``count`` references cut from photos (default: :func:`training_photos`), deterministic for
    ``seed``: ``("photo_000_<source>", image)``, ...

    Crop ``i`` takes photo ``i % len(photos)``, shrinks it by a random factor (never enlarges
    it, which would blur it) between full size and the size at which its short side is
    ``short_side``, cuts a random window with a ``short_side`` short side (or the photo's, when
    that is smaller) and a 4:3 long side where it fits, and flips or turns it at random. Grey
    photos get a faint random colour cast. Many crops of a few photos give the model far more
    views of natural content than the photos alone.
    """
    photos = training_photos() if photos is None else list(photos)
    out: list[tuple[str, np.ndarray]] = []
    if not photos:
        return out
    for i in range(max(0, int(count))):
        source, photo = photos[i % len(photos)]
        rng = np.random.default_rng([seed, 0x70686F74, i])
        h, w = photo.shape[:2]
        smallest = min(1.0, short_side / min(h, w))
        scale = rng.uniform(smallest, 1.0)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = Image.fromarray(photo)
        if size != (w, h):
            image = image.resize(size, Image.Resampling.LANCZOS)
        array = np.asarray(image)
        if rng.random() < 0.25:
            array = array.transpose(1, 0, 2)
        if rng.random() < 0.5:
            array = array[:, ::-1]
        rh, rw = array.shape[:2]
        short = min(short_side, rh, rw)
        long_side = round(short * 4 / 3)
        ch, cw = (short, min(long_side, rw)) if rh <= rw else (min(long_side, rh), short)
        top = int(rng.integers(0, rh - ch + 1))
        left = int(rng.integers(0, rw - cw + 1))
        crop = np.ascontiguousarray(array[top : top + ch, left : left + cw])
        if np.array_equal(crop[..., 0], crop[..., 1]) and np.array_equal(crop[..., 1], crop[..., 2]):
            crop = _tint(crop, rng)
        out.append((f"photo_{i:03d}_{source.removeprefix('skimage_')}", crop))
    return out


def default_references(
    short_side: int = 384, procedural: int = 240, seed: int = 3407, photos: int = 240
) -> list[tuple[str, np.ndarray]]:
    """The built-in reference set, the one the built-in model is trained from.

    scikit-image's bundled photos, then ``photos`` :func:`photo_crops` of them and of the extra
    training pictures, then ``procedural`` references of ``short_side`` x 4/3 (dead leaves,
    textures, gradients), all deterministic for ``seed``. The procedural images keep the set
    usable without scikit-image and add content photos lack.
    """
    height, width = short_side, round(short_side * 4 / 3)
    return (
        bundled_references(short_side)
        + photo_crops(photos, short_side, seed)
        + procedural_references(procedural, height, width, seed)
    )


def load_reference_folder(
    directory: str | os.PathLike, *, short_side: int | None = None, recursive: bool = True
) -> list[tuple[str, np.ndarray]]:
    """Read a folder of pristine photos as ``(ref_id, RGB uint8 image)`` pairs, sorted by path.

    ``ref_id`` is the path relative to ``directory`` without its suffix, with ``/`` separators.
    EXIF orientation is applied and every mode becomes RGB; ``short_side`` downsizes photos
    whose shorter side is larger. Files that fail to decode are skipped with a logged warning,
    and hidden files and folders (a generated set in ``.loda-synthetic``, the prepared cache)
    are never read. Raises DatasetError when the folder is missing or holds no readable image.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"reference folder not found: {root}")
    references = []
    for path in reference_files(root, recursive):
        try:
            image = _read_rgb(path, short_side)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            logger.warning("skipping unreadable reference %s: %s", path, exc)
            continue
        references.append((path.relative_to(root).with_suffix("").as_posix(), image))
    if not references:
        raise DatasetError(f"no readable image in reference folder {root}")
    return references
