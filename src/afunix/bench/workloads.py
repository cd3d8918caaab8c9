"""The workloads, once per implementation: the loops a run times in each process.

Every message carries a little-endian uint64 sequence number in its first 8
bytes (the first 8 of every chunk, on a stream).  A receiver returns how many
messages it got and the sum of their numbers, so the runner can check that
exactly what was sent arrived: ``count`` and ``count * (count - 1) // 2``.

Functions take ``(sock, count, row)`` and are looked up in registry.SENDERS
and registry.RECEIVERS by ``(workload, implementation)``; a workload whose
sides must meet first (a peer's handshake) also has SETUPS, run before the
timing starts, whose result the side gets instead of the socket.  The afunix
functions are looked up on the package at call time, so an implementation of
a function that does not exist yet is reported as not available rather than
breaking the benchmark.
"""
from __future__ import annotations

import array
import importlib.util
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import afunix

from .. import _backend
from . import _reference
from .matrix import Row

_SEQ = struct.Struct("<Q")
# A plain int: socket.MSG_* are IntFlag members, and `|` or `&` on them in a
# loop costs as much as the receive itself.
CUT = int(socket.MSG_TRUNC) | int(socket.MSG_CTRUNC)


class Mismatch(Exception):
    """A receiver got something other than what the sender sends."""


@dataclass
class Received:
    """What one side of a run reports back to the runner."""

    count: int
    checksum: int = 0
    fds_closed: int = 0
    samples: list[int] = field(default_factory=list)  # round trips, ns
    elapsed: Optional[float] = None  # set by workloads that time themselves
    value: Optional[float] = None  # set by workloads that compute their own figure


@dataclass(frozen=True)
class Peer:
    """A module outside the stdlib that a base column needs, and how to install it."""

    module: str  # what to import
    name: str  # what users call it
    install: str  # the command that installs it


#: The extra that installs every peer the benchmark knows (pyproject.toml).
BENCH_EXTRA = "pip install 'afunix[bench]'"


@dataclass(frozen=True)
class Workload:
    """One workload: how it is verified, and what each of its columns runs.

    `base`, `afunix` and `c` say in words what the base column, the two afunix
    columns and the C column measure; an empty string leaves that column
    empty.  The C column is the same operation written in plain C (the same
    socket type, batch and placement), never another program: a different
    program gets a workload of its own.
    """

    name: str
    title: str  # the table's row label, before size and batch (13 characters at most)
    kind: str  # "pairs", "messages", "pingpong" or "overhead": how a run is checked
    sock_type: int
    unit: str  # what the table shows: "pairs/s", "msgs/s", "MB/s", "us", "ns"
    afunix_needs: Tuple[str, ...]  # names the afunix columns call ("Channel.loan": a method)
    base: str  # what the base column runs ("" for none)
    afunix: str  # what the afunix columns run ("" for none)
    c: str = ""  # what the C column runs ("" for none)
    peer: Optional[Peer] = None  # a module the base column needs
    c_peer: bool = False  # every column's other side is the plain C loop (_reference)

    @property
    def two_process(self) -> bool:
        """True when a sender and a receiver run in two processes."""
        return self.kind not in ("pairs", "overhead")

    @property
    def lower_is_better(self) -> bool:
        """True for times (latency, overhead), False for rates."""
        return self.unit in ("us", "ns")

    @property
    def columns(self) -> Tuple[str, ...]:
        """The implementations this workload has, in table order."""
        present = {"base": bool(self.base), "afunix-stdlib": bool(self.afunix),
                   "afunix-c": bool(self.afunix), "c": bool(self.c)}
        return tuple(impl for impl in ("base", "afunix-stdlib", "afunix-c", "c") if present[impl])


def expected(row: Row, count: int) -> Received:
    """What a correct receiver reports for `count` messages of `row`."""
    return Received(count, count * (count - 1) // 2, fds_closed=count * row.nfds)


def _api(name: str) -> Any:
    # Looked up at call time: the afunix API grows while this runs at every commit.
    return getattr(afunix, name)


def _batches(count: int, batch: int) -> range:
    return range(0, count, batch)


# ---- socketpair creation (one process; times itself, creation only) ----------

PairMaker = Tuple[Callable[[int], List[Any]], Callable[[List[Any]], None]]


def _close_pairs(pairs: List[Any]) -> None:
    for a, b in pairs:
        a.close()
        b.close()


def pair_maker(impl: str) -> PairMaker:
    """(make, close) for `impl`: make(n) returns n pairs, close(pairs) closes them.

    Shared with benchmarks/test_bench_pairs.py.
    """
    if impl == "stdlib":
        pair = socket.socketpair
        return (lambda n: [pair() for _ in range(n)]), _close_pairs
    if impl == "c":
        def make(n: int) -> List[Any]:
            fds = _reference.socketpairs(socket.SOCK_STREAM, n)
            return [fds[i:i + 2] for i in range(0, len(fds), 2)]

        def close(pairs: List[Any]) -> None:
            _reference.close_all([fd for pair in pairs for fd in pair])

        return make, close
    socketpairs = _api("socketpairs")
    return (lambda n: list(socketpairs(n))), _close_pairs


def _pairs_timed(impl: str, count: int, row: Row) -> Received:
    make, close = pair_maker(impl)
    made = 0
    elapsed = 0.0
    clock = time.perf_counter
    for start in _batches(count, row.batch):
        n = min(row.batch, count - start)
        t0 = clock()
        pairs = make(n)
        elapsed += clock() - t0
        made += len(pairs)
        close(pairs)
    return Received(made, made * (made - 1) // 2, elapsed=elapsed)


def pairs_stdlib(sock: Optional[socket.socket], count: int, row: Row) -> Received:
    """A loop of socket.socketpair(), as code written today does."""
    return _pairs_timed("stdlib", count, row)


def pairs_afunix(sock: Optional[socket.socket], count: int, row: Row) -> Received:
    """afunix.socketpairs(n), on whichever backend is active."""
    return _pairs_timed("afunix", count, row)


def pairs_c(sock: Optional[socket.socket], count: int, row: Row) -> Received:
    """The C reference: socketpair() in a C loop, no Python objects."""
    return _pairs_timed("c", count, row)


# ---- DGRAM and SEQPACKET messages --------------------------------------------

def send_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.send() once per message."""
    buf = bytearray(row.size)
    pack, send = _SEQ.pack_into, sock.send
    for i in range(count):
        pack(buf, 0, i)
        send(buf)
    return Received(count)


def recv_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.recv() once per message."""
    unpack, recv, size = _SEQ.unpack_from, sock.recv, row.size
    total = 0
    for _ in range(count):
        data = recv(size)
        if len(data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
        total += unpack(data)[0]
    return Received(count, total)


# The batched workloads number and check their messages a batch at a time
# (sequence numbers written and summed through one strided view), as a
# program built on the batch APIs would: the point of those APIs is that
# nothing in Python runs once per message.  Sequence numbers are "<Q" at
# offset 0; the strided views use native order, so they are used only where
# native order is little-endian (everywhere afunix is measured today).
_LITTLE = sys.byteorder == "little"


class _NumberedBlock:
    """`batch` messages of `size` bytes in one buffer, numbered in bulk."""

    def __init__(self, batch: int, size: int) -> None:
        self.block = bytearray(batch * size)
        view = memoryview(self.block)
        self.messages = [view[i * size:(i + 1) * size] for i in range(batch)]
        self._ids = view.cast("Q")[::size // 8] if _LITTLE and size % 8 == 0 else None
        self._size = size

    def number(self, start: int, n: int) -> list[memoryview]:
        """Write start, start+1, ... into the first n messages; return them."""
        if self._ids is not None:
            self._ids[:n] = array.array("Q", range(start, start + n))
        else:
            for i in range(n):
                _SEQ.pack_into(self.messages[i], 0, start + i)
        return self.messages if n == len(self.messages) else self.messages[:n]


def _batch_checksum(batch: Any, n: int, size: int) -> int:
    """Check n full-size messages in `batch` and sum their sequence numbers."""
    lengths = batch.lengths()
    if lengths.count(size) != n:
        raise Mismatch("message sizes %s, %d expected" % (sorted(set(lengths)), size))
    if _LITTLE and size % 8 == 0:
        return sum(batch.buffer[:n * size].cast("Q")[::size // 8])
    unpack = _SEQ.unpack_from
    return sum(unpack(batch[i])[0] for i in range(n))


def send_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.send_many(), a batch of messages per call."""
    send_many = _api("send_many")
    block = _NumberedBlock(row.batch, row.size)
    for start in _batches(count, row.batch):
        n = min(row.batch, count - start)
        sent = send_many(sock, block.number(start, n))
        if sent != n:
            raise Mismatch("send_many sent %d of %d on a blocking socket" % (sent, n))
    return Received(count)


def recv_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.RecvBatch().recv(): a batch per call, no object per message."""
    batch = _api("RecvBatch")(row.batch, row.size)
    got = total = 0
    while got < count:
        n = batch.recv(sock)
        if n == 0:
            break
        total += _batch_checksum(batch, n, row.size)
        got += n
    return Received(got, total)


def send_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: sendmmsg, a batch per call."""
    return Received(_reference.send(sock.fileno(), count, row.size, row.batch))


def recv_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: recvmmsg(MSG_WAITFORONE), a batch per call."""
    got, total = _reference.recv(sock.fileno(), count, row.size, row.batch)
    return Received(got, total)


# ---- STREAM bandwidth ---------------------------------------------------------

class StreamChecker:
    """Adds up the number at the start of each chunk, wherever reads cut the stream."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.total = 0
        self._head = bytearray()

    def feed(self, data: Any, n: int) -> None:
        """Account for the first n bytes of data, the next bytes of the stream."""
        size, pos, off = self.size, self.pos, 0
        while off < n:
            in_chunk = pos % size
            if in_chunk < 8:
                take = min(8 - in_chunk, n - off)
                self._head += data[off:off + take]
                if len(self._head) == 8:
                    self.total += _SEQ.unpack(self._head)[0]
                    self._head.clear()
            else:
                take = min(size - in_chunk, n - off)
            off += take
            pos += take
        self.pos = pos


def stream_send_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.sendall() once per chunk."""
    buf = bytearray(row.size)
    pack, sendall = _SEQ.pack_into, sock.sendall
    for i in range(count):
        pack(buf, 0, i)
        sendall(buf)
    return Received(count)


def stream_recv_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.recv_into() a chunk-sized buffer until all bytes arrived."""
    buf = bytearray(row.size)
    view = memoryview(buf)
    checker = StreamChecker(row.size)
    total, recv_into = count * row.size, sock.recv_into
    while checker.pos < total:
        n = recv_into(buf)
        if n == 0:
            break
        checker.feed(view, n)
    return Received(checker.pos // row.size, checker.total)


def stream_send_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.send_many() of a batch of chunks: one sendmmsg per batch."""
    return send_afunix(sock, count, row)


def stream_recv_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.RecvBatch().recv(): up to a batch of reads per call."""
    batch = _api("RecvBatch")(row.batch, row.size)
    checker = StreamChecker(row.size)
    total = count * row.size
    while checker.pos < total:
        n = batch.recv(sock)
        if n == 0:
            break
        for i in range(n):
            view = batch[i]
            if len(view) == 0:  # end of stream
                total = checker.pos
                break
            checker.feed(view, len(view))
    return Received(checker.pos // row.size, checker.total)


def stream_send_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: sendmmsg of a batch of chunks."""
    return Received(_reference.stream_send(sock.fileno(), count, row.size, row.batch))


def stream_recv_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: recv() a chunk-sized buffer in a loop."""
    got, total = _reference.stream_recv(sock.fileno(), count, row.size)
    return Received(got, total)


# ---- descriptor passing -------------------------------------------------------

def _fds_to_send(row: Row) -> list[int]:
    # The same descriptor row.nfds times: the kernel installs a new one for
    # each on the receiving side, which is the cost being measured.
    return [devnull()] * row.nfds


_DEVNULL: list[int] = []


def devnull() -> int:
    """A descriptor of /dev/null, opened once per process: what the descriptor rows pass."""
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _DEVNULL[0]


def fds_send_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """socket.send_fds() once per message."""
    buf = bytearray(row.size)
    fds = _fds_to_send(row)
    pack, send_fds = _SEQ.pack_into, socket.send_fds
    for i in range(count):
        pack(buf, 0, i)
        send_fds(sock, [buf], fds)
    return Received(count)


def fds_recv_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """socket.recv_fds() once per message; closes every descriptor received."""
    unpack, recv_fds, close = _SEQ.unpack_from, socket.recv_fds, os.close
    size, nfds = row.size, row.nfds
    total = closed = 0
    for _ in range(count):
        data, fds, flags, _addr = recv_fds(sock, size, nfds)
        for fd in fds:
            close(fd)
        closed += len(fds)
        if len(data) != size or flags & CUT:
            raise Mismatch("message of %d bytes, flags %#x" % (len(data), flags))
        total += unpack(data)[0]
    return Received(count, total, fds_closed=closed)


def fds_send_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.send_many() of afunix.Message(data, fds), a batch per call."""
    send_many, message = _api("send_many"), _api("Message")
    fds = tuple(_fds_to_send(row))
    block = _NumberedBlock(row.batch, row.size)
    # Messages are values: made once over the block, renumbered in bulk.
    messages = [message(view, fds) for view in block.messages]
    for start in _batches(count, row.batch):
        n = min(row.batch, count - start)
        block.number(start, n)
        sent = send_many(sock, messages if n == row.batch else messages[:n])
        if sent != n:
            raise Mismatch("send_many sent %d of %d on a blocking socket" % (sent, n))
    return Received(count)


def fds_recv_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.RecvBatch(maxfds=...).recv(); closes every descriptor received."""
    batch = _api("RecvBatch")(row.batch, row.size, maxfds=row.nfds)
    close_fds = _api("close_fds")
    got = total = closed = 0
    while got < count:
        n = batch.recv(sock)
        if n == 0:
            break
        fds = batch.all_fds()
        close_fds(fds)
        closed += len(fds)
        # a message whose control data was cut has none: the counts show it
        counts = batch.fd_counts()
        if counts.count(row.nfds) != n:
            raise Mismatch("descriptor counts %s, %d expected" % (sorted(set(counts)), row.nfds))
        total += _batch_checksum(batch, n, row.size)
        got += n
    return Received(got, total, fds_closed=closed)


def fds_send_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: sendmmsg with SCM_RIGHTS, a batch per call."""
    return Received(_reference.send_fds(sock.fileno(), count, row.size, row.batch,
                                        _fds_to_send(row)))


def fds_recv_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: recvmmsg, closing each descriptor in C."""
    got, total, closed = _reference.recv_fds(sock.fileno(), count, row.size, row.batch,
                                             row.nfds)
    return Received(got, total, fds_closed=closed)


# ---- ping-pong latency (the "sender" pings and checks, the "receiver" echoes) --

def ping_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.send() a numbered message, sock.recv() its echo; time each round trip."""
    buf = bytearray(row.size)
    pack, unpack, send, recv = _SEQ.pack_into, _SEQ.unpack_from, sock.send, sock.recv
    now, size = time.perf_counter_ns, row.size
    samples = []
    for i in range(count):
        pack(buf, 0, i)
        t0 = now()
        send(buf)
        data = recv(size)
        samples.append(now() - t0)
        if len(data) != size or unpack(data)[0] != i:
            raise Mismatch("round trip %d came back wrong" % i)
    return Received(count, count * (count - 1) // 2, samples=samples)


def echo_stdlib(sock: socket.socket, count: int, row: Row) -> Received:
    """sock.recv() and sock.send() it back."""
    send, recv, size = sock.send, sock.recv, row.size
    for i in range(count):
        data = recv(size)
        if not data:
            return Received(i)
        send(data)
    return Received(count)


def ping_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """afunix.send_many([message]) and RecvBatch(1, size).recv() per round trip."""
    send_many, batch = _api("send_many"), _api("RecvBatch")(1, row.size)
    buf = bytearray(row.size)
    messages = [buf]
    pack, unpack, now, size = _SEQ.pack_into, _SEQ.unpack_from, time.perf_counter_ns, row.size
    samples = []
    for i in range(count):
        pack(buf, 0, i)
        t0 = now()
        send_many(sock, messages)
        batch.recv(sock)
        samples.append(now() - t0)
        view = batch[0]
        if len(view) != size or unpack(view)[0] != i:
            raise Mismatch("round trip %d came back wrong" % i)
    return Received(count, count * (count - 1) // 2, samples=samples)


def echo_afunix(sock: socket.socket, count: int, row: Row) -> Received:
    """RecvBatch(1, size).recv() and afunix.send_many() it back."""
    send_many, batch = _api("send_many"), _api("RecvBatch")(1, row.size)
    for i in range(count):
        if batch.recv(sock) == 0 or len(batch[0]) == 0:
            return Received(i)
        send_many(sock, [batch[0]])
    return Received(count)


def ping_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: send() and recv(), timed with clock_gettime in C."""
    samples = _reference.ping(sock.fileno(), count, row.size)
    return Received(len(samples), count * (count - 1) // 2, samples=samples)


def echo_c(sock: socket.socket, count: int, row: Row) -> Received:
    """The C reference: recv() and send() it back."""
    return Received(_reference.echo(sock.fileno(), count, row.size))


_AFUNIX = ("afunix-stdlib", "afunix-c")

Side = Callable[..., Received]
#: setup(sock, row, shared) -> what the side's function gets instead of the socket.
Setup = Callable[[Any, Row, Any], Any]
#: made in the runner before the fork: (object both sides share, close it)
Shared = Callable[[Row], Tuple[Any, Callable[[], None]]]

def missing_peer(workload: Workload) -> Optional[str]:
    """Why `workload` cannot run at all here (a peer it needs is missing), or None."""
    if workload.c_peer and _reference.MISSING is not None:
        return "their other side is the plain C loop, and " + _reference.MISSING
    peer = workload.peer
    if peer is None or importlib.util.find_spec(peer.module) is not None:
        return None
    return "%s is not installed: %s" % (peer.name, peer.install)


def _has_api(name: str) -> bool:
    """True when afunix has `name` ("send_many", or a method: "Channel.loan")."""
    found: Any = afunix
    for part in name.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return True


def unavailable(workload: Workload, impl: str) -> Optional[str]:
    """Why `impl` cannot run `workload` here, or None when it can."""
    if impl in _AFUNIX:
        missing = [name for name in workload.afunix_needs if not _has_api(name)]
        if missing:
            return "not available: afunix.%s" % ", afunix.".join(missing)
        if impl == "afunix-c":
            try:
                _backend.load("c")
            except ImportError:
                return "not available: C core not built"
    if impl == "c" and _reference.MISSING is not None:
        return "not available: " + _reference.MISSING
    if workload.name in ("fds", "single-fds") and impl == "base" \
            and not hasattr(socket, "send_fds"):
        return "not available: socket.send_fds (Python 3.9+)"
    if impl == "base" and workload.peer is not None:
        return missing_peer(workload)
    return None

