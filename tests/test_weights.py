"""Checkpoints: the safetensors round trip, calibration, resolution, import, and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from loda_cli.cli.main import app
from loda_cli.config import LoDaConfig, Preprocess
from loda_cli.errors import (
    BackboneUnavailableError,
    CheckpointError,
    ModelNotFoundError,
    StateDictMismatchError,
)
from loda_cli.model import LoDa, to_official_state_dict
from loda_cli.weights import (
    Calibration,
    checkpoints_dir,
    file_sha256,
    import_checkpoint,
    load_checkpoint,
    read_metadata,
    resolve_model,
    save_checkpoint,
)

runner = CliRunner()


def test_full_round_trip_is_bit_identical(tiny_model, tiny_checkpoint):
    loaded, meta = load_checkpoint(tiny_checkpoint)
    assert meta["kind"] == "full" and meta["format_version"] == 1
    assert meta["calibration"]["method"] == "logistic4"
    assert meta["preprocess"]["num_crops"] == 3
    assert meta["backbones"] == {"vit": "test_vit", "cnn": "test_resnet", "pretrained": False}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))


@pytest.fixture
def local_backbones(tmp_path, tiny_config):
    """Pretrained backbones from local files: the same path users take without a hub."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    donor = LoDa(tiny_config)
    vit_file, cnn_file = tmp_path / "vit.safetensors", tmp_path / "cnn.pth"
    save_file(donor.vit.state_dict(), str(vit_file))
    # timm's feature wrapper keeps the classifier-free names, so the CNN file is that state dict.
    torch.save(donor.cnn.state_dict(), cnn_file)
    tiny_config.vit_weights, tiny_config.cnn_weights = str(vit_file), str(cnn_file)
    return tiny_config


def test_adapter_round_trip_with_pretrained_backbones(tmp_path, local_backbones):
    model = LoDa(local_backbones, pretrained=True).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 224, 224) + 0.5)  # move the BN statistics off their initial values
        model.scale.normal_()
    model.eval()
    path = save_checkpoint(model, tmp_path / "adapters.safetensors", name="a")
    meta = read_metadata(path)
    assert meta["kind"] == "adapters"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    assert not any(k.startswith("vit.") for k in keys)
    assert any(k.endswith("running_var") for k in keys)
    assert not any(k.startswith("cnn.") and k.endswith(".weight") for k in keys)
    loaded, _ = load_checkpoint(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_truncated_and_tampered_checkpoints_are_clear_errors(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged|truncated"):
        load_checkpoint(truncated)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")

    # Metadata that names another architecture than the tensors hold.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_checkpoint))
    meta = read_metadata(tiny_checkpoint)
    meta["config"]["latent_dim"] = 32
    meta["config"]["cross_attn_heads"] = 4
    lying = tmp_path / "lying.safetensors"
    save_file(tensors, str(lying), metadata={"loda": json.dumps(meta)})
    with pytest.raises(StateDictMismatchError, match="do not match"):
        load_checkpoint(lying)

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="not a loda checkpoint"):
        load_checkpoint(plain)


def _with_header(path, header: dict):
    """``path`` rewritten with a safetensors header of our own making (its tensors' bytes kept)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    old = json.loads(data[8 : 8 + size])
    new = json.dumps({**{k: v for k, v in old.items() if k != "__metadata__"}, **header}).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + size :])
    return path


@pytest.mark.parametrize("metadata", [["a", "list"], {"loda": 5}, {"loda": "[" * 100_000}],
                         ids=["list", "number", "deep-nesting"])
def test_a_checkpoint_with_a_malformed_metadata_block_is_refused_in_one_line(tiny_checkpoint, metadata):
    with pytest.raises(CheckpointError):
        read_metadata(_with_header(tiny_checkpoint, {"__metadata__": metadata}))


@pytest.mark.parametrize("change, message", [
    ({"cross_attn_heads": 0}, "positive whole number"),
    ({"latent_dim": -64}, "positive whole number"),
    ({"vit_kwargs": {"pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/evil.pth"}}}, "not a backbone size"),
    ({"vit_kwargs": {"checkpoint_path": "/etc/passwd"}}, "not a backbone size"),
    ({"vit_kwargs": {"depth": [1, 2]}}, "plain number"),
    ({"vit_kwargs": {"embed_dim": 1 << 17, "num_heads": 4}}, "GiB of weights"),
    ({"vit_kwargs": {"embed_dim": 190, "num_heads": 4}}, "cannot be built"),
], ids=["no-heads", "negative", "weights-url", "checkpoint-path", "list", "too-large", "unbuildable"])
def test_a_checkpoint_whose_architecture_is_hostile_is_refused_before_it_is_built(
    tmp_path, tiny_checkpoint, monkeypatch, change, message
):
    """Its metadata chooses only sizes, never where weights come from, and a model that would not
    fit in memory is refused before a byte of it is allocated."""
    from safetensors.torch import load_file, save_file

    import loda_cli.model as model_module

    built = []
    real_create = model_module._create_backbone
    monkeypatch.setattr(model_module, "_create_backbone", lambda *a, **k: built.append(k) or real_create(*a, **k))
    meta = read_metadata(tiny_checkpoint)
    meta["config"].update(change)
    if "vit_kwargs" in change:
        meta["config"]["vit_kwargs"] = {**read_metadata(tiny_checkpoint)["config"]["vit_kwargs"], **change["vit_kwargs"]}
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(str(tiny_checkpoint)), str(hostile), metadata={"loda": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(hostile)
    if message in ("not a backbone size", "plain number", "positive whole number"):
        assert not built  # refused as it was read: timm never saw it


def test_calibration_is_monotonic_and_respects_direction():
    raws = [i / 50 - 1 for i in range(101)]
    up = Calibration("logistic4", [5.0, 1.0, 0.1, 0.2], 1.0, 5.0, False)
    scores = [up.to_score(r) for r in raws]
    assert all(b >= a for a, b in zip(scores, scores[1:]))
    assert 0.0 <= min(scores) and max(scores) <= 1.0 and scores[-1] > 0.9 and scores[0] < 0.1
    assert up.to_mos(1.0) == pytest.approx(5.0, abs=0.05)

    # LIVE-style DMOS: the model's raw output rises with DMOS, i.e. with worse quality.
    dmos = Calibration("logistic4", [90.0, 10.0, 0.0, 0.2], 0.0, 100.0, True)
    s = [dmos.to_score(r) for r in raws]
    assert all(b <= a for a, b in zip(s, s[1:]))
    assert s[0] > 0.8 and s[-1] < 0.2

    none = Calibration("none", [], 1.0, 5.0, False)
    assert none.to_score(-1.0) == 0.0 and none.to_score(1.0) == 1.0
    assert none.to_mos(0.0) == pytest.approx(3.0)

    lin = Calibration("linear", [2.0, 3.0], 1.0, 5.0, False)
    assert lin.to_mos(0.5) == pytest.approx(4.0)
    assert Calibration.from_dict(up.to_dict()) == up
    with pytest.raises(CheckpointError):
        Calibration.from_dict({"method": "spline"})


def test_calibration_fit_recovers_a_monotonic_map():
    import numpy as np

    rng = np.random.default_rng(0)
    raw = rng.uniform(-0.5, 0.5, 300)
    labels = 1 + 4 / (1 + np.exp(-raw / 0.1)) + rng.normal(0, 0.05, 300)
    cal = Calibration.fit(raw.tolist(), labels.tolist(), 1.0, 5.0, False)
    assert cal.method in ("logistic4", "linear")
    pred = [cal.to_mos(r) for r in raw]
    assert np.corrcoef(pred, labels)[0, 1] > 0.98


def test_resolve_model(tmp_path, tiny_checkpoint, monkeypatch):
    assert resolve_model(str(tiny_checkpoint)).path == tiny_checkpoint
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing.safetensors"))
    dest = import_checkpoint(tiny_checkpoint, "koniq-mine")
    assert dest.parent == checkpoints_dir()
    assert resolve_model("koniq-mine").path == dest
    with pytest.raises(ModelNotFoundError, match="did you mean 'koniq-mine'"):
        resolve_model("koniq-mien")
    # With no --model the best real checkpoint in $LODA_HOME wins over the built-in one.
    assert resolve_model(None).name == "koniq-mine"

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "manifest.json").write_text(
        json.dumps({"models": [{"name": "shipped", "file": "shipped.safetensors", "builtin": True}]})
    )
    (weights / "shipped.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.setenv("LODA_WEIGHTS_DIR", str(weights))
    assert resolve_model("shipped").builtin
    dest.unlink()
    fallback = resolve_model(None)
    assert fallback.builtin and fallback.name == "shipped"


def test_a_home_checkpoint_below_the_builtin_models_srcc_is_not_the_default(tmp_path, tiny_model, monkeypatch):
    """A smoke run (SRCC -0.6 on its test set) quietly replaced the built-in model in every
    `loda score`; now only a checkpoint at least as good as the built-in model's cross-validated
    SRCC is the default, and `loda score` names the ones it passed over."""
    from PIL import Image

    from loda_cli.weights import Calibration, home_checkpoints_below_builtin, list_models, save_checkpoint

    monkeypatch.setenv("LODA_HOME", str(tmp_path / "home"))
    weights = tmp_path / "weights"
    weights.mkdir()
    manifest = {"models": [{"name": "shipped", "file": "shipped.safetensors", "builtin": True,
                            "metrics": {"cross_validation_median_srcc": 0.8}}]}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("LODA_WEIGHTS_DIR", str(weights))

    def checkpoint(path, srcc):
        save_checkpoint(tiny_model, path, name=path.stem, calibration=Calibration("logistic4", [5.0, 1.0, 0.0, 0.05], 1.0, 5.0, False),
                        preprocess=Preprocess(num_crops=3), dataset={"name": "test", "scale": [1, 5]},
                        metrics={"srcc": srcc, "plcc": 0.5})
        return path

    checkpoint(weights / "shipped.safetensors", 0.8)
    checkpoints_dir().mkdir(parents=True)
    checkpoint(checkpoints_dir() / "smoke.safetensors", -0.6)
    assert resolve_model(None).name == "shipped"
    assert home_checkpoints_below_builtin(list_models()) == [("smoke", -0.6)]
    assert resolve_model("smoke").name == "smoke"  # named, it is used
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.effect_noise((96, 72), 30).convert("RGB").save(photos / "a.jpg")
    r = runner.invoke(app, ["score", str(photos), "--workers", "0"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "not used by default, below the built-in model's cross-validated SRCC 0.800: smoke (test SRCC -0.600)" in text

    checkpoint(checkpoints_dir() / "good.safetensors", 0.9)
    assert resolve_model(None).name == "good"


def test_import_authors_format_pt(tmp_path, tiny_model, tiny_config):
    pt = tmp_path / "official.pt"
    torch.save(to_official_state_dict(tiny_model), pt)
    dest = import_checkpoint(pt, "from-authors", config=tiny_config, dataset="live")
    loaded, meta = load_checkpoint(dest)
    assert meta["imported_from"] == "official.pt"
    assert meta["calibration"]["lower_better"] is True
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))
    assert meta["preprocess"]["interpolation"] == "bicubic"
    # Scored with the dataset's own resize, as loda train records it: KonIQ-10k's is bilinear.
    koniq = import_checkpoint(pt, "from-authors-koniq", config=tiny_config, dataset="koniq")
    assert load_checkpoint(koniq)[1]["preprocess"]["interpolation"] == "bilinear"


class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"learner": _Exploit(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        import_checkpoint(evil, "evil")
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError):
        import_checkpoint(raw, "evil2")
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line_with_its_reason(tmp_path, monkeypatch):
    """Text or an empty file named .pt: the unpickler raised KeyError (a traceback) and an empty
    file gave an error ending in a bare colon."""
    monkeypatch.setenv("LODA_HOME", str(tmp_path / "home"))
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, reason in (("text.pt", "not a pickle or zip file torch can read"), ("empty.pt", "empty or cut short")):
        r = runner.invoke(app, ["weights", "import", str(tmp_path / name), "--name", name[:-3]])
        assert r.exit_code == 1, r.output
        assert f"is not a readable PyTorch checkpoint ({reason})" in r.output
        assert "Traceback" not in r.output and r.output.count("\n") <= 2


def test_import_refuses_an_unknown_or_contradicting_dataset(tmp_path, tiny_checkpoint, monkeypatch):
    """--dataset was silently ignored: a misspelt name, or one a loda checkpoint contradicts."""
    monkeypatch.setenv("LODA_HOME", str(tmp_path / "home"))
    r = runner.invoke(app, ["weights", "import", str(tiny_checkpoint), "--name", "a", "--dataset", "bogus"])
    assert r.exit_code == 2 and "unknown dataset 'bogus'" in r.output
    r = runner.invoke(app, ["weights", "import", str(tiny_checkpoint), "--name", "a", "--dataset", "koniq"])
    assert r.exit_code == 2 and "records its own dataset" in r.output
    assert not (tmp_path / "home" / "checkpoints" / "a.safetensors").exists()
    r = runner.invoke(app, ["weights", "import", str(tiny_checkpoint), "--name", "a"])
    assert r.exit_code == 0, r.output


def test_missing_backbone_weights_offline_is_one_sentence():
    with pytest.raises(BackboneUnavailableError, match="'test_vit'.*not in the Hugging Face cache"):
        LoDa(LoDaConfig(vit="test_vit", cnn="test_resnet"), pretrained=True)


def test_unreachable_hub_errors_quickly_without_retry_loop(tmp_path):
    """With the hub unreachable (not merely flagged offline), the error still comes at once."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from loda_cli.model import LoDa; from loda_cli.config import LoDaConfig\n"
        "from loda_cli.errors import BackboneUnavailableError\n"
        "try:\n    LoDa(LoDaConfig(vit='test_vit', cnn='test_resnet'), pretrained=True)\n"
        "except BackboneUnavailableError as e:\n    print('OK', e)\n"
    )
    # The timeout guards against a hang; it is not a performance threshold.
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("OK"), out.stderr
    assert "Retry" not in out.stderr


def test_weights_cli_list_info_import(tmp_path, tiny_checkpoint, tiny_model):
    result = runner.invoke(app, ["weights", "import", str(tiny_checkpoint), "--name", "mine"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0 and "mine" in result.output and "test_vit" in result.output
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert json.loads(result.stdout)[0]["name"] == "mine"
    result = runner.invoke(app, ["weights", "info", "mine"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["kind"] == "full" and len(info["sha256"]) == 64
    result = runner.invoke(app, ["weights", "info", "mien"])
    assert result.exit_code == 2 and "did you mean 'mine'" in result.output
    result = runner.invoke(app, ["weights", "import", str(tiny_checkpoint), "--name", "mine"])
    assert result.exit_code == 2 and "already exists" in result.output
    pt = tmp_path / "authors.pt"
    torch.save(to_official_state_dict(tiny_model), pt)
    result = runner.invoke(
        app,
        ["weights", "import", str(pt), "--name", "authors", "--vit", "test_vit", "--cnn", "test_resnet", "--vit-depth", "2"],
    )
    # test_vit defaults to 160 px; the tiny config overrides img_size, so this shape check fails
    # loudly instead of loading a wrong model.
    assert result.exit_code == 1 and "wrong shape: vit.pos_embed" in result.output
    assert "Traceback" not in result.output


def test_weights_list_and_info_show_what_the_manifest_measured(tmp_path, tiny_checkpoint, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    shipped = weights / "shipped.safetensors"
    shipped.write_bytes(tiny_checkpoint.read_bytes())
    entry = {"name": "shipped", "file": "shipped.safetensors", "builtin": True, "sha256": file_sha256(shipped),
             "metrics": {"heldout_synthetic_srcc": 0.4383, "real_photo_pairs_original_wins": 0.9365}}
    (weights / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("LODA_WEIGHTS_DIR", str(weights))

    listed = runner.invoke(app, ["weights", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    row = json.loads(listed.stdout)[0]
    assert row["metrics"]["heldout_synthetic_srcc"] == 0.4383  # beside the checkpoint's own metrics
    assert row["metrics"].items() >= (read_metadata(shipped).get("metrics") or {}).items()

    for name in ("shipped", str(shipped)):  # by name or by path
        info = runner.invoke(app, ["weights", "info", name])
        assert info.exit_code == 0, info.output
        shown = json.loads(info.stdout)
        assert shown["manifest"]["metrics"]["real_photo_pairs_original_wins"] == 0.9365
        assert "manifest_warning" not in shown

    shipped.write_bytes(tiny_checkpoint.read_bytes()[:-1] + b" ")  # another file than the manifest's
    shown = json.loads(runner.invoke(app, ["weights", "info", "shipped"]).stdout)
    assert "differs" in shown["manifest_warning"]


def test_weights_dir_finds_the_copy_a_non_editable_install_makes(tmp_path, monkeypatch):
    import loda_cli.weights as weights_module
    from loda_cli.weights import weights_dir

    monkeypatch.delenv("LODA_WEIGHTS_DIR", raising=False)
    site = tmp_path / "site-packages" / "loda_cli"
    site.mkdir(parents=True)
    monkeypatch.setattr(weights_module, "__file__", str(site / "weights.py"))
    prefix = tmp_path / "venv"
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert weights_dir() == tmp_path / "site-packages" / "weights"  # nothing installed: the default
    installed = prefix / "share" / "loda" / "weights"
    installed.mkdir(parents=True)
    (installed / "manifest.json").write_text('{"models": []}')
    assert weights_dir() == installed
    checkout = tmp_path / "site-packages" / "weights"
    checkout.mkdir()
    (checkout / "manifest.json").write_text('{"models": []}')
    assert weights_dir() == checkout  # a checkout's own weights/ wins
