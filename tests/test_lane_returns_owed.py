"""A receiver that holds back RETURN frames never waits for input alone (docs/PROTOCOL.md).

The setting, built step by step: `b` filled its socket to `a`, then took
six messages of `a`'s lane, so it holds their slots' returns and cannot
write them; `b` then waits for `a`'s next message, which needs one of those
slots.  `a`, waiting for room, reads the socket empty; `b` must then write
the returns (the socket is writable again) while it waits for input, or
both wait for ever.  Every wait is bounded: a regression fails, never
hangs.  Both backends; afunix.Channel and afunix.aio.Channel.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Dict, List, Tuple

import anyio
import pytest

import afunix
import afunix.aio as aio
from afunix import shm
from afunix.channel import reader_of

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

KiB = 1 << 10
MiB = 1 << 20
BIG = 600 * KiB  # over max_frame: only a slot carries it; six fill the region
OPTIONS: Dict[str, Any] = dict(shm_size=4 * MiB, max_frame=256 * KiB)
BOUND = 5.0


def owing_pair(type: int) -> Tuple[afunix.Channel, afunix.Channel]:
    """(a, b): b's socket to a full, b holding the returns of a's six messages in flight."""
    a, b = afunix.channel_pair(type, **OPTIONS)
    b.socket.settimeout(0.05)
    try:
        while True:
            b.send(b"m" * 1000)
    except socket.timeout:  # (TimeoutError from 3.10 on)
        pass
    a.socket.settimeout(BOUND)
    b.socket.settimeout(BOUND)
    for i in range(6):
        a.send(bytes([i]) * BIG)
    for i in range(6):
        assert b.recv() == bytes([i]) * BIG
    assert reader_of(b).returns  # the socket took none of them
    return a, b


def in_thread(call: Any, results: List[Any]) -> threading.Thread:
    def run() -> None:
        try:
            results.append(call())
        except Exception as exc:
            results.append(exc)
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("type", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_a_receive_writes_held_returns_while_it_waits_for_input(type: int) -> None:
    a, b = owing_pair(type)
    with a, b:
        got: List[Any] = []
        t = in_thread(b.recv, got)
        time.sleep(0.1)  # b waits for input, holding the returns
        a.send(b"\x07" * BIG)  # needs a slot b holds: reads the socket empty, then waits
        t.join(2 * BOUND)
        assert got == [b"\x07" * BIG]
        assert not reader_of(b).returns


def test_a_sender_of_the_same_channel_writes_them_after_its_frame() -> None:
    # b's socket is full and a sender of b's is blocked writing to it (it
    # holds the sending side): the receive leaves the returns to it, and
    # the sender writes them once a, waiting for room, has read its frame
    a, b = owing_pair(socket.SOCK_STREAM)
    with a, b:
        sent: List[Any] = []
        got: List[Any] = []
        s = in_thread(lambda: b.send(b"s" * 200 * KiB), sent)
        time.sleep(0.1)
        r = in_thread(b.recv, got)
        time.sleep(0.1)
        a.send(b"\x07" * BIG)
        s.join(2 * BOUND)
        r.join(2 * BOUND)
        assert sent == [None] and got == [b"\x07" * BIG]
        m = a.recv()
        while m == b"m" * 1000:  # the burst that filled the socket, then the sender's frame
            m = a.recv()
        assert m == b"s" * 200 * KiB


@pytest.mark.anyio
async def test_an_aio_receive_writes_held_returns_while_it_waits_for_input() -> None:
    a, b = aio.channel_pair(**OPTIONS)
    with anyio.fail_after(4 * BOUND):
        async with a, b:
            while True:
                with anyio.move_on_after(0.05) as scope:
                    await b.send(b"m" * 1000)
                if scope.cancelled_caught:
                    break
            for i in range(6):
                await a.send(bytes([i]) * BIG)
            for i in range(6):
                assert await b.recv() == bytes([i]) * BIG
            assert b._reader.returns
            got: List[bytes] = []

            async def receive() -> None:
                got.append(await b.recv())

            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive)
                    await anyio.sleep(0.1)
                    await a.send(b"\x07" * BIG)
            assert got == [b"\x07" * BIG]
            assert not b._reader.returns
