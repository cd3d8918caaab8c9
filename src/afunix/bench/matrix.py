"""The benchmark matrix, as data: workload x message size x batch, and how long to measure.

Each `Row` is one workload (its four columns are declared with the workload,
in workloads.py and the modules it imports) at one message size, descriptor
count and batch.  Adding a row is adding a line to MATRIX; adding a
workload is writing its sides and adding its entry to registry.TABLE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: The columns of every row, in table order.  "base" is what Python programs
#: use today for the row's job (each workload names it); the afunix columns
#: are afunix on each backend; "c" is the same operation in plain C, or empty.
IMPLEMENTATIONS = ("base", "afunix-stdlib", "afunix-c", "c")

#: How the table names each column (10 characters at most).
LABELS = {
    "base": "base",
    "afunix-stdlib": "af[stdlib]",
    "afunix-c": "af[c]",
    "c": "C",
}

#: Where sender and receiver run; "-" is for single-process workloads.
PLACEMENTS = ("two-cpus", "one-cpu")

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Row:
    """One workload at one message size, descriptor count and batch."""

    workload: str  # a key of workloads.WORKLOADS
    size: int  # bytes per message (per write, for STREAM)
    batch: int  # messages per call where the implementation batches
    nfds: int = 0  # descriptors per message
    quick: bool = True  # part of --quick (False: the default run only)
    #: the af/base ratio this row is meant to reach (0: none); the table says if it did
    goal: float = 0.0

    @property
    def key(self) -> str:
        """A short stable name, for --json, --compare and the tests."""
        parts = [self.workload, "%dB" % self.size, "x%d" % self.batch]
        if self.nfds:
            parts.append("%dfd" % self.nfds)
        return "-".join(parts)


MATRIX: tuple[Row, ...] = (
    Row("socketpairs", size=0, batch=100),
    # batched datagrams: send_many + RecvBatch against a send/recv loop
    Row("dgram", size=64, batch=32),
    Row("dgram", size=64, batch=256, quick=False),
    Row("dgram", size=1 * KIB, batch=32, quick=False),
    Row("seqpacket", size=64, batch=32),
    Row("seqpacket", size=64, batch=256, quick=False),
    Row("seqpacket", size=1 * KIB, batch=32, quick=False),
    Row("stream", size=64 * KIB, batch=16, quick=False),
    # the plain C stream program the asyncio rows were once compared with
    Row("stream", size=64, batch=256, quick=False),
    Row("fds", size=64, batch=32, nfds=1),
    Row("fds", size=64, batch=32, nfds=16, quick=False),
    # one message per call: the everyday calls against their stdlib twins
    Row("single-send", size=64, batch=1),
    Row("single-recv", size=64, batch=1),
    Row("single-recv-many", size=64, batch=1, quick=False),
    Row("single-fds", size=64, batch=1, nfds=1),
    Row("call-overhead", size=64, batch=1),
    Row("call-overhead-recv", size=64, batch=1, quick=False),
    Row("pingpong", size=64, batch=1),
    Row("asyncio", size=64, batch=256, quick=False),
    Row("asyncio-sock", size=64, batch=256, quick=False),
    Row("aio-single-send", size=64, batch=1, quick=False),
    Row("aio-single-recv", size=64, batch=1, quick=False),
    # the messaging section: afunix.Channel against what Python programs use
    # for messaging today (channel_workloads.py, peers.py)
    Row("chan-batched", size=64, batch=256),
    Row("chan-batched", size=1 * KIB, batch=256, quick=False),
    Row("chan-zerocopy", size=64, batch=1024, quick=False),
    Row("chan-single", size=64, batch=1, quick=False),
    Row("chan-vs-zmq", size=64, batch=256),
    Row("chan-vs-zmq", size=1 * KIB, batch=256, quick=False),
    Row("chan-vs-nng", size=64, batch=256, quick=False),
    Row("chan-vs-pipe", size=64, batch=256, quick=False),
    Row("chan-vs-queue", size=64, batch=256, quick=False),
    Row("c-framing", size=64, batch=256, quick=False),
    # large messages, one per call: inline in the channel's stream
    Row("large-stream", size=64 * KIB, batch=1, quick=False),
    Row("large-stream", size=1 * MIB, batch=1, quick=False),
    Row("large-stream", size=16 * MIB, batch=1, quick=False),
    Row("large-vs-pipe", size=16 * MIB, batch=1, quick=False),
    # through the shared-memory lane: copied into a slot, or filled in place (a loan)
    Row("lane-stream", size=64 * KIB, batch=1, quick=False),
    Row("lane-stream", size=1 * MIB, batch=1, goal=1.5),
    Row("lane-stream", size=16 * MIB, batch=1, quick=False, goal=1.5),
    Row("loan-stream", size=64 * KIB, batch=1, quick=False),
    Row("loan-stream", size=1 * MIB, batch=1, quick=False, goal=5.0),
    Row("loan-stream", size=16 * MIB, batch=1, quick=False, goal=5.0),
    Row("loan-view", size=64 * KIB, batch=1, quick=False),
    Row("loan-view", size=1 * MIB, batch=1, quick=False, goal=5.0),
    Row("loan-view", size=16 * MIB, batch=1, quick=False, goal=5.0),
    Row("lane-vs-pipe", size=64 * KIB, batch=1, quick=False),
    Row("lane-vs-pipe", size=1 * MIB, batch=1, quick=False),
    Row("lane-vs-pipe", size=16 * MIB, batch=1, quick=False),
    Row("lane-vs-zmq", size=64 * KIB, batch=1, quick=False),
    Row("lane-vs-zmq", size=1 * MIB, batch=1, quick=False),
    Row("lane-vs-zmq", size=16 * MIB, batch=1, quick=False),
    # Python objects holding a large buffer: send_object / recv_object
    Row("obj-vs-pipe", size=16 * MIB, batch=1, quick=False, goal=5.0),
    Row("obj-vs-queue", size=16 * MIB, batch=1, quick=False),
    Row("objnp-vs-pipe", size=16 * MIB, batch=1, quick=False),
    Row("objnp-vs-queue", size=16 * MIB, batch=1, quick=False),
)


@dataclass(frozen=True)
class Mode:
    """How long to measure: runs per cell, run length, and what counts as noisy."""

    name: str
    runs: int  # measured runs per cell, interleaved with the row's other cells
    target_seconds: float  # a run's length the calibration run sizes the count to
    warmup_count: int  # messages (or pairs, or round trips) in the calibration run
    fixed_count: int = 0  # when set: no calibration, every run uses this count
    noise_limit: float = 0.15  # a row whose cells spread more than this is re-run
    reruns: int = 2  # re-runs of a noisy row before it is marked noisy
    #: re-runs start only while the whole run has used less than this (seconds)
    rerun_budget: Optional[float] = None


MODES = {
    "default": Mode("default", runs=5, target_seconds=0.2, warmup_count=4000),
    # the README's first command: short, so re-runs share a time budget
    "quick": Mode("quick", runs=3, target_seconds=0.04, warmup_count=1000, rerun_budget=25.0),
    # For the tests: one short run, no calibration, a fixed small count, no re-run.
    "tiny": Mode("tiny", runs=1, target_seconds=0.0, warmup_count=0, fixed_count=200, reruns=0),
}

#: The least and most a calibrated run may move (a very fast or slow cell).
MIN_COUNT = 200
MAX_COUNT = 2_000_000
#: Large messages: at least this few, and no more bytes than this per warm-up.
MIN_LARGE_COUNT = 8
WARMUP_BYTES = 64 * MIB


def min_count(row: Row) -> int:
    """The least count of a calibrated run of `row`: fewer for large messages."""
    if row.size * MIN_COUNT > WARMUP_BYTES:
        return max(MIN_LARGE_COUNT, WARMUP_BYTES // (4 * row.size))
    return MIN_COUNT


def _bytes_capped(row: Row, count: int) -> int:
    if row.size and row.size * count > WARMUP_BYTES:
        return max(MIN_LARGE_COUNT, WARMUP_BYTES // row.size)
    return count


def warmup_count(row: Row, mode: Mode) -> int:
    """How many messages the calibration run of `row` moves."""
    return _bytes_capped(row, mode.warmup_count)


def fixed_count(row: Row, mode: Mode) -> int:
    """The count of every run of `row` in a mode without calibration (0: calibrate)."""
    return _bytes_capped(row, mode.fixed_count) if mode.fixed_count else 0
