"""Socket objects over descriptors afunix does not own, and the socket's raw type and family.

A leaf below the backends: it imports only the socket module, so both
backends and the topic modules can use it.
"""
from __future__ import annotations

import _socket
import socket

# socket.socket.type builds an enum object on every access; the C-level
# member under it is the plain int (flags already masked off since 3.7).
raw_type = _socket.socket.type.__get__
# The same for socket.family (an enum made on every access: ~0.4 us).
raw_family = _socket.socket.family.__get__


class BorrowedSocket(socket.socket):
    """A socket object over a descriptor that another object owns: collecting it never closes it.

    afunix wraps a caller's descriptor (a twin with another timeout, an
    object that only has fileno()) and detaches the wrapper when done.  An
    exception from a signal handler can land between making the wrapper and
    the ``try`` that detaches it; a plain socket.socket would then close the
    caller's descriptor when collected, and a later open() could reuse the
    number under the caller's feet.  Defining __del__ replaces the closing
    finalizer of the socket type, so a lost wrapper lets go of the
    descriptor instead.
    """

    __slots__ = ()

    def __del__(self) -> None:
        if self.fileno() >= 0:
            self.detach()


def nonblocking_twin(sock: socket.socket) -> socket.socket:
    """A timeout-0 socket object on the same descriptor as `sock` (detach it after use).

    CPython's methods on a socket with a timeout poll before every call, even
    with MSG_DONTWAIT, so a "take what is queued" call through them would
    wait out the whole timeout.  The descriptor of such a socket is already
    O_NONBLOCK, so a twin with timeout 0 changes nothing at the kernel level.
    """
    twin = BorrowedSocket(sock.family, sock.type, sock.proto, sock.fileno())
    twin.settimeout(0.0)
    return twin
