"""socketpair / socketpairs on both backends: types, flags, data, leaks, errors."""
from __future__ import annotations

import fcntl
import os
import socket
import textwrap

import pytest

import afunix
from conftest import open_fds, run_python

TYPES = [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET]


def _close(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for a, b in pairs:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", TYPES, ids=["stream", "dgram", "seqpacket"])
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_created_sockets_are_ordinary_unix_sockets(kind: int, blocking: bool, fd_baseline: set[int]) -> None:
    pairs = afunix.socketpairs(3, kind, blocking=blocking)
    try:
        assert len(pairs) == 3
        for pair in pairs:
            assert isinstance(pair, tuple) and len(pair) == 2
            for s in pair:
                assert type(s) is socket.socket
                assert s.family == socket.AF_UNIX
                assert s.type == kind
                assert s.proto == 0
                assert not s.get_inheritable()
                assert fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                nonblock_flag = bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
                assert nonblock_flag is (not blocking)
                assert s.getblocking() is blocking
                assert s.gettimeout() == (None if blocking else 0.0)
        descriptors = [s.fileno() for pair in pairs for s in pair]
        assert len(set(descriptors)) == 6
    finally:
        _close(pairs)


@pytest.mark.parametrize("type", TYPES, ids=["stream", "dgram", "seqpacket"])
def test_round_trip_each_type(type: int, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(type)
    with a, b:
        a.sendall(b"hello")
        assert b.recv(100) == b"hello"
        b.sendall(b"back")
        assert a.recv(100) == b"back"
        if type != socket.SOCK_STREAM:
            # message boundaries are kept on DGRAM and SEQPACKET
            a.send(b"one")
            a.send(b"two")
            assert b.recv(100) == b"one"
            assert b.recv(100) == b"two"


def test_nonblocking_recv_raises_blockingioerror() -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM, blocking=False)
    with a, b:
        with pytest.raises(BlockingIOError):
            b.recv(10)


def test_default_type_is_stream() -> None:
    a, b = afunix.socketpair()
    with a, b:
        assert a.type == socket.SOCK_STREAM
    pairs = afunix.socketpairs(1)
    try:
        assert pairs[0][0].type == pairs[0][1].type == socket.SOCK_STREAM
    finally:
        _close(pairs)


def test_zero_pairs() -> None:
    assert afunix.socketpairs(0) == []


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        ((-1,), {}, ValueError),
        ((afunix.pairs.MAX_PAIRS + 1,), {}, ValueError),
        (("2",), {}, TypeError),
        ((2.0,), {}, TypeError),
        ((None,), {}, TypeError),
        ((1, socket.SOCK_RAW), {}, ValueError),
        ((1, 12345), {}, ValueError),
        ((1, "stream"), {}, TypeError),
        ((1, socket.SOCK_STREAM | socket.SOCK_NONBLOCK), {}, ValueError),
    ],
)
def test_bad_arguments_fail_before_any_descriptor_is_made(
    args: tuple, kwargs: dict, error: type, fd_baseline: set[int]
) -> None:
    with pytest.raises(error):
        afunix.socketpairs(*args, **kwargs)


def test_socketpair_bad_type() -> None:
    with pytest.raises(ValueError):
        afunix.socketpair(socket.SOCK_RAW)
    with pytest.raises(TypeError):
        afunix.socketpair(1.5)  # type: ignore[arg-type]


def test_no_descriptor_leak_over_10000_pairs() -> None:
    before = open_fds()
    for _ in range(100):
        _close(afunix.socketpairs(100, socket.SOCK_DGRAM))
    for _ in range(50):
        a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
        a.close()
        b.close()
    assert open_fds() == before


EMFILE_CHILD = textwrap.dedent(
    """
    import errno, os, resource, socket, afunix
    def count():
        return len(os.listdir("/proc/self/fd"))
    assert afunix.BACKEND == {backend!r}, afunix.BACKEND
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    before = count()
    try:
        afunix.socketpairs(100, socket.SOCK_{kind})
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
        print("EMFILE", exc.strerror)
    else:
        raise SystemExit("no error")
    after = count()
    assert after == before, (before, after)
    # and the process is still usable: the limit frees up again
    pairs = afunix.socketpairs(5)
    for a, b in pairs:
        a.close(); b.close()
    assert count() == before
    print("OK", before, after)
    """
)


@pytest.mark.parametrize("kind", ["STREAM", "DGRAM", "SEQPACKET"])
def test_emfile_closes_everything_made(backend: str, kind: str) -> None:
    proc = run_python(EMFILE_CHILD.format(backend=backend, kind=kind), backend)
    assert proc.returncode == 0, proc.stderr
    assert "EMFILE" in proc.stdout and "OK" in proc.stdout


def test_errno_of_emfile_is_exposed(backend: str) -> None:
    # same check, but from the error object's class: OSError, not a subclass
    code = textwrap.dedent(
        """
        import resource, afunix, errno
        resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20))
        try:
            afunix.socketpairs(50)
        except OSError as exc:
            print(type(exc).__name__, exc.errno == errno.EMFILE)
        """
    )
    proc = run_python(code, backend)
    assert proc.stdout.split() == ["OSError", "True"], proc.stderr


def test_sockets_work_with_stdlib_methods() -> None:
    a, b = afunix.socketpair(socket.SOCK_STREAM)
    with a, b:
        a.settimeout(0.05)
        with pytest.raises(socket.timeout):
            a.recv(1)
        b.shutdown(socket.SHUT_WR)
        assert a.recv(1) == b""
        f = a.makefile("rb")
        f.close()
        assert a.getsockname() == "" or a.getsockname() == b""



def test_default_timeout_applies_as_in_the_stdlib() -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(2.5)
    try:
        ref_a, ref_b = socket.socketpair()
        a, b = afunix.socketpair()
        na, nb = afunix.socketpair(blocking=False)
    finally:
        socket.setdefaulttimeout(old)
    with ref_a, ref_b, a, b, na, nb:
        assert a.gettimeout() == b.gettimeout() == ref_a.gettimeout() == 2.5
        assert na.gettimeout() == nb.gettimeout() == 0.0
