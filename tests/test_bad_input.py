"""Hostile and wrong input to every public function: clear exceptions, never a crash."""
from __future__ import annotations

import socket

import afunix


def test_msg_trunc_flag_keeps_each_message_within_bufsize() -> None:
    # With MSG_TRUNC passed in, Linux reports each datagram's full length;
    # a length past bufsize used to run into the next message's bytes.
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        afunix.send_many(a, [b"a" * 10, b"b" * 10, b"c" * 3])
        got = afunix.recv_many(b, 3, 4, socket.MSG_TRUNC)
        assert [m.data for m in got] == [b"aaaa", b"bbbb", b"ccc"]
        assert [bool(m.flags & socket.MSG_TRUNC) for m in got] == [True, True, False]
        afunix.send_many(a, [b"a" * 10, b"b" * 10])
        batch = afunix.RecvBatch(2, 4)
        assert batch.recv(b, socket.MSG_TRUNC) == 2
        assert [bytes(view) for view in batch] == [b"aaaa", b"bbbb"]
        assert bytes(batch[0]) == b"aaaa"
