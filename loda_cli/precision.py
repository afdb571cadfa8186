"""The scorer's numeric precision, chosen by measurement where the hardware leaves it open.

Which precision is fastest depends on the CPU more than on its flags: ``avx512_bf16`` without
AMX runs bf16 matrix work *slower* than fp32 on some CPUs and faster on others, and int8 Linear
layers pay off only where the transformer dominates. So on the CPU, ``--precision auto`` times a
few crops of the loaded model in each candidate precision once, keeps the candidates whose
scores agree with fp32 (max |Δscore| ≤ :data:`AGREEMENT`), and takes the fastest. The choice is
cached in ``$LODA_HOME/precision.json``, keyed by the CPU, torch, the thread count, the model and
the crop size, so later runs pay nothing. On CUDA and MPS a fixed rule stays (bf16 where
supported, else fp16): there the half-precision paths are the hardware's own.

A :class:`Runner` is the model prepared for one precision; the scorer calls it on normalized
fp32 batches and gets raw scores back.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from loda_cli.atomic import exclusive_lock
from loda_cli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
CPU_CANDIDATES = ("fp32", "bf16", "fp16", "int8")
AGREEMENT = 0.005  # the largest |Δscore| against fp32 a candidate may show on the probe crops
MIN_GAIN = 1.05  # a lossy candidate must beat fp32 by 5% to be worth its error
BUDGET_S = 3.0  # the measurement's target length on the first run
BUSY_SHARE = 0.25  # other work's share of the CPU while timing above which the choice is provisional
PROVISIONAL_S = 600.0  # how long a provisional choice serves the runs that start after it
CACHE_VERSION = 5  # 2: bf16/fp16 keep the CNN's first stages fp32; 3: warmed, interleaved timing;
# 4: timed with freed memory held (allocator.py), so page faults no longer weigh on the CNN;
# 5: the extractor pools before its 3x3 convolution (model.stage_tokens), a quarter less work


# ---------------------------------------------------------------------------------------------
# Machine facts


def cpu_description() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (empty where there is none)."""
    import platform

    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


def cpu_flag_note(precision: str, flags: frozenset[str]) -> str | None:
    """Why ``precision`` is not worth trying on a CPU with ``flags`` (None: try it)."""
    import torch

    if precision == "bf16" and not flags & {"avx512_bf16", "amx_bf16"}:
        return "no native bf16 (avx512_bf16/amx_bf16)"
    if precision == "fp16" and not flags & {"avx512_fp16", "amx_fp16"}:
        return "no native fp16 (avx512_fp16/amx_fp16)"
    if precision == "int8" and "x86" not in torch.backends.quantized.supported_engines \
            and "fbgemm" not in torch.backends.quantized.supported_engines:
        return "no x86/fbgemm quantized engine in this torch"
    return None


def static_precision(device: str) -> str:
    """The rule where nothing is measured: half precision on accelerators, fp32 on the CPU."""
    import torch

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "mps":
        return "fp16"
    return "fp32"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    return precision


# ---------------------------------------------------------------------------------------------
# The model prepared for one precision


class Runner:
    """A model ready to score in one precision: ``runner(batch)`` takes a normalized fp32
    Nx3xHxW batch on the device and returns raw scores as a float tensor of N."""

    def __init__(self, model, precision: str, device: str, *, own: bool = False):
        """``own``: the model may be changed in place (else it is copied where a precision
        changes weights, so the caller's fp32 model stays as it was)."""
        import torch

        self.precision, self.device = precision, device
        self.input_dtype = torch.float32
        self.autocast_dtype = None
        self.cnn_dtype = None  # LoDa's CNN under autocast while the rest has half weights
        # Dynamic quantization scales each Linear's whole input by one factor, so under int8 a
        # crop's result depended on the crops batched with it: a photo's score changed with the
        # photos scored beside it (the built-in model's crop scores by up to 0.05, its photo
        # scores by up to 0.0012; 16 LIVE photos in two batch orders). Run one image at a time,
        # its result depends on that image alone; the scorer batches whole images for it.
        self.per_image = precision == "int8"
        self.model = model
        if getattr(model, "cnn_frozen", False) and getattr(model, "cnn", None) is not None:
            # The frozen CNN's BatchNorms are folded into its convolutions (see fold_batchnorm).
            # The folded CNN is a copy, so the caller's model keeps its own.
            cnn = _fold_checked(model.cnn)
            if cnn is not model.cnn:
                if not own:
                    held, model.cnn = model.cnn, None  # not copied twice
                    try:
                        self.model = copy.deepcopy(model)
                    finally:
                        model.cnn = held
                self.model.cnn = cnn
                model, own = self.model, True
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if device == "cpu" and half is not None:
            # On the CPU the transformer runs with half-precision weights rather than under
            # autocast: autocast re-casts every weight on every batch (no cast cache in inference
            # mode), which measured 67 ms a crop against 53 ms for bf16 weights (ViT-B +
            # ResNet-50, 2 cores). LoDa's CNN is the exception: it keeps fp32 weights and runs
            # under autocast, because its features with bf16 weights moved the built-in model's
            # scores by up to 0.02 from fp32, under autocast by 0.0145 (60 images).
            # The CNN's layers up to its first feature map (stem and first stages, on the raw
            # pixels) stay fp32 even then: with them in bf16 the built-in model moved by up to
            # 0.018, with them in fp32 by 0.0046 (40 crops), and they are a small share of its work.
            self.model = model if own else copy.deepcopy(model)
            cnn = self.model.cnn if hasattr(self.model, "forward_cnn") else None
            if cnn is not None:
                self.model.cnn = None  # detached while the rest is cast, so it stays fp32
            self.model.to(half)
            if cnn is not None:
                keep_early_layers_fp32(cnn)
                self.model.cnn = cnn
                self.cnn_dtype = half
            self.input_dtype = half
        elif precision == "int8":
            if device != "cpu":
                raise UsageError("--precision int8 runs on the CPU only")
            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():
                # torch points eager-mode users at torchao; this is the maintained path that
                # installs with torch itself.
                warnings.simplefilter("ignore")
                self.model = quantize_dynamic(model if own else copy.deepcopy(model), {torch.nn.Linear},
                                              dtype=torch.qint8)
        elif half is not None:
            self.autocast_dtype = half
            if hasattr(self.model, "forward_cnn") and getattr(self.model, "cnn", None) is not None:
                # As on the CPU, the CNN's layers up to its first feature map stay fp32 under
                # autocast: in half precision they moved the built-in model's scores by up to
                # 0.018 on the CPU. Not yet measured on a GPU (scripts/precision_agreement.py,
                # run by scripts/device_check.sh, measures it).
                if not own:
                    self.model = copy.deepcopy(model)
                keep_early_layers_fp32(self.model.cnn)
        if device != "mps" and hasattr(self.model, "cnn"):
            # oneDNN (CPU) and cuDNN run the CNN's convolutions fastest in channels-last layout.
            self.model.cnn.to(memory_format=torch.channels_last)
        self.model.eval()

    def __call__(self, batch, groups: Sequence[int] | None = None):
        """Raw scores of ``batch``; ``groups``: the crop counts of the images in it, in order
        (with :attr:`per_image`, each image runs on its own)."""
        import torch

        if self.per_image and groups is not None and len(groups) > 1:
            return torch.cat([self(part) for part in batch.split(list(groups))])
        with torch.inference_mode():
            if self.cnn_dtype is not None:
                with torch.autocast("cpu", dtype=self.cnn_dtype):
                    features = self.model.forward_cnn(batch)
                features = [f.to(self.input_dtype) for f in features]
                return self.model(batch.to(self.input_dtype), cnn_features=features).float().flatten()
            context = (torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)
                       if self.autocast_dtype is not None else contextlib.nullcontext())
            with context:
                return self.model(batch.to(self.input_dtype)).float().flatten()


def fold_batchnorm(module) -> int:
    """Fold every inference-mode BatchNorm that directly follows a convolution among its parent's
    children into that convolution's weights (``torch.nn.utils.fusion.fuse_conv_bn_eval``), in
    place. The BatchNorm becomes what remains of it: nothing, or timm's activation after it
    (``BatchNormAct2d``). Returns how many were folded.

    Only for a frozen module in eval mode: the folded statistics no longer update. On a 2-core
    AVX-512 CPU the built-in model's EfficientNet-Lite0 ran 16-17 ms a crop before and 9.5 after:
    a depthwise network spends much of its time passing activations through separate BatchNorm
    layers. Children are taken in definition order, which is the order timm's blocks run them;
    :class:`Runner` checks the result numerically and keeps the unfolded CNN if it differs."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        BatchNormAct2d = ()
    folded = 0
    for parent in list(module.modules()):
        previous = None
        for name, child in list(parent.named_children()):
            plain = type(child) is torch.nn.BatchNorm2d
            with_act = bool(BatchNormAct2d) and type(child) is BatchNormAct2d
            if (plain or with_act) and previous is not None and not child.training \
                    and child.running_mean is not None and child.num_features == previous[2].out_channels:
                owner, conv_name, conv = previous
                setattr(owner, conv_name, fuse_conv_bn_eval(conv, child))
                rest = torch.nn.Identity() if plain else torch.nn.Sequential(
                    getattr(child, "drop", torch.nn.Identity()), getattr(child, "act", torch.nn.Identity()))
                setattr(parent, name, rest)
                folded += 1
                previous = None
                continue
            previous = _last_conv(parent, name, child)
    return folded


def _last_conv(owner, name: str, child):
    """(owner, name, conv) when ``child`` is a convolution or a Sequential whose last step is one
    (a deep stem, as in ResNet-D), else None."""
    import torch

    while type(child) is torch.nn.Sequential and len(child):
        owner, name, child = child, str(len(child) - 1), child[-1]
    if type(child) is torch.nn.Conv2d and not child.training:
        return owner, name, child
    return None


def _fold_checked(cnn):
    """``cnn`` with its BatchNorms folded (a copy), or ``cnn`` itself where folding changed its
    features beyond rounding or found nothing to fold."""
    import torch

    folded = copy.deepcopy(cnn).eval()
    if not fold_batchnorm(folded):
        return cnn
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    param = next(cnn.parameters(), None)
    if param is not None:
        probe = probe.to(param.device)
    was_training = cnn.training
    try:
        with torch.inference_mode():
            want, got = cnn.eval()(probe), folded(probe)
    finally:
        cnn.train(was_training)
    want = want if isinstance(want, (list, tuple)) else [want]
    got = got if isinstance(got, (list, tuple)) else [got]
    if len(want) != len(got):
        return cnn
    for a, b in zip(want, got):
        if a.shape != b.shape or float((a - b).abs().max()) > 1e-3 * max(1.0, float(a.abs().max())):
            return cnn
    return folded


def _fp32_module():
    import torch

    class Fp32(torch.nn.Module):
        """Runs the module it wraps in fp32 with autocast off, whatever the caller runs under."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast(x.device.type, enabled=False):
                return self.inner(x.float())

    return Fp32


def keep_early_layers_fp32(cnn) -> list[str]:
    """Wrap ``cnn``'s modules up to and including the one that makes its first feature map
    (timm's ``feature_info``) so that they run in fp32 under autocast. Returns their names; a
    CNN without ``feature_info`` is left as it is."""
    info = getattr(cnn, "feature_info", None)
    if info is None:
        return []
    top, _, sub = info.module_name()[0].partition(".")  # "blocks.1" (EfficientNet), "layer1" (ResNet)
    wrap = _fp32_module()
    wrapped: list[str] = []
    for name, child in list(cnn.named_children()):
        if name != top or not sub:
            setattr(cnn, name, wrap(child))
            wrapped.append(name)
            if name == top:
                return wrapped
            continue
        for inner, grandchild in list(child.named_children()):
            setattr(child, inner, wrap(grandchild))
            wrapped.append(f"{name}.{inner}")
            if inner == sub:
                return wrapped
    return wrapped


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Trial:
    """One candidate's measurement: ms per crop, and the largest score difference from fp32."""

    precision: str
    ms_per_crop: float | None = None
    max_delta: float | None = None
    skipped: str | None = None  # why it was not measured or not eligible

    @property
    def agrees(self) -> bool:
        return self.skipped is None and self.max_delta is not None and self.max_delta <= AGREEMENT

    def describe(self) -> str:
        if self.ms_per_crop is None:
            return f"{self.precision} skipped ({self.skipped})"
        text = f"{self.precision} {self.ms_per_crop:.0f} ms/crop"
        if self.precision != "fp32" and self.max_delta is not None:
            text += f", max |Δscore| {self.max_delta:.4f}"
            if self.max_delta > AGREEMENT:
                text += f" > {AGREEMENT} (disagrees)"
        return text


@dataclass
class PrecisionChoice:
    """What the scorer runs in, and why: ``how`` is "forced", "rule", "measured" or "cached"."""

    precision: str
    how: str
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0  # the measurement's length (0 when cached)
    busy: float | None = None  # other work's share of the CPU while timing (None: unknown)

    def describe(self) -> str:
        if self.how == "forced":
            return f"{self.precision} (asked for)"
        if self.how == "rule":
            return f"{self.precision} (auto: the device's native half precision)" if self.precision != "fp32" \
                else f"{self.precision} (auto)"
        table = "; ".join(t.describe() for t in self.trials)
        when = "measured now" if self.how == "measured" else "measured earlier on this machine"
        text = f"{self.precision} (auto, {when}: {table})"
        if self.how == "measured" and self.busy is not None and self.busy > BUSY_SHARE:
            text += (f"; kept for {PROVISIONAL_S / 60:.0f} minutes only: other work used {100 * self.busy:.0f}% "
                     "of the CPU while timing, so a later run measures again")
        return text

    @property
    def measured(self) -> bool:
        """Chosen by a measurement (now or cached), so there is a table to show."""
        return self.how in ("measured", "cached")

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "how": self.how, "seconds": round(self.seconds, 3),
                "trials": [asdict(t) for t in self.trials]}


def pick(trials: Sequence[Trial]) -> str:
    """The fastest candidate that agrees with fp32; fp32 unless one is clearly faster."""
    base = next((t for t in trials if t.precision == "fp32" and t.ms_per_crop), None)
    if base is None:
        return "fp32"
    best = min((t for t in trials if t.precision != "fp32" and t.agrees and t.ms_per_crop),
               key=lambda t: t.ms_per_crop, default=None)
    if best is not None and best.ms_per_crop * MIN_GAIN <= base.ms_per_crop:
        return best.precision
    return "fp32"


def probe_crops(n: int, size: int, seed: int = 0):
    """``n`` deterministic photo-like uint8 crops (smooth shading, edges, grain), 3 x size x size."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(30, 225, (6, 6, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, r = (int(v) for v in rng.integers(0, size, 3))
            draw.ellipse((x - r // 2, y - r // 2, x + r // 2, y + r // 2),
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        arr = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
        out.append(np.clip(arr, 0, 255).astype(np.uint8).transpose(2, 0, 1))
    return np.stack(out)


ROUNDS = 3  # timed runs of each candidate, interleaved; each keeps its fastest
MAX_PROBE_CROPS = 16


def _run_ms(runner: Runner, batch) -> float:
    t0 = time.perf_counter()
    runner(batch)
    return (time.perf_counter() - t0) * 1000 / len(batch)


def measure(model, preprocess, to_score: Callable[[Any], Any], *, device: str = "cpu",
            candidates: Sequence[str] = CPU_CANDIDATES, budget_s: float = BUDGET_S,
            flags: frozenset[str] | None = None, prepare: Callable[..., Runner] = Runner,
            rounds: int = ROUNDS) -> list[Trial]:
    """Time ``model`` on a few probe crops in each candidate precision and compare its scores
    (``to_score`` maps a raw tensor to scores) with fp32's. A candidate that fails is skipped.

    Each candidate first runs the whole probe batch untimed: the first run of a batch shape pays
    for kernel selection and allocation (oneDNN primitives, the quantized Linear's packing),
    which a one-crop warm-up does not cover and which made two candidates 15% apart look tied.
    Then the candidates are timed in ``rounds`` interleaved rounds and each keeps its fastest, so
    a hiccup of the machine or a neighbour's burst does not decide the choice."""
    import torch

    from loda_cli.transforms import normalize

    flags = cpu_description()[1] if flags is None else flags
    size = preprocess.crop_size

    def prepared(crops):
        batch = normalize(torch.from_numpy(crops).to(device), preprocess)
        return batch.contiguous(memory_format=torch.channels_last)

    base = prepare(model, "fp32", device)
    one = prepared(probe_crops(1, size))
    base(one)  # one-time set-up, untimed
    single = _run_ms(base, one) / 1000
    # As many crops as fit the budget over the candidates this CPU can run (a warm-up and the
    # timed rounds each), 2 to 16 (the scorer's CPU batch): on a 2-core CPU, 8-crop rounds of the
    # built-in model (~0.1 s) still let a momentary slowdown swap two candidates 15% apart.
    notes = {c: cpu_flag_note(c, flags) if device == "cpu" and c != "fp32" else None for c in candidates}
    runnable = sum(note is None for note in notes.values())
    n = int(max(2, min(MAX_PROBE_CROPS, budget_s / max(1e-6, (1 + rounds) * single * max(1, runnable)))))
    batch = prepared(probe_crops(n, size))
    raw32 = base(batch)
    reference = to_score(raw32)
    runners: dict[str, Runner] = {"fp32": base}
    trials: dict[str, Trial] = {"fp32": Trial("fp32", None, 0.0)}
    for precision in candidates:
        if precision == "fp32":
            continue
        note = notes[precision]
        if note is not None:
            trials[precision] = Trial(precision, skipped=note)
            continue
        try:
            runner = prepare(model, precision, device)
            delta = float((to_score(runner(batch)) - reference).abs().max())
        except Exception as exc:  # a candidate this torch or CPU cannot run is not fatal
            trials[precision] = Trial(precision, skipped=f"failed: {type(exc).__name__}: {exc}"[:160])
            continue
        runners[precision] = runner
        trials[precision] = Trial(precision, None, delta)
    best: dict[str, float] = {}
    for _ in range(max(1, rounds)):
        for precision, runner in list(runners.items()):
            try:
                ms = _run_ms(runner, batch)
            except Exception as exc:  # pragma: no cover - it ran once already
                trials[precision] = Trial(precision, skipped=f"failed: {type(exc).__name__}: {exc}"[:160])
                del runners[precision]
                continue
            best[precision] = min(ms, best.get(precision, ms))
    for precision, ms in best.items():
        if trials[precision].skipped is None:
            trials[precision].ms_per_crop = ms
    return list(trials.values())  # fp32 first, then the candidates in their order


# ---------------------------------------------------------------------------------------------
# The cache


def cache_path() -> Path:
    from loda_cli.home import loda_home

    return loda_home() / "precision.json"


def cache_key(*, model_id: str, architecture: dict[str, Any], crop_size: int, device: str) -> tuple[str, dict]:
    """The measurement's key (a hash) and what it hashes: CPU model and flags, torch version,
    thread count, device, the model and its architecture, and the crop size."""
    import torch

    name, flags = cpu_description()
    facts = {
        "cpu": name, "flags": sorted(flags), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": device, "model": model_id, "architecture": architecture, "crop_size": crop_size,
        "version": CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return digest, facts


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt: measured again and rewritten
    return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {}


def cached_choice(key: str, path: Path | None = None) -> PrecisionChoice | None:
    entry = _read(path or cache_path()).get("entries", {}).get(key)
    try:
        trials = [Trial(**t) for t in entry["trials"]]
        precision = entry["precision"]
        if time.time() > float(entry.get("provisional_until", "inf")):
            return None  # timed on a busy machine, and its while is over: measure again
    except (TypeError, KeyError, ValueError):
        return None
    if precision not in CPU_CANDIDATES:
        return None
    return PrecisionChoice(precision, "cached", trials)


def _write_entry(path: Path, key: str, facts: dict[str, Any], choice: PrecisionChoice) -> None:
    """Add one entry, keeping the others, by an atomic replace (the caller holds the lock)."""
    import tempfile

    data = _read(path) or {"version": CACHE_VERSION, "entries": {}}
    entry = {**choice.as_dict(), "facts": facts, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if choice.busy is not None and choice.busy > BUSY_SHARE:
        entry["provisional_until"] = time.time() + PROVISIONAL_S
    data["entries"][key] = entry
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store_choice(key: str, facts: dict[str, Any], choice: PrecisionChoice, path: Path | None = None) -> None:
    """Add one entry under the lock, so two processes storing at once both land."""
    path = path or cache_path()
    with exclusive_lock(path):
        _write_entry(path, key, facts, choice)


def _cpu_counters() -> tuple[float, int] | None:
    """(CPU seconds every process has used since boot, the number of CPUs) from ``/proc/stat``;
    None where there is no such file."""
    try:
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
        fields = lines[0].split()
        if fields[0] != "cpu":
            return None
        ticks = [int(v) for v in fields[1:9]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait is work, a
        # hypervisor's steal included (a neighbour on the host slows the timing as much).
        busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
        cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
        return busy / os.sysconf("SC_CLK_TCK"), max(1, cpus)
    except (OSError, ValueError, IndexError):
        return None


def contention_watch(counters: Callable[[], tuple[float, int] | None] = _cpu_counters) -> Callable[[], float | None]:
    """Start watching the machine; the returned function gives the share of its CPU that other
    work (not this process) used since, or None where that cannot be read."""
    start, own0, t0 = counters(), time.process_time(), time.perf_counter()

    def share() -> float | None:
        end = counters()
        if start is None or end is None:
            return None
        wall = time.perf_counter() - t0
        others = (end[0] - start[0]) - (time.process_time() - own0)
        return max(0.0, others) / max(1e-6, wall * end[1])

    return share


def choose(precision: str, device: str, *, model=None, preprocess=None, to_score=None, model_id: str = "",
           architecture: dict[str, Any] | None = None, on_measure: Callable[[], None] | None = None,
           path: Path | None = None, measurer: Callable[..., list[Trial]] | None = None,
           watch: Callable[[], Callable[[], float | None]] | None = None) -> PrecisionChoice:
    """Resolve ``precision`` for ``device``: an explicit value is kept; ``auto`` follows the rule
    on accelerators and, on the CPU, the cached or a new measurement of ``model``. A measurement
    taken while other work used more than :data:`BUSY_SHARE` of the CPU is kept for
    :data:`PROVISIONAL_S` only: runs started alongside still share it (two runs on one machine do
    not score in two precisions), but timings made under someone else's load do not decide every
    later run."""
    check_precision(precision)
    if precision != "auto":
        if precision == "int8" and device != "cpu":
            raise UsageError("--precision int8 runs on the CPU only")
        return PrecisionChoice(precision, "forced")
    if device != "cpu" or model is None:
        return PrecisionChoice(static_precision(device), "rule")
    key, facts = cache_key(model_id=model_id, architecture=architecture or {}, crop_size=preprocess.crop_size,
                           device=device)
    path = path or cache_path()
    # Under the lock, a second process starting at the same moment waits for this measurement and
    # reads its result: two runs on one machine never score in two precisions.
    with exclusive_lock(path):
        found = cached_choice(key, path)
        if found is not None:
            return found
        if on_measure is not None:
            on_measure()
        t0 = time.perf_counter()
        busy = (watch or contention_watch)()
        trials = (measurer or measure)(model, preprocess, to_score, device=device)
        choice = PrecisionChoice(pick(trials), "measured", trials, time.perf_counter() - t0, busy())
        with contextlib.suppress(OSError):  # an unwritable home only costs a re-measure next time
            _write_entry(path, key, facts, choice)
    return choice
