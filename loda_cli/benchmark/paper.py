"""The paper's numbers and table presets (Xu et al., CVPR 2024): data, no logic to speak of.

:data:`PAPER` holds every value of Tables 1-7 that a benchmark compares with, :data:`TABLES` the
layout of each table (its rows as :class:`Variant` s and its columns), and the KADID-10k
distortion types and groups of Figure 4. Changing a preset changes what ``loda benchmark
--table N`` runs; nothing else lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from loda_cli.config import DEFAULT_VIT, VIT_PRETRAINING, VIT_SIZES

# The paper's numbers: {table: {(row, column): {metric: value}}}. Rows are variant keys, columns
# dataset names ("train->test" for Table 2).


def _pairs(row: str, values: dict[str, tuple[float, ...]]) -> dict[tuple[str, str], dict[str, float]]:
    out = {}
    for column, numbers in values.items():
        out[(row, column)] = dict(zip(("srcc", "plcc"), numbers))
    return out


PAPER: dict[int, dict[tuple[str, str], dict[str, float]]] = {
    1: _pairs("loda", {
        "live": (0.975, 0.979), "tid2013": (0.869, 0.901), "kadid10k": (0.931, 0.936),
        "livec": (0.876, 0.899), "koniq10k": (0.932, 0.944), "spaq": (0.925, 0.928),
        "flive": (0.578, 0.679),
    }),
    2: _pairs("loda", {
        "flive->koniq10k": (0.763,), "flive->livec": (0.805,),
        "livec->koniq10k": (0.745,), "koniq10k->livec": (0.811,),
    }),
    3: {
        **_pairs("mae", {"kadid10k": (0.917, 0.924), "koniq10k": (0.927, 0.938)}),
        **_pairs("clip", {"kadid10k": (0.897, 0.902), "koniq10k": (0.909, 0.923)}),
        **_pairs("in1k", {"kadid10k": (0.912, 0.920), "koniq10k": (0.920, 0.933)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944)}),
    },
    4: {
        **_pairs("tiny", {"kadid10k": (0.892, 0.900), "koniq10k": (0.914, 0.926), "spaq": (0.922, 0.927)}),
        **_pairs("small", {"kadid10k": (0.915, 0.922), "koniq10k": (0.928, 0.939), "spaq": (0.924, 0.928)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944), "spaq": (0.925, 0.928)}),
    },
    5: {
        **_pairs("frac0.2", {"koniq10k": (0.907, 0.923), "livec": (0.815, 0.854)}),
        **_pairs("frac0.4", {"koniq10k": (0.922, 0.935), "livec": (0.849, 0.879)}),
        **_pairs("frac0.6", {"koniq10k": (0.928, 0.940), "livec": (0.869, 0.891)}),
    },
    6: {
        **_pairs("linear", {"kadid10k": (0.676, 0.701), "koniq10k": (0.796, 0.833), "spaq": (0.861, 0.867)}),
        **_pairs("full", {"kadid10k": (0.889, 0.899), "koniq10k": (0.874, 0.891), "spaq": (0.918, 0.922)}),
        **_pairs("adapter", {"kadid10k": (0.914, 0.920), "koniq10k": (0.926, 0.939), "spaq": (0.925, 0.928)}),
        **_pairs("lora", {"kadid10k": (0.913, 0.921), "koniq10k": (0.921, 0.934), "spaq": (0.924, 0.928)}),
        **_pairs("vpt", {"kadid10k": (0.889, 0.900), "koniq10k": (0.919, 0.932), "spaq": (0.923, 0.926)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944), "spaq": (0.925, 0.928)}),
    },
    7: {
        **_pairs("full", {"kadid10k": (0.889, 0.899), "koniq10k": (0.874, 0.891)}),
        **_pairs("add", {"kadid10k": (0.915, 0.921), "koniq10k": (0.925, 0.936)}),
        **_pairs("loda", {"kadid10k": (0.931, 0.936), "koniq10k": (0.932, 0.944)}),
    },
}


DATASET_TITLES = {
    "live": "LIVE", "tid2013": "TID2013", "kadid10k": "KADID-10k", "livec": "LIVEC",
    "koniq10k": "KonIQ-10k", "spaq": "SPAQ", "flive": "FLIVE",
}


# Image counts for estimates when a dataset is not on disk (FLIVE: the paper's count).
NOMINAL_SIZES = {
    "live": 779, "tid2013": 3000, "kadid10k": 10125, "livec": 1162, "koniq10k": 10073,
    "spaq": 11125, "flive": 39810,
}


@dataclass(frozen=True)
class Variant:
    """One row of a table: a training method, a ViT (a key of VIT_SIZES / VIT_PRETRAINING; None is
    the paper's default) and a training fraction."""

    key: str
    title: str
    method: str = "loda"
    vit_key: Optional[str] = None
    train_fraction: float = 1.0

    @property
    def vit(self) -> str:
        if self.vit_key is None:
            return DEFAULT_VIT
        return {**VIT_SIZES, **VIT_PRETRAINING}[self.vit_key]

    @property
    def tag(self) -> str:
        """The variant's part of checkpoint and run names; empty for the paper's LoDa."""
        parts = []
        if self.method != "loda":
            parts.append(self.method)
        if self.vit != DEFAULT_VIT:
            parts.append(f"vit-{self.vit_key}")
        if self.train_fraction != 1.0:
            parts.append(f"frac{self.train_fraction:g}")
        return "-".join(parts)


LODA = Variant("loda", "LoDa")


@dataclass(frozen=True)
class TableSpec:
    number: int
    title: str
    variants: tuple[Variant, ...]
    datasets: tuple[str, ...] = ()  # columns: the training datasets
    cross: tuple[tuple[str, str], ...] = ()  # Table 2: (train, test) columns instead
    metrics: tuple[str, ...] = ("srcc", "plcc")
    row_header: str = "Method"

    def columns(self) -> list[str]:
        return [f"{a}->{b}" for a, b in self.cross] if self.cross else list(self.datasets)


TABLES: dict[int, TableSpec] = {
    1: TableSpec(1, "Performance comparison measured by medians of SRCC and PLCC", (LODA,),
                 datasets=("live", "tid2013", "kadid10k", "livec", "koniq10k", "spaq", "flive")),
    2: TableSpec(2, "SRCC on the cross datasets validation", (LODA,),
                 cross=(("flive", "koniq10k"), ("flive", "livec"), ("livec", "koniq10k"), ("koniq10k", "livec")),
                 metrics=("srcc",)),
    3: TableSpec(3, "Impact of large-scale pretrained models", (
        Variant("mae", "MAE", vit_key="mae"),
        Variant("clip", "Multi-Modal", vit_key="clip"),
        Variant("in1k", "ImageNet-1K", vit_key="in1k"),
        Variant("loda", "ImageNet-21K"),
    ), datasets=("kadid10k", "koniq10k"), row_header="Pre-train"),
    4: TableSpec(4, "Impact of large-scale pretrained model sizes", (
        Variant("tiny", "ViT-T", vit_key="tiny"),
        Variant("small", "ViT-S", vit_key="small"),
        Variant("loda", "ViT-B"),
    ), datasets=("kadid10k", "koniq10k", "spaq"), row_header="Backbone"),
    5: TableSpec(5, "Data-efficient learning with 20%, 40% and 60% of the training set", (
        Variant("frac0.2", "20% LoDa", train_fraction=0.2),
        Variant("frac0.4", "40% LoDa", train_fraction=0.4),
        Variant("frac0.6", "60% LoDa", train_fraction=0.6),
    ), datasets=("koniq10k", "livec"), row_header="Mode"),
    6: TableSpec(6, "Comparisons with different fine-tuning methods", (
        Variant("linear", "ViT (Linear Probe)", method="linear"),
        Variant("full", "ViT (Full fine-tune)", method="full"),
        Variant("adapter", "Adapter-ViT", method="adapter"),
        Variant("lora", "LoRA-ViT", method="lora"),
        Variant("vpt", "VPT-ViT", method="vpt"),
        LODA,
    ), datasets=("kadid10k", "koniq10k", "spaq"), row_header="Fine-tuning Methods"),
    # Table 7's "ViT" is the fully fine-tuned ViT (the paper reports Table 6's full fine-tune
    # numbers for it), so it shares Table 6's "full" checkpoints.
    7: TableSpec(7, "Ablation experiments", (
        Variant("full", "ViT", method="full"),
        Variant("add", "ViT + Extractor", method="add"),
        LODA,
    ), datasets=("kadid10k", "koniq10k"), row_header="Module"),
}


KADID_TYPES: dict[int, str] = {
    1: "gaussian blur", 2: "lens blur", 3: "motion blur", 4: "color diffusion", 5: "color shift",
    6: "color quantization", 7: "color saturation 1", 8: "color saturation 2", 9: "jpeg2000",
    10: "jpeg", 11: "white noise", 12: "white noise in color component", 13: "impulse noise",
    14: "multiplicative noise", 15: "denoise", 16: "brighten", 17: "darken", 18: "mean shift",
    19: "jitter", 20: "non-eccentricity patch", 21: "pixelate", 22: "quantization",
    23: "color block", 24: "high sharpen", 25: "contrast change",
}


# Figure 4 groups "the 25 distortion types of KADID-10k into nine typical types, as outlined in
# [54]" (LIQE). LIQE maps KADID's types onto 11 classes: blur (01-03 and 05, which LIQE calls
# "shifting"), color (04, 07, 08), quantization (06, 22), JPEG2000 (09), JPEG (10), noise
# (11-15), overexposure (16), underexposure (17), other (18), spatial (19-21, 23) and contrast
# (24, 25). Nine of them come from merging JPEG with JPEG2000 (compression) and over- with
# underexposure (brightness): our reading, since the figure's labels are not in the paper's text.
DISTORTION_GROUPS: dict[str, tuple[int, ...]] = {
    "blur": (1, 2, 3, 5),
    "color": (4, 7, 8),
    "compression": (9, 10),
    "noise": (11, 12, 13, 14, 15),
    "brightness": (16, 17),
    "other": (18,),
    "spatial": (19, 20, 21, 23),
    "quantization": (6, 22),
    "contrast": (24, 25),
}


# KADID-10k's own seven categories (its paper), reported in the JSON beside the above.
KADID_CATEGORIES: dict[str, tuple[int, ...]] = {
    "blurs": (1, 2, 3),
    "color distortions": (4, 5, 6, 7, 8),
    "compression": (9, 10),
    "noise": (11, 12, 13, 14, 15),
    "brightness change": (16, 17, 18),
    "spatial distortions": (19, 20, 21, 22, 23),
    "sharpness and contrast": (24, 25),
}


def column_title(column: str) -> str:
    if "->" in column:
        a, b = column.split("->")
        return f"{DATASET_TITLES.get(a, a)} -> {DATASET_TITLES.get(b, b)}"
    return DATASET_TITLES.get(column, column)
