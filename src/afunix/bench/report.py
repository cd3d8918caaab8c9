"""What the benchmark prints and writes: the machine, the table, JSON and a chart."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _backend
from .._version import __version__
from .matrix import IMPLEMENTATIONS, KIB, LABELS, Mode, Row
from .runner import CellResult, Placement, allowed_cpus, median_and_spread
from .workloads import WORKLOADS


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> Dict[str, Any]:
    """The platform the figures belong to."""
    return {
        "afunix": __version__,
        "backend": _backend.name,
        "c_core": "loaded" if _backend.c_core_error is None and _backend.name == "c"
        else (_backend.c_core_error or "not active"),
        "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
        "system": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_allowed": allowed_cpus(),
        "cpu_model": _cpu_model(),
        # Other work on the machine shows as spread: worth seeing next to it.
        "loadavg": list(os.getloadavg()),
    }


def header(mode: Mode, placements: Sequence[Placement]) -> List[str]:
    """The lines above the table: the machine, the method, the placements."""
    m = machine()
    lines = [
        "afunix %s benchmark (%s: warm-up, then %d run%s per cell; median, +-spread = "
        "(max-min)/median)" % (m["afunix"], mode.name, mode.runs, "" if mode.runs == 1 else "s"),
        "machine: %s %s %s, %s CPUs (%s), load %.1f, %s; active backend: %s" % (
            m["system"], m["kernel"], m["arch"], m["cpus"], m["cpu_model"], m["loadavg"][0],
            m["python"], m["backend"]),
    ]
    for p in placements:
        lines.append("placement " + p.describe())
    return lines


def _size(row: Row) -> str:
    if WORKLOADS[row.workload].kind == "pairs":
        return "-"
    if row.size >= KIB and row.size % KIB == 0:
        return "%d KiB" % (row.size // KIB)
    return "%d B" % row.size


def _title(row: Row, p99: bool = False) -> str:
    w = WORKLOADS[row.workload]
    if w.kind == "fds":
        return "fds %d/msg" % row.nfds
    if w.kind == "pingpong":
        return "ping-pong p99" if p99 else "ping-pong p50"
    return {"pairs": "socketpairs", "stream": "STREAM"}.get(w.kind, w.name.upper())


def _number(value: float) -> str:
    if value >= 1e6:
        return "%.2fM" % (value / 1e6)
    if value >= 1e4:
        return "%.0fk" % (value / 1e3)
    if value >= 100:
        return "%.0f" % value
    return "%.1f" % value


def _cell_text(cell: Optional[CellResult], p99: bool) -> str:
    if cell is None or cell.status == "n/a":
        return "n/a"
    if cell.status != "ok":
        return "FAILED"
    values = cell.p99s if p99 else cell.values
    med, spread = median_and_spread(values)
    return "%s +-%.0f%%" % (_number(med), 100 * spread)


def _ratio(num: Optional[CellResult], den: Optional[CellResult], lower_is_better: bool,
           p99: bool) -> str:
    if num is None or den is None or num.status != "ok" or den.status != "ok":
        return "-"
    a = median_and_spread(num.p99s if p99 else num.values)[0]
    b = median_and_spread(den.p99s if p99 else den.values)[0]
    if not a or not b:
        return "-"
    return "%.2fx" % (b / a if lower_is_better else a / b)


Key = Tuple[Row, str]


def group(cells: Sequence[CellResult]) -> List[Tuple[Key, Dict[str, CellResult]]]:
    """Cells by (row, placement), in the order they ran."""
    groups: Dict[Key, Dict[str, CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.row, cell.placement), {})[cell.impl] = cell
    return list(groups.items())


def table(cells: Sequence[CellResult]) -> List[str]:
    """The results table, then a note for every n/a and FAILED cell."""
    heads = ["workload", "size", "batch", "placement", "unit"] + [
        LABELS[i] for i in IMPLEMENTATIONS] + ["afunix/stdlib", "afunix/C"]
    rows: List[List[str]] = []
    notes: List[str] = []
    for (row, placement), by_impl in group(cells):
        w = WORKLOADS[row.workload]
        latency = w.unit == "us"
        for p99 in ((False, True) if latency else (False,)):
            afunix_cell = by_impl.get("afunix-c")
            rows.append([
                _title(row, p99), _size(row), str(row.batch), placement, w.unit,
                *[_cell_text(by_impl.get(i), p99) for i in IMPLEMENTATIONS],
                _ratio(afunix_cell, by_impl.get("stdlib"), latency, p99),
                _ratio(afunix_cell, by_impl.get("c"), latency, p99),
            ])
        for impl in IMPLEMENTATIONS:
            cell = by_impl.get(impl)
            if cell is not None and cell.status == "FAILED":
                notes.append("FAILED %s %s %s %s: %s" % (
                    _title(row), _size(row), placement, LABELS[impl], cell.note))
            elif cell is not None and cell.status == "n/a":
                note = "n/a %s: %s" % (LABELS[impl], cell.note)
                if note not in notes:
                    notes.append(note)
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    left = 2  # workload and size read better left-aligned
    lines = []
    for r in [heads] + rows:
        lines.append("  ".join(
            c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r)
        ).rstrip())
    return lines + [""] + notes if notes else lines


def to_json(cells: Sequence[CellResult], mode: Mode, placements: Sequence[Placement]) -> str:
    """Every figure, with the platform, as JSON."""
    return json.dumps({
        "platform": machine(),
        "mode": {"name": mode.name, "runs": mode.runs, "target_seconds": mode.target_seconds},
        "placements": [p.__dict__ for p in placements],
        "cells": [{
            "key": c.row.key,
            "workload": c.row.workload,
            "size": c.row.size,
            "batch": c.row.batch,
            "nfds": c.row.nfds,
            "implementation": c.impl,
            "placement": c.placement,
            "status": c.status,
            "note": c.note,
            "unit": WORKLOADS[c.row.workload].unit,
            "count_per_run": c.count,
            "runs": c.values,
            "p99_runs": c.p99s,
            "median": c.median if c.values else None,
            "spread": c.spread if c.values else None,
        } for c in cells],
    }, indent=2) + "\n"


PLOT_MISSING = ("--plot needs matplotlib, which is not installed: "
                "pip install 'afunix[plot]' (or pip install matplotlib)")


def plot_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(cells: Sequence[CellResult], path: str) -> None:
    """Draw each implementation's throughput relative to the stdlib loop as bars."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    labels: List[str] = []
    series: Dict[str, List[float]] = {i: [] for i in IMPLEMENTATIONS}
    for (row, placement), by_impl in group(cells):
        base = by_impl.get("stdlib")
        if base is None or base.status != "ok":
            continue
        latency = WORKLOADS[row.workload].unit == "us"
        words = [_title(row).replace(" p50", ""), _size(row), "\n" + placement]
        labels.append(" ".join(w for w in words if w.strip() != "-"))
        for impl in IMPLEMENTATIONS:
            cell = by_impl.get(impl)
            if cell is None or cell.status != "ok" or not cell.median:
                series[impl].append(0.0)
            else:
                # Latency is inverted so that, everywhere, higher is better.
                series[impl].append(base.median / cell.median if latency
                                    else cell.median / base.median)
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = plt.subplots(figsize=(max(9.0, 0.8 * len(labels)), 6.0))
    width = 0.8 / len(IMPLEMENTATIONS)
    for k, impl in enumerate(IMPLEMENTATIONS):
        xs = [i + (k - (len(IMPLEMENTATIONS) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, series[impl], width, label=LABELS[impl])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(0.1, 0.2, 0.5, 1.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=()))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: "%gx" % y))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("throughput relative to the stdlib loop (log; latency inverted)")
    m = machine()
    ax.set_title("afunix %s on %s %s, %s CPUs, %s" % (
        m["afunix"], m["system"], m["kernel"], m["cpus"], m["python"]), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(done: int, total: int, cell: CellResult) -> None:
    """One line on stderr per finished cell (overwritten in place on a terminal)."""
    text = _cell_text(cell, False) if cell.status == "ok" else cell.status
    line = "[%*d/%d] %s %s %s %s: %s" % (
        len(str(total)), done, total, _title(cell.row).replace(" p50", ""), _size(cell.row),
        cell.placement, LABELS[cell.impl], text)
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        sys.stderr.write("\r\x1b[K" + line + end)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
