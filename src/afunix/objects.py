"""Python objects as messages: pickle protocol 5 with large buffers out of band.

Pure functions, no socket I/O, for the channel's ``send_object`` /
``recv_object`` (`afunix.Channel`; the OBJECT frame is read by
`afunix.codec.FrameReader`).  Sending:

1. `pickle_object` pickles with protocol 5; every buffer of at least
   `threshold` bytes -- a `pickle.PickleBuffer` from numpy and other
   protocol-5 types anywhere in the object, and the object itself when it
   is a ``bytes`` or ``bytearray`` -- is kept out of band, the rest stays in
   the pickle stream (a bytes or bytearray inside another object too:
   pickle writes those itself, see `_BytesOutOfBand`).
2. The caller copies each large part (the stream too, when it is large)
   into a slot of its region (`place_parts` does it with a `RegionWriter`,
   without waiting) or leaves it inline.
3. `encode_object` gives the parts of the OBJECT payload (docs/PROTOCOL.md,
   "Shared-memory lane"): they are sent as one message, without joining.

Receiving: `parse_envelope` checks the payload and names each buffer (inline
bytes of the payload, or a slot to claim), `load_object` unpickles with the
buffers.  Unpickling runs code the peer chose, so `check_unpickle_peer`
refuses a peer that runs as another user unless the caller trusts it.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import pickle
import struct
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Union

from . import _checks
from .fds import peer_credentials
from .frames import ProtocolError
from .shm import RegionWriter
from .lane import DEFAULT_THRESHOLD
from .slots import Slot, SlotAllocator

# (DEFAULT_THRESHOLD, the lane's: buffers of at least that many bytes travel
# out of band, in a slot of the region when there is one)

#: OBJECT payload header: number of parts (the stream and the out-of-band
#: buffers), reserved (0).
ENVELOPE_HEADER = struct.Struct("<II")
#: The most parts an OBJECT payload may have (the stream and 4095 buffers;
#: as many as a sender has slots outstanding, `afunix.slots.MAX_SLOTS`).  A
#: receiver refuses more before it builds anything per part: otherwise a
#: peer it will not even unpickle from could make it parse millions of
#: entries (2.8 M fit in a 64 MiB frame); `pickle_object` keeps the buffers
#: beyond it in the stream.
MAX_PARTS = 4096
#: One entry per part: kind, flags, 6 reserved zero bytes, offset, length.
ENVELOPE_ENTRY = struct.Struct("<BB6sQQ")
#: Entry kinds: the buffer's bytes follow in the payload, or lie in a slot of the region.
INLINE = 0
IN_REGION = 1
#: Entry flag: the sender's buffer was read-only (the stream too), so a
#: read-only copy rebuilds it (a ``bytes`` object, which pickle hands on
#: as it is, where a writable part is copied once more).  Only a choice of
#: the receiver's copy: a wrong flag changes whether an object is writable.
READ_ONLY = 1

_RESERVED = bytes(6)


class PickledObject:
    """An object pickled with protocol 5: the stream and its out-of-band buffers.

    `parts` is the pickle stream followed by the out-of-band buffers, in the
    order the stream names them; each a flat read-only byte view (the
    buffers are views of the object's own memory, no copy yet).  They keep
    those buffers exported: `release` them when the message is sent (a
    ``with`` block does).
    """

    __slots__ = ("parts", "read_only")

    def __init__(self, parts: List[memoryview], read_only: List[bool]) -> None:
        #: the pickle stream, then the out-of-band buffers: 1-D memoryviews of format "B"
        self.parts = parts
        #: per part: the object's own buffer is read-only (the stream is)
        self.read_only = read_only

    @property
    def pickle(self) -> memoryview:
        """The pickle stream."""
        return self.parts[0]

    @property
    def buffers(self) -> List[memoryview]:
        """The out-of-band buffers."""
        return self.parts[1:]

    def release(self) -> None:
        """Release the views of the stream and the object's buffers (idempotent)."""
        for view in self.parts:
            view.release()

    def __enter__(self) -> "PickledObject":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _out_of_band(threshold: int, buffers: List[memoryview],
                 read_only: List[bool]) -> Callable[[pickle.PickleBuffer], bool]:
    """A protocol-5 ``buffer_callback`` keeping buffers of at least `threshold` bytes out of band.

    Each buffer kept goes to `buffers` (a read-only view) and whether the
    object's own buffer is read-only to `read_only`; once `MAX_PARTS` - 1
    are kept, the rest stay in band.

    A closure over `buffers`, not a method of a Pickler subclass: a pickler
    that holds its own bound method is a reference cycle, and its memo then
    keeps every object it pickled, and their buffer exports, alive until the
    cycle collector runs (a bytearray stays unresizable, a loan cannot be
    committed, and CPython's collector crashes clearing a memoryview that
    is still exported).
    """
    def keep(buffer: pickle.PickleBuffer) -> bool:
        # True: serialize in band (small, not one flat block of memory, or
        # with MAX_PARTS parts already: the stream is one of them).
        if len(buffers) >= MAX_PARTS - 1:
            return True
        with memoryview(buffer) as shape:
            if not shape.contiguous or shape.nbytes < threshold:
                return True
        view = buffer.raw()
        # PyPy's raw() keeps the exporter's format and shape ("i" for an int
        # array, two dimensions for a grid): a part is flat bytes, so that
        # its len() is its size.
        flat = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        read_only.append(view.readonly)
        buffers.append(flat.toreadonly())
        flat.release()
        view.release()
        return False
    return keep


class _BytesOutOfBand:
    """Stands for a large bytes or bytearray object given itself: pickled as
    ``bytes(buffer)`` / ``bytearray(buffer)`` of an out-of-band PickleBuffer.

    pickle writes bytes and bytearray objects into the stream whatever their
    size, and CPython's pickler asks no hook (reducer_override, the dispatch
    table) about exact bytes or bytearray objects; so only one given itself
    can be sent out of band, by standing in for it here.
    """

    __slots__ = ("data",)

    def __init__(self, data: Union[bytes, bytearray]) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The stream names only builtins.bytes or bytearray: the peer needs no afunix to load it.
        return type(self.data), (pickle.PickleBuffer(self.data),)


def pickle_object(obj: Any, *, threshold: int = DEFAULT_THRESHOLD) -> PickledObject:
    """Pickle `obj` with protocol 5, buffers of at least `threshold` bytes out of band.

    Like ``pickle.dumps(obj, protocol=5, buffer_callback=...)``: protocol-5
    buffers (numpy arrays, `pickle.PickleBuffer`) of at least `threshold`
    bytes are kept out of band (at most `MAX_PARTS` - 1 of them), and so is
    `obj` itself when it is a large bytes or bytearray object.  A bytes or
    bytearray object inside another object stays in the stream, whatever
    its size (pickle gives no hook for exact bytes and bytearray); the
    stream itself can then travel in a slot.

    Raises:
        ValueError: threshold below 1.
        pickle.PicklingError (and whatever pickling `obj` raises).
    """
    threshold = _checks.in_range(threshold, "threshold", 1, (1 << 63) - 1)
    if (type(obj) is bytes or type(obj) is bytearray) and len(obj) >= threshold:
        obj = _BytesOutOfBand(obj)
    buffers: List[memoryview] = []
    read_only: List[bool] = [True]  # the stream: a bytes object
    stream = io.BytesIO()
    try:
        pickle.Pickler(stream, protocol=5,
                       buffer_callback=_out_of_band(threshold, buffers, read_only)).dump(obj)
    except BaseException:
        for view in buffers:
            view.release()
        raise
    return PickledObject([memoryview(stream.getvalue()), *buffers], read_only)


def place_parts(pickled: PickledObject, writer: Optional[RegionWriter], *,
                threshold: int = DEFAULT_THRESHOLD,
                keep: Optional[List[Slot]] = None) -> List[Optional[Slot]]:
    """Copy each part of at least `threshold` bytes into a free slot of `writer`; None: inline.

    Never waits: a part for which no slot is free now, or that is larger
    than the region, stays inline, as all do without a writer.  On an error, the slots already taken are given
    back before it is raised.  The slots are lent: say `RegionWriter.sending` before the frame naming them goes.
    `keep`: as for `SlotAllocator.try_allocate`; with it, the slots taken
    stay in it on an error, for its owner to give up.
    """
    threshold = _checks.in_range(threshold, "threshold", 1, (1 << 63) - 1)
    if writer is None:
        return [None] * len(pickled.parts)
    placed: List[Optional[Slot]] = []
    try:
        for view in pickled.parts:
            fits = threshold <= view.nbytes <= writer.size
            placed.append(writer.try_copy(view, keep) if fits else None)
    except BaseException:
        if keep is None:
            for slot in placed:
                if slot is not None:
                    writer.withdraw(slot.offset, slot.length)
        raise
    return placed


def inline_when_free(pickled: PickledObject, allocator: SlotAllocator, *,
                     threshold: int = DEFAULT_THRESHOLD) -> int:
    """The OBJECT payload's bytes when `place_parts` finds every slot of `allocator`'s region free.

    Pure bookkeeping on an empty copy of `allocator` (no memory, no system
    call): the placement is the one `place_parts` makes in that region when
    nothing else holds a slot (first fit, with its alignment), so a payload
    over max_frame here is over it however long the sender waits for returns.
    """
    empty = allocator.empty_copy()
    size = ENVELOPE_HEADER.size + ENVELOPE_ENTRY.size * len(pickled.parts)
    for view in pickled.parts:
        n = view.nbytes
        if not threshold <= n <= empty.size or empty.try_allocate(n) is None:
            size += n
    return size


def encode_object(pickled: PickledObject, slots: Sequence[Optional[Slot]]) -> List[Any]:
    """The OBJECT payload as parts to send back to back as one message (no join).

    `slots[i]` is the slot part i (0: the stream) was copied into, or
    None: that part goes inline.

    Raises:
        ValueError: `slots` does not have one entry per part, or a slot's
            length is not its part's.
    """
    parts = pickled.parts
    if len(slots) != len(parts):
        raise ValueError("%d slots for %d parts" % (len(slots), len(parts)))
    if len(parts) > MAX_PARTS:
        raise ValueError("%d parts, over the limit of %d" % (len(parts), MAX_PARTS))
    table = bytearray(ENVELOPE_HEADER.pack(len(parts), 0))
    inline: List[Any] = []
    for view, slot, read_only in zip(parts, slots, pickled.read_only):
        flags = READ_ONLY if read_only else 0
        if slot is None:
            table += ENVELOPE_ENTRY.pack(INLINE, flags, _RESERVED, 0, view.nbytes)
            if view.nbytes:
                inline.append(view)
        else:
            if slot.length != view.nbytes:
                raise ValueError("slot of %d bytes for a part of %d" % (slot.length, view.nbytes))
            table += ENVELOPE_ENTRY.pack(IN_REGION, flags, _RESERVED, slot.offset, slot.length)
    return [bytes(table), *inline]


class ObjectEnvelope(NamedTuple):
    """A received OBJECT payload: the pickle stream and the out-of-band buffers, in order.

    Each part is a memoryview of the payload (inline) or the `Slot` that
    holds it (to claim from the region, and return when read);
    `read_only[i]`: the sender flagged part i READ_ONLY (a hint for the
    kind of copy to make, nothing more).
    """

    parts: List[Union[memoryview, Slot]]
    read_only: List[bool]

    @property
    def pickle(self) -> Union[memoryview, Slot]:
        """The pickle stream (part 0)."""
        return self.parts[0]

    @property
    def buffers(self) -> List[Union[memoryview, Slot]]:
        """The out-of-band buffers (parts 1 and on)."""
        return self.parts[1:]


def parse_envelope(payload: Any) -> ObjectEnvelope:
    """Check an OBJECT payload received from the peer and name its parts (no copy).

    Raises:
        ProtocolError: shorter than its header and table, no parts or more
            than `MAX_PARTS` (refused before anything per part is built),
            reserved bytes not zero, an unknown entry kind or flag, an empty
            stream or slot, inline lengths that do not add up to the payload.
    """
    view = memoryview(payload).cast("B")
    size = view.nbytes
    if size < ENVELOPE_HEADER.size:
        raise ProtocolError("object payload of %d bytes is shorter than its header" % size)
    count, reserved = ENVELOPE_HEADER.unpack_from(view)
    if reserved:
        raise ProtocolError("object payload: reserved header field is %d, not 0" % reserved)
    if count > MAX_PARTS:
        raise ProtocolError("object payload of %d parts, over the limit of %d"
                            % (count, MAX_PARTS))
    position = ENVELOPE_HEADER.size + count * ENVELOPE_ENTRY.size
    if count == 0 or position > size:
        raise ProtocolError("object payload of %d bytes cannot hold %d parts" % (size, count))
    parts: List[Union[memoryview, Slot]] = []
    read_only: List[bool] = []
    for i in range(count):
        kind, flags, pad, offset, length = ENVELOPE_ENTRY.unpack_from(
            view, ENVELOPE_HEADER.size + i * ENVELOPE_ENTRY.size)
        if pad != _RESERVED:
            raise ProtocolError("object payload: reserved bytes of part %d are not 0" % i)
        if flags & ~READ_ONLY:
            raise ProtocolError("object payload: part %d has unknown flags 0x%02x" % (i, flags))
        read_only.append(bool(flags & READ_ONLY))
        if i == 0 and length == 0:
            raise ProtocolError("object payload: empty pickle stream")
        if kind == INLINE:
            if offset != 0 or length > size - position:
                raise ProtocolError("object payload: inline part %d (%d bytes) overruns it"
                                    % (i, length))
            parts.append(view[position:position + length])
            position += length
        elif kind == IN_REGION:
            if length == 0:
                raise ProtocolError("object payload: part %d names an empty slot" % i)
            parts.append(Slot(offset, length))
        else:
            raise ProtocolError("object payload: part %d has unknown kind %d" % (i, kind))
    if position != size:
        raise ProtocolError("object payload: %d bytes after its last part" % (size - position))
    return ObjectEnvelope(parts, read_only)


def load_object(stream: Any, buffers: Sequence[Any]) -> Any:
    """Unpickle `stream` with its out-of-band `buffers` (bytes-like objects, in order).

    Like ``pickle.loads(stream, buffers=buffers)``.  A bytes object sent out
    of band is the buffer given when that is a ``bytes`` object (no copy),
    a copy of it otherwise; a bytearray is rebuilt as a copy; an object that
    keeps its buffer (a numpy array) refers to the buffer given, so pass a
    copy of a region's view unless that slot stays held as long as the
    object lives.
    Call `check_unpickle_peer` first.

    Raises:
        what pickle.loads raises for a bad stream (pickle.UnpicklingError and others).
    """
    return pickle.loads(stream, buffers=buffers)


def peer_uid(sock: Any) -> Optional[int]:
    """The connected peer's effective uid (SO_PEERCRED), or None where the kernel cannot say.

    The kernel cannot say for a socket other than AF_UNIX (an error) nor
    for one without peer credentials, not connected or a datagram socket
    (it answers uid -1).
    """
    try:
        uid = peer_credentials(sock).uid
    except OSError:
        return None
    return None if uid == -1 else uid


@functools.lru_cache(maxsize=None)
def overflow_uid() -> int:
    """The uid the kernel shows for any uid this user namespace does not map (65534 by default)."""
    try:
        with open("/proc/sys/kernel/overflowuid", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def check_unpickle_peer(uid: Optional[int], *, trusted: bool = False) -> None:
    """Refuse to unpickle from a peer running as another user, unless it is trusted.

    `uid` is the peer's uid from SO_PEERCRED (`peer_uid`, read once per
    connection), None when unknown.  Unpickling runs whatever code the peer
    put into the stream, with this process's rights: that is only harmless
    from a peer that already has them, one with this process's effective
    uid (``os.geteuid()``: a set-user-ID program must not run code for the
    user who started it).  ``trusted=True`` skips the check, as
    ``multiprocessing`` trusts a peer that knows its authkey.

    The overflow uid (`overflow_uid`, "nobody") counts as unknown: the
    kernel shows it for every uid the reader's user namespace does not map,
    so a peer showing it may be anyone, and a process that runs as it (as
    nobody, or in a user namespace without a uid map) would otherwise take
    every such peer for itself.

    SO_PEERCRED gives the credentials of the process that called
    ``connect`` or ``socketpair``, not of the one holding the other end
    now: an end handed to a process that then changes its uid (a child
    that drops privileges after ``fork``) still shows its creator's uid.

    Raises:
        PermissionError: the peer's uid is unknown, the overflow uid, or
            not this process's effective uid, and `trusted` is false.
    """
    if trusted:
        return
    own = os.geteuid()
    if uid is None:
        raise PermissionError(errno.EACCES, "refusing to unpickle: the peer's uid is unknown "
                              "(open the channel as trusting its peer to allow it)")
    if uid == overflow_uid():
        raise PermissionError(errno.EACCES, "refusing to unpickle: the peer's uid reads as the "
                              "overflow uid %d, which stands for any uid this user namespace "
                              "does not map (open the channel as trusting its peer to allow it)"
                              % uid)
    if uid != own:
        raise PermissionError(errno.EACCES, "refusing to unpickle from a peer of uid %d (this "
                              "process runs as uid %d; open the channel as trusting its peer "
                              "to allow it)" % (uid, own))
