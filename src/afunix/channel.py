"""Message channel: framed, batched messages with descriptors over one connected socket.

A `Channel` turns a connected SOCK_STREAM or SOCK_SEQPACKET socket into a
stream of frames (docs/PROTOCOL.md): many messages per system call, packed
and parsed by the active backend (in C on the C backend), descriptors riding
on the frame that declares them.
"""
from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

from . import _backend, _checks, _io
from ._kernel import MSG_CMSG_CLOEXEC, MSG_NOSIGNAL
from .batch import checked_fds, pinned, plain_pinned
from .frames import (DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT, RECORD_MAX, FrameBatch,
                     ProtocolError, _chunked, _header, _JOIN_MAX, _Records, _Segment)
from ._limits import FRAME_HEADER as HEADER_SIZE
from .message import Address, Message

T = TypeVar("T")

_TABLE_CAPACITY = 4096
_RECV_BUFFER = 256 << 10
# Below this much room at the end of the receive buffer, move the unparsed
# bytes to its front before reading: a short read costs a system call.
_READ_ROOM = 32 << 10
# Plain ints: the socket module's constants are enum members, and | or & on
# them builds a new enum object each time.
_STREAM = int(socket.SOCK_STREAM)
_SEQPACKET = int(socket.SOCK_SEQPACKET)
_NOSIGNAL = MSG_NOSIGNAL
_CLOEXEC = MSG_CMSG_CLOEXEC
_TRUNC = int(socket.MSG_TRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_EMPTY = memoryview(b"")
# The two sides of a channel, each used by one caller at a time (see
# Channel._busy): the keys of the claims, and how the refusal names them.
_SENDING = "sending"
_RECEIVING = "receiving"


def _refused(side: str) -> RuntimeError:
    return RuntimeError("this Channel is already %s in another thread (or in the call a "
                        "signal handler interrupted): one caller at a time" % side)


# Every open Channel of this process, for the fork hook below.
_channels: "weakref.WeakSet[Channel]" = weakref.WeakSet()


def _forget_parents_unsent() -> None:
    """In a child after fork(): each channel's unsent bytes stay the parent's to write.

    Buffered messages and the tail of a partly written one are copied into
    the child with the rest of its memory; written from both processes
    (each one's close() or flush()), they would reach the peer twice.
    """
    for ch in list(_channels):
        ch._drop_unsent()
        ch._busy.pop(_SENDING, None)  # a parent's thread in a send does not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_unsent)


def _owning(sock: socket.socket, make: Callable[[], T]) -> T:
    """make(), which takes ownership of `sock`; `sock` is closed if it fails."""
    try:
        return make()
    except BaseException:
        sock.close()
        raise


class Channel:
    """Framed messages over a connected SOCK_STREAM or SOCK_SEQPACKET AF_UNIX socket.

    The channel owns the socket (closing the channel closes it) and follows
    its blocking mode and timeout.  Messages are bytes; a message may carry
    descriptors.  Sends pack many messages into one system call; receives
    parse every message that one system call brought.  One thread at a time
    may send, and one at a time may receive: a second caller on the same
    side gets RuntimeError at once.

    Args:
        sock: a connected AF_UNIX socket, SOCK_STREAM or SOCK_SEQPACKET.
        max_frame: the largest message accepted (received: ProtocolError;
            sent: ValueError), at most 1 GiB.
        write_buffer: when > 0, `send` keeps messages until this many bytes
            are waiting (or `flush`), then writes them with one system call.

    Raises:
        TypeError, ValueError: not such a socket, or bad limits.
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = DEFAULT_MAX_FRAME,
                 write_buffer: int = 0) -> None:
        self._closed = True  # until set up: close() and __del__ have nothing to do
        # Which call is using each side (_SENDING, _RECEIVING).  Two threads
        # receiving at once would hand out one message twice or parse half
        # of another's read; two sending would interleave their bytes; so
        # would a signal handler that sends or receives inside the call it
        # interrupted.  A second caller is refused, never made to wait.  Each
        # public call claims its side with one atomic dict.setdefault inside
        # its try, with a token only it holds, and its finally releases only
        # its own claim, with no call in between (from CPython 3.11 pending
        # signals and thread switches are taken only at calls and backward
        # jumps): an exception at any point, a handler's KeyboardInterrupt
        # included, never leaves the side claimed.  (Not a decorator:
        # *args/**kwargs cost about 100 ns per message.)
        self._busy: Dict[str, object] = {}
        if not isinstance(sock, socket.socket):
            raise TypeError("Channel needs a socket.socket, not %s" % type(sock).__name__)
        if sock.family != socket.AF_UNIX:
            raise ValueError("Channel needs an AF_UNIX socket")
        kind = _io._raw_type(sock)
        if kind not in (_STREAM, _SEQPACKET):
            raise ValueError("Channel needs a SOCK_STREAM or SOCK_SEQPACKET socket")
        if sock.fileno() < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        self._max_frame = _checks.in_range(max_frame, "max_frame", 0, MAX_FRAME_LIMIT)
        self._write_buffer = _checks.in_range(write_buffer, "write_buffer", 0, 1 << 30)
        self._impl = _backend.impl
        self._sock = sock
        self._fd = sock.fileno()
        self._seqpacket = kind == _SEQPACKET
        # receive side: bytes [_start, _rs.end) of _buffer are not parsed
        # yet; _rs.base is the stream offset of _buffer[0] (descriptors are
        # matched to frames by stream offset).  _rx is the backend's receive
        # state: the call that reads records there, at once, the bytes (end)
        # and the descriptors it brought (held reads, see csrc/channel.h),
        # so an exception from a signal handler cannot drop them.  Every
        # other change to the receive state is made with stores only, after
        # what it gives out is built (CPython runs signal handlers only at
        # calls and backward jumps).
        self._buffer = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._rx = self._impl.new_chan_rx()
        self._rs = self._rx.s
        self._reads = self._rx.reads  # slots for held reads
        self._table = self._impl.new_frame_table(_TABLE_CAPACITY)
        self._next = 0  # next parsed frame to hand out
        self._parsed = 0  # frames in the table
        self._batch: Optional[FrameBatch] = None
        # set when a parse found a protocol error behind good frames: the
        # error is raised once those frames are handed out
        self._broken: Optional[str] = None
        # send side: _pending is frame bytes already promised (the tail of a
        # partly written message, or flushed buffered ones); _queue holds
        # buffered payloads (immutable) not packed yet, _queue_lengths their
        # sizes and _queued their frame bytes
        self._pending = _EMPTY
        self._queue: List[bytes] = []
        self._queue_lengths: List[int] = []
        self._queued = 0
        # where batches are packed, reused: a fresh large buffer per batch
        # costs a page fault per 4 KiB.  Nothing refers to it between calls
        # (a kept tail is copied out).
        self._out = bytearray(0)
        self._closed = False
        _channels.add(self)

    # ---- construction helpers -------------------------------------------------

    @classmethod
    def connect(cls, address: Address, type: int = socket.SOCK_STREAM, *,
                timeout: Optional[float] = None, **options: Any) -> "Channel":
        """Connect to a listening AF_UNIX socket and return a Channel over it.

        Like ``Channel(afunix.connect(address, type, timeout=timeout), **options)``.
        """
        from .addresses import connect
        sock = connect(address, type, timeout=timeout)
        return _owning(sock, lambda: cls(sock, **options))

    @classmethod
    def accept(cls, listener: socket.socket, **options: Any) -> "Channel":
        """Accept one connection on `listener` (e.g. from afunix.listen) as a Channel."""
        sock, _ = listener.accept()
        return _owning(sock, lambda: cls(sock, **options))

    # ---- state ------------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The channel's socket (owned by the channel: do not read or write it directly)."""
        return self._sock

    def fileno(self) -> int:
        """The socket's descriptor, for selectors; -1 once closed."""
        return -1 if self._closed else self._fd

    @property
    def closed(self) -> bool:
        """True once the channel is closed (by close() or after a ProtocolError)."""
        return self._closed

    @property
    def max_frame(self) -> int:
        """The largest message accepted, in bytes."""
        return self._max_frame

    @property
    def pending(self) -> int:
        """Bytes of accepted messages not written to the socket yet."""
        return len(self._pending) + self._queued

    @property
    def buffered_messages(self) -> int:
        """Messages already received and parsed, that the next receive returns without waiting."""
        return self._parsed - self._next

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the channel is closed")

    # ---- send -------------------------------------------------------------------

    def send(self, data: Any, fds: Iterable[Any] = ()) -> None:
        """Send one message, with `fds` attached when given.

        Like ``sock.sendall`` of one framed message.  When the socket cannot
        take all of it (non-blocking, or the timeout ran out) after the first
        byte went, the rest is kept and written first by the next send or
        flush (see `pending`): a message is never half-framed on the wire.

        Raises:
            TypeError, ValueError: bad data or descriptors, a message over max_frame.
            BlockingIOError: a non-blocking socket took none of it (nothing sent).
            TimeoutError: nothing could be sent before the socket's timeout.
            OSError: from the kernel.
            RuntimeError: another thread is sending on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_SENDING, me) is not me:
                raise _refused(_SENDING)
            self._send(data, fds)
        finally:
            if _SENDING in busy and busy[_SENDING] is me:
                del busy[_SENDING]

    def _send(self, data: Any, fds: Iterable[Any]) -> None:
        if type(data) is bytes and not fds and not self._closed:
            n = len(data)
            if n > self._max_frame:
                raise ValueError("message of %d bytes is over max_frame (%d)" % (n, self._max_frame))
            if self._write_buffer:
                self._enqueue_one(data, n, None)
                return
            if self._pending:
                self._send_many([data])
                return
            # the common case, one call: header and payload in one write
            frame = _header(n) + data
            if self._sock.gettimeout() is None and (
                    not self._seqpacket or len(frame) <= RECORD_MAX):
                # blocking: the kernel writes all of it (a stream) or the
                # whole record (SEQPACKET), or fails
                done = self._sock.send(frame, _NOSIGNAL)
                if done == len(frame):
                    return
                self._pending = memoryview(frame)[done:]
                self._flush()
                return
        self._send_many([data if not fds else Message(data, tuple(checked_fds(fds)))])

    def send_many(self, messages: Iterable[Any]) -> int:
        """Send many messages with as few system calls as the socket allows.

        `messages` holds bytes-like objects or `Message`s (whose `fds` ride
        along).  Messages without descriptors are packed back to back into
        one write; each message with descriptors gets its own sendmsg so the
        kernel attaches them to its bytes.  With a write buffer, messages
        without descriptors are kept until it fills (see `flush`).

        Partial results are counts, never losses: when the socket stops
        taking bytes (non-blocking, or the timeout ran out), the messages
        fully written and the one in progress (its tail kept in `pending`)
        count as sent, and the rest are not: send them again from
        ``messages[k:]``.

        Returns:
            How many messages were sent or accepted, in order from the first.

        Raises:
            TypeError, ValueError: bad messages, before anything is sent.
            BlockingIOError: nothing accepted on a non-blocking socket.
            TimeoutError: nothing accepted before the socket's timeout.
            OSError: from the kernel.
            RuntimeError: another thread is sending on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_SENDING, me) is not me:
                raise _refused(_SENDING)
            return self._send_many(messages)
        finally:
            if _SENDING in busy and busy[_SENDING] is me:
                del busy[_SENDING]

    def _send_many(self, messages: Iterable[Any]) -> int:
        self._check_open()
        segments, total = self._segments(messages)
        if not total:
            return 0
        if self._write_buffer:
            return self._enqueue(segments, total)
        deadline = _io.deadline_of(self._sock.gettimeout())
        if (self._pending or self._queue) and not self._drain(deadline):
            raise self._stall()
        accepted = 0
        for seg in segments:
            k, exc = self._emit(seg, deadline)
            accepted += k
            if exc is not None:
                if accepted and isinstance(exc, (BlockingIOError, socket.timeout)):
                    return accepted
                raise exc
        return accepted

    def send_fixed(self, buffer: Any, size: int) -> int:
        """Send `buffer` as ``len(buffer) // size`` messages of `size` bytes each, in order.

        For callers that hold fixed-size records back to back in one buffer
        (the sending twin of `recv_batch`): no object per message.  Partial
        results are counts, as for `send_many`.

        Returns:
            How many messages were sent or accepted.

        Raises:
            TypeError, ValueError: not a C-contiguous buffer, size < 1, a
                length that is not a multiple of size, size over max_frame.
            BlockingIOError, TimeoutError, OSError, RuntimeError: as for send_many.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_SENDING, me) is not me:
                raise _refused(_SENDING)
            return self._send_fixed(buffer, size)
        finally:
            if _SENDING in busy and busy[_SENDING] is me:
                del busy[_SENDING]

    def _send_fixed(self, buffer: Any, size: int) -> int:
        self._check_open()
        size = _checks.in_range(size, "size", 1, self._max_frame)
        data, nbytes = pinned(buffer)  # its size cannot change from here on
        if nbytes % size:
            raise ValueError("the buffer holds %d bytes, not a multiple of size %d" % (nbytes, size))
        n = nbytes // size
        if not n:
            return 0
        view = memoryview(data).cast("B")
        seg = _Segment(_Records(view, size, n), [size] * n, view.tobytes())  # type: ignore[arg-type]
        if self._write_buffer:
            return self._enqueue([seg], n)
        deadline = _io.deadline_of(self._sock.gettimeout())
        if (self._pending or self._queue) and not self._drain(deadline):
            raise self._stall()
        k, exc = self._emit(seg, deadline)
        if exc is not None and not (k and isinstance(exc, (BlockingIOError, socket.timeout))):
            raise exc
        return k

    def flush(self) -> int:
        """Write every accepted message still waiting (buffered, or a partly written tail).

        Returns:
            The bytes still pending: 0, except on a non-blocking socket that
            stopped taking bytes (call again when it is writable).

        Raises:
            TimeoutError: the socket's timeout ran out first (the rest stays pending).
            OSError: from the kernel.
            RuntimeError: another thread is sending on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_SENDING, me) is not me:
                raise _refused(_SENDING)
            return self._flush()
        finally:
            if _SENDING in busy and busy[_SENDING] is me:
                del busy[_SENDING]

    def _flush(self) -> int:
        self._check_open()
        timeout = self._sock.gettimeout()
        if not self._drain(_io.deadline_of(timeout)) and timeout != 0.0:
            raise socket.timeout("timed out")
        return self.pending

    @contextlib.contextmanager
    def batched(self, size: int = 1 << 20) -> Iterator["Channel"]:
        """Within the block, `send` buffers up to `size` bytes per write; flushes at the end.

        For callers who produce one message at a time::

            with ch.batched():
                for item in items:
                    ch.send(encode(item))
        """
        size = _checks.in_range(size, "size", 1, 1 << 30)
        previous = self._write_buffer
        self._write_buffer = max(previous, size)
        try:
            yield self
        except BaseException:
            self._write_buffer = previous
            with contextlib.suppress(OSError):
                if not self._closed:
                    self.flush()
            raise
        self._write_buffer = previous
        if not self._closed:
            self.flush()

    def _segments(self, messages: Iterable[Any]) -> Tuple[List[_Segment], int]:
        """Check `messages` and split them into write segments (validate once, up front)."""
        items = list(messages)  # one reading of the caller's list (see batch.outgoing)
        if not items:
            return [], 0
        limit = self._max_frame
        plain = plain_pinned(items)
        if plain is not None:  # the common case: plain byte strings
            items, lengths = plain
            if max(lengths) > limit:
                raise ValueError("a message of %d bytes is over max_frame (%d)"
                                 % (max(lengths), limit))
            if sum(lengths) <= _JOIN_MAX:
                return [_Segment(items, lengths, b"".join(items))], len(items)
            return _chunked(items, lengths), len(items)
        segments: List[_Segment] = []
        run: List[Any] = []
        run_lengths: List[int] = []
        for item in items:
            if isinstance(item, Message):
                data, fds = item.data, checked_fds(item.fds)  # may run the caller's fileno()
            else:
                data, fds = item, ()
            data, n = pinned(data)  # measured and pinned last: its size cannot change now
            if n > limit:
                raise ValueError("a message of %d bytes is over max_frame (%d)" % (n, limit))
            if fds:
                if run:
                    segments.append(_Segment(run, run_lengths, b"".join(run)))
                    run, run_lengths = [], []
                segments.append(_Segment([data], [n], bytes(data), fds))
            else:
                run.append(data)
                run_lengths.append(n)
        if run:
            segments.append(_Segment(run, run_lengths, b"".join(run)))
        return segments, len(items)

    def _pack(self, seg: _Segment) -> memoryview:
        return self._pack_into(seg.datas, seg.joined, seg.lengths,
                               [len(seg.fds)] if seg.fds else None)

    def _pack_into(self, datas: Any, joined: bytes, lengths: List[int],
                   nfds: Optional[List[int]]) -> memoryview:
        total = len(joined) + HEADER_SIZE * len(lengths)
        out = self._out
        if len(out) < total or (len(out) > (8 << 20) and total < len(out) // 8):
            # a new buffer, not a resize: a view of the old one may be alive
            out = self._out = bytearray(max(total, 64 << 10))
        n = self._impl.pack_frames(out, datas, joined, lengths, nfds)
        return memoryview(out)[:n]

    def _enqueue(self, segments: List[_Segment], total: int) -> int:
        """Buffered mode: keep messages without descriptors; write when the buffer fills."""
        accepted = 0
        deadline = _io.deadline_of(self._sock.gettimeout())
        try:
            for seg in segments:
                if seg.fds:
                    # descriptors must ride on their frame's own write, after
                    # everything buffered ahead of it
                    if not self._drain(deadline):
                        raise self._stall()
                    k, exc = self._emit(seg, deadline)
                    accepted += k
                    if exc is not None:
                        raise exc
                    continue
                joined, off = seg.joined, 0
                for data, n in zip(seg.datas, seg.lengths):
                    # keep bytes, never the caller's (maybe mutable) buffers
                    self._enqueue_one(data if type(data) is bytes else joined[off:off + n],
                                      n, deadline)
                    off += n
                    accepted += 1
        except (BlockingIOError, socket.timeout):
            if accepted:
                return accepted
            raise
        return accepted

    def _enqueue_one(self, data: bytes, n: int, deadline: Optional[float]) -> None:
        """Buffer one message; write the buffer when it is full.

        Raises BlockingIOError (or a timeout) when the buffer is full and the
        socket takes nothing: the message is then not accepted.
        """
        size = n + HEADER_SIZE
        limit = self._write_buffer
        if self._queued + len(self._pending) + size > limit and (self._queued or self._pending):
            if deadline is None:
                deadline = _io.deadline_of(self._sock.gettimeout())
            if not self._drain(deadline):
                raise self._stall()
        self._queue.append(data)
        self._queue_lengths.append(n)
        self._queued += size
        if self._queued >= limit:
            if deadline is None:
                deadline = _io.deadline_of(self._sock.gettimeout())
            self._drain(deadline)

    def _stall(self) -> OSError:
        """The error for "nothing accepted": BlockingIOError, or a timeout."""
        if self._sock.gettimeout() == 0.0:
            return BlockingIOError(errno.EAGAIN, "the socket is full; nothing was sent")
        return socket.timeout("timed out")

    def _drain(self, deadline: Optional[float]) -> bool:
        """Write `_pending` and the queue; True when nothing is left."""
        if self._queue:
            queue, lengths = self._queue, self._queue_lengths
            self._queue, self._queue_lengths, self._queued = [], [], 0
            packed = self._pack_into(queue, b"".join(queue), lengths, None)
            self._pending = packed if not self._pending else memoryview(
                bytes(self._pending) + bytes(packed))
        while self._pending:
            done, exc = self._write(self._pending, deadline)
            # what is left is copied out of the reusable pack buffer
            self._pending = memoryview(self._pending[done:].tobytes()) \
                if done < len(self._pending) else _EMPTY
            if exc is not None:
                if isinstance(exc, (BlockingIOError, socket.timeout)):
                    return False
                raise exc
        return True

    def _emit(self, seg: _Segment, deadline: Optional[float]) -> Tuple[int, Optional[BaseException]]:
        """Write one segment; (messages accepted, the exception that stopped it or None)."""
        packed = self._pack(seg)
        total = len(packed)
        done = 0
        exc: Optional[BaseException] = None
        if seg.fds:
            try:
                done = self._send_fds(packed, seg.fds, deadline)
            except BaseException as e:  # nothing went: the message is not started
                return 0, e
        if done < total:
            more, exc = self._write(packed[done:], deadline)
            done += more
        if done == total:
            return len(seg.lengths), exc
        if done == 0:
            return 0, exc
        # Keep the tail of the message in progress; later messages are not started.
        end = 0
        k = 0
        for n in seg.lengths:
            end += HEADER_SIZE + n
            k += 1
            if end >= done:
                break
        if end > done:
            self._pending = memoryview(packed[done:end].tobytes())
        return k, exc

    def _write(self, view: memoryview, deadline: Optional[float]) -> Tuple[int, Optional[BaseException]]:
        """Write as much of `view` as the socket takes; (bytes written, what stopped it or None)."""
        sock = self._sock
        timeout = sock.gettimeout()
        total = len(view)
        done = 0
        twin: Optional[socket.socket] = None
        record = RECORD_MAX if self._seqpacket else total
        try:
            if timeout:
                # CPython's methods wait before every call on a socket with a
                # timeout; try first (a unix socket polls writable only when
                # most of its buffer is free), wait only when it is full.
                twin = _io.nonblocking_twin(sock)
            writer = twin if twin is not None else sock
            while done < total:
                try:
                    done += writer.send(view[done:done + record], _NOSIGNAL)
                except BlockingIOError as exc:
                    if twin is None:
                        return done, exc
                    if not _io.wait(self._fd, True, deadline):
                        return done, socket.timeout("timed out")
        except BaseException as exc:
            return done, exc
        finally:
            if twin is not None:
                twin.detach()
        return done, None

    def _send_fds(self, packed: memoryview, fds: Tuple[int, ...], deadline: Optional[float]) -> int:
        """The first write of a frame with descriptors: sendmsg with SCM_RIGHTS; bytes written."""
        sock = self._sock
        ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]
        chunk = packed[:RECORD_MAX] if self._seqpacket else packed
        if not sock.gettimeout():
            return sock.sendmsg([chunk], ancillary, _NOSIGNAL)
        twin = _io.nonblocking_twin(sock)
        try:
            while True:
                try:
                    return twin.sendmsg([chunk], ancillary, _NOSIGNAL)
                except BlockingIOError:
                    if not _io.wait(self._fd, True, deadline):
                        raise socket.timeout("timed out") from None
        finally:
            twin.detach()

    # ---- receive ----------------------------------------------------------------
    #
    # Each receive builds what it returns first, then commits (moves _next)
    # with stores only and returns: an exception from a signal handler
    # either comes before the commit (the next receive returns the same
    # messages) or not at all.

    def _ready(self) -> int:
        """The table index of the next message, receiving when none is parsed yet."""
        if self._next >= self._parsed and not self._fill():
            raise EOFError("the peer closed the channel")
        return self._next

    def recv(self) -> bytes:
        """Receive one message, as bytes.

        Waits as ``sock.recv`` would (blocking, timeout or BlockingIOError).
        Descriptors that came with the message are closed: use
        `recv_message` where descriptors may come.

        Raises:
            EOFError: the peer closed the channel cleanly (between messages).
            ProtocolError: the peer broke the protocol; the channel is closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_RECEIVING, me) is not me:
                raise _refused(_RECEIVING)
            return self._recv()
        finally:
            if _RECEIVING in busy and busy[_RECEIVING] is me:
                del busy[_RECEIVING]

    def _recv(self) -> bytes:
        i = self._ready()
        t = self._table
        o = t.offsets[i]
        data = bytes(self._view[o:o + t.lengths[i]])
        self._next = i + 1  # its descriptors are closed by the next receive
        return data

    def recv_many(self, max_messages: int = _TABLE_CAPACITY) -> List[bytes]:
        """Receive up to `max_messages` messages: those one read brought, waiting only for the first.

        Descriptors that came with them are closed (see `recv_message`).

        Returns:
            The messages, in order; an empty list at a clean end of stream.

        Raises:
            ProtocolError: the peer broke the protocol; the channel is closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_RECEIVING, me) is not me:
                raise _refused(_RECEIVING)
            return self._recv_many(max_messages)
        finally:
            if _RECEIVING in busy and busy[_RECEIVING] is me:
                del busy[_RECEIVING]

    def _recv_many(self, max_messages: int) -> List[bytes]:
        if type(max_messages) is not int or max_messages < 1:
            max_messages = _checks.in_range(max_messages, "max_messages", 1, 1 << 62)
        if self._next >= self._parsed and not self._fill():
            return []
        i = self._next
        n = min(self._parsed - i, max_messages)
        messages = self._copies(i, n)
        self._next = i + n
        return messages

    def _copies(self, i: int, n: int) -> List[bytes]:
        """Copies of the payloads of parsed frames [i, i + n)."""
        t = self._table
        first = t.offsets[i]
        if n == 1:
            return [bytes(self._view[first:first + t.lengths[i]])]
        size = t.uniform
        last = i + n - 1
        end = t.offsets[last] + t.lengths[last]
        view = self._view
        if end - first > _JOIN_MAX:
            # no large temporary copy (see _JOIN_MAX): one copy per message
            return [view[o:o + k].tobytes()
                    for o, k in zip(t.offsets[i:i + n].tolist(), t.lengths[i:i + n].tolist())]
        if size >= 0:
            stride = size + HEADER_SIZE
            blob = bytes(view[first:end])
            return [blob[p:p + size] for p in range(0, n * stride, stride)]
        blob = bytes(view[first:end])
        return [blob[o - first:o - first + k]
                for o, k in zip(t.offsets[i:i + n].tolist(), t.lengths[i:i + n].tolist())]

    def recv_message(self) -> Message:
        """Receive one message with its descriptors, as ``Message(data, fds)``.

        The descriptors are close-on-exec and owned by the caller.

        Raises:
            EOFError: the peer closed the channel cleanly (between messages).
            ProtocolError: the peer broke the protocol (for instance a
                descriptor count that does not match); the channel is closed
                and every descriptor received closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_RECEIVING, me) is not me:
                raise _refused(_RECEIVING)
            return self._recv_message()
        finally:
            if _RECEIVING in busy and busy[_RECEIVING] is me:
                del busy[_RECEIVING]

    def _recv_message(self) -> Message:
        i = self._ready()
        t = self._table
        o = t.offsets[i]
        slot = self._slot_of(i) if t.nfds[i] else -1
        fds = self._impl.chan_fds(self._rx, slot) if slot >= 0 else []
        message = Message(bytes(self._view[o:o + t.lengths[i]]), tuple(fds))
        if slot >= 0:
            self._rs.nfds[slot] = 0  # given over
        self._next = i + 1
        return message

    def _slot_of(self, i: int) -> int:
        """The slot of the held read claimed by parsed frame i, -1 when none (pure)."""
        rs = self._rs
        at = rs.base + self._table.offsets[i] - HEADER_SIZE
        for r in range(rs.head, rs.tail):
            slot = r % self._reads
            if rs.frame[slot] == at:
                return slot if rs.nfds[slot] else -1
        return -1

    def recv_batch(self, max_messages: int = _TABLE_CAPACITY) -> FrameBatch:
        """Receive up to `max_messages` messages without copying them out (see FrameBatch).

        The zero-copy path: no object per message.  The batch is valid until
        the next receive on this channel.

        Returns:
            The batch; empty (len 0) at a clean end of stream.

        Raises:
            ProtocolError: the peer broke the protocol; the channel is closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if busy.setdefault(_RECEIVING, me) is not me:
                raise _refused(_RECEIVING)
            return self._recv_batch(max_messages)
        finally:
            if _RECEIVING in busy and busy[_RECEIVING] is me:
                del busy[_RECEIVING]

    def _recv_batch(self, max_messages: int) -> FrameBatch:
        max_messages = _checks.in_range(max_messages, "max_messages", 1, 1 << 62)
        if self._next >= self._parsed and not self._fill():
            batch = FrameBatch(self._view, _EMPTY.cast("I"), _EMPTY.cast("I"), None,
                               self._start, self._start, None)
            self._batch = batch
            return batch
        i = self._next
        n = min(self._parsed - i, max_messages)
        t = self._table
        take = None
        if t.with_fds:
            slots = {j: self._slot_of(i + j) for j in range(n) if t.nfds[i + j]}
            take = self._taker({j: s for j, s in slots.items() if s >= 0})
        last = i + n - 1
        batch = FrameBatch(self._view, t.offsets[i:i + n], t.lengths[i:i + n],
                           t.uniform if t.uniform >= 0 else None,
                           t.offsets[i] - HEADER_SIZE, t.offsets[last] + t.lengths[last], take)
        self._batch = batch
        self._next = i + n
        return batch

    def _taker(self, slots: Dict[int, int]) -> Callable[[int], List[int]]:
        """FrameBatch.fds for a batch whose message j's descriptors are held in slots[j]."""
        rx, rs, fds_of = self._rx, self._rs, self._impl.chan_fds

        def take(j: int) -> List[int]:
            slot = slots.get(j, -1)
            if slot < 0 or not rs.nfds[slot]:
                return []
            fds = fds_of(rx, slot)
            rs.nfds[slot] = 0  # given over: a store, then return
            return fds

        return take

    def __iter__(self) -> Iterator[bytes]:
        """Every message until the peer closes the channel cleanly (see recv_many)."""
        while True:
            messages = self.recv_many()
            if not messages:
                return
            yield from messages

    def _fill(self) -> bool:
        """Receive until the table holds parsed frames; False at a clean end of stream."""
        self._check_open()
        batch = self._batch
        if batch is not None:
            batch._close()  # its messages' descriptors not taken are closed below
            self._batch = None
        if self._broken is not None:
            self._fail(self._broken)  # the frames before the bad one are all out
        rs = self._rs
        if rs.head < rs.tail:
            # descriptors of the frames handed out (taken, or to be closed)
            self._impl.chan_drop(self._rx, rs.base + self._start, False)
        if rs.errors:
            self._check_errors()
        while True:
            if self._start < rs.end and self._parse():
                return True
            self._check_stray_fds()
            self._make_room()
            if self._read() == 0:
                if self._seqpacket:
                    self._check_not_an_empty_record()
                if self._start == rs.end and rs.head == rs.tail:
                    return False
                self._fail("the peer closed the channel in the middle of a frame"
                           if self._start < rs.end else
                           "the peer closed the channel with descriptors no frame declared")

    def _check_not_an_empty_record(self) -> None:
        """After a 0-byte read on SOCK_SEQPACKET: ProtocolError unless it is the end of stream.

        An empty record and the end of stream both read as 0 bytes, and the
        protocol forbids empty records (docs/PROTOCOL.md).  The end comes
        only after the peer hung up, so a live peer sent an empty record.  A
        peer that sent one and then hung up cannot fake an end either while
        bytes it sent after it still wait (Linux counts every queued byte).
        """
        if not _io.peer_hung_up(self._fd) or _io.queued_bytes(self._fd):
            self._fail("an empty SOCK_SEQPACKET record (the protocol forbids them: "
                       "they read like end of stream)")

    def _parse(self) -> int:
        t = self._table
        start = self._start
        rs = self._rs
        n = self._impl.parse_frames(t, self._buffer, start, rs.end, t.capacity, self._max_frame)
        if n < 0:
            if n == -errno.EMSGSIZE:
                length = int.from_bytes(self._buffer[start:start + 4], "little")
                self._fail("a frame of %d bytes is over max_frame (%d)" % (length, self._max_frame))
            self._fail("malformed frame header %s" % self._buffer[start:start + HEADER_SIZE].hex())
        if n:
            good, problem = n, None
            if t.with_fds or rs.head < rs.tail:
                good, problem = self._claim(n)
                if problem is not None and not good:
                    self._fail(problem)
            # the commit: stores only
            self._broken = problem
            self._next, self._parsed = 0, good
            self._start = start + t.consumed if problem is None else t.offsets[good] - HEADER_SIZE
        return n

    def _claim(self, n: int) -> Tuple[int, Optional[str]]:
        """Match each parsed frame to the descriptors it declares (docs/PROTOCOL.md, Descriptors).

        A frame's descriptors arrive with the read that holds its first
        byte: the sender writes each such frame with its own sendmsg, and the
        kernel attaches them to the first byte and ends a read after them.
        A held read is claimed by setting its frame (a store, the same one
        when the same bytes are parsed again after an interruption).

        Returns:
            How many frames are good, and the problem of the first bad one
            (None when all are good): the good ones are delivered first, as
            for a bad header.
        """
        t = self._table
        rs = self._rs
        reads = self._reads
        base = rs.base
        offsets, nfds = t.offsets, t.nfds
        r = rs.head  # the first held read not claimed by an earlier frame
        for i in range(n):
            at = base + offsets[i] - HEADER_SIZE  # stream offset of the frame
            while r < rs.tail and 0 <= rs.frame[r % reads] < at:
                r += 1
            slot = r % reads
            held = r < rs.tail
            k = nfds[i]
            if held and rs.hi[slot] <= at:
                return i, "descriptors arrived that no frame declared"
            if k and (not held or not rs.lo[slot] <= at < rs.hi[slot]):
                return i, "a frame declares %d descriptors and none came with it" % k
            if k and rs.nfds[slot] != k and rs.frame[slot] != at:
                return i, "a frame declares %d descriptors and %d came with it" % (k, rs.nfds[slot])
            if k:
                rs.frame[slot] = at
                r += 1
        return n, None

    def _check_stray_fds(self) -> None:
        # Before reading on: the only descriptors that may wait are those of
        # the incomplete frame at _start, brought by a read that began at or
        # before it.  Any others were declared by no frame.
        rs = self._rs
        at = rs.base + self._start
        for r in range(rs.head, rs.tail):
            slot = r % self._reads
            if rs.frame[slot] < 0 and (rs.hi[slot] <= at or rs.lo[slot] > at):
                self._fail("descriptors arrived that no frame declared")

    def _check_errors(self) -> None:
        errors = self._rs.errors
        if errors & self._rx.no_data:
            self._fail("descriptors arrived without data")
        if errors & _CTRUNC:
            self._fail("the kernel cut the descriptors of a message (MSG_CTRUNC)")
        if errors & _TRUNC:
            self._fail("a SOCK_SEQPACKET record longer than %d bytes" % RECORD_MAX)

    def _make_room(self) -> None:
        """Make room after the data for a read, keeping the unparsed bytes.

        Bytes are moved first, to a new buffer or to the front (a slice store
        from a copy), then the state is committed with stores only.
        """
        rs = self._rs
        start, end, size = self._start, rs.end, len(self._buffer)
        used = end - start
        # the incomplete frame must fit, and a SEQPACKET record must fit
        # whole (the kernel drops what does not)
        least = RECORD_MAX if self._seqpacket else 1
        need = max(self._table.need, used) + least
        room = max(least, _READ_ROOM)
        if (need > size and size - used < room) or (not used and size > 4 * _RECV_BUFFER):
            # Grow towards what the incomplete frame needs, but only when the
            # bytes already here fill the buffer, and at most doubling: a
            # header alone must not make a peer's 8 bytes cost max_frame.
            # A new buffer rather than a resize: views of the old one (a
            # FrameBatch) may still be held; they keep it alive.
            new = bytearray(max(min(need, 2 * size), used + room, _RECV_BUFFER))
            new[:used] = self._view[start:end]
            view = memoryview(new)
            self._buffer = new
            self._view = view
        elif used and size - end >= max(least, _READ_ROOM):
            return
        elif used:
            # a copy first where the ranges overlap: the source must stay
            # whole until the commit below (an interrupted move is redone)
            chunk = self._view[start:end]
            self._buffer[:used] = chunk if start >= used else bytes(chunk)
        base = rs.base + start
        # the commit: stores only
        rs.base = base
        rs.end = used
        self._start = 0
        self._next = self._parsed = 0

    def _read(self) -> int:
        """One read into the buffer, recorded by the backend's call; returns the bytes read."""
        # SEQPACKET: room for exactly one record of the largest size, so a
        # longer one is cut (MSG_TRUNC) and refused, as the protocol says
        maxlen = RECORD_MAX if self._seqpacket else len(self._buffer)
        timeout = self._sock.gettimeout()
        deadline = _io.deadline_of(timeout) if timeout else None
        while True:
            try:
                n = self._impl.chan_recv(self._sock, self._rx, self._buffer, maxlen, 0)
                break
            except InterruptedError:
                continue  # PEP 475: handlers ran; retry
            except BlockingIOError:
                # a socket with a timeout is O_NONBLOCK: wait here, as
                # sock.recvmsg would
                if not timeout:
                    raise
                if not _io.wait(self._fd, False, deadline):
                    raise socket.timeout("timed out") from None
        if self._rs.errors:
            self._check_errors()
        return n

    # ---- closing ----------------------------------------------------------------

    def _release_fds(self) -> None:
        batch = self._batch
        if batch is not None:
            batch._close()
            self._batch = None
        self._impl.chan_drop(self._rx, 0, True)  # one call: closes every one held

    def _fail(self, message: str) -> None:
        """Close everything and raise ProtocolError(message)."""
        self._abort()
        raise ProtocolError(message)

    def _abort(self) -> None:
        if self._closed:
            return
        self._release_fds()  # first: a close() after an interrupted abort closes them
        self._closed = True
        self._drop_unsent()
        self._next = self._parsed = 0
        self._sock.close()
        _channels.discard(self)

    def _drop_unsent(self) -> None:
        self._pending = _EMPTY
        self._queue, self._queue_lengths, self._queued = [], [], 0

    def close(self) -> None:
        """Write what is pending as `flush` would, then close the socket.

        Received descriptors not handed over are closed.  Pending bytes are
        dropped, without an error, when the peer is gone (BrokenPipeError,
        ConnectionResetError: nobody would read them), on a non-blocking
        socket that cannot take them at once (check `flush()` first), and
        while another thread is sending (its write and this one would
        interleave).

        Raises:
            TimeoutError, OSError: writing what was pending failed; the
                channel is closed all the same.
        """
        if self._closed:
            return
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            # (claimed as the sending calls do: a thread sending now would
            # interleave with this write, so its pending bytes are dropped)
            if busy.setdefault(_SENDING, me) is me and (self._pending or self._queue):
                timeout = self._sock.gettimeout()
                if not self._drain(_io.deadline_of(timeout)) and timeout:
                    raise socket.timeout("timed out")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if _SENDING in busy and busy[_SENDING] is me:
                del busy[_SENDING]
            self._abort()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The socket closes itself when collected; the descriptors received
        # and not handed over are ours to close.
        if not getattr(self, "_closed", True):
            self._release_fds()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "fd=%d" % self._fd
        return "<afunix.Channel %s %s>" % (state, "SOCK_SEQPACKET" if self._seqpacket else "SOCK_STREAM")


def channel_pair(type: int = socket.SOCK_STREAM, **options: Any) -> Tuple[Channel, Channel]:
    """Two connected Channels over a new socketpair (afunix.socketpair).

    Args:
        type: socket.SOCK_STREAM or socket.SOCK_SEQPACKET.
        options: passed to each Channel (max_frame, write_buffer).
    """
    from .pairs import socketpair
    kind = _checks.supported_socket_type(type)
    if kind not in (_STREAM, _SEQPACKET):
        raise ValueError("a channel needs SOCK_STREAM or SOCK_SEQPACKET")
    a, b = socketpair(kind)
    try:
        return Channel(a, **options), Channel(b, **options)
    except BaseException:
        a.close()
        b.close()
        raise


__all__ = ["Channel", "FrameBatch", "ProtocolError", "channel_pair", "DEFAULT_MAX_FRAME",
           "HEADER_SIZE", "RECORD_MAX"]
