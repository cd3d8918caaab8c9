"""python -m afunix bench, the large-message and object rows: each runs, verified, and says
what it could not run; the goal line under a row says whether the run met the goal.

Nothing here asserts a speed: real runs are tiny (64 KiB messages, a fixed
small count) and only their shape is checked; the goal lines come from fake runs.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
from typing import Dict, Iterator, List

import pytest

import afunix
from afunix.__main__ import main
from afunix.bench import registry, report, schema, session
from afunix.bench.matrix import KIB, MATRIX, MIB, MODES, Row
from afunix.bench.runner import Placement, RunFailed, RunResult, placements

ONE = placements(("one-cpu",))[0]
#: one run of 20 messages per cell
TINY = dataclasses.replace(MODES["tiny"], fixed_count=20)

#: workload -> the module its base column needs (None: the stdlib)
LARGE_WORKLOADS = {
    "large-stream": None, "large-vs-pipe": None, "lane-stream": None, "loan-stream": None,
    "loan-view": None, "lane-vs-pipe": None, "lane-vs-zmq": "zmq", "obj-vs-pipe": None,
    "obj-vs-queue": None, "objnp-vs-pipe": "numpy", "objnp-vs-queue": "numpy",
}


def _channel_lacks(method: str) -> bool:
    return not hasattr(afunix.Channel, method)


@pytest.mark.parametrize("workload", sorted(LARGE_WORKLOADS))
def test_each_large_message_row_runs_verified_or_says_what_is_missing(
        workload: str, fd_baseline: set[int]) -> None:
    module = LARGE_WORKLOADS[workload]
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip("%s is not installed (pip install 'afunix[bench]')" % module)
    w = registry.WORKLOADS[workload]
    results = session.measure([Row(workload, size=64 * KIB, batch=1)], [ONE], TINY)
    assert results.skipped == [] and len(results.rows) == 1
    cells = results.rows[0].cells
    assert list(cells) == list(w.columns)
    for impl, cell in cells.items():
        methods = [name.split(".", 1)[1] for name in w.afunix_needs if name.startswith("Channel.")]
        missing = [m for m in methods if _channel_lacks(m)]
        if impl.startswith("afunix-") and missing:
            # not a figure: the cell says which method the channel lacks
            assert cell.status == "n/a" and cell.values == []
            assert cell.note == "not available: " + ", ".join(
                "afunix.Channel." + m for m in missing), cell.note
            continue
        assert cell.status == "ok", (impl, cell.note)
        assert len(cell.values) == 1 and cell.values[0] > 0, (impl, cell.values)
    gc.collect()  # a Queue's pipes in this process close when collected (PyPy: later)


def test_a_row_whose_peer_is_missing_is_skipped_with_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = registry.WORKLOADS["objnp-vs-pipe"]
    assert w.peer is not None and w.peer.module == "numpy"
    gone = dataclasses.replace(w.peer, module="afunix_no_such_numpy")
    monkeypatch.setitem(registry.WORKLOADS, w.name, dataclasses.replace(w, peer=gone))
    results = session.measure([Row(w.name, size=64 * KIB, batch=1)], [ONE], TINY)
    assert results.rows == []
    assert results.skipped == ["skipped OBJ np/Pipe rows: numpy is not installed: "
                               "pip install 'afunix[bench]'"]


def test_the_rows_asked_for_are_in_the_matrix_at_their_sizes() -> None:
    sizes: Dict[str, List[int]] = {}
    for row in MATRIX:
        sizes.setdefault(row.workload, []).append(row.size)
    for workload in ("large-stream", "lane-stream", "loan-stream", "loan-view", "lane-vs-pipe",
                     "lane-vs-zmq"):
        assert sizes[workload] == [64 * KIB, MIB, 16 * MIB], workload
    for workload in ("obj-vs-pipe", "obj-vs-queue", "objnp-vs-pipe", "objnp-vs-queue"):
        assert sizes[workload] == [16 * MIB], workload
    goals = {(r.workload, r.size): r.goal for r in MATRIX if r.goal}
    assert goals == {("lane-stream", MIB): 1.5, ("lane-stream", 16 * MIB): 1.5,
                     ("loan-stream", MIB): 5.0, ("loan-stream", 16 * MIB): 5.0,
                     ("loan-view", MIB): 5.0, ("loan-view", 16 * MIB): 5.0,
                     ("obj-vs-pipe", 16 * MIB): 5.0}


def test_only_selects_the_new_rows(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["bench", "--tiny", "--messages", "8", "--placement", "one-cpu",
                   "--only", "lane-stream"])
    out = capsys.readouterr().out
    labels = [line.split("  ")[0] for line in out.splitlines() if line.startswith("LANE/")]
    assert labels == ["LANE/stream 64 KiB", "LANE/stream 1 MiB", "LANE/stream 16 MiB"]
    assert status == 0, out
    assert out.count("  ^ goal: af/base >= 1.5x: ") == 2
    assert "Channel.recv(), every byte copied out of the slot" in " ".join(out.split())


# ---- the goal line, from fake runs -------------------------------------------------------

class Planned:
    """A stand-in for runner.run_once: each implementation takes the time planned for it."""

    def __init__(self, elapsed: Dict[str, float]) -> None:
        self.elapsed = elapsed

    def __call__(self, row: Row, impl: str, placement: Placement, count: int) -> RunResult:
        if self.elapsed[impl] < 0:
            raise RunFailed("the receiver got 3 messages of 8")
        return RunResult(count, self.elapsed[impl])


QUIET = dataclasses.replace(MODES["quick"], fixed_count=8, runs=1, rerun_budget=None)


@pytest.fixture
def goal_row() -> Iterator[Row]:
    yield Row("lane-stream", size=MIB, batch=1, goal=1.5)


@pytest.mark.parametrize("base, af, line", [
    (2.0, 1.0, "  ^ goal: af/base >= 1.5x: met (2.00x in this run)"),
    (1.5, 1.0, "  ^ goal: af/base >= 1.5x: met (1.50x in this run)"),
    (1.2, 1.0, "  ^ goal: af/base >= 1.5x: NOT met (1.20x in this run)"),
    (1.0, -1.0, "  ^ goal: af/base >= 1.5x: no figure (af[c]: no measurement)"),
])
def test_the_line_under_a_goal_row_says_whether_the_run_met_it(
        goal_row: Row, base: float, af: float, line: str) -> None:
    fake = Planned({"base": base, "afunix-stdlib": 1.0, "afunix-c": af})
    results = session.measure([goal_row], [ONE], QUIET, run=fake)
    lines = report.table(results)
    assert lines[1].startswith("LANE/stream 1 MiB")
    assert lines[2] == line
    footer = " ".join(report.footer(results))
    met = "met (" in line and "NOT" not in line
    assert ("goals met in %d of 1 rows" % met) in footer
    assert ("(1 without a figure)" in footer) == ("no figure" in line)
    doc = json.loads(report.to_json(results, QUIET, [ONE], report.facts()))
    assert schema.validate(doc) == []
    assert doc["rows"][0]["goal"] == 1.5
    assert doc["rows"][0]["goal_met"] is (None if "no figure" in line else met)


def test_a_row_without_a_goal_has_no_goal_line() -> None:
    fake = Planned({"base": 2.0, "afunix-stdlib": 1.0, "afunix-c": 1.0})
    results = session.measure([Row("lane-stream", size=MIB, batch=1)], [ONE], QUIET, run=fake)
    assert not any("goal" in line for line in report.table(results) + report.footer(results))
    doc = json.loads(report.to_json(results, QUIET, [ONE], report.facts()))
    assert doc["rows"][0]["goal"] is None and doc["rows"][0]["goal_met"] is None
