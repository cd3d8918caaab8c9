"""The message channel's frames: header, limits, ProtocolError and the batch views.

The wire format is written down in docs/PROTOCOL.md; codec.py applies its
rules to bytes, channel.py moves the bytes over a socket.
"""
from __future__ import annotations

import errno
import struct
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from . import _checks
from ._limits import FRAME_HEADER as HEADER_SIZE
from ._limits import FRAME_MAGIC as MAGIC
from ._limits import FRAME_VERSION as VERSION
from ._limits import RECORD_MAX as RECORD_MAX

#: Default and largest accepted `max_frame` (payload bytes of one message).
DEFAULT_MAX_FRAME = 64 << 20
MAX_FRAME_LIMIT = 1 << 30

_HEADER = struct.Struct("<IBBBB")  # length, nfds, flags, version, magic

_headers: Dict[int, bytes] = {}


def frame_header(length: int, nfds: int = 0) -> bytes:
    """The header of a frame of `length` payload bytes declaring `nfds` descriptors."""
    if nfds:
        return _HEADER.pack(length, nfds, 0, VERSION, MAGIC)
    head = _headers.get(length)
    if head is None:
        head = _HEADER.pack(length, 0, 0, VERSION, MAGIC)
        if len(_headers) < 4096:
            _headers[length] = head
    return head


# ---- the shared-memory lane's frames (docs/PROTOCOL.md, "Shared-memory lane") ----
#
# DATA frames stay version 1 byte for byte; only the lane's own frames are
# version 2, their kind in the `flags` byte.  They are few and small, so
# they are packed and parsed here in Python, off the backends' hot path.

#: The `version` byte of the lane's frames.
LANE_VERSION = 2
#: Frame kinds of version 2 (the `flags` byte).
KIND_REGION = 1
KIND_SLOT = 2
KIND_RETURN = 3
KIND_OBJECT = 4
#: Bytes of one (offset, length) pair of a SLOT or RETURN frame.
PAIR_SIZE = 16
#: Most slots one RETURN frame names: a receiver's control frames stay far
#: below any receive buffer, whatever its max_frame.
RETURN_MAX_SLOTS = 4096

_REGION_SIZE = struct.Struct("<Q")
_PAIR = struct.Struct("<QQ")


def lane_header(length: int, nfds: int, kind: int) -> bytes:
    """The header of a version-2 frame of `kind` with `length` payload bytes and `nfds` descriptors."""
    return _HEADER.pack(length, nfds, kind, LANE_VERSION, MAGIC)


def region_frame(size: int) -> bytes:
    """The REGION frame announcing a region of `size` bytes (its descriptor rides on it)."""
    return lane_header(8, 1, KIND_REGION) + _REGION_SIZE.pack(size)


def slot_frame(offset: int, length: int, nfds: int = 0) -> bytes:
    """The SLOT frame naming the message in ``region[offset:offset + length]``."""
    return lane_header(PAIR_SIZE, nfds, KIND_SLOT) + _PAIR.pack(offset, length)


def return_frames(slots: Iterable[Tuple[int, int]]) -> List[bytes]:
    """RETURN frames giving `slots` back, at most RETURN_MAX_SLOTS per frame."""
    pairs = [_PAIR.pack(offset, length) for offset, length in slots]
    out = []
    for i in range(0, len(pairs), RETURN_MAX_SLOTS):
        chunk = pairs[i:i + RETURN_MAX_SLOTS]
        out.append(lane_header(PAIR_SIZE * len(chunk), 0, KIND_RETURN) + b"".join(chunk))
    return out


def unpack_header(data: bytes | bytearray | memoryview, at: int = 0) -> Tuple[int, int, int, int, int]:
    """length, nfds, flags (kind), version, magic of the header at `at`."""
    length, nfds, flags, version, magic = _HEADER.unpack_from(data, at)
    return length, nfds, flags, version, magic


def unpack_region(payload: bytes) -> int:
    """The size a REGION frame's 8-byte payload announces."""
    (size,) = _REGION_SIZE.unpack(payload)
    return int(size)


def unpack_pairs(payload: bytes) -> List[Tuple[int, int]]:
    """The (offset, length) pairs of a SLOT or RETURN payload (a multiple of 16 bytes)."""
    return [(int(o), int(n)) for o, n in _PAIR.iter_unpack(payload)]


class ProtocolError(OSError):
    """The peer broke the channel protocol; the channel is closed.

    Raised for a peer that closed mid-frame, a frame over `max_frame`, a
    malformed header, descriptors that do not match a frame's declared count
    or that the kernel cut (MSG_CTRUNC), and a SOCK_SEQPACKET record over
    RECORD_MAX bytes or empty.  An OSError (errno EPROTO), like the kernel's own
    answers: it is about what came over the socket, not about the caller's
    arguments (those are TypeError/ValueError), and code that handles a
    failed connection with ``except OSError`` handles it too.  Every
    descriptor received and not yet handed over is closed before it is raised.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, message)


class MessageKindError(TypeError):
    """The next message is not of the kind this receive takes; nothing was taken.

    An object (sent by `Channel.send_object`) comes out of
    `Channel.recv_object` only, and a message of bytes out of the other
    receives only: each receive refuses the other kind with this error and
    leaves the message where it was, so the receive that takes it gets it
    next.  A TypeError: the message's type is what is wrong, as an
    argument's type would be.
    """


class FrameBatch:
    """Messages received by `Channel.recv_batch`, in place in the channel's buffer.

    ``batch[i]`` is a read-only memoryview of message i; for callers that want no
    object per message, `buffer`, `offsets` and `lengths` give message i as
    ``buffer[offsets[i]:offsets[i] + lengths[i]]``, and when `size` is not
    None every message has that length and message i starts at
    ``start + HEADER_SIZE + i * (size + HEADER_SIZE)``.  Valid until the next
    receive on the channel.  Descriptors of message i are handed over by
    ``fds(i)``; those not taken are closed at the next receive or close.

    A message that came through the peer's shared-memory lane is a batch of
    its own: `buffer` is its slot of the peer's region (read-only),
    `offsets` and `lengths` have format "Q" (a slot may hold more than 4 GiB),
    and ``buffer[start:end]`` is the message, with no header.  The slot goes
    back to the peer at the next receive, and the view is released then.
    """

    __slots__ = ("buffer", "offsets", "lengths", "size", "start", "end", "_take")

    def __init__(self, buffer: memoryview, offsets: memoryview, lengths: memoryview,
                 size: Optional[int], start: int, end: int,
                 take: Optional[Callable[[int], List[int]]]) -> None:
        #: the channel's whole receive buffer (read-only)
        self.buffer = buffer
        #: payload offsets into `buffer` (memoryview of format "I")
        self.offsets = offsets
        #: payload lengths (memoryview of format "I")
        self.lengths = lengths
        #: the length every message of the batch has, or None when they differ
        self.size = size
        #: buffer[start:end] holds the batch's frames, headers included
        self.start = start
        self.end = end
        # gives message i's descriptors over, once (the channel holds them)
        self._take = take

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> memoryview:
        if type(i) is not int:
            i = _checks.index(i, "FrameBatch")
        o = self.offsets[i]
        view: memoryview = self.buffer[o:o + self.lengths[i]]
        return view

    def __iter__(self) -> Iterator[memoryview]:
        buf = self.buffer
        for o, n in zip(self.offsets, self.lengths):
            yield buf[o:o + n]

    def fds(self, i: int) -> List[int]:
        """Message i's descriptors, handed to the caller (who must close them).

        An empty list once the next receive began or the channel closed.
        A take from a channel claims its receiving side, as a receive does.

        Raises:
            RuntimeError: another thread is receiving on the channel.
        """
        if type(i) is not int:
            i = _checks.index(i, "FrameBatch")
        if i < 0:
            i += len(self.offsets)
        if not 0 <= i < len(self.offsets):
            raise IndexError("FrameBatch index out of range")
        take = self._take
        return take(i) if take is not None else []

    def _close(self) -> None:
        """The next receive began: descriptors not taken stay the channel's, which closes them."""
        self._take = None


def end_batch(batch: FrameBatch) -> None:
    """The receive after `batch` began: its descriptors not taken are no longer handed out."""
    batch._close()


def taker_of(batch: FrameBatch) -> Optional[Callable[[int], List[int]]]:
    """What `batch.fds` calls; None once the batch ended (`end_batch`)."""
    return batch._take
