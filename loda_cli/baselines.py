"""The paper's comparison methods (Tables 6 and 7) on the same ViT as LoDa.

Every method here shares LoDa's contract: ``forward`` maps a Bx3x224x224 normalised batch to Bx1
raw scores through the ViT's final norm, the CLS token, dropout and the same cosine head. Each
carries ``config`` (a LoDaConfig: the ViT, CNN and dropout are read from it), ``pretrained`` and
``backbones_frozen``, and the state methods ``train``/``weights`` use (``adapter_state_keys``,
``cnn_bn_buffers``, ``load_loda_state_dict``), so ``loda train --method X`` trains and saves them
like LoDa and :func:`loda_cli.weights.load_checkpoint` reads them back.

Methods (``TrainConfig.method``):

* ``linear``: linear probe. The ViT is frozen; only the head trains (Table 6, first row).
* ``full``: full fine-tuning. Every ViT weight and the head train (Table 6).
* ``vit``: Table 7's "ViT" row. The paper reports the same numbers for it as for "ViT (Full
  fine-tune)" in Table 6 (0.889/0.899 on KADID, 0.874/0.891 on KonIQ) and its text calls it "the
  full-finetuned ViT", so it *is* ``full``; the name is kept so Table 7 reads like the paper.
* ``adapter``: Houlsby adapters. A bottleneck (Linear d->r, GELU, Linear r->d, the up projection
  zero-initialised so training starts from the pretrained function) after the attention and after
  the MLP of every block, added to that sublayer's output before its residual sum.
* ``lora``: LoRA on every block's attention ``qkv`` projection: ``W x + (alpha / r) B A x`` with
  A Kaiming-uniform and B zero, so the model starts as the pretrained ViT.
* ``vpt``: deep visual prompt tuning. Each block gets its own ``p`` learned prompt tokens, placed
  after the CLS token; the prompts a block outputs are dropped and the next block's inserted.
* ``add``: Table 7's "ViT + Extractor". LoDa's CNN and local distortion extractor give 196
  distortion tokens of dim 64; before every block they are projected up to the ViT width (the same
  64 -> D -> D MLP as LoDa's up projection) and *added* to the patch tokens, one to one in order,
  scaled by a per-block vector that starts close to zero as LoDa's does. There is no down
  projection and no cross-attention. Token j of the concatenated 4 x 7x7 grids meets patch token
  j of the 14x14 grid: that positional mismatch is exactly the "misaligned scale" the paper's
  conclusion gives as the reason LoDa queries the distortion tokens by cross-attention instead.

The hyper-parameters are module constants (:data:`HYPERPARAMETERS`), written into every
benchmark result and table footer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loda_cli.config import LoDaConfig
from loda_cli.errors import BackboneUnavailableError, UsageError
from loda_cli.model import (
    CosineHead,
    DistortionExtractor,
    LoDa,
    TwoLayerMlp,
    _create_backbone,
    pooled_feature,
)

ADAPTER_BOTTLENECK = 64  # r of the Houlsby adapters (LoDa's latent width, for a like-for-like size)
LORA_RANK = 8
LORA_ALPHA = 16.0  # the update is scaled by alpha / rank = 2
VPT_PROMPTS = 10  # prompt tokens per block (deep VPT)
# AdamW learning rates. The paper gives none for its baselines; the frozen-backbone methods use
# LoDa's 3e-4. Fine-tuning all 86M ViT-B weights at 3e-4 diverges, so full/vit use 2e-5, a usual
# rate for fine-tuning a ViT-B at batch 128.
METHOD_LR: dict[str, float] = {
    "loda": 3e-4, "linear": 3e-4, "adapter": 3e-4, "lora": 3e-4, "vpt": 3e-4, "add": 3e-4,
    "full": 2e-5, "vit": 2e-5,
}
HYPERPARAMETERS: dict[str, Any] = {
    "adapter_bottleneck": ADAPTER_BOTTLENECK,
    "lora_rank": LORA_RANK,
    "lora_alpha": LORA_ALPHA,
    "lora_targets": "attn.qkv",
    "vpt_prompts_per_block": VPT_PROMPTS,
    "lr": METHOD_LR,
}
METHODS = ("loda", "linear", "full", "vit", "adapter", "lora", "vpt", "add")
METHOD_TITLES: dict[str, str] = {
    "loda": "LoDa",
    "linear": "ViT (Linear Probe)",
    "full": "ViT (Full fine-tune)",
    "vit": "ViT",
    "adapter": "Adapter-ViT",
    "lora": "LoRA-ViT",
    "vpt": "VPT-ViT",
    "add": "ViT + Extractor",
}


# ---------------------------------------------------------------------------------------------
# Building blocks


class Bottleneck(nn.Module):
    """Houlsby adapter: Linear(d -> r) -> GELU -> Linear(r -> d), starting as the zero map."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: ``base(x) + (alpha / r) * B(A(x))``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(x))


# ---------------------------------------------------------------------------------------------
# The methods


class ViTMethod(nn.Module):
    """A timm ViT with LoDa's cosine head. Subclasses add their trainable parts in ``_build`` and
    may override ``forward_features``; the ViT is frozen unless ``trains_backbone``."""

    method = "linear"
    trains_backbone = False

    def __init__(self, config: LoDaConfig | None = None, pretrained: bool = False):
        super().__init__()
        self.config = config = config or LoDaConfig()
        config.trainable = "full" if self.trains_backbone else "adapters"
        self.pretrained = pretrained
        self.vit = _create_backbone(config.vit, pretrained, config.vit_weights, num_classes=0, **config.vit_kwargs)
        if getattr(self.vit, "blocks", None) is None or getattr(self.vit, "patch_embed", None) is None:
            raise BackboneUnavailableError(f"{config.vit!r} is not a timm VisionTransformer")
        self.embed_dim = self.vit.embed_dim
        self.depth = len(self.vit.blocks)
        self._build()
        self.head_drop = nn.Dropout(config.dropout)
        self.head = CosineHead(self.embed_dim)
        for p in self.vit.parameters():
            p.requires_grad_(self.trains_backbone)
        self._unfreeze_own_parts()

    def _build(self) -> None:
        """Add the method's trainable modules (none for a linear probe or full fine-tuning)."""

    def _unfreeze_own_parts(self) -> None:
        """Parts placed inside the ViT (LoRA) must train although the ViT around them is frozen."""

    @property
    def backbones_frozen(self) -> bool:
        return not self.trains_backbone

    def train(self, mode: bool = True) -> ViTMethod:
        super().train(mode)
        if mode and self.backbones_frozen:
            # As LoDa: a frozen ViT keeps its dropouts off. A frozen CNN's BatchNorm statistics
            # keep updating unless the config says otherwise.
            self.vit.eval()
            cnn = getattr(self, "cnn", None)
            if cnn is not None and not self.config.update_cnn_bn_stats:
                cnn.eval()
        return self

    # -- forward stages ----------------------------------------------------------------------

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens and position embedding: the tokens entering block 0."""
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        for block in self.vit.blocks:
            tokens = block(tokens)
        return self.vit.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(pooled_feature(self.vit, tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- parameters and state (the interface train.py and weights.py use) ------------------

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def cnn_bn_buffers(self) -> dict[str, torch.Tensor]:
        cnn = getattr(self, "cnn", None)
        if cnn is None:
            return {}
        return {
            name: buf
            for name, buf in cnn.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        }

    def adapter_state_keys(self) -> list[str]:
        """What an adapter-only checkpoint holds: every trained tensor and the CNN BN statistics."""
        keys = [name for name, p in self.named_parameters() if p.requires_grad]
        keys += ["cnn." + k for k in self.cnn_bn_buffers()]
        return keys

    # The strict name-and-shape loader is LoDa's; it only uses the methods above.
    load_loda_state_dict = LoDa.load_loda_state_dict


class LinearProbe(ViTMethod):
    method = "linear"


class FullFineTune(ViTMethod):
    method = "full"
    trains_backbone = True


class PlainViT(FullFineTune):
    """Table 7's "ViT": the fully fine-tuned ViT (see the module docstring)."""

    method = "vit"


class AdapterViT(ViTMethod):
    method = "adapter"

    def _build(self) -> None:
        self.adapters = nn.ModuleList(
            nn.ModuleDict({"attn": Bottleneck(self.embed_dim, ADAPTER_BOTTLENECK),
                           "mlp": Bottleneck(self.embed_dim, ADAPTER_BOTTLENECK)})
            for _ in range(self.depth)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        for block, adapter in zip(self.vit.blocks, self.adapters):
            # The timm block's own sublayers, with an adapter on each sublayer's output.
            h = block.drop_path1(block.ls1(block.attn(block.norm1(tokens))))
            tokens = tokens + h + adapter["attn"](h)
            h = block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
            tokens = tokens + h + adapter["mlp"](h)
        return self.vit.norm(tokens)


class LoRAViT(ViTMethod):
    method = "lora"

    def _build(self) -> None:
        for block in self.vit.blocks:
            qkv = getattr(block.attn, "qkv", None)
            if not isinstance(qkv, nn.Linear):
                raise UsageError(f"{self.config.vit!r} has no fused qkv projection for LoRA")
            block.attn.qkv = LoRALinear(qkv, LORA_RANK, LORA_ALPHA)

    def _unfreeze_own_parts(self) -> None:
        for block in self.vit.blocks:
            for p in (*block.attn.qkv.lora_a.parameters(), *block.attn.qkv.lora_b.parameters()):
                p.requires_grad_(True)


class VPTViT(ViTMethod):
    method = "vpt"

    def _build(self) -> None:
        self.prompts = nn.Parameter(torch.empty(self.depth, VPT_PROMPTS, self.embed_dim))
        # VPT's initialisation: uniform with the Xavier bound of a patch-sized linear layer.
        patch = self.vit.patch_embed.patch_size
        fan_in = 3 * int(patch[0]) * int(patch[1])
        bound = math.sqrt(6.0 / (fan_in + self.embed_dim))
        nn.init.uniform_(self.prompts, -bound, bound)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        prefix = self.vit.num_prefix_tokens
        batch = tokens.shape[0]
        for i, block in enumerate(self.vit.blocks):
            prompts = self.prompts[i].unsqueeze(0).expand(batch, -1, -1).to(tokens.dtype)
            # Block 0 receives new prompts; later blocks have theirs replaced (deep VPT).
            rest = tokens[:, prefix:] if i == 0 else tokens[:, prefix + VPT_PROMPTS :]
            tokens = block(torch.cat([tokens[:, :prefix], prompts, rest], dim=1))
        return self.vit.norm(tokens)


class AddedDistortionTokens(ViTMethod):
    method = "add"

    def _build(self) -> None:
        config = self.config
        self.cnn = _create_backbone(config.cnn, self.pretrained, config.cnn_weights, features_only=True,
                                    out_indices=config.cnn_out_indices, **config.cnn_kwargs)
        channels = self.cnn.feature_info.channels()
        n_tokens = len(channels) * config.grid_size**2
        n_patches = self.vit.patch_embed.num_patches
        if n_tokens != n_patches:
            raise UsageError(
                f"the add ablation pairs distortion tokens with patch tokens one to one, but the CNN "
                f"gives {n_tokens} tokens ({len(channels)} stages x {config.grid_size}^2) and the ViT "
                f"{n_patches} patches"
            )
        self.extractor = DistortionExtractor(channels, config.latent_dim, config.grid_size)
        self.up = nn.ModuleList(TwoLayerMlp(config.latent_dim, self.embed_dim, self.embed_dim) for _ in range(self.depth))
        self.scale = nn.Parameter(torch.empty(self.depth, self.embed_dim))
        for module in self.up.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.scale, std=0.02)
        for p in self.cnn.parameters():
            p.requires_grad_(False)

    def forward_distortion_tokens(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen CNN; BatchNorm statistics still update in train mode
            features = self.cnn(x)
        return self.extractor(features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        distortion_tokens = self.forward_distortion_tokens(x)
        tokens = self.embed(x)
        prefix = self.vit.num_prefix_tokens
        for block, up, scale in zip(self.vit.blocks, self.up, self.scale):
            added = scale * up(distortion_tokens)
            tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix:] + added], dim=1)
            tokens = block(tokens)
        return self.vit.norm(tokens)


_CLASSES: dict[str, type[ViTMethod]] = {
    cls.method: cls for cls in (LinearProbe, FullFineTune, PlainViT, AdapterViT, LoRAViT, VPTViT, AddedDistortionTokens)
}


# ---------------------------------------------------------------------------------------------
# Factories


def build_method(method: str, config: LoDaConfig | None = None, pretrained: bool = False) -> nn.Module:
    """The network of ``method`` ("loda" or a baseline) on ``config``'s backbones."""
    if method == "loda":
        return LoDa(config, pretrained=pretrained)
    if method not in _CLASSES:
        import difflib

        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown method {method!r}; {hint}known: {', '.join(METHODS)}")
    return _CLASSES[method](config, pretrained=pretrained)


def build_baseline(cfg) -> nn.Module:
    """``train.build_model``'s hook: the comparison method ``cfg.method`` for a TrainConfig."""
    if cfg.method == "loda":
        raise UsageError("build_baseline builds comparison methods; LoDa itself is loda_cli.model.LoDa")
    return build_method(cfg.method, cfg.model, pretrained=cfg.pretrained)
