"""Backbone weights before a training run: what timm will load from its Hugging Face cache, and
fetching what is missing there first, with progress (ViT-B/16 and ResNet-50 are about 350 MB and
100 MB). timm then finds the files in the cache.

Offline, or with the hub unreachable, this does nothing: building the model then gives its one
sentence naming the missing backbone, as without this step.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Optional, Sequence

# timm's order: it loads model.safetensors, and pytorch_model.bin only where the former is absent.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

Emit = Callable[[str, dict], None]


def hub_repo(timm_name: str) -> Optional[tuple[str, Optional[str]]]:
    """The (repository, revision) timm downloads ``timm_name``'s pretrained weights from, or None
    (not a hub model: timm fetches it another way, or not at all)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # unknown names are reported when the model is built
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def is_cached(repo: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, name, revision=revision), str) for name in WEIGHT_FILES)


def missing(names: Sequence[str]) -> list[tuple[str, str, Optional[str]]]:
    """(timm name, repository, revision) of each backbone whose weights are not in the cache."""
    result = []
    for name in dict.fromkeys(names):
        repo = hub_repo(name)
        if repo is not None and not is_cached(*repo):
            result.append((name, *repo))
    return result


def fetch(names: Sequence[str], emit: Emit) -> list[str]:
    """Download the missing backbones' weights into the Hugging Face cache, reporting progress
    through ``emit`` ("download", then "bytes"); returns the names fetched. Any failure is left to
    the model build, which names what is missing."""
    from huggingface_hub import constants

    from loda_cli.model import _hub_reachable

    todo = missing(names)
    if not todo or constants.HF_HUB_OFFLINE or not _hub_reachable():
        return []
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    accepts_bar = "tqdm_class" in inspect.signature(hf_hub_download).parameters
    fetched = []
    for name, repo, revision in todo:
        for filename in WEIGHT_FILES:
            kw = {"tqdm_class": _bar_class(emit, f"{name} weights", f"{endpoint}/{repo}")} if accepts_bar else {}
            try:
                hf_hub_download(repo, filename, revision=revision, endpoint=endpoint, **kw)
            except EntryNotFoundError:
                continue
            except Exception:  # network, permissions: the model build says what is missing
                return fetched
            fetched.append(name)
            break
    return fetched


def _bar_class(emit: Emit, label: str, url: str) -> type:
    """A stand-in for huggingface_hub's tqdm bar that forwards the byte counts to ``emit``."""

    class Bar:
        def __init__(self, *args, total: Optional[int] = None, initial: int = 0, **kwargs) -> None:
            self.n, self.total = initial or 0, total
            emit("download", {"file": label, "url": url, "start": self.n, "total": total})

        def update(self, n: int = 1) -> None:
            self.n += n
            emit("bytes", {"done": self.n, "total": self.total})

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc) -> bool:
            return False

        def close(self) -> None:
            pass

        def refresh(self, *args, **kwargs) -> None:
            pass

        def set_description(self, *args, **kwargs) -> None:
            pass

    return Bar
