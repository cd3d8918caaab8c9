"""The channel at its edges: a peer's empty records, concurrent callers, fork()."""
from __future__ import annotations

import socket
import struct
from typing import Callable, Iterator, List, Tuple

import pytest

import afunix
from afunix import Channel, ProtocolError

HEADER = struct.Struct("<IBBBB")


def frame(payload: bytes, nfds: int = 0) -> bytes:
    """A frame as docs/PROTOCOL.md lays it out."""
    return HEADER.pack(len(payload), nfds, 0, 1, 0xAF) + payload


@pytest.fixture
def seqpacket_peer() -> Iterator[Tuple[socket.socket, Channel]]:
    """A raw SOCK_SEQPACKET socket that writes records by hand, and a Channel on its peer."""
    raw, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = Channel(sock)
    yield raw, ch
    raw.close()
    ch.close()


# ---- empty SOCK_SEQPACKET records (docs/PROTOCOL.md forbids them) -------------

# Every receive call, as "receive one message or raise" (iteration included:
# it used to stop at an empty record as at the end, and lose what followed).
RECEIVERS: List[Tuple[str, Callable[[Channel], object]]] = [
    ("recv", lambda ch: ch.recv()),
    ("recv_message", lambda ch: ch.recv_message()),
    ("recv_many", lambda ch: ch.recv_many() or EOFError()),
    ("recv_batch", lambda ch: len(ch.recv_batch()) or EOFError()),
    ("iteration", lambda ch: next(iter(ch), EOFError())),
]


def receive(ch: Channel, how: Callable[[Channel], object]) -> object:
    result = how(ch)
    if isinstance(result, EOFError):
        raise result
    return result


@pytest.mark.parametrize("how", [r[1] for r in RECEIVERS], ids=[r[0] for r in RECEIVERS])
def test_empty_record_from_a_live_peer_between_frames_is_a_protocol_error(
        seqpacket_peer: Tuple[socket.socket, Channel], how: Callable[[Channel], object],
        fd_baseline: set[int]) -> None:
    raw, ch = seqpacket_peer
    raw.send(frame(b"one"))
    raw.send(b"")
    raw.send(frame(b"two"))
    assert receive(ch, how)
    with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
        receive(ch, how)
    assert ch.closed  # nothing after the empty record is delivered as if it were fine


def test_empty_record_inside_a_frame_is_not_reported_as_a_close(
        seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    raw, ch = seqpacket_peer
    whole = frame(b"payload")
    raw.send(whole[:5])
    raw.send(b"")
    raw.send(whole[5:])
    with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
        ch.recv()


def test_empty_record_then_more_records_then_hang_up_is_a_protocol_error(
        seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    # The peer has hung up by the time the channel reads the empty record,
    # but records it sent after it are still queued: not an end.
    raw, ch = seqpacket_peer
    raw.send(frame(b"one"))
    raw.send(b"")
    raw.send(b"")
    raw.send(frame(b"two"))
    raw.close()
    assert ch.recv() == b"one"
    with pytest.raises(ProtocolError, match="empty SOCK_SEQPACKET record"):
        ch.recv()


def test_empty_record_as_the_last_thing_before_hang_up_reads_as_the_end(
        seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    # What the kernel cannot tell apart: an empty record followed by nothing
    # but the peer's close.  Nothing was sent after it, so nothing is lost.
    raw, ch = seqpacket_peer
    raw.send(frame(b"one"))
    raw.send(b"")
    raw.close()
    assert list(ch) == [b"one"]


def test_true_end_of_stream_stays_a_clean_end(seqpacket_peer: Tuple[socket.socket, Channel]) -> None:
    raw, ch = seqpacket_peer
    raw.send(frame(b"one") + frame(b""))
    raw.shutdown(socket.SHUT_WR)  # half-closed: the peer lives on, but sends nothing more
    assert ch.recv() == b"one"
    assert ch.recv() == b""
    with pytest.raises(EOFError):
        ch.recv()
    assert not ch.closed
    ch.send(b"still writable")
    assert raw.recv(100) == frame(b"still writable")


def test_empty_record_from_a_channel_peer_cannot_happen() -> None:
    # The channel itself never writes an empty record: an empty message is a
    # header-only frame.
    a, b = afunix.channel_pair(socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b"")
        a.send_many([b"", b""])
        assert [b.recv() for _ in range(3)] == [b"", b"", b""]
