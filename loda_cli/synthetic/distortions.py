"""The 23 distortions of the synthetic set, 5 levels each, and their registry.

:data:`DISTORTIONS` maps a name to ``f(img, level, rng) -> img``: an ``HxWx3`` uint8 image in, the
same shape and dtype out, ``level`` in 1..5 of increasing strength, and every random choice drawn
from the given ``numpy.random.Generator`` (so a seed reproduces the output). The random fields are
drawn the same way at every level and only scaled by it, so with the same seed a higher level is
the same distortion, stronger. :data:`LEVEL_PARAMETERS` holds the strength table of each.

One family in one file, the way timm keeps a model family together: each distortion is a short
function registered with its strength table, and they change together when the contract does.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, features
from scipy import ndimage

from loda_cli.errors import UsageError
from loda_cli.synthetic.arrays import (
    LEVELS,
    blur,
    check_image,
    check_level,
    convolve,
    encode_decode,
    from_ycc,
    to_uint8,
    to_ycc,
)

logger = logging.getLogger(__name__)

DistortionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

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
            img = check_image(img)
            strength = table[check_level(level) - 1]
            if not isinstance(rng, np.random.Generator):
                raise UsageError("rng must be a numpy.random.Generator (np.random.default_rng)")
            out = core(img, strength, rng)
            if out.dtype != np.uint8:
                out = to_uint8(out)
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
    return blur(img.astype(np.float64), sigma)


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
    return convolve(img.astype(np.float64), _disc_kernel(radius))


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
    return convolve(img.astype(np.float64), _line_kernel(length, angle))


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
    ycc = to_ycc(img.astype(np.float64)) + sigma * field * np.array([0.35, 1.0, 1.0])
    return from_ycc(ycc)


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
    return encode_decode(img, "JPEG", quality=int(quality))


@_distortion("jpeg2000", (12, 24, 48, 96, 192))
def _jpeg2000(img, ratio, rng):
    """JPEG 2000 compression (Pillow/OpenJPEG, irreversible 9/7 wavelet); the strength is the
    compression ratio."""
    return encode_decode(
        img, "JPEG2000", quality_mode="rates", quality_layers=[float(ratio)], irreversible=True
    )


# --- colour ---


def _scale_chroma(img: np.ndarray, factor: float) -> np.ndarray:
    ycc = to_ycc(img.astype(np.float64))
    ycc[..., 1:] = 128.0 + (ycc[..., 1:] - 128.0) * factor
    return from_ycc(ycc)


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
    ycc = to_ycc(img.astype(np.float64))
    ycc[..., 1:] = blur(ycc[..., 1:], sigma)
    return from_ycc(ycc)


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
    return values + amount * (values - blur(values, 1.2))


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


def resolve_names(names: Iterable[str] | None) -> list[str]:
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
    (name,) = resolve_names([name])
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
    names = resolve_names(types)
    levels = [check_level(level) for level in levels]
    if n is None:
        n = int(rng.integers(1, min(3, len(names)) + 1))
    if not 1 <= n <= len(names):
        raise UsageError(f"n must be between 1 and {len(names)}, got {n}")
    picked = [names[i] for i in rng.choice(len(names), size=n, replace=False)]
    components = [(name, int(rng.choice(levels))) for name in picked]
    return apply_components(img, components, rng), components


def apply_components(
    img: np.ndarray, components: Sequence[tuple[str, int]], rng: np.random.Generator
) -> np.ndarray:
    out = img
    for name, level in components:
        out = DISTORTIONS[name](out, level, rng)
    return out
