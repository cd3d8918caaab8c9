"""Benchmarks (pytest-benchmark): same public call, implementations side by side.

Run: python -m pytest benchmarks --benchmark-only -n 0
At the end, each group's medians are printed as ratios to its base
(the column "base": what Python programs use today), all measured in the same run.
"""
from __future__ import annotations

from typing import Dict, Iterator

import pytest

_MEDIANS: Dict[str, Dict[str, float]] = {}


@pytest.fixture
def record_median() -> Iterator[object]:
    """Call with (group, implementation, benchmark) after a benchmark ran."""

    def record(group: str, impl: str, benchmark: object) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            _MEDIANS.setdefault(group, {})[impl] = stats.stats.median

    yield record


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark measures nothing in pytest-xdist's workers (and its
    # warning saying so is silenced for the test suite): refuse them here.
    if getattr(config.option, "dist", "no") != "no" or hasattr(config, "workerinput"):
        raise pytest.UsageError("run the benchmarks in one process: "
                                "python -m pytest benchmarks --benchmark-only -n 0")


def pytest_terminal_summary(terminalreporter: object) -> None:
    if not _MEDIANS:
        return
    write = terminalreporter.write_line  # type: ignore[attr-defined]
    write("")
    write("ratios to the base (median time, same run; > 1 is faster):")
    for group, medians in sorted(_MEDIANS.items()):
        base = medians.get("base")
        for impl, median in sorted(medians.items()):
            if base:
                write("  %-28s %-16s %.2fx" % (group, impl, base / median))
