"""What ``python -m afunix info`` prints: build, backend, capabilities, kernel limits."""
from __future__ import annotations

import platform
import socket
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from . import _backend
from ._version import __version__
from .capabilities import CAPABILITIES, MAX_PATH_BYTES, SCM_MAX_FD, supports


def _read_proc(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _default_buffers() -> Tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        return (
            a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )


def kernel_limits() -> List[Tuple[str, str]]:
    """The kernel and platform limits that shape AF_UNIX traffic."""
    snd, rcv = _default_buffers()
    rows = [
        ("net.unix.max_dgram_qlen", _read_proc("/proc/sys/net/unix/max_dgram_qlen") or "n/a"),
        ("SCM_MAX_FD (descriptors per message)", str(SCM_MAX_FD)),
        ("sun_path limit (bytes, without NUL)", str(MAX_PATH_BYTES)),
        ("default SO_SNDBUF / SO_RCVBUF", "%d / %d" % (snd, rcv)),
        ("net.core.wmem_default / rmem_default", "%s / %s" % (
            _read_proc("/proc/sys/net/core/wmem_default") or "n/a",
            _read_proc("/proc/sys/net/core/rmem_default") or "n/a",
        )),
    ]
    return rows


def interpreter() -> str:
    """The running interpreter: "CPython 3.11.7", "PyPy 7.3.11 (Python 3.9.16)"."""
    name = platform.python_implementation()
    python = platform.python_version()
    if name == "CPython":
        return "CPython %s" % python
    own = sys.implementation.version
    return "%s %d.%d.%d (Python %s)" % (name, own.major, own.minor, own.micro, python)


def report() -> str:
    """The full info text."""
    lines = [
        "afunix %s" % __version__,
        "backend: %s" % _backend.name,
    ]
    if _backend.c_core_error is not None:
        lines.append("C core: not used: %s" % _backend.c_core_error)
        lines.append("  to get it: install a C compiler and the Python headers, then "
                     "pip install --force-reinstall --no-deps --no-cache-dir afunix")
    elif _backend.name == "stdlib":
        lines.append("C core: %s (AFUNIX_BACKEND=stdlib)" % (
            "built" if supports("c_core") else "not built"))
    else:
        lines.append("C core: loaded")
    lines.append("python: %s, %s" % (interpreter(), sys.executable))
    lines.append("platform: %s %s %s" % (platform.system(), platform.release(), platform.machine()))
    lines.append("")
    lines.append("capabilities:")
    for name in CAPABILITIES:
        lines.append("  %-14s %s" % (name, "yes" if supports(name) else "no"))
    lines.append("")
    lines.append("kernel limits:")
    for key, value in kernel_limits():
        lines.append("  %-40s %s" % (key, value))
    return "\n".join(lines) + "\n"
