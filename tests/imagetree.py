"""A tree of real image files, good and broken, for the tests that find, decode and score photos.

``make_image_tree(root)`` writes every file with Pillow (and pillow-heif for HEIC) and returns
what each file is expected to do, so the image tests and the end-to-end scoring tests agree on
one fixture. Files are small (at most 192x144) so that scoring them on a CPU stays quick.

Returned dict (paths are absolute, under ``root``):

* ``"good"``: ``{path: (width, height)}``, images that decode; the size is the displayed one,
  after EXIF orientation.
* ``"formats"``: ``{path: pillow_format}`` for every good image.
* ``"bad"``: ``{path: reason}``, image-named files whose ``ImageError`` reason starts with
  ``reason``.
* ``"skipped"``: ``{path: reason}``, what ``iter_image_files`` reports through ``on_skip``
  (the symlink loop, the broken link); empty where symlinks cannot be made.
* ``"ignored"``: paths that exist but are never yielded (non-images, hidden, junk folders).
* ``"sharp"`` / ``"blurred"``: the same scenes without and with a strong blur, in pairs.
* ``"rotated"``: ``{path: exif_orientation}`` for the EXIF-rotated JPEGs.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_SIZE = (192, 144)
ROTATED_STORED_SIZE = (120, 80)
MARKER = (255, 0, 0)  # the stored top-left corner of the rotated JPEGs
MARKER_BOX = 24  # marker square side in stored pixels
ROTATED_BACKGROUND = (0, 0, 255)
GIF_FIRST_FRAME = (255, 0, 0)
GIF_SECOND_FRAME = (0, 255, 0)
UNICODE_NAME = "ünïcødé 写真.jpg"


def synthetic_photo(seed: int, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A deterministic picture with smooth shading, hard-edged shapes and fine texture."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 80 * np.sin(x / width * np.pi * rng.uniform(1, 3) + rng.uniform(0, 6)),
            128 + 80 * np.cos(y / height * np.pi * rng.uniform(1, 3) + rng.uniform(0, 6)),
            128 + 60 * np.sin((x + y) / (width + height) * np.pi * 4),
        ],
        axis=-1,
    )
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1 = min(width - 1, x0 + int(rng.integers(6, width // 3)))
        y1 = min(height - 1, y0 + int(rng.integers(6, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), outline=colour, width=2)
    for i in range(0, width, 8):  # thin stripes: detail that blur removes
        draw.line((i, 0, i, height // 6), fill=(20, 20, 20) if i % 16 else (235, 235, 235))
    return image


def rotated_source() -> Image.Image:
    """A landscape picture with a red square in its stored top-left corner."""
    image = Image.new("RGB", ROTATED_STORED_SIZE, ROTATED_BACKGROUND)
    image.paste(MARKER, (0, 0, MARKER_BOX, MARKER_BOX))
    return image


def expected_marker_corner(orientation: int) -> str:
    """Where the stored top-left corner is displayed: "top-left", "top-right", ..."""
    return {1: "top-left", 3: "bottom-right", 6: "top-right", 8: "bottom-left"}[orientation]


def save_jpeg_with_orientation(image: Image.Image, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)


def gradient_16bit(size: tuple[int, int] = (256, 64)) -> Image.Image:
    """A horizontal ramp over the whole 16-bit range, mode I;16."""
    width, height = size
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    return Image.fromarray(np.tile(ramp, (height, 1)))


def palette_with_transparency(size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 255, 255, 0] + [0] * (254 * 3))
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2 - 1, size[1] - 1), fill=1)
    image.info["transparency"] = 0  # the right half is transparent
    return image


def animated_gif(path: Path, size: tuple[int, int] = (48, 32)) -> None:
    frames = [Image.new("RGB", size, GIF_FIRST_FRAME), Image.new("RGB", size, GIF_SECOND_FRAME)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_with_bad_body(path: Path, source: Image.Image) -> None:
    """A PNG whose compressed pixel data is damaged in the middle (the chunk CRC then fails)."""
    source.save(path, "PNG")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    middle = start + (len(data) - start) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _symlink(link: Path, target: str, *, is_dir: bool = False) -> bool:
    try:
        os.symlink(target, link, target_is_directory=is_dir)
    except (OSError, NotImplementedError):
        return False
    return True


def make_image_tree(root: Path) -> dict:
    """Write the fixture tree under ``root`` (created if needed) and describe it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good: dict[Path, tuple[int, int]] = {}
    formats: dict[Path, str] = {}
    bad: dict[Path, str] = {}
    skipped: dict[Path, str] = {}
    ignored: list[Path] = []
    sharp: list[Path] = []
    blurred: list[Path] = []
    rotated: dict[Path, int] = {}

    def add_good(path: Path, size: tuple[int, int], pillow_format: str) -> None:
        good[path] = size
        formats[path] = pillow_format

    # Same scenes, sharp and blurred.
    for index in range(3):
        scene = synthetic_photo(seed=index)
        sharp_path = root / f"sharp_{index:02d}.jpg"
        blurred_path = root / f"blurred_{index:02d}.jpg"
        scene.save(sharp_path, quality=95)
        scene.filter(ImageFilter.GaussianBlur(4)).save(blurred_path, quality=95)
        for path in (sharp_path, blurred_path):
            add_good(path, PHOTO_SIZE, "JPEG")
        sharp.append(sharp_path)
        blurred.append(blurred_path)

    # EXIF orientation.
    rotated_dir = root / "rotated"
    rotated_dir.mkdir(exist_ok=True)
    stored_w, stored_h = ROTATED_STORED_SIZE
    for orientation in (3, 6, 8):
        path = rotated_dir / f"orientation_{orientation}.jpg"
        save_jpeg_with_orientation(rotated_source(), path, orientation)
        size = (stored_h, stored_w) if orientation in (6, 8) else (stored_w, stored_h)
        add_good(path, size, "JPEG")
        rotated[path] = orientation

    # Every mode and container the decoder converts.
    formats_dir = root / "formats"
    formats_dir.mkdir(exist_ok=True)
    photo = synthetic_photo(seed=10)

    path = formats_dir / "cmyk.jpg"
    photo.convert("CMYK").save(path, quality=95)
    add_good(path, photo.size, "JPEG")

    path = formats_dir / "gray16.png"
    gradient = gradient_16bit()
    gradient.save(path)
    add_good(path, gradient.size, "PNG")

    path = formats_dir / "palette_alpha.png"
    palette = palette_with_transparency()
    palette.save(path, transparency=0)
    add_good(path, palette.size, "PNG")

    path = formats_dir / "gray_alpha.png"
    photo.convert("LA").save(path)
    add_good(path, photo.size, "PNG")

    path = formats_dir / "rgba.png"
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(path)
    add_good(path, photo.size, "PNG")

    path = formats_dir / "animated.gif"
    animated_gif(path)
    add_good(path, (48, 32), "GIF")

    path = formats_dir / "photo.heic"
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        photo.save(path, quality=90)
        add_good(path, photo.size, "HEIF")
    except (ImportError, OSError, KeyError, ValueError):  # no HEIF encoder in this build
        path.unlink(missing_ok=True)

    for name, pillow_format, options in (
        ("photo.webp", "WEBP", {"quality": 90}),
        ("photo.tif", "TIFF", {"compression": "tiff_deflate"}),
        ("photo.bmp", "BMP", {}),
        ("UPPER.JPG", "JPEG", {"quality": 90}),
    ):
        path = formats_dir / name
        photo.save(path, pillow_format, **options)
        add_good(path, photo.size, pillow_format)

    # Names and depth.
    path = root / UNICODE_NAME
    synthetic_photo(seed=20).save(path, quality=90)
    add_good(path, PHOTO_SIZE, "JPEG")
    deep = root / "nested" / "a" / "b"
    deep.mkdir(parents=True, exist_ok=True)
    path = deep / "deep.jpeg"
    synthetic_photo(seed=21, size=(144, 192)).save(path, quality=90)
    add_good(path, (144, 192), "JPEG")

    # Files that look like images and are not, or no longer.
    broken_dir = root / "broken"
    broken_dir.mkdir(exist_ok=True)
    whole = (root / "sharp_00.jpg").read_bytes()
    path = broken_dir / "truncated.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    bad[path] = "truncated image"
    path = broken_dir / "zero.jpg"
    path.write_bytes(b"")
    bad[path] = "empty file"
    path = broken_dir / "text.jpg"
    path.write_text("this is a shopping list, not a photo\n", encoding="utf-8")
    bad[path] = "not an image"
    path = broken_dir / "bad_body.png"
    png_with_bad_body(path, photo)
    bad[path] = "corrupt image"

    # Never yielded.
    path = root / "notes.txt"
    path.write_text("photos from the trip\n", encoding="utf-8")
    ignored.append(path)
    for folder in (".hidden", "@eaDir", ".thumbnails", ".Trash-1000"):
        (root / folder).mkdir(exist_ok=True)
        path = root / folder / "inside.jpg"
        synthetic_photo(seed=30, size=(32, 24)).save(path)
        ignored.append(path)
    path = root / "._sharp_00.jpg"  # macOS AppleDouble metadata, not a JPEG
    path.write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    ignored.append(path)

    # Links: a folder linking to its own ancestor, and a link to nothing.
    loop = root / "nested" / "a" / "up"
    if _symlink(loop, "..", is_dir=True):
        skipped[loop] = "symlink loop"
    dangling = root / "dangling.jpg"
    if _symlink(dangling, "missing-target.jpg"):
        skipped[dangling] = "broken symlink"

    return {
        "root": root,
        "good": good,
        "formats": formats,
        "bad": bad,
        "skipped": skipped,
        "ignored": ignored,
        "sharp": sharp,
        "blurred": blurred,
        "rotated": rotated,
    }


# ---------------------------------------------------------------------------------------------
# A minimal DNG, for the RAW path (only readable where the optional rawpy extra is installed)

# TIFF field types: byte, ascii, short, long, rational, srational.
_TIFF_FORMATS = {1: "B", 2: "s", 3: "H", 4: "I", 5: "II", 10: "ii"}


def _tiff_value(field_type: int, values) -> tuple[int, bytes]:
    if field_type == 2:
        data = values.encode("ascii") + b"\0"
        return len(data), data
    fmt = "<" + _TIFF_FORMATS[field_type]
    if field_type in (5, 10):
        return len(values), b"".join(struct.pack(fmt, *pair) for pair in values)
    return len(values), b"".join(struct.pack(fmt, value) for value in values)


def _tiff_ifd(tags: dict, at: int, strip: bytes, pointers: dict | None = None) -> bytes:
    """One little-endian IFD at file offset ``at``, followed by its long values and ``strip``.

    Tag 273 (StripOffsets) is pointed at ``strip``; ``pointers`` sets other offset-valued tags.
    """
    numbers = sorted(tags)
    packed = {tag: _tiff_value(*tags[tag]) for tag in numbers}
    table_end = at + 2 + 12 * len(numbers) + 4
    long_values = bytearray()
    value_at: dict[int, int] = {}
    for tag in numbers:
        data = packed[tag][1]
        if len(data) > 4:
            value_at[tag] = table_end + len(long_values)
            long_values += data + b"\0" * (len(data) % 2)
    strip_at = table_end + len(long_values)
    fixed = {273: strip_at, **(pointers or {})}
    table = bytearray(struct.pack("<H", len(numbers)))
    for tag in numbers:
        count, data = packed[tag]
        if tag in fixed:
            data = struct.pack("<I", fixed[tag])
        field = struct.pack("<I", value_at[tag]) if tag in value_at else data.ljust(4, b"\0")
        table += struct.pack("<HHI", tag, tags[tag][0], count) + field
    table += struct.pack("<I", 0)  # no next IFD
    return bytes(table + long_values + strip)


def write_test_dng(
    path: Path,
    size: tuple[int, int] = (64, 48),
    orientation: int = 1,
    preview: Image.Image | None = None,
) -> None:
    """Write a tiny Bayer DNG that LibRaw opens, optionally with an embedded JPEG preview.

    Sensor data is deterministic noise. With ``preview``, IFD0 holds the JPEG (as cameras do)
    and a SubIFD holds the sensor data.
    """
    width, height = size
    sensor = np.random.default_rng(0).integers(1000, 60000, (height, width)).astype("<u2")
    raw = sensor.tobytes()
    sensor_tags = {
        254: (4, [0]), 256: (4, [width]), 257: (4, [height]), 258: (3, [16]), 259: (3, [1]),
        262: (3, [32803]),  # CFA
        273: (4, [0]), 277: (3, [1]), 278: (4, [height]), 279: (4, [len(raw)]), 284: (3, [1]),
        33421: (3, [2, 2]), 33422: (1, [0, 1, 1, 2]),  # RGGB
        50717: (4, [65535]),  # white level
    }  # fmt: skip
    identity = [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]
    camera_tags = {
        271: (2, "Loda"), 272: (2, "Test"), 274: (3, [orientation]),
        50706: (1, [1, 4, 0, 0]), 50708: (2, "Loda Test"),
        50721: (10, identity), 50728: (5, [(1, 1), (1, 1), (1, 1)]),
    }  # fmt: skip
    header = b"II*\x00" + struct.pack("<I", 8)
    if preview is None:
        body = _tiff_ifd({**sensor_tags, **camera_tags}, 8, raw)
    else:
        encoded = io.BytesIO()
        preview.convert("RGB").save(encoded, "JPEG", quality=90)
        jpeg = encoded.getvalue()
        preview_width, preview_height = preview.size
        preview_tags = {
            **camera_tags,
            254: (4, [1]), 256: (4, [preview_width]), 257: (4, [preview_height]),
            258: (3, [8, 8, 8]), 259: (3, [7]), 262: (3, [6]), 273: (4, [0]), 277: (3, [3]),
            278: (4, [preview_height]), 279: (4, [len(jpeg)]), 284: (3, [1]),
            330: (4, [0]),  # SubIFDs, pointed at the sensor IFD below
        }  # fmt: skip
        first_length = len(_tiff_ifd(preview_tags, 8, jpeg))
        sensor_at = 8 + first_length + first_length % 2
        body = (
            _tiff_ifd(preview_tags, 8, jpeg, pointers={330: sensor_at})
            + b"\0" * (first_length % 2)
            + _tiff_ifd(sensor_tags, sensor_at, raw)
        )
    Path(path).write_bytes(header + body)
