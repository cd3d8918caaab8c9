"""Soak: multi-process traffic with descriptor passing; RSS and descriptors must stay flat.

Several sender processes push batches over one SOCK_SEQPACKET socket each,
every message numbered, checksummed and carrying descriptors; the receiver
checks every message (order per sender, content, the descriptors name the
files sent) and closes what it got.  Every few seconds it prints messages
moved, its RSS and its open descriptors.  Not part of CI.

    python benchmarks/soak.py --seconds 60 --senders 4 [--backend c|stdlib]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import time
import zlib


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listing them


def message(sender: int, seq: int) -> bytes:
    body = b"%d:%d:" % (sender, seq) + bytes([seq % 251]) * (seq % 512)
    return body + zlib.crc32(body).to_bytes(4, "big")


def sender_main(backend: str, k: int, sock: socket.socket, deadline: float, nfds: int) -> None:
    os.environ["AFUNIX_BACKEND"] = backend
    import afunix

    files = [open(os.devnull, "rb") for _ in range(nfds)]
    fds = tuple(f.fileno() for f in files)
    seq = 0
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        batch = [afunix.Message(message(k, seq + i), fds=fds if (seq + i) % 3 == 0 else ())
                 for i in range(64)]
        try:
            seq += afunix.send_many(sock, batch)
        except socket.timeout:
            continue
    sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--fds", type=int, default=3, help="descriptors on every third message")
    p.add_argument("--every", type=float, default=5.0, help="seconds between table rows")
    p.add_argument("--backend", choices=["c", "stdlib"], default=None)
    args = p.parse_args()
    if args.backend:
        os.environ["AFUNIX_BACKEND"] = args.backend
    import afunix

    backend = afunix.BACKEND
    devnull_ino = os.stat(os.devnull).st_ino
    deadline = time.monotonic() + args.seconds
    ctx = multiprocessing.get_context("fork")
    receivers, procs = [], []
    for k in range(args.senders):
        a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
        proc = ctx.Process(target=sender_main, args=(backend, k, a, deadline, args.fds))
        proc.start()
        a.close()
        b.setblocking(False)
        receivers.append(b)
        procs.append(proc)

    next_seq = [0] * args.senders
    moved = fds_checked = 0
    batch = afunix.RecvBatch(256, 1024, maxfds=args.fds)
    start = time.monotonic()
    next_row = start
    print("backend %s, %d senders, %.0f s, %d descriptors on every third message"
          % (backend, args.senders, args.seconds, args.fds))
    print("%8s %12s %12s %10s %8s" % ("seconds", "messages", "msgs/s", "RSS KiB", "fds"))
    rows = []
    open_senders = set(range(args.senders))
    import select
    poller = select.poll()
    for b in receivers:
        poller.register(b, select.POLLIN)
    by_fd = {b.fileno(): k for k, b in enumerate(receivers)}
    while open_senders:
        for fd, _ in poller.poll(200):
            k = by_fd[fd]
            sock = receivers[k]
            try:
                count = batch.recv(sock)
            except BlockingIOError:
                continue
            if count == 0:  # this sender is done and hung up
                poller.unregister(sock)
                open_senders.discard(k)
                continue
            for i in range(count):
                data = bytes(batch[i])
                body, crc = data[:-4], data[-4:]
                want = message(k, next_seq[k])
                if data != want or zlib.crc32(body).to_bytes(4, "big") != crc:
                    print("FAILED: sender %d message %d is wrong" % (k, next_seq[k]))
                    return 1
                got_fds = batch.fds(i)
                expected = args.fds if next_seq[k] % 3 == 0 else 0
                if len(got_fds) != expected or batch.flags(i) & socket.MSG_CTRUNC:
                    print("FAILED: sender %d message %d: %d descriptors, not %d"
                          % (k, next_seq[k], len(got_fds), expected))
                    return 1
                for fd in got_fds:
                    if os.fstat(fd).st_ino != devnull_ino:
                        print("FAILED: a descriptor names the wrong file")
                        return 1
                    os.close(fd)
                fds_checked += len(got_fds)
                next_seq[k] += 1
            moved += count
        now = time.monotonic()
        if now >= next_row:
            row = (now - start, moved, moved / max(now - start, 1e-9), rss_kib(), open_fd_count())
            rows.append(row)
            print("%8.1f %12d %12.0f %10d %8d" % row, flush=True)
            next_row += args.every
    for proc in procs:
        proc.join()
    for b in receivers:
        b.close()
    elapsed = time.monotonic() - start
    print("%8.1f %12d %12.0f %10d %8d" % (elapsed, moved, moved / elapsed, rss_kib(), open_fd_count()))
    print("moved %d messages and %d descriptors in %.1f s; every one checked"
          % (moved, fds_checked, elapsed))
    steady = rows[len(rows) // 3:] or rows
    rss_growth = max(r[3] for r in steady) - min(r[3] for r in steady)
    fd_growth = max(r[4] for r in steady) - min(r[4] for r in steady)
    print("after warm-up: RSS varied by %d KiB, open descriptors by %d" % (rss_growth, fd_growth))
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        print("FAILED: senders exited with %s" % bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
