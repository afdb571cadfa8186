"""Preparation: the shorter side resized to 384 once, cached as lossless PNG; and loading an
image as training sees it, from that cache or on the fly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from loda_cli.datasets.parallel import run_parallel
from loda_cli.datasets.specs import (
    PREPARED_DIR,
    SHORT_SIDE,
    DatasetPathError,
    DatasetSpec,
    LabelItem,
    Progress,
    read_labels,
)
from loda_cli.errors import DatasetError

@dataclass
class PrepareReport:
    dataset: str
    cache_dir: Path
    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _base_dir(root: Path) -> Path:
    """The folder image paths are relative to (a csv dataset's root may be the CSV file)."""
    return root.parent if root.is_file() else root


def default_cache_dir(root: Path) -> Path:
    return _base_dir(Path(root)) / PREPARED_DIR


def prepared_path(spec: DatasetSpec, root: Path, item: LabelItem, cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`prepare_dataset` puts ``item``: its path under the root, plus ``.png``, in a
    folder named for the resize (``bicubic``, ``bilinear-exif``): datasets that resize
    differently never share a prepared image.

    The original suffix stays in the name so ``a.jpg`` and ``a.bmp`` cannot collide.
    """
    base = _base_dir(Path(root))
    cache = Path(cache_dir) if cache_dir is not None else base / PREPARED_DIR
    try:
        relative = Path(os.path.normpath(item.path.absolute())).relative_to(
            Path(os.path.normpath(base.absolute()))
        )
    except ValueError:
        raise DatasetPathError(f"{item.path} is outside the dataset folder {base}") from None
    method = spec.interpolation + ("-exif" if spec.exif_transpose else "")
    return cache / method / relative.parent / (relative.name + ".png")


def is_current(prepared: Path, source: Path) -> bool:
    """Whether ``prepared`` is the resized ``source`` as it is now: it carries the source's
    modification time (set when it was written), so a replaced or edited source is resized again."""
    try:
        return prepared.stat().st_mtime_ns == source.stat().st_mtime_ns
    except OSError:
        return False


def resize_short_side(image: Any, short_side: int, interpolation: str) -> Any:
    """The one resize of the project (training and scoring must agree): see
    :func:`loda_cli.images.resize_short_side`."""
    from loda_cli.images import resize_short_side as resize

    return resize(image, short_side, interpolation)


def _load_resized(path: str, interpolation: str, exif_transpose: bool) -> Any:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        rgb = image.convert("RGB")
    return resize_short_side(rgb, SHORT_SIDE, interpolation)


def _prepare_one(src: str, dst: str, interpolation: str, exif_transpose: bool) -> Optional[str]:
    """Write one prepared image atomically; None on success, else the reason. Worker process."""
    try:
        resized = _load_resized(src, interpolation, exif_transpose)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        temporary = f"{dst}.{os.getpid()}.tmp"
        try:
            resized.save(temporary, format="PNG", compress_level=3)
            source = os.stat(src)
            os.utime(temporary, ns=(source.st_atime_ns, source.st_mtime_ns))  # what is_current compares
            os.replace(temporary, dst)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except Exception as exc:  # one bad image must not stop the others
        return f"{type(exc).__name__}: {exc}"
    return None


def prepare_dataset(
    spec: DatasetSpec,
    root: Path,
    cache_dir: Optional[Path] = None,
    workers: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> PrepareReport:
    """Resize every labelled image to a shorter side of 384 into the cache; resumable.

    Images already in the cache are skipped; each file is written to a temporary name and renamed,
    so an interrupted run leaves no half-written image. SPAQ images are EXIF-transposed first.
    """
    labels = read_labels(spec, root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    report = PrepareReport(spec.name, cache, total=len(labels.items))
    tasks, names = [], []
    for item in labels.items:
        target = prepared_path(spec, root, item, cache)
        if is_current(target, item.path):
            report.skipped += 1
            continue
        tasks.append((str(item.path), str(target), spec.interpolation, spec.exif_transpose))
        names.append(item.name)
    done = report.skipped
    if progress is not None:
        progress(done, report.total)
    for index, error in run_parallel(_prepare_one, tasks, workers):
        if error is None:
            report.written += 1
        else:
            report.failed.append((names[index], error))
        done += 1
        if progress is not None:
            progress(done, report.total)
    return report


def load_training_image(
    spec: DatasetSpec, root: Path, item: LabelItem, cache_dir: Optional[Path] = None
) -> Any:
    """The image as training sees it (RGB, shorter side 384): from the cache when prepared,
    otherwise decoded and resized the same way on the fly."""
    from PIL import Image

    cached = prepared_path(spec, root, item, cache_dir)
    prepared = is_current(cached, item.path)  # a source changed since is read afresh
    source = cached if prepared else item.path
    try:
        if prepared:
            with Image.open(cached) as image:
                return image.convert("RGB")
        return _load_resized(str(source), spec.interpolation, spec.exif_transpose)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # One line naming the file, also when raised in a DataLoader worker: not a traceback
        # hours into training.
        reason = str(exc) or type(exc).__name__
        raise DatasetError(
            f"{source}: cannot read this image ({reason}); `loda data check {spec.name}` lists every unreadable file"
        ) from None
