"""``python -m afunix bench --compare OLD.json [NEW.json]``: per-cell ratios against an earlier run.

Cells are matched by row key, placement and column (and p50/p99 for
latency).  The ratio is the new speed over the old (times are inverted),
so > 1 means faster now; it is called faster or slower only when the two
runs' ranges (min to max) do not overlap, otherwise "~ noise", as a
regression check should.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

from . import schema
from .matrix import LABELS, Row
from .report import WIDTH, label, number, wrapped
from .registry import WORKLOADS

CellKey = Tuple[str, str, str, str]  # row key, placement, implementation, metric


class CompareError(ValueError):
    """A file --compare cannot read: missing, not JSON, or not this schema."""


def load(path: str) -> Dict[str, Any]:
    """Read a --json file; CompareError unless it follows schema.SCHEMA."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise CompareError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except ValueError as exc:
        raise CompareError("%s is not JSON: %s" % (path, exc)) from None
    if isinstance(doc, dict) and "schema" not in doc and "cells" in doc:
        raise CompareError("%s was written before the JSON had a schema (version 1): run the "
                           "benchmark again to compare" % path)
    errors = schema.validate(doc)
    if errors:
        raise CompareError("%s is not a benchmark result (schema %s version %d): %s" % (
            path, schema.NAME, schema.VERSION, "; ".join(errors[:3])))
    return dict(doc)


def _figures(doc: Dict[str, Any]) -> Dict[CellKey, Tuple[Dict[str, Any], List[float]]]:
    out: Dict[CellKey, Tuple[Dict[str, Any], List[float]]] = {}
    for cell in doc["cells"]:
        if cell["status"] != "ok":
            continue
        for metric, runs in (("", cell["runs"]), ("p99", cell.get("p99_runs") or [])):
            if runs:
                out[(cell["key"], cell["placement"], cell["implementation"], metric)] = (cell, runs)
    return out


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _row_label(cell: Dict[str, Any], metric: str) -> str:
    if cell["workload"] in WORKLOADS:
        row = Row(cell["workload"], cell["size"], cell["batch"], cell["nfds"])
        if WORKLOADS[cell["workload"]].kind == "pingpong":
            metric = metric or "p50"
        return label(row, metric)
    return str(cell["key"]) + (" " + metric if metric else "")


def speed_ratio(old: float, new: float, lower_is_better: bool) -> Optional[float]:
    """New speed over old (> 1: faster now); None when either figure is not positive."""
    if old <= 0 or new <= 0:
        return None
    return old / new if lower_is_better else new / old


def verdict(old: List[float], new: List[float], lower_is_better: bool) -> str:
    """"faster" or "slower" when the runs' ranges do not overlap, else "~ noise"."""
    if min(new) > max(old):
        return "slower" if lower_is_better else "faster"
    if max(new) < min(old):
        return "faster" if lower_is_better else "slower"
    return "~ noise"


def compare(old: Dict[str, Any], new: Dict[str, Any], old_name: str = "OLD",
            new_name: str = "this run") -> List[str]:
    """The comparison table of `new` against `old`, at most 100 columns wide."""
    lines = wrapped("comparison: %s against %s" % (new_name, old_name))
    for name, doc in ((old_name, old), (new_name, new)):
        i, m = doc["interpreter"], doc["machine"]
        lines += wrapped("%s: afunix %s, %s %s, backend %s, %s %s, %s CPUs, %s" % (
            name, doc["afunix"], i["implementation"], i["version"], doc["backend"]["active"],
            m["system"], m["kernel"], m["cpus"], doc["created"]), "  ", "    ")
    if (old["interpreter"]["implementation"], old["machine"]["cpus"]) != \
            (new["interpreter"]["implementation"], new["machine"]["cpus"]):
        lines.append("  note: the interpreters or machines differ: the ratios compare those too")
    lines.append("ratio = new speed / old speed (times inverted): > 1 is faster now; faster or "
                 "slower only")
    lines.append("  when the runs' min-max ranges do not overlap")
    lines.append("")
    head = "%-22s %3s  %-10s %10s %10s %7s  %s" % ("row", "cpu", "column", "old", "new",
                                                   "ratio", "")
    lines.append(head.rstrip())
    olds, news = _figures(old), _figures(new)
    ratios: List[float] = []
    for key, (cell, runs) in news.items():
        if key not in olds:
            continue
        old_cell, old_runs = olds[key]
        lower = bool(cell.get("lower_is_better", cell["unit"] in ("us", "ns")))
        r = speed_ratio(_median(old_runs), _median(runs), lower)
        if r is None:
            ratio_text, word = "-", ""
        else:
            ratio_text, word = "%.2fx" % r, verdict(old_runs, runs, lower)
            ratios.append(r)
        cpu = {"two-cpus": "2", "one-cpu": "1"}.get(cell["placement"], "-")
        lines.append(("%-22s %3s  %-10s %10s %10s %7s  %s" % (
            _row_label(cell, key[3])[:22], cpu, LABELS.get(cell["implementation"],
                                                           cell["implementation"]),
            number(_median(old_runs)) + " " + _short(cell["unit"]),
            number(_median(runs)) + " " + _short(cell["unit"]), ratio_text, word)).rstrip())
    only_old = len(set(olds) - set(news))
    only_new = len(set(news) - set(olds))
    lines.append("")
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines.append("%d cells compared; geometric mean of the ratios %.2fx" % (len(ratios), geo))
    else:
        lines.append("no cell in common")
    if only_old or only_new:
        lines += wrapped("%d cells only in %s, %d only in %s (rows or columns that differ)"
                         % (only_old, old_name, only_new, new_name))
    return lines


def _short(unit: str) -> str:
    return {"pairs/s": "p/s", "msgs/s": "m/s"}.get(unit, unit)
