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
from typing import Any, Dict, List, NamedTuple, Optional

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

    __slots__ = ("size", "alignment", "_starts", "_free", "_used", "_used_bytes", "_lent",
                 "last_mark")

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
        # heard of them, and a return naming one is a lie.  (A dict, not a
        # set: an item stored or deleted is a store, where set.add is a
        # call, after which a signal handler may run: see try_allocate.)
        self._lent: Dict[int, None] = {}
        #: the mark of the last `free` (see there)
        self.last_mark: Any = None

    def try_allocate(self, length: int, keep: Optional[List[Slot]] = None) -> Optional[Slot]:
        """A free slot of `length` bytes, or None when none is free now.

        `keep`: a list the slot is also appended to, in the same commit: a
        caller interrupted before it stores the result (a signal handler's
        exception) finds the slot there, so it is never lost.

        Raises:
            ValueError: `length` is below 1 or larger than the region: it never fits.
        """
        length = _checks.in_range(length, "length", 1, self.size)
        mask = self.alignment - 1
        reserved = (length + mask) & ~mask
        starts = self._starts
        for i, start in enumerate(starts):  # address order: first fit
            room = self._free[start]
            if room >= length:
                break
        else:
            return None
        # The last range of the region may be shorter than the rounded length:
        # the slot then takes what is left.
        reserved = min(reserved, room)
        slot = Slot(start, length)
        # the commit: stores only (CPython runs signal handlers at calls,
        # function entries and backward jumps, so an exception from one
        # comes before it or after it, never inside)
        del self._free[start]
        if reserved < room:
            self._free[start + reserved] = room - reserved
            starts[i] = start + reserved
        else:
            del starts[i]
        self._used[start] = (length, reserved)
        self._used_bytes += reserved
        self._lent[start] = None
        if keep is not None:
            keep += (slot,)
        return slot

    def _lent_slot(self, offset: int, length: int) -> bool:
        used = self._used.get(offset)
        return used is not None and used[0] == length and offset in self._lent

    def is_lent(self, offset: int, length: int) -> bool:
        """True when ``(offset, length)`` is a slot handed out and not sent (see `sending`)."""
        return self._lent_slot(offset, length)

    def sending(self, offset: int, length: int) -> None:
        """The frame naming the lent slot ``(offset, length)`` goes to the peer: it may return it from now on.

        Raises:
            ValueError: it is not a slot lent (a mistake of the caller).
        """
        if not self._lent_slot(offset, length):
            raise ValueError("slot (offset %r, length %r) is not lent" % (offset, length))
        del self._lent[offset]  # the commit: one store

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
        self._lent[offset] = None  # the commit: one store

    def withdraw(self, offset: int, length: int, keep: Optional[List[Slot]] = None) -> None:
        """Give up the lent slot ``(offset, length)``, never sent: it is free again.

        `keep`: as for `free`.

        Raises:
            ValueError: it is not a slot lent (a mistake of the caller).
        """
        if not self._lent_slot(offset, length):
            raise ValueError("slot (offset %r, length %r) is not lent" % (offset, length))
        self._release(Slot(offset, length), None, keep)

    def free(self, offset: int, length: int, mark: Any = None,
             keep: Optional[List[Slot]] = None) -> None:
        """Take back the slot ``(offset, length)`` the receiver returned.

        `mark`: when not None, stored as `last_mark` in the same commit, so that a caller
        interrupted right after can tell that this free was done (a RETURN
        frame applied again after an interruption skips what it freed).
        `keep`: a list holding the slot (see `try_allocate`); it is removed
        from there in the same commit.

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
        self._release(slot, mark, keep)

    def _release(self, slot: Slot, mark: Any, keep: Optional[List[Slot]]) -> None:
        """The slot in use `slot` is free again: joined to the free ranges beside it (see `free`)."""
        reserved = self._used[slot.offset][1]
        lent = slot.offset in self._lent
        start, end = slot.offset, slot.offset + reserved
        starts, free = self._starts, self._free
        i = bisect.bisect_left(starts, start)
        k = -1 if keep is None else keep.index(slot) if slot in keep else -1
        # what joins: the free range that ends where this slot starts, and
        # the one that starts where it ends (read first: the commit below
        # is stores only, see try_allocate)
        before = starts[i - 1] if i > 0 else -1
        join_before = before >= 0 and before + free[before] == start
        join_after = i < len(starts) and starts[i] == end
        after = free[end] if join_after else 0
        # the commit: stores only
        del self._used[slot.offset]
        if lent:
            del self._lent[slot.offset]
        self._used_bytes -= reserved
        if join_before:
            del free[before]
            start = before
            i -= 1
            del starts[i]
        if join_after:
            del free[end]
            del starts[i]
            end += after
        starts[i:i] = (start,)
        free[start] = end - start
        if mark is not None:
            self.last_mark = mark
        if k >= 0 and keep is not None:
            del keep[k]

    def holds(self, offset: int, length: int) -> bool:
        """True when ``(offset, length)`` is a slot handed out and not yet returned."""
        used = self._used.get(offset)
        return used is not None and used[0] == length

    def reset(self) -> None:
        """Forget every slot in use: the whole region is free again (after the peer is gone)."""
        self._starts = [0]
        self._free = {0: self.size}
        self._used.clear()
        self._used_bytes = 0
        self._lent.clear()
        self.last_mark = None  # (marks name returns of the peer that is gone)

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

    __slots__ = ("size", "max_slots", "_starts", "_lengths", "_keys")

    def __init__(self, size: int, *, max_slots: int = DEFAULT_MAX_SLOTS) -> None:
        """Args:
            size: bytes of the region, at least 1.
            max_slots: the most slots held at once; a peer naming more is a ProtocolError.
        """
        self.size = _checks.in_range(size, "size", 1, (1 << 63) - 1)
        self.max_slots = _checks.in_range(max_slots, "max_slots", 1, 1 << 24)
        self._starts: List[int] = []
        self._lengths: Dict[int, int] = {}
        # offset -> the key of the claim that holds it (see claim)
        self._keys: Dict[int, Any] = {}

    def claim(self, offset: int, length: int, key: Any = None) -> Slot:
        """Record the slot ``(offset, length)`` the peer named; return it.

        `key` names what claims it (the receiver: where the frame naming it
        is in the stream, and which part): the same slot claimed again with
        the same key, not None, is the same claim made again (the frame
        parsed again after a signal handler's exception interrupted the
        parse) and returns the slot as the first did.

        Raises:
            ProtocolError: empty, out of range, overlapping a slot held, or
                one slot more than `max_slots`.  Nothing is recorded then.
            TypeError: offset or length is not an int.
        """
        slot = _wire_range(offset, length, self.size)
        if (key is not None and self._keys.get(slot.offset) == key
                and self._lengths.get(slot.offset) == slot.length):
            return slot
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
        # the commit: stores only (see SlotAllocator.try_allocate)
        starts[i:i] = (slot.offset,)
        self._lengths[slot.offset] = slot.length
        self._keys[slot.offset] = key
        return slot

    def holds(self, offset: int, length: int) -> bool:
        """True when ``(offset, length)`` is a slot held."""
        return self._lengths.get(offset) == length

    def release(self, offset: int, length: int) -> Slot:
        """Forget the held slot ``(offset, length)``; return it (to send back).

        Raises:
            ValueError: it is not a slot held (a mistake of the caller, not the peer).
        """
        if self._lengths.get(offset) != length:
            raise ValueError("slot (offset %r, length %r) is not held" % (offset, length))
        slot = Slot(offset, length)
        i = bisect.bisect_left(self._starts, offset)
        # the commit: stores only
        del self._lengths[offset]
        del self._keys[offset]
        del self._starts[i]
        return slot

    def held(self) -> List[Slot]:
        """The slots held, in address order."""
        return [Slot(o, self._lengths[o]) for o in self._starts]

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return "<SlotLedger size=%d held=%d>" % (self.size, len(self._starts))
