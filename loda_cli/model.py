"""LoDa: a frozen ViT with local distortion features injected by small trained adapters.

Xu et al., "Boosting Image Quality Assessment through Efficient Transformer Adaptation with Local
Feature Enhancement", CVPR 2024.

A frozen CNN gives multi-scale features. A *local distortion extractor* turns each CNN stage into
7x7 = 49 tokens of dimension 64 (196 "distortion tokens" for four stages). Before every ViT block a
*local distortion injector* projects the token sequence down to 64 dims, lets it attend to the
distortion tokens, projects back up and adds the result, scaled by a learned per-channel factor
that starts close to zero. The CLS token after the final norm goes through a cosine head, so the
raw score lies in [-1, 1].

Order of this file: building blocks, the model, the import filter for the authors' checkpoints.
This module does no file I/O and no downloads beyond what timm does for ``pretrained=True``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loda_cli.config import LoDaConfig
from loda_cli.errors import BackboneUnavailableError, StateDictMismatchError

# ---------------------------------------------------------------------------------------------
# Building blocks


class TwoLayerMlp(nn.Module):
    """fc1 -> GELU -> fc2 (the injector's down and up projections)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context``; q/kv without bias, proj with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)  # k and v stacked, k first
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        m = context.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DistortionExtractor(nn.Module):
    """One branch per CNN stage: Conv1x1 -> GELU -> Conv3x3 -> AdaptiveAvgPool(grid x grid)."""

    def __init__(self, in_channels: list[int], latent_dim: int, grid_size: int):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, latent_dim, kernel_size=1, bias=True),
                nn.GELU(),
                nn.Conv2d(latent_dim, latent_dim, kernel_size=3, padding=1, bias=False),
                nn.AdaptiveAvgPool2d(grid_size),
            )
            for c in in_channels
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # Each stage gives (B, D, g, g), as (B, g*g, D) tokens in row-major order; concatenated.
        return torch.cat([stage_tokens(stage, f) for stage, f in zip(self.stages, features)], dim=1)


def stage_tokens(stage: nn.Sequential, feature: torch.Tensor) -> torch.Tensor:
    """One extractor branch on one CNN feature map: (B, C, H, W) -> (B, g*g, D) tokens.

    The 3x3 convolution and the average pooling after it are both linear, so pooling first and
    convolving after gives the same tokens. Each pooling cell's mean of the convolution's output
    is the 3x3 kernel applied to the means of nine windows, the cell shifted by each kernel tap
    (zeros beyond the border, as the convolution's padding): a (g*g, 9*D) by (9*D, D) product
    instead of a D-to-D convolution at every position of the map. Where the map divides evenly
    into the grid (every case of the paper's and the built-in model's 224-pixel crops) that is
    what runs: for the built-in model it removes 0.29 of 1.22 GFLOP a crop. Exact up to float
    rounding (README, "Speed"); any other shape runs the branch's own layers.
    """
    conv1, act, conv3, pool = stage
    grid = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
    h, w = feature.shape[-2:]
    gh, gw = grid
    exact = (
        gh is not None and gw is not None and h % gh == 0 and w % gw == 0 and (h, w) != (gh, gw)
        and conv3.kernel_size == (3, 3) and conv3.padding == (1, 1) and conv3.stride == (1, 1)
        and conv3.dilation == (1, 1) and conv3.groups == 1 and conv3.padding_mode == "zeros"
    )
    if not exact:
        return stage(feature).flatten(2).transpose(1, 2)
    sh, sw = h // gh, w // gw
    y = act(conv1(feature)).permute(0, 2, 3, 1)  # (B, H, W, D): a view where the map is channels-last
    b, d = y.shape[0], y.shape[-1]
    padded = F.pad(y, (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, D)
    # Sums over each cell's columns, shifted by the kernel's column tap j: (B, H+2, gw, D) each.
    columns = [padded[:, :, j : j + w].reshape(b, h + 2, gw, sw, d).sum(3) for j in range(3)]
    # Then over its rows, shifted by the row tap i: (B, gh, gw, 9, D), taps in the kernel's order.
    windows = torch.stack(
        [columns[j][:, i : i + h].reshape(b, gh, sh, gw, d).sum(2) for i in range(3) for j in range(3)], dim=3
    )
    kernel = conv3.weight.permute(0, 2, 3, 1).reshape(conv3.out_channels, 9 * d) / (sh * sw)
    tokens = windows.reshape(b, gh * gw, 9 * d) @ kernel.t()
    return tokens if conv3.bias is None else tokens + conv3.bias


class DistortionInjector(nn.Module):
    """Down-project the ViT tokens, attend to the distortion tokens, project back up."""

    def __init__(self, embed_dim: int, latent_dim: int, num_heads: int):
        super().__init__()
        self.down = TwoLayerMlp(embed_dim, latent_dim, latent_dim)
        self.cross_attn = CrossAttention(latent_dim, num_heads)
        self.up = TwoLayerMlp(latent_dim, embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, distortion_tokens: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        d = d + self.cross_attn(d, distortion_tokens)
        return self.up(d)


def pooled_feature(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The CLS token after the final norm (the mean of the patch tokens for a ViT without one)."""
    if vit.cls_token is not None:
        return tokens[:, 0]
    return tokens[:, vit.num_prefix_tokens :].mean(dim=1)


class CosineHead(nn.Module):
    """Cosine similarity between the feature and one learned direction; no bias."""

    def __init__(self, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, 1))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)


# ---------------------------------------------------------------------------------------------
# The model


def _create_backbone(name: str, pretrained: bool, weights_file: str | None, **kwargs) -> nn.Module:
    import timm

    overlay = {"file": weights_file} if (pretrained and weights_file) else None
    try:
        if pretrained and not weights_file:
            # Without a reachable hub, go straight to the cache: huggingface_hub would otherwise
            # retry each file with back-off for most of a minute before giving up.
            with _hub_offline(not _hub_reachable()):
                return timm.create_model(name, pretrained=True, **kwargs)
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneUnavailableError(f"timm has no model named {name!r}") from exc
        if not pretrained:
            raise
        raise BackboneUnavailableError(_missing_weights_message(name, exc)) from exc
    except (OSError, ValueError) as exc:
        if not pretrained:
            raise
        raise BackboneUnavailableError(_missing_weights_message(name, exc)) from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the Hugging Face endpoint; False when offline is requested."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Put huggingface_hub in offline mode for the duration (its flag is read at import)."""
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _missing_weights_message(name: str, exc: BaseException) -> str:
    return (
        f"pretrained weights for backbone {name!r} are not in the Hugging Face cache and the hub is "
        f"unreachable; run once online so timm caches them (HF_HOME, default ~/.cache/huggingface), "
        f"or give a local weights file (`loda train --vit-weights FILE` / `--cnn-weights FILE`); "
        f"--no-pretrained trains on random backbones (experiments only)"
    )


class LoDa(nn.Module):
    """The LoDa IQA model. ``forward`` maps a Bx3x224x224 normalised batch to Bx1 raw scores."""

    def __init__(self, config: LoDaConfig | None = None, pretrained: bool = False):
        super().__init__()
        self.config = config = config or LoDaConfig()
        self.pretrained = pretrained
        self.vit = _create_backbone(
            config.vit, pretrained, config.vit_weights, num_classes=0, **config.vit_kwargs
        )
        if getattr(self.vit, "blocks", None) is None or getattr(self.vit, "patch_embed", None) is None:
            raise BackboneUnavailableError(f"{config.vit!r} is not a timm VisionTransformer")
        self.cnn = _create_backbone(
            config.cnn,
            pretrained,
            config.cnn_weights,
            features_only=True,
            out_indices=config.cnn_out_indices,
            **config.cnn_kwargs,
        )
        embed_dim = self.vit.embed_dim
        depth = len(self.vit.blocks)
        self.extractor = DistortionExtractor(
            self.cnn.feature_info.channels(), config.latent_dim, config.grid_size
        )
        self.injectors = nn.ModuleList(
            DistortionInjector(embed_dim, config.latent_dim, config.cross_attn_heads)
            for _ in range(depth)
        )
        self.scale = nn.Parameter(torch.empty(depth, embed_dim))
        self.head_drop = nn.Dropout(config.dropout)
        self.head = CosineHead(embed_dim)
        self._init_adapters()
        self.set_trainable(config.trainable)

    def _init_adapters(self) -> None:
        for module in self.injectors.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The paper's "close to 0" scale: injected features start as a small perturbation.
        nn.init.trunc_normal_(self.scale, std=0.02)

    def set_trainable(self, trainable: str) -> None:
        """Freeze the backbones ("adapters", the paper), train the ViT too but keep the pretrained
        CNN frozen ("vit": the built-in model, whose ViT starts from scratch), or train
        everything ("full")."""
        self.config.trainable = trainable
        for p in self.vit.parameters():
            p.requires_grad_(trainable in ("full", "vit"))
        for p in self.cnn.parameters():
            p.requires_grad_(trainable == "full")

    @property
    def backbones_frozen(self) -> bool:
        return self.config.trainable == "adapters"

    @property
    def cnn_frozen(self) -> bool:
        return self.config.trainable != "full"

    def train(self, mode: bool = True) -> LoDa:
        super().train(mode)
        if mode and self.backbones_frozen:
            # A frozen ViT has nothing to adapt; keep its (usually zero) dropouts off.
            self.vit.eval()
        if mode and self.cnn_frozen and not self.config.update_cnn_bn_stats:
            self.cnn.eval()
        return self

    # -- forward stages (as timm: each can be run and tested alone) --------------------------

    def forward_cnn(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the CNN's feature maps, one per stage of ``cnn_out_indices``."""
        if self.cnn_frozen:
            # No gradient can reach frozen CNN weights; skipping its graph saves memory. BatchNorm
            # running statistics still update in train mode, as in the release.
            with torch.no_grad():
                return self.cnn(x)
        return self.cnn(x)

    def forward_distortion_tokens(
        self, x: torch.Tensor, cnn_features: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) -> (B, stages * grid^2, latent_dim) distortion tokens.

        ``cnn_features`` (the output of :meth:`forward_cnn` for ``x``) skips the CNN: a frozen
        CNN's features can be computed once and reused across epochs.
        """
        if cnn_features is None:
            cnn_features = self.forward_cnn(x)
        return self.extractor(cnn_features)

    def forward_features(self, x: torch.Tensor, cnn_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, embed_dim) ViT tokens after the final norm."""
        distortion_tokens = self.forward_distortion_tokens(x, cnn_features)
        vit = self.vit
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block, injector, scale in zip(vit.blocks, self.injectors, self.scale):
            tokens = tokens + scale * injector(tokens, distortion_tokens)
            tokens = block(tokens)
        return vit.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, embed_dim) -> (B, 1) raw score in [-1, 1]."""
        return self.head(self.head_drop(pooled_feature(self.vit, tokens)))

    def forward(self, x: torch.Tensor, cnn_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, cnn_features))

    # -- parameters and state ----------------------------------------------------------------

    def adapter_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        return {
            "extractor": self.extractor,
            "injectors": self.injectors,
            "scale": self.scale,
            "head": self.head,
        }

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def cnn_bn_buffers(self) -> dict[str, torch.Tensor]:
        """The CNN's BatchNorm running statistics, keyed by their names inside the CNN."""
        return {
            name: buf
            for name, buf in self.cnn.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        }

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> LoadReport:
        """Load a state dict in the authors' release format.

        Accepts their full model state dict (ViT tensors at top level, ``feature_model.*``,
        ``learner.*``) or their training checkpoint ``{"learner": ..., "bn_buffer": ...}``; in the
        latter case the backbone weights must already be in this model. Raises
        :class:`StateDictMismatchError` naming the tensors when the result would be wrong; the
        returned report lists unexpected keys that were ignored.
        """
        converted, partial = convert_official_state_dict(state_dict)
        return self.load_loda_state_dict(converted, adapters_only=partial)

    def load_loda_state_dict(self, state_dict: dict[str, torch.Tensor], adapters_only: bool) -> LoadReport:
        """Load tensors named as in this module, checking names and shapes strictly."""
        own = self.state_dict()
        report = LoadReport()
        for key, tensor in state_dict.items():
            if key not in own:
                report.unexpected.append(key)
            elif tuple(own[key].shape) != tuple(tensor.shape):
                report.wrong_shape.append(f"{key}: {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        required = self.adapter_state_keys() if adapters_only else list(own)
        report.missing = [k for k in required if k not in state_dict]
        if report.missing or report.wrong_shape:
            raise StateDictMismatchError(report.describe())
        usable = {k: v for k, v in state_dict.items() if k in own}
        self.load_state_dict(usable, strict=False)
        return report

    def adapter_state_keys(self) -> list[str]:
        """The keys an adapter-only checkpoint must hold: adapters, head, CNN BN statistics."""
        prefixes = ("extractor.", "injectors.", "head.")
        keys = [k for k in self.state_dict() if k.startswith(prefixes) or k == "scale"]
        keys += ["cnn." + k for k in self.cnn_bn_buffers()]
        return keys


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    def describe(self, limit: int = 8) -> str:
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("wrong shape", self.wrong_shape),
            ("unexpected", self.unexpected),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
                parts.append(f"{label}: {shown}")
        return "state dict does not match the model; " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The authors' tensor names


_LEARNER_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^conv\.(\d+)\.(0|2)\.(weight|bias)$"), r"extractor.stages.\1.\2.\3"),
    (re.compile(r"^down_proj\.(\d+)\.(fc1|fc2)\.(weight|bias)$"), r"injectors.\1.down.\2.\3"),
    (re.compile(r"^up_proj\.(\d+)\.(fc1|fc2)\.(weight|bias)$"), r"injectors.\1.up.\2.\3"),
    (re.compile(r"^cross_attn\.(\d+)\.(q|kv)\.weight$"), r"injectors.\1.cross_attn.\2.weight"),
    (re.compile(r"^cross_attn\.(\d+)\.proj\.(weight|bias)$"), r"injectors.\1.cross_attn.proj.\2"),
    (re.compile(r"^scale_factor$"), "scale"),
    (re.compile(r"^head\.weight$"), "head.weight"),
]


def _convert_learner_key(key: str) -> str | None:
    for pattern, replacement in _LEARNER_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename the authors' tensors to this module's names: a pure function.

    Returns ``(converted, adapters_only)``. Keys that match no rule are kept under an
    ``unexpected.`` prefix so the loader reports them by name rather than dropping them silently.
    """
    if set(state_dict) >= {"learner", "bn_buffer"} and isinstance(state_dict["learner"], dict):
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict["learner"].items():
            new = _convert_learner_key(key)
            out[new if new else f"unexpected.learner.{key}"] = tensor
        for key, tensor in state_dict["bn_buffer"].items():
            out["cnn." + key] = tensor
        return out, True

    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("learner."):
            new = _convert_learner_key(key[len("learner.") :])
            out[new if new else f"unexpected.{key}"] = tensor
        elif key.startswith("feature_model."):
            out["cnn." + key[len("feature_model.") :]] = tensor
        else:
            out["vit." + key] = tensor
    return out, False


def to_official_state_dict(model: LoDa) -> dict[str, torch.Tensor]:
    """The inverse rename: this model's tensors under the authors' names (used by tests and
    export)."""
    inverse = [
        (re.compile(r"^extractor\.stages\.(\d+)\.(0|2)\.(weight|bias)$"), r"learner.conv.\1.\2.\3"),
        (re.compile(r"^injectors\.(\d+)\.down\.(fc1|fc2)\.(weight|bias)$"), r"learner.down_proj.\1.\2.\3"),
        (re.compile(r"^injectors\.(\d+)\.up\.(fc1|fc2)\.(weight|bias)$"), r"learner.up_proj.\1.\2.\3"),
        (re.compile(r"^injectors\.(\d+)\.cross_attn\.(q|kv|proj)\.(weight|bias)$"), r"learner.cross_attn.\1.\2.\3"),
        (re.compile(r"^scale$"), "learner.scale_factor"),
        (re.compile(r"^head\.weight$"), "learner.head.weight"),
        (re.compile(r"^vit\.(.*)$"), r"\1"),
        (re.compile(r"^cnn\.(.*)$"), r"feature_model.\1"),
    ]
    out = {}
    for key, tensor in model.state_dict().items():
        for pattern, replacement in inverse:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = tensor
                break
        else:
            raise KeyError(f"no official name for {key}")
    return out
