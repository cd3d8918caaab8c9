"""The shared-memory lane through afunix.Channel: real sockets, real peer processes.

Messages at or above the threshold travel in slots of a sealed memfd region
(docs/PROTOCOL.md, version 2), the rest inline; order, descriptors and every
receive call keep their meaning, slots are returned and reused, a sender
out of room waits as its socket's timeout says, and closing or the end of
stream leaves no descriptor and no mapping behind.  Both backends.
"""
from __future__ import annotations

import errno
import gc
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from typing import List, Tuple

import pytest

import afunix
from afunix import Channel, Message, channel_pair, shm
from afunix.channel import lane_of
from afunix.codec import FrameReader
from conftest import open_fds, region_mappings

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

KiB = 1 << 10
MiB = 1 << 20
TYPES = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET]



def sizes(seed: int, n: int, threshold: int) -> List[int]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        pick = rnd.random()
        if pick < 0.4:
            out.append(rnd.randrange(0, threshold))
        elif pick < 0.5:
            out.append(threshold + rnd.randrange(-1, 2))  # at the edge
        else:
            out.append(rnd.randrange(threshold, 300 * KiB))
    return out


def payload(i: int, n: int) -> bytes:
    return (struct.pack("<I", i) * (n // 4 + 1))[:n]


@pytest.mark.parametrize("kind", TYPES, ids=["stream", "seqpacket"])
def test_round_trip_across_the_threshold_in_order_with_descriptors(kind: int, clean: None) -> None:
    threshold = 16 * KiB
    a, b = channel_pair(kind, shm_size=MiB, shm_threshold=threshold)
    with a, b:
        lengths = sizes(1, 120, threshold)
        expected = []
        for i, n in enumerate(lengths):
            expected.append((payload(i, n), 1 if i % 7 == 3 else 0))
            if i % 5 == 0 and i % 7 != 3:
                expected.append((b"small", 1))
        fd = os.open(os.devnull, os.O_RDONLY)
        received: List[Message] = []

        def read() -> None:
            while len(received) < len(expected):
                received.append(b.recv_message())

        t = threading.Thread(target=read)
        t.start()
        try:
            for i, n in enumerate(lengths):
                data = payload(i, n)
                if i % 7 == 3:
                    a.send(data, [fd])
                elif i % 5 == 0:
                    assert a.send_many([data, Message(b"small", [fd])]) == 2
                else:
                    a.send(data)
        finally:
            t.join(60)
            os.close(fd)
        assert [(m.data, len(m.fds)) for m in received] == expected
        for m in received:
            for f in m.fds:
                os.close(f)


def test_every_receive_call_hands_out_lane_messages(clean: None) -> None:
    a, b = channel_pair(shm_size=MiB, shm_threshold=4 * KiB)
    with a, b:
        big = [os.urandom(5000 + i) for i in range(4)]
        a.send_many([b"x", big[0], b"y", big[1], big[2], big[3]])
        assert a._lane is not None and a._lane.in_flight == 4  # all four in slots
        assert b.recv() == b"x"
        assert b.recv() == big[0]
        assert b.recv_many() == [b"y"]
        assert b.recv_message() == Message(big[1], ())
        batch = b.recv_batch()
        assert len(batch) == 1 and bytes(batch[0]) == big[2] and batch[0].readonly
        assert next(iter(b)) == big[3]  # the next receive: the batch's slot went back
        with pytest.raises(ValueError):
            bytes(batch[0])  # the view of a slot is released with the batch ...
        del batch


def test_a_sender_reuses_slots_the_receiver_returned(clean: None) -> None:
    # 200 messages of 200 KiB through a 1 MiB region: only possible when
    # slots come back and are written again
    a, b = channel_pair(shm_size=MiB, shm_threshold=64 * KiB, max_frame=100 * KiB)
    with a, b:
        got: List[bytes] = []
        t = threading.Thread(target=lambda: got.extend(b.recv() for _ in range(200)))
        t.start()
        for i in range(200):
            a.send(payload(i, 200 * KiB))
        t.join(60)
        assert got == [payload(i, 200 * KiB) for i in range(200)]


def test_a_sender_out_of_room_sends_inline_what_fits_max_frame(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=64 * KiB)
    with a, b:
        a.send(payload(0, 200 * KiB))  # the region has room for one of these
        a.send(payload(1, 100 * KiB))  # no room: inline, after it
        assert a._lane is not None and a._lane.in_flight == 1
        assert b.recv() == payload(0, 200 * KiB)  # its slot is returned
        assert b.recv() == payload(1, 100 * KiB)
        a.send(payload(2, 200 * KiB))  # the RETURN is read: the lane again
        assert a._lane.in_flight == 1 and b.recv() == payload(2, 200 * KiB)


def test_a_sender_out_of_room_times_out_and_a_non_blocking_one_is_refused(clean: None) -> None:
    # messages over max_frame can only go through the lane: they wait for room
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=64 * KiB, max_frame=100 * KiB)
    with a, b:
        a.send(b"\1" * 200 * KiB)  # the region is full until b takes it
        a.socket.settimeout(0.3)
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            a.send(b"\2" * 200 * KiB)
        assert 0.25 <= time.monotonic() - start < 5
        a.socket.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            a.send(b"\3" * 200 * KiB)
        assert b.recv() == b"\1" * 200 * KiB  # returns the slot
        a.socket.settimeout(5.0)
        a.send(b"\4" * 200 * KiB)  # the sender reads the RETURN while it waits
        assert b.recv() == b"\4" * 200 * KiB


def test_a_sender_waiting_for_room_keeps_the_messages_ahead_of_the_returns(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=64 * KiB, max_frame=100 * KiB)
    with a, b:
        a.send(b"\1" * 200 * KiB)
        b.send_many([b"m%d" % i for i in range(50)])  # messages for a, not taken yet
        assert b.recv() == b"\1" * 200 * KiB  # its RETURN travels behind them
        a.socket.settimeout(5.0)
        a.send(b"\2" * 200 * KiB)  # a reads past its own messages to find the RETURN
        assert a.recv_many() == [b"m%d" % i for i in range(50)]
        assert b.recv() == b"\2" * 200 * KiB


def test_a_channel_without_a_lane_reads_the_peers_and_returns_its_slots(clean: None) -> None:
    x, y = afunix.socketpair()
    a = Channel(x, shm_size=512 * KiB, shm_threshold=32 * KiB)
    b = Channel(y)
    with a, b:
        got: List[bytes] = []
        t = threading.Thread(target=lambda: got.extend(b.recv() for _ in range(40)))
        t.start()
        for i in range(40):
            a.send(payload(i, 100 * KiB))
        t.join(60)
        assert got == [payload(i, 100 * KiB) for i in range(40)]
        b.send(b"inline only")  # b writes version 1, as ever
        assert a.recv() == b"inline only"


def test_a_version_1_peer_refuses_a_lane_channel_at_its_first_frame(clean: None) -> None:
    # The peer of docs/PROTOCOL.md checks (flags, version, magic) == (0, 1, 0xAF)
    # on every header: the very first frame a lane channel writes fails it.
    x, y = afunix.socketpair()
    a = Channel(x, shm_size=64 * KiB)
    with a, y:
        a.send(b"a small message")
        head = y.recv(8)
        length, nfds, flags, version, magic = struct.unpack("<IBBBB", head)
        assert (flags, version, magic) != (0, 1, 0xAF)
        assert (length, nfds, flags, version, magic) == (8, 1, 1, 2, 0xAF)


def test_closing_and_the_end_of_stream_unmap_both_regions(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1 * KiB)
    maps = region_mappings()
    a.send(b"q" * 10 * KiB)
    assert b.recv() == b"q" * 10 * KiB
    assert region_mappings() == maps + 1  # b maps a's region
    a.close()
    with pytest.raises(EOFError):
        b.recv()
    assert region_mappings() == maps - 1  # a's own, and b's view of it, gone
    b.close()
    assert region_mappings() == maps - 2


PEER = """
import afunix, os, socket, sys
from afunix import Channel, Message
ch = Channel(SOCK, shm_size=1 << 20, shm_threshold=16 << 10)
with ch:
    for m in iter(ch.recv_message, None):
        if m.data == b"stop":
            break
        ch.send(m.data[::-1], m.fds)
        for fd in m.fds:
            os.close(fd)
"""


def _spawn(code: str, backend: str, sock: socket.socket) -> "subprocess.Popen[bytes]":
    prelude = "import socket\nSOCK = socket.socket(fileno=%d)\n" % sock.fileno()
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)],
                            pass_fds=(sock.fileno(),), stderr=subprocess.PIPE,
                            env=dict(os.environ, AFUNIX_BACKEND=backend))


@pytest.mark.parametrize("kind", TYPES, ids=["stream", "seqpacket"])
def test_a_peer_process_echoes_through_both_lanes(kind: int, backend: str, clean: None) -> None:
    x, y = afunix.socketpair(kind)
    child = _spawn(PEER, backend, y)
    y.close()
    a = Channel(x, shm_size=1 << 20, shm_threshold=16 << 10)
    x.settimeout(20)
    r, w = os.pipe()
    try:
        with a:
            lengths = sizes(7, 150, 16 << 10)
            results: List[Tuple[bytes, int]] = []

            def read() -> None:
                for _ in lengths:
                    m = a.recv_message()
                    results.append((m.data, len(m.fds)))
                    for fd in m.fds:
                        assert os.read(fd, 0) == b""  # the pipe's read end, passed there and back
                        os.close(fd)

            t = threading.Thread(target=read)
            t.start()
            for i, n in enumerate(lengths):
                a.send(payload(i, n), [r] if i % 9 == 0 else [])
            t.join(30)
            assert not t.is_alive()
            a.send(b"stop")
            assert results == [(payload(i, n)[::-1], 1 if i % 9 == 0 else 0)
                               for i, n in enumerate(lengths)]
    finally:
        os.close(r)
        os.close(w)
        try:
            _, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        assert child.returncode == 0, err.decode()


def test_an_aio_channel_reads_a_peers_lane_and_returns_its_slots(clean: None) -> None:
    import asyncio

    from afunix import aio

    x, y = afunix.socketpair()
    # over max_frame: only the lane can carry them, so each needs a returned slot
    a = Channel(x, shm_size=256 * KiB, shm_threshold=16 * KiB, max_frame=100 * KiB)
    x.settimeout(10)
    y.setblocking(False)
    sender = threading.Thread(target=lambda: [a.send(payload(i, 200 * KiB)) for i in range(30)])

    async def main() -> List[bytes]:
        got: List[bytes] = []
        async with aio.Channel(y) as b:
            sender.start()
            async for message in b:
                got.append(message)
                if len(got) == 30:
                    break
        return got

    with a:
        got = asyncio.run(main())
        sender.join(10)
    assert got == [payload(i, 200 * KiB) for i in range(30)]


# ---- a peer written from docs/PROTOCOL.md alone, and a hostile one ----------------


class DocumentPeer:
    """The sending end of a lane from the protocol document: struct, socket, os, fcntl, mmap."""

    HEADER = struct.Struct("<IBBBB")

    def __init__(self, sock: socket.socket, size: int, seals: int = 0x17, announced: int = 0) -> None:
        import fcntl
        import mmap
        self.sock = sock
        self.fd = os.memfd_create("peer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        os.posix_fallocate(self.fd, 0, size)
        self.map = mmap.mmap(self.fd, size)  # before the seals (FUTURE_WRITE)
        if seals:
            # F_ADD_SEALS: SEAL | SHRINK | GROW | FUTURE_WRITE = 1 | 2 | 4 | 16
            fcntl.fcntl(self.fd, 1033, seals)
        self.frame(1, struct.pack("<Q", announced or size), [self.fd])

    def frame(self, kind: int, payload: bytes, fds: List[int] = [], version: int = 2) -> None:
        import array
        data = self.HEADER.pack(len(payload), len(fds), kind, version, 0xAF) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = self.sock.sendmsg([data], anc)
        self.sock.sendall(data[sent:])

    def slot(self, offset: int, message: bytes) -> None:
        self.map[offset:offset + len(message)] = message
        self.frame(2, struct.pack("<QQ", offset, len(message)))

    def returned(self) -> List[Tuple[int, int]]:
        head = self.sock.recv(8, socket.MSG_WAITALL)
        length, nfds, kind, version, magic = self.HEADER.unpack(head)
        assert (nfds, kind, version, magic) == (0, 3, 2, 0xAF) and length % 16 == 0
        body = self.sock.recv(length, socket.MSG_WAITALL)
        return list(struct.iter_unpack("<QQ", body))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def test_a_peer_written_from_the_document_sends_through_its_lane(clean: None) -> None:
    x, y = afunix.socketpair()
    b = Channel(x)
    with b, y:
        peer = DocumentPeer(y, 1 << 20)
        try:
            peer.slot(4096, b"from the document" * 1000)
            peer.frame(0, b"inline", version=1)
            assert b.recv() == b"from the document" * 1000
            # the next message is here already: its receive comes without a
            # read, and the slot goes back with that one's returns
            assert b.recv() == b"inline"
            assert peer.returned() == [(4096, 17000)]
            peer.slot(4096, b"again")  # the returned slot, reused
            batch = b.recv_batch()
            assert bytes(batch[0]) == b"again"
            y.sendall(struct.pack("<IBBBB", 1, 0, 0, 1, 0xAF) + b"!")
            assert b.recv() == b"!"  # the batch's slot goes back at this receive
            assert peer.returned() == [(4096, 5)]
        finally:
            peer.close()


def test_returns_for_messages_received_back_to_back_go_in_one_frame(clean: None) -> None:
    x, y = afunix.socketpair()
    y.settimeout(10)  # a RETURN frame that never comes fails the test, never hangs it
    b = Channel(x)
    with b, y:
        peer = DocumentPeer(y, 1 << 20)
        try:
            for i in range(3):
                peer.slot(i * 4096, bytes([i]) * 1000)
            got = [b.recv(), b.recv(), b.recv()]
            assert got == [bytes([i]) * 1000 for i in range(3)]
            # no complete message was left after the third: its receive wrote
            # all three slots, in one frame, without waiting for a fourth
            assert peer.returned() == [(i * 4096, 1000) for i in range(3)]
            peer.slot(0, b"x" * 100)
            assert b.recv() == b"x" * 100
            assert peer.returned() == [(0, 100)]
        finally:
            peer.close()


def test_returns_go_back_every_quarter_of_the_region_while_messages_wait(clean: None) -> None:
    x, y = afunix.socketpair()
    y.settimeout(10)
    b = Channel(x)
    with b, y:
        peer = DocumentPeer(y, 64 * KiB)
        try:
            for i in range(8):
                peer.slot(i * 8 * KiB, bytes([i]) * (4 * KiB))
            for i in range(5):
                assert b.recv() == bytes([i]) * (4 * KiB)
            # 4 slots of 4 KiB are a quarter of the region: written at the
            # fourth receive, while four more messages still waited
            assert peer.returned() == [(i * 8 * KiB, 4 * KiB) for i in range(4)]
            for i in range(5, 8):
                assert b.recv() == bytes([i]) * (4 * KiB)
            assert peer.returned() == [(i * 8 * KiB, 4 * KiB) for i in range(4, 8)]
        finally:
            peer.close()


def test_a_receive_about_to_wait_writes_the_returns_of_the_batch_before(clean: None) -> None:
    x, y = afunix.socketpair()
    y.settimeout(10)
    b = Channel(x)
    b.socket.settimeout(0.2)
    with b, y:
        peer = DocumentPeer(y, 1 << 20)
        try:
            peer.slot(0, b"held" * 100)
            batch = b.recv_batch()
            assert bytes(batch[0]) == b"held" * 100  # in place: the slot stays held
            with pytest.raises(socket.timeout):
                b.recv()  # nothing comes; the batch's slot went back before the wait
            assert peer.returned() == [(0, 400)]
        finally:
            peer.close()


@pytest.mark.parametrize("how, match", [
    ("unsealed", "not sealed"),
    ("size", "announced"),
    ("second", "second REGION"),
    ("overlap", "overlaps"),
    ("range", "out of range"),
])
def test_a_hostile_peer_gets_a_protocol_error_and_nothing_leaks(how: str, match: str,
                                                                 clean: None) -> None:
    if how == "overlap" and sys.implementation.name == "pypy":
        pytest.skip("PyPy does not count a view's exports: a slot whose batch view is kept "
                    "goes back at the next receive (docs/channel.md)")
    x, y = afunix.socketpair()
    x.settimeout(10)  # a frame taken as good would otherwise leave the loop below waiting
    b = Channel(x)
    maps = region_mappings()
    with b, y:
        peer = DocumentPeer(y, 1 << 16, seals=0 if how == "unsealed" else 0x17,
                            announced=(1 << 17) if how == "size" else 0)
        others: List[DocumentPeer] = []
        try:
            if how == "second":
                others.append(DocumentPeer(y, 1 << 16))
            elif how == "overlap":
                peer.slot(0, b"a" * 5000)
                batch = b.recv_batch()
                export = pickle.PickleBuffer(batch.buffer)  # the slot stays held
                y.sendall(struct.pack("<IBBBB", 1, 0, 0, 1, 0xAF) + b"!")
                assert b.recv() == b"!"
                peer.slot(4096, b"b" * 10)
            elif how == "range":
                peer.frame(2, struct.pack("<QQ", (1 << 16) - 5, 10))
            with pytest.raises(afunix.ProtocolError, match=match):
                while True:
                    b.recv()
            assert b.closed
            if how == "overlap":
                export.release()
                del batch, export
        finally:
            peer.close()
            for other in others:
                other.close()
    gc.collect()
    assert region_mappings() == maps


def test_many_messages_through_the_lane_keep_descriptors_and_mappings_flat(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=1 * KiB, max_frame=64 * KiB)
    with a, b:
        message = b"s" * 70 * KiB  # over max_frame: every one through a slot
        # both regions announced and adopted (b announces its own before its
        # first frame, the RETURN): the count to keep
        a.send(message)
        assert b.recv() == message
        b.send(b"hi")
        assert a.recv() == b"hi"
        # and each REGION frame's descriptor closed (the mapping does not
        # need it), at the receive after the one that read it
        a.send(b"hi")
        assert b.recv() == b"hi"
        b.send(b"hi")
        assert a.recv() == b"hi"
        fds_before, maps_before = len(open_fds()), region_mappings()
        t = threading.Thread(target=lambda: [b.recv_batch() for _ in range(5000)])
        t.start()
        for _ in range(5000):
            a.send(message)
        t.join(60)
        assert len(open_fds()) == fds_before and region_mappings() == maps_before
        assert a._lane is not None and a._lane.in_flight <= 3


# ---- closing while slots are on their way -------------------------------------------


def test_a_return_read_after_the_lane_closed_is_dropped_not_refused(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=16 * KiB)
    with a, b:
        a.send(b"r" * 100 * KiB)
        assert b.recv() == b"r" * 100 * KiB  # its RETURN frame is now on a's socket
        # the lane closes while a receive (another thread's, as a close()
        # runs) has yet to read that frame: the frame finds no slot in use
        assert a._lane is not None
        a._lane.close()
        a.socket.settimeout(0.2)
        with pytest.raises(socket.timeout):
            a.recv()  # the return is read and dropped; no ProtocolError
        assert not a.closed


def test_a_late_return_to_a_closed_peer_is_dropped_and_the_message_kept(clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=16 * KiB)
    with b:
        a.send(b"late" * 25 * KiB)
        a.close()  # gone before b takes the message (its region stays mapped in b)
        assert b.recv() == b"late" * 25 * KiB  # the RETURN frame meets EPIPE: dropped
        with pytest.raises(EOFError):
            b.recv()


@pytest.mark.parametrize("call", ["send", "loan"])
def test_a_peer_closing_while_a_sender_waits_for_room_ends_the_wait(call: str,
                                                                    clean: None) -> None:
    a, b = channel_pair(shm_size=256 * KiB, shm_threshold=16 * KiB, max_frame=100 * KiB)
    with a:
        a.socket.settimeout(10)
        a.send(b"1" * 200 * KiB)  # holds the region: b never takes it
        closer = threading.Timer(0.1, b.close)
        closer.start()
        try:
            start = time.monotonic()
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                if call == "send":
                    a.send(b"2" * 200 * KiB)  # over max_frame: only a slot can carry it
                else:
                    a.loan(200 * KiB)
            assert time.monotonic() - start < 5  # ended by the close, not the timeout
        finally:
            closer.join()
        assert a._lane is not None and a._lane.in_flight == 1  # no slot taken by the wait


def test_a_lane_send_that_wrote_nothing_gives_its_slot_back(clean: None) -> None:
    # Whatever stopped it -- EBADF for a closed descriptor in fds, a full
    # socket -- a message none of whose frame was written never reaches the
    # peer, who will never return its slot: it is free again at once.
    # (Such slots leaked: four of these sends filled the region for good.)
    a, b = channel_pair(shm_size=1 * MiB, max_frame=64 * KiB)
    with a, b:
        lane = lane_of(a)
        assert lane is not None
        a.socket.settimeout(5)  # (slots leaked: the fourth waited for room for ever)
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)  # a descriptor number nothing has open
        for _ in range(4):
            with pytest.raises(OSError) as info:
                a.send(payload(0, 300 * KiB), fds=[fd])
            assert info.value.errno == errno.EBADF
        assert lane.in_flight == 0
        a.socket.setblocking(False)
        small = 0
        with pytest.raises(BlockingIOError):
            while True:
                a.send(b"s" * 1000)
                small += 1
        with pytest.raises(BlockingIOError):
            a.send(payload(1, 300 * KiB))  # over max_frame: a slot, then the full socket
        assert lane.in_flight == 0 and a.pending == 0
        a.socket.settimeout(10)
        b.socket.settimeout(10)
        for _ in range(small):
            assert b.recv() == b"s" * 1000
        a.send(payload(2, 300 * KiB))
        assert b.recv() == payload(2, 300 * KiB)  # nothing of the others went


def test_an_object_whose_frame_wrote_nothing_gives_its_slots_back(clean: None) -> None:
    a, b = channel_pair(shm_size=1 * MiB)
    with a:
        a.send(b"x")  # the REGION frame goes first
        b.close()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            a.send_object([pickle.PickleBuffer(bytearray(300 * KiB)),
                           pickle.PickleBuffer(bytearray(300 * KiB))])
        lane = lane_of(a)
        assert lane is not None and lane.in_flight == 0


# recvmsg and recvmmsg, by machine: a test waits until a thread sleeps in one
_RECV_SYSCALLS = {"x86_64": ("47", "299"), "aarch64": ("212", "243")}


def wait_in_recv(thread: threading.Thread) -> None:
    """Wait until `thread` sleeps in a read of a socket (its current system call, /proc)."""
    calls = _RECV_SYSCALLS.get(os.uname().machine)
    if calls is None:
        pytest.skip("recvmsg's system call number is not known for %s" % os.uname().machine)
    path = "/proc/self/task/%d/syscall" % thread.native_id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(path) as f:
            if f.read().split(" ", 1)[0] in calls:
                return
        time.sleep(0.005)
    pytest.fail("the receive never waited in recvmsg")


@pytest.mark.parametrize("lane", [False, True], ids=["inline", "lane"])
def test_a_receive_the_channel_closed_under_raises_ebadf_and_closes_what_it_read(
        lane: bool, clean: None) -> None:
    # close() in another thread wakes a recvmsg already waiting (it shuts
    # the socket down) and waits for it to leave before it closes the
    # reader: the receive raises what a receive on a closed channel raises
    # and hands nothing out; a frame the peer sends then (through the lane:
    # a SLOT frame) meets a closed socket, and its descriptor stays the
    # peer's.
    x, y = afunix.socketpair()
    a = Channel(x)
    b = Channel(y, shm_size=MiB, shm_threshold=16 * KiB)
    with b:
        b.send(b"first")
        assert a.recv() == b"first"  # (b's region adopted)
        got: List[BaseException] = []

        def receive() -> None:
            try:
                got.append(a.recv_message())  # type: ignore[arg-type]
            except BaseException as exc:
                got.append(exc)

        t = threading.Thread(target=receive)
        t.start()
        try:
            wait_in_recv(t)
            a.close()
            assert not t.is_alive()  # (close() returned after the receive left)
            r, w = os.pipe()
            try:
                with pytest.raises(BrokenPipeError):
                    b.send(b"m" * (64 * KiB if lane else 100), fds=[r])
            finally:
                os.close(r)
                os.close(w)
        finally:
            t.join(10)
        assert not t.is_alive()
        assert len(got) == 1 and type(got[0]) is OSError and got[0].errno == errno.EBADF, got


@pytest.mark.parametrize("lane", [False, True], ids=["inline", "lane"])
def test_a_close_that_lands_while_a_read_is_parsed_is_ebadf_too(
        lane: bool, monkeypatch: pytest.MonkeyPatch, clean: None) -> None:
    # the other thread's close() comes after the read returned, before its
    # frames are parsed (made so here: the parse closes the channel first)
    x, y = afunix.socketpair()
    a = Channel(x)
    b = Channel(y, shm_size=MiB, shm_threshold=16 * KiB)
    with b:
        b.send(b"first")
        assert a.recv() == b"first"
        r, w = os.pipe()
        try:
            b.send(b"m" * (64 * KiB if lane else 100), fds=[r])
        finally:
            os.close(r)
        parse = FrameReader.received

        def closed_first(reader: FrameReader, n: int) -> bool:
            a.close()
            return parse(reader, n)

        monkeypatch.setattr(FrameReader, "received", closed_first)
        with pytest.raises(OSError) as info:
            a.recv_message()
        monkeypatch.undo()
        assert info.value.errno == errno.EBADF and type(info.value) is OSError
        with pytest.raises(BrokenPipeError):  # the descriptor that came was closed
            os.write(w, b"x")
        os.close(w)
