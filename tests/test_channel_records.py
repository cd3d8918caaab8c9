"""A SOCK_SEQPACKET channel reads several records per system call (recvmmsg on the C backend).

Each record is still taken as a read of its own: the records ahead of a
bad one (empty, too long, descriptors with no byte) are handed out first,
then the error, as when every record is read by a call of its own (the
stdlib backend); descriptors ride on their own record, none is leaked, and
the end of stream after good records is a clean end.  Records are written
here with the plain socket module, as any peer could.
"""
from __future__ import annotations

import array
import os
import resource
import socket
import threading
from typing import List

import pytest

import afunix
from afunix import Channel, ProtocolError
from afunix.frames import RECORD_MAX, frame_header

SEQPACKET = socket.SOCK_SEQPACKET


def frame(payload: bytes, nfds: int = 0) -> bytes:
    return frame_header(len(payload), nfds) + payload


def send_with_fds(sock: socket.socket, data: bytes, fds: List[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def pair() -> "tuple[socket.socket, Channel]":
    a, b = afunix.socketpair(SEQPACKET)
    b.settimeout(10.0)  # a record lost would leave a receive waiting: fail instead
    return a, Channel(b)


def test_records_of_one_call_are_messages_in_order(fd_baseline: set) -> None:
    a, ch = pair()
    with ch:
        for i in range(40):
            a.send(frame(b"m%d" % i))
        got: List[bytes] = []
        while len(got) < 40:
            got += ch.recv_many()
        assert got == [b"m%d" % i for i in range(40)]
        a.close()
        with pytest.raises(EOFError):
            ch.recv()


def test_descriptors_ride_on_their_own_record_across_calls(fd_baseline: set) -> None:
    a, ch = pair()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with ch:
            # more records with descriptors than a call has slots for
            for i in range(20):
                if i % 3:
                    send_with_fds(a, frame(b"f%d" % i, 1), [null])
                else:
                    a.send(frame(b"p%d" % i))
            for i in range(20):
                m = ch.recv_message()
                assert m.data == (b"f%d" % i if i % 3 else b"p%d" % i)
                assert len(m.fds) == (1 if i % 3 else 0)
                for fd in m.fds:
                    assert os.path.samestat(os.fstat(fd), os.fstat(null))
                    os.close(fd)
    finally:
        a.close()
        os.close(null)


def test_an_empty_record_behind_good_ones_fails_after_them(fd_baseline: set) -> None:
    a, ch = pair()
    with ch:
        a.send(frame(b"one"))
        a.send(frame(b"two"))
        a.send(b"")
        a.send(frame(b"three"))
        assert ch.recv() == b"one"
        assert ch.recv() == b"two"
        with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
            ch.recv()
        assert ch.closed
    a.close()


def test_an_empty_record_behind_good_ones_is_no_end_when_the_peer_then_closes(
        fd_baseline: set) -> None:
    # the record after it was sent before the close: an empty record, not the end
    a, ch = pair()
    with ch:
        a.send(frame(b"one"))
        a.send(b"")
        a.send(frame(b"two"))
        a.close()
        assert ch.recv() == b"one"
        with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
            ch.recv()


def test_an_empty_first_record_with_more_behind_it_fails(fd_baseline: set) -> None:
    a, ch = pair()
    with ch:
        a.send(b"")
        a.send(frame(b"one"))
        a.close()
        with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
            ch.recv()


def test_a_long_record_behind_good_ones_fails_after_them(fd_baseline: set) -> None:
    a, ch = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with ch:
        a.send(frame(b"one"))
        a.send(frame(b"x" * RECORD_MAX))  # RECORD_MAX + 8 bytes: over the limit
        a.send(frame(b"two"))
        assert ch.recv() == b"one"
        with pytest.raises(ProtocolError, match="longer than"):
            ch.recv()
    a.close()


def test_descriptors_with_no_byte_behind_good_ones_fail_after_them(fd_baseline: set) -> None:
    a, ch = pair()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with ch:
            a.send(frame(b"one"))
            send_with_fds(a, b"", [null])
            send_with_fds(a, frame(b"two", 1), [null])
            assert ch.recv() == b"one"
            with pytest.raises(ProtocolError, match="without data"):
                ch.recv()
    finally:
        a.close()
        os.close(null)


def test_the_end_after_good_records_is_clean(fd_baseline: set) -> None:
    a, ch = pair()
    with ch:
        for i in range(5):
            a.send(frame(b"%d" % i))
        a.close()
        assert [ch.recv() for _ in range(5)] == [b"%d" % i for i in range(5)]
        with pytest.raises(EOFError):
            ch.recv()
        with pytest.raises(EOFError):
            ch.recv()


def test_records_per_read_come_back_after_a_large_message(fd_baseline: set, backend: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A message larger than the receive buffer grows it; once it is taken the
    # buffer shrinks back to the size it started with, which on SOCK_SEQPACKET
    # has room for a record per held-read slot: one C read still takes that
    # many records (the stdlib backend reads one per call).
    a, ch = pair()
    sender = Channel(a)
    with ch, sender:
        reader = ch._reader
        normal = len(reader.buffer)
        big = b"L" * (4 << 20)
        writer = threading.Thread(target=sender.send, args=(big,))
        writer.start()
        assert ch.recv() == big
        writer.join()
        for i in range(40):
            a.send(frame(b"s%02d" % i))
        per_call: List[int] = []
        chan_recv = reader.impl.chan_recv

        def counting(*args: object) -> int:
            n: int = chan_recv(*args)
            per_call.append(n // len(frame(b"s00")))
            return n

        monkeypatch.setattr(reader.impl, "chan_recv", counting)
        assert [ch.recv() for _ in range(40)] == [b"s%02d" % i for i in range(40)]
        assert max(per_call) == (reader.reads if backend == "c" else 1)
        assert len(reader.buffer) == normal


def test_descriptors_cut_on_a_later_record_fail_after_the_ones_before(fd_baseline: set) -> None:
    # No descriptor number is free while the records are read: the kernel
    # drops the descriptors of the second record and says so (MSG_CTRUNC).
    a, ch = pair()
    null = os.open(os.devnull, os.O_RDONLY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with ch:
            a.send(frame(b"one"))
            send_with_fds(a, frame(b"two", 1), [null])
            lowest_free = os.dup(0)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                assert ch.recv() == b"one"
                with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
                    ch.recv()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert ch.closed
    finally:
        a.close()
        os.close(null)
