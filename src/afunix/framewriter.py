"""The send half of the channel's frame codec: messages in, frame bytes and control data out.

No socket, no clock, no waiting: `FrameWriter` checks messages, splits
them into the writes the protocol needs (docs/PROTOCOL.md: a frame with
descriptors gets its own write, so the kernel attaches them to its first
byte), packs them with the active backend (in C on the C backend) and keeps
what was accepted and not yet written.  `afunix.Channel` moves its bytes to
the socket; `afunix.codec` is the receive half.
"""
from __future__ import annotations

import array
import socket
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

from . import _backend, _checks
from ._contract import Backend
from .batch import checked_fds, pinned, plain_pinned
from .frames import DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT
from .message import Message

#: Payload bytes joined per write: larger temporary buffers come from mmap
#: and go back at once on free, a page fault per 4 KiB every batch.
JOIN_MAX = 64 << 10
_SOL_SOCKET = int(socket.SOL_SOCKET)
from ._limits import FRAME_HEADER as HEADER_SIZE
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_EMPTY = memoryview(b"")
#: What a write takes: a frame made in Python, or a view of packed ones.
Frames = Union[bytes, memoryview]


class Segment:
    """Messages sent with one write: a run without descriptors, or one message with them."""

    __slots__ = ("datas", "lengths", "joined", "fds", "packed", "log")

    def __init__(self, datas: Any, lengths: List[int], joined: bytes,
                 fds: Tuple[int, ...] = (), packed: Optional[bytes] = None,
                 log: Optional[List[int]] = None) -> None:
        self.datas = datas
        self.lengths = lengths
        self.joined = joined
        self.fds = fds
        # the frame already packed: one of the lane's version-2 frames
        self.packed = packed
        # a lane frame's own list for the writer's `taken` (FrameWriter.begin):
        # the byte counts the kernel took of it, appended in the C call that
        # writes (see _chanio.write), kept with the frame after the write
        # ends: the lane's bookkeeping asks it whether its frame went
        self.log = log


def lane_segment(frame: bytes, fds: Tuple[int, ...] = (),
                 log: Optional[List[int]] = None) -> Segment:
    """One packed version-2 frame (frames.region_frame, slot_frame, return_frames) as a segment.

    `log`: see `Segment.log`.
    """
    payload = frame[HEADER_SIZE:]
    return Segment([payload], [len(payload)], payload, fds, frame, log)


class Records:
    """Record i of a buffer of fixed-size records, made only when asked (the C backend never asks)."""

    __slots__ = ("view", "size", "n")

    def __init__(self, view: memoryview, size: int, n: int) -> None:
        self.view, self.size, self.n = view, size, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> memoryview:
        if not 0 <= i < self.n:
            raise IndexError(i)
        view: memoryview = self.view[i * self.size:(i + 1) * self.size]
        return view

    def __iter__(self) -> Iterator[memoryview]:
        view, size = self.view, self.size
        return (view[i:i + size] for i in range(0, self.n * size, size))


def chunked(items: List[Any], lengths: List[int]) -> List[Segment]:
    """`items` as segments of at most about JOIN_MAX payload bytes each."""
    out: List[Segment] = []
    start = size = 0
    for i, n in enumerate(lengths):
        if size and size + n > JOIN_MAX:
            out.append(Segment(items[start:i], lengths[start:i], b"".join(items[start:i])))
            start, size = i, 0
        size += n
    out.append(Segment(items[start:], lengths[start:], b"".join(items[start:])))
    return out


def control(fds: Tuple[int, ...]) -> List[Tuple[int, int, bytes]]:
    """The control data (one SCM_RIGHTS entry) that carries `fds`, for sendmsg."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


class FrameWriter:
    """Messages in, frame bytes and control data out; keeps what is accepted and not written.

    The I/O loop asks `segments` (or `fixed`) for the writes a batch of
    messages needs, `pack` for the bytes of each and `control` for the
    descriptors of one, writes them (`begin`, the kernel's counts appended
    to `taken`), and `settle` keeps what did not go.  With a write buffer,
    messages without descriptors are kept (`queue_one`) until `take_queue`
    packs them.
    """

    __slots__ = ("impl", "max_frame", "write_buffer", "pending", "queue", "queued", "out",
                 "writing", "writing_lengths", "taken")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, write_buffer: int = 0,
                 backend: Optional[Backend] = None) -> None:
        self.impl = backend if backend is not None else _backend.impl
        self.max_frame = _checks.in_range(max_frame, "max_frame", 0, MAX_FRAME_LIMIT)
        self.write_buffer = _checks.in_range(write_buffer, "write_buffer", 0, 1 << 30)
        # frame bytes already promised: the tail of a partly written message,
        # or flushed buffered ones
        self.pending = _EMPTY
        # buffered payloads (bytes) not packed yet, and their frame bytes
        self.queue: List[bytes] = []
        self.queued = 0
        # where batches are packed, reused: a fresh large buffer per batch
        # costs a page fault per 4 KiB.  Nothing refers to it between calls
        # (a kept tail is copied out, and `pack` settles a write first).
        self.out = bytearray(0)
        # The write in progress: its bytes (None: none), the payload sizes
        # of its messages (None: the bytes are `pending`'s, all promised),
        # and the byte counts the kernel took of them.  The call that
        # writes appends its count to `taken` itself (see _chanio.write),
        # so an exception from a signal handler right after it cannot lose
        # it; `settle` turns the three into `pending`, with stores only.
        self.writing: Optional[Frames] = None
        self.writing_lengths: Optional[List[int]] = None
        self.taken: List[int] = []

    @property
    def unsent(self) -> int:
        """Bytes of accepted messages not written yet."""
        frames, lengths = self.writing, self.writing_lengths
        if frames is None:
            return len(self.pending) + self.queued
        # (a read only: another thread may ask while this one writes)
        done = sum(self.taken)
        end = len(frames) if lengths is None else cut(lengths, done)[1]
        return max(0, end - done) + self.queued

    def check_size(self, n: int) -> None:
        if n > self.max_frame:
            raise ValueError("message of %d bytes is over max_frame (%d)" % (n, self.max_frame))

    def segments(self, messages: Iterable[Any]) -> Tuple[List[Segment], int]:
        """Check `messages` and split them into write segments (validate once, up front)."""
        items = list(messages)  # one reading of the caller's list (see batch.outgoing)
        if not items:
            return [], 0
        limit = self.max_frame
        plain = plain_pinned(items)
        if plain is not None:  # the common case: plain byte strings
            items, lengths = plain
            if max(lengths) > limit:
                raise ValueError("a message of %d bytes is over max_frame (%d)"
                                 % (max(lengths), limit))
            if sum(lengths) <= JOIN_MAX:
                return [Segment(items, lengths, b"".join(items))], len(items)
            return chunked(items, lengths), len(items)
        segments: List[Segment] = []
        run: List[Any] = []
        run_lengths: List[int] = []
        for item in items:
            if isinstance(item, Message):
                data, fds = item.data, checked_fds(item.fds)  # may run the caller's fileno()
            else:
                data, fds = item, ()
            data, n = pinned(data)  # measured and pinned last: its size cannot change now
            if n > limit:
                raise ValueError("a message of %d bytes is over max_frame (%d)" % (n, limit))
            if fds:
                if run:
                    segments.append(Segment(run, run_lengths, b"".join(run)))
                    run, run_lengths = [], []
                segments.append(Segment([data], [n], bytes(data), fds))
            else:
                run.append(data)
                run_lengths.append(n)
        if run:
            segments.append(Segment(run, run_lengths, b"".join(run)))
        return segments, len(items)

    def fixed(self, buffer: Any, size: int) -> Optional[Segment]:
        """`buffer` as one segment of ``len(buffer) // size`` messages of `size` bytes; None when empty."""
        size = _checks.in_range(size, "size", 1, self.max_frame)
        data, nbytes = pinned(buffer)  # its size cannot change from here on
        if nbytes % size:
            raise ValueError("the buffer holds %d bytes, not a multiple of size %d" % (nbytes, size))
        n = nbytes // size
        if not n:
            return None
        view = memoryview(data).cast("B")
        return Segment(Records(view, size, n), [size] * n, view.tobytes())

    def pack(self, seg: Segment) -> memoryview:
        """The frames of `seg`, in the writer's reusable buffer (valid until the next pack)."""
        if seg.packed is not None:
            return memoryview(seg.packed)
        if self.writing is not None:
            self.settle()  # the buffer may hold what an interrupted write was writing
        return self._pack_into(seg.datas, seg.joined, seg.lengths,
                               [len(seg.fds)] if seg.fds else None)

    def _pack_into(self, datas: Any, joined: bytes, lengths: List[int],
                   nfds: Optional[List[int]]) -> memoryview:
        total = len(joined) + HEADER_SIZE * len(lengths)
        out = self.out
        pending = self.pending
        if (len(out) < total or (len(out) > (8 << 20) and total < len(out) // 8)
                or (pending and pending.obj is out)):
            # A new buffer, not a resize: a view of the old one may be
            # alive.  Never over bytes still pending: take_queue leaves
            # `pending` a view of this buffer, and a signal handler's
            # exception between this pack and the store that replaces
            # `pending` would leave it showing the new bytes.
            out = self.out = bytearray(max(total, 64 << 10))
        n = self.impl.pack_frames(out, datas, joined, lengths, nfds)
        return memoryview(out)[:n]

    def begin(self, frames: Frames, lengths: Optional[List[int]],
              taken: Optional[List[int]] = None) -> None:
        """Start writing `frames`: a segment's (`lengths`: its messages' payload sizes), or `pending`.

        The writer then appends each count the kernel takes to `taken`
        (which begin makes new, or the segment's `log`: see Segment.log),
        and `settle` ends the write.

        Raises:
            RuntimeError: a write is in progress (see `settle`), or a
                segment would go ahead of `pending`: a kept tail is never
                dropped or overtaken.
        """
        if self.writing is not None:
            raise RuntimeError("a write is in progress: settle it first")
        if lengths is not None and self.pending:
            raise RuntimeError("%d pending bytes must be written before the next segment"
                               % len(self.pending))
        self.taken, self.writing_lengths, self.writing = (
            [] if taken is None else taken), lengths, frames

    def settle(self) -> int:
        """End the write in progress, if any; how many of its messages count as sent.

        A segment's messages fully written and the one in progress count;
        the tail of the one in progress becomes `pending` (a message is
        never half-framed on the wire) and later ones are not started.  Of
        `pending`'s bytes, what was not written stays pending.  It may be
        interrupted anywhere (a signal handler's exception) and called
        again: it changes the state only at its end, with stores alone.
        """
        frames = self.writing
        if frames is None:
            return 0
        done = sum(self.taken)
        lengths = self.writing_lengths
        if lengths is None:
            k, end = 0, len(frames)
        elif done >= len(frames):
            k, end = len(lengths), done  # (all went: the common case, no walk)
        else:
            k, end = cut(lengths, done)
        # a copy: `frames` may be the reusable pack buffer's, or the caller's
        tail = memoryview(bytes(frames[done:end])) if done < end else _EMPTY
        self.pending, self.writing, self.taken = tail, None, []
        return k

    def must_flush_before(self, n: int) -> bool:
        """True when buffering a message of `n` bytes needs the buffered bytes written first."""
        return (self.queued + len(self.pending) + n + HEADER_SIZE > self.write_buffer
                and bool(self.queued or self.pending))

    def queue_one(self, data: bytes, n: int) -> bool:
        """Buffer one message (`data`, bytes, `n` long); True when the buffer is full."""
        # (the count first: the append is the one call, and an exception a
        # signal handler raises after it finds the two in step)
        self.queued += n + HEADER_SIZE
        self.queue.append(data)
        return self.queued >= self.write_buffer

    def take_queue(self) -> None:
        """Pack the buffered messages behind `pending`, to be written next."""
        if not self.queue:
            return
        if self.writing is not None:
            self.settle()  # (pending is then what follows the write)
        queue = self.queue
        # copied before the pack: it may be a view of the pack buffer
        head = bytes(self.pending)
        packed = self._pack_into(queue, b"".join(queue), [len(data) for data in queue], None)
        pending = memoryview(head + bytes(packed)) if head else packed
        # (stores only: an exception from a signal handler before them
        # leaves the messages queued, after them, pending)
        self.pending, self.queue, self.queued = pending, [], 0

    def drop_unsent(self) -> None:
        """Forget every message accepted and not written (the peer is gone, or after fork)."""
        self.writing = None
        self.pending = _EMPTY
        self.queue, self.queued = [], 0


def cut(lengths: List[int], done: int) -> Tuple[int, int]:
    """(messages begun, where the last of them ends) once `done` bytes of their frames went.

    `lengths`: the payload sizes of the messages whose frames are written.
    """
    if done <= 0:
        return 0, 0
    end = 0
    k = 0
    for n in lengths:
        end += HEADER_SIZE + n
        k += 1
        if end >= done:
            break
    return k, end


__all__ = ["FrameWriter", "Frames", "Segment", "Records", "chunked", "control", "cut",
           "lane_segment", "JOIN_MAX"]
