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

import os
import socket
from typing import List

import pytest

import afunix
from afunix import _backend
from afunix._io import Outgoing

T = 20.0  # seconds: the bound on every wait and join


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
