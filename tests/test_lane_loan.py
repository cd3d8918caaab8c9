"""Loans through afunix.Channel: a message made in place in a slot of the lane, sent without a copy.

`Channel.loan(n)` lends a writable slot (waiting for room as a send does),
`Channel.send_loan` names it in a SLOT frame; a loan not sent goes back to
the free space.  Both backends, real socketpairs.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from types import FrameType
from typing import Any, Callable, List, Optional, Tuple

import pytest

import afunix
import afunix.channel
from afunix import _chanio
from afunix import Channel, Loan, Message, ProtocolError, channel_pair, shm
from afunix.frames import frame_header, return_frames

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

KiB = 1 << 10
MiB = 1 << 20

AFUNIX_DIR = os.path.dirname(afunix.__file__)


def in_flight(ch: Channel) -> int:
    lane = ch._lane
    assert lane is not None
    return lane.in_flight


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_a_loan_is_the_slot_the_receiver_reads(kind: int, clean: None) -> None:
    a, b = channel_pair(kind, shm_size=MiB)
    with a, b:
        loan = a.loan(100 * KiB)  # the first message of `a`: its REGION frame goes first
        assert isinstance(loan, Loan) and loan.view.nbytes == 100 * KiB
        assert not loan.view.readonly
        data = os.urandom(100 * KiB)
        loan.view[:] = data
        offset = loan.slot.offset
        a.send_loan(loan)
        assert not loan.open
        with pytest.raises(ValueError):
            loan.view  # released by the send
        batch = b.recv_batch()
        assert len(batch) == 1 and bytes(batch[0]) == data
        # the receiver reads the very slot that was filled: nothing was copied
        assert b._reader.lane_held == [(offset, 100 * KiB)]
        del batch
        b.send(b"next")  # (b's own frames; a reads the return behind them)
        assert a.recv() == b"next"


def test_loans_keep_their_order_with_sends_and_carry_descriptors(clean: None) -> None:
    a, b = channel_pair(shm_size=MiB, shm_threshold=64 * KiB)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with a, b:
            a.send(b"before")
            with a.loan(5) as loan:
                loan.view[:] = b"small"  # under the threshold, through the lane all the same
                a.send_loan(loan, [fd])
            a.send_many([b"x" * 70 * KiB, b"after"])
            assert b.recv() == b"before"
            m = b.recv_message()
            assert m.data == b"small" and len(m.fds) == 1
            os.close(m.fds[0])
            assert b.recv() == b"x" * 70 * KiB
            assert b.recv() == b"after"
    finally:
        os.close(fd)


def test_a_loan_given_up_frees_its_slot(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB)
    with a, b:
        with a.loan(256 * KiB) as loan:
            loan.view[:4] = b"lost"
            assert in_flight(a) == 1
            a.socket.setblocking(False)
            with pytest.raises(BlockingIOError):
                a.loan(1)  # the whole region is lent: no room, and no wait
            a.socket.setblocking(True)
        assert not loan.open and in_flight(a) == 0
        whole = a.loan(256 * KiB)  # the same room, at once
        whole.abandon()
        assert in_flight(a) == 0
        b.socket.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv()  # nothing was sent


def test_a_loan_waits_for_the_receiver_to_return_a_slot(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB)
    with a, b:
        first = a.loan(200 * KiB)
        first.view[:] = b"1" * 200 * KiB
        a.send_loan(first)
        a.socket.settimeout(0.2)
        with pytest.raises(socket.timeout):
            a.loan(200 * KiB)  # the first is still in the receiver's hands
        assert in_flight(a) == 1
        a.socket.settimeout(10)
        got = []
        t = threading.Timer(0.1, lambda: got.append(b.recv()))
        t.start()
        second = a.loan(200 * KiB)  # comes once b took the first and returned its slot
        t.join()
        assert got == [b"1" * 200 * KiB]
        assert second.slot.offset == 0
        second.abandon()


class CountedEvent(threading.Event):
    """The lane's `room`, counting the waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_a_return_that_comes_just_after_the_look_is_read_at_once(
        kind: int, monkeypatch: pytest.MonkeyPatch, clean: None) -> None:
    # A sender waiting for slots reads the returns on the socket, then
    # waits for more.  A RETURN frame that came just after that read made
    # the socket readable, which the wait took for a reader full of
    # messages not taken: it slept on the lane's `room`, an event only a
    # receive in another thread sets, for _ROOM_STEP (10 ms per message in
    # the loan row of the bench).  The first two reads are made to miss the
    # return already there.
    a, b = channel_pair(kind, shm_size=256 * KiB)
    with a, b:
        a.send_loan(a.loan(200 * KiB))
        assert len(b.recv()) == 200 * KiB  # its RETURN frame is on a's socket now
        lane = a._lane
        assert lane is not None
        room = lane.room = CountedEvent()
        reads = [0]

        def late(sock: socket.socket, reader: Any, deadline: Optional[float]) -> int:
            reads[0] += 1
            if reads[0] <= 2:
                return _chanio.NOTHING_READ
            return _chanio.read_for_room(sock, reader, deadline)

        monkeypatch.setattr(afunix.channel, "read_for_room", late)
        a.socket.settimeout(10)
        with a.loan(200 * KiB):
            assert reads[0] >= 3 and room.waits == 0


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_a_return_behind_many_messages_not_taken_is_read_at_once(
        kind: int, clean: None) -> None:
    # A look for returns reads 16 times at most; one that read only
    # messages (not taken, the reader having room for more) waits on the
    # socket or looks again, never on `room` (for _ROOM_STEP): the return
    # may be right behind them (a SOCK_SEQPACKET read takes one record).
    a, b = channel_pair(kind, shm_size=256 * KiB)
    with a, b:
        a.send_loan(a.loan(200 * KiB))
        for i in range(60):
            b.send(b"message %d" % i)
        assert len(b.recv()) == 200 * KiB  # its RETURN frame comes after the 60
        lane = a._lane
        assert lane is not None
        room = lane.room = CountedEvent()
        a.socket.settimeout(10)
        with a.loan(200 * KiB):
            assert room.waits == 0
        assert [a.recv() for _ in range(60)] == [b"message %d" % i for i in range(60)]


def drained(sock: socket.socket) -> None:
    """Read away what waits on `sock` (what the peer's channel sent: its frames, not parsed)."""
    while True:
        try:
            sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return


@pytest.mark.parametrize("kind, behind", [
    (socket.SOCK_STREAM, "a message not taken"),
    (socket.SOCK_SEQPACKET, "a message not taken"),
    (socket.SOCK_STREAM, "half a frame"),  # (a record is whole: no half frame of SEQPACKET)
], ids=["stream-message", "seqpacket-message", "stream-half-frame"])
def test_a_sender_waiting_for_slots_sees_the_peer_hang_up_behind_descriptors(
        kind: int, behind: str, clean: None) -> None:
    # The end of stream, read while a message with descriptors waits in
    # the reader (not taken, or its frame cut short), was taken for a read
    # with nothing new: the sender waited for slots until its timeout (for
    # ever without one), though no slot can come back.
    a, b = channel_pair(kind, shm_size=256 * KiB)
    r, w = os.pipe()
    try:
        with a:
            a.send_loan(a.loan(200 * KiB))  # out for good: the peer never returns it
            if behind == "a message not taken":
                b.send(b"with a descriptor", fds=[r])
            else:
                drained(b.socket)  # (its RETURN frames never go: b's channel is bypassed)
                b.socket.sendmsg([frame_header(100, 1) + b"x" * 10],
                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
            b.close()
            a.socket.settimeout(5)
            with pytest.raises(BrokenPipeError):
                a.loan(200 * KiB)
            if behind == "a message not taken":
                m = a.recv_message()  # still there, with its descriptor
                assert m.data == b"with a descriptor" and len(m.fds) == 1
                os.close(m.fds[0])
                with pytest.raises(EOFError):
                    a.recv()
            else:
                with pytest.raises(ProtocolError, match="middle of a frame"):
                    a.recv()
    finally:
        b.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
@pytest.mark.parametrize("how", ["recv_message", "recv", "recv_batch"])
def test_a_sender_waiting_for_slots_frees_the_reads_of_messages_taken(
        kind: int, how: str, clean: None) -> None:
    # The backend holds the descriptors of 8 reads.  Messages with
    # descriptors, some taken and the rest waiting, filled those slots: a
    # sender waiting for slots took the reader for full of messages not
    # taken, and waited until its timeout (for ever without one) with the
    # RETURN frame on its socket.  The reads of the messages taken are
    # freed for it now, also after a batch that the next receive ended.
    a, b = channel_pair(kind, shm_size=256 * KiB)
    r, w = os.pipe()
    try:
        with a, b:
            a.send_loan(a.loan(200 * KiB))  # out until b receives it
            for i in range(8):
                b.send(b"m%d" % i, fds=[r])
            a.socket.settimeout(0.5)
            with pytest.raises(socket.timeout):  # (TimeoutError from 3.10)
                a.loan(200 * KiB)  # reads the 8 messages while it waits (none came back)
            taken = [a.recv_message()]  # m0
            if how == "recv_message":
                taken += [a.recv_message(), a.recv_message()]
            elif how == "recv":
                assert [a.recv(), a.recv()] == [b"m1", b"m2"]  # (their descriptors closed)
            else:
                batch = a.recv_batch(max_messages=2)
                assert [bytes(batch[j]) for j in range(2)] == [b"m1", b"m2"]
                taken += [afunix.Message(bytes(batch[j]), tuple(batch.fds(j))) for j in range(2)]
                taken.append(a.recv_message())  # m3: the batch ends
            for m in taken:
                assert len(m.fds) == 1
                os.close(m.fds[0])
            b.send(b"m8", fds=[r])  # the 8th read held: none free for the RETURN frame behind it
            assert len(b.recv()) == 200 * KiB  # the loan's slot goes back
            a.socket.settimeout(5)
            with a.loan(200 * KiB):
                pass
            rest = []
            while True:
                m = a.recv_message()
                assert len(m.fds) == 1
                os.close(m.fds[0])
                rest.append(m.data)
                if m.data == b"m8":
                    break
            assert [m.data for m in taken] + rest == [b"m%d" % i for i in range(9)
                                                      if how != "recv" or i not in (1, 2)]
    finally:
        os.close(r)
        os.close(w)


def fd_name(fd: int) -> str:
    """What descriptor `fd` names (a memfd: "/memfd:NAME (deleted)")."""
    return os.readlink("/proc/self/fd/%d" % fd)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
@pytest.mark.parametrize("case", ["batch out", "batch moved past", "lane message", "lane batch"])
def test_the_reads_a_waiting_sender_frees_are_never_those_still_owed(
        kind: int, case: str, clean: None) -> None:
    # What the sender waiting for slots keeps: the reads of a batch still
    # out (its fds(i) hand them over), and all while a message of the
    # peer's lane waits or is out in a batch.  A batch a later receive
    # moved past ends there: its fds(i) hand out nothing, never the
    # descriptors of the messages read into the slots freed.  Every
    # descriptor is checked by what it names.
    a, b = channel_pair(kind, shm_size=256 * KiB, shm_threshold=1024)
    fds = [os.memfd_create("m%d" % i) for i in range(10)]
    got: dict = {}
    try:
        with a, b:
            a.send_loan(a.loan(200 * KiB))  # out until b receives it
            lane = case.startswith("lane")
            if lane:
                b.send(b"L" * 4096, fds=[fds[0]])  # through b's lane
            else:
                b.send(b"m0", fds=[fds[0]])
            for i in range(1, 9):  # (m8 waits on the socket: the 8 reads fill the backend's slots)
                b.send(b"m%d" % i, fds=[fds[i]])
            a.socket.settimeout(0.3)
            batch = None
            if case == "lane batch":
                batch = a.recv_batch()
                assert len(batch) == 1 and len(batch[0]) == 4096
            with pytest.raises(socket.timeout):  # (TimeoutError from 3.10)
                a.loan(200 * KiB)  # reads what b sent while it waits
            if case == "lane message":
                m = a.recv_message()
                assert m.data == b"L" * 4096
                got[0] = m.fds
            elif case != "lane batch":
                got[0] = a.recv_message().fds
                batch = a.recv_batch(max_messages=2)
                assert [bytes(batch[j]) for j in range(2)] == [b"m1", b"m2"]
                if case == "batch moved past":
                    got[3] = a.recv_message().fds
            b.send(b"m9", fds=[fds[9]])
            assert len(b.recv()) == 200 * KiB  # the loan's slot goes back
            a.socket.settimeout(0.5)
            try:
                with a.loan(200 * KiB):  # frees what it may, reads m8 and m9 if it can
                    pass
            except socket.timeout:
                assert case == "batch out" or lane  # (their reads stay: the slots may stay full)
            if batch is not None:
                if case == "batch moved past":
                    assert [batch.fds(j) for j in range(2)] == [[], []]
                elif case == "lane batch":
                    got[0] = tuple(batch.fds(0))
                else:
                    got[1], got[2] = tuple(batch.fds(0)), tuple(batch.fds(1))
            a.socket.settimeout(5)
            while 9 not in got:
                m = a.recv_message()
                got[int(m.data[1:])] = m.fds
            for i, mine in got.items():
                assert [fd_name(fd) for fd in mine] == ["/memfd:m%d (deleted)" % i], i
    finally:
        for mine in got.values():
            for fd in mine:
                os.close(fd)
        for fd in fds:
            os.close(fd)


def test_a_loan_filled_through_numpy(clean: None) -> None:
    np = pytest.importorskip("numpy")
    a, b = channel_pair(shm_size=MiB)
    with a, b:
        with a.loan(1000 * 8) as loan:
            array = np.frombuffer(loan.view, dtype=np.float64)
            array[:] = np.arange(1000, dtype=np.float64)
            del array  # numpy's reference to the view goes before the send
            a.send_loan(loan)
        batch = b.recv_batch()
        assert np.frombuffer(batch[0], dtype=np.float64).tolist() == list(range(1000))
        del batch


def test_bad_loans_are_refused_before_any_system_call(clean: None) -> None:
    a, b = channel_pair(shm_size=64 * KiB)
    plain, other = channel_pair()
    with a, b, plain, other:
        with pytest.raises(ValueError, match="no shared-memory lane"):
            plain.loan(10)
        for n in (0, -1, 64 * KiB + 1):
            with pytest.raises(ValueError):
                a.loan(n)
        with pytest.raises(TypeError):
            a.loan("10")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Loan"):
            a.send_loan(b"bytes")  # type: ignore[arg-type]
        c, d = channel_pair(shm_size=64 * KiB)
        with c, d:
            foreign = c.loan(10)
            with pytest.raises(ValueError, match="not of this channel"):
                a.send_loan(foreign)
            with pytest.raises(ValueError, match="not of this channel"):
                plain.send_loan(foreign)
            foreign.abandon()
        loan = a.loan(10)
        with pytest.raises(ValueError, match="descriptor"):
            a.send_loan(loan, [-1])
        assert loan.open  # refused: still lent, nothing sent
        loan.abandon()
        with pytest.raises(ValueError, match="committed or abandoned"):
            a.send_loan(loan)
        assert in_flight(a) == 0
        # nothing reached the peer, not even the REGION frame
        b.socket.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv()
        assert b._reader.lane is None


def test_a_loan_outlives_the_channel(clean: None) -> None:
    a, b = channel_pair(shm_size=64 * KiB)
    with b:
        loan = a.loan(1000)
        a.close()
        with pytest.raises(OSError) as info:
            a.send_loan(loan)
        assert info.value.errno == errno.EBADF
        assert loan.open
        if loan.view.nbytes:  # (PyPy shows a view of an unmapped region as empty)
            loan.view[:3] = b"ok!"  # the mapping lives as long as the view
        loan.abandon()  # nothing to give back to: a no-op
        assert not loan.open
        with pytest.raises(OSError):
            a.loan(10)
        with pytest.raises(EOFError):
            b.recv()
    del loan


def test_a_loan_sent_to_a_closed_peer_raises_and_stays_lent(clean: None) -> None:
    a, b = channel_pair(shm_size=64 * KiB)
    with a:
        loan = a.loan(1000)
        b.close()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            a.send_loan(loan)
        assert loan.open  # nothing went: send it elsewhere or give it back
        loan.abandon()
        assert in_flight(a) == 0


def closed_descriptor() -> int:
    """A descriptor number nothing has open (the kernel refuses it: EBADF)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def test_a_return_of_a_lent_slot_is_a_protocol_error(clean: None) -> None:
    # PROTOCOL.md: returning a slot never sent is a protocol error.  Taken
    # for a return, it freed the open loan's slot, and the next loan
    # overlapped it.
    a, b = channel_pair(shm_size=1 * MiB)
    with a, b:
        a.send(b"hi")  # the REGION frame goes first
        assert b.recv() == b"hi"
        loan = a.loan(600 * KiB)
        b.socket.sendall(return_frames([loan.slot])[0])
        a.socket.settimeout(5)
        with pytest.raises(ProtocolError, match="never sent"):
            a.loan(600 * KiB)  # no room: reads the peer's RETURN frame
        loan.abandon()  # the channel is closed: nothing to give back to


def test_a_loan_whose_send_went_nowhere_is_lent_again(clean: None) -> None:
    # A send_loan that wrote nothing (EBADF for a closed descriptor in fds)
    # leaves the loan open, the caller's to send again or give up, and its
    # slot lent: the peer has not heard of it, so a return of it is refused.
    a, b = channel_pair(shm_size=256 * KiB)
    with a, b:
        loan = a.loan(100 * KiB)
        loan.view[:] = b"L" * (100 * KiB)
        with pytest.raises(OSError) as info:
            a.send_loan(loan, [closed_descriptor()])
        assert info.value.errno == errno.EBADF
        assert loan.open and in_flight(a) == 1
        a.send_loan(loan)  # sent again, whole
        assert b.recv() == b"L" * (100 * KiB)
        again = a.loan(100 * KiB)
        with pytest.raises(OSError):
            a.send_loan(again, [closed_descriptor()])
        assert again.open
        b.socket.sendall(return_frames([again.slot])[0])
        a.socket.settimeout(5)
        with pytest.raises(ProtocolError, match="never sent"):
            a.loan(200 * KiB)  # no room: reads the peer's RETURN frames
        again.abandon()


class AtCall:
    """A profile hook that runs `action` in another thread at the `point`-th switch point in afunix's code.

    The points are where CPython may switch threads in afunix's Python
    code: each function entry, and after each call of a C function.  As a
    thread switch there would: the profiled call goes on once the action
    ended, or after `wait` seconds (an action waiting for a lock the
    profiled call holds goes on once that call lets it go).
    """

    def __init__(self, point: int, action: Callable[[], Any], wait: float = 5.0,
                 where: Tuple[str, ...] = (AFUNIX_DIR,), lines: bool = False) -> None:
        self.point = point
        # also before each line (a trace hook): CPython switches threads
        # between the bytecodes of a line too, so a look and the change it
        # decides on, on one line each, are points apart
        self.lines = lines
        self.action = action
        self.wait = wait
        self.where = where  # the files (or directories) whose points count
        self.calls = 0
        self.thread: Optional[threading.Thread] = None
        self.failed: List[BaseException] = []

    def _act(self) -> None:
        try:
            self.action()
        except BaseException as exc:  # reported by run
            self.failed.append(exc)

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "c_return"):
            self._reached(frame)

    def _traced(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self._reached(frame)
        return self._traced

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._traced if frame.f_code.co_filename.startswith(self.where) else None

    def _reached(self, frame: FrameType) -> None:
        if self.thread is None and frame.f_code.co_filename.startswith(self.where):
            if self.calls == self.point:
                self.thread = threading.Thread(target=self._act)
                self.thread.start()
                self.thread.join(self.wait)
            self.calls += 1

    @property
    def fired(self) -> bool:
        """True when the point was reached (past the last one: False)."""
        return self.thread is not None

    def run(self, call: Callable[[], Any]) -> Any:
        """`call()` profiled; the action must end, without an exception, soon after it."""
        sys.setprofile(self)
        if self.lines:
            sys.settrace(self._trace)
        try:
            return call()
        finally:
            sys.settrace(None)
            sys.setprofile(None)
            if self.thread is not None:
                self.thread.join(10)
                assert not self.thread.is_alive(), "the action never ended"
            assert not self.failed, self.failed


class Interrupt(Exception):
    pass


def end_loan(loan: Loan, how: str) -> None:
    if how == "abandon":
        loan.abandon()
    elif how == "with":
        with pytest.raises(Interrupt):
            with loan:
                raise Interrupt()  # left by an exception: abandoned
    else:
        loan.commit()


@pytest.mark.parametrize("how", ["abandon", "with", "commit"])
def test_a_loan_ended_while_close_runs_in_another_thread(how: str, clean: None) -> None:
    # A review found it: abandon looked at the region (open), close() in
    # another thread closed it and forgot every slot, and abandon's
    # withdraw of the slot raised ValueError ("not lent") or KeyError,
    # leaving the loan open; commit's "sending" likewise.  The close runs at
    # each switch point of the loan's end in turn: the loan ends all the
    # same, with nothing to give back, and nothing stays mapped (`clean`).
    point = 0
    while True:
        a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1024)
        with a, b:
            loan = a.loan(2048)
            loan.view[:4] = b"made"
            hook = AtCall(point, a.close)
            hook.run(lambda: end_loan(loan, how))
            assert not loan.open, point
            assert a.closed == hook.fired
            if not hook.fired:  # (past the last point: the loan ended with the channel open)
                assert in_flight(a) == (1 if how == "commit" else 0)
        if not hook.fired:
            break
        point += 1
    assert point >= 5  # (the points were reached: the loan's end is traced)


def test_a_loan_given_up_while_a_receive_applies_returns_in_another_thread(clean: None) -> None:
    # The receive applies the peer's RETURN frames to the free space while
    # the loan's abandon in another thread gives a slot back to it: the
    # abandon runs at each switch point of the receive's bookkeeping of the
    # lane in turn.  Both end, every slot is free, and the free space is one
    # range again (a slot freed twice, or a range lost, or two ranges left
    # apart, would leave the whole region unlendable).  Lines count too: a
    # withdraw without the lock fails only between two lines of the free.
    lane_code = (afunix.lane.__file__, afunix.slots.__file__)
    point = 0
    while True:
        a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1024)
        with a, b:
            a.socket.settimeout(5)
            b.socket.settimeout(5)
            for message in (b"y" * 4 * KiB, b"z" * 4 * KiB):
                a.send(message)  # (the first: after the REGION frame)
                assert b.recv() == message
            b.send(b"done")  # behind b's RETURN frames of both
            loan = a.loan(2048)
            assert in_flight(a) == 3
            hook = AtCall(point, loan.abandon, wait=0.05, where=lane_code, lines=True)
            assert hook.run(a.recv) == b"done"
            if not hook.fired:
                loan.abandon()  # (past the last point: after the receive)
            assert not loan.open and in_flight(a) == 0, point
            a.socket.setblocking(False)  # (no room: BlockingIOError at once, no wait)
            a.loan(256 * KiB).abandon()
        if not hook.fired:
            break
        point += 1
    assert point >= 8


def paused(monkeypatch: pytest.MonkeyPatch, name: str) -> Tuple[threading.Event, threading.Event]:
    """LaneSender.`name` made to stop at its entry (the first call only) until `go` is set."""
    at, go = threading.Event(), threading.Event()
    original = getattr(afunix.lane.LaneSender, name)

    def stopping(self: Any, *args: Any) -> Any:
        if not at.is_set():
            at.set()
            go.wait(5)
        return original(self, *args)

    monkeypatch.setattr(afunix.lane.LaneSender, name, stopping)
    return at, go


def test_a_loan_abandoned_in_two_threads_at_once_frees_its_slot_once(
        monkeypatch: pytest.MonkeyPatch, clean: None) -> None:
    # Both abandons pass their look at the loan before either frees the
    # slot: freed twice, it went to a later loan and was then freed under
    # it (two open loans shared one slot).  One wins, the other gets the
    # ValueError of a second abandon.
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1024)
    with a, b:
        loan = a.loan(2048)
        at, go = paused(monkeypatch, "withdraw")
        failed: List[BaseException] = []

        def first() -> None:
            try:
                loan.abandon()
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        assert at.wait(5)
        loan.abandon()  # (the second, passing the first's pause)
        other = a.loan(2048)  # takes the slot just freed
        go.set()
        thread.join(10)
        assert len(failed) == 1 and isinstance(failed[0], ValueError), failed
        assert "already committed or abandoned" in str(failed[0])
        assert not loan.open and other.open
        third = a.loan(2048)
        assert third.slot.offset != other.slot.offset  # the slot is still the other loan's
        other.abandon()
        third.abandon()
        assert in_flight(a) == 0


def test_a_loan_abandoned_while_another_thread_sends_it_is_refused_to_the_sender(
        monkeypatch: pytest.MonkeyPatch, clean: None) -> None:
    # The abandon frees the slot while send_loan commits the loan: the send
    # gets the ValueError of a loan ended already (it raised ProtocolError,
    # blaming the peer for a slot "returned before its frame was sent", and
    # closed the channel).
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1024)
    with a, b:
        a.socket.settimeout(5)
        b.socket.settimeout(5)
        loan = a.loan(2048)
        loan.view[:4] = b"made"
        w_at, w_go = paused(monkeypatch, "withdraw")
        s_at, s_go = paused(monkeypatch, "sending")
        results = {}

        def run(name: str, call: Callable[[], Any]) -> None:
            try:
                call()
                results[name] = None
            except BaseException as exc:
                results[name] = exc

        abandon = threading.Thread(target=run, args=("abandon", loan.abandon))
        abandon.start()
        assert w_at.wait(5)
        send = threading.Thread(target=run, args=("send", lambda: a.send_loan(loan)))
        send.start()
        assert s_at.wait(5)
        w_go.set()
        abandon.join(10)
        s_go.set()
        send.join(10)
        assert results["abandon"] is None
        assert isinstance(results["send"], ValueError), results
        assert "already committed or abandoned" in str(results["send"])
        assert not a.closed and not loan.open and in_flight(a) == 0
        a.send(b"after")  # the channel goes on; nothing was sent of the loan
        assert b.recv() == b"after"
        a.loan(256 * KiB).abandon()  # the whole region is free


def test_a_loan_asked_while_another_thread_closes_the_channel_is_ebadf(
        monkeypatch: pytest.MonkeyPatch, clean: None) -> None:
    # close() does not take the lane's lock: it may close the region after
    # the loan's look at it and before the view of the slot (ValueError of a
    # released memoryview, where the docs promise EBADF).
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1024)
    with a, b:
        original = shm.Region.view

        def closing_first(self: Any, offset: int, length: int) -> memoryview:
            a.close()  # (as another thread would, at this point)
            return original(self, offset, length)

        monkeypatch.setattr(shm.Region, "view", closing_first)
        with pytest.raises(OSError) as raised:
            a.loan(2048)
        assert raised.value.errno == errno.EBADF


def test_reopening_an_abandoned_raw_loan_is_the_callers_mistake() -> None:
    # A ValueError, never the ProtocolError that blames a peer.
    with shm.RegionWriter(64 * KiB) as writer:
        loan = writer.try_loan(1000)
        assert loan is not None
        loan.abandon()
        with pytest.raises(ValueError):
            loan.reopen()
        assert writer.allocator.slots_in_use == 0


def test_a_raw_loan_whose_commit_an_exception_stopped_can_be_abandoned() -> None:
    # A signal handler's exception at each switch point of a RegionWriter
    # loan's commit: one that stopped it after the view closed and before
    # the slot was handed over left the slot lent for good (abandon
    # refused the closed loan).  Now abandon gives it back, wherever the
    # commit stopped.
    point = 0
    while True:
        with shm.RegionWriter(64 * KiB) as writer:
            loan = writer.try_loan(1000)
            assert loan is not None
            calls = [0]

            def hook(frame: FrameType, event: str, arg: Any) -> None:
                if event in ("call", "c_return") and frame.f_code.co_filename.startswith(AFUNIX_DIR):
                    calls[0] += 1
                    if calls[0] == point + 1:
                        sys.setprofile(None)
                        raise Interrupt()

            sys.setprofile(hook)
            try:
                loan.commit()
                stopped = False
            except Interrupt:
                stopped = True
            finally:
                sys.setprofile(None)
            if not stopped:
                break
            loan.abandon()
            assert not loan.open
            assert writer.allocator.slots_in_use == 0, point
            with pytest.raises(ValueError):
                loan.abandon()
        point += 1
    assert point >= 5
