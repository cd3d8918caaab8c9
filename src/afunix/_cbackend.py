"""The C backend: a thin adapter over the cffi-compiled core (csrc/).

One Python function per C function, named as the C function without its
``afunix_`` prefix.  C returns a count or -errno; ``_check`` turns the latter
into OSError, which gives the stdlib's own subclasses.
"""
from __future__ import annotations

import _socket
import importlib
import os
import socket
from pathlib import Path
from typing import Any, Callable

from ._version import __version__


def _missing_reason() -> str:
    note = Path(__file__).with_name("_core_missing.txt")
    if note.exists():
        return "the build recorded: " + note.read_text().strip()
    return "the extension module afunix._afunix_core is not installed"


def checked_core(expected_version: str) -> tuple[Any, Any]:
    """Import the compiled core and refuse it unless it was built for `expected_version`."""
    try:
        core = importlib.import_module("afunix._afunix_core")
    except ImportError as exc:
        raise ImportError(
            "afunix C core unavailable (%s; import said: %s)" % (_missing_reason(), exc)
        ) from exc
    ffi, lib = core.ffi, core.lib
    built_for = ffi.string(lib.afunix_version()).decode()
    if built_for != expected_version:
        raise ImportError(
            "afunix C core is stale: built for %s, package is %s; rebuild it "
            "(pip install --force-reinstall --no-deps .)" % (built_for, expected_version)
        )
    return ffi, lib


ffi, lib = checked_core(__version__)


def _check(rc: int) -> int:
    """Return rc, or raise OSError(-rc) when C reported an error."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def socketpairs(n: int, type: int, blocking: bool) -> list[tuple[socket.socket, socket.socket]]:
    """Create n pairs in one C call (SOCK_CLOEXEC, SOCK_NONBLOCK when asked)."""
    fds = ffi.new("int[]", 2 * n) if n else ffi.NULL
    _check(lib.afunix_socketpairs(type, 0 if blocking else 1, n, fds))
    return _wrap_pairs(ffi.unpack(fds, 2 * n) if n else [], type, blocking)


def _plain_socket_maker() -> Callable[[int, int], socket.socket]:
    """A maker of socket.socket(AF_UNIX, type, 0, fd), cheaper where it is safe.

    socket.socket.__init__ is a Python function that calls the C initializer
    and sets two slots; calling those steps directly saves about a third of
    the cost of each object.  Only done when socket.socket has exactly the
    slots we know (CPython 3.9 to 3.13); otherwise use the constructor.
    """
    cls = socket.socket
    if getattr(cls, "__slots__", None) != ["__weakref__", "_io_refs", "_closed"]:
        return lambda family_type, fd: cls(socket.AF_UNIX, family_type, 0, fd)
    new = cls.__new__
    init = _socket.socket.__init__

    def make(family_type: int, fd: int) -> socket.socket:
        s = new(cls)
        init(s, socket.AF_UNIX, family_type, 0, fd)
        s._io_refs = 0  # type: ignore[attr-defined]
        s._closed = False  # type: ignore[attr-defined]
        return s

    return make


_make_socket = _plain_socket_maker()


def _wrap_pairs(fds: list[int], type: int, blocking: bool) -> list[tuple[socket.socket, socket.socket]]:
    # Telling socket.socket the type with SOCK_NONBLOCK set makes it start in
    # non-blocking mode without another fcntl (the descriptor already is).
    full_type = type if blocking else type | socket.SOCK_NONBLOCK
    made: list[socket.socket] = []
    make = _make_socket
    try:
        for fd in fds:
            made.append(make(full_type, fd))
    except BaseException:
        for s in made:
            s.close()
        for fd in fds[len(made):]:
            os.close(fd)
        raise
    it = iter(made)
    return list(zip(it, it))
