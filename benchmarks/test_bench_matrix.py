"""The matrix of `python -m afunix bench` under pytest-benchmark, for developers.

Each round is one verified run of afunix.bench.runner (sender and receiver in
two processes pinned to two CPUs, or to one when there is only one), with a
fixed message count so that the times of the implementations compare
directly.  A round includes two forks (a few ms), the same for every
implementation; `python -m afunix bench` excludes them and is the figure to
quote.
"""
from __future__ import annotations

from typing import Callable

import pytest

from afunix.bench import runner
from afunix.bench.matrix import IMPLEMENTATIONS, MATRIX, Row
from afunix.bench.registry import WORKLOADS
from afunix.bench.workloads import unavailable

# messages per run, by workload kind; 20000 for any kind not named here
COUNTS = {"fds": 5000, "stream": 2000, "pingpong": 2000, "single-fds": 5000,
          "chan-vs-nng": 2000, "large-stream": 16, "large-vs-pipe": 16}
ROWS = [row for row in MATRIX if WORKLOADS[row.workload].two_process]
NAMES = {"c": "c-reference"}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("row", ROWS, ids=[row.key for row in ROWS])
def test_matrix(benchmark: object, record_median: Callable[..., None], row: Row,
                impl: str) -> None:
    if impl not in WORKLOADS[row.workload].columns:
        pytest.skip("%s has no %s column" % (row.workload, impl))
    reason = unavailable(WORKLOADS[row.workload], impl)
    if reason:
        pytest.skip(reason)
    placement = (runner.placements(("two-cpus",)) or runner.placements(("one-cpu",)))[0]
    count = COUNTS.get(row.workload, 20000)
    results = []

    def run() -> None:
        results.append(runner.run_once(row, impl, placement, count))

    group = "%s %s" % (row.key, placement.name)
    benchmark.group = group  # type: ignore[attr-defined]
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)  # type: ignore[attr-defined]
    best = min(results, key=lambda r: r.elapsed)
    benchmark.extra_info["per_second_best"] = best.count / best.elapsed  # type: ignore[attr-defined]
    record_median(group, NAMES.get(impl, impl), benchmark)
