"""Plumbing shared by the I/O topic modules: the target socket, waiting, received addresses."""
from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import termios
import time
from typing import Any, Callable, NamedTuple, Optional, TypeVar

from . import _checks
# BorrowedSocket and nonblocking_twin are _sockets' (the backends use them too);
# the I/O modules reach them here, with the target socket they serve.
from ._sockets import BorrowedSocket as BorrowedSocket
from ._sockets import nonblocking_twin as nonblocking_twin
from ._sockets import raw_family, raw_type
from .message import Address

_AF_UNIX = int(socket.AF_UNIX)
# A plain int: | and & on the socket module's enum flags build enum objects.
_DONTWAIT = int(socket.MSG_DONTWAIT)
R = TypeVar("R")

# Linux: POLLRDHUP tells that the peer closed or shut down its writing side.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


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
    if raw_family(sock) != _AF_UNIX:
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
        return Target(sock, fd, sock.gettimeout(), raw_type(sock), False)
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
    return Target(shadow, fd, shadow.gettimeout(), raw_type(shadow), True)


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


def wait_either(fd: int, deadline: Optional[float]) -> tuple[bool, bool]:
    """Wait until `fd` is readable or writable or the deadline passes: (readable, writable)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    events = 0
    for _, ev in poller.poll(None if remaining is None else remaining * 1000.0):
        events |= ev
    # (an error or hang-up reads as both: the next call on the socket says which)
    failed = bool(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL))
    return bool(events & select.POLLIN) or failed, bool(events & select.POLLOUT) or failed


def wait_setup(t: Target, flags: int) -> tuple[int, Optional[float], bool]:
    """How a sync call on `t` waits: (flags for its system calls, deadline, may_wait).

    A blocking socket waits in the kernel: the flags stay as they are.  A
    socket with a timeout gets MSG_DONTWAIT, and `call_when_ready` waits
    for readiness here, against one deadline taken now for the whole call.
    may_wait is False on a non-blocking socket or with MSG_DONTWAIT: then
    BlockingIOError goes to the caller, as the socket module raises it.
    """
    timeout = t.timeout
    if timeout is None:
        return flags, None, not flags & _DONTWAIT
    return flags | _DONTWAIT, deadline_of(timeout), timeout != 0.0 and not flags & _DONTWAIT


def call_when_ready(fd: int, writable: bool, deadline: Optional[float], may_wait: bool,
                    attempt: Callable[..., R], *args: Any) -> R:
    """``attempt(*args)``, tried again once `fd` is ready, until it does not block.

    The one sync "try, then wait" loop of afunix (arguments from
    `wait_setup`): InterruptedError is retried at once (PEP 475: the
    handlers ran); BlockingIOError is re-raised when the call may not wait,
    else the loop waits until `fd` is readable (writable with `writable`)
    and tries again, or raises socket.timeout (TimeoutError) once the
    deadline has passed.  Any other error goes to the caller.
    """
    while True:
        try:
            return attempt(*args)
        except InterruptedError:
            continue  # PEP 475: handlers ran; retry
        except BlockingIOError:
            if not may_wait:
                raise
            if not wait(fd, writable, deadline):
                # socket.timeout: TimeoutError on 3.10+, its own OSError subclass on 3.9.
                raise socket.timeout("timed out") from None


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

