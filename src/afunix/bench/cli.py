"""``python -m afunix bench``: run the matrix, print the table, write JSON or a chart."""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from typing import List, Optional

from . import report
from .matrix import IMPLEMENTATIONS, MATRIX, MODES, PLACEMENTS, Row
from .runner import CellResult, Placement, placements, run_cell
from .workloads import WORKLOADS, unavailable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the bench options on `parser` (the ``bench`` subcommand)."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter runs: about 20 s instead of about 2 minutes")
    parser.add_argument("--only", action="append", choices=sorted(WORKLOADS), metavar="WORKLOAD",
                        help="run only this workload (repeatable): %s" % ", ".join(WORKLOADS))
    parser.add_argument("--placement", choices=PLACEMENTS + ("both",), default="both",
                        help="sender and receiver on two CPUs, on one CPU, or both (default)")
    parser.add_argument("--json", metavar="FILE", help="write every figure and the platform as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw throughput relative to the stdlib (needs matplotlib)")
    # For the tests: a tiny matrix (one run of a fixed small count per cell).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)


def _rows(only: Optional[List[str]], quick: bool) -> List[Row]:
    # --only names workloads outright; --quick alone keeps the rows marked quick
    if only:
        return [row for row in MATRIX if row.workload in only]
    return [row for row in MATRIX if row.quick or not quick]


def _raise_fd_limit() -> None:
    # Descriptors in flight count against the sender's RLIMIT_NOFILE
    # (ETOOMANYREFS): a full queue of 16-descriptor messages passes 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _unwritable(path: str) -> Optional[str]:
    """Why `path` cannot be written (without changing it, or leaving a file), or None."""
    if os.path.isdir(path):
        return "it is a directory"
    try:
        if os.path.exists(path):
            open(path, "ab").close()  # append mode: opened for writing, not truncated
        else:
            # a nameless file in the same directory: created and gone again
            with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
                pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as `args` say; return the exit status."""
    # Output paths are checked before anything runs: a bad one is a line
    # now, not a traceback after minutes of measuring.
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        sys.stderr.write("afunix bench: --json and --plot name the same file: %s\n" % args.json)
        return 2
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        why = _unwritable(path) if path else None
        if why is not None:
            sys.stderr.write("afunix bench: cannot write %s %s: %s\n" % (option, path, why))
            return 2
    if args.plot and not report.plot_available():
        sys.stderr.write(report.PLOT_MISSING + "\n")
        return 2
    mode = MODES["tiny" if args.tiny else "quick" if args.quick else "default"]
    if args.runs or args.messages:
        from dataclasses import replace
        mode = replace(mode, runs=args.runs or mode.runs,
                       fixed_count=args.messages or mode.fixed_count)
    names = PLACEMENTS if args.placement == "both" else (args.placement,)
    where = placements(names)
    if not where:
        sys.stderr.write("placement %s needs 2 CPUs; this process may use %d\n"
                         % (args.placement, len(placements(("one-cpu",)))))
        return 2
    _raise_fd_limit()
    plan: List[tuple[Row, str, Placement]] = []
    for row in _rows(args.only, args.quick):
        for p in (where if WORKLOADS[row.workload].two_process else where[:1]):
            for impl in IMPLEMENTATIONS:
                plan.append((row, impl, p))
    started = time.monotonic()
    cells: List[CellResult] = []
    for done, (row, impl, p) in enumerate(plan, 1):
        reason = unavailable(WORKLOADS[row.workload], impl)
        if reason is not None:
            name = p.name if WORKLOADS[row.workload].two_process else "-"
            cell = CellResult(row, impl, name, "n/a", reason)
        else:
            cell = run_cell(row, impl, p, mode)
        cells.append(cell)
        report.progress(done, len(plan), cell)
    out = report.header(mode, where) + [""] + report.table(cells)
    out.append("")
    out.append("(%d cells in %.0f s; afunix/stdlib and afunix/C compare afunix[c], "
               "> 1 means afunix is faster)" % (len(cells), time.monotonic() - started))
    sys.stdout.write("\n".join(out) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(cells, mode, where))
    if args.plot:
        report.plot(cells, args.plot)
    return 1 if any(c.status == "FAILED" for c in cells) else 0
