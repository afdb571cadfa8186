"""JPEG decoding on the scoring device: nvJPEG on CUDA, in batches.

On a GPU the model outruns the CPU workers that decode large JPEGs, so the work is split:

- a worker (:func:`jpeg_for_device`) still walks the folders, reads the cache, and reads each
  JPEG's header (size, colour mode, progressive or not, EXIF orientation, capture time and
  camera) and its bytes, which is cheap;
- the main process (:class:`DeviceDecoder`) decodes a batch of such files at once with
  ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on CUDA), reduces each picture as the
  CPU path's JPEG draft and box reduction would, turns it upright, resizes it and cuts the crops
  on the device, as :func:`loda_cli.transforms.scoring_views` does on the CPU.

Everything else takes the CPU path (:func:`loda_cli.scoring.prepare_item`), with its error rows:
other formats, CMYK/YCCK and progressive JPEGs, multi-picture files, anything too large or too
elongated, and any file the device decoder refuses. ``decode="device"`` forces this path on
any device (on the CPU torchvision decodes with libjpeg-turbo), which is how it is tested where
there is no GPU.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from loda_cli.config import Preprocess
from loda_cli.transforms import MAX_ASPECT_RATIO, detail_positions, detail_target, grid_positions

if TYPE_CHECKING:
    import torch

    from loda_cli.images import FoundFile

# The largest picture sent to the device decoder (pixels); larger ones decode on the CPU, where
# the JPEG draft avoids holding the full-size picture.
MAX_DEVICE_PIXELS = 50_000_000
# A batch is decoded once it holds this many pictures or pixels: 16 photos of 24 MP hold 1.2 GB
# of decoded RGB on the device, whatever the crop batch size.
DECODE_BATCH = 16
DECODE_BATCH_PIXELS = 400_000_000

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_END_WINDOW = 1 << 16  # where the end-of-image marker must lie (some cameras append a trailer)


def jpeg_for_device(found: FoundFile, item: dict[str, Any], groups: bool) -> bool:
    """Prepare ``item`` (the worker's dict for ``found``) for device decoding: add the file's
    bytes and what its header says. False, with ``item`` untouched, when the file must take the
    CPU path."""
    from PIL import Image

    from loda_cli.images import RAW_EXTENSIONS, _exif, _orientation

    path = found.path
    if path.suffix.lower() in RAW_EXTENSIONS:
        return False
    try:
        with open(path, "rb") as fp:
            if fp.read(3) != _JPEG_SIGNATURE:
                return False
            fp.seek(0)
            data = fp.read()
        if _JPEG_END not in data[-_END_WINDOW:]:
            return False  # truncated: the CPU path says so, whatever the device decoder would do
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return False  # MPO, CMYK, YCCK: the CPU path knows them
            if im.info.get("progressive") or im.info.get("progression"):
                return False
            w, h = im.size
            if w * h > MAX_DEVICE_PIXELS or max(w, h) / max(1, min(w, h)) > MAX_ASPECT_RATIO:
                return False  # the CPU path reduces it while decoding, or says why not
            exif = _exif(im)
            orientation = _orientation(im, exif)
    except Exception:  # unreadable or damaged: the CPU path names the problem
        return False
    width, height = (h, w) if orientation >= 5 else (w, h)
    item.update(jpeg=np.frombuffer(data, dtype=np.uint8), orientation=orientation, width=width,
                height=height, format="JPEG", found=found)
    if groups:
        from loda_cli.bursts import capture_of

        taken, camera = capture_of(exif)
        item.update(taken=taken, camera=camera)
    return True


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CxHxW picture turned upright as EXIF ``orientation`` (1-8) asks, as Pillow's
    ``exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:  # stored turned a quarter anticlockwise: turn it clockwise
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def resize_short_side(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """A CxHxW uint8 picture resized (antialiased bicubic, as Pillow's) so that its short side is
    ``short_side``, the long side truncated as :func:`loda_cli.images.resize_short_side` does."""
    import torch
    import torch.nn.functional as F

    from loda_cli.images import short_side_size

    h, w = image.shape[-2:]
    size = short_side_size(w, h, short_side)[::-1]
    if size == (h, w):
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def jpeg_draft_scale(size: tuple[int, int], target_short_side: int) -> int:
    """The scale (1, 2, 4 or 8) at which the CPU path's JPEG draft decodes a picture of stored
    ``size``: Pillow takes the largest power of two that keeps both sides at least the size
    asked for (:func:`loda_cli.images.draft_request`)."""
    from loda_cli.images import draft_request

    requested = draft_request(size, target_short_side)
    if requested is None:
        return 1
    scale = min(size[0] // requested[0], size[1] // requested[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def box_reduce(image: torch.Tensor, factor: int) -> torch.Tensor:
    """A CxHxW uint8 picture averaged over ``factor`` x ``factor`` blocks, the last partial block
    over what it holds (as Pillow's ``reduce``; libjpeg's scaled decoding is close to it)."""
    import torch
    import torch.nn.functional as F

    if factor <= 1:
        return image
    pooled = F.avg_pool2d(image[None].float(), factor, ceil_mode=True)
    return pooled[0].round_().clamp_(0, 255).to(torch.uint8)


def reduce_like_cpu(stored: torch.Tensor, orientation: int, target_short_side: int) -> torch.Tensor:
    """The decoded picture (as stored, CxHxW) upright and reduced as the CPU path reduces it: the
    JPEG draft's scale before turning it, Pillow's box reduction after. Without them the detail
    view of a 12 MP photo is a bicubic resize where the CPU path has libjpeg's half-scale decode,
    a little softer, and the two paths' scores differed by up to 0.008."""
    from loda_cli.images import reduce_factor

    h, w = stored.shape[-2:]
    image = orient(box_reduce(stored, jpeg_draft_scale((w, h), target_short_side)), orientation)
    h, w = image.shape[-2:]
    return box_reduce(image, reduce_factor((w, h), target_short_side))


def _cut(view: torch.Tensor, positions, crop: int) -> torch.Tensor:
    import torch

    return torch.stack([view[:, top : top + crop, left : left + crop] for top, left in positions])


def device_views(image: torch.Tensor, preprocess: Preprocess):
    """:func:`loda_cli.transforms.scoring_views` for an upright CxHxW uint8 tensor: the crops
    (N x 3 x crop x crop, on the tensor's device), their boxes, and the short-side view (a CPU
    HxWx3 uint8 array, for the photo's look)."""
    import torch

    crop = preprocess.crop_size
    view = resize_short_side(image, preprocess.short_side)
    h, w = view.shape[-2:]
    positions = grid_positions(h, w, crop, preprocess.num_crops)
    crops = [_cut(view, positions, crop)]
    boxes = [(left / w, top / h, crop / w, crop / h) for top, left in positions]
    if preprocess.has_detail_view:
        detail = resize_short_side(image, detail_target(min(image.shape[-2:]), preprocess))
        dh, dw = detail.shape[-2:]
        places = detail_positions(dh, dw, preprocess)
        crops.append(_cut(detail, places, crop))
        boxes += [(left / dw, top / dh, crop / dw, crop / dh) for top, left in places]
    return torch.cat(crops), boxes, view.permute(1, 2, 0).cpu().numpy()


class DeviceDecoder:
    """Collects JPEG items, decodes them in batches on ``device`` and gives them back ready for
    the crop batcher (``crops`` on the device, ``boxes``, ``look``). A file the device decoder
    refuses goes through ``cpu_fallback`` (the CPU path) and comes back like any other item.
    ``target_short_side``: what the CPU path decodes towards (:func:`loda_cli.scoring.decode_target`),
    so that both reduce a picture alike."""

    def __init__(self, device: str, preprocess: Preprocess, groups: bool,
                 cpu_fallback: Callable[[dict[str, Any]], dict[str, Any]], target_short_side: int,
                 batch_size: int = DECODE_BATCH, batch_pixels: int = DECODE_BATCH_PIXELS):
        self.device = device
        self.preprocess = preprocess
        self.groups = groups
        self.cpu_fallback = cpu_fallback
        self.batch_size = batch_size
        self.batch_pixels = batch_pixels
        self.target_short_side = target_short_side
        self.pending: list[dict[str, Any]] = []
        self.decoded = 0  # files decoded on the device
        self.fallbacks = 0  # files sent to the CPU path after the device refused them

    def add(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.pending.append(item)
        pixels = sum(p["width"] * p["height"] for p in self.pending)
        if len(self.pending) >= self.batch_size or pixels >= self.batch_pixels:
            yield from self.flush()

    def flush(self) -> Iterator[dict[str, Any]]:
        items, self.pending = self.pending, []
        if not items:
            return
        t0 = time.perf_counter()
        images = self._decode([item["jpeg"] for item in items])
        share = (time.perf_counter() - t0) / len(items)
        for item, image in zip(items, images):
            if image is None:
                self.fallbacks += 1
                yield self.cpu_fallback(item)
                continue
            t1 = time.perf_counter()
            try:
                upright = reduce_like_cpu(image, item["orientation"], self.target_short_side)
                crops, boxes, view = device_views(upright, self.preprocess)
            except Exception:  # a picture smaller than a crop, out of device memory: the CPU path
                self.fallbacks += 1
                yield self.cpu_fallback(item)
                continue
            t2 = time.perf_counter()
            self.decoded += 1
            done = {k: v for k, v in item.items() if k not in ("jpeg", "found", "orientation")}
            done.update(crops=crops, boxes=boxes, t_decode=share, t_crop=t2 - t1, warnings=[])
            if self.groups:
                from loda_cli.bursts import look_of

                done.update(look=look_of(view), t_look=time.perf_counter() - t2)
            yield done

    def _decode(self, datas: list[np.ndarray]) -> list[torch.Tensor | None]:
        """Decode a batch on the device; when the batch fails, each file alone, so one file the
        decoder refuses costs only itself (None)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.from_numpy(d.copy()) for d in datas]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's notice that its decoders move on
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
            except Exception:
                pass
            out: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except Exception:
                    out.append(None)
            return out


def cpu_path(spec, cache_free_prepare: Callable) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The fallback for an item the device could not decode: the CPU path for its file, with the
    cache lookup already done by the worker."""
    cpu_spec = replace(spec, device_decode=False)

    def fallback(item: dict[str, Any]) -> dict[str, Any]:
        return cache_free_prepare(item["found"], item["index"], cpu_spec)

    return fallback
