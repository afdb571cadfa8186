"""Mutation fuzzing of the decode path (issue 8, "Bad and hostile files").

Small valid JPEG, PNG, WebP, TIFF, GIF, BMP, HEIC and AVIF files are made here, then mutated: bit
flips, byte overwrites, truncations, insertions, deletions, copied spans, and header edits that
set the fields a decoder trusts (PNG IHDR, JPEG SOF, GIF screen and image descriptor, TIFF tags,
WebP VP8/VP8L/VP8X sizes, HEIF ``ispe`` and box sizes, BMP size and depth) to zero, one or huge
values. Every case must end as a ``DecodedImage`` or an ``ImageError``, and ``image_size`` must
return a size or raise ``ImageError``. Anything else is a failure: another exception, a
``MemoryError`` that escapes, a crash of the process, or a hang.

The cases run in a separate worker process under ``RLIMIT_AS`` (2 GiB), so a crash, a runaway
allocation or a hang cannot take pytest down; the parent reads one result line per case and
kills the worker when a case takes longer than ``CASE_TIMEOUT_S``, then resumes after that case.

Cases are reproducible: case ``i`` of seed ``S`` is built by ``random.Random(f"{S}:{i}")`` from
the seed files, which are deterministic for one Pillow / pillow-heif install. Knobs:

* ``LODA_FUZZ_SEED`` (default 8): the base seed;
* ``LODA_FUZZ_CASES``: overrides the number of decode cases of the test that runs;
* ``python tests/test_fuzz_decode.py case SEED I OUT_DIR`` writes case ``I`` to ``OUT_DIR`` and
  prints what was done to it, to replay a failure by hand.

The CI run takes a few hundred cases; ``pytest -m slow tests/test_fuzz_decode.py`` takes
thousands.
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_SEED = int(os.environ.get("LODA_FUZZ_SEED", "8"))
CI_DECODE_CASES = 400
SLOW_DECODE_CASES = 12_000
CI_SCORE_CASES = 48
SLOW_SCORE_CASES = 600
MEMORY_LIMIT = 2 << 30  # RLIMIT_AS of the worker process
CASE_TIMEOUT_S = 30.0  # a hang guard on a shared, loaded machine, not a speed requirement
STARTUP_TIMEOUT_S = 120.0

INTERESTING_16 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
INTERESTING_32 = INTERESTING_16 + (
    0x10000, 100_000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF,
)


# ---------------------------------------------------------------------------------------------
# Seed files: small, valid, one per format and storage variant


def _picture(seed: int, size: tuple[int, int] = (48, 32)):
    """Gradients, a few blocks and noise: enough structure that every encoder makes real tables."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    pixels = pixels + rng.normal(0, 12, pixels.shape)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        pixels[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"), "RGB")


def _encoded(image, pillow_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, pillow_format, **options)
    return buffer.getvalue()


def seed_files() -> dict[str, tuple[str, bytes]]:
    """{name: (suffix, bytes)} of valid files, a few KB each."""
    import numpy as np
    from PIL import Image

    picture = _picture(1)
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(picture.size))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter: the orientation path runs too
    gray16 = Image.fromarray(np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40)
    frames = [_picture(seed) for seed in (2, 3, 4)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)

    seeds = {
        "jpeg_baseline": (".jpg", _encoded(picture, "JPEG", quality=85)),
        "jpeg_progressive": (".jpg", _encoded(picture, "JPEG", quality=85, progressive=True)),
        "jpeg_exif_rotated": (".jpg", _encoded(picture, "JPEG", quality=85, exif=exif.tobytes())),
        "jpeg_gray_420": (".jpeg", _encoded(picture.convert("L"), "JPEG", quality=70)),
        "jpeg_cmyk": (".jpg", _encoded(picture.convert("CMYK"), "JPEG", quality=85)),
        "png_rgb": (".png", _encoded(picture, "PNG")),
        "png_rgba": (".png", _encoded(rgba, "PNG")),
        "png_palette_trns": (".png", _encoded(picture.quantize(16), "PNG", transparency=0)),
        "png_gray16": (".png", _encoded(gray16, "PNG")),
        "webp_lossy": (".webp", _encoded(picture, "WEBP", quality=80)),
        "webp_lossless": (".webp", _encoded(picture, "WEBP", lossless=True)),
        "webp_alpha": (".webp", _encoded(rgba, "WEBP", quality=80)),
        "tiff_raw": (".tif", _encoded(picture, "TIFF")),
        "tiff_lzw": (".tif", _encoded(picture, "TIFF", compression="tiff_lzw")),
        "tiff_deflate_rgba": (".tiff", _encoded(rgba, "TIFF", compression="tiff_deflate")),
        "tiff_jpeg": (".tif", _encoded(picture, "TIFF", compression="jpeg")),
        "tiff_gray16": (".tif", _encoded(gray16, "TIFF")),
        "gif_single": (".gif", _encoded(picture.quantize(64), "GIF")),
        "gif_animated": (".gif", animated.getvalue()),
        "bmp_rgb": (".bmp", _encoded(picture, "BMP")),
    }
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        seeds["heic"] = (".heic", _encoded(picture, "HEIF", quality=60))
        seeds["heic_alpha"] = (".heic", _encoded(rgba, "HEIF", quality=60))
    except ImportError:
        pass
    try:
        seeds["avif"] = (".avif", _encoded(picture, "AVIF", quality=60))
    except (KeyError, OSError):  # Pillow built without AVIF
        pass
    return seeds


# ---------------------------------------------------------------------------------------------
# Header edits: each finds one field a decoder trusts and sets it to an interesting value.
# An editor returns (new bytes, description), or None when the file has no such field.


def _pick16(rng: random.Random) -> int:
    return rng.choice(INTERESTING_16) if rng.random() < 0.8 else rng.randrange(0x10000)


def _pick32(rng: random.Random) -> int:
    return rng.choice(INTERESTING_32) if rng.random() < 0.8 else rng.randrange(1 << 32)


def _png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset of the length field, type) of each chunk, as far as the file parses."""
    chunks, at = [], 8
    while at + 8 <= len(data):
        length = struct.unpack(">I", data[at:at + 4])[0]
        chunks.append((at, data[at + 4:at + 8]))
        at += 12 + length
    return chunks


def edit_png(data: bytes, rng: random.Random):
    out = bytearray(data)
    if not data.startswith(b"\x89PNG") or len(data) < 33:
        return None
    what = rng.choice(("size", "size", "depth_type", "chunk_length"))
    if what == "size":
        field = rng.choice(("width", "height", "both"))
        width, height = struct.unpack(">II", out[16:24])
        if field in ("width", "both"):
            width = _pick32(rng)
        if field in ("height", "both"):
            height = _pick32(rng)
        out[16:24] = struct.pack(">II", width, height)
        note = f"png IHDR size {width}x{height}"
    elif what == "depth_type":
        # Bit depth, colour type, compression, filter, interlace.
        index = rng.choice((24, 25, 26, 27, 28))
        out[index] = rng.choice((0, 1, 2, 3, 4, 6, 8, 16, 255, rng.randrange(256)))
        note = f"png IHDR byte {index} = {out[index]}"
    else:
        at, kind = rng.choice(_png_chunks(data))
        out[at:at + 4] = struct.pack(">I", _pick32(rng))
        note = f"png {kind!r} length {struct.unpack('>I', out[at:at + 4])[0]}"
    if what != "chunk_length" and rng.random() < 0.85:  # a valid CRC gets past the checksum
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        note += " (crc fixed)"
    return bytes(out), note


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset of 0xFF, marker) of each segment before the first scan, as far as it parses."""
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        segments.append((at, marker))
        if marker == 0xDA:
            break
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return segments


def edit_jpeg(data: bytes, rng: random.Random):
    if not data.startswith(b"\xff\xd8"):
        return None
    out = bytearray(data)
    segments = _jpeg_segments(data)
    frames = [at for at, m in segments if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)]
    what = rng.choice(("size", "size", "components", "segment_length", "orientation"))
    if what == "orientation":
        at = data.find(b"\x12\x01\x03\x00")  # little-endian EXIF entry: tag 0x0112, type SHORT
        if at < 0:
            what = "size"
        else:
            value = _pick16(rng)
            out[at + 8:at + 10] = struct.pack("<H", value)
            return bytes(out), f"jpeg EXIF orientation {value}"
    if what in ("size", "components") and frames:
        at = rng.choice(frames)
        if what == "size":
            field = rng.choice(("height", "width", "both"))
            height, width = struct.unpack(">HH", out[at + 5:at + 9])
            if field in ("height", "both"):
                height = _pick16(rng)
            if field in ("width", "both"):
                width = _pick16(rng)
            out[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(out), f"jpeg SOF size {width}x{height}"
        index = rng.choice((at + 4, at + 9, at + 11, at + 12))  # precision, count, sampling, table
        out[index] = rng.choice((0, 1, 3, 4, 5, 12, 16, 0x11, 0x22, 0x44, 0xFF, rng.randrange(256)))
        return bytes(out), f"jpeg SOF byte +{index - at} = {out[index]}"
    if not segments:
        return None
    at, marker = rng.choice(segments)
    value = _pick16(rng)
    out[at + 2:at + 4] = struct.pack(">H", value)
    return bytes(out), f"jpeg segment 0x{marker:02X} length {value}"


def _gif_first_image(data: bytes) -> int | None:
    """Offset of the first image descriptor (0x2C), walking the blocks properly."""
    if len(data) < 13:
        return None
    packed = data[10]
    at = 13 + (3 * (2 << (packed & 7)) if packed & 0x80 else 0)
    while at < len(data):
        if data[at] == 0x2C:
            return at
        if data[at] != 0x21 or at + 2 >= len(data):
            return None
        at += 2
        while at < len(data) and data[at]:
            at += data[at] + 1
        at += 1
    return None


def edit_gif(data: bytes, rng: random.Random):
    if not data.startswith(b"GIF8"):
        return None
    out = bytearray(data)
    image = _gif_first_image(data)
    what = rng.choice(("screen", "image", "image", "code_size"))
    if what == "screen" or image is None:
        width, height = struct.unpack("<HH", out[6:10])
        if rng.random() < 0.7:
            width = _pick16(rng)
        if rng.random() < 0.7:
            height = _pick16(rng)
        out[6:10] = struct.pack("<HH", width, height)
        return bytes(out), f"gif screen {width}x{height}"
    if what == "image":
        index = rng.choice((1, 3, 5, 7))  # left, top, width, height
        value = _pick16(rng)
        out[image + index:image + index + 2] = struct.pack("<H", value)
        return bytes(out), f"gif image descriptor field +{index} = {value}"
    packed = out[image + 9]
    code_size_at = image + 10 + (3 * (2 << (packed & 7)) if packed & 0x80 else 0)
    if code_size_at >= len(out):
        return None
    out[code_size_at] = rng.choice((0, 1, 9, 11, 12, 13, 255))
    return bytes(out), f"gif LZW code size {out[code_size_at]}"


_TIFF_TAGS = {256: "width", 257: "height", 258: "bits", 259: "compression", 262: "photometric",
              273: "strip offsets", 277: "samples", 278: "rows per strip", 279: "strip bytes",
              284: "planar", 338: "extra samples"}


def edit_tiff(data: bytes, rng: random.Random):
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    end = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    ifd = struct.unpack(end + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return None
    count = struct.unpack(end + "H", data[ifd:ifd + 2])[0]
    entries = [ifd + 2 + 12 * k for k in range(count) if ifd + 14 + 12 * k <= len(data)]
    what = rng.choice(("tag", "tag", "tag", "count", "ifd_offset", "entry_count"))
    if what == "ifd_offset":
        value = rng.choice((0, 4, 8, ifd, len(data), _pick32(rng)))
        out[4:8] = struct.pack(end + "I", value)
        return bytes(out), f"tiff first IFD offset {value}"
    if what == "entry_count" or not entries:
        value = _pick16(rng)
        out[ifd:ifd + 2] = struct.pack(end + "H", value)
        return bytes(out), f"tiff IFD entry count {value}"
    known = [at for at in entries if struct.unpack(end + "H", data[at:at + 2])[0] in _TIFF_TAGS]
    at = rng.choice(known or entries)
    tag, kind = struct.unpack(end + "HH", data[at:at + 4])
    name = _TIFF_TAGS.get(tag, str(tag))
    if what == "count":
        value = _pick32(rng)
        out[at + 4:at + 8] = struct.pack(end + "I", value)
        return bytes(out), f"tiff tag {name} count {value}"
    if kind == 3:  # SHORT, stored left-justified in the value field
        value = _pick16(rng)
        out[at + 8:at + 10] = struct.pack(end + "H", value)
    else:
        value = _pick32(rng)
        out[at + 8:at + 12] = struct.pack(end + "I", value)
    return bytes(out), f"tiff tag {name} value {value}"


def edit_webp(data: bytes, rng: random.Random):
    if not (data.startswith(b"RIFF") and data[8:12] == b"WEBP"):
        return None
    out = bytearray(data)
    chunks, at = [], 12
    while at + 8 <= len(data):
        chunks.append((at, data[at:at + 4]))
        at += 8 + struct.unpack("<I", data[at + 4:at + 8])[0] + (data[at + 4] & 1)
    what = rng.choice(("bitstream", "bitstream", "riff_size", "chunk_size"))
    if what == "riff_size":
        value = _pick32(rng)
        out[4:8] = struct.pack("<I", value)
        return bytes(out), f"webp RIFF size {value}"
    if what == "chunk_size" and chunks:
        at, kind = rng.choice(chunks)
        value = _pick32(rng)
        out[at + 4:at + 8] = struct.pack("<I", value)
        return bytes(out), f"webp {kind!r} chunk size {value}"
    for at, kind in chunks:
        body = at + 8
        if kind == b"VP8X" and rng.random() < 0.5:
            width, height = rng.randrange(1 << 24), rng.randrange(1 << 24)
            if rng.random() < 0.5:
                width, height = rng.choice(((0, 0), (0xFFFFFF, 0xFFFFFF), (1 << 14, 1 << 14)))
            out[body + 4:body + 10] = width.to_bytes(3, "little") + height.to_bytes(3, "little")
            return bytes(out), f"webp VP8X canvas {width + 1}x{height + 1}"
        if kind == b"VP8 ":
            width, height = _pick16(rng), _pick16(rng)  # 14 bits of size, 2 of upscaling
            out[body + 6:body + 10] = struct.pack("<HH", width, height)
            return bytes(out), f"webp VP8 size fields {width:#06x} {height:#06x}"
        if kind == b"VP8L":
            bits = struct.unpack("<I", out[body + 1:body + 5])[0]
            width = rng.choice((0, 1, 0x3FFF, rng.randrange(1 << 14)))
            height = rng.randrange(1 << 14)
            bits = (bits & ~0x0FFFFFFF) | width | (height << 14)
            out[body + 1:body + 5] = struct.pack("<I", bits)
            return bytes(out), f"webp VP8L size {width + 1}x{height + 1}"
    return None


_HEIF_BOXES = (b"ftyp", b"meta", b"hdlr", b"pitm", b"iloc", b"iinf", b"infe", b"iprp", b"ipco",
               b"hvcC", b"av1C", b"ispe", b"pixi", b"ipma", b"iref", b"auxC", b"mdat", b"colr")


def edit_heif(data: bytes, rng: random.Random):
    if data[4:8] != b"ftyp":
        return None
    out = bytearray(data)
    extents = [at for at in range(len(data)) if data.startswith(b"ispe", at)]
    if extents and rng.random() < 0.5:
        at = rng.choice(extents) + 8  # after the type and the version/flags word
        width, height = struct.unpack(">II", out[at:at + 8])
        if rng.random() < 0.7:
            width = _pick32(rng)
        if rng.random() < 0.7:
            height = _pick32(rng)
        out[at:at + 8] = struct.pack(">II", width, height)
        return bytes(out), f"heif ispe {width}x{height}"
    boxes = [(at - 4, kind) for kind in _HEIF_BOXES for at in _find_all(data, kind) if at >= 4]
    at, kind = rng.choice(boxes)
    value = rng.choice((0, 1, 7, 8, 9, 16, 0xFFFFFFFF, _pick32(rng)))
    out[at:at + 4] = struct.pack(">I", value)
    return bytes(out), f"heif {kind.decode()} box size {value}"


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def edit_bmp(data: bytes, rng: random.Random):
    if not data.startswith(b"BM") or len(data) < 34:
        return None
    out = bytearray(data)
    what = rng.choice(("size", "size", "depth", "offset", "compression"))
    if what == "size":
        width, height = struct.unpack("<ii", out[18:26])
        extremes = (0, 1, -1, 0x7FFFFFFF, -0x80000000, 1 << 16, -(1 << 16))
        if rng.random() < 0.7:
            width = rng.choice(extremes)
        if rng.random() < 0.7:
            height = rng.choice(extremes)
        out[18:26] = struct.pack("<ii", width, height)
        return bytes(out), f"bmp size {width}x{height}"
    index = {"depth": 28, "offset": 10, "compression": 30}[what]
    if what == "depth":
        value = rng.choice((0, 1, 2, 4, 8, 15, 16, 24, 32, 64, 0xFFFF))
        out[index:index + 2] = struct.pack("<H", value)
    else:
        value = _pick32(rng) if what == "offset" else rng.randrange(16)
        out[index:index + 4] = struct.pack("<I", value)
    return bytes(out), f"bmp {what} {value}"


HEADER_EDITORS = {".jpg": edit_jpeg, ".jpeg": edit_jpeg, ".png": edit_png, ".gif": edit_gif,
                  ".tif": edit_tiff, ".tiff": edit_tiff, ".webp": edit_webp, ".heic": edit_heif,
                  ".avif": edit_heif, ".bmp": edit_bmp}


# ---------------------------------------------------------------------------------------------
# Byte-level mutations


def _position(data: bytes, rng: random.Random) -> int:
    # Headers are where the decoder makes its decisions, so a third of the positions fall in the
    # first 64 bytes; mostly past the 4-byte signature, which only ever gives "not an image".
    if rng.random() < 0.35:
        low = 4 if rng.random() < 0.9 else 0
        return rng.randrange(min(low, len(data) - 1), min(64, len(data)))
    return rng.randrange(len(data))


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    what = rng.choice(("flip", "flip", "set", "truncate", "insert", "delete", "copy", "zero"))
    if len(out) < 2 and what in ("truncate", "delete"):
        what = "insert"
    if what == "flip":
        spots = sorted(_position(out, rng) for _ in range(rng.randint(1, 8)))
        for spot in spots:
            out[spot] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip bits at {spots}"
    if what == "set":
        spots = sorted(_position(out, rng) for _ in range(rng.randint(1, 6)))
        for spot in spots:
            out[spot] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        return bytes(out), f"set bytes at {spots}"
    if what == "truncate":
        keep = rng.choice((rng.randrange(1, min(32, len(out))), rng.randrange(1, len(out)),
                           len(out) - rng.randint(1, min(16, len(out) - 1))))
        return bytes(out[:keep]), f"truncate to {keep} of {len(out)} bytes"
    if what == "insert":
        spot = _position(out, rng)
        size = rng.choice((1, 2, 4, rng.randint(1, 512)))
        filler = rng.choice((b"\x00" * size, b"\xff" * size, rng.randbytes(size)))
        out[spot:spot] = filler
        return bytes(out), f"insert {size} bytes at {spot}"
    if what == "delete":
        spot = _position(out, rng)
        size = rng.randint(1, 64)
        del out[spot:spot + size]
        return bytes(out) or b"\x00", f"delete {size} bytes at {spot}"
    if what == "copy":
        source, target, size = rng.randrange(len(out)), _position(out, rng), rng.randint(1, 128)
        out[target:target + size] = out[source:source + size]
        return bytes(out), f"copy {size} bytes from {source} to {target}"
    spot, size = _position(out, rng), rng.randint(1, 256)
    out[spot:spot + size] = bytes(len(out[spot:spot + size]))
    return bytes(out), f"zero {size} bytes at {spot}"


@dataclass(frozen=True)
class Case:
    index: int
    seed_name: str
    suffix: str
    data: bytes
    steps: tuple[str, ...]

    @property
    def file_name(self) -> str:
        return f"{self.index:05d}_{self.seed_name}{self.suffix}"

    def describe(self, base_seed: int) -> str:
        return f"case {base_seed}:{self.index} from {self.seed_name}: " + "; ".join(self.steps)


def make_case(seeds: dict[str, tuple[str, bytes]], base_seed: int, index: int) -> Case:
    """Case ``index`` of ``base_seed``: the seed files are taken in turn, so each format gets its
    share; one to three mutations, a header edit first in about half of the cases."""
    rng = random.Random(f"{base_seed}:{index}")
    names = sorted(seeds)
    name = names[index % len(names)]
    suffix, data = seeds[name]
    steps = []
    if rng.random() < 0.5:
        edited = HEADER_EDITORS[suffix](data, rng)
        if edited is not None:
            data, note = edited
            steps.append(note)
    for _ in range(rng.choice((0, 1, 1, 2, 3)) if steps else rng.randint(1, 3)):
        data, note = mutate_bytes(data, rng)
        steps.append(note)
    return Case(index, name, suffix, data, tuple(steps))


def make_cases(count: int, base_seed: int = BASE_SEED, start: int = 0) -> list[Case]:
    seeds = seed_files()
    return [make_case(seeds, base_seed, index) for index in range(start, start + count)]


# ---------------------------------------------------------------------------------------------
# The worker: decodes case files under an address-space limit and reports one JSON line each


def _check_case(path: str) -> dict:
    """Decode one file; the outcome as a dict. Only a broken promise of decode_image or
    image_size is reported as "raised" or "bad result"."""
    import traceback

    from loda_cli.errors import ImageError
    from loda_cli.images import DecodedImage, decode_image, image_size

    result: dict = {}
    started = time.perf_counter()
    try:
        decoded = decode_image(path)
    except ImageError as error:
        message = str(error)
        result.update(outcome="error", reason=message)
        if not message or "\n" in message or len(message) > 120:
            result.update(outcome="bad result", detail=f"unusable ImageError message {message!r}")
    except BaseException as error:  # noqa: BLE001 - anything else is the bug being looked for
        if isinstance(error, KeyboardInterrupt):
            raise
        result.update(outcome="raised", detail=traceback.format_exc(limit=-6))
    else:
        image = decoded.image
        problems = []
        if not isinstance(decoded, DecodedImage) or image.mode != "RGB":
            problems.append(f"mode {image.mode}")
        if min(image.size) < 1 or min(decoded.width, decoded.height) < 1:
            problems.append(f"size {image.size}, reported {decoded.width}x{decoded.height}")
        result.update(outcome="bad result" if problems else "decoded", detail="; ".join(problems),
                      size=[decoded.width, decoded.height], format=decoded.format)
    result["seconds"] = round(time.perf_counter() - started, 4)
    try:
        width, height = image_size(path)
        if not (isinstance(width, int) and isinstance(height, int)):
            result.update(outcome="bad result", detail=f"image_size gave {(width, height)!r}")
    except ImageError:
        pass
    except BaseException:  # noqa: BLE001
        result.update(outcome="raised", detail="image_size: " + traceback.format_exc(limit=-6))
    return result


def worker_main(memory_limit: int, names_file: str, start: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    import loda_cli.images  # noqa: F401 - imported before "ready", so no case pays for it

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    names = Path(names_file).read_text(encoding="utf-8").splitlines()
    folder = Path(names_file).parent
    for position in range(start, len(names)):
        result = _check_case(os.fspath(folder / names[position]))
        result["position"] = position
        result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# The parent: runs the worker, restarts it after a crash or a hang


@dataclass
class FuzzReport:
    results: list[dict]
    failures: list[str]
    restarts: int
    seconds: float

    def summary(self) -> str:
        outcomes = Counter(r["outcome"] for r in self.results)
        reasons = Counter(
            r.get("reason", "").split(":")[0] for r in self.results if r["outcome"] == "error"
        )
        slowest = max(self.results, key=lambda r: r.get("seconds", 0.0), default={})
        peak = max((r.get("peak_rss_kb", 0) for r in self.results), default=0)
        return (
            f"{len(self.results)} cases in {self.seconds:.1f} s: {dict(outcomes)}; error reasons "
            f"{dict(reasons.most_common(8))}; slowest {slowest.get('seconds', 0):.3f} s "
            f"({slowest.get('name', '-')}); worker peak RSS {peak / 1024:.0f} MiB; "
            f"{self.restarts} worker restarts"
        )


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_cases(cases: list[Case], folder: Path, base_seed: int = BASE_SEED,
              memory_limit: int = MEMORY_LIMIT, case_timeout: float = CASE_TIMEOUT_S) -> FuzzReport:
    """Write the cases to ``folder`` and decode them in a limited worker process."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / case.file_name).write_bytes(case.data)
    names_file = folder / "cases.txt"
    names_file.write_text("".join(c.file_name + "\n" for c in cases), encoding="utf-8")
    python_path = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, python_path)))

    results: list[dict] = []
    failures: list[str] = []
    restarts = 0
    position = 0
    started = time.monotonic()
    while position < len(cases):
        with open(folder / "worker.stderr", "ab") as stderr:
            command = [sys.executable, __file__, "worker", str(memory_limit), str(names_file)]
            proc = subprocess.Popen([*command, str(position)], stdout=subprocess.PIPE,
                                    stderr=stderr, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        try:
            # Start-up is not a case: on a loaded machine it may take longer than case_timeout.
            if lines.get(timeout=STARTUP_TIMEOUT_S) != "ready\n":
                raise RuntimeError(f"the fuzz worker did not start; see {folder / 'worker.stderr'}")
            while position < len(cases):
                case = cases[position]
                where = f"{case.describe(base_seed)}; file {folder / case.file_name}"
                try:
                    line = lines.get(timeout=case_timeout)
                except queue.Empty:
                    failures.append(f"HANG (> {case_timeout:g} s): {where}")
                    break
                if line is None:
                    failures.append(f"CRASH (exit {proc.wait()}): {where}")
                    break
                result = json.loads(line)
                result["name"] = case.file_name
                results.append(result)
                if result["outcome"] not in ("decoded", "error"):
                    detail = result.get("detail", "")
                    failures.append(f"{result['outcome'].upper()}: {where}\n{detail}")
                position += 1
            else:
                break
            position += 1  # resume after the case that killed or hung the worker
            restarts += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return FuzzReport(results, failures, restarts, time.monotonic() - started)


def _assert_clean(report: FuzzReport) -> None:
    print(report.summary())
    # decode_image turns a MemoryError into an ImageError, which is allowed; each one is listed,
    # since a few-KB file that exhausts the worker's 2 GiB deserves a look (see the report).
    for result in report.results:
        if result.get("reason", "").startswith("out of memory"):
            print(f"  out of memory: {result['name']}")
    assert not report.failures, (
        f"{len(report.failures)} fuzz failures ({report.summary()}):\n\n"
        + "\n\n".join(report.failures[:20])
    )


def _case_count(default: int) -> int:
    return int(os.environ.get("LODA_FUZZ_CASES", default))


# ---------------------------------------------------------------------------------------------
# The tests


def test_seed_files_are_valid_and_decode(tmp_path):
    """Mutations start from files that decode, in every format the fuzzer claims to cover."""
    from loda_cli.images import decode_image

    seeds = seed_files()
    assert {s for s, _ in seeds.values()} >= {".jpg", ".png", ".webp", ".tif", ".gif", ".heic"}
    formats = set()
    for name, (suffix, data) in seeds.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        decoded = decode_image(path)
        assert decoded.image.mode == "RGB"
        formats.add(decoded.format)
        assert len(data) < 16_000, name  # small, so thousands of cases stay fast
    assert formats >= {"JPEG", "PNG", "WEBP", "TIFF", "GIF", "HEIF"}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".tif", ".webp", ".heic", ".bmp"])
def test_header_editors_change_what_the_decoder_reads(suffix):
    """Each editor really reaches its field: over many tries, some edits change the size that
    Pillow reads from the header (else the header fuzzing would be byte noise)."""
    from PIL import Image

    seeds = {n: v for n, v in seed_files().items() if v[0] == suffix}
    assert seeds
    changed = 0
    for index in range(60):
        name = sorted(seeds)[index % len(seeds)]
        original = seeds[name][1]
        edited = HEADER_EDITORS[suffix](original, random.Random(index))
        assert edited is not None, name
        data, _ = edited
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(original)) as before:
                    with Image.open(io.BytesIO(data)) as after:
                        changed += before.size != after.size
        except Exception:  # noqa: BLE001 - an edit that makes the header unreadable counts too
            changed += 1
    assert changed >= 5


def test_cases_are_reproducible():
    seeds = seed_files()
    first = [make_case(seeds, 123, i) for i in range(50)]
    again = [make_case(seeds, 123, i) for i in range(50)]
    assert first == again
    assert len({c.data for c in first}) > 45  # and different from each other
    assert len({c.seed_name for c in first}) == min(50, len(seeds))


def test_the_harness_reports_a_crash_and_a_hang(tmp_path, monkeypatch):
    """The guard itself: a case that kills the worker or hangs it is reported, and the run goes on
    with the next case. The worker is told to misbehave through a test hook."""
    cases = make_cases(6)
    monkeypatch.setenv("LODA_FUZZ_TEST_MISBEHAVE", f"{cases[1].file_name},{cases[3].file_name}")
    report = run_cases(cases, tmp_path / "cases", case_timeout=3.0)
    assert len(report.results) == 4
    assert report.restarts == 2
    kinds = [failure.split(":")[0] for failure in report.failures]
    assert kinds == ["CRASH (exit -11)", "HANG (> 3 s)"]


def _png_with_idat_length(length: int) -> Case:
    suffix, data = seed_files()["png_rgba"]
    at = next(offset for offset, kind in _png_chunks(data) if kind == b"IDAT")
    edited = data[:at] + struct.pack(">I", length) + data[at + 4:]
    return Case(0, "png_rgba", suffix, edited, (f"png IDAT length {length}",))


def test_a_huge_chunk_length_does_not_allocate_it(tmp_path):
    """Regression (found by this fuzzer, seed 8 case 1484): Pillow skips the rest of a PNG's IDAT
    with one read(length), and CPython allocates ``length`` bytes before reading, so a 5 KB file
    claiming a 2 GiB chunk ended as "out of memory decoding image" under the worker's limit."""
    cases = [_png_with_idat_length(0x7FFFFFFF), _png_with_idat_length(0xFFFFFFFF)]
    cases = [Case(i, c.seed_name, c.suffix, c.data, c.steps) for i, c in enumerate(cases)]
    report = run_cases(cases, tmp_path / "cases", memory_limit=1 << 30)
    _assert_clean(report)
    assert all(not r.get("reason", "").startswith("out of memory") for r in report.results)


def test_fuzz_decode(tmp_path):
    """A few hundred mutated files (CI): every one decodes or gives an ImageError."""
    cases = make_cases(_case_count(CI_DECODE_CASES))
    report = run_cases(cases, tmp_path / "cases")
    _assert_clean(report)
    outcomes = Counter(r["outcome"] for r in report.results)
    # Both ends are reached: mutations that still decode, and damage that is reported.
    assert outcomes["decoded"] >= len(cases) // 20 and outcomes["error"] >= len(cases) // 4


@pytest.mark.slow
def test_fuzz_decode_thousands(tmp_path):
    cases = make_cases(_case_count(SLOW_DECODE_CASES), start=CI_DECODE_CASES)
    _assert_clean(run_cases(cases, tmp_path / "cases"))


def _score_mutated(tmp_path, checkpoint, count: int, workers: int) -> None:
    from loda_cli.scoring import Scorer

    folder = tmp_path / "mutated"
    cases = make_cases(count, start=100_000)
    folder.mkdir()
    for case in cases:
        (folder / case.file_name).write_bytes(case.data)
    scorer = Scorer(checkpoint, device="cpu", precision="fp32", workers=workers, batch_size=16,
                    decode_timeout=10.0)
    rows = list(scorer.score_files([folder]))
    by_path = {Path(row.path).name: row for row in rows}
    assert len(rows) == len(by_path) == len(cases)
    assert set(by_path) == {case.file_name for case in cases}
    for case in cases:
        row = by_path[case.file_name]
        assert row.ok or (row.error and row.score is None), (case.describe(BASE_SEED), row)
    scored = sum(row.ok for row in rows)
    print(f"{len(rows)} mutated files through Scorer: {scored} scores, {len(rows) - scored} errors")


def test_mutated_files_become_rows(tmp_path, tiny_checkpoint):
    """The same mutations through the whole scorer (workers=0): one row per file, never a crash."""
    _score_mutated(tmp_path, tiny_checkpoint, CI_SCORE_CASES, workers=0)


@pytest.mark.slow
def test_many_mutated_files_become_rows_with_workers(tmp_path, tiny_checkpoint):
    _score_mutated(tmp_path, tiny_checkpoint, SLOW_SCORE_CASES, workers=2)


# ---------------------------------------------------------------------------------------------
# Command line: the worker, and replaying one case


def _main(argv: list[str]) -> None:
    if argv[:1] == ["worker"]:
        misbehave = set(filter(None, os.environ.get("LODA_FUZZ_TEST_MISBEHAVE", "").split(",")))
        if misbehave:
            _install_misbehaviour(misbehave)
        worker_main(int(argv[1]), argv[2], int(argv[3]))
    elif argv[:1] == ["case"]:
        seeds = seed_files()
        case = make_case(seeds, int(argv[1]), int(argv[2]))
        target = Path(argv[3]) / case.file_name
        target.write_bytes(case.data)
        print(f"{target}\n{case.describe(int(argv[1]))}")
    else:
        raise SystemExit(__doc__)


def _install_misbehaviour(names: set[str]) -> None:
    """Test hook for the harness test: the first named case crashes the worker, the second hangs."""
    import signal

    global _check_case
    real_check = _check_case
    crash, hang = sorted(names)

    def misbehaving(path: str) -> dict:
        if path.endswith(crash):
            os.kill(os.getpid(), signal.SIGSEGV)
        if path.endswith(hang):
            time.sleep(3600)
        return real_check(path)

    _check_case = misbehaving


if __name__ == "__main__":
    _main(sys.argv[1:])
