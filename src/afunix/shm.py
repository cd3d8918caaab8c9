"""Shared-memory regions for the channel's lane: sealed memfds, mapped once, reused.

A sender makes a `Region` (``memfd_create``, sized, space reserved, mapped
read-write, then sealed against shrinking, growing and any new write
access), passes its descriptor to
the peer once (SCM_RIGHTS), and then moves large messages by writing them
into slots of it (afunix.slots) and naming the slot in a small frame.  The
receiver adopts the descriptor (`Region.adopt`): it checks the seals and the
size before it maps anything, and maps read-only.  `RegionWriter` and
`RegionReader` pair a region with the bookkeeping of its slots; a `Loan` is
a writable view of one slot, filled in place and then handed over.

Why sealed: a mapping of a file that shrinks under it raises SIGBUS on the
next access to the lost pages, which kills a Python process.  With
F_SEAL_SHRINK on the file, and its size checked against the announced size,
no access to the mapping can fault; F_SEAL_SEAL keeps the seals as they are.
F_SEAL_FUTURE_WRITE (Linux 5.1) keeps the sender from punching holes in the
region once the receiver has checked that all of it is allocated: a hole
read again would allocate memory on the receiver's account.  The sender's
own mapping, made before the seal, stays writable.

Why memfd and not a named segment (multiprocessing.shared_memory): it has no
name to leak after a crash, is freed when the last descriptor and mapping go,
and is not bounded by the size of /dev/shm.

Linux only.  `afunix.Channel`'s lane (shm_size) is built on these; its
frames are in docs/PROTOCOL.md ("Shared-memory lane").
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import sys
from types import TracebackType
from typing import Any, Callable, List, Optional, Protocol, Type

from . import _backend, _checks
from ._kernel import (F_ADD_SEALS, F_GET_SEALS, F_SEAL_FUTURE_WRITE, F_SEAL_GROW, F_SEAL_SEAL,
                      F_SEAL_SHRINK, MAP_POPULATE, MFD_ALLOW_SEALING, MFD_CLOEXEC)
from .frames import ProtocolError
from .slots import DEFAULT_ALIGNMENT, MAX_SLOTS, Slot, SlotAllocator, SlotLedger

#: The seals every region carries, and a receiver requires.
REQUIRED_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL

#: The largest region, made (shm_size: ValueError above) or adopted (a
#: peer's larger one is a ProtocolError).  Its memory is allocated whole
#: when it is made (see `Region.create`), and memory a memfd holds is not
#: counted against overcommit: the kernel answers a region larger than the
#: memory it can find with the OOM killer, not with an error.  A bound
#: keeps a mistyped size from doing so; over it, a message is better
#: split than pinned in RAM in one piece.
MAX_REGION_SIZE = 16 << 30

#: The name a region shows in /proc/PID/maps and /proc/PID/fd (no file has it).
REGION_NAME = "afunix-lane"

#: `RegionWriter.try_copy` copies at least this many bytes with stores that
#: bypass the cache (the backend's ``copy_streaming``): the peer reads such a
#: slot from memory anyway, and cached stores would first read every line of
#: it.  Below, the slot is better left in the cache the peer reads it from.
#: On a 2-CPU EPYC VM, 16 MiB objects through 4 slots: 7.6-7.8 GB/s cached,
#: 8.0-9.8 GB/s streamed; 4 and 8 MiB gain as much; 1 and 2 MiB lose 5-10 %.
STREAMING_COPY_MIN = 4 << 20

# CPython 3.13 can map without keeping a duplicate of the descriptor
# (mmap's trackfd=False): one descriptor per region instead of two.
_MMAP_KEYWORDS = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def unsupported_reason() -> Optional[str]:
    """Why regions cannot be made here (None when they can): no memfd, no seals."""
    if not hasattr(os, "memfd_create"):
        return "os.memfd_create is missing (Linux 3.17 and glibc 2.27 or later needed)"
    if F_ADD_SEALS is None or F_GET_SEALS is None:
        return "file sealing (F_ADD_SEALS) is Linux only"
    return None


def _need_support() -> None:
    reason = unsupported_reason()
    if reason is not None:
        raise OSError(errno.ENOSYS, "shared-memory regions unavailable: " + reason)


def _physical_memory() -> int:
    """Bytes of RAM of this machine (0: unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's memory now (posix_fallocate), raising OSError when it cannot."""
    # PyPy 3.9 (7.3.11) returns posix_fallocate's error number instead of
    # raising it: without this check a failed reservation would pass silently.
    fallocate: Callable[[int, int, int], Any] = os.posix_fallocate
    error = fallocate(fd, 0, size)
    if error:
        raise OSError(error, os.strerror(error))


def _seal(fd: int) -> None:
    """Add REQUIRED_SEALS to `fd`; ENOSYS where the kernel has no F_SEAL_FUTURE_WRITE."""
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, REQUIRED_SEALS)  # type: ignore[arg-type]
    except OSError as exc:
        # Before Linux 5.1 an unknown seal bit is EINVAL.  Without that
        # seal a region is refused by every receiver: no lane, clearly.
        if exc.errno != errno.EINVAL:
            raise
        raise OSError(errno.ENOSYS, "shared-memory regions unavailable: the kernel has no "
                      "F_SEAL_FUTURE_WRITE (Linux 5.1 or later needed)") from None


def _map(fd: int, size: int, writable: bool) -> mmap.mmap:
    # MAP_POPULATE: fault every page in now, once, instead of one fault per
    # 4 KiB inside every later copy.
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=prot,
                     **_MMAP_KEYWORDS)


class Region:
    """A sealed memfd of a fixed size, mapped into this process.

    Made by `Region.create` (the sender: mapped read-write) or
    `Region.adopt` (the receiver: mapped read-only, after checking the
    seals and the size).  Owns its descriptor and its mapping; `close`
    releases both.  The stdlib twin is ``multiprocessing.shared_memory``,
    without a name and sealed.

    Views (`view`) keep the memory they point into alive: on CPython, a
    view that outlives `close` still reads (and, for a created region,
    writes) the region's memory, which is unmapped when the last view goes
    (``mmap.close`` refuses while a buffer is exported, so `close` leaves the
    unmapping to the mmap object's own deallocator).  PyPy's mmap unmaps at
    `close` whatever is exported and then shows every view of it as empty
    (length 0), so no later access reaches the unmapped memory; but a call
    already running in another thread with a view (``recv_into`` blocked
    on a socket) keeps the old address, and once the next mapping reuses
    it, writes there.  On PyPy, close a region only when no other thread
    is inside a call that uses one of its views.
    """

    __slots__ = ("_fd", "_map", "_root", "_size", "_writable", "__weakref__")

    def __init__(self, fd: int, mapping: mmap.mmap, size: int, writable: bool) -> None:
        # Use Region.create or Region.adopt; this takes ownership of fd and mapping.
        self._fd = fd
        self._map: Optional[mmap.mmap] = mapping
        root = memoryview(mapping)
        self._root: Optional[memoryview] = root if writable else root.toreadonly()
        if not writable:
            root.release()
        self._size = size
        self._writable = writable

    @classmethod
    def create(cls, size: int) -> "Region":
        """A new region of `size` bytes, space reserved, mapped read-write, sealed.

        The memory is reserved at once (posix_fallocate) and stays
        allocated until the region is gone, so a fault can never come
        later.  The kernel does not count it against overcommit: a size
        over the machine's RAM is refused (ENOMEM) before anything is
        allocated, but one that RAM holds only once other processes give
        theirs up gets the OOM killer, not an error.  Size regions for the
        memory the machine can spare.  Mapped before it is sealed:
        F_SEAL_FUTURE_WRITE refuses every writable mapping made after it.

        Raises:
            TypeError, ValueError: `size` is not an int from 1 to MAX_REGION_SIZE.
            OSError: ENOSYS where memfd or sealing is missing, or the kernel
                has no F_SEAL_FUTURE_WRITE (before Linux 5.1); ENOMEM for a
                size over the machine's RAM; the kernel's answer otherwise
                (ENOMEM, ENOSPC, EMFILE).
        """
        size = _checks.in_range(size, "size", 1, MAX_REGION_SIZE)
        _need_support()
        ram = _physical_memory()
        if ram and size > ram:
            raise OSError(errno.ENOMEM, "a region of %d bytes is larger than this machine's "
                          "memory (%d bytes)" % (size, ram))
        fd = os.memfd_create(REGION_NAME, MFD_CLOEXEC | MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            _reserve(fd, size)
            mapping = _map(fd, size, writable=True)
            try:
                _seal(fd)
            except BaseException:
                mapping.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mapping, size, writable=True)

    @classmethod
    def adopt(cls, fd: int, size: int, *, owned: bool = True) -> "Region":
        """The region behind `fd`, received from a peer who announced `size` bytes; read-only.

        Takes ownership of `fd`: it is closed on every failure, and by
        `close` after success.  With ``owned=False`` it stays the caller's
        (closed by the caller, whatever happens here): the mapping does
        not need it, and a caller interrupted before it stores the region
        (a signal handler's exception) loses nothing but the mapping, which
        goes with the object.  Checks, before mapping: the descriptor is a
        regular file with the seals F_SEAL_SHRINK, F_SEAL_GROW,
        F_SEAL_FUTURE_WRITE and F_SEAL_SEAL (so its size is fixed for good
        and no hole can be punched in it), its size is `size`, and all of
        its memory is allocated (the sender reserved it: checked after the
        seals, so it stays so).

        Raises:
            ProtocolError: the descriptor is not a sealed memfd, lacks a
                seal, has another size, is not all allocated, or cannot be
                mapped for reading.
            TypeError, ValueError: `fd` or `size` is not an int in range
                (the descriptor is closed all the same when it is an int).
            OSError: ENOSYS where sealing is missing; EMFILE or ENFILE when
                mapping needs a descriptor and none is left.
        """
        fd = _checks.descriptor(fd)
        try:
            size = _checks.in_range(size, "size", 1, MAX_REGION_SIZE)
            _need_support()
            try:
                seals = fcntl.fcntl(fd, F_GET_SEALS)  # type: ignore[arg-type]
            except OSError as exc:
                raise ProtocolError("region descriptor takes no seals (%s): not a memfd"
                                    % os.strerror(exc.errno or 0)) from None
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise ProtocolError("region is not sealed: seals 0x%x, 0x%x required"
                                    % (seals, REQUIRED_SEALS))
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError("region descriptor is not a regular file")
            if st.st_size != size:
                raise ProtocolError("region has %d bytes, %d announced" % (st.st_size, size))
            # A sparse region costs its sender nothing, but MAP_POPULATE (and
            # every later read of a hole) allocates its memory here: up to
            # MAX_REGION_SIZE charged to this process for free.  The sender
            # must have reserved it all (st_blocks counts 512-byte units),
            # and F_SEAL_FUTURE_WRITE, checked above, keeps it from punching
            # holes afterwards (shmem refuses FALLOC_FL_PUNCH_HOLE with EPERM).
            if st.st_blocks * 512 < size:
                raise ProtocolError("region's memory is not reserved: %d of %d bytes allocated"
                                    % (st.st_blocks * 512, size))
            try:
                mapping = _map(fd, size, writable=False)
            except OSError as exc:
                # mmap duplicates the descriptor (CPython before 3.13, PyPy):
                # no descriptor left is this process's limit, not the peer's fault.
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise
                raise ProtocolError("region cannot be mapped for reading: %s" % exc) from None
            except ValueError as exc:
                raise ProtocolError("region cannot be mapped for reading: %s" % exc) from None
        except BaseException:
            if owned:
                os.close(fd)
            raise
        return cls(fd if owned else -1, mapping, size, writable=False)

    @property
    def size(self) -> int:
        """Bytes of the region."""
        return self._size

    @property
    def writable(self) -> bool:
        """True for a region this process created, False for one adopted from a peer."""
        return self._writable

    @property
    def closed(self) -> bool:
        """True after `close`."""
        return self._root is None

    def fileno(self) -> int:
        """The region's descriptor (to pass to the peer); still owned by the region.

        Raises:
            ValueError: the region is closed.
        """
        if self._root is None:
            raise ValueError("I/O operation on closed region")
        return self._fd

    def view(self, offset: int, length: int) -> memoryview:
        """A memoryview of ``region[offset:offset + length]``; read-only for an adopted region.

        Raises:
            ValueError: the region is closed, or the range is not inside it.
            TypeError: offset or length is not an int.
        """
        root = self._root
        if root is None:
            raise ValueError("I/O operation on closed region")
        offset = _checks.in_range(offset, "offset", 0, self._size)
        length = _checks.in_range(length, "length", 0, self._size - offset)
        view: memoryview = root[offset:offset + length]
        return view

    def close(self) -> None:
        """Close the descriptor and unmap the region (at once, or when the last view goes).

        Idempotent.  Never raises for views that still exist (see the class
        notes on what they read).
        """
        root, mapping = self._root, self._map
        if root is None:
            return
        self._root = self._map = None
        # Each step in a finally: an exception (a signal handler's) after
        # any of them still leaves the rest done, and once `_root` is None
        # a second close does nothing.
        try:
            root.release()
        finally:
            try:
                if self._fd >= 0:  # (-1: a region adopted without its descriptor)
                    os.close(self._fd)
            finally:
                if mapping is not None:
                    try:
                        mapping.close()
                    except BufferError:
                        # CPython: a view made by `view` (or one derived from it) is
                        # alive.  Dropping our reference leaves the mapping to the
                        # mmap object, which unmaps it when that view is released.
                        pass

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        # A region dropped without close() still gives its descriptor back.
        if getattr(self, "_root", None) is not None:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._root is None else "fd=%d" % self._fd
        return "<Region %s size=%d %s>" % (state, self._size, "rw" if self._writable else "ro")


#: what ending a loan ended already raises
ENDED = "the loan was already committed or abandoned"


class Lender(Protocol):
    """What a `Loan` tells of its slot: the allocator's moves, each given the loan's `held`.

    `held` holds the slot until a `withdraw` frees it and empties it, in
    one step: `sending` and `recall` raise ValueError (`ENDED`) when it
    is empty (`sending` also when the slot is not lent), and `withdraw`
    then returns False and changes nothing (see `afunix.lane.LaneSender`).
    """

    def sending(self, offset: int, length: int, held: Optional[List[Slot]] = None) -> None: ...

    def recall(self, offset: int, length: int, held: Optional[List[Slot]] = None) -> None: ...

    def withdraw(self, offset: int, length: int, keep: Optional[List[Slot]] = None) -> bool: ...


class Loan:
    """A writable view of one slot, filled in place and then handed over or given up.

    Made by `RegionWriter.try_loan` (and `afunix.Channel.loan`, which sends
    it with `afunix.Channel.send_loan`).  `view` is the slot's memory; write the
    message into it (``loan.view[:n] = data``, ``numpy.frombuffer(loan.view,
    ...)``).  `commit` hands the slot over (the caller announces it to the
    peer) and releases the view; `abandon` gives the slot back to the free
    space.  After either, `view` raises ValueError, as a released memoryview
    does.  Used as a context manager, a loan not committed when the block
    ends is abandoned.

    A buffer exported from the view and still alive (``pickle.PickleBuffer(
    loan.view)``, anything that holds the view's buffer) makes `commit` and
    `abandon` raise BufferError on CPython and leaves the loan open: drop it
    first.  Slices of the view, ``memoryview(loan.view)`` and what is built
    on them (``numpy.frombuffer``) share the slot's memory without such an
    export, as PyPy's buffers all do: the release cannot reach them, so do
    not keep them past `commit` (a write through them changes the message
    in flight; the peer maps the region read-only and never faults).

    Once the region is closed (the channel's close, in any thread) there is
    nothing to give back: `abandon` only ends the loan, and `commit` only
    hands the slot out, also when the close comes in the middle of them.

    A loan open across ``fork()`` is the parent's.  In the child its view
    still maps the parent's slot (a shared mapping: a write there changes
    what the parent sends), `afunix.Channel.send_loan` refuses it and
    `abandon` does nothing (the child's copy of the region is closed): a
    child must not use it.  Ending the same loan in two threads at once
    ends it once: the one that loses gets the ValueError of a loan ended
    already.
    """

    __slots__ = ("slot", "_view", "_lender", "_region", "_held", "_stopped")

    def __init__(self, slot: Slot, view: memoryview, lender: Lender, region: Region) -> None:
        #: the slot lent: its offset and length in the region
        self.slot = slot
        self._view: Optional[memoryview] = view
        # keeps the slot's state: sent at commit, lent again at reopen,
        # free again at abandon (until then the peer may not return it)
        self._lender = lender
        self._region = region
        # the slot until `abandon` gave it back: the lender frees it and
        # empties this list in one commit, so an abandon stopped half way
        # (a signal handler's exception) and made again frees it once
        self._held = [slot]
        # True from the moment a commit closed the view until it handed
        # the slot over: a commit an exception stopped in between leaves
        # the slot lent, and `abandon` may still give it back
        self._stopped = False

    @property
    def region(self) -> Region:
        """The region the slot is in."""
        return self._region

    @property
    def view(self) -> memoryview:
        """The slot's memory, writable, until `commit` or `abandon`.

        Raises:
            ValueError: the loan was committed or abandoned.
        """
        view = self._view
        if view is None:
            raise ValueError("operation forbidden on released memoryview object")
        return view

    @property
    def open(self) -> bool:
        """True until `commit` or `abandon`."""
        return self._view is not None

    def _finish(self) -> None:
        view = self._view
        if view is None:
            raise ValueError(ENDED)
        # Closed first, then released: an exception (a signal handler's)
        # after the release finds the loan closed, never open with its view
        # released (`send_loan` opens a loan whose frame did not go again).
        self._view = None
        try:
            view.release()
        except BufferError:
            self._view = view  # an export is alive: the loan stays open
            raise

    def commit(self) -> Slot:
        """Hand the filled slot over; return it, for the frame that names it.

        The slot stays in use until the peer returns it
        (`RegionWriter.give_back`), which it may from now on.  Once the
        region is closed (before or during this call) the slot is
        forgotten with it: the loan is committed all the same.

        Raises:
            ValueError: already committed or abandoned (also by another
                thread during this call: the loan is abandoned then).
            BufferError: a buffer exported from `view` is still alive.
        """
        if self._view is None:
            raise ValueError(ENDED)  # (before the mark: a loan ended stays ended)
        self._stopped = True
        self._finish()
        if not self._region.closed:
            self._lender.sending(self.slot.offset, self.slot.length, self._held)
        self._stopped = False
        return self.slot

    def reopen(self) -> None:
        """Open a committed loan again, with a new view of the same slot: its frame was not sent.

        For the sender whose frame naming the slot could not be written
        (the socket took none of it): the slot is still this end's, and
        the caller may send it again or abandon it.

        Raises:
            ValueError: the loan is open or was abandoned, or the region is closed.
            ProtocolError: the peer returned the slot before its frame was
                sent (the loan stays committed: the slot is not this end's).
        """
        if self._view is not None:
            raise ValueError("the loan is open")
        if not self._held:
            raise ValueError("the loan was abandoned")  # (its slot may be another's now)
        view = self._region.view(self.slot.offset, self.slot.length)
        try:
            self._lender.recall(self.slot.offset, self.slot.length, self._held)
        except BaseException:
            view.release()
            raise
        self._view = view
        self._stopped = False

    def abandon(self) -> None:
        """Give the slot back unsent (nothing to give back once the region is closed).

        The loan ends also when the region closes during this call (the
        channel's close() in another thread): the slot is then forgotten
        with the region, never refused.  An exception that stops it (a
        signal handler's) leaves the loan open, its view released: abandon
        it again to finish.  A `commit` that an exception stopped before it
        handed the slot over leaves the loan closed and its slot lent:
        abandon gives it back (one whose slot went raises ValueError).

        Raises:
            ValueError: already committed or abandoned (also by another
                thread during this call).
            BufferError: a buffer exported from `view` is still alive.
        """
        view = self._view
        if view is None:
            if not (self._stopped and self._held):
                raise ValueError(ENDED)
        else:
            view.release()  # BufferError while an export exists: the loan stays open
        # Still open until the slot is free: an exception before that
        # leaves the loan to abandon again, never closed with its slot
        # lent for good.  RegionWriter.close forgot every slot: freeing
        # this one then would be refused as a bad return, the error of a
        # broken peer.  (The lender looks again, under its lock, on the
        # allocator it took first: a close in another thread after this
        # look replaces that allocator, never changes it under the
        # withdraw, see RegionWriter.close.)
        # The withdraw is the claim: it frees the slot and empties `held` in
        # one step under the lender's lock, or does nothing and says so when
        # another thread ended the loan first (its abandon emptied `held`,
        # or its commit sent the slot): freed twice, the slot would be
        # handed to a later loan and then freed under it.
        held = self._held
        if held and not self._region.closed:
            if not self._lender.withdraw(self.slot.offset, self.slot.length, held):
                raise ValueError(ENDED)
        self._view = None
        self._stopped = False

    def __enter__(self) -> "Loan":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if self._view is not None:
            self.abandon()

    def __repr__(self) -> str:
        state = "open" if self._view is not None else "released"
        return "<Loan offset=%d length=%d %s>" % (self.slot.offset, self.slot.length, state)


class RegionWriter:
    """The sending end of a lane: a region this process created and its free space.

    ``RegionWriter(size)`` makes the region (`Region.create`); pass
    `fileno()` to the peer once with ``size``.  Then per message:
    `try_copy` (copy the bytes into a free slot) or `try_loan` (fill a
    slot in place), say `sending` (a loan's `commit` does) and announce
    the slot, and `give_back` each slot the peer returns.  A slot not
    announced is the peer's to return only after `sending`: before, a
    return naming it is a ProtocolError.  The try calls never wait: None
    means no room now.
    """

    __slots__ = ("region", "allocator")

    def __init__(self, size: int, *, alignment: int = DEFAULT_ALIGNMENT) -> None:
        """Args:
            size: bytes of the region.
            alignment: of every slot's offset (a power of two).

        Raises:
            as `Region.create` and `SlotAllocator`.
        """
        allocator = SlotAllocator(size, alignment=alignment)  # checks before any system call
        #: the region, mapped read-write
        self.region = Region.create(size)
        #: its free space
        self.allocator = allocator

    @property
    def size(self) -> int:
        """Bytes of the region."""
        return self.region.size

    def fileno(self) -> int:
        """The region's descriptor, to pass to the peer (still owned here)."""
        return self.region.fileno()

    def try_loan(self, length: int, keep: Optional[List[Slot]] = None) -> Optional[Loan]:
        """A `Loan` of a free slot of `length` bytes, or None when none is free now.

        `keep`: as for `SlotAllocator.try_allocate`.

        Raises:
            ValueError: `length` below 1 or over the region's size, or the region is closed.
        """
        if self.region.closed:
            raise ValueError("I/O operation on closed region")
        slot = self.allocator.try_allocate(length, keep)
        if slot is None:
            return None
        return Loan(slot, self.region.view(slot.offset, slot.length), self, self.region)

    def try_copy(self, data: Any, keep: Optional[List[Slot]] = None) -> Optional[Slot]:
        """Copy the bytes-like `data` into a free slot; the slot (lent), or None when none is free now.

        `keep`: as for `SlotAllocator.try_allocate` (the slot is in it from
        the moment it is taken; on a failure here it is freed and removed).

        Raises:
            TypeError: `data` is not a bytes-like object.
            ValueError: `data` is empty or larger than the region, or the region is closed.
        """
        with memoryview(data) as source:
            if not source.c_contiguous:
                raise BufferError("data must be a C-contiguous buffer")
            nbytes = source.nbytes
            if self.region.closed:
                raise ValueError("I/O operation on closed region")
            slot = self.allocator.try_allocate(nbytes, keep)
            if slot is None:
                return None
            try:
                with self.region.view(slot.offset, nbytes) as target:
                    flat = source.cast("B") if source.format != "B" or source.ndim != 1 else source
                    if nbytes >= STREAMING_COPY_MIN:
                        _backend.impl.copy_streaming(target, flat)
                    else:
                        target[:] = flat
            except BaseException:
                # (with `keep`, freed and removed from it in one commit: an
                # exception that stops this withdraw leaves it there, to its owner)
                self.allocator.withdraw(slot.offset, slot.length, keep=keep)
                raise
        return slot

    # (`held`: a loan's, see `Lender`; a RegionWriter is used by one
    # thread at a time, so no lock)

    def sending(self, offset: int, length: int, held: Optional[List[Slot]] = None) -> None:
        """The frame naming the lent slot goes to the peer (see `SlotAllocator.sending`)."""
        if held is not None and not (held and self.allocator.is_lent(offset, length)):
            raise ValueError(ENDED)
        self.allocator.sending(offset, length)

    def recall(self, offset: int, length: int, held: Optional[List[Slot]] = None) -> None:
        """Its frame was not written after all: lent again (see `SlotAllocator.recall`).

        Raises:
            ValueError: `held` is empty: the loan was abandoned, its slot
                perhaps another's now (a mistake of the caller, never the
                peer's: not a ProtocolError).
            ProtocolError: as `SlotAllocator.recall`.
        """
        if held is not None and not held:
            raise ValueError("the loan was abandoned")
        self.allocator.recall(offset, length)

    def withdraw(self, offset: int, length: int, keep: Optional[List[Slot]] = None) -> bool:
        """Give up a lent slot never sent (see `SlotAllocator.withdraw`); True.

        With `keep` (a loan's `held`): False, and nothing changes, when it
        no longer holds the slot or the slot is not lent.
        """
        if keep is not None and not (Slot(offset, length) in keep
                                     and self.allocator.is_lent(offset, length)):
            return False
        self.allocator.withdraw(offset, length, keep)
        return True

    def give_back(self, offset: int, length: int) -> None:
        """Take back the slot the peer returned.

        Raises:
            ProtocolError: it is out of range or not a slot sent and in use
                (see `SlotAllocator.free`).
        """
        self.allocator.free(offset, length)

    def close(self) -> None:
        """Close the region (idempotent); every slot is forgotten.

        Forgotten by a new allocator, stored once the region is marked
        closed; the old one is left as it was, never changed here: a call
        in another thread that took the allocator (before it looks whether
        the region is closed, as `afunix.lane.LaneSender` does) and found
        the region open ends its change of that one whole, whenever this
        close runs.  Reset in place, a thread switch between that look and
        the change made the slot "not lent" (ValueError) or missing
        (KeyError) in the middle of it.
        """
        self.region.close()
        self.allocator = self.allocator.empty_copy()

    def __enter__(self) -> "RegionWriter":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


class RegionReader:
    """The receiving end of a lane: a region adopted from the peer, and the slots being read.

    ``RegionReader(fd, size)`` adopts the descriptor (`Region.adopt`; takes
    ownership of it, closes it on failure).  Per message: `claim` the slot
    the peer named (a read-only view of it), and `release` it when its bytes
    are no longer read; send the returned slot back to the peer.
    """

    __slots__ = ("region", "ledger", "_views")

    def __init__(self, fd: int, size: int, *, max_slots: int = MAX_SLOTS,
                 owned: bool = True) -> None:
        """Raises:
            as `Region.adopt` (ProtocolError for a region without the seals
            or of another size); ValueError for a bad max_slots (the
            descriptor is closed then too, unless ``owned=False``: see
            `Region.adopt`).
        """
        try:
            # the ledger checks max_slots before adopt makes any system call
            ledger = SlotLedger(size, max_slots=max_slots)
        except BaseException:
            if owned and type(fd) is int and fd >= 0:
                os.close(fd)  # taken over all the same
            raise
        region = Region.adopt(fd, size, owned=owned)
        #: the region, mapped read-only
        self.region = region
        #: the slots held
        self.ledger = ledger
        # offset -> (the view handed out, the slot's length)
        self._views: "dict[int, tuple[memoryview, int]]" = {}

    def claim(self, offset: int, length: int, key: Any = None) -> memoryview:
        """A read-only view of the slot the peer named, recorded as held.

        Read-only here only: the peer keeps writing the region, and a
        broken or hostile one can change the slot's bytes while they are
        read.  Check a copy of what must not change between two reads.
        `key`: see `SlotLedger.claim` (the same claim made again gives the
        same view).

        Raises:
            ProtocolError: out of range, empty, overlapping a slot held, or too many held.
            ValueError: the region is closed.
        """
        if self.region.closed:
            raise ValueError("I/O operation on closed region")
        slot = self.ledger.claim(offset, length, key)
        held = self._views.get(slot.offset)
        if held is not None and held[1] == slot.length:
            return held[0]  # claimed again (key): the view made then
        view = self.region.view(slot.offset, slot.length)
        self._views[slot.offset] = (view, slot.length)
        return view

    def release(self, offset: int, length: int) -> Slot:
        """Stop reading a held slot: its view is released; return the slot to send back.

        Raises:
            ValueError: it is not a slot held.
            BufferError: a buffer exported from its view is still alive (the
                slot stays held, so the sender cannot overwrite what it reads;
                CPython only, see `Loan` for what counts as an export).
        """
        held = self._views.get(offset)
        if held is None or held[1] != length:
            raise ValueError("slot (offset %r, length %r) is not held" % (offset, length))
        held[0].release()  # a no-op when the caller released it already
        del self._views[offset]
        return self.ledger.release(offset, length)

    def release_view(self, offset: int) -> None:
        """Release the view of the held slot at `offset` (it stays held); idempotent.

        Raises:
            BufferError: a buffer exported from it is still alive (see `release`).
        """
        held = self._views.get(offset)
        if held is not None:
            held[0].release()

    def discard(self, offset: int, length: int) -> None:
        """`release`, for a slot that may be released already (then nothing happens).

        Each step can be done again: an exception between two of them (a
        signal handler's) leaves the rest to the next call.

        Raises:
            BufferError: as `release`.
        """
        held = self._views.get(offset)
        if held is not None and held[1] == length:
            held[0].release()
            del self._views[offset]
        if self.ledger.holds(offset, length):
            self.ledger.release(offset, length)

    def close(self) -> None:
        """Close the region (idempotent); held slots are forgotten, their views released where possible."""
        for view, _ in self._views.values():
            try:
                view.release()
            except BufferError:
                pass  # the caller's export keeps the mapping alive (see Region)
        self._views.clear()
        self.region.close()

    def __enter__(self) -> "RegionReader":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
