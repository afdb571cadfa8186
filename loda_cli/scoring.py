"""Scoring many images: find, decode in workers, batch crops across images, aggregate by image id.

Data flow (DESIGN.md, "Data flow of loda score"):

1. With the cache on, the main process walks the paths and asks the cache for each file first
   (:func:`split_by_cache`): cached rows come out at once, and the workers get every n-th of the
   files left to decode. Known files are never decoded again, and they never travel through the
   workers' queues (a rerun of 40,000 photos with 10 new ones took 38.5-42.2 s that way, against
   21.0-24.5 s now; the walk resolves each folder once, not each file's whole path). Without the
   cache, or where the pass gives way (:data:`GIVE_UP_PENDING`), each DataLoader worker walks the
   paths itself (the walk is cheap and deterministic) and takes every n-th file, so files stream
   to the model before the walk of a large tree has finished.
2. The worker decodes (JPEG draft, EXIF orientation, RGB), resizes to the short side and cuts the
   fixed crop layout; crops travel as uint8. From the same view and the EXIF the decoder read it
   takes what burst grouping needs (:mod:`loda_cli.bursts`: the look, capture time, camera), so
   grouping costs no second decode. A failure becomes an error row, not an exception.
3. The main process packs crops from many images into full batches, runs them under
   ``inference_mode`` at the chosen precision and averages crop scores per image id, keeping
   each crop's score and where it lies (``ScoreRow.crops``).
4. Rows stream to the caller and the cache.

On the CPU the workers also score (:func:`cpu_scoring_workers`): one worker per CPU, each with
one torch thread, decodes an image and runs its crops through the model (forked, so they share
the parent's prepared weights), and sends back the scores instead of the crops. One process per
core keeps every core busy on its own image: no threads wait for each other inside an operation,
and decoding never preempts a thread the others wait on. On a 2-core AMD EPYC (Zen 3) the built-in
model scored 12 MP JPEGs at 3.47-3.58 img/s this way against 2.84-2.97 with one decoding worker
beside a 2-thread model, runs alternated (README, "Speed").
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loda_cli.cache import CROP_RAW_DIGITS, ScoreCache
from loda_cli.errors import ImageError, UsageError
from loda_cli.images import FoundFile, SkipNotice, decode_image, iter_image_files
from loda_cli.transforms import MAX_ASPECT_RATIO, crop_weights, scoring_crops, scoring_views

DEFAULT_DECODE_TIMEOUT_S = 10.0
# Test hook (documented in tests/test_reliability.py): seconds to sleep before each decode.
_TEST_DECODE_DELAY = float(os.environ.get("LODA_TEST_DECODE_DELAY", "0") or 0)


@dataclass
class ScoreRow:
    """One image's result. ``error`` is set (and score is None) when it could not be scored."""

    path: str
    root: str
    score: float | None = None
    mos: float | None = None
    raw: float | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    cached: bool = False
    index: int = -1
    # Burst grouping (loda_cli.bursts): capture time and camera from EXIF, the look (hashes).
    taken: float | None = None
    camera: str | None = None
    look: str | None = None
    group: int | None = None  # set by bursts.assign_groups once every row is in
    rank_in_group: int | None = None
    # Each crop's score where it lies: [[x, y, w, h, score], ...] in displayed-image pixels.
    crops: list[list[float]] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "score": self.score,
            "mos": self.mos,
            "raw": self.raw,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "error": self.error,
            "group": self.group,
            "rank_in_group": self.rank_in_group,
            "crops": self.crops,
        }


@dataclass
class StageTimes:
    """Seconds spent per stage (decode and crop summed over workers; h2d and forward in the main
    process, or forward summed over the workers where they score), and counts, for the speed
    benchmark and the end-of-run summary."""

    decode: float = 0.0
    crop: float = 0.0
    look: float = 0.0  # burst grouping's share of the workers' time: hashes and EXIF
    h2d: float = 0.0
    forward: float = 0.0
    images: int = 0
    crops: int = 0
    cached: int = 0
    failed: int = 0
    decoded: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for but MPS is not available")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """Training's and the accuracy benchmark's precision: an explicit value, or for ``auto``
    half precision on accelerators and on CPUs with AMX, fp32 elsewhere (bf16 autocast measured
    slower than fp32 on an avx512_bf16 CPU without AMX). Scoring measures instead
    (:mod:`loda_cli.precision`)."""
    from loda_cli.precision import check_precision, cpu_description, static_precision

    if check_precision(precision) == "int8":
        raise UsageError("--precision int8 is for scoring only")
    if precision != "auto":
        return precision
    if device == "cpu":
        return "bf16" if "amx_bf16" in cpu_description()[1] else "fp32"
    return static_precision(device)


def autocast_context(device: str, precision: str):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# What one CPU scoring worker may need beyond what it shares with its parent (the model's weights,
# inherited by fork): one image's crops through the model, a decoded photo, torch's own memory.
# Measured as private memory (smaps_rollup) at its peak: 260-280 MB a worker for the built-in model
# on 12 MP JPEGs, 440-510 MB for the paper's ViT-B + ResNet-50 on 24 MP ones; twice that is asked.
WORKER_MEMORY_MB = 1024


def can_fork_workers() -> bool:
    """Whether scoring workers can be forked: they must inherit the prepared model, not receive
    a pickled copy. Not on macOS, where fork is unsafe, nor where fork does not exist."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def available_memory_mb() -> float | None:
    """Memory the system could give new processes now (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_scoring_workers(cpus: int | None = None, memory_mb: float | None = None) -> int:
    """How many worker processes decode *and* score on the CPU by default: one per CPU this
    process may use, each with one torch thread. 0 keeps the other layout (the main process
    scores with every thread while workers decode): where workers cannot be forked, where the
    user set a thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``: theirs is honoured), where
    memory would not hold one worker per CPU (cores would sit idle), and with one CPU, where there
    is nothing to spread (in a cgroup with a 1-CPU quota on a 2-core Zen 3 the two layouts scored
    the built-in model at 1.79-1.88 and 1.90-1.97 img/s, alternated)."""
    from loda_cli.threads import available_cpus, user_set_threads

    if not can_fork_workers() or user_set_threads():
        return 0
    cpus = available_cpus() if cpus is None else cpus
    if cpus < 2:
        return 0
    memory_mb = available_memory_mb() if memory_mb is None else memory_mb
    if memory_mb is not None and memory_mb < cpus * WORKER_MEMORY_MB:
        return 0
    return cpus


def describe_layout(scorer) -> str:
    """How a scorer spreads its work over processes, in words for run summaries."""
    if scorer.score_in_workers:
        n = scorer.workers
        return f"{n} worker{'s' if n != 1 else ''} decoding and scoring (1 thread each)"
    workers = f"{scorer.workers} decoding worker{'s' if scorer.workers != 1 else ''}" if scorer.workers else "no workers"
    return f"batch {scorer.batch_size}, {scorer.threads} thread{'s' if scorer.threads != 1 else ''}, {workers}"


def default_workers(device: str) -> int:
    from loda_cli.threads import available_cpus

    cores = available_cpus()
    if device == "cpu":
        # The forward pass already uses every core; one decoder keeps it fed on small machines.
        return max(1, min(4, cores // 4)) if cores > 4 else 1
    return max(1, min(8, cores - 1))


# ---------------------------------------------------------------------------------------------
# The worker side: walk, cache lookup, decode, crop


@contextmanager
def _time_limit(seconds: float | None):
    """Raise ImageError when the body runs longer than ``seconds`` (main thread of a process)."""
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum, frame):
        raise ImageError(f"decoding took longer than {seconds:g} s", transient=True)

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _NativeStderr:
    """Captures what C decoders (libtiff, libjpeg, libpng) print straight to file descriptor 2,
    so it lands in the file's row instead of across the progress bar. Used in worker processes
    only: in the main process fd 2 also carries the progress display and the user's own output.
    One temporary file per process, emptied after each capture."""

    enabled = False
    _file = None

    @classmethod
    @contextmanager
    def capture(cls):
        lines: list[str] = []
        if not cls.enabled:
            yield lines
            return
        import tempfile

        if cls._file is None:
            cls._file = tempfile.TemporaryFile()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(cls._file.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            cls._file.seek(0)
            text = cls._file.read(64 * 1024).decode("utf-8", "replace")
            cls._file.seek(0)
            cls._file.truncate()
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _display_path(found: FoundFile) -> str:
    return os.fsdecode(found.path)


@dataclass
class ScanSpec:
    """Everything a worker needs to find and prepare its share of the files (picklable)."""

    paths: list[str]
    recursive: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    shard: tuple[int, int] = (0, 1)
    preprocess: Any = None
    model_id: str = ""
    cache_path: str | None = None
    decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT_S
    groups: bool = True  # compute what burst grouping needs (look, capture time, camera)
    # Leave plain JPEGs undecoded (bytes and header only) for the main process to decode on the
    # scoring device (loda_cli.devicedecode).
    device_decode: bool = False
    # The prepared model (loda_cli.precision.Runner) when the workers score too: reaches them by
    # fork only, never pickled.
    runner: Any = None
    prep_id: str = ""  # the preprocessing's cache key, computed once (it took 0.1 ms a file)
    # The files left to decode, as (file, lookup item) from the main process's cache pass
    # (split_by_cache): the workers then take these and do not walk.
    pending: list[tuple[FoundFile, dict[str, Any]]] | None = None
    # Whether the cached rows need each crop's score (ScoreRow.crops): False leaves them unread
    # in the cache's pass, for outputs that have no use for them (a CSV, cull, sort, rate).
    # Not part of a split's key: a split made without them gives its cached rows none.
    crops: bool = True

    def __post_init__(self) -> None:
        if self.preprocess is not None and not self.prep_id:
            self.prep_id = self.preprocess.digest()


def decode_target(preprocess) -> int:
    """The short side to decode towards. With a detail view, the cheap reductions (JPEG draft)
    may go down to the detail view's own size: the DCT-domain scaling is a clean box filter, and
    a 12 MP JPEG then decodes at half size instead of in full."""
    if preprocess.has_detail_view:
        from loda_cli.images import REDUCING_GAP

        return max(preprocess.short_side, math.ceil(preprocess.detail_short_side / REDUCING_GAP))
    return preprocess.short_side


def lookup_item(found: FoundFile, index: int, spec: ScanSpec, cache=None,
                resolved_dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """The part of :func:`prepare_item` that needs no decoding: the file's identity and its
    cached result. The item is complete (nothing left to decode) when it holds an ``error`` (an
    unreadable file) or a cached result without ``refresh``. ``resolved_dirs``: as for
    :meth:`~loda_cli.cache.FileKey.of`, one dict for a whole walk."""
    from loda_cli.cache import FileKey

    item: dict[str, Any] = {"index": index, "path": _display_path(found), "root": os.fsdecode(found.root)}
    try:
        key = FileKey.of(found.path, resolved_dirs)
        item["key"] = key
    except OSError as exc:
        item["error"] = f"unreadable: {exc.strerror or exc}"
        return item
    if cache is not None:
        hit = cache.get(key, spec.model_id, spec.prep_id, crops=spec.crops)
        if hit is not None:
            # A row from before burst grouping: decode for the look and EXIF only; the score
            # stays the cached one. It is stored again then, with its crop scores (read for that).
            refresh = spec.groups and hit.error is None and hit.look is None
            if refresh and not spec.crops:
                hit = cache.get(key, spec.model_id, spec.prep_id)
            item.update(cached=True, raw=hit.raw, width=hit.width, height=hit.height, format=hit.format,
                        error=hit.error, look=hit.look, taken=hit.taken, camera=hit.camera, crop_raws=hit.crops)
            if refresh:
                item["refresh"] = True
    return item


def item_complete(item: dict[str, Any]) -> bool:
    """Whether :func:`lookup_item` left nothing to decode."""
    return "key" not in item or (bool(item.get("cached")) and not item.get("refresh"))


def prepare_item(found: FoundFile, index: int, spec: ScanSpec, cache=None,
                 resolved_dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Cache lookup, else decode and crop one file. Never raises for a bad image."""
    item = lookup_item(found, index, spec, cache, resolved_dirs)
    if item_complete(item):
        return item
    return decode_item(found, item, spec)


def decode_item(found: FoundFile, item: dict[str, Any], spec: ScanSpec) -> dict[str, Any]:
    """Decode and crop the file of an incomplete :func:`lookup_item` item (updated and returned).
    Never raises for a bad image."""
    if spec.device_decode and not item.get("refresh"):
        from loda_cli.devicedecode import jpeg_for_device

        if jpeg_for_device(found, item, spec.groups):
            return item
    t0 = time.perf_counter()
    native: list[str] = []
    try:
        with _NativeStderr.capture() as native, _time_limit(spec.decode_timeout):
            if _TEST_DECODE_DELAY:
                time.sleep(_TEST_DECODE_DELAY)  # test hook: makes runs slow enough to interrupt
            decoded = decode_image(found.path, target_short_side=decode_target(spec.preprocess),
                                   max_aspect=MAX_ASPECT_RATIO)
            t1 = time.perf_counter()
            crops, boxes, view = scoring_views(decoded.image, spec.preprocess)
            t2 = time.perf_counter()
            if spec.groups:
                item.update(_look_and_capture(view, decoded.exif), t_look=time.perf_counter() - t2)
        if not item.get("refresh"):
            item.update(crops=crops, boxes=boxes, width=decoded.width, height=decoded.height,
                        format=decoded.format, warnings=decoded.warnings)
        item.update(t_decode=t1 - t0, t_crop=t2 - t1)
    except ImageError as exc:
        if item.pop("refresh", False):  # the cached score stands; the file changed meanwhile?
            return item
        item["error"] = str(exc)
        item["transient"] = exc.transient
        item["t_decode"] = time.perf_counter() - t0
    except MemoryError:
        if item.pop("refresh", False):
            return item
        item["error"] = "out of memory while decoding"
        item["transient"] = True
    if native:
        item["warnings"] = list(item.get("warnings") or []) + [f"decoder: {line}" for line in native[:5]]
        if item.get("error") and not item.get("transient"):
            item["error"] += f" ({native[0][:120]})"  # the decoder's own words say what broke
    return item


def _look_and_capture(view, exif) -> dict[str, Any]:
    """What burst grouping needs, from the view the crops were cut from and the EXIF the decoder
    read: no second decode."""
    from loda_cli.bursts import capture_of, look_of

    taken, camera = capture_of(exif)
    return {"look": look_of(view), "taken": taken, "camera": camera}


def iter_prepared(spec: ScanSpec, worker_id: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
    """The items of one worker: file i of the walk belongs to shard ``i % n`` and, within the
    shard, to worker ``(i // n) % num_workers``. Worker 0 also reports skipped paths."""
    if spec.pending is not None:
        yield from _iter_pending(spec, worker_id, num_workers)
        return
    cache = ScoreCache(spec.cache_path, readonly=True) if spec.cache_path else None
    skips: list[SkipNotice] = []
    resolved_dirs: dict[str, str] = {}
    shard_k, shard_n = spec.shard
    try:
        files = iter_image_files(
            [Path(p) for p in spec.paths],
            recursive=spec.recursive,
            include=spec.include,
            exclude=spec.exclude,
            on_skip=skips.append,
        )
        for index, found in enumerate(files):
            if worker_id == 0:
                yield from _drain_skips(skips)
            else:
                skips.clear()  # every worker walks the same tree; worker 0 alone reports
            if index % shard_n != shard_k or (index // shard_n) % num_workers != worker_id:
                continue
            yield _scored_here(prepare_item(found, index, spec, cache, resolved_dirs), spec)
        if worker_id == 0:
            yield from _drain_skips(skips)
    finally:
        if cache is not None:
            cache.close()


@dataclass
class CacheSplit:
    """A walk's files split by the score cache. ``done``: the lookup items complete without
    decoding (a cached result, or a file that could not be read), in walk order; ``pending``:
    (file, lookup item) for each file left to decode; ``skipped``: (path, reason) for what the
    walk passed over. ``answers(spec)`` says whether it was made for that walk and model (not
    once :meth:`Scorer.score_files` has consumed it)."""

    key: tuple | None
    done: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[FoundFile, dict[str, Any]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # what the pass took

    def answers(self, spec: ScanSpec) -> bool:
        return self.key == _split_key(spec)

    def take_done(self) -> Iterator[dict[str, Any]]:
        """The ``done`` items in walk order, each let go as it is taken (a row takes its place:
        40,000 of both at once took 120 MB more); the split then answers no later run."""
        done, self.done = self.done, []
        self.key = None
        done.reverse()
        while done:
            yield done.pop()


def _split_key(spec: ScanSpec) -> tuple:
    return (tuple(spec.paths), spec.recursive, spec.include, spec.exclude, spec.shard, spec.groups,
            spec.model_id, spec.prep_id)


# The cache's pass gives up once this many files are left to decode and they outnumber those
# the cache answered: the workers then walk and stream as without a cache, so a first run over a
# large (or slow, networked) tree starts scoring at once. Each file left costs a model run (0.3 s
# on a CPU core) where each cached one spared the workers' way costs 0.5 ms, so past this point the
# pass saves little and delays the first row.
GIVE_UP_PENDING = 1000


def split_by_cache(spec: ScanSpec, cache: ScoreCache, *, stop_at_miss: bool = False,
                   give_up_after: int | None = None) -> CacheSplit | None:
    """Walk ``spec``'s paths (its shard only) and ask ``cache`` for each file. None when the
    cache cannot answer for this model (:meth:`ScoreCache.answers`: no row of it, or an older
    schema a read-only connection cannot read); with ``stop_at_miss``, as soon as one file is
    left to decode; and once ``give_up_after`` (default :data:`GIVE_UP_PENDING`) files are left
    and they outnumber the answered."""
    if not cache.answers(spec.model_id, spec.prep_id):
        return None
    give_up_after = give_up_after or GIVE_UP_PENDING
    started = time.monotonic()
    split = CacheSplit(_split_key(spec))
    skips: list = []
    resolved_dirs: dict[str, str] = {}
    shard_k, shard_n = spec.shard
    files = iter_image_files([Path(p) for p in spec.paths], recursive=spec.recursive, include=spec.include,
                             exclude=spec.exclude, on_skip=skips.append)
    try:
        for index, found in enumerate(files):
            if index % shard_n != shard_k:
                continue
            item = lookup_item(found, index, spec, cache, resolved_dirs)
            if item_complete(item):
                split.done.append(item)
            elif stop_at_miss:
                return None
            else:
                split.pending.append((found, item))
                if len(split.pending) >= give_up_after and len(split.pending) > len(split.done):
                    return None
    finally:
        files.close()
    split.skipped = [(os.fsdecode(n.path), n.reason) for n in skips]
    split.seconds = time.monotonic() - started
    return split


def _iter_pending(spec: ScanSpec, worker_id: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """The items of one worker when the main process walked and asked the cache already: every
    n-th of the files left to decode."""
    for position in range(worker_id, len(spec.pending), num_workers):
        found, looked = spec.pending[position]
        yield _scored_here(decode_item(found, dict(looked), spec), spec)


def _scored_here(item: dict[str, Any], spec: ScanSpec) -> dict[str, Any]:
    """The item, scored in this process when the workers score (:func:`score_item`)."""
    if spec.runner is not None and item.get("crops") is not None:
        score_item(item, spec.preprocess, spec.runner)
    return item


def score_item(item: dict[str, Any], preprocess, runner) -> None:
    """Score a prepared item's crops where it was prepared (a CPU scoring worker): its crops give
    way to ``raw``, ``crop_raws`` and ``scored`` (the crop count), which is all the main process
    needs, so no pixels cross between processes."""
    import numpy as np
    import torch

    from loda_cli.transforms import normalize

    t0 = time.perf_counter()
    crops = torch.from_numpy(np.asarray(item.pop("crops")))
    batch = normalize(crops, preprocess).contiguous(memory_format=torch.channels_last)
    raws = runner(batch, [len(crops)]).tolist()
    weights = crop_weights(preprocess, len(raws))
    item.update(raw=float(sum(r * float(w) for r, w in zip(raws, weights))), crop_raws=raws,
                scored=len(raws), t_forward=time.perf_counter() - t0)


def _drain_skips(skips: list[SkipNotice]) -> Iterator[dict[str, Any]]:
    while skips:
        notice = skips.pop(0)
        yield {"skip": os.fsdecode(notice.path), "reason": notice.reason}


def _make_dataset(spec: ScanSpec):
    from torch.utils.data import IterableDataset, get_worker_info

    class PreparedImages(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            if info is None:
                yield from iter_prepared(spec)
            else:
                yield from iter_prepared(spec, info.id, info.num_workers)

    return PreparedImages()


def _passthrough(item):
    return item


def _worker_init(worker_id: int) -> None:
    """Workers die with their parent: a SIGKILLed `loda score` must not leave decoders running
    (an orphan would also block on its result queue forever)."""
    import torch

    from loda_cli.allocator import hold_freed_memory

    torch.set_num_threads(1)
    hold_freed_memory()  # inherited through fork; set again for other start methods
    _NativeStderr.enabled = True
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


# ---------------------------------------------------------------------------------------------
# Batching crops across images


class _CropBatcher:
    """Packs the crops of many images into full batches for ``forward`` and sums each image's
    weighted crop scores; an image is done when all its crops are scored.

    ``forward`` gets, as ``groups``, how many of the batch's crops each image has in it, in order.
    ``whole_images``: batches hold whole images only (one image larger than ``batch_size`` is a
    batch of its own), so a precision whose result depends on the whole input (int8's dynamic
    quantization) can run each image on its own (:class:`loda_cli.precision.Runner`)."""

    def __init__(self, batch_size: int, forward: Callable[..., list[float]], whole_images: bool = False):
        self.batch_size = batch_size
        self.forward = forward
        self.whole_images = whole_images
        self.pending: dict[int, dict[str, Any]] = {}  # index -> item waiting for crop scores
        self.raws: dict[int, list[float]] = {}  # index -> its crops' raw scores so far
        self.queue: list[tuple[int, Any]] = []  # (index, uint8 crops) not yet run
        self.queued = 0

    def add(self, item: dict[str, Any]) -> None:
        """Queue an item's ``crops`` (uint8, with their ``weights``)."""
        self.pending[item["index"]] = item
        self.queue.append((item["index"], item["crops"]))
        self.queued += len(item["crops"])

    def run(self, final: bool = False) -> Iterator[tuple[dict[str, Any], float, list[float]]]:
        """Run every full batch (and, when ``final``, the last partial one); yields (item, raw
        score, each crop's raw score) for each image whose last crop was scored."""
        while self.queued >= self.batch_size or (final and self.queued):
            take, parts, owners, groups = self.batch_size, [], [], []
            while take and self.queue:
                index, crops = self.queue[0]
                if self.whole_images and parts and len(crops) > take:
                    break  # the next image waits for the next batch
                n = len(crops) if self.whole_images else min(take, len(crops))
                parts.append(crops[:n])
                owners += [index] * n
                groups.append(n)
                if n == len(crops):
                    self.queue.pop(0)
                else:
                    self.queue[0] = (index, crops[n:])
                take = max(0, take - n)
            raws = self.forward(_concat(parts), groups=groups)
            self.queued -= len(raws)
            for index, value in zip(owners, raws):
                item = self.pending[index]
                seen = self.raws.setdefault(index, [])
                seen.append(value)
                if len(seen) == len(item["crops"]):
                    del self.pending[index]
                    del self.raws[index]
                    weighted = sum(r * float(w) for r, w in zip(seen, item["weights"]))
                    yield item, weighted, seen


def _concat(parts):
    """One batch from crops that are numpy arrays (CPU decoding) or tensors (device decoding)."""
    import numpy as np

    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    import torch

    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([p if isinstance(p, torch.Tensor) else torch.from_numpy(p).to(device) for p in parts])


# ---------------------------------------------------------------------------------------------
# The scorer


def _architecture(model) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {"class": type(model).__name__}


def check_options(*, precision: str = "auto", decode: str = "auto", crops: int | None = None,
                  batch_size: int | None = None, workers: int | None = None) -> None:
    """Refuse a bad scoring option with a one-line UsageError, before anything loads."""
    from loda_cli.precision import check_precision

    check_precision(precision)
    if decode not in ("auto", "cpu", "device"):
        raise UsageError(f"unknown decode {decode!r}; use auto, cpu or device")
    if crops is not None and crops < 1:
        raise UsageError("--crops must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if workers is not None and workers < 0:
        raise UsageError("--workers must be 0 or more")


class Scorer:
    """Scores image files with one LoDa checkpoint.

    >>> scorer = Scorer("loda-builtin")
    >>> for row in scorer.score_files(["~/Photos"]):
    ...     print(row.path, row.score)
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        crops: int | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        cache: bool | str | os.PathLike[str] = True,
        decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT_S,
        on_measure_precision: Callable[[], None] | None = None,
        groups: bool = True,
        decode: str = "auto",
    ):
        """``groups``: also compute what burst grouping needs (:mod:`loda_cli.bursts`) from each
        decoded image: its look (hashes), capture time and camera.

        ``decode``: where JPEGs are decoded. "auto" decodes plain JPEGs on the GPU (nvJPEG) when
        scoring on CUDA and everything on the CPU otherwise; "cpu" always on the CPU; "device"
        in the main process on the scoring device, whatever it is (:mod:`loda_cli.devicedecode`).
        """
        from loda_cli.allocator import hold_freed_memory
        from loda_cli.precision import Runner, choose
        from loda_cli.threads import fit_threads, user_set_threads
        from loda_cli.weights import LoadedModel, load_model

        # Both before the precision is timed: page faults were most of the CNN's time, and the
        # thread count is part of what the choice is cached under.
        hold_freed_memory()
        self.threads = fit_threads()
        check_options(precision=precision, decode=decode, crops=crops, batch_size=batch_size, workers=workers)
        self.device = resolve_device(device)
        self.device_decode = decode == "device" or (decode == "auto" and self.device.startswith("cuda"))
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
        self.loaded = loaded
        self.preprocess = loaded.preprocess
        if crops is not None:
            from dataclasses import replace

            self.preprocess = replace(self.preprocess, num_crops=crops)
        self.model = loaded.model.to(self.device).eval()
        on_cpu = self.device == "cpu" and not self.device_decode
        # On the CPU, workers decode and score, one torch thread each (see the module's notes).
        if workers is None:
            scoring_workers = cpu_scoring_workers() if on_cpu else 0
            self.workers = scoring_workers or default_workers(self.device)
            self.score_in_workers = scoring_workers > 0
        else:
            self.workers = workers
            self.score_in_workers = on_cpu and workers > 0 and can_fork_workers() and not user_set_threads()
        self.worker_threads = 1 if self.score_in_workers else 0
        import torch

        if self.score_in_workers:
            torch.set_num_threads(1)  # the precisions are timed as the workers will run them
        try:
            self.precision_choice = choose(
                precision, self.device, model=self.model, preprocess=self.preprocess, to_score=self._scores_of,
                model_id=loaded.sha256, architecture=_architecture(self.model), on_measure=on_measure_precision,
            )
        finally:
            torch.set_num_threads(self.threads)
        self.precision = self.precision_choice.precision
        # A model the caller passed in is copied before its weights change, so theirs stay fp32.
        self.runner = Runner(self.model, self.precision, self.device, own=model is not loaded)
        self.model = self.runner.model
        self.batch_size = batch_size or (64 if self.device.startswith("cuda") else 16)
        if cache is True:
            from loda_cli.cache import default_cache_path

            self.cache_path: str | None = str(default_cache_path())
        elif cache:
            self.cache_path = str(cache)
        else:
            self.cache_path = None
        self.decode_timeout = decode_timeout
        self.groups = groups
        self.model_id = loaded.sha256
        self.times = StageTimes()
        self.skipped: list[tuple[str, str]] = []
        self.device_decoder = None  # the last run's DeviceDecoder, when it decoded on the device

    @property
    def name(self) -> str:
        return self.loaded.name

    # -- tensors -------------------------------------------------------------------------------

    def _forward(self, crops_uint8, groups: list[int] | None = None) -> list[float]:
        """Raw scores of a uint8 Nx3xHxW batch (``groups``: each image's crop count in it)."""
        import torch

        from loda_cli.transforms import normalize

        t0 = time.perf_counter()
        batch = torch.from_numpy(crops_uint8) if not isinstance(crops_uint8, torch.Tensor) else crops_uint8
        batch = batch.to(self.device, non_blocking=True)
        batch = normalize(batch, self.preprocess).contiguous(memory_format=torch.channels_last)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        raw = self.runner(batch, groups).cpu().tolist()
        t2 = time.perf_counter()
        self.times.h2d += t1 - t0
        self.times.forward += t2 - t1
        self.times.crops += len(raw)
        return raw

    def _scores_of(self, raw):
        """Calibrated scores of a tensor of raw scores (for the precision measurement)."""
        import torch

        return torch.tensor([self.loaded.calibration.to_score(float(r)) for r in raw.float().cpu()])

    # -- files ---------------------------------------------------------------------------------

    def score_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        recursive: bool = True,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        shard: tuple[int, int] = (0, 1),
        on_skip: Callable[[str, str], None] | None = None,
        split=None,
        cache_pass: bool = True,
    ) -> Iterator[ScoreRow]:
        """Score every image file under ``paths``; rows come in completion order.

        With the cache on, this process walks the paths and asks the cache first: the cached
        rows come out at once, and the workers get only the files left to decode. ``split``: that
        pass done already (:meth:`split_by_cache`, the same paths and options), not done twice;
        its ``done`` items are consumed. ``cache_pass=False``: no pass (the workers walk and ask
        the cache), as where :meth:`split_by_cache` found it not worth making.

        Closing the generator early (Ctrl-C, ``break``) keeps everything finished so far in the
        cache.
        """
        import numpy as np

        spec = self.scan_spec(paths, recursive=recursive, include=include, exclude=exclude, shard=shard)
        prep_id = spec.prep_id
        batcher = _CropBatcher(self.batch_size, self._forward, whole_images=self.runner.per_image)
        on_device = None
        if self.device_decode:
            from loda_cli.devicedecode import DeviceDecoder, cpu_path

            on_device = DeviceDecoder(self.device, self.preprocess, self.groups, cpu_path(spec, prepare_item),
                                      decode_target(self.preprocess))
            self.device_decoder = on_device  # its counts: decoded, fallbacks

        def ready(item: dict[str, Any]) -> Iterator[ScoreRow]:
            self.times.decode += item.get("t_decode", 0.0)
            self.times.crop += item.get("t_crop", 0.0)
            self.times.look += item.get("t_look", 0.0)
            if item.get("scored"):  # a CPU scoring worker ran the model already
                self.times.decoded += 1
                self.times.crops += item["scored"]
                self.times.forward += item["t_forward"]
                yield self._finish(item, item["raw"], writer, prep_id, item["crop_raws"])
                return
            crops = item.get("crops")
            if crops is None:
                yield self._finish(item, item.get("raw"), writer, prep_id, item.get("crop_raws"))
                return
            self.times.decoded += 1
            if not hasattr(crops, "device"):  # a tensor on the device stays there
                item["crops"] = np.asarray(crops)
            item["weights"] = crop_weights(self.preprocess, len(crops))
            batcher.add(item)
            for done, raw, crop_raws in batcher.run():
                yield self._finish(done, raw, writer, prep_id, crop_raws)

        writer = ScoreCache(self.cache_path) if self.cache_path else None  # creates the schema
        try:
            if writer is None or (split is None and not cache_pass):
                split = None
            elif split is None or not split.answers(spec):
                split = split_by_cache(spec, writer)  # the writer reads the schema it migrated
            if split is not None:
                spec.pending = split.pending
            loader = self._prepared_items(spec) if split is None or split.pending else ()
            if split is not None:
                for path, reason in split.skipped:
                    self.skipped.append((path, reason))
                    if on_skip is not None:
                        on_skip(path, reason)
                for item in split.take_done():
                    yield self._finish(item, item.get("raw"), writer, prep_id, item.get("crop_raws"))
            for item in loader:
                if "skip" in item:
                    self.skipped.append((item["skip"], item["reason"]))
                    if on_skip is not None:
                        on_skip(item["skip"], item["reason"])
                    continue
                if "jpeg" in item:
                    for decoded in on_device.add(item):
                        yield from ready(decoded)
                    continue
                yield from ready(item)
            if on_device is not None:
                for decoded in on_device.flush():
                    yield from ready(decoded)
            for done, raw, crop_raws in batcher.run(final=True):
                yield self._finish(done, raw, writer, prep_id, crop_raws)
        finally:
            if writer is not None:
                writer.close()

    def scan_spec(self, paths, *, recursive: bool = True, include: Iterable[str] = (),
                  exclude: Iterable[str] = (), shard: tuple[int, int] = (0, 1)) -> ScanSpec:
        """What the walk over ``paths`` and each file's preparation need (:class:`ScanSpec`)."""
        shard_k, shard_n = shard
        if not (0 <= shard_k < shard_n):
            raise UsageError(f"invalid shard {shard_k}/{shard_n}")
        return ScanSpec(
            paths=[os.fspath(Path(p).expanduser()) for p in paths],
            recursive=recursive, include=tuple(include), exclude=tuple(exclude), shard=shard,
            preprocess=self.preprocess, model_id=self.model_id, cache_path=self.cache_path,
            decode_timeout=self.decode_timeout, groups=self.groups, device_decode=self.device_decode,
            runner=self.runner if self.score_in_workers else None,
        )

    def split_by_cache(self, paths, *, recursive: bool = True, include: Iterable[str] = (),
                       exclude: Iterable[str] = (), shard: tuple[int, int] = (0, 1)):
        """The files under ``paths`` split by the score cache (:class:`CacheSplit`), for
        :meth:`score_files`; None without a cache or where the pass is not worth it
        (:func:`split_by_cache`). Opens the cache as a writer, which brings an older schema up
        to date first."""
        if not self.cache_path:
            return None
        with ScoreCache(self.cache_path) as cache:
            return split_by_cache(self.scan_spec(paths, recursive=recursive, include=include, exclude=exclude,
                                                 shard=shard), cache)

    def _prepared_items(self, spec: ScanSpec) -> Iterable[dict[str, Any]]:
        """Decoded, cropped (or cached) items: from worker processes, or this one with 0 workers."""
        if self.workers <= 0:
            return iter_prepared(spec)
        import inspect

        from torch.utils.data import DataLoader

        extra: dict[str, Any] = {}
        if spec.runner is not None:
            # Forked, so the workers inherit the prepared model; each item is ready when its
            # worker is, in any order (torch >= 2.6), so one large photo holds up no other worker.
            extra["multiprocessing_context"] = "fork"
            if "in_order" in inspect.signature(DataLoader.__init__).parameters:
                extra["in_order"] = False
        return DataLoader(
            _make_dataset(spec), batch_size=None, num_workers=self.workers,
            collate_fn=_passthrough, pin_memory=self.device.startswith("cuda"), worker_init_fn=_worker_init,
            prefetch_factor=4, persistent_workers=False, **extra,
        )

    def _finish(self, item: dict[str, Any], raw: float | None, writer, prep_id: str, crop_raws=None) -> ScoreRow:
        """The row of a finished item, counted and stored in the cache. ``crop_raws``: each
        crop's raw score, [[x, y, w, h, raw], ...] from the cache, or plain raws, in the order of
        the item's ``boxes``, when just scored."""
        from loda_cli.cache import CachedResult

        row, placed = finished_row(item, raw, self.loaded.calibration, crop_raws)
        self.times.images += 1
        self.times.cached += row.cached
        self.times.failed += row.error is not None
        stale = not row.cached or item.get("refresh")
        if writer is not None and stale and "key" in item and not item.get("transient"):
            writer.put(
                item["key"], self.model_id, prep_id,
                CachedResult(row.raw, row.width, row.height, row.format, row.error,
                             row.look, row.taken, row.camera, placed),
            )
        return row

    def score_image(self, image) -> float:
        """Score one in-memory PIL image (no cache); returns the calibrated score in [0, 1]."""
        crops = scoring_crops(image.convert("RGB"), self.preprocess)
        raws = self._forward(crops)
        weights = crop_weights(self.preprocess, len(raws))
        return self.loaded.calibration.to_score(float(sum(r * w for r, w in zip(raws, weights))))


def finished_row(item: dict[str, Any], raw: float | None, calibration, crop_raws=None) -> tuple[ScoreRow, list[list[float]] | None]:
    """A finished item's row, and its crops' raw scores where they lie (what the cache keeps).
    ``crop_raws`` as for :meth:`Scorer._finish`."""
    row = ScoreRow(
        path=item["path"], root=item["root"], raw=raw, width=item.get("width"),
        height=item.get("height"), format=item.get("format"), error=item.get("error"),
        warnings=item.get("warnings") or [], cached=bool(item.get("cached")), index=item["index"],
        taken=item.get("taken"), camera=item.get("camera"), look=item.get("look"),
    )
    if raw is not None and row.error is None:
        if not math.isfinite(raw):
            row.error, row.raw = "model produced a non-finite score", None
        else:
            row.score = calibration.to_score(raw)
            row.mos = calibration.to_mos(raw)
    placed = crop_boxes(item.get("boxes"), crop_raws, row.width, row.height)
    if placed is not None and row.ok:
        row.crops = [[*box[:4], round(calibration.to_score(box[4]), 4)] for box in placed if math.isfinite(box[4])]
    return row, placed


def crop_boxes(boxes, crop_raws, width: int | None, height: int | None) -> list[list[float]] | None:
    """Each crop's raw score where it lies, ``[[x, y, w, h, raw], ...]`` in displayed-image pixels:
    from fractional ``boxes`` and plain raws (just scored), or as the cache kept them (boxes
    None). None when unknown.

    A raw just scored is rounded to :data:`~loda_cli.cache.CROP_RAW_DIGITS` digits, as the cache
    keeps it, so that a crop's score is the same in the first run and in every cached rerun
    (rounded twice, the full raw and the kept one could land either side of a 4th digit)."""
    if not crop_raws:
        return None
    if boxes is None:
        return [list(box) for box in crop_raws if isinstance(box, (list, tuple)) and len(box) == 5]
    if not width or not height or len(boxes) != len(crop_raws):
        return None
    return [
        [round(x * width), round(y * height), round(w * width), round(h * height), round(float(raw), CROP_RAW_DIGITS)]
        for (x, y, w, h), raw in zip(boxes, crop_raws)
    ]


def score_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    model: Any = None,
    recursive: bool = True,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    progress: Callable[[ScoreRow], None] | None = None,
    **scorer_kw: Any,
) -> Iterator[ScoreRow]:
    """Score image files with a model (default: the best available; see ``loda weights list``).

    ``progress``, when given, is called with each row as it completes.
    """
    scorer = Scorer(model, **scorer_kw)
    for row in scorer.score_files(paths, recursive=recursive, include=include, exclude=exclude):
        if progress is not None:
            progress(row)
        yield row
