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

import array
import errno
import os
import socket
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from . import _backend, _checks
from ._contract import Backend
from .frames import (DEFAULT_MAX_FRAME, KIND_OBJECT, KIND_REGION, KIND_RETURN, KIND_SLOT,
                     LANE_VERSION, MAX_FRAME_LIMIT, PAIR_SIZE, RECORD_MAX, RETURN_MAX_SLOTS,
                     FrameBatch, MessageKindError, ProtocolError, end_batch, return_frames,
                     taker_of, unpack_header, unpack_pairs, unpack_region)
from ._limits import FRAME_HEADER as HEADER_SIZE
from ._limits import FRAME_MAGIC as MAGIC
from ._limits import SCM_MAX_FD
from .framewriter import JOIN_MAX, FrameWriter, Segment, lane_segment
from .message import Message
from .objects import parse_envelope
from .shm import MAX_REGION_SIZE, RegionReader
from .slots import MAX_SLOTS, Slot

#: FrameReader.take_guard: (take, i) -> message i's descriptors, from take(i) or none
TakeGuard = Callable[[Callable[[int], List[int]], int], List[int]]

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
# payload bytes of each lane frame kind a receiver takes (RETURN: a multiple of 16)
_LANE_PAYLOAD = {KIND_REGION: 8, KIND_SLOT: PAIR_SIZE}


class SlotMessage:
    """A message the peer put in a slot of its region, parsed and not handed out yet."""

    __slots__ = ("offset", "length", "view", "fdslot", "slot", "copy")

    def __init__(self, offset: int, length: int, view: memoryview, fdslot: int) -> None:
        self.offset, self.length, self.view = offset, length, view
        # the held read whose descriptors the SLOT frame claimed, -1: none
        self.fdslot = fdslot
        # (made here: taking the message commits with stores only)
        self.slot = Slot(offset, length)
        # the payload copied out ahead of the take, its slot gone back to
        # `returns` then (`FrameReader.copy_lane`); None until
        self.copy: Optional[bytes] = None


class ObjectMessage:
    """An object the peer sent (an OBJECT frame), parsed and not handed out yet.

    `parts` are the pickle stream and its out-of-band buffers, in order:
    views of this end's own copy of the payload (inline parts, `slots[i]`
    None), or of the peer's region (`slots[i]` the slot, claimed and held
    until the object is taken); `read_only[i]`: the sender flagged part i
    READ_ONLY.
    """

    __slots__ = ("parts", "slots", "read_only", "held", "held_bytes", "copies")

    def __init__(self, parts: List[memoryview], slots: List[Optional[Slot]],
                 read_only: List[bool]) -> None:
        self.parts, self.slots, self.read_only = parts, slots, read_only
        # the slots, and their bytes (made here: taking the object commits
        # with stores only)
        self.held = [slot for slot in slots if slot is not None]
        self.held_bytes = sum(slot.length for slot in self.held)
        # the parts copied out ahead of the take (as SlotMessage.copy); []
        # for an object refused, whose slots go back unread
        self.copies: Optional[List[Any]] = None


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
        max_region: the largest region the peer may announce (its lane).
        max_slots: the most slots of the peer's region held at once.
        on_return: called with (offset, length, mark) for each slot the
            peer returns (a RETURN frame: slots of this end's own region); it
            raises ProtocolError for one that is not in flight.  `mark`,
            ``(stream offset of the frame, index in it)``, grows from one
            return to the next: one at or below the last applied is the same
            return applied again (see `afunix.lane.LaneSender.give_back`).
            None: this end sent no slots, and a RETURN frame is a protocol
            error.
        take_guard: when set, ``FrameBatch.fds(i)`` runs as
            ``take_guard(take, i)``, which calls ``take(i)`` or returns
            ``[]``: the channel's claim of its receiving side, so that a
            take after the receive returned and a close in another thread
            exclude each other (one descriptor never both handed out and
            closed).

    The shared-memory lane (docs/PROTOCOL.md, version 2): a REGION frame is
    adopted (checked before it is mapped, `afunix.shm.RegionReader`); a
    SLOT frame's message is handed out by the same take_* calls as a DATA
    frame's, copied out of the region (`take_batch`: in place, a batch of
    that one message); the slot then joins `returns`, and `return_segment`
    and `settle_returns` send them back in RETURN frames.  Slots of a batch
    join them at the next receive.
    """

    __slots__ = ("closed", "impl", "max_frame", "seqpacket", "buffer", "view", "shown", "start", "rx", "rs",
                 "reads", "table", "next", "parsed", "batch", "batch_from", "batch_next", "broken", "copies", "copied_from",
                 "ncopied", "eof", "max_region", "max_slots", "on_return", "lane", "lane_msg",
                 "lane_held", "returns", "returning", "applied", "scanned", "normal_size",
                 "lane_at", "return_log", "return_n", "return_bytes", "returns_lock",
                 "take_guard", "__weakref__")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, seqpacket: bool = False,
                 backend: Optional[Backend] = None, *, max_region: int = MAX_REGION_SIZE,
                 max_slots: int = MAX_SLOTS,
                 on_return: Optional[Callable[[int, int, Any], None]] = None,
                 take_guard: Optional[TakeGuard] = None) -> None:
        self.closed = True  # until set up: close() and __del__ have nothing to do
        self.take_guard = take_guard
        self.impl = backend if backend is not None else _backend.impl
        self.max_frame = _checks.in_range(max_frame, "max_frame", 0, MAX_FRAME_LIMIT)
        self.seqpacket = bool(seqpacket)
        self.max_region = _checks.in_range(max_region, "max_region", 1, MAX_REGION_SIZE)
        self.max_slots = _checks.in_range(max_slots, "max_slots", 1, 1 << 24)
        self.on_return = on_return
        # the peer's region once announced (and the stream offset of its
        # REGION frame); the slot message parsed and not handed out; slots
        # handed out in place (a batch), released at the next receive;
        # slots no longer read and not yet sent back (still in the lane's
        # ledger until their RETURN frame is made, see return_segment)
        self.lane: Optional[RegionReader] = None
        self.lane_at = -1
        self.lane_msg: Optional[Union[SlotMessage, ObjectMessage]] = None
        self.lane_held: List[Slot] = []
        self.returns: List[Slot] = []
        self.returning = 0  # bytes of the slots in returns
        # the RETURN frame being written: its write log (Segment.log), and
        # how many slots (and bytes) at the front of returns it carries
        self.return_log: List[int] = []
        self.return_n = 0
        self.return_bytes = 0
        # Held by every change of `returns` and of the lane's ledger.  They
        # are shared by two threads: a channel's sending thread writes the
        # RETURN frames a receive in another thread left to it
        # (return_segment releases their slots from the ledger, and
        # settle_returns drops them from `returns`) while that receive
        # claims slots of new frames and adds the slots it releases.  Never
        # held across a wait (only across the unmapping at the end);
        # reentrant, so that a signal handler's call in the thread that
        # holds it does not wait for itself (docs/reliability.md: what
        # that leaves out).
        self.returns_lock = threading.RLock()
        # RETURN frames applied ahead of the messages before them (stream
        # offsets, see scan_returns), and where that scan stopped
        self.applied: Set[int] = set()
        self.scanned = 0
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
        # what a FrameBatch hands out: a write into it would change frames
        # not parsed yet, as the peer could not
        self.shown = self.view.toreadonly()
        self.start = 0
        self.rs = self.rx.s
        self.reads = self.rx.reads  # slots for held reads
        self.table = self.impl.new_frame_table(TABLE_CAPACITY)
        self.next = 0  # next parsed frame to hand out
        self.parsed = 0  # frames in the table
        self.batch: Optional[FrameBatch] = None
        # the stream offset of the batch's first frame (-1 for a batch of
        # the lane), and the index of the frame after its last: a receive
        # after the batch moved `next` past it (see drop_taken_reads)
        self.batch_from = -1
        self.batch_next = 0
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
        return self.parsed - self.next + (self.lane_msg is not None)

    @property
    def holding(self) -> bool:
        """True while the application has yet to take what was read: messages parsed, or a batch out.

        A read meanwhile (a sender's, looking for returns) only appends
        bytes, unparsed (`read_for_room`): once the buffer is full the
        socket stays readable with nothing that read can take.
        """
        return self.batch is not None or self.parsed > self.next or self.lane_msg is not None

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
        if self.lane_msg is not None:
            return True  # (its descriptors are held until it is taken)
        batch = self.batch
        if batch is not None:
            end_batch(batch)  # its messages' descriptors not taken are closed below
            self.batch = None
        if self.lane_held:
            self._release_held()
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
        if rs.deferred:
            # a read the backend holds (one a signal handler's exception
            # stopped before the stdlib backend took it in) lies after `end`,
            # where it landed: the next chan_recv reports it there, so the
            # bytes stay where they are until then
            return False
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

    def drop_taken_reads(self) -> None:
        """While messages wait to be taken: close the held reads of the frames handed out before them.

        `frames_ready` does this at the next receive, once every parsed
        frame is out.  A sender waiting for slots meanwhile reads only
        while the backend has a slot for the read (`read_for_room`), and
        reads of messages already taken (with `recv_message`, or handed
        out by `recv` with their descriptors closed) would fill the slots
        while only a receive can free them: this frees them now.  Kept:
        the reads of the frames not handed out yet, of the current batch
        (its descriptors may still be taken), and all of them while a
        message of the lane waits or is out in a batch.  A batch that a
        later receive moved past (its frames are all before `next`, and
        that receive took frames after them) is ended here, as the
        receive after a batch ends it (`frames_ready`, which a receive
        calls only once no parsed frame waits): its descriptors not taken
        are closed with the others.
        """
        if self.lane_msg is not None:
            return
        rs = self.rs
        upto = rs.base + self.start  # every parsed frame lies before the bytes not parsed
        if self.next < self.parsed:
            upto = rs.base + self.table.offsets[self.next] - HEADER_SIZE
        batch = self.batch
        if batch is not None:
            if self.next == self.batch_next:
                upto = min(upto, self.batch_from)  # the batch may still take its descriptors
            else:
                end_batch(batch)
                self.batch = None
        if upto > 0 and rs.head < rs.tail:
            self.impl.chan_drop(self.rx, upto, False)

    def ended(self) -> bool:
        """The peer closed its end (a read of 0 bytes): False when that is a clean end of stream.

        Raises ProtocolError when it closed in the middle of a frame or left
        descriptors that no frame declared.
        """
        rs = self.rs
        if rs.errors:
            self.check_errors()
        if self.start == rs.end and rs.head == rs.tail:
            self._close_lane()  # the peer is gone: its region is no longer read
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
            if self.buffer[start + 6] != 1:  # not version 1: the lane's frames, or worse
                return self._lane_frames()
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

    # ---- the lane's frames (version 2) -----------------------------------------------

    def _lane_frames(self) -> int:
        """Version-2 frames from `start` on: handled in turn; what `_parse` returns.

        A REGION frame is adopted and a RETURN frame's slots passed to
        `on_return`, then parsing goes on; a SLOT frame's message becomes
        `lane_msg` (1: a message is ready).  0 when the frame at `start`
        is not complete yet.  Each header is checked as soon as it is
        here, before its payload is waited for.
        """
        rs = self.rs
        while True:
            start, end = self.start, rs.end
            if end - start < HEADER_SIZE:
                return 0
            length, k, kind, version, magic = unpack_header(self.buffer, start)
            if magic != MAGIC or k > SCM_MAX_FD or version == 0:
                self._bad_header("")
            if version == 1:
                return self._parse()  # DATA frames again: the backend's parse
            if version != LANE_VERSION:
                self._bad_header("a frame of version %d, this end speaks versions 1 and %d"
                                 % (version, LANE_VERSION))
            self._check_lane_header(length, k, kind)
            if end - start - HEADER_SIZE < length:
                # (an OBJECT frame may be large: the buffer grows towards it
                # as towards an incomplete DATA frame, see _make_room)
                self.table.need = HEADER_SIZE + length
                return 0
            at = rs.base + start
            if kind == KIND_OBJECT:
                return self._object_frame(at, start, length)
            payload = bytes(self.view[start + HEADER_SIZE:start + HEADER_SIZE + length])
            fdslot = self._claim_one(at, k)
            if kind == KIND_SLOT:
                (offset, size), = unpack_pairs(payload)
                lane = self.lane
                if lane is None:
                    self.fail("a SLOT frame before the REGION frame")
                    return 0  # not reached
                try:
                    # (keyed by the frame: the same frame parsed again after
                    # an interruption claims it again without a fault)
                    with self.returns_lock:
                        view = lane.claim(offset, size, (at, 0))
                except ProtocolError as exc:
                    self.fail(exc.strerror or "bad slot")
                msg = SlotMessage(offset, size, view, fdslot)
                # the commit: stores only
                self.lane_msg = msg
                self.start = start + HEADER_SIZE + length
                self.next = self.parsed = self.ncopied = 0
                return 1
            if kind == KIND_REGION:
                self._adopt(unpack_region(payload), fdslot, at)
            elif at in self.applied:
                self.applied.discard(at)  # applied by scan_returns already
            else:
                self._returned(unpack_pairs(payload), at)
            self.start = start + HEADER_SIZE + length
            self.next = self.parsed = self.ncopied = 0

    def _object_frame(self, at: int, start: int, length: int) -> int:
        """The OBJECT frame at `start`: its envelope checked, its slots claimed; 1 (a message is ready).

        The payload is copied out first (a bytearray: numpy rebuilds a
        writable array over it), and the slots' bytes are copied when the
        object is taken: what is unpickled is never the peer's memory.
        """
        self._claim_one(at, 0)
        payload = bytearray(self.view[start + HEADER_SIZE:start + HEADER_SIZE + length])
        try:
            envelope = parse_envelope(payload)
        except ProtocolError as exc:
            self.fail(exc.strerror or "bad object payload")
        parts: List[memoryview] = []
        slots: List[Optional[Slot]] = []
        for i, part in enumerate(envelope.parts):
            if isinstance(part, memoryview):
                parts.append(part)
                slots.append(None)
                continue
            lane = self.lane
            if lane is None:
                self.fail("an OBJECT frame names a slot before the REGION frame")
                return 0  # not reached
            try:
                # (keyed by frame and part, as in _lane_frames)
                with self.returns_lock:
                    parts.append(lane.claim(part.offset, part.length, (at, i)))
            except ProtocolError as exc:
                # (the slots claimed before go with the region: fail closes it)
                self.fail(exc.strerror or "bad slot")
            slots.append(part)
        msg = ObjectMessage(parts, slots, envelope.read_only)
        # the commit: stores only
        self.lane_msg = msg
        self.start = start + HEADER_SIZE + length
        self.next = self.parsed = self.ncopied = 0
        return 1

    def _bad_header(self, why: str) -> None:
        """Fail on the header at `start`, saying why when there is more to say than its bytes."""
        self.fail("malformed frame header %s%s" % (
            self.buffer[self.start:self.start + HEADER_SIZE].hex(), ": " + why if why else ""))

    def scan_returns(self) -> int:
        """Apply the RETURN frames among the bytes held and not parsed yet; how many were applied.

        For a sender waiting for room while messages it has not received
        are ahead of the peer's RETURN frames (a RETURN is not a message:
        docs/PROTOCOL.md lets it be acted on at once).  Touches nothing the
        take_* calls hand out: it only reads headers from the first byte
        not parsed on, and stops at an incomplete frame or at any header
        it would not parse (the parse in order reports that one).  The
        parse in order skips a RETURN frame applied here.
        """
        if self.closed or self.on_return is None:
            return 0
        rs = self.rs
        buf = self.buffer
        end = rs.end
        pos = max(self.start, self.scanned - rs.base)
        applied = 0
        while end - pos >= HEADER_SIZE:
            length, k, kind, version, magic = unpack_header(buf, pos)
            if magic != MAGIC or k > SCM_MAX_FD or version not in (1, LANE_VERSION):
                break
            if version == 1:
                if kind or length > self.max_frame:
                    break
            elif kind == KIND_RETURN:
                if (k or not length or length % PAIR_SIZE
                        or length > PAIR_SIZE * RETURN_MAX_SLOTS):
                    break
            elif kind == KIND_OBJECT:
                if k or length > self.max_frame:
                    break
            elif _LANE_PAYLOAD.get(kind) != length:
                break
            if end - pos - HEADER_SIZE < length:
                break
            at = rs.base + pos
            if kind == KIND_RETURN and version == LANE_VERSION and at not in self.applied:
                pairs = unpack_pairs(bytes(self.view[pos + HEADER_SIZE:pos + HEADER_SIZE + length]))
                try:
                    # (marked: a pass stopped by an exception and made again
                    # skips what the first applied, see on_return)
                    for i, (offset, size) in enumerate(pairs):
                        self.on_return(offset, size, (at, i))
                except ProtocolError as exc:
                    self.fail(exc.strerror or "bad returned slot")
                self.applied.add(at)
                applied += 1
            pos += HEADER_SIZE + length
        self.scanned = rs.base + pos
        return applied

    def _check_lane_header(self, length: int, k: int, kind: int) -> None:
        """Refuse a version-2 header that no payload could make right."""
        if kind == KIND_OBJECT:
            if k:
                self._bad_header("an OBJECT frame carries %d descriptors" % k)
            if length > self.max_frame:
                self.fail("an OBJECT frame of %d bytes is over max_frame (%d)"
                          % (length, self.max_frame))
            return
        if kind == KIND_RETURN:
            if k:
                self._bad_header("a RETURN frame carries %d descriptors" % k)
            if not length or length % PAIR_SIZE or length > PAIR_SIZE * RETURN_MAX_SLOTS:
                self._bad_header("a RETURN frame of %d bytes, not 1 to %d slots of %d bytes"
                                 % (length, RETURN_MAX_SLOTS, PAIR_SIZE))
            return
        want = _LANE_PAYLOAD.get(kind)
        if want is None:
            self._bad_header("a version-%d frame of unknown kind %d" % (LANE_VERSION, kind))
            return  # not reached
        if length != want:
            self._bad_header("a %s frame of %d bytes, not %d"
                             % ("REGION" if kind == KIND_REGION else "SLOT", length, want))
        if kind == KIND_REGION and k != 1:
            self._bad_header("a REGION frame declares %d descriptors, not 1" % k)

    def _claim_one(self, at: int, k: int) -> int:
        """Match a version-2 frame at stream offset `at` to its `k` descriptors; their held read, -1: none.

        The rule of `_claim` for one frame, failing at once: there is no
        frame ahead of it to deliver first.
        """
        rs = self.rs
        reads = self.reads
        r = rs.head
        while r < rs.tail and 0 <= rs.frame[r % reads] < at:
            r += 1
        slot = r % reads
        held = r < rs.tail
        if held and rs.hi[slot] <= at:
            self.fail("descriptors arrived that no frame declared")
        if not k:
            return -1
        if not held or not rs.lo[slot] <= at < rs.hi[slot]:
            self.fail("a frame declares %d descriptors and none came with it" % k)
        if rs.nfds[slot] != k and rs.frame[slot] != at:
            self.fail("a frame declares %d descriptors and %d came with it" % (k, rs.nfds[slot]))
        rs.frame[slot] = at
        return slot

    def _adopt(self, size: int, fdslot: int, at: int) -> None:
        """The peer's REGION (its frame at stream offset `at`): its descriptor checked and mapped read-only, or ProtocolError.

        The descriptor stays the held read's (closed once the frame is
        behind `start`, or by `fail`): the mapping does not need it, so an
        exception from a signal handler before the commit leaves nothing
        behind, and the frame parsed again adopts the region again; after
        the commit, the frame parsed again is known by `lane_at`.
        """
        if self.lane is not None:
            if self.lane_at == at:
                return  # adopted already: the same frame, parsed again
            self.fail("a second REGION frame")
        if not 1 <= size <= self.max_region:
            self.fail("a region of %d bytes announced, the limit is %d" % (size, self.max_region))
        fd, = self.impl.chan_fds(self.rx, fdslot)
        try:
            lane = RegionReader(fd, size, max_slots=self.max_slots, owned=False)
        except ProtocolError as exc:
            self.fail(exc.strerror or "bad region")
            return  # not reached
        except (OSError, MemoryError):
            self.close()  # out of descriptors or memory here: the stream cannot go on in step
            raise
        # the commit: stores only
        self.lane = lane
        self.lane_at = at

    def _returned(self, pairs: List[Tuple[int, int]], at: int) -> None:
        """The slots of this end's region the peer gave back (a RETURN frame at stream offset `at`)."""
        on_return = self.on_return
        if on_return is None:
            self.fail("a RETURN frame, and this end sent no slots")
            return  # not reached
        for i, (offset, length) in enumerate(pairs):
            try:
                on_return(offset, length, (at, i))  # (marked: see scan_returns)
            except ProtocolError as exc:
                self.fail(exc.strerror or "bad returned slot")

    def _release_held(self) -> None:
        """The slots a batch handed out in place join `returns`; a slot whose view is still exported stays.

        Releasing a view again is a no-op, so a pass an exception stopped
        is made again by the next receive; the lists change at the end,
        with stores only.
        """
        lane = self.lane
        kept: List[Slot] = []
        freed: List[Slot] = []
        nbytes = 0
        for slot in self.lane_held:
            try:
                if lane is not None:
                    lane.release_view(slot.offset)
            except BufferError:
                kept.append(slot)  # the caller still holds it: never overwritten under it
                continue
            freed.append(slot)
            nbytes += slot.length
        # the commit: stores only (see returns_lock)
        with self.returns_lock:
            self.lane_held = kept
            self.returns += freed
            self.returning += nbytes

    def _close_lane(self) -> None:
        """Unmap the peer's region and forget its slots (at the end, on error, at close).

        Under returns_lock: a sending thread may be releasing slots of this
        region from its ledger for a RETURN frame a receive left to it
        (return_segment) while the receive meets the end of the stream.
        """
        with self.returns_lock:
            lane = self.lane
            self.lane_msg = None
            self.lane_held = []
            self.returns = []
            self.returning = 0
            self.return_n = 0
            if lane is not None:
                self.lane = None
                lane.close()

    def forget_returns(self) -> None:
        """In a child after fork(): the slots in `returns` are the parent's to send back; forgotten here.

        Returned by both processes, the second return would break the
        peer's channel.  They leave the lane's ledger all the same (as
        `return_segment` releases them): the peer names them again once
        the parent returned them, and this copy must not take that for an
        overlap.
        """
        with self.returns_lock:
            lane = self.lane
            if lane is not None:
                for slot in self.returns:
                    try:
                        lane.discard(slot.offset, slot.length)
                    except BufferError:
                        pass  # a view still exported: held, as a batch's slot is
            self.returns = []
            self.returning = 0
            self.return_n = 0

    def drop_returns(self) -> None:
        """The slots in `returns` never go back: the peer reads nothing more (a write got EPIPE or ECONNRESET).

        Released from the lane's ledger as `forget_returns` releases them;
        their region is unmapped at close as before.
        """
        self.forget_returns()

    def forget_held(self) -> None:
        """In a child after fork(): the slots a batch holds are the parent's to return.

        Released here from this copy's ledger (where no view of them is
        still exported) but never returned: the parent returns them at its
        next receive, and a second return from the child would free a slot
        the peer has since filled again.  (`discard` can be made again: a
        pass stopped half way leaves `lane_held` whole for the next.)
        """
        lane = self.lane
        if lane is not None:
            for slot in self.lane_held:
                try:
                    lane.discard(slot.offset, slot.length)
                except BufferError:
                    pass  # still exported here: it stays held in this copy only
        self.lane_held = []

    def return_segment(self) -> Optional[Segment]:
        """The next RETURN frame to write, for the slots at the front of `returns`; None when none wait.

        The slots are released from the lane's ledger first (each release
        can be made again: they stay in `returns` until `settle_returns`
        sees their frame went).  After writing it (or failing to), call
        `settle_returns`; a frame made and never settled is settled by the
        next call.
        """
        with self.returns_lock:  # (the ledger is the receiving thread's too)
            self.settle_returns()
            returns = self.returns
            lane = self.lane
            if not returns or lane is None:
                return None
            slots = returns[:RETURN_MAX_SLOTS]
            for slot in slots:
                lane.discard(slot.offset, slot.length)
            log: List[int] = []
            frame, = return_frames(slots)
            seg = lane_segment(frame, (), log)
            nbytes = sum(slot.length for slot in slots)
            # the commit: stores only
            self.return_log = log
            self.return_n = len(slots)
            self.return_bytes = nbytes
            return seg

    def settle_returns(self) -> None:
        """The RETURN frame `return_segment` made: its slots leave `returns` if a byte of it went.

        Known from its write log, which the write fills inside the C call:
        a count lost to a signal handler's exception neither sends the
        slots twice (a fault at the peer) nor keeps them for ever.
        """
        if not self.return_n:
            return
        with self.returns_lock:  # (a receive in another thread may add to returns meanwhile)
            n = self.return_n
            if not n:
                return
            # the commit: stores only
            if self.return_log:
                self.returns = self.returns[n:]
                self.returning -= self.return_bytes
            self.return_n = 0

    def returns_due(self, after: int = 0) -> bool:
        """True when the slots released (`returns`) must be written now, not with later ones.

        `after`: as if that many more messages were taken (a receive asks
        before it takes, so that an exception while writing them never
        comes after a message was taken: see `Channel._before_take`).

        A receive that hands out a message of the lane releases its slot;
        writing a RETURN frame for each costs a system call per message.
        They wait for the next receive only while it is sure to come
        without reading: a message is parsed or complete among the bytes
        held (the sender then waits on unread messages anyway, as on a full
        socket buffer), and only up to RETURN_MAX_SLOTS slots or a quarter
        of the peer's region, so that the sender gets room back in steps
        while this end works through what it buffered.  A receive about to
        read writes them first (`Channel._fill`): none wait while this end
        waits for input.
        """
        returns = self.returns
        if not returns:
            return False
        lane = self.lane
        if (lane is None or len(returns) >= RETURN_MAX_SLOTS
                or self.returning * 4 >= lane.region.size):
            return True
        return not self.holds_message(after)

    def holds_message(self, after: int = 0) -> bool:
        """True when the next receive hands out a message without reading the socket.

        `after`: as if that many more of the messages parsed were taken.

        A message parsed and not taken, or a complete frame among the bytes
        held that is a message (a REGION or RETURN frame is not; a frame
        the parse will refuse counts, as the next receive ends there too).
        Reads headers only: nothing changes.
        """
        if self.parsed - self.next + (self.lane_msg is not None) > after:
            return True
        buf, end, pos = self.buffer, self.rs.end, self.start
        for _ in range(16):  # a few control frames ahead of a message at most
            if end - pos < HEADER_SIZE:
                return False
            length, _k, kind, version, _magic = unpack_header(buf, pos)
            if end - pos - HEADER_SIZE < length:
                return False
            if version != LANE_VERSION or kind == KIND_SLOT:
                return True
            pos += HEADER_SIZE + length
        return False

    def _slot_message(self) -> SlotMessage:
        """The slot message parsed and not taken (pure); IndexError when none, MessageKindError for an object."""
        msg = self.lane_msg
        if msg is None:
            raise self._none_parsed()
        if isinstance(msg, ObjectMessage):
            raise _object_next()
        return msg

    def copy_lane(self, drop: bool = False) -> None:
        """Copy the lane's message (next to hand out) out of the peer's region, ahead of its take; its slots join `returns`.

        For a receive that writes RETURN frames before it takes (see
        `returns_due`), so that the slot of the message it takes goes back
        at once all the same, and the first step of every take of the
        lane's message (see `_take_lane`).  The message stays next, with its copy (a
        receive that an exception stops before the take hands out the
        copy).  Does nothing for a message copied already; an object's
        parts are copied as `take_object` would, or, with `drop` (an
        object refused: `take_object(drop=True)` follows), not at all.
        """
        msg = self.lane_msg
        if isinstance(msg, SlotMessage) and msg.copy is None:
            data = msg.view.tobytes()
            # the commit: stores only (see returns_lock)
            with self.returns_lock:
                msg.copy = data
                self.returns += (msg.slot,)
                self.returning += msg.length
        elif isinstance(msg, ObjectMessage) and msg.copies is None:
            parts: List[Any] = [] if drop else self._object_copies(msg)
            # the commit: stores only
            with self.returns_lock:
                msg.copies = parts
                self.returns += msg.held
                self.returning += msg.held_bytes

    def _take_lane(self) -> bytes:
        """The slot message, copied out; its slot joins `returns` (its descriptors stay held)."""
        msg = self._slot_message()
        if msg.copy is None:
            # Copied first, its slot joining `returns` under returns_lock
            # (the view is released with the slot's RETURN frame, see
            # return_segment): the lock's release is a call, where a signal
            # handler's exception would lose a message taken in the same
            # commit; after a copy it leaves the copy next, for the next receive.
            self.copy_lane()
        copied = msg.copy
        assert copied is not None
        self.lane_msg = None  # (its slot went back with the copy)
        return copied

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
            shown = view.toreadonly()
            self.buffer = new
            self.view = view
            self.shown = shown
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
            return self._take_lane()
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
            return self._take_lane() if self.lane_msg is not None else None
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
        if n <= 0:
            return [self._take_lane()] if self.lane_msg is not None else []
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

    def object_next(self) -> bool:
        """True when the next message to hand out is an object (an OBJECT frame)."""
        return self.next >= self.parsed and isinstance(self.lane_msg, ObjectMessage)

    def take_object(self, drop: bool = False) -> List[Any]:
        """The next message, an object: its pickle stream and out-of-band buffers, this end's own.

        Inline parts are views of the payload's copy; a part in a slot is
        copied out and its slot joins `returns` (sent back by `return_segment`): the
        peer keeps writing its region, and a slot changed while it is
        unpickled must not change what is unpickled.  The copy of a part
        the sender flagged READ_ONLY is a bytes object, which rebuilds a
        bytes object without another copy (pickle hands it on as it is);
        any other is a bytearray, which numpy rebuilds a writable array over.
        `drop`: take the object unread (a refused one): its slots are
        released without a copy, and the list is empty.

        Raises:
            MessageKindError: the next message is not an object (nothing is taken).
        """
        msg = self.lane_msg
        if self.next >= self.parsed and msg is None:
            raise self._none_parsed()
        if self.next < self.parsed or not isinstance(msg, ObjectMessage):
            raise MessageKindError("the next message is not an object: receive it with "
                                   "recv(), recv_message() or the other receives")
        if msg.copies is None:
            self.copy_lane(drop)  # (copied first, as in _take_lane)
        copied = msg.copies
        assert copied is not None
        self.lane_msg = None  # (its slots went back with the copies: copy_lane)
        return [] if drop else copied

    @staticmethod
    def _object_copies(msg: ObjectMessage) -> List[Any]:
        """The parts of `msg` as this end's own: copies of those in slots (see take_object)."""
        return [part if slot is None else bytes(part) if read_only else bytearray(part)
                for part, slot, read_only in zip(msg.parts, msg.slots, msg.read_only)]

    def take_message(self) -> Message:
        """The next message with its descriptors, handed over to the caller."""
        i = self.next
        if i >= self.parsed:
            msg = self._slot_message()
            if msg.copy is None:
                self.copy_lane()  # (copied first, as in _take_lane)
            copied = msg.copy
            assert copied is not None
            fds = self.impl.chan_fds(self.rx, msg.fdslot) if msg.fdslot >= 0 else []
            lane_message = Message(copied, tuple(fds))
            # the commit: stores only (as _take_lane)
            if msg.fdslot >= 0:
                self.rs.nfds[msg.fdslot] = 0  # given over
            self.lane_msg = None
            return lane_message
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
        if n <= 0 and self.lane_msg is not None:
            if isinstance(self.lane_msg, ObjectMessage):
                raise _object_next()
            return self._lane_batch(self.lane_msg)
        t = self.table
        take = None
        if t.with_fds:
            slots = {j: self._slot_of(i + j) for j in range(n) if t.nfds[i + j]}
            take = self._taker({j: s for j, s in slots.items() if s >= 0})
        last = i + n - 1
        first = t.offsets[i] - HEADER_SIZE
        batch = FrameBatch(self.shown, t.offsets[i:i + n], t.lengths[i:i + n],
                           t.uniform if t.uniform >= 0 else None,
                           first, t.offsets[last] + t.lengths[last], take)
        batch_from = self.rs.base + first
        # the commit: stores only
        self.batch_from = batch_from
        self.batch_next = i + n
        self.batch = batch
        self.next = i + n
        return batch

    def _lane_batch(self, msg: SlotMessage) -> FrameBatch:
        """The slot message in place: a batch of one, its buffer the slot (no header before it).

        (Its copy instead, when a receive that an exception stopped made
        one: the slot went back then, see `copy_lane`.)
        """
        take = self._taker({0: msg.fdslot}) if msg.fdslot >= 0 else None
        copied = msg.copy
        batch = FrameBatch(msg.view if copied is None else memoryview(copied).toreadonly(),
                           memoryview(array.array("Q", [0])),
                           memoryview(array.array("Q", [msg.length])), None, 0, msg.length, take)
        # the commit: stores only
        self.batch_from = -1
        self.batch_next = self.next
        self.batch = batch
        if copied is None:
            self.lane_held += (msg.slot,)
        self.lane_msg = None
        return batch

    def empty_batch(self) -> FrameBatch:
        """The batch of a clean end of stream: no messages."""
        batch = FrameBatch(self.shown, _EMPTY.cast("I"), _EMPTY.cast("I"), None,
                           self.start, self.start, None)
        batch_from = self.rs.base + self.start
        # the commit: stores only
        self.batch_from = batch_from
        self.batch_next = self.next
        self.batch = batch
        return batch

    def _taker(self, slots: Dict[int, int]) -> Callable[[int], List[int]]:
        """FrameBatch.fds for a batch whose message j's descriptors are held in slots[j]."""
        rx, rs, fds_of = self.rx, self.rs, self.impl.chan_fds

        def take(j: int) -> List[int]:
            # Only while the batch is the one handed out: once the next
            # receive began (or a close), its slots may hold the descriptors
            # of later messages.  (A take that read the batch's taker before
            # that receive, and runs after it, ends here.)
            batch = self.batch
            if batch is None or taker_of(batch) is not handed[0]:
                return []
            slot = slots.get(j, -1)
            if slot < 0 or not rs.nfds[slot]:
                return []
            fds = fds_of(rx, slot)
            rs.nfds[slot] = 0  # given over: a store, then return
            return fds

        handed: List[Callable[[int], List[int]]] = [take]  # what the batch calls
        guard = self.take_guard
        if guard is not None:
            # (Made here, before the receive's commit: a call after it could
            # raise a signal handler's exception with the batch taken.  A
            # Python function, not functools.partial: CPython runs a pending
            # handler on the return from a C callable, which would drop the
            # descriptors just handed over; Python calls return without that
            # check.)
            def guarded(j: int) -> List[int]:
                return guard(take, j)

            handed[0] = guarded
        return handed[0]

    # ---- closing ----------------------------------------------------------------

    def release(self) -> None:
        """Close every descriptor held that was not handed over (one backend call)."""
        batch = self.batch
        if batch is not None:
            end_batch(batch)
            self.batch = None
        self._close_lane()
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


def _object_next() -> MessageKindError:
    """The error of a receive of bytes when the next message is an object."""
    return MessageKindError("the next message is an object (sent with send_object): "
                            "receive it with recv_object()")


__all__ = ["FrameReader", "FrameWriter", "TABLE_CAPACITY"]
