"""loda: technical quality scores for photo collections with the LoDa IQA model (CVPR 2024).

Importing this package is cheap: torch and timm are imported only when a model is built. The
public API is resolved lazily::

    from loda_cli import Scorer, score_paths, load_model
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Scorer", "score_paths", "load_model", "__version__"]


def __getattr__(name: str):
    # PEP 562 lazy attributes keep `import loda_cli` free of torch.
    if name in ("Scorer", "score_paths"):
        from loda_cli import scoring

        return getattr(scoring, name)
    if name == "load_model":
        from loda_cli.weights import load_model

        return load_model
    raise AttributeError(f"module 'loda_cli' has no attribute {name!r}")
