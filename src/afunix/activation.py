"""Socket activation and readiness: the sockets a service manager passed, and sd_notify.

The protocol is systemd's (sd_listen_fds(3), sd_notify(3)), also spoken by
``systemd-socket-activate`` and other supervisors: descriptors from 3 on,
counted by LISTEN_FDS, for the process named by LISTEN_PID, optionally named
by LISTEN_FDNAMES; readiness as a datagram to $NOTIFY_SOCKET.
"""
from __future__ import annotations

import errno
import os
import socket
from typing import Dict, List, Tuple, Union

from .addresses import MAX_ABSTRACT_BYTES
from .capabilities import MAX_PATH_BYTES

__all__ = ["LISTEN_FDS_START", "listen_fds", "listen_fds_with_names", "notify"]

#: The first passed descriptor (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _parse_count(name: str, value: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise ValueError("%s=%r is not a number" % (name, value)) from None
    if n < 0:
        raise ValueError("%s=%r is negative" % (name, value))
    return n


def _passed() -> List[Tuple[str, int]]:
    pid_text = os.environ.get("LISTEN_PID")
    if not pid_text:
        return []
    # LISTEN_PID guards against a child that inherited the environment (but
    # not the descriptors' meaning) taking them for its own.
    if _parse_count("LISTEN_PID", pid_text) != os.getpid():
        return []
    n = _parse_count("LISTEN_FDS", os.environ.get("LISTEN_FDS", "0"))
    names_text = os.environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = ["unknown"] * n
    else:
        names = names_text.split(":") if n else []
        if len(names) != n:
            raise ValueError(
                "LISTEN_FDNAMES has %d names for LISTEN_FDS=%d" % (len(names), n)
            )
    return [(names[i], LISTEN_FDS_START + i) for i in range(n)]


# The socket object made for each passed descriptor, by process: a socket
# object owns its descriptor (it closes it when collected), so a second call
# must hand out the same objects, never a second owner of the same number.
_adopted: Dict[Tuple[int, int], socket.socket] = {}


def _as_socket(fd: int) -> socket.socket:
    key = (os.getpid(), fd)
    sock = _adopted.get(key)
    if sock is not None:
        return sock
    # Keep the descriptor's blocking mode as the manager set it (the open file
    # description may be shared with other processes) and make the socket
    # object agree with it: socket(fileno=...) alone reports blocking either way.
    blocking = os.get_blocking(fd)
    sock = socket.socket(fileno=fd)
    sock.setblocking(blocking)
    _adopted[key] = sock
    return sock


def listen_fds_with_names(unset_environment: bool = False) -> List[Tuple[str, socket.socket]]:
    """The sockets passed by a service manager, with their names: like sd_listen_fds_with_names.

    Descriptors LISTEN_FDS_START (3) to 3 + LISTEN_FDS - 1 are taken when
    LISTEN_PID is this process; they are made close-on-exec and wrapped in
    socket.socket objects of the family and type the kernel reports, once:
    a later call returns the same objects (each owns its descriptor).  Names
    come from LISTEN_FDNAMES ("unknown" when it is not set).

    Args:
        unset_environment: remove LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES
            from os.environ (as sd_listen_fds does), so child processes do
            not see them; done even when this raises.

    Returns:
        A list of (name, socket) pairs, empty when nothing was passed to us.

    Raises:
        ValueError: the variables are malformed.
        OSError: a descriptor is not open (EBADF) or not a socket (ENOTSOCK);
            the descriptors are left open, as passed.
    """
    try:
        passed = _passed()
        for _, fd in passed:
            os.set_inheritable(fd, False)
        result: List[Tuple[str, socket.socket]] = []
        known = set(_adopted)
        try:
            for name, fd in passed:
                result.append((name, _as_socket(fd)))
        except BaseException:
            # The descriptors belong to the process, not to these objects:
            # hand back the ones made by this call rather than close them.
            for key in set(_adopted) - known:
                _adopted.pop(key).detach()
            raise
        return result
    finally:
        if unset_environment:
            for name in _LISTEN_VARS:
                os.environ.pop(name, None)


def listen_fds(unset_environment: bool = False) -> List[socket.socket]:
    """The sockets passed by a service manager: like sd_listen_fds, as socket objects.

    See `listen_fds_with_names`, which also gives LISTEN_FDNAMES.

    Returns:
        The sockets in descriptor order, empty when nothing was passed to us.
    """
    return [sock for _, sock in listen_fds_with_names(unset_environment)]


def _notify_address(value: str) -> bytes:
    raw = os.fsencode(value)
    if raw[:1] == b"@":
        # sd_notify's spelling of the abstract namespace.
        if len(raw) - 1 > MAX_ABSTRACT_BYTES:
            raise OSError(errno.EINVAL, "NOTIFY_SOCKET abstract name is too long")
        return b"\0" + raw[1:]
    if raw[:1] != b"/":
        raise OSError(errno.EAFNOSUPPORT, "NOTIFY_SOCKET=%r is not a path or @name" % value)
    if len(raw) > MAX_PATH_BYTES:
        raise OSError(errno.EINVAL, "NOTIFY_SOCKET path is too long")
    return raw


def notify(state: Union[str, bytes], unset_environment: bool = False) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager: like sd_notify.

    One datagram to $NOTIFY_SOCKET, a path or "@abstract-name".

    Args:
        state: newline-separated VAR=value assignments, str or bytes, not empty.
        unset_environment: remove NOTIFY_SOCKET from os.environ afterwards.

    Returns:
        True when sent; False when NOTIFY_SOCKET is not set (not supervised).

    Raises:
        TypeError, ValueError: `state` is not str/bytes or is empty.
        OSError: NOTIFY_SOCKET is unusable or the send failed.
    """
    if isinstance(state, str):
        data = state.encode("utf-8")
    elif isinstance(state, (bytes, bytearray)):
        data = bytes(state)
    else:
        raise TypeError("state must be str or bytes, not %s" % type(state).__name__)
    if not data:
        raise ValueError("state must not be empty")
    value = os.environ.get("NOTIFY_SOCKET")
    try:
        if not value:
            return False
        address = _notify_address(value)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(data, address)
        return True
    finally:
        if unset_environment:
            os.environ.pop("NOTIFY_SOCKET", None)
