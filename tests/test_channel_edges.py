"""The channel at its edges: a peer's empty records, concurrent callers, fork()."""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time
import warnings
from types import FrameType
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

import afunix
from afunix import Channel, ProtocolError

HEADER = struct.Struct("<IBBBB")


def frame(payload: bytes, nfds: int = 0) -> bytes:
    """A frame as docs/PROTOCOL.md lays it out."""
    return HEADER.pack(len(payload), nfds, 0, 1, 0xAF) + payload


@pytest.fixture
def seqpacket_peer() -> Iterator[Tuple[socket.socket, Channel]]:
    """A raw SOCK_SEQPACKET socket that writes records by hand, and a Channel on its peer."""
    raw, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = Channel(sock)
    yield raw, ch
    raw.close()
    ch.close()


# ---- empty SOCK_SEQPACKET records (docs/PROTOCOL.md forbids them) -------------

# Every receive call, as "receive one message or raise" (iteration included:
# it used to stop at an empty record as at the end, and lose what followed).
RECEIVERS: List[Tuple[str, Callable[[Channel], object]]] = [
    ("recv", lambda ch: ch.recv()),
    ("recv_message", lambda ch: ch.recv_message()),
    ("recv_many", lambda ch: ch.recv_many() or EOFError()),
    ("recv_batch", lambda ch: len(ch.recv_batch()) or EOFError()),
    ("iteration", lambda ch: next(iter(ch), EOFError())),
]


def receive(ch: Channel, how: Callable[[Channel], object]) -> object:
    result = how(ch)
    if isinstance(result, EOFError):
        raise result
    return result


@pytest.mark.parametrize("how", [r[1] for r in RECEIVERS], ids=[r[0] for r in RECEIVERS])
def test_empty_record_from_a_live_peer_between_frames_is_a_protocol_error(
        seqpacket_peer: Tuple[socket.socket, Channel], how: Callable[[Channel], object],
        fd_baseline: set[int]) -> None:
    raw, ch = seqpacket_peer
    raw.send(frame(b"one"))
    raw.send(b"")
    raw.send(frame(b"two"))
    assert receive(ch, how)
    with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
        receive(ch, how)
    assert ch.closed  # nothing after the empty record is delivered as if it were fine


def test_empty_record_inside_a_frame_is_not_reported_as_a_close(
        seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    raw, ch = seqpacket_peer
    whole = frame(b"payload")
    raw.send(whole[:5])
    raw.send(b"")
    raw.send(whole[5:])
    with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
        ch.recv()


def test_empty_record_then_more_records_then_hang_up_is_a_protocol_error(
        seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    # The peer has hung up by the time the channel reads the empty record,
    # but records it sent after it are still queued: not an end.
    raw, ch = seqpacket_peer
    raw.send(frame(b"one"))
    raw.send(b"")
    raw.send(b"")
    raw.send(frame(b"two"))
    raw.close()
    assert ch.recv() == b"one"
    with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
        ch.recv()


def test_empty_record_as_the_last_thing_before_hang_up_reads_as_the_end(
        seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    # What the kernel cannot tell apart: an empty record followed by nothing
    # but the peer's close.  Nothing was sent after it, so nothing is lost.
    raw, ch = seqpacket_peer
    raw.send(frame(b"one"))
    raw.send(b"")
    raw.close()
    assert list(ch) == [b"one"]


def test_true_end_of_stream_stays_a_clean_end(seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    raw, ch = seqpacket_peer
    raw.send(frame(b"one") + frame(b""))
    raw.shutdown(socket.SHUT_WR)  # half-closed: the peer lives on, but sends nothing more
    assert ch.recv() == b"one"
    assert ch.recv() == b""
    with pytest.raises(EOFError):
        ch.recv()
    assert not ch.closed
    ch.send(b"still writable")
    assert raw.recv(100) == frame(b"still writable")


def test_empty_record_from_a_channel_peer_cannot_happen() -> None:
    # The channel itself never writes an empty record: an empty message is a
    # header-only frame.
    a, b = afunix.channel_pair(socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b"")
        a.send_many([b"", b""])
        assert [b.recv() for _ in range(3)] == [b"", b"", b""]


# ---- one receiver and one sender at a time: the second is refused, never waits ----

T = 20.0  # seconds: the bound on every wait and join


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + T
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def in_call(ch: Channel, side: str) -> bool:
    """Whether a call of `side` ("sending"/"receiving") is in progress on `ch`."""
    return side in getattr(ch, "_busy", ())


RECEIVING_CALLS: List[Tuple[str, Callable[[Channel], object]]] = [
    ("recv", lambda ch: ch.recv()),
    ("recv_many", lambda ch: ch.recv_many()),
    ("recv_message", lambda ch: ch.recv_message()),
    ("recv_batch", lambda ch: ch.recv_batch()),
    ("iteration", lambda ch: next(iter(ch))),
]
SENDING_CALLS: List[Tuple[str, Callable[[Channel], object]]] = [
    ("send", lambda ch: ch.send(b"intruder")),
    ("send-fds", lambda ch: ch.send(b"intruder", [0])),
    ("send_many", lambda ch: ch.send_many([b"intruder"])),
    ("send_fixed", lambda ch: ch.send_fixed(b"intruder", 8)),
    ("flush", lambda ch: ch.flush()),
]


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_a_second_receiver_is_refused_while_one_waits(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    b.socket.settimeout(T)
    got: List[object] = []
    waiter = threading.Thread(target=lambda: got.append(b.recv()))
    with a, b:
        waiter.start()
        wait_until(lambda: in_call(b, "receiving"))  # blocked in the kernel, side claimed
        for name, call in RECEIVING_CALLS:
            with pytest.raises(RuntimeError, match="already receiving"):
                call(b)
        b.send(b"the other side is free")  # sending is not receiving
        assert a.recv() == b"the other side is free"
        a.send_many([b"first", b"second"])
        waiter.join(T)
        assert got == [b"first"]
        assert not in_call(b, "receiving")
        assert b.recv() == b"second"  # the refused calls took nothing and left nothing claimed


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_a_second_sender_is_refused_while_one_is_blocked(kind: int) -> None:
    a, b = afunix.channel_pair(kind)
    a.socket.settimeout(T)
    big = bytes(range(256)) * 16384  # 4 MiB: more than the socket buffers hold
    errors: List[BaseException] = []

    def blocked_sender() -> None:
        try:
            a.send(big)
        except BaseException as exc:  # reported below
            errors.append(exc)

    sender = threading.Thread(target=blocked_sender)
    with a, b:
        sender.start()
        wait_until(lambda: in_call(a, "sending"))
        for name, call in SENDING_CALLS:
            with pytest.raises(RuntimeError, match="already sending"):
                call(a)
        assert b.recv() == big  # whole, with nothing of the refused calls inside
        sender.join(T)
        assert not errors
        assert not in_call(a, "sending")
        a.send(b"after")
        assert b.recv() == b"after"
        b.socket.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            b.recv()  # nothing else was written


def test_two_receiving_threads_get_every_message_exactly_once() -> None:
    # Before: both threads took the same table index or parsed the same
    # buffer, and the channel delivered duplicates or failed with a
    # malformed header within a few thousand messages.
    a, b = afunix.channel_pair()
    b.socket.settimeout(T)
    n = 40000
    got: List[bytes] = []
    refused = [0, 0]
    errors: List[BaseException] = []

    def receiver(k: int) -> None:
        try:
            while True:
                try:
                    got.extend(b.recv_many(64) if k else [b.recv()])
                except RuntimeError:
                    refused[k] += 1
                except EOFError:
                    return
                if got and got[-1] == b"end":
                    return
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=receiver, args=(k,)) for k in (0, 1)]
    with a, b:
        for t in threads:
            t.start()
        for i in range(0, n, 400):
            a.send_many([b"%d" % j for j in range(i, i + 400)])
        a.send(b"end")
        # The thread that does not take b"end" may already wait in a
        # receive: the end of the stream lets it go (EOFError).
        a.close()
        for t in threads:
            t.join(T)
        assert not errors
    assert sorted(got) == sorted([b"%d" % j for j in range(n)] + [b"end"])
    assert sum(refused) > 0  # they did overlap


def test_two_sending_threads_never_interleave_their_bytes() -> None:
    a, b = afunix.channel_pair()
    a.socket.settimeout(T)
    b.socket.settimeout(T)
    per_thread = 300
    errors: List[BaseException] = []
    refused = [0, 0]

    def sender(k: int) -> None:
        try:
            i = 0
            while i < per_thread:
                body = (b"%d:%d:" % (k, i)) * (1000 + 3000 * (i % 7))
                try:
                    if i % 2:
                        a.send(body)
                    else:
                        a.send_many([body, b"%d:%d:tail" % (k, i)])
                except RuntimeError:
                    refused[k] += 1
                    continue
                i += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in (0, 1)]
    with a, b:
        for t in threads:
            t.start()
        expected = 2 * (per_thread + per_thread // 2)
        got = [b.recv() for _ in range(expected)]
        for t in threads:
            t.join(T)
        assert not errors
    for message in got:  # each message whole: one tag repeated, or a tail
        tag = message.split(b":")[0] + b":" + message.split(b":")[1] + b":"
        assert message.endswith(b"tail") or message == tag * (len(message) // len(tag))
    for k in (0, 1):  # each thread's messages in its order
        mine = [m for m in got if m.startswith(b"%d:" % k)]
        assert len(mine) == per_thread + per_thread // 2
    assert sum(refused) > 0


def test_a_signal_handler_that_receives_inside_a_receive_is_refused() -> None:
    a, b = afunix.channel_pair()
    b.socket.settimeout(T)
    seen: List[BaseException] = []

    def handler(signum: int, frame: object) -> None:
        try:
            b.recv()
        except RuntimeError as exc:
            seen.append(exc)
        a.send(b"wake up")  # sending is the other side: allowed

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with a, b:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            assert b.recv() == b"wake up"  # interrupted (EINTR), retried after the handler
            assert len(seen) == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Interrupt(Exception):
    pass


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="before Python 3.11 a signal handler may run inside the finally that "
           "releases the claim (docs/channel.md)")
def test_an_exception_from_a_signal_handler_never_leaves_a_side_claimed() -> None:
    # The claim is taken inside the try: a handler raising at any point of a
    # call (a 30 us timer here, landing all over afunix's own code) leaves
    # the channel usable, never "already receiving" in a single thread.
    armed = [False]

    # Only inside afunix (and the socket module it calls): before Python
    # 3.10 a handler can run between any two instructions, and one landing
    # in this test's own bookkeeping (the disarm, the timer's cleanup) would
    # leave the timer raising everywhere.
    afunix_dir = os.path.dirname(afunix.__file__)

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        if armed[0] and frame is not None and (
                frame.f_code.co_filename.startswith(afunix_dir)
                or frame.f_code.co_filename == socket.__file__):
            raise Interrupt()

    def exchange(a: Channel, b: Channel) -> None:
        armed[0] = True
        try:
            for _ in range(50):
                a.send_many([b"x" * 16] * 8)
                a.send(b"y")
                for _ in range(9):
                    b.recv()
        finally:
            armed[0] = False

    # The timer also lands in finalizers that run meanwhile (the
    # interpreter's own "Exception ignored in ..." path, even inside the
    # hook that reports it): those interrupts are the interpreter's to drop,
    # not the channel's.  Anything else reaching the hook is a failure.
    ignored: List[BaseException] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: ignored.append(u.exc_value)  # type: ignore[arg-type]
    previous = signal.signal(signal.SIGALRM, handler)
    interrupts = rounds = 0
    deadline = time.monotonic() + 2.0
    try:
        signal.setitimer(signal.ITIMER_REAL, 30e-6, 30e-6)
        while time.monotonic() < deadline:
            a, b = afunix.channel_pair()
            a.socket.settimeout(T)
            b.socket.settimeout(T)
            with a, b:
                try:
                    exchange(a, b)
                except Interrupt:
                    interrupts += 1
                except RuntimeError:
                    raise  # what this test is about
                except (EOFError, OSError):
                    pass  # what an interrupted exchange may leave: another matter
                assert not a._busy and not b._busy
            rounds += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.unraisablehook = previous_hook
    assert interrupts > 10, (interrupts, rounds)
    assert all(isinstance(e, Interrupt) for e in ignored), ignored


# ---- fork(): what the parent had buffered to send is written once, by the parent ----

def in_child(work: Callable[[], None]) -> None:
    """Run `work` in a forked child; fail here if it raised."""
    reaped(forked(work))


def everything(ch: Channel) -> List[bytes]:
    ch.socket.settimeout(T)
    return list(ch)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")


@needs_fork
def test_buffered_messages_are_written_once_when_parent_and_child_both_close() -> None:
    # Before: the child's copy of the buffer was flushed by its close() too,
    # and the peer got every buffered message twice.
    a, b = afunix.channel_pair(write_buffer=1 << 20)
    with b:
        a.send(b"one")
        a.send_many([b"two", b"three"])
        assert a.pending > 0
        in_child(a.close)
        assert a.pending > 0
        a.close()
        assert everything(b) == [b"one", b"two", b"three"]


@needs_fork
def test_a_child_has_nothing_of_the_parents_to_flush() -> None:
    a, b = afunix.channel_pair(write_buffer=1 << 20)
    with a, b:
        a.send_many([b"one", b"two"])

        def child() -> None:
            assert a.pending == 0  # the parent's to write
            assert a.flush() == 0

        in_child(child)
        assert a.flush() == 0
        assert [b.recv(), b.recv()] == [b"one", b"two"]
        b.socket.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            b.recv()


@needs_fork
def test_tail_of_a_partly_written_message_is_finished_by_the_parent_only() -> None:
    a, b = afunix.channel_pair()
    a.socket.settimeout(0.0)
    big = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes at once
    with b:
        assert a.send_many([big]) == 1  # accepted: the tail waits in pending
        assert a.pending > 0
        got: List[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(everything(b)))
        reader.start()  # the socket drains: a close() that writes can finish

        def child() -> None:
            a.socket.settimeout(T)
            a.close()

        in_child(child)
        a.socket.settimeout(T)
        assert a.flush() == 0
        a.close()
        reader.join(T)
        assert got == [big]


@needs_fork
def test_a_child_sends_its_own_messages_on_an_inherited_channel() -> None:
    # The usual way to hand a channel to a worker: make it, fork, let the
    # child use it.  What the child buffers itself, its close() writes.
    a, b = afunix.channel_pair(write_buffer=1 << 20)
    with b:
        a.send(b"parent, before the fork")

        def child() -> None:
            a.send(b"child")
            a.send_many([b"child, batched"])
            a.close()

        in_child(child)
        a.close()
        got = everything(b)
    assert sorted(got) == [b"child", b"child, batched", b"parent, before the fork"]
    assert got.index(b"child") < got.index(b"child, batched")


@needs_fork
def test_messages_received_before_the_fork_are_in_both_copies() -> None:
    # Documented, not changed: what the channel had already read from the
    # socket is in the child's memory as in the parent's, so each process's
    # next receive hands it out.  Receive on an inherited channel in one
    # process only.
    a, b = afunix.channel_pair()
    with a, b:
        a.send_many([b"read", b"buffered"])
        assert b.recv() == b"read"
        assert b.buffered_messages == 1

        def child() -> None:
            assert b.recv() == b"buffered"

        in_child(child)
        assert b.recv() == b"buffered"


@needs_fork
def test_a_child_forked_while_another_thread_receives_can_receive() -> None:
    # Before: the parent thread's receiving claim was copied into the child,
    # where that thread does not exist, and every receive there raised
    # RuntimeError.
    a, b = afunix.channel_pair()
    with a, b:
        b.socket.settimeout(T)
        got: List[bytes] = []
        waiting = threading.Thread(target=lambda: got.append(b.recv()))
        waiting.start()
        deadline = time.monotonic() + T
        while not b._busy and time.monotonic() < deadline:
            time.sleep(0.001)
        assert b._busy  # the thread is in its receive

        def child() -> None:
            # (nothing is sent now: the parent's thread would race for it)
            b.socket.settimeout(0.05)
            try:
                b.recv()
            except (socket.timeout, TimeoutError):
                pass  # a receive that waited: not refused

        in_child(child)
        a.send(b"to the parent")
        waiting.join(T)
        assert got == [b"to the parent"]


# ---- fork() with a shared-memory lane: the region stays the parent's ----

KiB = 1 << 10


def forked(work: Callable[[], None]) -> int:
    """Start `work` in a forked child and return its pid, for `reaped`."""
    with warnings.catch_warnings():
        # (3.12+ warns about fork() beside a running thread: the child here
        # runs only `work`, which takes no lock another thread may hold)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def reaped(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child failed"


def taken(ch: Channel, n: int) -> List[bytes]:
    """The next `n` messages of `ch`."""
    got: List[bytes] = []
    while len(got) < n:
        got.extend(ch.recv_many(n - len(got)))
    return got


@needs_fork
def test_what_a_child_sends_on_an_inherited_lane_arrives_intact() -> None:
    # Before: parent and child each took slots of the one region with their
    # own copy of its free space; the child's message went in the slot the
    # parent's next one took too, and the peer got A, C, C.
    a, b = afunix.channel_pair(shm_size=1 << 20)
    with a, b:
        a.send(b"A" * (100 * KiB))  # through the lane, in flight over the fork

        in_child(lambda: a.send(b"B" * (100 * KiB)))
        a.send(b"C" * (100 * KiB))
        b.socket.settimeout(T)
        assert b.recv() == b"A" * (100 * KiB)
        assert b.recv() == b"B" * (100 * KiB)
        assert b.recv() == b"C" * (100 * KiB)


@needs_fork
def test_a_child_sends_on_an_inherited_lane_as_a_channel_without_one() -> None:
    a, b = afunix.channel_pair(shm_size=1 << 20, max_frame=128 * KiB)
    with a, b:
        a.send(b"A" * (100 * KiB))

        def child() -> None:
            with pytest.raises(ValueError, match="max_frame"):
                a.send(bytes(200 * KiB))
            with pytest.raises(ValueError, match="no shared-memory lane"):
                a.loan(10)
            with pytest.raises(ValueError, match="max_frame"):
                a.send_object(bytes(200 * KiB))
            a.send_object(bytearray(b"O" * (100 * KiB)))  # its buffer inline

        in_child(child)
        a.send_object(bytearray(b"P" * (100 * KiB)))  # the parent's through the lane
        b.socket.settimeout(T)
        assert b.recv() == b"A" * (100 * KiB)
        assert b.recv_object() == bytearray(b"O" * (100 * KiB))
        assert b.recv_object() == bytearray(b"P" * (100 * KiB))
        assert a._lane is not None and a._lane.in_flight == 2


@needs_fork
def test_a_lane_not_announced_before_the_fork_is_announced_by_the_parent_only() -> None:
    # Before: the child's first frame was the region's REGION frame, and the
    # parent's too: a second REGION frame, which the peer refuses.
    a, b = afunix.channel_pair(shm_size=1 << 20)
    with a, b:
        in_child(lambda: a.send_many([b"child", b"c" * (100 * KiB)]))
        a.send(b"p" * (100 * KiB))
        b.socket.settimeout(T)
        assert taken(b, 3) == [b"child", b"c" * (100 * KiB), b"p" * (100 * KiB)]


@needs_fork
def test_a_child_receiving_takes_the_returns_of_the_parents_slots_without_error() -> None:
    # The RETURN frames come to whichever process reads: a child that
    # receives drops those naming the parent's slots.  Before: its copy of
    # the lane did not have them in flight, and the child's receive raised
    # ProtocolError.
    a, b = afunix.channel_pair(shm_size=1 << 20)
    with a, b:
        a.socket.settimeout(T)
        b.socket.settimeout(T)

        def child() -> None:
            assert a.recv() == b"to the child"

        pid = forked(child)
        a.send(b"P" * (100 * KiB))  # a slot the child's copy never lent
        assert b.recv() == b"P" * (100 * KiB)  # its RETURN goes out with this receive
        b.send(b"to the child")
        reaped(pid)


@needs_fork
def test_slots_released_before_the_fork_are_returned_by_the_parent_only() -> None:
    # Before: a slot of the peer's lane released before the fork and not
    # yet given back went back from both processes, and the peer's channel
    # failed at the second return (a slot not in flight).
    a, b = afunix.channel_pair(shm_size=1 << 20)
    with a, b:
        b.socket.settimeout(T)
        b.send_many([b"x" * (100 * KiB), b"y" * (100 * KiB)])
        assert a.recv() == b"x" * (100 * KiB)
        assert a._reader.returns  # held back: the next message is here already
        in_child(lambda: a.send(b"child"))
        a.send(b"parent")
        assert taken(b, 2) == [b"child", b"parent"]
        assert a.recv() == b"y" * (100 * KiB)
        a.send(b"end")
        assert b.recv() == b"end"  # the returns read on the way: one each
        assert b._lane is not None and b._lane.in_flight == 0


def test_slots_a_batch_holds_at_the_fork_are_returned_by_the_parent_only() -> None:
    # Before: the child returned the slot of the parent's batch at its next
    # read, and the parent again later: the second RETURN freed the slot the
    # peer had filled again meanwhile, and the next message overwrote one
    # not read yet (silently: both the same size).
    a, b = afunix.channel_pair(shm_size=1 << 16, shm_threshold=1 * KiB)
    m1, m2, m3 = (bytes([i]) * 5000 for i in (1, 2, 3))
    with a, b:
        a.socket.settimeout(T)
        b.socket.settimeout(T)
        a.send(m1)
        a.send(b"c1")
        batch = b.recv_batch()
        assert bytes(batch[0]) == m1  # its slot stays held until b's next receive

        def child() -> None:
            assert b.recv() == b"c1"  # (buffered)
            assert b.recv() == b"c3"  # reads the socket
            b.send(b"child")  # any RETURN frame the child owes goes with it

        pid = forked(child)
        a.send(b"c3")
        reaped(pid)
        assert a.recv() == b"child"
        a.send(b"c4")
        a.send(m2)
        assert b.recv() == b"c1"
        assert b.recv() == b"c4"
        b.send(b"parent")  # the batch's slot goes back now, once
        assert a.recv() == b"parent"
        a.send(m3)
        assert b.recv() == m2  # not overwritten by m3
        assert b.recv() == m3


# ---- descriptors recv() does not return: closed by the next receive ----


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def copies_of(fd: int, *besides: int) -> List[int]:
    """This process's descriptors of what `fd` is (a pipe: of either end), but `fd` and `besides`."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        other = int(name)
        if (other != fd and other not in besides and is_open(other)
                and os.path.samestat(os.fstat(other), os.fstat(fd))):
            found.append(other)
    return found


@pytest.mark.parametrize("size", [100, 100 * KiB])  # inline, and through the lane
def test_descriptors_recv_does_not_return_are_closed_by_the_next_receive_or_close(
        size: int) -> None:
    # docs/channel.md (Descriptors): not at once, but by the start of the
    # next receive, or by close() when none comes.
    a, b = afunix.channel_pair(shm_size=1 << 20)
    with a, b:
        b.socket.settimeout(T)
        r, w = os.pipe()
        try:
            received: List[int] = []
            for ending in ("receive", "close"):
                a.send(bytes(size), fds=[w])
                assert b.recv() == bytes(size)
                received = copies_of(w, r)
                assert len(received) == 1  # still open
                if ending == "receive":
                    a.send(b"next")
                    assert b.recv() == b"next"
                    assert not any(is_open(fd) for fd in received)
            b.close()
            assert not any(is_open(fd) for fd in received)
        finally:
            os.close(r)
            os.close(w)
