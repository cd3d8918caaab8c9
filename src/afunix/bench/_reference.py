"""The C reference loops (csrc/reference/): what this machine allows, without Python.

They live in their own extension module, afunix.bench._afunix_reference,
built beside the product's core but never part of it.  When it is not built,
MISSING says why and the benchmark leaves out only its C column.  One
function per C function, named without the ``afunix_ref_`` prefix (the
channel's framing: ``chan_`` for ``afunix_chan_ref_``); each returns a count
or raises OSError.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

ffi: Any = None
lib: Any = None
MISSING: Optional[str] = None  # why the module cannot be used, or None when it can
try:
    _compiled = importlib.import_module("afunix.bench._afunix_reference")
except ImportError as exc:
    _note = Path(__file__).with_name("_reference_missing.txt")
    _why = ("its build failed: " + _note.read_text().strip()) if _note.exists() else str(exc)
    MISSING = "the C reference loops are not built (%s)" % _why
else:
    ffi, lib = _compiled.ffi, _compiled.lib


def _check(rc: int) -> int:
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def socketpairs(type: int, n: int) -> list[int]:
    """Create n socketpairs in a C loop of socketpair(); return the 2 * n descriptors."""
    fds = ffi.new("int[]", max(2 * n, 1))
    _check(lib.afunix_ref_socketpairs(type, n, fds))
    return list(ffi.unpack(fds, 2 * n))


def close_all(fds: list[int]) -> None:
    """Close every descriptor in fds, in C."""
    lib.afunix_ref_close_all(fds, len(fds))


def send(fd: int, count: int, size: int, batch: int) -> int:
    """Send count numbered messages of size bytes, batch per sendmmsg."""
    return _check(lib.afunix_ref_send(fd, count, size, batch))


def recv(fd: int, count: int, size: int, batch: int) -> tuple[int, int]:
    """Receive count messages, batch per recvmmsg; return (count, checksum)."""
    checksum = ffi.new("uint64_t *")
    got = _check(lib.afunix_ref_recv(fd, count, size, batch, checksum))
    return got, int(checksum[0])


def stream_send(fd: int, count: int, size: int, batch: int) -> int:
    """Write count numbered chunks of size bytes, batch per sendmmsg."""
    return _check(lib.afunix_ref_stream_send(fd, count, size, batch))


def stream_recv(fd: int, count: int, size: int) -> tuple[int, int]:
    """Read count chunks of size bytes from a stream; return (chunks, checksum)."""
    checksum = ffi.new("uint64_t *")
    got = _check(lib.afunix_ref_stream_recv(fd, count, size, checksum))
    return got, int(checksum[0])


def send_fds(fd: int, count: int, size: int, batch: int, fds: list[int]) -> int:
    """Send count numbered messages each carrying fds, batch per sendmmsg."""
    return _check(lib.afunix_ref_send_fds(fd, count, size, batch, fds, len(fds)))


def recv_fds(fd: int, count: int, size: int, batch: int, maxfds: int) -> tuple[int, int, int]:
    """Receive count messages with descriptors, closing them; return (count, checksum, closed)."""
    checksum = ffi.new("uint64_t *")
    closed = ffi.new("int64_t *")
    rc = lib.afunix_ref_recv_fds(fd, count, size, batch, maxfds, checksum, closed)
    _check(rc)
    return rc, int(checksum[0]), int(closed[0])


def ping(fd: int, count: int, size: int) -> list[int]:
    """Make count round trips; return each one's time in nanoseconds."""
    rtt = ffi.new("int64_t[]", max(count, 1))
    done = _check(lib.afunix_ref_ping(fd, count, size, rtt))
    return list(ffi.unpack(rtt, done))


def echo(fd: int, count: int, size: int) -> int:
    """Echo count messages back to the sender."""
    return _check(lib.afunix_ref_echo(fd, count, size))


def chan_send(fd: int, count: int, size: int, batch: int, seqpacket: bool) -> int:
    """Send count numbered frames of size payload bytes, batch frames packed per write."""
    return _check(lib.afunix_chan_ref_send(fd, count, size, batch, int(seqpacket)))


def chan_recv(fd: int, count: int, size: int) -> tuple[int, int]:
    """Receive count frames, parsing the byte stream in C; return (count, checksum)."""
    checksum = ffi.new("uint64_t *")
    got = _check(lib.afunix_chan_ref_recv(fd, count, size, checksum))
    return got, int(checksum[0])
