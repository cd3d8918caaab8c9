"""The frame codec on its own: bytes and descriptors fed in by hand, no socket anywhere.

Every rule of docs/PROTOCOL.md that the channel enforces is checked here on
the codec itself, on both backends (conftest.py runs each test on `c` and
`stdlib`: FrameReader and FrameWriter use that backend's parse_frames,
pack_frames and receive state).  The descriptors are real ones (os.open of
/dev/null), so "closed" is checked against the kernel.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Iterator, List

import pytest

from afunix import Message, ProtocolError
from afunix.codec import FrameReader, FrameWriter
from afunix.frames import HEADER_SIZE, RECORD_MAX, frame_header

HEADER = struct.Struct("<IBBBB")


def frame(data: bytes, nfds: int = 0) -> bytes:
    """A frame spelled out from docs/PROTOCOL.md, independently of the codec."""
    return HEADER.pack(len(data), nfds, 0, 1, 0xAF) + data


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@pytest.fixture
def nulls(fd_baseline: set[int]) -> Iterator[List[int]]:
    """Makes fresh descriptors; those the test still holds are closed after it (then no leak)."""
    made: List[int] = []
    yield made
    for fd in made:
        if is_open(fd):
            os.close(fd)


def opened(nulls: List[int], n: int) -> List[int]:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(n)]
    nulls.extend(fds)
    return fds


def drain(reader: FrameReader) -> List[bytes]:
    out: List[bytes] = []
    while reader.buffered or reader.frames_ready():
        out.extend(reader.take_many(1 << 20))
    return out


# ---- the writer -------------------------------------------------------------------


def test_writer_packs_the_wire_format_byte_for_byte() -> None:
    w = FrameWriter()
    messages = [b"", b"a", b"hello", bytearray(b"xyz"), memoryview(b"0123456789")[2:7]]
    segments, count = w.segments(messages)
    assert count == 5 and len(segments) == 1 and not segments[0].fds
    assert bytes(w.pack(segments[0])) == b"".join(frame(bytes(m)) for m in messages)
    assert frame_header(5) == frame(b"12345")[:HEADER_SIZE]
    assert frame_header(5, 3) == HEADER.pack(5, 3, 0, 1, 0xAF)


def test_writer_gives_a_frame_with_descriptors_its_own_write_and_control_data(
        nulls: List[int]) -> None:
    fd, = opened(nulls, 1)
    w = FrameWriter()
    segments, count = w.segments([b"one", b"two", Message(b"three", (fd,)), b"four"])
    assert count == 4
    assert [s.fds for s in segments] == [(), (fd,), ()]
    assert bytes(w.pack(segments[1])) == frame(b"three", 1)
    from afunix.framewriter import control
    [(level, kind, data)] = control(segments[1].fds)
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    assert struct.unpack("i", data) == (fd,)


def test_writer_refuses_a_message_over_max_frame_before_anything() -> None:
    w = FrameWriter(max_frame=4)
    with pytest.raises(ValueError, match="over max_frame"):
        w.segments([b"ok", b"12345"])
    assert w.unsent == 0
    with pytest.raises(ValueError):
        FrameWriter(max_frame=(1 << 30) + 1)


def test_writer_keeps_the_tail_of_the_message_a_short_write_cut() -> None:
    w = FrameWriter()
    seg, = w.segments([b"aaaa", b"bbbb", b"cccc"])[0]
    packed = bytes(w.pack(seg))
    size = HEADER_SIZE + 4

    def wrote(*counts: int) -> int:
        w.begin(w.pack(seg), seg.lengths)
        w.taken += counts
        return w.settle()

    # nothing went: nothing counts; all went: all count
    assert wrote() == 0 and w.unsent == 0
    assert wrote(len(packed) - 5, 5) == 3 and w.unsent == 0
    # a cut inside the second message: two count, its tail is pending, the third is not started
    done = size + 3
    w.begin(w.pack(seg), seg.lengths)
    w.taken.append(done)
    assert w.unsent == 2 * size - done  # before it is settled too
    assert w.settle() == 2
    assert bytes(w.pending) == packed[done:2 * size]
    with pytest.raises(RuntimeError, match="pending bytes must be written"):
        w.begin(packed, seg.lengths)
    w.pack(seg)  # the pack buffer is reused: the kept tail was copied out
    assert bytes(w.pending) == packed[done:2 * size]
    w.begin(w.pending, None)
    with pytest.raises(RuntimeError, match="in progress"):
        w.begin(w.pending, None)
    w.taken.append(2)
    assert w.settle() == 0
    assert bytes(w.pending) == packed[done + 2:2 * size]
    w.begin(w.pending, None)
    w.taken.append(len(w.pending))
    w.settle()
    assert w.unsent == 0 and w.writing is None


def test_writer_settles_a_write_left_in_progress_before_it_packs_again() -> None:
    # An exception can leave a write in progress (begun, counts taken, not
    # settled); packing the next segment into the same buffer must keep
    # the tail of the message it cut first.
    w = FrameWriter()
    seg, = w.segments([b"aaaa", b"bbbb"])[0]
    packed = bytes(w.pack(seg))
    w.begin(w.pack(seg), seg.lengths)
    w.taken.append(3)
    other, = w.segments([b"zzzzzzzz", b"yyyyyyyy"])[0]
    w.pack(other)
    assert w.writing is None and bytes(w.pending) == packed[3:HEADER_SIZE + 4]


def test_writer_buffer_packs_the_same_bytes_and_says_when_it_is_full() -> None:
    w = FrameWriter(write_buffer=3 * (HEADER_SIZE + 4))
    assert not w.must_flush_before(4)
    assert not w.queue_one(b"aaaa", 4)
    assert not w.queue_one(b"bbbb", 4)
    assert w.queue_one(b"cccc", 4)  # full now
    assert w.unsent == 3 * (HEADER_SIZE + 4)
    assert w.must_flush_before(4)
    w.take_queue()
    assert bytes(w.pending) == frame(b"aaaa") + frame(b"bbbb") + frame(b"cccc")
    assert not w.queue and w.unsent == len(w.pending)
    w.drop_unsent()
    assert w.unsent == 0


def test_writer_never_packs_over_pending_bytes_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    # take_queue leaves `pending` a view of the reusable pack buffer.  An
    # exception (a signal handler's) after it and before the write, then
    # another after the next take_queue packed and before it stored, left
    # `pending` showing the new packing's bytes: the stream carried a cut
    # copy of them (CI: "message 195 damaged").
    w = FrameWriter(write_buffer=1 << 20)
    w.queue_one(b"a" * 100, 100)
    w.take_queue()
    first = frame(b"a" * 100)
    assert bytes(w.pending) == first
    w.queue_one(b"b" * 300, 300)
    pack_into = FrameWriter._pack_into

    def packed_then_interrupted(self: FrameWriter, *args: object) -> memoryview:
        pack_into(self, *args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(FrameWriter, "_pack_into", packed_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.take_queue()
    monkeypatch.undo()
    assert bytes(w.pending) == first and w.queue == [b"b" * 300]
    w.take_queue()
    assert bytes(w.pending) == first + frame(b"b" * 300)
    # and a segment packed while bytes are pending leaves them as they are
    seg, = w.segments([b"z" * 500])[0]
    w.pack(seg)
    assert bytes(w.pending) == first + frame(b"b" * 300)


def test_writer_fixed_records() -> None:
    w = FrameWriter()
    seg = w.fixed(b"abcdefgh", 4)
    assert seg is not None and bytes(w.pack(seg)) == frame(b"abcd") + frame(b"efgh")
    assert w.fixed(b"", 4) is None
    with pytest.raises(ValueError, match="multiple"):
        w.fixed(b"abcde", 4)


# ---- the reader: frames out -------------------------------------------------------


def test_reader_gives_out_what_the_writer_packed() -> None:
    w, r = FrameWriter(), FrameReader()
    messages = [b"", b"x", b"y" * 1000, b"z" * 70000]
    wire = b"".join(bytes(w.pack(s)) for s in w.segments(messages)[0])
    assert not r.frames_ready()
    for i in range(0, len(wire), 20000):
        r.feed(wire[i:i + 20000])
    assert drain(r) == messages
    assert r.feed(b"") is False  # a clean end of stream


@pytest.mark.parametrize("step", [1, 3, HEADER_SIZE, HEADER_SIZE + 1])
def test_reader_joins_frames_split_anywhere(step: int) -> None:
    r = FrameReader()
    wire = frame(b"hello") + frame(b"") + frame(b"world" * 3)
    got: List[bytes] = []
    for i in range(0, len(wire), step):
        if r.feed(wire[i:i + step]):
            got.extend(r.take_many(100))
    assert got == [b"hello", b"", b"world" * 3]


def test_reader_hands_out_one_at_a_time_or_in_place() -> None:
    r = FrameReader()
    assert r.feed(frame(b"a") + frame(b"bb") + frame(b"ccc"))
    assert r.buffered == 3
    assert r.take_bytes() == b"a"
    assert r.take_message() == Message(b"bb", ())
    batch = r.take_batch(10)
    assert [bytes(m) for m in batch] == [b"ccc"] and batch.fds(0) == []
    assert r.buffered == 0


def test_reader_grows_for_a_large_frame_only_as_its_bytes_come() -> None:
    r = FrameReader()
    start = len(r.buffer)
    assert not r.feed(HEADER.pack(50 << 20, 0, 0, 1, 0xAF))  # the header alone
    assert len(r.buffer) == start
    payload = os.urandom(3 << 20)
    big = HEADER.pack(len(payload), 0, 0, 1, 0xAF) + payload
    r2 = FrameReader()
    i = 0
    while i < len(big):
        n = min(r2.read_size, len(r2.buffer) - r2.rs.end)
        r2.feed(big[i:i + n])
        i += n
    assert len(r2.buffer) < 2 * len(big) and drain(r2) == [payload]


def test_reader_feed_refuses_more_than_a_read_may_bring() -> None:
    r = FrameReader(seqpacket=True)
    with pytest.raises(ValueError, match="do not fit"):
        r.feed(frame(b"x" * RECORD_MAX))
    assert r.feed(frame(b"x" * (RECORD_MAX - HEADER_SIZE)))


# ---- the reader: limits and bad bytes ---------------------------------------------


def test_frames_ahead_of_a_bad_header_come_first() -> None:
    r = FrameReader()
    assert r.feed(frame(b"one") + frame(b"two") + b"\x03\0\0\0\0\0\x01\x00abc")
    assert r.take_many(10) == [b"one", b"two"]
    with pytest.raises(ProtocolError, match="malformed frame header") as info:
        r.frames_ready()
    assert info.value.errno == errno.EPROTO
    assert r.closed
    with pytest.raises(OSError) as closed:
        r.frames_ready()
    assert closed.value.errno == errno.EBADF


@pytest.mark.parametrize("bad", [
    HEADER.pack(1, 0, 0, 2, 0xAF),  # another version
    HEADER.pack(1, 0, 1, 1, 0xAF),  # flags set
    HEADER.pack(1, 0, 0, 1, 0xAE),  # not the magic
    HEADER.pack(1, 254, 0, 1, 0xAF),  # more descriptors than SCM_MAX_FD
])
def test_a_malformed_header_alone_fails_at_once(bad: bytes) -> None:
    r = FrameReader()
    with pytest.raises(ProtocolError, match="malformed"):
        r.feed(bad + b"x")


def test_a_frame_over_max_frame_fails_after_the_ones_before_it() -> None:
    r = FrameReader(max_frame=4)
    assert r.feed(frame(b"1234") + HEADER.pack(5, 0, 0, 1, 0xAF))
    assert r.take_many(10) == [b"1234"]
    with pytest.raises(ProtocolError, match=r"a frame of 5 bytes is over max_frame \(4\)"):
        r.frames_ready()


def test_the_end_of_stream_in_the_middle_of_a_frame_is_an_error() -> None:
    r = FrameReader()
    assert not r.feed(frame(b"hello")[:6])
    with pytest.raises(ProtocolError, match="middle of a frame"):
        r.feed(b"")


def test_a_record_the_kernel_cut_is_an_error_after_the_frames_before_it() -> None:
    r = FrameReader(seqpacket=True)
    assert r.feed(frame(b"ok"))
    assert r.take_bytes() == b"ok"
    with pytest.raises(ProtocolError, match="longer than"):
        r.feed(frame(b"x" * 100)[:50], flags=socket.MSG_TRUNC)


# ---- the reader: descriptors ------------------------------------------------------


def test_descriptors_ride_on_the_frame_that_declares_them(nulls: List[int]) -> None:
    fds = opened(nulls, 2)
    r = FrameReader()
    assert r.feed(frame(b"plain") + frame(b"with", 2) + frame(b"after"), fds)
    # descriptors arrive with the read holding their frame's first byte: the
    # frame before shares that read, and must not take them
    assert r.take_message() == Message(b"plain", ())
    m = r.take_message()
    assert m.data == b"with" and m.fds == tuple(fds)
    assert r.take_message() == Message(b"after", ())
    assert not r.frames_ready()
    r.close()
    assert all(is_open(fd) for fd in fds)  # handed over: the reader closes them no more


def test_descriptors_not_taken_are_closed_at_the_next_receive(nulls: List[int]) -> None:
    fds = opened(nulls, 1)
    r = FrameReader()
    assert r.feed(frame(b"one", 1) + frame(b"two"), fds)
    assert r.take_bytes() == b"one"  # descriptors not asked for
    assert is_open(fds[0])  # held until the next receive
    assert r.take_bytes() == b"two"
    assert not r.frames_ready()
    assert not is_open(fds[0])


def test_a_batch_hands_descriptors_over_once_and_closes_the_rest(nulls: List[int]) -> None:
    taken_fd, left_fd = opened(nulls, 1), opened(nulls, 1)
    r = FrameReader()
    assert r.feed(frame(b"x", 1) + frame(b"y"), taken_fd)
    batch = r.take_batch(10)
    assert [bytes(m) for m in batch] == [b"x", b"y"] and batch.fds(1) == []
    assert batch.fds(0) == taken_fd and batch.fds(0) == []  # once
    assert not r.frames_ready()
    assert r.feed(frame(b"z", 1), left_fd)
    batch = r.take_batch(10)  # nobody takes its descriptor
    assert not r.frames_ready()  # the next receive closes it
    assert not is_open(left_fd[0]) and is_open(taken_fd[0])
    assert batch.fds(0) == []  # the batch ended with that receive


@pytest.mark.parametrize("declared, came, problem", [
    (1, 0, "declares 1 descriptors and none came"),
    (2, 1, "declares 2 descriptors and 1 came"),
    (0, 1, "no frame declared"),
])
def test_descriptors_that_do_not_match_fail_after_the_frames_before(
        nulls: List[int], declared: int, came: int, problem: str) -> None:
    fds = opened(nulls, came)
    r = FrameReader()
    assert r.feed(frame(b"good"))
    assert r.take_bytes() == b"good"
    wire = frame(b"bad", declared) + frame(b"after")
    with pytest.raises(ProtocolError, match=problem):
        if r.feed(wire, fds):
            # descriptors on frames that declare none are found once those
            # frames are out, before reading on
            assert r.take_many(10) == [b"bad", b"after"]
            r.frames_ready()
    assert not any(is_open(fd) for fd in fds)  # every one received is closed


def test_a_good_frame_before_a_mismatch_in_the_same_read_is_delivered() -> None:
    r = FrameReader()
    assert r.feed(frame(b"first") + frame(b"second", 1))  # no descriptors came
    assert r.take_many(10) == [b"first"]
    with pytest.raises(ProtocolError, match="declares 1 descriptors and none came"):
        r.frames_ready()


def test_descriptors_from_a_later_read_belong_to_a_later_frame(nulls: List[int]) -> None:
    fds = opened(nulls, 1)
    r = FrameReader()
    wire = frame(b"first") + frame(b"second", 1)
    cut = len(frame(b"first"))
    assert r.feed(wire[:cut])
    assert r.take_bytes() == b"first"
    assert not r.frames_ready()
    assert r.feed(wire[cut:], fds)
    m = r.take_message()
    assert m.data == b"second" and m.fds == tuple(fds)
    nulls.clear()
    os.close(m.fds[0])


def test_descriptors_without_data_and_cut_descriptors_are_errors(nulls: List[int]) -> None:
    fds = opened(nulls, 1)
    r = FrameReader()
    with pytest.raises(ProtocolError, match="without data"):
        r.feed(b"", fds)
    assert not is_open(fds[0])
    r = FrameReader()
    with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
        r.feed(frame(b"x", 1), flags=socket.MSG_CTRUNC)


def test_the_end_of_stream_with_undeclared_descriptors_is_an_error(nulls: List[int]) -> None:
    fds = opened(nulls, 1)
    r = FrameReader()
    assert not r.feed(frame(b"abc", 1)[:4], fds)  # the frame is not complete yet
    with pytest.raises(ProtocolError, match="middle of a frame"):
        r.feed(b"")
    assert not is_open(fds[0])


def test_closing_the_reader_closes_every_descriptor_it_holds(nulls: List[int]) -> None:
    fds = opened(nulls, 3)
    r = FrameReader()
    assert r.feed(frame(b"m", 3), fds)
    r.close()
    assert not any(is_open(fd) for fd in fds)
    r.close()  # again: nothing to do


def test_iteration_copies_once_and_shares_its_place_with_every_other_take(nulls: List[int]) -> None:
    fds = opened(nulls, 1)
    r = FrameReader()
    assert r.take_next() is None
    assert r.feed(frame(b"a") + frame(b"b") + frame(b"c", 1) + frame(b"d"), fds)
    assert r.take_next() == b"a"  # copies b, c, d too
    assert r.take_bytes() == b"b"  # the same place: b is not handed out twice
    m = r.take_message()  # c's descriptor is still the reader's to hand over
    assert m.data == b"c" and m.fds == tuple(fds)
    nulls.clear()
    os.close(m.fds[0])
    assert r.take_next() == b"d" and r.take_next() is None
    assert not r.frames_ready()
    assert r.feed(frame(b"e"))  # a new parse: the old copies are not served again
    assert r.take_next() == b"e" and r.take_next() is None


# ---- the reader: what a caller gets wrong -----------------------------------------


def test_take_with_no_parsed_frame_refuses_rather_than_make_up_a_message() -> None:
    r = FrameReader()
    with pytest.raises(IndexError, match="no parsed frame"):
        r.take_bytes()
    with pytest.raises(IndexError, match="no parsed frame"):
        r.take_message()
    assert r.buffered == 0
    assert r.feed(frame(b"abc"))
    assert r.take_bytes() == b"abc"
    with pytest.raises(IndexError, match="no parsed frame"):
        r.take_bytes()  # not b"" nor b"abc" again
    assert r.buffered == 0 and r.take_many(5) == [] and r.take_next() is None


def test_take_after_close_refuses_rather_than_hand_out_old_bytes() -> None:
    r = FrameReader()
    assert r.feed(frame(b"abc"))
    r.close()
    for take in (r.take_bytes, r.take_message):
        with pytest.raises(OSError) as info:
            take()
        assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("fds, error", [
    ([-1], ValueError),
    ([1 << 31], ValueError),
    (["3"], TypeError),
    ([1.5], TypeError),
])
def test_feed_refuses_what_is_not_a_descriptor_before_taking_anything(
        fds: List[object], error: type) -> None:
    r = FrameReader()
    with pytest.raises(error, match="descriptor"):
        r.feed(frame(b"x", 1), fds)  # type: ignore[arg-type]
    assert r.buffered == 0 and not r.closed and r.rs.end == 0
    assert r.feed(frame(b"ok")) and r.take_many(5) == [b"ok"]


def test_feed_refuses_one_descriptor_given_twice(nulls: List[int]) -> None:
    fd, = opened(nulls, 1)
    r = FrameReader()
    with pytest.raises(ValueError, match="twice"):
        r.feed(frame(b"x", 2), [fd, fd])  # the reader would close it twice
    assert is_open(fd) and r.rs.end == 0


def test_feed_refuses_more_descriptors_than_one_read_brings(nulls: List[int]) -> None:
    fds = opened(nulls, 254)
    r = FrameReader()
    with pytest.raises(ValueError, match="SCM_MAX_FD"):
        r.feed(frame(b"x"), fds)
    assert all(is_open(fd) for fd in fds)


@pytest.mark.parametrize("flags, error", [(1.5, TypeError), ("x", TypeError), (-1, ValueError)])
def test_feed_refuses_flags_that_are_not_msg_flags(flags: object, error: type) -> None:
    r = FrameReader()
    with pytest.raises(error, match="flags"):
        r.feed(frame(b"x"), (), flags)  # type: ignore[arg-type]
    assert r.feed(frame(b"ok")) and r.take_many(5) == [b"ok"]
    r.close()  # nothing left behind that fails later


def test_feed_after_a_protocol_error_found_earlier_closes_the_fed_descriptors(
        nulls: List[int]) -> None:
    # "fds belong to the reader from here on (closed ... on error)": also when
    # the error is one an earlier feed found, behind the frames handed out
    fd, = opened(nulls, 1)
    r = FrameReader()
    assert r.feed(frame(b"one") + b"\x03\0\0\0\0\0\x01\x00abc")
    assert r.take_many(10) == [b"one"]
    with pytest.raises(ProtocolError, match="malformed"):
        r.feed(frame(b"x", 1), [fd])
    assert not is_open(fd)


def test_the_end_of_stream_fed_while_frames_wait_is_kept() -> None:
    r = FrameReader()
    assert r.feed(frame(b"a") + frame(b"bbbb")[:5])  # a frame and a cut one
    assert r.feed(b"") is True  # the frame before the end comes first
    assert r.take_many(10) == [b"a"]
    with pytest.raises(ProtocolError, match="middle of a frame"):
        r.frames_ready()  # the cut frame is not dropped in silence
    r = FrameReader()
    assert r.feed(frame(b"a"))
    assert r.feed(b"") is True
    assert r.take_many(10) == [b"a"]
    assert r.frames_ready() is False  # a clean end
    assert r.frames_ready() is False


@pytest.mark.parametrize("count, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_take_many_and_take_batch_refuse_a_count_below_one(count: object, error: type) -> None:
    r = FrameReader()
    assert r.feed(frame(b"a") + frame(b"b") + frame(b"c"))
    assert r.take_many(1) == [b"a"]
    with pytest.raises(error, match="max_messages"):
        r.take_many(count)  # type: ignore[arg-type]
    with pytest.raises(error, match="max_messages"):
        r.take_batch(count)  # type: ignore[arg-type]
    assert r.buffered == 2
    assert r.take_many(5) == [b"b", b"c"]  # none handed out twice


def test_feeding_read_size_bytes_at_a_time_is_always_taken() -> None:
    # read_size is what a transport of one's own reads next: feed must take it,
    # also while the incomplete frame it grows for is held
    payload = os.urandom(1 << 20)
    wire = frame(payload) + frame(b"end")
    r = FrameReader()
    got: List[bytes] = []
    i = 0
    while i < len(wire):
        n = r.read_size
        assert n > 0
        if r.feed(wire[i:i + n]):
            got.extend(r.take_many(10))
        i += n
    assert got + drain(r) == [payload, b"end"]


def test_feed_after_a_protocol_error_closes_the_others_when_one_is_not_open(
        nulls: List[int]) -> None:
    gone, kept = opened(nulls, 2)
    os.close(gone)  # a number that is no descriptor now: the caller's mistake
    r = FrameReader()
    assert r.feed(frame(b"one") + b"\x03\0\0\0\0\0\x01\x00abc")
    assert r.take_many(10) == [b"one"]
    with pytest.raises(ProtocolError, match="malformed"):  # not the EBADF of gone
        r.feed(frame(b"x", 2), [gone, kept])
    assert not is_open(kept)


def test_writer_never_drops_a_kept_tail_for_a_caller_who_goes_on() -> None:
    w = FrameWriter()
    seg, = w.segments([b"aaaa", b"bbbb"])[0]
    packed = bytes(w.pack(seg))
    w.begin(w.pack(seg), seg.lengths)
    w.taken.append(3)
    assert w.settle() == 1
    tail = bytes(w.pending)
    assert tail == packed[3:HEADER_SIZE + 4]
    seg2, = w.segments([b"cccc"])[0]
    with pytest.raises(RuntimeError, match="pending"):
        w.begin(w.pack(seg2), seg2.lengths)  # its bytes would go before the tail
    assert bytes(w.pending) == tail and w.settle() == 0 and bytes(w.pending) == tail
    w.begin(w.pending, None)
    w.taken.append(len(tail))
    w.settle()
    assert w.unsent == 0
