"""Command line: ``python -m afunix info`` and ``python -m afunix bench``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afunix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backend, capabilities and kernel limits")
    bench = sub.add_parser("bench", help="afunix against the stdlib and plain C, on this machine")
    # Imported here, not at the top, so that `info` does not load the
    # benchmark and its workloads (no cycle: the bench imports afunix, never this).
    from .bench import cli as bench_cli
    bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "info":
        sys.stdout.write(info.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
