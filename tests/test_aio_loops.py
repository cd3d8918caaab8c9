"""afunix.aio under every event-loop library: asyncio's own loop, uvloop and trio.

Written against anyio and run by its pytest plugin (the `anyio_backend`
fixture in conftest: asyncio, uvloop, trio), on both afunix backends, so
the same test checks the same promise on each: the coroutines and the
Channel move everything, several tasks may wait on one socket, and a
cancelled call loses nothing.  Every test is bounded by anyio.fail_after;
no test asserts on timings.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Any, Awaitable, Callable, List, Optional

import anyio
import pytest

import afunix
import afunix.aio as aio
from afunix import _aiowait
from afunix import Message, RecvBatch
from test_aio import drain

pytestmark = pytest.mark.anyio

BOUND = 30.0  # seconds any one test may take


class Task:
    """A coroutine started in a task group with a cancel scope of its own."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = False

    async def _run(self, call: Callable[..., Awaitable[Any]], *args: Any) -> None:
        with self.scope:
            try:
                self.value = await call(*args)
            except Exception as exc:  # handed to result(), not to the task group
                self.error = exc
        self.cancelled = self.scope.cancelled_caught
        self.finished.set()

    def cancel(self) -> None:
        self.scope.cancel()

    async def result(self) -> Any:
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.value


def start(group: anyio.abc.TaskGroup, call: Callable[..., Awaitable[Any]], *args: Any) -> Task:
    task = Task()
    group.start_soon(task._run, call, *args)
    return task


def nb_pair(type: int = socket.SOCK_SEQPACKET) -> "tuple[socket.socket, socket.socket]":
    return afunix.socketpair(type, blocking=False)


def numbered(n: int, size: int = 64) -> List[bytes]:
    return [b"%08d" % i + b"." * (size - 8) for i in range(n)]


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)




def fill(sock: socket.socket) -> int:
    """Send 64-byte messages until the socket is full; returns how many went."""
    n = 0
    while True:
        try:
            n += afunix.send_many(sock, [b"f" * 64] * 64)
        except BlockingIOError:
            return n


async def until_waiting(sock: socket.socket, writable: bool = False) -> None:
    """Yield until a task waits on `sock` in that direction."""
    for _ in range(10000):
        if _aiowait.is_waiting(sock.fileno(), writable):
            return
        await anyio.sleep(0)
    raise AssertionError("nothing started waiting on the socket")


async def collect(sock: socket.socket, n: int) -> List[bytes]:
    got: List[bytes] = []
    while len(got) < n:
        msgs = await aio.recv_many(sock, 256, 65536)
        assert msgs, "end of stream before all messages arrived"
        got.extend(m.data for m in msgs)
    return got


# ---- which library runs ------------------------------------------------------


async def test_the_running_library_is_detected(anyio_backend: Any) -> None:
    name = anyio_backend[0]
    assert (_aiowait.trio_running() is not None) == (name == "trio")


def test_asyncio_alone_does_not_import_trio(backend: str) -> None:
    from conftest import run_python

    proc = run_python(
        "import asyncio, sys, socket, afunix, afunix.aio as aio\n"
        "async def main():\n"
        "    a, b = afunix.socketpair(socket.SOCK_SEQPACKET, blocking=False)\n"
        "    async def later():\n"
        "        await asyncio.sleep(0.01)\n"
        "        await aio.send_many(a, [b'x'])\n"
        "    t = asyncio.ensure_future(later())\n"
        "    assert [m.data for m in await aio.recv_many(b, 4, 64)] == [b'x']\n"
        "    await t\n"
        "    a.close(); b.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in ('trio', 'sniffio', 'anyio') if m in sys.modules))\n",
        backend,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- round trips -------------------------------------------------------------


@pytest.mark.parametrize("type", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"])
async def test_batches_between_tasks(type: int) -> None:
    a, b = nb_pair(type)
    messages = numbered(5000)  # many times what the socket holds: the sender waits

    async def receive() -> List[bytes]:
        got: List[bytes] = []
        with RecvBatch(64, 128) as batch:
            while len(got) < len(messages):
                if len(got) % 2:
                    got.extend(m.data for m in await aio.recv_many(b, 64, 128))
                else:
                    n = await aio.recv_batch(b, batch)
                    got.extend(bytes(v) for v in batch)
                    assert n == len(batch)
        return got

    with a, b, anyio.fail_after(BOUND):
        async with anyio.create_task_group() as group:
            receiver = start(group, receive)
            assert await aio.send_many(a, messages) == len(messages)
            assert await receiver.result() == messages


async def test_send_many_partial_counts() -> None:
    a, b = nb_pair()
    messages = numbered(3000)
    counts: List[int] = []
    with a, b, anyio.fail_after(BOUND):
        async with anyio.create_task_group() as group:
            receiver = start(group, collect, b, len(messages))
            sent = 0
            while sent < len(messages):
                k = await aio.send_many_partial(a, messages[sent:])
                assert k >= 1
                counts.append(k)
                sent += k
            assert await receiver.result() == messages
        assert await aio.send_many_partial(a, []) == 0
    assert sum(counts) == len(messages) and len(counts) > 1


async def test_descriptors_between_tasks(fd_baseline: "set[int]") -> None:
    a, b = nb_pair()
    r, w = os.pipe()
    try:
        with a, b, anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                receiver = start(group, aio.recv_fds, b, 100, 2)
                await until_waiting(b)
                assert await aio.send_fds(a, [b"one ", b"two"], [r, w]) == 7
                data, fds, flags, address = await receiver.result()
            assert data == b"one two" and address is None and not flags & socket.MSG_CTRUNC
            assert [same_file(x, y) for x, y in zip(fds, [r, w])] == [True, True]
            assert all(cloexec(fd) for fd in fds)
            afunix.close_fds(fds)
            msgs = [Message(b"m%d" % i, fds=(r,) * (i % 4)) for i in range(300)]
            got: List[Message] = []

            async def receive_all() -> None:
                while len(got) < len(msgs):
                    got.extend(await aio.recv_many(b, 64, 1024, maxfds=3))

            async with anyio.create_task_group() as group:
                group.start_soon(receive_all)
                assert await aio.send_many(a, msgs) == len(msgs)
            assert [m.data for m in got] == [m.data for m in msgs]
            assert [len(m.fds) for m in got] == [len(m.fds) for m in msgs]
            for m in got:
                assert all(same_file(fd, r) and cloexec(fd) for fd in m.fds)
                afunix.close_fds(m.fds)
    finally:
        afunix.close_fds([r, w])


async def test_stream_keeps_bytes_and_descriptors(fd_baseline: "set[int]") -> None:
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

    try:
        with a, b, anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                receiver = start(group, receive)
                assert await aio.send_many(a, messages) == len(messages)
                data, fds = await receiver.result()
            assert data == b"".join(chunks)
            assert len(fds) == 2 and same_file(fds[0], r) and same_file(fds[1], w)
            afunix.close_fds(fds)
    finally:
        afunix.close_fds([r, w])


async def test_accept_connect_and_the_channel(short_dir: str, fd_baseline: "set[int]") -> None:
    path = os.path.join(short_dir, "srv")
    r, w = os.pipe()
    messages = [b"m%d" % i * (i % 50) for i in range(3000)]  # more than a socket buffer
    try:
        with afunix.listen(path) as listener, anyio.fail_after(BOUND):
            listener.setblocking(False)

            async def serve() -> List[bytes]:
                async with await aio.Channel.accept(listener) as ch:
                    msg = await ch.recv_message()
                    assert msg.data == b"hello" and len(msg.fds) == 1
                    os.write(msg.fds[0], b"!")
                    afunix.close_fds(msg.fds)
                    await ch.send(b"welcome")
                    return [m async for m in ch]

            async with anyio.create_task_group() as group:
                server = start(group, serve)
                async with await aio.Channel.connect(path, write_buffer=4096) as client:
                    await client.send(b"hello", fds=[w])
                    await client.flush()
                    assert await client.recv() == b"welcome"
                    for m in messages:
                        await client.send(m)  # buffered: written 4 KiB at a time
                    await client.flush()
                    assert client.pending == 0
                    client.socket.shutdown(socket.SHUT_WR)
                    assert await server.result() == messages
            assert os.read(r, 1) == b"!"
    finally:
        afunix.close_fds([r, w])


async def test_channel_pair_batches(fd_baseline: "set[int]") -> None:
    a, b = aio.channel_pair(socket.SOCK_SEQPACKET)
    messages = numbered(4000, 32)
    async with a, b:
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                group.start_soon(a.send_many, messages)
                got: List[bytes] = []
                while len(got) < len(messages):
                    if len(got) % 3 == 0:
                        batch = await b.recv_batch()
                        got.extend(bytes(batch[i]) for i in range(len(batch)))
                    else:
                        got.extend(await b.recv_many())
            assert got == messages


# ---- several waiters ----------------------------------------------------------


async def test_several_receivers_on_one_socket() -> None:
    a, b = nb_pair()
    with a, b, anyio.fail_after(BOUND):
        async with anyio.create_task_group() as group:
            tasks = [start(group, aio.recv_many, b, 1, 64) for _ in range(3)]
            await until_waiting(b)
            for _ in range(5):
                await anyio.sleep(0)  # every receiver reaches its wait
            for i in range(3):
                await aio.send_many(a, [b"%d" % i])
            results = [await t.result() for t in tasks]
    assert sorted(m.data for result in results for m in result) == [b"0", b"1", b"2"]


async def test_several_senders_on_one_full_socket() -> None:
    a, b = nb_pair()
    with a, b, anyio.fail_after(BOUND):
        queued = fill(a)
        async with anyio.create_task_group() as group:
            tasks = [start(group, aio.send_many, a, [b"s%d" % i] * 10) for i in range(3)]
            await until_waiting(a, writable=True)
            got = await collect(b, queued + 30)
            assert [await t.result() for t in tasks] == [10, 10, 10]
    assert sorted(got[queued:]) == sorted([b"s0"] * 10 + [b"s1"] * 10 + [b"s2"] * 10)


# ---- cancellation ----------------------------------------------------------------


@pytest.mark.parametrize("call", ["recv_many", "recv_batch", "recv_fds", "channel"])
async def test_cancelled_receive_consumes_nothing(call: str, fd_baseline: "set[int]") -> None:
    """Cancel at every point between the data's arrival and the task's return."""
    a, b = nb_pair()
    r, w = os.pipe()
    batch = RecvBatch(8, 64, maxfds=2)
    # The channel's peer sends synchronously, as send_many does above: no
    # yield between the message's arrival and the cancel.
    sa, sb = afunix.socketpair(socket.SOCK_SEQPACKET, blocking=False)
    channel_a, channel_b = afunix.Channel(sa), aio.Channel(sb)

    def receive() -> Callable[[], Awaitable[Any]]:
        if call == "recv_many":
            return lambda: aio.recv_many(b, 8, 64, maxfds=2)
        if call == "recv_batch":
            return lambda: aio.recv_batch(b, batch)
        if call == "recv_fds":
            return lambda: aio.recv_fds(b, 64, 2)
        return channel_b.recv_message

    received = cancelled = 0
    try:
        with a, b, batch, anyio.fail_after(BOUND):
            async with channel_b:
                watched = channel_b.socket if call == "channel" else b
                for yields in range(10):
                    async with anyio.create_task_group() as group:
                        task = start(group, receive())
                        await until_waiting(watched)
                        if call == "channel":
                            channel_a.send(b"m", fds=[r, w])
                        else:
                            afunix.send_many(a, [Message(b"m", fds=(r, w))])
                        for _ in range(yields):
                            await anyio.sleep(0)
                        task.cancel()
                    if task.cancelled:
                        # nothing consumed: the message and its descriptors wait
                        cancelled += 1
                        if call == "channel":
                            msg = await channel_b.recv_message()
                            assert msg.data == b"m" and len(msg.fds) == 2
                            afunix.close_fds(msg.fds)
                        else:
                            got = drain(b)
                            assert [m.data for m in got] == [b"m"] and len(got[0].fds) == 2
                            afunix.close_fds(got[0].fds)
                        continue
                    received += 1
                    result = await task.result()
                    if call == "recv_many":
                        assert [m.data for m in result] == [b"m"]
                        afunix.close_fds(result[0].fds)
                    elif call == "recv_fds":
                        assert result[0] == b"m" and len(result[1]) == 2
                        afunix.close_fds(result[1])
                    elif call == "recv_batch":
                        assert result == 1 and batch.fd_counts() == [2]
                        batch.close()
                    else:
                        assert result.data == b"m" and len(result.fds) == 2
                        afunix.close_fds(result.fds)
                    assert drain(b) == []
        assert cancelled >= 1 and received >= 1
    finally:
        channel_a.close()
        afunix.close_fds([r, w])


async def test_a_timeout_then_the_message_arrives() -> None:
    a, b = nb_pair()
    with a, b, anyio.fail_after(BOUND):
        for receive in (lambda: aio.recv_many(b, 4, 64), lambda: aio.recv_fds(b, 64, 1)):
            with anyio.move_on_after(0.02) as scope:
                await receive()
            assert scope.cancelled_caught
        fill(a)
        with anyio.move_on_after(0.02) as scope:
            await aio.send_many_partial(a, [b"late"])
        assert scope.cancelled_caught
        drain(b)
        await aio.send_many(a, [b"now"])
        assert [m.data for m in await aio.recv_many(b, 4, 64)] == [b"now"]


async def test_cancelled_with_data_queued_loses_nothing(anyio_backend: Any) -> None:
    """A call made in an already cancelled scope either raises before taking
    anything (trio: every call is a checkpoint) or returns what it took."""
    a, b = nb_pair()
    with a, b, anyio.fail_after(BOUND):
        afunix.send_many(a, [b"queued"])
        got: List[Message] = []
        with anyio.CancelScope() as scope:
            scope.cancel()
            got = await aio.recv_many(b, 4, 64)
        if anyio_backend[0] == "trio":
            assert scope.cancelled_caught and got == []
            assert [m.data for m in drain(b)] == [b"queued"]
        else:
            assert [m.data for m in got] == [b"queued"] and drain(b) == []


async def test_cancelled_send_many_partial_sent_nothing() -> None:
    a, b = nb_pair()
    with a, b, anyio.fail_after(BOUND):
        queued = fill(a)
        async with anyio.create_task_group() as group:
            task = start(group, aio.send_many_partial, a, [b"late"])
            await until_waiting(a, writable=True)
            task.cancel()
        assert task.cancelled
        got = drain(b)
        assert len(got) == queued and all(m.data == b"f" * 64 for m in got)


async def test_cancelled_send_many_leaves_a_prefix() -> None:
    a, b = nb_pair()
    messages = numbered(2000)
    with a, b, anyio.fail_after(BOUND):
        async with anyio.create_task_group() as group:
            task = start(group, aio.send_many, a, messages)
            await until_waiting(a, writable=True)  # k messages went, the rest wait
            task.cancel()
        assert task.cancelled
        got = [m.data for m in drain(b)]
        assert 0 < len(got) < len(messages) and got == messages[:len(got)]


async def test_cancelled_channel_send_keeps_every_frame_whole() -> None:
    a, b = aio.channel_pair()
    messages = [bytes([i]) * 100000 for i in range(40)]  # 4 MB: the send waits
    async with a, b:
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as group:
                task = start(group, a.send_many, messages)
                await until_waiting(a.socket, writable=True)
                task.cancel()
            assert task.cancelled
            got: List[bytes] = []

            async def finish() -> None:
                await a.flush()  # the message in progress goes whole
                a.socket.shutdown(socket.SHUT_WR)

            async with anyio.create_task_group() as group:
                group.start_soon(finish)
                got = [m async for m in b]
            assert 0 < len(got) < len(messages) and got == messages[:len(got)]


async def test_cancelled_accept_takes_no_connection(short_dir: str, fd_baseline: "set[int]") -> None:
    path = os.path.join(short_dir, "srv")
    with afunix.listen(path) as srv, anyio.fail_after(BOUND):
        srv.setblocking(False)
        async with anyio.create_task_group() as group:
            task = start(group, aio.accept, srv)
            await until_waiting(srv)
            task.cancel()
        assert task.cancelled
        client = await aio.connect(path)
        conn, _ = await aio.accept(srv)
        with client, conn:
            assert conn.gettimeout() == 0.0
            await aio.send_many(client, [b"hi"])
            assert [m.data for m in await aio.recv_many(conn, 1, 64)] == [b"hi"]


# ---- refused up front ------------------------------------------------------------


async def test_blocking_socket_is_a_value_error() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        for call in (lambda: aio.recv_many(b, 1, 64), lambda: aio.send_many(a, [b"x"]),
                     lambda: aio.recv_fds(b, 64, 1)):
            with pytest.raises(ValueError, match="non-blocking"):
                await call()
        with pytest.raises(ValueError, match="non-blocking"):
            aio.Channel(a)
        assert a.gettimeout() is None  # left as it was


@pytest.mark.skipif(sys.platform != "linux", reason="abstract names are Linux only")
async def test_abstract_address_round_trip() -> None:
    name = afunix.abstract("afx-loops-%d" % os.getpid())
    with afunix.listen(name, socket.SOCK_SEQPACKET) as srv, anyio.fail_after(BOUND):
        srv.setblocking(False)
        client = await aio.connect(name, socket.SOCK_SEQPACKET)
        conn, _ = await aio.accept(srv)
        with client, conn:
            await aio.send_many(client, [b"one", b"two"])
            assert await collect(conn, 2) == [b"one", b"two"]


# ---- the trio example of docs/async.md -------------------------------------------


def test_docs_trio_example(backend: str) -> None:
    from pathlib import Path

    from conftest import need_library, run_python

    need_library("trio")
    guide = (Path(__file__).resolve().parent.parent / "docs" / "async.md").read_text()
    # (tests/test_docs.py runs it too; this checks what it prints)
    code = guide.split("```python\nimport socket, trio,", 1)[1].split("```", 1)[0]
    code = "import socket, trio," + code
    proc = run_python(code, backend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[b'one', b'two']\n"
