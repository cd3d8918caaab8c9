"""What the figures belong to: the machine, the interpreter, the backend, and how busy it was.

A busy machine shows as spread and drift, and a reader must know: at the
start of a session the load average is read and /proc/stat is sampled for a
fraction of a second (while this process sleeps), which gives the share of
CPU time other work used and the share the hypervisor stole.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

from .. import _backend
from .._version import __version__
from .runner import allowed_cpus

#: Warn when other work used this share of all CPUs' time during the sample...
BUSY_SHARE = 0.20
#: ... or the hypervisor stole this share ...
STEAL_SHARE = 0.05
#: ... or the 1-minute load average is at least this per allowed CPU.
LOAD_PER_CPU = 1.0
SAMPLE_SECONDS = 0.25


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_times() -> Optional[List[int]]:
    # The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    return [int(v) for v in fields[1:9]]


def sample_cpu(seconds: float = SAMPLE_SECONDS) -> Dict[str, Optional[float]]:
    """Shares of all CPUs' time, over `seconds`, that other work used and that was stolen."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None:
        return {"busy_share": None, "steal_share": None}
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0:
        return {"busy_share": None, "steal_share": None}
    idle = delta[3] + delta[4]  # idle + iowait
    steal = delta[7]
    return {"busy_share": (total - idle - steal) / total, "steal_share": steal / total}


def busy_reasons(load: List[float], cpus: int, sample: Dict[str, Optional[float]]) -> List[str]:
    """Why the machine looks busy (empty when it does not)."""
    reasons = []
    if load and load[0] >= LOAD_PER_CPU * cpus:
        reasons.append("load average %.1f on %d CPU%s" % (load[0], cpus, "" if cpus == 1 else "s"))
    busy, steal = sample.get("busy_share"), sample.get("steal_share")
    if busy is not None and busy >= BUSY_SHARE:
        reasons.append("other work used %.0f%% of the CPUs" % (100 * busy))
    if steal is not None and steal >= STEAL_SHARE:
        reasons.append("the hypervisor stole %.0f%% of CPU time" % (100 * steal))
    return reasons


def interpreter() -> Dict[str, Any]:
    """The Python running the benchmark (PyPy and CPython figures differ: say which)."""
    try:
        from importlib.metadata import version
        cffi: Optional[str] = version("cffi")
    except Exception:  # not installed, or metadata unreadable: only a label
        cffi = None
    return {
        "implementation": platform.python_implementation(),
        "version": platform.python_version(),
        "executable": sys.executable,
        "cffi": cffi,
    }


def backend() -> Dict[str, Any]:
    """The active backend, and whether the C core loaded."""
    return {
        "active": _backend.name,
        "c_core": "loaded" if _backend.c_core_error is None and _backend.name == "c"
        else (_backend.c_core_error or "not active"),
    }


def machine(sample: Optional[Dict[str, Optional[float]]] = None) -> Dict[str, Any]:
    """The platform the figures belong to, with the load at the start."""
    cpus = allowed_cpus()
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    sample = sample if sample is not None else sample_cpu()
    return {
        "system": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_allowed": cpus,
        "cpu_model": _cpu_model(),
        "loadavg": load,
        "busy_share": sample.get("busy_share"),
        "steal_share": sample.get("steal_share"),
        "busy": busy_reasons(load, len(cpus), sample),
    }


def afunix_version() -> str:
    """The version of afunix being measured."""
    return __version__
