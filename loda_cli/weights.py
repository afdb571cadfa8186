"""Checkpoints: the safetensors format, its metadata, calibration, and resolving ``--model``.

A loda checkpoint is one ``.safetensors`` file. Loading it runs no pickle. Its metadata header
holds a single key, ``"loda"``, whose value is a JSON document (see :func:`build_metadata`).

* ``kind: "adapters"``: the trained tensors only (extractor, injectors, scale, head) plus the CNN's
  BatchNorm statistics; the backbones come from timm's pretrained weights, named in the metadata.
* ``kind: "full"``: every tensor, for models whose backbones were trained or are not pretrained.

torch is imported inside the functions that need it, so reading metadata and listing checkpoints
stays cheap.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loda_cli import __version__
from loda_cli.atomic import replacing
from loda_cli.config import LoDaConfig, Preprocess
from loda_cli.errors import CheckpointError, ModelNotFoundError, StateDictMismatchError, UsageError
from loda_cli.home import checkpoints_dir

if TYPE_CHECKING:
    from loda_cli.model import LoDa

FORMAT_NAME = "loda-checkpoint"
# Version 2 added the preprocessing's detail view; a checkpoint without one is still written as
# version 1, so older loda versions keep reading it.
FORMAT_VERSION = 2
CHECKPOINT_SUFFIX = ".safetensors"
BUILTIN_NAME = "loda-builtin"


# ---------------------------------------------------------------------------------------------
# Locations


def weights_dir() -> Path:
    """The folder of the manifest and the built-in model: ``$LODA_WEIGHTS_DIR``, else the
    repository's ``weights/`` (a checkout or an editable install), else the copy a non-editable
    install puts in ``<prefix>/share/loda/weights``."""
    override = os.environ.get("LODA_WEIGHTS_DIR")
    if override:
        return Path(override).expanduser()
    repository = Path(__file__).resolve().parent.parent / "weights"
    if (repository / "manifest.json").is_file():
        return repository
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        installed = Path(prefix) / "share" / "loda" / "weights"
        if (installed / "manifest.json").is_file():
            return installed
    return repository


# ---------------------------------------------------------------------------------------------
# Calibration: raw cosine -> label scale -> score in [0, 1]


@dataclass
class Calibration:
    """A monotonic map from the raw output to the dataset's label scale, and from there to [0, 1].

    ``method`` is ``"logistic4"`` (the VQEG 4-parameter logistic, fitted on training predictions),
    ``"linear"`` (its fallback), or ``"none"`` (no fit available: the raw cosine is mapped
    linearly onto the label scale). ``score`` normalises the label scale to [0, 1] and flips it for
    lower-is-better labels such as LIVE's DMOS, so a higher score always means better quality.
    """

    method: str = "none"
    params: list[float] = field(default_factory=list)
    label_min: float = 0.0
    label_max: float = 1.0
    lower_better: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("logistic4", "linear", "none"):
            raise CheckpointError(f"unknown calibration method {self.method!r}")
        if not self.label_max > self.label_min:
            raise CheckpointError("calibration label range is empty")

    def to_mos(self, raw: float) -> float:
        """The prediction on the training dataset's native scale."""
        if self.method == "logistic4":
            b1, b2, b3, b4 = self.params
            z = -(raw - b3) / (abs(b4) or 1e-12)
            z = max(min(z, 700.0), -700.0)
            return b2 + (b1 - b2) / (1.0 + math.exp(z))
        if self.method == "linear":
            slope, intercept = self.params
            return slope * raw + intercept
        quality = (raw + 1.0) / 2.0
        if self.lower_better:
            quality = 1.0 - quality
        return self.label_min + quality * (self.label_max - self.label_min)

    def to_score(self, raw: float) -> float:
        """Quality in [0, 1], higher is better."""
        unit = (self.to_mos(raw) - self.label_min) / (self.label_max - self.label_min)
        if self.lower_better:
            unit = 1.0 - unit
        return min(1.0, max(0.0, unit))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": [float(p) for p in self.params],
            "label_min": self.label_min,
            "label_max": self.label_max,
            "lower_better": self.lower_better,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        try:
            return cls(
                method=d["method"],
                params=[float(p) for p in d.get("params", [])],
                label_min=float(d["label_min"]),
                label_max=float(d["label_max"]),
                lower_better=bool(d.get("lower_better", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed calibration in checkpoint metadata: {exc}") from exc

    @classmethod
    def fit(
        cls, raw: list[float], labels: list[float], label_min: float, label_max: float, lower_better: bool
    ) -> Calibration:
        """Fit raw predictions to training labels with the VQEG logistic (linear fallback)."""
        import warnings

        from loda_cli.metrics import fit_logistic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit_logistic(raw, labels)
        return cls(result.method, [float(p) for p in result.params], label_min, label_max, lower_better)


# ---------------------------------------------------------------------------------------------
# Metadata


def build_metadata(
    model: LoDa,
    *,
    name: str,
    kind: str,
    calibration: Calibration,
    preprocess: Preprocess,
    dataset: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if preprocess.has_detail_view else 1,
        "name": name,
        "description": description,
        "kind": kind,
        "config": model.config.to_dict(),
        "backbones": {
            "vit": model.config.vit,
            "cnn": model.config.cnn,
            "pretrained": bool(model.pretrained),
        },
        "dataset": dataset or {},
        "calibration": calibration.to_dict(),
        "preprocess": preprocess.to_dict(),
        "metrics": metrics or {},
        "loda_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        meta.update(extra)
    return meta


def _validate_metadata(meta: Any, path: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a loda checkpoint (no loda metadata header)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this loda reads up to "
            f"{FORMAT_VERSION}: upgrade loda"
        )
    for key in ("kind", "config", "calibration", "preprocess"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    if meta["kind"] not in ("adapters", "full"):
        raise CheckpointError(f"{path}: unknown checkpoint kind {meta['kind']!r}")
    return meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's metadata, read from the header alone (no tensors, no torch)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            size = int.from_bytes(head, "little")
            if size <= 0 or size > 100_000_000 or size > path.stat().st_size - 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file")
            header = json.loads(fh.read(size))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from exc
    block = header.get("__metadata__") if isinstance(header, dict) else None
    raw = block.get("loda") if isinstance(block, dict) else None
    if not isinstance(raw, str):  # safetensors metadata values are strings
        raise CheckpointError(f"{path} is not a loda checkpoint (no loda metadata header)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON") from exc
    return _validate_metadata(meta, path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Save and load


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as fh:
        fh.write(data)


def checkpoint_kind(model: LoDa) -> str:
    """Adapters only when the backbones are frozen pretrained weights timm can rebuild."""
    return "adapters" if (model.backbones_frozen and model.pretrained) else "full"


def save_checkpoint(
    model: LoDa, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None, **meta_kw: Any
) -> Path:
    """Write ``model`` as a loda checkpoint, atomically. ``metadata`` comes from
    :func:`build_metadata`; when omitted it is built from ``meta_kw`` (defaults: no calibration,
    the paper's preprocessing)."""
    from safetensors.torch import save

    path = Path(path)
    kind = checkpoint_kind(model)
    if metadata is None:
        meta_kw.setdefault("name", path.stem)
        meta_kw.setdefault("calibration", Calibration())
        meta_kw.setdefault("preprocess", Preprocess())
        metadata = build_metadata(model, kind=kind, **meta_kw)
    metadata = {**metadata, "kind": kind}
    state = model.state_dict()
    keys = model.adapter_state_keys() if kind == "adapters" else list(state)
    tensors = {k: state[k].detach().contiguous().cpu() for k in keys}
    _atomic_write_bytes(path, save(tensors, metadata={"loda": json.dumps(metadata, sort_keys=True)}))
    return path


def load_checkpoint(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[LoDa, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its tensors. Returns (model, metadata).

    Raises CheckpointError for a truncated, tampered or inconsistent file, and
    BackboneUnavailableError when an adapter checkpoint's pretrained backbones cannot be had.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from loda_cli.model import LoDa

    path = Path(path)
    meta = read_metadata(path)
    try:
        config = LoDaConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid architecture config in metadata: {exc}") from exc
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from exc
    adapters_only = meta["kind"] == "adapters"
    method = meta.get("method") or "loda"

    def build(pretrained: bool):
        if method == "loda":
            return LoDa(config, pretrained=pretrained)
        from loda_cli.baselines import build_method  # the paper's Table 6/7 comparison methods

        return build_method(method, config, pretrained=pretrained)

    _check_buildable(path, build)
    model = build(adapters_only)
    try:
        model.load_loda_state_dict(tensors, adapters_only=adapters_only)
    except StateDictMismatchError as exc:
        raise StateDictMismatchError(f"{path}: tensors do not match its metadata ({exc})") from exc
    model.pretrained = bool(meta.get("backbones", {}).get("pretrained", adapters_only))
    return model.to(device).eval(), meta


def _check_buildable(path: Path, build) -> None:
    """Build the model a checkpoint describes without memory (torch's meta device) first: a
    config timm cannot build becomes a CheckpointError, and one whose weights would not fit in
    this machine's memory is refused before it is allocated."""
    import torch

    try:
        with torch.device("meta"):
            shell = build(False)
    except (ArithmeticError, AssertionError, LookupError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its architecture cannot be built: {exc}") from exc
    need = sum(t.numel() * t.element_size() for t in (*shell.parameters(), *shell.buffers()))
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return  # not known here (Windows): the build itself will say
    if need > have:
        raise CheckpointError(
            f"{path} describes a model of {need / 2**30:.1f} GiB of weights; this machine has "
            f"{have / 2**30:.1f} GiB of memory"
        )


@dataclass
class LoadedModel:
    """A model ready to score: the module, its metadata, and what scoring needs from it."""

    model: Any
    metadata: dict[str, Any]
    path: Path
    sha256: str
    name: str
    calibration: Calibration
    preprocess: Preprocess
    builtin: bool = False


def load_model(model: str | None = None, device: str = "cpu") -> LoadedModel:
    """Resolve a ``--model`` value (see :func:`resolve_model`) and load it."""
    resolved = resolve_model(model)
    net, meta = load_checkpoint(resolved.path, device=device)
    return _loaded(resolved, net, meta)


def load_model_info(model: str | None = None) -> LoadedModel:
    """Everything :func:`load_model` gives except the module (``model`` is None): the resolved
    checkpoint, its hash, calibration and preprocessing, read from its header without torch.
    For work that needs no forward pass (scores already in the cache)."""
    resolved = resolve_model(model)
    return _loaded(resolved, None, read_metadata(resolved.path))


def _loaded(resolved: ResolvedModel, net: Any, meta: dict[str, Any]) -> LoadedModel:
    return LoadedModel(
        model=net,
        metadata=meta,
        path=resolved.path,
        sha256=file_sha256(resolved.path),
        name=resolved.name,
        calibration=Calibration.from_dict(meta["calibration"]),
        preprocess=_preprocess_from(meta, resolved.path),
        builtin=resolved.builtin,
    )


def _preprocess_from(meta: dict[str, Any], path: Path) -> Preprocess:
    try:
        return Preprocess.from_dict(meta["preprocess"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid preprocessing in metadata: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Manifest and resolution


@dataclass
class ModelEntry:
    name: str
    path: Path | None
    source: str  # "home", "manifest" or "file"
    manifest: dict[str, Any] = field(default_factory=dict)
    builtin: bool = False

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.is_file()


def read_manifest() -> list[dict[str, Any]]:
    path = weights_dir() / "manifest.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = data["models"]
        if not isinstance(models, list):
            raise TypeError("models is not a list")
        return models
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is malformed: {exc}") from exc


def list_models() -> list[ModelEntry]:
    """Every known checkpoint: those in $LODA_HOME first, then the repository manifest."""
    entries: list[ModelEntry] = []
    home = checkpoints_dir()
    if home.is_dir():
        for p in sorted(home.glob("*" + CHECKPOINT_SUFFIX)):
            entries.append(ModelEntry(p.name[: -len(CHECKPOINT_SUFFIX)], p, "home"))
    for item in read_manifest():
        name = item.get("name")
        if not name or any(e.name == name for e in entries):
            continue
        file = item.get("file")
        path = (weights_dir() / file) if file and "://" not in file else None
        entries.append(ModelEntry(name, path, "manifest", item, builtin=bool(item.get("builtin"))))
    return entries


@dataclass
class ResolvedModel:
    path: Path
    name: str
    builtin: bool


def builtin_srcc(entries: list[ModelEntry]) -> float | None:
    """The built-in model's cross-validated median SRCC on people's ratings (its manifest)."""
    for entry in entries:
        if entry.builtin:
            value = (entry.manifest.get("metrics") or {}).get("cross_validation_median_srcc")
            return float(value) if isinstance(value, (int, float)) else None
    return None


def _home_candidates(entries: list[ModelEntry]) -> tuple[list[tuple[ModelEntry, float | None]], list[tuple[str, float]]]:
    """The real checkpoints in $LODA_HOME with their test SRCC (None when not recorded, as for
    imported ones), split into those that may be the default and those whose SRCC is below the
    built-in model's cross-validated SRCC: a smoke run (one step, random backbones) must not
    quietly replace the built-in model in every `loda score`; ``--model NAME`` still uses it."""
    floor = builtin_srcc(entries)
    eligible, below = [], []
    for entry in entries:
        if entry.source != "home":
            continue
        try:
            meta = read_metadata(entry.path)  # type: ignore[arg-type]
        except CheckpointError:
            continue
        if meta.get("synthetic_only"):
            continue
        srcc = (meta.get("metrics") or {}).get("srcc")
        srcc = float(srcc) if isinstance(srcc, (int, float)) else None
        if floor is not None and srcc is not None and srcc < floor:
            below.append((entry.name, srcc))
        else:
            eligible.append((entry, srcc))
    return eligible, below


def home_checkpoints_below_builtin(entries: list[ModelEntry]) -> list[tuple[str, float]]:
    """(name, test SRCC) of the checkpoints in $LODA_HOME never taken by default."""
    return _home_candidates(entries)[1]


def _best_home_checkpoint(entries: list[ModelEntry]) -> ModelEntry | None:
    """Among the checkpoints in $LODA_HOME that may be the default, the one with the best test
    SRCC (newest on ties)."""
    best, best_key = None, None
    for entry, srcc in _home_candidates(entries)[0]:
        key = (srcc if srcc is not None else -2.0, entry.path.stat().st_mtime)  # type: ignore[union-attr]
        if best_key is None or key > best_key:
            best, best_key = entry, key
    return best


def resolve_model(value: str | None) -> ResolvedModel:
    """A ``--model`` value: a file path, a checkpoint name in $LODA_HOME, or a manifest name.

    With no value: the best real checkpoint in $LODA_HOME, else the built-in model.
    """
    entries = list_models()
    if value is None:
        best = _best_home_checkpoint(entries)
        if best is not None:
            return ResolvedModel(best.path, best.name, False)  # type: ignore[arg-type]
        for entry in entries:
            if entry.builtin and entry.available:
                return ResolvedModel(entry.path, entry.name, True)  # type: ignore[arg-type]
        raise ModelNotFoundError(
            "no model available: the built-in model is missing from weights/ and $LODA_HOME has no "
            "checkpoint; train one (loda train) or import one (loda weights import)"
        )
    candidate = Path(value).expanduser()
    if candidate.suffix == CHECKPOINT_SUFFIX or os.sep in value or candidate.is_file():
        if candidate.is_file():
            return ResolvedModel(candidate, candidate.stem, False)
        if os.sep in value or candidate.suffix == CHECKPOINT_SUFFIX:
            raise ModelNotFoundError(f"checkpoint file not found: {value}")
    for entry in entries:
        if entry.name == value:
            if not entry.available:
                where = entry.manifest.get("file") or entry.manifest.get("url") or "?"
                raise ModelNotFoundError(
                    f"model {value!r} is listed but its file is not here; download {where} "
                    f"and import it with: loda weights import FILE --name {value}"
                )
            return ResolvedModel(entry.path, entry.name, entry.builtin)  # type: ignore[arg-type]
    names = [e.name for e in entries]
    close = difflib.get_close_matches(value, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(names) if names else "none"
    raise ModelNotFoundError(f"unknown model {value!r}; {hint}known models: {known}")


# ---------------------------------------------------------------------------------------------
# Import


def import_checkpoint(
    source: str | os.PathLike[str],
    name: str,
    *,
    config: LoDaConfig | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy a loda checkpoint, or convert an authors'-format ``.pt``, into $LODA_HOME.

    The ``.pt`` is read with ``torch.load(weights_only=True)``, so a file carrying pickled code is
    refused rather than run.
    """
    source = Path(source)
    if not source.is_file():
        raise CheckpointError(f"no such file: {source}")
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid checkpoint name {name!r}")
    dest = checkpoints_dir() / f"{name}{CHECKPOINT_SUFFIX}"
    if dest.exists() and not overwrite:
        raise UsageError(f"a checkpoint named {name!r} already exists; choose another --name")

    preprocess = Preprocess()
    if dataset:
        from loda_cli.datasets import resolve_dataset

        spec = resolve_dataset(dataset)  # an unknown name is an error, not ignored
        dataset = spec.name
        # Scored as it was trained: the dataset's own resize (KonIQ-10k's is bilinear), as
        # loda train records it.
        preprocess = Preprocess(interpolation=spec.interpolation)
    if _is_safetensors(source):
        meta = read_metadata(source)
        recorded = (meta.get("dataset") or {}).get("name")
        if dataset and dataset != recorded:
            raise UsageError(
                f"--dataset applies to the authors' .pt files; {source.name} is a loda checkpoint "
                f"and records its own dataset ({recorded or 'none'})"
            )
        load_checkpoint(source)  # verify every tensor before we adopt the file
        meta = {**meta, "name": name}
        from safetensors.torch import load_file, save

        tensors = load_file(str(source))
        _atomic_write_bytes(dest, save(tensors, metadata={"loda": json.dumps(meta, sort_keys=True)}))
        return dest

    state = _torch_load_safely(source)
    from loda_cli.model import LoDa

    config = config or LoDaConfig()
    adapters_only = isinstance(state, dict) and {"learner", "bn_buffer"} <= set(state)
    model = LoDa(config, pretrained=adapters_only)
    model.load_official_state_dict(state)
    model.pretrained = adapters_only
    calibration, dataset_meta = _dataset_calibration(dataset)
    save_checkpoint(
        model,
        dest,
        name=name,
        calibration=calibration,
        preprocess=preprocess,
        dataset=dataset_meta,
        description=f"imported from the authors' release format ({source.name})",
        extra={"imported_from": source.name, "source_sha256": file_sha256(source)},
    )
    return dest


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then a JSON object."""
    if path.suffix == CHECKPOINT_SUFFIX:
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _torch_load_safely(path: Path) -> Any:
    import pickle

    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it then reads or refuses; the
            # outcome is what the user needs to hear, in one line.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors; refusing to load it (it could run code)"
        ) from exc
    except Exception as exc:  # garbage makes the unpickler raise anything (KeyError, IndexError, ...)
        if isinstance(exc, KeyError):
            reason = "not a pickle or zip file torch can read"
        elif isinstance(exc, EOFError):
            reason = "empty or cut short"
        else:
            text = str(exc).strip()
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def _dataset_calibration(dataset: str | None) -> tuple[Calibration, dict[str, Any]]:
    """Without training predictions no fit exists: map raw linearly onto the dataset's scale."""
    if not dataset:
        return Calibration(), {}
    from loda_cli.datasets import resolve_dataset

    spec = resolve_dataset(dataset)
    lo, hi = spec.scale
    return (
        Calibration("none", [], float(lo), float(hi), bool(spec.lower_better)),
        {"name": spec.name, "scale": [lo, hi], "lower_better": bool(spec.lower_better)},
    )
