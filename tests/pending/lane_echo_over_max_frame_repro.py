"""Reproducer (outside the suite): an echo through both lanes of messages over max_frame hangs.

A parent process sends 300 messages of random sizes up to 200 KiB with
max_frame 64 KiB (those over it can only travel in slots) while a thread
receives the echo; the peer process receives one message and sends it
back, on one thread.  Some seeds end with both waiting for slots: the
peer's receive buffer is full (a message it has not taken, and the head of
an inline frame up to its end), so `read_for_room` stops reading, and the
RETURN frames that would give its slots back wait behind that frame; the
parent waits for the slots the peer's unread messages hold.  Seen: stdlib
backend, SOCK_STREAM, seed 2 (state when stuck: the peer's buffer end =
its size, 262144; one message buffered; the parent 11 slots in flight).

Usage: AFUNIX_BACKEND=stdlib python tests/pending/lane_echo_over_max_frame_repro.py stream 2
(exits 1 with "stuck" after the 10 s timeout).
"""
import os
import random
import socket
import subprocess
import sys
import threading
import time

import afunix
from afunix import Channel

KiB = 1 << 10
ECHO = """
import socket
from afunix import Channel
SOCK = socket.socket(fileno=FD)
SOCK.settimeout(15)
ch = Channel(SOCK, shm_size=512 << 10, shm_threshold=8 << 10, max_frame=64 << 10)
with ch:
    while True:
        m = ch.recv()
        if m == b"stop":
            break
        ch.send(m)
"""


def main() -> int:
    kind = socket.SOCK_STREAM if sys.argv[1] == "stream" else socket.SOCK_SEQPACKET
    rnd = random.Random(int(sys.argv[2]))
    x, y = afunix.socketpair(kind)
    child = subprocess.Popen([sys.executable, "-c", ECHO.replace("FD", str(y.fileno()))],
                             pass_fds=(y.fileno(),), stderr=subprocess.DEVNULL)
    y.close()
    a = Channel(x, shm_size=1 << 20, shm_threshold=8 * KiB, max_frame=64 * KiB)
    x.settimeout(10)
    msgs = [os.urandom(16) * (rnd.randrange(1, 200 * KiB) // 16 + 1) for _ in range(300)]
    got, errors = [], []

    def read() -> None:
        try:
            while len(got) < len(msgs):
                got.append(a.recv())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    start = time.monotonic()
    try:
        for m in msgs:
            a.send(m)
        t.join(30)
        a.send(b"stop")
    except TimeoutError:
        print("stuck: %d of %d echoed, %d slots in flight" % (len(got), len(msgs),
                                                               a._lane.in_flight))
        return 1
    finally:
        a.close()
        t.join(15)
        child.wait(30)
    assert not errors and got == msgs, errors
    print("ok %.2f s" % (time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
