"""Who wakes the tasks of an afunix.aio.Channel that another task's call leaves waiting.

A call that meets a ProtocolError closes the channel from inside (a send
reading the peer's frames for its returns, or a receive): every other task
waiting on the channel wakes and gets EBADF, as after close().  Under
asyncio, uvloop and trio; both backends.
"""
from __future__ import annotations

import errno
from typing import Any, List

import anyio
import pytest

import afunix.aio as aio
from afunix import ProtocolError, shm
from afunix._aiowait import is_waiting

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

KiB = 1 << 10
BIG = bytes(700 * KiB)  # over max_frame: only a slot carries it, and the region holds one
BAD = b"\xff" * 64  # no frame header allows these bytes


def lane_pair(**options: Any) -> "tuple[aio.Channel, aio.Channel]":
    options = dict(dict(shm_size=1 << 20, shm_threshold=4 * KiB, max_frame=64 * KiB), **options)
    return aio.channel_pair(**options)


async def until(condition: Any) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_a_send_that_reads_a_bad_frame_wakes_the_receive_waiting(clean: None) -> None:
    a, b = lane_pair()
    async with a, b:
        await a.send(BIG)  # the lane of `a` is full: a send reads for returns
        fd = a.fileno()
        got: List[BaseException] = []

        async def receiver() -> None:
            with pytest.raises(OSError) as caught:
                await a.recv()
            got.append(caught.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await until(lambda: is_waiting(fd, False))
            b.socket.send(BAD)
            # no await before its first try: the send, not the loop, reads them
            with pytest.raises(ProtocolError):
                await a.send(BIG)
            assert a.closed
            with anyio.fail_after(3):
                await until(lambda: bool(got))
        assert got[0].errno == errno.EBADF, got


@pytest.mark.anyio
@pytest.mark.parametrize("lane", [False, True], ids=["plain", "lane"])
async def test_a_receive_that_meets_a_bad_frame_wakes_the_send_waiting(
        clean: None, lane: bool) -> None:
    a, b = lane_pair() if lane else aio.channel_pair()
    async with a, b:
        fd = a.fileno()
        got: List[BaseException] = []

        async def sender() -> None:
            with pytest.raises(OSError) as caught:
                while True:  # inline messages until the socket is full (b reads nothing)
                    await a.send(b"s" * 3000)
            got.append(caught.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await until(lambda: is_waiting(fd, True))
            b.socket.send(BAD)
            with pytest.raises(ProtocolError):
                await a.recv()
            assert a.closed
            with anyio.fail_after(3):
                await until(lambda: bool(got))
        assert got[0].errno == errno.EBADF, got
