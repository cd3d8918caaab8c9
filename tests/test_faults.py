"""Fault injection: each fault ends in a clear error with nothing lost and nothing leaked.

Not provoked here: ENFILE (the system-wide file table; filling it would
starve every process on the machine; csrc/fuzz/fuzz_core.c makes socketpair
fail with it part-way instead) and ENOBUFS (Linux AF_UNIX reports an
oversize datagram as EMSGSIZE; ENOBUFS comes from no path we can reach
without exhausting kernel memory).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import textwrap
import threading
import time

import pytest

import afunix
from afunix import Message
from conftest import run_python

T = 10.0  # seconds: the bound on every blocking step


def child(code: str, backend: str) -> dict:
    r = run_python(textwrap.dedent(code), backend)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- EMFILE ---------------------------------------------------------------------


def test_emfile_during_socketpairs_leaves_nothing_open(backend: str) -> None:
    out = child("""
        import errno, json, os, resource, afunix
        def fds(): return sorted(int(f) for f in os.listdir("/proc/self/fd"))
        before = fds()
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + 11, max(before) + 11))
        try:
            afunix.socketpairs(20)
        except OSError as exc:
            err = exc.errno
        else:
            err = None
        after = fds()
        # still usable once under the limit
        pairs = afunix.socketpairs(3)
        ok = len(pairs) == 3
        for a, b in pairs:
            a.close(); b.close()
        print(json.dumps({"errno": err, "leaked": sorted(set(after) - set(before)), "ok": ok}))
        """, backend)
    assert out == {"errno": errno.EMFILE, "leaked": [], "ok": True}


RECEIVER_AT_LIMIT = """
import json, os, resource, socket, afunix
fd = int(os.environ["AFUNIX_TEST_FD"])
sock = socket.socket(fileno=fd)
sock.settimeout(10)
def fds(): return {int(f) for f in os.listdir("/proc/self/fd")}
# Fill the free numbers below the highest open descriptor (the inherited
# socket may be a high number): the kernel installs received descriptors at
# the lowest free numbers, so holes would give it room past the limit below.
top = max(fds())
while True:
    hole = os.open(os.devnull, os.O_RDONLY)
    if hole > top:
        os.close(hole)
        break
before = fds()
# room for 3 more descriptors, then the kernel cannot install the rest
limit = max(before) + 4
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
datas, flags, kept = [], [], []
while len(datas) < 20:
    for m in afunix.recv_many(sock, 8, 64, maxfds=4):
        datas.append(m.data.decode())
        flags.append(m.flags & socket.MSG_CTRUNC)
        kept.append(len(m.fds))
        afunix.close_fds(m.fds)
print(json.dumps({"datas": datas, "ctrunc": [bool(f) for f in flags], "kept": kept,
                  "leaked": sorted(fds() - before)}))
"""


def test_emfile_on_receipt_keeps_the_data_and_leaks_nothing(backend: str) -> None:
    import subprocess
    import sys
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b, open(os.devnull) as f:
        msgs = [Message(b"m%d" % i, fds=(f.fileno(),) * 3) for i in range(20)]
        assert afunix.send_many(a, msgs) == 20
        proc = subprocess.run(
            [sys.executable, "-c", RECEIVER_AT_LIMIT],
            env=dict(os.environ, AFUNIX_BACKEND=backend, AFUNIX_TEST_FD=str(b.fileno())),
            pass_fds=[b.fileno()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["datas"] == ["m%d" % i for i in range(20)]  # the data always arrives
    assert out["leaked"] == []
    # each message either came whole or was flagged and handed over nothing
    assert all((k == 3 and not c) or (k == 0 and c) for k, c in zip(out["kept"], out["ctrunc"]))
    assert any(out["ctrunc"])  # the limit did bite


# ---- EMSGSIZE ---------------------------------------------------------------------


def test_oversize_datagram_first_is_emsgsize(backend: str, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        huge = b"x" * (a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) * 2)
        with pytest.raises(OSError) as info:
            afunix.send_many(a, [huge, b"after"])
        assert info.value.errno == errno.EMSGSIZE
        b.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            afunix.recv_many(b, 4, 16)  # nothing half-sent


def test_oversize_datagram_mid_batch_is_a_count_then_an_error(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        huge = b"x" * (a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) * 2)
        batch = [b"one", b"two", huge, b"four"]
        assert afunix.send_many(a, batch) == 2  # a count, the rest not lost silently
        with pytest.raises(OSError) as info:
            afunix.send_many(a, batch[2:])
        assert info.value.errno == errno.EMSGSIZE
        assert afunix.send_many(a, batch[3:]) == 1
        got = [m.data for m in afunix.recv_many(b, 8, 16)]
        assert got == [b"one", b"two", b"four"]


# ---- EPIPE / ECONNRESET, no SIGPIPE ------------------------------------------------


def test_peer_closed_is_broken_pipe_and_no_sigpipe(backend: str) -> None:
    # SIGPIPE at its default action kills the process unless every send
    # passes MSG_NOSIGNAL.
    out = child("""
        import json, signal, socket, afunix
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        result = {}
        for name in ("SOCK_STREAM", "SOCK_SEQPACKET", "SOCK_DGRAM"):
            a, b = afunix.socketpair(getattr(socket, name))
            b.close()
            try:
                afunix.send_many(a, [b"x"] * 10)
            except OSError as exc:
                result[name] = [type(exc).__name__, exc.errno]
            try:
                afunix.send_fds(a, [b"y"], [a.fileno()])
            except OSError as exc:
                result[name + " fds"] = [type(exc).__name__, exc.errno]
            a.close()
        print(json.dumps(result))
        """, backend)
    assert out["SOCK_STREAM"] == ["BrokenPipeError", errno.EPIPE]
    assert out["SOCK_STREAM fds"] == ["BrokenPipeError", errno.EPIPE]
    assert out["SOCK_SEQPACKET"] == ["BrokenPipeError", errno.EPIPE]
    assert out["SOCK_SEQPACKET fds"] == ["BrokenPipeError", errno.EPIPE]
    # a DGRAM pair whose peer is gone is no longer connected
    assert out["SOCK_DGRAM"][1] in (errno.ENOTCONN, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)


def test_peer_closes_mid_batch_what_arrived_is_a_prefix(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    a.settimeout(T)
    sent = [b"%06d" % i for i in range(20000)]
    got: list[bytes] = []

    def receiver() -> None:
        while len(got) < 3000:
            got.extend(m.data for m in afunix.recv_many(b, 256, 16))
        b.close()  # hang up mid-stream, with more queued and on its way

    t = threading.Thread(target=receiver)
    t.start()
    counts, error = [], None
    try:
        pos = 0
        while pos < len(sent):
            n = afunix.send_many(a, sent[pos:pos + 1000])
            counts.append(n)
            pos += n
    except OSError as exc:
        error = exc
    finally:
        t.join(T)
        a.close()
    assert error is not None and error.errno in (errno.EPIPE, errno.ECONNRESET)
    assert got == sent[:len(got)]  # in order, nothing lost before the hang-up
    assert sum(counts) >= len(got)


# ---- EINTR storms -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_STREAM], ids=["seqpacket", "stream"])
def test_eintr_storm_blocking_send_and_recv_exact(backend: str, kind: int) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    fired = [0]

    def on_alarm(signum: int, frame: object) -> None:
        fired[0] += 1

    previous = signal.signal(signal.SIGALRM, on_alarm)
    a, b = afunix.socketpair(kind)
    n = 20000
    msgs = [b"%08d" % i for i in range(n)]
    result: list[int] = []
    # blocking sends in a thread: the buffer fills, so it blocks often
    t = threading.Thread(target=lambda: result.extend(
        [sum(afunix.send_many(a, msgs[i:i + 500]) for i in range(0, n, 500))]))
    try:
        signal.setitimer(signal.ITIMER_REAL, 50e-6, 50e-6)
        t.start()
        chunks: list[bytes] = []
        total = 0
        while total < 8 * n:
            got = afunix.recv_many(b, 64, 8)  # blocking, interrupted all the time
            chunks.extend(m.data for m in got)
            total += sum(len(m.data) for m in got)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        t.join(T)
        a.close()
        b.close()
    assert result == [n]
    assert b"".join(chunks) == b"".join(msgs)
    if kind == socket.SOCK_SEQPACKET:
        assert chunks == msgs
    assert fired[0] > 0


# ---- EAGAIN part-way ------------------------------------------------------------------


def test_eagain_part_way_is_a_count_and_the_rest_follows(backend: str, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_DGRAM, blocking=False)
    with a, b:
        msgs = [b"%04d" % i + b"." * 1000 for i in range(1000)]
        first = afunix.send_many(a, msgs)
        assert 0 < first < len(msgs)  # the send buffer filled part-way
        with pytest.raises(BlockingIOError):
            afunix.send_many(a, msgs[first:])
        got = []
        pos = first
        while len(got) < len(msgs):
            try:
                got.extend(m.data for m in afunix.recv_many(b, 1024, 2048))
            except BlockingIOError:
                pass
            if pos < len(msgs):
                try:
                    pos += afunix.send_many(a, msgs[pos:])
                except BlockingIOError:
                    pass
        assert got == msgs


def test_eagain_with_descriptors_part_way_leaks_nothing(backend: str, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET, blocking=False)
    with a, b, open(os.devnull) as f:
        msgs = [Message(b"%05d" % i + b"." * 500, fds=(f.fileno(),)) for i in range(2000)]
        sent = afunix.send_many(a, msgs)
        assert 0 < sent < len(msgs)
        got = 0
        while got < sent:
            for m in afunix.recv_many(b, 256, 1024, maxfds=1):
                assert m.data == msgs[got].data and len(m.fds) == 1
                afunix.close_fds(m.fds)
                got += 1


# ---- a socket closed by another thread during a blocking call ------------------------


def test_close_from_another_thread_during_blocking_recv(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    b.settimeout(1.0)
    outcome: list[object] = []

    def blocked() -> None:
        try:
            outcome.append(afunix.recv_many(b, 8, 64))
        except OSError as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.1)
    b.close()
    t.join(T)
    a.close()
    assert not t.is_alive()
    # a clear error (EBADF, or the timeout since close does not wake a waiter) or a return
    assert len(outcome) == 1
    assert isinstance(outcome[0], (OSError, list))


def test_close_from_another_thread_during_blocking_send(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    a.settimeout(1.0)
    outcome: list[object] = []

    def blocked() -> None:
        try:
            outcome.append(afunix.send_many(a, [b"z" * 1000] * 5000))
        except OSError as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.1)
    a.close()
    t.join(T)
    b.close()
    assert not t.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], (OSError, int))

