"""The stdlib backend: the same functions as _cbackend, on the socket module only.

Used where the C core is not built, and forced with AFUNIX_BACKEND=stdlib.
"""
from __future__ import annotations

import array
import collections
import itertools
import operator
import os
import socket
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

from ._contract import Outgoing
from ._kernel import MSG_CMSG_CLOEXEC, MSG_NOSIGNAL, SCM_CREDENTIALS
from ._limits import FRAME_HEADER, FRAME_MAGIC, FRAME_VERSION, SCM_MAX_FD
from ._sockets import nonblocking_twin, raw_family, raw_type


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

#: The socket module has no sendmmsg / recvmmsg: a batch is one call per message.
HAS_SENDMMSG = False
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


# ---- one message per call: the fast paths of the single calls -------------
# The same contract as in _cbackend: -1 (None for try_recv_one) sends the
# call down the careful path, with nothing sent or given over; a kernel
# error other than EAGAIN and EINTR is raised here (some are reported once).  A socket
# with a timeout always takes the careful path here: CPython's own methods
# would wait on it with their own deadline.  A non-blocking one is called
# with MSG_DONTWAIT: its open file's O_NONBLOCK, which a dup, a forked child
# or a peer holding the same open file can clear, is not this object's mode.

_AF_UNIX = int(socket.AF_UNIX)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


def try_send_one(sock: socket.socket, data: Any, flags: int) -> int:
    """One sock.send of `data` on a message socket; the bytes sent, or -1."""
    timeout = sock.gettimeout()
    if (timeout or sock.fileno() < 0 or raw_family(sock) != _AF_UNIX
            or raw_type(sock) == _STREAM):
        return -1
    if timeout == 0.0:
        flags |= _DONTWAIT
    try:
        return sock.send(data, flags | _NOSIGNAL)
    except BlockingIOError:
        if timeout == 0.0:
            raise
        return -1
    except InterruptedError:
        return -1


def try_send_fds(sock: socket.socket, data: Any, fds: tuple[int, ...], flags: int) -> int:
    """One sock.sendmsg of `data` with `fds` on a message socket; the bytes sent, or -1."""
    timeout = sock.gettimeout()
    if (timeout or sock.fileno() < 0 or raw_family(sock) != _AF_UNIX
            or raw_type(sock) == _STREAM):
        return -1
    ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
    if timeout == 0.0:
        flags |= _DONTWAIT
    try:
        return sock.sendmsg([data], ancillary, flags | _NOSIGNAL)
    except BlockingIOError:
        if timeout == 0.0:
            raise
        return -1
    except InterruptedError:
        return -1


def try_recv(sock: socket.socket, arena: Arena, flags: int) -> int:
    """recv_batch into `arena` when it holds nothing of an earlier call; the count, or -1."""
    timeout = sock.gettimeout()
    if (timeout or arena.owner is not None or sock.fileno() < 0
            or raw_family(sock) != _AF_UNIX):
        return -1
    if timeout == 0.0:
        flags |= _DONTWAIT
    arena.owner = sock  # before the call: whatever it hands over is sock's
    try:
        if arena.max_messages == 1:
            return _recv_single(sock, arena, flags)
        return recv_batch(sock, arena, flags)
    except BlockingIOError:
        arena.owner = None
        if timeout == 0.0:
            raise
        return -1
    except InterruptedError:
        arena.owner = None
        return -1
    except OSError:
        arena.owner = None
        raise


def _recv_single(sock: socket.socket, arena: Arena, flags: int) -> int:
    """recv_batch for an arena of one slot that holds no undelivered message (a blocking or non-blocking sock).

    The same steps, flattened: one recvmsg_into into the inbox (from C, as
    recv_batch does), and a plain message taken in with stores only; any
    other goes through _take_in.
    """
    if not arena.all_handed and arena._extras:
        arena.release_fds()  # descriptors of the last message nobody took
    peek = flags & _PEEK
    keep = ~0 if flags & _CLOEXEC else ~_CLOEXEC
    arena._peek = peek
    arena._keep_flags = keep
    inbox = arena._inbox
    inbox.extend(map(sock.recvmsg_into, (arena._slots[0],), (arena._ancbufsize,),
                     (flags | _CLOEXEC,)))
    nbytes, ancdata, msg_flags, address = inbox[0]
    if ancdata or address is not None:
        _take_in(arena)
        return arena.count
    bufsize = arena.bufsize
    length = nbytes if nbytes <= bufsize else bufsize  # MSG_TRUNC reports the full length
    msg_flags = int(msg_flags) & keep
    # the commit: stores only (as _take_in's)
    arena._lens = arena.lens = [length]
    arena._flags = [msg_flags]
    arena._fds = [[]]
    arena._addrs = [None]
    arena._creds = [None]
    arena._handed = [False]
    arena._extras = 0
    arena.all_handed = 0
    arena.delivered = 1 if peek else 0
    arena.count = 1
    arena._inbox = []
    return 1


def try_recv_one(sock: socket.socket, arena: Arena, flags: int) -> Optional[tuple[bytes, list[int], int]]:
    """`try_recv` into an arena of one message: (data, descriptors, msg_flags), or None (see _cbackend)."""
    if try_recv(sock, arena, flags) != 1:
        return None
    n = arena._lens[0]
    if not n:
        return None
    if arena._extras:
        if arena._addrs[0] is not None or arena._creds[0] is not None:
            return None
        fds = list(arena._fds[0])
    else:
        fds = []
    return arena._slots[0][0][:n].tobytes(), fds, arena._flags[0]


class Arena:
    """A receive area in a bytearray: max_messages x bufsize bytes, plus fds and addresses.

    The same hand-over state as the C arena (csrc/afunix.h): messages
    [delivered, count) are not given to the caller yet, and descriptors
    stay the arena's (closed by the next receive or `release_fds`) until
    given over.  Python cannot record a socket call's result inside the
    call; recv_batch comes closest (see there).
    """

    def __init__(self, max_messages: int, bufsize: int, maxfds: int) -> None:
        self.max_messages = max_messages
        self.bufsize = bufsize
        self.maxfds = maxfds
        self.owner: Any = None
        self._data = bytearray(max_messages * bufsize)
        #: memoryview of the whole data area; message i starts at i * bufsize
        self.view = memoryview(self._data)
        self._slots = [[self.view[i * bufsize:(i + 1) * bufsize]] for i in range(max_messages)]
        # Room for maxfds descriptors and for SO_PASSCRED credentials, as the
        # C core sizes it, so both backends cut (MSG_CTRUNC) at the same point.
        self._ancbufsize = socket.CMSG_SPACE(4 * max(maxfds, 1)) + _CRED_SPACE
        # recvmsg_into results not yet taken in (see recv_batch)
        self._inbox: list[Any] = []
        self._peek = 0  # whether the inbox holds what a MSG_PEEK call saw
        # the msg_flags bits the inbox's call reports: Linux echoes
        # MSG_CMSG_CLOEXEC, which is left out unless that call passed it
        self._keep_flags = ~_CLOEXEC
        self.count = 0
        self.delivered = 0
        self.all_handed = 1
        self._handed: list[bool] = []
        self._lens: list[int] = []
        self._flags: list[int] = []
        self._fds: list[list[int]] = []
        self._addrs: list[Optional[bytes]] = []
        self._creds: list[Optional[tuple[int, int, int]]] = []
        #: per-message byte counts of the last recv
        self.lens = self._lens
        self._extras = 0

    def first(self) -> int:
        return self.delivered if self.delivered < self.count else 0

    def pending(self) -> bool:
        return self.delivered < self.count or bool(self._inbox)

    def deliver(self, upto: int, hand_fds: bool) -> None:
        """Give messages [.., upto) to the caller, and with hand_fds all their descriptors (stores only)."""
        self.delivered = upto
        if hand_fds:
            self.all_handed = 1
        if upto >= self.count:
            self.owner = None

    def length(self, i: int) -> int:
        return self._lens[i]

    def msg_flags(self, i: int) -> int:
        return self._flags[i]

    def held_fds(self, start: int, stop: int) -> list[tuple[int, ...]]:
        fds, handed = self._fds, self._handed
        all_handed, delivered = self.all_handed, self.delivered
        return [tuple(fds[i]) if i >= delivered or not (all_handed or handed[i]) else ()
                for i in range(start, stop)]

    def take_fds(self, i: int) -> list[int]:
        fds = list(self.held_fds(i, i + 1)[0])
        self._handed[i] = True
        return fds

    def take_all_fds(self, count: int) -> list[int]:
        fds = [fd for got in self.held_fds(0, count) for fd in got]
        self.all_handed = 1
        return fds

    def hand_all(self) -> None:
        """Give every descriptor of the last receive to the caller (a store)."""
        self.all_handed = 1

    def release_fds(self) -> None:
        """Close the descriptors the arena holds; drop undelivered messages."""
        if self._inbox:
            _take_in(self)
        doomed = map(os.close, [fd for got in self.held_fds(0, self.count) for fd in got])
        self.delivered = self.count
        self.all_handed = 1
        _consume(doomed)  # the closes run in one C loop, right after the stores

    def fd_counts(self, count: int) -> list[int]:
        return [len(fds) for fds in self._fds[:count]]

    def __del__(self) -> None:
        # the C arena's free does the same
        if getattr(self, "count", 0) or getattr(self, "_inbox", None):
            try:
                self.release_fds()
            except (AttributeError, TypeError):  # interpreter shutdown: modules gone
                pass

    def address(self, i: int) -> Optional[bytes]:
        return self._addrs[i]

    def credentials(self, i: int) -> Optional[tuple[int, int, int]]:
        return self._creds[i]

    def plain(self) -> bool:
        return self._extras == 0

    def chunks(self, start: int, stop: int) -> list[bytes]:
        slots, lens = self._slots, self._lens
        return [slots[i][0][:lens[i]].tobytes() for i in range(start, stop)]

    def all_flags(self, start: int, stop: int) -> list[int]:
        return self._flags[start:stop]

    def lengths(self, count: int) -> list[int]:
        return self._lens[:count]


# Runs an iterator to its end in C (no Python code, so no signal handler, in
# between): map(os.close, fds) closes them all in one step.
_consume: Callable[[Iterable[Any]], None] = collections.deque(maxlen=0).extend


def _take_in(arena: Arena) -> None:
    """Turn the recvmsg_into results in arena._inbox into the arena's messages.

    Works on copies and commits with stores only, so an exception from a
    signal handler leaves the inbox to be taken in again, whole; descriptors
    of a message whose control data was cut are closed after the commit (an
    exception just there would leak them, never close them twice).
    """
    inbox = arena._inbox
    lens: list[int] = []
    all_flags: list[int] = []
    all_fds: list[list[int]] = []
    addrs: list[Optional[bytes]] = []
    creds: list[Optional[tuple[int, int, int]]] = []
    doomed: list[int] = []
    extras = 0
    bufsize = arena.bufsize
    keep = arena._keep_flags
    for nbytes, ancdata, msg_flags, address in inbox:
        fds: list[int] = []
        cred: Optional[Tuple[int, int, int]] = None
        msg_flags = int(msg_flags)
        if ancdata:
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
                    cred = (pid, uid, gid)
            if msg_flags & _CTRUNC or seen > arena.maxfds:
                # cut control data: close what arrived, flag the cut (as the C core)
                doomed.extend(fds)
                fds = []
                msg_flags |= _CTRUNC
        # MSG_TRUNC in flags makes recvmsg report the full datagram length
        lens.append(nbytes if nbytes <= bufsize else bufsize)
        all_flags.append(msg_flags & keep)
        all_fds.append(fds)
        addrs.append(_raw_address(address))
        creds.append(cred)
        if fds or cred is not None or address is not None:
            extras += 1
    closer = map(os.close, doomed)
    handed = [False] * len(inbox)
    count = len(inbox)
    # the commit: stores only
    arena._lens = arena.lens = lens
    arena._flags = all_flags
    arena._fds = all_fds
    arena._addrs = addrs
    arena._creds = creds
    arena._handed = handed
    arena._extras = extras
    arena.all_handed = 0
    # a peeked message is still queued: never hand it out a second time
    arena.delivered = count if arena._peek else 0
    arena.count = count
    arena._inbox = []
    _consume(closer)


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
    """recvmsg_into for the first message, then those already queued; the count, or OSError.

    The messages an interrupted call left in the arena come first, without
    a system call.  The results go straight from recvmsg_into into the
    arena's inbox: ``inbox.extend(map(recvmsg_into, ...))`` stores each in
    C, with no Python code (so no signal handler) between the kernel's
    answer and the store.  A handler that raises while recvmsg_into waits
    (EINTR, PEP 475) ends the loop with the earlier results kept.
    """
    if arena._inbox:
        _take_in(arena)
    if arena.delivered < arena.count:
        return arena.count - arena.delivered
    arena.release_fds()
    arena._peek = flags & _PEEK
    # Linux echoes MSG_CMSG_CLOEXEC in msg_flags: leave it out unless the
    # caller asked for it, as a plain recvmsg would report the flags
    arena._keep_flags = ~0 if flags & _CLOEXEC else ~_CLOEXEC
    flags |= _CLOEXEC
    s, twin = _io_socket(sock)
    try:
        stream = raw_type(sock) == _STREAM
        # MSG_PEEK leaves the head queued: more slots would repeat it.  On a
        # stream a 0-byte buffer reads 0 bytes every time: one read (with its
        # descriptors) is the message, as recv_fds(sock, 0, maxfds) takes it.
        n = 1 if arena._peek or (stream and not arena.bufsize) else arena.max_messages
        calls: Iterator[Any]
        if n == 1:
            calls = map(s.recvmsg_into, (arena._slots[0],), (arena._ancbufsize,), (flags,))
        else:
            slots = arena._slots if n == len(arena._slots) else arena._slots[:n]
            # MSG_WAITFORONE: after the first, take only what is queued
            every_flags = itertools.chain((flags,), itertools.repeat(flags | _DONTWAIT))
            calls = map(s.recvmsg_into, slots, itertools.repeat(arena._ancbufsize), every_flags)
        if stream and n > 1:
            # end of stream: every further read is the same empty one (it
            # carries nothing; a single read's is kept for the caller's check)
            calls = itertools.takewhile(_first_item, calls)
        try:
            arena._inbox.extend(calls)
        except OSError:
            if not arena._inbox:
                raise  # as recvmmsg: an error only when nothing arrived
    finally:
        if twin:
            s.detach()
    _take_in(arena)
    return arena.count


_first_item = operator.itemgetter(0)


def close_fds(fds: Sequence[int]) -> None:
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
# bits 40..63 of the header word: flags 0, then the version, then the magic byte
_FRAME_TAG = ((FRAME_MAGIC << 16) | (FRAME_VERSION << 8)) << 40
_FRAME_TAG_MASK = 0xFFFFFF << 40
_FRAME_LENGTH = 0xFFFFFFFF
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
        if avail < FRAME_HEADER:
            if avail:
                need = FRAME_HEADER
            break
        (word,) = unpack(buf, pos)
        k = (word >> 32) & 0xFF
        if word & _FRAME_TAG_MASK != _FRAME_TAG or k > SCM_MAX_FD:
            rc = -errno.EBADMSG
            break
        length = word & _FRAME_LENGTH
        if length > max_frame:
            rc = -errno.EMSGSIZE
            break
        if avail - FRAME_HEADER < length:
            need = FRAME_HEADER + length
            break
        offsets[count] = pos + FRAME_HEADER
        lengths[count] = length
        if k:
            with_fds += 1
        nfds[count] = k
        if count == 0:
            uniform = length
        elif uniform != length:
            uniform = -1
        count += 1
        pos += FRAME_HEADER + length
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
    if len(packed) != declared + FRAME_HEADER * len(heads):
        raise BufferError("the message lengths add up to %d bytes but %d were handed over; "
                          "nothing was sent" % (declared, len(packed) - FRAME_HEADER * len(heads)))
    out[:len(packed)] = packed
    return len(packed)


# ---- the channel's receive state ----
# The twin of struct afunix_chan_rx (csrc/channel.h), in Python.

CHAN_READS = 8
CHAN_FDS_NO_DATA = 0x40000000
CHAN_EMPTY_RECORD = 0x20000000
_CHAN_ANCBUF = socket.CMSG_SPACE(4 * SCM_MAX_FD) + socket.CMSG_SPACE(64)
_TRUNC = int(socket.MSG_TRUNC)


class _ChanState:
    """The fields of struct afunix_chan_rx, with the same names."""

    def __init__(self) -> None:
        self.end = 0
        self.base = 0
        self.errors = 0
        self.head = 0
        self.tail = 0
        self.lo = [0] * CHAN_READS
        self.hi = [0] * CHAN_READS
        self.frame = [-1] * CHAN_READS
        self.nfds = [0] * CHAN_READS
        self.fds: list[list[int]] = [[] for _ in range(CHAN_READS)]
        # the recvmsg_into result of a read a signal handler's exception
        # stopped before it was taken in (at most one: each call takes in
        # what is there first)
        self.inbox: list[Any] = []

    @property
    def deferred(self) -> int:
        """Nonzero while a read waits in the inbox: the next chan_recv reports it.

        Its bytes lie after `end`, where it read them: the reader keeps its
        buffer as it is until then (FrameReader.frames_ready).
        """
        return 1 if self.inbox else 0


class ChanRx:
    """A channel's receive state: `s` has the fields (its inbox, recvmsg_into results not taken in)."""

    reads = CHAN_READS  # slots for held reads
    no_data = CHAN_FDS_NO_DATA  # in errors: descriptors came with no byte
    empty_record = CHAN_EMPTY_RECORD  # in errors: never set here (one record per read)

    def __init__(self) -> None:
        self.s = _ChanState()


def new_chan_rx() -> ChanRx:
    """Receive state for one channel."""
    return ChanRx()


def chan_recv(sock: socket.socket, rx: ChanRx, buffer: bytearray, maxlen: int, flags: int,
              records: int = 1) -> int:
    """One recvmsg_into appended to buffer at rx.s.end and recorded in rx; the bytes, or OSError.

    One record per call whatever `records` says (the socket module has no
    recvmmsg): what the C backend's batch of records gives, a call at a time.

    As in recv_batch, the result goes into rx.s.inbox from C (extend over
    map), then is taken in with stores only.  A read an interrupted call
    left in the inbox is taken in first, and counts as this one.
    """
    if rx.s.inbox:
        return _chan_take_in(rx)
    s = rx.s
    if s.tail - s.head >= CHAN_READS or s.end >= len(buffer):
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
    view = memoryview(buffer)[s.end:s.end + min(maxlen, len(buffer) - s.end)]
    rx.s.inbox.extend(map(sock.recvmsg_into, [[view]], [_CHAN_ANCBUF], [flags | _CLOEXEC]))
    return _chan_take_in(rx)


def _chan_take_in(rx: ChanRx) -> int:
    s = rx.s
    nbytes, ancdata, msg_flags, _ = rx.s.inbox[0]
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    n = nbytes  # at most the view's length: MSG_TRUNC is not asked for
    errors = s.errors | (int(msg_flags) & (_TRUNC | _CTRUNC))
    if fds and not n:
        errors |= CHAN_FDS_NO_DATA
    slot = s.tail % CHAN_READS
    lo = s.base + s.end
    # the commit: stores only
    if fds:
        s.lo[slot] = lo
        s.hi[slot] = lo + n
        s.frame[slot] = -1
        s.nfds[slot] = len(fds)
        s.fds[slot] = fds
        s.tail = s.tail + 1
    s.end = s.end + n
    s.errors = errors
    rx.s.inbox = []
    return int(n)


def chan_drop(rx: ChanRx, upto: int, every: bool) -> None:
    """Close the held reads claimed by frames before stream offset `upto` (every held read with `every`)."""
    if rx.s.inbox:
        _chan_take_in(rx)
    s = rx.s
    head, doomed = s.head, []
    while head < s.tail:
        slot = head % CHAN_READS
        if not every and not 0 <= s.frame[slot] < upto:
            break
        doomed.extend(s.fds[slot][:s.nfds[slot]])
        head += 1
    closer = map(os.close, doomed)
    s.head = head
    _consume(closer)  # right after the store, in one C loop


def chan_fds(rx: ChanRx, slot: int) -> list[int]:
    """The descriptors held in `slot` (pure: nothing is given over)."""
    return list(rx.s.fds[slot][:rx.s.nfds[slot]])


# ---- for the benchmark ----

def bare_calls(sock: socket.socket, size: int
               ) -> tuple[Callable[[bytes], Any], Callable[[], Any], Callable[[], None]]:
    """(send, recv, free): the socket module's calls for one `size`-byte message on `sock`.

    The stdlib backend's twin of the C core's bare calls: sock.send and
    sock.recvmsg_into with their arguments made once; `free` has nothing to do.
    """
    buffers = [bytearray(size)]
    stdlib_send, recvmsg_into = sock.send, sock.recvmsg_into

    def send(data: bytes) -> Any:
        return stdlib_send(data, _NOSIGNAL)

    def recv() -> Any:
        return recvmsg_into(buffers)

    def free() -> None:
        pass

    return send, recv, free


def copy_streaming(target: memoryview, source: memoryview) -> None:
    """The contract's copy_streaming: a plain slice assignment (no stores that bypass the cache here)."""
    if target.nbytes != source.nbytes:
        raise ValueError("copy of %d bytes into %d" % (source.nbytes, target.nbytes))
    target[:] = source


def chan_hold(rx: ChanRx, nbytes: int, fds: list[int], flags: int) -> None:
    """The contract's chan_hold (_contract.Backend), in this backend's receive state."""
    s = rx.s
    if rx.s.inbox:
        # a read an interrupted chan_recv left is not taken in yet: the
        # caller's bytes went where it belongs (the C core has no such state)
        raise OSError(errno.EBUSY, "a receive left a read to take in first")
    if s.tail - s.head >= CHAN_READS or nbytes < 0 or len(fds) > SCM_MAX_FD:
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    rx.s.inbox = [(nbytes, ancdata, flags, None)]
    _chan_take_in(rx)
