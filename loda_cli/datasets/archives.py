"""The official archives of the datasets loda can fetch itself: data, no behaviour.

:mod:`loda_cli.download` fetches, verifies and unpacks them; this table lives apart, in the dataset
layer, so that a "dataset not found" message can say whether ``loda data download`` would help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Archive:
    """One file of a dataset's official release.

    ``size`` and ``sha256`` are checked when recorded (None: not known here; a zip is then checked
    by its own CRCs only). ``holds`` is a path inside the folder that becomes (part of) the
    dataset: it finds that folder whatever the archive wraps it in.
    """

    file: str
    url: str
    size: Optional[int]
    sha256: Optional[str]
    holds: str

    @property
    def kind(self) -> str:
        return "rar" if self.file.lower().endswith(".rar") else "zip"


_MMSP = "https://datasets.vqa.mmsp-kn.de/archives/"

ARCHIVES: dict[str, tuple[Archive, ...]] = {
    # 10,125 distorted images and 81 references in kadid10k/images/, labels in kadid10k/dmos.csv.
    # The sha256 is the one a third-party download script records for this file.
    "kadid10k": (
        Archive("kadid10k.zip", _MMSP + "kadid10k.zip", 3_067_408_471,
                "fe59ace86a2525d5785ff011a2119fa88839e0329f5029f7b23994727efd185c", "dmos.csv"),
    ),
    # Sizes and sha256 not recorded: these two are verified by their zip CRCs only.
    "koniq10k": (
        Archive("koniq10k_1024x768.zip", _MMSP + "koniq10k_1024x768.zip", None, None, "1024x768"),
        Archive("koniq10k_scores_and_distributions.zip", _MMSP + "koniq10k_scores_and_distributions.zip",
                None, None, "koniq10k_scores_and_distributions.csv"),
    ),
    # RAR: unpacked (and its CRCs checked) by a system tool; size and sha256 not recorded.
    "tid2013": (
        Archive("tid2013.rar", "http://www.ponomarenko.info/tid2013/tid2013.rar", None, None,
                "mos_with_names.txt"),
    ),
}

# Datasets published without a direct URL: how one gets them (the page is the spec's homepage).
NO_DIRECT_DOWNLOAD = {
    "live": "a request form",
    "livec": "a request form",
    "spaq": "cloud-drive links",
    "flive": "cloud-drive links",
}

def downloadable(name: str) -> bool:
    return name in ARCHIVES


def download_hint(spec: Any, data: Optional[Path] = None) -> str:
    """The sentence a "dataset not found" message ends with, for datasets loda can fetch."""
    if spec.name not in ARCHIVES:
        return ""
    into = f" --data {data}" if data is not None else ""
    return (f" Or let loda fetch it: loda data download {spec.name}{into} (or add --download to "
            f"loda train {spec.name}).")
