"""The LoDa module: stages, parameter freezing, the paper's count, numerics, official import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loda_cli.config import LoDaConfig
from loda_cli.errors import StateDictMismatchError
from loda_cli.model import DistortionExtractor, LoDa, convert_official_state_dict, stage_tokens, to_official_state_dict

GOLDEN = Path(__file__).parent / "golden" / "tiny_loda.safetensors"


def test_paper_default_trainable_parameter_count():
    model = LoDa(LoDaConfig())
    assert model.num_trainable_params() == 8_927_488
    assert model.config.vit == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert model.cnn.feature_info.channels() == [256, 512, 1024, 2048]


def test_stage_shapes(tiny_model):
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        tokens = tiny_model.forward_distortion_tokens(x)
        features = tiny_model.forward_features(x)
        raw = tiny_model.forward_head(features)
    assert tokens.shape == (3, 4 * 49, 64)
    assert features.shape == (3, 1 + 196, tiny_model.vit.embed_dim)
    assert raw.shape == (3, 1)
    assert torch.all(raw.abs() <= 1.0 + 1e-6)
    assert torch.equal(raw, tiny_model(x))


def test_only_adapters_and_head_train(tiny_model):
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(n.startswith(("extractor.", "injectors.", "head.")) or n == "scale" for n in trainable)
    assert not any(p.requires_grad for p in tiny_model.vit.parameters())
    assert not any(p.requires_grad for p in tiny_model.cnn.parameters())
    tiny_model.set_trainable("full")
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_gradients_reach_every_injector(tiny_model):
    tiny_model.train()
    tiny_model(torch.randn(2, 3, 224, 224)).sum().backward()
    for name, p in tiny_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert tiny_model.injectors[0].down.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("update", [True, False])
def test_cnn_batchnorm_switch(tiny_config, update):
    tiny_config.update_cnn_bn_stats = update
    model = LoDa(tiny_config).train()
    before = {k: v.clone() for k, v in model.cnn_bn_buffers().items() if k.endswith("running_mean")}
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224) * 3 + 1)
    after = model.cnn_bn_buffers()
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed is update
    assert model.cnn.training is update
    assert not model.vit.training


def test_zero_scale_is_the_plain_vit(tiny_model):
    """With the injection scaled to zero the features are exactly the ViT's own."""
    with torch.no_grad():
        tiny_model.scale.zero_()
        x = torch.randn(2, 3, 224, 224)
        ours = tiny_model.forward_features(x)
        reference = tiny_model.vit.forward_features(x)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_cross_attention_matches_explicit_softmax(tiny_model):
    attn = tiny_model.injectors[0].cross_attn
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    q = attn.q(x).view(2, 5, 4, 16).transpose(1, 2)
    k, v = attn.kv(ctx).view(2, 7, 2, 4, 16).unbind(2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attn(x, ctx), expected, rtol=1e-5, atol=1e-6)


def test_cosine_head_is_bounded_and_scale_invariant(tiny_model):
    f = torch.randn(4, tiny_model.vit.embed_dim)
    out = tiny_model.head(f)
    torch.testing.assert_close(out, tiny_model.head(f * 7.5))
    expected = F.cosine_similarity(f, tiny_model.head.weight.T.expand_as(f), dim=-1).unsqueeze(1)
    torch.testing.assert_close(out, expected)


def _layers_tokens(stage, feature):
    """A branch's tokens the plain way: its convolution at every position, then the pooling."""
    return stage(feature).flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    "shape, grid",
    [((56, 56), 7), ((28, 28), 7), ((14, 14), 7), ((56, 28), 7), ((32, 24), (4, 3)), ((30, 30), 7), ((7, 7), 7)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_pooling_before_the_3x3_convolution_gives_the_same_tokens(shape, grid, bias):
    # Evenly divided maps take the pooled path, the rest (30 into 7, 7 into 7) the layers'.
    torch.manual_seed(0)
    extractor = DistortionExtractor([24], latent_dim=16, grid_size=7)
    stage = extractor.stages[0]
    stage[3] = torch.nn.AdaptiveAvgPool2d(grid)
    if bias:
        stage[2].bias = torch.nn.Parameter(torch.randn(16))
    feature = torch.randn(3, 24, *shape)
    grid_hw = grid if isinstance(grid, tuple) else (grid, grid)
    pooled = shape != grid_hw and shape[0] % grid_hw[0] == 0 and shape[1] % grid_hw[1] == 0
    for layout in (torch.contiguous_format, torch.channels_last):
        x = feature.contiguous(memory_format=layout)
        convolved = []
        hook = stage[2].register_forward_hook(lambda *_: convolved.append(1))
        fast = stage_tokens(stage, x)
        hook.remove()
        assert bool(convolved) != pooled  # the pooled path ran exactly where the map divides
        torch.testing.assert_close(fast, _layers_tokens(stage, x), rtol=0, atol=2e-5)


def test_pooled_tokens_train_as_the_convolution_does():
    torch.manual_seed(0)
    extractor = DistortionExtractor([8, 16], latent_dim=12, grid_size=7)
    features = [torch.randn(2, 8, 56, 56), torch.randn(2, 16, 28, 28)]
    target = torch.randn(2, 98, 12)
    grads = []
    for tokens_of in (stage_tokens, _layers_tokens):
        extractor.zero_grad()
        tokens = torch.cat([tokens_of(stage, f) for stage, f in zip(extractor.stages, features)], dim=1)
        F.mse_loss(tokens, target).backward()
        grads.append([p.grad.clone() for p in extractor.parameters()])
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)


def test_golden_output():
    from safetensors.torch import load_file

    from tests.golden.make_golden import GOLDEN_KW

    stored = load_file(str(GOLDEN))
    model = LoDa(LoDaConfig(**GOLDEN_KW)).eval()
    model.load_state_dict({k[len("model.") :]: v for k, v in stored.items() if k.startswith("model.")})
    with torch.no_grad():
        tokens = model.forward_distortion_tokens(stored["input"])
        out = model(stored["input"])
    torch.testing.assert_close(tokens[:, :8], stored["distortion_tokens"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out, stored["output"], rtol=0, atol=1e-5)


def test_acceptance_tiny_config_builds():
    model = LoDa(LoDaConfig(vit="vit_tiny_patch16_224", vit_kwargs={"depth": 2}, cnn="resnet18")).eval()
    assert model.cnn.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1)


def _fresh_copy(config: LoDaConfig) -> LoDa:
    torch.manual_seed(999)  # different weights from the source model
    return LoDa(config).eval()


def test_import_official_full_state_dict(tiny_model, tiny_config):
    official = to_official_state_dict(tiny_model)
    assert "learner.scale_factor" in official and "feature_model.conv1.0.weight" in official
    assert "blocks.0.attn.qkv.weight" in official and "cls_token" in official
    assert official["learner.head.weight"].shape == (tiny_model.vit.embed_dim, 1)
    target = _fresh_copy(tiny_config)
    report = target.load_official_state_dict(official)
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target(x), tiny_model(x), rtol=0, atol=1e-6)


def test_import_official_learner_checkpoint(tiny_model, tiny_config):
    official = to_official_state_dict(tiny_model)
    learner = {k[len("learner.") :]: v for k, v in official.items() if k.startswith("learner.")}
    bn = {k: v for k, v in tiny_model.cnn_bn_buffers().items()}
    target = _fresh_copy(tiny_config)
    # The backbones are already there (as they would be from pretrained weights).
    target.vit.load_state_dict(tiny_model.vit.state_dict())
    target.cnn.load_state_dict(
        {k: v for k, v in tiny_model.cnn.state_dict().items() if k not in bn}, strict=False
    )
    target.load_official_state_dict({"learner": learner, "bn_buffer": bn})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target(x), tiny_model(x), rtol=0, atol=1e-6)


def test_import_reports_missing_wrong_shape_and_unexpected(tiny_model, tiny_config):
    official = to_official_state_dict(tiny_model)
    broken = dict(official)
    del broken["learner.cross_attn.1.kv.weight"]
    with pytest.raises(StateDictMismatchError, match=r"missing: injectors\.1\.cross_attn\.kv\.weight"):
        _fresh_copy(tiny_config).load_official_state_dict(broken)
    wrong = dict(official)
    wrong["learner.scale_factor"] = torch.zeros(3, 5)
    with pytest.raises(StateDictMismatchError, match="wrong shape: scale"):
        _fresh_copy(tiny_config).load_official_state_dict(wrong)
    extra = dict(official)
    extra["learner.mystery.weight"] = torch.zeros(1)
    report = _fresh_copy(tiny_config).load_official_state_dict(extra)
    assert report.unexpected == ["unexpected.learner.mystery.weight"]


def test_convert_is_pure():
    sd = {"learner.scale_factor": torch.zeros(2, 3), "feature_model.bn1.running_mean": torch.zeros(3)}
    snapshot = dict(sd)
    converted, partial = convert_official_state_dict(sd)
    assert sd == snapshot and not partial
    assert set(converted) == {"scale", "cnn.bn1.running_mean"}


def test_cli_import_does_not_import_torch():
    code = "import sys, loda_cli, loda_cli.cli.main; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
