"""The benchmark matrix, as data: workload x message size x batch x implementation."""
from __future__ import annotations

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
    Row("dgram", size=1 * KIB, batch=32),
    Row("seqpacket", size=64, batch=32),
    Row("seqpacket", size=64, batch=256),
    Row("seqpacket", size=1 * KIB, batch=32),
    Row("stream", size=64 * KIB, batch=16),
    Row("fds", size=64, batch=32, nfds=1),
    Row("fds", size=64, batch=32, nfds=16),
    Row("asyncio", size=64, batch=256),
    Row("asyncio-sock", size=64, batch=256),
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
    "quick": Mode("quick", runs=3, target_seconds=0.08, warmup_count=1000),
    # For the tests: one short run, no warm-up, a fixed small count.
    "tiny": Mode("tiny", runs=1, target_seconds=0.0, warmup_count=0, fixed_count=200),
}

#: The least and most a calibrated run may send (a very fast or slow cell).
MIN_COUNT = 200
MAX_COUNT = 2_000_000

# The messaging section: afunix.Channel against what Python programs use for
# messaging today (rows and workloads in channel_workloads.py, which registers
# them with workloads.py).  Imported only when workloads.py is not half-way
# through its own import (it imports this module first), so that entry
# point goes without the section rather than failing.
if "afunix.bench.workloads" not in __import__("sys").modules:
    from .channel_workloads import ROWS as _MESSAGING_ROWS  # noqa: E402

    # after the throughput rows, ahead of the latency ones
    _at = next((i for i, r in enumerate(MATRIX) if r.workload == "pingpong"), len(MATRIX))
    MATRIX = MATRIX[:_at] + _MESSAGING_ROWS + MATRIX[_at:]
