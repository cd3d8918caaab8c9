"""Waking threads that wait for something to change, safe against a signal handler's exception.

`threading.Condition` and `threading.Event` are written in Python around
a lock: `Condition.__enter__` acquires the lock and returns through Python
code, where CPython (3.11 and later after every call, earlier at other
points too) runs a pending signal handler.  An exception the handler
raises there leaves `__enter__` with the lock held and the `with` block
never entered, so nothing releases it: every later `set`, `wait` or
`notify_all` of that object waits for ever.  The channel sets its lane's
`room` and wakes callers waiting for a borrow from code a signal can
interrupt (docs/reliability.md), so it uses these instead.

Neither class holds a lock of its own: a waiter puts a lock it acquired
itself on a list, and a wake releases the locks it pops from that list.
List appends and pops are single steps for the interpreter (CPython and
PyPy), so an exception between two steps loses at most one notice, never a
lock.  Every wait is timed by its caller: a lost notice costs that one
step.
"""
from __future__ import annotations

import _thread
from typing import Callable, List

__all__ = ["Bell", "Flag"]


class Bell:
    """Wakes the threads waiting on it: `threading.Condition.notify_all` without the condition's lock."""

    __slots__ = ("sleepers",)

    def __init__(self) -> None:
        #: one lock per waiting thread, acquired by that thread, released to
        #: wake it; read it to skip a ring nobody waits for (a waiter stopped
        #: by an exception may leave its lock: the next ring takes it)
        self.sleepers: List[_thread.LockType] = []

    def ring(self) -> None:
        """Wake every thread waiting now."""
        sleepers = self.sleepers
        while sleepers:
            try:
                sleeper = sleepers.pop()
            except IndexError:  # another ring took the last one
                return
            sleeper.release()  # (popped once, so released once)

    def wait_unless(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait until rung, or `timeout` seconds, unless `done()` is true.

        `done()` is called after this thread is on the list: a ring after
        the change `done` looks for wakes it, so no notice falls between
        the look and the wait.  Always timed: a ring stopped between taking
        this thread's lock off the list and releasing it wakes nobody.
        """
        if timeout <= 0:
            return
        sleeper = _thread.allocate_lock()
        sleeper.acquire()
        self.sleepers.append(sleeper)
        try:
            if not done():
                sleeper.acquire(True, timeout)
        finally:
            try:
                self.sleepers.remove(sleeper)
            except ValueError:  # popped by a ring
                pass


class Flag:
    """`threading.Event` (set, clear, is_set, and wait with a timeout), built on `Bell`."""

    __slots__ = ("_set", "_bell")

    def __init__(self) -> None:
        self._set = False
        self._bell = Bell()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True  # before the ring: a waiter that looks after its append sees it
        self._bell.ring()

    def clear(self) -> None:
        self._set = False

    def wait(self, timeout: float) -> bool:
        """Wait until set, or `timeout` seconds; whether it is set (as `threading.Event.wait`, always timed)."""
        if not self._set:
            self._bell.wait_unless(self.is_set, timeout)
        return self._set
