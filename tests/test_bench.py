"""python -m afunix bench: the table, verification (FAILED, never a figure), JSON, plot."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import afunix
from afunix.__main__ import main
from afunix.bench import report, workloads
from afunix.bench.matrix import MATRIX, Row
from afunix.bench.workloads import Received, StreamChecker


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["bench", "--tiny", *args])
    out, err = capsys.readouterr()
    return status, out, err


def dgram_rows(out: str) -> list[list[str]]:
    """The DGRAM rows of the table, split into columns (two or more spaces apart)."""
    return [re.split(r"\s{2,}", line) for line in out.splitlines() if line.startswith("DGRAM ")]


def test_tiny_matrix_prints_the_table(capsys: pytest.CaptureFixture[str],
                                      fd_baseline: set[int]) -> None:
    status, out, err = bench(capsys)
    assert status == 0, out
    assert "FAILED" not in out
    for head in ("stdlib loop", "afunix[stdlib]", "afunix[c]", "C reference",
                 "afunix/stdlib", "afunix/C"):
        assert head in out
    for title in ("socketpairs", "DGRAM", "SEQPACKET", "STREAM", "fds 1/msg", "fds 16/msg",
                  "ping-pong p50", "ping-pong p99"):
        assert "\n" + title in out
    assert "placement two-cpus" in out or "placement one-cpu" in out
    assert "machine: " in out and afunix.__version__ in out
    # Progress went to stderr: a line per cell, the last one [N/N].
    assert re.search(r"\[(\d+)/\1\] ping-pong", err), err


def test_only_and_placement_select(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = bench(capsys, "--only", "dgram", "--placement", "one-cpu")
    assert status == 0
    rows = dgram_rows(out)
    expected = [r for r in MATRIX if r.workload == "dgram"]
    assert len(rows) == len(expected) and all(row[3] == "one-cpu" for row in rows)
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
    monkeypatch.setitem(workloads.RECEIVERS, ("messages", "stdlib"), receiver)
    status, out, _ = bench(capsys, "--only", "dgram", "--placement", "one-cpu")
    assert status == 1
    for row in dgram_rows(out):
        assert row[5] == "FAILED", row
    failures = [line for line in out.splitlines() if line.startswith("FAILED DGRAM")]
    dgram_rows_in_matrix = [r for r in MATRIX if r.workload == "dgram"]
    assert len(failures) == len(dgram_rows_in_matrix), out
    assert all(why in line for line in failures), out


def test_missing_api_is_not_available(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(afunix, "RecvBatch", raising=False)
    status, out, _ = bench(capsys, "--only", "dgram", "--placement", "one-cpu")
    assert status == 0
    for row in dgram_rows(out):
        assert row[6:8] == ["n/a", "n/a"], row
    assert "not available: afunix.RecvBatch" in out


def test_json_has_every_figure_and_the_platform(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    status, _, _ = bench(capsys, "--only", "pingpong", "--only", "socketpairs",
                         "--json", str(path))
    assert status == 0
    data = json.loads(path.read_text())
    for key in ("afunix", "backend", "python", "kernel", "cpus"):
        assert key in data["platform"]
    cells = data["cells"]
    assert {c["workload"] for c in cells} == {"pingpong", "socketpairs"}
    for c in cells:
        if c["status"] == "ok":
            assert len(c["runs"]) == 1 and c["median"] > 0
            if c["workload"] == "pingpong":
                assert c["unit"] == "us" and len(c["p99_runs"]) == 1


def test_plot_draws_a_png_or_says_what_is_missing(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    status, out, err = bench(capsys, "--only", "dgram", "--placement", "one-cpu",
                             "--plot", str(path))
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
