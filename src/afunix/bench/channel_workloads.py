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
  large-stream   Channel.send / recv of 1 MiB and 16 MiB messages  vs a
                 careful sendall / recv_into loop (and sendmmsg / recv in C)

The channel's framing in plain C (csrc/reference/channel_reference.c) is
a different program from every one of these, so it has a row of its own,
``c-framing``, with only the C column.  The rows against third-party tools and
multiprocessing are in peers.py.  The workloads and their columns are
declared in registry.py; the rows are in matrix.py.
"""
from __future__ import annotations

import array
import socket
import struct
import sys
from typing import Any, Callable, List, Tuple

import afunix

from .._limits import FRAME_HEADER
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
