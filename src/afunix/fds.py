"""Descriptor passing and peer identity, safe by default."""
from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Iterable, List, Optional, Tuple

from . import _backend, _checks, _io
from ._contract import Outgoing
from .addresses import encode_destination
from ._kernel import SO_PASSCRED, SO_PEERCRED, SO_PEERPIDFD
from .batch import checked_fds, send_records, send_stream, write_with_control
from ._limits import SCM_MAX_FD
from .receive import MAX_BUFSIZE, arena_for, receive_into, recv_one
from .message import Address, Credentials, TruncatedError

_STREAM = int(socket.SOCK_STREAM)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOCKET = socket.socket
_C_INT_MAX = _checks.C_INT_MAX


def send_fds(sock: Any, buffers: Iterable[Any], fds: Iterable[Any], flags: int = 0,
             address: Optional[Address] = None) -> int:
    """Send `buffers` with `fds` attached (SCM_RIGHTS); returns the bytes sent.

    The signature of ``socket.send_fds``, but `flags` and `address` are
    honoured (the stdlib ignored them before 3.13, gh-107898), the control
    data is packed in C, and the socket's timeout applies.  On SOCK_STREAM
    the data and the descriptors go in one sendmsg, as ``socket.send_fds``
    sends them, and all of the data is written: after a short write the
    rest follows (as sendall) without the descriptors.  On a non-blocking
    socket (or with MSG_DONTWAIT) a short write whose rest the socket does
    not take returns the bytes that went, as ``socket.send_fds`` does.

    Raises:
        TypeError, ValueError: bad buffers or descriptors (at most 253), before any system call.
        OSError: from the kernel.
    """
    if (address is None and type(buffers) is list and len(buffers) == 1 and type(fds) is list
            and len(fds) <= SCM_MAX_FD and type(flags) is int and 0 <= flags <= _C_INT_MAX
            and type(sock) is _SOCKET):
        # The common call: one buffer, a list of descriptor numbers, a
        # socket.socket; checked with exact-type tests (a tuple of the list
        # first: what is checked is what is sent) and sent with one backend
        # call.  Anything else, or a -1 from the backend, goes the careful way.
        fd_tuple = tuple(fds)
        try:
            (data,) = buffers
        except ValueError:
            data = None
        kind = type(data)
        if ((kind is bytes or kind is bytearray or (kind is memoryview and data.c_contiguous))
                and len(fd_tuple) <= SCM_MAX_FD):
            for fd in fd_tuple:
                if type(fd) is not int or not 0 <= fd <= _C_INT_MAX:
                    break
            else:
                sent = _backend.impl.try_send_fds(sock, data, fd_tuple, flags)
                if sent >= 0:
                    return sent
    flags = _checks.msg_flags(flags)
    views = [memoryview(b) for b in buffers]
    if not all(v.c_contiguous for v in views):
        # as socket.send_fds (sendmsg) refuses it, before any system call
        raise BufferError("send_fds: a buffer is not C-contiguous")
    data = b"".join(views)
    fd_tuple = checked_fds(fds)
    raw_address = None if address is None else encode_destination(address)
    t = _io.target(sock)
    try:
        if t.type == _STREAM and fd_tuple and not data:
            raise ValueError("on SOCK_STREAM descriptors need at least one data byte to ride on")
        try:
            if t.type == _STREAM and fd_tuple and raw_address is None:
                # one sendmsg with all of it, the rest after a short write (see send_many)
                return write_with_control(t, data, len(data), fd_tuple, None, flags)
            out = Outgoing([data], [len(data)], [fd_tuple] if fd_tuple else None,
                               None if raw_address is None else [raw_address], None)
            if t.type == _STREAM:
                send_stream(t, out, flags)  # no descriptors: sendall; an address: refused
            else:
                send_records(t, out, flags)
            return len(data)
        except BlockingIOError as exc:
            # A non-blocking stream took part of it: the count, as
            # socket.send_fds returns sendmsg's (nothing at all: raise)
            written = getattr(exc, "characters_written", 0)
            if written:
                return int(written)
            raise
    finally:
        if t.shadow:
            t.sock.detach()


def recv_fds(sock: Any, bufsize: int, maxfds: int, flags: int = 0
             ) -> Tuple[bytes, List[int], int, Optional[Address]]:
    """Receive one message and up to `maxfds` descriptors; returns (data, fds, msg_flags, address).

    The signature of ``socket.recv_fds``, but safe: descriptors are received
    close-on-exec (MSG_CMSG_CLOEXEC), the control buffer is sized with
    CMSG_SPACE, and truncation is never silent.  As with the stdlib,
    `bufsize` 0 takes descriptors with no data (on SOCK_STREAM the data stays
    queued); a `maxfds` over SCM_MAX_FD asks for no more than SCM_MAX_FD,
    the most one message carries.

    Raises:
        TruncatedError: the kernel cut the control data (MSG_CTRUNC: too small
            `maxfds`, or this process at RLIMIT_NOFILE); the descriptors that
            did arrive are closed, the data is on the exception.
        BlockingIOError, TimeoutError, OSError: as sock.recvmsg would.
    """
    if (type(bufsize) is int and 0 < bufsize <= MAX_BUFSIZE and type(maxfds) is int
            and 0 <= maxfds and type(flags) is int and 0 <= flags <= _C_INT_MAX
            and type(sock) is _SOCKET):
        # The common call, received with one backend call into the
        # thread's arena; None: the careful path below (which also takes
        # what this call left in the arena, without asking the kernel again).
        got = recv_one(sock, bufsize, maxfds if maxfds < SCM_MAX_FD else SCM_MAX_FD, flags)
        if got is not None:
            return got
    size = _checks.in_range(bufsize, "bufsize", 0, MAX_BUFSIZE)
    k = _checks.as_int(maxfds, "maxfds")
    if k < 0:
        raise ValueError("maxfds must be >= 0, got %d" % k)
    k = min(k, SCM_MAX_FD)
    flags = _checks.msg_flags(flags)
    t = _io.target(sock)
    try:
        arena = arena_for(sock, 1, size, k)
        first, count, end = receive_into(t, arena, flags, sock)
    finally:
        if t.shadow:
            t.sock.detach()
    if not count:
        arena.deliver(end, True)
        return b"", [], 0, None  # end of stream
    data = bytes(arena.chunks(first, first + 1)[0])
    msg_flags = arena.msg_flags(first)
    address = _io.decode_address(arena.address(first))
    fds = list(arena.held_fds(first, first + 1)[0])
    upto = end if count == 1 else first + 1  # one message (an interrupted recv_many may have left more)
    if msg_flags & _CTRUNC:
        # the backend already closed the descriptors of a cut message
        error = TruncatedError(data, msg_flags, address)
        arena.deliver(upto, True)
        raise error
    result = data, fds, msg_flags, address
    arena.deliver(upto, True)  # stores only: given over whole, or not at all
    return result


def _known_option(option: Optional[int], name: str) -> int:
    """`option`, or OSError(ENOPROTOOPT), as the kernel answers an option it lacks."""
    if option is None:
        raise OSError(errno.ENOPROTOOPT, "%s is not known on this platform" % name)
    return option


def peer_credentials(sock: Any) -> Credentials:
    """The connected peer's pid, uid and gid at connect time (SO_PEERCRED).

    Like ``sock.getsockopt(SOL_SOCKET, SO_PEERCRED, ...)`` unpacked by hand.
    """
    option = _known_option(SO_PEERCRED, "SO_PEERCRED")
    t = _io.target(sock)
    try:
        raw = t.sock.getsockopt(socket.SOL_SOCKET, option, 12)
    finally:
        if t.shadow:
            t.sock.detach()
    pid, uid, gid = struct.unpack("iii", raw)  # struct ucred: three C ints
    return Credentials(pid, uid, gid)


def peer_pidfd(sock: Any) -> int:
    """A close-on-exec pidfd naming the connected peer process (SO_PEERPIDFD, Linux >= 6.5).

    Unlike the pid from SO_PEERCRED, a pidfd cannot come to name another
    process after the peer exits.  The caller owns and must close it.

    Raises:
        OSError: ENOPROTOOPT where the kernel lacks SO_PEERPIDFD.
    """
    t = _io.target(sock)
    try:
        fd = t.sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    finally:
        if t.shadow:
            t.sock.detach()
    os.set_inheritable(fd, False)  # the kernel makes it O_CLOEXEC; be sure
    return int(fd)


def pass_credentials(sock: Any, on: bool = True) -> None:
    """Turn SO_PASSCRED on (or off): received messages then carry the sender's credentials."""
    option = _known_option(SO_PASSCRED, "SO_PASSCRED")
    t = _io.target(sock)
    try:
        t.sock.setsockopt(socket.SOL_SOCKET, option, 1 if on else 0)
    finally:
        if t.shadow:
            t.sock.detach()
