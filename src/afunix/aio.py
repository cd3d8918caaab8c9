"""Async versions of the afunix I/O functions, for asyncio, uvloop and trio.

asyncio has no sendmsg/recvmsg of its own (``loop.sock_recv`` and friends
move bytes only), so an asyncio service cannot pass descriptors or batch
datagrams without hand-written reader callbacks.  These coroutines do it on
any asyncio event loop that implements ``add_reader``/``add_writer`` (the
default loop and uvloop) and under trio; anyio programs get them on either
of its backends.  The same coroutines serve all: each call asks which
library runs it (a program that never imported trio is asyncio; otherwise
sniffio says).  trio is never needed by asyncio users.

Every coroutine follows one pattern: call the synchronous afunix function
on the non-blocking socket first; only when the kernel answers EAGAIN, wait
for readiness (``loop.add_reader``/``add_writer``, or trio's
``wait_readable``/``wait_writable``) and try again.  There are no threads
and no polling loops.  Under asyncio a call that finds its data already
queued costs no event-loop round trip at all; under trio every call is a
checkpoint, as trio's own socket methods are: a cancelled scope raises
before anything is taken, and after a call that took something at once the
task yields shielded from cancellation, so nothing taken is dropped.

Rules, the same in every coroutine here:

- **Non-blocking sockets only.**  A socket whose timeout is not 0.0 raises
  ``ValueError("the socket must be non-blocking")`` before anything else,
  as ``loop.sock_recv`` does in debug mode: on a blocking socket the first
  try would block the whole event loop.  Call ``sock.setblocking(False)``.
  The socket is never changed and never owned.
- **Cancellation loses nothing.**  The kernel hands over a batch, or a
  message with its descriptors, in one step that has no await inside, and
  every coroutine returns straight after it.  A coroutine cancelled while
  it waits has consumed nothing: the messages and descriptors stay queued
  for the next call.  Once received, they are returned, never dropped, and
  a receive never leaks a descriptor (truncated control data closes them,
  as in the synchronous functions).
- **Sends report counts.**  `send_many_partial` waits until it can send,
  sends what fits and returns the count, so a cancelled call has sent
  nothing.  `send_many` loops over it until all are sent; if it is
  cancelled (or fails) after k messages went, ``messages[:k]`` are sent and
  the rest are not.  When k must be known, loop over `send_many_partial`.
  The CancelledError itself is not replaced by a subclass: ``asyncio.timeout``
  (3.11) converts only CancelledError itself into TimeoutError.  Under trio
  the same holds for ``trio.Cancelled``.
- **One waiter or many.**  Several tasks may wait on the same socket and
  direction; a readiness event wakes them all and each one tries again
  (``loop.sock_recv`` would silently replace the first waiter's callback).

The message Channel (``afunix.channel``) has its async form here too:
`Channel` and `channel_pair`, at the end of this module.
"""
from __future__ import annotations

import errno
import functools
import os
import socket
import sys
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

from . import _checks, _io
from ._aiowait import call_when_ready, notify_closing, wait, wait_either, wait_woken, wake
from ._sockets import raw_family, raw_type
from ._kernel import MSG_NOSIGNAL
from .addresses import encode_address
from .batch import outgoing, send_with_control
from ._chanio import owning
from .channel import Channel as SyncChannel
from .channel import before_close, before_take, lane_of, reader_of, room_wanted
from .batch import send_many as _send_many_now
from .receive import RecvBatch
from .receive import recv_many as _recv_many_now
from .fds import recv_fds as _recv_fds_now
from .fds import send_fds as _send_fds_now
from .message import Address, Message
from .pairs import socketpair
from .shm import Loan

__all__ = [
    "Channel",
    "accept",
    "channel_pair",
    "connect",
    "recv_batch",
    "recv_fds",
    "recv_many",
    "send_fds",
    "send_many",
    "send_many_partial",
]

# Every synchronous call made from here carries MSG_DONTWAIT: with it the
# synchronous layer never waits, even for an object with fileno() whose
# descriptor it cannot see the blocking mode of.
_DONTWAIT = int(socket.MSG_DONTWAIT)
# A closed peer is BrokenPipeError, never SIGPIPE (as in the synchronous layer).
_NOSIGNAL = MSG_NOSIGNAL


R = TypeVar("R")

# ---- the socket ---------------------------------------------------------------

_SOCKET = socket.socket
_AF_UNIX = int(socket.AF_UNIX)
_STREAM = int(socket.SOCK_STREAM)
_C_INT_MAX = _checks.C_INT_MAX

# The single calls' fast path: for the arguments passed most (a socket.socket,
# flags an int in range) they skip _checked and msg_flags, with the same
# checks written inline: a socket.socket that is open (fileno() >= 0),
# AF_UNIX and non-blocking (timeout 0.0) passes exactly when _checked would
# pass it.  Anything else goes through _checked, which raises the error.
# The first try is then the synchronous call's own fast path, on a
# non-blocking socket: it answers at once or raises BlockingIOError.  In a
# program that never imported trio (asyncio, uvloop) they make that try
# themselves, one coroutine fewer when the data is ready, and hand a
# BlockingIOError to call_when_ready(blocked=True), which waits; under trio
# call_when_ready makes every try (a trio call is a checkpoint).
_modules = sys.modules


def _checked(sock: Any) -> Tuple[int, int]:
    """The descriptor and type of `sock`, which must be open and non-blocking."""
    t = _io.target(sock)
    try:
        blocking = t.timeout != 0.0 if not t.shadow else os.get_blocking(t.fd)
        if blocking:
            raise ValueError("the socket must be non-blocking: call sock.setblocking(False) "
                             "(as loop.sock_recv and friends require)")
        return t.fd, t.type
    finally:
        if t.shadow:
            t.sock.detach()


# ---- sending ----------------------------------------------------------------


async def send_many_partial(sock: Any, messages: Iterable[Any], flags: int = 0) -> int:
    """Send as many of `messages` as fit once the socket is writable; returns the count.

    The asyncio form of `afunix.send_many` on a non-blocking socket, as
    ``sock.send`` is to ``sock.sendall``: tries at once, waits for
    writability only while nothing at all can be sent, then returns how many
    messages went (at least one, unless `messages` is empty).  Cancelled
    while waiting, it has sent nothing, so the caller always knows exactly
    which messages went: loop over it to send all with an exact count.

    Args:
        sock: a non-blocking SOCK_DGRAM or SOCK_SEQPACKET socket (or fileno()).
        messages: bytes-like objects or `afunix.Message`s.
        flags: MSG_* flags for sendmmsg.

    Returns:
        k: messages[:k] were sent, the rest were not.

    Raises:
        ValueError: a blocking socket; a SOCK_STREAM socket (no message
            boundaries: use `send_many`); bad messages.
        TypeError: bad messages.
        OSError: from the kernel, when nothing was sent.
    """
    fd, type = _checked(sock)
    if type == socket.SOCK_STREAM:
        raise ValueError("send_many_partial needs message boundaries; on SOCK_STREAM use send_many")
    # One reading of the caller's list: it may change while we wait
    items = list(messages)
    return await _send_some(sock, fd, items, _checks.msg_flags(flags))


async def _send_some(sock: Any, fd: int, items: List[Any], flags: int) -> int:
    flags |= _DONTWAIT
    return await call_when_ready(
        fd, True, lambda: _send_many_now(sock, items, flags), backoff=True)


async def send_many(sock: Any, messages: Iterable[Any], flags: int = 0) -> int:
    """Send all of `messages`, waiting for writability as needed; returns their count.

    The asyncio form of `afunix.send_many` (``loop.sock_sendall`` for
    messages): sendmmsg batches, and a wait only when the socket is full.
    If cancelled, or failing, after k messages went, ``messages[:k]`` are
    sent and the rest are not; k is not reported (use `send_many_partial`
    in a loop where it must be).  On SOCK_STREAM the messages are written in
    order, a message with descriptors in one sendmsg with all of its bytes,
    as the synchronous send_many does; a cancelled call leaves the stream
    cut at an unknown byte, as a cancelled ``loop.sock_sendall`` does, so
    close the connection.

    Args:
        sock: a non-blocking socket (or an object with fileno()).
        messages: bytes-like objects or `afunix.Message`s.
        flags: MSG_* flags.

    Returns:
        len(messages).

    Raises:
        ValueError: a blocking socket; bad messages (before any system call).
        TypeError: bad messages.
        OSError: from the kernel (BrokenPipeError, ...).
    """
    if (type(sock) is _SOCKET and type(flags) is int and 0 <= flags <= _C_INT_MAX
            and sock.gettimeout() == 0.0 and raw_family(sock) == _AF_UNIX
            and raw_type(sock) != _STREAM):
        fd = sock.fileno()
        if fd >= 0:  # see _SOCKET: an open non-blocking message socket
            items = messages[:] if type(messages) is list else list(messages)
            if len(items) != 1:
                return await _send_all(sock, fd, items, flags)
            now = flags | _DONTWAIT
            if "trio" not in _modules:
                try:
                    sent = _send_many_now(sock, items, now)
                except BlockingIOError:
                    sent = await call_when_ready(
                        fd, True, lambda: _send_many_now(sock, items, now),
                        backoff=True, blocked=True)
            else:
                sent = await call_when_ready(
                    fd, True, lambda: _send_many_now(sock, items, now), backoff=True)
            return 1 if sent else await _send_all(sock, fd, items, flags)
    fd, kind = _checked(sock)
    flags = _checks.msg_flags(flags)
    # One reading of the caller's list: it may change while we wait
    items = list(messages)
    if kind == _STREAM:
        return await _send_stream(sock, fd, items, flags)
    return await _send_all(sock, fd, items, flags)


async def _send_all(sock: Any, fd: int, items: List[Any], flags: int) -> int:
    total = len(items)
    sent = await _send_some(sock, fd, items, flags) if total else 0
    while sent < total:
        sent += await _send_some(sock, fd, items[sent:], flags)
    return total


async def _send_stream(sock: Any, fd: int, items: List[Any], flags: int) -> int:
    # A stream has no message boundaries: write the bytes, tracking the
    # position ourselves (the synchronous sendall would lose it on EAGAIN),
    # and send each message with descriptors or credentials as the
    # synchronous send_many does: one sendmsg with all of its bytes and the
    # control data, the rest (after a short write) without it.
    if not any(isinstance(m, Message) for m in items):
        try:
            data = b"".join(items)  # plain buffers: one write of all of them
        except TypeError:
            pass  # not all bytes-like: outgoing() below says which
        else:
            await _send_bytes(sock, fd, memoryview(data), flags)
            return len(items)
    out = outgoing(items)
    if out.addresses is not None:
        raise ValueError("a connected SOCK_STREAM socket takes no per-message address")
    n = len(out.datas)
    extras = [
        (out.fds[i] if out.fds is not None else (),
         out.credentials[i] if out.credentials is not None else None)
        for i in range(n)
    ]
    for (fds, cred), length in zip(extras, out.lengths):
        if (fds or cred is not None) and length == 0:
            raise ValueError("on SOCK_STREAM a message carrying descriptors or credentials "
                             "needs at least one data byte")
    i = 0
    while i < n:
        fds, cred = extras[i]
        if fds or cred is not None:
            view = memoryview(out.datas[i]).cast("B")
            sent = await call_when_ready(
                fd, True, lambda: send_with_control(sock, view, fds, cred, flags | _DONTWAIT),
                backoff=True)
            await _send_bytes(sock, fd, view[sent:], flags)
            i += 1
            continue
        j = i + 1
        while j < n and not extras[j][0] and extras[j][1] is None:
            j += 1
        data = out.datas[i] if j == i + 1 else b"".join(out.datas[i:j])
        await _send_bytes(sock, fd, memoryview(data).cast("B"), flags)
        i = j
    return n


async def _send_bytes(sock: Any, fd: int, view: memoryview, flags: int) -> None:
    raw = sock if isinstance(sock, socket.socket) else None
    flags |= _DONTWAIT | _NOSIGNAL
    pos, end = 0, len(view)
    while pos < end:
        if raw is not None:
            pos += await call_when_ready(fd, True, lambda: raw.send(view[pos:], flags))
        else:
            pos += await call_when_ready(fd, True, lambda: _send_fd(fd, view[pos:], flags))


def _send_fd(fd: int, data: memoryview, flags: int) -> int:
    twin = _io.BorrowedSocket(fileno=fd)
    try:
        return twin.send(data, flags)
    finally:
        twin.detach()


async def send_fds(sock: Any, buffers: Iterable[Any], fds: Iterable[Any], flags: int = 0,
                   address: Optional[Address] = None) -> int:
    """Send `buffers` with `fds` attached (SCM_RIGHTS); returns the bytes sent.

    The asyncio form of `afunix.send_fds` (signature of ``socket.send_fds``,
    with `flags` and `address` honoured).  Cancelled while waiting for
    writability, nothing was sent.  On SOCK_STREAM all of the data is
    written, in one sendmsg with the descriptors unless the socket takes
    less (see `send_many` for a cancelled stream).

    Raises:
        ValueError: a blocking socket; bad buffers or descriptors.
        TypeError: bad buffers or descriptors.
        OSError: from the kernel.
    """
    if (type(sock) is _SOCKET and type(flags) is int and 0 <= flags <= _C_INT_MAX
            and sock.gettimeout() == 0.0 and raw_family(sock) == _AF_UNIX
            and raw_type(sock) != _STREAM):
        fd = sock.fileno()
        if fd >= 0:  # see _SOCKET: an open non-blocking message socket
            buffer_list, fd_list, flags = list(buffers), list(fds), flags | _DONTWAIT
            if "trio" not in _modules:
                try:
                    return _send_fds_now(sock, buffer_list, fd_list, flags, address)
                except BlockingIOError:
                    return await call_when_ready(fd, True, lambda: _send_fds_now(
                        sock, buffer_list, fd_list, flags, address), backoff=True, blocked=True)
            return await call_when_ready(
                fd, True, lambda: _send_fds_now(sock, buffer_list, fd_list, flags, address),
                backoff=True)
    fd, kind = _checked(sock)
    flags = _checks.msg_flags(flags)
    if kind == _STREAM:
        data = b"".join(memoryview(b) for b in buffers)
        fd_list = list(fds)
        if address is not None:
            raise ValueError("a connected SOCK_STREAM socket takes no address")
        if fd_list and not data:
            raise ValueError("on SOCK_STREAM descriptors need at least one data byte to ride on")
        await _send_stream(sock, fd, [Message(data, fds=tuple(fd_list))], flags)
        return len(data)
    buffer_list = list(buffers)
    fd_list = list(fds)
    flags |= _DONTWAIT
    return await call_when_ready(
        fd, True, lambda: _send_fds_now(sock, buffer_list, fd_list, flags, address), backoff=True)


# ---- receiving --------------------------------------------------------------


async def recv_many(sock: Any, max_messages: int, bufsize: int, flags: int = 0, *,
                    maxfds: int = 0) -> List[Message]:
    """Wait for the first message, then return it and those queued behind it (one recvmmsg).

    The asyncio form of `afunix.recv_many` (``loop.sock_recv`` for message
    batches): the same `Message`s, truncation flags and descriptors
    (close-on-exec, owned by the caller).  At end of stream the list is
    empty.  Cancelled while waiting, nothing was received.

    Raises:
        ValueError: a blocking socket; bad sizes (before any system call).
        TypeError: bad arguments.
        OSError: from the kernel.
    """
    if (type(sock) is _SOCKET and type(flags) is int and 0 <= flags <= _C_INT_MAX
            and sock.gettimeout() == 0.0 and raw_family(sock) == _AF_UNIX
            and type(maxfds) is int and maxfds == 0):
        fd = sock.fileno()
        if fd >= 0:  # see _SOCKET: an open non-blocking socket
            flags |= _DONTWAIT
            if "trio" not in _modules:
                try:
                    return _recv_many_now(sock, max_messages, bufsize, flags)
                except BlockingIOError:
                    return await call_when_ready(
                        fd, False, lambda: _recv_many_now(sock, max_messages, bufsize, flags),
                        blocked=True)
            return await call_when_ready(
                fd, False, lambda: _recv_many_now(sock, max_messages, bufsize, flags))
    fd, _ = _checked(sock)
    flags = _checks.msg_flags(flags) | _DONTWAIT
    return await call_when_ready(
        fd, False, lambda: _recv_many_now(sock, max_messages, bufsize, flags, maxfds=maxfds))


async def recv_batch(sock: Any, batch: RecvBatch, flags: int = 0) -> int:
    """Wait for the first message, then fill `batch` with it and those queued; returns the count.

    The asyncio form of ``RecvBatch.recv``: the zero-copy path, one
    recvmmsg per wake-up, no object per message.  As ``batch.recv`` does,
    it empties the batch (closing descriptors not taken) before it tries;
    0 means end of stream.  Fill a batch from one task at a time.
    Cancelled while waiting, nothing was received (the batch is empty).

    Raises:
        TypeError: `batch` is not an afunix.RecvBatch.
        ValueError: a blocking socket.
        OSError: from the kernel.
    """
    if not isinstance(batch, RecvBatch):
        raise TypeError("batch must be an afunix.RecvBatch, not %s" % type(batch).__name__)
    fd, _ = _checked(sock)
    flags = _checks.msg_flags(flags) | _DONTWAIT
    return await call_when_ready(fd, False, lambda: batch.recv(sock, flags))


async def recv_fds(sock: Any, bufsize: int, maxfds: int, flags: int = 0
                   ) -> Tuple[bytes, List[int], int, Optional[Address]]:
    """Receive one message and up to `maxfds` descriptors; returns (data, fds, msg_flags, address).

    The asyncio form of `afunix.recv_fds` (signature of ``socket.recv_fds``):
    descriptors close-on-exec, owned by the caller.  Cancelled while
    waiting, nothing was received; once the message arrived it is returned.

    Raises:
        TruncatedError: the kernel cut the control data; the descriptors
            that arrived are already closed, the data is on the exception.
        ValueError: a blocking socket; bad sizes.
        OSError: from the kernel.
    """
    if (type(sock) is _SOCKET and type(flags) is int and 0 <= flags <= _C_INT_MAX
            and sock.gettimeout() == 0.0 and raw_family(sock) == _AF_UNIX):
        fd = sock.fileno()
        if fd >= 0:  # see _SOCKET: an open non-blocking socket
            flags |= _DONTWAIT
            if "trio" not in _modules:
                try:
                    return _recv_fds_now(sock, bufsize, maxfds, flags)
                except BlockingIOError:
                    return await call_when_ready(
                        fd, False, lambda: _recv_fds_now(sock, bufsize, maxfds, flags),
                        blocked=True)
            return await call_when_ready(
                fd, False, lambda: _recv_fds_now(sock, bufsize, maxfds, flags))
    fd, _ = _checked(sock)
    flags = _checks.msg_flags(flags) | _DONTWAIT
    return await call_when_ready(fd, False, lambda: _recv_fds_now(sock, bufsize, maxfds, flags))


# ---- connections ------------------------------------------------------------


async def accept(listening_sock: socket.socket) -> Tuple[socket.socket, Any]:
    """Accept a connection; returns (conn, address) with `conn` non-blocking.

    Like ``loop.sock_accept``, for a listening socket from `afunix.listen`
    (set non-blocking).  Cancelled while waiting, no connection was taken.
    Several tasks may accept on the same socket at once.

    Raises:
        TypeError: not a socket.socket.
        ValueError: a blocking socket.
        OSError: from the kernel.
    """
    if not isinstance(listening_sock, socket.socket):
        raise TypeError("expected a socket.socket, not %s" % type(listening_sock).__name__)
    fd, _ = _checked(listening_sock)
    conn, address = await call_when_ready(fd, False, listening_sock.accept)
    try:
        conn.setblocking(False)
    except BaseException:
        conn.close()
        raise
    return conn, address


async def connect(address: Address, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket connected to the AF_UNIX server at `address`.

    The asyncio form of `afunix.connect` (``loop.sock_connect`` on a new
    socket).  A server whose backlog is full answers EAGAIN with nothing to
    wait for, so the connect is retried after a pause that grows to 50 ms;
    bound it with ``asyncio.wait_for`` or ``asyncio.timeout``.  Cancelled,
    it leaves no socket open.

    Args:
        address: a path (str, bytes, os.PathLike) or an `afunix.abstract` address.
        type: socket.SOCK_STREAM, SOCK_SEQPACKET or SOCK_DGRAM.

    Raises:
        TypeError, ValueError: bad address or type, before any system call.
        OSError: from the kernel (ENOENT, ECONNREFUSED, ...).
    """
    raw, _ = encode_address(address)
    kind = _checks.supported_socket_type(type)
    # A full backlog answers EAGAIN (nothing to wait on): a growing pause
    sock, in_progress = await call_when_ready(
        None, True, lambda: _connect_now(raw, kind), backoff=True)
    if in_progress:
        # Not Linux (its AF_UNIX connect never is in progress): wait, then ask.
        try:
            await wait(sock.fileno(), True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
        except BaseException:
            sock.close()
            raise
    return sock


def _connect_now(raw: Any, kind: int) -> Tuple[socket.socket, bool]:
    """A new non-blocking socket connected (or connecting: True) to `raw`; none left open on error."""
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.setblocking(False)
        try:
            sock.connect(raw)
            return sock, False
        except BlockingIOError as exc:
            if exc.errno != errno.EINPROGRESS:
                raise  # EAGAIN: the backlog is full
            return sock, True
    except BaseException:
        sock.close()
        raise


# ---- the message Channel ----------------------------------------------------


class Channel:
    """The async form of `afunix.Channel` (asyncio, uvloop, trio): the same framed messages.

    Wraps a synchronous `afunix.Channel` over a non-blocking socket and
    follows the same try-first pattern as the rest of this module.  The
    channel owns its socket.  Cancellation loses nothing: a receive cancelled
    while it waits has consumed nothing (bytes of a message not complete yet
    stay in the channel's buffer for the next receive); a send cancelled
    while it waits has sent the messages before the one it was on, and that
    one either went whole or is kept whole in `pending` for the next send or
    `flush`, never half-framed on the wire.

    With ``shm_size``, large messages go through a shared-memory lane as
    with `afunix.Channel`: a send that finds no free slot waits on the
    loop for the peer's returns (a cancelled one has taken no slot and
    sent nothing of that message), and `loan` / `send_loan` make a message
    in place.

    Args:
        sock: a connected, non-blocking AF_UNIX SOCK_STREAM or SOCK_SEQPACKET socket.
        **options: ``max_frame``, ``write_buffer``, ``shm_size``,
            ``shm_threshold`` and ``trust_peer``, as for `afunix.Channel`.

    Raises:
        ValueError: a blocking socket (see the module's rules), or what
            `afunix.Channel` refuses.
    """

    def __init__(self, sock: socket.socket, **options: Any) -> None:
        self._fd, _ = _checked(sock)
        # the same loop over the frame codec as the synchronous channel: its
        # reader is the only receive buffer
        self._ch = SyncChannel(sock, **options)
        self._reader = reader_of(self._ch)
        # Whatever closes the socket (close(), or a call that meets a
        # ProtocolError and closes the channel from inside), the tasks
        # waiting on it wake first: a closed descriptor never reports
        # ready, and uvloop aborts on a callback left on one.  (The fd, not
        # this object: the sync channel keeps the hook.)
        before_close(self._ch, functools.partial(notify_closing, self._fd))
        self._flush_after_send = not options.get("write_buffer")
        # tasks waiting for slots of the lane to come back: a receive in
        # another task may take the returns in, and the socket then says
        # nothing more; the lane wakes them (on_room)
        self._room_waiters = 0
        # tasks waiting for input: a send that waits for slots reads the
        # socket, and may bring in messages a readiness event then never
        # reports; the send wakes them (_sending)
        self._receivers = 0
        lane = lane_of(self._ch)
        if lane is not None:
            lane.on_room = self._room_came

    @classmethod
    async def connect(cls, address: Address, type: int = socket.SOCK_STREAM,
                      **options: Any) -> "Channel":
        """Connect to a listening AF_UNIX socket (see `connect`) and return a Channel."""
        sock = await connect(address, type)
        return owning(sock, lambda: cls(sock, **options))

    @classmethod
    async def accept(cls, listener: socket.socket, **options: Any) -> "Channel":
        """Accept one connection on a non-blocking `listener` as a Channel."""
        sock, _ = await accept(listener)
        return owning(sock, lambda: cls(sock, **options))

    @property
    def socket(self) -> socket.socket:
        """The channel's socket (owned by the channel)."""
        return self._ch.socket

    @property
    def pending(self) -> int:
        """Bytes accepted but not yet written (see `flush`)."""
        return self._ch.pending

    @property
    def closed(self) -> bool:
        return self._ch.closed

    def fileno(self) -> int:
        return self._ch.fileno()

    # ---- send -------------------------------------------------------------------

    async def send(self, data: Any, fds: Iterable[Any] = ()) -> None:
        """Send one message (with `fds` attached when given); see `send_many`."""
        fds = tuple(fds)
        await self.send_many([Message(data, fds) if fds else data])

    async def send_many(self, messages: Iterable[Any]) -> int:
        """Send every message, waiting for writability as needed; returns the count.

        Without a write buffer it returns once every byte is written; with
        one, once the messages are accepted (call `flush` to write them).
        """
        # One reading of the caller's list: it may change while we wait
        items = list(messages)
        sent = 0
        wait_for = self._wait_to_send if lane_of(self._ch) is not None else None
        while sent < len(items):
            rest = items[sent:] if sent else items
            if wait_for is None:  # (no lane: a send never reads)
                sent += await call_when_ready(self._fd, True, lambda: self._ch.send_many(rest))
            else:
                sent += await call_when_ready(
                    self._fd, True, lambda: self._sending(lambda: self._ch.send_many(rest)),
                    wait_for=wait_for)
        if self._flush_after_send:
            await self.flush()
        return sent

    # ---- the shared-memory lane -------------------------------------------------

    async def loan(self, nbytes: int) -> Loan:
        """A writable slot of `nbytes` bytes of the lane (see `afunix.Channel.loan`), waiting for room on the loop.

        Cancelled while it waits, no slot is taken.

        Raises:
            ValueError, TypeError: no lane, or a bad size (before any system call).
            OSError: as `afunix.Channel.loan` (BrokenPipeError: the peer closed).
        """
        ch = self._ch
        if lane_of(ch) is None:
            raise ValueError("this channel has no shared-memory lane (see shm_size)")
        loan: Loan = await call_when_ready(
            self._fd, True, lambda: self._sending(lambda: ch.loan(nbytes)),
            wait_for=self._wait_to_send)
        return loan

    async def send_loan(self, loan: Loan, fds: Iterable[Any] = ()) -> None:
        """Send the filled slot of `loan` as one message (see `afunix.Channel.send_loan`).

        Cancelled while it waits for socket space, nothing was sent and the
        loan is still open.
        """
        ch = self._ch
        fd_list = tuple(fds)
        await call_when_ready(self._fd, True,
                              lambda: self._sending(lambda: ch.send_loan(loan, fd_list)))
        if self._flush_after_send:
            await self.flush()

    def _sending(self, call: Callable[[], R]) -> R:
        """`call`, a sending call of the synchronous channel; then the receives waiting are woken if it read messages in.

        A send that finds no free slot reads the peer's frames for its
        RETURNs, and parses the messages among them when nothing waits to
        be taken (`afunix.Channel`'s send): the socket then says nothing
        about them, and a receive task waiting for it would wait for ever.
        """
        try:
            return call()
        finally:
            if self._receivers and self._reader.buffered:
                wake(self._fd)

    async def _wait_to_send(self) -> None:
        """What a refused send of a channel with a lane waits for: socket space, or returned slots."""
        if not room_wanted(self._ch):
            await wait(self._fd, True)
            return
        lane = lane_of(self._ch)
        assert lane is not None  # (room is wanted of a lane only)
        # Counted before anything else runs: from here the slots a receive
        # of another task takes back wake this task (_room_came), and the
        # ones that came back since this task's try set the lane's `room`
        # (cleared by each try), so no return is missed in between.
        self._room_waiters += 1
        try:
            if lane.room.is_set():
                return  # slots came back since the try: try again
            if self._reader.holding:
                # Messages nobody took yet (parsed, or behind a batch still
                # out) keep the socket readable once the buffer is full, and
                # a wait for it would return at once: a pause (as the
                # synchronous channel's), cut short by the returns a
                # receive of another task takes in.
                await wait_woken(self._fd, 0.005)
            else:
                await wait(self._fd, False)  # the peer's RETURN frames (or the lane's on_room)
        finally:
            self._room_waiters -= 1

    def _room_came(self) -> None:
        # LaneSender.on_room: called inside the sync channel's calls, on the loop's thread
        if self._room_waiters:
            wake(self._fd)

    async def flush(self) -> None:
        """Write every accepted message still waiting, waiting for writability as needed."""
        while self._ch.flush():
            await wait(self._fd, True)

    async def send_object(self, obj: Any) -> None:
        """Send `obj` pickled with protocol 5 (see `afunix.Channel.send_object`).

        Large buffers are kept out of the pickle stream: each goes in a
        free slot of the lane with ``shm_size``, inline otherwise.  When
        what stays inline would be over max_frame it waits on the loop for
        the peer's returns, as `send` does (cancelled while it waits, it has
        taken no slot and sent nothing).  Returns once every byte is
        written, as `send` does without a write buffer.
        """
        ch = self._ch
        wait_for = self._wait_to_send if lane_of(ch) is not None else None
        await call_when_ready(self._fd, True, lambda: self._sending(lambda: ch.send_object(obj)),
                              wait_for=wait_for)
        if self._flush_after_send:
            await self.flush()

    # ---- receive ----------------------------------------------------------------
    #
    # Each receive returns what the synchronous channel returned, with no
    # call in between (a call is where a signal handler's exception lands):
    # the messages a receive took are given out, or stay in the channel's
    # reader.  Messages already parsed are taken without a wait or a
    # system call, as the synchronous receive takes them.

    async def _try(self, call: Callable[[], Any]) -> Any:
        # (under trio a checkpoint, as every other call; see call_when_ready)
        return await call_when_ready(self._fd, False, call, wait_for=self._wait_to_receive)

    async def _wait_to_receive(self) -> None:
        """What a refused receive waits for: input, or room for the RETURN frames it holds back.

        docs/PROTOCOL.md: a receiver never waits for input while it holds
        back returns (the peer may wait for those slots before it sends
        anything); the next try writes them (`afunix.Channel`'s receive).
        """
        self._receivers += 1  # a send that reads messages in wakes it (_sending)
        try:
            if self._reader.returns:
                await wait_either(self._fd)
            else:
                await wait(self._fd, False)
        finally:
            self._receivers -= 1

    async def recv(self) -> bytes:
        """Receive one message (descriptors that came with it are closed by the next receive).

        Raises:
            EOFError: the peer closed the channel cleanly.
            MessageKindError: the next message is an object (sent with
                `send_object`): it stays, for `recv_object`.
            ProtocolError: the peer broke the protocol; the channel is closed.
        """
        received: bytes = await self._try(self._ch.recv)
        return received

    async def recv_many(self, max_messages: int = 1 << 16) -> List[bytes]:
        """Receive the messages one read brought, waiting only for the first; [] at end of stream.

        MessageKindError when the first is an object (it stays, for
        `recv_object`); the messages before an object are returned without it.
        """
        ch = self._ch
        messages: List[bytes] = await self._try(lambda: ch.recv_many(max_messages))
        return messages

    async def recv_message(self) -> Message:
        """Receive one message with its descriptors (owned by the caller).

        MessageKindError when it is an object (it stays, for `recv_object`).
        """
        message: Message = await self._try(self._ch.recv_message)
        return message

    async def recv_batch(self, max_messages: int = 1 << 16) -> Any:
        """The zero-copy receive (an `afunix.FrameBatch`, valid until the next receive).

        MessageKindError when the first message is an object (it stays, for
        `recv_object`); a batch ends before an object.
        """
        ch = self._ch
        return await self._try(lambda: ch.recv_batch(max_messages))

    async def recv_object(self) -> Any:
        """Receive one object sent with `send_object`, unpickled (see `afunix.Channel.recv_object`).

        Refused with PermissionError, and the object dropped, from a peer of
        another uid unless the channel was opened with ``trust_peer=True``;
        MessageKindError when the next message is not an object (it stays,
        for `recv` and the other receives).
        """
        return await self._try(self._ch.recv_object)

    def __aiter__(self) -> "Channel":
        return self

    async def __anext__(self) -> bytes:
        """Every message until the peer closes the channel cleanly.

        MessageKindError at an object (it stays, for `recv_object`).
        """
        # Parsed already: taken at once, with no wait and no system call.
        # Without the channel's claim: this object is used from its event
        # loop's thread only, and between two awaits nothing else receives.
        r = self._reader
        i = r.next
        k = i - r.copied_from
        if 0 <= k < r.ncopied:  # FrameReader.take_next's first branch, inline
            data = r.copies[k]
            r.next = i + 1
            return data
        if r.buffered:
            if r.returns or r.lane_msg is not None:
                before_take(self._ch)  # slots of the peer's lane go back, this one's too
            taken = r.take_next()
            assert taken is not None  # (a message is parsed: take_next gives one)
            return taken
        try:
            received: bytes = await self._try(self._ch.recv)
        except EOFError:
            raise StopAsyncIteration from None
        return received

    # ---- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Close the channel and its socket, and every descriptor it still holds.

        A task waiting on the channel (a send, flush or receive) wakes and
        gets OSError(EBADF); one leaving ``async with`` just ends.
        """
        self._ch.close()  # (it wakes them before its socket closes: see __init__)

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, exc_type: Optional[type], *exc: object) -> None:
        """Leaving the block normally writes what is pending first, waiting on the loop.

        close() alone makes one non-blocking try, as the synchronous channel
        does on a non-blocking socket; here the rest would be dropped in the
        middle of a frame.  When the block raised, or the peer is gone,
        the channel is closed without waiting.
        """
        try:
            if exc_type is None and not self.closed:
                await self.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # nobody would read them, as close() says
        except OSError:
            if not self.closed:
                raise
            # another task closed the channel meanwhile: its close() had the pending bytes
        finally:
            self.close()


def channel_pair(type: int = socket.SOCK_STREAM, **options: Any) -> Tuple[Channel, Channel]:
    """Two connected asyncio Channels over a new non-blocking socketpair."""
    a, b = socketpair(type, blocking=False)
    try:
        return Channel(a, **options), Channel(b, **options)
    except BaseException:
        a.close()
        b.close()
        raise
