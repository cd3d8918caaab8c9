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
from afunix import Channel, Loan, Message, ProtocolError, channel_pair, shm
from afunix.frames import return_frames

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
                 where: Tuple[str, ...] = (AFUNIX_DIR,)) -> None:
        self.point = point
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
        if (event in ("call", "c_return") and self.thread is None
                and frame.f_code.co_filename.startswith(self.where)):
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
        try:
            return call()
        finally:
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
    # apart, would leave the whole region unlendable).
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
            hook = AtCall(point, loan.abandon, wait=0.1, where=lane_code)
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
