"""The stdlib backend: the same functions as _cbackend, on the socket module only.

Used where the C core is not built, and forced with AFUNIX_BACKEND=stdlib.
"""
from __future__ import annotations

import array
import os
import socket
from typing import Any, List, Optional, Tuple

from ._io import Outgoing, nonblocking_twin


def socketpairs(n: int, type: int, blocking: bool) -> list[tuple[socket.socket, socket.socket]]:
    """Create n pairs with socket.socketpair(); on failure close the ones made."""
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(n):
            a, b = socket.socketpair(socket.AF_UNIX, type)
            pairs.append((a, b))
            if not blocking:
                a.setblocking(False)
                b.setblocking(False)
    except BaseException:
        for a, b in pairs:
            a.close()
            b.close()
        raise
    return pairs


# ---- batched message I/O --------------------------------------------------

MAX_BATCH = 1024
_SCM_MAX_FD = 253
_CREDS = getattr(socket, "SCM_CREDENTIALS", None)
# plain ints: | and & on the socket module's enum flags are slow
_NOSIGNAL = int(getattr(socket, "MSG_NOSIGNAL", 0))
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_CRED_SPACE = socket.CMSG_SPACE(12) if _CREDS is not None else 0


def _io_socket(sock: socket.socket) -> tuple[socket.socket, bool]:
    """`sock`, or a non-blocking twin of it when it has a timeout (see nonblocking_twin)."""
    timeout = sock.gettimeout()
    if timeout:
        return nonblocking_twin(sock), True
    return sock, False


def send_batch(sock: socket.socket, out: Outgoing, start: int, count: int, flags: int) -> int:
    """sendmsg for each of out[start:start+count]; the count sent, or OSError."""
    s, twin = _io_socket(sock)
    sent = 0
    try:
        for i in range(start, start + count):
            ancillary: List[Tuple[int, int, bytes]] = []
            cred = out.credentials[i] if out.credentials is not None else None
            if cred is not None and _CREDS is not None:
                ancillary.append((socket.SOL_SOCKET, _CREDS, array.array("i", cred).tobytes()))
            if out.fds is not None and out.fds[i]:
                ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out.fds[i]).tobytes()))
            address = out.addresses[i] if out.addresses is not None else None
            try:
                if address is None:
                    s.sendmsg([out.datas[i]], ancillary, flags | _NOSIGNAL)
                else:
                    s.sendmsg([out.datas[i]], ancillary, flags | _NOSIGNAL, address)
            except OSError:
                if sent:
                    return sent  # as sendmmsg: the error shows on the next call
                raise
            sent += 1
            # after the first, take only what goes without waiting
            flags |= _DONTWAIT
    finally:
        if twin:
            s.detach()
    return sent


class Arena:
    """A receive area in a bytearray: max_messages x bufsize bytes, plus fds and addresses."""

    def __init__(self, max_messages: int, bufsize: int, maxfds: int) -> None:
        self.max_messages = max_messages
        self.bufsize = bufsize
        self.maxfds = maxfds
        self._data = bytearray(max_messages * bufsize)
        #: memoryview of the whole data area; message i starts at i * bufsize
        self.view = memoryview(self._data)
        self._slots = [self.view[i * bufsize:(i + 1) * bufsize] for i in range(max_messages)]
        # Room for maxfds descriptors and for SO_PASSCRED credentials, as the
        # C core sizes it, so both backends cut (MSG_CTRUNC) at the same point.
        self._ancbufsize = socket.CMSG_SPACE(4 * max(maxfds, 1)) + _CRED_SPACE
        self.count = 0
        self._lens = [0] * max_messages
        self._flags = [0] * max_messages
        self._fds: list[list[int]] = [[] for _ in range(max_messages)]
        self._addrs: list[Optional[bytes]] = [None] * max_messages
        self._creds: list[Optional[tuple[int, int, int]]] = [None] * max_messages
        #: per-message byte counts of the last recv
        self.lens = self._lens
        self._extras = 0

    def _store(self, i: int, nbytes: int, ancdata: list[Any], msg_flags: int, address: Any) -> None:
        fds: list[int] = []
        creds: Optional[Tuple[int, int, int]] = None
        seen = 0
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                seen += len(got)
                fds.extend(got)
            elif kind == _CREDS and len(payload) >= 12:
                pid, uid, gid = array.array("i", payload[:12])
                creds = (pid, uid, gid)
        msg_flags = int(msg_flags)
        if msg_flags & _CTRUNC or seen > self.maxfds:
            # cut control data: close what arrived, flag the cut (as the C core)
            for fd in fds:
                os.close(fd)
            fds = []
            msg_flags |= _CTRUNC
        # MSG_TRUNC in flags makes recvmsg report the full datagram length
        self._lens[i] = min(nbytes, self.bufsize)
        self._flags[i] = msg_flags
        self._fds[i] = fds
        self._addrs[i] = _raw_address(address)
        self._creds[i] = creds
        if fds or creds is not None or address is not None:
            self._extras += 1

    def length(self, i: int) -> int:
        return self._lens[i]

    def msg_flags(self, i: int) -> int:
        return self._flags[i]

    def fds(self, i: int) -> list[int]:
        return list(self._fds[i])

    def address(self, i: int) -> Optional[bytes]:
        return self._addrs[i]

    def credentials(self, i: int) -> Optional[tuple[int, int, int]]:
        return self._creds[i]

    def plain(self, count: int) -> bool:
        return self._extras == 0

    def chunks(self, count: int) -> list[bytes]:
        return [self._slots[i][:n].tobytes() for i, n in enumerate(self._lens[:count])]

    def all_flags(self, count: int) -> list[int]:
        return self._flags[:count]

    def lengths(self, count: int) -> list[int]:
        return self._lens[:count]


def _raw_address(address: Any) -> Optional[bytes]:
    # The socket module decodes sun_path; re-encode so both backends hand the
    # topic layer the same raw bytes (decode_address turns them back).
    if address is None:
        return None
    return os.fsencode(address)


def new_arena(max_messages: int, bufsize: int, maxfds: int) -> Arena:
    """A receive arena for recv_batch."""
    return Arena(max_messages, bufsize, maxfds)


def recv_batch(sock: socket.socket, arena: Arena, flags: int) -> int:
    """recvmsg_into for the first message, then those already queued; the count, or OSError."""
    s, twin = _io_socket(sock)
    flags |= _CLOEXEC
    stream = sock.type == socket.SOCK_STREAM
    count = 0
    arena._extras = 0
    try:
        for i in range(arena.max_messages):
            try:
                nbytes, ancdata, msg_flags, address = s.recvmsg_into(
                    [arena._slots[i]], arena._ancbufsize, flags)
            except OSError:
                if count:
                    break  # as recvmmsg: return what arrived
                raise
            arena._store(i, nbytes, ancdata, msg_flags, address)
            count += 1
            if nbytes == 0 and stream:
                break  # end of stream: every further read is the same
            # MSG_WAITFORONE: after the first, take only what is queued
            flags |= _DONTWAIT
    finally:
        if twin:
            s.detach()
    arena.count = count
    return count
