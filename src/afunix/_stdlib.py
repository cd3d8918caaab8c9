"""The stdlib backend: the same functions as _cbackend, on the socket module only.

Used where the C core is not built, and forced with AFUNIX_BACKEND=stdlib.
"""
from __future__ import annotations

import array
import os
import socket
from typing import Any, List, Optional, Tuple

from ._io import Outgoing, _raw_type, nonblocking_twin
from ._kernel import MSG_CMSG_CLOEXEC, MSG_NOSIGNAL, SCM_CREDENTIALS


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
_CREDS = SCM_CREDENTIALS
# plain ints: | and & on the socket module's enum flags are slow
_NOSIGNAL = MSG_NOSIGNAL
_CLOEXEC = MSG_CMSG_CLOEXEC
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_PEEK = int(socket.MSG_PEEK)
_STREAM = int(socket.SOCK_STREAM)
_CRED_SPACE = socket.CMSG_SPACE(12) if _CREDS is not None else 0


def _io_socket(sock: socket.socket) -> tuple[socket.socket, bool]:
    """`sock`, or a non-blocking twin of it when it has a timeout (see nonblocking_twin)."""
    timeout = sock.gettimeout()
    if timeout:
        if sock.fileno() < 0:
            # closed by another thread since the call began: as sock.recv would
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return nonblocking_twin(sock), True
    return sock, False


def send_batch(sock: socket.socket, out: Outgoing, start: int, count: int, flags: int) -> int:
    """sendmsg for each of out[start:start+count]; the count sent, or OSError."""
    s, twin = _io_socket(sock)
    sent = 0
    try:
        if out.fds is None and out.credentials is None and out.addresses is None:
            return _send_plain(s, out.datas, start, count, flags | _NOSIGNAL)
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


def send_message(sock: socket.socket, data: Any, fds: tuple[int, ...],
                 credentials: Optional[tuple[int, int, int]], flags: int) -> int:
    """One sendmsg of all of `data` with its descriptors and credentials; the bytes taken, or OSError."""
    s, twin = _io_socket(sock)
    try:
        ancillary: List[Tuple[int, int, bytes]] = []
        if credentials is not None and _CREDS is not None:
            ancillary.append((socket.SOL_SOCKET, _CREDS, array.array("i", credentials).tobytes()))
        if fds:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        return s.sendmsg([data], ancillary, flags | _NOSIGNAL)
    finally:
        if twin:
            s.detach()


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

    def all_fds(self) -> list[int]:
        return [fd for fds in self._fds[:self.count] for fd in fds]

    def fd_counts(self, count: int) -> list[int]:
        return [len(fds) for fds in self._fds[:count]]

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


def _send_plain(s: socket.socket, datas: list[Any], start: int, count: int, flags: int) -> int:
    # No ancillary data and no address: send() is sendmsg() without the
    # cost of building its arguments.
    send = s.send
    sent = 0
    for i in range(start, start + count):
        try:
            send(datas[i], flags)
        except OSError:
            if sent:
                return sent  # as sendmmsg: the error shows on the next call
            raise
        sent += 1
        flags |= _DONTWAIT  # after the first, take only what goes without waiting
    return sent


def recv_batch(sock: socket.socket, arena: Arena, flags: int) -> int:
    """recvmsg_into for the first message, then those already queued; the count, or OSError."""
    s, twin = _io_socket(sock)
    # Linux echoes MSG_CMSG_CLOEXEC in msg_flags: leave it out unless the
    # caller asked for it, as a plain recvmsg would report the flags
    keep = ~0 if flags & _CLOEXEC else ~_CLOEXEC
    flags |= _CLOEXEC
    stream = _raw_type(sock) == _STREAM
    count = 0
    arena._extras = 0
    recvmsg_into, slots, ancbufsize = s.recvmsg_into, arena._slots, arena._ancbufsize
    bufsize = arena.bufsize
    lens, all_flags, all_fds, addrs, creds = (
        arena._lens, arena._flags, arena._fds, arena._addrs, arena._creds)
    try:
        # MSG_PEEK leaves the head queued: more slots would repeat it
        for i in range(1 if flags & _PEEK else arena.max_messages):
            try:
                nbytes, ancdata, msg_flags, address = recvmsg_into([slots[i]], ancbufsize, flags)
            except OSError:
                if count:
                    break  # as recvmmsg: return what arrived
                raise
            if ancdata or address is not None or msg_flags & _CTRUNC:
                arena._store(i, nbytes, ancdata, msg_flags & keep, address)
            else:  # the common case, inline: only bytes arrived
                # with MSG_TRUNC in flags the count is the datagram's, not ours
                lens[i] = nbytes if nbytes <= bufsize else bufsize
                all_flags[i] = msg_flags & keep
                all_fds[i] = []
                addrs[i] = None
                creds[i] = None
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


def close_fds(fds: list[int]) -> None:
    """Close every descriptor in `fds`, ignoring errors (EBADF for one already closed)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- message channel ----
# Frames as docs/PROTOCOL.md lays them out, packed and parsed with struct.
import errno
import struct
from typing import Sequence

_FRAME = struct.Struct("<Q")  # the header as one little-endian word
_FRAME_HEADER = 8
# bits 40..63 of the header word: flags 0, version 1, magic 0xAF
_FRAME_TAG = 0xAF0100 << 40
_FRAME_TAG_MASK = 0xFFFFFF << 40
_FRAME_LENGTH = 0xFFFFFFFF
_FRAME_MAX_NFDS = 253
# Headers of descriptor-less frames by payload length: most channels send a
# few sizes over and over, and a dict lookup is cheaper than a pack.
_frame_headers: dict[int, bytes] = {}


def _frame_header(length: int) -> bytes:
    head = _frame_headers.get(length)
    if head is None:
        head = _FRAME.pack(length | _FRAME_TAG)
        if len(_frame_headers) < 4096:
            _frame_headers[length] = head
    return head


class FrameTable:
    """Where parse_frames writes: payload offsets, lengths and descriptor counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        zeros = bytes(4 * capacity)
        self.offsets = memoryview(array.array("I", zeros))
        self.lengths = memoryview(array.array("I", zeros))
        self.nfds = memoryview(array.array("I", zeros))
        self.count = 0
        self.consumed = 0
        self.uniform = -1
        self.with_fds = 0
        self.need = 0


def new_frame_table(capacity: int) -> FrameTable:
    """A table for parse_frames with room for `capacity` frames."""
    return FrameTable(capacity)


def parse_frames(table: FrameTable, buf: bytearray, start: int, end: int,
                 max_frames: int, max_frame: int) -> int:
    """Parse complete frames of buf[start:end] into table; the count, -EBADMSG or -EMSGSIZE.

    A bad header behind good frames is left for the next call, which starts
    at it, so the good ones are delivered first.
    """
    unpack = _FRAME.unpack_from
    offsets, lengths, nfds = table.offsets, table.lengths, table.nfds
    limit = min(max_frames, table.capacity)
    pos, count, with_fds, uniform, rc, need = start, 0, 0, -1, 0, 0
    while count < limit:
        avail = end - pos
        if avail < _FRAME_HEADER:
            if avail:
                need = _FRAME_HEADER
            break
        (word,) = unpack(buf, pos)
        k = (word >> 32) & 0xFF
        if word & _FRAME_TAG_MASK != _FRAME_TAG or k > _FRAME_MAX_NFDS:
            rc = -errno.EBADMSG
            break
        length = word & _FRAME_LENGTH
        if length > max_frame:
            rc = -errno.EMSGSIZE
            break
        if avail - _FRAME_HEADER < length:
            need = _FRAME_HEADER + length
            break
        offsets[count] = pos + _FRAME_HEADER
        lengths[count] = length
        if k:
            with_fds += 1
        nfds[count] = k
        if count == 0:
            uniform = length
        elif uniform != length:
            uniform = -1
        count += 1
        pos += _FRAME_HEADER + length
    table.need = need
    if count == 0 and rc:
        table.count = table.consumed = table.with_fds = 0
        table.uniform = -1
        return rc
    table.count = count
    table.consumed = pos - start
    table.uniform = uniform if count else -1
    table.with_fds = with_fds
    return count


def pack_frames(out: bytearray, datas: Sequence[Any], joined: bytes, lengths: Sequence[int],
                nfds: Optional[Sequence[int]]) -> int:
    """Frames for `datas` (lengths[i] bytes, nfds[i] declared) into the start of out; the bytes written.

    `out` must have room for them (the caller sizes it).  As the C core
    does, it refuses (BufferError, `out` untouched) lengths that do not add
    up to the payloads handed over: a frame never promises other bytes than
    it carries.
    """
    if nfds is None:
        heads = [_frame_header(n) for n in lengths]
    else:
        if len(nfds) != len(lengths):
            raise BufferError("%d descriptor counts for %d frames" % (len(nfds), len(lengths)))
        pack = _FRAME.pack
        heads = [pack(n | (k << 32) | _FRAME_TAG) for n, k in zip(lengths, nfds)]
    if len(datas) != len(heads):
        raise BufferError("%d payloads for %d frames" % (len(datas), len(heads)))
    parts: list[Any] = [b""] * (2 * len(heads))
    parts[0::2] = heads
    parts[1::2] = datas
    packed = b"".join(parts)
    declared = sum(lengths)
    if len(packed) != declared + _FRAME_HEADER * len(heads):
        raise BufferError("the message lengths add up to %d bytes but %d were handed over; "
                          "nothing was sent" % (declared, len(packed) - _FRAME_HEADER * len(heads)))
    out[:len(packed)] = packed
    return len(packed)
