"""As many compute threads as the CPUs this process may use, not as the machine has.

torch sizes its thread pool from the CPUs in the process's affinity mask. A CPU quota (``docker
run --cpus 2``, a Kubernetes CPU limit, a systemd ``CPUQuota=``: a cgroup's ``cpu.max`` or
``cpu.cfs_quota_us``) is not in that mask, so in a container limited to 2 CPUs on a 16-core host
torch starts 16 threads. They share the 2 CPUs' time and the kernel stops them all whenever the
quota of a period is spent, in the middle of every parallel operation.

:func:`available_cpus` counts what the process may really use (affinity, the cgroup quota, and
``LOKY_MAX_CPU_COUNT``) with joblib's ``cpu_count``; :func:`fit_threads` lowers torch's pool to it
once per process. Measured on a 2-core AMD EPYC (Zen 3) in a cgroup with a 1-CPU quota (README,
"Speed"). Nothing changes when the user chose a thread count (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``) or torch already uses no more threads than that.
"""

from __future__ import annotations

import os

#: Environment variables through which a user sets the thread count themselves.
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_fitted: int | None = None


def available_cpus() -> int:
    """The CPUs this process may use: affinity mask, cgroup CPU quota, at least 1."""
    try:
        from joblib import cpu_count
    except ImportError:  # pragma: no cover - a declared dependency
        cpu_count = None
    if cpu_count is not None:
        try:
            return max(1, int(cpu_count()))
        except (OSError, ValueError):  # an unreadable or odd cgroup file: fall back
            pass
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def user_set_threads(environ=os.environ) -> bool:
    """True when the environment already sets the thread count."""
    return any(environ.get(name, "").strip() for name in USER_SETTINGS)


def fit_threads(cpus: int | None = None) -> int:
    """Lower torch's intra-op threads to the available CPUs (once per process, unless the user
    set a count); returns the thread count in use."""
    global _fitted
    import torch

    if _fitted is None:
        _fitted = torch.get_num_threads()
        if not user_set_threads():
            limit = available_cpus() if cpus is None else max(1, cpus)
            if _fitted > limit:
                torch.set_num_threads(limit)
                _fitted = limit
    return torch.get_num_threads()
