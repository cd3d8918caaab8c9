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
bare call of the active backend's core on the same socket, in alternating
groups of 64 calls (median over the groups): for the C backend the cffi call
the fast path makes, ``lib.afunix_send_one`` / ``lib.afunix_recv_many`` (and
the store that takes the message over), with its arguments made once, for the stdlib backend ``sock.send`` / ``sock.recvmsg_into``.
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

from . import workloads as _w
from .matrix import Row
from .workloads import Mismatch, Received, Workload, register

_SEQ = struct.Struct("<Q")
_SEQPACKET = socket.SOCK_SEQPACKET
_NOSIGNAL = int(getattr(socket, "MSG_NOSIGNAL", 0))
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

def _bare_calls(sock: socket.socket, size: int) -> Tuple[Callable[[bytes], Any], Callable[[], Any],
                                                         Callable[[], None]]:
    """(send, recv, free): the active backend's core calls for one message, arguments made once."""
    from .. import _backend

    if _backend.name == "c":
        from .._cbackend import ffi, lib

        fd = sock.fileno()
        data_area = ffi.new("char[]", size)  # the caller owns the data area
        arena = ffi.new("struct afunix_arena *")
        if lib.afunix_arena_init(arena, 1, size, 0, data_area) != 0:
            raise MemoryError("afunix_arena_init")
        send_one, recv_many = lib.afunix_send_one, lib.afunix_recv_many

        def send(data: bytes) -> Any:
            return send_one(fd, data, size, 0)

        def recv() -> Any:
            # the least a caller does with it: take the message over, or
            # the arena hands the same one back without reading again
            got = recv_many(fd, arena, 0)
            arena.delivered = arena.count
            return got

        def free() -> None:
            lib.afunix_arena_clear(arena)
            del holder[:]  # the struct and data area go only after the arena is cleared

        holder = [arena, data_area]
        return send, recv, free
    buf = bytearray(size)
    stdlib_send, recvmsg_into, buffers = sock.send, sock.recvmsg_into, [buf]
    return ((lambda data: stdlib_send(data, _NOSIGNAL)), (lambda: recvmsg_into(buffers)),
            (lambda: None))


def _overhead(count: int, row: Row, receiving: bool) -> Received:
    a, b = socket.socketpair(socket.AF_UNIX, _SEQPACKET)
    bare_send, bare_recv, free = _bare_calls(b if receiving else a, row.size)
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


# ---- registration ----------------------------------------------------------------------------

_ONE = ("send_many", "RecvBatch")
_C_ONE = "one message per sendmmsg / recvmmsg call"

register(Workload("single-send", "1-call send", "messages", _SEQPACKET, "msgs/s", _ONE,
                  base="sock.send(m) per message (receiver: plain C recvmmsg in every column)",
                  afunix="afunix.send_many(sock, [m]) per message",
                  c="one sendmmsg of one message per call", c_peer=True),
         {"base": (_w.send_stdlib, recv_c_batched),
          "afunix-stdlib": (send_one_afunix, recv_c_batched),
          "afunix-c": (send_one_afunix, recv_c_batched),
          "c": (_w.send_c, recv_c_batched)})
register(Workload("single-recv", "1-call recv", "messages", _SEQPACKET, "msgs/s", _ONE,
                  base="sock.recv_into(buf) per message (sender: plain C sendmmsg in every"
                       " column)",
                  afunix="RecvBatch(1, size).recv(sock) per message",
                  c="one recvmmsg of one message per call", c_peer=True),
         {"base": (send_c_batched, recv_into_stdlib),
          "afunix-stdlib": (send_c_batched, recv_one_batch),
          "afunix-c": (send_c_batched, recv_one_batch),
          "c": (send_c_batched, _w.recv_c)})
register(Workload("single-recv-many", "1-call recv_m", "messages", _SEQPACKET, "msgs/s",
                  ("recv_many",),
                  base="sock.recv(size) per message (sender: plain C sendmmsg in every column)",
                  afunix="afunix.recv_many(sock, 1, size) per message",
                  c="one recvmmsg of one message per call", c_peer=True),
         {"base": (send_c_batched, _w.recv_stdlib),
          "afunix-stdlib": (send_c_batched, recv_one_many),
          "afunix-c": (send_c_batched, recv_one_many),
          "c": (send_c_batched, _w.recv_c)})
register(Workload("single-fds", "1-call fds", "messages", _SEQPACKET, "msgs/s",
                  ("send_fds", "recv_fds"),
                  base="socket.send_fds / socket.recv_fds per message, descriptors closed",
                  afunix="afunix.send_fds / afunix.recv_fds per message, descriptors closed",
                  c="one sendmmsg / recvmmsg with SCM_RIGHTS per message"),
         {"base": (fds_send_socket, fds_recv_socket),
          "afunix-stdlib": (fds_send_afunix, fds_recv_afunix),
          "afunix-c": (fds_send_afunix, fds_recv_afunix),
          "c": (_w.fds_send_c, _w.fds_recv_c)})
register(Workload("call-overhead", "overhead send", "overhead", _SEQPACKET, "ns", _ONE,
                  base="", afunix="ns per call: send_many(sock, [m]) minus the backend's bare"
                                  " core call (C: lib.afunix_send_one; stdlib: sock.send)"),
         {impl: (overhead_send, None) for impl in ("afunix-stdlib", "afunix-c")})
register(Workload("call-overhead-recv", "overhead recv", "overhead", _SEQPACKET, "ns", _ONE,
                  base="", afunix="ns per call: RecvBatch(1, size).recv minus the backend's bare"
                                  " core call (C: lib.afunix_recv_many; stdlib: recvmsg_into)"),
         {impl: (overhead_recv, None) for impl in ("afunix-stdlib", "afunix-c")})
