"""Configuration dataclasses and variant tables. Pure data: no torch, no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_VIT = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
DEFAULT_CNN = "resnet50"


@dataclass
class LoDaConfig:
    """Architecture of a LoDa model. ``LoDaConfig()`` is the paper's ViT-B/16 + ResNet-50."""

    vit: str = DEFAULT_VIT
    vit_kwargs: dict[str, Any] = field(default_factory=dict)
    cnn: str = DEFAULT_CNN
    cnn_kwargs: dict[str, Any] = field(default_factory=dict)
    cnn_out_indices: tuple[int, ...] = (1, 2, 3, 4)
    latent_dim: int = 64
    grid_size: int = 7
    cross_attn_heads: int = 4
    dropout: float = 0.1
    img_size: int = 224
    # The authors keep the frozen CNN in train mode while training, so its BatchNorm running
    # statistics keep adapting to the IQA data and are saved with the checkpoint. False keeps the
    # CNN in eval mode (statistics frozen at their pretrained values).
    update_cnn_bn_stats: bool = True
    # Which parts train. "adapters" is LoDa as published (frozen backbones); "vit" also trains the
    # ViT while the pretrained CNN stays frozen (the built-in model: its small ViT starts from
    # scratch); "full" trains both backbones.
    trainable: str = "adapters"
    # Optional local files holding pretrained backbone weights (instead of the Hugging Face cache).
    vit_weights: str | None = None
    cnn_weights: str | None = None

    def __post_init__(self) -> None:
        self.cnn_out_indices = tuple(int(i) for i in self.cnn_out_indices)
        if self.trainable not in ("adapters", "vit", "full"):
            raise ValueError(f"trainable must be 'adapters', 'vit' or 'full', not {self.trainable!r}")
        for name in ("latent_dim", "grid_size", "cross_attn_heads", "img_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}")
        if self.latent_dim % self.cross_attn_heads:
            raise ValueError("latent_dim must be divisible by cross_attn_heads")
        for name in ("vit_kwargs", "cnn_kwargs"):
            _check_backbone_kwargs(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cnn_out_indices"] = list(self.cnn_out_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoDaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LoDaConfig fields: {sorted(unknown)}")
        return cls(**d)


# What a checkpoint's metadata may pass to timm when it builds a backbone: the sizes of its
# layers, as plain numbers or flags. timm also takes arguments that fetch or read weights
# (``pretrained_cfg_overlay`` with a URL, ``checkpoint_path``); a checkpoint never chooses those.
BACKBONE_KWARGS = frozenset({
    "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "class_token", "global_pool", "reg_tokens", "no_embed_class", "pre_norm", "fc_norm",
    "init_values", "drop_rate", "drop_path_rate", "output_stride",
})


def _check_backbone_kwargs(name: str, kwargs: Any) -> None:
    if not isinstance(kwargs, dict):
        raise ValueError(f"{name} must be a mapping, not {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in BACKBONE_KWARGS:
            raise ValueError(f"{name}: {key!r} is not a backbone size loda passes on")
        if not isinstance(value, (bool, int, float, str)) or value != value:
            raise ValueError(f"{name}: {key} must be a plain number, flag or name, not {value!r}")


DETAIL_LAYOUTS = ("grid", "centre")


@dataclass
class Preprocess:
    """How an image becomes crops. Stored in every checkpoint; the scorer is built from it."""

    short_side: int = 384
    crop_size: int = 224
    num_crops: int = 15
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    # A second, "detail" view (the built-in model's own design; 0 = off, the paper's protocol):
    # the photo at a short side of ``detail_short_side`` (never enlarged), where blur, noise and
    # compression show as a person sees them on a screen, cut into ``detail_crops`` crops. The
    # image's raw score is (1 - w) * mean(view crops) + w * mean(detail crops), w =
    # ``detail_weight``. The 384-pixel view averages pixel-level damage away on large photos.
    detail_short_side: int = 0
    detail_crops: int = 0
    detail_weight: float = 0.0
    # Where the detail crops lie (:func:`loda_cli.transforms.detail_positions`). "grid": a grid
    # spanning the view edge to edge, as the 384 view's crops (4 crops: the 4 corners, where a
    # photo is least often in focus). "centre": the first at the centre, any others at the centres
    # of a grid's cells. Written only when not "grid", so checkpoints made before it keep their
    # preprocessing, and their cache keys, as they were.
    detail_layout: str = "grid"

    def __post_init__(self) -> None:
        if self.detail_short_side < 0 or self.detail_crops < 0 or not 0.0 <= self.detail_weight <= 1.0:
            raise ValueError("detail view: sizes must be >= 0 and the weight within [0, 1]")
        if bool(self.detail_short_side) != bool(self.detail_crops):
            raise ValueError("detail view: give both detail_short_side and detail_crops, or neither")
        if self.detail_layout not in DETAIL_LAYOUTS:
            raise ValueError(f"detail view: unknown layout {self.detail_layout!r}; use {' or '.join(DETAIL_LAYOUTS)}")

    @property
    def has_detail_view(self) -> bool:
        return self.detail_crops > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if not self.has_detail_view:
            # Written only when used: a paper model's preprocessing (and so its cache key) is
            # what it was before the detail view existed.
            for key in ("detail_short_side", "detail_crops", "detail_weight"):
                d.pop(key)
        if d["detail_layout"] == "grid":
            d.pop("detail_layout")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def digest(self) -> str:
        """A short stable id of this preprocessing, used as a cache key."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Backbones of the paper's Table 4 (model size) and Table 3 (pretraining source), as timm names.
# Table 4's ViTs are all pretrained on ImageNet-21k. Table 3 cites Steiner et al. [38] (AugReg) for
# IN-1k and IN-21k, He et al. [14] for MAE, and Cherti et al. [6] (OpenCLIP, LAION-2B) for
# "Multi-Modal", hence the laion2b CLIP weights rather than OpenAI's.
VIT_SIZES: dict[str, str] = {
    "tiny": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "small": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "base": DEFAULT_VIT,
}
VIT_PRETRAINING: dict[str, str] = {
    "in1k": "vit_base_patch16_224.augreg_in1k",
    "in21k": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "mae": "vit_base_patch16_224.mae",
    "clip": "vit_base_patch16_clip_224.laion2b",
}

# A configuration small enough for CPU tests: random weights, seconds to build.
TINY_CONFIG_KW: dict[str, Any] = {
    "vit": "vit_tiny_patch16_224",
    "vit_kwargs": {"depth": 2},
    "cnn": "resnet18",
}


@dataclass
class TrainConfig:
    """One training run. The defaults are the paper's (Table 1 protocol); ``None`` fields take the
    dataset's own value (crops per image, interpolation)."""

    dataset: str = "kadid10k"
    data: str | None = None
    split: int = 0
    n_splits: int = 10
    seed: int = 3407
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 1e-2
    crops_per_image: int | None = None
    train_fraction: float = 1.0
    test_crops: int = 15
    model: LoDaConfig = field(default_factory=LoDaConfig)
    pretrained: bool = True
    method: str = "loda"
    out: str | None = None
    resume: bool = False
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    grad_accum: int = 1
    max_steps: int | None = None  # stop early (smoke tests); the schedule still spans all epochs
    eval_every: int = 1
    calibration_images: int = 2000
    # Options of the generic csv dataset.
    path_column: str | None = None
    mos_column: str | None = None
    lower_better: bool | None = None
    # Metadata for models that are not paper models (the built-in one).
    name: str | None = None
    description: str = ""
    num_crops: int = 15  # the scorer's crops per image stored in the checkpoint's preprocessing
    # Beyond the paper (used by the built-in model): batches of groups of one reference's images
    # cut at one place, with a per-group PLCC term (0 = off, the paper), a linear learning-rate
    # warm-up over this fraction of the steps, and a channels-last CNN (faster convolutions).
    group_size: int = 0
    warmup: float = 0.0
    channels_last: bool = False
    # Weight of a training-only head that names each synthetic image's distortions and levels
    # (0 = off, the paper).
    aux_weight: float = 0.0
    # Clip the gradient's global norm to this before each optimizer step (0 = off, the paper). The
    # PLCC loss ignores the scores' scale, so its gradient grows as the batch's scores bunch
    # together; from-scratch training of the built-in model diverged without a cap.
    clip_grad: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d
