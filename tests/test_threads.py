"""fit_threads: torch uses as many threads as the CPUs the process may use, a container's CPU quota
included; a user's own thread count stands; decode workers follow the same count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from loda_cli import scoring, threads

REPO = Path(__file__).resolve().parent.parent

# Prints torch's thread count before and after fit_threads, and what available_cpus counts.
_FIT = """
import sys, torch
from loda_cli.threads import available_cpus, fit_threads
before = torch.get_num_threads()
cpus = int(sys.argv[1]) if len(sys.argv) > 1 else None
print(before, fit_threads(cpus), available_cpus(), fit_threads(1))
"""


def _run(*args: str, **env: str) -> list[int]:
    environ = {k: v for k, v in os.environ.items() if k not in threads.USER_SETTINGS}
    environ.update(PYTHONPATH=str(REPO), **env)
    out = subprocess.run([sys.executable, "-c", _FIT, *args], env=environ, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [int(v) for v in out.split()]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to have threads to take away")
def test_threads_are_lowered_to_the_cpus_available_once_per_process():
    before, fitted, _, again = _run("1")
    assert before >= 2
    assert fitted == 1
    assert again == 1  # decided once


def test_threads_are_never_raised():
    before, fitted, _, again = _run("4096")
    assert fitted == before
    assert again == before  # the second call (asking for 1) changes nothing: decided once


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_a_users_thread_count_stands():
    before, fitted, _, _ = _run("1", OMP_NUM_THREADS="2")
    assert before == fitted == 2


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs sched_getaffinity and 2 CPUs")
    first = min(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{first}}})\n" + _FIT  # as `taskset -c N` does
    environ = {k: v for k, v in os.environ.items() if k not in threads.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", code], env=dict(environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    before, fitted, cpus, _ = (int(v) for v in out.split())
    assert cpus == 1
    assert fitted == 1


def test_default_workers_follow_the_available_cpus(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    assert scoring.default_workers("cpu") == 4
    assert scoring.default_workers("cuda") == 8
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)  # a 2-CPU quota on a big host
    assert scoring.default_workers("cpu") == 1
    assert scoring.default_workers("cuda") == 1


def _cgroup_v1_cpu() -> Path | None:
    root = Path("/sys/fs/cgroup/cpu")
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    if not (root / "cpu.cfs_quota_us").exists() or not os.access(root, os.W_OK):
        return None
    return root


@pytest.mark.skipif(_cgroup_v1_cpu() is None, reason="needs root, unshare and a writable cgroup v1 cpu controller")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_a_container_cpu_quota_lowers_the_threads(tmp_path):
    """A child cgroup with a 1-CPU quota, mounted where a container sees its own cgroup (as Docker
    does with cgroup v1): torch would start a thread per CPU of the host; loda uses one."""
    root = _cgroup_v1_cpu()
    group = root / f"loda-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a cgroup: {error}")
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        script = tmp_path / "fit.py"
        script.write_text(_FIT)
        inner = f"mount --bind {group} {root} && exec {sys.executable} {script}"
        outer = f"echo $$ > {group}/tasks && exec unshare -m sh -c '{inner}'"
        environ = {k: v for k, v in os.environ.items() if k not in threads.USER_SETTINGS}
        result = subprocess.run(["sh", "-c", outer], env=dict(environ, PYTHONPATH=str(REPO)),
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.skip(f"cannot run in a cgroup here: {result.stderr.strip()[-200:]}")
        before, fitted, cpus, _ = (int(v) for v in result.stdout.split())
        assert cpus == 1
        assert before >= 2  # what torch alone would use
        assert fitted == 1
    finally:
        group.rmdir()
