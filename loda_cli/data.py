"""torch Datasets over a labelled IQA dataset: random training crops and the paper's test crops.

Every random choice comes from a generator seeded by (seed, epoch, index), so a run gives the
same crops whatever the number of DataLoader workers, and a resumed run continues exactly.
Crops are uint8 (normalised on the device, as in scoring).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from loda_cli.config import Preprocess
from loda_cli.datasets import DatasetSpec, LabelItem, load_training_image
from loda_cli.transforms import cut_crops, random_positions

ImageLoader = Callable[[LabelItem], Any]


def _rng(*parts: int) -> random.Random:
    # random.Random seeded with a tuple hash is not stable across runs; mix into one int instead.
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63)
    return random.Random(seed)


@dataclass
class ImageSource:
    """Where a dataset's images come from: the 384 cache when prepared, else decoded on the fly."""

    spec: DatasetSpec
    root: Path
    cache_dir: Path | None = None

    def __call__(self, item: LabelItem) -> np.ndarray:
        image = load_training_image(self.spec, self.root, item, self.cache_dir)
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        crop = 224
        if min(array.shape[:2]) < crop:  # tiny inputs: upscale like the scorer does
            from loda_cli.images import resize_short_side

            array = np.asarray(resize_short_side(image, crop, self.spec.interpolation), dtype=np.uint8)
        return array


class TrainCrops(Dataset):
    """Each training image appears ``crops_per_image`` times per epoch, each time as a random crop
    with random horizontal and vertical flips (the paper's protocol)."""

    def __init__(
        self,
        items: list[LabelItem],
        labels: list[float],
        load: ImageLoader,
        crops_per_image: int,
        crop_size: int = 224,
        seed: int = 3407,
        aux: list[np.ndarray] | None = None,
    ):
        self.items, self.labels, self.load = items, labels, load
        self.k, self.crop_size, self.seed = crops_per_image, crop_size, seed
        self.aux = aux  # optional per-image auxiliary targets, returned third
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) * self.k

    def __getitem__(self, i: int):
        image_index = i // self.k
        array = self.load(self.items[image_index])
        rng = _rng(self.seed, self.epoch, i)
        h, w = array.shape[:2]
        pos = random_positions(h, w, self.crop_size, 1, rng)
        flips = [(rng.random() < 0.5, rng.random() < 0.5)]
        crop = cut_crops(array, pos, self.crop_size, flips)[0]
        out = (torch.from_numpy(crop), torch.tensor(self.labels[image_index], dtype=torch.float32))
        if self.aux is not None:
            out += (torch.from_numpy(self.aux[image_index]),)
        return out


class GroupedTrainCrops(Dataset):
    """Training crops in groups of ``group_size`` images of one reference, all cut at the same
    place with the same flips, so the images of a group differ only in their distortion.

    For synthetic datasets (a reference column): each epoch shuffles every reference's images
    and deals them into groups, ``crops_per_image`` times over, so each image is seen as often as
    with :class:`TrainCrops`. A reference's last group is topped up with other images of the same
    reference. One item is a whole group: ``(uint8 crops KxCxSxS, labels K)``. The crop corner is
    drawn as a fraction of each image's free range, so images of slightly different sizes still
    line up.
    """

    def __init__(
        self,
        items: list[LabelItem],
        labels: list[float],
        load: ImageLoader,
        crops_per_image: int,
        group_size: int,
        crop_size: int = 224,
        seed: int = 3407,
        aux: list[np.ndarray] | None = None,
    ):
        if group_size < 2:
            raise ValueError("group_size must be at least 2")
        self.items, self.labels, self.load = items, labels, load
        self.k, self.group_size, self.crop_size, self.seed = crops_per_image, group_size, crop_size, seed
        self.aux = aux
        by_ref: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_ref.setdefault(item.ref if item.ref is not None else item.name, []).append(i)
        self.refs = [by_ref[key] for key in sorted(by_ref)]
        self.groups: list[list[int]] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        groups = []
        for r, members in enumerate(self.refs):
            rng = _rng(self.seed, epoch, 7919, r)
            for _ in range(self.k):
                order = list(members)
                rng.shuffle(order)
                while len(order) % self.group_size:
                    order.append(rng.choice(members))
                groups.extend(order[j : j + self.group_size] for j in range(0, len(order), self.group_size))
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int):
        rng = _rng(self.seed, self.epoch, 104729, g)
        fy, fx = rng.random(), rng.random()
        flip = (rng.random() < 0.5, rng.random() < 0.5)
        crops, labels = [], []
        for index in self.groups[g]:
            array = self.load(self.items[index])
            h, w = array.shape[:2]
            top, left = round(fy * (h - self.crop_size)), round(fx * (w - self.crop_size))
            crops.append(cut_crops(array, [(top, left)], self.crop_size, [flip])[0])
            labels.append(self.labels[index])
        out = (torch.from_numpy(np.stack(crops)), torch.tensor(labels, dtype=torch.float32))
        if self.aux is not None:
            out += (torch.from_numpy(np.stack([self.aux[index] for index in self.groups[g]])),)
        return out


class TestCrops(Dataset):
    """All test crops of one image per item: ``n`` seeded random crops (the paper), or the
    scorer's fixed grid with ``grid=True``."""

    def __init__(self, items: list[LabelItem], load: ImageLoader, n: int = 15, crop_size: int = 224,
                 seed: int = 3407, grid: bool = False):
        self.items, self.load, self.n, self.crop_size, self.seed, self.grid = items, load, n, crop_size, seed, grid

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        array = self.load(self.items[i])
        h, w = array.shape[:2]
        if self.grid:
            from loda_cli.transforms import grid_positions

            pos = grid_positions(h, w, self.crop_size, self.n)
        else:
            pos = random_positions(h, w, self.crop_size, self.n, _rng(self.seed, i))
        return i, torch.from_numpy(cut_crops(array, pos, self.crop_size))


def collate_test(batch):
    indices = [i for i, _ in batch]
    crops = [c for _, c in batch]
    return indices, crops


@torch.inference_mode()
def predict(model, dataset: TestCrops, preprocess: Preprocess, device: str, precision: str,
            batch_crops: int = 64, workers: int = 0, indices: list[int] | None = None) -> dict[int, float]:
    """Mean raw prediction per image index (crops of many images batched together)."""
    from torch.utils.data import DataLoader, Subset

    from loda_cli.scoring import autocast_context
    from loda_cli.transforms import normalize

    was_training = model.training
    model.eval()
    subset = Subset(dataset, indices) if indices is not None else dataset
    per_batch = max(1, batch_crops // max(1, dataset.n))
    loader = DataLoader(subset, batch_size=per_batch, num_workers=workers, collate_fn=collate_test)
    out: dict[int, float] = {}
    for idx, crops in loader:
        batch = torch.cat(crops).to(device)
        x = normalize(batch, preprocess)
        with autocast_context(device, precision):
            raw = model(x).float().view(len(idx), -1).mean(dim=1).cpu().tolist()
        out.update(zip(idx, raw))
    model.train(was_training)
    return out
