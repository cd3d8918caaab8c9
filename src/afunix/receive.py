"""Batched receiving: recv_many and RecvBatch over recvmmsg (the sending side is batch.py)."""
from __future__ import annotations

import socket
import threading
from typing import Any, Iterator, Optional, Sequence

from . import _backend, _checks, _io
from ._contract import Backend
from ._limits import MAX_BATCH, SCM_MAX_FD
from .message import Address, Credentials, Message

#: Largest bufsize per message; and the largest arena (max_messages x bufsize).
MAX_BUFSIZE = 16 << 20
MAX_ARENA_BYTES = 256 << 20

# Plain ints: | and & on the socket module's enum flags build enum objects.
_DGRAM = int(socket.SOCK_DGRAM)
_SEQPACKET = int(socket.SOCK_SEQPACKET)
_TRUNC = int(socket.MSG_TRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_message = tuple.__new__
_thread_id = threading.get_ident
_FILLER = "filler"
_SOCKET = socket.socket
_C_INT_MAX = _checks.C_INT_MAX


def _checked_sizes(max_messages: Any, bufsize: Any, maxfds: Any) -> tuple[int, int, int]:
    n = _checks.in_range(max_messages, "max_messages", 1, MAX_BATCH)
    size = _checks.in_range(bufsize, "bufsize", 1, MAX_BUFSIZE)
    k = _checks.in_range(maxfds, "maxfds", 0, SCM_MAX_FD)
    if n * size > MAX_ARENA_BYTES:
        raise ValueError("max_messages x bufsize is %d bytes, the limit is %d"
                         % (n * size, MAX_ARENA_BYTES))
    return n, size, k


def receive_into(t: _io.Target, arena: Any, flags: int, owner: Any,
             backend: Optional[Backend] = None) -> tuple[int, int, int]:
    """Wait for the first message as sock.recv would, take the queued rest; strip end of stream.

    Messages an interrupted earlier call on `owner` left in `arena` come
    first, with no system call.  `backend` is the one that made `arena`
    (default: the active one).

    Returns:
        (first, count, end): messages [first, first + count) are the
        caller's to deliver; [first, end) also holds the empty reads of
        the end of the stream, delivered with the last message.
    """
    recv_batch = (backend or _backend.impl).recv_batch
    flags, deadline, may_wait = _io.wait_setup(t, flags)
    arena.owner = owner  # before the call: whatever it hands over is owner's
    try:
        count = _io.call_when_ready(t.fd, False, deadline, may_wait,
                                    recv_batch, t.sock, arena, flags)
    except OSError:  # BlockingIOError, the timeout, the kernel's errors
        arena.owner = None  # nothing arrived: hold no reference to the socket
        raise
    first = arena.first()
    end = first + count
    if count and t.type != _DGRAM and arena.length(end - 1) == 0:
        count = _strip_end_of_stream(t, arena, first, count)
    return first, count, end


def _strip_end_of_stream(t: _io.Target, arena: Any, first: int, count: int) -> int:
    # End of stream reads as a 0-byte message, and recvmmsg keeps reading it
    # until the batch is full.  On a stream every 0-byte read is the end; on
    # SEQPACKET an empty message reads the same, so trailing empty reads
    # count as the end only once the peer has hung up.
    if t.type == _SEQPACKET and not _io.peer_hung_up(t.fd):
        return count
    # A message cut to 0 bytes (recv_fds with bufsize 0) is a message, not
    # the end; so is one whose descriptors were cut (and closed): it must
    # reach the caller flagged, never pass for the end of the stream.
    fd_counts = arena.fd_counts(first + count)
    while (count and arena.length(first + count - 1) == 0 and not fd_counts[first + count - 1]
           and not arena.msg_flags(first + count - 1) & (_TRUNC | _CTRUNC)):
        count -= 1
    return count


def _messages(arena: Any, first: int, count: int) -> list[Message]:
    """Messages [first, first + count) of `arena` with the descriptors it still holds (pure).

    Nothing is given over here: the caller commits (arena.deliver) once the
    list is whole, so an exception while it is built loses nothing.
    """
    stop = first + count
    chunks = arena.chunks(first, stop)
    flags = arena.all_flags(first, stop)
    if arena.plain():
        return [_message(Message, (d, (), None, f, None)) for d, f in zip(chunks, flags)]
    fds = arena.held_fds(first, stop)
    out = []
    for j in range(count):
        creds = arena.credentials(first + j)
        out.append(_message(Message, (
            chunks[j],
            fds[j],
            _io.decode_address(arena.address(first + j)),
            flags[j],
            None if creds is None else Credentials(*creds),
        )))
    return out


class _Arenas(threading.local):
    """One thread's receive arenas for recv_many and recv_fds.

    Allocating max_messages x bufsize on every call would cost more than the
    call, so a thread reuses one arena per backend and sizes.  An arena that
    an interrupted call left holding messages is kept for its socket (by
    identity) until a receive on that socket delivers them; one whose socket
    is closed is released (its descriptors closed).
    """

    def __init__(self) -> None:
        self.key: Any = None
        self.arena: Any = None
        self.held: dict[int, Any] = {}
        #: arenas of other sizes, holding nothing, by key: a thread that
        #: alternates recv_many and recv_fds swaps, not reallocates
        self.spare: dict[Any, Any] = {}


#: The most spare arenas a thread keeps, and the largest data area a spare
#: may have: a thread that receives into many large sizes in turn keeps only
#: the current arena of those (as before spares existed), not 8 of them.
_SPARES = 8
_SPARE_BYTES = 1 << 20


def _switch(mine: _Arenas, key: Any, arena: Any) -> None:
    """Make `arena` the thread's arena, for `key`; the one it replaces, if it holds nothing, becomes a spare.

    The two stores that switch come first, with no call between them: an
    exception from a signal handler leaves the old pair or the new one,
    never a key without its arena (a lost spare is only collected).
    """
    old, old_key = mine.arena, mine.key
    mine.arena, mine.key = arena, key
    if (old is not None and old.owner is None and old_key != key
            and old.max_messages * old.bufsize <= _SPARE_BYTES):
        spare = mine.spare
        if len(spare) >= _SPARES:
            del spare[next(iter(spare))]
        spare[old_key] = old


_arenas = _Arenas()


def arena_for(sock: Any, n: int, size: int, maxfds: int) -> Any:
    """The arena for a receive on `sock`: the one holding its undelivered messages, else the thread's."""
    mine = _arenas
    arena = mine.arena
    if arena is not None and arena.owner is not None and arena.pending():
        if arena.owner is sock:
            return arena
        mine.held[id(arena.owner)] = arena  # kept for its socket's next receive
        mine.arena = mine.key = None
    if mine.held:
        held = mine.held.get(id(sock))
        if held is not None and held.owner is sock and held.pending():
            return held
        _forget_delivered(mine.held)
    key = (_backend.name, n, size, maxfds)
    if mine.key != key or mine.arena is None:
        arena = mine.spare.pop(key, None)
        if arena is None:
            arena = _backend.impl.new_arena(n, size, maxfds)
        _switch(mine, key, arena)
    return mine.arena


def _forget_delivered(held: dict[int, Any]) -> None:
    for key, arena in list(held.items()):
        if arena.owner is None or not arena.pending():
            del held[key]
        elif _closed(arena.owner):
            arena.release_fds()
            del held[key]


def _closed(sock: Any) -> bool:
    try:
        return bool(sock.fileno() < 0)
    except (OSError, ValueError):
        return True


def _ready_arena(size: int, maxfds: int) -> Any:
    """The thread's arena for one message of `size` bytes and `maxfds` descriptors, when the fast path may use it.

    None when there is none yet, it is sized otherwise, or an interrupted
    call left messages in some arena (the careful path sorts those out).
    """
    mine = _arenas
    key = (_backend.name, 1, size, maxfds)
    if mine.held:
        return None
    if mine.key == key:
        return mine.arena
    current = mine.arena
    if current is not None and current.owner is not None:
        return None
    arena = mine.spare.pop(key, None)
    if arena is not None:
        _switch(mine, key, arena)
    return arena


def recv_one(sock: socket.socket, size: int, maxfds: int, flags: int
             ) -> Optional[tuple[bytes, list[int], int, None]]:
    """The fast path of recv_fds: (data, fds, msg_flags, None) for one plain message, or None.

    Arguments are checked by the caller (`size` from 1 to MAX_BUFSIZE,
    `maxfds` from 0 to SCM_MAX_FD, `flags` a C int, `sock` a socket.socket).
    None: the careful path must run; whatever this call received is left in
    the arena, and the careful path delivers it without a system call.
    """
    arena = _ready_arena(size, maxfds)
    if arena is None:
        return None
    got = _backend.impl.try_recv_one(sock, arena, flags)
    if got is None or got[2] & _CTRUNC:
        return None  # TruncatedError and its closing: the careful path
    result = got[0], got[1], got[2], None
    arena.deliver(1, True)  # stores only: given over whole, or not at all
    return result


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
    if (max_messages == 1 and type(max_messages) is int and type(bufsize) is int
            and 0 < bufsize <= MAX_BUFSIZE and maxfds == 0 and type(maxfds) is int
            and type(flags) is int and 0 <= flags <= _C_INT_MAX and type(sock) is _SOCKET):
        # One message on a socket.socket: one backend call into the
        # thread's arena.  None: the careful path below, which also takes
        # what this call left in the arena, without asking the kernel again.
        arena = _ready_arena(bufsize, 0)
        if arena is not None:
            got = _backend.impl.try_recv_one(sock, arena, flags)
            if got is not None:
                result = [_message(Message, (got[0], (), None, got[2], None))]
                arena.deliver(1, True)  # stores only: given over whole, or not at all
                return result
    n, size, k = _checked_sizes(max_messages, bufsize, maxfds)
    flags = _checks.msg_flags(flags)
    t = _io.target(sock)
    try:
        arena = arena_for(sock, n, size, k)
        first, count, end = receive_into(t, arena, flags, sock)
    finally:
        if t.shadow:
            t.sock.detach()
    if count > n:  # left by an interrupted call with a larger max_messages
        count, end = n, first + n
    messages = _messages(arena, first, count)
    arena.deliver(end, True)  # stores only: given over whole, or not at all
    return messages


class RecvBatch:
    """A reusable receive arena: the zero-copy, zero-allocation path of recv_many.

    ``batch.recv(sock)`` fills it with one recvmmsg; ``batch[i]`` is a
    memoryview of message i inside the arena, valid until the next recv.
    Descriptors of message i are handed over by ``batch.fds(i)`` (or
    ``messages()``); those not taken by the next ``recv()`` or ``close()``
    are closed then, so none leaks.
    """

    def __init__(self, max_messages: int, bufsize: int, *, maxfds: int = 0) -> None:
        n, size, k = _checked_sizes(max_messages, bufsize, maxfds)
        self._backend = _backend.impl
        self._arena = _backend.impl.new_arena(n, size, k)
        self._view = self._arena.view
        self._bufsize = size
        self._count = 0
        self._lens: Sequence[int] = []
        # {_FILLER: thread id} while a thread fills the batch (see recv)
        self._filling: dict[str, int] = {}

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

        Descriptors of the last recv not taken are closed first.  Messages
        that an interrupted recv on the same socket took are returned before
        the kernel is asked again.

        Raises:
            RuntimeError: the batch is in use by another thread, or holds
                messages an interrupted recv took from another socket
                (recv that socket, or close() to drop them).
            BlockingIOError, TimeoutError, OSError: as sock.recv would.
        """
        if not (type(flags) is int and 0 <= flags <= _C_INT_MAX):
            flags = _checks.msg_flags(flags)
        me = _thread_id()
        filling = self._filling
        try:
            # Claimed inside the try, atomically (dict.setdefault under the
            # GIL), and released with a store as the last step: an exception
            # from a signal handler can land at any call, and must neither
            # leave the batch claimed nor escape after the messages were given.
            if filling.setdefault(_FILLER, me) != me:
                raise RuntimeError("this RecvBatch is being filled by another thread")
            arena = self._arena
            count = -1
            if type(sock) is _SOCKET:
                # The common call: one backend call.  -1, or an empty last
                # message (maybe the end of the stream): the careful path
                # below, which takes what this call left in the arena.
                self._count = 0
                count = end = self._backend.try_recv(sock, arena, flags)
                if count > 0 and not arena.lens[count - 1]:
                    count = -1
            if count < 0:
                if arena.pending() and arena.owner is not sock:
                    raise RuntimeError(
                        "this RecvBatch holds messages an interrupted recv took from another "
                        "socket: recv() that socket to get them, or close() to drop them")
                self._count = 0
                t = _io.target(sock)
                try:
                    first, count, end = receive_into(t, arena, flags, sock, self._backend)
                finally:
                    if t.shadow:
                        t.sock.detach()
            lens = arena.lens
            arena.deliver(end, False)  # the descriptors stay the batch's until taken
            # the rest of the commit: stores only, then return
            self._lens = lens
            self._count = count
            del filling[_FILLER]
            return count
        except BaseException:
            if filling.get(_FILLER) == me:
                del filling[_FILLER]
            raise

    def close(self) -> None:
        """Close descriptors not taken with fds(); the arena stays usable.

        Messages an interrupted recv took and did not deliver are dropped.
        """
        self._arena.release_fds()

    def __enter__(self) -> "RecvBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        arena = getattr(self, "_arena", None)
        if arena is not None:
            arena.release_fds()

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
        return self._arena.take_fds(self._index(i))

    def all_fds(self) -> list[int]:
        """Every descriptor of the last recv not yet taken, in message order, handed to the caller.

        The bulk twin of `fds(i)`, for consumers that handle a batch at
        once; `fd_counts()` says how many each message carried.
        """
        return self._arena.take_all_fds(self._count)

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
        messages = _messages(self._arena, 0, self._count)
        self._arena.hand_all()  # stores only: the descriptors are now in messages
        return messages
