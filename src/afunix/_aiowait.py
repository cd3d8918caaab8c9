"""Waiting in afunix.aio: the one async "try the call, then wait on the loop" helper.

`call_when_ready` is the async twin of `_io.call_when_ready`: every
coroutine of afunix.aio makes its non-blocking call through it.  The
readiness waits are a reader (or writer) callback on the asyncio loop
(the default loop and uvloop), shared by every task waiting on the same
descriptor and direction, or trio's own waits (afunix._trio) when trio
runs the task.
"""
from __future__ import annotations

import asyncio
import importlib
import sys
from types import ModuleType
from typing import Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

R = TypeVar("R")
_trio_module: List[ModuleType] = []  # afunix._trio, once trio itself was imported


def trio_running() -> Optional[ModuleType]:
    """afunix._trio when the calling task runs under trio, else None (asyncio, uvloop).

    A program that never imported trio runs on asyncio: one dict lookup.
    Otherwise sniffio (a dependency of trio) names the running library.
    """
    if "trio" not in sys.modules:
        return None
    if not _trio_module:
        _trio_module.append(importlib.import_module("afunix._trio"))
    trio_support = _trio_module[0]
    return trio_support if trio_support.running() else None


async def sleep(seconds: float) -> None:
    """``asyncio.sleep``, or ``trio.sleep`` under trio."""
    trio_support = trio_running()
    if trio_support is not None:
        await trio_support.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


# (loop, fd, writable) -> the futures of the tasks waiting for that event.
# One reader (or writer) callback per descriptor and direction, shared by all
# of its waiters: add_reader replaces an earlier callback for the same
# descriptor, which would strand the first waiter.
Key = Tuple[asyncio.AbstractEventLoop, int, bool]
waiters: Dict[Key, List["asyncio.Future[None]"]] = {}


def is_waiting(fd: int, writable: bool) -> bool:
    """Whether a task of the running loop waits on `fd` in that direction (for tests)."""
    trio_support = trio_running()
    if trio_support is not None:
        return bool(trio_support.is_waiting(fd, writable))
    return (asyncio.get_running_loop(), fd, writable) in waiters


def _wake(key: Key) -> None:
    for fut in waiters.get(key, ()):
        if not fut.done():
            fut.set_result(None)


async def wait(fd: int, writable: bool) -> None:
    """Wait until `fd` is readable (or writable), with a reader/writer callback on the loop.

    Under trio, on trio's own readiness waits (afunix._trio).  Either way
    the caller tries its call again: a wake-up may find nothing to do.
    """
    trio_support = trio_running()
    if trio_support is not None:
        await trio_support.wait(fd, writable)
        return
    loop = asyncio.get_running_loop()
    key = (loop, fd, writable)
    fut: asyncio.Future[None] = loop.create_future()
    _enlist(key, fut)
    try:
        await fut
    finally:
        _leave(key, fut)


async def wait_either(fd: int) -> None:
    """Wait until `fd` is readable or writable, whichever comes first (see `wait`)."""
    trio_support = trio_running()
    if trio_support is not None:
        await trio_support.wait_either(fd)
        return
    loop = asyncio.get_running_loop()
    keys = [(loop, fd, False), (loop, fd, True)]
    fut: asyncio.Future[None] = loop.create_future()  # one future, woken by either callback
    try:
        for key in keys:
            _enlist(key, fut)
        await fut
    finally:
        for key in keys:
            if fut in waiters.get(key, ()):
                _leave(key, fut)


# (loop, fd) -> the futures of the tasks waiting for `wake` (or a pause to
# end): a wait tied to no readiness event of the descriptor.
Bell = Tuple[asyncio.AbstractEventLoop, int]
ringing: Dict[Bell, List["asyncio.Future[None]"]] = {}


async def wait_woken(fd: int, seconds: float) -> None:
    """Wait until `wake` (or `notify_closing`) for `fd`, or `seconds` passed.

    For a task whose descriptor stays ready while the thing it waits for
    is elsewhere (a sender waiting for slots while messages nobody took
    keep its socket readable): a readiness wait would return at once.  The
    task is enlisted before this coroutine first yields, so a `wake` from
    another task at any point after the call is never missed.
    """
    trio_support = trio_running()
    if trio_support is not None:
        await trio_support.wait_woken(fd, seconds)
        return
    loop = asyncio.get_running_loop()
    bell = (loop, fd)
    fut: asyncio.Future[None] = loop.create_future()
    futures = ringing.setdefault(bell, [])
    futures.append(fut)
    timer = loop.call_later(seconds, _done, fut)
    try:
        await fut
    finally:
        timer.cancel()
        futures.remove(fut)
        if not futures and ringing.get(bell) is futures:
            del ringing[bell]


def _done(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


def _ring(bell: Bell) -> None:
    for fut in ringing.get(bell, ()):
        _done(fut)


def _enlist(key: Key, fut: "asyncio.Future[None]") -> None:
    loop, fd, writable = key
    futures = waiters.get(key)
    if futures is None:
        if writable:
            loop.add_writer(fd, _wake, key)
        else:
            loop.add_reader(fd, _wake, key)
        futures = waiters[key] = []
    futures.append(fut)


def _leave(key: Key, fut: "asyncio.Future[None]") -> None:
    loop, fd, writable = key
    futures = waiters.get(key)
    if futures is None or fut not in futures:
        return  # (dropped by notify_closing; the key may be a new descriptor's by now)
    futures.remove(fut)
    if not futures:
        del waiters[key]
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def notify_closing(fd: int) -> None:
    """Wake the tasks of the running loop (or trio run) waiting on `fd`, which is about to close.

    A descriptor closed under a readiness wait never reports ready (epoll
    drops it silently), so its waiters would wait forever; woken, each
    tries its call again and meets the closed object's error.  Called
    outside a running loop: nothing of ours can be waiting there.

    Call it before the close: the reader and writer callbacks on `fd` go
    now, not when the woken tasks next run.  uvloop (libuv) registers a
    callback with epoll only at the loop's next poll, and aborts the
    process when that registration, or a later change, meets a closed or
    reused descriptor (EBADF, ENOENT).
    """
    trio_support = trio_running()
    if trio_support is not None:
        trio_support.notify_closing(fd)
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for writable in (False, True):
        key = (loop, fd, writable)
        if key in waiters:
            _wake(key)
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
            del waiters[key]  # (last: its woken tasks leave it as they run)
    _ring((loop, fd))


def wake(fd: int) -> None:
    """Wake the tasks of the running loop (or trio run) waiting for `fd` to be readable, or in `wait_woken`.

    For a task waiting on something a readiness event would not report
    (the async channel's sender waiting for slots another task's receive
    took back, a receive waiting for messages a send read in): woken, it
    tries its call again.  trio ends a readiness wait only through
    notify_closing, which wakes both directions; the descriptor stays
    open and later waits on it work as before.
    """
    trio_support = trio_running()
    if trio_support is not None:
        trio_support.notify_closing(fd)
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _wake((loop, fd, False))
    _ring((loop, fd))


async def call_when_ready(fd: Optional[int], writable: bool, attempt: Callable[[], R],
                          backoff: bool = False, blocked: bool = False,
                          wait_for: Optional[Callable[[], Awaitable[None]]] = None) -> R:
    """``attempt()``, tried again once `fd` is ready, until it does not raise BlockingIOError.

    The one async "try, then wait on the loop" of afunix.aio (the sync twin
    is `_io.call_when_ready`).  `attempt` is a synchronous non-blocking call
    and this coroutine returns straight after the try that succeeds, with no
    await in between: a task cancelled here is cancelled while it waits, when
    nothing has been taken, so nothing received is ever dropped.  Any error
    but BlockingIOError goes to the caller.

    `attempt` takes no arguments (a lambda around the call, or a bound
    method), and is a Python function: ``attempt()`` is then a plain call,
    where the interpreter looks for a pending signal on the way in, not on
    the way out.  ``attempt(*args)`` would check on the way out too, and a
    signal handler's exception raised there drops what the try received.

    Under trio the call is a checkpoint, as trio's own socket methods are:
    a cancelled scope raises before the first try, and a try that succeeds
    at once is followed by a cancel-shielded yield, so what it took is
    returned.  Under asyncio a try that succeeds at once adds no await.

    With `backoff`, for sends: a wait that found the socket writable and
    the send still refused is followed by a pause that grows to 50 ms (an
    unconnected SOCK_DGRAM socket whose receiver's queue is full polls
    writable all along).  `fd` None: nothing to wait on (a connect to a
    full backlog), only the growing pause.

    `blocked`: the caller made the first try itself, outside trio, and it
    raised BlockingIOError; the loop starts with the wait.  (afunix.aio's
    single calls do so to spare a coroutine when their data is ready.)

    `wait_for`: awaited instead of the wait on `fd`, for a caller that
    knows best what to wait for after each refusal (the async channel:
    socket space, or the peer's returned slots).
    """
    trio_support = trio_running()
    if trio_support is not None:
        await trio_support.checkpoint_if_cancelled()
    pause = 0.0
    waited = False
    while True:
        if blocked:
            blocked = False
        else:
            try:
                result = attempt()
            except BlockingIOError:
                pass
            else:
                if trio_support is not None and not waited:
                    await trio_support.cancel_shielded_checkpoint()
                return result
        if backoff:
            if pause or fd is None:
                # Writable, and still EAGAIN: the kernel tracks the
                # writability of a connected peer only (see above), so
                # waiting for writability alone would spin.
                await sleep(pause or 0.001)
                pause = min((pause or 0.001) * 2, 0.05)
            else:
                pause = 0.001
        if wait_for is not None:
            await wait_for()
        elif fd is not None:
            await wait(fd, writable)
        waited = True
