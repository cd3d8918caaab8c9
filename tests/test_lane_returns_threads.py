"""Slots of the peer's lane owed back, shared by a receiving and a sending thread.

A receive that releases a slot of the peer's region while another thread
sends leaves the RETURN frame to that sender, which writes it as its call
ends (docs/channel.md: "Receiving and sending are independent").  Making
that frame releases the slot from the receiver's ledger and drops it from
the slots owed, while the receive may be claiming the slot of the next
frame in that ledger and adding the slots it releases.  Interleaved, the
claim read a ledger changed under it: IndexError in the receive (seen as
the receiving thread dying in the echo test of test_lane_stress.py under
PyPy, after which the peer waited for it and the send ran out of time), or
an overlap missed or made up.  Here the sender ends exactly inside a claim.
Both backends, both socket types; every wait is bounded.
"""
from __future__ import annotations

import bisect
import select
import socket
import threading
import types
from typing import List

import pytest

import afunix
import afunix.slots
from afunix import Channel, shm
from afunix._chanio import SENDING
from afunix.channel import reader_of
from test_lane_duplex import wait_until
from test_lane_stress import KiB, MiB, payload

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

TYPES = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET]
KINDS = ["stream", "seqpacket"]


def writable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


@pytest.mark.parametrize("kind", TYPES, ids=KINDS)
def test_a_send_ending_inside_a_claim_leaves_the_ledger_whole(
        kind: int, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = afunix.socketpair(kind)
    x.settimeout(10)
    y.settimeout(10)
    a = Channel(x)  # reads the slots of b's lane
    b = Channel(y, shm_size=MiB, shm_threshold=KiB)
    first, second, big = payload(1, 64 * KiB), payload(2, 64 * KiB), payload(3, 4 * MiB)
    errors: List[BaseException] = []

    def send_big() -> None:
        try:
            a.send(big)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    with a, b:
        b.send(first)  # a slot at the start of b's region
        # a's sending side stays busy: the peer reads nothing until told to
        sender = threading.Thread(target=send_big, daemon=True)
        sender.start()
        wait_until(lambda: SENDING in a._busy and not writable(x))
        assert a.recv() == first
        assert reader_of(a).returns, "the slot should be owed to the sender thread"
        b.send(second)  # the next slot, behind the one owed

        real = bisect.bisect_right
        taken: List[bytes] = []

        def inside_claim(starts: List[int], offset: int) -> int:
            """SlotLedger.claim's search, with the sender made to end before the claim goes on."""
            i = real(starts, offset)
            if threading.current_thread() is threading.main_thread() and not taken:
                taken.append(b.recv())  # the send ends, and writes the RETURN frame it owes
                sender.join(1.0)  # (with the ledger's lock held here, it waits for this claim)
            return i

        monkeypatch.setattr(afunix.slots, "bisect", types.SimpleNamespace(
            bisect_right=inside_claim, bisect_left=bisect.bisect_left))
        assert a.recv() == second
        monkeypatch.undo()
        assert taken == [big]
        sender.join(5)
        assert not sender.is_alive() and not errors, errors
        a.flush()  # (writes what is still owed)
        r = reader_of(a)
        assert not r.returns
        assert r.lane is not None and len(r.lane.ledger) == 0
        # b has every slot back: a region's worth of messages goes through the lane again
        for i in range(32):
            b.send(payload(i, 64 * KiB))
            assert a.recv() == payload(i, 64 * KiB)


@pytest.mark.parametrize("kind", TYPES, ids=KINDS)
def test_the_end_of_stream_waits_for_a_return_frame_being_made(
        kind: int, backend: str) -> None:
    """The peer closes while the sending thread makes the RETURN frame a receive left to it:
    the receive that meets the end of the stream lets go of the peer's region only after
    that frame is made (it used to clear the region's slots under it: KeyError from send)."""
    x, y = afunix.socketpair(kind)
    x.settimeout(10)
    y.settimeout(10)
    a = Channel(x)  # reads the slots of b's lane
    b = Channel(y, shm_size=MiB, shm_threshold=KiB)
    first, big = payload(1, 64 * KiB), payload(3, 4 * MiB)
    errors: List[BaseException] = []
    ended: List[BaseException] = []
    in_discard = threading.Event()
    receiving = threading.Event()

    def send_big() -> None:
        try:
            a.send(big)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def receive_the_end() -> None:
        try:
            a.recv()
        except BaseException as exc:  # EOFError expected
            ended.append(exc)

    with a:
        b.send(first)
        sender = threading.Thread(target=send_big, daemon=True)
        sender.start()
        wait_until(lambda: SENDING in a._busy and not writable(x))
        assert a.recv() == first
        r = reader_of(a)
        assert r.returns, "the slot should be owed to the sender thread"
        lane = r.lane
        assert lane is not None
        offset = r.returns[0].offset
        view, length = lane._views[offset]
        receiver = threading.Thread(target=receive_the_end, daemon=True)

        class Held:
            """The slot's view: its release returns where the receive gets its turn."""

            def release(self) -> None:
                view.release()
                if threading.current_thread() is sender:
                    in_discard.set()
                    receiving.wait(5)
                    receiver.join(0.3)  # (with the fix it waits for this frame: not the end)

        lane._views[offset] = (Held(), length)  # type: ignore[assignment]
        assert b.recv() == big  # the send ends, and makes the RETURN frame it owes
        assert in_discard.wait(5), "the sender made no RETURN frame"
        b.close()  # the peer goes
        receiver.start()
        receiving.set()
        sender.join(5)
        receiver.join(5)
        assert not sender.is_alive() and not receiver.is_alive()
        assert not errors, errors
        assert len(ended) == 1 and isinstance(ended[0], EOFError), ended
