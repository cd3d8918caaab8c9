"""One sender thread and one receiver thread on a channel with a lane: the sides stay independent.

A sender waiting for the peer to return slots reads the RETURN frames on
the receiving side, and a receive writes its own RETURN frames on the
sending side: each does so only for a moment, while nobody else uses that
side, and a caller of that side is never refused for it (docs/channel.md:
"Receiving and sending are independent").  Returns a receive leaves to a
sender are written when that sender ends.  The async channel, whose tasks
never overlap inside a call, runs the same pattern.  Every socket has a
timeout and every thread is joined with one: a regression fails, it does
not hang.  Both backends.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Callable, List

import pytest

import afunix
from afunix import Channel, aio, channel_pair, shm
from afunix._chanio import RECEIVING, SENDING, Borrowed

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

KiB = 1 << 10
MiB = 1 << 20
TYPES = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET]
KINDS = ["stream", "seqpacket"]


def payload(i: int, n: int) -> bytes:
    return (struct.pack("<I", i) * (n // 4 + 1))[:n]


def in_thread(errors: List[BaseException], call: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        try:
            call()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_until(check: Callable[[], bool], bound: float = 5.0) -> None:
    deadline = time.monotonic() + bound
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


@pytest.mark.parametrize("kind", TYPES, ids=KINDS)
def test_a_receive_is_not_refused_while_a_send_waits_for_slots(kind: int) -> None:
    # over max_frame: the second message can only wait for the first's slot
    a, b = channel_pair(kind, shm_size=MiB, max_frame=64 * KiB)
    with a, b:
        a.socket.settimeout(5)
        b.socket.settimeout(5)
        a.send(payload(0, 600 * KiB))
        errors: List[BaseException] = []
        sender = in_thread(errors, lambda: a.send(payload(1, 600 * KiB)))
        wait_until(lambda: SENDING in a._busy)
        time.sleep(0.1)  # the sender is waiting for room
        b.send(b"for a")
        assert a.recv() == b"for a"  # the only receiver of `a`
        assert b.recv() == payload(0, 600 * KiB)  # its slot goes back: the sender goes on
        assert b.recv() == payload(1, 600 * KiB)
        sender.join(10)
        assert not sender.is_alive() and errors == []


def test_a_send_waits_for_a_receive_writing_its_returns_instead_of_being_refused() -> None:
    a, b = channel_pair(shm_size=MiB, max_frame=64 * KiB)
    with a, b:
        a.socket.settimeout(5)
        b.socket.settimeout(5)
        b.send(payload(0, 200 * KiB))  # a slot of b's lane: a's receive returns it
        entered, release = threading.Event(), threading.Event()
        write = a._send_returns

        def slow_write() -> None:  # the receive's write of its RETURN frame, held up
            entered.set()
            release.wait(5)
            write()

        a._send_returns = slow_write  # type: ignore[method-assign]
        errors: List[BaseException] = []
        got: List[bytes] = []
        receiver = in_thread(errors, lambda: got.append(a.recv()))
        assert entered.wait(5)
        timer = threading.Timer(0.2, release.set)
        timer.start()
        try:
            a.send(b"meanwhile")  # the only sender of `a`
            assert release.is_set()  # it waited for the write to end
        finally:
            release.set()
            timer.join(5)
            receiver.join(5)
            del a._send_returns
        assert not receiver.is_alive() and errors == []
        assert got == [payload(0, 200 * KiB)]
        assert b.recv() == b"meanwhile"
        b.send(payload(1, 900 * KiB))  # room only with the slot returned
        assert a.recv() == payload(1, 900 * KiB)


def test_a_sender_reads_the_returns_itself_once_the_receive_holding_the_socket_ends() -> None:
    a, b = channel_pair(shm_size=MiB, max_frame=64 * KiB)
    with a, b:
        a.socket.settimeout(5)
        b.socket.settimeout(5)
        a.send(payload(0, 600 * KiB))
        errors: List[BaseException] = []
        receiver = in_thread(errors, a.recv)  # holds the receiving side, waiting for input
        wait_until(lambda: RECEIVING in a._busy)
        sender = in_thread(errors, lambda: a.send(payload(1, 600 * KiB)))
        wait_until(lambda: SENDING in a._busy)
        time.sleep(0.05)  # the sender waits for room while the receive reads
        b.send(b"x")
        receiver.join(5)
        assert not receiver.is_alive()
        # the slot comes back after the receive ended: nobody else reads it
        assert b.recv() == payload(0, 600 * KiB)
        sender.join(2)  # not the socket's whole timeout
        assert not sender.is_alive() and errors == []
        assert b.recv() == payload(1, 600 * KiB)


def test_returns_a_receive_leaves_to_a_flush_are_written_when_it_ends() -> None:
    x, y = afunix.socketpair()
    # `a` has no lane of its own; it reads b's and returns its slots
    a = Channel(x)
    b = Channel(y, shm_size=2 * MiB, max_frame=MiB)
    big = 1536 * KiB  # over b's max_frame: only the lane carries it
    with a, b:
        y.settimeout(5)
        b.send(payload(0, big))
        x.settimeout(0.2)
        a.send(bytes(MiB))  # more than the socket holds: a tail stays pending
        assert a.pending
        x.settimeout(5)
        errors: List[BaseException] = []
        flusher = in_thread(errors, a.flush)  # blocked: b reads nothing yet
        wait_until(lambda: SENDING in a._busy)
        assert a.recv() == payload(0, big)  # its RETURN frame is left to the flush
        assert b.recv() == bytes(MiB)
        flusher.join(5)
        assert not flusher.is_alive() and errors == []
        # too large beside the first: only its returned slot makes room
        y.settimeout(1)
        b.send(payload(1, big))
        assert a.recv() == payload(1, big)


@pytest.mark.parametrize("kind", TYPES, ids=KINDS)
def test_full_duplex_through_full_lanes_both_ways(kind: int) -> None:
    # each end: one thread sends, one receives; messages over max_frame go
    # only through the lane, which holds two of them: every one waits for a
    # slot the other end returns while its own receiver thread reads
    a, b = channel_pair(kind, shm_size=512 * KiB, max_frame=64 * KiB)
    n, size = 60, 200 * KiB
    with a, b:
        a.socket.settimeout(10)
        b.socket.settimeout(10)
        errors: List[BaseException] = []
        to_a: List[bytes] = []
        to_b: List[bytes] = []

        def send(ch: Channel, base: int) -> None:
            for i in range(n):
                ch.send(payload(base + i, size))

        def receive(ch: Channel, got: List[bytes]) -> None:
            for _ in range(n):
                got.append(ch.recv())

        threads = [in_thread(errors, lambda: send(a, 0)), in_thread(errors, lambda: send(b, n)),
                   in_thread(errors, lambda: receive(a, to_a)),
                   in_thread(errors, lambda: receive(b, to_b))]
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads) and errors == []
        assert to_b == [payload(i, size) for i in range(n)]
        assert to_a == [payload(n + i, size) for i in range(n)]


def test_a_call_waits_for_a_borrow_of_another_thread_and_is_refused_inside_its_own() -> None:
    a, b = channel_pair(shm_size=MiB)
    with a, b:
        a.socket.settimeout(5)
        b.send(b"x")
        errors: List[BaseException] = []

        def inside_own_borrow() -> None:  # as a signal handler's call in the middle of one
            a._busy[RECEIVING] = Borrowed()
            try:
                with pytest.raises(RuntimeError):
                    a.recv()
            finally:
                del a._busy[RECEIVING]

        t = in_thread(errors, inside_own_borrow)
        t.join(5)
        assert not t.is_alive() and errors == []
        a._busy[RECEIVING] = Borrowed()  # this thread's: the other one waits for it
        got: List[bytes] = []
        t = in_thread(errors, lambda: got.append(a.recv()))
        time.sleep(0.1)
        assert t.is_alive() and not errors
        del a._busy[RECEIVING]
        a._borrow_released()
        t.join(5)
        assert not t.is_alive() and errors == [] and got == [b"x"]


def test_aio_a_receive_and_a_send_waiting_for_slots_side_by_side() -> None:
    async def main() -> None:
        a, b = aio.channel_pair(shm_size=256 * KiB, shm_threshold=16 * KiB, max_frame=100 * KiB)
        async with a, b:
            await a.send(payload(0, 200 * KiB))
            sending = asyncio.ensure_future(a.send(payload(1, 200 * KiB)))  # waits for a slot
            await asyncio.sleep(0.05)
            assert not sending.done()
            await b.send(b"for a")
            assert await a.recv() == b"for a"
            assert await b.recv() == payload(0, 200 * KiB)
            await asyncio.wait_for(sending, 5)
            assert await b.recv() == payload(1, 200 * KiB)

            # both ways at once: a sending task and a receiving task per end
            n, size = 30, 200 * KiB

            async def send(ch: "aio.Channel", base: int) -> None:
                for i in range(n):
                    await ch.send(payload(base + i, size))

            async def receive(ch: "aio.Channel") -> List[bytes]:
                return [await ch.recv() for _ in range(n)]

            _, _, to_a, to_b = await asyncio.gather(send(a, 0), send(b, n), receive(a), receive(b))
            assert to_b == [payload(i, size) for i in range(n)]
            assert to_a == [payload(n + i, size) for i in range(n)]

    asyncio.run(asyncio.wait_for(main(), 30))
