"""The channel against the messaging tools Python programs pick today: pyzmq, pynng, multiprocessing.

Each workload here is one row kind: its base column is the tool, its afunix
columns the batched channel (Channel.send_many / recv_many) or, for large
messages and objects, the channel's shared-memory lane (channel_workloads),
so the af/base ratio is the channel against that tool, measured in the same
rounds.  None has a C column: no plain-C program does what these tools do.

Every tool is set up as its documentation recommends for throughput and so
that it cannot race, deadlock or starve:

- The receiving side binds (listens) first, at a fresh ipc:// path in a
  private temporary directory, and sends the address to the sender over the
  runner's socketpair; the sender connects (dials), sends a hello, and both
  wait until the hello and a warm-up burst (ZMQ_WARMUP, NNG_WARMUP) have
  arrived.  All of this is setup, done before the runner starts the clock,
  so no run pays for a connection, a retry or a cold start.
- Neither side closes before the receiver has everything: after the clock
  stopped, the receiver sends "done" on the socketpair and the sender waits
  for it (pynng's close, for one, may drop queued messages); a Queue's
  feeder thread is joined.
- A tool's own threads (pyzmq's I/O thread, nng's workers, a Queue's feeder
  thread) are started after the runner pinned the process, so they run on
  that process's CPU: on two-cpus, the sender with all its threads on one
  CPU and the receiver with its threads on the other; on one-cpu everything
  shares one CPU.  That is the placement being measured, as for every row.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, List, Optional, Tuple

from .channel_workloads import (Numbered, ObjectChecker, checksum_of, message_maker,
                                numbered_objects)
from .matrix import Row
from .workloads import Mismatch, Received

_SEQ = struct.Struct("<Q")
_STREAM = socket.SOCK_STREAM

#: How long a peer's handshake may take before the cell fails.
SETUP_TIMEOUT = 20.0
#: Messages checked together on the receiving side (one join per group).
_GROUP = 256

#: pyzmq's settings, stated in the row's description.
ZMQ_HWM = 100_000
#: pynng's queue depths (NNG_OPT_SENDBUF / NNG_OPT_RECVBUF, in messages; 8192 is nng's most).
NNG_BUFFER = 8192
#: Messages sent through a tool's connection in the handshake, untimed: a run
#: starts at the steady state a long-lived program sees, not at a cold start
#: (measured here: pyzmq's first tens of thousands of messages are slower).
ZMQ_WARMUP = 20_000
NNG_WARMUP = 2_000


# ---- the handshake over the runner's socketpair ---------------------------------------

def _send_line(sock: socket.socket, text: str) -> None:
    sock.sendall(text.encode() + b"\n")


def _recv_line(sock: socket.socket) -> str:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("the peer ended during the handshake")
        data += chunk
    return data[:-1].decode()


def _expect_byte(sock: socket.socket, want: bytes) -> None:
    got = sock.recv(1)
    if got != want:
        raise ConnectionError("the peer ended during the handshake" if not got
                              else "handshake: %r, %r expected" % (got, want))


@dataclass
class Endpoint:
    """One side of a tool's connection, and the socketpair the handshake used.

    `finish` runs after the clock stopped: the receiver says "done" on the
    socketpair, the sender waits for it, and only then does either close, so
    that closing neither loses a message nor is timed.
    """

    tool: Any  # the tool's socket
    pair: socket.socket
    close: Callable[[], None]
    receiving: bool

    def finish(self) -> None:
        """Teardown, untimed: the receiver's "done", the sender's wait for it, then close."""
        if self.receiving:
            self.pair.sendall(b"d")
        else:
            _expect_byte(self.pair, b"d")
        self.close()


def _warm_up_send(send: Callable[[bytes], Any], count: int, row: Row) -> None:
    message = bytes(row.size)
    for _ in range(count):
        send(message)


def _warm_up_recv(recv: Callable[[], bytes], count: int, row: Row) -> None:
    for _ in range(count):
        if len(recv()) != row.size:
            raise Mismatch("a warm-up message of another length than %d bytes" % row.size)


def _private_address() -> Tuple[str, Callable[[], None]]:
    # A directory only this run uses: no two runs, users or stale files meet.
    where = tempfile.mkdtemp(prefix="afunix-bench-")
    return "ipc://%s/peer" % where, (lambda: shutil.rmtree(where, ignore_errors=True))


# ---- pyzmq ipc PUSH/PULL ----------------------------------------------------------------

def zmq_setup_recv(sock: socket.socket, row: Row, shared: Any) -> Endpoint:
    """PULL: bind a private ipc address, send it, wait for the sender's hello."""
    return _zmq_pull(sock, row, ZMQ_WARMUP)


def _zmq_pull(sock: socket.socket, row: Row, warmup: int) -> Endpoint:
    import zmq

    sock.settimeout(SETUP_TIMEOUT)
    ctx = zmq.Context(io_threads=1)
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = ZMQ_HWM
    pull.rcvtimeo = int(SETUP_TIMEOUT * 1000)
    address, remove = _private_address()
    pull.bind(address)
    _send_line(sock, address)
    if pull.recv() != b"hello":
        raise Mismatch("pyzmq: the first message is not the hello")
    _warm_up_recv(pull.recv, warmup, row)
    pull.rcvtimeo = -1
    sock.sendall(b"k")
    sock.settimeout(None)  # the run's own timeout applies from here

    def close() -> None:
        pull.close(linger=0)
        ctx.term()
        remove()

    return Endpoint(pull, sock, close, receiving=True)


def zmq_setup_send(sock: socket.socket, row: Row, shared: Any) -> Endpoint:
    """PUSH: connect to the receiver's address, send a hello, wait until it arrived."""
    return _zmq_push(sock, row, ZMQ_WARMUP)


def _zmq_push(sock: socket.socket, row: Row, warmup: int) -> Endpoint:
    import zmq

    sock.settimeout(SETUP_TIMEOUT)
    address = _recv_line(sock)
    ctx = zmq.Context(io_threads=1)
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = ZMQ_HWM
    push.connect(address)
    push.send(b"hello")
    _warm_up_send(push.send, warmup, row)
    _expect_byte(sock, b"k")
    sock.settimeout(None)

    def close() -> None:
        push.close(linger=0)  # the receiver has said it has every message
        ctx.term()

    return Endpoint(push, sock, close, receiving=False)


def tool_send(end: Endpoint, count: int, row: Row) -> Received:
    """The tool's send() once per message (pyzmq: copy=True), each message made as it goes."""
    make, send = message_maker(row.size), end.tool.send
    for message in map(make, range(count)):
        send(message)
    return Received(count)


def tool_recv(end: Endpoint, count: int, row: Row) -> Received:
    """The tool's recv() once per message (pyzmq: copy=True, bytes), checked a group at a time."""
    recv, size = end.tool.recv, row.size
    total = 0
    for start in range(0, count, _GROUP):
        total += checksum_of([recv() for _ in range(min(_GROUP, count - start))], size)
    return Received(count, total)


# ---- pynng (nng) ipc Push0/Pull0 ----------------------------------------------------------

def nng_setup_recv(sock: socket.socket, row: Row, shared: Any) -> Endpoint:
    """Pull0: listen at a private ipc address, send it, wait for the sender's hello."""
    import pynng

    sock.settimeout(SETUP_TIMEOUT)
    address, remove = _private_address()
    pull = pynng.Pull0(recv_buffer_size=NNG_BUFFER, recv_timeout=int(SETUP_TIMEOUT * 1000))
    pull.listen(address)
    _send_line(sock, address)
    if pull.recv() != b"hello":
        raise Mismatch("pynng: the first message is not the hello")
    _warm_up_recv(pull.recv, NNG_WARMUP, row)
    pull.recv_timeout = -1
    sock.sendall(b"k")
    sock.settimeout(None)

    def close() -> None:
        pull.close()
        remove()

    return Endpoint(pull, sock, close, receiving=True)


def nng_setup_send(sock: socket.socket, row: Row, shared: Any) -> Endpoint:
    """Push0: dial the receiver's address (blocking until connected), send a hello."""
    import pynng

    sock.settimeout(SETUP_TIMEOUT)
    address = _recv_line(sock)
    push = pynng.Push0(send_buffer_size=NNG_BUFFER)
    push.dial(address, block=True)
    push.send(b"hello")
    _warm_up_send(push.send, NNG_WARMUP, row)
    _expect_byte(sock, b"k")
    sock.settimeout(None)
    return Endpoint(push, sock, push.close, receiving=False)


# ---- multiprocessing.Pipe and multiprocessing.Queue -----------------------------------------

def pipe_send(sock: socket.socket, count: int, row: Row) -> Received:
    """multiprocessing.Pipe's Connection.send_bytes() once per message (over a socketpair, as Pipe())."""
    conn = Connection(os.dup(sock.fileno()))
    message, send_bytes = Numbered(row.size), conn.send_bytes
    for i in range(count):
        send_bytes(message(i))
    conn.close()
    return Received(count)


def pipe_recv(sock: socket.socket, count: int, row: Row) -> Received:
    """multiprocessing.Pipe's Connection.recv_bytes() once per message."""
    conn = Connection(os.dup(sock.fileno()))
    recv_bytes, size = conn.recv_bytes, row.size
    total = 0
    for start in range(0, count, _GROUP):
        total += checksum_of([recv_bytes() for _ in range(min(_GROUP, count - start))], size)
    conn.close()
    return Received(count, total)


def queue_shared(row: Row) -> Tuple[Any, Callable[[], None]]:
    """A multiprocessing.Queue made before the fork, as multiprocessing programs share one."""
    queue = multiprocessing.get_context("fork").Queue()

    def close() -> None:
        queue.close()
        queue.join_thread()

    return queue, close


def the_queue(sock: socket.socket, row: Row, shared: Any) -> Any:
    """The Queue the runner made before the fork: each side's setup for the Queue row."""
    return shared


def queue_put(queue: Any, count: int, row: Row) -> Received:
    """Queue.put() once per message; the feeder thread joined before the side ends."""
    make, put = message_maker(row.size), queue.put
    for message in map(make, range(count)):
        put(message)
    queue.close()
    queue.join_thread()
    return Received(count)


def queue_get(queue: Any, count: int, row: Row) -> Received:
    """Queue.get() once per message."""
    get, size = queue.get, row.size
    total = 0
    for start in range(0, count, _GROUP):
        total += checksum_of([get() for _ in range(min(_GROUP, count - start))], size)
    return Received(count, total)


# ---- large messages and objects: one at a time, checked as they come ------------------

def pipe_recv_large(sock: socket.socket, count: int, row: Row) -> Received:
    """multiprocessing.Pipe's Connection.recv_bytes() once per message, each checked as it comes."""
    conn = Connection(os.dup(sock.fileno()))
    recv_bytes, unpack, size = conn.recv_bytes, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        data = recv_bytes()
        if len(data) != size:
            raise Mismatch("a message of %d bytes, %d expected" % (len(data), size))
        total += unpack(data)[0]
    conn.close()
    return Received(count, total)


def _pipe_object_sender(kind: str) -> Callable[[socket.socket, int, Row], Received]:
    def send(sock: socket.socket, count: int, row: Row) -> Received:
        conn = Connection(os.dup(sock.fileno()))
        make, send_object = numbered_objects(row, kind), conn.send
        for i in range(count):
            send_object(make(i))
        conn.close()
        return Received(count)

    send.__doc__ = "multiprocessing.Pipe's Connection.send(obj) per message (%s)." % kind
    return send


def pipe_recv_object(sock: socket.socket, count: int, row: Row) -> Received:
    """multiprocessing.Pipe's Connection.recv() once per message (unpickled), checked."""
    conn = Connection(os.dup(sock.fileno()))
    recv, check = conn.recv, ObjectChecker(row.size)
    total = 0
    for _ in range(count):
        total += check(recv())
    conn.close()
    return Received(count, total)


def _queue_object_sender(kind: str) -> Callable[[Any, int, Row], Received]:
    def put(queue: Any, count: int, row: Row) -> Received:
        make, put_object = numbered_objects(row, kind), queue.put
        for i in range(count):
            put_object(make(i))
        queue.close()
        queue.join_thread()
        return Received(count)

    put.__doc__ = "multiprocessing.Queue.put(obj) per message (%s)." % kind
    return put


def queue_get_object(queue: Any, count: int, row: Row) -> Received:
    """multiprocessing.Queue.get() once per message, checked."""
    get, check = queue.get, ObjectChecker(row.size)
    total = 0
    for _ in range(count):
        total += check(get())
    return Received(count, total)


pipe_send_bytes_object = _pipe_object_sender("bytes")
pipe_send_numpy_object = _pipe_object_sender("numpy")
queue_put_bytes_object = _queue_object_sender("bytes")
queue_put_numpy_object = _queue_object_sender("numpy")


# ---- pyzmq without copies: large messages ----------------------------------------------

#: Large messages warm a pyzmq connection up with at most this many bytes.
ZMQ_LARGE_WARMUP_BYTES = 64 << 20
#: Buffers the zero-copy sender cycles through: as many messages may be in
#: flight, each buffer reused only once pyzmq says it is done with it.
ZMQ_RING = 4


def zmq_large_warmup(row: Row) -> int:
    """Warm-up messages for a large-message pyzmq row: ZMQ_WARMUP, at most 64 MiB of them."""
    return max(ZMQ_RING, min(ZMQ_WARMUP, ZMQ_LARGE_WARMUP_BYTES // row.size))


def zmq_large_setup_recv(sock: socket.socket, row: Row, shared: Any) -> Endpoint:
    """PULL, as zmq_setup_recv, warmed up with zmq_large_warmup(row) messages."""
    return _zmq_pull(sock, row, zmq_large_warmup(row))


def zmq_large_setup_send(sock: socket.socket, row: Row, shared: Any) -> Endpoint:
    """PUSH, as zmq_setup_send, warmed up with zmq_large_warmup(row) messages."""
    return _zmq_push(sock, row, zmq_large_warmup(row))


def zmq_send_nocopy(end: Endpoint, count: int, row: Row) -> Received:
    """send(buffer, copy=False, track=True): pyzmq sends from the buffer itself, no copy.

    The sender renumbers ZMQ_RING buffers in turn; a buffer is written
    again only once its tracker says pyzmq has let go of it, so no message
    changes while it waits to go.
    """
    buffers = [bytearray(row.size) for _ in range(ZMQ_RING)]
    trackers: List[Optional[Any]] = [None] * ZMQ_RING
    send, pack_into = end.tool.send, _SEQ.pack_into
    for i in range(count):
        k = i % ZMQ_RING
        tracker = trackers[k]
        if tracker is not None:
            tracker.wait()
        pack_into(buffers[k], 0, i)
        trackers[k] = send(buffers[k], copy=False, track=True)
    for tracker in trackers:
        if tracker is not None:
            tracker.wait()
    return Received(count)


def zmq_recv_nocopy(end: Endpoint, count: int, row: Row) -> Received:
    """recv(copy=False): a zmq.Frame per message, read through its buffer, no copy to bytes."""
    recv, unpack, size = end.tool.recv, _SEQ.unpack_from, row.size
    total = 0
    for _ in range(count):
        frame = recv(copy=False)
        view = frame.buffer
        if view.nbytes != size:
            raise Mismatch("a message of %d bytes, %d expected" % (view.nbytes, size))
        total += unpack(view)[0]
    return Received(count, total)
