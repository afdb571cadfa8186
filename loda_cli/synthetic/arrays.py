"""Array helpers the distortions and the reference generators share: input checks, uint8
rounding, full-range YCbCr, and per-plane blur and convolution. Pure numpy and scipy."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage, signal

from loda_cli.errors import UsageError

LEVELS = (1, 2, 3, 4, 5)

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


def check_image(img: object) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise UsageError(f"expected a numpy image array, got {type(img).__name__}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise UsageError(
            f"expected an HxWx3 uint8 image, got shape {img.shape} and dtype {img.dtype}"
        )
    return img


def check_level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level not in LEVELS:
        raise UsageError(f"level must be an integer from 1 to 5, got {level!r}")
    return int(level)


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_ycc(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _RGB_TO_YCC.T + _YCC_OFFSET


def from_ycc(ycc: np.ndarray) -> np.ndarray:
    return (ycc - _YCC_OFFSET) @ _YCC_TO_RGB.T


def blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each plane of an HxWxC float array."""
    return ndimage.gaussian_filter(values, sigma=(sigma, sigma, 0), mode="reflect")


def convolve(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each plane with an odd-sized 2-D kernel, mirroring the borders.

    FFT-based, so a 17x17 lens kernel on a 512x384 image costs what a 3x3 one does.
    """
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(values, ((ph, ph), (pw, pw), (0, 0)), mode="symmetric")
    return signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))


def encode_decode(img: np.ndarray, fmt: str, **params: object) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format=fmt, **params)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        out = np.asarray(decoded.convert("RGB"))
    # JPEG 2000 may decode a code-stream a pixel short on tiny images; never change the shape.
    if out.shape != img.shape:
        out = np.asarray(Image.fromarray(out).resize((img.shape[1], img.shape[0])))
    return out
