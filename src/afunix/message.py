"""Value types of afunix: Message, Credentials, TruncatedError, and close_fds."""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Optional, Tuple, Union

from . import _backend, _checks

#: What an AF_UNIX address looks like in Python, as the socket module gives it:
#: a filesystem path as str, an abstract name as bytes starting with NUL.
Address = Union[str, bytes]
#: What the calls that take an address accept: an `Address`, or a path as os.PathLike.
AddressLike = Union[Address, "os.PathLike[str]", "os.PathLike[bytes]"]


class Credentials(NamedTuple):
    """A peer's process credentials (struct ucred): SO_PEERCRED or SCM_CREDENTIALS."""

    pid: int
    uid: int
    gid: int


class Message(NamedTuple):
    """One message: its bytes, descriptors, address, flags and credentials.

    Immutable and compared by value.  On send, `address` is the destination
    (for an unconnected SOCK_DGRAM socket), `fds` the descriptors to pass and
    `credentials` explicit SCM_CREDENTIALS for the kernel to check; `flags`
    is ignored.  On receive, `flags` holds the kernel's msg_flags for this
    message (MSG_TRUNC, MSG_CTRUNC, ...), `fds` the received descriptors,
    owned by the caller and close-on-exec, `address` the sender's and
    `credentials` the sender's when SO_PASSCRED is on.
    """

    data: bytes
    fds: Tuple[int, ...] = ()
    address: Optional[Address] = None
    flags: int = 0
    credentials: Optional[Credentials] = None


class TruncatedError(OSError):
    """The kernel cut the control data of a message (MSG_CTRUNC).

    Raised by `recv_fds`.  The descriptors that did arrive are already
    closed; the message's bytes are kept in `.data`, with `.flags` and
    `.address`, so nothing is lost but the descriptors.
    """

    def __init__(self, data: bytes, flags: int, address: Optional[Address]) -> None:
        super().__init__(
            "control data truncated (MSG_CTRUNC): descriptors were lost and "
            "the ones that arrived have been closed"
        )
        self.data = data
        self.flags = flags
        self.address = address


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor in `fds`, ignoring ones already closed (EBADF).

    Each is checked first: a bad one (not an integer, out of range) is a
    TypeError or ValueError, and then none is closed.  The C backend
    closes a whole list in one call.
    """
    fds = fds if isinstance(fds, list) else list(fds)
    if not fds:
        return
    numbers = _checks.descriptor_array(fds)
    if numbers is not None:  # the common case, checked and converted in bulk
        _backend.impl.close_fds(numbers)
        return
    # Checked here, every one before any is closed, not by each backend
    # with its own errors (the stdlib one would close those before a bad
    # one).  A negative one that fits a C int is EBADF to both: ignored.
    fds = [_checks.as_int(fd, "descriptor") for fd in fds]
    top, bottom = max(fds), min(fds)
    if top > _checks.C_INT_MAX or bottom < -_checks.C_INT_MAX - 1:
        raise ValueError("descriptor must be from 0 to %d, got %d"
                         % (_checks.C_INT_MAX, top if top > _checks.C_INT_MAX else bottom))
    _backend.impl.close_fds(fds)
