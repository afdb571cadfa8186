"""Regenerate tests/golden/tiny_loda.safetensors: a tiny LoDa's full state, an input and its output.

Run only when the model's numerics change on purpose (and say why in the commit):
    python tests/golden/make_golden.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from loda_cli.config import LoDaConfig
from loda_cli.model import LoDa

GOLDEN_KW = {"vit": "test_vit", "vit_kwargs": {"img_size": 224, "depth": 2}, "cnn": "test_resnet"}


def main() -> None:
    torch.manual_seed(1234)
    model = LoDa(LoDaConfig(**GOLDEN_KW)).eval()
    # Non-trivial adapter weights, so the golden output exercises every injector.
    with torch.no_grad():
        model.scale.normal_(0, 0.5)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_distortion_tokens(x)
        out = model(x)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"input": x, "distortion_tokens": tokens[:, :8].contiguous(), "output": out})
    save_file(tensors, str(Path(__file__).with_name("tiny_loda.safetensors")))


if __name__ == "__main__":
    main()
