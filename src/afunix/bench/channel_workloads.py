"""The messaging section of ``python -m afunix bench``: afunix.Channel against what Python uses today.

Every row moves numbered messages (a little-endian uint64 sequence number
in the first 8 bytes) one way between two processes; the receiver checks the
count and the sum of the numbers, as everywhere in the benchmark.  In these
rows the two afunix columns are the channel on each backend and the base
column is what a Python program uses today for the same job, which the
row's workload names:

  chan-batched   send_many / recv_many   vs a careful stdlib framed stream
                 (length prefix, bytearray batches + sendall; recv_into +
                 struct.unpack_from)
  chan-zerocopy  send_fixed / recv_batch (no object per message)  vs the
                 same careful framed stream
  chan-single    one send / one recv call per message, SOCK_SEQPACKET  vs
                 the stdlib SEQPACKET send/recv loop
  large-stream   Channel.send / recv of 64 KiB to 16 MiB messages  vs a
                 careful sendall / recv_into loop (and sendmmsg / recv in C)
  lane-stream    the same through the shared-memory lane (copied into a
                 slot, copied out by recv)  vs the same loop
  loan-stream    ch.loan + ch.send_loan (filled in the slot, not copied),
                 copied out by recv  vs the same loop
  loan-view      the same loans, taken with recv_batch (a view of the slot,
                 only the number read)  vs the same loop

The lane's senders and the object senders (send_object / recv_object of one
large bytes object or numpy array) are here too; the rows that put them
against multiprocessing and pyzmq are declared in registry.py with peers.py.

The channel's framing in plain C (csrc/reference/channel_reference.c) is
a different program from every one of these, so it has a row of its own,
``c-framing``, with only the C column.  The rows against third-party tools and
multiprocessing are in peers.py.  The workloads and their columns are
declared in registry.py; the rows are in matrix.py.
"""
from __future__ import annotations

import array
import importlib
import socket
import struct
import sys
from typing import Any, Callable, List

import afunix

from .._limits import FRAME_HEADER
from ..lane import DEFAULT_THRESHOLD
from . import _reference
from .matrix import KIB, Row
from .workloads import Mismatch, Received

_SEQ = struct.Struct("<Q")
_PREFIX = struct.Struct("<I")  # the careful stdlib stream's length prefix
_LITTLE = sys.byteorder == "little"


def message_maker(size: int) -> Callable[[int], bytes]:
    """A function i -> the numbered message i of `size` bytes, one C call per message."""
    return struct.Struct("<Q%dx" % (size - 8)).pack


class Numbered:
    """Numbered messages of one size: new bytes for small ones, one buffer renumbered for large.

    A large message is not rebuilt per send (that would time the allocator):
    the sender writes the next number into the same buffer, as a program
    sending from its own buffer does.  Only for calls that are done with the
    buffer when they return.
    """

    LARGE = 64 * KIB

    def __init__(self, size: int) -> None:
        self._make = message_maker(size) if size < self.LARGE else None
        self._buf = bytearray(size if self._make is None else 0)

    def __call__(self, i: int) -> Any:
        if self._make is not None:
            return self._make(i)
        _SEQ.pack_into(self._buf, 0, i)
        return self._buf


def checksum_of(messages: List[Any], size: int) -> int:
    """The sum of the numbers of `messages`, checking each is `size` bytes; no Python loop."""
    if not messages:
        return 0
    if set(map(len, messages)) != {size}:
        raise Mismatch("a message of another length than %d bytes" % size)
    total = 0
    # joined a slice at a time: a large temporary buffer would come from
    # mmap and cost page faults in the measured loop
    step = max(1, (32 << 10) // size)
    for k in range(0, len(messages), step):
        joined = b"".join(messages[k:k + step])
        if _LITTLE and size % 8 == 0:
            total += sum(memoryview(joined).cast("Q")[::size // 8])
        else:
            total += sum(_SEQ.unpack_from(joined, i)[0] for i in range(0, len(joined), size))
    return total


def _channel(sock: socket.socket) -> Any:
    # The channel takes the socket over; the runner's child exits right after.
    return afunix.Channel(sock)


# ---- the channel ------------------------------------------------------------------

def chan_send_batched(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.send_many() of a batch of messages per call."""
    ch = _channel(sock)
    make, send_many, batch = message_maker(row.size), ch.send_many, row.batch
    for start in range(0, count, batch):
        messages = list(map(make, range(start, min(start + batch, count))))
        if send_many(messages) != len(messages):
            raise Mismatch("send_many sent part of a batch on a blocking socket")
    ch.close()
    return Received(count)


def chan_recv_many(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.recv_many(): every message one read brought, as bytes."""
    ch = _channel(sock)
    recv_many, size = ch.recv_many, row.size
    got = total = 0
    while got < count:
        messages = recv_many()
        if not messages:
            break
        got += len(messages)
        total += checksum_of(messages, size)
    return Received(got, total)


def chan_send_fixed(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.send_fixed(): a batch of fixed-size records from one buffer per call."""
    ch = _channel(sock)
    size, batch = row.size, row.batch
    buf = bytearray(size * batch)
    numbers = memoryview(buf).cast("Q")[::size // 8] if _LITTLE else None
    for start in range(0, count, batch):
        n = min(batch, count - start)
        if numbers is not None:
            numbers[:n] = array.array("Q", range(start, start + n))
        else:
            for i in range(n):
                _SEQ.pack_into(buf, i * size, start + i)
        if ch.send_fixed(buf if n == batch else memoryview(buf)[:n * size], size) != n:
            raise Mismatch("send_fixed sent part of a batch on a blocking socket")
    ch.close()
    return Received(count)


def chan_recv_batch(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.recv_batch(): the zero-copy receive, numbers summed in place, no object per message."""
    ch = _channel(sock)
    size = row.size
    stride = (size + FRAME_HEADER) // 8
    got = total = 0
    while got < count:
        batch = ch.recv_batch()
        n = len(batch)
        if not n:
            break
        if batch.size != size:
            raise Mismatch("a message of another length than %d bytes" % size)
        if _LITTLE and size % 8 == 0:
            frames = batch.buffer[batch.start + FRAME_HEADER:batch.end].cast("B")
            total += sum(frames[:n * stride * 8 - FRAME_HEADER].cast("Q")[::stride])
        else:
            total += sum(_SEQ.unpack_from(view)[0] for view in batch)
        got += n
    return Received(got, total)


def chan_send_single(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.send() once per message (from one renumbered buffer, when large)."""
    ch = _channel(sock)
    message, send = Numbered(row.size), ch.send
    for i in range(count):
        send(message(i))
    ch.close()
    return Received(count)


def chan_recv_single(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.recv() once per message."""
    ch = _channel(sock)
    recv, unpack, size = ch.recv, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        data = recv()
        if len(data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
        total += unpack(data)[0]
    return Received(count, total)


# ---- a careful stdlib framed stream --------------------------------------------------

def framed_send_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """Length-prefixed messages gathered in a bytearray, one sendall per batch."""
    make, sendall, batch = message_maker(row.size), sock.sendall, row.batch
    head = _PREFIX.pack(row.size)
    for start in range(0, count, batch):
        buf = bytearray()
        for message in map(make, range(start, min(start + batch, count))):
            buf += head
            buf += message
        sendall(buf)
    return Received(count)


def framed_recv_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """recv_into a large buffer, struct.unpack_from each prefix, slice out each message."""
    buf = bytearray(256 * KIB)
    view = memoryview(buf)
    unpack_from, recv_into, size = _PREFIX.unpack_from, sock.recv_into, row.size
    start = end = got = total = 0
    while got < count:
        if start == end:
            start = end = 0
        elif len(buf) - end < 64 * KIB:
            buf[:end - start] = bytes(view[start:end])
            start, end = 0, end - start
        n = recv_into(view[end:])
        if not n:
            break
        end += n
        messages = []
        while end - start >= 4:
            (length,) = unpack_from(buf, start)
            if end - start - 4 < length:
                break
            messages.append(buf[start + 4:start + 4 + length])
            start += 4 + length
        got += len(messages)
        total += checksum_of(messages, size)
    return Received(got, total)


# ---- plain C framing: the limit -------------------------------------------------------

def ref_send(sock: socket.socket, count: int, row: Row) -> Received:
    """csrc/reference/channel_reference.c: 256 frames packed per write, no Python per message."""
    seqpacket = sock.type == socket.SOCK_SEQPACKET
    return Received(_reference.chan_send(sock.fileno(), count, row.size, 256, seqpacket))


def ref_recv(sock: socket.socket, count: int, row: Row) -> Received:
    """csrc/reference/channel_reference.c: frames parsed from the byte stream in C."""
    got, total = _reference.chan_recv(sock.fileno(), count, row.size)
    return Received(got, total)


# ---- large messages, one per call ------------------------------------------------------

def large_send_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """A careful stdlib loop: sendall of a 4-byte length, then sendall of the message."""
    message, sendall = Numbered(row.size), sock.sendall
    head = _PREFIX.pack(row.size)
    for i in range(count):
        sendall(head)
        sendall(message(i))
    return Received(count)


def _recv_exactly(recv_into: Callable[..., int], view: memoryview) -> bool:
    got, n = 0, len(view)
    while got < n:
        k = recv_into(view[got:])
        if not k:
            return False
        got += k
    return True


def large_recv_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """recv_into the length, then recv_into a preallocated buffer until the message is whole."""
    head = bytearray(4)
    buf = bytearray(row.size)
    view, recv_into, unpack = memoryview(buf), sock.recv_into, _SEQ.unpack_from
    total = 0
    for i in range(count):
        if not _recv_exactly(recv_into, memoryview(head)):
            return Received(i, total)
        (length,) = _PREFIX.unpack(head)
        if length != row.size:
            raise Mismatch("a message of %d bytes, %d expected" % (length, row.size))
        if not _recv_exactly(recv_into, view):
            return Received(i, total)
        total += unpack(buf)[0]
    return Received(count, total)


# ---- large messages through the shared-memory lane ------------------------------------

#: The sending end's region holds this many messages of the row's size: as
#: many may be in flight (sent, not yet taken and returned by the receiver).
LANE_SLOTS = 4
#: Messages from this size on go through the lane (the channel's default).
LANE_THRESHOLD = DEFAULT_THRESHOLD


#: The sending channel's max_frame: below the threshold, so that a message of
#: the lane that finds no slot free waits for one.  With a max_frame it fits
#: (the default is 64 MiB), such a message goes inline instead, and a row
#: would time a mix of the lane and the inline stream, whose share depends on
#: how far the receiver lags: measured here with 16 MiB messages, a sixth of
#: them went inline, at a third of the lane's rate.
LANE_MAX_FRAME = LANE_THRESHOLD - 1


def lane_channel(sock: socket.socket, row: Row) -> Any:
    """The sending end of a lane row: a region of LANE_SLOTS messages, the lane only."""
    return afunix.Channel(sock, shm_size=LANE_SLOTS * row.size, shm_threshold=LANE_THRESHOLD,
                          max_frame=LANE_MAX_FRAME)


def lane_sender(sock: socket.socket, row: Row, shared: Any) -> Any:
    """Setup, untimed: a channel with a lane, and one message through it.

    The region is made (memfd, reserved, mapped) and announced, and the
    receiver maps it, before the clock starts, as in a long-lived program;
    the warm-up message is not counted.
    """
    ch = lane_channel(sock, row)
    ch.send(bytearray(row.size))
    return ch


def loan_sender(sock: socket.socket, row: Row, shared: Any) -> Any:
    """Setup, untimed: a channel with a lane, and one loan sent through it."""
    ch = lane_channel(sock, row)
    ch.send_loan(ch.loan(row.size))
    return ch


def object_sender(sock: socket.socket, row: Row, shared: Any) -> Any:
    """Setup, untimed: a channel with a lane, and one object sent through it.

    As for messages, send_object waits for a free slot only when what would
    go inline instead is over max_frame.
    """
    ch = lane_channel(sock, row)
    ch.send_object(bytes(row.size))
    return ch


def warm_receiver(sock: socket.socket, row: Row, shared: Any) -> Any:
    """Setup, untimed: the receiving channel, the sender's warm-up message taken (and checked)."""
    ch = afunix.Channel(sock)
    if len(ch.recv()) != row.size:
        raise Mismatch("the warm-up message is not %d bytes" % row.size)
    return ch


def warm_object_receiver(sock: socket.socket, row: Row, shared: Any) -> Any:
    """Setup, untimed: the receiving channel, the sender's warm-up object taken (and checked)."""
    ch: Any = afunix.Channel(sock)  # recv_object: looked up at run time (workloads.unavailable)
    if len(ch.recv_object()) != row.size:
        raise Mismatch("the warm-up object is not %d bytes" % row.size)
    return ch


def lane_send(ch: Any, count: int, row: Row) -> Received:
    """Channel.send() once per message, through the lane: one renumbered buffer, copied to a slot."""
    message, send = Numbered(row.size), ch.send
    for i in range(count):
        send(message(i))
    return Received(count)


def loan_send(ch: Any, count: int, row: Row) -> Received:
    """ch.loan(size), the number written into the slot in place, ch.send_loan(): no copy."""
    loan, send_loan, pack_into, size = ch.loan, ch.send_loan, _SEQ.pack_into, row.size
    for i in range(count):
        lent = loan(size)
        pack_into(lent.view, 0, i)
        send_loan(lent)
    return Received(count)


def lane_recv(ch: Any, count: int, row: Row) -> Received:
    """Channel.recv() once per message: every byte copied out of the slot into new bytes."""
    recv, unpack, size = ch.recv, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        data = recv()
        if len(data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
        total += unpack(data)[0]
    return Received(count, total)


def lane_recv_view(ch: Any, count: int, row: Row) -> Received:
    """Channel.recv_batch(): a read-only view of each slot; only the number is read, in place."""
    recv_batch, unpack, size = ch.recv_batch, _SEQ.unpack_from, row.size
    got = total = 0
    while got < count:
        batch = recv_batch()
        if not len(batch):
            break
        for view in batch:
            if len(view) != size:
                raise Mismatch("a message of %d bytes, %d expected" % (len(view), size))
            total += unpack(view)[0]
        got += len(batch)
    return Received(got, total)


# ---- Python objects: one large buffer, sent as itself ---------------------------------

#: Objects an object row's sender cycles through, made once: message i is
#: object i % OBJECT_POOL, whose first 8 bytes hold that number.
OBJECT_POOL = LANE_SLOTS + 1


def numbered_objects(row: Row, kind: str) -> Callable[[int], Any]:
    """A function i -> the object sent as message i, of the row's size.

    A bytes object ("bytes") or a numpy uint8 array ("numpy"), taken from
    OBJECT_POOL objects made once and never changed: making a 16 MiB object
    per message would time the allocator, and renumbering one in place
    would change an object a multiprocessing.Queue's feeder thread has not
    pickled yet.  Every send pickles the whole object anew.
    """
    pool: List[Any] = []
    for k in range(OBJECT_POOL):
        data = bytearray(row.size)
        _SEQ.pack_into(data, 0, k)
        if kind == "numpy":
            numpy = importlib.import_module("numpy")  # optional: its rows are skipped without it
            pool.append(numpy.frombuffer(data, dtype=numpy.uint8).copy())
        else:
            pool.append(bytes(data))
    return lambda i: pool[i % OBJECT_POOL]


class ObjectChecker:
    """Checks received objects in order: `size` bytes each, number i % OBJECT_POOL for the i-th.

    The receiver's sum of the sequence numbers is then the sum of the
    positions it checked, as the runner expects.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0

    def __call__(self, obj: Any) -> int:
        """The position of `obj` (its sequence number); Mismatch when it is not the next object."""
        with memoryview(obj) as view:
            nbytes = view.nbytes
            number = _SEQ.unpack_from(view.cast("B"))[0] if nbytes >= 8 else None
        if nbytes != self.size:
            raise Mismatch("an object of %d bytes, %d expected" % (nbytes, self.size))
        i = self.seen
        if number != i % OBJECT_POOL:
            raise Mismatch("object %d carries number %s, %d expected"
                           % (i, number, i % OBJECT_POOL))
        self.seen += 1
        return i


def _object_sender(kind: str) -> Callable[[Any, int, Row], Received]:
    def send(ch: Any, count: int, row: Row) -> Received:
        make, send_object = numbered_objects(row, kind), ch.send_object
        for i in range(count):
            send_object(make(i))
        return Received(count)

    send.__doc__ = "Channel.send_object(obj) once per message (%s)." % kind
    return send


def object_recv(ch: Any, count: int, row: Row) -> Received:
    """Channel.recv_object() once per message, each object's size and number checked."""
    recv_object, check = ch.recv_object, ObjectChecker(row.size)
    total = 0
    for _ in range(count):
        total += check(recv_object())
    return Received(count, total)


object_send_bytes = _object_sender("bytes")
object_send_numpy = _object_sender("numpy")
