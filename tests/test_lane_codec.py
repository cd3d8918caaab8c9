"""The shared-memory lane's frames on the codec alone: bytes and descriptors fed by hand.

docs/PROTOCOL.md ("Shared-memory lane", version 2) checked on FrameReader
and the lane's sending half (afunix.lane) with no socket: the frames are
spelled out here from the document with struct, the regions are real
memfds, and "nothing leaked" is checked against the kernel (open
descriptors, /proc/self/maps).  Both backends (conftest.py).
"""
from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import List, Optional, Tuple

import pytest

from afunix import Message, ProtocolError, shm
from afunix.codec import FrameReader
from afunix.frames import region_frame, return_frames, slot_frame
from afunix.framewriter import FrameWriter, Segment
from afunix.lane import LaneSender, return_segments
from conftest import region_mappings

pytestmark = pytest.mark.skipif(shm.unsupported_reason() is not None,
                                reason=str(shm.unsupported_reason()))

HEADER = struct.Struct("<IBBBB")


def v1(data: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(len(data), nfds, 0, 1, 0xAF) + data


def v2(kind: int, payload: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(len(payload), nfds, kind, 2, 0xAF) + payload



def sealed_memfd(size: int, seals: Optional[int] = shm.REQUIRED_SEALS) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.posix_fallocate(fd, 0, size)
    if seals:
        import fcntl
        fcntl.fcntl(fd, shm.F_ADD_SEALS, seals)
    return fd


def feed_segment(reader: FrameReader, writer: FrameWriter, seg: Segment) -> bool:
    """What one sendmsg of `seg` brings: its bytes, and a duplicate of each descriptor."""
    if seg.log is not None:
        written(seg)
    return reader.feed(bytes(writer.pack(seg)), [os.dup(fd) for fd in seg.fds])


def written(seg: Segment) -> None:
    """Record `seg` as written whole, as the channel's write does in its log (Segment.log)."""
    assert seg.log is not None and seg.packed is not None
    seg.log.append(len(seg.packed))


def take_returns(reader: FrameReader) -> list:
    """The slots the reader has to send back, with their RETURN frames made and written."""
    slots = list(reader.returns)
    seg = reader.return_segment()
    while seg is not None:
        written(seg)
        reader.settle_returns()
        seg = reader.return_segment()
    assert not reader.returns
    return slots


def pair(size: int = 1 << 20, threshold: int = 1024) -> Tuple[LaneSender, FrameWriter, FrameReader]:
    lane = LaneSender(size, threshold)
    writer = FrameWriter()
    reader = FrameReader()
    seg = lane.announcement()
    assert seg is not None
    written(seg)
    assert lane.announcement() is None
    feed_segment(reader, writer, seg)
    return lane, writer, reader


# ---- the frames as the document spells them --------------------------------------


def test_the_lane_frames_are_the_documented_bytes() -> None:
    assert region_frame(1 << 20) == v2(1, struct.pack("<Q", 1 << 20), 1)
    assert slot_frame(128, 5000, 2) == v2(2, struct.pack("<QQ", 128, 5000), 2)
    assert return_frames([(0, 10), (64, 7)]) == [v2(3, struct.pack("<QQQQ", 0, 10, 64, 7))]
    many = return_frames([(i * 64, 1) for i in range(5000)])
    assert [len(f) for f in many] == [8 + 16 * 4096, 8 + 16 * 904]


def test_the_region_frame_comes_once_with_the_region_descriptor(clean: None) -> None:
    lane = LaneSender(1 << 16)
    seg = lane.announcement()
    assert seg is not None and seg.fds == (lane.region.fileno(),)
    assert bytes(FrameWriter().pack(seg)) == region_frame(1 << 16)
    assert lane.announcement() is not None  # until its write went
    written(seg)
    assert lane.announcement() is None
    lane.close()


# ---- round trips ------------------------------------------------------------------


def test_a_message_in_a_slot_comes_out_and_its_slot_goes_back(clean: None) -> None:
    lane, writer, reader = pair()
    data = os.urandom(300_000)
    seg = lane.try_segment(data)
    assert seg is not None and lane.in_flight == 1
    assert feed_segment(reader, writer, seg)
    assert reader.buffered == 1
    assert reader.take_bytes() == data
    returned = take_returns(reader)
    assert [tuple(s) for s in returned] == [(0, len(data))] and take_returns(reader) == []
    # the RETURN frame, the other way, read by the sender's own reader
    back = FrameReader(on_return=lane.give_back)
    for seg in return_segments(returned):
        assert not feed_segment(back, writer, seg)
    assert lane.in_flight == 0 and lane.region.allocator.largest_free == 1 << 20
    for r in (reader, back):
        r.close()
    lane.close()


def test_slots_and_data_frames_keep_their_order_with_their_descriptors(clean: None) -> None:
    lane, writer, reader = pair()
    big = [os.urandom(5000 + i) for i in range(3)]
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        # one read: small, SLOT, small, SLOT, small (no descriptors)
        s0 = lane.try_segment(big[0])
        assert s0 is not None
        written(s0)  # (before the next frame is made: see LaneSender.begin)
        s1 = lane.try_segment(big[1])
        assert s1 is not None
        written(s1)
        stream = (v1(b"a") + bytes(writer.pack(s0)) + v1(b"b") + bytes(writer.pack(s1))
                  + v1(b"c"))
        reader.feed(stream)
        got = []
        while reader.buffered or reader.frames_ready():
            got.extend(reader.take_many(100))
        assert got == [b"a", big[0], b"b", big[1], b"c"]
        # a SLOT frame with a descriptor, its own read as the descriptor rule says
        s2 = lane.try_segment(big[2], (fd,))
        assert s2 is not None
        assert feed_segment(reader, writer, s2)
        message = reader.take_message()
        assert message.data == big[2] and len(message.fds) == 1
        assert os.fstat(message.fds[0]).st_ino == os.fstat(fd).st_ino
        os.close(message.fds[0])
        assert len(take_returns(reader)) == 3
    finally:
        os.close(fd)
        reader.close()
        lane.close()


def test_a_slot_descriptor_not_taken_is_closed_at_the_next_receive(clean: None) -> None:
    lane, writer, reader = pair()
    fd = os.open(os.devnull, os.O_RDONLY)
    seg = lane.try_segment(b"x" * 2000, (fd,))
    assert seg is not None
    feed_segment(reader, writer, seg)
    os.close(fd)
    assert reader.take_bytes() == b"x" * 2000
    assert not reader.frames_ready()  # closes the duplicate nobody took (clean checks)
    reader.close()
    lane.close()


def test_iteration_hands_out_a_slot_message_once() -> None:
    lane, writer, reader = pair()
    seg = lane.try_segment(b"y" * 4096)
    assert seg is not None
    reader.feed(v1(b"1") + bytes(writer.pack(seg)) + v1(b"2"))
    got = []
    while reader.buffered or reader.frames_ready():
        message = reader.take_next()
        assert message is not None
        got.append(message)
    assert got == [b"1", b"y" * 4096, b"2"]
    reader.close()
    lane.close()


def test_a_batch_reads_the_slot_in_place_until_the_next_receive(clean: None) -> None:
    lane, writer, reader = pair()
    data = os.urandom(10_000)
    seg = lane.try_segment(data)
    assert seg is not None
    feed_segment(reader, writer, seg)
    batch = reader.take_batch(10)
    assert len(batch) == 1 and bytes(batch[0]) == data and batch.lengths[0] == len(data)
    assert batch[0].readonly
    assert take_returns(reader) == []  # still read in place
    assert not reader.frames_ready()  # the next receive: released
    assert [tuple(s) for s in take_returns(reader)] == [(0, len(data))]
    del batch
    reader.close()
    lane.close()


@pytest.mark.skipif(sys.implementation.name == "pypy",
                    reason="PyPy does not count a view's exports: a slot whose batch view is "
                    "kept goes back at the next receive (docs/channel.md)")
def test_a_slot_still_exported_is_not_returned_and_an_overlap_with_it_fails(clean: None) -> None:
    lane, writer, reader = pair()
    seg = lane.try_segment(b"z" * 5000)
    assert seg is not None
    feed_segment(reader, writer, seg)
    batch = reader.take_batch(1)
    export = pickle.PickleBuffer(batch.buffer)  # holds the slot's view
    assert not reader.frames_ready()
    assert take_returns(reader) == []  # never handed back while read
    # a hostile peer names a range overlapping it
    with pytest.raises(ProtocolError, match="overlaps"):
        reader.feed(slot_frame(4096, 2000))
    assert reader.closed
    export.release()
    del batch, export
    lane.close()


def test_close_and_the_end_of_stream_unmap_the_peers_region(clean: None) -> None:
    lane, writer, reader = pair()
    assert reader.lane is not None
    maps = region_mappings()
    assert not reader.feed(b"")  # a clean end: the region goes
    assert reader.lane is None and region_mappings() == maps - 1
    reader.close()
    lane, writer, reader = pair()
    seg = lane.try_segment(b"q" * 3000)
    assert seg is not None
    feed_segment(reader, writer, seg)
    reader.close()  # a message not taken: its slot and the region go all the same
    assert reader.lane is None
    lane.close()


def test_frames_ahead_of_a_bad_lane_frame_come_first(clean: None) -> None:
    reader = FrameReader()
    reader.feed(v1(b"one") + v1(b"two") + slot_frame(0, 10))
    assert reader.take_many(10) == [b"one", b"two"]
    with pytest.raises(ProtocolError, match="SLOT frame before the REGION"):
        reader.frames_ready()


# ---- a hostile or broken peer -----------------------------------------------------


def refused(reader: FrameReader, data: bytes, fds: List[int] = [],
            match: Optional[str] = None) -> None:
    with pytest.raises(ProtocolError, match=match):
        if not reader.feed(data, fds):
            pass
        while reader.frames_ready():
            reader.take_many(100)
    assert reader.closed


@pytest.mark.parametrize("bad, match", [
    (v2(3, struct.pack("<QQ", 0, 1), 0)[:6] + bytes([3, 0xAF]), "version 3"),
    (v2(0, b"data"), "unknown kind 0"),
    (v2(5, b"\0" * 32), "unknown kind 5"),
    (v2(4, b"\0" * 32, 1)[:8], "OBJECT frame carries 1"),
    (HEADER.pack((64 << 20) + 1, 0, 4, 2, 0xAF), "OBJECT frame of 67108865 bytes is over"),
    (v2(9, b""), "unknown kind 9"),
    (v2(2, b"\0" * 8), "SLOT frame of 8 bytes"),
    (v2(1, b"\0" * 8, 0), "declares 0 descriptors"),
    (v2(3, b"\0" * 17), "RETURN frame of 17 bytes"),
    (v2(3, b""), "RETURN frame of 0 bytes"),
    (HEADER.pack(16 * 4097, 0, 3, 2, 0xAF), "RETURN frame of"),
    (v2(3, b"\0" * 16, 1)[:8], "RETURN frame carries 1"),
])
def test_malformed_lane_headers_fail_as_soon_as_the_header_is_here(
        bad: bytes, match: str, clean: None) -> None:
    refused(FrameReader(), bad[:8], match=match)


def test_a_slot_before_the_region_out_of_range_or_empty_fails(clean: None) -> None:
    refused(FrameReader(), slot_frame(0, 100), match="before the REGION")
    for offset, length, match in [((1 << 20) - 10, 11, "out of range"), (0, 0, "empty slot"),
                                  ((1 << 64) - 1, 2, "out of range")]:
        lane, writer, reader = pair()
        refused(reader, slot_frame(offset, length), match=match)
        lane.close()


def test_a_second_region_fails_and_closes_both(clean: None) -> None:
    lane, writer, reader = pair()
    other = LaneSender(1 << 16)
    seg = other.announcement()
    assert seg is not None
    with pytest.raises(ProtocolError, match="second REGION"):
        feed_segment(reader, writer, seg)
    assert reader.closed and reader.lane is None
    other.close()
    lane.close()


@pytest.mark.parametrize("kind, match", [
    ("unsealed", "not sealed"), ("no-grow-seal", "not sealed"), ("size", "65536 bytes, 131072"),
    ("not-memfd", "not a memfd"), ("too-big", "the limit is 1048576")])
def test_a_bad_region_fails_before_it_is_mapped(kind: str, match: str, clean: None) -> None:
    maps = region_mappings()
    size = 1 << 16
    announced = size
    reader = FrameReader(max_region=1 << 20)
    if kind == "unsealed":
        fd = sealed_memfd(size, None)
    elif kind == "no-grow-seal":
        fd = sealed_memfd(size, shm.F_SEAL_SHRINK | shm.F_SEAL_SEAL)
    elif kind == "size":
        fd = sealed_memfd(size)
        announced = size * 2
    elif kind == "not-memfd":
        fd = os.open(os.devnull, os.O_RDONLY)
    else:
        fd = sealed_memfd(size)
        announced = 1 << 21
    refused(reader, region_frame(announced), [fd], match=match)
    assert region_mappings() == maps


def test_a_region_frame_with_two_descriptors_fails_and_closes_them(clean: None) -> None:
    fds = [sealed_memfd(4096), sealed_memfd(4096)]
    refused(FrameReader(), v2(1, struct.pack("<Q", 4096), 2), fds, match="declares 2")


def test_returns_the_sender_never_sent_fail(clean: None) -> None:
    refused(FrameReader(), return_frames([(0, 10)])[0], match="sent no slots")
    lane = LaneSender(1 << 16)
    seg = lane.try_segment(b"r" * 100)
    assert seg is not None
    written(seg)  # in flight: the peer may return it (a frame not written: see LaneSender.settle)
    for bad in [[(0, 99)], [(64, 100)], [(0, 100), (0, 100)], [(1 << 16, 1)]]:
        back = FrameReader(on_return=lane.give_back)
        refused(back, return_frames(bad)[0])
        lane.region.allocator.reset()
        seg = lane.try_segment(b"r" * 100)
        assert seg is not None  # in flight again for the next
        written(seg)
    lane.close()


def test_the_protocol_error_of_a_lane_frame_closes_descriptors_and_unmaps(clean: None) -> None:
    lane, writer, reader = pair()
    fd = os.open(os.devnull, os.O_RDONLY)
    good = lane.try_segment(b"m" * 2000, (fd,))
    assert good is not None
    feed_segment(reader, writer, good)  # parsed, its descriptor held, not taken
    os.close(fd)
    assert reader.take_bytes() == b"m" * 2000
    maps = region_mappings()
    with pytest.raises(ProtocolError, match="RETURN frame of 15"):
        reader.feed(v2(3, b"\0" * 15))
    assert reader.closed and region_mappings() == maps - 1
    lane.close()


def test_a_lane_message_descriptor_count_must_match(clean: None) -> None:
    lane, writer, reader = pair()
    seg = lane.try_segment(b"d" * 2000)
    assert seg is not None
    fd = os.open(os.devnull, os.O_RDONLY)
    refused(reader, slot_frame(0, 2000, 2), [fd], match="declares 2 descriptors and 1")
    lane.close()


def test_a_sender_without_room_gets_none_and_room_after_a_return(clean: None) -> None:
    lane = LaneSender(8192, threshold=1)
    assert lane.wants(8192) and not lane.wants(8193) and lane.wants(1)
    first = lane.try_segment(b"a" * 6000)
    assert first is not None
    written(first)
    assert lane.try_segment(b"b" * 6000) is None
    lane.give_back(0, 6000)
    assert lane.try_segment(b"b" * 6000) is not None
    lane.close()


def test_take_message_of_a_slot_hands_a_message() -> None:
    lane, writer, reader = pair()
    seg = lane.try_segment(b"k" * 1500)
    assert seg is not None
    feed_segment(reader, writer, seg)
    assert reader.take_message() == Message(b"k" * 1500, ())
    with pytest.raises(IndexError):
        reader.take_message()
    reader.close()
    lane.close()
