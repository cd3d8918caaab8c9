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
import sys
import threading
import time
import weakref
from types import FrameType
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from . import _checks, _io
from ._chanio import (ELSEWHERE, NOSIGNAL, NOSIGNAL_ONCE, NOTHING_READ, READ, READER_FULL,
                      RECEIVING, RETURNED, SENDING, Borrowed, Sender, fill, owning,
                      read_for_room, read_now, refused, stalled)
from .addresses import connect
from .batch import checked_fds
from .codec import TABLE_CAPACITY, FrameReader, TakeGuard
from .frames import (DEFAULT_MAX_FRAME, KIND_OBJECT, RECORD_MAX, FrameBatch,
                     ProtocolError, frame_header, lane_header)
from ._limits import FRAME_HEADER as HEADER_SIZE
from .framewriter import FrameWriter, Segment, lane_segment
from .lane import DEFAULT_THRESHOLD, LaneSender
from .message import Address, Message
from .objects import (ENVELOPE_ENTRY, ENVELOPE_HEADER, PickledObject, check_unpickle_peer,
                      encode_object, inline_when_free, load_object, peer_uid, pickle_object,
                      place_parts)
from .shm import MAX_REGION_SIZE, Loan
from .slots import Slot
from .pairs import socketpair
from ._wakeups import Bell

# Plain ints: the socket module's constants are enum members, and | or & on
# them builds a new enum object each time.
_STREAM = int(socket.SOCK_STREAM)
_SEQPACKET = int(socket.SOCK_SEQPACKET)
# The socket's type as the kernel reports it (no SOCK_NONBLOCK/CLOEXEC bits
# folded in, no enum made).
_socket_type = _socket.socket.type.__get__
# The longest a sender waiting for the peer's returns sleeps before it looks
# again whether it may read them itself (a receive that held the socket may
# have ended without reading them), and a caller waits before it looks
# again whether the channel's own use of its side ended.
_ROOM_STEP = 0.01
# A close() waiting for the calls of other threads to leave looks again
# after this long at first, then twice as long each time, up to _ROOM_STEP:
# a woken call leaves in microseconds, one copying out of a region later.
_LEAVE_STEP = 0.001


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
    would (every receive gives over with stores only).  Slots of the peer's
    lane released before the fork and not yet given back are the parent's
    to return too, and so are those a batch holds: returned by both, the
    second return breaks the peer's channel, or frees a slot it has filled
    again.  And the lane's region stays the parent's (`_leave_lane`).
    """
    for ch in list(_channels):
        ch._writer.drop_unsent()
        ch._busy.clear()
        ch._reader.returns_lock = threading.RLock()  # may be held by a thread not here, as below
        ch._reader.forget_returns()
        ch._reader.forget_held()
        ch._borrow_ended = Bell()  # its list may hold locks of threads not here
        ch._closing = threading.RLock()  # (as may this one, by a close() of such a thread)
        if ch._lane is not None:
            ch._leave_lane()


def _aborts(ref: "weakref.ref[Channel]") -> Callable[[], None]:
    """LaneSender.on_fault for the channel `ref` names: closes it (by a weak reference: no cycle
    keeps a channel dropped unclosed, and its socket, alive until a collection)."""
    def abort() -> None:
        ch = ref()
        if ch is not None:
            ch._abort()
    return abort


def _claimed_takes(ref: "weakref.ref[Channel]") -> TakeGuard:
    """FrameReader.take_guard for the channel `ref` names (weakly: no cycle through its reader).

    A batch's descriptors are taken (``FrameBatch.fds``) after the receive
    that made it returned, without its claim: a close() in another thread
    would not wait for the take, and could close the descriptors the take
    hands out.  Each take claims the receiving side as a receive does.
    """
    def guard(take: Callable[[int], List[int]], i: int) -> List[int]:
        ch = ref()
        # (gone: its reader is being or was released, closing the descriptors)
        return [] if ch is None else ch._take_claimed(take, i)
    return guard


def _returned_to_parent(offset: int, length: int, mark: Any = None) -> None:
    """A forked child's on_return: the peer's RETURN frames name the parent's slots; dropped."""


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
        shm_size: when > 0, a shared-memory lane: a sealed memfd region of
            this many bytes, announced to the peer before the first frame;
            messages of `shm_threshold` bytes or more (up to the region's
            size, not bounded by max_frame) are copied into a slot of it and
            named by a small frame, and the peer returns the slot when it is
            done with it (docs/PROTOCOL.md, version 2).  Every channel reads
            a peer's lane, with or without its own.  `loan` and
            `send_loan` make a message in a slot, without a copy.  At most
            16 GiB (`afunix.shm.MAX_REGION_SIZE`, which a peer accepts);
            the region's memory is allocated when the channel is made.
        shm_threshold: the smallest message sent through the lane, and
            the smallest buffer of an object (`send_object`) sent out of
            band.
        trust_peer: `recv_object` unpickles from a peer of any uid (by
            default only from one running as this process's effective
            uid: unpickling runs code the peer chose).

    Raises:
        TypeError, ValueError: not such a socket, or bad limits.
        OSError: ENOSYS where memfd regions are missing, or the kernel is
            older than Linux 5.1; ENOMEM for a region larger than the
            machine's RAM (shm_size only).
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = DEFAULT_MAX_FRAME,
                 write_buffer: int = 0, shm_size: int = 0,
                 shm_threshold: int = DEFAULT_THRESHOLD, trust_peer: bool = False) -> None:
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
        # rung as a claim the channel took for itself (Borrowed) ends, for
        # the callers waiting for it
        self._borrow_ended = Bell()
        # Held by whoever runs the closing steps (`_abort`): two closes at
        # once, or a close racing a call that aborts, run them one after the
        # other (reentrant: a signal handler's close() inside a close()).
        self._closing = threading.RLock()
        # the claims of calls that are closing the channel themselves (a
        # ProtocolError in two calls at once): no closer waits for those
        self._closers: List[object] = []
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
        shm_size = _checks.in_range(shm_size, "shm_size", 0, MAX_REGION_SIZE)
        self._object_threshold = _checks.in_range(shm_threshold, "shm_threshold", 1, 1 << 62)
        if type(trust_peer) is not bool:
            raise TypeError("trust_peer must be a bool, not %s" % type(trust_peer).__name__)
        self._trust_peer = trust_peer
        # the peer's uid (SO_PEERCRED, None: unknown), read once, at the first recv_object
        self._peer_uid: Optional[int] = None
        self._peer_uid_read = False
        # made last of the checks: it is the only one that makes a system call
        self._lane = LaneSender(shm_size, shm_threshold) if shm_size else None
        # set when the last sending call stopped for want of slots, not of
        # socket space (afunix.aio.Channel then waits for the peer's returns)
        self._room_wanted = False
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
        self._reader = FrameReader(writer.max_frame, self._seqpacket,
                                   on_return=self._lane.give_back if self._lane else None,
                                   take_guard=_claimed_takes(weakref.ref(self)))
        if self._lane is not None:
            self._lane.on_fault = _aborts(weakref.ref(self))
        # Called just before the socket closes, whoever closes it (close(),
        # or a call that aborts on a ProtocolError): see before_close.
        self._before_close: Optional[Callable[[], None]] = None
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

    def _claimed_after_borrow(self, side: str, me: List[object]) -> bool:
        """Claim `side` for `me` once the channel's own use of it ends; False while a caller holds it.

        A sender waiting for room reads the peer's RETURN frames on the
        receiving side, and a receive writes its own on the sending side
        (`Borrowed`): a caller of that side waits for that to end instead of
        being refused, as receiving and sending are independent.  The wait
        is short: a borrow never waits for the peer to send, and writes at
        most what the caller would have to write first itself.  A call of a
        signal handler inside a borrow of its own thread is refused (the
        borrow cannot end under it).  Called inside the caller's try: the
        claim is one setdefault, released by the caller's finally.
        """
        busy = self._busy
        while True:
            holder = busy.setdefault(side, me)
            if holder is me:
                return True
            if type(holder) is not Borrowed or holder.thread == threading.get_ident():
                return False
            # (timed: a notice lost to a signal handler's exception in the
            # borrower costs one step)
            self._borrow_ended.wait_unless(lambda: busy.get(side) is not holder, _ROOM_STEP)

    def _borrow_released(self) -> None:
        """After a claim the channel took for itself is let go: wake the callers waiting for it."""
        if self._borrow_ended.sleepers:
            self._borrow_ended.ring()

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
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            # (a close() marks the channel closed before it looks for calls to
            # wait for: one that claims after that look sees it here, and
            # touches nothing the close is closing)
            if self._closed:
                raise _closed_error()
            self._send(data, fds)
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it (EPIPE)
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

    def _send(self, data: Any, fds: Iterable[Any]) -> None:
        w = self._writer
        lane = self._lane
        if lane is not None and (fds or type(data) is not bytes or not lane.region_log
                                 or len(data) >= lane.threshold):
            # the lane's frame, or its REGION frame first: the plan of _send_lane
            self._send_many([data if not fds else Message(data, tuple(checked_fds(fds)))])
            return
        if type(data) is bytes and not fds and not self._closed:
            n = len(data)
            if n > w.max_frame:
                raise ValueError("message of %d bytes is over max_frame (%d)" % (n, w.max_frame))
            if w.write_buffer:
                self._sender.enqueue_one(data, n, None)
                return
            if w.pending or w.writing is not None or w.queue:
                # (a queue too: a batched() block whose closing flush an
                # exception interrupted leaves its messages queued here)
                self._send_many([data])
                return
            # the common case, one call: header and payload in one write
            frame = frame_header(n) + data
            if self._sock.gettimeout() is None and (
                    not self._seqpacket or len(frame) <= RECORD_MAX):
                # blocking: the kernel writes the whole record (SEQPACKET)
                # or fails, so no count can be lost
                if self._seqpacket:
                    self._sock.send(frame, NOSIGNAL)
                    return
                # On a stream, all of it or fails, or a signal cuts the
                # write short: the count goes into the writer's state inside
                # the call (see _chanio.write), and an exception from the
                # handler after it leaves the tail to the next send, flush
                # or close.  (FrameWriter.begin, inlined.)
                taken: List[int] = []
                w.taken, w.writing_lengths, w.writing = taken, [n], frame
                taken.extend(map(self._sock.send, (frame,), NOSIGNAL_ONCE))
                if taken[0] == len(frame):
                    w.writing = None
                    return
                w.settle()
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
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            if self._closed:
                raise _closed_error()
            return self._send_many(messages)
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it (EPIPE)
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

    def _send_many(self, messages: Iterable[Any]) -> int:
        self._check_open()
        if self._lane is not None:
            return self._send_lane(list(messages))
        segments, total = self._writer.segments(messages)
        return self._sender.send(segments, total) if total else 0

    # ---- the shared-memory lane (sending) -----------------------------------------

    def _send_lane(self, items: List[Any]) -> int:
        """send_many on a channel with a lane: runs inline, large messages through slots, in order."""
        lane = self._lane
        assert lane is not None
        self._room_wanted = False
        w = self._writer
        # every message checked before anything is sent, as send_many does
        plan: List[Tuple[bool, Any]] = []  # (in the lane, (data, fds) | inline segments)
        run: List[Any] = []
        for item in items:
            if isinstance(item, Message):
                data, fds = item.data, tuple(checked_fds(item.fds))
            else:
                data, fds = item, ()
            with memoryview(data) as view:
                nbytes = view.nbytes
                contiguous = view.c_contiguous
            if contiguous and lane.wants(nbytes):
                if run:
                    plan.append((False, w.segments(run)))
                    run = []
                plan.append((True, (data, fds)))
            else:
                run.append(item)
        if run:
            plan.append((False, w.segments(run)))
        deadline = _io.deadline_of(self._sock.gettimeout())
        accepted = 0
        try:
            self._announce(deadline)
            for in_lane, what in plan:
                if not in_lane:
                    segments, total = what
                    k = self._sender.send(segments, total) if total else 0
                    accepted += k
                    if k < total:
                        return accepted
                    continue
                seg = self._slot_segment(what[0], what[1], deadline)
                if seg is None:  # no room: inline, as without a lane
                    item = Message(what[0], what[1]) if what[1] else what[0]
                    segments, total = w.segments([item])
                    k = self._sender.send(segments, total)
                else:
                    # The slot is staged (LaneSender.begin) and settled from
                    # the frame's write log: in flight if a byte of it went,
                    # free again if none did (whatever stopped the write),
                    # and an exception anywhere from its copy to after its
                    # write leaves it to the next frame to settle so.
                    k = self._send_frame(seg, lane.settle)
                if not k:
                    return accepted
                accepted += 1
        except (BlockingIOError, socket.timeout):
            if accepted:
                return accepted
            raise
        return accepted

    def _send_frame(self, seg: Segment, unsent: Callable[[], None]) -> int:
        """Write one frame naming slots of the lane; 1 once any of it went (a tail kept pending).

        When none of it went, `unsent` makes its slots this end's again
        before the error is raised, whatever the error (EAGAIN, a timeout,
        EBADF for a closed descriptor in the message's fds): nothing of
        the message reached the peer.  Once part of it went, its slots are
        the peer's to return, error or not.
        """
        k, exc = self._sender.send_frame(seg)
        if exc is None:
            return k
        if not k:
            unsent()
        elif isinstance(exc, (BlockingIOError, socket.timeout)):
            return k  # the rest is pending, as for any message begun
        raise exc

    def _announce(self, deadline: Optional[float]) -> None:
        """Write the REGION frame if it has not gone yet: before any other frame of this end.

        Whether it went is its write log (LaneSender.region_log), filled in
        the C call that writes: never written twice, whatever exception
        lands after that call.
        """
        lane = self._lane
        assert lane is not None
        seg = lane.announcement()
        if seg is None:
            return
        if not self._sender.send([seg], 1):
            raise stalled(self._sock)

    def _object_slots(self, pickled: PickledObject) -> List[Optional[Slot]]:
        """Slots of the lane for the parts of `pickled` that belong there; None: inline.

        When a part finds no free slot, the RETURN frames already on the
        socket are read and, if slots came back, the parts are placed
        again; a part still without one goes inline (as a message that
        fits max_frame does, see `_slot_segment`), unless what is inline
        would then be over max_frame: then this waits for the peer to return
        slots (or for open loans to end), as the socket's timeout says.  The
        caller made sure that it fits with every slot free.

        Raises:
            BlockingIOError, TimeoutError: no slot came back in time.
            BrokenPipeError: the peer closed the channel.
        """
        lane = self._lane
        assert lane is not None
        parts = pickled.parts
        deadline = _io.deadline_of(self._sock.gettimeout())
        waited = False
        while True:
            # (the slots are staged, see _send_object: settle frees them all)
            with lane.lock:
                lane.room.clear()
                slots = place_parts(pickled, lane.region, threshold=lane.threshold,
                                    keep=lane.staged)
            if all(slot is not None or not lane.wants(view.nbytes)
                   for view, slot in zip(parts, slots)):
                return slots
            if not waited:
                waited = True
                self._send_returns()  # the peer may be waiting for ours just the same
                if self._returns_now():
                    lane.settle()
                    continue
            inline = sum(view.nbytes for view, slot in zip(parts, slots) if slot is None)
            table = ENVELOPE_HEADER.size + ENVELOPE_ENTRY.size * len(parts)
            if inline + table <= self._writer.max_frame:
                return slots
            # It fits once enough slots are free (_send_object checked it
            # against an empty region): slots sent come back as the peer
            # returns them, slots of open loans as those are sent or given up.
            # (The slots this try placed are freed without a wake: they
            # are no room that was not there before it.)
            lane.settle(wake=False)
            self._wait_for_room(deadline)

    def _slot_segment(self, data: Any, fds: Tuple[int, ...],
                      deadline: Optional[float]) -> Optional[Segment]:
        """`data` in a free slot, as its SLOT frame; None when it goes inline instead.

        With no slot free, the RETURN frames already on the socket are
        read; if there is still no room, a message that fits max_frame
        goes inline (None): waiting for slots could wait for ever on a peer
        that is itself waiting for this end to read what it sent, where
        a plain write only waits as it would without a lane.  A larger
        one waits for slots, reading the socket (RETURN frames come that
        way) unless another thread is receiving on this channel: that one
        reads them, and this one waits for it to.

        Raises:
            BlockingIOError, TimeoutError: no slot came back in time.
            BrokenPipeError: the peer closed the channel.
        """
        lane = self._lane
        assert lane is not None
        inline = memoryview(data).nbytes <= self._writer.max_frame
        while True:
            seg = lane.try_segment(data, fds)
            if seg is not None:
                return seg
            if inline:
                self._send_returns()
                if self._returns_now():
                    continue
                return None
            self._wait_for_room(deadline)

    def _wait_for_room(self, deadline: Optional[float]) -> None:
        """One wait for the peer to return slots (a caller holding the sending side loops over it).

        RETURN frames come on the socket.  While another thread is
        receiving on this channel, that one reads them: this one waits for
        the lane's `room`, set as slots come back, as such a receive leaves
        RETURN frames of its own to this call to write, and at close.
        Otherwise this one applies those a receive read and left unparsed,
        and reads what came, borrowing the receiving side for that only (a
        receive that starts meanwhile waits for it to end, never refused,
        and never for the peer); then waits for the socket, with no claim.
        Either wait lasts at most _ROOM_STEP: then the caller looks again
        (a receive may have ended without reading them, or begun meanwhile).

        Raises:
            BlockingIOError, TimeoutError: the deadline passed.
            BrokenPipeError: the peer closed the channel.
            ProtocolError: the peer broke the protocol (the channel is closed).
            OSError: EBADF, the channel was closed.
        """
        lane = self._lane
        assert lane is not None
        self._check_open()
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            self._send_returns()
            if self._returns_now():  # (a non-blocking socket: what already came)
                return
            self._room_wanted = True
            raise stalled(self._sock)
        self._send_returns()  # the peer may be waiting for ours just the same
        step = _ROOM_STEP if deadline is None else min(_ROOM_STEP, deadline - now)
        found = ELSEWHERE if RECEIVING in self._busy else self._look_for_returns()
        if found == NOTHING_READ:
            # (a return that comes after the look ends this wait at once)
            _io.wait(self._fd, False, now + step)
        elif found == READER_FULL or found == ELSEWHERE:
            # the next read waits for a receive, or another thread's
            # receive reads the returns: it sets `room` as slots come back
            lane.room.wait(step)
        # (RETURNED: slots came back; READ: read what came, none among it: the caller looks again)
        self._check_open()

    def _leave_lane(self) -> None:
        """In a child after fork(): the lane stays the parent's; this copy sends as without one.

        Parent and child would otherwise take slots of one shared region,
        each with its own copy of the free space, and write over each
        other's messages in flight.  The child's copy of the region (its
        descriptor and mapping) is closed, which the parent's does not
        notice; a RETURN frame the child reads names a slot of the
        parent's and is dropped.  The peer's region, which the reader
        maps, stays readable.
        """
        lane = self._lane
        assert lane is not None
        self._lane = None
        self._room_wanted = False
        self._reader.on_return = _returned_to_parent
        lane.close()

    # ---- loans: messages made in place in the lane ---------------------------------

    def loan(self, nbytes: int) -> Loan:
        """A writable buffer of `nbytes` bytes in a free slot of this channel's lane.

        Fill ``loan.view`` (``numpy.frombuffer(loan.view, dtype)`` works) and
        send it with `send_loan`: the message is never copied.  Used as
        ``with ch.loan(n) as loan:``, a loan not sent when the block ends
        is given back.  Waits for room as a send does (the socket's
        timeout), reading the peer's returns.

        Raises:
            ValueError: the channel has no lane (no shm_size), or `nbytes`
                is below 1 or over the region's size (before any system call).
            TypeError: `nbytes` is not an int.
            BlockingIOError: a non-blocking socket and no room now.
            TimeoutError: no room before the socket's timeout.
            BrokenPipeError: the peer closed the channel while this end waited.
            OSError: the channel is closed (EBADF).
            RuntimeError: another thread is sending on this channel.
        """
        lane = self._lane
        if lane is None:
            raise ValueError("this channel has no shared-memory lane (see shm_size)")
        nbytes = _checks.in_range(nbytes, "nbytes", 1, lane.region.size)
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        loan: Optional[Loan] = None
        try:
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            if self._closed:
                raise _closed_error()
            loan = self._loan(nbytes)
            # The returns a receive in another thread left to this call go
            # before the loan is the caller's, and `lent` is the last step:
            # an exception (a signal handler's) before it leaves the slot
            # staged, and the next sending call frees it; one after it
            # would lose the loan, and its slot for good.  (Returns left
            # after this write: that receive writes them once the claim is
            # gone, see `_fill_owing`.)
            if self._reader.returns:
                self._send_returns()
            lane.lent()  # the caller's from here: no longer freed by the next settle
            return loan
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if loan is None and self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

    def _loan(self, nbytes: int) -> Loan:
        lane = self._lane
        assert lane is not None
        self._check_open()
        self._room_wanted = False
        deadline = _io.deadline_of(self._sock.gettimeout())
        loan = lane.try_loan(nbytes)
        if loan is None:
            self._send_returns()
            self._returns_now()  # returns already on the socket: no wait for them
        while loan is None:
            loan = lane.try_loan(nbytes)
            if loan is None:
                self._wait_for_room(deadline)
        return loan

    def send_loan(self, loan: Loan, fds: Iterable[Any] = ()) -> None:
        """Send the filled slot of `loan` (from `loan`) as one message, with `fds` attached.

        No copy: the message is the slot.  The loan is committed (its view
        released); the slot is this end's again once the peer returns it.
        Messages keep their order with those of `send` and `send_many`.
        When nothing of its frame could be written (BlockingIOError,
        TimeoutError, or an OSError such as EBADF for a closed descriptor
        in `fds`) the loan is open again, to send later or give back.

        Raises:
            TypeError: not an afunix.shm.Loan, or bad descriptors.
            ValueError: a loan of another channel's lane, or one already
                committed or given back (before any system call).
            BufferError: a buffer exported from its view is still alive.
            BlockingIOError, TimeoutError, OSError, RuntimeError: as for send.
        """
        if not isinstance(loan, Loan):
            raise TypeError("send_loan takes an afunix.shm.Loan, not %s" % type(loan).__name__)
        lane = self._lane
        if lane is None or loan.region is not lane.region.region:
            raise ValueError("the loan is not of this channel's lane")
        if not loan.open:
            raise ValueError("the loan was already committed or abandoned")
        fds = tuple(checked_fds(fds))
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            if self._closed:
                raise _closed_error()
            self._send_loan(loan, fds)
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it (EPIPE)
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

    def _send_loan(self, loan: Loan, fds: Tuple[int, ...]) -> None:
        lane = self._lane
        assert lane is not None
        self._check_open()
        self._announce(_io.deadline_of(self._sock.gettimeout()))
        # The loan is staged (LaneSender.loan_segment) until settled from
        # the write log: open again if nothing of its frame went (the
        # caller's to send or give up), in flight if a byte did, whatever
        # exception lands in between.
        try:
            seg = lane.loan_segment(loan, fds)  # committed: sent, for the peer's returns
            self._send_frame(seg, lane.settle)
        except BaseException:
            lane.settle()  # (settled already when the write failed: then nothing to do)
            raise

    def _returns_now(self) -> bool:
        """Apply the RETURN frames held and read what already waits on the socket, without waiting; True when slots came back."""
        return self._look_for_returns() == RETURNED

    def _look_for_returns(self) -> int:
        """`_returns_now`, saying what it found: RETURNED, or what to wait on (see `_chanio.READ`)."""
        lane = self._lane
        assert lane is not None
        busy = self._busy
        me = Borrowed()
        before = lane.in_flight
        found = ELSEWHERE
        try:
            if busy.setdefault(RECEIVING, me) is me and not self._closed:
                try:
                    # (a receive may have read them and ended before it parsed them)
                    self._reader.scan_returns()
                    for _ in range(16):
                        found = read_for_room(self._sock, self._reader, time.monotonic())
                        if found != READ or lane.in_flight < before:
                            break
                except ProtocolError:
                    if self._closed:
                        # a close() woke this read (its shutdown cut a frame short)
                        raise _closed_error() from None
                    self._abort()
                    raise
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            self._borrow_released()
        return RETURNED if lane.in_flight < before else found

    def _write_returns(self, wait: bool = False) -> None:
        """Send the slots of the peer's lane released here back (RETURN frames), as far as the socket takes them.

        Called after a receive hands a message of the lane out, and as a
        sending call ends (`wait`: then written as a send writes, waiting
        for the socket as its timeout says).  Never waits past the socket's
        timeout and never raises for the socket: what does not go stays for
        the next call (a receive has handed its message out, which must not
        be lost for the sake of a RETURN frame).  Skipped while another
        thread is sending: that one writes them (as it waits for room, and
        as it ends); else the sending side is borrowed for the write
        (`Borrowed`: a send that starts meanwhile waits for it to end).
        Unless `wait`, skipped too while the socket is not
        writable: a peer that only sends reads RETURN frames only once its
        region is full, so a receive that waited for it to read them would
        stop taking the messages that peer is blocked writing, and both
        would wait for ever; the slots go with a later receive or send.
        """
        busy = self._busy
        me = Borrowed()
        try:
            if not self._reader.returns:
                return
            if busy.setdefault(SENDING, me) is not me:
                if self._lane is not None:
                    self._lane.room.set()  # a sender waiting for room wakes and writes them
                return
            if not wait and not _io.wait(self._fd, True, time.monotonic()):
                return
            self._send_returns()
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            self._borrow_released()

    def _send_returns(self) -> None:
        """`_write_returns` for a caller that holds the sending side.

        One RETURN frame at a time: the reader makes it, and settles it from
        its write log after the write (or at the next call, after an
        exception from a signal handler): its slots leave `returns` once a
        byte of it went, and only then.  A socket that refuses them for
        good (EPIPE, ECONNRESET: the peer reads nothing more) drops them:
        kept, they would be owed for ever, and a receive that owes returns
        waits for the socket to take them as well as for input, which such
        a socket, writable all along, would end at once, again and again.
        """
        r = self._reader
        if not r.returns or self._closed:
            return
        try:
            if self._lane is not None:
                self._announce(None)  # this end's first frame, whatever comes after it
            while True:
                seg = r.return_segment()
                if seg is None:
                    return
                sent = self._sender.send([seg], 1)
                r.settle_returns()
                if not sent:
                    return
        except (BrokenPipeError, ConnectionResetError):
            r.settle_returns()
            r.drop_returns()  # never read: the sends say so at their next call
        except OSError:
            r.settle_returns()  # kept; a socket that is broken says so at the next call

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
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            if self._closed:
                raise _closed_error()
            return self._send_fixed(buffer, size)
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it (EPIPE)
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

    def _send_fixed(self, buffer: Any, size: int) -> int:
        self._check_open()
        seg = self._writer.fixed(buffer, size)
        if seg is None:
            return 0
        if self._lane is not None:
            self._announce(_io.deadline_of(self._sock.gettimeout()))
        return self._sender.send([seg], len(seg.lengths))

    def send_object(self, obj: Any) -> None:
        """Send `obj` pickled with protocol 5, as one message (`recv_object` takes it).

        The twin of ``multiprocessing.connection.Connection.send``.  Buffers
        of at least `shm_threshold` bytes (numpy arrays and other
        protocol-5 buffers, and `obj` itself when it is bytes or a
        bytearray; not a bytes or bytearray inside `obj`, which pickle
        writes into the stream) are not copied into the pickle stream: each
        goes in a free slot of the lane when the channel has one, inline
        otherwise, and so does a large stream.  It waits for slots only when what
        would stay inline is over max_frame.  Waits, and keeps a partly
        written object, as `send` does.

        Raises:
            ValueError: over max_frame even with every slot of the lane
                free, or without a lane (nothing sent).
            pickle.PicklingError (and whatever pickling `obj` raises): nothing sent.
            BlockingIOError, TimeoutError, OSError, RuntimeError: as for `send`.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            if self._closed:
                raise _closed_error()
            self._send_object(obj)
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it (EPIPE)
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

    def _send_object(self, obj: Any) -> None:
        self._check_open()
        lane = self._lane
        threshold = lane.threshold if lane is not None else self._object_threshold
        with pickle_object(obj, threshold=threshold) as pickled:
            log: Optional[List[int]] = None
            if lane is not None:
                self._room_wanted = False
                # Before any system call: an object whose inline rest is
                # over max_frame even in an empty region is refused at once
                # (waiting for returns would wait for nothing).  Placed in
                # an empty copy only when it is over max_frame all inline:
                # a small object pays no allocator.
                parts = pickled.parts
                table = ENVELOPE_HEADER.size + ENVELOPE_ENTRY.size * len(parts)
                if table + sum(view.nbytes for view in parts) > self._writer.max_frame:
                    self._writer.check_size(inline_when_free(pickled, lane.region.allocator,
                                                             threshold=threshold))
                self._announce(_io.deadline_of(self._sock.gettimeout()))
                # The parts' slots are staged (LaneSender.begin) until the
                # next frame settles them from this frame's write log: in
                # flight if a byte of it went, free if not, whatever
                # exception (a signal handler's) stops this call.
                log = lane.begin()
                slots = self._object_slots(pickled)
            else:
                slots = place_parts(pickled, None, threshold=threshold)
            try:
                parts = encode_object(pickled, slots)
                size = sum(memoryview(part).nbytes for part in parts)
                self._writer.check_size(size)
                # one packed frame (the writer keeps a partly written one's tail)
                frame = b"".join([lane_header(size, 0, KIND_OBJECT), *parts])
                del parts
            except BaseException:
                if lane is not None:
                    lane.settle()  # not started: the slots are free again
                raise
            if lane is None:
                self._send_frame(lane_segment(frame), _nothing)
                return
            for slot in slots:
                if slot is not None:
                    lane.sending(slot.offset, slot.length)
            # none of it went: the slots are free again (settle recalls them)
            self._send_frame(lane_segment(frame, (), log), lane.settle)

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
            if (busy.setdefault(SENDING, me) is not me
                    and not self._claimed_after_borrow(SENDING, me)):
                raise refused(SENDING)
            if self._closed:
                raise _closed_error()
            return self._flush()
        except OSError as exc:
            if self._closed and not isinstance(exc, ProtocolError):
                raise _closed_error() from None  # a close() in another thread woke it (EPIPE)
            raise
        finally:
            try:
                if busy[SENDING] is me:
                    del busy[SENDING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass
            if self._reader.returns:
                self._write_returns(wait=True)  # a receive in another thread left them to this call

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
        Descriptors that came with the message are closed, not at once but
        by the next receive (or `close`; docs/channel.md, Descriptors):
        use `recv_message` where descriptors may come.

        Raises:
            EOFError: the peer closed the channel cleanly (between messages).
            MessageKindError: the next message is an object (sent with
                `send_object`): it stays, for `recv_object`.
            ProtocolError: the peer broke the protocol; the channel is closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(RECEIVING, me) is not me
                    and not self._claimed_after_borrow(RECEIVING, me)):
                raise refused(RECEIVING)
            if self._closed:
                raise _closed_error()
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
            if r.returns:
                self._before_take(1)
            data: Optional[bytes] = r.copies[k]
            r.next = i + 1
        else:
            if i >= r.parsed and not self._fill():
                raise EOFError("the peer closed the channel")
            if r.returns or r.lane_msg is not None:
                self._before_take(1)
            # the frames of this read copied out at once (its descriptors are
            # closed by the next receive)
            data = r.take_next()
        assert data is not None  # (frames are ready: take_next gives one)
        return data

    def _before_take(self, n: int, copy: bool = True, drop: bool = False) -> None:
        """Before a receive takes `n` messages: the slots of the peer's lane to go back, written when due.

        Written before the take, never after: an exception (a signal
        handler's) while writing them then leaves the messages where they
        were, for the next receive, instead of dropping messages taken.
        So that the slot of a message of the lane taken now goes back now
        all the same, it is copied out first (`FrameReader.copy_lane`, not
        for `copy=False`: a batch reads it in place, and its slot goes back
        at the next receive; with `drop`, a refused object's slots go back
        uncopied).
        """
        r = self._reader
        if copy and r.lane_msg is not None:
            r.copy_lane(drop)
        if r.returns and r.returns_due(n):
            self._write_returns()

    def recv_many(self, max_messages: int = TABLE_CAPACITY) -> List[bytes]:
        """Receive up to `max_messages` messages: those one read brought, waiting only for the first.

        Descriptors that came with them are closed by the next receive (see `recv`).

        Returns:
            The messages, in order (up to an object, which ends them); an
            empty list at a clean end of stream.

        Raises:
            MessageKindError: the first message is an object (sent with
                `send_object`): it stays, for `recv_object`.
            ProtocolError: the peer broke the protocol; the channel is closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(RECEIVING, me) is not me
                    and not self._claimed_after_borrow(RECEIVING, me)):
                raise refused(RECEIVING)
            if self._closed:
                raise _closed_error()
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
        if r.returns or r.lane_msg is not None:
            self._before_take(max(1, min(r.parsed - r.next, max_messages)))
        return r.take_many(max_messages)

    def recv_message(self) -> Message:
        """Receive one message with its descriptors, as ``Message(data, fds)``.

        The descriptors are close-on-exec and owned by the caller.

        Raises:
            EOFError: the peer closed the channel cleanly (between messages).
            MessageKindError: the next message is an object (sent with
                `send_object`): it stays, for `recv_object`.
            ProtocolError: the peer broke the protocol (for instance a
                descriptor count that does not match); the channel is closed
                and every descriptor received closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(RECEIVING, me) is not me
                    and not self._claimed_after_borrow(RECEIVING, me)):
                raise refused(RECEIVING)
            if self._closed:
                raise _closed_error()
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
        if r.returns or r.lane_msg is not None:
            self._before_take(1)
        return r.take_message()

    def recv_batch(self, max_messages: int = TABLE_CAPACITY) -> FrameBatch:
        """Receive up to `max_messages` messages without copying them out (see FrameBatch).

        The zero-copy path: no object per message.  The batch is valid until
        the next receive on this channel.

        Returns:
            The batch (up to an object, which ends it); empty (len 0) at a
            clean end of stream.

        Raises:
            MessageKindError: the first message is an object (sent with
                `send_object`): it stays, for `recv_object`.
            ProtocolError: the peer broke the protocol; the channel is closed.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(RECEIVING, me) is not me
                    and not self._claimed_after_borrow(RECEIVING, me)):
                raise refused(RECEIVING)
            if self._closed:
                raise _closed_error()
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
        if r.returns:
            # slots of the batch before, released by this receive
            self._before_take(max(1, min(r.parsed - r.next, max_messages)), copy=False)
        return r.take_batch(max_messages)

    def _take_claimed(self, take: Callable[[int], List[int]], i: int) -> List[int]:
        """``take(i)`` (a batch's descriptors handed over) under the claim of the receiving side.

        An empty list once the channel is closed: the close closes them (it waits
        for a take that claimed first, and one that claims after its look
        sees the channel closed).

        Raises:
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(RECEIVING, me) is not me
                    and not self._claimed_after_borrow(RECEIVING, me)):
                raise refused(RECEIVING)
            if self._closed:
                return []
            return take(i)
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def recv_object(self) -> Any:
        """Receive one object sent with `send_object`, unpickled.

        The twin of ``multiprocessing.connection.Connection.recv``.
        Unpickling runs code the peer chose, so it is refused
        (PermissionError) unless the peer runs as this process's effective
        uid (SO_PEERCRED, read once, at the first call) or the channel was
        opened with ``trust_peer=True``; the refused object is dropped
        unread (its slots go back) and the next receive takes the message
        after it.  Where the kernel cannot name the peer's uid, every object
        is refused unless the channel trusts its peer.

        Raises:
            EOFError: the peer closed the channel cleanly (between messages).
            MessageKindError: the next message is not an object: it stays,
                for `recv` or the other receives.
            PermissionError: refused, as above; the channel stays usable.
            ProtocolError: the peer broke the protocol (a bad OBJECT
                payload, a slot it names out of range or overlapping); the
                channel is closed.
            pickle.UnpicklingError (and whatever unpickling raises): a bad
                pickle stream; the object is taken, the channel stays usable.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
            RuntimeError: another thread is receiving on this channel.
        """
        busy = self._busy
        me: List[object] = []  # a fresh token, held by this call only
        try:
            if (busy.setdefault(RECEIVING, me) is not me
                    and not self._claimed_after_borrow(RECEIVING, me)):
                raise refused(RECEIVING)
            if self._closed:
                raise _closed_error()
            return self._recv_object()
        finally:
            try:
                if busy[RECEIVING] is me:
                    del busy[RECEIVING]
            except KeyError:  # unclaimed: the holder left (see __init__)
                pass

    def _recv_object(self) -> Any:
        r = self._reader
        if r.next >= r.parsed and not self._fill():
            raise EOFError("the peer closed the channel")
        if not r.object_next():
            r.take_object()  # raises MessageKindError; the message stays
        refusal: Optional[PermissionError] = None
        if not self._trust_peer:
            if not self._peer_uid_read:
                self._peer_uid = peer_uid(self._sock)
                self._peer_uid_read = True
            try:
                check_unpickle_peer(self._peer_uid)
            except PermissionError as exc:
                refusal = exc
        # a refused object is dropped unread: nothing is copied out of its slots
        drop = refusal is not None
        self._before_take(1, drop=drop)
        parts = r.take_object(drop=drop)
        if refusal is not None:
            raise refusal  # before anything is unpickled
        return load_object(parts[0], parts[1:])

    def __iter__(self) -> Iterator[bytes]:
        """Every message until the peer closes the channel cleanly (see recv_many).

        Raises MessageKindError at an object (sent with `send_object`),
        which stays for `recv_object`; a new iteration goes on after it is
        taken.
        """
        while True:
            messages = self.recv_many()
            if not messages:
                return
            yield from messages

    def _fill(self) -> bool:
        """Receive until the reader holds parsed frames; False at a clean end of stream.

        Raises OSError(EBADF) when another thread closed the channel while
        it read, whatever the read brought: that close shut the socket down
        to wake it, so what it met (the end of stream, a frame cut short,
        EPIPE) is the close's doing, not the peer's; what the read brought
        stays in the reader, which that close closes once this call left.
        """
        self._check_open()
        r = self._reader
        try:
            got = self._fill_now()
        except BaseException as exc:
            if self._closed:
                if isinstance(exc, Exception):
                    raise _closed_error() from None
                # (a signal handler's exception goes on as it is; the closer closes the reader)
            elif r.closed:
                # The reader closed itself: the peer broke the protocol, or its
                # region could not be mapped here (EMFILE, ENOMEM) and the stream
                # cannot go on in step.  The socket goes too, and `closed` says so.
                self._abort()
            raise
        if self._closed:
            raise _closed_error()
        return got

    def _fill_now(self) -> bool:
        r = self._reader
        if r.returns or r.lane_held:
            # Slots released and not written yet (see FrameReader.returns_due)
            # go back before this receive reads, and may wait: the peer
            # may be waiting for them to send what this end waits for.
            if r.frames_ready():
                return True
            self._write_returns()
            if r.returns:
                return self._fill_owing()
        return fill(self._sock, r)

    def _fill_owing(self) -> bool:
        """`fill` for a receive that holds back RETURN frames the socket did not take.

        It waits for input or for room to write them, whichever comes
        first, and writes them as soon as the socket takes them
        (docs/PROTOCOL.md: a receiver never waits for input while it holds
        back returns): the peer may be waiting for those slots before it
        sends what this end waits for, and may have read the socket empty
        waiting for them.  Reads here do not wait: a frame not complete
        yet is waited for the same way.  While another thread sends, that
        one writes them after its frame (`send`, `_wait_for_room`): this
        waits for input a while at a time and looks again.
        """
        r = self._reader
        sock = self._sock
        fd = self._fd
        timeout = sock.gettimeout()
        deadline = _io.deadline_of(timeout)
        while r.returns:
            if r.rs.deferred:
                # a read the backend holds (left by a receive a signal
                # handler's exception stopped) is taken in without a wait;
                # if it brought no frame the returns are still owed: go on
                got = read_now(sock, r)
                if got is not None:
                    return got
                continue
            stuck = SENDING in self._busy
            if not stuck:
                readable, writable = _io.wait_either(fd, deadline)
                if writable:
                    owed = r.returning
                    self._write_returns()
                    # writable and nothing went (a send claimed meanwhile, or
                    # a write error the next send reports): no spin on it
                    stuck = not readable and r.returning == owed
            if stuck:
                wait = _ROOM_STEP if deadline is None else min(_ROOM_STEP,
                                                                deadline - time.monotonic())
                readable = _io.wait(fd, False, time.monotonic() + max(0.0, wait))
                writable = False
            if readable:
                got = read_now(sock, r)
                if got is not None:
                    return got
            elif not writable and deadline is not None and time.monotonic() >= deadline:
                if not timeout:
                    break  # non-blocking: the read below says EAGAIN, or takes what just came
                raise socket.timeout("timed out")
        return fill(sock, r)

    # ---- closing ----------------------------------------------------------------

    def _abort(self) -> None:
        """Close the channel: marked closed, then, once no call of another thread is in it, all it holds.

        Called by close(), and by a call that meets a ProtocolError.  Every
        step is idempotent and runs under `_closing`: a second close (at
        once, or after one an exception interrupted) closes what is left.
        """
        self._closed = True  # first: a call that starts now gets EBADF
        # (not in a try: interrupted while calls of other threads may still
        # be in, nothing closes; the next close() does it all)
        self._wait_for_calls()
        with self._closing:
            # From here an exception (a signal handler's) stops nothing that
            # closes: the finally blocks go on, and a close() after one that did
            # not reach them closes what is left.
            try:
                self._reader.close()
                self._writer.drop_unsent()
                # Only while the socket is open: closed by a close before,
                # its descriptor number may be another file's by now.
                if self._sock.fileno() >= 0:
                    if self._lane is not None and self._lane.announced:
                        self._discard_returns()
                    hook = self._before_close
                    if hook is not None:
                        hook()
            finally:
                try:
                    self._sock.close()
                finally:
                    self._close_lane()
                    _channels.discard(self)

    def _wait_for_calls(self) -> None:
        """Wait until no call of another thread holds a side of this channel (it is marked closed).

        A call in progress uses the reader's buffers, the writer's unsent
        bytes, the lane's region and the socket's descriptor number (cached:
        closed under it, the number may name another file by the time it
        reads or writes); closing them under it would corrupt what it reads
        and leak or double-close what it holds.  So the close wakes it --
        the socket shut down (a blocked read ends with the end of stream, a
        blocked write with EPIPE, a poll with POLLHUP), the lane's `room`
        set, the waiters for a borrow notified -- and waits for it to leave:
        the call sees the channel closed and raises EBADF, or returns the
        result it already had.  Only when another thread's call holds a
        side is the socket shut down (a forked child, whose parent's calls
        are not its own, never does: a copy of the socket in another
        process would be shut down too).  Calls of this thread (the one a
        signal handler's close() interrupted, the one that aborts) cannot
        leave while this waits, and another closer's call waits for this
        one: neither is waited for.
        """
        busy = self._busy
        mine = _claims_of_this_thread(self)
        closers = self._closers
        closers.extend(mine)
        step = _LEAVE_STEP
        woken = False
        while True:
            others = False
            for side in (SENDING, RECEIVING):
                holder = busy.get(side)
                if holder is not None and not any(holder is t for t in mine) \
                        and not any(holder is t for t in closers):
                    others = True
            if not others:
                return
            if not woken:
                woken = True
                with contextlib.suppress(OSError):  # (closed by another close already: EBADF)
                    self._sock.shutdown(socket.SHUT_RDWR)
            if self._lane is not None:
                self._lane.room.set()  # a sender waiting for room wakes
            self._borrow_ended.ring()
            time.sleep(step)
            step = min(2 * step, _ROOM_STEP)

    def _close_lane(self) -> None:
        """Close this end's region (idempotent) and wake a sender waiting for room in another thread."""
        lane = self._lane
        if lane is not None:
            try:
                lane.close()
            finally:
                lane.room.set()  # it wakes, and finds the channel closed

    def close(self) -> None:
        """Write what is pending as `flush` would, then close the socket.

        Received descriptors not handed over are closed.  Pending bytes are
        dropped, without an error, when the peer is gone (BrokenPipeError,
        ConnectionResetError: nobody would read them), on a non-blocking
        socket that cannot take them at once (check `flush()` first), and
        while another thread is sending or closing (its write and this one
        would interleave).

        A call in progress in another thread (a receive blocked without a
        timeout, a send blocked on a full socket or waiting for slots of
        the lane) is woken and waited for: the socket is shut down
        (``shutdown(SHUT_RDWR)``; a copy of it in another process is shut
        down too, and the peer sees the end of stream at once), and only
        once every such call has left are the socket, the descriptors
        received, the unsent bytes and the lane's region closed.  The call
        raises OSError(EBADF), or returns the result it already had
        (whatever it hands out is the caller's).  A call this close waits
        for returns in microseconds once woken, unless it is running the
        caller's code (unpickling in `recv_object`).  Calls of the thread
        that closes (one a signal handler's close() interrupted) are not
        waited for, nor kept safe: such a receive may still hand out the
        message it was taking, with descriptors the close closed; in a forked child the calls of the parent's threads are
        not calls of the child, and its close() never shuts the socket down.
        Two closes at once both return once everything is closed.

        The socket is closed whatever happens on the way, as a file's
        close does: when the write times out or fails, or an exception (a
        signal handler's, KeyboardInterrupt) interrupts it, what was not
        written yet is dropped, and the peer may see the frame in progress
        cut short (a ProtocolError at its end).  Where every byte matters,
        call `flush()` first: it can be retried.

        Raises:
            TimeoutError, OSError: writing what was pending failed; the
                channel is closed all the same.
        """
        if self._closed:
            # (each closes once: what an exception stopped a close before
            # from reaching -- the socket, the region -- is closed now; and
            # a close at once with another one returns once it is done)
            self._abort()
            return
        busy = self._busy
        # (The sending side, claimed as a borrow: a send that another thread
        # starts meanwhile waits for the write to end, then finds the channel
        # closed, where a plain claim would refuse it, RuntimeError, before
        # the channel is marked closed.)
        me = Borrowed()
        try:
            # (claimed as the sending calls do: a thread sending now would
            # interleave with this write, so its pending bytes are dropped)
            if busy.setdefault(SENDING, me) is me and self._writer.unsent:
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
            self._borrow_released()
            self._abort()

    def _discard_returns(self) -> None:
        """Read and drop what waits on the socket before closing it (a channel that sent slots).

        A peer returns slots in frames this end, if it only sends, never
        reads; Linux shows the peer of a socket closed with bytes unread
        ECONNRESET instead of the end of stream.  What waits now is dropped
        (closing drops it all the same); a RETURN frame written after this
        still resets the peer.
        """
        # CPython's methods on a socket with a timeout poll before the call,
        # MSG_DONTWAIT or not: through them, closing with nothing waiting
        # would wait out the whole timeout.  A timeout-0 twin does not.
        sock = self._sock
        twin = _io.nonblocking_twin(sock) if sock.gettimeout() else None
        try:
            for _ in range(64):
                try:
                    if not (twin or sock).recv(1 << 16, socket.MSG_DONTWAIT):
                        return
                except OSError:
                    return
        finally:
            if twin is not None:
                twin.detach()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # (No __del__: the socket closes itself when collected, and the reader
    # closes the descriptors it holds.)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "fd=%d" % self._fd
        return "<afunix.Channel %s %s>" % (state, "SOCK_SEQPACKET" if self._seqpacket else "SOCK_STREAM")


def _closed_error() -> OSError:
    """What a call on a closed channel raises, and one that a close() in another thread ended."""
    return OSError(errno.EBADF, "the channel is closed")


def _claims_of_this_thread(channel: Channel) -> List[object]:
    """The tokens of the claims on `channel` held by calls of the running thread.

    A close() waits for the calls of other threads to leave before it
    closes what they use; a call of its own thread cannot leave while it
    waits: the call a signal handler that closes interrupted, the call that
    aborts on a ProtocolError, a close() a handler's close() interrupted.
    Those are found here, on the stack, when a close needs them, so that a
    call pays nothing for it (no thread id kept with each claim): each
    public call holds its claim in its local `me`, and a claim the channel
    takes for itself (`Borrowed`) names its thread.
    """
    tokens: List[object] = []
    here = globals()
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is here:
            local = frame.f_locals
            if local.get("self") is channel and "me" in local:
                tokens.append(local["me"])
        frame = frame.f_back
    thread = threading.get_ident()
    for side in (SENDING, RECEIVING):
        holder = channel._busy.get(side)
        if type(holder) is Borrowed and holder.thread == thread:
            tokens.append(holder)
    return tokens


def reader_of(channel: Channel) -> FrameReader:
    """The FrameReader of `channel`, for the async channel's iteration over the same frames."""
    return channel._reader


def _nothing() -> None:
    """No slots to make this end's again (a frame without any)."""


def lane_of(channel: Channel) -> Optional[LaneSender]:
    """The lane `channel` sends through (None without shm_size), for the async channel's waits."""
    return channel._lane


def room_wanted(channel: Channel) -> bool:
    """True when `channel`'s last sending call stopped for want of slots (wait for the peer's returns)."""
    return channel._room_wanted


def before_close(channel: Channel, hook: Callable[[], None]) -> None:
    """Have `channel` call `hook` just before it closes its socket, whatever closes it.

    For the async channel: a call that meets a ProtocolError closes the
    socket from inside, and the tasks waiting on its descriptor must be
    woken, and their loop's callbacks on it removed, while it is open
    (afunix._aiowait.notify_closing).  `hook` is kept by the channel: it
    should not keep the async channel itself alive (a cycle).
    """
    channel._before_close = hook


def before_take(channel: Channel) -> None:
    """Before a take of one message from `channel`'s reader (see reader_of): as `Channel._before_take`."""
    channel._before_take(1)


def channel_pair(type: int = socket.SOCK_STREAM, **options: Any) -> Tuple[Channel, Channel]:
    """Two connected Channels over a new socketpair (afunix.socketpair).

    Args:
        type: socket.SOCK_STREAM or socket.SOCK_SEQPACKET.
        options: passed to each Channel (max_frame, write_buffer, shm_size,
            shm_threshold, trust_peer).
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
