"""Small fake IQA datasets written in the exact formats the real ones are distributed in.

Each ``make_*`` writes a dataset under ``root`` and returns the folder to pass as ``--data``
(``make_csv_dataset`` writes ``labels.csv`` inside it). The images are real, small and learnable:
every image is a textured picture degraded by blur and noise in proportion to how bad its label
says it is, so a tiny model trained for a few steps ranks them better than chance. Everything is
deterministic for a seed. Training and benchmark tests reuse these writers.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageFilter

SIZE = (64, 48)


def quality_image(content_seed: int, quality: float, size: tuple[int, int] = SIZE, noise_seed: Optional[int] = None) -> Image.Image:
    """A picture whose content depends on ``content_seed`` and whose degradation on ``quality``.

    ``quality`` 1 is pristine; lower values blur (radius up to 2.5 px) and add Gaussian noise
    (sigma up to 50 grey levels), both proportionally to ``1 - quality``.
    """
    quality = float(min(max(quality, 0.0), 1.0))
    width, height = size
    rng = np.random.default_rng(content_seed)
    # Content: a blocky colour field (sharp edges) plus stripes (fine texture) that blur removes.
    blocks = rng.integers(40, 216, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    picture = np.asarray(Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST), dtype=np.float32)
    period = int(rng.integers(3, 7))
    stripes = ((np.arange(width)[None, :] + np.arange(height)[:, None]) // period % 2) * 40.0 - 20.0
    picture = np.clip(picture + stripes[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(picture)
    badness = 1.0 - quality
    if badness > 0:
        image = image.filter(ImageFilter.GaussianBlur(2.5 * badness))
        noise_rng = np.random.default_rng(content_seed * 7919 + 1 if noise_seed is None else noise_seed)
        noisy = np.asarray(image, dtype=np.float32) + noise_rng.normal(0, 50 * badness, (height, width, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def _qualities(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 0.95, size=n)


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _write_csv(path: Path, header: list[str], rows: list[list[object]], crlf: bool = False, quote_all: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(
        buffer,
        lineterminator="\r\n" if crlf else "\n",
        quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
    )
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode("utf-8"))


def make_koniq(root: Path, n: int = 20, size: tuple[int, int] = SIZE, variant: str = "scores", seed: int = 0) -> Path:
    """KonIQ-10k: ``1024x768/*.jpg`` and the official ``koniq10k_scores_and_distributions.csv``
    (MOS 1-5, quoted header) or, with ``variant="sets"``, the authors'
    ``koniq10k_distributions_sets.csv`` (MOS 0-100, a ``set`` column)."""
    root = Path(root)
    rows = []
    for i, q in enumerate(_qualities(n, seed)):
        name = f"{100000 + i * 7919}.jpg"
        _save(quality_image(seed * 100003 + i, q, size), root / "1024x768" / name, quality=95)
        mos5 = 1.0 + 4.0 * q
        counts = np.random.default_rng(i).multinomial(100, [0.2] * 5).tolist()
        if variant == "scores":
            rows.append([name, *counts, 100, round(mos5, 6), 0.5, round(q * 100, 6)])
        elif variant == "sets":
            rows.append([name, *counts, 100, round(q * 100, 6), 12.5, round(q * 100, 6), ["training", "validation", "test"][i % 3]])
        else:
            raise ValueError(variant)
    if variant == "scores":
        header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
        _write_csv(root / "koniq10k_scores_and_distributions.csv", header, rows, quote_all=True)
    else:
        header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore", "set"]
        _write_csv(root / "koniq10k_distributions_sets.csv", header, rows)
    return root


def make_kadid(root: Path, n_refs: int = 4, per_ref: int = 5, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """KADID-10k: ``images/Iaa_bb_cc.png`` (reference aa, distortion bb, level cc), the
    references ``images/Iaa.png`` and ``dmos.csv`` (dist_img, ref_img, dmos, var; 1-5)."""
    root = Path(root)
    jitter = np.random.default_rng(seed)
    rows = []
    for r in range(1, n_refs + 1):
        ref = f"I{r:02d}.png"
        _save(quality_image(seed * 1009 + r, 1.0, size), root / "images" / ref)
        for j in range(per_ref):
            kind, level = j // 5 + 1, j % 5 + 1
            q = float(np.clip(1.0 - level / 5.5 + jitter.uniform(-0.05, 0.05), 0.02, 0.98))
            name = f"I{r:02d}_{kind:02d}_{level:02d}.png"
            _save(quality_image(seed * 1009 + r, q, size, noise_seed=r * 1000 + j), root / "images" / name)
            rows.append([name, ref, round(1.0 + 4.0 * q, 4), 0.5])
    _write_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    return root


def make_spaq(root: Path, n: int = 20, size: tuple[int, int] = SIZE, seed: int = 0, rotate_every: int = 3) -> Path:
    """SPAQ: ``TestImage/*.jpg`` and ``Annotations/MOS and Image attribute scores.xlsx`` (a header
    row, then image name, MOS 0-100, five attribute scores). Every ``rotate_every``-th image is
    stored rotated with an EXIF orientation of 6, as phones write them; EXIF-transposing it gives
    back a ``size`` image."""
    import openpyxl

    root = Path(root)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
    for i, q in enumerate(_qualities(n, seed)):
        name = f"{i + 1:05d}.jpg"
        image = quality_image(seed * 7 + i + 11, q, size)
        path = root / "TestImage" / name
        if rotate_every and i % rotate_every == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
            _save(image.transpose(Image.Transpose.ROTATE_90), path, quality=95, exif=exif.tobytes())
        else:
            _save(image, path, quality=95)
        sheet.append([name, round(q * 100, 3), 50.0, 50.0, 50.0, 50.0, 50.0])
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    workbook.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    return root


LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))


def make_live(root: Path, per_folder: int = 4, n_refs: int = 5, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """LIVE release 2: all 982 entries of ``dmos_realigned.mat`` (``dmos_new``, ``orgs``) and
    ``refnames_all.mat`` (a 1x982 cell), with only the first ``per_folder`` of each folder marked
    distorted (orgs 0) and written as ``<folder>/img<k>.bmp``; the rest are marked pristine
    (orgs 1) and so are dropped by the reader. DMOS is lower-is-better (0-100)."""
    import scipy.io

    root = Path(root)
    ref_names = [f"ref{r:02d}.bmp" for r in range(n_refs)]
    for r, ref in enumerate(ref_names):
        _save(quality_image(seed * 31 + r, 1.0, size), root / "refimgs" / ref)
    qualities = _qualities(len(LIVE_FOLDERS) * per_folder, seed)
    dmos, orgs, refs = [], [], []
    q_index = 0
    for folder, count in LIVE_FOLDERS:
        for k in range(1, count + 1):
            r = (k - 1) % n_refs
            refs.append(ref_names[r])
            if k <= per_folder:
                q = float(qualities[q_index])
                q_index += 1
                _save(quality_image(seed * 31 + r, q, size, noise_seed=q_index), root / folder / f"img{k}.bmp")
                dmos.append(round(100.0 * (1.0 - q), 4))
                orgs.append(0.0)
            else:
                dmos.append(0.0)
                orgs.append(1.0)
    names = np.empty((1, len(refs)), dtype=object)
    names[0, :] = refs
    scipy.io.savemat(root / "dmos_realigned.mat", {"dmos_new": np.array([dmos]), "orgs": np.array([orgs]), "dmos_std": np.ones((1, len(dmos)))})
    scipy.io.savemat(root / "refnames_all.mat", {"refnames_all": names})
    return root


def make_livec(root: Path, n: int = 20, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """LIVEC: ``Images/<name>``, ``Data/AllImages_release.mat`` (an Nx1 cell of names),
    ``Data/AllMOS_release.mat`` and ``Data/AllStdDev_release.mat`` (1xN). The first 7 entries are
    the raters' training images (``t1.bmp``...), which the reader drops; they are not written."""
    import scipy.io

    root = Path(root)
    names = [f"t{i}.bmp" for i in range(1, 8)]
    mos = [50.0] * 7
    for i, q in enumerate(_qualities(n, seed)):
        name = f"{i + 10}.bmp"
        _save(quality_image(seed * 13 + i + 5, q, size), root / "Images" / name)
        names.append(name)
        mos.append(round(100.0 * q, 4))
    cell = np.empty((len(names), 1), dtype=object)
    cell[:, 0] = names
    (root / "Data").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    scipy.io.savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.full((1, len(mos)), 10.0)})
    return root


def make_tid2013(
    root: Path, n_refs: int = 4, per_ref: int = 5, size: tuple[int, int] = SIZE, seed: int = 0,
    folder: str = "Distorted_images", mixed_case: bool = True,
) -> Path:
    """TID2013: ``mos_with_names.txt`` ("mos name" per line, CRLF, no header, lower-case names)
    and the images in ``folder``. With ``mixed_case`` every other file is written upper-case
    (``I01_01_1.BMP``), as the release does for some. MOS 0-9."""
    root = Path(root)
    lines = []
    count = 0
    for r in range(1, n_refs + 1):
        for j in range(per_ref):
            kind, level = j // 5 + 1, j % 5 + 1
            q = 1.0 - level / 5.5
            name = f"i{r:02d}_{kind:02d}_{level}.bmp"
            on_disk = name.upper() if mixed_case and count % 2 else name
            _save(quality_image(seed * 17 + r, q, size, noise_seed=count), root / folder / on_disk)
            lines.append(f"{9.0 * q:.5f} {name}")
            count += 1
    (root / "mos_with_names.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))
    (root / "mos_std.txt").write_bytes(("\r\n".join("0.1" for _ in lines) + "\r\n").encode("ascii"))
    return root


def make_flive(root: Path, n: int = 20, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """FLIVE: ``labels_image.csv`` (name, mos; CRLF) with each name a path relative to the root,
    spread over sub-folders as in the release. MOS about 0-100."""
    root = Path(root)
    rows = []
    for i, q in enumerate(_qualities(n, seed)):
        name = f"{['voc_emotic_ava', 'blur_dataset', 'EE371R'][i % 3]}/img_{i:04d}.jpg"
        _save(quality_image(seed * 19 + i + 3, q, size), root / name, quality=95)
        rows.append([name, round(40.0 + 40.0 * q, 4)])
    _write_csv(root / "labels_image.csv", ["name", "mos"], rows, crlf=True)
    return root


def make_csv_dataset(
    root: Path, n: int = 20, size: tuple[int, int] = SIZE, seed: int = 0,
    path_column: str = "path", mos_column: str = "mos", n_refs: int = 0, lower_better: bool = False,
) -> Path:
    """A generic dataset: ``labels.csv`` with ``path_column`` (paths under ``imgs/``) and
    ``mos_column`` (0-10), plus a ``ref`` column when ``n_refs`` > 0. With ``lower_better`` the
    labels are 10 - quality*10. Returns the folder; the CSV is ``root / "labels.csv"``."""
    root = Path(root)
    rows = []
    header = [path_column, mos_column] + (["ref"] if n_refs else [])
    for i, q in enumerate(_qualities(n, seed)):
        ref = i % n_refs if n_refs else i
        name = f"imgs/{i:03d}.png"
        _save(quality_image(seed * 23 + ref, q, size, noise_seed=i), root / name)
        label = 10.0 * (1.0 - q) if lower_better else 10.0 * q
        rows.append([name, round(label, 4)] + ([f"ref{ref}"] if n_refs else []))
    _write_csv(root / "labels.csv", header, rows)
    return root
