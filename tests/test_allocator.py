"""hold_freed_memory: freed blocks stay in the process, so a batch's activations do not come back
from the kernel as fresh pages every time; a user's own malloc settings stand."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from loda_cli import allocator

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocates, writes and frees a 64 MiB block twice (malloc itself: numpy asks the kernel for huge
# pages) and prints the page faults of the second time: the block is above glibc's own largest
# mmap threshold (32 MiB), so without the setting it is a fresh mapping both times.
_SECOND_ALLOCATION_FAULTS = """
import ctypes, resource, sys
from loda_cli.allocator import hold_freed_memory
held = hold_freed_memory() if sys.argv[1] == "hold" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def use_block(size=64 << 20):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # written, as a batch's activations are
    libc.free(block)
use_block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
use_block()
print(held, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_allocation(mode: str, **env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in allocator._USER_SETTINGS and k != "GLIBC_TUNABLES"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", _SECOND_ALLOCATION_FAULTS, mode], env=environ,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@glibc_linux
def test_a_freed_block_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    held, held_faults = _second_allocation("hold")
    plain, plain_faults = _second_allocation("plain")
    assert held == "True" and plain == "False"
    assert plain_faults > pages // 2  # the block came back from the kernel, page by page
    assert held_faults < pages // 20  # the block came from the heap, already resident


@glibc_linux
def test_a_users_own_malloc_settings_stand():
    held, _ = _second_allocation("hold", MALLOC_TRIM_THRESHOLD_="131072")
    assert held == "False"
    assert allocator.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert allocator.user_tuned_malloc({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert not allocator.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})
    assert not allocator.user_tuned_malloc({})


def test_it_is_decided_once_per_process(monkeypatch):
    monkeypatch.setattr(allocator, "_held", None)
    calls = []
    monkeypatch.setattr(allocator, "user_tuned_malloc", lambda environ=None: calls.append(1) or True)
    assert allocator.hold_freed_memory() is False
    assert allocator.hold_freed_memory() is False
    assert len(calls) <= 1
