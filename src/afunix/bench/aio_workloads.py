"""The asyncio workloads: afunix.aio against what an asyncio program uses today.

Two workloads, both one-way throughput of numbered messages between two
processes over the SOCK_SEQPACKET pair the runner makes, each side running
its own asyncio event loop:

- ``asyncio``: the "stdlib loop" column is an asyncio streams program
  (``asyncio.open_unix_connection`` with length-prefixed frames: a 4-byte
  length, then the message; ``writer.write`` per frame, ``drain()`` once a
  batch; ``reader.readexactly`` twice per frame).  Streams need SOCK_STREAM,
  so its sender makes a stream socketpair and hands one end to the receiver
  over the runner's socket first (one ``send_fds``, inside the timed run, a
  few microseconds of it).
- ``asyncio-sock``: the "stdlib loop" column is ``loop.sock_sendall`` and
  ``loop.sock_recv`` once per message on the SEQPACKET pair itself.

In both, the afunix columns send with ``afunix.aio.send_many`` (a batch a
call) and receive with ``afunix.aio.recv_batch`` (no object per message).

Two more, one call per message, 64-byte messages on SEQPACKET, measure the
async single calls against their asyncio twins; the other side is the same
plain C batch loop in every column, so each row measures one call:

- ``aio-single-send``: ``await afunix.aio.send_many(sock, [m])`` against
  ``await loop.sock_sendall(sock, m)``;
- ``aio-single-recv``: ``await afunix.aio.recv_many(sock, 1, size)``
  against ``await loop.sock_recv(sock, size)``.
The C column of ``asyncio-sock`` is the plain C sendmmsg/recvmmsg loop on
the same SEQPACKET pair; ``asyncio`` has none (its plain C program, a stream
of 64-byte writes, is the row ``stream 64 B x256``).  The workloads and
their columns are declared in registry.py.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Awaitable, Callable

import afunix

from .matrix import Row
from .workloads import Mismatch, Received, StreamChecker

_SEQ = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")


def _run(main: Callable[[], Awaitable[Received]]) -> Received:
    # A fresh default event loop per run, as asyncio.run makes (without its
    # shutdown of the default executor, which these runs never start).
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# ---- afunix.aio: send_many and recv_batch --------------------------------------


def send_aio(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.aio.send_many(), a batch of messages per call."""
    aio = afunix.aio
    sock.setblocking(False)
    bufs = [bytearray(row.size) for _ in range(row.batch)]
    pack = _SEQ.pack_into

    async def main() -> Received:
        for start in range(0, count, row.batch):
            n = min(row.batch, count - start)
            for i in range(n):
                pack(bufs[i], 0, start + i)
            await aio.send_many(sock, bufs if n == row.batch else bufs[:n])
        return Received(count)

    return _run(main)


def recv_aio(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.aio.recv_batch(): a RecvBatch filled per wake-up, no object per message."""
    aio = afunix.aio
    sock.setblocking(False)
    batch = afunix.RecvBatch(row.batch, row.size)
    unpack, size = _SEQ.unpack_from, row.size

    async def main() -> Received:
        got = total = 0
        while got < count:
            n = await aio.recv_batch(sock, batch)
            if n == 0:
                break
            for view in batch:
                if len(view) != size:
                    raise Mismatch("a message of %d bytes, %d expected" % (len(view), size))
                total += unpack(view)[0]
            got += n
        return Received(got, total)

    return _run(main)


def recv_aio_stream(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.aio.recv_batch() on a stream: up to a batch of record-sized reads per wake-up."""
    aio = afunix.aio
    sock.setblocking(False)
    batch = afunix.RecvBatch(row.batch, row.size)
    checker = StreamChecker(row.size)
    unpack, size = _SEQ.unpack_from, row.size

    async def main() -> Received:
        got = whole = 0  # records read whole, at a record boundary, and their sum
        while (got + checker.pos // size) < count:
            if await aio.recv_batch(sock, batch) == 0:
                break
            for view in batch:
                n = len(view)
                # Nearly every read is one whole record (the writes are whole
                # records): number it directly; the checker takes the rest.
                if n == size and checker.pos % size == 0:
                    whole += unpack(view)[0]
                    got += 1
                else:
                    checker.feed(view, n)
        return Received(got + checker.pos // size, whole + checker.total)

    return _run(main)


def send_one_aio(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.aio.send_many(sock, [m]) once per message."""
    aio = afunix.aio
    sock.setblocking(False)
    buf = bytearray(row.size)
    messages, pack = [buf], _SEQ.pack_into

    async def main() -> Received:
        send_many = aio.send_many
        for i in range(count):
            pack(buf, 0, i)
            await send_many(sock, messages)
        return Received(count)

    return _run(main)


def recv_one_aio(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.aio.recv_many(sock, 1, size) once per message."""
    aio = afunix.aio
    sock.setblocking(False)
    unpack, size = _SEQ.unpack_from, row.size

    async def main() -> Received:
        recv_many = aio.recv_many
        total = 0
        for i in range(count):
            got = await recv_many(sock, 1, size)
            if not got:
                return Received(i, total)
            data = got[0].data
            if len(data) != size:
                raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
            total += unpack(data)[0]
        return Received(count, total)

    return _run(main)


# ---- asyncio streams, length-prefixed frames -----------------------------------


def send_streams(sock: socket.socket, count: int, row: Row) -> Received:
    """asyncio streams: writer.write() of a length-prefixed frame, drain() once a batch."""
    frame = bytearray(_LENGTH.size + row.size)
    _LENGTH.pack_into(frame, 0, row.size)
    pack, offset = _SEQ.pack_into, _LENGTH.size

    async def main() -> Received:
        _, writer = await asyncio.open_unix_connection(sock=sock)
        for i in range(count):
            pack(frame, offset, i)
            writer.write(bytes(frame))
            if i % row.batch == row.batch - 1:
                await writer.drain()
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        return Received(count)

    return _run(main)


def recv_streams(sock: socket.socket, count: int, row: Row) -> Received:
    """asyncio streams: reader.readexactly() of the length, then of the message."""
    unpack_length, unpack = _LENGTH.unpack, _SEQ.unpack_from

    async def main() -> Received:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        total = got = 0
        readexactly = reader.readexactly
        try:
            for _ in range(count):
                (length,) = unpack_length(await readexactly(4))
                data = await readexactly(length)
                total += unpack(data)[0]
                got += 1
        except asyncio.IncompleteReadError:
            pass  # the sender closed early: the count shows it
        writer.close()
        await writer.wait_closed()
        return Received(got, total)

    return _run(main)


# ---- loop.sock_sendall / loop.sock_recv, once per message -------------------------


def send_sock(sock: socket.socket, count: int, row: Row) -> Received:
    """loop.sock_sendall() once per message."""
    sock.setblocking(False)
    buf = bytearray(row.size)
    pack = _SEQ.pack_into

    async def main() -> Received:
        sendall = asyncio.get_running_loop().sock_sendall
        for i in range(count):
            pack(buf, 0, i)
            await sendall(sock, buf)
        return Received(count)

    return _run(main)


def recv_sock(sock: socket.socket, count: int, row: Row) -> Received:
    """loop.sock_recv() once per message."""
    sock.setblocking(False)
    unpack, size = _SEQ.unpack_from, row.size

    async def main() -> Received:
        recv = asyncio.get_running_loop().sock_recv
        total = 0
        for i in range(count):
            data = await recv(sock, size)
            if not data:
                return Received(i, total)
            if len(data) != size:
                raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
            total += unpack(data)[0]
        return Received(count, total)

    return _run(main)
