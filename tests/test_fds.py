"""Descriptor passing and peer identity on both backends, against stdlib peers."""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

import afunix
from afunix import Message
from conftest import open_fds, run_python

MSG_CTRUNC = socket.MSG_CTRUNC


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


@pytest.fixture
def regular_file() -> "tuple[int, bytes]":
    fd, path = tempfile.mkstemp(prefix="afx")
    os.unlink(path)
    content = b"file content %d" % os.getpid()
    os.write(fd, content)
    yield fd, content
    os.close(fd)


def _kinds() -> list[str]:
    kinds = ["file", "pipe", "socket", "directory"]
    if hasattr(os, "memfd_create"):
        kinds.append("memfd")
    if hasattr(os, "eventfd"):
        kinds.append("eventfd")
    return kinds


def _make(kind: str) -> list[int]:
    if kind == "file":
        fd, path = tempfile.mkstemp(prefix="afx")
        os.unlink(path)
        return [fd]
    if kind == "pipe":
        return list(os.pipe())
    if kind == "socket":
        a, b = socket.socketpair()
        return [a.detach(), b.detach()]
    if kind == "directory":
        return [os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)]
    if kind == "memfd":
        return [os.memfd_create("afx")]
    return [os.eventfd(0)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", _kinds())
def test_every_kind_of_descriptor(kind: str, fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    mine = _make(kind)
    try:
        with a, b:
            assert afunix.send_fds(a, [b"x"], mine) == 1
            data, fds, flags, address = afunix.recv_fds(b, 10, 4)
            assert data == b"x" and address is None and not flags & MSG_CTRUNC
            assert len(fds) == len(mine)
            for sent, got in zip(mine, fds):
                assert same_file(sent, got)
                assert cloexec(got)
            afunix.close_fds(fds)
    finally:
        afunix.close_fds(mine)


STDLIB_SENDER = textwrap.dedent(
    """
    import os, socket, sys, tempfile
    s = socket.socket(fileno=int(sys.argv[1]))
    fd, path = tempfile.mkstemp(prefix="afx"); os.unlink(path)
    os.write(fd, b"from the child"); os.lseek(fd, 0, 0)
    st = os.fstat(fd)
    socket.send_fds(s, [b"%d %d" % (st.st_dev, st.st_ino)], [fd])
    """
)


def test_stdlib_send_fds_to_afunix_recv_fds(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        child = subprocess.Popen([sys.executable, "-c", STDLIB_SENDER, str(b.fileno())],
                                 pass_fds=[b.fileno()])
        a.settimeout(30)
        data, fds, flags, _ = afunix.recv_fds(a, 100, 4)
        assert child.wait(30) == 0
        dev, ino = map(int, data.split())
        st = os.fstat(fds[0])
        assert (st.st_dev, st.st_ino) == (dev, ino)
        assert os.pread(fds[0], 100, 0) == b"from the child"
        assert cloexec(fds[0])
        afunix.close_fds(fds)


def test_stdlib_sender_to_recv_many(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        child = subprocess.Popen([sys.executable, "-c", STDLIB_SENDER, str(b.fileno())],
                                 pass_fds=[b.fileno()])
        a.settimeout(30)
        [msg] = afunix.recv_many(a, 4, 100, maxfds=2)
        assert child.wait(30) == 0
        assert os.pread(msg.fds[0], 100, 0) == b"from the child"
        afunix.close_fds(msg.fds)


STDLIB_RECEIVER = textwrap.dedent(
    """
    import os, socket, sys
    from multiprocessing import reduction
    s = socket.socket(fileno=int(sys.argv[1]))
    s.settimeout(30)
    data, fds, flags, addr = socket.recv_fds(s, 100, 4)
    print(data.decode(), os.pread(fds[0], 100, 0).decode(), sep="|")
    [fd] = reduction.recvfds(s, 1)
    st = os.fstat(fd)
    print(st.st_dev, st.st_ino, sep="|")
    """
)


@pytest.mark.parametrize("how", ["send_fds", "send_many"])
def test_afunix_to_stdlib_recv_fds_and_multiprocessing(how: str, regular_file: "tuple[int, bytes]") -> None:
    fd, content = regular_file
    # SEQPACKET keeps the two messages apart (on a stream the kernel may hand
    # both byte ranges to the first recvmsg)
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        child = subprocess.Popen([sys.executable, "-c", STDLIB_RECEIVER, str(b.fileno())],
                                 pass_fds=[b.fileno()], stdout=subprocess.PIPE, text=True)
        if how == "send_fds":
            afunix.send_fds(a, [b"hello"], [fd])
        else:
            afunix.send_many(a, [Message(b"hello", fds=(fd,))])
        # multiprocessing.reduction.sendfds sends one byte, the descriptor
        # count, with the descriptors; recvfds checks that shape
        afunix.send_many(a, [Message(bytes([1]), fds=(fd,))])
        out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    first, second = out.splitlines()
    assert first == "hello|" + content.decode()
    st = os.fstat(fd)
    assert second == "%d|%d" % (st.st_dev, st.st_ino)


def test_truncation_maxfds_too_small(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with a, b:
            before = open_fds()
            afunix.send_fds(a, [b"data"], [r, w, r, w, r])
            with pytest.raises(afunix.TruncatedError) as info:
                afunix.recv_fds(b, 100, 2)
            assert info.value.data == b"data"
            assert info.value.flags & MSG_CTRUNC
            assert info.value.address is None
            assert open_fds() == before
            # in a batch: that message is flagged, the others intact
            afunix.send_many(a, [Message(b"one", fds=(r,)), Message(b"two", fds=(r, w, r)),
                                 Message(b"three", fds=(w,))])
            msgs = afunix.recv_many(b, 10, 100, maxfds=2)
            assert [m.data for m in msgs] == [b"one", b"two", b"three"]
            assert [bool(m.flags & MSG_CTRUNC) for m in msgs] == [False, True, False]
            assert [len(m.fds) for m in msgs] == [1, 0, 1]
            assert same_file(msgs[0].fds[0], r) and same_file(msgs[2].fds[0], w)
            for m in msgs:
                afunix.close_fds(m.fds)
            assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_odd_maxfds_does_not_admit_an_extra_descriptor() -> None:
    # CMSG_SPACE pads to 8 bytes: room for 1 descriptor holds 2.  afunix
    # treats anything over maxfds as a cut, on both backends.
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with a, b:
            afunix.send_fds(a, [b"x"], [r, w])
            with pytest.raises(afunix.TruncatedError):
                afunix.recv_fds(b, 10, 1)
    finally:
        os.close(r)
        os.close(w)


RLIMIT_RECEIVER = textwrap.dedent(
    """
    import os, resource, socket, sys, afunix
    s = socket.socket(fileno=int(sys.argv[1]))
    s.settimeout(30)
    count = lambda: len(os.listdir("/proc/self/fd"))
    before = count()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # leave room for listdir and nothing more
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(before + 2, 8), hard))
    s.send(b"ready")
    try:
        afunix.recv_fds(s, 100, 16)
    except afunix.TruncatedError as exc:
        print("truncated", exc.data.decode(), bool(exc.flags & socket.MSG_CTRUNC))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print("fds", before, count())
    """
)


def test_truncation_at_rlimit_nofile(backend: str) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(10)]
    try:
        with a, b:
            child = subprocess.Popen([sys.executable, "-c", RLIMIT_RECEIVER, str(b.fileno())],
                                     pass_fds=[b.fileno()], stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, AFUNIX_BACKEND=backend))
            a.settimeout(30)
            assert a.recv(10) == b"ready"
            afunix.send_fds(a, [b"payload"], fds)
            out, _ = child.communicate(timeout=30)
    finally:
        afunix.close_fds(fds)
    lines = out.splitlines()
    assert lines[0] == "truncated payload True", out
    _, before, after = lines[1].split()
    assert before == after


def test_received_descriptor_is_not_inherited(regular_file: "tuple[int, bytes]") -> None:
    fd, _ = regular_file
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        afunix.send_fds(a, [b"x"], [fd])
        _, [got], _, _ = afunix.recv_fds(b, 10, 1)
        try:
            assert cloexec(got)
            code = "import os,sys\ntry:\n os.fstat(%d)\n print('open')\nexcept OSError:\n print('closed')" % got
            out = subprocess.run([sys.executable, "-c", code], close_fds=False,
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            assert out == "closed"
        finally:
            os.close(got)


def test_descriptor_limits() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with a, b:
            with pytest.raises(ValueError, match="253"):
                afunix.send_fds(a, [b"x"], [fd] * 254)
            with pytest.raises(ValueError):
                afunix.send_many(a, [Message(b"x", fds=(fd,) * 254)])
            assert afunix.send_fds(a, [b"x"], [fd] * 253) == 1
            _, got, _, _ = afunix.recv_fds(b, 10, 253)
            assert len(got) == 253 and all(same_file(g, fd) for g in got)
            afunix.close_fds(got)
            with pytest.raises(TypeError):
                afunix.send_fds(a, [b"x"], ["1"])
            with pytest.raises(ValueError):
                afunix.send_fds(a, [b"x"], [-3])
            with pytest.raises(TypeError):
                afunix.send_fds(a, ["text"], [fd])
            # objects with fileno() are accepted
            with open("/dev/null") as f:
                afunix.send_fds(a, [b"y"], [f])
            _, got, _, _ = afunix.recv_fds(b, 10, 1)
            afunix.close_fds(got)
    finally:
        os.close(fd)


def test_stream_descriptors_need_a_data_byte() -> None:
    a, b = afunix.socketpair(socket.SOCK_STREAM)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with a, b:
            with pytest.raises(ValueError, match="data byte"):
                afunix.send_fds(a, [b""], [fd])
            with pytest.raises(ValueError, match="data byte"):
                afunix.send_many(a, [b"ok", Message(b"", fds=(fd,))])
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(10)  # nothing at all was sent
    finally:
        os.close(fd)


def test_batch_of_64_messages_with_16_descriptors_each(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(8)]
    flat = [fd for p in pipes for fd in p]
    try:
        with a, b:
            msgs = [Message(b"m%d" % i, fds=tuple(flat[i % 16:] + flat[:i % 16])) for i in range(64)]
            assert afunix.send_many(a, msgs) == 64
            batch = afunix.RecvBatch(64, 16, maxfds=16)
            got = 0
            while got < 64:
                n = batch.recv(b)
                for i in range(n):
                    k = got + i
                    assert bytes(batch[i]) == b"m%d" % k
                    fds = batch.fds(i)
                    assert len(fds) == 16
                    assert all(same_file(x, y) for x, y in zip(fds, msgs[k].fds))
                    afunix.close_fds(fds)
                got += n
    finally:
        afunix.close_fds(flat)


def test_untaken_descriptors_are_closed_by_the_next_recv(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with a, b:
            before = open_fds()
            batch = afunix.RecvBatch(4, 16, maxfds=2)
            afunix.send_many(a, [Message(b"a", fds=(fd, fd))])
            batch.recv(b)
            assert len(open_fds() - before) == 2
            afunix.send_many(a, [b"b"])
            batch.recv(b)
            assert open_fds() == before
            afunix.send_many(a, [Message(b"c", fds=(fd,))])
            batch.recv(b)
            batch.close()
            assert open_fds() == before
    finally:
        os.close(fd)


def test_flags_and_address_are_honoured(fd_baseline: set[int]) -> None:
    directory = tempfile.mkdtemp(prefix="afx", dir="/tmp")
    path = os.path.join(directory, "r")
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        r.bind(path)
        r.settimeout(5)
        assert afunix.send_fds(s, [b"to", b"path"], [fd], 0, path) == 6
        data, fds, flags, address = afunix.recv_fds(r, 100, 1, socket.MSG_PEEK)
        afunix.close_fds(fds)
        # an unbound sender: the address reads as the stdlib reads it
        assert data == b"topath" and address == r.recvmsg(100, 0, socket.MSG_PEEK)[3]
        data2, fds2, _, _ = afunix.recv_fds(r, 100, 1)  # PEEK left it queued
        assert data2 == b"topath" and len(fds2) == 1 and same_file(fds2[0], fd)
        afunix.close_fds(fds2)
        with pytest.raises(BlockingIOError):
            afunix.recv_fds(r, 100, 1, socket.MSG_DONTWAIT)
    finally:
        os.close(fd)
        r.close()
        s.close()
        os.unlink(path)
        os.rmdir(directory)


PEER_CHILD = textwrap.dedent(
    """
    import os, socket, sys, time
    s = socket.socket(fileno=int(sys.argv[1]))
    s.send(b"%d %d %d" % (os.getpid(), os.getuid(), os.getgid()))
    s.settimeout(30)
    s.recv(1)
    """
)


def test_peer_credentials_and_pidfd_of_a_child() -> None:
    a, b = afunix.socketpair(socket.SOCK_STREAM)
    with a:
        child = subprocess.Popen([sys.executable, "-c", PEER_CHILD, str(b.fileno())],
                                 pass_fds=[b.fileno()])
        b.close()
        a.settimeout(30)
        pid, uid, gid = map(int, a.recv(100).split())
        assert child.pid == pid
        # SO_PEERCRED of a socketpair names its creator: this process
        assert afunix.peer_credentials(a) == afunix.Credentials(os.getpid(), os.getuid(), os.getgid())
        if afunix.supports("peerpidfd"):
            pidfd = afunix.peer_pidfd(a)
            try:
                assert cloexec(pidfd)
                with open("/proc/self/fdinfo/%d" % pidfd) as f:
                    info = dict(line.split(":", 1) for line in f if ":" in line)
                assert int(info["Pid"]) == os.getpid()
            finally:
                os.close(pidfd)
        a.send(b"x")
        assert child.wait(30) == 0


def test_peer_credentials_through_connect() -> None:
    directory = tempfile.mkdtemp(prefix="afx", dir="/tmp")
    path = os.path.join(directory, "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen()
        server.settimeout(30)
        code = ("import socket,time\nc=socket.socket(socket.AF_UNIX)\nc.connect(%r)\n"
                "c.settimeout(30)\nc.recv(1)" % path)
        child = subprocess.Popen([sys.executable, "-c", code])
        conn, _ = server.accept()
        with conn:
            creds = afunix.peer_credentials(conn)
            assert creds == afunix.Credentials(child.pid, os.getuid(), os.getgid())
            if afunix.supports("peerpidfd"):
                pidfd = afunix.peer_pidfd(conn)
                with open("/proc/self/fdinfo/%d" % pidfd) as f:
                    assert "Pid:\t%d\n" % child.pid in f.read()
                os.close(pidfd)
            conn.send(b"x")
        assert child.wait(30) == 0
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(directory)


@pytest.mark.skipif(not afunix.supports("passcred"), reason="no SO_PASSCRED on this platform")
def test_scm_credentials_received_and_sent() -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    with a, b:
        afunix.pass_credentials(b)
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            own = afunix.Credentials(os.getpid(), os.getuid(), os.getgid())
            afunix.send_many(a, [b"plain", Message(b"explicit", credentials=own),
                                 Message(b"with fd", fds=(fd,))])
            msgs = afunix.recv_many(b, 10, 100, maxfds=1)
            assert [m.credentials for m in msgs] == [own, own, own]
            # credentials arrive first, and do not cut the descriptors
            assert len(msgs[2].fds) == 1 and not msgs[2].flags & MSG_CTRUNC
            afunix.close_fds(msgs[2].fds)
            # a forged pid is refused by the kernel (not root: EPERM)
            if os.getuid() != 0:
                with pytest.raises(PermissionError):
                    afunix.send_many(a, [Message(b"forged", credentials=afunix.Credentials(1, 0, 0))])
        finally:
            os.close(fd)
        afunix.pass_credentials(b, False)
        afunix.send_many(a, [b"off"])
        assert afunix.recv_many(b, 1, 10)[0].credentials is None


def test_no_descriptor_leak_over_many_round_trips(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with a, b:
            before = open_fds()
            for i in range(2000):
                afunix.send_fds(a, [b"x"], [fd, fd])
                if i % 3 == 0:
                    _, got, _, _ = afunix.recv_fds(b, 10, 2)
                    afunix.close_fds(got)
                elif i % 3 == 1:
                    for m in afunix.recv_many(b, 4, 10, maxfds=2):
                        afunix.close_fds(m.fds)
                else:
                    with pytest.raises(afunix.TruncatedError):
                        afunix.recv_fds(b, 10, 1)
            assert open_fds() == before
    finally:
        os.close(fd)


def test_child_process_backend(backend: str) -> None:
    proc = run_python("import afunix; print(afunix.BACKEND)", backend)
    assert proc.stdout.strip() == backend


def test_bulk_descriptor_access(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with a, b:
            afunix.send_many(a, [Message(b"0", fds=(r,)), b"1", Message(b"2", fds=(w, r))])
            batch = afunix.RecvBatch(8, 8, maxfds=2)
            assert batch.recv(b) == 3
            assert batch.fd_counts() == [1, 0, 2]
            first = batch.fds(0)
            rest = batch.all_fds()  # what fds(0) did not take, in message order
            assert len(first) == 1 and same_file(first[0], r)
            assert len(rest) == 2 and same_file(rest[0], w) and same_file(rest[1], r)
            assert batch.all_fds() == [] and batch.fds(2) == []  # handed over once
            afunix.close_fds(first + rest)
    finally:
        os.close(r)
        os.close(w)


def test_batch_over_1024_with_descriptors_only_in_some_chunks(fd_baseline: set[int]) -> None:
    import threading

    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with a, b:
            msgs = [Message(b"%d" % i, fds=(fd,) if i in (0, 1500) else ()) for i in range(2100)]
            result: list[int] = []
            sender = threading.Thread(target=lambda: result.append(afunix.send_many(a, msgs)))
            sender.start()
            got: list[Message] = []
            while len(got) < len(msgs):
                got.extend(afunix.recv_many(b, 1024, 16, maxfds=1))
            sender.join()
            assert result == [2100]
            assert [m.data for m in got] == [m.data for m in msgs]
            assert [i for i, m in enumerate(got) if m.fds] == [0, 1500]
            for m in got:
                afunix.close_fds(m.fds)
    finally:
        os.close(fd)


def test_close_fds_ignores_closed_descriptors() -> None:
    r, w = os.pipe()
    os.close(w)
    afunix.close_fds([r, w])  # w is already closed: no error
    with pytest.raises(OSError):
        os.fstat(r)


def test_message_fds_may_be_any_iterable(fd_baseline: set[int]) -> None:
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with a, b:
            sent = afunix.send_many(a, [Message(b"gen", fds=(x for x in (r, w))),  # type: ignore[arg-type]
                                        Message(b"set", fds=frozenset([r]))])  # type: ignore[arg-type]
            assert sent == 2
            got = afunix.recv_many(b, 4, 16, maxfds=2)
            assert [len(m.fds) for m in got] == [2, 1]
            for m in got:
                afunix.close_fds(m.fds)
    finally:
        os.close(r)
        os.close(w)
