"""Plumbing shared by the I/O topic modules: sockets, waiting, addresses."""
from __future__ import annotations

import _socket
import array
import errno
import fcntl
import os
import select
import socket
import termios
import time
from typing import Any, NamedTuple, Optional

from . import _checks
from .message import Address

# socket.socket.type builds an enum object on every access; the C-level
# member under it is the plain int (flags already masked off since 3.7).
_raw_type = _socket.socket.type.__get__
# The same for socket.family (an enum made on every access: ~0.4 us).
_raw_family = _socket.socket.family.__get__
_AF_UNIX = int(socket.AF_UNIX)

# Linux: POLLRDHUP tells that the peer closed or shut down its writing side.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


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


class Target(NamedTuple):
    """The socket an I/O call works on, and how it is set up."""

    sock: socket.socket
    fd: int
    timeout: Optional[float]
    type: int
    #: sock was made here around a bare descriptor: detach() it when done.
    shadow: bool


def _require_unix(sock: socket.socket) -> None:
    # Addresses, descriptors and credentials are AF_UNIX things: on another
    # family they would be read as garbage (an AF_INET source address parsed
    # as sun_path) or fail deep inside a backend.
    if _raw_family(sock) != _AF_UNIX:
        raise OSError(errno.EAFNOSUPPORT, "afunix works on AF_UNIX sockets only, not %s"
                      % getattr(sock.family, "name", sock.family))


def target(sock: Any) -> Target:
    """Check `sock` and read its descriptor, timeout and type.

    Accepts a socket.socket, or any object with fileno() (blocking or not
    as its descriptor is, with no timeout).

    Raises:
        TypeError: no fileno().
        OSError(EBADF): a closed socket, as the stdlib methods raise.
        OSError(EAFNOSUPPORT): not an AF_UNIX socket.
    """
    if isinstance(sock, socket.socket):
        fd = sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        _require_unix(sock)
        return Target(sock, fd, sock.gettimeout(), _raw_type(sock), False)
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        raise TypeError("expected a socket or an object with fileno(), not %s" % type(sock).__name__)
    fd = fileno()
    if not isinstance(fd, int) or fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    _checks.descriptor(fd)  # no socket object takes a number past a C int
    # A socket object around the same descriptor (no dup), blocking as the
    # descriptor is; the caller detaches it afterwards.  Raises ENOTSOCK for
    # a descriptor that is not a socket.
    blocking = os.get_blocking(fd)
    shadow = BorrowedSocket(fileno=fd)
    # A default timeout (socket.setdefaulttimeout) makes the constructor set
    # O_NONBLOCK on the descriptor: put back what the caller had.
    shadow.settimeout(None if blocking else 0.0)
    try:
        _require_unix(shadow)
    except OSError:
        shadow.detach()
        raise
    return Target(shadow, fd, shadow.gettimeout(), _raw_type(shadow), True)


def deadline_of(timeout: Optional[float]) -> Optional[float]:
    """Monotonic deadline for a socket timeout (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def wait(fd: int, writable: bool, deadline: Optional[float]) -> bool:
    """Wait until `fd` is readable/writable or the deadline passes; False on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if writable else select.POLLIN)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    # poll() itself retries EINTR with the remaining time (PEP 475).
    return bool(poller.poll(None if remaining is None else remaining * 1000.0))


def peer_hung_up(fd: int) -> bool:
    """Whether the peer of `fd` has closed or shut down its sending side."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | _POLLRDHUP)
    events = poller.poll(0)
    return bool(events and events[0][1] & (_POLLRDHUP | select.POLLHUP))


def queued_bytes(fd: int) -> int:
    """Bytes waiting in the receive queue of socket `fd` (FIONREAD, SIOCINQ on Linux).

    On SOCK_STREAM and SOCK_SEQPACKET Linux counts every queued byte, not
    only those of the next record.
    """
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def decode_address(raw: Optional[bytes]) -> Optional[Address]:
    """A sun_path as the socket module returns it: None, str path or bytes abstract name."""
    if raw is None:
        return None
    if raw[:1] == b"\0":
        return raw
    nul = raw.find(b"\0")
    return os.fsdecode(raw if nul < 0 else raw[:nul])


class Outgoing(NamedTuple):
    """Messages to send, checked and split into parallel lists by the topic layer."""

    datas: list[Any]                     # bytes-like, C-contiguous
    lengths: list[int]                   # nbytes of each
    fds: Optional[list[tuple[int, ...]]]  # None when no message has descriptors
    addresses: Optional[list[Optional[bytes]]]  # sun_path bytes; None: no addresses at all
    credentials: Optional[list[Optional[tuple[int, int, int]]]]
    joined: Optional[bytes] = None       # all datas back to back, when already made
    fd_counts: Optional[list[int]] = None  # len() of each fds entry, when already made
    fd_flat: Optional[list[int]] = None    # every fds entry back to back, when already made


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
