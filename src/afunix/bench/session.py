"""One benchmark session: every row side by side, then the noisy rows again.

A row's implementations run in interleaved rounds (runner.run_row).  When
every row has been measured once, a row whose worst cell spreads more than
the mode's noise limit is measured again, up to `mode.reruns` times; of its
attempts the one with the smallest worst spread is kept (every attempt is
kept in the JSON too), and a row still over the limit is marked noisy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .matrix import IMPLEMENTATIONS, Mode, Row
from .runner import CellResult, Placement, RunOnce, run_row
from .registry import WORKLOADS
from .workloads import missing_peer, unavailable


@dataclass
class RowResult:
    """One row at one placement: a cell per column the workload has."""

    row: Row
    placement: Placement
    cells: Dict[str, CellResult]
    attempts: int = 1
    noisy: bool = False

    @property
    def placement_name(self) -> str:
        """The placement, or "-" for a single-process workload."""
        return self.placement.name if WORKLOADS[self.row.workload].two_process else "-"

    @property
    def spread(self) -> float:
        """The largest spread of the row's measured cells (0 when none was measured)."""
        return max((c.spread for c in self.cells.values() if c.status == "ok" and c.values),
                   default=0.0)


@dataclass
class Results:
    """What a session measured, and what it left out and why."""

    rows: List[RowResult] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # one line per workload left out
    elapsed: float = 0.0
    reruns: int = 0  # row measurements repeated because they were noisy
    not_rerun: int = 0  # noisy rows not measured again: the time budget was spent
    noise_limit: float = 0.15  # the mode's: a row spreading more is noisy

    @property
    def cells(self) -> List[CellResult]:
        """Every cell, in table order."""
        return [cell for r in self.rows for cell in r.cells.values()]


Progress = Callable[[int, int, RowResult, str], None]


def plan(rows: Sequence[Row], where: Sequence[Placement]) -> List[tuple[Row, Placement]]:
    """(row, placement) in table order: single-process rows once, on the first placement."""
    return [(row, p) for row in rows
            for p in (where if WORKLOADS[row.workload].two_process else where[:1])]


def _measure(row: Row, p: Placement, mode: Mode, run: Optional[RunOnce],
             counts: Optional[Dict[str, int]] = None) -> Dict[str, CellResult]:
    workload = WORKLOADS[row.workload]
    name = p.name if workload.two_process else "-"
    cells: Dict[str, CellResult] = {}
    runnable = []
    for impl in workload.columns:
        reason = unavailable(workload, impl)
        if reason is not None:
            cells[impl] = CellResult(row, impl, name, "n/a", reason)
        else:
            runnable.append(impl)
    measured = run_row(row, runnable, p, mode, counts, run) if runnable else {}
    return {impl: cells.get(impl) or measured[impl]
            for impl in IMPLEMENTATIONS if impl in cells or impl in measured}


def _keep_better(result: RowResult, again: Dict[str, CellResult]) -> None:
    """Fold a re-run into `result`: the attempt with the smaller worst spread is kept.

    A cell that fails in a re-run is FAILED, whatever it measured before.
    """
    trial = RowResult(result.row, result.placement, again)
    better = trial.spread < result.spread
    for impl, cell in result.cells.items():
        fresh = again.get(impl)
        if fresh is None or cell.status != "ok":
            continue
        cell.attempts.extend(fresh.attempts)
        if fresh.status == "FAILED":
            cell.status, cell.note = "FAILED", "on a re-run: " + fresh.note
            cell.values, cell.p99s = [], []
        elif better:
            cell.values, cell.p99s = fresh.values, fresh.p99s
    result.attempts += 1


def measure(rows: Sequence[Row], where: Sequence[Placement], mode: Mode,
            progress: Optional[Progress] = None, run: Optional[RunOnce] = None) -> Results:
    """Measure `rows` at the placements `where` in `mode`; re-run the noisy ones."""
    started = time.monotonic()
    results = Results(noise_limit=mode.noise_limit)
    todo = []
    left_out: Dict[str, List[str]] = {}  # reason -> the titles of the rows it leaves out
    for row in rows:
        reason = missing_peer(WORKLOADS[row.workload])
        if reason is not None:
            titles = left_out.setdefault(reason, [])
            if WORKLOADS[row.workload].title not in titles:
                titles.append(WORKLOADS[row.workload].title)
        else:
            todo.append(row)
    results.skipped += ["skipped %s rows: %s" % (", ".join(titles), reason)
                        for reason, titles in left_out.items()]
    steps = plan(todo, where)
    for done, (row, p) in enumerate(steps, 1):
        result = RowResult(row, p, _measure(row, p, mode, run))
        results.rows.append(result)
        if progress is not None:
            progress(done, len(steps), result, "")
    for attempt in range(1, mode.reruns + 1):
        noisy = [r for r in results.rows if r.spread > mode.noise_limit]
        for k, result in enumerate(noisy, 1):
            if mode.rerun_budget is not None and \
                    time.monotonic() - started > mode.rerun_budget:
                results.not_rerun = len(noisy) - k + 1
                break
            counts = {impl: c.count for impl, c in result.cells.items() if c.status == "ok"}
            again = _measure(result.row, result.placement, mode, run, counts)
            _keep_better(result, again)
            results.reruns += 1
            if progress is not None:
                progress(k, len(noisy), result, "re-run %d of %d" % (attempt, mode.reruns))
        if results.not_rerun:
            break
    for result in results.rows:
        result.noisy = result.spread > mode.noise_limit
        for cell in result.cells.values():
            cell.noisy = cell.status == "ok" and bool(cell.values) and \
                cell.spread > mode.noise_limit
    results.elapsed = time.monotonic() - started
    return results
