"""python -m afunix bench: verification (FAILED, never a figure), interleaved rounds, noisy rows,
the JSON schema, --compare, peers that fail or are missing, a table within 100 columns, the plot.

Nothing here asserts a speed: the figures come from fake runs where the
machinery is under test, and from tiny real runs only where their shape is.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import random
import re
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

import afunix
from afunix.__main__ import main
from afunix.bench import compare, machine, registry, report, schema, session, workloads
from afunix.bench.matrix import IMPLEMENTATIONS, MATRIX, MODES, Row
from afunix.bench.runner import CellResult, Placement, RunFailed, RunResult, placements
from afunix.bench.workloads import Peer, Received, StreamChecker, Workload

WIDTH = 100


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["bench", "--tiny", *args])
    out, err = capsys.readouterr()
    return status, out, err


def columns(line: str) -> List[str]:
    """A table line cut at the report's fixed column widths, each field stripped."""
    fields, pos = [], 0
    for i, width in enumerate(report.COLUMN_WIDTHS):
        pos += 0 if i == 0 else (1 if i == 1 else 2)
        fields.append(line[pos:pos + width].strip())
        pos += width
    return fields


def table_rows(out: str, prefix: str) -> List[List[str]]:
    return [columns(line) for line in out.splitlines() if line.startswith(prefix)]


def unwrapped(out: str) -> List[str]:
    """The output's lines with wrapped continuations ("  " + text) joined back on."""
    lines: List[str] = []
    for line in out.splitlines():
        if line.startswith("  ") and lines and not line.startswith("  ^"):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def cell(results: session.Results, impl: str, k: int = 0) -> CellResult:
    return results.rows[k].cells[impl]


# ---- real runs, tiny ---------------------------------------------------------------------

def test_tiny_run_prints_the_table_and_what_each_column_ran(
        capsys: pytest.CaptureFixture[str], fd_baseline: set[int]) -> None:
    status, out, err = bench(capsys, "--only", "dgram", "--only", "pingpong", "--only",
                             "socketpairs", "--only", "call-overhead", "--only", "single-send")
    assert status == 0, out
    assert "FAILED" not in out
    assert all(len(line) <= WIDTH for line in out.splitlines()), \
        [line for line in out.splitlines() if len(line) > WIDTH]
    head = table_rows(out, "row ")[0]
    assert head == ["row", "cpu", "unit", "base", "af[stdlib]", "af[c]", "C", "af/base", "af/C"]
    for title in ("socketpairs x100", "DGRAM 64 B x32", "ping-pong p50 64 B",
                  "ping-pong p99 64 B", "overhead send 64 B", "1-call send 64 B"):
        assert "\n" + title in out
    assert "machine: " in out and afunix.__version__ in out
    assert re.search(r"^interpreter: \w+ \d+\.\d+", out, re.M), out
    # Every workload in the table is spelled out, column by column.
    assert "- DGRAM -- base: sock.send / sock.recv once per message; af: send_many" in out
    assert "overhead send -- no base; af: ns per call" in out
    overhead = table_rows(out, "overhead send")[0]
    assert overhead[3] == "" and overhead[6] == "" and overhead[2] == "ns"
    # Progress went to stderr: a line per measured row, the last one [N/N].
    assert re.search(r"\[(\d+)/\1\] ping-pong", err), err


def test_only_and_placement_select(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = bench(capsys, "--only", "dgram", "--placement", "one-cpu")
    assert status == 0
    rows = table_rows(out, "DGRAM ")
    expected = [r for r in MATRIX if r.workload == "dgram"]
    assert len(rows) == len(expected) and all(row[1] == "1" for row in rows)
    assert "SEQPACKET" not in out and "socketpairs" not in out


def _drop_one(sock: object, count: int, row: Row) -> Received:
    got = workloads.recv_stdlib(sock, count, row)  # type: ignore[arg-type]
    # Lose the last message between the socket and the count.
    return Received(got.count - 1, got.checksum - (count - 1))


def _corrupt_one(sock: object, count: int, row: Row) -> Received:
    got = workloads.recv_stdlib(sock, count, row)  # type: ignore[arg-type]
    return Received(got.count, got.checksum + 1)


def _raise(sock: object, count: int, row: Row) -> Received:
    raise workloads.Mismatch("a message of 3 bytes, 64 expected")


@pytest.mark.parametrize("receiver, why", [
    (_drop_one, "receiver got 199 messages of 200"),
    (_corrupt_one, "receiver checksum"),
    (_raise, "Mismatch: a message of 3 bytes"),
])
def test_a_run_that_fails_verification_is_failed_not_a_figure(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        receiver: object, why: str) -> None:
    # The children are forked from this process, so they run the patched receiver.
    monkeypatch.setitem(registry.RECEIVERS, ("dgram", "base"), receiver)
    status, out, _ = bench(capsys, "--only", "dgram", "--placement", "one-cpu")
    assert status == 1
    for row in table_rows(out, "DGRAM "):
        assert row[3] == "FAILED" and row[5] != "FAILED", row
    failures = [line for line in unwrapped(out) if line.startswith("FAILED DGRAM")]
    assert len(failures) == len([r for r in MATRIX if r.workload == "dgram"]), out
    assert all(why in line for line in failures), out


def test_missing_api_is_not_available(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(afunix, "RecvBatch", raising=False)
    status, out, _ = bench(capsys, "--only", "dgram", "--placement", "one-cpu")
    assert status == 0
    for row in table_rows(out, "DGRAM "):
        assert row[4:6] == ["n/a", "n/a"], row
    assert "not available: afunix.RecvBatch" in out


def test_json_follows_its_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    status, _, _ = bench(capsys, "--only", "pingpong", "--only", "socketpairs",
                         "--json", str(path))
    assert status == 0
    doc = json.loads(path.read_text())
    assert schema.validate(doc) == []
    assert doc["schema"] == "afunix-bench" and doc["version"] == schema.VERSION
    assert doc["interpreter"]["implementation"] in ("CPython", "PyPy")
    assert doc["backend"]["active"] == afunix.BACKEND
    assert doc["machine"]["cpus_allowed"] and isinstance(doc["machine"]["busy"], list)
    cells = doc["cells"]
    assert {c["workload"] for c in cells} == {"pingpong", "socketpairs"}
    for c in cells:
        assert c["status"] == "ok", c
        assert len(c["runs"]) == 1 and c["median"] > 0 and c["attempts"] == [
            {"runs": c["runs"], "p99_runs": c["p99_runs"]}]
        assert c["measures"]
        if c["workload"] == "pingpong":
            assert c["unit"] == "us" and c["lower_is_better"] and len(c["p99_runs"]) == 1


def test_schema_check_names_what_is_wrong() -> None:
    assert schema.validate({"schema": "afunix-bench"})  # most fields missing
    doc = {"schema": "afunix-bench", "version": schema.VERSION, "afunix": "x", "created": "t",
           "machine": {"system": "Linux", "kernel": "6", "arch": "x86_64", "cpus": 2,
                       "cpus_allowed": [0, 1], "loadavg": [0.1], "busy": []},
           "interpreter": {"implementation": "CPython", "version": "3.11"},
           "backend": {"active": "c", "c_core": "loaded"},
           "mode": {"name": "quick", "runs": 3, "noise_limit": 0.15, "reruns": 2},
           "placements": [], "cells": [{"key": "dgram-64B-x32"}]}
    errors = schema.validate(doc)
    assert any("$.cells[0]: 'runs' missing" in e for e in errors), errors
    doc["cells"] = []
    assert schema.validate(doc) == []
    doc["version"] = 1
    assert schema.validate(doc) == ["$.version: 1 is not one of [%d]" % schema.VERSION]


# ---- rounds, re-runs and noisy rows, with a fake run ----------------------------------------

class FakeRuns:
    """A stand-in for runner.run_once: records the order, returns planned times."""

    def __init__(self, elapsed: Dict[str, List[float]]) -> None:
        self.elapsed = {impl: iter(values) for impl, values in elapsed.items()}
        self.calls: List[str] = []

    def __call__(self, row: Row, impl: str, placement: Placement, count: int) -> RunResult:
        self.calls.append(impl)
        value = next(self.elapsed[impl])
        if value < 0:
            raise RunFailed("the peer hung up")
        return RunResult(count, value)


ROW = Row("dgram", size=64, batch=32)
ONE = placements(("one-cpu",))[0]


def quiet_mode(**changes: Any) -> Any:
    settings: Dict[str, Any] = {"fixed_count": 1000, "rerun_budget": None, **changes}
    return dataclasses.replace(MODES["quick"], **settings)


def test_the_columns_of_a_row_run_in_interleaved_rounds() -> None:
    fake = FakeRuns({impl: [1.0] * 3 for impl in IMPLEMENTATIONS})
    results = session.measure([ROW], [ONE], quiet_mode(runs=3), run=fake)
    assert fake.calls == list(IMPLEMENTATIONS) * 3
    assert [c.values for c in results.cells] == [[1000.0] * 3] * 4
    assert not results.rows[0].noisy and results.reruns == 0


def test_a_noisy_row_is_run_again_twice_then_marked(capsys: pytest.CaptureFixture[str]) -> None:
    spread = [1.0, 2.0, 1.0]  # 50% apart in every attempt
    fake = FakeRuns({impl: spread * 3 for impl in IMPLEMENTATIONS})
    results = session.measure([ROW], [ONE], quiet_mode(runs=3), run=fake)
    assert len(fake.calls) == 4 * 3 * 3  # first attempt and two re-runs
    row = results.rows[0]
    assert row.noisy and row.attempts == 3 and results.reruns == 2
    assert all(c.noisy and len(c.attempts) == 3 for c in row.cells.values())
    lines = report.table(results)
    assert lines[2].startswith("  ^ noisy: a column spread 50% (limit 15%) after 3 measurements")
    doc = json.loads(report.to_json(results, quiet_mode(), [ONE], report.facts()))
    assert schema.validate(doc) == []
    assert doc["rows"][0]["noisy"] is True and doc["rows"][0]["attempts"] == 3
    assert all(c["noisy"] and len(c["attempts"]) == 3 for c in doc["cells"])


def test_a_row_quiet_on_a_re_run_keeps_that_attempt() -> None:
    fake = FakeRuns({impl: [1.0, 2.0, 1.0] + [1.0, 1.02, 1.01] for impl in IMPLEMENTATIONS})
    results = session.measure([ROW], [ONE], quiet_mode(runs=3), run=fake)
    row = results.rows[0]
    assert not row.noisy and row.attempts == 2
    assert cell(results, "base").values == [1000.0, 1000 / 1.02, 1000 / 1.01]
    assert len(cell(results, "base").attempts) == 2  # both kept for the JSON
    assert "noisy" not in "\n".join(report.table(results))


def test_re_runs_stop_when_the_time_budget_is_spent() -> None:
    fake = FakeRuns({impl: [1.0, 2.0, 1.0] * 3 for impl in IMPLEMENTATIONS})
    results = session.measure([ROW], [ONE], quiet_mode(runs=3, rerun_budget=0.0), run=fake)
    assert results.rows[0].noisy and results.reruns == 0 and results.not_rerun == 1
    assert "1 noisy row not re-run: the time budget was spent" in " ".join(report.footer(results))


def test_a_cell_that_fails_in_a_round_is_failed_and_the_others_go_on() -> None:
    plan = {impl: [1.0] * 3 for impl in IMPLEMENTATIONS}
    plan["base"] = [1.0, -1.0]  # fails in the second round
    fake = FakeRuns(plan)
    results = session.measure([ROW], [ONE], quiet_mode(runs=3), run=fake)
    base = cell(results, "base")
    assert base.status == "FAILED" and base.note == "the peer hung up" and base.values == []
    assert fake.calls.count("base") == 2 and fake.calls.count("c") == 3
    line = report.table(results)[1]
    assert columns(line)[3] == "FAILED" and columns(line)[7] == "-"


# ---- peers: a failing one, a missing one, the real ones ------------------------------------

PEER_ROW = Row("test-peer", size=64, batch=1)


def _peer_send(sock: socket.socket, count: int, row: Row) -> Received:
    return workloads.send_stdlib(sock, count, row)


def _peer_recv(sock: socket.socket, count: int, row: Row) -> Received:
    return workloads.recv_stdlib(sock, count, row)


def _handshake_fails(sock: socket.socket, row: Row, shared: Any) -> socket.socket:
    raise ConnectionRefusedError("the peer refused the handshake")


@pytest.fixture
def test_peer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Workload]:
    """A workload whose base is a peer: setups and sides patched per test."""
    w = Workload("test-peer", "TEST/peer", "messages", socket.SOCK_SEQPACKET, "msgs/s",
                 ("send_many",), base="a test peer", afunix="send_many", c="")
    monkeypatch.setitem(registry.WORKLOADS, w.name, w)
    sides = {"base": (_peer_send, _peer_recv), "afunix-stdlib": (_peer_send, _peer_recv),
             "afunix-c": (_peer_send, _peer_recv)}
    for impl, (send, recv) in sides.items():
        monkeypatch.setitem(registry.SENDERS, (w.name, impl), send)
        monkeypatch.setitem(registry.RECEIVERS, (w.name, impl), recv)
    yield w


def test_a_peer_whose_handshake_fails_is_failed_with_the_reason(
        test_peer: Workload, monkeypatch: pytest.MonkeyPatch, fd_baseline: set[int]) -> None:
    monkeypatch.setitem(registry.SETUPS, ("test-peer", "base"), (None, _handshake_fails))
    results = session.measure([PEER_ROW], [ONE], MODES["tiny"])
    base = cell(results, "base")
    assert base.status == "FAILED" and base.values == []
    assert base.note == "ConnectionRefusedError: the peer refused the handshake"
    assert cell(results, "afunix-c").status == "ok"
    text = "\n".join(unwrapped("\n".join(report.table(results))))
    assert "FAILED TEST/peer 64 B cpu 1 base: ConnectionRefusedError: the peer refused" in text


def test_a_peer_that_dies_mid_run_is_failed_not_a_figure(
        test_peer: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies(sock: socket.socket, count: int, row: Row) -> Received:
        sock.recv(row.size)
        raise SystemExit(3)  # as a crashing peer would, mid-run

    monkeypatch.setitem(registry.RECEIVERS, ("test-peer", "base"), dies)
    results = session.measure([PEER_ROW], [ONE], MODES["tiny"])
    base = cell(results, "base")
    assert base.status == "FAILED" and base.values == [], base
    assert "SystemExit" in base.note or "BrokenPipeError" in base.note, base.note


def test_a_peer_that_is_not_installed_skips_its_rows_with_one_line(
        test_peer: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(test_peer, peer=Peer("afunix_no_such_module", "nosuch",
                                                       "pip install nosuch"))
    monkeypatch.setitem(registry.WORKLOADS, "test-peer", missing)
    results = session.measure([PEER_ROW, PEER_ROW], placements(("two-cpus", "one-cpu")),
                              MODES["tiny"])
    assert results.rows == []
    assert results.skipped == ["skipped TEST/peer rows: nosuch is not installed: "
                               "pip install nosuch"]
    assert report.table(results)[-1] == results.skipped[0]


@pytest.mark.parametrize("workload, module", [
    ("chan-vs-zmq", "zmq"), ("chan-vs-nng", "pynng"), ("chan-vs-pipe", None),
    ("chan-vs-queue", None)])
def test_each_peer_runs_and_is_verified(workload: str, module: Optional[str],
                                        fd_baseline: set[int]) -> None:
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip("%s is not installed (pip install 'afunix[bench]')" % module)
    row = Row(workload, size=64, batch=256)
    results = session.measure([row], [ONE], MODES["tiny"])
    base = cell(results, "base")
    assert base.status == "ok" and base.values and base.values[0] > 0, base.note
    # multiprocessing.Queue's pipes in this process close when collected:
    # at once on CPython, at the next collection on PyPy
    gc.collect()


# ---- --compare ---------------------------------------------------------------------------

def _scaled(doc: Dict[str, Any], factor: float) -> Dict[str, Any]:
    new = json.loads(json.dumps(doc))
    for c in new["cells"]:
        c["runs"] = [v * factor for v in c["runs"]]
        c["p99_runs"] = [v * factor for v in c["p99_runs"]]
    return new


def test_compare_prints_each_cells_ratio(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    status, _, _ = bench(capsys, "--only", "dgram", "--only", "pingpong", "--placement",
                         "one-cpu", "--json", str(old))
    assert status == 0
    doc = json.loads(old.read_text())
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_scaled(doc, 2.0)))
    status, out, _ = bench(capsys, "--compare", str(old), str(new))
    assert status == 0
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines)
    dgram = [line for line in lines if line.startswith("DGRAM 64 B x32")]
    assert len(dgram) == 4  # one per column
    assert all(line.endswith("2.00x  faster") for line in dgram), dgram
    # Latency doubled is slower: the ratio is inverted, as the table's.
    ping = [line for line in lines if line.startswith("ping-pong p")]
    assert len(ping) == 8 and all(line.endswith("0.50x  slower") for line in ping), ping
    assert "%d cells compared" % (len(dgram) * 3 + len(ping)) in out


def test_compare_calls_overlapping_runs_noise() -> None:
    assert compare.verdict([1.0, 1.2], [1.1, 1.3], False) == "~ noise"
    assert compare.verdict([1.0, 1.2], [1.3, 1.4], False) == "faster"
    assert compare.verdict([1.0, 1.2], [1.3, 1.4], True) == "slower"
    assert compare.speed_ratio(10.0, 5.0, True) == 2.0


def test_report_lines_never_break_a_path() -> None:
    # a path given to --compare is printed whole, to be copied back: not
    # at its hyphens, and not when it is longer than a line
    for path in ("/tmp/some-directory/" + "x" * 40 + "/run-of-yesterday-evening/old.json",
                 "/tmp/" + "y" * 120 + "/old.json"):
        assert report.wrapped("comparison: this run against " + path) == [
            "comparison: this run against", "  " + path]


def test_compare_against_a_run_measures_then_compares(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    # a path with hyphens, too long to share the first line: it goes whole to the next
    old = tmp_path / "compare-run-of-yesterday-evening" / "old.json"
    old.parent.mkdir()
    bench(capsys, "--only", "socketpairs", "--json", str(old))
    status, out, _ = bench(capsys, "--only", "socketpairs", "--compare", str(old))
    assert status == 0
    assert "\nsocketpairs x100" in out  # the table of this run
    assert "comparison: this run against\n  %s\n" % old in out
    assert "4 cells compared" in out


@pytest.mark.parametrize("content, why", [
    ('{"platform": {}, "cells": []}', "before the JSON had a schema"),
    ("not json", "is not JSON"),
    ('{"schema": "afunix-bench", "version": 2}', "is not a benchmark result"),
])
def test_compare_refuses_what_it_cannot_read_before_measuring(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, why: str) -> None:
    old = tmp_path / "old.json"
    old.write_text(content)
    status, out, err = bench(capsys, "--only", "socketpairs", "--compare", str(old))
    assert status == 2 and out == "" and why in err


# ---- the table, the header, the plot ---------------------------------------------------------

def _extreme_results() -> session.Results:
    results = session.Results()
    for row in MATRIX:
        w = registry.WORKLOADS[row.workload]
        for p in (placements(("two-cpus", "one-cpu")) if w.two_process else [ONE]):
            cells = {impl: CellResult(row, impl, p.name, "ok", values=[123456789.0, 1.0],
                                      p99s=[98765432.1, 2.0]) for impl in w.columns}
            results.rows.append(session.RowResult(row, p, cells, attempts=3, noisy=True))
    return results


def test_the_table_fits_100_columns_whatever_the_figures() -> None:
    lines = report.table(_extreme_results())
    assert max(len(line) for line in lines) <= WIDTH
    labels = [report.label(row) for row in MATRIX]
    assert max(map(len, labels)) <= report.COLUMN_WIDTHS[0], labels
    header = report.header(MODES["default"], placements(("two-cpus", "one-cpu")), report.facts())
    assert max(len(line) for line in header + report.legend(_extreme_results())) <= WIDTH


@pytest.mark.parametrize("value, text", [
    (0.5, "0.50"), (7.53, "7.53"), (61.7, "61.7"), (999.4, "999"), (999.7, "1000"),
    (5960.0, "5960"), (12345.0, "12.3k"), (999_600.0, "1M"), (1_094_600.0, "1.09M"),
    (116_280_000.0, "116M"), (-2651.0, "-2651")])
def test_figures_take_at_most_five_characters(value: float, text: str) -> None:
    assert report.number(value) == text


def test_spreads_take_at_most_three_characters() -> None:
    assert [report.spread_text(s) for s in (0.0, 0.07, 0.994, 1.0, 2.4, 150.0)] == \
        ["0%", "7%", "99%", "1x", "2x", "99x"]


def test_the_header_warns_of_a_busy_machine() -> None:
    quiet = machine.busy_reasons([0.1, 0.1, 0.1], 2, {"busy_share": 0.02, "steal_share": 0.0})
    assert quiet == []
    busy = machine.busy_reasons([3.0, 2.0, 1.0], 2, {"busy_share": 0.6, "steal_share": 0.1})
    assert busy == ["load average 3.0 on 2 CPUs", "other work used 60% of the CPUs",
                    "the hypervisor stole 10% of CPU time"]
    facts = report.facts()
    facts["machine"]["busy"] = busy
    text = "\n".join(report.header(MODES["quick"], [ONE], facts))
    assert "WARNING: the machine was busy at the start (load average 3.0 on 2 CPUs;" in text
    facts["machine"]["busy"] = []
    assert "WARNING" not in "\n".join(report.header(MODES["quick"], [ONE], facts))


def test_plot_groups_say_size_batch_placement_and_carry_min_max() -> None:
    results = session.Results()
    ping = Row("pingpong", 64, 1)
    dgram = Row("dgram", 64, 256)
    for row, base, mine in ((dgram, [100.0, 110.0, 90.0], [200.0, 260.0, 180.0]),
                            (ping, [10.0, 10.0, 10.0], [20.0, 25.0, 15.0])):
        cells = {"base": CellResult(row, "base", "two-cpus", "ok", values=base, p99s=base),
                 "afunix-c": CellResult(row, "afunix-c", "two-cpus", "ok", values=mine,
                                        p99s=mine)}
        results.rows.append(session.RowResult(row, placements(("one-cpu",))[0], cells))
    groups = dict(report.plot_groups(results))
    assert set(groups) == {"DGRAM 64 B x256\n1 CPU", "ping-pong p50 64 B\n1 CPU",
                           "ping-pong p99 64 B\n1 CPU"}
    med, lo, hi = groups["DGRAM 64 B x256\n1 CPU"]["afunix-c"]
    assert (round(med, 3), round(lo, 3), round(hi, 3)) == (2.0, 1.8, 2.6)
    # latency: base time / time, so that higher is better
    med, lo, hi = groups["ping-pong p50 64 B\n1 CPU"]["afunix-c"]
    assert (med, lo, hi) == (0.5, 0.4, 10 / 15)


def test_plot_draws_a_png_or_says_what_is_missing(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    status, out, err = bench(capsys, "--only", "dgram", "--only", "pingpong",
                             "--placement", "one-cpu", "--plot", str(path))
    if report.plot_available():
        assert status == 0
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert status == 2 and not path.exists()
        assert "matplotlib" in err and "pip install 'afunix[plot]'" in err
        assert out == ""  # refused before measuring anything


def test_stream_checker_finds_the_numbers_wherever_reads_cut() -> None:
    size, count = 16, 50
    stream = b"".join(i.to_bytes(8, "little") + bytes(size - 8) for i in range(count))
    rng = random.Random(6)
    checker = StreamChecker(size)
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, 2 * size)
        piece = memoryview(stream)[pos:pos + n]
        checker.feed(piece, len(piece))
        pos += len(piece)
    assert checker.pos == len(stream)
    assert checker.total == count * (count - 1) // 2


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_path_that_cannot_be_written_is_one_line_before_any_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("kept")
    for bad, why in [(tmp_path / "missing-dir" / "out", "No such file or directory"),
                     (tmp_path, "is a directory"),
                     (a_file / "out", "Not a directory")]:
        status, out, err = bench(capsys, "--only", "dgram", option, str(bad))
        assert status == 2
        assert out == ""  # nothing ran
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("afunix bench: cannot write %s %s: " % (option, bad)) and why in err, err
    assert a_file.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_writable_output_path_is_left_as_it_was_until_the_run_writes_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    same = tmp_path / "same"
    status, out, err = bench(capsys, "--only", "dgram", "--json", str(same), "--plot", str(same))
    assert status == 2 and out == "" and "the same file" in err and not same.exists()
    json_path = tmp_path / "out.json"
    json_path.write_text("old")
    # --json passes the check, --plot does not: nothing runs, and the check
    # itself neither truncated the file nor left one behind
    status, out, err = bench(capsys, "--only", "dgram", "--json", str(json_path),
                             "--plot", str(tmp_path / "missing-dir" / "out.png"))
    assert status == 2 and out == "" and "cannot write --plot" in err
    assert json_path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_pin_moves_the_process_where_the_os_module_cannot(backend: str) -> None:
    """The libc path PyPy 3.9 takes (no os.sched_setaffinity), checked on any interpreter."""
    import os

    from conftest import run_python

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    code = (
        "from afunix.bench import affinity\n"
        "def allowed():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return f.read().split('Cpus_allowed_list:')[1].split()[0]\n"
        "for cpu in %r:\n"
        "    affinity._pin_through_libc(cpu)\n"
        "    print(allowed())\n"
        "affinity.pin(%d)\n"
        "print(allowed())\n" % (cpus, cpus[0])
    )
    proc = run_python(code, backend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(cpu) for cpu in cpus] + [str(cpus[0])]


def test_a_plot_format_matplotlib_cannot_write_is_one_line_before_any_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    status, out, err = bench(capsys, "--only", "dgram", "--plot", str(tmp_path / "out.xyz"))
    assert status == 2 and out == ""  # nothing ran
    assert err.count("\n") == 1 and "cannot write --plot" in err and "'xyz'" in err, err
    assert list(tmp_path.iterdir()) == []
