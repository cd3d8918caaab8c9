"""The channel's socket I/O: the loops that move the frame codec's bytes to and from the socket.

`afunix.Channel` is the API (claims, checks, lifetime); the codec
(`afunix.codec`, `afunix.framewriter`) knows the protocol; here are the
system calls between them and the waits for readiness against a deadline,
as CPython's socket methods wait on a socket with a timeout.  `Sender`
writes what a FrameWriter packs, `fill` reads until a FrameReader has
frames.  Nothing here knows the frame format.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from . import _io
from ._kernel import MSG_NOSIGNAL
from .codec import EMPTY_RECORD, FrameReader
from .frames import RECORD_MAX
from .framewriter import Frames, FrameWriter, Segment, control

T = TypeVar("T")

# Plain ints: the socket module's constants are enum members, and | or & on
# them builds a new enum object each time.
NOSIGNAL = MSG_NOSIGNAL
# The flags of one send, as `map` takes them (see write).
NOSIGNAL_ONCE = (NOSIGNAL,)
DONTWAIT = int(socket.MSG_DONTWAIT)
# The two sides of a channel, each used by one caller at a time (see
# Channel._busy): the keys of the claims, and how the refusal names them.
SENDING = "sending"
RECEIVING = "receiving"
# What a look for the peer's RETURN frames found (`read_for_room` answers
# the first three; `Channel._look_for_returns` all five): what a sender
# waiting for slots waits on next.
NOTHING_READ = 0  # nothing on the socket: wait for it
READ = 1  # bytes read, no slot among them (or a read woken for nothing): look again
READER_FULL = 2  # messages not taken fill the reader: nothing more is read before a receive
RETURNED = 3  # slots came back
ELSEWHERE = 4  # another thread receives (or a close began): that one reads them


class Borrowed:
    """The token of a claim the channel takes for itself, for a moment, on the side it does not serve.

    A sender waiting for room reads the peer's RETURN frames on the
    receiving side, and a receive writes its own RETURN frames on the
    sending side; each only while no caller holds that side, and never
    waiting for the peer while it holds it.  A caller of that side who
    finds such a claim waits for it to end instead of being refused
    (`Channel._claimed_after_borrow`): receiving and sending stay
    independent.  The thread is kept because a signal handler's call in
    that thread, inside the borrow, would wait for ever: it is refused.
    """

    __slots__ = ("thread",)

    def __init__(self) -> None:
        self.thread = threading.get_ident()


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


def write(sock: socket.socket, view: Frames, taken: List[int], deadline: Optional[float],
          seqpacket: bool) -> Optional[OSError]:
    """Write `view` from the sum of `taken` on, as far as the socket takes it; None when all went.

    Each count the kernel returns is appended to `taken` by the call that
    wrote, with no Python code between them (``list.extend`` over ``map``
    runs in C), so an exception a signal handler raises right after the
    call cannot lose it (see FrameWriter.settle).  Returns what stopped it:
    BlockingIOError (a non-blocking socket is full) or a timeout; raises
    anything else.
    """
    timeout = sock.gettimeout()
    total = len(view)
    done = sum(taken)
    twin: Optional[socket.socket] = None
    record = RECORD_MAX if seqpacket else total
    try:
        if timeout and done < total:
            # CPython's methods wait before every call on a socket with a
            # timeout; try first (a unix socket polls writable only when
            # most of its buffer is free), wait only when it is full.
            twin = _io.nonblocking_twin(sock)
        send = (twin if twin is not None else sock).send
        while done < total:
            try:
                taken.extend(map(send, (view[done:done + record],), NOSIGNAL_ONCE))
            except BlockingIOError as exc:
                if twin is None:
                    return exc
                if not _io.wait(sock.fileno(), True, deadline):
                    return socket.timeout("timed out")
                continue
            done += taken[-1]
    finally:
        if twin is not None:
            twin.detach()
    return None


def send_fds(sock: socket.socket, packed: memoryview, taken: List[int], fds: Tuple[int, ...],
             deadline: Optional[float], seqpacket: bool) -> None:
    """The first write of a frame with descriptors: sendmsg with SCM_RIGHTS; the count in `taken`, as `write`."""
    ancillary = (control(fds),)
    chunk = ([packed[:RECORD_MAX] if seqpacket else packed],)
    if not sock.gettimeout():
        taken.extend(map(sock.sendmsg, chunk, ancillary, NOSIGNAL_ONCE))
        return
    twin = _io.nonblocking_twin(sock)
    try:
        while True:
            try:
                taken.extend(map(twin.sendmsg, chunk, ancillary, NOSIGNAL_ONCE))
                return
            except BlockingIOError:
                if not _io.wait(sock.fileno(), True, deadline):
                    raise socket.timeout("timed out") from None
    finally:
        twin.detach()


def closed_under(reader: FrameReader) -> None:
    """After a read: OSError(EBADF) when the channel closed while it waited, what it read dropped.

    close() in another thread does not stop a recvmsg already waiting on
    the socket: the kernel finishes it with what comes next, into a
    reader closed meanwhile (its lane forgotten, its descriptors closed).
    Nothing of it is the channel's any more: the descriptors it brought
    are closed, nothing is parsed or handed out, and the receive raises
    what a receive on the closed channel raises.
    """
    if reader.closed:
        reader.release()
        raise OSError(errno.EBADF, "the channel is closed")


def read(sock: socket.socket, reader: FrameReader) -> int:
    """One read into the reader's buffer, recorded by the backend's call; the bytes read.

    Raises OSError(EBADF) when the channel closed under it (`closed_under`).
    """
    # (FrameReader.read_size, written out: the path of every receive; the
    # backend's chan_recv reads at most the room after the bytes held;
    # SOCK_SEQPACKET: up to a record per held-read slot in one call, each
    # with room for the largest record)
    maxlen, records = (RECORD_MAX, reader.reads) if reader.seqpacket else (len(reader.buffer), 1)
    timeout = sock.gettimeout()
    deadline = _io.deadline_of(timeout) if timeout else None
    recv: Any = reader.impl.chan_recv
    while True:
        try:
            n: int = recv(sock, reader.rx, reader.buffer, maxlen, 0, records)
            closed_under(reader)
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


def fill(sock: socket.socket, reader: FrameReader) -> bool:
    """Read until `reader` holds parsed frames; False at a clean end of stream.

    Raises ProtocolError (the reader closed) for what the reader refuses,
    and for an empty SOCK_SEQPACKET record, which the protocol forbids.
    """
    if reader.frames_ready():
        return True
    while True:
        n = read(sock, reader)
        if n:
            if reader.received(n):
                return True
            continue
        reader.check_errors()  # descriptors that came with no byte read 0 bytes too
        if reader.seqpacket and empty_record_sent(sock.fileno()):
            reader.fail(EMPTY_RECORD)
        return reader.ended()


def read_now(sock: socket.socket, reader: FrameReader) -> Optional[bool]:
    """One read that does not wait (the socket polled readable): as `fill`, None for more to wait for.

    For a receive that waits for input and for room to write returns at
    once (`Channel._fill_owing`): True when the reader holds parsed
    frames, False at a clean end of stream, None when nothing came (woken
    for nothing, a signal) or the frame is not complete yet.
    """
    maxlen, records = (RECORD_MAX, reader.reads) if reader.seqpacket else (len(reader.buffer), 1)
    recv: Any = reader.impl.chan_recv
    try:
        n: int = recv(sock, reader.rx, reader.buffer, maxlen, DONTWAIT, records)
    except (BlockingIOError, InterruptedError):
        return None  # (PEP 475: handlers ran) the caller waits again
    closed_under(reader)
    if n:
        return True if reader.received(n) else None
    reader.check_errors()  # as in fill
    if reader.seqpacket and empty_record_sent(sock.fileno()):
        reader.fail(EMPTY_RECORD)
    return reader.ended()


def read_for_room(sock: socket.socket, reader: FrameReader, deadline: Optional[float]) -> int:
    """One read while a sender waits for the peer to return slots of its lane.

    READ when it read (or applied held RETURN frames), NOTHING_READ when
    nothing came by the deadline, READER_FULL when messages not taken yet
    fill the reader (after waiting out the deadline).

    RETURN frames are applied as they are read (the reader's on_return).
    When the reader holds nothing the application has yet to take, this
    is a receive like any other (the parse in order applies them); else
    the bytes are only appended and the RETURN frames among them applied
    ahead of the messages before them (`FrameReader.scan_returns`), so
    nothing handed out or waiting changes.

    Raises:
        BrokenPipeError: the peer closed the channel: no slot comes back.
        ProtocolError: what the reader refuses (it is closed), and an empty
            SOCK_SEQPACKET record, as `fill`.
    """
    rs = reader.rs
    # RETURN frames read already and not applied (an exception from a signal
    # handler stopped the call that read them) come first: the peer may
    # send nothing more until it has its slots
    if reader.scan_returns():
        return READ
    # a read the backend took and holds to report next needs no wait (the
    # socket may have nothing more)
    if not rs.deferred and not _io.wait(sock.fileno(), False, deadline):
        return NOTHING_READ
    idle = not reader.holding
    if idle and reader.frames_ready():
        idle = False  # frames that were held behind a parse limit
    rs = reader.rs
    if rs.tail - rs.head >= reader.reads and not idle:
        # messages wait to be taken: the slots of reads whose messages were
        # taken already come free for this read
        reader.drop_taken_reads()
    room = len(reader.buffer) - rs.end
    if reader.seqpacket:
        room = 0 if room < RECORD_MAX else RECORD_MAX
    if not rs.deferred and (room <= 0 or rs.tail - rs.head >= reader.reads):
        # the buffer, or the backend's slots for held reads, are full of
        # messages the application has not taken:
        # what comes next waits for it (as a pair of sockets that both
        # only write would); wait out the deadline.  (A read the backend
        # holds needs no room: it is reported, not read.)
        if deadline is not None:
            time.sleep(max(0.0, deadline - time.monotonic()))
        return READER_FULL
    recv: Any = reader.impl.chan_recv
    held = rs.tail
    try:
        n: int = recv(sock, reader.rx, reader.buffer, room, DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return READ  # woken for nothing: the caller looks again
    closed_under(reader)
    if rs.errors:
        # what the read brought fails the channel here, as in a receive,
        # whatever the messages not taken yet (a record a backend read
        # ahead and reported only now fails it at the same send)
        reader.check_errors()
    if not n and rs.tail == held:
        # as in fill: an empty record reads like the end of stream.  (Reads
        # held before this one, of messages not taken yet, stay for the
        # receives: no slot comes back all the same.)
        if reader.seqpacket and empty_record_sent(sock.fileno()):
            reader.fail(EMPTY_RECORD)
        raise BrokenPipeError(errno.EPIPE, "the peer closed the channel while this end "
                                           "waited for it to return slots of its lane")
    if idle:
        reader.received(n)
    reader.scan_returns()
    return READ


class Sender:
    """Writes what a FrameWriter packs to the socket, waiting as its timeout says.

    Partial results are counts, never losses: the messages fully written
    and the one in progress (its tail kept in the writer's `pending`) count
    as sent, later ones are not started.  An exception from a signal
    handler loses nothing either: the writer holds what the kernel took
    (FrameWriter.settle), and the next send, flush or close writes the
    rest of a frame partly written before anything else.
    """

    __slots__ = ("sock", "writer", "seqpacket")

    def __init__(self, sock: socket.socket, writer: FrameWriter, seqpacket: bool) -> None:
        self.sock = sock
        self.writer = writer
        self.seqpacket = seqpacket

    def send(self, segments: List[Segment], total: int) -> int:
        """Write (or, with a write buffer, accept) `total` messages in `segments`; how many went."""
        w = self.writer
        if w.write_buffer:
            return self.enqueue(segments)
        deadline = _io.deadline_of(self.sock.gettimeout())
        if (w.writing is not None or w.pending or w.queue) and not self.drain(deadline):
            raise stalled(self.sock)
        accepted = 0
        for seg in segments:
            k, exc = self.emit(seg, deadline)
            accepted += k
            if exc is not None:
                if accepted and isinstance(exc, (BlockingIOError, socket.timeout)):
                    return accepted
                raise exc
        return accepted

    def send_frame(self, seg: Segment) -> Tuple[int, Optional[BaseException]]:
        """`send` of the one packed frame `seg` (buffered or not), the error returned, not raised.

        (1 when any of it went: written, or its tail kept in `pending`;
        the error that stopped it or None.)  For the frames that name
        slots of the lane: one that did not start leaves its slots this
        end's, whatever stopped it.
        """
        w = self.writer
        deadline = _io.deadline_of(self.sock.gettimeout())
        try:
            # (writing: a write an exception interrupted, settled by drain)
            if (w.writing is not None or w.pending or w.queue) and not self.drain(deadline):
                return 0, stalled(self.sock)
        except BaseException as exc:
            return 0, exc
        return self.emit(seg, deadline)

    def flush(self) -> int:
        """Write everything pending; the bytes still pending (only on a non-blocking socket)."""
        timeout = self.sock.gettimeout()
        if not self.drain(_io.deadline_of(timeout)) and timeout != 0.0:
            raise socket.timeout("timed out")
        return self.writer.unsent

    def enqueue(self, segments: List[Segment]) -> int:
        """Buffered mode: keep messages without descriptors; write when the buffer fills."""
        accepted = 0
        deadline = _io.deadline_of(self.sock.gettimeout())
        try:
            for seg in segments:
                if seg.fds or seg.packed is not None:
                    # descriptors must ride on their frame's own write, after
                    # everything buffered ahead of it (and a lane frame is
                    # written as packed, never buffered as a message)
                    if not self.drain(deadline):
                        raise stalled(self.sock)
                    k, exc = self.emit(seg, deadline)
                    accepted += k
                    if exc is not None:
                        raise exc
                    continue
                joined, off = seg.joined, 0
                for data, n in zip(seg.datas, seg.lengths):
                    # keep bytes, never the caller's (maybe mutable) buffers
                    self.enqueue_one(data if type(data) is bytes else joined[off:off + n],
                                     n, deadline)
                    off += n
                    accepted += 1
        except (BlockingIOError, socket.timeout):
            if accepted:
                return accepted
            raise
        return accepted

    def enqueue_one(self, data: bytes, n: int, deadline: Optional[float]) -> None:
        """Buffer one message; write the buffer when it is full.

        Raises BlockingIOError (or a timeout) when the buffer is full and the
        socket takes nothing: the message is then not accepted.
        """
        w = self.writer
        if w.writing is not None:
            w.settle()  # a write an exception interrupted: its tail is pending
        if w.must_flush_before(n):
            if deadline is None:
                deadline = _io.deadline_of(self.sock.gettimeout())
            if not self.drain(deadline):
                raise stalled(self.sock)
        if w.queue_one(data, n):
            if deadline is None:
                deadline = _io.deadline_of(self.sock.gettimeout())
            self.drain(deadline)

    def drain(self, deadline: Optional[float]) -> bool:
        """Write what is pending and buffered; True when nothing is left."""
        w = self.writer
        w.settle()
        w.take_queue()
        while w.pending:
            frames = w.pending
            w.begin(frames, None)
            exc = write(self.sock, frames, w.taken, deadline, self.seqpacket)
            w.settle()
            if exc is not None:
                return False
        return True

    def emit(self, seg: Segment, deadline: Optional[float]) -> Tuple[int, Optional[BaseException]]:
        """Write one segment; (messages accepted, the exception that stopped it or None)."""
        w = self.writer
        packed = w.pack(seg)
        # (a lane frame's counts go to its own log: see Segment.log)
        w.begin(packed, seg.lengths, seg.log)
        exc: Optional[BaseException] = None
        try:
            if seg.fds:
                send_fds(self.sock, packed, w.taken, seg.fds, deadline, self.seqpacket)
            exc = write(self.sock, packed, w.taken, deadline, self.seqpacket)
        except BaseException as e:  # the writer has what went: settled below
            exc = e
        return w.settle(), exc
