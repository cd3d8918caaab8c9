"""A plain pyzmq ipc PUSH/PULL throughput loop, independent of afunix and of its benchmark.

The yardstick for the CHAN/pyzmq rows of ``python -m afunix bench``: their
pyzmq column should land near what this loop measures on the same machine
in the same session.  Nothing here comes from afunix: two processes
(multiprocessing, fork), PULL binds, PUSH connects, one hello to make sure
the connection is up, then the sender sends the same bytes object `count`
times with ``send`` (copy=True) and the receiver ``recv``s them; the figure
is count / (receiver's last recv - sender's first send), one clock.

    python benchmarks/zmq_pushpull.py [--size 64] [--count 300000] [--runs 5]
        [--placement two-cpus one-cpu] [--hwm 1000]

Each process is pinned before its context exists, so pyzmq's I/O thread
shares its process's CPU (two-cpus: sender on the first allowed CPU,
receiver on the second; one-cpu: both on the first; none: no pinning).
--hwm sets SNDHWM and RCVHWM (libzmq's default is 1000).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import zmq


def _pin(cpu: Optional[int]) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def puller(address: str, count: int, hwm: int, cpu: Optional[int], events: Any) -> None:
    _pin(cpu)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = hwm
    pull.bind(address)
    events.put("bound")
    pull.recv()  # the hello
    events.put("connected")
    recv = pull.recv
    for _ in range(count):
        recv()
    events.put(time.monotonic())
    pull.close()
    ctx.term()


def pusher(address: str, count: int, size: int, hwm: int, cpu: Optional[int],
           events: Any) -> float:
    _pin(cpu)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = hwm
    push.connect(address)
    push.send(b"hello")
    if events.get(timeout=30) != "connected":
        raise RuntimeError("no hello")
    message = b"x" * size
    send = push.send
    t0 = time.monotonic()
    for _ in range(count):
        send(message)
    push.close(linger=-1)
    ctx.term()
    return t0


def one_run(size: int, count: int, hwm: int, cpus: tuple[Optional[int], Optional[int]]) -> float:
    ctx = multiprocessing.get_context("fork")
    events = ctx.Queue()
    with tempfile.TemporaryDirectory() as where:
        address = "ipc://%s/pushpull" % where
        proc = ctx.Process(target=puller, args=(address, count, hwm, cpus[1], events))
        proc.start()
        if events.get(timeout=30) != "bound":
            raise RuntimeError("the receiver did not bind")
        t0 = pusher(address, count, size, hwm, cpus[0], events)
        t1 = events.get(timeout=120)
        proc.join()
    return count / (t1 - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--count", type=int, default=300_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--hwm", type=int, default=1000)
    p.add_argument("--placement", nargs="+", default=["two-cpus", "one-cpu"],
                   choices=["two-cpus", "one-cpu", "none"])
    args = p.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    print("pyzmq %s, libzmq %s, Python %s; %d B messages, %d per run, SNDHWM=RCVHWM=%d"
          % (zmq.__version__, zmq.zmq_version(), sys.version.split()[0], args.size, args.count,
             args.hwm))
    print("load average at start: %.2f %.2f %.2f" % os.getloadavg())
    for placement in args.placement:
        if placement == "two-cpus" and len(allowed) < 2:
            print("%-9s needs two CPUs" % placement)
            continue
        cpus = {"two-cpus": (allowed[0], allowed[1]), "one-cpu": (allowed[0], allowed[0]),
                "none": (None, None)}[placement]
        rates = [one_run(args.size, args.count, args.hwm, cpus) for _ in range(args.runs)]
        med = statistics.median(rates)
        print("%-9s median %9.0f msg/s  (min %.0f, max %.0f, spread %.0f%%)" % (
            placement, med, min(rates), max(rates), 100 * (max(rates) - min(rates)) / med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
