"""send_many's whole-batch checks answer exactly as the per-message checks do.

A batch of plain buffers, or of Messages carrying only descriptors, is
checked a batch at a time (batch._joined_plain, batch._messages_with_fds);
anything else, and every batch those decline, is checked one message at a
time.  Each case here runs twice on fresh sockets, once as it comes and once
with the whole-batch checks declining, and the two must agree: the value
returned or the exception's type and arguments, and what the peer got (bytes,
and which descriptors, by inode).  The common batches must really be taken
by the whole-batch checks, or the comparison would prove nothing.
"""
from __future__ import annotations

import array
import contextlib
import enum
import os
import socket
from typing import Any, Callable, Iterator, List, Tuple

import pytest

import afunix
from afunix import batch

from conftest import open_fds
from test_fast_path import noncontiguous_view, released_view

SEQPACKET, DGRAM = socket.SOCK_SEQPACKET, socket.SOCK_DGRAM


@contextlib.contextmanager
def per_message_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The whole-batch checks decline every batch: each message is checked on its own."""
    with monkeypatch.context() as m:
        m.setattr(batch, "_joined_plain", lambda items, types: None)
        m.setattr(batch, "_messages_with_fds", lambda items: None)
        yield


@contextlib.contextmanager
def batch_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[str]]:
    """The names of the whole-batch checks that took a batch (did not decline it)."""
    names: List[str] = []
    plain, with_fds = batch._joined_plain, batch._messages_with_fds

    def plain_spy(items: Any, types: Any) -> Any:
        got = plain(items, types)
        if got is not None:
            names.append("plain")
        return got

    def fds_spy(items: Any) -> Any:
        got = with_fds(items)
        if got is not None:
            names.append("fds")
        return got

    with monkeypatch.context() as m:
        m.setattr(batch, "_joined_plain", plain_spy)
        m.setattr(batch, "_messages_with_fds", fds_spy)
        yield names


def _inode(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _queued(sock: socket.socket, sent: List[int]) -> List[Tuple[bytes, List[Any]]]:
    """What waits on `sock`, read with the socket module: (data, which of `sent` each descriptor is)."""
    known = {_inode(fd): i for i, fd in enumerate(sent)}
    got = []
    sock.setblocking(False)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 300)
        except BlockingIOError:
            return got
        got.append((data, [known.get(_inode(fd), "other") for fd in fds]))
        for fd in fds:
            os.close(fd)


def _run(kind: int, make: Callable[[List[int]], List[Any]]) -> Tuple[Any, ...]:
    """send_many of make(fds) on a fresh non-blocking pair: the outcome and what the peer got."""
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.setblocking(False)  # a batch the socket cannot hold: a count, never a hang
    r1, w1 = os.pipe()
    try:
        messages = make([r1, w1])
        try:
            result: Tuple[Any, ...] = ("ok", afunix.send_many(a, messages))
        except Exception as exc:
            result = ("raised", type(exc), exc.args)
        return result, _queued(b, [r1, w1, 0])
    finally:
        for s in (a, b):
            s.close()
        os.close(r1)
        os.close(w1)


def _both(monkeypatch: pytest.MonkeyPatch, kind: int,
          make: Callable[[List[int]], List[Any]]) -> Tuple[Any, ...]:
    """make's batch as it comes, then checked per message: the same answer, and no leak."""
    before = open_fds()
    fast = _run(kind, make)
    with per_message_only(monkeypatch):
        careful = _run(kind, make)
    assert fast == careful
    assert open_fds() == before
    return fast


def _block(n: int, size: int) -> List[memoryview]:
    view = memoryview(bytearray(i % 251 for i in range(n * size)))
    return [view[i * size:(i + 1) * size] for i in range(n)]


# (name, batch maker, whether the whole-batch check takes it)
PLAIN: List[Tuple[str, Callable[[List[int]], List[Any]], bool]] = [
    ("bytes", lambda fds: [b"a" * 64, b"bb", b""], True),
    ("bytearrays", lambda fds: [bytearray(b"x" * 7), bytearray(3)], True),
    ("bytes and bytearrays", lambda fds: [b"a", bytearray(b"bc"), b"def"], True),
    ("views of one block", lambda fds: _block(40, 64), True),
    ("views of ints", lambda fds: [memoryview(array.array("i", [1, 2, 3])), memoryview(b"xy")], True),
    ("2-d view", lambda fds: [memoryview(bytearray(b"abcdef")).cast("B", [2, 3]), memoryview(b"z")], True),
    ("0-d view", lambda fds: [memoryview(array.array("i", [7])).cast("B").cast("i", []),
                              memoryview(b"q")], True),
    ("a strided view among views", lambda fds: [memoryview(b"abc"), noncontiguous_view()], False),
    ("a strided view alone", lambda fds: [noncontiguous_view()], False),
    ("a released view among views", lambda fds: [memoryview(b"abc"), released_view()], False),
    ("views and bytes", lambda fds: [memoryview(b"abc"), b"de"], False),
    ("a str", lambda fds: [b"abc", "text"], False),
    ("an int", lambda fds: [memoryview(b"a"), 5], False),
    ("None", lambda fds: [None, None], False),
    ("an array", lambda fds: [array.array("i", [1, 2]), array.array("i", [3])], False),
    ("over the socket's limit", lambda fds: [b"a", b"x" * (1 << 22)], True),
    ("more than a call takes", lambda fds: [b"%d" % i for i in range(1500)], True),
]


@pytest.mark.parametrize("kind", [SEQPACKET, DGRAM], ids=["seqpacket", "dgram"])
@pytest.mark.parametrize("name,make,taken", PLAIN, ids=[n for n, _, _ in PLAIN])
def test_plain_batches_answer_as_the_per_message_checks(
        monkeypatch: pytest.MonkeyPatch, kind: int, name: str,
        make: Callable[[List[int]], List[Any]], taken: bool) -> None:
    with batch_checked(monkeypatch) as names:
        _both(monkeypatch, kind, make)
    assert ("plain" in names) == taken


class Fd(enum.IntEnum):
    STDIN = 0


class HasFileno:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


M = afunix.Message

WITH_FDS: List[Tuple[str, Callable[[List[int]], List[Any]], bool]] = [
    ("one tuple shared", lambda fds: [M(b"a", (fds[0],))] * 5, True),
    ("tuples", lambda fds: [M(b"a", (fds[0],)), M(b"bc", (fds[1], fds[0])), M(b"", ())], True),
    ("lists", lambda fds: [M(b"a", [fds[0]]), M(b"bc", [fds[1]])], True),
    ("tuples and lists", lambda fds: [M(b"a", (fds[0],)), M(b"bc", [fds[1]])], True),
    ("views with descriptors", lambda fds: [M(v, (fds[0], fds[1])) for v in _block(32, 64)], True),
    ("16 each", lambda fds: [M(b"x" * 64, (fds[0],) * 16) for _ in range(32)], True),
    ("none at all", lambda fds: [M(b"a"), M(b"b", [])], True),
    ("253 descriptors", lambda fds: [M(b"a", (fds[0],) * 253)], True),
    ("254 descriptors", lambda fds: [M(b"a", (fds[0],) * 254)], False),
    ("a generator", lambda fds: [M(b"a", (fds[0],)), M(b"b", (f for f in fds))], False),
    ("a bool", lambda fds: [M(b"a", (fds[0],)), M(b"b", (True,))], False),
    ("a negative number", lambda fds: [M(b"a", (fds[0],)), M(b"b", (-1,))], False),
    ("over INT_MAX", lambda fds: [M(b"a", (fds[0],)), M(b"b", (1 << 31,))], False),
    ("over UINT_MAX", lambda fds: [M(b"a", (fds[0],)), M(b"b", (1 << 32,))], False),
    ("far below zero", lambda fds: [M(b"a", (-(1 << 40),))], False),
    ("INT_MAX", lambda fds: [M(b"a", (fds[0],)), M(b"b", ((1 << 31) - 1,))], True),
    ("an IntEnum", lambda fds: [M(b"a", (fds[0],)), M(b"b", (Fd.STDIN,))], False),
    ("a float", lambda fds: [M(b"a", (float(fds[0]),))], False),
    ("an object with fileno", lambda fds: [M(b"a", (HasFileno(fds[0]),))], False),
    ("a str", lambda fds: [M(b"a", ("3",))], False),
    ("a strided view", lambda fds: [M(b"a", (fds[0],)), M(noncontiguous_view(), (fds[1],))], False),
    # every data a view, one strided: refused as one message would be (PyPy's
    # join copies a strided view where CPython's refuses it)
    ("views, one strided", lambda fds: [M(memoryview(b"a"), (fds[0],)),
                                        M(noncontiguous_view(), (fds[1],))], False),
    ("a str as data", lambda fds: [M("text", (fds[0],))], False),
    ("an address", lambda fds: [M(b"a", (fds[0],)), M(b"b", (), "\0nowhere-afunix")], False),
    ("credentials", lambda fds: [M(b"a", (fds[0],), None, 0,
                                   afunix.Credentials(os.getpid(), os.getuid(), os.getgid()))], False),
    ("a Message among bytes", lambda fds: [b"plain", M(b"a", (fds[0],))], False),
]


@pytest.mark.parametrize("name,make,taken", WITH_FDS, ids=[n for n, _, _ in WITH_FDS])
def test_batches_with_descriptors_answer_as_the_per_message_checks(
        monkeypatch: pytest.MonkeyPatch, name: str,
        make: Callable[[List[int]], List[Any]], taken: bool) -> None:
    with batch_checked(monkeypatch) as names:
        _both(monkeypatch, SEQPACKET, make)
    assert ("fds" in names) == taken


def test_a_list_of_descriptors_is_read_once() -> None:
    """What the whole-batch check counted and checked is what goes: a list is copied first."""
    a, b = socket.socketpair(socket.AF_UNIX, SEQPACKET)
    r, w = os.pipe()
    try:
        fds = [r]
        out = batch.outgoing([M(b"a", fds), M(b"b", fds)])
        fds.append(w)  # too late: the checked copy is what is sent
        assert out.fd_counts == [1, 1]
        assert list(out.fd_flat or []) == [r, r]
        assert out.fds == [(r,), (r,)]
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


# ---- close_fds: a list of descriptor numbers checked in bulk ----------------


@contextlib.contextmanager
def per_item_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """descriptor_array declines every list: close_fds checks item by item."""
    from afunix import _checks
    with monkeypatch.context() as m:
        m.setattr(_checks, "descriptor_array", lambda values: None)
        yield


CLOSE: List[Tuple[str, Callable[[List[int]], Any]]] = [
    ("ints", lambda fds: list(fds)),
    ("one", lambda fds: [fds[0]]),
    ("a tuple", lambda fds: tuple(fds)),
    ("a generator", lambda fds: (f for f in fds)),
    ("a negative one", lambda fds: [fds[0], -1]),
    ("INT_MIN", lambda fds: [-(1 << 31), fds[0]]),
    ("below INT_MIN", lambda fds: [fds[0], -(1 << 31) - 1]),
    ("INT_MAX", lambda fds: [fds[0], (1 << 31) - 1]),
    ("over INT_MAX", lambda fds: [fds[0], 1 << 31]),
    ("over UINT_MAX", lambda fds: [fds[0], 1 << 32]),
    ("an IntEnum", lambda fds: [fds[0], BigFd.FD]),
    ("a float", lambda fds: [float(fds[0])]),
    ("a str", lambda fds: [fds[0], "3"]),
    ("strs", lambda fds: ["3", "4"]),
    ("None", lambda fds: [None]),
    ("closed already", lambda fds: [fds[0], fds[0]]),
]


class BigFd(enum.IntEnum):
    FD = 1000  # not open in the test process


def _close_case(make: Callable[[List[int]], Any]) -> Tuple[Any, ...]:
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(3)]
    try:
        try:
            result: Tuple[Any, ...] = ("ok", afunix.close_fds(make(fds)))
        except Exception as exc:
            result = ("raised", type(exc), exc.args)
        still_open = []
        for fd in fds:
            try:
                os.fstat(fd)
                still_open.append(fds.index(fd))
            except OSError:
                pass
        return result, still_open
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.mark.parametrize("name,make", CLOSE, ids=[n for n, _ in CLOSE])
def test_close_fds_answers_as_the_per_item_checks(
        monkeypatch: pytest.MonkeyPatch, name: str, make: Callable[[List[int]], Any]) -> None:
    fast = _close_case(make)
    with per_item_checks(monkeypatch):
        careful = _close_case(make)
    assert fast == careful


# ---- RecvBatch.all_fds: every descriptor at once when none was taken -----------


def _received(n: int, per: int) -> Tuple[afunix.RecvBatch, socket.socket, socket.socket, int]:
    a, b = socket.socketpair(socket.AF_UNIX, SEQPACKET)
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    afunix.send_many(a, [M(b"m%d" % i, (fd,) * (i % (per + 1))) for i in range(n)])
    rb = afunix.RecvBatch(n, 64, maxfds=per)
    assert rb.recv(b) == n
    return rb, a, b, fd


@pytest.mark.parametrize("first", ["nothing", "fds(1)", "fds(0) and fds(2)", "messages()",
                                   "all_fds()"])
def test_all_fds_gives_what_is_held_once(first: str) -> None:
    before = open_fds()
    rb, a, b, fd = _received(6, 3)
    try:
        counts = rb.fd_counts()
        taken: List[int] = []
        if first.startswith("fds"):
            for i in (1,) if first == "fds(1)" else (0, 2):
                got = rb.fds(i)
                assert len(got) == counts[i]
                taken += got
            expected = sum(c for i, c in enumerate(counts) if i not in
                           ((1,) if first == "fds(1)" else (0, 2)))
        elif first == "messages()":
            taken = [f for m in rb.messages() for f in m.fds]
            expected = 0
        elif first == "all_fds()":
            taken = rb.all_fds()
            expected = 0
        else:
            expected = sum(counts)
        rest = rb.all_fds()
        assert len(rest) == expected
        assert not set(rest) & set(taken)
        assert rb.all_fds() == []  # given once
        for got in rest + taken:
            assert os.path.samestat(os.fstat(got), os.fstat(fd))
        afunix.close_fds(rest + taken)
    finally:
        rb.close()
        for s in (a, b):
            s.close()
        os.close(fd)
    assert open_fds() == before
