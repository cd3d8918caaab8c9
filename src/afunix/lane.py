"""The sending end of the channel's shared-memory lane, as frames: no socket, no waiting.

`LaneSender` owns the region this end writes (`afunix.shm.RegionWriter`)
and turns it into the version-2 frames of docs/PROTOCOL.md
("Shared-memory lane"): the REGION frame that announces it, written once
before any other frame, a SLOT frame per message copied into a free slot,
and takes back the slots the peer returns.  The receiving half is in
`afunix.codec.FrameReader`; the channel's I/O loops wait for room.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, List, Optional, Tuple

from . import _checks
from .frames import region_frame, return_frames, slot_frame, unpack_pairs
from .framewriter import Segment, lane_segment
from .shm import MAX_REGION_SIZE, Loan, RegionWriter
from .slots import Slot

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

    __slots__ = ("region", "threshold", "announced", "lock", "room", "on_room")

    def __init__(self, size: int, threshold: int = DEFAULT_THRESHOLD) -> None:
        """Raises:
            TypeError, ValueError: size not from 1 to MAX_REGION_SIZE, threshold below 1.
            OSError: as `afunix.shm.Region.create` (ENOSYS where memfd or sealing is missing).
        """
        size = _checks.in_range(size, "shm_size", 1, MAX_REGION_SIZE)
        self.threshold = _checks.in_range(threshold, "shm_threshold", 1, 1 << 62)
        #: the region, its free space and its slots in flight
        self.region = RegionWriter(size)
        self.announced = False
        self.lock = threading.Lock()
        #: set when slots come back (a sender waiting in another thread wakes)
        self.room = threading.Event()
        #: called after `room` is set (afunix.aio.Channel wakes a task waiting for room)
        self.on_room: Optional[Callable[[], None]] = None

    def wants(self, nbytes: int) -> bool:
        """True when a message of `nbytes` goes through the lane (it fits the region at all)."""
        return self.threshold <= nbytes <= self.region.size

    def announcement(self) -> Optional[Segment]:
        """The REGION frame with the region's descriptor until `announced` is set; then None.

        The caller sets `announced` once the frame's first write went.
        """
        if self.announced:
            return None
        return lane_segment(region_frame(self.region.size), (self.region.fileno(),))

    def try_segment(self, data: Any, fds: Tuple[int, ...] = ()) -> Optional[Segment]:
        """`data` copied into a free slot, as the SLOT frame to write; None when no slot is free now.

        Raises:
            ValueError: `data` is empty or larger than the region.
        """
        with self.lock:
            self.room.clear()
            slot = self.region.try_copy(data)
            if slot is not None:
                self.region.sending(slot.offset, slot.length)  # its frame goes next
        if slot is None:
            return None
        return lane_segment(slot_frame(slot.offset, slot.length, len(fds)), fds)

    def try_loan(self, nbytes: int) -> Optional[Loan]:
        """A `Loan` of a free slot of `nbytes` bytes to fill in place; None when none is free now.

        Abandoned, its slot comes back as a returned one does; the peer
        may return it only once `loan_segment` made its frame.

        Raises:
            ValueError: `nbytes` below 1 or over the region's size, or the region is closed.
        """
        region = self.region
        with self.lock:
            self.room.clear()
            if region.region.closed:
                raise ValueError("I/O operation on closed region")
            slot = region.allocator.try_allocate(nbytes)
        if slot is None:
            return None
        return Loan(slot, region.region.view(slot.offset, slot.length), self, region.region)

    def loan_segment(self, loan: Loan, fds: Tuple[int, ...] = ()) -> Segment:
        """The SLOT frame naming the filled slot of `loan` (committed: its view is released).

        Raises:
            ValueError: the loan is not open.
            BufferError: a buffer exported from its view is alive (the loan stays open).
        """
        slot = loan.commit()
        return lane_segment(slot_frame(slot.offset, slot.length, len(fds)), fds)

    def give_back(self, offset: int, length: int) -> None:
        """A slot the peer returned (FrameReader's on_return); ProtocolError for one not in flight.

        Once the lane is closed every slot is forgotten, and a return that
        comes after (read by a receive in another thread as the channel
        closes) is dropped: it is no fault of the peer's.
        """
        with self.lock:
            if self.region.region.closed:
                return
            self.region.give_back(offset, length)
        self.room.set()
        on_room = self.on_room
        if on_room is not None:
            on_room()

    # A loan's moves (shm.Lender), and the channel's for slots it placed:
    # under the lock, as the receiving thread frees slots under it.

    def sending(self, offset: int, length: int) -> None:
        """The frame naming the lent slot is made: the peer may return it from now on."""
        with self.lock:
            if not self.region.region.closed:
                self.region.sending(offset, length)

    def recall(self, offset: int, length: int) -> None:
        """The frame naming the slot was not written after all: lent again.

        Raises:
            ProtocolError: the peer returned it before it was sent.
        """
        with self.lock:
            if not self.region.region.closed:
                self.region.recall(offset, length)

    def withdraw(self, offset: int, length: int) -> None:
        """A lent slot given up unsent: free again (a sender waiting for room wakes)."""
        with self.lock:
            if self.region.region.closed:
                return
            self.region.withdraw(offset, length)
        self.room.set()
        on_room = self.on_room
        if on_room is not None:
            on_room()

    def abandon(self, seg: Segment) -> None:
        """The SLOT frame `seg` was not written at all: its slot is free again.

        Raises:
            ProtocolError: the peer returned it before it was sent (it is free already).
        """
        (offset, length), = unpack_pairs(seg.joined)
        self.recall(offset, length)
        self.withdraw(offset, length)

    @property
    def in_flight(self) -> int:
        """Slots sent and not yet returned."""
        return self.region.allocator.slots_in_use

    def close(self) -> None:
        """Close the region (idempotent): the peer's mapping stays valid until it unmaps it."""
        self.region.close()


def return_segments(slots: Iterable[Slot]) -> List[Segment]:
    """The RETURN frames that give `slots` back, as segments to write."""
    return [lane_segment(frame) for frame in return_frames(slots)]


__all__ = ["LaneSender", "DEFAULT_THRESHOLD", "return_segments"]
