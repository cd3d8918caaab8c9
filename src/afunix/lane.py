"""The sending end of the channel's shared-memory lane, as frames: no socket, no waiting.

`LaneSender` owns the region this end writes (`afunix.shm.RegionWriter`)
and turns it into the version-2 frames of docs/PROTOCOL.md
("Shared-memory lane"): the REGION frame that announces it, written once
before any other frame, a SLOT frame per message copied into a free slot,
and takes back the slots the peer returns.  The receiving half is in
`afunix.codec.FrameReader`; the channel's I/O loops wait for room.
"""
from __future__ import annotations

import errno
import threading
from typing import Any, Callable, Iterable, List, Optional, Tuple

from . import _checks
from .frames import ProtocolError, region_frame, return_frames, slot_frame
from .framewriter import Segment, lane_segment
from .shm import ENDED, MAX_REGION_SIZE, Loan, RegionWriter
from .slots import Slot
from ._wakeups import Flag

#: Messages of at least this many bytes go through the lane by default: below
#: it a copy through the socket costs less than a slot and its return.
DEFAULT_THRESHOLD = 64 << 10


class LaneSender:
    """A region of `size` bytes and the frames that move messages through it.

    Messages of `threshold` bytes or more belong in the lane
    (`wants`); `try_segment` copies one into a free slot and gives the
    SLOT frame to write, or None while no slot is free (the caller waits
    for the peer's RETURN frames and passes each slot to `give_back`;
    a slot is the peer's to return only once its frame is made).
    `announcement` gives the REGION frame, once: it must be the first frame
    this end writes, so that a peer that does not speak version 2 refuses
    the channel at once.  The channel's send side owns it; `give_back`
    may come from the receiving thread (it reads the RETURN frames), so
    the free space is kept under a lock, and `room` is set whenever slots
    come back.
    """

    __slots__ = ("region", "threshold", "lock", "room", "on_room", "on_fault", "staged",
                 "staged_loan", "log", "region_log")

    def __init__(self, size: int, threshold: int = DEFAULT_THRESHOLD) -> None:
        """Raises:
            TypeError, ValueError: size not from 1 to MAX_REGION_SIZE, threshold below 1.
            OSError: as `afunix.shm.Region.create` (ENOSYS where memfd or sealing is missing).
        """
        size = _checks.in_range(size, "size", 1, MAX_REGION_SIZE)
        self.threshold = _checks.in_range(threshold, "shm_threshold", 1, 1 << 62)
        #: the region, its free space and its slots in flight
        self.region = RegionWriter(size)
        self.lock = threading.Lock()
        #: set when slots come back (a sender waiting in another thread wakes)
        self.room = Flag()
        #: called after `room` is set (afunix.aio.Channel wakes a task waiting for room)
        self.on_room: Optional[Callable[[], None]] = None
        #: called when `settle` finds the peer broke the protocol, before it
        #: raises ProtocolError (the channel closes: as for a fault its
        #: reader finds)
        self.on_fault: Optional[Callable[[], None]] = None
        # The frame being made (see `begin`): the slots taken for it, or the
        # loan it sends, and the byte counts its writes took (Segment.log,
        # appended inside the C call that writes).  A signal handler's
        # exception can stop a sending call anywhere; what it was making is
        # settled by the next call from the log: the frame went (a byte of
        # it, the rest is pending), so its slots are in flight; or it did
        # not, so they are free again (a loan open again).
        self.staged: List[Slot] = []
        self.staged_loan: Optional[Loan] = None
        self.log: List[int] = []
        # the writes of the REGION frame: announced once a byte of it went
        self.region_log: List[int] = []

    @property
    def announced(self) -> bool:
        """True once the REGION frame went (a byte of it: the rest is pending, and goes first)."""
        return bool(self.region_log)

    def wants(self, nbytes: int) -> bool:
        """True when a message of `nbytes` goes through the lane (it fits the region at all)."""
        return self.threshold <= nbytes <= self.region.size

    def announcement(self) -> Optional[Segment]:
        """The REGION frame with the region's descriptor until it went (`announced`); then None.

        Its writes are logged in `region_log`: whether it went is known
        even when a signal handler's exception loses the count the write
        returned, so it is never written twice.
        """
        if self.region_log:
            return None
        return lane_segment(region_frame(self.region.size), (self.region.fileno(),),
                            self.region_log)

    def settle(self, wake: bool = True) -> None:
        """Settle the frame a sending call was making (`begin`), from its log.

        A byte of it went: its slots are in flight.  None went: its slots
        are free again and its loan is open again (a slot marked `sending`
        is recalled first: the peer never heard of it).  Each step commits
        with stores (a slot freed is removed from `staged` in the same
        commit), so a settle that an exception stops is finished by the
        next.

        `wake` False: the slots freed are the caller's own try's, which
        refused nobody (it holds the sending side): no sender waiting for
        room is woken, and `room` stays as the try left it.  A try that
        woke itself would try again at once, for ever (an async sender
        never yielded to the loop).

        Raises:
            ProtocolError: the peer returned a slot of the frame, or the
                slot of the loan, though none of the frame went: it named
                a slot it was never sent (docs/PROTOCOL.md).  The loan
                stays committed then: its slot is not this end's any more.
                `on_fault` is called first (the channel closes).
        """
        staged = self.staged
        if self.log:
            # the commit: stores only
            self.staged = []
            self.staged_loan = None
            return
        loan = self.staged_loan
        if loan is not None:
            if not loan.open and not self.region.region.closed:
                try:
                    loan.reopen()
                except ValueError:
                    pass  # abandoned in another thread meanwhile (or closed): nothing to open
                except ProtocolError:
                    self.staged_loan = None  # the slot is not this end's: the loan stays committed
                    self._fault()
                    raise
            self.staged_loan = None
        region = self.region
        allocator = region.allocator
        freed = bool(staged)
        lie: Optional[Slot] = None
        while staged:
            slot = staged[-1]
            with self.lock:
                if region.region.closed:
                    del staged[-1]  # forgotten with the region
                    continue
                if not allocator.holds(slot.offset, slot.length):
                    # Marked sending, then freed by a RETURN frame read in
                    # another thread while this frame waited to be written,
                    # and none of it went: the peer returned a slot it was
                    # never sent.  Free all the same (as a frame not sent
                    # leaves it), and refused below.
                    lie = slot
                    del staged[-1]
                    continue
                if not allocator.is_lent(slot.offset, slot.length):
                    allocator.recall(slot.offset, slot.length)  # its frame never went
                allocator.withdraw(slot.offset, slot.length, keep=staged)
        if freed and wake:
            self._woken()
        if lie is not None:
            self._fault()
            raise ProtocolError("returned slot (offset %d, length %d) was never sent: its frame "
                                "was not written" % (lie.offset, lie.length))

    def _fault(self) -> None:
        """The peer broke the protocol (see `settle`): `on_fault`, if set."""
        on_fault = self.on_fault
        if on_fault is not None:
            on_fault()

    def begin(self) -> List[int]:
        """Settle what an interrupted call left (`settle`) and start a frame: the log for its segment."""
        if self.staged or self.staged_loan is not None:
            self.settle()
        log: List[int] = []
        self.log = log
        return log

    def try_segment(self, data: Any, fds: Tuple[int, ...] = ()) -> Optional[Segment]:
        """`data` copied into a free slot, as the SLOT frame to write; None when no slot is free now.

        The slot is staged (`begin`): after a failed write call `settle`.

        Raises:
            ValueError: `data` is empty or larger than the region.
        """
        log = self.begin()
        with self.lock:
            self.room.clear()
            slot = self.region.try_copy(data, self.staged)
            if slot is not None:
                self.region.sending(slot.offset, slot.length)  # its frame goes next
        if slot is None:
            return None
        return lane_segment(slot_frame(slot.offset, slot.length, len(fds)), fds, log)

    def try_loan(self, nbytes: int) -> Optional[Loan]:
        """A `Loan` of a free slot of `nbytes` bytes to fill in place; None when none is free now.

        Abandoned, its slot comes back as a returned one does; the peer
        may return it only once `loan_segment` made its frame.  The slot
        is staged until `lent` says the loan reached the caller.

        Raises:
            ValueError: `nbytes` below 1 or over the region's size.
            OSError: the region is closed (EBADF), also by a close() in
                another thread during this call.
        """
        region = self.region
        self.begin()
        with self.lock:
            self.room.clear()
            mapped = region.region  # (close() replaces no region: it closes this one)
            if mapped.closed:
                raise _closed()
            slot = region.allocator.try_allocate(nbytes, self.staged)
        if slot is None:
            return None
        # close() in another thread does not take the lock (one from a
        # signal handler inside it would hang): the region may close
        # between the look above and this view, which then fails on the
        # released mapping.  The slot stays staged: the next call's settle
        # forgets it with the region.
        try:
            view = mapped.view(slot.offset, slot.length)
        except ValueError:
            if not mapped.closed:
                raise
            raise _closed() from None
        return Loan(slot, view, self, mapped)

    def lent(self) -> None:
        """The loan `try_loan` gave is the caller's now (a store: see `settle`)."""
        self.staged = []

    def loan_segment(self, loan: Loan, fds: Tuple[int, ...] = ()) -> Segment:
        """The SLOT frame naming the filled slot of `loan` (committed: its view is released).

        The loan is staged: after a failed write call `settle` (it opens
        the loan again when nothing went).

        Raises:
            ValueError: the loan is not open.
            BufferError: a buffer exported from its view is alive (the loan stays open).
        """
        log = self.begin()
        self.staged_loan = loan  # before the commit: an exception after it finds it here
        try:
            slot = loan.commit()
        except ValueError:
            # ended already, or abandoned in another thread during the
            # commit: nothing of this call to settle (nor to open again)
            self.staged_loan = None
            raise
        return lane_segment(slot_frame(slot.offset, slot.length, len(fds)), fds, log)

    def give_back(self, offset: int, length: int, mark: Any = None) -> None:
        """A slot the peer returned (FrameReader's on_return); ProtocolError for one not in flight.

        `mark` names the return (where its RETURN frame is, which slot of
        it; increasing): one at or below the last applied is that return
        applied again, after a signal handler's exception stopped the
        first pass over its frame, and is skipped.  Once the lane is closed
        every slot is forgotten, and a return that comes after (read by a
        receive in another thread as the channel closes) is dropped: it is
        no fault of the peer's.
        """
        allocator = self.region.allocator
        with self.lock:
            if self.region.region.closed:
                return
            last = allocator.last_mark
            if mark is None or last is None or mark > last:
                allocator.free(offset, length, mark)
        self._woken()

    # A loan's moves (shm.Lender): under the lock, as the receiving thread
    # frees slots under it.  Ending a loan is one claim under the lock:
    # `held` (the loan's list of its slot) is emptied by the withdraw that
    # frees the slot, and a withdraw, sending or recall that finds it empty
    # (or the slot no longer lent, for the first two) changes nothing: two
    # threads ending the same loan at once (two abandons, an abandon and a
    # send_loan) end it once, and the second learns it lost.  Each takes the allocator before it looks
    # whether the region is closed, and changes that one: close() in
    # another thread (which does not take the lock) replaces it only after
    # the region is marked closed (RegionWriter.close), so a move that
    # found the region open finishes on an allocator nothing else changes,
    # and one that took the new allocator finds the region closed.

    def sending(self, offset: int, length: int, held: Optional[List[Slot]] = None) -> None:
        """The frame naming the lent slot is made: the peer may return it from now on.

        Raises:
            ValueError: `held` (a loan's, see above) is empty or its slot is
                not lent: the loan was abandoned or committed already.
        """
        allocator = self.region.allocator
        with self.lock:
            if self.region.region.closed:
                return
            if held is not None and not (held and allocator.is_lent(offset, length)):
                raise ValueError(ENDED)
            allocator.sending(offset, length)

    def recall(self, offset: int, length: int, held: Optional[List[Slot]] = None) -> None:
        """The frame naming the slot was not written after all: lent again.

        A slot lent already is left so: a commit or a reopen that an
        exception (a signal handler's) stopped between its steps is done
        again (see `settle`).

        Raises:
            ValueError: `held` is empty: the loan was abandoned (see above).
            ProtocolError: the peer returned it before it was sent.
        """
        allocator = self.region.allocator
        with self.lock:
            if self.region.region.closed:
                return
            if held is not None and not held:
                raise ValueError(ENDED)
            if not allocator.is_lent(offset, length):
                allocator.recall(offset, length)

    def withdraw(self, offset: int, length: int, keep: Optional[List[Slot]] = None) -> bool:
        """A lent slot given up unsent: free again (a sender waiting for room wakes).

        `keep`: see `SlotAllocator.withdraw`; a loan's `held` (see above).
        Returns False, changing nothing, when `keep` no longer holds the
        slot or the slot is not lent: another thread ended the loan first.
        """
        allocator = self.region.allocator
        with self.lock:
            if self.region.region.closed:
                return True  # (nothing to give back: see above)
            if keep is not None and not (Slot(offset, length) in keep
                                         and allocator.is_lent(offset, length)):
                return False
            allocator.withdraw(offset, length, keep)
        self._woken()
        return True

    def _woken(self) -> None:
        """Slots came back: a sender waiting for room wakes (`room`, `on_room`)."""
        try:
            self.room.set()
        finally:
            # (also after a signal handler's exception in the set: an async
            # sender waits for this wake-up without a time limit)
            on_room = self.on_room
            if on_room is not None:
                on_room()

    @property
    def in_flight(self) -> int:
        """Slots sent and not yet returned."""
        return self.region.allocator.slots_in_use

    def close(self) -> None:
        """Close the region (idempotent): the peer's mapping stays valid until it unmaps it."""
        self.region.close()


def _closed() -> OSError:
    """The error of a loan asked of a closed lane: as any call on a closed channel."""
    return OSError(errno.EBADF, "the channel is closed")


def return_segments(slots: Iterable[Slot]) -> List[Segment]:
    """The RETURN frames that give `slots` back, as segments to write."""
    return [lane_segment(frame) for frame in return_frames(slots)]


__all__ = ["LaneSender", "DEFAULT_THRESHOLD", "return_segments"]
