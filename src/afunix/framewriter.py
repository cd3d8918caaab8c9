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
from typing import Any, Iterable, Iterator, List, Optional, Tuple

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
        # where the writes of this segment append the byte counts the kernel
        # took, in the same C call as the write (see _chanio.write): the
        # lane's bookkeeping asks it whether its frame went
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
    descriptors of one, writes them, and tells the writer what did not go
    (`keep_tail`, `wrote`).  With a write buffer, messages without
    descriptors are kept (`queue_one`) until `take_queue` packs them.
    """

    __slots__ = ("impl", "max_frame", "write_buffer", "pending", "queue", "queue_lengths",
                 "queued", "out")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, write_buffer: int = 0,
                 backend: Optional[Backend] = None) -> None:
        self.impl = backend if backend is not None else _backend.impl
        self.max_frame = _checks.in_range(max_frame, "max_frame", 0, MAX_FRAME_LIMIT)
        self.write_buffer = _checks.in_range(write_buffer, "write_buffer", 0, 1 << 30)
        # frame bytes already promised: the tail of a partly written message,
        # or flushed buffered ones
        self.pending = _EMPTY
        # buffered payloads (immutable) not packed yet, their sizes, and
        # their frame bytes
        self.queue: List[bytes] = []
        self.queue_lengths: List[int] = []
        self.queued = 0
        # where batches are packed, reused: a fresh large buffer per batch
        # costs a page fault per 4 KiB.  Nothing refers to it between calls
        # (a kept tail is copied out).
        self.out = bytearray(0)

    @property
    def unsent(self) -> int:
        """Bytes of accepted messages not written yet."""
        return len(self.pending) + self.queued

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
        return self._pack_into(seg.datas, seg.joined, seg.lengths,
                               [len(seg.fds)] if seg.fds else None)

    def _pack_into(self, datas: Any, joined: bytes, lengths: List[int],
                   nfds: Optional[List[int]]) -> memoryview:
        total = len(joined) + HEADER_SIZE * len(lengths)
        out = self.out
        if len(out) < total or (len(out) > (8 << 20) and total < len(out) // 8):
            # a new buffer, not a resize: a view of the old one may be alive
            out = self.out = bytearray(max(total, 64 << 10))
        n = self.impl.pack_frames(out, datas, joined, lengths, nfds)
        return memoryview(out)[:n]

    def keep_tail(self, seg: Segment, packed: memoryview, done: int) -> int:
        """`done` bytes of `packed` (the frames of `seg`) went: the messages that count as sent.

        Those fully written and the one in progress count; the tail of the
        one in progress becomes `pending` (a message is never half-framed on
        the wire); later messages are not started.

        Raises:
            RuntimeError: `pending` was not written first (see `wrote`): the
                bytes of `seg` went ahead of it, and a kept tail is never
                dropped.
        """
        if self.pending:
            raise RuntimeError("%d pending bytes must be written before the next segment"
                               % len(self.pending))
        if done >= len(packed):
            return len(seg.lengths)
        if done == 0:
            return 0
        end = 0
        k = 0
        for n in seg.lengths:
            end += HEADER_SIZE + n
            k += 1
            if end >= done:
                break
        if end > done:
            self.pending = memoryview(packed[done:end].tobytes())
        return k

    def wrote(self, done: int) -> None:
        """`done` bytes of `pending` went; the rest is copied out of the reusable pack buffer."""
        pending = self.pending
        if not 0 <= done <= len(pending):
            raise ValueError("%d bytes written of %d pending" % (done, len(pending)))
        self.pending = memoryview(pending[done:].tobytes()) if done < len(pending) else _EMPTY

    def must_flush_before(self, n: int) -> bool:
        """True when buffering a message of `n` bytes needs the buffered bytes written first."""
        return (self.queued + len(self.pending) + n + HEADER_SIZE > self.write_buffer
                and bool(self.queued or self.pending))

    def queue_one(self, data: bytes, n: int) -> bool:
        """Buffer one message (`data`, immutable, `n` bytes); True when the buffer is full."""
        self.queue.append(data)
        self.queue_lengths.append(n)
        self.queued += n + HEADER_SIZE
        return self.queued >= self.write_buffer

    def take_queue(self) -> None:
        """Pack the buffered messages behind `pending`, to be written next."""
        if not self.queue:
            return
        queue, lengths = self.queue, self.queue_lengths
        self.queue, self.queue_lengths, self.queued = [], [], 0
        packed = self._pack_into(queue, b"".join(queue), lengths, None)
        self.pending = packed if not self.pending else memoryview(
            bytes(self.pending) + bytes(packed))

    def drop_unsent(self) -> None:
        """Forget every message accepted and not written (the peer is gone, or after fork)."""
        self.pending = _EMPTY
        self.queue, self.queue_lengths, self.queued = [], [], 0


__all__ = ["FrameWriter", "Segment", "Records", "chunked", "control", "lane_segment", "JOIN_MAX"]
