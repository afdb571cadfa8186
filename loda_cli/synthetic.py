"""A KADID-style synthetic distortion set: procedural references, 23 distortions, 5 levels each.

It serves the tests, the ``synthetic`` training dataset and the built-in model that the project
trains itself. Pure numpy, scipy.ndimage/signal and Pillow; no torch.

Four layers, each usable alone:

- **Distortions.** :data:`DISTORTIONS` maps a name to ``f(img, level, rng) -> img``: an ``HxWx3``
  uint8 image in, the same shape and dtype out, ``level`` in 1..5 of increasing strength, and
  every random choice drawn from the given ``numpy.random.Generator`` (so a seed reproduces the
  output). The random fields are drawn the same way at every level and only scaled by it, so with
  the same seed a higher level is the same distortion, stronger. :data:`LEVEL_PARAMETERS` holds
  the strength table of each.
- **References.** Procedural images (:func:`dead_leaves`, :func:`texture`, :func:`gradient`,
  :func:`make_reference`), the colour photos bundled inside scikit-image (:func:`bundled_photos`),
  and a user's folder (:func:`load_reference_folder`).
- **Labels.** :func:`quality_label` turns a level and a PSNR-derived strength into a quality in
  [0, 1]; see its docstring for the formula.
- **Datasets.** :func:`generate_samples` yields :class:`SyntheticSample` deterministically for a
  seed; :func:`write_dataset` writes them as images plus a ``labels.csv`` (``path,mos,ref``) that
  the generic ``csv`` dataset reads. Splits are by reference, made by the trainer.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.util
import io
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features
from scipy import ndimage, signal

from loda_cli import datasets
from loda_cli.errors import DatasetError, OutputError, UsageError

__all__ = [
    "BUILTIN_GENERATION",
    "DISTORTIONS",
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
    "photo_crops",
    "procedural_references",
    "psnr",
    "quality_label",
    "strength_from_psnr",
    "texture",
    "training_photos",
    "write_dataset",
]

logger = logging.getLogger(__name__)

LEVELS = (1, 2, 3, 4, 5)

DistortionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# ---------------------------------------------------------------------------------------------
# Helpers shared by the distortions
# ---------------------------------------------------------------------------------------------

# Full-range BT.601 (the JPEG colour transform): a luma plus two chroma planes centred on 128.
_RGB_TO_YCC = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ]
)
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)
_YCC_OFFSET = np.array([0.0, 128.0, 128.0])


def _check_image(img: object) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise UsageError(f"expected a numpy image array, got {type(img).__name__}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise UsageError(
            f"expected an HxWx3 uint8 image, got shape {img.shape} and dtype {img.dtype}"
        )
    return img


def _check_level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level not in LEVELS:
        raise UsageError(f"level must be an integer from 1 to 5, got {level!r}")
    return int(level)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _to_ycc(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _RGB_TO_YCC.T + _YCC_OFFSET


def _from_ycc(ycc: np.ndarray) -> np.ndarray:
    return (ycc - _YCC_OFFSET) @ _YCC_TO_RGB.T


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each plane of an HxWxC float array."""
    return ndimage.gaussian_filter(values, sigma=(sigma, sigma, 0), mode="reflect")


def _convolve(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each plane with an odd-sized 2-D kernel, mirroring the borders.

    FFT-based, so a 17x17 lens kernel on a 512x384 image costs what a 3x3 one does.
    """
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(values, ((ph, ph), (pw, pw), (0, 0)), mode="symmetric")
    return signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))


def _encode_decode(img: np.ndarray, fmt: str, **params: object) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format=fmt, **params)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        out = np.asarray(decoded.convert("RGB"))
    # JPEG 2000 may decode a code-stream a pixel short on tiny images; never change the shape.
    if out.shape != img.shape:
        out = np.asarray(Image.fromarray(out).resize((img.shape[1], img.shape[0])))
    return out


# ---------------------------------------------------------------------------------------------
# The distortions. Each *_core takes a validated image, a level index 0..4 and a Generator.
# ---------------------------------------------------------------------------------------------

LEVEL_PARAMETERS: dict[str, tuple[float, ...]] = {}
_CANDIDATES: dict[str, DistortionFn] = {}


def _distortion(name: str, table: Sequence[float]) -> Callable:
    """Register ``core(img, strength, rng)`` under ``name`` with its per-level strength table.

    The registered callable validates its input, looks the level's strength up, and guarantees
    the output contract (same shape, uint8).
    """
    if len(table) != len(LEVELS):
        raise ValueError(f"{name}: need one strength per level")

    def register(core: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]):
        def distort(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
            img = _check_image(img)
            strength = table[_check_level(level) - 1]
            if not isinstance(rng, np.random.Generator):
                raise UsageError("rng must be a numpy.random.Generator (np.random.default_rng)")
            out = core(img, strength, rng)
            if out.dtype != np.uint8:
                out = _to_uint8(out)
            return out

        distort.__name__ = name
        distort.__qualname__ = name
        distort.__doc__ = f"{core.__doc__}\n\nStrength per level 1..5: {tuple(table)}."
        LEVEL_PARAMETERS[name] = tuple(table)
        _CANDIDATES[name] = distort
        return core

    return register


# --- blurs ---


@_distortion("gaussian_blur", (0.6, 1.2, 2.0, 3.2, 5.0))
def _gaussian_blur(img, sigma, rng):
    """Gaussian blur; the strength is the standard deviation in pixels."""
    return _blur(img.astype(np.float64), sigma)


def _disc_kernel(radius: float) -> np.ndarray:
    # 4x4 supersampling per pixel gives small discs a fair area instead of a plus sign.
    half = math.ceil(radius)
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    coords = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2
    size = 2 * half + 1
    kernel = inside.reshape(size, 4, size, 4).mean(axis=(1, 3))
    return kernel / kernel.sum()


@_distortion("lens_blur", (1.0, 2.0, 3.5, 5.5, 8.0))
def _lens_blur(img, radius, rng):
    """Defocus blur: convolution with a uniform disc; the strength is its radius in pixels."""
    return _convolve(img.astype(np.float64), _disc_kernel(radius))


def _line_kernel(length: float, angle: float) -> np.ndarray:
    half = math.ceil((length - 1) / 2)
    size = 2 * half + 1
    t = np.linspace(-(length - 1) / 2, (length - 1) / 2, max(2, int(8 * length)))
    rows = np.rint(half - t * math.sin(angle)).astype(int)
    cols = np.rint(half + t * math.cos(angle)).astype(int)
    kernel = np.zeros((size, size))
    np.add.at(kernel, (rows, cols), 1.0)
    return kernel / kernel.sum()


@_distortion("motion_blur", (3.0, 6.0, 10.0, 15.0, 22.0))
def _motion_blur(img, length, rng):
    """Linear camera-shake blur; the strength is the streak length in pixels, at a random angle."""
    angle = rng.uniform(0.0, math.pi)
    return _convolve(img.astype(np.float64), _line_kernel(length, angle))


# --- noise ---


@_distortion("white_noise", (5.0, 9.0, 14.0, 20.0, 28.0))
def _white_noise(img, sigma, rng):
    """Additive Gaussian noise, independent per pixel and channel; sigma on the 0-255 scale."""
    return img + sigma * rng.standard_normal(img.shape)


@_distortion("color_noise", (6.0, 10.0, 16.0, 24.0, 34.0))
def _color_noise(img, sigma, rng):
    """Blotchy chroma noise, as raised-ISO sensors make: slightly correlated Gaussian noise added
    mostly to the two chroma planes of YCbCr (the luma gets a third of it); sigma on 0-255."""
    field = ndimage.gaussian_filter(rng.standard_normal(img.shape), sigma=(0.8, 0.8, 0))
    std = field.std(axis=(0, 1))
    field /= np.where(std > 0, std, 1.0)
    ycc = _to_ycc(img.astype(np.float64)) + sigma * field * np.array([0.35, 1.0, 1.0])
    return _from_ycc(ycc)


@_distortion("impulse_noise", (0.01, 0.03, 0.06, 0.10, 0.16))
def _impulse_noise(img, fraction, rng):
    """Salt-and-pepper noise: this fraction of the samples (per channel) is set to 0 or 255."""
    hit = rng.random(img.shape) < fraction
    salt = rng.random(img.shape) < 0.5
    return np.where(hit, np.where(salt, 255, 0), img).astype(np.uint8)


@_distortion("multiplicative_noise", (0.05, 0.10, 0.16, 0.24, 0.34))
def _multiplicative_noise(img, sigma, rng):
    """Speckle: each sample is multiplied by (1 + n), n Gaussian with this standard deviation."""
    return img * (1.0 + sigma * rng.standard_normal(img.shape))


# --- compression ---


@_distortion("jpeg", (50, 30, 18, 10, 5))
def _jpeg(img, quality, rng):
    """JPEG compression (Pillow, 4:2:0 chroma subsampling); the strength is the quality."""
    return _encode_decode(img, "JPEG", quality=int(quality))


@_distortion("jpeg2000", (12, 24, 48, 96, 192))
def _jpeg2000(img, ratio, rng):
    """JPEG 2000 compression (Pillow/OpenJPEG, irreversible 9/7 wavelet); the strength is the
    compression ratio."""
    return _encode_decode(
        img, "JPEG2000", quality_mode="rates", quality_layers=[float(ratio)], irreversible=True
    )


# --- colour ---


def _scale_chroma(img: np.ndarray, factor: float) -> np.ndarray:
    ycc = _to_ycc(img.astype(np.float64))
    ycc[..., 1:] = 128.0 + (ycc[..., 1:] - 128.0) * factor
    return _from_ycc(ycc)


@_distortion("saturate", (1.4, 1.8, 2.3, 3.0, 4.0))
def _saturate(img, factor, rng):
    """Over-saturation: the chroma planes of YCbCr are scaled up by this factor."""
    return _scale_chroma(img, factor)


@_distortion("desaturate", (0.75, 0.55, 0.35, 0.18, 0.0))
def _desaturate(img, factor, rng):
    """Desaturation: the chroma planes of YCbCr are scaled by this factor (0 is grey)."""
    return _scale_chroma(img, factor)


@_distortion("color_shift", (1.0, 2.0, 3.5, 5.5, 8.0))
def _color_shift(img, distance, rng):
    """Channel misregistration: one random colour channel moves this many pixels in a random
    direction (bilinear, edges repeated)."""
    channel = int(rng.integers(3))
    angle = rng.uniform(0.0, 2 * math.pi)
    out = img.astype(np.float64)
    out[..., channel] = ndimage.shift(
        out[..., channel],
        (distance * math.sin(angle), distance * math.cos(angle)),
        order=1,
        mode="nearest",
    )
    return out


@_distortion("color_diffusion", (1.0, 2.0, 3.5, 5.5, 8.0))
def _color_diffusion(img, sigma, rng):
    """Colour bleeding: the chroma planes of YCbCr are blurred with this sigma; luma is kept."""
    ycc = _to_ycc(img.astype(np.float64))
    ycc[..., 1:] = _blur(ycc[..., 1:], sigma)
    return _from_ycc(ycc)


@_distortion("quantization", (48, 24, 12, 7, 4))
def _quantization(img, colors, rng):
    """Colour quantisation to a palette of this many colours (median cut, no dithering)."""
    palette = Image.fromarray(img).quantize(
        colors=int(colors), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    return np.asarray(palette.convert("RGB"))


@_distortion("color_block", (0.01, 0.025, 0.05, 0.09, 0.15))
def _color_block(img, fraction, rng):
    """Solid blocks of random colour (transmission dropouts) covering about this fraction of the
    image. The blocks of a lower level are a subset of those of a higher one."""
    h, w = img.shape[:2]
    size = max(2, round(min(h, w) / 14))
    bh, bw = min(size, h), min(size, w)
    count = math.ceil(fraction * h * w / (bh * bw))
    most = math.ceil(LEVEL_PARAMETERS["color_block"][-1] * h * w / (bh * bw))
    tops = rng.integers(0, h - bh + 1, size=most)
    lefts = rng.integers(0, w - bw + 1, size=most)
    colours = rng.integers(0, 256, size=(most, 3), dtype=np.uint8)
    out = img.copy()
    for top, left, colour in zip(tops[:count], lefts[:count], colours[:count]):
        out[top : top + bh, left : left + bw] = colour
    return out


# --- brightness and contrast ---


def _tone_curve(img: np.ndarray, gamma: float) -> np.ndarray:
    return 255.0 * (img / 255.0) ** gamma


@_distortion("brighten", (0.80, 0.65, 0.50, 0.38, 0.28))
def _brighten(img, gamma, rng):
    """Brightening tone curve ``255 * (x / 255) ** gamma`` with gamma < 1 (shadows lift most)."""
    return _tone_curve(img, gamma)


@_distortion("darken", (1.25, 1.55, 1.95, 2.50, 3.30))
def _darken(img, gamma, rng):
    """Darkening tone curve ``255 * (x / 255) ** gamma`` with gamma > 1 (shadows crush)."""
    return _tone_curve(img, gamma)


@_distortion("mean_shift", (12.0, 24.0, 38.0, 54.0, 72.0))
def _mean_shift(img, offset, rng):
    """A constant added to every sample, up or down at random (clipped): exposure offset."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return img + sign * offset


@_distortion("contrast_change", (0.25, 0.45, 0.60, 0.73, 0.84))
def _contrast_change(img, amount, rng):
    """Contrast scaled about the image mean, down by ``1 - amount`` or (at random) up by
    ``1 / (1 - amount)`` with clipping."""
    factor = (1.0 - amount) if rng.random() < 0.5 else 1.0 / (1.0 - amount)
    mean = img.mean()
    return mean + (img - mean) * factor


# --- spatial ---


@_distortion("pixelate", (2, 3, 4, 6, 9))
def _pixelate(img, factor, rng):
    """Block averaging at 1/factor resolution, shown back at full size with nearest neighbour."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize(
        (max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BOX
    )
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


@_distortion("jitter", (0.7, 1.2, 2.0, 3.0, 4.5))
def _jitter(img, distance, rng):
    """Every pixel is taken from a random neighbour up to this many pixels away per axis."""
    h, w = img.shape[:2]
    dy = np.rint((2 * rng.random((h, w)) - 1) * distance).astype(int)
    dx = np.rint((2 * rng.random((h, w)) - 1) * distance).astype(int)
    rows = np.clip(np.arange(h)[:, None] + dy, 0, h - 1)
    cols = np.clip(np.arange(w)[None, :] + dx, 0, w - 1)
    return img[rows, cols]


@_distortion("non_eccentricity", (0.02, 0.05, 0.10, 0.18, 0.30))
def _non_eccentricity(img, fraction, rng):
    """Random square patches replaced by content from a nearby displaced position, covering
    about this fraction of the image. Lower levels' patches are a subset of higher levels'."""
    h, w = img.shape[:2]
    size = max(2, round(min(h, w) / 12))
    ph, pw = min(size, h), min(size, w)
    count = math.ceil(fraction * h * w / (ph * pw))
    most = math.ceil(LEVEL_PARAMETERS["non_eccentricity"][-1] * h * w / (ph * pw))
    tops = rng.integers(0, h - ph + 1, size=most)
    lefts = rng.integers(0, w - pw + 1, size=most)
    reach = 2 * size
    src_tops = np.clip(tops + rng.integers(-reach, reach + 1, size=most), 0, h - ph)
    src_lefts = np.clip(lefts + rng.integers(-reach, reach + 1, size=most), 0, w - pw)
    out = img.copy()
    for top, left, st, sl in zip(tops[:count], lefts[:count], src_tops[:count], src_lefts[:count]):
        out[top : top + ph, left : left + pw] = img[st : st + ph, sl : sl + pw]
    return out


@_distortion("sharpen", (0.8, 1.6, 2.6, 4.0, 6.0))
def _sharpen(img, amount, rng):
    """Over-sharpening: unsharp mask ``x + amount * (x - blur(x, 1.2))``, halos and clipping."""
    values = img.astype(np.float64)
    return values + amount * (values - _blur(values, 1.2))


# --- camera pipeline ---


def _srgb_to_linear(values: np.ndarray) -> np.ndarray:
    v = values / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(values: np.ndarray) -> np.ndarray:
    v = np.clip(values, 0.0, 1.0)
    return 255.0 * np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)


@_distortion("camera_noise", (0.8, 1.6, 3.0, 5.5, 10.0))
def _camera_noise(img, gain, rng):
    """Sensor noise as a camera records it: Poisson-Gaussian noise in linear light (shot noise
    grows with the signal, read noise does not), spatially correlated per channel the way
    demosaicing spreads it, then the sRGB curve (which lifts it most in the shadows). The
    strength is the analogue gain (ISO / 100, roughly)."""
    field = rng.standard_normal(img.shape)
    # Red and blue are interpolated from a quarter of the photosites, green from half.
    field = ndimage.gaussian_filter(field, sigma=(0.7, 0.7, 0)) if min(img.shape[:2]) > 1 else field
    common = ndimage.gaussian_filter(rng.standard_normal(img.shape[:2]), 0.5)[..., None]
    field = 0.8 * field + 0.6 * common
    std = field.std(axis=(0, 1))
    field /= np.where(std > 0, std, 1.0)
    linear = _srgb_to_linear(img.astype(np.float64))
    sigma = np.sqrt(gain * 0.0012 * linear + (gain * 0.0015) ** 2)
    return _linear_to_srgb(linear + sigma * field)


_RESAMPLERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BOX,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
)


@_distortion("downscale", (1.5, 2.0, 3.0, 4.0, 6.0))
def _downscale(img, factor, rng):
    """Resizing artefacts: the image shrunk by this factor with a random filter (nearest aliases,
    the others blur) and enlarged back to its size with bilinear or bicubic interpolation, as a
    thumbnail blown up again looks."""
    h, w = img.shape[:2]
    down = _RESAMPLERS[int(rng.integers(len(_RESAMPLERS)))]
    up = _RESAMPLERS[2 + int(rng.integers(2))]
    small = Image.fromarray(img).resize(
        (max(1, round(w / factor)), max(1, round(h / factor))), down
    )
    return np.asarray(small.resize((w, h), up))


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def _jpeg2000_missing_reason() -> str | None:
    """Why this Pillow cannot write JPEG 2000, or None when it can."""
    if not features.check("jpg_2000"):
        return "this Pillow build has no JPEG 2000 (OpenJPEG) codec"
    return None


def _available(candidates: dict[str, DistortionFn]) -> tuple[dict, dict]:
    """Split the candidates into the usable ones and {name: reason} for the rest."""
    unavailable: dict[str, str] = {}
    reason = _jpeg2000_missing_reason()
    if reason is not None:
        unavailable["jpeg2000"] = reason
        logger.info("synthetic distortion 'jpeg2000' disabled: %s", reason)
    usable = {name: fn for name, fn in candidates.items() if name not in unavailable}
    return usable, unavailable


#: Every distortion usable in this environment, name -> ``f(img, level, rng) -> img``.
DISTORTIONS: dict[str, DistortionFn]
#: Distortions left out of :data:`DISTORTIONS` here, name -> reason.
UNAVAILABLE: dict[str, str]
DISTORTIONS, UNAVAILABLE = _available(_CANDIDATES)


def _resolve_names(names: Iterable[str] | None) -> list[str]:
    if names is None:
        return list(DISTORTIONS)
    if isinstance(names, str):
        names = [names]
    resolved = []
    for name in names:
        if name not in DISTORTIONS:
            if name in UNAVAILABLE:
                raise UsageError(f"distortion {name!r} is unavailable: {UNAVAILABLE[name]}")
            close = difflib.get_close_matches(name, list(DISTORTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"unknown distortion {name!r}{hint}")
        resolved.append(name)
    if not resolved:
        raise UsageError("no distortion types given")
    return resolved


def apply_distortion(
    img: np.ndarray, name: str, level: int, rng: np.random.Generator
) -> np.ndarray:
    """Apply the distortion ``name`` at ``level`` (1..5). Unknown names raise UsageError."""
    (name,) = _resolve_names([name])
    return DISTORTIONS[name](img, level, rng)


def apply_random_mix(
    img: np.ndarray,
    rng: np.random.Generator,
    n: int | None = None,
    *,
    types: Iterable[str] | None = None,
    levels: Sequence[int] = LEVELS,
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Apply ``n`` different distortions in sequence (``n`` random in 1..3 when None).

    Types and levels are drawn from ``rng``; returns the image and the ``(name, level)`` list in
    the order applied.
    """
    names = _resolve_names(types)
    levels = [_check_level(level) for level in levels]
    if n is None:
        n = int(rng.integers(1, min(3, len(names)) + 1))
    if not 1 <= n <= len(names):
        raise UsageError(f"n must be between 1 and {len(names)}, got {n}")
    picked = [names[i] for i in rng.choice(len(names), size=n, replace=False)]
    components = [(name, int(rng.choice(levels))) for name in picked]
    return _apply_components(img, components, rng), components


def _apply_components(
    img: np.ndarray, components: Sequence[tuple[str, int]], rng: np.random.Generator
) -> np.ndarray:
    out = img
    for name, level in components:
        out = DISTORTIONS[name](out, level, rng)
    return out


# ---------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------

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
    return _to_uint8(_blur(canvas.astype(np.float64), 0.5))


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
    return _to_uint8(_from_ycc(ycc))


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
    return _to_uint8(_blur(image, 0.5))


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


def _reference_files(root: Path, recursive: bool = True) -> list[Path]:
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
    ycc = _to_ycc(grey.astype(np.float64))
    luma = (ycc[..., :1] - 128.0) / 128.0
    offset, slope = rng.uniform(-14, 14, size=2), rng.uniform(-10, 10, size=2)
    ycc[..., 1:] = 128.0 + offset + slope * luma
    return _to_uint8(_from_ycc(ycc))


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
    for path in _reference_files(root, recursive):
        try:
            image = _read_rgb(path, short_side)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            logger.warning("skipping unreadable reference %s: %s", path, exc)
            continue
        references.append((path.relative_to(root).with_suffix("").as_posix(), image))
    if not references:
        raise DatasetError(f"no readable image in reference folder {root}")
    return references


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
        _check_image(image)


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
    names = _resolve_names(types)
    always = list(always_types)
    unknown = [name for name in always if name not in names]
    if unknown or len(set(always)) != len(always):
        raise UsageError(f"always_types must be distinct distortion types in use, got {always!r}")
    levels = tuple(_check_level(level) for level in levels)
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
                image = _apply_components(reference, components, rng)
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
        tmp = labels_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "mos", "ref", "distortions"])
            writer.writerows(rows)
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
        (root / "synthetic.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(tmp, labels_path)
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


def ensure_generated(root: str | os.PathLike, seed: int = datasets.DEFAULT_SEED) -> Path:
    """The ``labels.csv`` of the synthetic set generated from the references in ``root``.

    ``root`` is a folder of pristine photos; an empty folder stands for the built-in references
    (:func:`default_references`, generated with :data:`BUILTIN_GENERATION`). The set (all types
    for a folder's photos, 5 levels, pristine included, references at a 384 short side; in
    parallel processes) is written once to ``root/.loda-synthetic`` and reused while the
    reference files (names, sizes, mtimes), the seed and :data:`GENERATOR_VERSION` are the same.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"synthetic dataset folder not found: {root}")
    files = _reference_files(root)
    out_dir = root / GENERATED_DIR
    source = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sources": _fingerprint(files, root) if files else "built-in",
        "options": {} if files else BUILTIN_GENERATION,
    }
    labels_path = out_dir / "labels.csv"
    manifest_path = out_dir / "synthetic.json"
    if labels_path.is_file() and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("source") == source:
            return labels_path
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
