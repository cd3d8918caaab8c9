"""``python -m afunix bench``: run the matrix, print the table, write JSON or a chart, compare."""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from dataclasses import replace
from typing import List, Optional

from . import compare, report
from .matrix import MATRIX, MODES, PLACEMENTS, Row
from .runner import placements
from .session import measure
from .registry import WORKLOADS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the bench options on `parser` (the ``bench`` subcommand)."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows, shorter runs: about 30 s instead of several minutes")
    parser.add_argument("--only", action="append", choices=sorted(WORKLOADS), metavar="WORKLOAD",
                        help="run only this workload (repeatable): %s" % ", ".join(WORKLOADS))
    parser.add_argument("--placement", choices=PLACEMENTS + ("both",), default="both",
                        help="sender and receiver on two CPUs, on one CPU, or both (default)")
    parser.add_argument("--json", metavar="FILE",
                        help="write every run's figure, the machine, interpreter and backend as "
                             "JSON (the schema is afunix.bench.schema)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw speed relative to each row's base (needs matplotlib)")
    parser.add_argument("--compare", nargs="+", metavar="FILE.json",
                        help="OLD.json: run, then print each cell's ratio against that earlier "
                             "run; OLD.json NEW.json: compare two files without running")
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


def _compare_files(paths: List[str]) -> int:
    if len(paths) > 2:
        sys.stderr.write("--compare takes OLD.json, or OLD.json NEW.json\n")
        return 2
    try:
        docs = [compare.load(path) for path in paths]
    except compare.CompareError as exc:
        sys.stderr.write("--compare: %s\n" % exc)
        return 2
    if len(docs) == 2:
        sys.stdout.write("\n".join(compare.compare(docs[0], docs[1], paths[0], paths[1])) + "\n")
    return 0


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
    problem = report.plot_format_problem(args.plot) if args.plot else None
    if problem is not None:
        sys.stderr.write("afunix bench: cannot write --plot %s: %s\n" % (args.plot, problem))
        return 2
    old = None
    if args.compare:
        # Read (and so check) the files before measuring anything.
        status = _compare_files(args.compare)
        if status or len(args.compare) == 2:
            return status
        old = compare.load(args.compare[0])
    mode = MODES["tiny" if args.tiny else "quick" if args.quick else "default"]
    if args.runs or args.messages:
        mode = replace(mode, runs=args.runs or mode.runs,
                       fixed_count=args.messages or mode.fixed_count)
    names = PLACEMENTS if args.placement == "both" else (args.placement,)
    where = placements(names)
    if not where:
        sys.stderr.write("placement %s needs 2 CPUs; this process may use %d\n"
                         % (args.placement, len(placements(("one-cpu",)))))
        return 2
    _raise_fd_limit()
    facts = report.facts()
    results = measure(_rows(args.only, args.quick), where, mode, report.progress)
    out = report.header(mode, where, facts) + [""] + report.table(results)
    out += [""] + report.legend(results) + [""] + report.footer(results)
    sys.stdout.write("\n".join(out) + "\n")
    text = report.to_json(results, mode, where, facts, sys.argv)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    if args.plot:
        report.plot(results, args.plot, facts)
    if old is not None:
        new = json.loads(text)
        lines = compare.compare(old, new, args.compare[0])
        sys.stdout.write("\n" + "\n".join(lines) + "\n")
    return 1 if any(c.status == "FAILED" for c in results.cells) else 0
