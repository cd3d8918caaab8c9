"""afunix.aio under trio: readiness waits, sleeps and checkpoints on trio's own primitives.

Imported by afunix.aio only once trio itself has been imported, so asyncio
programs never need trio (or sniffio, which trio depends on).

trio lets one task at a time wait for a descriptor in one direction
(``wait_readable`` raises BusyResourceError for a second waiter), where
afunix.aio promises that several tasks may wait on one socket.  So the
first task to wait calls ``wait_readable``/``wait_writable`` and the
others wait on an Event it sets when it returns, for any reason: readiness,
or its own cancellation.  Every woken task tries its call again and waits
again on EAGAIN, so a wake-up that finds nothing to do costs one system
call and loses nothing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import sniffio
import trio

# (run, fd, writable) -> the Event of the task waiting on trio for that event.
# The run's token is in the key: two trio runs in two threads are unrelated.
_Key = Tuple[object, int, bool]
_leaders: Dict[_Key, trio.Event] = {}
# (run, fd) -> the Event of the tasks in wait_woken, and how many wait on it
_bells: Dict[Tuple[object, int], List[Any]] = {}

sleep = trio.sleep
#: Raise Cancelled if the surrounding scope is cancelled; never yields otherwise.
checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
#: Yield to the scheduler without raising Cancelled (after a call that took something).
cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint


def running() -> bool:
    """Whether the calling task runs under trio (sniffio asks the running library)."""
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


async def wait(fd: int, writable: bool) -> None:
    """Wait until `fd` may be readable (or writable): the caller tries again either way."""
    key = (trio.lowlevel.current_trio_token(), fd, writable)
    leader = _leaders.get(key)
    if leader is not None:
        await leader.wait()
        return
    woken = _leaders[key] = trio.Event()
    try:
        if writable:
            await trio.lowlevel.wait_writable(fd)
        else:
            await trio.lowlevel.wait_readable(fd)
    except trio.ClosedResourceError:
        pass  # notify_closing: the caller's next try meets the closed object
    finally:
        del _leaders[key]
        woken.set()


async def wait_either(fd: int) -> None:
    """Wait until `fd` may be readable or writable, or notify_closing(fd): the first ends the others.

    The two readiness waits run in child tasks, which start only at a later
    turn of the scheduler, and trio's notify_closing reaches only the
    waits already parked: a wake in between would be lost.  So the bell
    of `wait_woken` is enlisted first, before anything yields, and a wake
    from then on ends this wait.
    """
    key, bell = _enlist(fd)
    try:
        async with trio.open_nursery() as nursery:
            async def one(writable: bool) -> None:
                await wait(fd, writable)
                nursery.cancel_scope.cancel()

            async def rung() -> None:
                await bell[0].wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(rung)
            nursery.start_soon(one, False)
            nursery.start_soon(one, True)
    finally:
        _leave(key, bell)


async def wait_woken(fd: int, seconds: float) -> None:
    """Wait until notify_closing(fd), or `seconds` passed (see _aiowait.wait_woken)."""
    key, bell = _enlist(fd)
    try:
        with trio.move_on_after(seconds):
            await bell[0].wait()
    finally:
        _leave(key, bell)


def _enlist(fd: int) -> Tuple[Tuple[object, int], List[Any]]:
    """The bell notify_closing(fd) rings, with one more task counted on it."""
    key = (trio.lowlevel.current_trio_token(), fd)
    bell = _bells.get(key)
    if bell is None:
        bell = _bells[key] = [trio.Event(), 0]
    bell[1] += 1
    return key, bell


def _leave(key: Tuple[object, int], bell: List[Any]) -> None:
    bell[1] -= 1
    if not bell[1] and _bells.get(key) is bell:
        del _bells[key]


def notify_closing(fd: int) -> None:
    """Wake this run's waits on `fd` before it is closed (see _aiowait.notify_closing), and those in wait_woken."""
    trio.lowlevel.notify_closing(fd)
    bell = _bells.pop((trio.lowlevel.current_trio_token(), fd), None)
    if bell is not None:
        bell[0].set()


def is_waiting(fd: int, writable: bool) -> bool:
    """Whether a task of this trio run waits on `fd` in that direction (for tests)."""
    return (trio.lowlevel.current_trio_token(), fd, writable) in _leaders
