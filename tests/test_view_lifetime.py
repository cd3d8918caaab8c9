"""Views afunix hands out keep the memory they point into alive.

A memoryview from a RecvBatch or a FrameBatch may be kept after the batch
(and its channel) are gone: reading it gives the bytes received, writing it
changes nothing else.  Under the sanitizer job (.ci/sanitize) a view of freed
memory is a heap-use-after-free report.
"""
from __future__ import annotations

import gc
import socket
from typing import List

import pytest

import afunix

T = 20.0


def _reuse_freed_memory() -> List[bytearray]:
    # blocks of every size the arena's parts had, so a freed one is handed out again
    return [bytearray(b"\xee" * size) for size in (32, 64, 128, 256, 512, 1024) for _ in range(200)]


def test_recvbatch_views_outlive_the_batch(backend: str) -> None:
    msgs = [bytes([i]) * 100 for i in range(1, 5)]
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        b.settimeout(T)
        afunix.send_many(a, msgs)
        batch = afunix.RecvBatch(4, 128)
        assert batch.recv(b) == 4
        one = batch[0]
        each = list(batch)
        whole = batch.buffer
        del batch
        gc.collect()
        filler = _reuse_freed_memory()
        assert bytes(one) == msgs[0]
        assert [bytes(v) for v in each] == msgs
        assert bytes(whole[128:228]) == msgs[1]
        # a write through a kept view lands in the batch's memory, nowhere else
        whole[:] = b"\x11" * len(whole)
        assert bytes(one) == b"\x11" * 100
        assert all(f == b"\xee" * len(f) for f in filler)


def test_a_recvbatch_view_outlives_the_batch_in_another_scope(backend: str) -> None:
    def first_message() -> memoryview:
        a, b = afunix.socketpair(socket.SOCK_DGRAM)
        with a, b:
            a.send(b"kept")
            batch = afunix.RecvBatch(8, 4096)
            batch.recv(b)
            return batch[0]

    view = first_message()
    gc.collect()
    filler = _reuse_freed_memory()
    assert bytes(view) == b"kept"
    assert len(filler) == 1200


def test_a_new_recvbatch_shows_no_bytes_it_did_not_receive(backend: str) -> None:
    filler = _reuse_freed_memory()
    del filler
    batch = afunix.RecvBatch(64, 1024)
    assert not any(batch.buffer)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_framebatch_views_outlive_the_batch_and_the_channel(backend: str, kind: int) -> None:
    msgs = [b"m%d" % i * (i + 1) for i in range(10)]
    tx, rx = afunix.channel_pair(kind)
    with tx:
        tx.send_many(msgs)
    rx.socket.settimeout(T)
    batch = rx.recv_batch()
    assert len(batch) == 10
    one = batch[3]
    each = list(batch)
    buffer, offsets, lengths = batch.buffer, batch.offsets, batch.lengths
    rx.close()
    del rx, batch
    gc.collect()
    filler = _reuse_freed_memory()
    assert bytes(one) == msgs[3]
    assert [bytes(v) for v in each] == msgs
    assert [bytes(buffer[o:o + n]) for o, n in zip(offsets.tolist(), lengths.tolist())] == msgs
    assert len(filler) == 1200
