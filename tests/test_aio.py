"""afunix.aio on both backends and both event loops (asyncio's own and uvloop).

Every coroutine runs under asyncio.wait_for, so every test is bounded in
time; no test asserts on timings.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any, Awaitable, Callable, Iterator, List, TypeVar

import pytest

import afunix
import afunix.aio as aio
from afunix import _aiowait
from afunix import Message, RecvBatch, TruncatedError
from conftest import need_library, open_fds

T = TypeVar("T")
Runner = Callable[[Awaitable[T]], T]

BOUND = 30.0  # seconds any one test may run on a loop


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    need_library("uvloop")
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    if not _UVLOOP_WARMED:
        # libuv opens a process-wide pipe with its first loop and keeps it:
        # open it now, before any test counts descriptors
        loop = factory()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        _UVLOOP_WARMED.append(True)
    return factory


_UVLOOP_WARMED: List[bool] = []


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner[Any]]:
    """Run a coroutine to completion on a fresh loop of this run's kind, bounded in time."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else _uvloop_factory()

    def run(coro: Awaitable[T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, BOUND)

        loop = factory()
        try:
            return loop.run_until_complete(bounded())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    yield run


def nb_pair(type: int = socket.SOCK_SEQPACKET) -> "tuple[socket.socket, socket.socket]":
    return afunix.socketpair(type, blocking=False)


def numbered(n: int, size: int = 64) -> List[bytes]:
    return [b"%08d" % i + b"." * (size - 8) for i in range(n)]


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def drain(sock: socket.socket) -> List[Message]:
    """Everything queued on a non-blocking socket, synchronously."""
    out: List[Message] = []
    while True:
        try:
            got = afunix.recv_many(sock, 1024, 65536, maxfds=8)
        except BlockingIOError:
            return out
        if not got:
            return out
        out.extend(got)


async def until_waiting(sock: socket.socket, writable: bool = False) -> None:
    """Yield to the loop until a coroutine waits on `sock` in that direction."""
    loop = asyncio.get_running_loop()
    for _ in range(10000):
        if (loop, sock.fileno(), writable) in _aiowait.waiters:
            return
        await asyncio.sleep(0)
    raise AssertionError("nothing started waiting on the socket")


def fill(sock: socket.socket) -> int:
    """Send 64-byte messages until the socket is full; returns how many went."""
    n = 0
    while True:
        try:
            n += afunix.send_many(sock, [b"f" * 64] * 64)
        except BlockingIOError:
            return n


# ---- round trips ------------------------------------------------------------


@pytest.mark.parametrize("type", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
def test_batches_between_tasks(run: Runner[Any], type: int) -> None:
    a, b = nb_pair(type)
    messages = numbered(5000)  # many times what the socket holds: the sender waits

    async def receive() -> List[bytes]:
        got: List[bytes] = []
        batch = RecvBatch(64, 128)
        while len(got) < len(messages):
            if len(got) % 2:
                got.extend(m.data for m in await aio.recv_many(b, 64, 128))
            else:
                n = await aio.recv_batch(b, batch)
                got.extend(bytes(v) for v in batch)
                assert n == len(batch)
        return got

    async def main() -> List[bytes]:
        receiver = asyncio.ensure_future(receive())
        assert await aio.send_many(a, messages) == len(messages)
        return await receiver

    with a, b:
        assert run(main()) == messages


def test_send_many_partial_counts(run: Runner[Any]) -> None:
    a, b = nb_pair()
    messages = numbered(3000)

    async def main() -> List[int]:
        counts = []
        sent = 0
        receiver = asyncio.ensure_future(collect(b, len(messages)))
        while sent < len(messages):
            k = await aio.send_many_partial(a, messages[sent:])
            assert k >= 1
            counts.append(k)
            sent += k
        assert await receiver == messages
        assert await aio.send_many_partial(a, []) == 0
        return counts

    with a, b:
        counts = run(main())
    assert sum(counts) == len(messages)
    assert len(counts) > 1  # it did come back with partial counts


async def collect(sock: socket.socket, n: int) -> List[bytes]:
    got: List[bytes] = []
    while len(got) < n:
        msgs = await aio.recv_many(sock, 256, 65536)
        assert msgs, "end of stream before all messages arrived"
        got.extend(m.data for m in msgs)
    return got


def test_stream_send_many_keeps_bytes_and_descriptors(run: Runner[Any],
                                                      fd_baseline: set[int]) -> None:
    a, b = nb_pair(socket.SOCK_STREAM)
    r, w = os.pipe()
    chunks = [bytes([i % 251]) * 10000 for i in range(100)]  # 1 MB: the sender waits
    messages: List[Any] = list(chunks)
    messages[50] = Message(chunks[50], fds=(r, w))

    async def receive() -> "tuple[bytes, List[int]]":
        data = bytearray()
        fds: List[int] = []
        while len(data) < sum(map(len, chunks)):
            for m in await aio.recv_many(b, 64, 65536, maxfds=2):
                data += m.data
                fds.extend(m.fds)
        return bytes(data), fds

    async def main() -> "tuple[bytes, List[int]]":
        receiver = asyncio.ensure_future(receive())
        assert await aio.send_many(a, messages) == len(messages)
        return await receiver

    with a, b:
        try:
            data, fds = run(main())
            assert data == b"".join(chunks)
            assert len(fds) == 2 and same_file(fds[0], r) and same_file(fds[1], w)
            assert all(cloexec(fd) for fd in fds)
            afunix.close_fds(fds)
        finally:
            afunix.close_fds([r, w])


def test_stream_send_fds(run: Runner[Any], fd_baseline: set[int]) -> None:
    a, b = nb_pair(socket.SOCK_STREAM)

    async def main() -> None:
        r, w = os.pipe()
        try:
            assert await aio.send_fds(a, [b"ab", b"cd"], [r]) == 4
            # all of the data and the descriptors in one sendmsg, as
            # socket.send_fds sends them: one read gets them together
            data, fds, _, _ = await aio.recv_fds(b, 4, 1)
            assert data == b"abcd" and len(fds) == 1 and same_file(fds[0], r)
            afunix.close_fds(fds)
            with pytest.raises(ValueError):
                await aio.send_fds(a, [], [r])  # descriptors need a data byte on a stream
            with pytest.raises(ValueError):
                await aio.send_many_partial(a, [b"x"])  # no boundaries on a stream
        finally:
            afunix.close_fds([r, w])

    with a, b:
        run(main())


def test_descriptors_between_tasks(run: Runner[Any], fd_baseline: set[int]) -> None:
    a, b = nb_pair()
    r, w = os.pipe()

    async def main() -> None:
        # send_fds / recv_fds
        receiver = asyncio.ensure_future(aio.recv_fds(b, 100, 2))
        await until_waiting(b)
        assert await aio.send_fds(a, [b"one ", b"two"], [r, w]) == 7
        data, fds, flags, address = await receiver
        assert data == b"one two" and address is None
        assert not flags & socket.MSG_CTRUNC
        assert [same_file(x, y) for x, y in zip(fds, [r, w])] == [True, True]
        assert all(cloexec(fd) for fd in fds)
        afunix.close_fds(fds)
        # batches of messages with descriptors
        msgs = [Message(b"m%d" % i, fds=(r,) * (i % 4)) for i in range(200)]
        receiving = asyncio.ensure_future(recv_messages(b, 200, maxfds=3))
        assert await aio.send_many(a, msgs) == 200
        got = await receiving
        assert [m.data for m in got] == [m.data for m in msgs]
        assert [len(m.fds) for m in got] == [len(m.fds) for m in msgs]
        for m in got:
            assert all(same_file(fd, r) and cloexec(fd) for fd in m.fds)
            afunix.close_fds(m.fds)

    with a, b:
        try:
            run(main())
        finally:
            afunix.close_fds([r, w])


async def recv_messages(sock: socket.socket, n: int, maxfds: int = 0) -> List[Message]:
    got: List[Message] = []
    while len(got) < n:
        got.extend(await aio.recv_many(sock, 64, 1024, maxfds=maxfds))
    return got


def test_recv_batch_with_descriptors(run: Runner[Any], fd_baseline: set[int]) -> None:
    a, b = nb_pair()
    r, w = os.pipe()

    async def main() -> None:
        with RecvBatch(16, 64, maxfds=2) as batch:
            afunix.send_many(a, [Message(b"x", fds=(r, w)), Message(b"y", fds=(w,))])
            assert await aio.recv_batch(b, batch) == 2
            taken = batch.fds(0)
            assert len(taken) == 2
            afunix.close_fds(taken)
            # message 1's descriptor was not taken: the next fill closes it
            waiting = asyncio.ensure_future(aio.recv_batch(b, batch))
            await until_waiting(b)
            afunix.send_many(a, [b"z"])
            assert await waiting == 1 and bytes(batch[0]) == b"z"

    with a, b:
        try:
            run(main())
        finally:
            afunix.close_fds([r, w])


def test_truncated_descriptors_raise_and_do_not_leak(run: Runner[Any],
                                                     fd_baseline: set[int]) -> None:
    a, b = nb_pair()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]

    async def main() -> None:
        receiver = asyncio.ensure_future(aio.recv_fds(b, 100, 1))
        await until_waiting(b)
        await aio.send_fds(a, [b"data"], fds)
        with pytest.raises(TruncatedError) as info:
            await receiver
        assert info.value.data == b"data"
        assert info.value.flags & socket.MSG_CTRUNC

    with a, b:
        try:
            run(main())
        finally:
            afunix.close_fds(fds)


def test_end_of_stream(run: Runner[Any]) -> None:
    async def main() -> None:
        for type in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
            a, b = nb_pair(type)
            with b:
                waiting = asyncio.ensure_future(aio.recv_many(b, 8, 64))
                await until_waiting(b)
                a.close()
                assert await waiting == []
                assert await aio.recv_batch(b, RecvBatch(4, 64)) == 0
                assert await aio.recv_fds(b, 64, 1) == (b"", [], 0, None)
        a, b = nb_pair()
        with a:
            b.close()
            with pytest.raises(BrokenPipeError):
                await aio.send_many(a, [b"x"])

    run(main())


def test_keywords_are_honoured(run: Runner[Any], short_dir: str) -> None:
    async def main() -> None:
        a, b = nb_pair()
        with a, b:
            # flags reach the kernel: MSG_OOB is not supported on AF_UNIX SEQPACKET
            with pytest.raises(OSError):
                await aio.send_many(a, [b"x"], socket.MSG_OOB)
            with pytest.raises(OSError):
                await aio.send_many_partial(a, [b"x"], socket.MSG_OOB)
            with pytest.raises(OSError):
                await aio.send_fds(a, [b"x"], [], socket.MSG_OOB)
            await aio.send_many(a, [b"peek"])
            # (recvmmsg with MSG_PEEK reads the head message again for every
            # slot, so peek one at a time)
            peeked = await aio.recv_many(b, 1, 64, socket.MSG_PEEK)
            assert [m.data for m in peeked] == [b"peek"]
            data, _, _, _ = await aio.recv_fds(b, 64, 0, socket.MSG_PEEK)
            assert data == b"peek"
            batch = RecvBatch(1, 64)
            assert await aio.recv_batch(b, batch, socket.MSG_PEEK) == 1
            assert [m.data for m in await aio.recv_many(b, 4, 64)] == [b"peek"]
        # address: an unconnected DGRAM sender reaches the bound receiver
        path = os.path.join(short_dir, "d")
        with afunix.listen(path, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
            rx.setblocking(False)
            tx.setblocking(False)
            tx.bind(os.path.join(short_dir, "s"))
            await aio.send_fds(tx, [b"to"], [], address=path)
            await aio.send_many(tx, [Message(b"many", address=path)])
            got = await recv_messages(rx, 2)
            assert [(m.data, m.address) for m in got] == [
                (b"to", os.path.join(short_dir, "s")), (b"many", os.path.join(short_dir, "s"))]

    run(main())


def test_unconnected_dgram_sender_to_a_full_queue(run: Runner[Any], short_dir: str) -> None:
    """The sender polls writable while the receiver's queue is full: it must still get through."""
    path = os.path.join(short_dir, "q")
    messages = numbered(300)  # far more than net.unix.max_dgram_qlen

    async def main() -> None:
        with afunix.listen(path, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
            rx.setblocking(False)
            tx.setblocking(False)
            receiver = asyncio.ensure_future(collect(rx, len(messages)))
            to = [Message(m, address=path) for m in messages]
            assert await aio.send_many(tx, to) == len(messages)
            assert await receiver == messages
            receiver = asyncio.ensure_future(collect(rx, 20))
            for m in to[:20]:  # and one at a time, through send_fds
                await aio.send_fds(tx, [m.data], [], address=path)
            assert await receiver == messages[:20]

    run(main())


# ---- blocking sockets and bad arguments ----------------------------------------


def test_blocking_socket_is_a_value_error(run: Runner[Any]) -> None:
    async def main() -> None:
        for timeout in (None, 5.0):
            a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
            with a, b:
                a.settimeout(timeout)
                b.settimeout(timeout)
                a.send(b"queued")
                batch = RecvBatch(1, 64)
                calls: List[Awaitable[Any]] = [
                    aio.send_many(a, [b"x"]),
                    aio.send_many_partial(a, [b"x"]),
                    aio.send_fds(a, [b"x"], []),
                    aio.recv_many(b, 1, 64),
                    aio.recv_batch(b, batch),
                    aio.recv_fds(b, 64, 1),
                    aio.accept(b),
                ]
                for call in calls:
                    with pytest.raises(ValueError, match="must be non-blocking"):
                        await call
                assert b.gettimeout() == timeout  # the socket is not changed
                b.setblocking(False)
                # nothing was consumed or sent by the refused calls
                assert [m.data for m in drain(b)] == [b"queued"]

    run(main())


class FdOnly:
    """An object with fileno() only, as some wrappers are."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def test_objects_with_fileno(run: Runner[Any]) -> None:
    a, b = nb_pair()

    async def main() -> None:
        waiting = asyncio.ensure_future(aio.recv_many(FdOnly(b), 8, 64))
        await until_waiting(b)
        assert await aio.send_many(FdOnly(a), [b"1", b"2"]) == 2
        assert [m.data for m in await waiting] == [b"1", b"2"]
        a.setblocking(True)
        with pytest.raises(ValueError, match="must be non-blocking"):
            await aio.send_many(FdOnly(a), [b"x"])
        assert os.get_blocking(a.fileno())

    with a, b:
        run(main())


def test_bad_arguments(run: Runner[Any]) -> None:
    async def main() -> None:
        a, b = nb_pair()
        with a, b:
            with pytest.raises(TypeError):
                await aio.recv_batch(b, "not a batch")  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                await aio.recv_many(b, 0, 64)
            with pytest.raises(TypeError):
                await aio.send_many(a, ["text"])
            with pytest.raises(TypeError):
                await aio.accept(FdOnly(a))  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await aio.recv_many(object(), 1, 64)
        with pytest.raises(OSError):
            await aio.recv_many(a, 1, 64)  # closed: EBADF, as the stdlib raises
        with pytest.raises(ValueError):
            await aio.connect("/tmp/" + "x" * 200)

    run(main())


# ---- cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("call", ["recv_many", "recv_batch", "recv_fds"])
def test_cancelled_receive_consumes_nothing(run: Runner[Any], call: str,
                                            fd_baseline: set[int]) -> None:
    """Cancel at every point between the data's arrival and the task's return."""
    a, b = nb_pair()
    r, w = os.pipe()
    # Closed explicitly: on PyPy a dropped batch keeps its descriptors until
    # the garbage collector runs.
    batch = RecvBatch(8, 64, maxfds=2)

    def start() -> "asyncio.Future[Any]":
        if call == "recv_many":
            return asyncio.ensure_future(aio.recv_many(b, 8, 64, maxfds=2))
        if call == "recv_batch":
            return asyncio.ensure_future(aio.recv_batch(b, batch))
        return asyncio.ensure_future(aio.recv_fds(b, 64, 2))

    async def main() -> None:
        received = 0
        for yields in range(8):
            task = start()
            await until_waiting(b)
            afunix.send_many(a, [Message(b"m", fds=(r, w))])
            for _ in range(yields):
                await asyncio.sleep(0)
            task.cancel()
            try:
                result = await task
            except asyncio.CancelledError:
                # nothing consumed: the message and its descriptors wait
                got = drain(b)
                assert [m.data for m in got] == [b"m"] and len(got[0].fds) == 2
                afunix.close_fds(got[0].fds)
            else:
                received += 1
                if call == "recv_many":
                    assert [m.data for m in result] == [b"m"]
                    afunix.close_fds(result[0].fds)
                elif call == "recv_fds":
                    assert result[0] == b"m" and len(result[1]) == 2
                    afunix.close_fds(result[1])
                else:
                    assert result == 1 and batch.fd_counts() == [2]
                    batch.close()  # closes the two received descriptors
                assert drain(b) == []
        assert received >= 1  # the later cancels come after the task finished

    with a, b, batch:
        try:
            run(main())
        finally:
            afunix.close_fds([r, w])


def test_cancelled_send_many_leaves_a_prefix(run: Runner[Any]) -> None:
    a, b = nb_pair()
    messages = numbered(2000)

    async def main() -> None:
        task = asyncio.ensure_future(aio.send_many(a, messages))
        await until_waiting(a, writable=True)  # k messages went, the rest wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = [m.data for m in drain(b)]
        assert 0 < len(got) < len(messages)
        assert got == messages[:len(got)]  # messages[:k] sent, nothing else

    with a, b:
        run(main())


def test_cancelled_send_many_partial_sent_nothing(run: Runner[Any]) -> None:
    a, b = nb_pair()

    async def main() -> None:
        queued = fill(a)
        task = asyncio.ensure_future(aio.send_many_partial(a, [b"late"]))
        await until_waiting(a, writable=True)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = drain(b)
        assert len(got) == queued and all(m.data == b"f" * 64 for m in got)

    with a, b:
        run(main())


def test_cancelled_send_fds_sent_nothing(run: Runner[Any], fd_baseline: set[int]) -> None:
    a, b = nb_pair()
    r, w = os.pipe()

    async def main() -> None:
        queued = fill(a)
        task = asyncio.ensure_future(aio.send_fds(a, [b"late"], [r]))
        await until_waiting(a, writable=True)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = drain(b)
        assert len(got) == queued and not any(m.fds for m in got)

    with a, b:
        try:
            run(main())
        finally:
            afunix.close_fds([r, w])


def test_cancelled_accept_takes_no_connection(run: Runner[Any], short_dir: str,
                                              fd_baseline: set[int]) -> None:
    path = os.path.join(short_dir, "l")

    async def main() -> None:
        with afunix.listen(path, socket.SOCK_SEQPACKET) as srv:
            srv.setblocking(False)
            task = asyncio.ensure_future(aio.accept(srv))
            await until_waiting(srv)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with await aio.connect(path, socket.SOCK_SEQPACKET) as client:
                conn, _ = await aio.accept(srv)  # the connection was left for this call
                with conn:
                    assert conn.gettimeout() == 0.0
                    await aio.send_many(client, [b"hi"])
                    assert [m.data for m in await aio.recv_many(conn, 4, 64)] == [b"hi"]

    run(main())


def test_connect_to_a_full_backlog_times_out_without_leaks(run: Runner[Any], short_dir: str,
                                                           fd_baseline: set[int]) -> None:
    path = os.path.join(short_dir, "f")

    async def main() -> None:
        with afunix.listen(path, backlog=0) as srv:
            clients = []
            try:
                while True:  # fill the backlog
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.setblocking(False)
                    try:
                        c.connect(path)
                    except BlockingIOError:
                        c.close()
                        break
                    clients.append(c)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(aio.connect(path), 0.1)
                # a slot frees up: a connect that is retrying gets in
                task = asyncio.ensure_future(aio.connect(path))
                await asyncio.sleep(0.01)
                conn, _ = srv.accept()
                conn.close()
                (await task).close()
            finally:
                for c in clients:
                    c.close()

    run(main())


# ---- timeouts -------------------------------------------------------------------


def test_wait_for_timeout_then_the_message_arrives(run: Runner[Any]) -> None:
    a, b = nb_pair()

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aio.recv_many(b, 4, 64), 0.02)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aio.recv_batch(b, RecvBatch(4, 64)), 0.02)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aio.recv_fds(b, 64, 1), 0.02)
        queued = fill(a)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aio.send_many_partial(a, [b"late"]), 0.02)
        assert len(drain(b)) == queued  # the timed-out send sent nothing
        await aio.send_many(a, [b"now"])
        assert [m.data for m in await asyncio.wait_for(aio.recv_many(b, 4, 64), BOUND)] == [b"now"]

    with a, b:
        run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
def test_asyncio_timeout(run: Runner[Any]) -> None:
    a, b = nb_pair()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):  # type: ignore[attr-defined]
                await aio.recv_many(b, 4, 64)
        fill(a)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):  # type: ignore[attr-defined]
                await aio.send_many(a, numbered(10))

    with a, b:
        run(main())


# ---- many tasks, many connections ------------------------------------------------


def test_several_waiters_on_one_socket(run: Runner[Any]) -> None:
    a, b = nb_pair()

    async def main() -> None:
        tasks = [asyncio.ensure_future(aio.recv_many(b, 1, 64)) for _ in range(3)]
        await until_waiting(b)
        for i in range(3):
            await aio.send_many(a, [b"%d" % i])
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
        got = sorted(m.data for result in results for m in result)
        assert got == [b"0", b"1", b"2"]

    with a, b:
        run(main())


def test_fifty_clients_pass_descriptors_to_one_server(run: Runner[Any], short_dir: str,
                                                      fd_baseline: set[int]) -> None:
    path = os.path.join(short_dir, "srv")
    clients = 50

    async def serve_one(conn: socket.socket) -> int:
        with conn:
            total = 0
            while True:
                try:
                    data, fds, _, _ = await aio.recv_fds(conn, 64, 1)
                except TruncatedError:
                    raise
                if not data and not fds:
                    return total
                total += len(fds)
                os.write(fds[0], data)  # answer through the descriptor
                afunix.close_fds(fds)

    async def server(srv: socket.socket) -> int:
        tasks = []
        for _ in range(clients):
            conn, _ = await aio.accept(srv)
            tasks.append(asyncio.ensure_future(serve_one(conn)))
        return sum(await asyncio.gather(*tasks))

    async def client(i: int) -> bytes:
        sock = await aio.connect(path, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        try:
            with sock:
                await aio.send_fds(sock, [b"hello %d;" % i], [w])
                await aio.send_many(sock, [Message(b"again %d;" % i, fds=(w,))])
            os.close(w)
            w = -1
            answer = b""
            while True:  # the server closes its copies: end of the pipe
                chunk = await read_pipe(r)
                if not chunk:
                    return answer
                answer += chunk
        finally:
            afunix.close_fds([r] + ([w] if w >= 0 else []))

    async def main() -> None:
        with afunix.listen(path, socket.SOCK_SEQPACKET) as srv:
            srv.setblocking(False)
            serving = asyncio.ensure_future(server(srv))
            answers = await asyncio.gather(*(client(i) for i in range(clients)))
            assert await serving == 2 * clients
        assert answers == [b"hello %d;again %d;" % (i, i) for i in range(clients)]

    run(main())


async def read_pipe(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)
    return os.read(fd, 4096)


# ---- a stdlib peer in another process --------------------------------------------

CHILD = textwrap.dedent("""
    import os, socket, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)
    r, w = os.pipe()
    # batches the other way: 2000 numbered messages, then one with descriptors
    for i in range(2000):
        sock.send(b"%08d" % i)
    socket.send_fds(sock, [b"fds"], [r, w])
    # and back: the parent sends 500 messages and a descriptor to write to
    got = [sock.recv(64) for _ in range(500)]
    assert got == [b"p%d" % i for i in range(500)], got[:3]
    data, fds, flags, _ = socket.recv_fds(sock, 64, 1)
    os.write(fds[0], b"child wrote " + data)
    print("ok")
""")


def test_stdlib_peer_in_a_child_process(run: Runner[Any], fd_baseline: set[int]) -> None:
    a, b = nb_pair()
    child_end = b.detach()
    os.set_inheritable(child_end, True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(child_end)],
                            pass_fds=(child_end,), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(child_end)
    r, w = os.pipe()

    async def main() -> None:
        got: List[Message] = []
        batch = RecvBatch(128, 64, maxfds=2)
        while len(got) < 2001:
            n = await aio.recv_batch(a, batch)
            assert n, "the child hung up early"
            got.extend(batch.messages())
        assert [m.data for m in got[:2000]] == [b"%08d" % i for i in range(2000)]
        assert got[2000].data == b"fds" and len(got[2000].fds) == 2
        assert all(cloexec(fd) for fd in got[2000].fds)
        afunix.close_fds(got[2000].fds)
        assert await aio.send_many(a, [b"p%d" % i for i in range(500)]) == 500
        await aio.send_fds(a, [b"hi"], [w])

    try:
        with a:
            run(main())
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert out == b"ok\n"
        assert os.read(r, 100) == b"child wrote hi"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        afunix.close_fds([r, w])


# ---- import ---------------------------------------------------------------------


def test_import_afunix_does_not_import_asyncio(backend: str) -> None:
    code = ("import sys, afunix; assert 'asyncio' not in sys.modules; "
            "assert afunix.aio.send_many; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, AFUNIX_BACKEND=backend))
    assert out.stdout == "ok\n", out.stderr


def test_no_descriptor_leak_over_many_calls(run: Runner[Any], fd_baseline: set[int]) -> None:
    a, b = nb_pair()
    r, w = os.pipe()

    async def main() -> None:
        batch = RecvBatch(8, 64, maxfds=1)
        for i in range(300):
            receiving = asyncio.ensure_future(aio.recv_batch(b, batch))
            if i % 3 == 0:
                await until_waiting(b)
            await aio.send_many(a, [Message(b"x", fds=(r,)), b"y"])
            n = await receiving
            if n == 1:  # the second message was not queued yet
                assert await aio.recv_batch(b, batch) == 1
        batch.close()
        before = open_fds()
        for _ in range(300):
            waiting = asyncio.ensure_future(aio.recv_fds(b, 64, 1))
            await until_waiting(b)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert open_fds() == before

    with a, b:
        try:
            run(main())
        finally:
            afunix.close_fds([r, w])


def test_send_many_reads_the_callers_list_once(backend: str) -> None:
    # The caller's list, cleared while send_many waits for the socket to
    # drain, must not leave the loop spinning (nor change what is sent).
    async def main() -> tuple[int, int]:
        a, b = afunix.socketpair(socket.SOCK_DGRAM, blocking=False)
        with a, b:
            msgs = [b"x" * 100] * 3000
            task = asyncio.ensure_future(afunix.aio.send_many(a, msgs))
            await asyncio.sleep(0.05)  # the socket is full: send_many waits
            msgs.clear()
            received = 0
            while not task.done() or received < 3000:
                try:
                    received += len(afunix.recv_many(b, 256, 128, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                if received >= 3000 and task.done():
                    break
            return await asyncio.wait_for(task, 5), received
    sent, received = asyncio.run(asyncio.wait_for(main(), 20))
    assert sent == 3000 and received == 3000
