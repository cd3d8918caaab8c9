"""Run-time capabilities: what this platform, kernel and build can do."""
from __future__ import annotations

import functools
import os
import socket
import sys
from typing import Callable, Dict

from . import _backend
from ._kernel import MSG_CMSG_CLOEXEC, SCM_CREDENTIALS, SO_PASSCRED, SO_PEERCRED, SO_PEERPIDFD
# Most descriptors one SCM_RIGHTS message may carry (Linux SCM_MAX_FD), public here.
from ._limits import SCM_MAX_FD as SCM_MAX_FD
from ._limits import ADDR_MAX

#: Longest filesystem path that fits in sockaddr_un.sun_path, without its NUL
#: (sun_path is ADDR_MAX bytes on Linux, 104 on the BSDs and macOS).
MAX_PATH_BYTES = ADDR_MAX - 1 if sys.platform.startswith("linux") else 103


def _probe_seqpacket() -> bool:
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (OSError, AttributeError):
        return False
    a.close()
    b.close()
    return True


def _probe_sockopt(option: int) -> bool:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        value = a.getsockopt(socket.SOL_SOCKET, option)
    except OSError:
        return False
    finally:
        a.close()
        b.close()
    if option == SO_PEERPIDFD:  # the probe received a pidfd: close it
        os.close(value)
    return True


_LINUX = sys.platform.startswith("linux")

_PROBES: Dict[str, Callable[[], bool]] = {
    "c_core": lambda: _c_importable(),
    # batched system calls in the active backend (the C core on Linux)
    "sendmmsg": lambda: _backend.impl.HAS_SENDMMSG,
    "seqpacket": _probe_seqpacket,
    "abstract": lambda: _LINUX,
    "peercred": lambda: SO_PEERCRED is not None,
    "passcred": lambda: SO_PASSCRED is not None and SCM_CREDENTIALS is not None,
    "peerpidfd": lambda: _LINUX and _probe_sockopt(SO_PEERPIDFD),
    "cmsg_cloexec": lambda: MSG_CMSG_CLOEXEC != 0,
}


def _c_importable() -> bool:
    try:
        _backend.load("c")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> bool:
    return bool(_PROBES[name]())


def supports(name: str) -> bool:
    """Whether this platform and build have capability `name`.

    Known names: see ``afunix.CAPABILITIES``.  Probes run once and are cached.

    Raises:
        ValueError: for an unknown capability name.
    """
    if name not in _PROBES:
        raise ValueError(
            "unknown capability %r; known: %s" % (name, ", ".join(sorted(_PROBES)))
        )
    if name == "sendmmsg":  # depends on the active backend, which tests switch
        return bool(_PROBES[name]())
    return _probe(name)


CAPABILITIES = tuple(sorted(_PROBES))
