"""The C core runs without the GIL: concurrent calls on one socket are safe or refused clearly."""
from __future__ import annotations

import socket
import threading
import zlib

import pytest

import afunix

T = 20.0  # seconds: the bound on every join
SENDERS = 4
PER_SENDER = 3000


def tagged(sender: int, i: int) -> bytes:
    body = b"%d:%d:" % (sender, i) + bytes([i % 251]) * (i % 200)
    return body + b"%08x" % zlib.crc32(body)


def whole(msg: bytes) -> bool:
    return b"%08x" % zlib.crc32(msg[:-8]) == msg[-8:]


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"])
def test_concurrent_send_many_on_one_socket_delivers_each_message_once(backend: str, kind: int) -> None:
    a, b = afunix.socketpair(kind)
    a.settimeout(T)
    b.settimeout(T)
    errors: list[BaseException] = []

    def sender(k: int) -> None:
        try:
            msgs = [tagged(k, i) for i in range(PER_SENDER)]
            pos = 0
            while pos < len(msgs):
                pos += afunix.send_many(a, msgs[pos:pos + 1 + (k * 37 + pos) % 300])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS)]
    for t in threads:
        t.start()
    got: list[bytes] = []
    batch = afunix.RecvBatch(256, 512)
    with a, b:
        while len(got) < SENDERS * PER_SENDER and not errors:
            if len(got) % 2:
                got.extend(m.data for m in afunix.recv_many(b, 256, 512))
            else:
                batch.recv(b)
                got.extend(bytes(v) for v in batch)
        for t in threads:
            t.join(T)
    assert not errors
    assert all(whole(m) for m in got), "a message was torn"
    assert sorted(got) == sorted(tagged(k, i) for k in range(SENDERS) for i in range(PER_SENDER))
    for k in range(SENDERS):  # one thread's messages keep their order
        mine = [m for m in got if m.startswith(b"%d:" % k)]
        assert mine == [tagged(k, i) for i in range(PER_SENDER)]


def test_concurrent_receivers_take_each_message_once(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    b.settimeout(0.2)
    n = 20000
    msgs = [tagged(0, i) for i in range(n)]
    taken: list[list[bytes]] = [[] for _ in range(3)]
    done = threading.Event()

    def receiver(k: int) -> None:
        batch = afunix.RecvBatch(64, 512)  # one batch per thread
        while not done.is_set():
            try:
                if k == 0:
                    taken[k].extend(m.data for m in afunix.recv_many(b, 64, 512))
                else:
                    batch.recv(b)
                    taken[k].extend(bytes(v) for v in batch)
            except socket.timeout:
                continue

    threads = [threading.Thread(target=receiver, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    with a, b:
        try:
            pos = 0
            while pos < n:
                pos += afunix.send_many(a, msgs[pos:pos + 500])
            while sum(map(len, taken)) < n and all(t.is_alive() for t in threads):
                threads[0].join(0.05)
        finally:
            done.set()
            for t in threads:
                t.join(T)
    everything = [m for part in taken for m in part]
    assert sorted(everything) == sorted(msgs)  # none lost, none twice


def test_one_recvbatch_filled_from_two_threads_is_refused(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    b.settimeout(T)
    batch = afunix.RecvBatch(8, 64)
    first: list[object] = []
    inside = threading.Event()
    real_receive = afunix.receive.receive_into

    def receive_and_mark(*args: object) -> int:
        inside.set()  # the first thread now holds the batch, blocked in recv
        return real_receive(*args)  # type: ignore[arg-type]

    afunix.receive.receive_into = receive_and_mark  # type: ignore[assignment]
    try:
        t = threading.Thread(target=lambda: first.append(batch.recv(b)))
        t.start()
        assert inside.wait(T)
        with pytest.raises(RuntimeError, match="another thread"):
            batch.recv(b)
        afunix.send_many(a, [b"hello"])
        t.join(T)
    finally:
        afunix.receive.receive_into = real_receive  # type: ignore[assignment]
        a.close()
        b.close()
    assert first == [1] and bytes(batch[0]) == b"hello"
