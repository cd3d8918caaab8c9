"""Callers that race a send: buffers resized and lists changed while afunix measures and sends them.

Every size afunix measures must be the size of the bytes it sends: a
bytearray stays pinned (a buffer export, as during a stdlib send, so a resize
raises BufferError in whoever tries it) from the moment it is measured until
the send is over, a list of messages is read once, and a descriptor list is
copied once.  The C core reads only the bytes and descriptors it was told are
there; a frame or message of the wrong size never reaches the peer.

These run under the sanitizer job too (.ci/sanitize): there an over-read is a
report, not just a wrong byte.
"""
from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest

# PyPy does not lock a bytearray while a memoryview exports it, so another
# thread's resize is not refused with BufferError there: the C core still
# refuses lengths that do not add up (nothing is sent), which these tests,
# written for the pinning, do not expect.  docs/reliability.md says so.
pytestmark = pytest.mark.skipif(
    sys.implementation.name == "pypy",
    reason="PyPy lets a bytearray be resized while a memoryview exports it (no pin)")

import afunix
from afunix import _backend
from afunix._contract import Outgoing

T = 20.0  # seconds: the bound on every wait and join
# How long each real-thread race runs.  The deterministic tests are the ones
# that fail on every run when a pass is unsafe; these add real concurrency
# (and the sanitizer job watches them).
RACE_SECONDS = 1.0


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Make the interpreter hand the GIL over every few bytecodes, so races get their chance."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _wait_until_full(sock: socket.socket) -> None:
    """Wait until `sock` no longer polls writable: a sender on it is stuck in the kernel."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    deadline = time.monotonic() + T
    while poller.poll(0):
        assert time.monotonic() < deadline, "the socket never filled up"
        time.sleep(0.005)
    time.sleep(0.1)  # from "full" to "blocked in sendmmsg/sendmsg"


class Shifty(list):  # type: ignore[type-arg]
    """A list that shows every iteration another batch: the k-th, 8 messages of 2000 // k bytes.

    What a caller's list subclass may do, and what another thread changing
    the list between two passes over it does: a send must measure and send
    what one reading gave, the first (``for m in messages`` iterates, so
    that is the batch the caller meant).  Its storage, which C code indexing
    the list sees, holds yet another batch.
    """

    def __init__(self) -> None:
        super().__init__([b"x"] * 8)
        self.iterations = 0

    def __iter__(self) -> Iterator[Any]:
        self.iterations += 1
        k = self.iterations
        return iter([bytes([64 + k]) * (2000 // k)] * 8)


@contextlib.contextmanager
def meddling(action: Callable[[], None]) -> Iterator[None]:
    """Run action() each time afunix's Python code calls or returns, into C or Python.

    Those are the points where a switch of the GIL may let another thread
    run; here the other party acts at every one of them, deterministically.
    """
    def hook(frame: Any, event: str, arg: Any) -> None:
        if frame.f_globals.get("__name__", "").startswith("afunix"):
            action()

    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(None)


class ShrinksOnFileno:
    """A descriptor-like object whose fileno() shrinks a bytearray: the caller's own code, run mid-call."""

    def __init__(self, victim: bytearray, fd: int) -> None:
        self.victim = victim
        self.fd = fd
        self.refused: List[BaseException] = []

    def fileno(self) -> int:
        try:
            del self.victim[1:]
        except BufferError as exc:
            self.refused.append(exc)
        return self.fd


# ---- send_many -----------------------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"])
def test_a_bytearray_cannot_shrink_under_a_blocked_send_many(backend: str, kind: int) -> None:
    original = bytes(range(250)) * 8  # 2000 bytes
    ba = bytearray(original)
    count = 1100  # more than one sendmmsg: the second batch is joined after the first blocked
    result: dict[str, Any] = {}
    a, b = afunix.socketpair(kind)
    with a, b:
        b.settimeout(T)

        def send() -> None:
            try:
                result["sent"] = afunix.send_many(a, [ba] * count)
            except BaseException as exc:  # reported below
                result["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        _wait_until_full(a)
        try:
            del ba[1000:]
        except BufferError as exc:
            result["refused"] = exc
        got: List[bytes] = []
        while len(got) < count and sender.is_alive() or len(got) < result.get("sent", 0):
            got.extend(m.data for m in afunix.recv_many(b, 256, 4096))
        sender.join(T)
    assert "error" not in result, result.get("error")
    assert result["sent"] == count
    assert isinstance(result.get("refused"), BufferError), \
        "the bytearray was resized while send_many was sending it"
    assert len(got) == count
    assert all(m == original for m in got), "a message arrived that is not the bytes given"


def test_a_list_subclass_is_read_once(backend: str) -> None:
    # the sizes measured and the bytes sent must come from the same reading
    messages = Shifty()
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        b.settimeout(T)
        assert afunix.send_many(a, messages) == 8
        got = [m.data for m in afunix.recv_many(b, 16, 4096)]
    assert got == [b"A" * 2000] * 8


def test_the_callers_own_code_cannot_shrink_a_measured_buffer(backend: str) -> None:
    original = b"0123456789" * 200
    ba = bytearray(original)
    r, w = os.pipe()
    try:
        evil = ShrinksOnFileno(ba, r)
        a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
        with a, b:
            b.settimeout(T)
            assert afunix.send_many(a, [ba, afunix.Message(b"y", fds=[evil])]) == 2  # type: ignore[list-item]
            got = afunix.recv_many(b, 4, 4096, maxfds=2)
        for m in got:
            afunix.close_fds(m.fds)
    finally:
        os.close(r)
        os.close(w)
    assert evil.refused and isinstance(evil.refused[0], BufferError)
    assert [m.data for m in got] == [original, b"y"]
    assert [len(m.fds) for m in got] == [0, 1]


def _cycling(buffer: bytearray, states: List[bytes]) -> Callable[[], None]:
    """An action that moves `buffer` to its next state (a cycle of 3, so no even
    number of steps undoes a change), and is refused while the buffer is pinned."""
    step = [0]

    def resize() -> None:
        step[0] += 1
        try:
            buffer[:] = states[step[0] % len(states)]
        except BufferError:
            pass  # pinned by the send under way

    return resize


def test_a_bytearray_resized_at_every_step_is_sent_as_measured(backend: str) -> None:
    states = [b"a" * 8, b"b" * 16, b"c" * 24]
    ba = bytearray(states[0])
    counts = (1, 8, 1100)  # 1100: more than one sendmmsg, and the socket fills up
    got: List[bytes] = []
    errors: List[BaseException] = []
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)

    def reader() -> None:
        try:
            while len(got) < sum(counts):
                got.extend(m.data for m in afunix.recv_many(b, 1024, 64))
        except BaseException as exc:  # reported below
            errors.append(exc)

    with a, b:
        b.settimeout(T)
        t = threading.Thread(target=reader)
        t.start()
        try:
            for count in counts:
                with meddling(_cycling(ba, states)):
                    assert afunix.send_many(a, [ba] * count) == count
        finally:
            t.join(T)
    assert not errors, errors
    bad = [m for m in got if m not in states]
    assert not bad, "messages that were never in the buffer, e.g. %r" % bad[:3]
    assert len(got) == sum(counts)


def test_racing_resizes_never_put_wrong_bytes_on_the_wire(backend: str, frequent_switches: None) -> None:
    short, long = b"s" * 8, b"L" * 16
    ba = bytearray(long)
    stop = threading.Event()
    errors: List[BaseException] = []
    resized = [0]

    def resizer() -> None:
        while not stop.is_set():
            for state in (short, long):
                try:
                    ba[:] = state
                    resized[0] += 1
                except BufferError:
                    pass  # pinned by a send under way: as the stdlib would refuse

    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    got: List[bytes] = []

    def reader() -> None:
        try:
            while True:
                batch = [m.data for m in afunix.recv_many(b, 256, 64)]
                if b"end" in batch:
                    got.extend(batch[:batch.index(b"end")])
                    return
                got.extend(batch)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with a, b:
        b.settimeout(T)
        threads = [threading.Thread(target=resizer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        sent = 0
        deadline = time.monotonic() + RACE_SECONDS
        try:
            while time.monotonic() < deadline and not errors:
                sent += afunix.send_many(a, [ba] * 1100)
        finally:
            stop.set()
            afunix.send_many(a, [b"end"])
            for t in threads:
                t.join(T)
    assert not errors, errors
    assert resized[0] > 0, "the resizer never got a turn"
    assert len(got) == sent
    bad = [m for m in got if m not in (short, long)]
    assert not bad, "%d messages that were never in the buffer, e.g. %r" % (len(bad), bad[:3])


def _check_descriptors(got: List[afunix.Message], inodes: List[int], counts: Any,
                       errors: List[str]) -> None:
    """Message i must carry only descriptors of file i, as many as its list ever held; closes them."""
    for m in got:
        i = int(m.data)
        kinds = {os.fstat(fd).st_ino for fd in m.fds}
        if len(m.fds) not in counts or kinds != {inodes[i]}:
            errors.append("message %d came with %d descriptors of %d files"
                          % (i, len(m.fds), len(kinds)))
        afunix.close_fds(m.fds)


def test_descriptor_lists_changed_at_every_step_are_read_once(backend: str) -> None:
    # Message i carries the read end of pipe i, 4, 1 or 2 times: its list
    # changes at every call afunix's code makes (a cycle of 3, so that no
    # even number of steps undoes a change).
    n = 16
    pipes = [os.pipe() for _ in range(n)]
    inodes = [os.fstat(r).st_ino for r, _ in pipes]
    lists = [[r] * 4 for r, _ in pipes]
    messages = [afunix.Message(b"%d" % i, fds=lists[i]) for i in range(n)]  # type: ignore[arg-type]
    step = [0]

    def change() -> None:
        step[0] += 1
        for fds in lists:
            fds[:] = fds[:1] * (4, 1, 2)[step[0] % 3]

    errors: List[str] = []
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    try:
        with a, b:
            b.settimeout(T)
            for _ in range(20):
                try:
                    with meddling(change):
                        sent = afunix.send_many(a, messages)
                except OSError as exc:
                    errors.append("send_many: %r" % exc)
                    continue
                got: List[afunix.Message] = []
                while len(got) < sent:
                    got.extend(afunix.recv_many(b, n, 64, maxfds=8))
                _check_descriptors(got, inodes, (1, 2, 4), errors)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert step[0] > 20, "the lists were never changed during a send"
    assert not errors, errors[:5]


def test_racing_descriptor_lists_never_send_other_descriptors(backend: str, frequent_switches: None) -> None:
    # The same with a real thread: it hits the window between two passes
    # only now and then, but runs under the sanitizer job as it comes.
    n = 16
    pipes = [os.pipe() for _ in range(n)]
    inodes = [os.fstat(r).st_ino for r, _ in pipes]
    lists = [[r] * 4 for r, _ in pipes]
    messages = [afunix.Message(b"%d" % i, fds=lists[i]) for i in range(n)]  # type: ignore[arg-type]
    stop = threading.Event()

    def shrinker() -> None:
        while not stop.is_set():
            for fds in lists:
                del fds[1:]
            for fds in lists:
                fds.extend(fds * 3)

    errors: List[str] = []
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)

    def reader() -> None:
        try:
            while True:
                got = afunix.recv_many(b, 64, 64, maxfds=8)
                end = [m for m in got if m.data == b"end"]
                _check_descriptors([m for m in got if m.data != b"end"], inodes, (1, 4), errors)
                if end:
                    return
        except BaseException as exc:  # reported below
            errors.append("reader: %r" % exc)

    threads = [threading.Thread(target=shrinker), threading.Thread(target=reader)]
    try:
        with a, b:
            b.settimeout(T)
            for t in threads:
                t.start()
            deadline = time.monotonic() + RACE_SECONDS
            try:
                while time.monotonic() < deadline and not errors:
                    try:
                        afunix.send_many(a, messages)
                    except OSError as exc:
                        errors.append("send_many: %r" % exc)
            finally:
                stop.set()
                afunix.send_many(a, [b"end"])
                for t in threads:
                    t.join(T)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert not errors, errors[:5]


# ---- the channel ---------------------------------------------------------------


def _drain(ch: afunix.Channel, into: List[bytes], errors: List[BaseException]) -> None:
    try:
        for m in ch:
            into.append(m)
    except BaseException as exc:  # reported by the test
        errors.append(exc)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_a_list_subclass_is_read_once_by_the_channel(backend: str, kind: int) -> None:
    tx, rx = afunix.channel_pair(kind)
    with rx:
        rx.socket.settimeout(T)
        with tx:
            assert tx.send_many(Shifty()) == 8
        got = list(rx)
    assert got == [b"A" * 2000] * 8


def test_the_callers_own_code_cannot_shrink_a_buffer_the_channel_measured(backend: str) -> None:
    original = b"0123456789" * 200
    ba = bytearray(original)
    r, w = os.pipe()
    try:
        evil = ShrinksOnFileno(ba, r)
        tx, rx = afunix.channel_pair()
        with rx:
            rx.socket.settimeout(T)
            with tx:
                assert tx.send_many([ba, afunix.Message(b"y", fds=[evil])]) == 2  # type: ignore[list-item]
            first = rx.recv_message()
            second = rx.recv_message()
            afunix.close_fds(second.fds)
    finally:
        os.close(r)
        os.close(w)
    assert evil.refused and isinstance(evil.refused[0], BufferError)
    assert (first.data, len(first.fds)) == (original, 0)
    assert (second.data, len(second.fds)) == (b"y", 1)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_a_bytearray_resized_at_every_step_is_framed_as_measured(backend: str, kind: int) -> None:
    # whole (send_many, one joined chunk and several) and as 500-byte records (send_fixed)
    states = [b"a" * 1000, b"b" * 2000, b"c" * 1500]
    valid = set(states) | {m[:500] for m in states}
    ba = bytearray(states[0])
    tx, rx = afunix.channel_pair(kind)
    got: List[bytes] = []
    errors: List[BaseException] = []
    reader = threading.Thread(target=_drain, args=(rx, got, errors))
    sent = 0
    with rx:
        rx.socket.settimeout(T)
        tx.socket.settimeout(T)
        reader.start()
        with tx:
            for count in (1, 8, 100):
                with meddling(_cycling(ba, states)):
                    sent += tx.send_many([ba] * count)
                    sent += tx.send_fixed(ba, 500)
        reader.join(T)  # closing tx ends its iteration
    assert not errors, errors
    bad = [m for m in got if m not in valid]
    assert not bad, "messages that were never in the buffer, e.g. %r" % bad[:1]
    assert len(got) == sent


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_racing_resizes_never_put_a_wrong_frame_on_the_wire(backend: str, kind: int,
                                                            frequent_switches: None) -> None:
    # 1000 or 2000 bytes, sent whole (send_many, more than one joined chunk)
    # and as 500-byte records (send_fixed)
    short, long = b"s" * 1000, b"L" * 2000
    valid = {short, long, short[:500], long[:500]}
    ba = bytearray(long)
    stop = threading.Event()
    resized = [0]

    def resizer() -> None:
        while not stop.is_set():
            for state in (short, long):
                try:
                    ba[:] = state
                    resized[0] += 1
                except BufferError:
                    pass

    tx, rx = afunix.channel_pair(kind)
    got: List[bytes] = []
    errors: List[BaseException] = []
    threads = [threading.Thread(target=resizer), threading.Thread(target=_drain, args=(rx, got, errors))]
    sent = 0
    with rx:
        rx.socket.settimeout(T)
        tx.socket.settimeout(T)
        with tx:
            for t in threads:
                t.start()
            try:
                deadline = time.monotonic() + RACE_SECONDS
                while time.monotonic() < deadline and not errors:
                    sent += tx.send_many([ba] * 100)
                    sent += tx.send_fixed(ba, 500)
            finally:
                stop.set()
        for t in threads:  # closing tx ends the reader's iteration
            t.join(T)
    assert not errors, errors
    assert resized[0] > 0, "the resizer never got a turn"
    bad = [m for m in got if m not in valid]
    assert not bad, "%d messages that were never in the buffer, e.g. %r" % (len(bad), bad[:1])
    assert len(got) == sent


# ---- the backends' own check ------------------------------------------------------


def test_the_backends_never_send_bytes_past_the_data_given(backend: str) -> None:
    # Lengths that promise more than the data holds: the C core refuses them
    # before any system call (it reads only what it was handed); the stdlib
    # backend sends each buffer as the kernel measures it.
    impl = _backend.impl
    data = [b"ab", b"cd"]
    lying = Outgoing(data, [2000, 2], None, None, None, b"abcd")
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        try:
            sent = impl.send_batch(a, lying, 0, 2, 0)
        except BufferError:
            sent = 0
        b.setblocking(False)
        got: List[bytes] = []
        try:
            while True:
                got.append(b.recv(4096))
        except BlockingIOError:
            pass
    assert got == data[:sent]
    assert backend == "stdlib" or sent == 0  # the C core sends no message of a lie


def test_the_backends_never_send_descriptors_past_those_given(backend: str) -> None:
    # Counts that promise more descriptors than the array holds: the C core
    # refuses them; the stdlib backend sends each message's own tuple.
    r, w = os.pipe()
    pipe = os.fstat(r).st_ino
    try:
        impl = _backend.impl
        lying = Outgoing([b"a", b"b"], [1, 1], [(r,), (r,)], None, None, b"ab", [1, 4], [r, r])
        a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
        with a, b:
            try:
                sent = impl.send_batch(a, lying, 0, 2, 0)
            except BufferError:
                sent = 0
            b.setblocking(False)
            got: List[int] = []
            try:
                while True:
                    _, fds, _, _ = socket.recv_fds(b, 16, 8)
                    got.extend(fds)
            except BlockingIOError:
                pass
            kinds = {os.fstat(fd).st_ino for fd in got}
            for fd in got:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)
    assert len(got) == sent and kinds <= {pipe}
    assert backend == "stdlib" or sent == 0


def test_frames_are_packed_only_from_lengths_that_match_the_data(backend: str) -> None:
    impl = _backend.impl
    out = bytearray(64 << 10)
    with pytest.raises(BufferError):
        impl.pack_frames(out, [b"ab", b"cd"], b"abcd", [2000, 2], None)
    with pytest.raises(BufferError):
        impl.pack_frames(out, [b"ab", b"cd"], b"abcd", [1, 2], None)
    assert out == bytearray(64 << 10)
    assert impl.pack_frames(out, [b"ab", b"cd"], b"abcd", [2, 2], None) == 20
