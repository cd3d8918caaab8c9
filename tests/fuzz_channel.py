"""Fuzz target: a hostile peer's bytes and descriptors into a Channel, checked against a parse of our own.

Each input is a script of what a peer does on a real socketpair: its writes
(sendmsg, with descriptors when asked) and whether it closes at the end.
The channel under test receives all of it; what it delivers (every message
with its descriptors, and how it ends: clean end, ProtocolError, or waiting
for more) must equal what `expected`, a plain reading of docs/PROTOCOL.md
in a few dozen lines of Python, says a receiver delivers.  Every received
descriptor must be close-on-exec and the one the peer attached to that
message, and none may leak.

Input layout:

  byte 0, the set-up:
    bit 0     SOCK_SEQPACKET (else SOCK_STREAM)
    bit 1     the channel receives after each write (else after all of them)
    bit 2     the peer closes after its last write (else it stays, silent)
    bits 3-4  how the channel receives: recv_message, recv_batch, recv_many, recv
    bits 5-6  max_frame: 64 MiB (the default), 0, 16, 300
  then up to 64 writes, each: a control byte, a 2-byte little-endian
  length, that many bytes of data (fewer at the end of the input):
    bits 0-1  descriptors attached (0-3)
    bit 2     framed: a correct header goes first (the data's length, nfds = attached)
    bit 3     a long record (SOCK_SEQPACKET only): the data repeated to 65536
              bytes, 65537 with bit 4 (at most two per input)
    bits 5-7  which of 4 pipes the first descriptor is (the others follow)

Run by .ci/fuzz-channel under atheris (``python tests/fuzz_channel.py
[libFuzzer flags] CORPUS...``, the backend from AFUNIX_BACKEND);
tests/test_fuzz_corpus.py replays the committed seeds (tests/fuzz_corpus/)
on both backends.  ``python tests/fuzz_channel.py --write-seeds DIR``
writes those seeds.
"""
from __future__ import annotations

import array
import errno
import os
import socket
import struct
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

if __name__ == "__main__" and "--write-seeds" not in sys.argv:
    # A fuzzing run: afunix's Python code is instrumented for coverage as it loads.
    import atheris

    with atheris.instrument_imports(include=["afunix"]):
        import afunix

import afunix
from afunix import Channel, ProtocolError

HEADER = struct.Struct("<IBBBB")  # length, nfds, flags, version, magic
RECORD_MAX = 65536
MAX_WRITES = 64
STREAM_BYTES = 32 << 10  # all of a stream input fits one read of the channel's buffer
MAX_FRAMES = [64 << 20, 0, 16, 300]
HOW = ["recv_message", "recv_batch", "recv_many", "recv"]

# Descriptors the peer attaches: the read ends of 4 pipes, told apart by inode.
_PIPES = [os.pipe() for _ in range(4)]
_POOL = [r for r, _ in _PIPES]
_INODES = {os.fstat(fd).st_ino: i for i, fd in enumerate(_POOL)}


class Write(NamedTuple):
    data: bytes
    fds: Tuple[int, ...]  # pool indexes


class Script(NamedTuple):
    seqpacket: bool
    interleaved: bool
    closes: bool
    how: str
    max_frame: int
    writes: List[Write]


def decode(data: bytes) -> Script:
    """The peer's script from fuzz input bytes (see the module docstring)."""
    setup = data[0] if data else 0
    seqpacket = bool(setup & 1)
    writes: List[Write] = []
    pos, total, longs = 1, 0, 0
    while pos < len(data) and len(writes) < MAX_WRITES:
        ctl = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 3], "little")
        body = data[pos + 3:pos + 3 + length]
        pos += 3 + length
        fds = tuple(((ctl >> 5) + j) % 4 for j in range(ctl & 3))
        if ctl & 4:
            body = HEADER.pack(len(body), len(fds), 0, 1, 0xAF) + body
        if ctl & 8 and seqpacket and longs < 2:
            longs += 1
            size = RECORD_MAX + (1 if ctl & 16 else 0)
            body = (body or b"\0") * (size // len(body or b"\0") + 1)
            body = body[:size]
        if not seqpacket:
            body = body[:max(0, STREAM_BYTES - total)]
        total += len(body)
        writes.append(Write(body, fds))
    return Script(seqpacket, bool(setup & 2), bool(setup & 4), HOW[setup >> 3 & 3],
                  MAX_FRAMES[setup >> 5 & 3], writes)


# ---- what a receiver delivers, read from docs/PROTOCOL.md ----------------------

Delivery = Tuple[int, bytes, Optional[Tuple[int, ...]]]  # (writes made so far, payload, descriptors)


class Read(NamedTuple):
    data: bytes
    fds: Tuple[int, ...]
    after: int  # how many writes had been made when the channel could read it


def reads_of(script: Script, written: List[Write]) -> List[Read]:
    """What the receiver's reads return, from the writes the peer made.

    SOCK_SEQPACKET: one read per record.  SOCK_STREAM: a 0-byte write sends
    nothing (its descriptors are dropped); a read takes every byte queued,
    but stops after a write that carried descriptors (the kernel's rule,
    docs/PROTOCOL.md "Descriptors").  Receiving after each write, a read is
    that write.
    """
    out: List[Read] = []
    if script.seqpacket or script.interleaved:
        for k, w in enumerate(written):
            if w.data or script.seqpacket:
                out.append(Read(w.data, w.fds, k + 1 if script.interleaved else len(written)))
        return out
    data = b""
    for w in written:
        if not w.data:
            continue
        data += w.data
        if w.fds:
            out.append(Read(data, w.fds, len(written)))
            data = b""
    if data:
        out.append(Read(data, (), len(written)))
    return out


def expected(script: Script, written: List[Write]) -> Tuple[List[Delivery], str]:
    """The messages a receiver delivers, in order, and how it ends: "eof", "error" or "blocked"."""
    delivered: List[Delivery] = []
    buf = b""
    base = 0  # stream offset of buf[0]
    waiting: List[Tuple[int, int, Tuple[int, ...]]] = []  # descriptors: (read start, read end, fds)
    reads = reads_of(script, written)
    for n in range(len(reads) + 1):
        read = reads[n] if n < len(reads) else None
        # Before each read every complete frame is out; descriptors the frame
        # in progress cannot claim (brought by a read that ended before it, or
        # began after its first byte) were declared by no frame.
        at = base
        if any(hi <= at or lo > at for lo, hi, _ in waiting):
            return delivered, "error"
        end_of_stream = read is None and script.closes
        if read is not None and script.seqpacket:
            if len(read.data) > RECORD_MAX:
                return delivered, "error"  # a cut record
            if not read.data and read.fds:
                return delivered, "error"  # descriptors without data
            if not read.data:
                # An empty record: like the end only when the peer has hung
                # up and nothing it sent after it waits (the channel reads it
                # once the peer has closed only when receiving at the end).
                later = [r for r in reads[n + 1:] if r.data]
                if not (script.closes and not script.interleaved and not later):
                    return delivered, "error"
                end_of_stream = True
        if end_of_stream:
            return delivered, "eof" if not buf and not waiting else "error"
        if read is None:
            return delivered, "blocked"
        if read.fds:
            waiting.append((base + len(buf), base + len(buf) + len(read.data), read.fds))
        buf += read.data
        pos = 0  # the frame at stream offset base + pos
        while len(buf) - pos >= HEADER.size:
            length, nfds, flags, version, magic = HEADER.unpack_from(buf, pos)
            if (flags, version, magic) != (0, 1, 0xAF) or nfds > 253 or length > script.max_frame:
                return delivered, "error"
            if len(buf) - pos < HEADER.size + length:
                break
            at = base + pos
            if waiting and waiting[0][1] <= at:
                return delivered, "error"  # descriptors no frame declared
            fds: Tuple[int, ...] = ()
            if nfds:
                if not waiting or not waiting[0][0] <= at < waiting[0][1]:
                    return delivered, "error"  # none came with the frame's first byte
                if len(waiting[0][2]) != nfds:
                    return delivered, "error"  # a count that does not match
                fds = waiting.pop(0)[2]
            keeps_fds = script.how in ("recv_message", "recv_batch")
            delivered.append((read.after, buf[pos + HEADER.size:pos + HEADER.size + length],
                              fds if keeps_fds else None))
            pos += HEADER.size + length
        buf = buf[pos:]
        base += pos
    raise AssertionError("unreachable: the loop ends at the last read")


# ---- the channel, over a real socketpair ---------------------------------------

def _identify(fds: List[int]) -> Tuple[int, ...]:
    """Pool indexes of received descriptors (closing them); each must be close-on-exec."""
    out = []
    for fd in fds:
        try:
            assert not os.get_inheritable(fd), "a received descriptor is inheritable"
            out.append(_INODES.get(os.fstat(fd).st_ino, -1))
        finally:
            os.close(fd)
    return tuple(out)


def _drain(ch: Channel, how: str, after: int, got: List[Delivery]) -> Optional[str]:
    """Receive until the channel waits (None) or ends ("eof", "error")."""
    while True:
        try:
            if how == "recv_message":
                m = ch.recv_message()
                got.append((after, m.data, _identify(list(m.fds))))
            elif how == "recv_batch":
                batch = ch.recv_batch()
                if not len(batch):
                    return "eof"
                for i in range(len(batch)):
                    got.append((after, bytes(batch[i]), _identify(batch.fds(i))))
            elif how == "recv_many":
                messages = ch.recv_many()
                if not messages:
                    return "eof"
                got.extend((after, m, None) for m in messages)
            else:
                got.append((after, ch.recv(), None))
        except EOFError:
            return "eof"
        except ProtocolError:
            assert ch.closed, "the channel is open after a ProtocolError"
            return "error"
        except BlockingIOError:
            return None


def _write(peer: socket.socket, w: Write) -> int:
    """One sendmsg by the peer; the bytes it took (-1: none, the socket is full)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
            array.array("i", [_POOL[i] for i in w.fds]).tobytes())] if w.fds else []
    try:
        return peer.sendmsg([w.data], anc)
    except BlockingIOError:
        return -1


def run(script: Script) -> Tuple[List[Delivery], str, List[Write]]:
    """Play `script` against a Channel: (what it delivered, how it ended, what the peer wrote)."""
    kind = socket.SOCK_SEQPACKET if script.seqpacket else socket.SOCK_STREAM
    peer, sock = socket.socketpair(socket.AF_UNIX, kind)
    peer.setblocking(False)
    sock.setblocking(False)
    ch = Channel(sock, max_frame=script.max_frame)
    got: List[Delivery] = []
    written: List[Write] = []
    end: Optional[str] = None
    try:
        for w in script.writes:
            sent = _write(peer, w)
            if sent < 0:
                break  # the peer stops where the socket is full
            written.append(Write(w.data[:sent], w.fds))
            if sent < len(w.data):
                break
            if script.interleaved:
                end = _drain(ch, script.how, len(written), got)
                if end is not None:
                    break
        if end is None:
            if script.closes:
                peer.close()
            end = _drain(ch, script.how, len(written), got) or "blocked"
    finally:
        peer.close()
        ch.close()
    return got, end, written


def one_input(data: bytes) -> None:
    """The fuzz target: play the input, compare with `expected`, check descriptors."""
    before = len(os.listdir("/proc/self/fd"))
    script = decode(data)
    got, end, written = run(script)
    want, want_end = expected(script, written)
    assert (got, end) == (want, want_end), "channel %r %s, a reading of the protocol %r %s" % (
        got[:8], end, want[:8], want_end)
    after = len(os.listdir("/proc/self/fd"))
    assert after == before, "descriptors leaked: %d open, %d before" % (after, before)


# ---- seeds ----------------------------------------------------------------------

def _setup(seqpacket: bool = False, interleaved: bool = False, closes: bool = True,
           how: str = "recv_message", max_frame: int = 64 << 20) -> bytes:
    return bytes([int(seqpacket) | int(interleaved) << 1 | int(closes) << 2
                  | HOW.index(how) << 3 | MAX_FRAMES.index(max_frame) << 5])


def _w(data: bytes, nfds: int = 0, framed: bool = False, long: int = 0, first: int = 0) -> bytes:
    ctl = nfds | int(framed) << 2 | (8 if long else 0) | (16 if long > 1 else 0) | first << 5
    return bytes([ctl]) + len(data).to_bytes(2, "little") + data


def _frame(payload: bytes, nfds: int = 0, flags: int = 0, version: int = 1, magic: int = 0xAF) -> bytes:
    return HEADER.pack(len(payload), nfds, flags, version, magic) + payload


SEEDS: Dict[str, bytes] = {
    "stream-frames-and-descriptors": _setup() + _w(b"hello", framed=True)
    + _w(b"two fds", 2, framed=True, first=1) + _w(b"", framed=True),
    "seqpacket-interleaved-batch": _setup(True, True, how="recv_batch")
    + _w(b"abc", 1, framed=True) + _w(_frame(b"split")[:5]) + _w(_frame(b"split")[5:]),
    "seqpacket-empty-record-between-frames": _setup(True) + _w(b"one", framed=True) + _w(b"")
    + _w(b"two", framed=True),
    "seqpacket-empty-record-live-peer": _setup(True, True, closes=False, how="recv")
    + _w(b"one", framed=True) + _w(b""),
    "seqpacket-empty-record-then-descriptors": _setup(True, how="recv_batch") + _w(b"")
    + _w(b"", 2),
    "seqpacket-long-records": _setup(True, how="recv_many") + _w(b"x", long=1) + _w(b"y", long=2),
    "stream-bad-header": _setup(how="recv_many") + _w(b"ok", framed=True)
    + _w(_frame(b"bad", version=2)),
    "stream-descriptors-on-a-later-byte": _setup(interleaved=True) + _w(_frame(b"0123456789", 1)[:4])
    + _w(_frame(b"0123456789", 1)[4:], 1),
    "stream-close-mid-frame": _setup(interleaved=True) + _w(_frame(b"cut short")[:11]),
    "stream-live-partial-header": _setup(closes=False, how="recv") + _w(b"x", framed=True)
    + _w(b"\x05\0\0"),
    "stream-over-max-frame": _setup(max_frame=16) + _w(b"s" * 16, framed=True)
    + _w(b"t" * 17, framed=True),
    "seqpacket-count-mismatch": _setup(True, how="recv_batch") + _w(_frame(b"m", 2), 1),
    "stream-stray-descriptors": _setup(how="recv_batch") + _w(_frame(b"plain"), 3, first=2)
    + _w(b"next", framed=True),
    "stream-glued-reads": _setup(max_frame=300) + _w(b"a" * 200, framed=True)
    + _w(b"b" * 100, 1, framed=True) + _w(b"c" * 50, framed=True) + _w(b"d", 3, framed=True, first=7),
}


def write_seeds(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(sys.argv[sys.argv.index("--write-seeds") + 1])
        return
    atheris.Setup(sys.argv, one_input)
    print("fuzzing Channel receive on the %s backend" % afunix.BACKEND, flush=True)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
