"""The stdlib backend: the same functions as _cbackend, on the socket module only.

Used where the C core is not built, and forced with AFUNIX_BACKEND=stdlib.
"""
from __future__ import annotations

import socket


def socketpairs(n: int, type: int, blocking: bool) -> list[tuple[socket.socket, socket.socket]]:
    """Create n pairs with socket.socketpair(); on failure close the ones made."""
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(n):
            a, b = socket.socketpair(socket.AF_UNIX, type)
            pairs.append((a, b))
            if not blocking:
                a.setblocking(False)
                b.setblocking(False)
    except BaseException:
        for a, b in pairs:
            a.close()
            b.close()
        raise
    return pairs
