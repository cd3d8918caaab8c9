"""A storm of SIGALRM whose handler raises inside afunix: shared by the signal tests.

The handler raises only where afunix's own code, or standard library code
it called, runs on behalf of the calling test file: an exception in the
test's own frames would be the test's loss, not afunix's.
"""
from __future__ import annotations

import os
import random
import signal
import socket
from types import FrameType
from typing import Dict, Optional, Tuple

import afunix

AFUNIX_DIR = os.path.dirname(os.path.abspath(afunix.__file__)) + os.sep
STDLIB_DIR = os.path.dirname(os.path.abspath(socket.__file__)) + os.sep


class Storm(BaseException):
    """What the timer's handler raises: a BaseException, as KeyboardInterrupt is."""


def in_afunix(frame: Optional[FrameType], caller: str, outside: Tuple[str, ...]) -> bool:
    """Whether `frame` runs afunix code, or stdlib code afunix called, for the file `caller`.

    Left out: the caller's own frames, finalizers (an exception from
    __del__ is only printed), hooks of the test runner, and code under the
    paths `outside` even where afunix called it (the event loop's
    machinery, say: an exception inside add_reader breaks the loop's
    bookkeeping, not afunix's).
    """
    if frame is None:
        return False
    innermost = frame.f_code.co_filename
    if not (innermost.startswith(AFUNIX_DIR) or innermost.startswith(STDLIB_DIR)
            or innermost == "<string>"):  # namedtuple's __new__
        return False
    found = False
    while frame is not None:
        filename = frame.f_code.co_filename
        if frame.f_code.co_name == "__del__" or filename.startswith(outside):
            return False
        if filename.startswith(AFUNIX_DIR):
            found = True
        elif filename == caller:
            return found
        elif not found and not (filename.startswith(STDLIB_DIR) or filename == "<string>"):
            return False
        frame = frame.f_back
    return False


class Timer:
    """SIGALRM every `interval` seconds; while armed, the handler raises Storm with probability p.

    Only inside afunix on behalf of `caller` (a test file's path), never
    under `outside` (see in_afunix).
    """

    def __init__(self, seed: int, caller: str, outside: Tuple[str, ...] = (),
                 interval: float = 100e-6, p: float = 0.3) -> None:
        self.rng = random.Random(seed)
        self.caller = caller
        self.outside = outside
        self.interval = interval
        self.p = p
        self.armed = False
        self.ticks = 0
        self.raised = 0
        self.where: Dict[str, int] = {}

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        self.ticks += 1
        if (not self.armed or self.rng.random() >= self.p
                or not in_afunix(frame, self.caller, self.outside)):
            return
        self.raised += 1
        assert frame is not None
        key = "%s:%s" % (os.path.basename(frame.f_code.co_filename), frame.f_lineno)
        self.where[key] = self.where.get(key, 0) + 1
        raise Storm()

    def __enter__(self) -> "Timer":
        self._previous = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)
        return self

    def __exit__(self, *exc: object) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self._previous)
