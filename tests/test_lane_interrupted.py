"""The lane's loans and regions, each stopped at one exact point by an exception, and a hostile RETURN.

An exception from a signal handler (KeyboardInterrupt) can land after any
call: here it is raised at one chosen point, by wrapping a method or by a
profile hook after one C call, so that each case is run, not hoped for.
What must hold: no slot is lost (a message of the whole region still takes
every slot), no descriptor is left open, and a loan ends either sent or
open with a view that can still be written, never half way.  And a peer
that returns a slot whose frame was never written is refused with
ProtocolError, as docs/PROTOCOL.md says, even when the RETURN comes while
that frame waits to be written.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator, List, Tuple

import anyio
import pytest

import afunix
import afunix.aio as aio
from afunix import Channel, ProtocolError, channel_pair, shm
from afunix.frames import return_frames
from afunix.lane import LaneSender
from conftest import open_fds
from test_lane_stress import KiB, payload

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

REGION = 64 * KiB
MAX_FRAME = 32 * KiB  # below REGION: a message of the whole region goes only through the lane


def lane_pair() -> Tuple[Channel, Channel]:
    a, b = channel_pair(shm_size=REGION, shm_threshold=1024, max_frame=MAX_FRAME)
    for ch in (a, b):
        ch.socket.settimeout(10)
    return a, b


def in_flight(ch: Channel) -> int:
    lane = afunix.channel.lane_of(ch)
    assert lane is not None
    return lane.in_flight


def region_is_free(a: Channel) -> None:
    """Every slot of a's lane is free: a loan of the whole region comes at once (no wait for returns)."""
    a.socket.settimeout(2)  # a slot lost for good: TimeoutError, not a hang
    with a.loan(REGION):
        pass
    assert in_flight(a) == 0


@pytest.fixture
def stop_after() -> Iterator[Callable[[str, str], Callable[[], bool]]]:
    """stop_after(c_name, in_function): raise KeyboardInterrupt once, right after the C
    function `c_name` returns into afunix's function `in_function` (where CPython runs
    a signal handler); what it returns tells whether it did."""
    hit = [False]

    def arm(c_name: str, in_function: str) -> Callable[[], bool]:
        def hook(frame: FrameType, event: str, arg: Any) -> None:
            if (event == "c_return" and getattr(arg, "__name__", None) == c_name
                    and frame.f_code.co_name == in_function
                    and "afunix" in frame.f_code.co_filename):
                sys.setprofile(None)
                hit[0] = True
                raise KeyboardInterrupt

        sys.setprofile(hook)
        return lambda: hit[0]

    try:
        yield arm
    finally:
        sys.setprofile(None)


def test_a_loan_stopped_as_it_writes_the_returns_left_to_it_loses_no_slot(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Channel.loan writes the returns a receive left to it; an exception there
    (after the write) used to come after the loan was the caller's: the caller
    never got it and its slot stayed taken for good."""
    a, b = lane_pair()
    with a, b:
        m1, m2 = payload(1, 5000), payload(2, 5000)
        b.send(m1)
        b.send(m2)
        assert a.recv() == m1
        assert a._reader.returns  # held back: the next message is here already
        real = Channel._send_returns

        def stopped(self: Channel) -> None:
            real(self)
            raise KeyboardInterrupt

        monkeypatch.setattr(Channel, "_send_returns", stopped)
        with pytest.raises(KeyboardInterrupt):
            a.loan(5000)
        monkeypatch.undo()
        assert not a._reader.returns  # (they went)
        region_is_free(a)
        assert a.recv() == m2


@pytest.mark.anyio
async def test_an_aio_loan_stopped_as_it_writes_the_returns_left_to_it_loses_no_slot(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through afunix.aio.Channel.loan, which makes the loan with Channel.loan."""
    a, b = aio.channel_pair(shm_size=REGION, shm_threshold=1024, max_frame=MAX_FRAME)
    with anyio.fail_after(30):
        async with a, b:
            m1, m2 = payload(1, 5000), payload(2, 5000)
            await b.send(m1)
            await b.send(m2)
            assert await a.recv() == m1
            assert a._ch._reader.returns  # held back: the next message is here already
            real = Channel._send_returns

            def stopped(self: Channel) -> None:
                real(self)
                raise KeyboardInterrupt

            monkeypatch.setattr(Channel, "_send_returns", stopped)
            with pytest.raises(KeyboardInterrupt):
                await a.loan(5000)
            monkeypatch.undo()
            with anyio.fail_after(2):  # a slot lost for good: the loan waits for ever
                whole = await a.loan(REGION)
            whole.abandon()
            assert await a.recv() == m2


def test_an_abandon_stopped_before_it_frees_the_slot_leaves_the_loan_to_abandon_again(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = lane_pair()
    with a, b:
        loan = a.loan(5000)

        def stopped(self: LaneSender, *args: Any) -> None:
            monkeypatch.undo()  # once
            raise KeyboardInterrupt

        monkeypatch.setattr(LaneSender, "withdraw", stopped)
        with pytest.raises(KeyboardInterrupt):
            loan.abandon()
        assert loan.open  # not closed with its slot still taken
        loan.abandon()
        assert not loan.open
        region_is_free(a)


def test_an_abandon_stopped_after_it_freed_the_slot_frees_it_once(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = lane_pair()
    with a, b:
        loan = a.loan(5000)
        real = LaneSender.withdraw

        def stopped(self: LaneSender, *args: Any) -> None:
            monkeypatch.undo()  # once
            real(self, *args)
            raise KeyboardInterrupt

        monkeypatch.setattr(LaneSender, "withdraw", stopped)
        with pytest.raises(KeyboardInterrupt):
            loan.abandon()
        other = a.loan(5000)  # the slot is free: taken again
        assert other.slot == loan.slot
        if loan.open:
            loan.abandon()  # finishes, and frees nothing more: `other` keeps its slot
        assert not loan.open and in_flight(a) == 1
        other.abandon()
        region_is_free(a)


def test_a_region_close_stopped_after_its_views_go_still_closes_its_descriptor(
        backend: str, stop_after: Callable[[str, str], Callable[[], bool]]) -> None:
    before = open_fds()
    region = shm.Region.create(64 * KiB)
    fd = region.fileno()
    hit = stop_after("release", "close")
    with pytest.raises(KeyboardInterrupt):
        region.close()
    assert hit()
    assert region.closed
    region.close()  # again: nothing to do
    assert open_fds() == before, "descriptor %d left open" % fd


def test_a_send_loan_stopped_as_the_loan_is_committed_leaves_it_open_and_usable(
        backend: str, stop_after: Callable[[str, str], Callable[[], bool]]) -> None:
    """The exception lands after the loan's view is released and before its
    frame is written: the loan is open again, with a view that takes writes,
    and sends whole afterwards (never open with a released view)."""
    a, b = lane_pair()
    with a, b:
        loan = a.loan(5000)
        loan.view[:] = b"x" * 5000
        hit = stop_after("release", "_finish")
        with pytest.raises(KeyboardInterrupt):
            a.send_loan(loan)
        assert hit()
        assert loan.open
        data = payload(3, 5000)
        loan.view[:] = data
        a.send_loan(loan)
        assert b.recv() == data
        b.send(b"returns")
        assert a.recv() == b"returns"
        region_is_free(a)


@pytest.mark.parametrize("how", ["send", "loan"])
def test_a_return_of_a_slot_whose_frame_waits_and_never_goes_is_a_protocol_error(
        backend: str, how: str) -> None:
    """A hostile peer returns the slot of a frame a's send is still waiting to
    write (the socket is full), read by a receive in another thread; the
    frame then goes nowhere (a timeout): the peer named a slot it was never
    sent, and a's send says so and closes the channel, as a return of a
    lent slot is refused."""
    a, b = lane_pair()
    with a, b:
        b.send(b"start")  # b's REGION frame first, as its lane says
        assert a.recv() == b"start"
        a.send(payload(0, 5000))  # a's REGION, and a slot b keeps
        a.socket.settimeout(0)
        try:
            while True:
                a.send(b"x" * 1000)  # until a's socket and buffer are full
        except BlockingIOError:
            pass
        a.socket.settimeout(1.5)  # the frame goes nowhere: b reads nothing
        lane = afunix.channel.lane_of(a)
        assert lane is not None
        allocator = lane.region.allocator
        got: List[Any] = []

        def receive() -> None:
            try:
                got.append(a.recv())
            except BaseException as exc:  # reported below
                got.append(exc)

        def sending() -> List[int]:
            return [o for o in range(64, REGION, 64)
                    if allocator.holds(o, 5000) and not allocator.is_lent(o, 5000)]

        def hostile() -> None:
            deadline = time.monotonic() + 5
            while not sending() and time.monotonic() < deadline:
                time.sleep(0.001)  # until the frame naming it waits to be written
            offset, = sending()
            b.socket.sendall(return_frames([(offset, 5000)])[0])
            while allocator.holds(offset, 5000) and time.monotonic() < deadline:
                time.sleep(0.001)  # until a's receive applied it
            b.send(b"hi")

        threads = [threading.Thread(target=receive), threading.Thread(target=hostile)]
        for t in threads:
            t.start()
        try:
            with pytest.raises(ProtocolError, match="never sent|before its frame was sent"):
                if how == "send":
                    a.send(payload(1, 5000))
                else:
                    loan = a.loan(5000)
                    loan.view[:] = payload(1, 5000)
                    a.send_loan(loan)
        finally:
            for t in threads:
                t.join(10)
        assert got and (got[0] == b"hi" or isinstance(got[0], ProtocolError))
        assert a.closed


def read_done(frame: FrameType, event: str, arg: Any) -> bool:
    """For a profile hook: whether this event is a channel read done and not yet handed over.

    The stdlib backend's recvmsg_into result stored (extend), and the C
    core's call returned (its Python function returning: PyPy reports no
    event for a call into cffi's library).
    """
    if frame.f_code.co_name != "chan_recv":
        return False
    if afunix.BACKEND == "stdlib":
        return event == "c_return" and getattr(arg, "__name__", "") == "extend"
    return event == "return"


def test_a_read_stopped_while_a_sender_waits_behind_messages_is_kept_where_it_landed() -> None:
    """A sender waiting for slots reads the peer's messages after those not taken yet; an exception
    right after the read call (before the stdlib backend recorded it) loses and repeats nothing.

    The read lands after the messages not taken.  Once they are taken, the
    next receive moves what is left of the buffer to its front before it
    reads again; a read not yet recorded must be recorded where it landed
    first, or the bytes at the front (the message taken last) are handed
    out in its place.  (SOCK_SEQPACKET: a read takes one record, so the
    read after a message is parsed is the next message.)
    """
    a, b = channel_pair(socket.SOCK_SEQPACKET, shm_size=REGION, shm_threshold=1024,
                        max_frame=MAX_FRAME)
    try:
        b.send(b"X" * 100)
        fill = b"F" * (REGION // 2)
        a.send(fill)
        a.send(fill)  # a's region is full: b receives nothing, so returns nothing
        b.send(b"Y" * 100)
        a.socket.settimeout(2)
        reader = a._reader

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            if not read_done(frame, event, arg):
                return
            if reader.next < reader.parsed:  # X waits, parsed: this read brought Y after it
                sys.setprofile(None)
                raise KeyboardInterrupt

        sys.setprofile(hook)
        try:
            with pytest.raises(KeyboardInterrupt):
                a.send(fill)  # waits for slots, reading what b sent
        finally:
            sys.setprofile(None)
        assert a.recv() == b"X" * 100
        assert a.recv() == b"Y" * 100
        assert b.recv() == fill and b.recv() == fill
        a.socket.settimeout(10)
        a.send(b"after")
        assert b.recv() == b"after"
    finally:
        a.close()
        b.close()


def test_a_read_left_by_a_stopped_receive_does_not_make_the_next_wait_with_returns_owed() -> None:
    """A receive that owes RETURN frames the socket does not take yet waits for input or for room,
    whichever comes first; a read an exception left to take in (stdlib backend) must not send it
    to a wait for input alone: the peer, waiting for those slots before it sends, would wait too.
    """
    region = 256 * KiB
    a, b = channel_pair(socket.SOCK_SEQPACKET, shm_size=region, shm_threshold=8192,
                        max_frame=64 * KiB)
    try:
        for ch in (a, b):
            ch.socket.settimeout(3)
        a.send(b"A" * (region // 2))  # a slot of a's region
        b.send(b"L" * (region - 4096))  # nearly all of b's
        assert b.recv() == b"A" * (region // 2)  # b writes a's slot back
        n = 0
        while select.select([], [a.fileno()], [], 0)[1]:  # a's socket takes nothing more
            a.send(b"x%d" % n)
            n += 1
        assert a.recv() == b"L" * (region - 4096)  # a owes b's slot, and cannot write it
        reader = a._reader
        assert reader.returns
        def hook(frame: FrameType, event: str, arg: Any) -> None:
            if not read_done(frame, event, arg):
                return
            sys.setprofile(None)
            raise KeyboardInterrupt

        a.socket.settimeout(0.3)
        sys.setprofile(hook)
        # (the C core reads up to 8 records a call: it read the RETURN frame
        # with L, and this receive finds nothing to read)
        stopped = KeyboardInterrupt if afunix.BACKEND == "stdlib" else (KeyboardInterrupt, socket.timeout)
        try:
            with pytest.raises(stopped):
                a.recv()  # reads a's RETURN frame: stopped right after the read
        finally:
            sys.setprofile(None)
        sent: List[str] = []

        def peer() -> None:
            b.send(b"M" * (region - 4096))  # waits for its slot back: a's RETURN frame
            sent.append("sent")

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        a.socket.settimeout(3)
        assert a.recv() == b"M" * (region - 4096)  # a writes the return as b drains a's records
        thread.join(5)
        assert sent
    finally:
        a.close()
        b.close()
