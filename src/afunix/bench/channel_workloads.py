"""The messaging section of ``python -m afunix bench``: afunix.Channel against what Python uses today.

Every row moves numbered messages (a little-endian uint64 sequence number
in the first 8 bytes) one way between two processes; the receiver checks the
count and the sum of the numbers, as everywhere in the benchmark.  The
columns keep their meaning: the two afunix columns are the channel on each
backend, "C reference" is framing in plain C (csrc/channel.c: 256 frames per
write, parsed in C: the limit), and the "stdlib loop" column is what a
Python program uses today for the same job, which the row names:

  CHAN-BATCHED   send_many / recv_many   vs a careful stdlib framed stream
                 (length prefix, bytearray batches + sendall; recv_into +
                 struct.unpack_from)
  CHAN-ZEROCOPY  send_fixed / recv_batch (no object per message)  vs the
                 same careful framed stream
  CHAN-SINGLE    one send / one recv call per message, SOCK_SEQPACKET  vs
                 the stdlib SEQPACKET send/recv loop
  CHAN-VS-ZMQ    send_many / recv_many   vs pyzmq ipc PUSH/PULL (only with
                 pyzmq installed: pip install 'afunix[bench]')
  CHAN-VS-PIPE   send_many / recv_many   vs multiprocessing.Pipe
                 (send_bytes / recv_bytes)

so the afunix/stdlib ratio of a row is the channel against that tool,
measured in the same run.  Importing this module registers the workloads
with workloads.py; the rows are in matrix.py.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import sys
import tempfile
from typing import Any, Callable, Dict, List, Tuple

import afunix

from . import workloads as _w
from .matrix import KIB, Row
from .workloads import Mismatch, Received, Workload

_SEQ = struct.Struct("<Q")
_PREFIX = struct.Struct("<I")  # the careful stdlib stream's length prefix
_LITTLE = sys.byteorder == "little"
_CHANNEL_HEADER = 8


def _maker(size: int) -> Callable[[int], bytes]:
    """A function i -> the numbered message i of `size` bytes, one C call per message."""
    return struct.Struct("<Q%dx" % (size - 8)).pack


def _checksum(messages: List[Any], size: int) -> int:
    """The sum of the numbers of `messages`, checking each is `size` bytes; no Python loop."""
    if not messages:
        return 0
    if min(map(len, messages)) != size or max(map(len, messages)) != size:
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
    make, send_many, batch = _maker(row.size), ch.send_many, row.batch
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
        total += _checksum(messages, size)
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
    stride = (size + _CHANNEL_HEADER) // 8
    got = total = 0
    while got < count:
        batch = ch.recv_batch()
        n = len(batch)
        if not n:
            break
        if batch.size != size:
            raise Mismatch("a message of another length than %d bytes" % size)
        if _LITTLE and size % 8 == 0:
            frames = batch.buffer[batch.start + _CHANNEL_HEADER:batch.end].cast("B")
            total += sum(frames[:n * stride * 8 - _CHANNEL_HEADER].cast("Q")[::stride])
        else:
            total += sum(_SEQ.unpack_from(view)[0] for view in batch)
        got += n
    return Received(got, total)


def chan_send_single(sock: socket.socket, count: int, row: Row) -> Received:
    """Channel.send() once per message."""
    ch = _channel(sock)
    make, send = _maker(row.size), ch.send
    for i in range(count):
        send(make(i))
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
    make, sendall, batch = _maker(row.size), sock.sendall, row.batch
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
        total += _checksum(messages, size)
    return Received(got, total)


# ---- pyzmq ipc PUSH/PULL, multiprocessing.Pipe -----------------------------------------

def _ipc_address() -> str:
    # Both children of one run share the runner's pid; runs are sequential.
    return "ipc://%s/afunix-bench-%d.ipc" % (tempfile.gettempdir(), os.getppid())


def zmq_send(sock: socket.socket, count: int, row: Row) -> Received:
    """pyzmq PUSH over ipc://, one send() per message."""
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(_ipc_address())
    make, send = _maker(row.size), push.send
    for i in range(count):
        send(make(i))
    push.close(linger=-1)  # until the peer has everything
    ctx.term()
    return Received(count)


def zmq_recv(sock: socket.socket, count: int, row: Row) -> Received:
    """pyzmq PULL over ipc://, one recv() per message."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(_ipc_address())
    recv, unpack, size = pull.recv, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        data = recv()
        if len(data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
        total += unpack(data)[0]
    pull.close()
    ctx.term()
    return Received(count, total)


def pipe_send(sock: socket.socket, count: int, row: Row) -> Received:
    """multiprocessing.Pipe's Connection.send_bytes() once per message (over the runner's socketpair)."""
    from multiprocessing.connection import Connection

    conn = Connection(os.dup(sock.fileno()))
    make, send_bytes = _maker(row.size), conn.send_bytes
    for i in range(count):
        send_bytes(make(i))
    conn.close()
    return Received(count)


def pipe_recv(sock: socket.socket, count: int, row: Row) -> Received:
    """multiprocessing.Pipe's Connection.recv_bytes() once per message."""
    from multiprocessing.connection import Connection

    conn = Connection(os.dup(sock.fileno()))
    recv_bytes, unpack, size = conn.recv_bytes, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        data = recv_bytes()
        if len(data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
        total += unpack(data)[0]
    conn.close()
    return Received(count, total)


# ---- plain C framing: the limit -------------------------------------------------------

def ref_send(sock: socket.socket, count: int, row: Row) -> Received:
    """csrc/channel.c: 256 frames packed per write, no Python per message."""
    from .._cbackend import lib

    seqpacket = int(sock.type == socket.SOCK_SEQPACKET)
    rc = lib.afunix_chan_ref_send(sock.fileno(), count, row.size, 256, seqpacket)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return Received(int(rc))


def ref_recv(sock: socket.socket, count: int, row: Row) -> Received:
    """csrc/channel.c: frames parsed from the byte stream in C."""
    from .._cbackend import ffi, lib

    checksum = ffi.new("uint64_t *")
    rc = lib.afunix_chan_ref_recv(sock.fileno(), count, row.size, checksum)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return Received(int(rc), int(checksum[0]))


# ---- registration ------------------------------------------------------------------------

_NEEDS = ("Channel",)
_STREAM, _SEQPACKET = socket.SOCK_STREAM, socket.SOCK_SEQPACKET

# kind -> (socket type, (stdlib sender, receiver), (afunix sender, receiver))
_SIDES: Dict[str, Tuple[int, Tuple[Callable[..., Received], Callable[..., Received]],
                        Tuple[Callable[..., Received], Callable[..., Received]]]] = {
    "chan-batched": (_STREAM, (framed_send_stdlib, framed_recv_stdlib),
                     (chan_send_batched, chan_recv_many)),
    "chan-zerocopy": (_STREAM, (framed_send_stdlib, framed_recv_stdlib),
                      (chan_send_fixed, chan_recv_batch)),
    "chan-single": (_SEQPACKET, (_w.send_stdlib, _w.recv_stdlib),
                    (chan_send_single, chan_recv_single)),
    "chan-vs-zmq": (_STREAM, (zmq_send, zmq_recv), (chan_send_batched, chan_recv_many)),
    "chan-vs-pipe": (_STREAM, (pipe_send, pipe_recv), (chan_send_batched, chan_recv_many)),
}

for _kind, (_type, (_s_send, _s_recv), (_a_send, _a_recv)) in _SIDES.items():
    _w.WORKLOADS[_kind] = Workload(_kind, "messaging: " + _kind, _kind, _type, "msgs/s", _NEEDS)
    _w.SENDERS[(_kind, "stdlib")] = _s_send
    _w.RECEIVERS[(_kind, "stdlib")] = _s_recv
    _w.SENDERS[(_kind, "c")] = ref_send
    _w.RECEIVERS[(_kind, "c")] = ref_recv
    for _impl in ("afunix-stdlib", "afunix-c"):
        _w.SENDERS[(_kind, _impl)] = _a_send
        _w.RECEIVERS[(_kind, _impl)] = _a_recv
