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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import _backend
from .affinity import pin
from .matrix import MAX_COUNT, Mode, Row, fixed_count, min_count, warmup_count
from .registry import RECEIVERS, SENDERS, SETUPS, SHARED, WORKLOADS
from .workloads import (Received, Setup, Side,
                        expected)

#: A run that has not finished by then is killed and reported as FAILED.
RUN_TIMEOUT = 60.0
#: Both sides must be ready (a peer's handshake done) by then.
SETUP_TIMEOUT = 30.0


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
    value: Optional[float] = None  # a figure the workload computed itself


# ---- the two children -----------------------------------------------------------

def _child(side: Side, setup: Optional[Setup], sock: Optional[socket.socket], shared: Any,
           count: int, row: Row, backend: Optional[str], cpu: int, ready_w: int, go_r: int,
           result_w: int) -> None:
    # Ctrl-C in the terminal reaches the children too: let it end them at
    # once instead of raising inside a half-sent batch.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        # Pinned first: threads a peer starts in its setup (pyzmq's I/O
        # thread, nng's workers, a Queue's feeder) inherit this CPU.
        pin(cpu)
        if backend is not None:
            _backend.use(backend)
        # A peer's handshake happens here, before the clock starts.
        state: Any = sock if setup is None else setup(sock, row, shared)
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        t0 = time.perf_counter()
        got = side(state, count, row)
        t1 = time.perf_counter()
        # A peer's teardown (waiting for "done", closing) is not timed.
        finish = getattr(state, "finish", None)
        if finish is not None:
            finish()
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


def _wait_ready(fd: int, n: int, results: Dict[int, bytearray], deadline: float) -> None:
    # A child whose setup failed reports on its result pipe instead of saying
    # ready: stop waiting at once and fail the run with its reason.
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        readable = select.select([fd, *results], [], [], max(left, 0))[0] if left > 0 else []
        if not readable:
            raise RunFailed("a process did not start within %.0f s" % SETUP_TIMEOUT)
        if fd not in readable:
            for early in readable:  # its report is short and complete once it exits
                _read_results({early: results[early]}, deadline)
            raise RunFailed(_first_error(results) or "a process ended before it started")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise RunFailed("a process ended before it started")
        got += len(chunk)


def _first_error(results: Dict[int, bytearray]) -> Optional[str]:
    for data in results.values():
        if data:
            status, got, _, _ = pickle.loads(bytes(data))
            if status != "ok":
                return str(got)
    return None


def _backend_of(impl: str) -> Optional[str]:
    return impl.split("-", 1)[1] if impl.startswith("afunix-") else None


def run_once(row: Row, impl: str, placement: Placement, count: int) -> RunResult:
    """Run `count` messages of `row` with `impl` once; RunFailed unless verified."""
    workload = WORKLOADS[row.workload]
    key = (row.workload, impl)
    backend = _backend_of(impl)
    send_setup, recv_setup = SETUPS.get(key, (None, None))
    a: Optional[socket.socket] = None
    b: Optional[socket.socket] = None
    sides: List[Tuple[Side, Optional[Setup], Optional[socket.socket], int]]
    if workload.two_process:
        a, b = socket.socketpair(socket.AF_UNIX, workload.sock_type)
        sides = [(SENDERS[key], send_setup, a, placement.sender_cpu),
                 (RECEIVERS[key], recv_setup, b, placement.receiver_cpu)]
    else:
        sides = [(SENDERS[key], None, None, placement.sender_cpu)]
    shared, close_shared = SHARED[key](row) if key in SHARED else (None, None)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: List[int] = []
    results: Dict[int, bytearray] = {}
    pipes: List[int] = []
    try:
        for side, setup, sock, cpu in sides:
            result_r, result_w = os.pipe()

            def target(side: Side = side, setup: Optional[Setup] = setup,
                       sock: Optional[socket.socket] = sock, cpu: int = cpu,
                       result_w: int = result_w) -> None:
                # Each child keeps only its own end: the peer's end closed,
                # so a dead peer reads as end-of-stream, not a hang.
                for other in (a, b):
                    if other is not None and other is not sock:
                        other.close()
                for fd in pipes:  # the other child's result pipe: not ours to hold
                    os.close(fd)
                _child(side, setup, sock, shared, count, row, backend, cpu, ready_w, go_r,
                       result_w)

            pids.append(_spawn(target))
            os.close(result_w)
            pipes.append(result_r)
            results[result_r] = bytearray()
        for s in (a, b):
            if s is not None:
                s.close()
        _wait_ready(ready_r, len(sides), results, time.monotonic() + SETUP_TIMEOUT)
        os.write(go_w, b"g" * len(sides))
        _read_results(results, time.monotonic() + RUN_TIMEOUT)
    finally:
        for pid in pids:
            _reap(pid)
        for fd in (ready_r, ready_w, go_r, go_w, *pipes):
            os.close(fd)
        for s in (a, b):
            if s is not None:
                s.close()
        if close_shared is not None:
            close_shared()
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
    if sent.count != count and WORKLOADS[row.workload].kind != "overhead":
        raise RunFailed("sender reports %d of %d" % (sent.count, count))
    if len(outcomes) == 1:
        if WORKLOADS[row.workload].kind == "overhead":
            if sent.value is None:
                raise RunFailed("no figure reported")
            return RunResult(count, outcomes[0][3] - outcomes[0][2], value=sent.value)
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


# ---- a row: calibration, then interleaved runs ------------------------------------------

#: run_once, or a stand-in with its signature (the tests give one)
RunOnce = Callable[[Row, str, Placement, int], RunResult]


#: Calibration runs at most, each sized from the one before.
CALIBRATION_RUNS = 3


def calibrated_count(row: Row, impl: str, placement: Placement, mode: Mode,
                     run: Optional[RunOnce] = None) -> int:
    """The count that makes a run of `impl` last about mode.target_seconds.

    A short first run overstates the fixed cost of starting (the first
    message's wake-up, a peer's pipeline filling) and so sizes the runs too
    short, which understates a fast implementation: while a run lasts less
    than half the target, another is made with the count it suggests.
    """
    if mode.fixed_count:
        return fixed_count(row, mode)
    count = warmup_count(row, mode)
    low = min_count(row)
    for _ in range(CALIBRATION_RUNS):
        warm = (run or run_once)(row, impl, placement, count)
        per_item = max(warm.elapsed, 1e-6) / count
        wanted = int(min(MAX_COUNT, max(low, mode.target_seconds / per_item)))
        if warm.elapsed >= mode.target_seconds / 2 or wanted <= count:
            return wanted
        count = wanted
    return count


def median_and_spread(values: Sequence[float]) -> Tuple[float, float]:
    """The median and the spread (max - min) / |median| of a cell's runs."""
    med = statistics.median(values)
    return med, (max(values) - min(values)) / abs(med) if med else 0.0


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
    #: every measurement of this cell: [values, p99s] per attempt, the kept one included
    attempts: List[Tuple[List[float], List[float]]] = field(default_factory=list)
    noisy: bool = False  # still spread over the mode's limit after its re-runs

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
    if result.value is not None:
        return result.value, 0.0
    if unit == "us":
        return statistics.median(result.samples) / 1e3, percentile(result.samples, 0.99) / 1e3
    if unit == "MB/s":
        return result.count * row.size / result.elapsed / 1e6, 0.0
    return result.count / result.elapsed, 0.0


def run_row(row: Row, impls: Sequence[str], placement: Placement, mode: Mode,
            counts: Optional[Dict[str, int]] = None, run: Optional[RunOnce] = None,
            ) -> Dict[str, CellResult]:
    """Measure the cells of one row side by side: `mode.runs` rounds of A B C D, A B C D, ...

    Each implementation is first calibrated (unless `counts` gives its count
    from an earlier attempt); then every round runs each implementation once,
    in table order, so that drift on the machine falls on all of them alike.
    A cell that fails is FAILED with the reason and leaves the later rounds.
    """
    run = run or run_once
    name = placement.name if WORKLOADS[row.workload].two_process else "-"
    cells = {impl: CellResult(row, impl, name, "ok") for impl in impls}

    def fail(cell: CellResult, exc: Exception) -> None:
        cell.status, cell.note, cell.values, cell.p99s = "FAILED", str(exc), [], []

    for impl, cell in cells.items():
        try:
            cell.count = counts[impl] if counts and impl in counts else \
                calibrated_count(row, impl, placement, mode, run)
        except (RunFailed, OSError) as exc:
            fail(cell, exc)
    for _ in range(mode.runs):
        for impl, cell in cells.items():
            if cell.status != "ok":
                continue
            try:
                value, p99 = _value(row, run(row, impl, placement, cell.count))
            except (RunFailed, OSError) as exc:
                fail(cell, exc)
                continue
            cell.values.append(value)
            if p99:
                cell.p99s.append(p99)
    for cell in cells.values():
        if cell.status == "ok":
            cell.attempts.append((list(cell.values), list(cell.p99s)))
    return cells
