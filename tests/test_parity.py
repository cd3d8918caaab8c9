"""Code written for the stdlib runs unchanged: afunix's twins against stdlib peers and expectations.

send_fds/recv_fds promise the signatures of socket.send_fds/recv_fds; these
tests hold them to what a stdlib peer, CPython's own test of those functions
and multiprocessing.reduction expect, on both backends.
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Callable, Iterator

import pytest

import afunix
import afunix.aio as aio
from afunix import Message, _backend, batch

TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM,
         "seqpacket": socket.SOCK_SEQPACKET}
MODES = ["blocking", "non-blocking", "timeout"]


def _pair(kind: int, mode: str) -> "tuple[socket.socket, socket.socket]":
    a, b = afunix.socketpair(kind)
    if mode == "non-blocking":
        a.setblocking(False)
    elif mode == "timeout":
        a.settimeout(5.0)
    return a, b


def _fill(sock: socket.socket) -> None:
    """Send until a non-blocking `sock` takes nothing more."""
    while True:
        try:
            sock.send(b"f" * 64)
        except BlockingIOError:
            return


# ---- an empty batch ----------------------------------------------------------


def _nothings() -> "list[Callable[[], Any]]":
    return [list, tuple, lambda: iter(())]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(TYPES.values()), ids=list(TYPES))
def test_send_many_of_nothing_is_0(kind: int, mode: str) -> None:
    a, b = _pair(kind, mode)
    with a, b:
        for nothing in _nothings():
            assert afunix.send_many(a, nothing()) == 0
            assert afunix.send_many(a, nothing(), socket.MSG_DONTWAIT) == 0
        if mode == "non-blocking":
            _fill(a)  # a full socket: still nothing to do, so no error
            for nothing in _nothings():
                assert afunix.send_many(a, nothing()) == 0
        else:
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(10)  # nothing at all went


@pytest.mark.parametrize("kind", list(TYPES.values()), ids=list(TYPES))
def test_every_batch_call_given_nothing_returns_0(kind: int) -> None:
    async def main() -> None:
        a, b = afunix.socketpair(kind, blocking=False)
        with a, b:
            for nothing in _nothings():
                assert await aio.send_many(a, nothing()) == 0
                if kind != socket.SOCK_STREAM:  # no boundaries: refused on a stream
                    assert await aio.send_many_partial(a, nothing()) == 0
        if kind == socket.SOCK_DGRAM:
            return
        x, y = aio.channel_pair(kind)
        async with x, y:
            for nothing in _nothings():
                assert await x.send_many(nothing()) == 0

    asyncio.run(main())
    if kind == socket.SOCK_DGRAM:
        return
    x, y = afunix.channel_pair(kind)
    with x, y:
        for nothing in _nothings():
            assert x.send_many(nothing()) == 0
        assert x.send_fixed(b"", 8) == 0
        assert x.pending == 0


def test_backends_send_batch_of_no_message_is_0(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        assert _backend.impl.send_batch(a, batch.outgoing([]), 0, 0, 0) == 0


# ---- flags as the stdlib reports them ------------------------------------------

CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
needs_cloexec = pytest.mark.skipif(not CLOEXEC, reason="no MSG_CMSG_CLOEXEC on this platform")


def _stdlib_flags(sock: socket.socket, bufsize: int, flags: int) -> int:
    """msg_flags of a plain stdlib recvmsg (closing what it brought)."""
    _, ancdata, msg_flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(4 * 4), flags)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            afunix.close_fds(list(memoryview(payload).cast("i")))
    return int(msg_flags)


def _receivers() -> "dict[str, Callable[[socket.socket, int, int], int]]":
    """Every receive path, as: receive one message, return the flags it reports."""

    def recv_fds(sock: socket.socket, bufsize: int, flags: int) -> int:
        _, fds, msg_flags, _ = afunix.recv_fds(sock, bufsize, 4, flags)
        afunix.close_fds(fds)
        return msg_flags

    def recv_many(sock: socket.socket, bufsize: int, flags: int) -> int:
        [msg] = afunix.recv_many(sock, 1, bufsize, flags, maxfds=4)
        afunix.close_fds(msg.fds)
        return msg.flags

    def recv_batch(sock: socket.socket, bufsize: int, flags: int) -> int:
        with afunix.RecvBatch(1, bufsize, maxfds=4) as batch:
            assert batch.recv(sock, flags) == 1
            [msg] = batch.messages()
            assert batch.flags(0) == msg.flags
            afunix.close_fds(msg.fds)
            return batch.flags(0)

    def aio_recv_fds(sock: socket.socket, bufsize: int, flags: int) -> int:
        async def main() -> int:
            sock.setblocking(False)
            _, fds, msg_flags, _ = await aio.recv_fds(sock, bufsize, 4, flags)
            afunix.close_fds(fds)
            return msg_flags
        return asyncio.run(main())

    def aio_recv_many(sock: socket.socket, bufsize: int, flags: int) -> int:
        async def main() -> int:
            sock.setblocking(False)
            [msg] = await aio.recv_many(sock, 1, bufsize, flags, maxfds=4)
            afunix.close_fds(msg.fds)
            return msg.flags
        return asyncio.run(main())

    def aio_recv_batch(sock: socket.socket, bufsize: int, flags: int) -> int:
        async def main() -> int:
            sock.setblocking(False)
            with afunix.RecvBatch(1, bufsize, maxfds=4) as batch:
                assert await aio.recv_batch(sock, batch, flags) == 1
                afunix.close_fds(batch.all_fds())
                return batch.flags(0)
        return asyncio.run(main())

    return {f.__name__: f for f in (recv_fds, recv_many, recv_batch,
                                     aio_recv_fds, aio_recv_many, aio_recv_batch)}


@needs_cloexec
@pytest.mark.parametrize("caller_flags", [0, CLOEXEC], ids=["no-flags", "MSG_CMSG_CLOEXEC"])
@pytest.mark.parametrize("bufsize", [64, 2], ids=["whole", "truncated"])
@pytest.mark.parametrize("path", sorted(_receivers()))
def test_flags_are_what_a_plain_recvmsg_reports(path: str, bufsize: int, caller_flags: int,
                                                fd_baseline: set[int]) -> None:
    receive = _receivers()[path]
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with a, b:
            for fds in ([], [r, w]):
                # the same message twice: a plain stdlib recvmsg reads one, afunix the other
                socket.send_fds(a, [b"message"], fds)
                socket.send_fds(a, [b"message"], fds)
                expected = _stdlib_flags(b, bufsize, caller_flags)
                got = receive(b, bufsize, caller_flags)
                assert got == expected, (hex(got), hex(expected))
                assert bool(got & CLOEXEC) == bool(caller_flags)
                assert bool(got & socket.MSG_TRUNC) == (bufsize < 7)
                b.setblocking(True)
    finally:
        afunix.close_fds([r, w])


@needs_cloexec
def test_clean_messages_report_flags_0_everywhere(fd_baseline: set[int]) -> None:
    # what `if flags:` code and CPython's own test expect of a clean message
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
        for path, receive in _receivers().items():
            a, b = afunix.socketpair(kind)
            with a, b:
                afunix.send_fds(a, [b"clean"], [a])
                assert receive(b, 64, 0) == 0, path
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        afunix.send_many(a, [Message(b"x", fds=(a,)), b"y"])
        with pytest.raises(afunix.TruncatedError) as cut:
            afunix.recv_fds(b, 64, 0)
        assert cut.value.flags == socket.MSG_CTRUNC  # the cut, and nothing afunix added


@needs_cloexec
def test_channel_messages_carry_no_flags(fd_baseline: set[int]) -> None:
    r, w = os.pipe()
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
            x, y = afunix.channel_pair(kind)
            with x, y:
                x.send(b"with", fds=[r])
                x.send(b"without")
                with_fds = y.recv_message()
                afunix.close_fds(with_fds.fds)
                assert with_fds.flags == 0 and y.recv_message().flags == 0

            async def main() -> None:
                p, q = aio.channel_pair(kind)
                async with p, q:
                    await p.send(b"with", fds=[r])
                    got = await q.recv_message()
                    afunix.close_fds(got.fds)
                    assert got.flags == 0 and len(got.fds) == 1

            asyncio.run(main())
    finally:
        afunix.close_fds([r, w])
