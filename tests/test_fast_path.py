"""The single calls' fast path answers exactly as the careful path does.

send_many([m]), send_fds, recv_fds, recv_many(sock, 1, n) and
RecvBatch.recv take one backend call (``try_send_one``, ``try_send_fds``,
``try_recv``, ``try_recv_one``) for the arguments callers pass most, and the
careful path for everything else.  Each case here runs twice on fresh
sockets, once as it comes and once with the backend's fast calls answering
"take the careful path", and the two must agree: the value returned, what
the peer got, the exception's type and arguments.  The common cases must
really be answered by the fast calls, or the comparison would prove nothing.
"""
from __future__ import annotations

import array
import contextlib
import errno
import gc
import inspect
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

import afunix
from afunix import _backend, receive

from conftest import open_fds

SEQPACKET, DGRAM, STREAM = socket.SOCK_SEQPACKET, socket.SOCK_DGRAM, socket.SOCK_STREAM
FAST = ("try_send_one", "try_send_fds", "try_recv", "try_recv_one")


@contextlib.contextmanager
def careful_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every fast backend call answers "take the careful path", having done nothing."""
    impl = _backend.impl
    with monkeypatch.context() as m:
        m.setattr(impl, "try_send_one", lambda sock, data, flags: -1)
        m.setattr(impl, "try_send_fds", lambda sock, data, fds, flags: -1)
        m.setattr(impl, "try_recv", lambda sock, arena, flags: -1)
        m.setattr(impl, "try_recv_one", lambda sock, arena, flags: None)
        yield


@contextlib.contextmanager
def answered(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[str]]:
    """The names of the fast backend calls that answered (did not hand the call on)."""
    impl = _backend.impl
    names: List[str] = []

    def recording(name: str) -> Callable[..., Any]:
        real = getattr(impl, name)

        def call(*args: Any) -> Any:
            got = real(*args)
            if got is not None and not (type(got) is int and got < 0):
                names.append(name)
            return got
        return call

    with monkeypatch.context() as m:
        for name in FAST:
            m.setattr(impl, name, recording(name))
        yield names


def outcome(call: Callable[[], Any]) -> Tuple[Any, ...]:
    """("ok", value) or ("raised", type, args) of call()."""
    try:
        return ("ok", call())
    except afunix.TruncatedError as exc:
        return ("raised", type(exc), exc.args, exc.data, exc.flags, exc.address)
    except Exception as exc:
        return ("raised", type(exc), exc.args)


def queued(sock: Optional[socket.socket]) -> List[Tuple[bytes, int]]:
    """What is waiting on `sock`, read with the socket module: (data, descriptors) per message."""
    got: List[Tuple[bytes, int]] = []
    if sock is None or sock.fileno() < 0:
        return got
    sock.setblocking(False)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 300)
        except (BlockingIOError, OSError):
            return got
        for fd in fds:
            os.close(fd)
        if not data and not fds and sock.type == STREAM:
            return got
        got.append((data, len(fds)))
        if not data and not fds:
            return got  # SEQPACKET end of stream reads as empty too


def fill(sock: socket.socket) -> None:
    """Send on `sock` until it would block."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"f" * 512)
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(timeout)


# ---- sockets to send on -----------------------------------------------------


def sender(how: str) -> Tuple[socket.socket, Optional[socket.socket]]:
    """(the socket to send on, its peer or None) for the scenario `how`."""
    if how == "inet":
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM), None
    kind = {"dgram": DGRAM, "stream": STREAM}.get(how, SEQPACKET)
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    if how == "nonblocking":
        a.setblocking(False)
    elif how == "timeout":
        a.settimeout(5.0)
    elif how == "full, nonblocking":
        a.setblocking(False)
        fill(a)
    elif how == "full, timeout":
        a.settimeout(0.05)
        fill(a)
    elif how == "full, nonblocking, descriptor made blocking":
        a.setblocking(False)
        fill(a)
        blocking_elsewhere(a)
    elif how == "closed":
        a.close()
    elif how == "peer closed":
        b.close()
    return a, b


def blocking_elsewhere(sock: socket.socket) -> None:
    """Clear O_NONBLOCK through a dup of `sock`: the flag belongs to the open file, which they share.

    `sock` still reports timeout 0.0, and afunix's calls on it must still
    never wait: the careful path adds MSG_DONTWAIT, and the fast path must
    answer as it does (CPython's own sock.send would wait here).  A forked
    child or a peer holding the same open file can do this to a socket.
    """
    twin = sock.dup()
    twin.setblocking(True)
    twin.close()


@contextlib.contextmanager
def waits_at_most(seconds: float) -> Iterator[None]:
    """Raises Blocked in a call that waits longer than `seconds` (a defect: it should not wait)."""
    def stop(signum: int, frame: Any) -> None:
        raise Blocked("still waiting after %s s" % seconds)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Blocked(Exception):
    pass


SEND_SOCKETS = ["blocking", "nonblocking", "timeout", "dgram", "stream", "full, nonblocking",
                "full, nonblocking, descriptor made blocking", "full, timeout", "closed",
                "peer closed", "inet"]


def noncontiguous_view() -> memoryview:
    return memoryview(b"abcdefgh")[::2]


def released_view() -> memoryview:
    view = memoryview(b"gone")
    view.release()
    return view


DATAS: List[Tuple[str, Callable[[], Any]]] = [
    ("bytes", lambda: b"x" * 64),
    ("empty", lambda: b""),
    ("bytearray", lambda: bytearray(b"y" * 10)),
    ("memoryview", lambda: memoryview(b"abc")),
    ("memoryview of ints", lambda: memoryview(array.array("i", [1, 2, 3]))),
    ("view of a bytearray", lambda: memoryview(bytearray(b"0123456789"))[2:5]),
    ("noncontiguous", noncontiguous_view),
    ("released", released_view),
    ("str", lambda: "text"),
    ("int", lambda: 5),
    ("None", lambda: None),
]

FLAGS: List[Any] = [0, int(socket.MSG_DONTWAIT), -1, 1 << 31, 1.5, True, socket.MSG_DONTWAIT]


def _both(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Tuple[Any, ...]]) -> None:
    """run() as it comes, then with the careful path only: the same answer, and no leak."""
    before = open_fds()
    fast = run()
    with careful_only(monkeypatch):
        careful = run()
    assert fast == careful
    assert open_fds() == before


# ---- send_many([m]) ---------------------------------------------------------


def _send_many_case(how: str, make: Callable[[], Any], flags: Any) -> Tuple[Any, ...]:
    a, b = sender(how)
    try:
        with waits_at_most(5.0):
            got = outcome(lambda: afunix.send_many(a, [make()], flags))
        return got, queued(b)
    finally:
        a.close()
        if b is not None:
            b.close()


# (blocking: CPython's sock.send on both backends; timeout: the C backend's
# cffi send, then the careful path's wait)
@pytest.mark.parametrize("how", ["blocking", "timeout"])
@pytest.mark.parametrize("name,make", DATAS, ids=[n for n, _ in DATAS])
def test_send_many_of_one_message_answers_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, name: str, make: Callable[[], Any], how: str) -> None:
    _both(monkeypatch, lambda: _send_many_case(how, make, 0))


@pytest.mark.parametrize("how", ["blocking", "timeout"])
@pytest.mark.parametrize("flags", FLAGS, ids=repr)
def test_send_many_flags_are_checked_as_by_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, flags: Any, how: str) -> None:
    _both(monkeypatch, lambda: _send_many_case(how, lambda: b"z" * 8, flags))


@pytest.mark.parametrize("how", SEND_SOCKETS)
def test_send_many_sockets_answer_as_by_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    _both(monkeypatch, lambda: _send_many_case(how, lambda: b"m" * 32, 0))


# ---- send_fds ----------------------------------------------------------------


class HasFileno:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


FD_LISTS: List[Tuple[str, Callable[[int], Any]]] = [
    ("none", lambda fd: []),
    ("one", lambda fd: [fd]),
    ("three", lambda fd: [fd, fd, fd]),
    ("SCM_MAX_FD", lambda fd: [fd] * 253),
    ("one too many", lambda fd: [fd] * 254),
    ("negative", lambda fd: [-1]),
    ("past a C int", lambda fd: [1 << 31]),
    ("bool", lambda fd: [True]),
    ("float", lambda fd: [float(fd)]),
    ("fileno()", lambda fd: [HasFileno(fd)]),
    ("tuple", lambda fd: (fd,)),
    ("not open", lambda fd: [1 << 20]),
]


def _send_fds_case(how: str, make: Callable[[], Any], fds: Callable[[int], Any],
                   flags: Any = 0, buffers: Optional[Callable[[Any], Any]] = None) -> Tuple[Any, ...]:
    a, b = sender(how)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        data = make()
        given = [data] if buffers is None else buffers(data)
        with waits_at_most(5.0):
            got = outcome(lambda: afunix.send_fds(a, given, fds(null), flags))
        return got, queued(b)
    finally:
        os.close(null)
        a.close()
        if b is not None:
            b.close()


@pytest.mark.parametrize("name,fds", FD_LISTS, ids=[n for n, _ in FD_LISTS])
def test_send_fds_descriptor_lists_answer_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, name: str, fds: Callable[[int], Any]) -> None:
    _both(monkeypatch, lambda: _send_fds_case("blocking", lambda: b"d" * 16, fds))


@pytest.mark.parametrize("name,make", DATAS, ids=[n for n, _ in DATAS])
def test_send_fds_buffers_answer_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, name: str, make: Callable[[], Any]) -> None:
    _both(monkeypatch, lambda: _send_fds_case("blocking", make, lambda fd: [fd]))


@pytest.mark.parametrize("flags", FLAGS, ids=repr)
def test_send_fds_flags_answer_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, flags: Any) -> None:
    _both(monkeypatch, lambda: _send_fds_case("blocking", lambda: b"f", lambda fd: [fd], flags))


@pytest.mark.parametrize("how", SEND_SOCKETS)
def test_send_fds_sockets_answer_as_the_careful_path(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    _both(monkeypatch, lambda: _send_fds_case(how, lambda: b"s" * 8, lambda fd: [fd]))


@pytest.mark.parametrize("shape", ["two buffers", "no buffer", "tuple of one"])
def test_send_fds_other_buffer_lists_answer_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    buffers = {"two buffers": lambda d: [d, d], "no buffer": lambda d: [],
               "tuple of one": lambda d: (d,)}[shape]
    _both(monkeypatch, lambda: _send_fds_case("blocking", lambda: b"b" * 4, lambda fd: [fd],
                                              0, buffers))


# ---- receiving one message -------------------------------------------------------


def receiver(how: str, tmp: str) -> Tuple[socket.socket, List[socket.socket], int]:
    """(the socket to receive on, sockets to close after, the descriptor sent) for `how`."""
    null = os.open(os.devnull, os.O_RDONLY)
    if how == "inet":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return s, [s], null
    if how == "addressed":
        path = os.path.join(tmp, "r")  # the same address in every run
        for name in (path, path + "s"):
            if os.path.exists(name):
                os.unlink(name)
        b = socket.socket(socket.AF_UNIX, DGRAM)
        b.bind(path)
        a = socket.socket(socket.AF_UNIX, DGRAM)
        a.bind(path + "s")
        a.sendto(b"from a path", path)
        return b, [a, b], null
    kind = {"dgram": DGRAM, "stream": STREAM}.get(how, SEQPACKET)
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    if how in ("plain", "dgram", "stream", "timeout"):
        a.send(b"hello")
    elif how == "one descriptor":
        socket.send_fds(a, [b"with fd"], [null])
    elif how == "more descriptors than asked":
        socket.send_fds(a, [b"cut"], [null] * 5)
    elif how == "longer than bufsize":
        a.send(b"L" * 100)
    elif how == "empty message":
        a.send(b"")
    elif how == "end of stream":
        a.close()
    elif how == "credentials":
        afunix.pass_credentials(b)
        a.send(b"who")
    elif how == "two queued":
        a.send(b"first")
        a.send(b"second")
    if how == "nothing, nonblocking":
        b.setblocking(False)
    elif how == "nothing, nonblocking, descriptor made blocking":
        b.setblocking(False)
        blocking_elsewhere(b)
    elif how in ("nothing, timeout", "timeout"):
        b.settimeout(0.05)
    elif how == "closed":
        b.close()
    return b, [a, b], null


RECV_SOCKETS = ["plain", "dgram", "stream", "timeout", "one descriptor",
                "more descriptors than asked", "longer than bufsize", "empty message",
                "end of stream", "credentials", "two queued", "nothing, nonblocking",
                "nothing, nonblocking, descriptor made blocking", "nothing, timeout", "closed",
                "inet", "addressed"]


def _inodes(fds: Any) -> List[int]:
    out = [os.fstat(fd).st_ino for fd in fds]
    for fd in fds:
        os.close(fd)
    return out


def _message(m: afunix.Message) -> Tuple[Any, ...]:
    return (m.data, _inodes(m.fds), m.address, m.flags, m.credentials)


def _receiving(how: str, tmp: str, call: Callable[[socket.socket], Any],
               normal: Callable[[Any], Any]) -> Tuple[Any, ...]:
    b, others, null = receiver(how, tmp)
    try:
        with waits_at_most(5.0):
            first = outcome(lambda: normal(call(b)))
        # what the call left for the next one (nothing may be lost or repeated)
        if b.fileno() < 0:
            return first, None
        b.setblocking(False)
        with waits_at_most(5.0):
            second = outcome(lambda: normal(call(b)))
        return first, second
    finally:
        os.close(null)
        for s in others:
            s.close()


def _recv_fds(sock: socket.socket) -> Any:
    return afunix.recv_fds(sock, 64, 2)


def _recv_fds_normal(got: Any) -> Any:
    data, fds, flags, address = got
    return data, _inodes(fds), flags, address


@pytest.mark.parametrize("how", RECV_SOCKETS)
def test_recv_fds_answers_as_the_careful_path(monkeypatch: pytest.MonkeyPatch, how: str,
                                              tmp_path: Any) -> None:
    _both(monkeypatch, lambda: _receiving(how, str(tmp_path), _recv_fds, _recv_fds_normal))


@pytest.mark.parametrize("bufsize,maxfds,flags", [
    (64, 0, 0), (64, 253, 0), (64, 1000, 0), (0, 1, 0), (-1, 1, 0), ((16 << 20) + 1, 1, 0),
    (1.5, 1, 0), (64, -1, 0), (64, 1.5, 0), (64, True, 0), (True, 1, 0), (64, 1, -1),
    (64, 1, int(socket.MSG_PEEK)), (8, 1, int(socket.MSG_TRUNC)), (64, 1, 1 << 31)],
    ids=repr)
def test_recv_fds_arguments_answer_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, bufsize: Any, maxfds: Any, flags: Any,
        tmp_path: Any) -> None:
    def call(sock: socket.socket) -> Any:
        return afunix.recv_fds(sock, bufsize, maxfds, flags)
    _both(monkeypatch, lambda: _receiving("one descriptor", str(tmp_path), call, _recv_fds_normal))


def _recv_many(sock: socket.socket) -> Any:
    return afunix.recv_many(sock, 1, 64)


def _messages_normal(got: Any) -> Any:
    return [_message(m) for m in got]


@pytest.mark.parametrize("how", RECV_SOCKETS)
def test_recv_many_of_one_answers_as_the_careful_path(monkeypatch: pytest.MonkeyPatch, how: str,
                                                      tmp_path: Any) -> None:
    _both(monkeypatch, lambda: _receiving(how, str(tmp_path), _recv_many, _messages_normal))


@pytest.mark.parametrize("max_messages,bufsize,maxfds,flags", [
    (1, 64, 0, 0), (1, 64, 2, 0), (2, 64, 0, 0), (True, 64, 0, 0), (1.0, 64, 0, 0),
    (0, 64, 0, 0), (1, 0, 0, 0), (1, 8, 0, int(socket.MSG_TRUNC)), (1, 64, 0, -1),
    (1, 64, 0, int(socket.MSG_PEEK))], ids=repr)
def test_recv_many_arguments_answer_as_the_careful_path(
        monkeypatch: pytest.MonkeyPatch, max_messages: Any, bufsize: Any, maxfds: Any,
        flags: Any, tmp_path: Any) -> None:
    def call(sock: socket.socket) -> Any:
        return afunix.recv_many(sock, max_messages, bufsize, flags, maxfds=maxfds)
    _both(monkeypatch, lambda: _receiving("longer than bufsize", str(tmp_path), call,
                                          _messages_normal))


def _batch_normal(batch: afunix.RecvBatch) -> Callable[[int], Any]:
    def normal(count: int) -> Any:
        return count, [(bytes(batch[i]), batch.flags(i), _inodes(batch.fds(i)), batch.address(i),
                        batch.credentials(i)) for i in range(len(batch))]
    return normal


@pytest.mark.parametrize("how", RECV_SOCKETS)
@pytest.mark.parametrize("max_messages,maxfds", [(1, 0), (1, 2), (4, 2)], ids=repr)
def test_recv_batch_answers_as_the_careful_path(monkeypatch: pytest.MonkeyPatch, how: str,
                                                max_messages: int, maxfds: int,
                                                tmp_path: Any) -> None:
    def run() -> Tuple[Any, ...]:
        with afunix.RecvBatch(max_messages, 64, maxfds=maxfds) as batch:
            return _receiving(how, str(tmp_path), batch.recv, _batch_normal(batch))
    _both(monkeypatch, run)


# ---- the fast path is the one that answers ------------------------------------------


def test_the_common_calls_are_answered_by_the_fast_backend_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, SEQPACKET)
    null = os.open(os.devnull, os.O_RDONLY)
    batch = afunix.RecvBatch(1, 64)
    try:
        for how in ("blocking", "nonblocking", "timeout"):
            for s in (a, b):
                s.setblocking(how != "nonblocking")
                if how == "timeout":
                    s.settimeout(5.0)
            for data in (b"m", bytearray(b"m"), memoryview(b"m")):
                # warm-up: the thread's arena for each size is made by the careful path
                afunix.send_many(a, [data])
                afunix.recv_many(b, 1, 64)
                afunix.send_fds(a, [data], [null])
                for fd in afunix.recv_fds(b, 64, 1)[1]:
                    os.close(fd)
                with answered(monkeypatch) as names:
                    assert afunix.send_many(a, [data]) == 1
                    assert batch.recv(b) == 1 and bytes(batch[0]) == b"m"
                    assert afunix.send_many(a, [data]) == 1
                    assert afunix.recv_many(b, 1, 64)[0].data == b"m"
                    assert afunix.send_fds(a, [data], [null]) == 1
                    got, fds, flags, address = afunix.recv_fds(b, 64, 1)
                assert (got, len(fds), flags, address) == (b"m", 1, 0, None)
                os.close(fds[0])
                expected = ["try_send_one", "try_recv", "try_send_one", "try_recv_one",
                            "try_send_fds", "try_recv_one"]
                # a backend's try_recv_one may receive through its try_recv
                names[:] = [n for i, n in enumerate(names)
                            if not (n == "try_recv" and names[i + 1:i + 2] == ["try_recv_one"])]
                if how == "timeout" and _backend.name == "stdlib":
                    expected = []  # CPython's methods wait with their own deadline: careful path
                assert names == expected, (how, data)
        b.setblocking(False)
        with answered(monkeypatch) as names:
            with pytest.raises(BlockingIOError):
                afunix.recv_many(b, 1, 64)
            with pytest.raises(BlockingIOError):
                batch.recv(b)
            with pytest.raises(BlockingIOError):
                afunix.recv_fds(b, 64, 1)
        assert names == []
    finally:
        batch.close()
        os.close(null)
        a.close()
        b.close()


# ---- an exception at any line of the fast path loses nothing -------------------------------


class Injected(Exception):
    pass


def _raising_at_line(codes: List[Any], k: int, call: Callable[[], Any]) -> Tuple[bool, Any]:
    """call(), with Injected raised at the k-th line event in any of `codes`; (raised, result)."""
    seen = [0]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and (frame.f_code, frame.f_lineno) not in AFTER_COMMIT:
            seen[0] += 1
            if seen[0] == k:
                raise Injected()
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)
    try:
        return False, call()
    except Injected:
        return True, None
    finally:
        sys.settrace(None)


def _codes(*functions: Any) -> List[Any]:
    return [inspect.unwrap(f).__code__ for f in functions]


def _after_commit(*functions: Any) -> set[Tuple[Any, int]]:
    # The lines that return what a commit (stores only) gave over, in the
    # function that commits and in recv_fds, which returns recv_one's answer:
    # line boundaries, but not points where CPython runs a signal handler (no
    # call or backward jump between the stores and the return), so no
    # exception from one can land there.
    out = set()
    for f in functions:
        lines, first = inspect.getsourcelines(f)
        for k, line in enumerate(lines):
            text = line.strip()
            if text == "return result" or (f is afunix.recv_fds and text in (
                    "if got is not None:", "return got")):
                out.add((f.__code__, first + k))
    return out


AFTER_COMMIT: set[Tuple[Any, int]] = set()


@pytest.mark.parametrize("call", ["recv_fds", "recv_many"])
def test_an_exception_at_any_line_of_a_fast_receive_loses_nothing(call: str) -> None:
    from afunix import receive

    before = open_fds()
    a, b = afunix.socketpair(SEQPACKET)
    null = os.open(os.devnull, os.O_RDONLY)
    impl = _backend.impl
    codes = _codes(getattr(afunix, call), receive.recv_one, impl.try_recv, impl.try_recv_one)
    if hasattr(impl, "_recv_single"):  # the stdlib backend's flat receive of one message
        codes.append(impl._recv_single.__code__)
    AFTER_COMMIT.clear()
    AFTER_COMMIT.update(_after_commit(getattr(afunix, call), receive.recv_one))

    def receive_one() -> Tuple[bytes, int]:
        if call == "recv_fds":
            data, fds, _, _ = afunix.recv_fds(b, 64, 2)
        else:
            (m,) = afunix.recv_many(b, 1, 64, maxfds=0)
            data, fds = m.data, list(m.fds)
        for fd in fds:
            os.close(fd)
        return data, len(fds)

    with a, b:
        a.send(b"warm")
        assert receive_one() == (b"warm", 0)  # the thread's arena, made by the careful path
        for k in range(1, 400):
            if call == "recv_fds":
                socket.send_fds(a, [b"%d" % k], [null])
            else:
                a.send(b"%d" % k)
            raised, got = _raising_at_line(codes, k, receive_one)
            if raised:
                b.setblocking(False)
                got = receive_one()  # left for the next call on this socket: not lost
                b.setblocking(True)
            assert got == (b"%d" % k, 1 if call == "recv_fds" else 0), k
            if not raised:
                break  # k is past the last line: every line was tried
        else:
            pytest.fail("more than 400 line events")
    os.close(null)
    assert k > 5
    assert open_fds() == before


# ---- a descriptor list changed while send_fds reads it ------------------------------


def test_a_descriptor_list_changed_at_every_step_is_read_once() -> None:
    # send_fds(sock, [data], fds): the list changes at every call afunix's
    # code makes; the descriptors sent are those of one reading.
    r, w = os.pipe()
    ino = os.fstat(r).st_ino
    fds = [r] * 4
    step = [0]

    def hook(frame: Any, event: str, arg: Any) -> None:
        if frame.f_globals.get("__name__", "").startswith("afunix"):
            step[0] += 1
            fds[:] = fds[:1] * (4, 1, 2)[step[0] % 3]

    a, b = afunix.socketpair(SEQPACKET)
    try:
        with a, b:
            for _ in range(20):
                sys.setprofile(hook)
                try:
                    assert afunix.send_fds(a, [b"x"], fds) == 1
                finally:
                    sys.setprofile(None)
                data, got, flags, _ = socket.recv_fds(b, 8, 8)
                kinds = {os.fstat(fd).st_ino for fd in got}
                for fd in got:
                    os.close(fd)
                assert data == b"x" and len(got) in (1, 2, 4) and kinds == {ino}, (len(got), kinds)
    finally:
        os.close(r)
        os.close(w)
    assert step[0] > 20, "the list was never changed during a send"


def test_the_closed_socket_error_is_the_stdlibs(monkeypatch: pytest.MonkeyPatch) -> None:
    # the fast path sees fileno() -1 and hands the call on: EBADF as sock.send raises it
    a, b = socket.socketpair(socket.AF_UNIX, SEQPACKET)
    a.close()
    b.close()
    with pytest.raises(OSError) as raised:
        afunix.send_many(a, [b"x"])
    assert raised.value.errno == errno.EBADF
    with pytest.raises(OSError) as raised:
        afunix.recv_many(b, 1, 8)
    assert raised.value.errno == errno.EBADF


# ---- errors the kernel reports once ----------------------------------------
# A pending socket error (sk_err) is cleared by the call that reports it, and
# a DGRAM socket whose peer is gone is disconnected by the send that says so.
# A fast call that met such an error and handed the call on would let the
# careful path's second system call answer instead: the error would be lost.

def _reset_by_peer() -> socket.socket:
    """A SEQPACKET socket whose peer closed with a message unread: ECONNRESET pending.

    Linux reports the pending error before the queued message ("kept"),
    and the end of the stream after it.
    """
    a, b = socket.socketpair(socket.AF_UNIX, SEQPACKET)
    b.send(b"kept")
    a.send(b"unread")
    b.close()
    return a


RESET_RECEIVES = {
    "recv_many": lambda s: afunix.recv_many(s, 1, 100),
    "recv_fds": lambda s: afunix.recv_fds(s, 100, 1),
    "RecvBatch.recv": lambda s: afunix.RecvBatch(1, 100).recv(s),
    "RecvBatch.recv of 4": lambda s: afunix.RecvBatch(4, 100).recv(s),
}


@pytest.mark.parametrize("name", sorted(RESET_RECEIVES))
def test_a_pending_reset_is_raised_once_as_by_sock_recv(name: str) -> None:
    receive = RESET_RECEIVES[name]
    with _reset_by_peer() as twin:
        with pytest.raises(ConnectionResetError):
            twin.recv(100)
        assert twin.recv(100) == b"kept"
    warm, peer = socket.socketpair(socket.AF_UNIX, SEQPACKET)
    with warm, peer:
        peer.send(b"warm")
        receive(warm)  # the thread's arena of this size exists now: the fast path runs
    with _reset_by_peer() as sock:
        with pytest.raises(ConnectionResetError) as info:
            receive(sock)
        assert info.value.args == (errno.ECONNRESET, os.strerror(errno.ECONNRESET))
        assert receive(sock)  # "kept": a message, or a count of one


SENDS = {
    "send_many": lambda s: afunix.send_many(s, [b"x"]),
    "send_fds": lambda s: afunix.send_fds(s, [b"x"], []),
    "send_fds with a descriptor": lambda s: afunix.send_fds(s, [b"x"], [0]),
    # (the batch path: its first, blocking try must not swallow the refusal)
    "send_many of two": lambda s: afunix.send_many(s, [b"x", b"y"]),
}


@pytest.mark.parametrize("name", sorted(SENDS))
def test_a_dgram_send_to_a_closed_peer_is_refused_as_by_sock_send(name: str, tmp_path: Any) -> None:
    results = []
    for send in (lambda s: s.send(b"x"), SENDS[name]):
        path = str(tmp_path / ("p%d" % len(results)))
        server = socket.socket(socket.AF_UNIX, DGRAM)
        server.bind(path)
        with socket.socket(socket.AF_UNIX, DGRAM) as client:
            client.connect(path)
            server.close()
            with pytest.raises(OSError) as info:
                send(client)
            results.append((type(info.value), info.value.args))
    assert results[1] == results[0] == (ConnectionRefusedError, (errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)))


def test_a_bytearray_resized_during_a_blocked_send_never_sends_other_memory() -> None:
    # On CPython the send's buffer export makes the resize fail (BufferError);
    # on PyPy an export does not pin, the bytearray moves, and a send reading
    # the old storage after the wait put freed memory on the wire.
    size = 4096
    for _ in range(5):
        a, b = socket.socketpair(socket.AF_UNIX, SEQPACKET)
        with a, b:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            a.setblocking(False)
            queued = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    a.send(b"f" * 1024)
                    queued += 1
            a.setblocking(True)
            data = bytearray(b"A" * size)
            results: List[Any] = []

            def send() -> None:
                try:
                    results.append(afunix.send_many(a, [data]))
                except Exception as exc:  # noqa: BLE001 - reported below
                    results.append(exc)
            thread = threading.Thread(target=send)
            thread.start()
            time.sleep(0.05)  # the sender waits for room in the kernel
            with contextlib.suppress(BufferError):
                del data[:]
                data.extend(b"B" * 4 * size)
                litter = [bytearray(b"Z" * size) for _ in range(2000)]
                gc.collect()
                del litter
            for _ in range(queued):
                b.recv(2048)
            thread.join(10)
            assert results == [1]
            assert b.recv(8 * size) == b"A" * size


def test_a_thread_keeps_small_arenas_as_spares_and_no_large_ones() -> None:
    # A thread that receives with many sizes in turn swaps small arenas
    # instead of making one per call, but keeps no spare of a large size:
    # eight 256 MiB spares were 2 GiB of address space per thread.

    def spare_sizes() -> List[int]:
        mine = receive._arenas
        return sorted(a.max_messages * a.bufsize for a in mine.spare.values())

    def in_a_thread() -> Tuple[List[int], List[int]]:
        a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
        with a, b:
            for size in (64, 128, 4 << 20, 8 << 20, 256):
                a.send(b"x")
                assert afunix.recv_many(b, 1, size)[0].data == b"x"
            small = spare_sizes()
            a.send(b"y")
            assert afunix.recv_many(b, 1, 128)[0].data == b"y"  # a spare, taken back
            return small, spare_sizes()

    out: List[Any] = []
    t = threading.Thread(target=lambda: out.append(in_a_thread()))
    t.start()
    t.join()
    small, after = out[0]
    assert small == [64, 128]  # 4 and 8 MiB were dropped, 256 is the current one
    assert after == [64, 256]
