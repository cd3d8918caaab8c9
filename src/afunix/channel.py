"""Message channel: framed, batched messages with descriptors over one connected socket.

A `Channel` turns a connected SOCK_STREAM or SOCK_SEQPACKET socket into a
stream of frames (docs/PROTOCOL.md): many messages per system call, packed
and parsed by the active backend (in C on the C backend), descriptors riding
on the frame that declares them.
"""
from __future__ import annotations

import _socket
import contextlib
import errno
import os
import socket
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from . import _checks, _io
from ._chanio import NOSIGNAL, RECEIVING, SENDING, Sender, fill, owning, refused
from .addresses import connect
from .batch import checked_fds
from .codec import TABLE_CAPACITY, FrameReader
from .frames import (DEFAULT_MAX_FRAME, RECORD_MAX, FrameBatch, ProtocolError,
                     frame_header)
from ._limits import FRAME_HEADER as HEADER_SIZE
from .framewriter import FrameWriter
from .message import Address, Message
from .pairs import socketpair

# Plain ints: the socket module's constants are enum members, and | or & on
# them builds a new enum object each time.
_STREAM = int(socket.SOCK_STREAM)
_SEQPACKET = int(socket.SOCK_SEQPACKET)
# The socket's type as the kernel reports it (no SOCK_NONBLOCK/CLOEXEC bits
# folded in, no enum made).
_socket_type = _socket.socket.type.__get__


# Every open Channel of this process, for the fork hook below.
_channels: "weakref.WeakSet[Channel]" = weakref.WeakSet()


def _forget_parents_unsent() -> None:
    """In a child after fork(): each channel's unsent bytes stay the parent's to write.

    Buffered messages and the tail of a partly written one are copied into
    the child with the rest of its memory; written from both processes
    (each one's close() or flush()), they would reach the peer twice.
    The claims of the parent's other threads go too: those threads do not
    exist here, and a claim they held would refuse every call of the child
    on that side.  A receive they were in left the reader as an exception
    would (every receive gives over with stores only).
    """
    for ch in list(_channels):
        ch._writer.drop_unsent()
        ch._busy.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_unsent)


class Channel:
    """Framed messages over a connected SOCK_STREAM or SOCK_SEQPACKET AF_UNIX socket.

    A loop over the frame codec (`afunix.codec`): a FrameWriter makes the
    bytes and control data each send writes, a FrameReader parses what each
    read brings; this class claims the sides, makes the system calls and
    waits as the socket's timeout says.

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
        self._closed = True  # until set up: close() has nothing to do
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
        # included, never leaves the side claimed (before 3.11 and on PyPy
        # a handler may run inside the release: docs/channel.md).  The release reads the
        # claim once and catches KeyError rather than testing `in` first:
        # a refused caller's finally runs while the holder may release
        # between any two steps (PyPy and CPython before 3.11 switch
        # threads there too).  (Not a decorator:
        # *args/**kwargs cost about 100 ns per message.)
        self._busy: Dict[str, object] = {}
        if not isinstance(sock, socket.socket):
            raise TypeError("Channel needs a socket.socket, not %s" % type(sock).__name__)
        if sock.family != socket.AF_UNIX:
            raise ValueError("Channel needs an AF_UNIX socket")
        kind = _socket_type(sock)
        if kind not in (_STREAM, _SEQPACKET):
            raise ValueError("Channel needs a SOCK_STREAM or SOCK_SEQPACKET socket")
        if sock.fileno() < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        writer = FrameWriter(max_frame, write_buffer)
        self._sock = sock
        self._fd = sock.fileno()
        self._seqpacket = kind == _SEQPACKET
        self._writer = writer
        self._sender = Sender(sock, writer, self._seqpacket)
        # The receive state is the reader's: each read records, in one
        # backend call, the bytes and the descriptors it brought (held reads,
        # see csrc/channel.h), so an exception from a signal handler cannot
        # drop them; every other change is made with stores only, after what
        # it gives out is built (CPython runs signal handlers only at calls
        # and backward jumps).
        self._reader = FrameReader(writer.max_frame, self._seqpacket)
        self._closed = False
        _channels.add(self)

    # ---- construction helpers -------------------------------------------------

    @classmethod
    def connect(cls, address: Address, type: int = socket.SOCK_STREAM, *,
                timeout: Optional[float] = None, **options: Any) -> "Channel":
        """Connect to a listening AF_UNIX socket and return a Channel over it.

        Like ``Channel(afunix.connect(address, type, timeout=timeout), **options)``.
        """
        sock = connect(address, type, timeout=timeout)
        return owning(sock, lambda: cls(sock, **options))

    @classmethod
    def accept(cls, listener: socket.socket, **options: Any) -> "Channel":
        """Accept one connection on `listener` (e.g. from afunix.listen) as a Channel."""
        sock, _ = listener.accept()
        return owning(sock, lambda: cls(sock, **options))

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
        return self._writer.max_frame

    @property
    def pending(self) -> int:
        """Bytes of accepted messages not written to the socket yet."""
        return self._writer.unsent

    @property
    def buffered_messages(self) -> int:
        """Messages already received and parsed, that the next receive returns without waiting."""
        return self._reader.buffered

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
            if busy.setdefault(SENDING, me) is not me:
                raise refused(SENDING)
            self._send(data, fds)
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _send(self, data: Any, fds: Iterable[Any]) -> None:
        w = self._writer
        if type(data) is bytes and not fds and not self._closed:
            n = len(data)
            if n > w.max_frame:
                raise ValueError("message of %d bytes is over max_frame (%d)" % (n, w.max_frame))
            if w.write_buffer:
                self._sender.enqueue_one(data, n, None)
                return
            if w.pending:
                self._send_many([data])
                return
            # the common case, one call: header and payload in one write
            frame = frame_header(n) + data
            if self._sock.gettimeout() is None and (
                    not self._seqpacket or len(frame) <= RECORD_MAX):
                # blocking: the kernel writes all of it (a stream) or the
                # whole record (SEQPACKET), or fails
                done = self._sock.send(frame, NOSIGNAL)
                if done == len(frame):
                    return
                w.pending = memoryview(frame)[done:]
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
            if busy.setdefault(SENDING, me) is not me:
                raise refused(SENDING)
            return self._send_many(messages)
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _send_many(self, messages: Iterable[Any]) -> int:
        self._check_open()
        segments, total = self._writer.segments(messages)
        return self._sender.send(segments, total) if total else 0

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
            if busy.setdefault(SENDING, me) is not me:
                raise refused(SENDING)
            return self._send_fixed(buffer, size)
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _send_fixed(self, buffer: Any, size: int) -> int:
        self._check_open()
        seg = self._writer.fixed(buffer, size)
        return self._sender.send([seg], len(seg.lengths)) if seg is not None else 0

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
            if busy.setdefault(SENDING, me) is not me:
                raise refused(SENDING)
            return self._flush()
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _flush(self) -> int:
        self._check_open()
        return self._sender.flush()

    @contextlib.contextmanager
    def batched(self, size: int = 1 << 20) -> Iterator["Channel"]:
        """Within the block, `send` buffers up to `size` bytes per write; flushes at the end.

        For callers who produce one message at a time::

            with ch.batched():
                for item in items:
                    ch.send(encode(item))
        """
        size = _checks.in_range(size, "size", 1, 1 << 30)
        w = self._writer
        previous = w.write_buffer
        w.write_buffer = max(previous, size)
        try:
            yield self
        except BaseException:
            w.write_buffer = previous
            with contextlib.suppress(OSError):
                if not self._closed:
                    self.flush()
            raise
        w.write_buffer = previous
        if not self._closed:
            self.flush()

    # ---- receive ----------------------------------------------------------------
    #
    # Each receive takes from the reader, which builds what it returns
    # first, then commits with stores only: an exception from a signal
    # handler either comes before the commit (the next receive returns the
    # same messages) or not at all.

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
            if busy.setdefault(RECEIVING, me) is not me:
                raise refused(RECEIVING)
            return self._recv()
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _recv(self) -> bytes:
        r = self._reader
        i = r.next
        k = i - r.copied_from
        if 0 <= k < r.ncopied:  # copied out already: FrameReader.take_next's first branch, inline
            data: Optional[bytes] = r.copies[k]
            r.next = i + 1
        else:
            if i >= r.parsed and not self._fill():
                raise EOFError("the peer closed the channel")
            # the frames of this read copied out at once (its descriptors are
            # closed by the next receive)
            data = r.take_next()
        assert data is not None  # (frames are ready: take_next gives one)
        return data

    def recv_many(self, max_messages: int = TABLE_CAPACITY) -> List[bytes]:
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
            if busy.setdefault(RECEIVING, me) is not me:
                raise refused(RECEIVING)
            return self._recv_many(max_messages)
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _recv_many(self, max_messages: int) -> List[bytes]:
        if type(max_messages) is not int or max_messages < 1:
            max_messages = _checks.in_range(max_messages, "max_messages", 1, 1 << 62)
        r = self._reader
        if r.next >= r.parsed and not self._fill():
            return []
        return r.take_many(max_messages)

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
            if busy.setdefault(RECEIVING, me) is not me:
                raise refused(RECEIVING)
            return self._recv_message()
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _recv_message(self) -> Message:
        r = self._reader
        if r.next >= r.parsed and not self._fill():
            raise EOFError("the peer closed the channel")
        return r.take_message()

    def recv_batch(self, max_messages: int = TABLE_CAPACITY) -> FrameBatch:
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
            if busy.setdefault(RECEIVING, me) is not me:
                raise refused(RECEIVING)
            return self._recv_batch(max_messages)
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _recv_batch(self, max_messages: int) -> FrameBatch:
        max_messages = _checks.in_range(max_messages, "max_messages", 1, 1 << 62)
        r = self._reader
        if r.next >= r.parsed and not self._fill():
            return r.empty_batch()
        return r.take_batch(max_messages)

    def __iter__(self) -> Iterator[bytes]:
        """Every message until the peer closes the channel cleanly (see recv_many)."""
        while True:
            messages = self.recv_many()
            if not messages:
                return
            yield from messages

    def _fill(self) -> bool:
        """Receive until the reader holds parsed frames; False at a clean end of stream."""
        self._check_open()
        try:
            return fill(self._sock, self._reader)
        except ProtocolError:
            self._abort()  # the reader closed its descriptors; the socket goes too
            raise

    # ---- closing ----------------------------------------------------------------

    def _abort(self) -> None:
        if self._closed:
            return
        self._reader.close()  # first: a close() after an interrupted abort closes them
        self._closed = True
        self._writer.drop_unsent()
        self._sock.close()
        _channels.discard(self)

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
            if busy.setdefault(SENDING, me) is me and (self._writer.pending or self._writer.queue):
                timeout = self._sock.gettimeout()
                if not self._sender.drain(_io.deadline_of(timeout)) and timeout:
                    raise socket.timeout("timed out")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            self._abort()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # (No __del__: the socket closes itself when collected, and the reader
    # closes the descriptors it holds.)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "fd=%d" % self._fd
        return "<afunix.Channel %s %s>" % (state, "SOCK_SEQPACKET" if self._seqpacket else "SOCK_STREAM")


def reader_of(channel: Channel) -> FrameReader:
    """The FrameReader of `channel`, for the async channel's iteration over the same frames."""
    return channel._reader


def channel_pair(type: int = socket.SOCK_STREAM, **options: Any) -> Tuple[Channel, Channel]:
    """Two connected Channels over a new socketpair (afunix.socketpair).

    Args:
        type: socket.SOCK_STREAM or socket.SOCK_SEQPACKET.
        options: passed to each Channel (max_frame, write_buffer).
    """
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
