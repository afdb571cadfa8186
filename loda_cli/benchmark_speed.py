"""`loda benchmark speed`: throughput of the scoring pipeline, the model alone, and a naive baseline.

The naive pipeline is what a straightforward script does: a full-resolution decode, fp32, one
image's crops per forward pass, all in the main process. It runs in the same process, on the
same files and the same model as the loda pipeline, so their ratio is meaningful on a noisy
machine; absolute numbers only compare on the same hardware.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loda_cli.atomic import replacing
from loda_cli.config import LoDaConfig, Preprocess

SYNTHETIC_SIZE = (6000, 4000)  # 24 megapixels
UNIQUE_IMAGES = 8


def photo_like(width: int, height: int, seed: int = 0):
    """A photo-like RGB Pillow image: smooth shading, a checker of edges and fine texture (for
    checks that need pictures with detail at every scale, quickly)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
    blocks = (((xx * 12).astype(int) + (yy * 9).astype(int)) % 2)[..., None] * 0.15
    texture = rng.normal(0, 0.04, size=(height, width, 1))
    return Image.fromarray((np.clip(base + blocks + texture, 0, 1) * 255).astype(np.uint8))


def make_synthetic_jpegs(folder: Path, n: int, size: tuple[int, int] = SYNTHETIC_SIZE, seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs (smooth shading, edges, sensor-like noise) of ``size``; reused when
    already there."""
    from PIL import Image, ImageDraw

    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        path = folder / f"synthetic_{w}x{h}_{seed}_{i:04d}.jpg"
        paths.append(path)
        if path.is_file():
            continue
        if i >= UNIQUE_IMAGES:
            # Past a few distinct pictures, copies decode at the same cost and save minutes.
            shutil.copyfile(paths[i % UNIQUE_IMAGES], path)
            continue
        rng = np.random.default_rng(seed * 1000 + i)
        small = rng.uniform(40, 215, (h // 200 + 2, w // 200 + 2, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(50, 600))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        arr = np.asarray(image, dtype=np.int16)
        arr = arr + rng.normal(0, 4, arr.shape).astype(np.int16)
        with replacing(path, sync=False) as fh:  # generated test images
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(fh, "JPEG", quality=90)
    return paths


def random_weights_model(config: LoDaConfig | None = None, crops: int = 15):
    """The paper's default architecture with random weights, packaged like a loaded checkpoint."""
    import torch

    from loda_cli.model import LoDa
    from loda_cli.weights import Calibration, LoadedModel

    torch.manual_seed(0)
    net = LoDa(config or LoDaConfig()).eval()
    return LoadedModel(
        model=net, metadata={}, path=Path("<random>"), sha256="random-" + (config or LoDaConfig()).vit,
        name="random ViT-B/16 + ResNet-50" if config is None else f"random {config.vit}",
        calibration=Calibration(), preprocess=Preprocess(num_crops=crops),
    )


def peak_rss_mb() -> dict[str, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"main_mb": self_kb / 1024, "workers_mb": child_kb / 1024}


@dataclass
class SpeedResult:
    name: str
    images: int
    seconds: float
    crops: int
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def crops_per_s(self) -> float:
        return self.crops / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "images": self.images, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 3), "crops_per_s": round(self.crops_per_s, 2),
                "stages_s": {k: round(v, 3) for k, v in self.stages.items()}}


def run_pipeline(scorer, files: list[Path]) -> SpeedResult:
    """The loda pipeline (workers, draft decode, batched crops, chosen precision), no cache."""
    from loda_cli.scoring import StageTimes

    scorer.times = StageTimes()
    scorer.cache_path = None
    t0 = time.perf_counter()
    rows = list(scorer.score_files([str(p) for p in files]))
    seconds = time.perf_counter() - t0
    failed = [r for r in rows if r.error]
    if failed:
        raise RuntimeError(f"benchmark images failed to score: {failed[0].error}")
    t = scorer.times
    return SpeedResult("loda", len(rows), seconds, t.crops,
                       {"decode": t.decode, "crop": t.crop, "h2d": t.h2d, "forward": t.forward})


def run_naive(loaded, files: list[Path], device: str) -> SpeedResult:
    """Full decode, fp32, one image's crops per forward, main process."""
    import torch
    from PIL import Image, ImageOps

    from loda_cli.transforms import crop_weights, normalize, scoring_crops

    model = loaded.model.to(device).eval()
    model.cnn.to(memory_format=torch.contiguous_format)
    prep = loaded.preprocess
    stages = {"decode": 0.0, "crop": 0.0, "h2d": 0.0, "forward": 0.0}
    crops_done = 0
    t0 = time.perf_counter()
    for path in files:
        a = time.perf_counter()
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im).convert("RGB")
        b = time.perf_counter()
        crops = scoring_crops(image, prep)  # the same views and crops as the pipeline
        c = time.perf_counter()
        x = normalize(torch.from_numpy(crops).to(device), prep)
        d = time.perf_counter()
        with torch.inference_mode():
            raws = model(x).float().flatten().cpu().numpy()
            float(np.dot(raws, crop_weights(prep, len(raws))))
        e = time.perf_counter()
        stages["decode"] += b - a
        stages["crop"] += c - b
        stages["h2d"] += d - c
        stages["forward"] += e - d
        crops_done += len(crops)
    return SpeedResult("naive", len(files), time.perf_counter() - t0, crops_done, stages)


def crops_per_image(scorer) -> int:
    return scorer.preprocess.num_crops + scorer.preprocess.detail_crops


def run_model_only(scorer, seconds: float = 5.0) -> SpeedResult:
    """The model alone on random uint8 crops already on the device: the pipeline's ceiling. Where
    the scorer's workers score (on the CPU), the ceiling is as many processes as it has workers,
    each running one image's crops at a time with one thread, as they do."""
    import torch

    if scorer.score_in_workers:
        return _model_only_in_workers(scorer, seconds)
    n = scorer.batch_size
    crops = torch.randint(0, 255, (n, 3, 224, 224), dtype=torch.uint8)
    scorer._forward(crops)  # warm-up (kernel selection, allocator)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count == 0:
        scorer._forward(crops)
        count += n
    elapsed = time.perf_counter() - t0
    per_image = crops_per_image(scorer)
    return SpeedResult("model-only", int(count / per_image), elapsed, count)


def _model_only_loop(scorer, seconds: float, ready, results) -> None:
    """One forked process of :func:`_model_only_in_workers`: (crops, seconds) onto ``results``."""
    import torch

    from loda_cli.scoring import score_item

    torch.set_num_threads(1)
    per_image = crops_per_image(scorer)
    crops = torch.randint(0, 255, (per_image, 3, 224, 224), dtype=torch.uint8).numpy()
    score_item({"crops": crops}, scorer.preprocess, scorer.runner)  # warm-up
    ready.wait()  # every process warmed up: they run side by side, as the workers do
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count == 0:
        score_item({"crops": crops}, scorer.preprocess, scorer.runner)
        count += per_image
    results.put((count, time.perf_counter() - t0))


def _model_only_in_workers(scorer, seconds: float) -> SpeedResult:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results, ready = ctx.Queue(), ctx.Barrier(scorer.workers)
    procs = [ctx.Process(target=_model_only_loop, args=(scorer, seconds, ready, results), daemon=True)
             for _ in range(scorer.workers)]
    for proc in procs:
        proc.start()
    try:
        parts = [results.get(timeout=seconds + 600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    per_image = crops_per_image(scorer)
    rate = sum(count / elapsed for count, elapsed in parts)  # crops a second, all processes
    elapsed = max(e for _, e in parts)
    crops = int(rate * elapsed)
    return SpeedResult("model-only", int(crops / per_image), elapsed, crops)


def warm_up(loaded, scorer) -> None:
    """Run each batch shape the benchmark uses once in each mode, so neither side pays for kernel
    selection (oneDNN builds its primitives per shape) inside the timed part."""
    import torch

    model = loaded.model
    with torch.inference_mode():
        model.cnn.to(memory_format=torch.contiguous_format)
        model(torch.randn(loaded.preprocess.num_crops + loaded.preprocess.detail_crops, 3, 224, 224,
                          device=scorer.device))
        model.cnn.to(memory_format=torch.channels_last)
    if not scorer.score_in_workers:  # scoring workers run the model, not this process
        scorer._forward(torch.randint(0, 255, (scorer.batch_size, 3, 224, 224), dtype=torch.uint8))


def flops_per_crop(model, crop_size: int = 224) -> float:
    """Floating-point operations of one crop through ``model`` (a multiply-add counts 2), counted
    by torch's FLOP counter on a copy on the meta device (shapes only, no arithmetic)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        probe(torch.zeros(1, 3, crop_size, crop_size, device="meta"))
    return float(counter.get_total_flops())


def cuda_peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None
