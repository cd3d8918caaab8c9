"""Argument checks shared by the topic modules: run before any system call."""
from __future__ import annotations

import array
import errno
import operator
import socket
import sys
from typing import Any, Optional

from .capabilities import supports

SOCKET_TYPES = {
    socket.SOCK_STREAM: "SOCK_STREAM",
    socket.SOCK_DGRAM: "SOCK_DGRAM",
    socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
}


def as_int(value: Any, what: str) -> int:
    """`value` as an int, TypeError when it is not an integer (bool included, as in the stdlib)."""
    if type(value) is int:  # the common case, without a call
        return value
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError("%s must be an integer, not %s" % (what, type(value).__name__)) from None


def index(value: Any, container: str) -> int:
    """`value` as a sequence index (operator.index), else TypeError as a list gives."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError("%s indices must be integers, not %s"
                        % (container, type(value).__name__)) from None


def in_range(value: Any, what: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], else TypeError / ValueError naming the bounds."""
    n = as_int(value, what)
    if not low <= n <= high:
        raise ValueError("%s must be from %d to %d, got %d" % (what, low, high, n))
    return n


#: The largest C int: descriptors, MSG_* flags and the pid, uid and gid of
#: credentials are C ints to both backends (and to the kernel's calls).
C_INT_MAX = (1 << 31) - 1


def msg_flags(value: Any) -> int:
    """MSG_* flags for a send or receive: an int from 0 to C_INT_MAX."""
    if type(value) is int and 0 <= value <= C_INT_MAX:  # the common case, without a call
        return value
    return in_range(value, "flags", 0, C_INT_MAX)


def descriptor(value: Any) -> int:
    """A descriptor number: an int from 0 to C_INT_MAX."""
    if type(value) is int and 0 <= value <= C_INT_MAX:
        return value
    return in_range(value, "descriptor", 0, C_INT_MAX)


#: Where the sign bit of a 4-byte C int is: the index of its most significant byte.
_HIGH_BYTE = 3 if sys.byteorder == "little" else 0
_INT = {int}


def descriptor_array(values: list[Any]) -> Optional["array.array[int]"]:
    """`values` as an array of 4-byte C ints when every one is an int (exactly) from 0 to C_INT_MAX; else None.

    The check of a whole batch of descriptor numbers at once; None sends
    the caller to its per-item checks, which raise the right error.
    array("I") converts each int with one C call (array("i") goes through
    the argument parser for each, several times the cost) and refuses a
    negative number or one over UINT_MAX with OverflowError; one over
    C_INT_MAX has the top bit of its most significant byte set, and
    isascii() tests every such byte at once.  The bits of a number from 0
    to C_INT_MAX are the same as a C int's.
    """
    if set(map(type, values)) != _INT:  # bool, int subclasses, objects: per item
        return None
    try:
        numbers = array.array("I", values)
    except OverflowError:
        return None
    if numbers.itemsize != 4:  # pragma: no cover - no such platform is supported
        return None if min(values) < 0 or max(values) > C_INT_MAX else numbers
    if not numbers.tobytes()[_HIGH_BYTE::4].isascii():
        return None
    return numbers


def credentials(value: Any) -> tuple[int, int, int]:
    """Credentials to send: (pid, uid, gid), each an int from 0 to C_INT_MAX.

    Both backends pass them to the kernel as C ints; a negative one is
    never valid there (ESRCH or EINVAL), so it is refused here too.
    """
    try:
        pid, uid, gid = value
    except (TypeError, ValueError):
        raise TypeError("credentials must be (pid, uid, gid), not %r" % (value,)) from None
    return (in_range(pid, "credentials pid", 0, C_INT_MAX),
            in_range(uid, "credentials uid", 0, C_INT_MAX),
            in_range(gid, "credentials gid", 0, C_INT_MAX))


def socket_type(value: Any) -> int:
    """A socket type afunix handles: SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET."""
    t = as_int(value, "type")
    if t not in SOCKET_TYPES:
        raise ValueError(
            "type must be socket.SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET, got %d" % t
        )
    return t


def supported_socket_type(value: Any) -> int:
    """`socket_type`, plus OSError(EPROTONOSUPPORT) where SOCK_SEQPACKET is missing (macOS)."""
    t = socket_type(value)
    if t == socket.SOCK_SEQPACKET and not supports("seqpacket"):
        raise OSError(
            errno.EPROTONOSUPPORT, "SOCK_SEQPACKET is not supported on this platform"
        )
    return t
