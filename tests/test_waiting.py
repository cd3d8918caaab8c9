"""The one sync "try, then wait for readiness against the deadline" loop (_io.call_when_ready)."""
from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest

from afunix import _io

_DONTWAIT = int(socket.MSG_DONTWAIT)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def _recv(sock: socket.socket, flags: int) -> bytes:
    return sock.recv(16, flags)


def test_a_socket_with_a_timeout_waits_for_data_then_times_out(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.settimeout(0.2)
    flags, deadline, may_wait = _io.wait_setup(_io.target(b), 0)
    assert flags & _DONTWAIT and may_wait and deadline is not None
    twin = _io.nonblocking_twin(b)  # as the backends call: never the socket's own timeout
    try:
        a.send(b"one")
        assert _io.call_when_ready(b.fileno(), False, deadline, may_wait, _recv, twin, flags) == b"one"
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            _io.call_when_ready(b.fileno(), False, deadline, may_wait, _recv, twin, flags)
        assert time.monotonic() - start < 5.0
        # waited until the deadline: poll() counts in milliseconds, and
        # PyPy's rounds the last one down (seen ending 0.3 ms early)
        assert time.monotonic() >= deadline - 0.002
    finally:
        twin.detach()


def test_a_nonblocking_socket_or_dontwait_raises_blockingioerror_at_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    for setup, call_flags in ((lambda: b.setblocking(False), 0), (lambda: b.setblocking(True), _DONTWAIT)):
        setup()
        flags, deadline, may_wait = _io.wait_setup(_io.target(b), call_flags)
        assert not may_wait
        with pytest.raises(BlockingIOError):
            _io.call_when_ready(b.fileno(), False, deadline, may_wait, _recv, b, flags | _DONTWAIT)


def test_interrupted_calls_are_tried_again_and_other_errors_pass_through() -> None:
    attempts = iter([InterruptedError(), InterruptedError(), 7])

    def attempt() -> int:
        got = next(attempts)
        if isinstance(got, BaseException):
            raise got
        return got

    assert _io.call_when_ready(-1, False, None, True, attempt) == 7

    def refused() -> int:
        raise ConnectionRefusedError()

    with pytest.raises(ConnectionRefusedError):
        _io.call_when_ready(-1, False, None, True, refused)
