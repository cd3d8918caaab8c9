"""The benchmark's registry: every workload and what each of its columns runs, as one table.

Each `Entry` is a `Workload` (what it measures, in words) and its sides:
implementation -> (sender, receiver or None), plus the setups run before
the clock starts and what the runner makes before the fork.  The functions
are in the workload modules (workloads, aio_workloads, channel_workloads,
peers, single_call_workloads); the table that says which exist, and in
which order, is here and only here.  Adding a workload is writing its sides
in one of those modules and adding its entry to TABLE.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from . import aio_workloads as aio
from . import channel_workloads as chan
from . import peers
from . import single_call_workloads as single
from . import workloads as w
from .workloads import BENCH_EXTRA, Peer, Setup, Shared, Side, Workload

#: The two afunix columns: the same functions, run on each backend.
AFUNIX = ("afunix-stdlib", "afunix-c")

Sides = Mapping[str, Tuple[Side, Optional[Side]]]


@dataclass(frozen=True)
class Entry:
    """One workload and its columns: implementation -> (sender, receiver or None)."""

    workload: Workload
    sides: Sides
    #: implementation -> (sender's setup, receiver's setup): run in each child
    #: before it says it is ready, so a peer's handshake is never timed.  When
    #: what a setup returns has a finish() method, it runs after the clock stops.
    setups: Mapping[str, Tuple[Optional[Setup], Optional[Setup]]] = field(default_factory=dict)
    #: implementation -> what the runner makes before the fork.
    shared: Mapping[str, Shared] = field(default_factory=dict)


def _afunix_too(sides: Sides, afunix: Tuple[Side, Optional[Side]]) -> Dict[str, Tuple[Side, Optional[Side]]]:
    return {**sides, **{impl: afunix for impl in AFUNIX}}


_STREAM, _DGRAM, _SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET
_BATCH_IO = ("send_many", "RecvBatch")
_BATCH_TEXT = "send_many + RecvBatch.recv, a batch per call"
_MMSG_TEXT = "sendmmsg / recvmmsg(MSG_WAITFORONE), a batch per call"
_AIO_NEEDS = ("aio", "RecvBatch")
_AIO_TEXT = "afunix.aio.send_many + afunix.aio.recv_batch (a batch per wake-up)"
_FRAMED_TEXT = ("a careful stdlib framed stream: 4-byte length prefixes, a batch gathered in a"
                " bytearray and sent with sendall; recv_into + struct.unpack_from")
_CHAN_BATCHED_TEXT = "Channel.send_many / Channel.recv_many, a batch per call"
_CHAN_SINGLE_TEXT = "Channel.send / Channel.recv once per message (inline in the stream)"
_CHAN_BATCHED = _afunix_too({}, (chan.chan_send_batched, chan.chan_recv_many))
_CHAN_SINGLE = _afunix_too({}, (chan.chan_send_single, chan.chan_recv_single))
_ONE = ("send_many", "RecvBatch")


def _chan(name: str, title: str, sock_type: int, base: str, afunix_text: str,
          base_sides: Tuple[Side, Side], afunix_sides: Tuple[Side, Side],
          unit: str = "msgs/s", c: str = "", c_sides: Optional[Tuple[Side, Side]] = None) -> Entry:
    sides = _afunix_too({"base": base_sides}, afunix_sides)
    if c_sides is not None:
        sides["c"] = c_sides
    return Entry(Workload(name, title, "messages", sock_type, unit, ("Channel",),
                          base=base, afunix=afunix_text, c=c), sides)


_LARGE_LOOP_TEXT = ("a careful stdlib loop: sendall(length), sendall(message); recv_into a"
                    " preallocated buffer until whole")
_PIPE_LARGE_TEXT = ("multiprocessing.Pipe: Connection.send_bytes / recv_bytes per message, each"
                    " checked as it comes")
_LANE_RECV_TEXT = ("; the receiver: Channel.recv(), every byte copied out of the slot into new"
                   " bytes, the slot then returned")
_LANE_CHANNEL = ("Channel(sock, shm_size=%d x the message, shm_threshold=64 KiB, max_frame=64"
                 " KiB - 1: a message finding no slot free waits for one instead of going"
                 " inline)" % chan.LANE_SLOTS)
_LANE_TEXT = "%s.send() per message, copied into a slot%s" % (_LANE_CHANNEL, _LANE_RECV_TEXT)
_LANE = _afunix_too({}, (chan.lane_send, chan.lane_recv))
#: the region made, announced and mapped, and one message through it, before the clock starts
_LANE_SETUPS = {impl: (chan.lane_sender, chan.warm_receiver) for impl in AFUNIX}
_LOAN_NEEDS = ("Channel", "Channel.loan", "Channel.send_loan")
_LOAN_TEXT = ("ch.loan(size), the 8-byte number written into the slot in place, ch.send_loan():"
              " nothing copied on the sending side; ch = " + _LANE_CHANNEL)
_LOAN_SETUPS = {impl: (chan.loan_sender, chan.warm_receiver) for impl in AFUNIX}
_OBJECT_NEEDS = ("Channel", "Channel.send_object", "Channel.recv_object")
_OBJECT_KINDS = {"bytes": "a bytes object", "numpy": "a numpy uint8 array"}
_PIPE_OBJECT_TEXT = ("multiprocessing.Pipe: Connection.send(obj) / recv() per message (pickled"
                     " whole, through the socket)")
_QUEUE_OBJECT_TEXT = ("multiprocessing.Queue: put(obj) / get() per message (pickled by its"
                      " feeder thread, through a pipe)")


def _objects(name: str, title: str, kind: str, base: str, base_sides: Tuple[Side, Side],
             queue: bool = False) -> Entry:
    """A row of objects, each one large buffer: send_object / recv_object against `base`."""
    what = ("messages are %s of the row's size, one of %d made once, in turn (the receiver"
            " checks each one's size and number); " % (_OBJECT_KINDS[kind], chan.OBJECT_POOL))
    sender = chan.object_send_numpy if kind == "numpy" else chan.object_send_bytes
    setups: Dict[str, Tuple[Optional[Setup], Optional[Setup]]] = {
        impl: (chan.object_sender, chan.warm_object_receiver) for impl in AFUNIX}
    shared: Dict[str, Shared] = {}
    if queue:
        setups["base"] = (peers.the_queue, peers.the_queue)
        shared["base"] = peers.queue_shared
    return Entry(Workload(name, title, "messages", _STREAM, "MB/s", _OBJECT_NEEDS,
                          base=what + base,
                          afunix="ch.send_object(obj) / Channel.recv_object(): pickle"
                                 " protocol 5, the object out of band in a slot of the lane; ch"
                                 " = " + _LANE_CHANNEL,
                          peer=Peer("numpy", "numpy", BENCH_EXTRA) if kind == "numpy" else None),
                 {"base": base_sides, **_afunix_too({}, (sender, chan.object_recv))},
                 setups=setups, shared=shared)


TABLE: Tuple[Entry, ...] = (
    # ---- batched calls against the stdlib's one call per message (workloads.py)
    Entry(Workload("socketpairs", "socketpairs", "pairs", _STREAM, "pairs/s", ("socketpairs",),
                   base="a socket.socketpair() loop",
                   afunix="afunix.socketpairs(n)",
                   c="socketpair() in a C loop"),
          _afunix_too({"base": (w.pairs_stdlib, None), "c": (w.pairs_c, None)},
                      (w.pairs_afunix, None))),
    Entry(Workload("dgram", "DGRAM", "messages", _DGRAM, "msgs/s", _BATCH_IO,
                   base="sock.send / sock.recv once per message",
                   afunix=_BATCH_TEXT, c=_MMSG_TEXT),
          _afunix_too({"base": (w.send_stdlib, w.recv_stdlib), "c": (w.send_c, w.recv_c)},
                      (w.send_afunix, w.recv_afunix))),
    Entry(Workload("seqpacket", "SEQPACKET", "messages", _SEQPACKET, "msgs/s", _BATCH_IO,
                   base="sock.send / sock.recv once per message",
                   afunix=_BATCH_TEXT, c=_MMSG_TEXT),
          _afunix_too({"base": (w.send_stdlib, w.recv_stdlib), "c": (w.send_c, w.recv_c)},
                      (w.send_afunix, w.recv_afunix))),
    Entry(Workload("stream", "STREAM", "messages", _STREAM, "MB/s", _BATCH_IO,
                   base="sock.sendall per write / sock.recv_into a write-sized buffer",
                   afunix="send_many of a batch of writes + RecvBatch.recv",
                   c="sendmmsg of a batch of writes / recv() a write-sized buffer"),
          _afunix_too({"base": (w.stream_send_stdlib, w.stream_recv_stdlib),
                       "c": (w.stream_send_c, w.stream_recv_c)},
                      (w.stream_send_afunix, w.stream_recv_afunix))),
    Entry(Workload("fds", "fds", "messages", _SEQPACKET, "msgs/s",
                   _BATCH_IO + ("Message", "close_fds"),
                   base="socket.send_fds / socket.recv_fds once per message",
                   afunix="send_many of Message(data, fds) + RecvBatch.recv, all_fds, close_fds",
                   c="sendmmsg / recvmmsg with SCM_RIGHTS, descriptors closed in C"),
          _afunix_too({"base": (w.fds_send_stdlib, w.fds_recv_stdlib),
                       "c": (w.fds_send_c, w.fds_recv_c)},
                      (w.fds_send_afunix, w.fds_recv_afunix))),
    Entry(Workload("pingpong", "ping-pong", "pingpong", _SEQPACKET, "us", _BATCH_IO,
                   base="sock.send + sock.recv per round trip (the echo side likewise)",
                   afunix="send_many([m]) + RecvBatch(1, size).recv per round trip",
                   c="send() + recv() per round trip, timed in C"),
          _afunix_too({"base": (w.ping_stdlib, w.echo_stdlib), "c": (w.ping_c, w.echo_c)},
                      (w.ping_afunix, w.echo_afunix))),
    # ---- asyncio (aio_workloads.py)
    Entry(Workload("asyncio", "asyncio", "messages", _STREAM, "msgs/s", _AIO_NEEDS,
                   base="asyncio streams: writer.write per length-prefixed frame, drain per"
                        " batch; reader.readexactly",
                   afunix=_AIO_TEXT + ", SOCK_STREAM"),
          _afunix_too({"base": (aio.send_streams, aio.recv_streams)},
                      (aio.send_aio, aio.recv_aio_stream))),
    Entry(Workload("asyncio-sock", "asyncio sock", "messages", _SEQPACKET, "msgs/s", _AIO_NEEDS,
                   base="loop.sock_sendall / loop.sock_recv once per message",
                   afunix=_AIO_TEXT,
                   c="sendmmsg / recvmmsg on the same SEQPACKET pair, blocking, no event loop"),
          _afunix_too({"base": (aio.send_sock, aio.recv_sock), "c": (w.send_c, w.recv_c)},
                      (aio.send_aio, aio.recv_aio))),
    Entry(Workload("aio-single-send", "aio 1-send", "messages", _SEQPACKET, "msgs/s", ("aio",),
                   base="await loop.sock_sendall(sock, m) per message (receiver: plain C"
                        " recvmmsg in every column)",
                   afunix="await afunix.aio.send_many(sock, [m]) per message"),
          _afunix_too({"base": (aio.send_sock, single.recv_c_batched)},
                      (aio.send_one_aio, single.recv_c_batched))),
    Entry(Workload("aio-single-recv", "aio 1-recv", "messages", _SEQPACKET, "msgs/s", ("aio",),
                   base="await loop.sock_recv(sock, size) per message (sender: plain C"
                        " sendmmsg in every column)",
                   afunix="await afunix.aio.recv_many(sock, 1, size) per message"),
          _afunix_too({"base": (single.send_c_batched, aio.recv_sock)},
                      (single.send_c_batched, aio.recv_one_aio))),
    # ---- the message channel (channel_workloads.py)
    _chan("chan-batched", "CHAN/framed", _STREAM, _FRAMED_TEXT, _CHAN_BATCHED_TEXT,
          (chan.framed_send_stdlib, chan.framed_recv_stdlib),
          (chan.chan_send_batched, chan.chan_recv_many)),
    _chan("chan-zerocopy", "CHAN 0-copy", _STREAM, _FRAMED_TEXT,
          "Channel.send_fixed / Channel.recv_batch (no object per message)",
          (chan.framed_send_stdlib, chan.framed_recv_stdlib),
          (chan.chan_send_fixed, chan.chan_recv_batch)),
    _chan("chan-single", "CHAN/1-call", _SEQPACKET, "sock.send / sock.recv once per message",
          "Channel.send / Channel.recv once per message, on SOCK_SEQPACKET",
          (w.send_stdlib, w.recv_stdlib), (chan.chan_send_single, chan.chan_recv_single)),
    _chan("large-stream", "LARGE/stream", _STREAM, _LARGE_LOOP_TEXT,
          _CHAN_SINGLE_TEXT,
          (chan.large_send_stdlib, chan.large_recv_stdlib),
          (chan.chan_send_single, chan.chan_recv_single),
          unit="MB/s", c="sendmmsg of one message per call / recv() until whole",
          c_sides=(w.stream_send_c, w.stream_recv_c)),
    Entry(Workload("c-framing", "C framing", "messages", _STREAM, "msgs/s", (),
                   base="", afunix="",
                   c="the channel's framing in plain C (csrc/reference/channel_reference.c): 256"
                     " frames packed per write, parsed in C; the limit for any CHAN row"),
          {"c": (chan.ref_send, chan.ref_recv)}),
    # ---- the channel against other programs' messaging (peers.py)
    Entry(Workload("chan-vs-zmq", "CHAN/pyzmq", "messages", _STREAM, "msgs/s", ("Channel",),
                   base="pyzmq ipc PUSH/PULL, send/recv per message, copy=True (pyzmq: copying"
                        " is faster for small messages), SNDHWM=RCVHWM=%d, one I/O thread,"
                        " connected and warmed up (%d messages) before the clock starts"
                        % (peers.ZMQ_HWM, peers.ZMQ_WARMUP),
                   afunix=_CHAN_BATCHED_TEXT,
                   peer=Peer("zmq", "pyzmq", BENCH_EXTRA)),
          {"base": (peers.tool_send, peers.tool_recv), **_CHAN_BATCHED},
          setups={"base": (peers.zmq_setup_send, peers.zmq_setup_recv)}),
    Entry(Workload("chan-vs-nng", "CHAN/pynng", "messages", _STREAM, "msgs/s", ("Channel",),
                   base="pynng (nng) ipc Push0/Pull0, send/recv per message, send and receive"
                        " buffers %d messages (nng's most), connected and warmed up (%d"
                        " messages) before the clock starts"
                        % (peers.NNG_BUFFER, peers.NNG_WARMUP),
                   afunix=_CHAN_BATCHED_TEXT,
                   peer=Peer("pynng", "pynng", BENCH_EXTRA)),
          {"base": (peers.tool_send, peers.tool_recv), **_CHAN_BATCHED},
          setups={"base": (peers.nng_setup_send, peers.nng_setup_recv)}),
    Entry(Workload("chan-vs-pipe", "CHAN/Pipe", "messages", _STREAM, "msgs/s", ("Channel",),
                   base="multiprocessing.Pipe: Connection.send_bytes / recv_bytes per message",
                   afunix=_CHAN_BATCHED_TEXT),
          {"base": (peers.pipe_send, peers.pipe_recv), **_CHAN_BATCHED}),
    Entry(Workload("chan-vs-queue", "CHAN/Queue", "messages", _STREAM, "msgs/s", ("Channel",),
                   base="multiprocessing.Queue: put / get per message (pickled by its feeder"
                        " thread)",
                   afunix=_CHAN_BATCHED_TEXT),
          {"base": (peers.queue_put, peers.queue_get), **_CHAN_BATCHED},
          setups={"base": (peers.the_queue, peers.the_queue)},
          shared={"base": peers.queue_shared}),
    Entry(Workload("large-vs-pipe", "LARGE/Pipe", "messages", _STREAM, "MB/s", ("Channel",),
                   base=_PIPE_LARGE_TEXT, afunix=_CHAN_SINGLE_TEXT),
          {"base": (peers.pipe_send, peers.pipe_recv_large), **_CHAN_SINGLE}),
    # ---- large messages through the shared-memory lane (channel_workloads.py, peers.py)
    Entry(Workload("lane-stream", "LANE/stream", "messages", _STREAM, "MB/s", ("Channel",),
                   base=_LARGE_LOOP_TEXT, afunix=_LANE_TEXT),
          {"base": (chan.large_send_stdlib, chan.large_recv_stdlib), **_LANE},
          setups=_LANE_SETUPS),
    Entry(Workload("loan-stream", "LOAN/stream", "messages", _STREAM, "MB/s", _LOAN_NEEDS,
                   base=_LARGE_LOOP_TEXT, afunix=_LOAN_TEXT + _LANE_RECV_TEXT),
          {"base": (chan.large_send_stdlib, chan.large_recv_stdlib),
           **_afunix_too({}, (chan.loan_send, chan.lane_recv))},
          setups=_LOAN_SETUPS),
    Entry(Workload("loan-view", "LOAN 0-copy", "messages", _STREAM, "MB/s", _LOAN_NEEDS,
                   base=_LARGE_LOOP_TEXT,
                   afunix=_LOAN_TEXT + "; the receiver: Channel.recv_batch(), a read-only view"
                          " of each slot, of which it reads the 8-byte number only: no byte is"
                          " copied, so this measures handing a message over, not moving its"
                          " bytes"),
          {"base": (chan.large_send_stdlib, chan.large_recv_stdlib),
           **_afunix_too({}, (chan.loan_send, chan.lane_recv_view))},
          setups=_LOAN_SETUPS),
    Entry(Workload("lane-vs-pipe", "LANE/Pipe", "messages", _STREAM, "MB/s", ("Channel",),
                   base=_PIPE_LARGE_TEXT, afunix=_LANE_TEXT),
          {"base": (peers.pipe_send, peers.pipe_recv_large), **_LANE},
          setups=_LANE_SETUPS),
    Entry(Workload("lane-vs-zmq", "LANE/pyzmq", "messages", _STREAM, "MB/s", ("Channel",),
                   base="pyzmq ipc PUSH/PULL without copies: send(buffer, copy=False,"
                        " track=True) from %d buffers in turn, each reused once its tracker is"
                        " done; recv(copy=False), the number read from the Frame's buffer;"
                        " connected and warmed up before the clock starts" % peers.ZMQ_RING,
                   afunix=_LANE_TEXT, peer=Peer("zmq", "pyzmq", BENCH_EXTRA)),
          {"base": (peers.zmq_send_nocopy, peers.zmq_recv_nocopy), **_LANE},
          setups={"base": (peers.zmq_large_setup_send, peers.zmq_large_setup_recv),
                  **_LANE_SETUPS}),
    # ---- Python objects holding one large buffer (channel_workloads.py, peers.py)
    _objects("obj-vs-pipe", "OBJ/Pipe", "bytes", _PIPE_OBJECT_TEXT,
             (peers.pipe_send_bytes_object, peers.pipe_recv_object)),
    _objects("obj-vs-queue", "OBJ/Queue", "bytes", _QUEUE_OBJECT_TEXT,
             (peers.queue_put_bytes_object, peers.queue_get_object), queue=True),
    _objects("objnp-vs-pipe", "OBJ np/Pipe", "numpy", _PIPE_OBJECT_TEXT,
             (peers.pipe_send_numpy_object, peers.pipe_recv_object)),
    _objects("objnp-vs-queue", "OBJ np/Queue", "numpy", _QUEUE_OBJECT_TEXT,
             (peers.queue_put_numpy_object, peers.queue_get_object), queue=True),
    # ---- one call at a time, and the fixed cost of a call (single_call_workloads.py)
    Entry(Workload("single-send", "1-call send", "messages", _SEQPACKET, "msgs/s", _ONE,
                   base="sock.send(m) per message (receiver: plain C recvmmsg in every column)",
                   afunix="afunix.send_many(sock, [m]) per message",
                   c="one sendmmsg of one message per call", c_peer=True),
          _afunix_too({"base": (w.send_stdlib, single.recv_c_batched),
                       "c": (w.send_c, single.recv_c_batched)},
                      (single.send_one_afunix, single.recv_c_batched))),
    Entry(Workload("single-recv", "1-call recv", "messages", _SEQPACKET, "msgs/s", _ONE,
                   base="sock.recv_into(buf) per message (sender: plain C sendmmsg in every"
                        " column)",
                   afunix="RecvBatch(1, size).recv(sock) per message",
                   c="one recvmmsg of one message per call", c_peer=True),
          _afunix_too({"base": (single.send_c_batched, single.recv_into_stdlib),
                       "c": (single.send_c_batched, w.recv_c)},
                      (single.send_c_batched, single.recv_one_batch))),
    Entry(Workload("single-recv-many", "1-call recv_m", "messages", _SEQPACKET, "msgs/s",
                   ("recv_many",),
                   base="sock.recv(size) per message (sender: plain C sendmmsg in every column)",
                   afunix="afunix.recv_many(sock, 1, size) per message",
                   c="one recvmmsg of one message per call", c_peer=True),
          _afunix_too({"base": (single.send_c_batched, w.recv_stdlib),
                       "c": (single.send_c_batched, w.recv_c)},
                      (single.send_c_batched, single.recv_one_many))),
    Entry(Workload("single-fds", "1-call fds", "messages", _SEQPACKET, "msgs/s",
                   ("send_fds", "recv_fds"),
                   base="socket.send_fds / socket.recv_fds per message, descriptors closed",
                   afunix="afunix.send_fds / afunix.recv_fds per message, descriptors closed",
                   c="one sendmmsg / recvmmsg with SCM_RIGHTS per message"),
          _afunix_too({"base": (single.fds_send_socket, single.fds_recv_socket),
                       "c": (w.fds_send_c, w.fds_recv_c)},
                      (single.fds_send_afunix, single.fds_recv_afunix))),
    Entry(Workload("call-overhead", "overhead send", "overhead", _SEQPACKET, "ns", _ONE,
                   base="", afunix="ns per call: send_many(sock, [m]) minus the bare call its"
                                   " fast path makes (sock.send, on both backends)"),
          _afunix_too({}, (single.overhead_send, None))),
    Entry(Workload("call-overhead-recv", "overhead recv", "overhead", _SEQPACKET, "ns", _ONE,
                   base="", afunix="ns per call: RecvBatch(1, size).recv minus the backend's bare"
                                   " core call (C: lib.afunix_recv_many; stdlib: recvmsg_into)"),
          _afunix_too({}, (single.overhead_recv, None))),
)

# The lookups the runner makes, read off TABLE (nothing is added to them later).
#: name -> workload, in table order.
WORKLOADS: Dict[str, Workload] = {e.workload.name: e.workload for e in TABLE}
#: (workload, implementation) -> the sending side (the only side, for one process).
SENDERS: Dict[Tuple[str, str], Side] = {
    (e.workload.name, impl): send for e in TABLE for impl, (send, _) in e.sides.items()}
#: (workload, implementation) -> the receiving side (the echo side, for "pingpong").
RECEIVERS: Dict[Tuple[str, str], Side] = {
    (e.workload.name, impl): recv for e in TABLE for impl, (_, recv) in e.sides.items()
    if recv is not None}
#: (workload, implementation) -> (sender's setup, receiver's setup).
SETUPS: Dict[Tuple[str, str], Tuple[Optional[Setup], Optional[Setup]]] = {
    (e.workload.name, impl): pair for e in TABLE for impl, pair in e.setups.items()}
#: (workload, implementation) -> what the runner makes before the fork.
SHARED: Dict[Tuple[str, str], Shared] = {
    (e.workload.name, impl): make for e in TABLE for impl, make in e.shared.items()}
