"""Runs one cell of the matrix: sender and receiver in two pinned processes, verified.

The socketpair is made before the fork; each child pins itself, says it is
ready, waits for the go, runs its side and sends back a pickled `Received`
(or the error) through a pipe.  The parent never switches backends itself:
each child selects the one its implementation names.
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .affinity import pin
from .matrix import MAX_COUNT, MIN_COUNT, Mode, Row
from .workloads import RECEIVERS, SENDERS, WORKLOADS, Received, expected

#: A run that has not finished by then is killed and reported as FAILED.
RUN_TIMEOUT = 60.0


class RunFailed(Exception):
    """A run did not complete, or its receiver did not get what was sent."""


@dataclass(frozen=True)
class Placement:
    """The CPUs the sender and the receiver are pinned to."""

    name: str
    sender_cpu: int
    receiver_cpu: int

    def describe(self) -> str:
        """One line for the table header."""
        if self.sender_cpu == self.receiver_cpu:
            return "%s: sender and receiver both on CPU %d" % (self.name, self.sender_cpu)
        return "%s: sender on CPU %d, receiver on CPU %d" % (
            self.name, self.sender_cpu, self.receiver_cpu)


def allowed_cpus() -> List[int]:
    """The CPUs this process may run on (all of them where affinity is Linux-only)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def placements(names: Tuple[str, ...]) -> List[Placement]:
    """The placements asked for that this machine can honour."""
    cpus = allowed_cpus()
    made = []
    for name in names:
        if name == "two-cpus" and len(cpus) >= 2:
            made.append(Placement(name, cpus[0], cpus[1]))
        elif name == "one-cpu":
            made.append(Placement(name, cpus[0], cpus[0]))
    return made


@dataclass
class RunResult:
    """One verified run: how long it took and what it moved."""

    count: int
    elapsed: float
    samples: List[int] = field(default_factory=list)


# ---- the two children -----------------------------------------------------------

def _child(side: Callable[..., Received], sock: Optional[socket.socket], count: int,
           row: Row, backend: Optional[str], cpu: int, ready_w: int, go_r: int,
           result_w: int) -> None:
    # Ctrl-C in the terminal reaches the children too: let it end them at
    # once instead of raising inside a half-sent batch.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        pin(cpu)
        if backend is not None:
            from .. import _backend
            _backend.use(backend)
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        t0 = time.perf_counter()
        got = side(sock, count, row)
        t1 = time.perf_counter()
        payload: object = ("ok", got, t0, t1)
    except BaseException as exc:  # reported, never raised across the fork
        payload = ("error", "%s: %s" % (type(exc).__name__, exc), 0.0, 0.0)
    try:
        os.write(result_w, pickle.dumps(payload))
    finally:
        os._exit(0)


def _spawn(target: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            target()
        finally:
            os._exit(1)
    return pid


def _read_results(fds: Dict[int, bytearray], deadline: float) -> None:
    open_fds = list(fds)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunFailed("timed out after %.0f s" % RUN_TIMEOUT)
        readable, _, _ = select.select(open_fds, [], [], left)
        for fd in readable:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                fds[fd] += chunk
            else:
                open_fds.remove(fd)


def _wait_ready(fd: int, n: int, deadline: float) -> None:
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RunFailed("a process did not start")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise RunFailed("a process ended before it started")
        got += len(chunk)


def _backend_of(impl: str) -> Optional[str]:
    return impl.split("-", 1)[1] if impl.startswith("afunix-") else None


def run_once(row: Row, impl: str, placement: Placement, count: int) -> RunResult:
    """Run `count` messages of `row` with `impl` once; RunFailed unless verified."""
    workload = WORKLOADS[row.workload]
    key = (workload.kind, impl)
    backend = _backend_of(impl)
    a: Optional[socket.socket] = None
    b: Optional[socket.socket] = None
    sides: List[Tuple[Callable[..., Received], Optional[socket.socket], int]]
    if workload.two_process:
        a, b = socket.socketpair(socket.AF_UNIX, workload.sock_type)
        sides = [(SENDERS[key], a, placement.sender_cpu),
                 (RECEIVERS[key], b, placement.receiver_cpu)]
    else:
        sides = [(SENDERS[key], None, placement.sender_cpu)]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: List[int] = []
    results: Dict[int, bytearray] = {}
    pipes: List[int] = []
    try:
        for side, sock, cpu in sides:
            result_r, result_w = os.pipe()

            def target(side: Callable[..., Received] = side, sock: Optional[socket.socket] = sock,
                       cpu: int = cpu, result_w: int = result_w) -> None:
                # Each child keeps only its own end: the peer's end closed,
                # so a dead peer reads as end-of-stream, not a hang.
                for other in (a, b):
                    if other is not None and other is not sock:
                        other.close()
                _child(side, sock, count, row, backend, cpu, ready_w, go_r, result_w)

            pids.append(_spawn(target))
            os.close(result_w)
            pipes.append(result_r)
            results[result_r] = bytearray()
        for s in (a, b):
            if s is not None:
                s.close()
        deadline = time.monotonic() + RUN_TIMEOUT
        _wait_ready(ready_r, len(sides), deadline)
        os.write(go_w, b"g" * len(sides))
        _read_results(results, deadline)
    finally:
        for pid in pids:
            _reap(pid)
        for fd in (ready_r, ready_w, go_r, go_w, *pipes):
            os.close(fd)
        for s in (a, b):
            if s is not None:
                s.close()
    outcomes = [pickle.loads(bytes(results[fd])) if results[fd] else
                ("error", "process died", 0.0, 0.0) for fd in pipes]
    return _verify(row, count, outcomes)


def _reap(pid: int) -> None:
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        # Still running after the deadline (or an error in the parent): the
        # run is void; end this child we started.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _verify(row: Row, count: int, outcomes: List[Tuple[str, object, float, float]]) -> RunResult:
    errors = [str(got) for status, got, _, _ in outcomes if status != "ok"]
    if errors:
        raise RunFailed("; ".join(errors))
    sent = outcomes[0][1]
    assert isinstance(sent, Received)
    want = expected(row, count)
    if sent.count != count:
        raise RunFailed("sender reports %d of %d" % (sent.count, count))
    if len(outcomes) == 1:
        if sent.elapsed is None:
            raise RunFailed("no time reported")
        return RunResult(count, sent.elapsed)
    got = outcomes[1][1]
    assert isinstance(got, Received)
    if WORKLOADS[row.workload].kind == "pingpong":
        # The pinging side checks every echo; the echo side must have seen all.
        checked, t0, t1 = sent, outcomes[0][2], outcomes[0][3]
        if got.count != count:
            raise RunFailed("echo side saw %d of %d" % (got.count, count))
        if len(checked.samples) != count:
            raise RunFailed("%d round trips timed of %d" % (len(checked.samples), count))
    else:
        checked, t0, t1 = got, outcomes[0][2], outcomes[1][3]
    if checked.count != want.count:
        raise RunFailed("receiver got %d messages of %d" % (checked.count, want.count))
    if checked.checksum != want.checksum:
        raise RunFailed("receiver checksum %d, %d sent" % (checked.checksum, want.checksum))
    if checked.fds_closed != want.fds_closed:
        raise RunFailed("receiver closed %d descriptors of %d sent"
                        % (checked.fds_closed, want.fds_closed))
    # perf_counter is CLOCK_MONOTONIC, one clock for both processes: from the
    # sender's first call to the receiver's last message.
    return RunResult(count, t1 - t0, checked.samples)


# ---- a cell: warm-up, calibration, runs -------------------------------------------

def calibrated_count(row: Row, impl: str, placement: Placement, mode: Mode) -> int:
    """Warm up once and return the count that makes a run last about mode.target_seconds."""
    if mode.fixed_count:
        return mode.fixed_count
    warm = run_once(row, impl, placement, mode.warmup_count)
    per_item = max(warm.elapsed, 1e-6) / mode.warmup_count
    return int(min(MAX_COUNT, max(MIN_COUNT, mode.target_seconds / per_item)))


def median_and_spread(values: List[float]) -> Tuple[float, float]:
    """The median and the spread (max - min) / median of a cell's runs."""
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med else 0.0


def percentile(samples: List[int], fraction: float) -> float:
    """The sample below which `fraction` of them lie (nearest rank)."""
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


@dataclass
class CellResult:
    """Every run of one implementation on one row and placement."""

    row: Row
    impl: str
    placement: str  # a Placement name, or "-" for single-process workloads
    status: str  # "ok", "n/a" or "FAILED"
    note: str = ""  # why n/a or FAILED
    count: int = 0  # messages (pairs, chunks, round trips) per run
    values: List[float] = field(default_factory=list)  # per run, in the workload's unit
    p99s: List[float] = field(default_factory=list)  # per run, ping-pong only (us)

    @property
    def median(self) -> float:
        """The median over runs."""
        return median_and_spread(self.values)[0]

    @property
    def spread(self) -> float:
        """(max - min) / median over runs."""
        return median_and_spread(self.values)[1]


def _value(row: Row, result: RunResult) -> Tuple[float, float]:
    """A run's figure in its workload's unit, and its p99 (ping-pong)."""
    unit = WORKLOADS[row.workload].unit
    if unit == "us":
        return statistics.median(result.samples) / 1e3, percentile(result.samples, 0.99) / 1e3
    if unit == "MB/s":
        return result.count * row.size / result.elapsed / 1e6, 0.0
    return result.count / result.elapsed, 0.0


def run_cell(row: Row, impl: str, placement: Placement, mode: Mode) -> CellResult:
    """Warm up, calibrate, and run `mode.runs` verified runs; a failure ends the cell."""
    name = placement.name if WORKLOADS[row.workload].two_process else "-"
    cell = CellResult(row, impl, name, "ok")
    try:
        cell.count = calibrated_count(row, impl, placement, mode)
        for _ in range(mode.runs):
            value, p99 = _value(row, run_once(row, impl, placement, cell.count))
            cell.values.append(value)
            if p99:
                cell.p99s.append(p99)
    except (RunFailed, OSError) as exc:
        cell.status, cell.note, cell.values, cell.p99s = "FAILED", str(exc), [], []
    return cell
