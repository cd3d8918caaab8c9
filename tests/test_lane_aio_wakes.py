"""Who wakes the tasks of an afunix.aio.Channel that another task's call leaves waiting.

A call that meets a ProtocolError closes the channel from inside (a send
reading the peer's frames for its returns, or a receive): every other task
waiting on the channel wakes and gets EBADF, as after close().  Under trio a
receive owing returns keeps a wake that comes before its two waits park.  A
send waiting for slots while its task holds a batch pauses, not spins.
Under asyncio, uvloop and trio; both backends.
"""
from __future__ import annotations

import errno
import importlib
import socket
from typing import Any, List

import anyio
import pytest

import afunix.aio as aio
from afunix import ProtocolError, shm
from afunix._aiowait import is_waiting, trio_running, wait_either, wake
from conftest import need_library, run_python

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


# One task waits on the channel, enlisted on the loop in the turn the channel
# closes: uvloop (libuv) registers its callback with epoll only at the next
# poll, and aborts the process (SIGABRT) when that meets a closed descriptor.
# Each callback must go while the descriptor is still open (its number may be
# another object's once closed).
CLOSED_IN_THE_TURN = r"""
import asyncio, errno, os
import uvloop
import afunix.aio as aio
from afunix import ProtocolError

KiB = 1 << 10
BIG = bytes(700 * KiB)
late = []  # callbacks removed after their descriptor closed

class Loop(uvloop.Loop):
    def remove_reader(self, fd):
        self.removing(fd)
        return super().remove_reader(fd)

    def remove_writer(self, fd):
        self.removing(fd)
        return super().remove_writer(fd)

    def removing(self, fd):
        try:
            os.fstat(fd)
        except OSError:
            late.append(fd)

async def waiting(call):
    try:
        await call()
    except OSError as exc:
        return exc.errno

async def trial():
    lane = case == "send-reads-a-bad-frame"
    a, b = aio.channel_pair(**dict(shm_size=1 << 20, shm_threshold=4 * KiB,
                                   max_frame=64 * KiB) if lane else {})
    try:
        if case in ("close-under-a-send", "receive-meets-a-bad-frame"):
            while True:  # the socket full: the send waits for room
                try:
                    a.socket.send(bytes(64 * KiB))
                except BlockingIOError:
                    break
            waiter = asyncio.ensure_future(waiting(lambda: a.send(b"m")))
        else:
            if lane:
                await a.send(BIG)  # the lane is full: the next send reads for returns
            waiter = asyncio.ensure_future(waiting(a.recv))
        await asyncio.sleep(0)  # the waiter enlists; the loop polls after this turn
        if case.startswith("close"):
            a.close()
        else:
            b.socket.send(b"\xff" * 64)
            try:
                await (a.send(BIG) if lane else a.recv())
            except ProtocolError:
                pass
        assert a.closed
        assert await asyncio.wait_for(waiter, 3) == errno.EBADF
    finally:
        a.close()
        b.close()

async def main():
    for _ in range(20):
        await trial()

Loop().run_until_complete(main())
assert not late, late
print("ok")
"""


@pytest.mark.parametrize("case", ["close-under-a-receive", "close-under-a-send",
                                  "send-reads-a-bad-frame", "receive-meets-a-bad-frame"])
def test_uvloop_keeps_no_callback_on_the_descriptor_a_close_takes(
        backend: str, case: str) -> None:
    # close(), or a call that closes the channel on a ProtocolError, while
    # another task waits on it: the callbacks go before the descriptor does
    need_library("uvloop")
    done = run_python("case = %r\n" % case + CLOSED_IN_THE_TURN, backend)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


class WakeBeforeTheWaits:
    """A trio Instrument: wakes `fd`'s waits as the first task of wait_either takes its first step."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.rung: List[str] = []

    def before_task_step(self, task: Any) -> None:
        if not self.rung and "wait_either" in task.name:
            self.rung.append(task.name)
            wake(self.fd)


@pytest.mark.anyio
async def test_trio_wait_either_keeps_a_wake_that_comes_before_its_waits_park() -> None:
    # wait_either's two readiness waits are child tasks, parked only at a
    # later turn of the scheduler; the wake lands just before the first of
    # them takes its first step (trio's notify_closing reaches parked
    # waits only), on a socket neither readable nor writable: nothing
    # else ends the wait
    if trio_running() is None:
        pytest.skip("trio's waits (asyncio's wait_either is one future, enlisted at once)")
    lowlevel = importlib.import_module("trio.lowlevel")
    x, y = socket.socketpair()
    x.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            while True:
                x.send(bytes(64 * KiB))
        instrument = WakeBeforeTheWaits(x.fileno())
        lowlevel.add_instrument(instrument)
        try:
            with anyio.fail_after(3):
                await wait_either(x.fileno())
        finally:
            lowlevel.remove_instrument(instrument)
        assert instrument.rung
    finally:
        x.close()
        y.close()


@pytest.mark.anyio
async def test_a_send_waiting_for_slots_while_its_task_holds_a_batch_does_not_spin(
        clean: None) -> None:
    a, b = lane_pair()
    async with a, b:
        await a.send(BIG)  # the lane of `a` is full; b takes it at the end
        b._ch.send(b"m" * 1000)
        batch = await a.recv_batch()  # held: a read for returns only appends bytes
        assert len(batch) == 1

        async def flood() -> None:  # until the reader's buffer and the socket are full
            with anyio.move_on_after(0.3):
                while True:
                    try:
                        b._ch.send(b"m" * 1000)
                    except BlockingIOError:
                        await anyio.sleep(0.01)

        tries = [0]
        send_many = a._ch.send_many

        def counted(messages: Any) -> int:
            tries[0] += 1
            return send_many(messages)

        a._ch.send_many = counted  # type: ignore[method-assign]
        sent = []

        async def send() -> None:  # waits for a slot, which never comes
            await a.send(BIG)
            sent.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            async with anyio.create_task_group() as sending:
                # (cancelled when counted, not after a fixed time: on a loaded
                # machine the sleeps below may take longer than asked)
                sending.start_soon(send)
                await anyio.sleep(0.4)
                before = tries[0]
                await anyio.sleep(0.5)
                made = tries[0] - before
                sending.cancel_scope.cancel()
            assert not sent
        # A send trying again at every turn of the loop tries thousands of
        # times in 0.5 s (and took most of a CPU); pausing between tries
        # (10 ms steps), a few dozen.  Counted, not timed: the CPU time of
        # a JIT's warm-up or of a loaded machine says nothing here.
        assert made < 500, made
