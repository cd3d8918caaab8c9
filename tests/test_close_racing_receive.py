"""close() from one thread while another receives on the channel.

The receive may be inside the backend's read, which writes the reader's
state and buffer with the GIL released, or copying a message out of the
peer's region: the close wakes it and waits for it to leave before it
closes the reader, and it ends with its result or EBADF, never with a
wrong error, a descriptor left open or one closed twice, whatever the
interleaving.  (On PyPy too: nothing closes while a call runs.)
"""

import errno
import gc
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest

import afunix
from conftest import open_fds

KiB = 1024
MiB = 1 << 20
T = 10.0
ROUNDS = 25  # (each fails in several rounds of 25 without the close leaving the reader to the receive)


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Threads switch every microsecond, so the close lands inside the receive's steps."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _take(call: str) -> Callable[[afunix.Channel], None]:
    def recv(ch: afunix.Channel) -> None:
        ch.recv()

    def recv_message(ch: afunix.Channel) -> None:
        afunix.close_fds(ch.recv_message().fds)

    def recv_many(ch: afunix.Channel) -> None:
        ch.recv_many()

    def recv_batch(ch: afunix.Channel) -> None:
        batch = ch.recv_batch()
        for j in range(len(batch)):
            afunix.close_fds(batch.fds(j))

    def recv_object(ch: afunix.Channel) -> None:
        ch.recv_object()

    return {"recv": recv, "recv_message": recv_message, "recv_many": recv_many,
            "recv_batch": recv_batch, "recv_object": recv_object}[call]


def _one_race(take: Callable[[afunix.Channel], None], lane: bool, objects: bool) -> List[str]:
    """A peer sends messages with a descriptor each, a thread receives them, this one closes; what went wrong."""
    options = dict(shm_size=MiB, shm_threshold=KiB, trust_peer=True) if lane else {}
    a, b = afunix.channel_pair(**options)  # type: ignore[arg-type]
    r, w = os.pipe()
    payload = b"x" * (2 * KiB if lane else 16)
    a.socket.settimeout(T)  # (ends a receive, should the close not wake it)
    b.socket.settimeout(T)
    wrong: List[str] = []
    stop = threading.Event()

    def feed() -> None:
        try:
            for _ in range(300):
                if stop.is_set():
                    return
                if objects:
                    b.send_object(payload)
                else:
                    b.send(payload, fds=[r])
        except OSError:
            pass  # the receiving end closed

    def receive() -> None:
        try:
            while True:
                take(a)
        except OSError as exc:
            if exc.errno != errno.EBADF or type(exc) is not OSError:
                wrong.append("receive: %r" % exc)
        except BaseException as exc:
            wrong.append("receive: %r" % exc)

    feeder = threading.Thread(target=feed)
    receiver = threading.Thread(target=receive)
    feeder.start()
    receiver.start()
    try:
        time.sleep(random.random() * 0.004)
        try:
            a.close()
        except BaseException as exc:
            wrong.append("close: %r" % exc)
    finally:
        stop.set()
        feeder.join(T)
        b.close()
        receiver.join(T)
        os.close(r)
        os.close(w)
    assert not receiver.is_alive() and not feeder.is_alive()
    if a.buffered_messages:
        wrong.append("the closed reader still holds %d messages" % a.buffered_messages)
    return wrong


@pytest.mark.parametrize("call", ["recv", "recv_message", "recv_many",
                                  "recv_batch"])
@pytest.mark.parametrize("lane", [False, True], ids=["inline", "lane"])
def test_close_racing_receives_of_messages_with_descriptors(call: str, lane: bool,
                                                            frequent_switches: None) -> None:
    take = _take(call)
    before = open_fds()
    outcomes: Dict[str, int] = {}
    leaks = 0
    for _ in range(ROUNDS):
        start = open_fds()
        for problem in _one_race(take, lane, objects=False):
            outcomes[problem] = outcomes.get(problem, 0) + 1
        gc.collect()
        left = open_fds() - start
        if left:
            leaks += 1
            afunix.close_fds(sorted(left))  # (the next rounds start clean)
    assert not outcomes, outcomes
    assert not leaks, "descriptors left open in %d of %d rounds" % (leaks, ROUNDS)
    gc.collect()
    assert open_fds() <= before


@pytest.mark.parametrize("lane", [False, True], ids=["inline", "lane"])
def test_close_racing_receives_of_objects(lane: bool, frequent_switches: None) -> None:
    take = _take("recv_object")
    before = open_fds()
    outcomes: Dict[str, int] = {}
    for _ in range(ROUNDS):
        for problem in _one_race(take, lane, objects=True):
            outcomes[problem] = outcomes.get(problem, 0) + 1
    assert not outcomes, outcomes
    gc.collect()
    assert open_fds() <= before


def test_close_racing_a_send_that_reads_returns(frequent_switches: None, clean: None) -> None:
    # a send waiting for slots reads the peer's RETURN frames (it borrows
    # the receiving side); the close leaves the reader to it
    wrong: List[str] = []
    for _ in range(20):
        a, b = afunix.channel_pair(shm_size=256 * KiB, shm_threshold=KiB)
        a.socket.settimeout(T)
        b.socket.settimeout(T)
        stop = threading.Event()

        def echo() -> None:
            # the peer takes the messages, so their slots come back
            try:
                while not stop.is_set():
                    b.recv()
            except (OSError, EOFError):
                pass

        def send() -> None:
            try:
                while True:
                    a.send(b"s" * (64 * KiB))
            except OSError as exc:
                # (ENOTSOCK: a write through the descriptor's number after
                # the close freed it and another descriptor took it, as a
                # plain socket's call can; not what this test is about)
                if exc.errno not in (errno.EBADF, errno.ENOTSOCK) or type(exc) is not OSError:
                    wrong.append("send: %r" % exc)
            except BaseException as exc:
                wrong.append("send: %r" % exc)

        peer = threading.Thread(target=echo)
        sender = threading.Thread(target=send)
        peer.start()
        sender.start()
        try:
            time.sleep(random.random() * 0.01)
            try:
                a.close()
            except BaseException as exc:
                wrong.append("close: %r" % exc)
        finally:
            stop.set()
            b.close()  # (wakes a send waiting for room the close left waiting)
            sender.join(T)
            peer.join(T)
        assert not sender.is_alive() and not peer.is_alive()
    assert not wrong, wrong


_COPYING = textwrap.dedent("""
    import errno, random, sys, threading, time
    import afunix
    bad = []
    for _ in range(int(sys.argv[1])):
        a, b = afunix.channel_pair(shm_size=32 << 20, shm_threshold=64 << 10)
        a.socket.settimeout(10)
        b.socket.settimeout(10)
        stop = threading.Event()
        def feed():
            try:
                while not stop.is_set():
                    b.send(b"L" * (4 << 20))
            except OSError:
                pass
        def receive():
            try:
                while True:
                    a.recv()
            except OSError as exc:
                if exc.errno != errno.EBADF or type(exc) is not OSError:
                    bad.append(repr(exc))
            except BaseException as exc:
                bad.append(repr(exc))
        threads = [threading.Thread(target=feed), threading.Thread(target=receive)]
        for t in threads:
            t.start()
        time.sleep(random.random() * 0.02)
        a.close()
        stop.set()
        threads[0].join(10)
        b.close()
        threads[1].join(10)
    print(bad)
    sys.exit(1 if bad else 0)
""")


def test_close_racing_copies_out_of_the_peers_region(backend: str) -> None:
    # a receive copying 4 MiB messages out of the peer's region while the
    # channel closes: run apart, a crash (SIGSEGV, SIGBUS) is an exit status
    env = dict(os.environ, AFUNIX_BACKEND=backend)
    done = subprocess.run([sys.executable, "-c", _COPYING, "20"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])


# ---- what a close left to a call, whatever happens next --------------------------------


class Injected(BaseException):
    """Raised where a signal handler could raise (a BaseException, as KeyboardInterrupt is)."""


def _region_descriptors() -> int:
    """Descriptors of this process naming a memfd (the lane's regions)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "memfd:" in os.readlink("/proc/self/fd/" + fd)
        except OSError:
            pass
    return n


def test_two_closes_at_once_drop_the_unsent_bytes_and_close_the_region() -> None:
    """One close() drains pending bytes into a full socket while a second one closes the
    channel: once both ended, nothing is pending and this end's region is closed (the
    second left the writer to the first, which found the channel closed when it ended)."""
    before = _region_descriptors()
    a, b = afunix.channel_pair(shm_size=1 << 20, write_buffer=1 << 16)
    a.send(b"first")
    a.flush()
    while True:  # the peer reads nothing: a's socket fills
        try:
            a.socket.send(b"\0" * 65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    a.send(b"x" * 100)
    assert a.pending > 0
    a.socket.settimeout(1.0)
    first: List[BaseException] = []

    def close_first() -> None:
        try:
            a.close()
        except OSError as exc:  # (its drain meets the closed socket)
            first.append(exc)

    t = threading.Thread(target=close_first)
    t.start()
    time.sleep(0.2)  # (the first is in its drain)
    a.close()
    t.join(10)
    assert not t.is_alive()
    assert a.closed and a.pending == 0
    b.close()
    gc.collect()
    assert _region_descriptors() == before


@pytest.mark.parametrize("call", ["recv", "recv_message"])
def test_a_receive_that_took_its_message_returns_it_and_the_close_closes_the_reader_after(
        call: str) -> None:
    """A close() in another thread lands while a receive takes its message (modelled with a
    trace function: the close starts there, and this thread goes on a while later): the close
    waits for the receive, which returns its message, then closes the reader: once close()
    returned, the next message's descriptor and the peer's region are closed, without a
    collection."""
    before = open_fds()
    a, b = afunix.channel_pair(shm_size=MiB, shm_threshold=KiB)
    r, w = os.pipe()
    b.send(b"one" * KiB, fds=[r])
    b.send(b"two" * KiB, fds=[r])  # (held by the reader once the first is taken)
    os.close(r)
    os.close(w)
    take = "take_message" if call == "recv_message" else "take_next"
    closer: List[threading.Thread] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == take and not closer:
            closer.append(threading.Thread(target=a.close))
            closer[0].start()
            time.sleep(0.1)  # (the close marks the channel closed, and waits for this call)
            assert closer[0].is_alive()
        return None

    sys.settrace(tracer)
    try:
        got = getattr(a, call)()
    finally:
        sys.settrace(None)
    closer[0].join(T)
    assert not closer[0].is_alive()
    if call == "recv_message":
        assert got.data == b"one" * KiB and len(got.fds) == 1
        afunix.close_fds(got.fds)
    else:
        assert got == b"one" * KiB  # (its descriptor was held by the reader: closed with it)
    with pytest.raises(OSError) as raised:
        a.recv()
    assert raised.value.errno == errno.EBADF
    b.close()
    assert open_fds() == before  # no collection
