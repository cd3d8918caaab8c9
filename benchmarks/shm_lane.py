"""Large messages to another process: a shared-memory region versus the socket itself.

A micro-measurement, not part of CI and not the product benchmark
(python -m afunix bench): it measures what the channel's shared-memory lane
will build on (afunix.shm), before the channel speaks it.  For each message
size, a sender moves the same bytes to a receiver process three ways:

  socket      sendall of each message over an AF_UNIX stream socketpair; the
              receiver recv_into's it into its own buffer (the careful stdlib
              loop: two copies, user to kernel to user)
  lane-view   the sender copies each message into a free slot of a sealed
              memfd region (RegionWriter.try_copy) and sends a 16-byte notice;
              the receiver claims the slot (a read-only view, nothing read)
              and returns it with a 16-byte frame: one copy
  lane-copy   as lane-view, and the receiver copies the slot into its own
              buffer, as the socket loop's receiver has the bytes in its own:
              two copies, no system call per byte

With --objects, two more rows move a bytes object of each size:

  pipe-object  multiprocessing.Pipe: conn.send(obj) / conn.recv() (pickle)
  lane-object  afunix.objects: pickle_object (the bytes out of band),
               place_parts into the region, the OBJECT payload (inline, 40
               bytes here) over the socket, then parse_envelope, claim,
               load_object (bytes(view): one copy out) and the slot returned

The region is passed once with socket.send_fds; waiting for a free slot is
a blocking read of the returns.  The region holds --slots messages: how far
the sender may run ahead of the receiver.  A small region keeps the slots
in the CPU caches (first fit reuses the slot just returned); a large one
lets the sender write ahead into cold memory, which at 1 MiB costs more
than the lane saves (compare --slots 2 and --slots 64).  Figures are GB/s (10^9 bytes/s) of payload,
best and median of the rounds, from one run; the machine is shared, so
compare the rows of one run rather than absolute values.

    python benchmarks/shm_lane.py [--sizes 1,16] [--total-mib 1024] [--rounds 5] [--slots 4] [--objects]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import time
from typing import Callable, Dict, List

from afunix import objects, shm
from afunix.slots import Slot

NOTICE = struct.Struct("<QQ")  # offset, length: the SLOT / RETURN pair of the draft protocol


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("peer closed")
        got += n


# ---- receivers (child process) ----------------------------------------------


def socket_receiver(sock: socket.socket, size: int, count: int) -> None:
    buf = bytearray(size)
    view = memoryview(buf)
    sock.sendall(b"r")  # ready: the clock starts
    for _ in range(count):
        _recv_exact(sock, view)
    sock.sendall(b"k")


def lane_receiver(sock: socket.socket, size: int, count: int, copy_out: bool) -> None:
    data, fds, _, _ = socket.recv_fds(sock, 8, 1)
    (region_size,) = struct.unpack("<Q", data)
    reader = shm.RegionReader(fds[0], region_size)
    own = memoryview(bytearray(size))
    sock.sendall(b"r")  # ready (region adopted and mapped): the clock starts
    pending = bytearray()
    done = 0
    while done < count:
        chunk = sock.recv(NOTICE.size * 64)
        if not chunk:
            raise EOFError("peer closed")
        pending += chunk
        whole = len(pending) - len(pending) % NOTICE.size
        returns = bytearray()
        for at in range(0, whole, NOTICE.size):
            offset, length = NOTICE.unpack_from(pending, at)
            view = reader.claim(offset, length)
            if copy_out:
                own[:length] = view
            reader.release(offset, length)
            returns += NOTICE.pack(offset, length)
            done += 1
        del pending[:whole]
        sock.sendall(returns)
    reader.close()
    sock.sendall(b"k")


def pipe_object_receiver(conn: "multiprocessing.connection.Connection", size: int, count: int) -> None:
    conn.send_bytes(b"r")
    for _ in range(count):
        obj = conn.recv()
        assert len(obj) == size
    conn.send_bytes(b"k")


def lane_object_receiver(sock: socket.socket, size: int, count: int) -> None:
    data, fds, _, _ = socket.recv_fds(sock, 8, 1)
    (region_size,) = struct.unpack("<Q", data)
    reader = shm.RegionReader(fds[0], region_size)
    sock.sendall(b"r")
    head = memoryview(bytearray(4))
    for _ in range(count):
        _recv_exact(sock, head)
        payload = memoryview(bytearray(int.from_bytes(head, "little")))
        _recv_exact(sock, payload)
        envelope = objects.parse_envelope(payload)
        parts = [bytes(reader.claim(*p)) if isinstance(p, Slot) else p for p in envelope.parts]
        obj = objects.load_object(parts[0], parts[1:])
        assert len(obj) == size
        returns = bytearray()
        for p in envelope.parts:
            if isinstance(p, Slot):
                reader.release(*p)
                returns += NOTICE.pack(*p)
        sock.sendall(returns)
    reader.close()
    sock.sendall(b"k")


# ---- senders (this process) -------------------------------------------------


def socket_sender(sock: socket.socket, payload: bytes, count: int) -> float:
    assert sock.recv(1) == b"r"
    start = time.perf_counter()
    for _ in range(count):
        sock.sendall(payload)
    assert sock.recv(1) == b"k"
    return time.perf_counter() - start


def lane_sender(sock: socket.socket, payload: bytes, count: int, writer: shm.RegionWriter) -> float:
    socket.send_fds(sock, [struct.pack("<Q", writer.size)], [writer.fileno()])
    assert sock.recv(1) == b"r"
    start = time.perf_counter()
    returns = bytearray()
    for _ in range(count):
        slot = writer.try_copy(payload)
        while slot is None:  # no room: wait for the receiver's returns
            chunk = sock.recv(NOTICE.size * 64)
            if not chunk:
                raise EOFError("peer closed")
            returns += chunk
            whole = len(returns) - len(returns) % NOTICE.size
            for at in range(0, whole, NOTICE.size):
                writer.give_back(*NOTICE.unpack_from(returns, at))
            del returns[:whole]
            slot = writer.try_copy(payload)
        writer.sending(*slot)  # the peer may return it from now on
        sock.sendall(NOTICE.pack(slot.offset, slot.length))
    # drain the remaining returns, then the end mark
    tail = bytes(returns)
    while not tail.endswith(b"k"):
        tail += sock.recv(65536)
    return time.perf_counter() - start


def pipe_object_sender(conn: "multiprocessing.connection.Connection", obj: bytes, count: int) -> float:
    assert conn.recv_bytes() == b"r"
    start = time.perf_counter()
    for _ in range(count):
        conn.send(obj)
    assert conn.recv_bytes() == b"k"
    return time.perf_counter() - start


def lane_object_sender(sock: socket.socket, obj: bytes, count: int, writer: shm.RegionWriter) -> float:
    socket.send_fds(sock, [struct.pack("<Q", writer.size)], [writer.fileno()])
    assert sock.recv(1) == b"r"
    start = time.perf_counter()
    returns = bytearray()

    def take_returns() -> None:
        chunk = sock.recv(NOTICE.size * 64)
        if not chunk:
            raise EOFError("peer closed")
        returns.extend(chunk)
        whole = len(returns) - len(returns) % NOTICE.size
        for at in range(0, whole, NOTICE.size):
            writer.give_back(*NOTICE.unpack_from(returns, at))
        del returns[:whole]

    for _ in range(count):
        with objects.pickle_object(obj) as pickled:
            while writer.allocator.largest_free < len(obj):  # wait for room, as the channel will
                take_returns()
            placed = objects.place_parts(pickled, writer)
            for slot in placed:
                if slot is not None:
                    writer.sending(*slot)
            parts = objects.encode_object(pickled, placed)
            length = sum(memoryview(part).nbytes for part in parts)
            sock.sendmsg([length.to_bytes(4, "little"), *parts])
    while writer.allocator.slots_in_use:
        take_returns()
    tail = bytes(returns)  # the end mark may have come with the last returns
    while not tail.endswith(b"k"):
        tail += sock.recv(65536)
    return time.perf_counter() - start


def run_object_once(kind: str, size: int, count: int, obj: bytes, region_size: int) -> float:
    ctx = multiprocessing.get_context("fork")
    if kind == "pipe-object":
        left, right = ctx.Pipe()
        child = ctx.Process(target=pipe_object_receiver, args=(right, size, count))
        child.start()
        right.close()
        try:
            elapsed = pipe_object_sender(left, obj, count)
        finally:
            left.close()
            child.join(60)
    else:
        a, b = socket.socketpair()
        writer = shm.RegionWriter(region_size)
        child = ctx.Process(target=lane_object_receiver, args=(b, size, count))
        child.start()
        b.close()
        try:
            elapsed = lane_object_sender(a, obj, count, writer)
        finally:
            a.close()
            child.join(60)
            writer.close()
    if child.exitcode != 0:
        raise RuntimeError("%s receiver failed with exit code %s" % (kind, child.exitcode))
    return size * count / elapsed / 1e9


def run_once(kind: str, size: int, count: int, payload: bytes, region_size: int) -> float:
    a, b = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    if kind == "socket":
        child = ctx.Process(target=socket_receiver, args=(b, size, count))
    else:
        child = ctx.Process(target=lane_receiver, args=(b, size, count, kind == "lane-copy"))
    writer = shm.RegionWriter(region_size) if kind != "socket" else None
    child.start()
    b.close()
    try:
        if writer is None:
            elapsed = socket_sender(a, payload, count)
        else:
            elapsed = lane_sender(a, payload, count, writer)
    finally:
        a.close()
        child.join(60)
        if writer is not None:
            writer.close()
    if child.exitcode != 0:
        raise RuntimeError("%s receiver failed with exit code %s" % (kind, child.exitcode))
    return size * count / elapsed / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16", help="message sizes in MiB, comma-separated")
    p.add_argument("--total-mib", type=int, default=1024, help="payload moved per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--objects", action="store_true",
                   help="also move bytes objects: multiprocessing.Pipe against afunix.objects")
    p.add_argument("--slots", type=int, default=4,
                   help="region size in messages: how far the sender may run ahead")
    args = p.parse_args()
    reason = shm.unsupported_reason()
    if reason is not None:
        print("shared-memory regions unavailable: %s" % reason, file=sys.stderr)
        return 1
    kinds = ["socket", "lane-view", "lane-copy"]
    if args.objects:
        kinds += ["pipe-object", "lane-object"]
    print("python %s, %d CPUs, %s" % (sys.version.split()[0], os.cpu_count() or 0, os.uname().release))
    print("%-8s %-10s %8s %8s   (GB/s, %d rounds of %d MiB)"
          % ("size", "way", "best", "median", args.rounds, args.total_mib))
    for mib in (int(s) for s in args.sizes.split(",")):
        size = mib << 20
        count = max(1, (args.total_mib << 20) // size)
        payload = os.urandom(size)
        region_size = args.slots * size
        results: Dict[str, List[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits every way
            for kind in kinds:
                run = run_object_once if kind.endswith("-object") else run_once
                results[kind].append(run(kind, size, count, payload, region_size))
        base = statistics.median(results["socket"])
        for kind in kinds:
            r = results[kind]
            print("%-8s %-10s %8.2f %8.2f   x%.2f of socket (medians)"
                  % ("%d MiB" % mib, kind, max(r), statistics.median(r), statistics.median(r) / base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
