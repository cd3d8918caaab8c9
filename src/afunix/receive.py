"""Batched receiving: recv_many and RecvBatch over recvmmsg (the sending side is batch.py)."""
from __future__ import annotations

import itertools
import socket
import threading
from typing import Any, Iterator, Optional, Sequence

from . import _backend, _checks, _io
from .batch import MAX_MESSAGES
from .message import Address, Credentials, Message

#: Largest bufsize per message; and the largest arena (max_messages x bufsize).
MAX_BUFSIZE = 16 << 20
MAX_ARENA_BYTES = 256 << 20
_SCM_MAX_FD = 253

# Plain ints: | and & on the socket module's enum flags build enum objects.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_DGRAM = int(socket.SOCK_DGRAM)
_SEQPACKET = int(socket.SOCK_SEQPACKET)
_TRUNC = int(socket.MSG_TRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_message = tuple.__new__


def _checked_sizes(max_messages: Any, bufsize: Any, maxfds: Any) -> tuple[int, int, int]:
    n = _checks.in_range(max_messages, "max_messages", 1, MAX_MESSAGES)
    size = _checks.in_range(bufsize, "bufsize", 1, MAX_BUFSIZE)
    k = _checks.in_range(maxfds, "maxfds", 0, _SCM_MAX_FD)
    if n * size > MAX_ARENA_BYTES:
        raise ValueError("max_messages x bufsize is %d bytes, the limit is %d"
                         % (n * size, MAX_ARENA_BYTES))
    return n, size, k


def _receive(t: _io.Target, arena: Any, flags: int, backend: Optional[_backend.Backend] = None) -> int:
    """Wait for the first message as sock.recv would, take the queued rest; strip end of stream.

    `backend` is the one that made `arena` (default: the active one).
    """
    recv_batch = (backend or _backend.impl).recv_batch
    deadline = None
    may_wait = t.timeout != 0.0 and not flags & _DONTWAIT
    if t.timeout is not None:
        deadline = _io.deadline_of(t.timeout)
        flags |= _DONTWAIT  # waiting is done here, against the deadline
    while True:
        try:
            count = recv_batch(t.sock, arena, flags)
            break
        except InterruptedError:
            continue  # PEP 475: handlers ran; retry
        except BlockingIOError:
            if not may_wait:
                raise
            if not _io.wait(t.fd, False, deadline):
                raise socket.timeout("timed out") from None
    if count and t.type != _DGRAM and arena.length(count - 1) == 0:
        count = _strip_end_of_stream(t, arena, count)
    return count


def _strip_end_of_stream(t: _io.Target, arena: Any, count: int) -> int:
    # End of stream reads as a 0-byte message, and recvmmsg keeps reading it
    # until the batch is full.  On a stream every 0-byte read is the end; on
    # SEQPACKET an empty message reads the same, so trailing empty reads
    # count as the end only once the peer has hung up.
    if t.type == _SEQPACKET and not _io.peer_hung_up(t.fd):
        return count
    # A message cut to 0 bytes (recv_fds with bufsize 0) is a message, not
    # the end; so is one whose descriptors were cut (and closed): it must
    # reach the caller flagged, never pass for the end of the stream.
    while (count and arena.length(count - 1) == 0 and not arena.fds(count - 1)
           and not arena.msg_flags(count - 1) & (_TRUNC | _CTRUNC)):
        count -= 1
    arena.count = count
    return count


class _ReceivedFds:
    """The descriptors of one receive: a flat array, handed out per message or all at once.

    Whatever is not handed out is closed by `release()`, so none leaks.
    """

    __slots__ = ("_flat", "_counts", "_offsets", "_taken", "_all_taken")

    def __init__(self, flat: list[int], counts: list[int]) -> None:
        self._flat = flat
        self._counts = counts
        self._offsets: Optional[list[int]] = None
        self._taken: set[int] = set()
        self._all_taken = not flat

    def take(self, i: int) -> list[int]:
        """Message i's descriptors, once; [] after that."""
        if self._all_taken or i in self._taken or not self._counts[i]:
            return []
        if self._offsets is None:
            self._offsets = [0, *itertools.accumulate(self._counts)]
        self._taken.add(i)
        start = self._offsets[i]
        return self._flat[start:start + self._counts[i]]

    def take_all(self) -> list[int]:
        """Every descriptor not handed out yet, in message order."""
        if self._all_taken:
            return []
        self._all_taken = True
        if not self._taken:
            return self._flat
        return [fd for i in range(len(self._counts)) if i not in self._taken
                for fd in self._per_message(i)]

    def _per_message(self, i: int) -> list[int]:
        assert self._offsets is not None
        start = self._offsets[i]
        return self._flat[start:start + self._counts[i]]

    def release(self) -> None:
        """Close what was not handed out."""
        fds = self.take_all()
        if fds:
            _backend.impl.close_fds(fds)


_NO_FDS = _ReceivedFds([], [])


def _received_fds(arena: Any, count: int) -> _ReceivedFds:
    flat = arena.all_fds()
    return _ReceivedFds(flat, arena.fd_counts(count)) if flat else _NO_FDS


def _messages(arena: Any, count: int, fds: Optional[_ReceivedFds] = None) -> list[Message]:
    """Copy messages [0, count) out of `arena`, handing their descriptors to the caller."""
    if fds is None:
        fds = _received_fds(arena, count)
    chunks = arena.chunks(count)
    flags = arena.all_flags(count)
    if arena.plain(count):
        return [_message(Message, (d, (), None, f, None)) for d, f in zip(chunks, flags)]
    out = []
    for i in range(count):
        creds = arena.credentials(i)
        out.append(_message(Message, (
            chunks[i],
            tuple(fds.take(i)),
            _io.decode_address(arena.address(i)),
            flags[i],
            None if creds is None else Credentials(*creds),
        )))
    return out


_local = threading.local()


def _cached_arena(n: int, size: int, maxfds: int) -> Any:
    # recv_many reuses one arena per thread and per backend: allocating
    # max_messages x bufsize on every call would cost more than the call.
    key = (_backend.name, n, size, maxfds)
    if getattr(_local, "key", None) != key:
        _local.arena = _backend.impl.new_arena(n, size, maxfds)
        _local.key = key
    return _local.arena


def recv_many(sock: Any, max_messages: int, bufsize: int, flags: int = 0, *,
              maxfds: int = 0) -> list[Message]:
    """Receive up to `max_messages` messages with one recvmmsg.

    Waits for the first message as ``sock.recv`` would (blocking, timeout or
    BlockingIOError), then takes those already queued without waiting
    (MSG_WAITFORONE).  Each `Message` has the data (at most `bufsize` bytes;
    MSG_TRUNC in `flags` when the datagram was longer), the sender's address
    on an unconnected DGRAM socket, up to `maxfds` descriptors (close-on-exec,
    now owned by the caller) and the sender's credentials with SO_PASSCRED.
    A message whose control data was cut has MSG_CTRUNC in its flags and no
    descriptors (the ones that came are closed).  On SOCK_STREAM each message
    is the next chunk of the stream.  At end of stream the list is empty.

    Raises:
        TypeError, ValueError: bad arguments, before any system call.
        BlockingIOError, TimeoutError, OSError: as sock.recv would.
    """
    n, size, k = _checked_sizes(max_messages, bufsize, maxfds)
    flags = _checks.msg_flags(flags)
    t = _io.target(sock)
    try:
        arena = _cached_arena(n, size, k)
        return _messages(arena, _receive(t, arena, flags))
    finally:
        if t.shadow:
            t.sock.detach()


class RecvBatch:
    """A reusable receive arena: the zero-copy, zero-allocation path of recv_many.

    ``batch.recv(sock)`` fills it with one recvmmsg; ``batch[i]`` is a
    memoryview of message i inside the arena, valid until the next recv.
    Descriptors of message i are handed over by ``batch.fds(i)`` (or
    ``messages()``); those not taken by the next ``recv()`` or ``close()``
    are closed then, so none leaks.
    """

    def __init__(self, max_messages: int, bufsize: int, *, maxfds: int = 0) -> None:
        self._fds = _NO_FDS
        n, size, k = _checked_sizes(max_messages, bufsize, maxfds)
        self._backend = _backend.impl
        self._arena = _backend.impl.new_arena(n, size, k)
        self._view = self._arena.view
        self._bufsize = size
        self._count = 0
        self._lens: Sequence[int] = []
        self._busy = threading.Lock()

    @property
    def max_messages(self) -> int:
        return int(self._arena.max_messages)

    @property
    def bufsize(self) -> int:
        return self._bufsize

    @property
    def maxfds(self) -> int:
        return int(self._arena.maxfds)

    def recv(self, sock: Any, flags: int = 0) -> int:
        """Receive into the arena as `recv_many` does; returns the count.

        Raises:
            RuntimeError: the batch is in use by another thread.
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
        """
        flags = _checks.msg_flags(flags)
        if not self._busy.acquire(False):  # never wait: refuse instead
            raise RuntimeError("this RecvBatch is being filled by another thread")
        try:
            if self._fds is not _NO_FDS:
                self._release_untaken()
            self._count = 0
            t = _io.target(sock)
            try:
                count = _receive(t, self._arena, flags, self._backend)
            finally:
                if t.shadow:
                    t.sock.detach()
            self._count = count
            self._lens = self._arena.lens
            if self._arena.maxfds:
                self._fds = _received_fds(self._arena, count)
            return count
        finally:
            self._busy.release()

    def _release_untaken(self) -> None:
        fds, self._fds = self._fds, _NO_FDS
        fds.release()

    def close(self) -> None:
        """Close descriptors not taken with fds(); the arena stays usable."""
        self._release_untaken()

    def __enter__(self) -> "RecvBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fds is not _NO_FDS:
            self._release_untaken()

    def __len__(self) -> int:
        return self._count

    def _index(self, i: int) -> int:
        if type(i) is not int:  # 1.5 is a TypeError, as for a list, not "out of range"
            i = _checks.index(i, "RecvBatch")
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("RecvBatch index out of range")
        return i

    def __getitem__(self, i: int) -> memoryview:
        i = self._index(i)
        start = i * self._bufsize
        view: memoryview = self._view[start:start + self._lens[i]]
        return view

    def __iter__(self) -> Iterator[memoryview]:
        view, size, lens = self._view, self._bufsize, self._lens
        for i in range(self._count):
            start = i * size
            yield view[start:start + lens[i]]

    @property
    def buffer(self) -> memoryview:
        """The whole arena: message i starts at ``i * bufsize`` (valid until the next recv).

        With `lengths()` this lets a consumer work on a batch in bulk, with
        no Python object per message.
        """
        return self._view

    def lengths(self) -> list[int]:
        """The byte count of every message of the last recv, in one call."""
        return self._arena.lengths(self._count)

    def flags(self, i: int) -> int:
        """The kernel's msg_flags for message i (MSG_TRUNC, MSG_CTRUNC, ...)."""
        return int(self._arena.msg_flags(self._index(i)))

    def fds(self, i: int) -> list[int]:
        """Message i's descriptors, handed to the caller (who must close them)."""
        return self._fds.take(self._index(i))

    def all_fds(self) -> list[int]:
        """Every descriptor of the last recv not yet taken, in message order, handed to the caller.

        The bulk twin of `fds(i)`, for consumers that handle a batch at
        once; `fd_counts()` says how many each message carried.
        """
        return self._fds.take_all()

    def fd_counts(self) -> list[int]:
        """How many descriptors each message of the last recv carried."""
        return self._arena.fd_counts(self._count)

    def address(self, i: int) -> Optional[Address]:
        """The sender's address of message i (None on a connected socket)."""
        return _io.decode_address(self._arena.address(self._index(i)))

    def credentials(self, i: int) -> Optional[Credentials]:
        """The sender's SCM_CREDENTIALS for message i, when SO_PASSCRED is on."""
        creds = self._arena.credentials(self._index(i))
        return None if creds is None else Credentials(*creds)

    def messages(self) -> list[Message]:
        """Copy every message out as a `Message`, handing over all descriptors."""
        return _messages(self._arena, self._count, self._fds)
