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
