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
