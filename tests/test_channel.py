"""The message channel: round trips, descriptors, partial writes, every error path, peers."""
from __future__ import annotations

import array
import errno
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from typing import Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import afunix
from afunix import Channel, Message, ProtocolError
from conftest import open_fds, skip_on_pypy_empty_ctypes_dimension

TYPES = [pytest.param(socket.SOCK_STREAM, id="stream"),
         pytest.param(socket.SOCK_SEQPACKET, id="seqpacket")]
HEADER = struct.Struct("<IBBBB")


def frame(payload: bytes, nfds: int = 0, flags: int = 0, version: int = 1,
          magic: int = 0xAF) -> bytes:
    """A frame as docs/PROTOCOL.md lays it out."""
    return HEADER.pack(len(payload), nfds, flags, version, magic) + payload


def send_with_fds(sock: socket.socket, data: bytes, fds: List[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    sock.sendall(data[sent:])


def recv_n(ch: Channel, n: int, per_call: int = 4096) -> List[bytes]:
    """n messages, by recv_many calls (one read each: on SEQPACKET, one record)."""
    got: List[bytes] = []
    while len(got) < n:
        more = ch.recv_many(min(per_call, n - len(got)))
        assert more, "end of stream after %d of %d" % (len(got), n)
        got.extend(more)
    return got


@pytest.fixture
def raw_pair(request: pytest.FixtureRequest) -> Iterator[Tuple[socket.socket, Channel]]:
    """A raw socket to write frames by hand, and a Channel on its peer."""
    kind = getattr(request, "param", socket.SOCK_STREAM)
    raw, sock = afunix.socketpair(kind)
    ch = Channel(sock)
    yield raw, ch
    raw.close()
    ch.close()


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# ---- round trips ------------------------------------------------------------------

@pytest.mark.parametrize("kind", TYPES)
def test_round_trip_every_way_to_send_and_receive(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    with a, b:
        a.send(b"one")
        a.send(bytearray(b"two"))
        a.send(memoryview(b"xthreex")[1:-1])
        assert a.send_many([b"", b"four", bytearray(b"five"), Message(b"six")]) == 4
        assert b.recv() == b"one"
        assert recv_n(b, 2, 2) == [b"two", b"three"]
        assert b.recv_message() == Message(b"")
        got = recv_n(b, 3)
        assert got == [b"four", b"five", b"six"]
        assert all(type(m) is bytes for m in got)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("size", [0, 1, 7, 8, 100, 65535, 65536 - 8, 65536, 200_000, 3 << 20])
def test_sizes_round_trip_including_frames_larger_than_a_record(kind: int, size: int) -> None:
    a, b = afunix.channel_pair(kind)
    payload = os.urandom(size)
    with a, b:
        a.socket.setblocking(True)
        import threading

        t = threading.Thread(target=a.send_many, args=([payload, b"after"],))
        t.start()
        assert b.recv() == payload
        assert b.recv() == b"after"
        t.join()


@pytest.mark.parametrize("kind", TYPES)
def test_many_messages_many_batches_in_order(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    msgs = [struct.pack("<Q", i) * (i % 5) for i in range(20000)]
    import threading

    with a, b:
        t = threading.Thread(target=lambda: [a.send_many(msgs[i:i + 700])
                                             for i in range(0, len(msgs), 700)])
        t.start()
        got: List[bytes] = []
        while len(got) < len(msgs):
            got.extend(b.recv_many(1000))
        t.join()
        assert got == msgs


@pytest.mark.parametrize("kind", TYPES)
def test_iteration_ends_at_clean_end_of_stream(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    with b:
        with a:
            a.send_many([b"a", b"", b"c"])
        assert list(b) == [b"a", b"", b"c"]
        assert b.recv_many() == []
        with pytest.raises(EOFError):
            b.recv()
        with pytest.raises(EOFError):
            b.recv_message()
        assert len(b.recv_batch()) == 0


def test_recv_batch_zero_copy_views_offsets_and_uniform_size() -> None:
    a, b = afunix.channel_pair()
    with a, b:
        a.send_many([struct.pack("<Q", i) * 8 for i in range(100)])
        batch = b.recv_batch(1000)
        assert len(batch) == 100
        assert batch.size == 64
        assert [bytes(v) for v in batch] == [struct.pack("<Q", i) * 8 for i in range(100)]
        assert bytes(batch[3]) == struct.pack("<Q", 3) * 8
        assert bytes(batch[-1]) == struct.pack("<Q", 99) * 8
        # no object per message: stride over the buffer
        stride = 64 + afunix.channel.HEADER_SIZE
        seqs = batch.buffer[batch.start + 8:batch.end].cast("B")
        assert (batch.end - batch.start) == 100 * stride
        firsts = [struct.unpack_from("<Q", seqs, i * stride)[0] for i in range(100)]
        assert firsts == list(range(100))
        assert list(batch.offsets) == [batch.start + 8 + i * stride for i in range(100)]
        assert set(batch.lengths) == {64}
        a.send_many([b"x", b"yy"])
        mixed = b.recv_batch()
        assert mixed.size is None and [bytes(v) for v in mixed] == [b"x", b"yy"]


@pytest.mark.parametrize("kind", TYPES)
def test_recv_batch_views_are_read_only(kind: int) -> None:
    """A batch's views are into the channel's receive buffer, which also holds frames not parsed
    yet: a write through them would change what the peer sent, so they are read-only."""
    a, b = afunix.channel_pair(kind)
    with a, b:
        a.send_many([b"first", b"second"] * 50)
        batch = b.recv_batch(3)
        assert all(view.readonly for view in batch) and batch[0].readonly
        assert batch.buffer.readonly
        with pytest.raises(TypeError):
            batch[0][0] = 0
        with pytest.raises(TypeError):
            batch.buffer[batch.end] = 0  # the header of the next frame
        # and the frames after it arrive as sent
        assert [b.recv() for _ in range(97)] == ([b"second", b"first"] * 49)[:97]


@pytest.mark.parametrize("kind", TYPES)
def test_a_take_from_a_batch_the_next_receive_ended_hands_out_nothing(kind: int) -> None:
    """A take that read the batch's taker before the next receive and runs after it (another
    thread, or a signal handler's receive inside the take): the slots it names hold later
    messages' descriptors by then, so it hands out none, and each message keeps its own."""
    r, w = os.pipe()
    try:
        a, b = afunix.channel_pair(kind)
        with a, b:
            b.send(b"one", [r])
            b.send(b"two", [w])
            first = a.recv_batch(1)
            stale = afunix.frames.taker_of(first)  # what first.fds(0) calls, read now
            assert stale is not None
            second = a.recv_batch(1)  # the next receive: first has ended
            assert bytes(second[0]) == b"two"
            assert stale(0) == []
            got = second.fds(0)
            assert len(got) == 1 and same_file(got[0], w)
            afunix.close_fds(got)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", TYPES)
def test_descriptors_ride_on_their_message(kind: int, devnull: int, fd_baseline: set[int]) -> None:
    a, b = afunix.channel_pair(kind)
    r, w = os.pipe()
    try:
        with a, b:
            a.send_many([b"plain", Message(b"one", (devnull,)), b"x",
                         Message(b"two", (r, w)), Message(b"", (devnull,)), b"tail"])
            got = [b.recv_message() for _ in range(6)]
            assert [m.data for m in got] == [b"plain", b"one", b"x", b"two", b"", b"tail"]
            assert [len(m.fds) for m in got] == [0, 1, 0, 2, 1, 0]
            assert same_file(got[1].fds[0], devnull)
            assert same_file(got[3].fds[0], r) and same_file(got[3].fds[1], w)
            for m in got:
                assert all(not os.get_inheritable(fd) for fd in m.fds)
                afunix.close_fds(m.fds)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", TYPES)
def test_kernel_glues_writes_but_stops_after_descriptors(kind: int, devnull: int,
                                                          fd_baseline: set[int]) -> None:
    # All written before the first read: one recvmsg may return several
    # writes' bytes, but ends after a write that carried descriptors.
    a, b = afunix.channel_pair(kind)
    with a, b:
        for i in range(5):
            a.send(b"p%d" % i)
        a.send(b"fd1", fds=[devnull])
        a.send(b"fd2", fds=[devnull, devnull])
        a.send_many([b"q%d" % i for i in range(5)])
        a.send(b"fd3", fds=[devnull])
        got = []
        while len(got) < 13:
            got.append(b.recv_message())
        assert [m.data for m in got] == ([b"p%d" % i for i in range(5)] + [b"fd1", b"fd2"]
                                         + [b"q%d" % i for i in range(5)] + [b"fd3"])
        assert [len(m.fds) for m in got] == [0] * 5 + [1, 2] + [0] * 5 + [1]
        for m in got:
            afunix.close_fds(m.fds)


def test_recv_and_recv_many_close_descriptors_they_do_not_return(devnull: int,
                                                                 fd_baseline: set[int]) -> None:
    a, b = afunix.channel_pair()
    with a, b:
        a.send_many([Message(b"a", (devnull,)), Message(b"b", (devnull,)), b"c"])
        assert b.recv() == b"a"
        assert recv_n(b, 2) == [b"b", b"c"]


def test_recv_batch_hands_over_descriptors_and_closes_the_rest(devnull: int,
                                                               fd_baseline: set[int]) -> None:
    a, b = afunix.channel_pair()
    with a, b:
        a.send_many([Message(b"a", (devnull,)), b"b", Message(b"c", (devnull, devnull))])
        batch = b.recv_batch()
        # a read ends after the write that carried descriptors
        assert len(batch) == 1
        taken = batch.fds(0)
        assert len(taken) == 1 and same_file(taken[0], devnull)
        afunix.close_fds(taken)
        batch = b.recv_batch()
        assert [bytes(v) for v in batch] == [b"b", b"c"]
        assert batch.fds(0) == []
        a.send(b"next")
        assert bytes(b.recv_batch()[0]) == b"next"  # closes message 2's descriptors


def test_close_releases_descriptors_not_handed_over(devnull: int, fd_baseline: set[int]) -> None:
    a, b = afunix.channel_pair()
    a.send_many([b"first", Message(b"a", (devnull,)), Message(b"b", (devnull,))])
    assert b.recv() == b"first"
    b.recv_many(0 + 1) if False else None
    a.close()
    b.close()


# ---- the peer breaks the protocol: ProtocolError, channel closed, nothing leaks --------

def _expect_protocol_error(ch: Channel, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        while True:
            ch.recv_message()
    assert isinstance(info.value, OSError) and info.value.errno == errno.EPROTO
    assert ch.closed and ch.fileno() == -1
    with pytest.raises(OSError) as again:
        ch.recv()
    assert again.value.errno == errno.EBADF


@pytest.mark.parametrize("raw_pair", TYPES, indirect=True)
@pytest.mark.parametrize("cut", [1, 7, 8, 9, 19])
def test_peer_closes_mid_frame(raw_pair: Tuple[socket.socket, Channel], cut: int,
                               fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    raw.sendall(frame(b"whole") + frame(b"x" * 12)[:cut])
    raw.close()
    assert ch.recv() == b"whole"  # frames complete before the cut are delivered
    _expect_protocol_error(ch, "middle of a frame")


def test_peer_closes_mid_frame_with_descriptors(raw_pair: Tuple[socket.socket, Channel],
                                                devnull: int, fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    send_with_fds(raw, frame(b"0123456789", nfds=2)[:12], [devnull, devnull])
    raw.close()
    _expect_protocol_error(ch, "middle of a frame")


@pytest.mark.parametrize("raw_pair", TYPES, indirect=True)
def test_oversize_frame(raw_pair: Tuple[socket.socket, Channel], fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    raw.sendall(frame(b"ok") + HEADER.pack(afunix.channel.DEFAULT_MAX_FRAME + 1, 0, 0, 1, 0xAF))
    assert ch.recv() == b"ok"
    _expect_protocol_error(ch, "over max_frame")


def test_max_frame_is_configurable_on_both_sides() -> None:
    raw, sock = afunix.socketpair()
    ch = Channel(sock, max_frame=10)
    with raw, ch:
        raw.sendall(frame(b"x" * 10) + frame(b"x" * 11))
        assert ch.recv() == b"x" * 10
        with pytest.raises(ProtocolError, match="11 bytes is over max_frame"):
            ch.recv()
    a, b = afunix.channel_pair(max_frame=4)
    with a, b:
        with pytest.raises(ValueError, match="max_frame"):
            a.send(b"12345")
        with pytest.raises(ValueError, match="max_frame"):
            a.send_many([b"1", b"12345"])
        assert a.pending == 0
        a.send(b"1234")
        assert b.recv() == b"1234"


@pytest.mark.parametrize("raw_pair", TYPES, indirect=True)
@pytest.mark.parametrize("bad", [
    dict(magic=0xAE), dict(version=2), dict(version=0), dict(flags=1), dict(nfds=254),
], ids=["magic", "version2", "version0", "flags", "nfds"])
def test_malformed_header(raw_pair: Tuple[socket.socket, Channel], bad: dict[str, int],
                          fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    raw.sendall(frame(b"good") + frame(b"bad", **bad))
    assert ch.recv() == b"good"
    _expect_protocol_error(ch, "malformed frame header")


@pytest.mark.parametrize("raw_pair", TYPES, indirect=True)
@pytest.mark.parametrize("declared, sent", [(2, 1), (1, 2), (1, 0), (0, 1), (3, 253)])
def test_descriptor_count_mismatch_closes_every_descriptor(
        raw_pair: Tuple[socket.socket, Channel], declared: int, sent: int,
        devnull: int, fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    data = frame(b"payload", nfds=declared)
    if sent:
        send_with_fds(raw, data, [devnull] * sent)
    else:
        raw.sendall(data)
    raw.sendall(frame(b"next"))
    _expect_protocol_error(ch, "descriptor")


def test_descriptors_on_a_later_byte_of_the_frame_are_refused(
        raw_pair: Tuple[socket.socket, Channel], devnull: int, fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    data = frame(b"0123456789", nfds=1)
    raw.sendall(data[:10])
    time.sleep(0.05)
    assert ch.socket.recv(0, socket.MSG_PEEK) == b""  # (nothing consumed)
    with pytest.raises(BlockingIOError):
        ch.socket.setblocking(False)
        ch.recv()
    send_with_fds(raw, data[10:], [devnull])  # rides on a byte inside the frame
    ch.socket.setblocking(True)
    _expect_protocol_error(ch, "descriptor")


def test_descriptors_no_frame_declares_at_end_of_stream(
        raw_pair: Tuple[socket.socket, Channel], devnull: int, fd_baseline: set[int]) -> None:
    raw, ch = raw_pair
    send_with_fds(raw, frame(b"zero"), [devnull])
    raw.close()
    _expect_protocol_error(ch, "descriptors")


def test_truncated_descriptors_are_a_protocol_error_and_none_leak(backend: str) -> None:
    # The receiver at RLIMIT_NOFILE: the kernel installs what it can, sets
    # MSG_CTRUNC, and the frame's count cannot be met.
    code = textwrap.dedent("""
        import os, resource, socket, afunix
        from afunix import Channel, Message
        a, b = afunix.channel_pair()
        fd = os.open(os.devnull, os.O_RDONLY)
        a.send(b"x", fds=[fd] * 8)
        def count():
            return len(os.listdir("/proc/self/fd"))
        before = count()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = max(os.listdir("/proc/self/fd"), key=int)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(limit) + 4, hard))
        try:
            b.recv_message()
        except afunix.ProtocolError as exc:
            print("ProtocolError", exc)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print("leaked", count() - (before - 1))  # the channel's socket is closed
    """)
    from conftest import run_python
    done = run_python(code, backend)
    assert done.returncode == 0, done.stderr
    assert "ProtocolError" in done.stdout and "MSG_CTRUNC" in done.stdout, done.stdout
    assert "leaked 0" in done.stdout, done.stdout


def test_seqpacket_record_longer_than_the_limit(fd_baseline: set[int]) -> None:
    raw, sock = afunix.socketpair(socket.SOCK_SEQPACKET)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ch = Channel(sock)
    with raw:
        raw.send(frame(b"x" * (afunix.channel.RECORD_MAX + 1000)))
        with pytest.raises(ProtocolError, match="SEQPACKET record"):
            ch.recv()
        assert ch.closed


# ---- sending: partial writes, buffering, timeouts --------------------------------------

@pytest.mark.parametrize("kind", TYPES)
def test_nonblocking_partial_writes_keep_the_tail_and_lose_nothing(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    with a, b:
        a.socket.setblocking(False)
        msgs = [struct.pack("<I", i) * 250 for i in range(2000)]  # 1000 B each
        accepted = 0
        calls = 0
        while accepted < len(msgs):
            calls += 1
            try:
                accepted += a.send_many(msgs[accepted:accepted + 300])
            except BlockingIOError:
                # nothing accepted: the socket is full; drain a little
                assert a.pending > 0 or True
                break
        assert accepted < len(msgs)  # the socket filled up
        pending = a.pending
        assert 0 <= pending < 1008  # at most the tail of one message
        assert a.flush() == pending  # still full
        with pytest.raises(BlockingIOError):
            a.send(b"more")  # not started: the tail goes first
        got: List[bytes] = []
        b.socket.settimeout(5)
        while len(got) < accepted or a.pending:
            got.extend(b.recv_many())
            a.flush()
            if len(got) < accepted and not a.pending:
                continue
        while len(got) < accepted:
            got.extend(b.recv_many())
        assert got == msgs[:accepted]
        assert a.pending == 0
        a.send(b"more")
        assert b.recv() == b"more"


@pytest.mark.parametrize("kind", TYPES)
def test_nonblocking_single_send_partial_then_flush(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    with a, b:
        a.socket.setblocking(False)
        big = os.urandom(1 << 20)
        a.send(big)  # started: the tail is kept
        assert a.pending > 0
        got: List[bytes] = []
        b.socket.settimeout(5)
        while not got:
            a.flush()
            try:
                b.socket.setblocking(False)
                got = b.recv_many()
            except BlockingIOError:
                pass
        assert got == [big]
        assert a.pending == 0


def test_nothing_accepted_raises_blockingioerror_and_sends_nothing() -> None:
    a, b = afunix.channel_pair()
    with a, b:
        a.socket.setblocking(False)
        while True:
            try:
                a.send_many([b"x" * 4000] * 64)
            except BlockingIOError:
                break
        while a.pending:
            if a.flush():
                break
        with pytest.raises(BlockingIOError):
            a.send_many([b"not sent"])


def test_timeout_applies_to_send_and_receive() -> None:
    a, b = afunix.channel_pair()
    with a, b:
        b.socket.settimeout(0.05)
        t0 = time.monotonic()
        with pytest.raises(socket.timeout):
            b.recv()
        assert time.monotonic() - t0 >= 0.04
        a.socket.settimeout(0.05)
        with pytest.raises(socket.timeout):
            while True:
                a.send_many([b"y" * 60000])
        # what was started is pending, whole frames only on the wire
        assert a.pending < 60008
        b.socket.settimeout(5)
        a.socket.settimeout(5)
        import threading

        t = threading.Thread(target=a.flush)
        t.start()
        n = 0
        while True:
            b.socket.settimeout(0.3)
            try:
                got = b.recv_many()
            except socket.timeout:
                break
            assert all(m == b"y" * 60000 for m in got)
            n += len(got)
        t.join()
        assert n > 0 and a.pending == 0


@pytest.mark.parametrize("kind", TYPES)
def test_write_buffer_and_batched_send_one_at_a_time(kind: int) -> None:
    a, b = afunix.channel_pair(kind, write_buffer=1000)
    with a, b:
        for i in range(10):
            a.send(b"%d" % i)
        assert a.pending == sum(8 + len(b"%d" % i) for i in range(10))
        assert a.flush() == 0
        assert recv_n(b, 10) == [b"%d" % i for i in range(10)]
        buf = bytearray(b"mutable")
        a.send(buf)
        buf[:] = b"changed"  # the channel kept its own copy
        for i in range(200):
            a.send(b"z" * 20)  # fills the buffer: written as it goes
        a.flush()
        got = []
        while len(got) < 201:
            got.extend(b.recv_many())
        assert got[0] == b"mutable" and got[1:] == [b"z" * 20] * 200
    c, d = afunix.channel_pair(kind)
    with c, d:
        with c.batched():
            for i in range(100):
                c.send(b"m%d" % i)
            assert c.pending > 0
        assert c.pending == 0
        got = []
        while len(got) < 100:
            got.extend(d.recv_many())
        assert got == [b"m%d" % i for i in range(100)]


def test_buffered_descriptor_message_is_written_in_order(devnull: int,
                                                         fd_baseline: set[int]) -> None:
    a, b = afunix.channel_pair(write_buffer=1 << 16)
    with a, b:
        a.send(b"before")
        a.send(b"with", fds=[devnull])
        a.send(b"after")
        a.flush()
        got = [b.recv_message() for _ in range(3)]
        assert [m.data for m in got] == [b"before", b"with", b"after"]
        assert len(got[1].fds) == 1
        afunix.close_fds(got[1].fds)


def test_close_flushes_pending_on_a_blocking_socket() -> None:
    a, b = afunix.channel_pair(write_buffer=1 << 20)
    with b:
        a.send(b"kept")
        a.close()
        assert list(b) == [b"kept"]


def test_bad_arguments_before_any_system_call() -> None:
    a, b = afunix.channel_pair()
    with a, b:
        with pytest.raises(TypeError):
            a.send_many([b"ok", 3])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            a.send("text")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            a.send(b"x", fds=[-1])
        with pytest.raises(ValueError):
            a.send(b"x", fds=[0] * 254)
        with pytest.raises(ValueError):
            b.recv_many(0)
        assert a.pending == 0
        a.send(b"fine")
        assert b.recv_many() == [b"fine"]
    with pytest.raises(TypeError):
        Channel(3)  # type: ignore[arg-type]
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with d1, d2, pytest.raises(ValueError):
        Channel(d1)
    with pytest.raises(ValueError):
        afunix.channel_pair(socket.SOCK_DGRAM)
    with pytest.raises(ValueError):
        afunix.channel_pair(max_frame=(1 << 30) + 1)
    c, d = afunix.channel_pair()
    c.close()
    d.close()
    with pytest.raises(OSError) as info:
        c.send(b"x")
    assert info.value.errno == errno.EBADF


def test_connect_and_accept(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(str(tmp_path), "ch.sock")
    with afunix.listen(path) as srv:
        client = Channel.connect(path, timeout=5)
        server = Channel.accept(srv)
        with client, server:
            client.send(b"hello")
            assert server.recv() == b"hello"
            server.send_many([b"a", b"b"])
            assert client.recv_many() == [b"a", b"b"]


# ---- properties ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 4)), min_size=1, max_size=60),
       st.sampled_from([socket.SOCK_STREAM, socket.SOCK_SEQPACKET]))
def test_random_batches_round_trip(devnull: int, batch: List[Tuple[int, int]], kind: int) -> None:
    before = open_fds()
    a, b = afunix.channel_pair(kind)
    msgs = [Message(os.urandom(n), (devnull,) * k) if k else os.urandom(n) for n, k in batch]
    with a, b:
        assert a.send_many(msgs) == len(msgs)
        for sent in msgs:
            got = b.recv_message()
            data = sent.data if isinstance(sent, Message) else sent
            assert got.data == data
            assert len(got.fds) == (len(sent.fds) if isinstance(sent, Message) else 0)
            afunix.close_fds(got.fds)
    assert open_fds() == before


# ---- between processes -------------------------------------------------------------------

def test_a_million_messages_with_descriptors_between_processes(backend: str) -> None:
    # One million 16-byte messages, every 100th carrying a descriptor, from a
    # child process; the parent checks the count, the order and every descriptor.
    count = 1_000_000
    code = textwrap.dedent("""
        import os, socket, struct, sys
        import afunix
        from afunix import Channel, Message
        sock = socket.socket(fileno=int(sys.argv[1]))
        ch = Channel(sock)
        fd = os.open(os.devnull, os.O_RDONLY)
        pack = struct.Struct("<QQ").pack
        count = %d
        for start in range(0, count, 1000):
            batch = [pack(i, i * 7) for i in range(start, start + 1000)]
            for i in range(0, 1000, 100):
                batch[i] = Message(batch[i], (fd,))
            assert ch.send_many(batch) == 1000
        ch.close()
    """ % count)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = open_fds()
    env = dict(os.environ, AFUNIX_BACKEND=backend)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, str(child.fileno())],
                            pass_fds=[child.fileno()], env=env)
    child.close()
    ch = Channel(parent)
    got = fds = 0
    unpack = struct.Struct("<QQ").unpack
    devnull_stat = os.stat(os.devnull)
    try:
        while True:
            if got % 100 == 0:
                m = ch.recv_message()
                assert len(m.fds) == 1 and m.data == struct.pack("<QQ", got, got * 7)
                st_ = os.fstat(m.fds[0])
                assert (st_.st_dev, st_.st_ino) == (devnull_stat.st_dev, devnull_stat.st_ino)
                os.close(m.fds[0])
                fds += 1
                got += 1
                continue
            batch = ch.recv_many(99 - (got % 100) + 1 if got % 100 else 1)
            if not batch:
                break
            for data in batch:
                i, j = unpack(data)
                assert i == got and j == got * 7
                got += 1
    except EOFError:
        pass
    finally:
        ch.close()
        proc.wait(60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0
    assert got == count and fds == count // 100
    assert open_fds() - before == set()
    assert elapsed < 60


FOREIGN_PEER = textwrap.dedent('''
    # A peer written from docs/PROTOCOL.md with the standard library only.
    import array, os, socket, struct, sys
    HEADER = struct.Struct("<IBBBB")
    CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)  # PyPy 3.9 lacks the name
    sock = socket.socket(fileno=int(sys.argv[1]))
    mode = sys.argv[2]

    def send_frame(payload, fds=()):
        frame = HEADER.pack(len(payload), len(fds), 0, 1, 0xAF) + payload
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        sent = sock.sendmsg([frame[:65536]], anc)
        rest = frame[sent:]
        while rest:   # SEQPACKET records of at most 65536 bytes
            rest = rest[sock.send(rest[:65536]):]

    def frames():
        buf, fifo = b"", []
        while True:
            data, anc, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4), CLOEXEC)
            for level, kind, raw in anc:
                fifo.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
            if not data:
                assert not buf and not fifo
                return
            buf += data
            while len(buf) >= 8:
                length, nfds, fl, version, magic = HEADER.unpack_from(buf)
                assert (fl, version, magic) == (0, 1, 0xAF)
                if len(buf) < 8 + length:
                    break
                yield buf[8:8 + length], [fifo.pop(0) for _ in range(nfds)]
                buf = buf[8 + length:]

    if mode == "send":
        fd = os.open(os.devnull, os.O_RDONLY)
        for i in range(5000):
            payload = struct.pack("<I", i) * (i % 50)
            send_frame(payload, (fd,) * (i % 7 == 0) * (1 + i % 3))
        send_frame(b"x" * 300000)
        sock.close()
    else:
        total = n = nfds = 0
        for payload, fds in frames():
            total += sum(payload)
            n += 1
            nfds += len(fds)
            for fd in fds:
                os.fstat(fd)
                os.close(fd)
        print(n, total, nfds)
''')


@pytest.mark.parametrize("kind", TYPES)
def test_foreign_peer_sends_to_the_channel(kind: int, fd_baseline: set[int]) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, kind)
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN_PEER, str(child.fileno()), "send"],
                            pass_fds=[child.fileno()], env=dict(os.environ))
    child.close()
    with Channel(parent) as ch:
        got = []
        while True:
            try:
                got.append(ch.recv_message())
            except EOFError:
                break
    assert proc.wait(60) == 0
    assert len(got) == 5001
    for i, m in enumerate(got[:5000]):
        assert m.data == struct.pack("<I", i) * (i % 50)
        assert len(m.fds) == (1 + i % 3 if i % 7 == 0 else 0)
        afunix.close_fds(m.fds)
    assert got[5000].data == b"x" * 300000


@pytest.mark.parametrize("kind", TYPES)
def test_foreign_peer_receives_from_the_channel(kind: int, devnull: int) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, kind)
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN_PEER, str(child.fileno()), "recv"],
                            pass_fds=[child.fileno()], env=dict(os.environ),
                            stdout=subprocess.PIPE, text=True)
    child.close()
    msgs: list[object] = []
    total = nfds = 0
    for i in range(3000):
        payload = bytes([i % 251]) * (i % 40)
        total += sum(payload)
        if i % 11 == 0:
            msgs.append(Message(payload, (devnull,) * (i % 4)))
            nfds += i % 4
        else:
            msgs.append(payload)
    msgs.append(b"\x01" * 200000)
    total += 200000
    with Channel(parent) as ch:
        for start in range(0, len(msgs), 250):
            ch.send_many(msgs[start:start + 250])
        with ch.batched():
            ch.send(b"\x02")
    total += 2
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.split() == [str(len(msgs) + 1), str(total), str(nfds)]


@pytest.mark.parametrize("kind", TYPES)
def test_send_fixed_sends_records_of_one_buffer(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    records = array.array("Q", range(3000))
    with a, b:
        assert a.send_fixed(records, 24) == 1000
        assert a.send_fixed(b"", 8) == 0
        with pytest.raises(ValueError):
            a.send_fixed(b"12345", 2)
        got = recv_n(b, 1000)
        assert got == [records[3 * i:3 * i + 3].tobytes() for i in range(1000)]


def test_frame_batch_outlives_its_channel() -> None:
    import gc

    def batch_of_closed_channel() -> "afunix.FrameBatch":
        a, b = afunix.channel_pair()
        a.send_many([b"hello", b"world!!", b"xxx"])
        batch = b.recv_batch()
        a.close()
        b.close()
        return batch

    batch = batch_of_closed_channel()
    gc.collect()
    junk = [bytearray(b"\xee" * 16384) for _ in range(2000)]  # reuse any freed memory
    assert [bytes(m) for m in batch] == [b"hello", b"world!!", b"xxx"]
    assert list(batch.lengths) == [5, 7, 3]
    del junk


def test_good_frames_ahead_of_a_descriptor_mismatch_are_delivered(fd_baseline: set[int]) -> None:
    import struct

    head = struct.Struct("<IBBBB")

    def frame(payload: bytes, nfds: int = 0) -> bytes:
        return head.pack(len(payload), nfds, 0, 1, 0xAF) + payload

    a, b = socket.socketpair()
    ch = afunix.Channel(b)
    try:
        # one write: a good frame, then one declaring a descriptor that never came
        a.sendall(frame(b"good") + frame(b"bad", nfds=1))
        assert ch.recv() == b"good"
        with pytest.raises(afunix.ProtocolError, match="declares 1 descriptors"):
            ch.recv()
        assert ch.closed
    finally:
        a.close()
        ch.close()


@skip_on_pypy_empty_ctypes_dimension
def test_channel_buffers_whose_len_is_not_their_byte_count() -> None:
    import array
    import ctypes

    empty_rows = (ctypes.c_uint8 * 0 * 2)()
    shorts = array.array("H", [7, 8])
    a, b = afunix.channel_pair()
    with a, b:
        assert a.send_many([empty_rows, shorts]) == 2
        assert [b.recv(), b.recv()] == [b"", shorts.tobytes()]


def test_a_large_frame_header_alone_does_not_allocate_the_frame() -> None:
    import struct

    a, b = socket.socketpair()
    ch = afunix.Channel(b)
    try:
        a.sendall(struct.pack("<IBBBB", 50 << 20, 0, 0, 1, 0xAF) + b"x" * 1000)
        ch.socket.settimeout(0.2)
        with pytest.raises(socket.timeout):
            ch.recv()  # the frame is incomplete: nothing to hand out yet
        # the buffer grows with the bytes that came, not with what the header claims
        assert len(ch._reader.buffer) < 4 << 20
        import threading

        rest = threading.Thread(target=a.sendall, args=(b"y" * ((50 << 20) - 1000),))
        rest.start()
        ch.socket.settimeout(30)
        data = ch.recv()
        rest.join()
        assert len(data) == 50 << 20 and data[:1000] == b"x" * 1000 and data[-1:] == b"y"
    finally:
        a.close()
        ch.close()
