"""The backend contract: what both backends define, and the types it uses.

`Backend` is written down here, beside the types its functions take and
return; _cbackend (the C core) and _stdlib (the socket module) both provide
exactly its functions and flags, with the same signatures
(tests/test_backend.py checks it), and _backend chooses one.  A leaf:
it imports nothing from afunix, so the backends can import it.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence


class Outgoing(NamedTuple):
    """Messages to send, checked and split into parallel lists by the topic layer."""

    datas: list[Any]                     # bytes-like, C-contiguous
    lengths: list[int]                   # nbytes of each
    fds: Optional[list[tuple[int, ...]]]  # None when no message has descriptors
    addresses: Optional[list[Optional[bytes]]]  # sun_path bytes; None: no addresses at all
    credentials: Optional[list[Optional[tuple[int, int, int]]]]
    joined: Optional[bytes] = None       # all datas back to back, when already made
    fd_counts: Optional[list[int]] = None  # len() of each fds entry, when already made
    fd_flat: Optional[Sequence[int]] = None  # every fds entry back to back, when already made
    # (a list, or an array.array of 4-byte C ints checked to be from 0 to INT_MAX)


class Arena(Protocol):
    """A receive area: what new_arena returns and recv_batch fills (both backends).

    Hand-over state (csrc/afunix.h, struct afunix_arena): messages
    [delivered, count) were received and not given to the caller yet, and
    recv_batch returns them again before it asks the kernel; descriptors
    stay the arena's, closed by the next receive or release_fds, until given
    over.  deliver, take_fds, take_all_fds and hand_all give things over with
    stores only, so an exception from a signal handler cannot cut them short.
    """

    max_messages: int
    bufsize: int
    maxfds: int
    view: memoryview
    lens: Sequence[int]
    owner: Any  # the socket object of the receive that filled the arena

    def first(self) -> int: ...
    def pending(self) -> bool: ...
    def deliver(self, upto: int, hand_fds: bool) -> None: ...
    def length(self, i: int) -> int: ...
    def msg_flags(self, i: int) -> int: ...
    def held_fds(self, start: int, stop: int) -> list[tuple[int, ...]]: ...
    def take_fds(self, i: int) -> list[int]: ...
    def take_all_fds(self, count: int) -> list[int]: ...
    def hand_all(self) -> None: ...
    def release_fds(self) -> None: ...
    def fd_counts(self, count: int) -> list[int]: ...
    def address(self, i: int) -> Optional[bytes]: ...
    def credentials(self, i: int) -> Optional[tuple[int, int, int]]: ...
    def plain(self) -> bool: ...
    def chunks(self, start: int, stop: int) -> list[bytes]: ...
    def all_flags(self, start: int, stop: int) -> list[int]: ...
    def lengths(self, count: int) -> list[int]: ...


class FrameTable(Protocol):
    """Where parse_frames writes (both backends): one entry per complete frame.

    offsets/lengths/nfds are memoryviews of format "I", `capacity` long: the
    payload offset in the parsed buffer, its length, its declared descriptor
    count.  The other fields describe the last parse.
    """

    capacity: int
    offsets: memoryview
    lengths: memoryview
    nfds: memoryview
    count: int
    consumed: int  # bytes of the frames found, headers included
    uniform: int  # the length all frames found share, -1 when they differ
    with_fds: int  # frames found that declare descriptors
    need: int  # bytes the first incomplete frame needs in all, 0 when none


class ChanState(Protocol):
    """The fields of a channel's receive state (struct afunix_chan_rx, csrc/channel.h)."""

    end: int
    base: int
    errors: int
    head: int
    tail: int
    lo: Any  # per slot, indexable
    hi: Any
    frame: Any
    nfds: Any
    deferred: int  # nonzero: a read taken and not reported yet; the next chan_recv reports it


class ChanRx(Protocol):
    """A channel's receive state: what new_chan_rx returns and chan_recv records into."""

    s: ChanState
    reads: int  # slots for held reads
    no_data: int  # the bit in s.errors for descriptors that came with no byte
    empty_record: int  # the bit in s.errors for an empty SOCK_SEQPACKET record with more after it


class Backend(Protocol):
    """The backend contract: what _cbackend and _stdlib both define, and nothing more.

    Arguments arrive already checked by the topic modules.  Capability flags
    are plain module constants (``HAS_*``), read through the selected
    backend, never from a backend module directly.
    """

    #: sendmmsg/recvmmsg move a whole batch in one system call.
    HAS_SENDMMSG: bool

    def socketpairs(
        self, n: int, type: int, blocking: bool
    ) -> list[tuple[socket.socket, socket.socket]]: ...

    def send_batch(
        self, sock: socket.socket, out: Outgoing, start: int, count: int, flags: int
    ) -> int: ...

    def send_message(
        self, sock: socket.socket, data: Any, fds: tuple[int, ...],
        credentials: Optional[tuple[int, int, int]], flags: int
    ) -> int: ...

    def new_arena(self, max_messages: int, bufsize: int, maxfds: int) -> Arena: ...

    # ---- one message per call: -1 / None sends the call down the careful path ----

    def try_send_one(self, sock: socket.socket, data: Any, flags: int) -> int: ...

    def try_send_fds(
        self, sock: socket.socket, data: Any, fds: tuple[int, ...], flags: int
    ) -> int: ...

    def try_recv(self, sock: socket.socket, arena: Arena, flags: int) -> int: ...

    def try_recv_one(
        self, sock: socket.socket, arena: Arena, flags: int
    ) -> Optional[tuple[bytes, list[int], int]]: ...

    def recv_batch(self, sock: socket.socket, arena: Arena, flags: int) -> int: ...

    # ---- message channel (docs/PROTOCOL.md) ----

    def new_frame_table(self, capacity: int) -> FrameTable: ...

    def parse_frames(
        self, table: FrameTable, buf: bytearray, start: int, end: int,
        max_frames: int, max_frame: int,
    ) -> int: ...

    def pack_frames(
        self, out: bytearray, datas: Sequence[Any], joined: bytes, lengths: Sequence[int],
        nfds: Optional[Sequence[int]],
    ) -> int: ...

    def new_chan_rx(self) -> ChanRx: ...

    def chan_recv(
        self, sock: socket.socket, rx: ChanRx, buffer: bytearray, maxlen: int, flags: int,
        records: int = 1,
    ) -> int: ...

    def chan_drop(self, rx: ChanRx, upto: int, every: bool) -> None: ...

    def chan_fds(self, rx: ChanRx, slot: int) -> list[int]: ...

    def chan_hold(self, rx: ChanRx, nbytes: int, fds: list[int], flags: int) -> None:
        """Record `nbytes` already placed at rx.s.end, with `fds` and the msg `flags`, as chan_recv records a read.

        The way bytes that did not come from a socket enter a channel's receive
        state (afunix.codec.FrameReader.feed).  `fds` are held from here on.
        Refuses, as chan_recv does, with ENOBUFS when no slot is free (or with
        more than SCM_MAX_FD descriptors): then nothing is recorded and `fds`
        stay the caller's.  The caller checks that the bytes fit the buffer.
        """
        ...

    def close_fds(self, fds: Sequence[int]) -> None: ...

    # ---- shared-memory lane (afunix.shm) ----

    def copy_streaming(self, target: memoryview, source: memoryview) -> None:
        """Copy `source` into `target`: flat byte views of the same length, `target` writable.

        The twin of ``target[:] = source``, for large copies into a region:
        the C core's stores bypass the cache (csrc/copy.c says why).
        Raises ValueError when the lengths differ (nothing copied).
        """
        ...

    # ---- for the benchmark's overhead rows ----

    def bare_calls(
        self, sock: socket.socket, size: int
    ) -> tuple[Callable[[bytes], Any], Callable[[], Any], Callable[[], None]]: ...
