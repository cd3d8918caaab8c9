"""The benchmark matrix, as data: workload x message size x batch x implementation."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

#: The implementations compared in every row, in table order.
IMPLEMENTATIONS = ("stdlib", "afunix-stdlib", "afunix-c", "c")

#: How the table and the JSON name each implementation.
LABELS = {
    "stdlib": "stdlib loop",
    "afunix-stdlib": "afunix[stdlib]",
    "afunix-c": "afunix[c]",
    "c": "C reference",
}

#: Where sender and receiver run; "none" is for single-process workloads.
PLACEMENTS = ("two-cpus", "one-cpu")

KIB = 1024


@dataclass(frozen=True)
class Row:
    """One workload at one message size, descriptor count and batch."""

    workload: str  # a key of workloads.WORKLOADS
    size: int  # bytes per message (per write, for STREAM)
    batch: int  # messages per call where the implementation batches
    nfds: int = 0  # descriptors per message
    quick: bool = True  # part of --quick (False: the default run only)

    @property
    def key(self) -> str:
        """A short stable name, for --json and the tests."""
        parts = [self.workload, "%dB" % self.size, "x%d" % self.batch]
        if self.nfds:
            parts.append("%dfd" % self.nfds)
        return "-".join(parts)


MATRIX: tuple[Row, ...] = (
    Row("socketpairs", size=0, batch=100),
    Row("dgram", size=64, batch=32),
    # the same with bigger batches: where the fixed cost of a call fades
    Row("dgram", size=64, batch=256),
    Row("dgram", size=1 * KIB, batch=32, quick=False),
    Row("seqpacket", size=64, batch=32),
    Row("seqpacket", size=64, batch=256, quick=False),
    Row("seqpacket", size=1 * KIB, batch=32, quick=False),
    Row("stream", size=64 * KIB, batch=16),
    Row("fds", size=64, batch=32, nfds=1),
    Row("fds", size=64, batch=32, nfds=16),
    Row("asyncio", size=64, batch=256),
    Row("asyncio-sock", size=64, batch=256),
    # the messaging section: afunix.Channel against what Python programs use
    # for messaging today (workloads in channel_workloads.py)
    Row("chan-batched", size=64, batch=256),
    Row("chan-batched", size=1 * KIB, batch=256, quick=False),
    Row("chan-zerocopy", size=64, batch=1024),
    Row("chan-single", size=64, batch=1, quick=False),
    # pyzmq comes with the `bench` extra; without it these rows are left out
    *((Row("chan-vs-zmq", size=64, batch=256),
       Row("chan-vs-zmq", size=1 * KIB, batch=256, quick=False))
      if importlib.util.find_spec("zmq") is not None else ()),
    Row("chan-vs-pipe", size=64, batch=256, quick=False),
    Row("pingpong", size=64, batch=1),
)


@dataclass(frozen=True)
class Mode:
    """How long to measure: runs per cell and the time one run aims for."""

    name: str
    runs: int  # measured runs per cell, after one warm-up run
    target_seconds: float  # a run's length the warm-up calibrates the count to
    warmup_count: int  # messages (or pairs, or round trips) in the warm-up run
    fixed_count: int = 0  # when set: no calibration, every run uses this count


MODES = {
    "default": Mode("default", runs=5, target_seconds=0.25, warmup_count=4000),
    "quick": Mode("quick", runs=3, target_seconds=0.06, warmup_count=1000),
    # For the tests: one short run, no warm-up, a fixed small count.
    "tiny": Mode("tiny", runs=1, target_seconds=0.0, warmup_count=0, fixed_count=200),
}

#: The least and most a calibrated run may send (a very fast or slow cell).
MIN_COUNT = 200
MAX_COUNT = 2_000_000

