"""send_many, recv_many and RecvBatch on both backends, with real sockets and peers."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import afunix
from afunix import Message
from conftest import open_fds, run_python, skip_on_pypy_empty_ctypes_dimension

MSG_TRUNC = socket.MSG_TRUNC
MSG_CTRUNC = socket.MSG_CTRUNC
MESSAGE_TYPES = [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET]
TYPE_IDS = ["dgram", "seqpacket"]


def drain(sock: socket.socket, expected: int, bufsize: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < expected:
        got.extend(afunix.recv_many(sock, 1024, bufsize))
    return got


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=TYPE_IDS)
def test_round_trip_keeps_boundaries_and_flags(kind: int, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(kind)
    with a, b:
        payloads = [b"", b"a", b"x" * 100, bytearray(b"ba"), memoryview(b"mv"), b"y" * 101]
        assert afunix.send_many(a, payloads) == len(payloads)
        msgs = afunix.recv_many(b, 10, 100)
        assert [m.data for m in msgs] == [b"", b"a", b"x" * 100, b"ba", b"mv", b"y" * 100]
        assert [bool(m.flags & MSG_TRUNC) for m in msgs] == [False] * 5 + [True]
        assert all(m.fds == () and m.address is None and m.credentials is None for m in msgs)
        assert all(type(m.data) is bytes for m in msgs)


def test_message_is_an_immutable_value() -> None:
    m = Message(b"x", fds=(3,))
    assert m == Message(b"x", (3,), None, 0, None)
    assert hash(m) == hash(Message(b"x", fds=(3,)))
    with pytest.raises(AttributeError):
        m.data = b"y"  # type: ignore[misc]
    assert not hasattr(m, "__dict__")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(MESSAGE_TYPES),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=1024),
    bufsize=st.integers(1, 256),
)
def test_random_batches_round_trip(kind: int, sizes: list[int], bufsize: int) -> None:
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    a, b = afunix.socketpair(kind)
    with a, b:
        # a second thread sends while we receive: more than a buffer's worth
        result: list[int] = []
        sender = threading.Thread(target=lambda: result.append(afunix.send_many(a, payloads)))
        sender.start()
        got: list[Message] = []
        while len(got) < len(payloads):
            got.extend(afunix.recv_many(b, 1024, bufsize))
        sender.join()
        assert result == [len(payloads)]
        assert [m.data for m in got] == [p[:bufsize] for p in payloads]
        assert [bool(m.flags & MSG_TRUNC) for m in got] == [len(p) > bufsize for p in payloads]


STDLIB_PEER = textwrap.dedent(
    """
    import socket, sys, zlib
    s = socket.socket(fileno=int(sys.argv[1]))
    s.settimeout(30)
    mode, count = sys.argv[2], int(sys.argv[3])
    if mode == "recv":
        crc = 0
        for _ in range(count):
            crc = zlib.crc32(s.recv(65536), crc)
        s.send(str(crc).encode())
    else:
        for i in range(count):
            s.send(b"%d:" % i + b"z" * (i % 70))
    """
)


def _stdlib_peer(sock: socket.socket, mode: str, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", STDLIB_PEER, str(sock.fileno()), mode, str(count)],
        pass_fds=[sock.fileno()],
    )


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=TYPE_IDS)
def test_stdlib_peer_receives_what_send_many_sends(kind: int) -> None:
    a, b = afunix.socketpair(kind)
    payloads = [b"%d:" % i + b"q" * (i % 90) for i in range(500)]
    with a, b:
        child = _stdlib_peer(b, "recv", len(payloads))
        b.close()
        assert afunix.send_many(a, payloads) == 500
        a.settimeout(30)
        crc = int(a.recv(100))
        assert child.wait(30) == 0
    expected = 0
    for p in payloads:
        expected = zlib.crc32(p, expected)
    assert crc == expected


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("how", ["recv_many", "RecvBatch"])
def test_receive_from_a_stdlib_peer(kind: int, how: str) -> None:
    a, b = afunix.socketpair(kind)
    count = 2000
    with a, b:
        child = _stdlib_peer(b, "send", count)
        b.close()
        a.settimeout(30)
        got: list[bytes] = []
        batch = afunix.RecvBatch(64, 256)
        while len(got) < count:
            if how == "recv_many":
                got.extend(m.data for m in afunix.recv_many(a, 64, 256))
            else:
                n = batch.recv(a)
                got.extend(bytes(batch[i]) for i in range(n))
        assert child.wait(30) == 0
    assert got == [b"%d:" % i + b"z" * (i % 70) for i in range(count)]


TWO_PROCESS_SENDER = textwrap.dedent(
    """
    import socket, sys, afunix
    assert afunix.BACKEND == sys.argv[2]
    s = socket.socket(fileno=int(sys.argv[1]))
    total, batch = 100_000, 256
    for start in range(0, total, batch):
        msgs = [i.to_bytes(8, "little") * 8 for i in range(start, min(total, start + batch))]
        assert afunix.send_many(s, msgs) == len(msgs)
    """
)


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=TYPE_IDS)
def test_100000_messages_between_processes(kind: int, backend: str) -> None:
    a, b = afunix.socketpair(kind)
    with a, b:
        child = subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_SENDER, str(b.fileno()), backend],
            pass_fds=[b.fileno()], env=dict(os.environ, AFUNIX_BACKEND=backend),
        )
        b.close()
        a.settimeout(60)
        expected = 0
        batch = afunix.RecvBatch(256, 64)
        received = 0
        while received < 100_000:
            if received % 2:
                msgs = [m.data for m in afunix.recv_many(a, 256, 64)]
            else:
                n = batch.recv(a)
                msgs = [bytes(batch[i]) for i in range(n)]
            for data in msgs:
                assert data == expected.to_bytes(8, "little") * 8, (expected, data)
                expected += 1
            received += len(msgs)
        assert child.wait(60) == 0
        assert received == 100_000
        a.settimeout(0)
        if kind == socket.SOCK_SEQPACKET:
            assert afunix.recv_many(a, 10, 64) == []  # the sender exited: end of stream
        else:
            with pytest.raises(BlockingIOError):  # nothing more, nothing extra
                afunix.recv_many(a, 10, 64)


def test_partial_send_on_full_nonblocking_socket_is_a_count(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM, blocking=False)
    with a, b:
        payloads = [i.to_bytes(4, "little") * 16 for i in range(5000)]
        sent = afunix.send_many(a, payloads)
        assert 0 < sent < 5000
        with pytest.raises(BlockingIOError):
            afunix.send_many(a, payloads[sent:])
        got = [m.data for m in drain_nonblocking(b)]
        assert got == payloads[:sent]  # the first `sent`, in order, none lost
        # and the rest goes once there is room
        rest = afunix.send_many(a, payloads[sent:sent + 10])
        assert rest == 10


def drain_nonblocking(sock: socket.socket) -> list[Message]:
    got: list[Message] = []
    while True:
        try:
            got.extend(afunix.recv_many(sock, 1024, 1024))
        except BlockingIOError:
            return got


def test_timeouts_follow_the_socket() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        b.settimeout(0.1)
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            afunix.recv_many(b, 10, 100)
        assert time.monotonic() - start >= 0.09
        a.settimeout(0.1)
        payloads = [b"x" * 64] * 5000
        sent = afunix.send_many(a, payloads)
        assert 0 < sent < 5000  # the timeout ran out after some went: a count
        with pytest.raises(socket.timeout):
            afunix.send_many(a, payloads)
        # a timeout socket still takes what is queued without waiting it out
        start = time.monotonic()
        got = afunix.recv_many(b, 1024, 100)
        assert len(got) >= 1 and time.monotonic() - start < 0.09


def test_msg_dontwait_flag_is_honoured() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        b.settimeout(5)
        start = time.monotonic()
        with pytest.raises(BlockingIOError):
            afunix.recv_many(b, 10, 100, socket.MSG_DONTWAIT)
        assert time.monotonic() - start < 1


def test_msg_peek_flag_is_honoured() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        afunix.send_many(a, [b"one", b"two"])
        first = afunix.recv_many(b, 1, 100, socket.MSG_PEEK)
        assert [m.data for m in first] == [b"one"]
        assert [m.data for m in afunix.recv_many(b, 10, 100)] == [b"one", b"two"]


def test_signal_during_blocking_recv_is_retried(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    seen: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        timer = threading.Timer(0.3, lambda: afunix.send_many(a, [b"late"]))
        timer.start()
        msgs = afunix.recv_many(b, 10, 100)
        timer.join()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        a.close()
        b.close()
    assert [m.data for m in msgs] == [b"late"]
    assert seen  # the handler did run while we waited


class Interrupted(Exception):
    pass


def test_exception_from_signal_handler_propagates_and_loses_nothing() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)

    def handler(signum: int, frame: object) -> None:
        raise Interrupted()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Interrupted):
            afunix.recv_many(b, 10, 100)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    with a, b:
        afunix.send_many(a, [b"after"])
        assert [m.data for m in afunix.recv_many(b, 10, 100)] == [b"after"]


def test_unconnected_dgram_with_addresses_both_ways() -> None:
    directory = tempfile.mkdtemp(prefix="afx", dir="/tmp")
    pa, pb = os.path.join(directory, "a"), os.path.join(directory, "b")
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        a.bind(pa)
        b.bind(pb)
        b.settimeout(5)
        a.settimeout(5)
        n = afunix.send_many(a, [Message(b"to-b-%d" % i, address=pb) for i in range(5)])
        assert n == 5
        msgs = afunix.recv_many(b, 10, 100)
        assert [(m.data, m.address) for m in msgs] == [(b"to-b-%d" % i, pa) for i in range(5)]
        assert afunix.send_many(b, [Message(b"reply", address=msgs[0].address)]) == 1
        batch = afunix.RecvBatch(4, 100)
        assert batch.recv(a) == 1
        assert bytes(batch[0]) == b"reply" and batch.address(0) == pb
        # the stdlib receiver sees the same
        afunix.send_many(a, [Message(b"std", address=pb)])
        assert b.recvfrom(100) == (b"std", pa)
    finally:
        a.close()
        b.close()
        for p in (pa, pb):
            os.unlink(p)
        os.rmdir(directory)


def test_unnamed_sender_address_matches_stdlib() -> None:
    directory = tempfile.mkdtemp(prefix="afx", dir="/tmp")
    path = os.path.join(directory, "r")
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        r.bind(path)
        s.sendto(b"1", path)
        s.sendto(b"2", path)
        std = r.recvfrom(10)[1]
        ours = afunix.recv_many(r, 10, 10)[0].address
        assert ours == std
    finally:
        r.close()
        s.close()
        os.unlink(path)
        os.rmdir(directory)


def test_stream_send_many_is_sendall_and_recv_many_chunks() -> None:
    a, b = afunix.socketpair(socket.SOCK_STREAM)
    with a, b:
        payloads = [os.urandom(1000) for _ in range(600)]  # more than a buffer
        t = threading.Thread(target=lambda: afunix.send_many(a, payloads))
        t.start()
        got = bytearray()
        while len(got) < 600_000:
            for m in afunix.recv_many(b, 16, 65536):
                got += m.data
        t.join()
        assert bytes(got) == b"".join(payloads)
        a.close()
        assert afunix.recv_many(b, 16, 100) == []  # end of stream


def test_seqpacket_end_of_stream_and_empty_messages() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with b:
        afunix.send_many(a, [b"", b"x", b""])
        # peer still open: empty messages are messages
        assert [m.data for m in afunix.recv_many(b, 10, 10)] == [b"", b"x", b""]
        afunix.send_many(a, [b"last"])
        a.close()
        assert [m.data for m in afunix.recv_many(b, 10, 10)] == [b"last"]
        assert afunix.recv_many(b, 10, 10) == []
        batch = afunix.RecvBatch(4, 10)
        assert batch.recv(b) == 0 and len(batch) == 0


def test_recv_batch_views_and_reuse() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        batch = afunix.RecvBatch(8, 16)
        assert (batch.max_messages, batch.bufsize, batch.maxfds) == (8, 16, 0)
        afunix.send_many(a, [b"alpha", b"beta", b"g" * 20])
        assert batch.recv(b) == 3
        assert len(batch) == 3
        assert [bytes(v) for v in batch] == [b"alpha", b"beta", b"g" * 16]
        assert isinstance(batch[0], memoryview) and bytes(batch[-1]) == b"g" * 16
        assert batch.flags(2) & MSG_TRUNC and not batch.flags(0) & MSG_TRUNC
        assert batch.address(0) is None and batch.fds(0) == []
        assert [m.data for m in batch.messages()] == [b"alpha", b"beta", b"g" * 16]
        with pytest.raises(IndexError):
            batch[3]
        afunix.send_many(a, [b"next"])
        assert batch.recv(b) == 1 and bytes(batch[0]) == b"next"


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda s: afunix.recv_many(s, 0, 10), ValueError),
        (lambda s: afunix.recv_many(s, 1025, 10), ValueError),
        (lambda s: afunix.recv_many(s, 1, 0), ValueError),
        (lambda s: afunix.recv_many(s, 1, afunix.receive.MAX_BUFSIZE + 1), ValueError),
        (lambda s: afunix.recv_many(s, 1024, afunix.receive.MAX_BUFSIZE), ValueError),
        (lambda s: afunix.recv_many(s, "1", 10), TypeError),
        (lambda s: afunix.recv_many(s, 1, 10, maxfds=254), ValueError),
        (lambda s: afunix.recv_many(s, 1, 10, "0"), TypeError),
        (lambda s: afunix.RecvBatch(0, 10), ValueError),
        (lambda s: afunix.send_many(s, ["text"]), TypeError),
        (lambda s: afunix.send_many(s, [b"ok", 42]), TypeError),
        (lambda s: afunix.send_many(s, [Message(b"x", fds=("3",))]), TypeError),
        (lambda s: afunix.send_many(s, [Message(b"x", fds=(-1,))]), ValueError),
        (lambda s: afunix.send_many(s, [Message(b"x", fds=(0,) * 254)]), ValueError),
        (lambda s: afunix.send_many(s, [Message(b"x", address="/" + "a" * 200)]), ValueError),
        (lambda s: afunix.send_many(object(), [b"x"]), TypeError),
    ],
)
def test_bad_arguments_raise_before_any_system_call(call: object, error: type) -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM, blocking=False)
    with a, b:
        with pytest.raises(error):
            call(a)  # type: ignore[operator]
        # nothing was sent
        with pytest.raises(BlockingIOError):
            b.recv(100)


def test_closed_socket_is_ebadf_like_the_stdlib() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    a.close()
    b.close()
    for call in (lambda: afunix.send_many(a, [b"x"]), lambda: afunix.recv_many(a, 1, 10),
                 lambda: afunix.RecvBatch(1, 10).recv(a)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_plain_fileno_object_is_accepted() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)

    class Holder:
        def __init__(self, s: socket.socket) -> None:
            self.s = s

        def fileno(self) -> int:
            return self.s.fileno()

    with a, b:
        assert afunix.send_many(Holder(a), [b"via fileno"]) == 1
        assert [m.data for m in afunix.recv_many(Holder(b), 4, 32)] == [b"via fileno"]
        assert a.fileno() >= 0 and b.fileno() >= 0  # not taken over, not closed


def test_no_descriptor_leak_over_10000_calls() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        batch = afunix.RecvBatch(4, 64)
        before = open_fds()
        for i in range(10_000):
            afunix.send_many(a, [b"m", b"n"])
            if i % 2:
                batch.recv(b)
            else:
                afunix.recv_many(b, 4, 64)
        assert open_fds() == before


def test_peer_closed_mid_batch_is_a_clear_error_not_sigpipe() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    b.close()
    with a:
        with pytest.raises(BrokenPipeError):
            afunix.send_many(a, [b"x"] * 10)


def test_other_sockets_child_sees_backend(backend: str) -> None:
    proc = run_python("import afunix; print(afunix.supports('sendmmsg'))", backend)
    assert proc.stdout.strip() == ("True" if backend == "c" else "False")


def test_fileno_object_keeps_its_blocking_mode_under_a_default_timeout() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)

    class Holder:
        def fileno(self) -> int:
            return a.fileno()

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3.0)
    try:
        with a, b:
            assert afunix.send_many(Holder(), [b"x"]) == 1
            assert os.get_blocking(a.fileno())  # not switched to non-blocking
            assert a.gettimeout() is None
    finally:
        socket.setdefaulttimeout(old)


def test_recv_batch_keeps_the_backend_it_was_made_with(backend: str) -> None:
    from afunix import _backend

    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        batch = afunix.RecvBatch(4, 16)
        other = "stdlib" if backend == "c" else "c"
        try:
            _backend.use(other)
        except ImportError:
            pytest.skip("only one backend built")
        try:
            afunix.send_many(a, [b"one", b"two"])
            assert batch.recv(b) == 2 and [bytes(v) for v in batch] == [b"one", b"two"]
        finally:
            _backend.use(backend)


def test_msg_peek_takes_one_message_and_leaves_it_queued() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        afunix.send_many(a, [b"one", b"two", b"three"])
        assert [m.data for m in afunix.recv_many(b, 10, 100, socket.MSG_PEEK)] == [b"one"]
        batch = afunix.RecvBatch(10, 100)
        assert batch.recv(b, socket.MSG_PEEK) == 1 and bytes(batch[0]) == b"one"
        assert [m.data for m in afunix.recv_many(b, 10, 100)] == [b"one", b"two", b"three"]


@skip_on_pypy_empty_ctypes_dimension
def test_buffers_whose_len_is_not_their_byte_count() -> None:
    import array
    import ctypes

    empty_rows = (ctypes.c_uint8 * 0 * 2)()  # len() 2, no bytes
    shorts = array.array("H", [7, 8])  # len() 2, 4 bytes
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        assert afunix.send_many(a, [empty_rows, shorts]) == 2
        assert [m.data for m in afunix.recv_many(b, 4, 16)] == [b"", shorts.tobytes()]
