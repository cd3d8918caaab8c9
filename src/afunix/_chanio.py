"""The channel's socket I/O: the writes, reads and waits around the frame codec.

`afunix.Channel` loops over `afunix.codec`; the system calls it makes and
the waits for readiness against a deadline (as CPython's socket methods
wait on a socket with a timeout) are here.  Nothing here knows the frame
format.
"""
from __future__ import annotations

import errno
import socket
from typing import Any, Callable, Optional, Tuple, TypeVar

from . import _io
from ._kernel import MSG_NOSIGNAL
from .codec import FrameReader
from .frames import RECORD_MAX
from .framewriter import control

T = TypeVar("T")

# Plain ints: the socket module's constants are enum members, and | or & on
# them builds a new enum object each time.
NOSIGNAL = MSG_NOSIGNAL
# The two sides of a channel, each used by one caller at a time (see
# Channel._busy): the keys of the claims, and how the refusal names them.
SENDING = "sending"
RECEIVING = "receiving"


def refused(side: str) -> RuntimeError:
    """The error of a second caller on a side already claimed."""
    return RuntimeError("this Channel is already %s in another thread (or in the call a "
                        "signal handler interrupted): one caller at a time" % side)


def owning(sock: socket.socket, make: Callable[[], T]) -> T:
    """make(), which takes ownership of `sock`; `sock` is closed if it fails."""
    try:
        return make()
    except BaseException:
        sock.close()
        raise


def stalled(sock: socket.socket) -> OSError:
    """The error for "nothing accepted": BlockingIOError, or a timeout."""
    if sock.gettimeout() == 0.0:
        return BlockingIOError(errno.EAGAIN, "the socket is full; nothing was sent")
    return socket.timeout("timed out")


def write(sock: socket.socket, view: memoryview, deadline: Optional[float],
          seqpacket: bool) -> Tuple[int, Optional[BaseException]]:
    """Write as much of `view` as the socket takes; (bytes written, what stopped it or None)."""
    timeout = sock.gettimeout()
    total = len(view)
    done = 0
    twin: Optional[socket.socket] = None
    record = RECORD_MAX if seqpacket else total
    try:
        if timeout:
            # CPython's methods wait before every call on a socket with a
            # timeout; try first (a unix socket polls writable only when
            # most of its buffer is free), wait only when it is full.
            twin = _io.nonblocking_twin(sock)
        writer = twin if twin is not None else sock
        while done < total:
            try:
                done += writer.send(view[done:done + record], NOSIGNAL)
            except BlockingIOError as exc:
                if twin is None:
                    return done, exc
                if not _io.wait(sock.fileno(), True, deadline):
                    return done, socket.timeout("timed out")
    except BaseException as exc:
        return done, exc
    finally:
        if twin is not None:
            twin.detach()
    return done, None


def send_fds(sock: socket.socket, packed: memoryview, fds: Tuple[int, ...],
             deadline: Optional[float], seqpacket: bool) -> int:
    """The first write of a frame with descriptors: sendmsg with SCM_RIGHTS; bytes written."""
    ancillary = control(fds)
    chunk = packed[:RECORD_MAX] if seqpacket else packed
    if not sock.gettimeout():
        return sock.sendmsg([chunk], ancillary, NOSIGNAL)
    twin = _io.nonblocking_twin(sock)
    try:
        while True:
            try:
                return twin.sendmsg([chunk], ancillary, NOSIGNAL)
            except BlockingIOError:
                if not _io.wait(sock.fileno(), True, deadline):
                    raise socket.timeout("timed out") from None
    finally:
        twin.detach()


def read(sock: socket.socket, reader: FrameReader) -> int:
    """One read into the reader's buffer, recorded by the backend's call; the bytes read."""
    maxlen = reader.read_size
    timeout = sock.gettimeout()
    deadline = _io.deadline_of(timeout) if timeout else None
    recv: Any = reader.impl.chan_recv
    while True:
        try:
            n: int = recv(sock, reader.rx, reader.buffer, maxlen, 0)
            return n
        except InterruptedError:
            continue  # PEP 475: handlers ran; retry
        except BlockingIOError:
            # a socket with a timeout is O_NONBLOCK: wait here, as
            # sock.recvmsg would
            if not timeout:
                raise
            if not _io.wait(sock.fileno(), False, deadline):
                raise socket.timeout("timed out") from None


def empty_record_sent(fd: int) -> bool:
    """After a 0-byte read on SOCK_SEQPACKET: True unless it is the end of stream.

    An empty record and the end of stream both read as 0 bytes, and the
    protocol forbids empty records (docs/PROTOCOL.md).  The end comes only
    after the peer hung up, so a live peer sent an empty record.  A peer
    that sent one and then hung up cannot fake an end either while bytes it
    sent after it still wait (Linux counts every queued byte).
    """
    return not _io.peer_hung_up(fd) or bool(_io.queued_bytes(fd))
