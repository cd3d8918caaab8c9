"""Slots of a shared-memory region: the sender's allocator and the receiver's ledger.

Pure bookkeeping, no memory and no system calls: a slot is an
``(offset, length)`` range of a region (afunix.shm).  The sender takes slots
from a `SlotAllocator` and gets them back when the receiver returns them; the
receiver records in a `SlotLedger` the slots it was told about and still
reads.  Both refuse what a broken or hostile peer may send -- a range outside
the region, a slot overlapping one in use, a slot returned twice -- with
`afunix.ProtocolError`, before anything touches the memory.  The wire frames
that carry slots are drafted in docs/PROTOCOL.md ("Shared-memory lane").
"""
from __future__ import annotations

import bisect
from typing import Dict, List, NamedTuple, Optional, Set

from . import _checks
from .frames import ProtocolError

#: Default alignment of a slot's offset: a cache line, and enough for any
#: numpy dtype built over it.
DEFAULT_ALIGNMENT = 64

#: Default bound on the slots a receiver holds at once: a peer naming
#: millions of tiny slots would otherwise grow the ledger without limit.
DEFAULT_MAX_SLOTS = 4096


class Slot(NamedTuple):
    """A range of a region: ``region[offset:offset + length]``."""

    offset: int
    length: int


def _wire_range(offset: object, length: object, size: int) -> Slot:
    """A slot named by the peer, checked against a region of `size` bytes."""
    if type(offset) is not int or type(length) is not int:
        raise TypeError("a slot is two ints, got %s and %s"
                        % (type(offset).__name__, type(length).__name__))
    if length <= 0:
        raise ProtocolError("empty slot (offset %d, length %d)" % (offset, length))
    if offset < 0 or offset > size - length:
        raise ProtocolError("slot out of range: offset %d, length %d in a region of %d bytes"
                            % (offset, length, size))
    return Slot(offset, length)


class SlotAllocator:
    """The sender's free space of a region of `size` bytes: variable-size slots, first fit.

    `try_allocate` never waits: it returns None when no free range is large
    enough now (waiting for the receiver to return slots is the caller's
    job).  Slots are aligned to `alignment` bytes; a slot's reserved space is
    its length rounded up to the alignment.  Free ranges are coalesced as
    slots come back, so a receiver returning slots in any order leaves no
    holes behind.  Not thread-safe: one sender owns it.

    A slot handed out is this end's (lent: being filled, or waiting for
    its frame) until `sending` says the frame naming it goes to the peer;
    only then may the peer return it (`free`).  A slot whose frame was
    not written after all goes back with `recall`; one never sent is
    given up with `withdraw`.
    """

    __slots__ = ("size", "alignment", "_starts", "_free", "_used", "_used_bytes", "_lent")

    def __init__(self, size: int, *, alignment: int = DEFAULT_ALIGNMENT) -> None:
        """Args:
            size: bytes of the region, at least 1.
            alignment: a power of two from 1 to 1 MiB; every slot's offset is a multiple of it.

        Raises:
            TypeError, ValueError: for a bad size or alignment.
        """
        self.size = _checks.in_range(size, "size", 1, (1 << 63) - 1)
        self.alignment = _checks.in_range(alignment, "alignment", 1, 1 << 20)
        if self.alignment & (self.alignment - 1):
            raise ValueError("alignment must be a power of two, got %d" % self.alignment)
        # free ranges: sorted starts and start -> length; one range for all at first
        self._starts: List[int] = [0]
        self._free: Dict[int, int] = {0: self.size}
        # slots handed out: offset -> (length, reserved)
        self._used: Dict[int, "tuple[int, int]"] = {}
        self._used_bytes = 0
        # offsets of the slots handed out and not sent: the peer has never
        # heard of them, and a return naming one is a lie
        self._lent: Set[int] = set()

    def try_allocate(self, length: int) -> Optional[Slot]:
        """A free slot of `length` bytes, or None when none is free now.

        Raises:
            ValueError: `length` is below 1 or larger than the region: it never fits.
        """
        length = _checks.in_range(length, "length", 1, self.size)
        mask = self.alignment - 1
        reserved = (length + mask) & ~mask
        for start in self._starts:  # address order: first fit
            room = self._free[start]
            if room >= length:
                break
        else:
            return None
        # The last range of the region may be shorter than the rounded length:
        # the slot then takes what is left.
        reserved = min(reserved, room)
        del self._free[start]
        if reserved < room:
            self._free[start + reserved] = room - reserved
            self._starts[bisect.bisect_left(self._starts, start)] = start + reserved
        else:
            self._starts.remove(start)
        self._used[start] = (length, reserved)
        self._used_bytes += reserved
        self._lent.add(start)
        return Slot(start, length)

    def _lent_slot(self, offset: int, length: int) -> bool:
        used = self._used.get(offset)
        return used is not None and used[0] == length and offset in self._lent

    def sending(self, offset: int, length: int) -> None:
        """The frame naming the lent slot ``(offset, length)`` goes to the peer: it may return it from now on.

        Raises:
            ValueError: it is not a slot lent (a mistake of the caller).
        """
        if not self._lent_slot(offset, length):
            raise ValueError("slot (offset %r, length %r) is not lent" % (offset, length))
        self._lent.discard(offset)

    def recall(self, offset: int, length: int) -> None:
        """The frame naming the slot ``(offset, length)`` was not written after all: it is lent again.

        Raises:
            ProtocolError: it is no slot in use any more: the peer returned
                it before it could know it (only a peer guessing does).
            ValueError: it is lent, not sent (a mistake of the caller).
        """
        used = self._used.get(offset)
        if used is None or used[0] != length:
            raise ProtocolError("slot (offset %r, length %r) returned before its frame was sent"
                                % (offset, length))
        if offset in self._lent:
            raise ValueError("slot (offset %r, length %r) was not sent" % (offset, length))
        self._lent.add(offset)

    def withdraw(self, offset: int, length: int) -> None:
        """Give up the lent slot ``(offset, length)``, never sent: it is free again.

        Raises:
            ValueError: it is not a slot lent (a mistake of the caller).
        """
        if not self._lent_slot(offset, length):
            raise ValueError("slot (offset %r, length %r) is not lent" % (offset, length))
        self._lent.discard(offset)
        self._release(Slot(offset, length))

    def free(self, offset: int, length: int) -> None:
        """Take back the slot ``(offset, length)`` the receiver returned.

        Raises:
            ProtocolError: the range is outside the region, or is not exactly a
                slot sent and not yet returned (overlapping, shifted,
                returned twice, or lent and never sent).  Nothing changes then.
            TypeError: offset or length is not an int.
        """
        slot = _wire_range(offset, length, self.size)
        used = self._used.get(slot.offset)
        if used is None or used[0] != slot.length:
            raise ProtocolError("returned slot (offset %d, length %d) is not a slot in use"
                                % (slot.offset, slot.length))
        if slot.offset in self._lent:
            raise ProtocolError("returned slot (offset %d, length %d) was never sent"
                                % (slot.offset, slot.length))
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """The slot in use `slot` is free again: joined to the free ranges beside it."""
        reserved = self._used.pop(slot.offset)[1]
        self._used_bytes -= reserved
        start, end = slot.offset, slot.offset + reserved
        i = bisect.bisect_left(self._starts, start)
        # join the free range that ends where this slot starts ...
        if i > 0:
            before = self._starts[i - 1]
            if before + self._free[before] == start:
                start = before
                del self._free[before]
                del self._starts[i - 1]
                i -= 1
        # ... and the one that starts where it ends
        if i < len(self._starts) and self._starts[i] == end:
            end += self._free.pop(end)
            del self._starts[i]
        self._starts.insert(i, start)
        self._free[start] = end - start

    def reset(self) -> None:
        """Forget every slot in use: the whole region is free again (after the peer is gone)."""
        self._starts = [0]
        self._free = {0: self.size}
        self._used.clear()
        self._used_bytes = 0
        self._lent.clear()

    @property
    def slots_in_use(self) -> int:
        """How many slots are handed out and not yet returned (lent ones too)."""
        return len(self._used)

    @property
    def slots_lent(self) -> int:
        """How many slots are handed out and not sent."""
        return len(self._lent)

    @property
    def bytes_in_use(self) -> int:
        """Bytes reserved by slots in use (lengths rounded up to the alignment)."""
        return self._used_bytes

    @property
    def largest_free(self) -> int:
        """The longest slot `try_allocate` would give now."""
        return max(self._free.values(), default=0)

    def __repr__(self) -> str:
        return "<SlotAllocator size=%d in_use=%d slots=%d>" % (
            self.size, self._used_bytes, len(self._used))


class SlotLedger:
    """The receiver's record of the slots of a region of `size` bytes it still reads.

    `claim` records a slot the peer named and refuses one that is out of
    range or overlaps a slot still held: the sender must not write into
    memory the receiver reads.  `release` forgets it again, when its bytes
    are no longer read and the slot goes back to the sender.
    """

    __slots__ = ("size", "max_slots", "_starts", "_lengths")

    def __init__(self, size: int, *, max_slots: int = DEFAULT_MAX_SLOTS) -> None:
        """Args:
            size: bytes of the region, at least 1.
            max_slots: the most slots held at once; a peer naming more is a ProtocolError.
        """
        self.size = _checks.in_range(size, "size", 1, (1 << 63) - 1)
        self.max_slots = _checks.in_range(max_slots, "max_slots", 1, 1 << 24)
        self._starts: List[int] = []
        self._lengths: Dict[int, int] = {}

    def claim(self, offset: int, length: int) -> Slot:
        """Record the slot ``(offset, length)`` the peer named; return it.

        Raises:
            ProtocolError: empty, out of range, overlapping a slot held, or
                one slot more than `max_slots`.  Nothing is recorded then.
            TypeError: offset or length is not an int.
        """
        slot = _wire_range(offset, length, self.size)
        starts = self._starts
        i = bisect.bisect_right(starts, slot.offset)
        if i > 0 and starts[i - 1] + self._lengths[starts[i - 1]] > slot.offset:
            raise ProtocolError("slot (offset %d, length %d) overlaps a slot in use"
                                % (slot.offset, slot.length))
        if i < len(starts) and slot.offset + slot.length > starts[i]:
            raise ProtocolError("slot (offset %d, length %d) overlaps a slot in use"
                                % (slot.offset, slot.length))
        if len(starts) >= self.max_slots:
            raise ProtocolError("more than %d slots in use at once" % self.max_slots)
        starts.insert(i, slot.offset)
        self._lengths[slot.offset] = slot.length
        return slot

    def release(self, offset: int, length: int) -> Slot:
        """Forget the held slot ``(offset, length)``; return it (to send back).

        Raises:
            ValueError: it is not a slot held (a mistake of the caller, not the peer).
        """
        if self._lengths.get(offset) != length:
            raise ValueError("slot (offset %r, length %r) is not held" % (offset, length))
        del self._lengths[offset]
        self._starts.remove(offset)
        return Slot(offset, length)

    def held(self) -> List[Slot]:
        """The slots held, in address order."""
        return [Slot(o, self._lengths[o]) for o in self._starts]

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return "<SlotLedger size=%d held=%d>" % (self.size, len(self._starts))
