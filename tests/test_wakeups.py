"""A signal handler's exception while the channel wakes a waiting thread leaves nothing held.

The channel wakes a sender waiting for room (its lane's `room`) and the
callers waiting for a borrow to end (`Channel._borrow_released`) from code
a signal can interrupt.  Built on `threading.Event` and
`threading.Condition`, an exception raised right after
`Condition.__enter__` acquired its lock (where CPython runs a pending
handler, after the call returns) left that lock held for ever: the next
`set`, `wait` or wake in any thread waited for good, with the lane's lock
held when it came from a `clear` inside it.  These raise an exception at
every point where CPython runs handlers inside those calls (after each C
call and at each Python function's entry, in any module, the
interpreter's own included) and check that every thread still gets
through: the waiter the call was waking, and later calls from another
thread.
"""
from __future__ import annotations

import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, List

import pytest

import afunix
from afunix import channel_pair
from afunix._chanio import SENDING, Borrowed
from afunix._wakeups import Bell, Flag

KiB = 1024
LIMIT = 5.0  # seconds a thread may take to get through (the waits are steps of 10 ms)


class Injected(BaseException):
    """Raised where a signal handler could raise (a BaseException, as KeyboardInterrupt is)."""


def raising_at(k: int, call: Callable[[], Any]) -> bool:
    """call(), raising Injected at the k-th point of any code it runs; whether it was raised."""
    seen = [0]

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("c_return", "call"):
            return
        seen[0] += 1
        if seen[0] == k:
            sys.setprofile(None)
            raise Injected()

    sys.setprofile(hook)
    try:
        call()
        return False
    except Injected:
        return True
    finally:
        sys.setprofile(None)


def gets_through(call: Callable[[], Any]) -> None:
    """call() in another thread ends within LIMIT seconds."""
    done: List[bool] = []
    thread = threading.Thread(target=lambda: (call(), done.append(True)), daemon=True)
    thread.start()
    thread.join(LIMIT)
    assert done, "%r still waits after %s s" % (call, LIMIT)


def every_point(scenario: Callable[[int], bool]) -> int:
    for k in range(1, 2000):
        if not scenario(k):
            return k
    pytest.fail("more than 2000 points")


@pytest.mark.parametrize("step", ["set", "clear", "wait"])
def test_an_exception_in_the_lanes_room_leaves_it_usable(step: str) -> None:
    a, b = channel_pair(shm_size=64 * KiB, shm_threshold=1024)
    try:
        lane = afunix.channel.lane_of(a)
        assert lane is not None
        room = lane.room
        call = {"set": room.set, "clear": room.clear, "wait": lambda: room.wait(0.001)}[step]

        def scenario(k: int) -> bool:
            raised = raising_at(k, call)
            gets_through(lambda: (room.clear(), room.wait(0.001), room.set(), room.wait(LIMIT)))
            return raised

        assert every_point(scenario) > 1  # (raised at one point at least)
        # and the lane still moves messages whose slots must come back
        for _ in range(40):
            a.send(b"L" * (8 * KiB))
            assert b.recv() == b"L" * (8 * KiB)
    finally:
        gets_through(lambda: (a.close(), b.close()))  # (close sets `room`: no wait here either)


def test_an_exception_while_a_borrow_ends_wakes_or_leaves_its_waiter_to_its_step() -> None:
    a, b = channel_pair()
    try:
        a.socket.settimeout(LIMIT)

        def scenario(k: int) -> bool:
            borrow = Borrowed()
            a._busy[SENDING] = borrow
            sent: List[bool] = []
            waiter = threading.Thread(target=lambda: (a.send(b"after the borrow"), sent.append(True)),
                                      daemon=True)
            waiter.start()
            time.sleep(0.02)  # (it waits for the borrow; a waiter that comes later finds it gone)
            del a._busy[SENDING]
            raised = raising_at(k, a._borrow_released)
            waiter.join(LIMIT)
            assert sent, "the waiter still waits after %s s (point %d)" % (LIMIT, k)
            assert b.recv() == b"after the borrow"
            # a later borrow's end, from another thread, gets through too
            a._busy[SENDING] = Borrowed()
            del a._busy[SENDING]
            gets_through(a._borrow_released)
            return raised

        assert every_point(scenario) > 1  # (raised at one point at least)
    finally:
        gets_through(lambda: (a.close(), b.close()))  # (close sets `room`: no wait here either)


@pytest.mark.parametrize("primitive", ["Flag", "Bell"])
def test_a_waiter_wakes_as_soon_as_it_is_woken(primitive: str) -> None:
    # (the waits above are steps of 10 ms: a wake-up that never came would
    # pass them; this one waits up to LIMIT)
    flag, bell = Flag(), Bell()
    wait = {"Flag": lambda: flag.wait(LIMIT), "Bell": lambda: bell.wait_unless(lambda: False, LIMIT)}
    wake = {"Flag": flag.set, "Bell": bell.ring}
    for _ in range(20):
        flag.clear()
        took: List[float] = []

        def waiter() -> None:
            t0 = time.monotonic()
            wait[primitive]()
            took.append(time.monotonic() - t0)

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        time.sleep(0.01)
        wake[primitive]()
        thread.join(LIMIT + 1)
        assert took and took[0] < LIMIT / 2, took


def test_waits_are_always_timed() -> None:
    flag = Flag()
    assert flag.wait(-1) is False and flag.wait(0) is False
    with pytest.raises(TypeError):
        flag.wait()  # type: ignore[call-arg]
    flag.set()
    assert flag.wait(-1) is True
