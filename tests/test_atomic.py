"""Outputs written by an atomic rename get the mode a plain write would give them, not
mkstemp's owner-only 0600."""

from __future__ import annotations

import os
import stat

import pytest

from loda_cli.atomic import output_mode
from loda_cli.output import atomic_write_text

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_output_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "scores.csv", "path,score\n")
        assert _mode(tmp_path / "scores.csv") == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.csv", "path,score\n")
        assert _mode(tmp_path / "private.csv") == 0o600
    finally:
        os.umask(old)


def test_replacing_an_output_keeps_its_mode(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old\n")
    target.chmod(0o664)
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and _mode(target) == 0o664 == output_mode(target)


def test_a_checkpoint_is_readable_like_any_file_the_user_writes(tmp_path, tiny_model):
    from loda_cli.weights import save_checkpoint

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tiny_model, tmp_path / "m.safetensors", {"name": "m"})
    finally:
        os.umask(old)
    assert _mode(path) == 0o644
