"""Socketpair creation, one pair or many in one call."""
from __future__ import annotations

import socket

from . import _backend, _checks

# Bound on pairs per call: keeps 2 * n descriptors within a C int and the
# temporary descriptor array reasonable.  RLIMIT_NOFILE usually bites first.
MAX_PAIRS = 1 << 20


def socketpairs(
    n: int, type: int = socket.SOCK_STREAM, *, blocking: bool = True
) -> list[tuple[socket.socket, socket.socket]]:
    """Create `n` connected AF_UNIX socketpairs; the C backend makes them in one call.

    Like calling ``socket.socketpair(socket.AF_UNIX, type)`` n times, but the
    descriptors are created close-on-exec (and non-blocking when
    ``blocking=False``) atomically, and a failure part-way closes every
    descriptor already made before the OSError is raised.

    Args:
        n: number of pairs, 0 to MAX_PAIRS.
        type: socket.SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
        blocking: False gives non-blocking sockets (timeout 0.0).

    Returns:
        A list of n ``(socket.socket, socket.socket)`` tuples.

    Raises:
        TypeError, ValueError: bad `n` or `type`, before any system call.
        OSError: from the kernel (EMFILE, ENFILE, ...), with nothing leaked.
    """
    count = _checks.in_range(n, "n", 0, MAX_PAIRS)
    return _backend.impl.socketpairs(count, _checks.supported_socket_type(type), bool(blocking))


def socketpair(
    type: int = socket.SOCK_STREAM, *, blocking: bool = True
) -> tuple[socket.socket, socket.socket]:
    """Create one connected AF_UNIX socketpair: ``socketpairs(1, ...)[0]``.

    Like ``socket.socketpair(socket.AF_UNIX, type)``; see `socketpairs`.
    """
    return _backend.impl.socketpairs(1, _checks.supported_socket_type(type), bool(blocking))[0]
