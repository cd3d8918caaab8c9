"""The C backend: a thin adapter over the cffi-compiled core (csrc/).

One Python function per C function, named as the C function without its
``afunix_`` prefix.  C returns a count or -errno; ``_check`` turns the latter
into OSError, which gives the stdlib's own subclasses.
"""
from __future__ import annotations

import _socket
import array
import errno
import importlib
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional

from ._contract import Outgoing
from ._kernel import MSG_NOSIGNAL
from ._sockets import raw_family, raw_type
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


# ---- batched message I/O --------------------------------------------------

_ADDR_MAX = lib.AFUNIX_ADDR_MAX
#: The core moves a batch in one sendmmsg / recvmmsg (Linux); a loop of sendmsg elsewhere.
HAS_SENDMMSG = bool(lib.AFUNIX_HAS_SENDMMSG)
_NULL = ffi.NULL


def send_batch(sock: socket.socket, out: Outgoing, start: int, count: int, flags: int) -> int:
    """One sendmmsg of out[start:start+count]; the count sent, or OSError.

    The core is told the size of everything it reads (the joined data, the
    descriptor array, the addresses) and refuses lengths that do not add up
    to it: BufferError, and nothing is sent.
    """
    if not count:
        return 0  # as the stdlib backend: no message, no system call
    end = start + count
    whole = start == 0 and end == len(out.datas)
    if whole and out.joined is not None:
        data = out.joined
    else:
        data = b"".join(out.datas if whole else out.datas[start:end])
    lens = out.lengths if whole else out.lengths[start:end]
    if len(lens) != count:
        raise BufferError("%d message lengths for %d messages" % (len(lens), count))
    if lens.count(lens[0]) == count:
        # fixed-size records: one length for all, no array to convert
        lens_arg, uniform = _NULL, lens[0]
    else:
        lens_arg, uniform = _size_t_array(lens), 0
    fds = nfds = addrs = addrlens = creds = _NULL
    counts: list[int] = []
    nfds_total = addrslen = 0
    if out.fds is not None:
        if whole and out.fd_counts is not None and out.fd_flat is not None:
            counts, flat = out.fd_counts, out.fd_flat
        else:
            per = out.fds[start:end]
            counts, flat = [len(f) for f in per], [fd for f in per for fd in f]
        if flat:  # a chunk of the batch may carry none
            if len(counts) != count:
                raise BufferError("%d descriptor counts for %d messages" % (len(counts), count))
            if type(flat) is array.array and flat.itemsize == _INT_SIZE:
                fds = ffi.from_buffer("int[]", flat)  # checked C ints (Outgoing.fd_flat)
            else:
                fds = _int_array(flat)
            nfds, nfds_total = _count_array(counts), len(fds)
    if out.addresses is not None:
        per_addr = out.addresses[start:end]
        addrlens = ffi.new("int[]", [-1 if a is None else len(a) for a in per_addr])
        addrs = b"".join(a for a in per_addr if a is not None)
        addrslen = len(addrs)
    if out.credentials is not None:
        quads: list[int] = []  # present, pid, uid, gid per message
        for c in out.credentials[start:end]:
            quads.extend((0, 0, 0, 0) if c is None else (1, c[0], c[1], c[2]))
        creds = ffi.new("int[]", quads)
    rc = lib.afunix_send_many(
        sock.fileno(), count, data, len(data), lens_arg, uniform,
        fds, nfds_total, nfds, addrs, addrslen, addrlens, creds, flags,
    )
    if rc < 0:
        if rc == _EINVAL:
            _refuse_mismatch(sum(lens), len(data), sum(counts), nfds_total)
        raise OSError(-rc, os.strerror(-rc))
    return int(rc)


def send_message(sock: socket.socket, data: Any, fds: tuple[int, ...],
                 credentials: Optional[tuple[int, int, int]], flags: int) -> int:
    """One sendmsg of all of `data` with its descriptors and credentials; the bytes taken, or OSError."""
    buf = ffi.from_buffer(data)  # pinned, and measured, for the length of the call
    rc = lib.afunix_send_message(
        sock.fileno(), buf, len(buf),
        _int_array(list(fds)) if fds else _NULL, len(fds),
        _NULL if credentials is None else ffi.new("int[3]", credentials), flags,
    )
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return int(rc)


_EINVAL = -errno.EINVAL


# ---- one message per call: the fast paths of the single calls -------------
# Each takes a socket.socket and arguments the topic layer has already
# checked with exact-type tests, makes one cffi call (one sock.send for a
# plain message on a socket without a timeout), and answers -1 (None
# for try_recv_one) when the call needs the careful path: a closed, non-
# AF_UNIX (or, to send, stream) socket, a timeout to wait out, or a kernel
# error to retry.  Nothing went or was given over then; what a receive took
# stays in the arena, and the careful path's receive returns it without
# asking the kernel again.  Any other kernel error is raised here, as
# _check raises it: the kernel reports some only once (a pending ECONNRESET,
# the ECONNREFUSED that disconnects a DGRAM socket), and a second system
# call by the careful path would answer something else.

_AF_UNIX = int(socket.AF_UNIX)
_STREAM = int(socket.SOCK_STREAM)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_NOSIGNAL = MSG_NOSIGNAL  # (the core adds it to its own sends)
_CTRUNC = int(socket.MSG_CTRUNC)
_EAGAIN = -errno.EAGAIN
_EINTR = -errno.EINTR
_from_buffer = ffi.from_buffer
_send_one = lib.afunix_send_one
_send_message = lib.afunix_send_message
_recv_many = lib.afunix_recv_many
_unpack = ffi.unpack


def _exports_pin() -> bool:
    """Whether a buffer export stops a resize (CPython: BufferError; PyPy: no, the bytearray moves)."""
    probe = bytearray(1)
    view = memoryview(probe)
    try:
        probe.append(0)
    except BufferError:
        return True
    finally:
        view.release()
    return False


#: Where an export does not pin (PyPy), another thread can resize a
#: bytearray while C reads it with the GIL let go: the fast sends hand C a
#: bytes copy made under the GIL instead, as the careful path's join does.
_PINS = _exports_pin()


def _would_block() -> OSError:
    # what _check makes of -EAGAIN: the careful path raises exactly this
    return OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def _hand_on(rc: int, timeout: Optional[float]) -> int:
    """-1 for an error the careful path retries or waits out (EAGAIN, EINTR); any other is raised."""
    if rc == _EAGAIN:
        if timeout == 0.0:
            raise _would_block()
        return -1
    if rc == _EINTR:
        return -1
    raise OSError(-rc, os.strerror(-rc))


def try_send_one(sock: socket.socket, data: Any, flags: int) -> int:
    """One send(2) of `data` (bytes, bytearray, C-contiguous memoryview) on a message socket.

    Returns the bytes sent, or -1: the careful path sends it.  On a
    blocking or non-blocking socket this is CPython's own ``sock.send``, as
    on the stdlib backend (see _stdlib.try_send_one, written out here, one
    Python frame less): one C call, where a cffi call costs about 1000
    instructions more (benchmarks/single_send_cost.py).  With a timeout it
    is one cffi send with MSG_DONTWAIT, the careful path waiting when the
    socket is full (CPython's method would wait with its own deadline).
    A bytearray or memoryview is pinned and measured by ffi.from_buffer for
    that call (copied, where an export does not pin: see _PINS).
    """
    fd = sock.fileno()
    if fd < 0 or raw_family(sock) != _AF_UNIX or raw_type(sock) == _STREAM:
        return -1
    timeout = sock.gettimeout()
    if not timeout:
        if timeout == 0.0:
            # this object's mode, not the O_NONBLOCK of an open file that a
            # dup, a forked child or a peer holding it may have cleared
            flags |= _DONTWAIT
        try:
            return sock.send(data, flags | _NOSIGNAL)
        except BlockingIOError:
            if timeout == 0.0:
                raise
            return -1  # a blocking socket with SO_SNDTIMEO: the careful path waits
        except InterruptedError:
            return -1
    if type(data) is bytes:
        rc = _send_one(fd, data, len(data), flags | _DONTWAIT)
    elif _PINS:
        buf = _from_buffer(data)
        rc = _send_one(fd, buf, len(buf), flags | _DONTWAIT)
    else:
        copy = bytes(data)
        rc = _send_one(fd, copy, len(copy), flags | _DONTWAIT)
    if rc >= 0:
        return int(rc)
    return _hand_on(rc, timeout)


def try_send_fds(sock: socket.socket, data: Any, fds: tuple[int, ...], flags: int) -> int:
    """One sendmsg of `data` with `fds` (checked ints, at most SCM_MAX_FD) on a message socket.

    Returns the bytes sent, or -1: the careful path sends it.  `fds` is a
    tuple: what was checked is what cffi converts, whatever another thread does.
    """
    fd = sock.fileno()
    if fd < 0 or raw_family(sock) != _AF_UNIX or raw_type(sock) == _STREAM:
        return -1
    timeout = sock.gettimeout()
    if timeout is not None:
        flags |= _DONTWAIT
    buf = data if type(data) is bytes else _from_buffer(data) if _PINS else bytes(data)
    rc = _send_message(fd, buf, len(buf), fds if fds else _NULL, len(fds), _NULL, flags)
    if rc >= 0:
        return int(rc)
    return _hand_on(rc, timeout)


def try_recv(sock: socket.socket, arena: Arena, flags: int) -> int:
    """One receive into `arena` (recvmsg for a batch of one, else recvmmsg); the count, or -1.

    -1: nothing was received (or `arena` holds what an earlier call left):
    the careful path receives.  Otherwise the messages are recorded in the
    arena, owned by `sock` and not delivered, as recv_batch leaves them.
    """
    fd = sock.fileno()
    if fd < 0 or raw_family(sock) != _AF_UNIX or arena.owner is not None:
        return -1
    timeout = sock.gettimeout()
    if timeout is not None:
        flags |= _DONTWAIT
    arena.owner = sock  # before the call: whatever it hands over is sock's
    rc = _recv_many(fd, arena._a, flags)
    if rc > 0:
        return int(rc)
    arena.owner = None
    return _hand_on(rc, timeout) if rc < 0 else -1


def try_recv_one(sock: socket.socket, arena: Arena, flags: int) -> Optional[tuple[bytes, list[int], int]]:
    """`try_recv` into an arena of one message: (data, descriptors, msg_flags), or None.

    None also when the message needs the careful path (0 bytes: maybe the
    end of the stream; an address or credentials); it is then left in the
    arena.  Nothing is delivered here: the caller delivers.
    """
    # try_recv, written out: one Python frame less on the hot path
    fd = sock.fileno()
    if fd < 0 or raw_family(sock) != _AF_UNIX or arena.owner is not None:
        return None
    timeout = sock.gettimeout()
    if timeout is not None:
        flags |= _DONTWAIT
    arena.owner = sock  # before the call: whatever it hands over is sock's
    a = arena._a
    rc = _recv_many(fd, a, flags)
    if rc != 1:
        if rc < 0:
            arena.owner = None
            _hand_on(rc, timeout)
        return None
    n = arena.lens[0]
    if not n:
        return None
    if a.extras:
        if a.addrlens[0] >= 0 or a.creds[0]:
            return None
        return arena._buffer[0:n], _unpack(a.fds, a.nfds[0]), arena.flag_view[0]
    return arena._buffer[0:n], [], arena.flag_view[0]


def _refuse_mismatch(lengths: int, data: int, declared: int = 0, fds: int = 0) -> None:
    """Raise BufferError when lengths or counts do not add up to what was handed to C.

    The core refused them (-EINVAL) before reading: said plainly here, since
    it means a buffer or list changed between being measured and being sent.
    Returns when they add up (the EINVAL is then the kernel's).
    """
    if lengths != data:
        raise BufferError("the message lengths add up to %d bytes but %d were handed over; "
                          "nothing was sent" % (lengths, data))
    if declared != fds:
        raise BufferError("the messages declare %d descriptors but %d were handed over; "
                          "nothing was sent" % (declared, fds))


if array.array("L").itemsize == ffi.sizeof("size_t"):
    def _size_t_array(values: list[int]) -> Any:
        # array() converts a list of ints about twice as fast as ffi.new
        return ffi.from_buffer("size_t[]", array.array("L", values))
else:  # pragma: no cover - platforms where unsigned long is not size_t
    def _size_t_array(values: list[int]) -> Any:
        return ffi.new("size_t[]", values)


class Arena:
    """A receive area in C memory: max_messages x bufsize bytes, plus fds and addresses.

    What the kernel handed over is recorded by the C call that received it
    (struct afunix_arena, csrc/afunix.h): messages [delivered, count) are
    not given to the caller yet and the next recv_batch returns them again;
    the arena closes the descriptors it still holds.  `deliver`,
    `take_fds` and `take_all_fds` give things over with plain stores, no
    call in between: CPython runs a signal handler (whose exception could
    cut a sequence short) only at calls and backward jumps.
    """

    def __init__(self, max_messages: int, bufsize: int, maxfds: int) -> None:
        # The data area is owned here (ffi.new), not by C: every view of it
        # (RecvBatch[i], .buffer) holds the array through its buffer, so a
        # view kept after the arena is gone reads what was received, never
        # freed memory.  It starts zeroed: .buffer shows no old heap bytes.
        data = ffi.new("char[]", max_messages * bufsize)
        # The struct is Python-owned and given its destructor before C
        # allocates anything into it: a signal handler's exception raised
        # right after afunix_arena_init returns drops the struct through
        # afunix_arena_clear, so nothing init allocated is lost.
        # size: PyPy's collector counts the C memory this object holds (up to
        # 256 MiB), so a dropped arena is freed soon, not when Python memory runs low.
        raw = ffi.gc(ffi.new("struct afunix_arena *"), lib.afunix_arena_clear,
                     size=max_messages * bufsize)
        self._a = raw
        if lib.afunix_arena_init(raw, max_messages, bufsize, maxfds, data) != 0:
            raise MemoryError("cannot allocate a receive arena of %d x %d bytes" % (max_messages, bufsize))
        self._data = data
        self.max_messages = max_messages
        self.bufsize = bufsize
        self.maxfds = maxfds
        #: the socket object whose messages an interrupted receive left here
        self.owner: Any = None
        self._buffer = ffi.buffer(data)
        #: memoryview of the whole data area; message i starts at i * bufsize
        self.view = memoryview(self._buffer)
        #: per-message byte counts of the last recv, read in place (no copy)
        self.lens = memoryview(ffi.buffer(raw.lens, max_messages * ffi.sizeof("size_t"))).cast("N")  # type: ignore[call-overload]
        #: the same for msg_flags: an index into a view costs less than a field through the struct
        self.flag_view = memoryview(ffi.buffer(raw.msg_flags, max_messages * ffi.sizeof("int"))).cast("i")

    def first(self) -> int:
        """Where the messages recv_batch just returned start: past those already delivered."""
        a = self._a
        return int(a.delivered) if a.delivered < a.count else 0

    def pending(self) -> bool:
        """Whether the arena holds messages received and not delivered (an interrupted call)."""
        a = self._a
        return bool(a.delivered < a.count)

    def deliver(self, upto: int, hand_fds: bool) -> None:
        """Give messages [.., upto) to the caller, and with hand_fds all their descriptors.

        Stores only: done whole or not at all, whatever a signal handler raises.
        """
        a = self._a
        a.delivered = upto
        if hand_fds:
            a.all_handed = 1
        if upto >= a.count:
            self.owner = None

    def length(self, i: int) -> int:
        return int(self._a.lens[i])

    def msg_flags(self, i: int) -> int:
        return int(self._a.msg_flags[i])

    def held_fds(self, start: int, stop: int) -> list[tuple[int, ...]]:
        """The descriptors the arena still holds, per message of [start, stop)."""
        a = self._a
        if not a.total_fds:
            return [()] * (stop - start)
        if start == 0 and stop == 1:  # recv_fds, a batch of one
            held = a.delivered == 0 or not (a.all_handed or a.handed[0])
            return [tuple(ffi.unpack(a.fds, a.nfds[0])) if held else ()]
        counts = ffi.unpack(a.nfds, stop)
        flat = ffi.unpack(a.fds, a.total_fds)
        handed = ffi.unpack(a.handed, stop)
        all_handed, delivered = a.all_handed, a.delivered
        out: list[tuple[int, ...]] = []
        at = sum(counts[:start])
        for i in range(start, stop):
            k = counts[i]
            held = i >= delivered or not (all_handed or handed[i])
            out.append(tuple(flat[at:at + k]) if k and held else ())
            at += k
        return out

    def take_fds(self, i: int) -> list[int]:
        """Message i's descriptors, given to the caller once; [] after that."""
        fds = list(self.held_fds(i, i + 1)[0])
        self._a.handed[i] = 1
        return fds

    def take_all_fds(self, count: int) -> list[int]:
        """Every descriptor of messages [0, count) not given yet, given to the caller."""
        a = self._a
        fds: list[int]
        if (count == a.count and not a.all_handed
                and ffi.buffer(a.handed, count)[:].count(0) == count):
            # None given yet, of every message the arena holds: all of its
            # descriptors, which C keeps back to back in message order.
            fds = _unpack(a.fds, a.total_fds)
        else:
            fds = [fd for got in self.held_fds(0, count) for fd in got]
        a.all_handed = 1
        return fds

    def hand_all(self) -> None:
        """Give every descriptor of the last receive to the caller (a store)."""
        self._a.all_handed = 1

    def release_fds(self) -> None:
        """Close the descriptors the arena holds; drop undelivered messages."""
        lib.afunix_arena_release(self._a)

    def fd_counts(self, count: int) -> list[int]:
        return list(ffi.unpack(self._a.nfds, count))

    def address(self, i: int) -> Optional[bytes]:
        n = self._a.addrlens[i]
        return None if n < 0 else bytes(ffi.unpack(self._a.addrs + i * _ADDR_MAX, n))

    def credentials(self, i: int) -> Optional[tuple[int, int, int]]:
        c = self._a.creds
        return (int(c[4 * i + 1]), int(c[4 * i + 2]), int(c[4 * i + 3])) if c[4 * i] else None

    def plain(self) -> bool:
        """Whether no message of the last receive carries descriptors, an address or credentials."""
        return bool(self._a.extras == 0)  # counted in C during the receive

    def chunks(self, start: int, stop: int) -> list[bytes]:
        """Copies of the data of messages [start, stop), in one pass."""
        buf = self._buffer
        size = self.bufsize
        lens = ffi.unpack(self._a.lens, stop)
        return [buf[i * size:i * size + lens[i]] for i in range(start, stop)]

    def all_flags(self, start: int, stop: int) -> list[int]:
        return list(ffi.unpack(self._a.msg_flags, stop)[start:])

    def lengths(self, count: int) -> list[int]:
        return self.lens[:count].tolist()  # type: ignore[no-any-return]


def new_arena(max_messages: int, bufsize: int, maxfds: int) -> Arena:
    """A receive arena for recv_batch."""
    return Arena(max_messages, bufsize, maxfds)


def recv_batch(sock: socket.socket, arena: Arena, flags: int) -> int:
    """One recvmmsg into `arena` (or the messages an interrupted call left there); the count, or OSError."""
    rc = lib.afunix_recv_many(sock.fileno(), arena._a, flags)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return int(rc)


def close_fds(fds: Sequence[int]) -> None:
    """Close every descriptor in `fds` in one C call (errors ignored, as EBADF would be)."""
    if fds:
        if type(fds) is array.array and fds.itemsize == _INT_SIZE:
            numbers = ffi.from_buffer("int[]", fds)  # checked C ints (_checks.descriptor_array)
        else:
            numbers = _int_array(fds)
        lib.afunix_close_fds(numbers, len(numbers))


def _int_array(values: "Sequence[int]") -> Any:
    return ffi.from_buffer("int[]", array.array("i", values))


_INT_SIZE = ffi.sizeof("int")


def _count_array(values: list[int]) -> Any:
    """Counts (len() results, >= 0) as a C int array.

    array("I") converts each with one C call, where array("i") goes through
    the argument parser; a count fits an int, whose bits it then has.
    """
    counts = array.array("I", values)
    return ffi.from_buffer("int[]", counts) if counts.itemsize == _INT_SIZE else _int_array(values)


# ---- message channel ----
# Frames (docs/PROTOCOL.md) packed and parsed in C, one call per batch.
from typing import Sequence

_FRAMES_NULL = ffi.NULL


class FrameTable:
    """Where parse_frames writes, in C memory: payload offsets, lengths, descriptor counts."""

    def __init__(self, capacity: int) -> None:
        # The arrays are owned here (ffi.new), not by C: a memoryview of an
        # owning array keeps it alive, so a FrameBatch (or a slice of its
        # offsets) held after the channel is gone never reads freed memory.
        arrays = [ffi.new("uint32_t[]", capacity) for _ in range(3)]
        f = ffi.new("struct afunix_frames *")
        f.capacity = capacity
        f.offsets, f.lengths, f.nfds = arrays
        f.uniform = -1
        self._f = f
        self._arrays = arrays
        self.capacity = capacity
        self.offsets, self.lengths, self.nfds = (memoryview(ffi.buffer(a)).cast("I") for a in arrays)
        self.count = 0
        self.consumed = 0
        self.uniform = -1
        self.with_fds = 0
        self.need = 0
        # the buffer last parsed and its C view: from_buffer costs more than
        # the parse of a small batch, and a channel parses the same buffer
        self._buf: Optional[bytearray] = None
        self._cbuf: Any = _FRAMES_NULL


def new_frame_table(capacity: int) -> FrameTable:
    """A table for parse_frames with room for `capacity` frames."""
    return FrameTable(capacity)


def parse_frames(table: FrameTable, buf: bytearray, start: int, end: int,
                 max_frames: int, max_frame: int) -> int:
    """Parse complete frames of buf[start:end] into table in one C call; the count or -errno."""
    if buf is not table._buf:
        table._cbuf = ffi.from_buffer(buf)
        table._buf = buf
    f = table._f
    rc = lib.afunix_frames_parse(f, table._cbuf, start, end, max_frames, max_frame)
    table.count = f.count
    table.consumed = f.consumed
    table.uniform = f.uniform
    table.with_fds = f.with_fds
    table.need = f.need
    return int(rc)


def pack_frames(out: bytearray, datas: Sequence[Any], joined: bytes, lengths: Sequence[int],
                nfds: Optional[Sequence[int]]) -> int:
    """Frames for the payloads in `joined` (lengths[i] bytes each) into out, in one C call.

    Returns the bytes written; `out` must have room for them (the caller
    sizes it, and reuses it: a fresh buffer per batch costs page faults).
    """
    n = len(lengths)
    if not n:
        return 0
    first = lengths[0]
    if lengths.count(first) == n:
        # fixed-size messages: one length for all, no array to convert
        lens_arg, uniform = _FRAMES_NULL, first
    else:
        lens_arg, uniform = ffi.from_buffer("uint32_t[]", array.array("I", lengths)), 0
    if nfds is None:
        nfds_arg, nfds_count = _FRAMES_NULL, 0
    else:
        counts = array.array("I", nfds)
        nfds_arg, nfds_count = ffi.from_buffer("uint32_t[]", counts), len(counts)
    # The sizes there really are: the room in `out` (pinned by from_buffer
    # for the call) and the payload bytes, so the C side's checks guard both.
    rc = lib.afunix_frames_pack(ffi.from_buffer(out), len(out), joined, len(joined),
                                lens_arg, uniform, nfds_arg, nfds_count, n)
    if rc < 0:
        if rc == _EINVAL:
            _refuse_mismatch(sum(lengths), len(joined))
            if nfds is not None and nfds_count != n:
                raise BufferError("%d descriptor counts for %d frames" % (nfds_count, n))
        raise OSError(-rc, os.strerror(-rc))
    return int(rc)


# ---- the channel's receive state ----

CHAN_READS = lib.AFUNIX_CHAN_READS
CHAN_FDS_NO_DATA = lib.AFUNIX_CHAN_FDS_NO_DATA
CHAN_EMPTY_RECORD = lib.AFUNIX_CHAN_EMPTY_RECORD
_CHAN_SLOT = lib.AFUNIX_SCM_MAX_FD
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class ChanRx:
    """A channel's receive state (struct afunix_chan_rx): `s` has its fields, read and set in place."""

    reads = CHAN_READS  # slots for held reads
    no_data = CHAN_FDS_NO_DATA  # in errors: descriptors came with no byte
    empty_record = CHAN_EMPTY_RECORD  # in errors: an empty SOCK_SEQPACKET record, more after it

    def __init__(self) -> None:
        self.s = ffi.new("struct afunix_chan_rx *")  # zeroed: nothing held, head == tail
        self._buf: Optional[bytearray] = None
        self._cbuf: Any = _NULL


def new_chan_rx() -> ChanRx:
    """Receive state for one channel."""
    return ChanRx()


def chan_recv(sock: socket.socket, rx: ChanRx, buffer: bytearray, maxlen: int, flags: int,
              records: int = 1) -> int:
    """One recvmsg appended to buffer at rx.s.end, recorded in rx by the same C call; the bytes, or OSError.

    With records > 1 (SOCK_SEQPACKET, maxlen RECORD_MAX): up to that many
    records with one recvmmsg, each recorded as a read of its own
    (afunix_chan_recv_records).
    """
    if buffer is not rx._buf:
        rx._cbuf = ffi.from_buffer(buffer)
        rx._buf = buffer
    if records > 1:
        rc = lib.afunix_chan_recv_records(sock.fileno(), rx.s, rx._cbuf, len(buffer), records,
                                          flags)
    else:
        rc = lib.afunix_chan_recv(sock.fileno(), rx.s, rx._cbuf, len(buffer), maxlen, flags)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return int(rc)


def chan_drop(rx: ChanRx, upto: int, every: bool) -> None:
    """Close the held reads claimed by frames before stream offset `upto` (every held read with `every`)."""
    lib.afunix_chan_drop(rx.s, upto, 1 if every else 0)


def chan_fds(rx: ChanRx, slot: int) -> list[int]:
    """The descriptors held in `slot` (pure: nothing is given over)."""
    s = rx.s
    n = s.nfds[slot]
    return list(ffi.unpack(s.fds + slot * _CHAN_SLOT, n)) if n else []


# ---- for the benchmark ----

def bare_calls(sock: socket.socket, size: int
               ) -> tuple[Callable[[bytes], Any], Callable[[], Any], Callable[[], None]]:
    """(send, recv, free): the core's calls for one `size`-byte message on `sock`, arguments made once.

    What the benchmark's overhead rows subtract from afunix's calls: the
    system call each fast path makes, with nothing around it: sock.send
    (what try_send_one makes on a socket without a timeout, as the
    benchmark's is) and afunix_recv_many.
    `free` releases the receive area; call it once, after the last recv.
    """
    fd = sock.fileno()
    data_area = ffi.new("char[]", size)  # the caller owns the data area
    arena = ffi.new("struct afunix_arena *")
    if lib.afunix_arena_init(arena, 1, size, 0, data_area) != 0:
        raise MemoryError("afunix_arena_init")
    recv_many = lib.afunix_recv_many
    stdlib_send = sock.send

    def send(data: bytes) -> Any:
        return stdlib_send(data, _NOSIGNAL)

    def recv() -> Any:
        n = recv_many(fd, arena, 0)
        # given over at once, as every receive does: an undelivered message
        # would be returned again by the next call, which then never reads
        arena.delivered = arena.count
        return n

    def free() -> None:
        lib.afunix_arena_clear(arena)
        del holder[:]  # the struct and data area go only after the arena is cleared

    holder = [arena, data_area]
    return send, recv, free


def copy_streaming(target: memoryview, source: memoryview) -> None:
    """The contract's copy_streaming: afunix_copy_streaming over both buffers, pinned while C copies."""
    dst = ffi.from_buffer(target, require_writable=True)
    src = ffi.from_buffer(source)
    if len(dst) != len(src):
        raise ValueError("copy of %d bytes into %d" % (len(src), len(dst)))
    lib.afunix_copy_streaming(dst, src, len(dst))


def chan_hold(rx: ChanRx, nbytes: int, fds: list[int], flags: int) -> None:
    """The contract's chan_hold (_contract.Backend), in the C core's receive state."""
    s = rx.s
    if s.tail - s.head >= CHAN_READS or nbytes < 0 or len(fds) > _CHAN_SLOT:
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
    errors = s.errors | (flags & (_MSG_TRUNC | _MSG_CTRUNC))
    if fds and not nbytes:
        errors |= CHAN_FDS_NO_DATA
    lo = s.base + s.end
    if fds:
        slot = s.tail % CHAN_READS
        s.fds[slot * _CHAN_SLOT:slot * _CHAN_SLOT + len(fds)] = fds
        s.lo[slot] = lo
        s.hi[slot] = lo + nbytes
        s.frame[slot] = -1
        s.nfds[slot] = len(fds)
        s.tail = s.tail + 1
    s.end = s.end + nbytes
    s.errors = errors
