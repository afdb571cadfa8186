"""The comparison methods of Tables 6 and 7: what trains, forward/backward, checkpoints."""

from __future__ import annotations

import pytest
import torch

from loda_cli import baselines
from loda_cli.baselines import build_baseline, build_method
from loda_cli.config import LoDaConfig, TrainConfig
from loda_cli.errors import UsageError
from loda_cli.model import LoDa
from loda_cli.weights import load_checkpoint, read_metadata, save_checkpoint

from .conftest import TINY_KW

D, DEPTH = 64, 2  # test_vit's width and the depth the tests use
R, P = baselines.ADAPTER_BOTTLENECK, baselines.VPT_PROMPTS
HEAD = D  # the cosine head: D x 1, no bias


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waiting makes them several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config() -> LoDaConfig:
    return LoDaConfig(**TINY_KW)


def _expected(model) -> tuple[set[str], int]:
    """Each method's trainable parameter names (as prefixes) and count, derived by hand."""
    method = model.method
    if method == "linear":
        return {"head."}, HEAD
    if method in ("full", "vit"):
        return {"vit.", "head."}, sum(p.numel() for p in model.vit.parameters()) + HEAD
    if method == "adapter":
        per = 2 * (D * R + R + R * D + D)
        return {"adapters.", "head."}, DEPTH * per + HEAD
    if method == "lora":
        r = baselines.LORA_RANK
        return {"vit.blocks.", "head."}, DEPTH * (D * r + r * 3 * D) + HEAD
    if method == "vpt":
        return {"prompts", "head."}, DEPTH * P * D + HEAD
    if method == "add":
        extractor = sum(p.numel() for p in model.extractor.parameters())
        up = DEPTH * (64 * D + D + D * D + D)
        return {"extractor.", "up.", "scale", "head."}, extractor + up + DEPTH * D + HEAD
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["linear", "full", "vit", "adapter", "lora", "vpt", "add"])
def test_each_method_trains_exactly_its_parts(method):
    torch.manual_seed(0)
    model = build_method(method, _config())
    prefixes, count = _expected(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == count == model.num_trainable_params()
    assert all(n.startswith(tuple(prefixes)) for n in trainable)
    if method == "lora":
        assert all(".lora_" in n for n in trainable if n.startswith("vit."))
        assert len([n for n in trainable if ".lora_" in n]) == 2 * DEPTH
    assert model.backbones_frozen == (method not in ("full", "vit"))
    assert model.config.trainable == ("full" if method in ("full", "vit") else "adapters")

    # Forward/backward: Bx3x224x224 -> Bx1 raw in [-1, 1]; gradients reach only trained parts.
    model.train()
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    assert out.shape == (2, 1) and float(out.detach().abs().max()) <= 1.0 + 1e-6
    # Push every trainable tensor away from its zero initialisation first, so gradients flow
    # through the zero-initialised up projections of adapters and LoRA too.
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.01 * torch.randn_like(p))
    out = model(x)
    (out[0] - out[1]).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name


def test_frozen_vit_stays_in_eval_mode_while_training():
    model = build_method("adapter", _config()).train()
    assert model.training and not model.vit.training
    full = build_method("full", _config()).train()
    assert full.vit.training


def test_zero_initialised_parts_start_at_the_pretrained_function():
    torch.manual_seed(0)
    lora = build_method("lora", _config()).eval()
    x = torch.randn(1, 3, 224, 224)
    qkv = lora.vit.blocks[0].attn.qkv
    tokens = torch.randn(1, 5, D)
    assert torch.equal(qkv(tokens), qkv.base(tokens))  # B = 0
    adapter = build_method("adapter", _config()).eval()
    assert torch.count_nonzero(adapter.adapters[0]["attn"](tokens)) == 0
    with torch.no_grad():
        assert lora(x).shape == (1, 1)


def test_add_pairs_one_distortion_token_with_each_patch():
    model = build_method("add", _config())
    x = torch.randn(1, 3, 224, 224)
    assert model.forward_distortion_tokens(x).shape == (1, model.vit.patch_embed.num_patches, 64)
    with pytest.raises(UsageError, match="one to one"):
        build_method("add", LoDaConfig(**{**TINY_KW, "grid_size": 5}))


def test_vpt_inserts_prompts_after_the_cls_token():
    model = build_method("vpt", _config()).eval()
    seen = []
    model.vit.blocks[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen == [torch.Size([1, 1 + P + 196, D])]


def test_unknown_method_suggests_a_name():
    with pytest.raises(UsageError, match="did you mean 'lora'"):
        build_method("lorra", _config())
    with pytest.raises(UsageError):
        build_baseline(TrainConfig(method="loda", model=_config()))
    assert isinstance(build_method("loda", _config()), LoDa)


@pytest.mark.parametrize("method", ["linear", "adapter", "lora", "vpt", "add", "full"])
def test_checkpoint_round_trip(method, tmp_path):
    torch.manual_seed(1)
    cfg = TrainConfig(method=method, model=_config(), pretrained=False)
    model = build_baseline(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    if method == "add":  # BatchNorm statistics are saved too
        model.train()
        model(torch.randn(4, 3, 224, 224))
    model.eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", name="m", extra={"method": method})
    meta = read_metadata(path)
    assert meta["kind"] == "full" and meta["method"] == method
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method", ["adapter", "lora", "vpt", "add"])
def test_adapter_only_state_restores_every_trained_tensor(method):
    """An adapter checkpoint (pretrained, frozen backbones) holds adapter_state_keys(); loading
    those into a model with the same backbone weights must reproduce the trained model."""
    torch.manual_seed(2)
    trained = build_method(method, _config())
    torch.manual_seed(2)
    fresh = build_method(method, _config())
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained.train()
    trained(torch.randn(3, 3, 224, 224))  # moves the CNN's BatchNorm statistics (add)
    trained.eval()
    state = trained.state_dict()
    keys = trained.adapter_state_keys()
    assert set(keys) >= {n for n, p in trained.named_parameters() if p.requires_grad}
    if method == "add":
        assert any(k.startswith("cnn.") and k.endswith("running_mean") for k in keys)
    fresh.load_loda_state_dict({k: state[k] for k in keys}, adapters_only=True)
    fresh.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_loda_checkpoints_still_load_through_the_method_loader(tiny_checkpoint):
    model, meta = load_checkpoint(tiny_checkpoint)
    assert isinstance(model, LoDa) and meta.get("method") is None
