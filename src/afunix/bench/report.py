"""What the benchmark prints and writes: the header, the table, what each column measured, JSON, a chart.

The table fits 100 columns: a row label (workload, size, batch), the
placement, the unit, the four columns and two ratios; a noisy row gets a
second line saying so.  Under the table every workload present is spelled
out column by column, so that no figure stands without what it measured.
"""
from __future__ import annotations

import datetime
import json
import sys
import textwrap
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import machine as _machine
from . import schema
from .matrix import IMPLEMENTATIONS, KIB, LABELS, MIB, Mode, Row
from .runner import CellResult, Placement, median_and_spread
from .session import Results, RowResult
from .registry import WORKLOADS
from .workloads import Workload

WIDTH = 100
#: label, placement, unit, four cells, two ratios
COLUMN_WIDTHS = (22, 3, 6, 10, 10, 10, 10, 7, 7)
_SHORT_UNITS = {"pairs/s": "pair/s", "msgs/s": "msg/s"}
_CPUS = {"two-cpus": "2", "one-cpu": "1", "-": "-"}


# ---- the header ----------------------------------------------------------------------

def wrapped(text: str, initial_indent: str = "", subsequent_indent: str = "  ") -> List[str]:
    """`text` in lines of at most WIDTH columns, never broken inside a word or at a hyphen:
    paths and names stay whole, to be copied (one longer than WIDTH gets a line of its own)."""
    return textwrap.wrap(text, WIDTH, initial_indent=initial_indent,
                         subsequent_indent=subsequent_indent, break_long_words=False,
                         break_on_hyphens=False)


def header(mode: Mode, placements: Sequence[Placement], facts: Dict[str, Any]) -> List[str]:
    """The lines above the table: method, machine, interpreter, placements, columns, warnings."""
    m, interp, backend = facts["machine"], facts["interpreter"], facts["backend"]
    reruns = "a row spreading over %.0f%% is " % (100 * mode.noise_limit)
    if mode.reruns:
        reruns += "re-run up to %d times" % mode.reruns
        if mode.rerun_budget is not None:
            reruns += " (while the session is under %.0f s)" % mode.rerun_budget
        reruns += ", then"
    lines = wrapped(
        "afunix %s benchmark, %s mode: each cell is calibrated by 1-3 short runs, then measured "
        "%d time%s; a row's columns run in interleaved rounds (A B C D, A B C D, ...); a figure is "
        "the median of its runs, +-(max-min)/median; %s marked noisy." % (
            facts["afunix"], mode.name, mode.runs, "" if mode.runs == 1 else "s", reruns))
    load = " ".join("%.2f" % v for v in m["loadavg"]) or "unknown"
    lines += wrapped("machine: %s %s %s, %s CPUs (%s), load average %s at the start" % (
        m["system"], m["kernel"], m["arch"], m["cpus"], m["cpu_model"], load))
    lines += wrapped("interpreter: %s %s%s; active backend: %s (C core: %s)" % (
        interp["implementation"], interp["version"],
        ", cffi %s" % interp["cffi"] if interp.get("cffi") else "",
        backend["active"], backend["c_core"]))
    where = "; ".join("cpu %s = %s" % (_CPUS[p.name], p.describe().split(": ", 1)[1])
                      for p in placements)
    lines += wrapped("placement: %s; cpu - = one process. A peer's own threads (pyzmq's I/O "
                   "thread, nng's, a Queue's feeder) run on its process's CPU." % where)
    lines += wrapped("columns: base = what Python programs use today for the row's job; "
                   "af[stdlib], af[c] = afunix on its stdlib and C backends; C = the same "
                   "operation in plain C (same socket type, batch and placement), empty where "
                   "there is none; af/base, af/C = af[c] against them, > 1 means afunix is "
                   "faster (times inverted). Each row's columns are spelled out under the table.")
    if m.get("busy"):
        lines += wrapped("WARNING: the machine was busy at the start (%s): expect spread and "
                       "noisy rows; measure again on a quiet machine before quoting figures."
                       % "; ".join(m["busy"]))
    return lines


# ---- the table ----------------------------------------------------------------------

def _size(row: Row) -> str:
    if WORKLOADS[row.workload].kind == "pairs":
        return ""
    for unit, name in ((MIB, "MiB"), (KIB, "KiB")):
        if row.size >= unit and row.size % unit == 0:
            return "%d %s" % (row.size // unit, name)
    return "%d B" % row.size


def label(row: Row, metric: str = "") -> str:
    """The row's name in the table and the chart: workload, size, batch (and p50/p99)."""
    w = WORKLOADS[row.workload]
    title = "fds %d/msg" % row.nfds if w.name == "fds" else w.title
    if metric:
        title += " " + metric
    words = [title, _size(row)]
    if row.batch > 1:
        words.append("x%d" % row.batch)
    return " ".join(word for word in words if word)


def number(value: float) -> str:
    """A figure in at most 5 characters: 3 significant digits and a k/M/G suffix."""
    sign, value = ("-", -value) if value < 0 else ("", value)
    if value < 1000:
        text = "%.3g" % value if value >= 1 else "%.2f" % value
        if "e" not in text:
            return sign + text
    if value < 10000:
        return sign + "%.0f" % value
    for scale, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G")):
        scaled = value / scale
        text = "%.3g" % scaled
        if scaled < 999.5 and "e" not in text:
            return sign + text + suffix
    return sign + "%.3gT" % (value / 1e12)


def spread_text(spread: float) -> str:
    """A spread in at most 3 characters: "7%", "45%"; from 100% on as a multiple, "2x"."""
    if spread < 0.995:
        return "%d%%" % round(100 * spread)
    return "%dx" % min(99, round(spread))


def _figure(values: Sequence[float]) -> str:
    med, spread = median_and_spread(values)
    text = "%s +-%s" % (number(med), spread_text(spread))
    return text if len(text) <= 10 else text.replace(" ", "")


def _cell_text(cell: Optional[CellResult], metric: str) -> str:
    if cell is None:
        return ""
    if cell.status == "n/a":
        return "n/a"
    if cell.status != "ok":
        return "FAILED"
    values = cell.p99s if metric == "p99" else cell.values
    return _figure(values) if values else "-"


def _median(cell: Optional[CellResult], metric: str) -> Optional[float]:
    if cell is None or cell.status != "ok":
        return None
    values = cell.p99s if metric == "p99" else cell.values
    return median_and_spread(values)[0] if values else None


def ratio(num: Optional[float], den: Optional[float], lower_is_better: bool) -> str:
    """num against den as 'N.NNx', > 1 when num is better; '-' when either is missing."""
    if not num or not den:
        return "-"
    r = den / num if lower_is_better else num / den
    return "%.2fx" % r if r < 10 else "%.1fx" % r if r < 100 else "%.0fx" % r


def _line(fields: Sequence[str]) -> str:
    out = [fields[0].ljust(COLUMN_WIDTHS[0])]
    for i, text in enumerate(fields[1:], 1):
        out.append(text.rjust(COLUMN_WIDTHS[i]))
    return (out[0] + " " + out[1] + "".join("  " + f for f in out[2:])).rstrip()


def _metrics(workload: Workload) -> Tuple[str, ...]:
    return ("p50", "p99") if workload.kind == "pingpong" else ("",)


def goal_met(result: RowResult) -> Optional[bool]:
    """Whether af/base (af[c] against base) reached the row's goal; None without both figures."""
    w = WORKLOADS[result.row.workload]
    mine = _median(result.cells.get("afunix-c"), "")
    base = _median(result.cells.get("base"), "")
    if not mine or not base:
        return None
    return (base / mine if w.lower_is_better else mine / base) >= result.row.goal


def goal_text(result: RowResult) -> str:
    """The row's goal and whether this run reached it, for the line under the row."""
    w = WORKLOADS[result.row.workload]
    want = "goal: af/base >= %gx" % result.row.goal
    met = goal_met(result)
    if met is None:
        missing = [LABELS[i] for i in ("base", "afunix-c")
                   if _median(result.cells.get(i), "") is None]
        return "%s: no figure (%s: no measurement)" % (want, ", ".join(missing))
    got = ratio(_median(result.cells.get("afunix-c"), ""), _median(result.cells.get("base"), ""),
                w.lower_is_better)
    return "%s: %s (%s in this run)" % (want, "met" if met else "NOT met", got)


def table(results: Results) -> List[str]:
    """The results table (at most 100 columns), then a note per n/a, FAILED and skipped row."""
    heads = ["row", "cpu", "unit", *[LABELS[i] for i in IMPLEMENTATIONS], "af/base", "af/C"]
    lines = [_line(heads)]
    notes: List[str] = []
    for result in results.rows:
        w = WORKLOADS[result.row.workload]
        cells = result.cells
        for metric in _metrics(w):
            mine = _median(cells.get("afunix-c"), metric)
            lines.append(_line([
                label(result.row, metric), _CPUS[result.placement_name],
                _SHORT_UNITS.get(w.unit, w.unit),
                *[_cell_text(cells.get(i), metric) for i in IMPLEMENTATIONS],
                ratio(mine, _median(cells.get("base"), metric), w.lower_is_better),
                ratio(mine, _median(cells.get("c"), metric), w.lower_is_better),
            ]))
        if result.noisy:
            lines.append("  ^ noisy: a column spread %.0f%% (limit %.0f%%) after %d measurement%s"
                         % (100 * result.spread, 100 * results.noise_limit, result.attempts,
                            "" if result.attempts == 1 else "s"))
        if result.row.goal:
            lines.append("  ^ " + goal_text(result))
        for impl in IMPLEMENTATIONS:
            cell = cells.get(impl)
            if cell is not None and cell.status == "FAILED":
                notes += wrapped("FAILED %s cpu %s %s: %s" % (
                    label(result.row), _CPUS[result.placement_name], LABELS[impl], cell.note))
            elif cell is not None and cell.status == "n/a":
                note = wrapped("n/a %s: %s" % (LABELS[impl], cell.note))
                if note[0] not in notes:
                    notes += note
    for line in results.skipped:
        notes += wrapped(line)
    return lines + ([""] + notes if notes else [])


def legend(results: Results) -> List[str]:
    """What each column of each workload in `results` measured, in words."""
    lines = ["What each row's columns ran (af = afunix, on either backend):"]
    seen: Dict[Tuple[str, str, str], List[str]] = {}
    for result in results.rows:
        w = WORKLOADS[result.row.workload]
        title = "fds" if w.name == "fds" else w.title
        names = seen.setdefault((w.base, w.afunix, w.c), [])
        if title not in names:
            names.append(title)
    for (base, afunix_text, c), titles in seen.items():
        parts = ["base: " + base if base else "no base",
                 "af: " + afunix_text if afunix_text else "no af",
                 "C: " + c if c else "no C"]
        lines += wrapped("%s -- %s." % (", ".join(titles), "; ".join(parts)), "- ", "    ")
    return lines


def footer(results: Results) -> List[str]:
    """The last lines: what the session did, in how long."""
    noisy = sum(r.noisy for r in results.rows)
    text = "(%d rows, %d cells in %.0f s; %d re-run%s; %d row%s noisy" % (
        len(results.rows), len(results.cells), results.elapsed, results.reruns,
        "" if results.reruns == 1 else "s", noisy, "" if noisy == 1 else "s")
    if results.not_rerun:
        text += "; %d noisy row%s not re-run: the time budget was spent" % (
            results.not_rerun, "" if results.not_rerun == 1 else "s")
    goals = [goal_met(r) for r in results.rows if r.row.goal]
    if goals:
        text += "; goals met in %d of %d rows" % (sum(g is True for g in goals), len(goals))
        if None in goals:
            text += " (%d without a figure)" % goals.count(None)
    return wrapped(text + ")")


# ---- JSON -------------------------------------------------------------------------------

def facts() -> Dict[str, Any]:
    """The machine, interpreter and backend, read once at the start of a session."""
    return {"afunix": _machine.afunix_version(), "machine": _machine.machine(),
            "interpreter": _machine.interpreter(), "backend": _machine.backend()}


def _cell_json(cell: CellResult) -> Dict[str, Any]:
    w = WORKLOADS[cell.row.workload]
    ok = cell.status == "ok" and bool(cell.values)
    return {
        "key": cell.row.key,
        "workload": cell.row.workload,
        "size": cell.row.size,
        "batch": cell.row.batch,
        "nfds": cell.row.nfds,
        "placement": cell.placement,
        "implementation": cell.impl,
        "measures": {"base": w.base, "c": w.c}.get(cell.impl, w.afunix),
        "status": cell.status,
        "note": cell.note,
        "unit": w.unit,
        "lower_is_better": w.lower_is_better,
        "count_per_run": cell.count,
        "runs": cell.values,
        "p99_runs": cell.p99s,
        "median": cell.median if ok else None,
        "spread": cell.spread if ok else None,
        "min": min(cell.values) if ok else None,
        "max": max(cell.values) if ok else None,
        "noisy": cell.noisy,
        "attempts": [{"runs": runs, "p99_runs": p99s} for runs, p99s in cell.attempts],
    }


def to_json(results: Results, mode: Mode, placements: Sequence[Placement],
            session_facts: Dict[str, Any], command: Sequence[str] = ()) -> str:
    """Every figure, with the machine, interpreter and backend, as JSON (schema.SCHEMA)."""
    doc = {
        "schema": schema.NAME,
        "version": schema.VERSION,
        "afunix": session_facts["afunix"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "machine": session_facts["machine"],
        "interpreter": session_facts["interpreter"],
        "backend": session_facts["backend"],
        "mode": {"name": mode.name, "runs": mode.runs, "target_seconds": mode.target_seconds,
                 "noise_limit": mode.noise_limit, "reruns": mode.reruns},
        "placements": [p.__dict__ for p in placements],
        "rows": [{"key": r.row.key, "placement": r.placement_name, "noisy": r.noisy,
                  "attempts": r.attempts, "spread": r.spread, "goal": r.row.goal or None,
                  "goal_met": goal_met(r) if r.row.goal else None} for r in results.rows],
        "skipped": results.skipped,
        "elapsed_seconds": results.elapsed,
        "cells": [_cell_json(c) for c in results.cells],
    }
    return json.dumps(doc, indent=2) + "\n"


# ---- the chart ----------------------------------------------------------------------------

PLOT_MISSING = ("--plot needs matplotlib, which is not installed: "
                "pip install 'afunix[plot]' (or pip install matplotlib)")


def plot_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_format_problem(path: str) -> Optional[str]:
    """Why matplotlib cannot write a figure to `path` (its extension), or None when it can."""
    import matplotlib
    matplotlib.use("Agg")  # no display: render to files only
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in formats:
        return "matplotlib cannot write %r files (use one of: %s)" % (
            ext or "extension-less", ", ".join(sorted(formats)))
    return None


Group = Tuple[str, Dict[str, Tuple[float, float, float]]]


def plot_groups(results: Results) -> List[Group]:
    """(label, impl -> (median, min, max) relative to the base median) per row with a base.

    Relative figures are "times the base's speed": times (latency) are
    inverted, so everywhere higher is better.
    """
    groups: List[Group] = []
    for result in results.rows:
        w = WORKLOADS[result.row.workload]
        for metric in _metrics(w):
            base = _median(result.cells.get("base"), metric)
            if not base:
                continue
            bars: Dict[str, Tuple[float, float, float]] = {}
            for impl in IMPLEMENTATIONS:
                cell = result.cells.get(impl)
                values = (cell.p99s if metric == "p99" else cell.values) if cell else []
                if cell is None or cell.status != "ok" or not values:
                    continue
                rel = sorted((base / v if w.lower_is_better else v / base) for v in values
                             if v > 0)
                if rel:
                    med = median_and_spread(rel)[0]
                    bars[impl] = (med, rel[0], rel[-1])
            cpus = {"two-cpus": "2 CPUs", "one-cpu": "1 CPU"}.get(result.placement_name,
                                                                     "1 process")
            text = "%s\n%s%s" % (label(result.row, metric), cpus,
                                 " (noisy)" if result.noisy else "")
            groups.append((text, bars))
    return groups


#: Groups per panel of the chart: more are drawn as further panels, below.
PANEL_GROUPS = 14


def plot(results: Results, path: str, session_facts: Dict[str, Any]) -> None:
    """Draw each column's speed relative to its row's base, with min-max error bars."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    groups = plot_groups(results)
    panels = [groups[i:i + PANEL_GROUPS] for i in range(0, len(groups), PANEL_GROUPS)] or [[]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14.0, 1.0 + 4.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(IMPLEMENTATIONS)
    for panel, ax in zip(panels, axes[:, 0]):
        for k, impl in enumerate(IMPLEMENTATIONS):
            xs, meds, lows, highs = [], [], [], []
            for i, (_, bars) in enumerate(panel):
                if impl in bars:
                    med, lo, hi = bars[impl]
                    xs.append(i + (k - (len(IMPLEMENTATIONS) - 1) / 2) * width)
                    meds.append(med)
                    lows.append(med - lo)
                    highs.append(hi - med)
            ax.bar(xs, meds, width, yerr=[lows, highs], capsize=2, label=LABELS[impl],
                   color="C%d" % k, error_kw={"elinewidth": 0.8, "ecolor": "black"})
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(), numticks=30))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: "%gx" % y))
        ax.set_xticks(range(len(panel)))
        ax.set_xticklabels([text.replace(" ", "\n", 1) if "\n" in text else text
                            for text, _ in panel], fontsize=7)
        ax.set_xlim(-0.6, PANEL_GROUPS - 0.4)
        ax.set_ylabel("x the base (log)", fontsize=8)
        ax.grid(axis="y", linewidth=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    interp, m = session_facts["interpreter"], session_facts["machine"]
    fig.suptitle("afunix %s, %s %s, %s %s, %s CPUs: each column's speed relative to its row's "
                 "base (latency p50/p99: base time / time)\nbar: median of the runs; whiskers: "
                 "slowest to fastest run; rows without a base column are in the table only" % (
                     session_facts["afunix"], interp["implementation"], interp["version"],
                     m["system"], m["kernel"], m["cpus"]), fontsize=9)
    top = 1 - 0.75 / (1.0 + 4.2 * len(panels))
    fig.legend(handles, names, loc="upper center", ncol=len(IMPLEMENTATIONS), fontsize=8,
               bbox_to_anchor=(0.5, top), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top - 0.25 / (1.0 + 4.2 * len(panels))))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- progress ------------------------------------------------------------------------------

def progress(done: int, total: int, result: RowResult, what: str) -> None:
    """One line on stderr per measured row (overwritten in place on a terminal)."""
    figures = " | ".join("%s %s" % (LABELS[impl], _cell_text(cell, "p50" if
                                    WORKLOADS[result.row.workload].kind == "pingpong" else ""))
                         for impl, cell in result.cells.items())
    line = "[%*d/%d]%s %s cpu %s: %s" % (
        len(str(total)), done, total, " " + what if what else "", label(result.row),
        _CPUS[result.placement_name], figures)
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K" + line[:WIDTH] + ("\n" if done == total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
