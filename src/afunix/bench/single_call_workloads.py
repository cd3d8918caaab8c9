"""One message per call: afunix's everyday calls against their stdlib twins, and their fixed cost.

Throughput rows, 64-byte messages on SOCK_SEQPACKET between two processes:

- ``single-send``: ``send_many(sock, [m])`` against ``sock.send(m)``; the
  receiving side is the same plain C recvmmsg loop in every column, so the
  row measures the sending call.
- ``single-recv``: ``RecvBatch(1, size).recv(sock)`` against
  ``sock.recv_into(buf)``; ``single-recv-many``: ``recv_many(sock, 1, size)``
  against ``sock.recv(size)``.  The sending side is the same plain C
  sendmmsg loop in every column, so these rows measure the receiving call.
- ``single-fds``: ``afunix.send_fds`` / ``afunix.recv_fds`` against
  ``socket.send_fds`` / ``socket.recv_fds``, one descriptor a message, both
  sides.

Their C column is the same operation in plain C: one message per
sendmmsg / recvmmsg call.

One process, ns per call (``call-overhead``, ``call-overhead-recv``): the
fixed Python cost of one afunix call, measured as the afunix call minus the
bare call the active backend's fast path makes on the same socket, in
alternating groups of 64 calls (median over the groups): to send, on both
backends ``sock.send`` (what a single plain send on a socket without a
timeout is); to receive, for the C backend the cffi call
``lib.afunix_recv_many`` (and the store that takes the message over), with
its arguments made once, for the stdlib backend ``sock.recvmsg_into`` (each
backend's ``bare_calls``).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import struct
import time
from typing import Any, Callable, List, Tuple

import afunix

from .. import _backend
from . import workloads as _w
from .matrix import Row
from .workloads import Mismatch, Received

_SEQ = struct.Struct("<Q")
_SEQPACKET = socket.SOCK_SEQPACKET
#: The batch of the plain C side that is the same in every column.
_C_BATCH = 256
#: Calls per timed group in the overhead rows: fewer than a socket buffer holds.
_GROUP = 64


def _with_batch(row: Row, batch: int) -> Row:
    return dataclasses.replace(row, batch=batch)


def recv_c_batched(sock: socket.socket, count: int, row: Row) -> Received:
    """The plain C recvmmsg loop, 256 a call: the same fast receiver in every column."""
    return _w.recv_c(sock, count, _with_batch(row, _C_BATCH))


def send_c_batched(sock: socket.socket, count: int, row: Row) -> Received:
    """The plain C sendmmsg loop, 256 a call: the same fast sender in every column."""
    return _w.send_c(sock, count, _with_batch(row, _C_BATCH))


# ---- one send per call -----------------------------------------------------------------

def send_one_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.send_many(sock, [message]) once per message."""
    send_many = afunix.send_many
    buf = bytearray(row.size)
    messages, pack = [buf], _SEQ.pack_into
    for i in range(count):
        pack(buf, 0, i)
        send_many(sock, messages)
    return Received(count)


# ---- one receive per call -------------------------------------------------------------------

def recv_into_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.recv_into(buf) once per message."""
    buf = bytearray(row.size)
    recv_into, unpack, size = sock.recv_into, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        if recv_into(buf) != size:
            raise Mismatch("a message of another length than %d bytes" % size)
        total += unpack(buf)[0]
    return Received(count, total)


def recv_one_batch(sock: socket.socket, count: int, row: Row) -> Received:
    """RecvBatch(1, size).recv(sock) once per message."""
    batch = afunix.RecvBatch(1, row.size)
    recv, unpack, size = batch.recv, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        recv(sock)
        view = batch[0]
        if len(view) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(view), size))
        total += unpack(view)[0]
    return Received(count, total)


def recv_one_many(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.recv_many(sock, 1, size) once per message."""
    recv_many, unpack, size = afunix.recv_many, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        (message,) = recv_many(sock, 1, size)
        if len(message.data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(message.data), size))
        total += unpack(message.data)[0]
    return Received(count, total)


# ---- one message with a descriptor per call ----------------------------------------------------

def _fds_send(send_fds: Callable[..., int]) -> _w.Side:
    def send(sock: socket.socket, count: int, row: Row) -> Received:
        buf = bytearray(row.size)
        fds = [_w.devnull()] * row.nfds
        pack = _SEQ.pack_into
        for i in range(count):
            pack(buf, 0, i)
            send_fds(sock, [buf], fds)
        return Received(count)
    return send


def _fds_recv(recv_fds: Callable[..., Tuple[bytes, List[int], int, Any]]) -> _w.Side:
    def recv(sock: socket.socket, count: int, row: Row) -> Received:
        unpack, size, nfds, close = _SEQ.unpack_from, row.size, row.nfds, os.close
        total = closed = 0
        for _ in range(count):
            data, fds, flags, _addr = recv_fds(sock, size, nfds)
            for fd in fds:
                close(fd)
            closed += len(fds)
            if len(data) != size or flags & _w.CUT:
                raise Mismatch("message of %d bytes, flags %#x" % (len(data), flags))
            total += unpack(data)[0]
        return Received(count, total, fds_closed=closed)
    return recv


def fds_send_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.send_fds(sock, [data], fds) once per message."""
    return _fds_send(afunix.send_fds)(sock, count, row)


def fds_recv_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.recv_fds(sock, size, nfds) once per message; closes every descriptor."""
    return _fds_recv(afunix.recv_fds)(sock, count, row)


def fds_send_socket(sock: socket.socket, count: int, row: Row) -> Received:
    """socket.send_fds(sock, [data], fds) once per message."""
    return _fds_send(socket.send_fds)(sock, count, row)


def fds_recv_socket(sock: socket.socket, count: int, row: Row) -> Received:
    """socket.recv_fds(sock, size, nfds) once per message; closes every descriptor."""
    return _fds_recv(socket.recv_fds)(sock, count, row)


# ---- the fixed cost of one call ------------------------------------------------------------

def _overhead(count: int, row: Row, receiving: bool) -> Received:
    a, b = socket.socketpair(socket.AF_UNIX, _SEQPACKET)
    # the active backend's own calls, through its public hook
    bare_send, bare_recv, free = _backend.impl.bare_calls(b if receiving else a, row.size)
    try:
        data = bytes(row.size)
        batch = afunix.RecvBatch(1, row.size)
        afunix_calls: Tuple[Callable[[], Any], Callable[[], Any]] = (
            (lambda: batch.recv(b)), bare_recv) if receiving else (
            (lambda: afunix.send_many(a, [data])), (lambda: bare_send(data)))
        drain = bytearray(row.size)
        clock = time.perf_counter_ns
        per_call: Tuple[List[float], List[float]] = ([], [])
        calls = 0
        for _ in range(max(1, count // (2 * _GROUP))):
            for k, call in enumerate(afunix_calls):
                if receiving:
                    for _ in range(_GROUP):
                        a.send(data)
                t0 = clock()
                for _ in range(_GROUP):
                    call()
                t1 = clock()
                if not receiving:
                    for _ in range(_GROUP):
                        b.recv_into(drain)
                per_call[k].append((t1 - t0) / _GROUP)
                calls += _GROUP
        value = statistics.median(per_call[0]) - statistics.median(per_call[1])
        return Received(calls, calls * (calls - 1) // 2, value=value)
    finally:
        free()
        a.close()
        b.close()


def overhead_send(sock: Any, count: int, row: Row) -> Received:
    """ns per call: afunix.send_many(sock, [m]) minus the backend's bare send of one message."""
    return _overhead(count, row, receiving=False)


def overhead_recv(sock: Any, count: int, row: Row) -> Received:
    """ns per call: RecvBatch(1, size).recv(sock) minus the backend's bare receive of one."""
    return _overhead(count, row, receiving=True)
