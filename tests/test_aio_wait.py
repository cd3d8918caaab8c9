"""afunix.aio's one "try, then wait on the loop": _aiowait.call_when_ready, and the single calls over it.

On asyncio, uvloop and trio (anyio), on both backends.  Each test makes the
kernel answer EAGAIN for real (an empty or a full socket), so the wait is
the loop's, not a mock's.  No test asserts on timings.
"""
from __future__ import annotations

import errno
import functools
import os
import socket
from typing import Any, Awaitable, Callable, List, Optional

import anyio
import pytest

import afunix
import afunix.aio as aio
from afunix import Message, _aiowait
from conftest import open_fds
from test_aio import drain

pytestmark = pytest.mark.anyio

BOUND = 30.0  # seconds any one test may take


def nb_pair(type: int = socket.SOCK_SEQPACKET) -> "tuple[socket.socket, socket.socket]":
    return afunix.socketpair(type, blocking=False)


def fill(sock: socket.socket) -> int:
    """Send 64-byte messages until the socket is full; returns how many went."""
    n = 0
    while True:
        try:
            n += afunix.send_many(sock, [b"f" * 64] * 64)
        except BlockingIOError:
            return n




async def until_waiting(fd: int, writable: bool = False) -> None:
    for _ in range(10000):
        if _aiowait.is_waiting(fd, writable):
            return
        await anyio.sleep(0)
    raise AssertionError("nothing started waiting on the socket")


class Counted:
    """A call that counts its tries and reports each outcome."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.tries = 0
        self.outcomes: List[str] = []

    def __call__(self, *args: Any) -> Any:
        self.tries += 1
        try:
            result = self.call(*args)
        except BlockingIOError:
            self.outcomes.append("EAGAIN")
            raise
        except BaseException as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        self.outcomes.append("ok")
        return result


class Task:
    """A coroutine run in a task group under a cancel scope of its own."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None

    async def run(self, call: Callable[..., Awaitable[Any]], *args: Any) -> None:
        with self.scope:
            try:
                self.value = await call(*args)
            except Exception as exc:
                self.error = exc
        self.finished.set()

    async def result(self) -> Any:
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.value


def start(group: Any, call: Callable[..., Awaitable[Any]], *args: Any) -> Task:
    task = Task()
    group.start_soon(task.run, call, *args)
    return task


@pytest.fixture(params=["first-try-inline", "first-try-in-helper"])
def first_try(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a single call makes its first try on asyncio: itself, or in call_when_ready.

    A program that never imported trio takes the first; this test process
    may have imported trio already, so both are forced here (under trio the
    helper makes every try either way).
    """
    monkeypatch.setattr(aio, "_modules", {} if request.param == "first-try-inline"
                        else {"trio": None})
    return str(request.param)


# ---- call_when_ready itself --------------------------------------------------------


async def test_eagain_then_readiness_then_the_result() -> None:
    a, b = nb_pair()
    with a, b:
        recv = Counted(afunix.recv_many)
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, _aiowait.call_when_ready, b.fileno(), False,
                             lambda: recv(b, 4, 64))
                await until_waiting(b.fileno())
                assert recv.outcomes == ["EAGAIN"]  # tried once, then waits on the loop
                afunix.send_many(a, [b"one", b"two"])
                got = await task.result()
        assert [m.data for m in got] == [b"one", b"two"]
        assert recv.outcomes == ["EAGAIN", "ok"]
        assert not _aiowait.is_waiting(b.fileno(), False)  # the reader is removed


async def test_ready_at_once_tries_once_and_never_waits() -> None:
    a, b = nb_pair()
    with a, b:
        afunix.send_many(a, [b"ready"])
        recv = Counted(afunix.recv_many)
        with anyio.fail_after(BOUND):
            got = await _aiowait.call_when_ready(b.fileno(), False, lambda: recv(b, 4, 64))
        assert [m.data for m in got] == [b"ready"] and recv.outcomes == ["ok"]


async def test_blocked_waits_before_its_first_try() -> None:
    a, b = nb_pair()
    with a, b:
        recv = Counted(afunix.recv_many)
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, functools.partial(_aiowait.call_when_ready, blocked=True),
                             b.fileno(), False, lambda: recv(b, 4, 64))
                await until_waiting(b.fileno())
                assert recv.tries == 0  # the caller's own try said EAGAIN: wait first
                afunix.send_many(a, [b"x"])
                got = await task.result()
        assert [m.data for m in got] == [b"x"] and recv.outcomes == ["ok"]


async def test_writable_wait_for_a_full_socket() -> None:
    a, b = nb_pair()
    with a, b:
        queued = fill(a)
        send = Counted(afunix.send_many)
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, functools.partial(_aiowait.call_when_ready, backoff=True),
                             a.fileno(), True, lambda: send(a, [b"last"], 0))
                await until_waiting(a.fileno(), writable=True)
                drained = drain(b)
                assert await task.result() == 1
        assert len(drained) == queued and send.outcomes[0] == "EAGAIN"
        assert send.outcomes[-1] == "ok"
        assert [m.data for m in drain(b)] == [b"last"]


async def test_cancelled_mid_wait_nothing_is_lost() -> None:
    a, b = nb_pair()
    with a, b:
        recv = Counted(afunix.recv_many)
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, _aiowait.call_when_ready, b.fileno(), False,
                             lambda: recv(b, 4, 64))
                await until_waiting(b.fileno())
                # readiness and the cancellation arrive together: the task
                # must not take the message it will never return
                afunix.send_many(a, [b"kept", b"too"])
                task.scope.cancel()
                await task.finished.wait()
        assert task.scope.cancelled_caught and task.value is None
        assert recv.outcomes == ["EAGAIN"]  # no try after the cancellation
        assert not _aiowait.is_waiting(b.fileno(), False)
        assert [m.data for m in drain(b)] == [b"kept", b"too"]


async def test_cancelled_mid_wait_descriptors_stay_queued() -> None:
    a, b = nb_pair()
    with a, b:
        before = open_fds()
        r, w = os.pipe()
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, aio.recv_fds, b, 64, 4)
                await until_waiting(b.fileno())
                afunix.send_fds(a, [b"with fds"], [r, w])
                task.scope.cancel()
                await task.finished.wait()
        os.close(r)
        os.close(w)
        assert task.scope.cancelled_caught
        data, fds, _, _ = afunix.recv_fds(b, 64, 4)  # the message and its descriptors wait
        assert data == b"with fds" and len(fds) == 2
        afunix.close_fds(fds)
        assert open_fds() == before  # none leaked


async def test_an_error_after_the_wait_propagates() -> None:
    a, b = nb_pair()
    with a, b:
        fill(a)
        send = Counted(afunix.send_many)
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, functools.partial(_aiowait.call_when_ready, backoff=True),
                             a.fileno(), True, lambda: send(a, [b"late"], 0))
                await until_waiting(a.fileno(), writable=True)
                b.close()  # the peer goes away: writable, and the send fails
                # as sock.send would: the peer left our messages unread, so
                # the kernel reports the reset, once (a second system call
                # for the same send would see only the broken pipe)
                with pytest.raises(ConnectionResetError):
                    await task.result()
        assert send.outcomes[0] == "EAGAIN"
        assert send.outcomes[-1] == "ConnectionResetError"
        assert not _aiowait.is_waiting(a.fileno(), True)


async def test_an_error_on_the_first_try_propagates_without_a_wait() -> None:
    a, b = nb_pair()
    with a, b:
        def refuse() -> None:
            raise OSError(errno.EINVAL, "refused")

        with anyio.fail_after(BOUND):
            with pytest.raises(OSError) as info:
                await _aiowait.call_when_ready(b.fileno(), False, refuse)
        assert info.value.errno == errno.EINVAL
        assert not _aiowait.is_waiting(b.fileno(), False)


async def test_nothing_to_wait_on_pauses_and_retries() -> None:
    # fd None (a connect to a full backlog): no reader, a growing pause
    answers = [BlockingIOError(errno.EAGAIN, "full"), BlockingIOError(errno.EAGAIN, "full")]

    def attempt() -> str:
        if answers:
            raise answers.pop(0)
        return "done"

    with anyio.fail_after(BOUND):
        assert await _aiowait.call_when_ready(None, True, attempt, backoff=True) == "done"
    assert answers == []


# ---- the single calls, first try inline or in the helper ----------------------------


async def test_recv_many_waits_then_receives(first_try: str) -> None:
    a, b = nb_pair()
    with a, b:
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, aio.recv_many, b, 1, 64)
                await until_waiting(b.fileno())
                afunix.send_many(a, [b"first", b"second"])
                (got,) = await task.result()
            assert got.data == b"first"
            (second,) = await aio.recv_many(b, 1, 64)  # queued: taken at once
        assert second.data == b"second"


async def test_recv_fds_waits_then_receives(first_try: str) -> None:
    a, b = nb_pair()
    with a, b:
        r, w = os.pipe()
        try:
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as group:
                    task = start(group, aio.recv_fds, b, 64, 2)
                    await until_waiting(b.fileno())
                    afunix.send_fds(a, [b"fd"], [r])
                    data, fds, _, _ = await task.result()
        finally:
            os.close(r)
            os.close(w)
        assert data == b"fd" and len(fds) == 1
        afunix.close_fds(fds)


async def test_send_many_one_message_waits_for_room(first_try: str) -> None:
    a, b = nb_pair()
    with a, b:
        queued = fill(a)
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, aio.send_many, a, [b"waited"])
                await until_waiting(a.fileno(), writable=True)
                assert len(drain(b)) == queued
                assert await task.result() == 1
        assert [m.data for m in drain(b)] == [b"waited"]


async def test_send_fds_waits_for_room(first_try: str) -> None:
    a, b = nb_pair()
    with a, b:
        queued = fill(a)
        r, w = os.pipe()
        try:
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as group:
                    task = start(group, aio.send_fds, a, [b"fds"], [r, w])
                    await until_waiting(a.fileno(), writable=True)
                    assert len(drain(b)) == queued
                    assert await task.result() == 3
        finally:
            os.close(r)
            os.close(w)
        (message,) = drain(b)
        assert message.data == b"fds" and len(message.fds) == 2
        afunix.close_fds(message.fds)


async def test_single_calls_raise_what_the_sync_calls_raise(first_try: str) -> None:
    a, b = nb_pair()
    with a, b:
        with anyio.fail_after(BOUND):
            with pytest.raises(TypeError):
                await aio.send_many(a, [12])
            with pytest.raises(ValueError):
                await aio.recv_many(b, 0, 64)
            with pytest.raises(TypeError):
                await aio.recv_many(b, 1, 64, maxfds=None)  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                await aio.send_fds(a, [b"x"], [-1])
            b.close()
            with pytest.raises(BrokenPipeError):
                await aio.send_many(a, [b"gone"])
            with pytest.raises(BrokenPipeError):
                await aio.send_fds(a, [b"gone"], [])
        a.close()
        with anyio.fail_after(BOUND):
            with pytest.raises(OSError) as info:
                await aio.recv_fds(a, 64, 1)
        assert info.value.errno == errno.EBADF
