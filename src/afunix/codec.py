"""The channel's frame codec: the protocol of docs/PROTOCOL.md with no socket, no clock and no waiting.

`FrameReader` takes bytes and the descriptors that came with them in and
gives frames out, enforcing every receive rule: limits, descriptor
matching, stray descriptors, frames ahead of a bad one delivered before the
error.  `FrameWriter` takes messages in and gives frame bytes plus their
control data (SCM_RIGHTS) out, and keeps what was accepted and not yet
written.  Both pack and parse with the active backend (in C on the C
backend).  `afunix.Channel` and `afunix.aio.Channel` are loops that move the
bytes between these and a socket; a test can drive them by hand.
"""
from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import _backend, _checks
from ._contract import Backend
from .frames import (DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT, RECORD_MAX, FrameBatch,
                     ProtocolError, end_batch)
from ._limits import FRAME_HEADER as HEADER_SIZE
from ._limits import SCM_MAX_FD
from .framewriter import JOIN_MAX, FrameWriter
from .message import Message

#: Most frames one parse puts in the reader's table (a receive hands out at most these).
TABLE_CAPACITY = 4096
#: Bytes of the receive buffer to begin with (it grows for a large frame).
RECV_BUFFER = 256 << 10
# Below this much room at the end of the receive buffer, move the unparsed
# bytes to its front before reading: a short read costs a system call.
READ_ROOM = 32 << 10
_TRUNC = int(socket.MSG_TRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_EMPTY = memoryview(b"")
#: The protocol error of an empty SOCK_SEQPACKET record.
EMPTY_RECORD = ("an empty SOCK_SEQPACKET record (the protocol forbids them: they read like end "
                "of stream)")


# ---- reading ----------------------------------------------------------------------
#
# Every change to the receive state is made with stores only, after what it
# gives out is built: CPython runs signal handlers only at calls and
# backward jumps, so an exception from one either comes before the commit
# (the next receive returns the same messages) or not at all.


class FrameReader:
    """Bytes and descriptors in, frames out: the receive half of the protocol.

    Bytes come in two ways.  The I/O loop reads in place: it hands
    `rx`, `buffer` and `read_size` to the backend's ``chan_recv``, which
    appends one read at ``rx.s.end`` and records the descriptors that came
    with it in the same call (so a signal handler's exception cannot drop
    them), then calls `received`.  Anything else calls `feed` with the bytes
    and descriptors.  `frames_ready` says whether parsed frames wait (and
    makes room for the next read when none do); `take_bytes`, `take_many`,
    `take_message` and `take_batch` hand them out.  A broken rule closes
    every descriptor held and raises ProtocolError, after the frames ahead
    of the bad one are handed out.

    Args:
        max_frame: the largest payload accepted.
        seqpacket: the bytes come as SOCK_SEQPACKET records (one per read).
        backend: the backend whose parse and descriptor bookkeeping to use
            (default: the active one).
    """

    __slots__ = ("closed", "impl", "max_frame", "seqpacket", "buffer", "view", "start", "rx", "rs",
                 "reads", "table", "next", "parsed", "batch", "broken", "copies", "copied_from",
                 "ncopied", "eof", "normal_size", "__weakref__")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, seqpacket: bool = False,
                 backend: Optional[Backend] = None) -> None:
        self.closed = True  # until set up: close() and __del__ have nothing to do
        self.impl = backend if backend is not None else _backend.impl
        self.max_frame = _checks.in_range(max_frame, "max_frame", 0, MAX_FRAME_LIMIT)
        self.seqpacket = bool(seqpacket)
        # bytes [start, rs.end) of buffer are not parsed yet; rs.base is the
        # stream offset of buffer[0] (descriptors are matched to frames by
        # stream offset).  rx is the backend's receive state: the bytes (end)
        # and the descriptors each read brought (held reads, see
        # csrc/channel.h).
        self.rx = self.impl.new_chan_rx()
        # SOCK_SEQPACKET: room for a record of the largest size per held-read
        # slot (one read may bring that many, see _chanio.read), after an
        # incomplete frame's bytes; the size a grown buffer returns to
        self.normal_size = (RECORD_MAX * self.rx.reads + READ_ROOM if self.seqpacket
                            else RECV_BUFFER)
        self.buffer = bytearray(self.normal_size)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.rs = self.rx.s
        self.reads = self.rx.reads  # slots for held reads
        self.table = self.impl.new_frame_table(TABLE_CAPACITY)
        self.next = 0  # next parsed frame to hand out
        self.parsed = 0  # frames in the table
        self.batch: Optional[FrameBatch] = None
        # copies[k] is the payload of parsed frame copied_from + k, for
        # k < ncopied (see take_next); ncopied = 0 whenever the table changes
        self.copies: List[bytes] = []
        self.copied_from = 0
        self.ncopied = 0
        # set when a parse found a protocol error behind good frames: the
        # error is raised once those frames are handed out
        self.broken: Optional[str] = None
        # set when the end of stream was fed while parsed frames waited: it
        # is taken as such once they are handed out
        self.eof = False
        self.closed = False

    @property
    def buffered(self) -> int:
        """Frames parsed and not handed out yet."""
        return self.parsed - self.next

    @property
    def read_size(self) -> int:
        """The most bytes the next read may bring: what `feed` takes now.

        At least 32 KiB (a whole record of RECORD_MAX bytes on SEQPACKET)
        once `frames_ready` or `feed` said no frame waits.
        """
        # the room after the bytes held; SEQPACKET: room for exactly one
        # record of the largest size, so a longer one is cut (MSG_TRUNC) and
        # refused, as the protocol says (_make_room keeps that much free)
        room = len(self.buffer) - self.rs.end
        return min(RECORD_MAX, room) if self.seqpacket else room

    # ---- bytes in ---------------------------------------------------------------

    def frames_ready(self) -> bool:
        """True when frames wait to be handed out; else room is made for a read (then `received`).

        The start of every receive: descriptors of the frames handed out
        before are closed (those not taken), and an error found behind them
        is raised now.
        """
        if self.closed:
            raise OSError(errno.EBADF, "the channel is closed")
        if self.next < self.parsed:
            return True
        batch = self.batch
        if batch is not None:
            end_batch(batch)  # its messages' descriptors not taken are closed below
            self.batch = None
        if self.broken is not None:
            self.fail(self.broken)  # the frames before the bad one are all out
        rs = self.rs
        if rs.head < rs.tail:
            # descriptors of the frames handed out (taken, or to be closed)
            self.impl.chan_drop(self.rx, rs.base + self.start, False)
        if rs.errors:
            self.check_errors()
        if self.start < rs.end and self._parse():
            return True
        if self.eof:
            return self.ended()  # fed while frames waited: they are all out now
        if rs.head < rs.tail:
            self._check_stray_fds()
        self._make_room()
        return False

    def received(self, n: int) -> bool:
        """A read of `n` bytes was recorded in `rx` (n > 0, or descriptors came): True when frames are ready."""
        rs = self.rs
        if rs.errors:
            self.check_errors()
        # (as at the end of frames_ready, written out: the path of every receive)
        if self.start < rs.end and self._parse():
            return True
        if rs.head < rs.tail:
            self._check_stray_fds()
        self._make_room()
        return False

    def ended(self) -> bool:
        """The peer closed its end (a read of 0 bytes): False when that is a clean end of stream.

        Raises ProtocolError when it closed in the middle of a frame or left
        descriptors that no frame declared.
        """
        rs = self.rs
        if rs.errors:
            self.check_errors()
        if self.start == rs.end and rs.head == rs.tail:
            return False
        self.fail("the peer closed the channel in the middle of a frame"
                  if self.start < rs.end else
                  "the peer closed the channel with descriptors no frame declared")
        return False  # not reached

    def feed(self, data: Any, fds: Iterable[int] = (), flags: int = 0) -> bool:
        """Take in what one read brought: bytes and descriptors; True when frames are ready.

        The socket-free way in.  `fds` belong to the reader from here on
        (closed when their frame is handed out without them, or on error);
        `flags` are the msg flags the kernel would have set on that read
        (MSG_TRUNC, MSG_CTRUNC).  Empty `data` with no descriptors is the
        end of stream: False at a clean one, ProtocolError in the middle of
        a frame; fed while parsed frames wait, True is returned and the end
        is taken as such by the `frames_ready` after they are handed out.
        While parsed frames wait, the bytes are kept for later and True is
        returned; otherwise feeding, like a receive, ends the previous
        `take_batch`.

        Raises:
            TypeError, ValueError: `fds` are not distinct descriptor numbers
                (at most SCM_MAX_FD), `flags` not an int, or more bytes than
                the next read may bring (see `read_size`): nothing is taken,
                the descriptors stay the caller's.
            ProtocolError: the bytes, or bytes fed before, break the
                protocol; the reader is closed, and so are `fds`.
            OSError: EBADF, the reader is closed; ENOBUFS, descriptors of
                CHAN_READS reads are held already (take the frames that wait
                first).  Nothing is taken, the descriptors stay the caller's.
        """
        if self.closed:
            raise OSError(errno.EBADF, "the channel is closed")
        fds = [_checks.descriptor(fd) for fd in fds]
        if len(fds) > SCM_MAX_FD:
            raise ValueError("at most %d descriptors per read (SCM_MAX_FD), got %d"
                             % (SCM_MAX_FD, len(fds)))
        if len(set(fds)) != len(fds):
            raise ValueError("a descriptor given twice: the reader would close it twice")
        flags = _checks.msg_flags(flags)
        try:
            ready = self.next < self.parsed or self.frames_ready()
        except ProtocolError:
            for fd in fds:  # the reader owns them, and is closed now
                try:
                    os.close(fd)
                except OSError:
                    pass  # not open: the others are closed all the same
            raise
        with memoryview(data) as view:
            n = view.nbytes
            end = self.rs.end
            room = len(self.buffer) - end
            if not ready:
                room = min(room, self.read_size)
            if n > room:
                raise ValueError("%d bytes do not fit the %d the next read may bring" % (n, room))
            self.buffer[end:end + n] = view.cast("B")
        if not n and not fds and not flags:
            if ready:
                self.eof = True
                return True
            return self.ended()
        self.impl.chan_hold(self.rx, n, fds, flags)
        return True if ready else self.received(n)

    def _parse(self) -> int:
        t = self.table
        start = self.start
        rs = self.rs
        n = self.impl.parse_frames(t, self.buffer, start, rs.end, t.capacity, self.max_frame)
        if n < 0:
            if n == -errno.EMSGSIZE:
                length = int.from_bytes(self.buffer[start:start + 4], "little")
                self.fail("a frame of %d bytes is over max_frame (%d)" % (length, self.max_frame))
            self.fail("malformed frame header %s" % self.buffer[start:start + HEADER_SIZE].hex())
        if n:
            good, problem = n, None
            if t.with_fds or rs.head < rs.tail:
                good, problem = self._claim(n)
                if problem is not None and not good:
                    self.fail(problem)
            # the commit: stores only
            self.broken = problem
            self.next, self.parsed, self.ncopied = 0, good, 0
            self.start = start + t.consumed if problem is None else t.offsets[good] - HEADER_SIZE
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
        t = self.table
        rs = self.rs
        reads = self.reads
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
        # the incomplete frame at start, brought by a read that began at or
        # before it.  Any others were declared by no frame.
        rs = self.rs
        at = rs.base + self.start
        for r in range(rs.head, rs.tail):
            slot = r % self.reads
            if rs.frame[slot] < 0 and (rs.hi[slot] <= at or rs.lo[slot] > at):
                self.fail("descriptors arrived that no frame declared")

    def check_errors(self) -> None:
        errors = self.rs.errors
        if errors & self.rx.no_data:
            self.fail("descriptors arrived without data")
        if errors & _CTRUNC:
            self.fail("the kernel cut the descriptors of a message (MSG_CTRUNC)")
        if errors & _TRUNC:
            self.fail("a SOCK_SEQPACKET record longer than %d bytes" % RECORD_MAX)
        if errors & self.rx.empty_record:
            self.fail(EMPTY_RECORD)

    def _make_room(self) -> None:
        """Make room after the data for a read, keeping the unparsed bytes.

        Bytes are moved first, to a new buffer or to the front (a slice store
        from a copy), then the state is committed with stores only.
        """
        rs = self.rs
        start, end, size = self.start, rs.end, len(self.buffer)
        used = end - start
        # the incomplete frame must fit, and a SEQPACKET record must fit
        # whole (the kernel drops what does not)
        least = RECORD_MAX if self.seqpacket else 1
        need = max(self.table.need, used) + least
        room = max(least, READ_ROOM)
        if (need > size and size - used < room) or (not used and size > 4 * RECV_BUFFER):
            # Grow towards what the incomplete frame needs, but only when the
            # bytes already here fill the buffer, and at most doubling: a
            # header alone must not make a peer's 8 bytes cost max_frame.
            # A new buffer rather than a resize: views of the old one (a
            # FrameBatch) may still be held; they keep it alive.
            # Shrinking (nothing held) returns to the normal size: on
            # SOCK_SEQPACKET a smaller one has room for fewer records per read.
            new = bytearray(max(min(need, 2 * size), used + room, self.normal_size))
            new[:used] = self.view[start:end]
            view = memoryview(new)
            self.buffer = new
            self.view = view
        elif used and size - end >= max(least, READ_ROOM):
            return
        elif used:
            # a copy first where the ranges overlap: the source must stay
            # whole until the commit below (an interrupted move is redone)
            chunk = self.view[start:end]
            self.buffer[:used] = chunk if start >= used else bytes(chunk)
        base = rs.base + start
        # the commit: stores only
        rs.base = base
        rs.end = used
        self.start = 0
        self.next = self.parsed = self.ncopied = 0

    # ---- frames out -------------------------------------------------------------
    #
    # Each takes from frames that `frames_ready` said are there.

    def take_bytes(self) -> bytes:
        """The next message's payload (its descriptors are closed at the next receive)."""
        i = self.next
        if i >= self.parsed:
            raise self._none_parsed()
        t = self.table
        o = t.offsets[i]
        data = bytes(self.view[o:o + t.lengths[i]])
        self.next = i + 1
        return data

    def take_next(self) -> Optional[bytes]:
        """The next message's payload, None when no parsed frame waits: the path of iteration.

        The first call after a parse copies out every frame still parsed at
        once, as take_many does; the calls after it take from those copies
        with an index and stores only, and no call in between (so no signal
        handler can run between reading and moving `next`).  The other
        take_* calls hand out the same frames: they share `next`.
        """
        i = self.next
        k = i - self.copied_from
        if 0 <= k < self.ncopied:
            data = self.copies[k]
            self.next = i + 1
            return data
        n = self.parsed - i
        if n <= 0:
            return None
        copies = self._copies(i, n)
        # the commit: stores only
        self.copies, self.copied_from, self.ncopied = copies, i, n
        self.next = i + 1
        return copies[0]

    def take_many(self, max_messages: int) -> List[bytes]:
        """Up to `max_messages` payloads, copied out."""
        if type(max_messages) is not int or max_messages < 1:
            max_messages = _checks.in_range(max_messages, "max_messages", 1, 1 << 62)
        i = self.next
        n = min(self.parsed - i, max_messages)
        messages = self._copies(i, n)
        self.next = i + n
        return messages

    def _copies(self, i: int, n: int) -> List[bytes]:
        """Copies of the payloads of parsed frames [i, i + n)."""
        t = self.table
        first = t.offsets[i]
        if n == 1:
            return [bytes(self.view[first:first + t.lengths[i]])]
        size = t.uniform
        last = i + n - 1
        end = t.offsets[last] + t.lengths[last]
        view = self.view
        if end - first > JOIN_MAX:
            # no large temporary copy (see JOIN_MAX): one copy per message
            return [view[o:o + k].tobytes()
                    for o, k in zip(t.offsets[i:i + n].tolist(), t.lengths[i:i + n].tolist())]
        if size >= 0:
            stride = size + HEADER_SIZE
            blob = bytes(view[first:end])
            return [blob[p:p + size] for p in range(0, n * stride, stride)]
        blob = bytes(view[first:end])
        return [blob[o - first:o - first + k]
                for o, k in zip(t.offsets[i:i + n].tolist(), t.lengths[i:i + n].tolist())]

    def take_message(self) -> Message:
        """The next message with its descriptors, handed over to the caller."""
        i = self.next
        if i >= self.parsed:
            raise self._none_parsed()
        t = self.table
        o = t.offsets[i]
        slot = self._slot_of(i) if t.nfds[i] else -1
        fds = self.impl.chan_fds(self.rx, slot) if slot >= 0 else []
        message = Message(bytes(self.view[o:o + t.lengths[i]]), tuple(fds))
        if slot >= 0:
            self.rs.nfds[slot] = 0  # given over
        self.next = i + 1
        return message

    def _none_parsed(self) -> OSError | IndexError:
        """The error of a take with no parsed frame: never a message that did not come."""
        if self.closed:
            return OSError(errno.EBADF, "the channel is closed")
        return IndexError("no parsed frame waits (frames_ready() says when one does)")

    def _slot_of(self, i: int) -> int:
        """The slot of the held read claimed by parsed frame i, -1 when none (pure)."""
        rs = self.rs
        at = rs.base + self.table.offsets[i] - HEADER_SIZE
        for r in range(rs.head, rs.tail):
            slot = r % self.reads
            if rs.frame[slot] == at:
                return slot if rs.nfds[slot] else -1
        return -1

    def take_batch(self, max_messages: int) -> FrameBatch:
        """Up to `max_messages` messages in place (see FrameBatch), valid until the next receive."""
        if type(max_messages) is not int or max_messages < 1:
            max_messages = _checks.in_range(max_messages, "max_messages", 1, 1 << 62)
        i = self.next
        n = min(self.parsed - i, max_messages)
        t = self.table
        take = None
        if t.with_fds:
            slots = {j: self._slot_of(i + j) for j in range(n) if t.nfds[i + j]}
            take = self._taker({j: s for j, s in slots.items() if s >= 0})
        last = i + n - 1
        batch = FrameBatch(self.view, t.offsets[i:i + n], t.lengths[i:i + n],
                           t.uniform if t.uniform >= 0 else None,
                           t.offsets[i] - HEADER_SIZE, t.offsets[last] + t.lengths[last], take)
        self.batch = batch
        self.next = i + n
        return batch

    def empty_batch(self) -> FrameBatch:
        """The batch of a clean end of stream: no messages."""
        batch = FrameBatch(self.view, _EMPTY.cast("I"), _EMPTY.cast("I"), None,
                           self.start, self.start, None)
        self.batch = batch
        return batch

    def _taker(self, slots: Dict[int, int]) -> Callable[[int], List[int]]:
        """FrameBatch.fds for a batch whose message j's descriptors are held in slots[j]."""
        rx, rs, fds_of = self.rx, self.rs, self.impl.chan_fds

        def take(j: int) -> List[int]:
            slot = slots.get(j, -1)
            if slot < 0 or not rs.nfds[slot]:
                return []
            fds = fds_of(rx, slot)
            rs.nfds[slot] = 0  # given over: a store, then return
            return fds

        return take

    # ---- closing ----------------------------------------------------------------

    def release(self) -> None:
        """Close every descriptor held that was not handed over (one backend call)."""
        batch = self.batch
        if batch is not None:
            end_batch(batch)
            self.batch = None
        self.impl.chan_drop(self.rx, 0, True)

    def close(self) -> None:
        """Close every descriptor held; the reader takes nothing more."""
        if self.closed:
            return
        self.release()  # first: a close() after an interrupted one closes them
        self.closed = True
        self.next = self.parsed = self.ncopied = 0

    def fail(self, message: str) -> None:
        """Close the reader and raise ProtocolError(message)."""
        self.close()
        raise ProtocolError(message)

    def __del__(self) -> None:
        # the descriptors received and not handed over are ours to close
        if not getattr(self, "closed", True):
            self.release()


__all__ = ["FrameReader", "FrameWriter", "TABLE_CAPACITY"]
