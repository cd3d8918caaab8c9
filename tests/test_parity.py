"""Code written for the stdlib runs unchanged: afunix's twins against stdlib peers and expectations.

send_fds/recv_fds promise the signatures of socket.send_fds/recv_fds; these
tests hold them to what a stdlib peer, CPython's own test of those functions
and multiprocessing.reduction expect, on both backends.
"""
from __future__ import annotations

import asyncio
import os
import errno
import socket
import struct
import subprocess
import sys
import threading
import unittest
from typing import Any, Callable, Iterator, List

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


# ---- flags as the stdlib reports them ------------------------------------------

CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
needs_cloexec = pytest.mark.skipif(not CLOEXEC, reason="no MSG_CMSG_CLOEXEC on this platform")


def _stdlib_flags(sock: socket.socket, bufsize: int, flags: int) -> int:
    """msg_flags of a plain stdlib recvmsg (closing what it brought)."""
    _, ancdata, msg_flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(4 * 4), flags)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            afunix.close_fds(list(memoryview(payload).cast("i")))
    return int(msg_flags)


def _receivers() -> "dict[str, Callable[[socket.socket, int, int], int]]":
    """Every receive path, as: receive one message, return the flags it reports."""

    def recv_fds(sock: socket.socket, bufsize: int, flags: int) -> int:
        _, fds, msg_flags, _ = afunix.recv_fds(sock, bufsize, 4, flags)
        afunix.close_fds(fds)
        return msg_flags

    def recv_many(sock: socket.socket, bufsize: int, flags: int) -> int:
        [msg] = afunix.recv_many(sock, 1, bufsize, flags, maxfds=4)
        afunix.close_fds(msg.fds)
        return msg.flags

    def recv_batch(sock: socket.socket, bufsize: int, flags: int) -> int:
        with afunix.RecvBatch(1, bufsize, maxfds=4) as batch:
            assert batch.recv(sock, flags) == 1
            [msg] = batch.messages()
            assert batch.flags(0) == msg.flags
            afunix.close_fds(msg.fds)
            return batch.flags(0)

    def aio_recv_fds(sock: socket.socket, bufsize: int, flags: int) -> int:
        async def main() -> int:
            sock.setblocking(False)
            _, fds, msg_flags, _ = await aio.recv_fds(sock, bufsize, 4, flags)
            afunix.close_fds(fds)
            return msg_flags
        return asyncio.run(main())

    def aio_recv_many(sock: socket.socket, bufsize: int, flags: int) -> int:
        async def main() -> int:
            sock.setblocking(False)
            [msg] = await aio.recv_many(sock, 1, bufsize, flags, maxfds=4)
            afunix.close_fds(msg.fds)
            return msg.flags
        return asyncio.run(main())

    def aio_recv_batch(sock: socket.socket, bufsize: int, flags: int) -> int:
        async def main() -> int:
            sock.setblocking(False)
            with afunix.RecvBatch(1, bufsize, maxfds=4) as batch:
                assert await aio.recv_batch(sock, batch, flags) == 1
                afunix.close_fds(batch.all_fds())
                return batch.flags(0)
        return asyncio.run(main())

    return {f.__name__: f for f in (recv_fds, recv_many, recv_batch,
                                     aio_recv_fds, aio_recv_many, aio_recv_batch)}


@needs_cloexec
@pytest.mark.parametrize("caller_flags", [0, CLOEXEC], ids=["no-flags", "MSG_CMSG_CLOEXEC"])
@pytest.mark.parametrize("bufsize", [64, 2], ids=["whole", "truncated"])
@pytest.mark.parametrize("path", sorted(_receivers()))
def test_flags_are_what_a_plain_recvmsg_reports(path: str, bufsize: int, caller_flags: int,
                                                fd_baseline: set[int]) -> None:
    receive = _receivers()[path]
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with a, b:
            for fds in ([], [r, w]):
                # the same message twice: a plain stdlib recvmsg reads one, afunix the other
                socket.send_fds(a, [b"message"], fds)
                socket.send_fds(a, [b"message"], fds)
                expected = _stdlib_flags(b, bufsize, caller_flags)
                got = receive(b, bufsize, caller_flags)
                assert got == expected, (hex(got), hex(expected))
                assert bool(got & CLOEXEC) == bool(caller_flags)
                assert bool(got & socket.MSG_TRUNC) == (bufsize < 7)
                b.setblocking(True)
    finally:
        afunix.close_fds([r, w])


@needs_cloexec
def test_clean_messages_report_flags_0_everywhere(fd_baseline: set[int]) -> None:
    # what `if flags:` code and CPython's own test expect of a clean message
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
        for path, receive in _receivers().items():
            a, b = afunix.socketpair(kind)
            with a, b:
                afunix.send_fds(a, [b"clean"], [a])
                assert receive(b, 64, 0) == 0, path
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        afunix.send_many(a, [Message(b"x", fds=(a,)), b"y"])
        with pytest.raises(afunix.TruncatedError) as cut:
            afunix.recv_fds(b, 64, 0)
        assert cut.value.flags == socket.MSG_CTRUNC  # the cut, and nothing afunix added


@needs_cloexec
def test_channel_messages_carry_no_flags(fd_baseline: set[int]) -> None:
    r, w = os.pipe()
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
            x, y = afunix.channel_pair(kind)
            with x, y:
                x.send(b"with", fds=[r])
                x.send(b"without")
                with_fds = y.recv_message()
                afunix.close_fds(with_fds.fds)
                assert with_fds.flags == 0 and y.recv_message().flags == 0

            async def main() -> None:
                p, q = aio.channel_pair(kind)
                async with p, q:
                    await p.send(b"with", fds=[r])
                    got = await q.recv_message()
                    afunix.close_fds(got.fds)
                    assert got.flags == 0 and len(got.fds) == 1

            asyncio.run(main())
    finally:
        afunix.close_fds([r, w])


# ---- stream messages with descriptors, as socket.send_fds sends them ----------

# A plain stdlib reader: one socket.recv_fds per message, as a server reading
# "a small request plus its descriptor" does.  Prints, per read: the byte
# count, whether the bytes are the expected ones, and the identity of each
# descriptor that came with them.
STDLIB_READER = r"""
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.settimeout(30)
for size in map(int, sys.argv[2:]):
    data, fds, flags, _ = socket.recv_fds(s, 8192, 10)
    ids = ["%d:%d" % (os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds]
    print(len(data), data == bytes(i % 251 for i in range(size)), flags, *ids)
    for fd in fds:
        os.close(fd)
"""

SIZES = [1, 64, 4000]


def _payload(size: int) -> bytes:
    """0, 1, ..., 250, 0, 1, ... (what STDLIB_READER expects)."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _identity(fd: int) -> str:
    st = os.fstat(fd)
    return "%d:%d" % (st.st_dev, st.st_ino)


@pytest.fixture
def stdlib_reader() -> Iterator[Callable[..., "tuple[socket.socket, Callable[[], List[str]]]"]]:
    """A stream pair whose far end is read by STDLIB_READER in a child process.

    Closed here: list fd_baseline ahead of it, so the leak check comes after.
    """
    children: "list[subprocess.Popen[str]]" = []
    ours: "list[socket.socket]" = []

    def start(*sizes: int, blocking: bool = True) -> "tuple[socket.socket, Callable[[], List[str]]]":
        a, b = afunix.socketpair(socket.SOCK_STREAM, blocking=blocking)
        ours.append(a)
        with b:
            child = subprocess.Popen(
                [sys.executable, "-c", STDLIB_READER, str(b.fileno()), *map(str, sizes)],
                pass_fds=[b.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append(child)

        def lines() -> List[str]:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            return out.splitlines()

        return a, lines

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.communicate()
    for a in ours:
        a.close()


def _expected(size: int, fds: "list[int]") -> str:
    return " ".join(["%d True 0" % size] + [_identity(fd) for fd in fds])


@pytest.mark.parametrize("how", ["send_fds", "send_many", "aio.send_fds", "aio.send_many"])
@pytest.mark.parametrize("size", SIZES)
def test_stdlib_peer_reads_a_stream_message_whole_with_its_descriptors(
        fd_baseline: set[int], stdlib_reader: Any, how: str, size: int) -> None:
    r, w = os.pipe()
    try:
        a, lines = stdlib_reader(size, blocking=not how.startswith("aio."))
        data = _payload(size)
        if how == "send_fds":
            assert afunix.send_fds(a, [data], [r, w]) == size
        elif how == "send_many":
            assert afunix.send_many(a, [Message(data, fds=(r, w))]) == 1
        elif how == "aio.send_fds":
            assert asyncio.run(aio.send_fds(a, [data], [r, w])) == size
        else:
            assert asyncio.run(aio.send_many(a, [Message(data, fds=(r, w))])) == 1
        assert lines() == [_expected(size, [r, w])]
    finally:
        afunix.close_fds([r, w])


@pytest.mark.parametrize("how", ["send_many", "aio.send_many"])
def test_stdlib_peer_reads_each_message_of_a_batch_whole(fd_baseline: set[int],
                                                         stdlib_reader: Any, how: str) -> None:
    # Back to back in one call: each recv_fds still gets exactly one message,
    # since the kernel ends a read after the write that carried descriptors.
    pipes = [os.pipe() for _ in SIZES]
    try:
        a, lines = stdlib_reader(*SIZES, blocking=how == "send_many")
        batch = [Message(_payload(n), fds=p) for n, p in zip(SIZES, pipes)]
        if how == "send_many":
            assert afunix.send_many(a, batch) == len(SIZES)
        else:
            assert asyncio.run(aio.send_many(a, batch)) == len(SIZES)
        assert lines() == [_expected(n, list(p)) for n, p in zip(SIZES, pipes)]
    finally:
        afunix.close_fds([fd for p in pipes for fd in p])


def _read_stream(sock: socket.socket, total: int) -> "list[tuple[int, int, List[int]]]":
    """(offset, bytes, descriptors) of every read until `total` bytes came; checks the bytes."""
    reads = []
    got = 0
    expected = _payload(total)
    sock.settimeout(30)
    while got < total:
        data, fds, flags, _ = socket.recv_fds(sock, 65536, 10)
        assert data, "end of stream after %d of %d bytes" % (got, total)
        assert flags == 0
        assert data == expected[got:got + len(data)]
        reads.append((got, len(data), fds))
        got += len(data)
    return reads


@pytest.mark.parametrize("how", ["send_fds-timeout", "send_many-timeout", "aio.send_many"])
def test_after_a_short_write_the_rest_follows_without_the_descriptors(
        how: str, fd_baseline: set[int]) -> None:
    # 4 MiB does not fit the socket buffer: the sendmsg carrying the
    # descriptors takes part of it, the rest follows without them.
    total = 4 << 20
    data = _payload(total)
    r, w = os.pipe()
    a, b = afunix.socketpair(socket.SOCK_STREAM, blocking=not how.startswith("aio."))
    try:
        with a, b:
            reads: "list[tuple[int, int, List[int]]]" = []
            reader = threading.Thread(target=lambda: reads.extend(_read_stream(b, total)))
            reader.start()
            try:
                if how == "send_fds-timeout":
                    a.settimeout(30)
                    assert afunix.send_fds(a, [data], [r, w]) == total
                elif how == "send_many-timeout":
                    a.settimeout(30)
                    assert afunix.send_many(a, [Message(data, fds=(r, w))]) == 1
                else:
                    assert asyncio.run(aio.send_many(a, [Message(data, fds=(r, w))])) == 1
            finally:
                reader.join(60)
            assert sum(n for _, n, _ in reads) == total
            with_fds = [(offset, fds) for offset, _, fds in reads if fds]
            # once, with the read that holds the first byte
            assert [offset for offset, _ in with_fds] == [0]
            assert [_identity(fd) for fd in with_fds[0][1]] == [_identity(r), _identity(w)]
            assert len(reads) > 1  # it really was cut
            afunix.close_fds(with_fds[0][1])
    finally:
        afunix.close_fds([r, w])


MULTIPROCESSING_PEER = r"""
import os, socket, sys
from multiprocessing import reduction
s = socket.socket(fileno=int(sys.argv[1]))
s.settimeout(30)
if sys.argv[2] == "recvfds":
    for n in (1, 3):
        fds = reduction.recvfds(s, n)
        print(*["%d:%d" % (os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds])
else:
    r, w = os.pipe()
    print("%d:%d" % (os.fstat(r).st_dev, os.fstat(r).st_ino), flush=True)
    reduction.sendfds(s, [r])
    reduction.sendfds(s, [r, w, r])
    s.recv(1)  # until the parent has read both
"""


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_multiprocessing_reduction_recvfds_is_the_peer(kind: int, fd_baseline: set[int]) -> None:
    r, w = os.pipe()
    a, b = afunix.socketpair(kind)
    try:
        with a:
            with b:
                child = subprocess.Popen(
                    [sys.executable, "-c", MULTIPROCESSING_PEER, str(b.fileno()), "recvfds"],
                    pass_fds=[b.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
            # reduction.sendfds's shape: one byte, the count, with the descriptors
            afunix.send_fds(a, [bytes([1])], [r])
            afunix.send_many(a, [Message(bytes([3]), fds=(r, w, r))])
            out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.splitlines() == [_identity(r), " ".join(map(_identity, [r, w, r]))]
    finally:
        afunix.close_fds([r, w])


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_multiprocessing_reduction_sendfds_is_the_peer(kind: int, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(kind)
    with a:
        with b:
            child = subprocess.Popen(
                [sys.executable, "-c", MULTIPROCESSING_PEER, str(b.fileno()), "sendfds"],
                pass_fds=[b.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None
        pipe_read_end = child.stdout.readline().strip()
        a.settimeout(30)
        # as multiprocessing's own recvfds reads: one byte
        data, fds, flags, _ = afunix.recv_fds(a, 1, 1)
        assert (data, flags) == (b"\x01", 0) and list(map(_identity, fds)) == [pipe_read_end]
        afunix.close_fds(fds)
        data, fds, flags, _ = afunix.recv_fds(a, 1, 3)
        assert (data, flags) == (b"\x03", 0) and len(fds) == 3
        assert _identity(fds[0]) == _identity(fds[2]) == pipe_read_end
        afunix.close_fds(fds)
        a.send(b"k")
        _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err


@pytest.mark.parametrize("how", ["send_many", "aio.send_many"])
def test_frames_sent_with_send_many_keep_the_channel_protocol(how: str,
                                                              fd_baseline: set[int]) -> None:
    # docs/PROTOCOL.md, Descriptors: a peer that sends each frame with
    # descriptors as one Message keeps the rule, a short write included.
    def frame(payload: bytes, nfds: int = 0) -> bytes:
        return struct.pack("<IBBBB", len(payload), nfds, 0, 1, 0xAF) + payload

    big = _payload(4 << 20)  # over the socket buffer: a short write
    r, w = os.pipe()
    messages = [frame(b"plain"), Message(frame(b"small", 1), fds=(r,)), frame(b"p2"),
                Message(frame(big, 2), fds=(r, w)), frame(b"last")]
    a, b = afunix.socketpair(socket.SOCK_STREAM, blocking=how == "send_many")
    b.setblocking(True)
    ch = afunix.Channel(b)
    try:
        with a, ch:
            def send() -> None:
                if how == "send_many":
                    a.settimeout(30)
                    assert afunix.send_many(a, messages) == len(messages)
                else:
                    assert asyncio.run(aio.send_many(a, messages)) == len(messages)

            sender = threading.Thread(target=send)
            sender.start()
            try:
                got = [ch.recv_message() for _ in messages]
            finally:
                sender.join(60)
            assert [m.data for m in got] == [b"plain", b"small", b"p2", big, b"last"]
            assert [len(m.fds) for m in got] == [0, 1, 0, 2, 0]
            assert _identity(got[1].fds[0]) == _identity(r)
            assert list(map(_identity, got[3].fds)) == [_identity(r), _identity(w)]
            afunix.close_fds([fd for m in got for fd in m.fds])
    finally:
        afunix.close_fds([r, w])


# ---- recv_fds(sock, 0, maxfds): descriptors without data ------------------------


def _recv_fds_0_story(recv_fds: Callable[..., Any], kind: int) -> "list[Any]":
    """What recv_fds(sock, 0, 4) answers, step by step, and what is left queued."""
    story: "list[Any]" = []
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    r, w = os.pipe()
    try:
        with a, b:
            def step() -> None:
                data, fds, flags, address = recv_fds(b, 0, 4)
                assert all(_identity(fd) == _identity(r) for fd in fds)
                story.append((data, len(fds), flags, address))
                afunix.close_fds(fds)

            def left() -> None:
                b.setblocking(False)
                try:
                    story.append(("left", b.recv(100)))
                except BlockingIOError:
                    story.append(("left", "nothing"))
                b.setblocking(True)

            socket.send_fds(a, [b"with"], [r, w])
            step()
            left()
            a.send(b"without")
            step()
            left()
            if kind != socket.SOCK_DGRAM:
                a.send(b"last")
                a.shutdown(socket.SHUT_WR)  # a message cut to nothing, then the end
                step()
                step()
    finally:
        afunix.close_fds([r, w])
    return story


@pytest.mark.parametrize("kind", list(TYPES.values()), ids=list(TYPES))
def test_recv_fds_with_bufsize_0_answers_as_the_stdlib(kind: int, fd_baseline: set[int]) -> None:
    ours = _recv_fds_0_story(afunix.recv_fds, kind)
    assert ours == _recv_fds_0_story(socket.recv_fds, kind)
    assert ours[0][1] == 2  # the descriptors did come


def test_recv_fds_maxfds_over_scm_max_fd_as_the_stdlib(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        for maxfds in (afunix.SCM_MAX_FD, afunix.SCM_MAX_FD + 1, 1000):
            afunix.send_fds(a, [b"x"], [a] * afunix.SCM_MAX_FD)
            data, fds, flags, _ = afunix.recv_fds(b, 8, maxfds)
            assert (data, len(fds), flags) == (b"x", afunix.SCM_MAX_FD, 0)
            afunix.close_fds(fds)
        with pytest.raises(ValueError):
            afunix.recv_fds(b, 8, -1)


# ---- docs/stdlib.md, "Differences from the stdlib": afunix's column ---------------


def test_the_differences_from_the_stdlib_are_as_the_docs_say(fd_baseline: set[int]) -> None:
    r, w = os.pipe()
    try:
        a, b = afunix.socketpair(socket.SOCK_STREAM)
        with a, b:
            # descriptors with no data on a stream: the stdlib's are dropped ...
            assert socket.send_fds(a, [b""], [r]) == 0
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                socket.recv_fds(b, 10, 1)
            # ... afunix refuses them
            with pytest.raises(ValueError, match="data byte"):
                afunix.send_fds(a, [b""], [r])
            with pytest.raises(ValueError, match="address"):
                afunix.send_fds(a, [b"x"], [r], address="/tmp/afx-nowhere")
            for fds, error in (([r] * 254, ValueError), ([-1], ValueError), ([True], TypeError)):
                with pytest.raises(error):
                    afunix.send_fds(a, [b"x"], fds)
            with pytest.raises(BlockingIOError):
                b.recv(10)  # none of those sent anything
            with os.fdopen(os.dup(r)) as as_file:  # objects with fileno() are taken too
                assert afunix.send_fds(a, [b"x"], [as_file]) == 1
            b.setblocking(True)
            _, got, _, _ = afunix.recv_fds(b, 10, 1)
            assert not os.get_inheritable(got[0])  # close-on-exec, unlike the stdlib's
            afunix.close_fds(got)
            with pytest.raises(ValueError):
                afunix.recv_fds(b, (16 << 20) + 1, 1)
            with pytest.raises(ValueError):
                afunix.recv_fds(b, 10, -1)
        with pytest.raises(TypeError):
            afunix.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # type: ignore[misc]
    finally:
        afunix.close_fds([r, w])


# ---- CPython's own test of socket.send_fds/recv_fds, pointed at afunix ------------


def test_cpython_send_recv_fds_tests_pass_against_afunix(backend: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from test import test_socket
    except ImportError as exc:
        pytest.skip("this interpreter ships without its test package (test.test_socket): %s" % exc)
    calls: "list[str]" = []

    def send_fds(*args: Any, **kwargs: Any) -> int:
        calls.append("send_fds")
        return afunix.send_fds(*args, **kwargs)

    def recv_fds(*args: Any, **kwargs: Any) -> Any:
        calls.append("recv_fds")
        return afunix.recv_fds(*args, **kwargs)

    # test_socket calls them as socket.send_fds / socket.recv_fds
    assert test_socket.socket is socket
    monkeypatch.setattr(socket, "send_fds", send_fds)
    monkeypatch.setattr(socket, "recv_fds", recv_fds)
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(test_socket.SendRecvFdsTests)
    result = unittest.TestResult()
    suite.run(result)
    problems = [text for _, text in result.failures + result.errors]
    assert result.testsRun > 0
    assert not result.skipped, result.skipped
    assert result.wasSuccessful(), "\n".join(problems)
    assert "send_fds" in calls and "recv_fds" in calls  # afunix's twins really ran


# ---- cut descriptors never pass for the end of the stream ---------------------------

def test_descriptors_cut_from_a_zero_byte_read_raise_truncated_error(fd_baseline: set[int]) -> None:
    # bufsize 0 on a stream: the read takes no byte, only the control data,
    # and room for 1 descriptor of the 2 sent cuts it (MSG_CTRUNC).  That is
    # a TruncatedError, as for any cut, not (b"", [], 0, None), which reads
    # as the end of the stream.
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        socket.send_fds(a, [b"hello"], [r, w])
        with pytest.raises(afunix.TruncatedError) as info:
            afunix.recv_fds(b, 0, 1)
        assert info.value.data == b"" and info.value.flags & socket.MSG_CTRUNC
        assert b.recv(16) == b"hello"  # the bytes are still queued
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_an_empty_record_whose_descriptors_were_cut_is_not_the_end(fd_baseline: set[int]) -> None:
    # SEQPACKET: an empty record carrying descriptors, then the peer closes.
    # With room for fewer descriptors than came, recv_fds raises
    # TruncatedError, and recv_many hands the record over flagged; only the
    # read after it is the end.
    for receive in ("recv_fds", "recv_many"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        try:
            socket.send_fds(a, [b""], [r, w])
            a.close()
            if receive == "recv_fds":
                with pytest.raises(afunix.TruncatedError):
                    afunix.recv_fds(b, 10, 1)
            else:
                got = afunix.recv_many(b, 8, 10, maxfds=1)
                assert len(got) == 1 and got[0].flags & socket.MSG_CTRUNC and got[0].fds == ()
            assert afunix.recv_many(b, 8, 10) == []
        finally:
            for fd in (r, w):
                os.close(fd)
            a.close()
            b.close()


# ---- a non-blocking stream reports how much of a partial write went ----------------

def _drain(sock: socket.socket) -> tuple[int, list[int]]:
    """Read everything queued on `sock` (non-blocking): bytes and descriptors received."""
    sock.setblocking(False)
    total, fds = 0, []
    while True:
        try:
            data, got, _, _ = socket.recv_fds(sock, 1 << 20, 8)
        except BlockingIOError:
            return total, fds
        total += len(data)
        fds.extend(got)


@pytest.mark.parametrize("how", ["nonblocking", "dontwait"])
def test_send_fds_on_a_full_stream_returns_what_went(how: str, fd_baseline: set[int]) -> None:
    # socket.send_fds returns sendmsg's count; afunix's, after a short write
    # that a non-blocking socket cannot complete, the bytes that went
    # (descriptors included) instead of raising as if nothing had.
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        flags = 0
        if how == "nonblocking":
            a.setblocking(False)
        else:
            flags = socket.MSG_DONTWAIT
        big = b"x" * (4 << 20)
        sent = afunix.send_fds(a, [big], [r], flags)
        assert 0 < sent < len(big)
        total, fds = _drain(b)
        assert total == sent and len(fds) == 1
        afunix.close_fds(fds)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("with_fds", [False, True])
def test_send_many_on_a_full_stream_says_how_many_bytes_went(with_fds: bool,
                                                           fd_baseline: set[int]) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        a.setblocking(False)
        first = afunix.Message(b"head", fds=(r,)) if with_fds else b"head"
        with pytest.raises(BlockingIOError) as info:
            afunix.send_many(a, [first, b"y" * (4 << 20)])
        written = info.value.characters_written
        assert 0 < written < 4 + (4 << 20)
        total, fds = _drain(b)
        assert total == written and len(fds) == (1 if with_fds else 0)
        afunix.close_fds(fds)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_send_fds_refuses_a_strided_buffer_as_the_stdlib_does() -> None:
    a, b = afunix.socketpair()
    r, w = os.pipe()
    try:
        strided = memoryview(b"abcdef")[::2]
        if sys.implementation.name == "cpython":  # (PyPy's sendmsg takes it)
            with pytest.raises(BufferError):
                socket.send_fds(a, [strided], [r])
        with pytest.raises(BufferError):
            afunix.send_fds(a, [strided], [r])
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_send_takes_the_destinations_socket_sendto_takes(tmp_path: Any) -> None:
    # The empty abstract name a peer may be bound to (and recv_fds returns
    # for it) is a destination; an empty address is the kernel's EINVAL; a
    # path with a NUL inside reaches the path before it: as socket.sendto.
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(str(tmp_path), "srv")
    try:
        peer.bind(b"\0")
        srv.bind(path)
        peer.sendto(b"q", path)
        _, _, _, addr = afunix.recv_fds(srv, 10, 0)
        assert addr == b"\0"
        assert afunix.send_fds(srv, [b"reply"], [], address=addr) == 5
        assert peer.recv(10) == b"reply"
        afunix.send_many(srv, [afunix.Message(b"again", address=addr)])
        assert peer.recv(10) == b"again"
        with pytest.raises(OSError) as stdlib_error:
            srv.sendto(b"x", b"")
        with pytest.raises(OSError) as ours:
            afunix.send_fds(srv, [b"x"], [], address=b"")
        assert ours.value.errno == stdlib_error.value.errno == errno.EINVAL
        afunix.send_fds(peer, [b"cut"], [], address=path + "\0junk")
        assert srv.recv(10) == b"cut"
        # bytes-like destinations, as sendto takes them (PyPy's sendto takes
        # a bytearray but not a memoryview; CPython's takes both)
        peer.sendto(b"stdlib", bytearray(path.encode()))
        assert srv.recv(10) == b"stdlib"
        for like in (bytearray(path.encode()), memoryview(path.encode())):
            assert afunix.send_fds(peer, [b"ours"], [], address=like) == 4
            assert srv.recv(10) == b"ours"
            afunix.send_many(peer, [afunix.Message(b"batch", address=like)])
            assert srv.recv(10) == b"batch"
    finally:
        peer.close()
        srv.close()
