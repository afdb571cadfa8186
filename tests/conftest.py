"""Shared fixtures. User state is isolated: every test gets its own $LODA_HOME, and the Hugging
Face hub is offline so no test can touch the network."""

from __future__ import annotations

import pytest

TINY_KW = {"vit": "test_vit", "vit_kwargs": {"img_size": 224, "depth": 2}, "cnn": "test_resnet"}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("loda_home")
    monkeypatch.setenv("LODA_HOME", str(home))
    monkeypatch.setenv("LODA_DATA", str(home / "datasets"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """--precision auto does not remember a measurement taken while other work loaded the CPU;
    tests must not depend on what else the test machine runs, so no load counts as busy here
    (tests of that rule set the threshold back)."""
    monkeypatch.setattr("loda_cli.precision.BUSY_SHARE", float("inf"))


@pytest.fixture
def tiny_config():
    from loda_cli.config import LoDaConfig

    return LoDaConfig(**TINY_KW)


@pytest.fixture
def tiny_model(tiny_config):
    import torch

    from loda_cli.model import LoDa

    torch.manual_seed(0)
    return LoDa(tiny_config).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """A tiny full checkpoint with a logistic calibration onto a 1-5 scale."""
    from loda_cli.config import Preprocess
    from loda_cli.weights import Calibration, save_checkpoint

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(
        tiny_model,
        path,
        name="tiny",
        calibration=Calibration("logistic4", [5.0, 1.0, 0.0, 0.05], 1.0, 5.0, False),
        preprocess=Preprocess(num_crops=3),
        dataset={"name": "test", "scale": [1, 5], "lower_better": False},
    )
    return path
