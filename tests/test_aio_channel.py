"""afunix.aio.Channel: the message channel on the event loop (both backends, both loops)."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any, List

import pytest

import afunix
import afunix.aio as aio
from afunix import _aiowait
from test_aio import Runner, run  # noqa: F401  (the loop fixture)


def test_round_trip_and_iteration(run: Runner[Any], fd_baseline: set[int]) -> None:
    async def main() -> List[bytes]:
        a, b = aio.channel_pair()
        async with a, b:
            messages = [b"m%d" % i * (i % 50) for i in range(3000)]  # more than a buffer

            async def sender() -> None:
                assert await a.send_many(messages) == len(messages)
                await a.send(b"last")
                a.socket.shutdown(socket.SHUT_WR)

            task = asyncio.ensure_future(sender())
            got = [m async for m in b]
            await task
            assert got == messages + [b"last"]
            return got

    run(main())


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_descriptors_ride_along(run: Runner[Any], kind: int, fd_baseline: set[int]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair(kind)
        r, w = os.pipe()
        try:
            async with a, b:
                await a.send(b"with fds", fds=[r, w])
                await a.send(b"plain")
                msg = await b.recv_message()
                assert msg.data == b"with fds" and len(msg.fds) == 2
                os.write(msg.fds[1], b"x")
                assert os.read(r, 1) == b"x"
                afunix.close_fds(msg.fds)
                assert await b.recv() == b"plain"
        finally:
            os.close(r)
            os.close(w)

    run(main())


def test_blocking_socket_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="non-blocking"):
            aio.Channel(a)


def test_cancelled_receive_loses_nothing(run: Runner[Any], fd_baseline: set[int]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair()
        async with a, b:
            waiter = asyncio.ensure_future(b.recv())
            await asyncio.sleep(0.01)
            # half a frame arrives, then the receiver is cancelled
            frame = afunix.frames.frame_header(5) + b"hello"
            a.socket.send(frame[:6])
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            a.socket.send(frame[6:])
            assert await b.recv() == b"hello"  # the half frame was kept

    run(main())


def test_cancelled_send_keeps_frames_whole(run: Runner[Any], fd_baseline: set[int]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair()
        async with a, b:
            big = [bytes([i]) * 10000 for i in range(200)]  # far more than the socket holds
            sending = asyncio.ensure_future(a.send_many(big))
            await asyncio.sleep(0.05)  # the socket is full: the send is waiting
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            got: List[bytes] = []

            async def reader() -> None:
                while not got or got[-1] != b"after":
                    got.extend(await b.recv_many())

            reading = asyncio.ensure_future(reader())
            await a.flush()  # completes the message that was in progress, if any
            await a.send(b"after")
            await reading
            # a prefix of the batch, every message whole, then the next send
            assert got[-1] == b"after"
            assert 0 < len(got) - 1 < len(big)
            assert got[:-1] == big[:len(got) - 1]

    run(main())


def test_timeout_with_wait_for(run: Runner[Any]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair()
        async with a, b:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(b.recv(), 0.05)
            await a.send(b"still works")
            assert await b.recv() == b"still works"

    run(main())


def test_end_of_stream_and_zero_copy_batch(run: Runner[Any]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair()
        async with b:
            await a.send_many([b"x" * 64] * 100)
            a.close()
            seen = 0
            while True:
                batch = await b.recv_batch()
                if not len(batch):
                    break
                seen += sum(len(v) for v in batch)
            assert seen == 6400
            with pytest.raises(EOFError):
                await b.recv()

    run(main())


SERVER_PEER = textwrap.dedent(
    """
    import socket, sys, afunix
    ch = afunix.Channel.connect(sys.argv[1])
    for m in ch.recv_many(10):
        pass
    ch.send_many([b"reply-%d" % i for i in range(100)])
    ch.close()
    """
)


def test_server_with_processes(run: Runner[Any], backend: str, short_dir: str) -> None:
    path = os.path.join(short_dir, "chan.sock")

    async def main() -> None:
        listener = afunix.listen(path)
        listener.setblocking(False)
        with listener:
            children = [subprocess.Popen([sys.executable, "-c", SERVER_PEER, path],
                                         env=dict(os.environ, AFUNIX_BACKEND=backend))
                        for _ in range(3)]
            try:
                for _ in children:
                    ch = await aio.Channel.accept(listener)
                    async with ch:
                        await ch.send(b"hi")
                        got = [m async for m in ch]
                        assert got == [b"reply-%d" % i for i in range(100)]
            finally:
                for child in children:
                    assert child.wait(30) == 0

    run(main())


def test_iteration_and_the_other_receives_take_from_one_place(
        run: Runner[Any], fd_baseline: set[int]) -> None:
    # The async channel keeps no messages of its own: after an `async for`
    # left off, every receive continues from the next message, and that
    # message's descriptors are still there to be handed over.
    async def main() -> None:
        a, b = aio.channel_pair()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            async with a, b:
                await a.send_many([b"one", b"two", afunix.Message(b"three", (null,)), b"four",
                                   b"five"])
                async for data in b:
                    assert data == b"one"
                    break
                assert await b.recv() == b"two"
                message = await b.recv_message()
                assert message.data == b"three" and len(message.fds) == 1
                afunix.close_fds(message.fds)
                batch = await b.recv_batch()
                assert [bytes(m) for m in batch] == [b"four", b"five"]
        finally:
            os.close(null)

    run(main())


def test_leaving_async_with_writes_what_is_buffered(run: Runner[Any], fd_baseline: set[int]) -> None:
    # More than the socket takes at once waits in the write buffer; leaving
    # the block must write it all (waiting on the loop), not drop what a
    # single non-blocking try could not write.
    async def main() -> None:
        a, b = aio.channel_pair(write_buffer=16 << 20)
        messages = [bytes([i % 256]) * 4096 for i in range(1024)]  # 4 MiB

        async def sender() -> None:
            async with a:
                assert await a.send_many(messages) == len(messages)
                assert a.pending > 0  # still buffered when the block ends

        async with b:
            task = asyncio.ensure_future(sender())
            got = [m async for m in b]
            await task
        assert got == messages

    run(main())


def test_leaving_async_with_by_an_exception_closes_without_waiting(run: Runner[Any]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair(write_buffer=16 << 20)
        with pytest.raises(KeyError):
            async with a:
                await a.send_many([b"x" * 4096] * 1024)
                raise KeyError("the block failed")
        assert a.closed
        b.close()

    run(main())


def test_a_close_by_another_task_ends_the_wait_of_leaving_async_with(
        run: Runner[Any], fd_baseline: set[int]) -> None:
    # Leaving the block waits for the peer to take what is buffered; a
    # close() from another task meanwhile ends that wait.  Before, the
    # descriptor was closed under the loop's writer callback, which then
    # never fired (epoll forgets a closed descriptor): the block never ended.
    async def main() -> None:
        a, b = aio.channel_pair(write_buffer=16 << 20)

        async def leave() -> None:
            async with a:
                await a.send_many([b"x" * 4096] * 1024)  # the peer reads none

        task = asyncio.ensure_future(leave())
        for _ in range(1000):
            if _aiowait.is_waiting(a.fileno(), True):
                break
            await asyncio.sleep(0.005)
        assert _aiowait.is_waiting(a.fileno(), True)
        a.close()
        await asyncio.wait_for(task, 10)  # ends, without an error: the channel is closed
        assert a.closed
        b.close()

    run(main())


def test_a_receive_waiting_when_another_task_closes_the_channel_raises(
        run: Runner[Any], fd_baseline: set[int]) -> None:
    async def main() -> None:
        a, b = aio.channel_pair()
        task = asyncio.ensure_future(b.recv())
        for _ in range(1000):
            if _aiowait.is_waiting(b.fileno(), False):
                break
            await asyncio.sleep(0.005)
        assert _aiowait.is_waiting(b.fileno(), False)
        b.close()
        with pytest.raises(OSError) as caught:
            await asyncio.wait_for(task, 10)
        assert caught.value.errno == errno.EBADF
        a.close()

    run(main())
