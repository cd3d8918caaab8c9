"""What the tasks of an afunix.aio.Channel with a lane wait for, and who wakes them.

A send waiting for slots is woken by the returns a receive of another task
takes in, whenever they come (even during its pause while messages nobody
took keep the socket readable); a receive waiting for input is woken by the
messages a send read in while it looked for returns; a receive that owes
RETURN frames to a peer that reads nothing more waits without spinning.  Under
asyncio, uvloop and trio; both backends.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import random
import socket
import struct
import threading
import time
import zlib
from typing import Any, Callable, Dict, List

import anyio
import pytest
import sniffio

import afunix
import afunix.aio as aio
from afunix import MessageKindError, shm
from afunix._aiowait import is_waiting
from test_lane_channel import DocumentPeer

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(shm.unsupported_reason() is not None,
                                 reason=str(shm.unsupported_reason()))]

KiB = 1 << 10
BIG = bytes(700 * KiB)  # over max_frame: only a slot carries it, and the region holds one


def lane_pair(**options: Any) -> "tuple[aio.Channel, aio.Channel]":
    options = dict(dict(shm_size=1 << 20, shm_threshold=4 * KiB, max_frame=64 * KiB), **options)
    return aio.channel_pair(**options)


async def until(condition: Callable[[], bool], step: float = 0.001) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(step)


async def send_big(ch: aio.Channel, how: str) -> None:
    if how == "send":
        await ch.send(BIG)
    elif how == "loan":
        loan = await ch.loan(len(BIG))
        loan.view[:] = BIG
        await ch.send_loan(loan)
    else:
        await ch.send_object(bytearray(BIG))


async def recv_big(ch: aio.Channel, how: str) -> bytes:
    return bytes(await ch.recv_object()) if how == "send_object" else await ch.recv()


@pytest.mark.parametrize("how", ["send", "loan", "send_object"])
async def test_slots_returned_during_the_pause_of_a_waiting_send_wake_it(
        clean: None, how: str) -> None:
    a, b = lane_pair()
    async with a, b:
        await a.send(BIG)  # the lane of `a` is full
        await b.send(b"x")  # a message for `a`, not taken yet
        done = anyio.Event()

        async def sender() -> None:
            await send_big(a, how)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            # its try read "x" (nothing free): it waits with a message
            # buffered, the socket readable while the buffer is full (seen
            # at the next turn of the loop, well within its 5 ms pause)
            await until(lambda: a._ch.buffered_messages == 1, step=0)
            # no await from here: b returns the slot, a receive of `a` takes
            # "x", and the next one reads the RETURN frame in
            assert b._ch.recv() == BIG
            assert a._ch.recv() == b"x"
            with pytest.raises(BlockingIOError):
                a._ch.recv()
            with anyio.fail_after(3):  # nothing more comes on the socket
                await done.wait()
        with anyio.fail_after(5):
            assert await recv_big(b, how) == BIG


@pytest.mark.parametrize("how", ["send", "loan", "send_object"])
async def test_a_waiting_send_sees_the_peer_hang_up_behind_a_message_with_descriptors(
        clean: None, how: str) -> None:
    # The end of stream, read while a message with a descriptor waited
    # untaken, was taken for a read with nothing new: the task paused and
    # tried again until its deadline, though no slot can come back.
    a, b = lane_pair()
    r, w = os.pipe()
    try:
        async with a:
            await a.send(BIG)  # the lane of `a` is full, for good
            await b.send(b"with a descriptor", fds=[r])
            b.close()
            with anyio.fail_after(5):
                with pytest.raises(BrokenPipeError):
                    await send_big(a, how)
            m = await a.recv_message()  # still there, with its descriptor
            assert m.data == b"with a descriptor" and len(m.fds) == 1
            os.close(m.fds[0])
    finally:
        b.close()
        os.close(r)
        os.close(w)


async def test_an_object_that_finds_room_for_some_parts_waits_on_the_loop(clean: None) -> None:
    # One part finds a slot, the other does not, and together inline they
    # are over max_frame: the try frees the slot it placed and waits.  That
    # free woke the sender itself, which tried again at once, for ever,
    # without yielding to the loop (nothing else ran, timeouts neither).
    a, b = lane_pair()
    parts = (pickle.PickleBuffer(bytearray(200 * KiB)), pickle.PickleBuffer(bytearray(200 * KiB)))
    ticks = [0]
    # if the loop freezes, a thread ends it: the peer's end shut, the send fails
    guard = threading.Timer(5.0, b.socket.shutdown, (socket.SHUT_RDWR,))
    async with a, b:
        await a.send(BIG)  # 700 KiB in flight: one 200 KiB part fits, two do not

        async def ticker() -> None:
            while True:
                ticks[0] += 1
                await anyio.sleep(0.01)

        guard.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                with anyio.move_on_after(0.5) as waited:
                    await a.send_object(parts)
                tg.cancel_scope.cancel()
        finally:
            guard.cancel()
        assert waited.cancel_called, "sent, with no room for it"
        assert ticks[0] >= 10, "the loop ran the ticker %d times in 0.5 s" % ticks[0]
        with anyio.fail_after(5):
            assert await b.recv() == BIG  # its slot back: now the object goes
            await a.send_object(parts)
            assert [len(p) for p in await b.recv_object()] == [200 * KiB, 200 * KiB]


@pytest.mark.parametrize("size", [200 * KiB, 900 * KiB], ids=["inline", "slot"])
async def test_a_receive_waiting_for_input_takes_the_messages_a_send_read_in(
        clean: None, size: int) -> None:
    # 200 KiB fits max_frame: with no slot free it goes inline, once the send
    # read the socket for returns; 900 KiB waits for the slot
    a, b = lane_pair(max_frame=256 * KiB)
    first = bytes(900 * KiB)
    async with a, b:
        await a.send(first)  # the lane of `a` is full; b does not receive yet
        got: List[bytes] = []

        async def receiver() -> None:
            got.append(await a.recv())

        async def request_then_send() -> None:
            # no await in between: the loop never sees the request come, as
            # a's send reads it in, looking for returns
            b._ch.send(b"request")
            await a.send(bytes(size))

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await until(lambda: is_waiting(a.fileno(), False))
            with anyio.fail_after(3):
                async with anyio.create_task_group() as senders:
                    senders.start_soon(request_then_send)
                    await until(lambda: bool(got))
                    assert got == [b"request"]
                    assert await b.recv() == first  # the slot goes back
            assert await b.recv() == bytes(size)


def numbered(i: int, n: int) -> bytes:
    body = random.Random(i).randbytes(max(0, n - 8))
    return struct.pack("<II", i, zlib.crc32(body)) + body


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
async def test_full_duplex_with_cancelled_receives_neither_hangs_nor_loses(
        clean: None, kind: int) -> None:
    # both ends send (send, loan, send_object) and receive at once, receives
    # cancelled at random and made again: every message numbered and checked
    if sniffio.current_async_library() != "asyncio":
        pytest.skip("asyncio.wait_for's cancellations (trio's waits: the tests above)")
    count = 300
    a, b = aio.channel_pair(kind, shm_size=1 << 20, shm_threshold=2 * KiB,
                            max_frame=128 * KiB)
    progress: Dict[str, int] = {}

    async def sender(ch: aio.Channel, who: str) -> None:
        rnd = random.Random(who)
        for i in range(count):
            n = rnd.choice([16, 1000, 3000, 60 * KiB, 200 * KiB, 500 * KiB])
            m, how = numbered(i, n), rnd.random()
            if how < 0.15 and n >= 2 * KiB:
                loan = await ch.loan(n)
                loan.view[:] = m
                await ch.send_loan(loan)
            elif how < 0.3:
                await ch.send_object(bytearray(m))
            else:
                await ch.send(m)
            progress[who + " sent"] = i + 1

    async def receiver(ch: aio.Channel, who: str) -> None:
        rnd = random.Random(who + "r")
        i = 0
        while i < count:
            try:
                try:
                    # (a task of its own for each receive, before 3.12)
                    m = await asyncio.wait_for(ch.recv(), rnd.choice([0.0005, 0.002, 1.0]))
                except MessageKindError:
                    m = bytes(await asyncio.wait_for(ch.recv_object(), 5))
            except asyncio.TimeoutError:
                continue
            j, crc = struct.unpack_from("<II", m)
            assert (j, zlib.crc32(m[8:])) == (i, crc), who
            i += 1
            progress[who] = i

    async with a, b:
        with anyio.fail_after(20):  # a few seconds on a busy machine; a hang fails here
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender, a, "a")
                tg.start_soon(sender, b, "b")
                tg.start_soon(receiver, b, "b<-a")
                tg.start_soon(receiver, a, "a<-b")
    assert progress == {"a sent": count, "b sent": count, "b<-a": count, "a<-b": count}


async def test_a_receive_owing_returns_to_a_peer_that_reads_nothing_more_does_not_spin(
        clean: None) -> None:
    x, y = afunix.socketpair()
    peer = DocumentPeer(y, 64 * KiB)
    try:
        peer.slot(0, b"s" * 5000)
        # writes to `x` fail (EPIPE) from here, while it polls writable
        y.shutdown(socket.SHUT_RD)
        x.setblocking(False)
        async with aio.Channel(x) as a:
            with anyio.fail_after(5):
                assert await a.recv() == b"s" * 5000  # its slot is owed back
            got: List[bytes] = []

            async def receiver() -> None:
                got.append(await a.recv())

            async with anyio.create_task_group() as tg:
                tg.start_soon(receiver)
                await anyio.sleep(0.05)
                cpu = time.process_time()
                await anyio.sleep(0.5)
                used = time.process_time() - cpu
                peer.slot(8 * KiB, b"t" * 5000)  # the peer still writes
                await until(lambda: bool(got))
            # a spinning wait takes most of a CPU (0.25 s and more here, even
            # on a busy machine); waiting for input alone, next to nothing
            assert used < 0.1, used
            assert got == [b"t" * 5000]
    finally:
        peer.close()
        y.close()
