"""The JSON that ``python -m afunix bench --json FILE`` writes: its schema, and a check of it.

The schema is JSON Schema (a subset: type, required, properties, items,
enum, description), so other tools can read it; `validate` checks a
document against it without any dependency.  `--compare` refuses a file
that does not pass.  Bump VERSION when a field changes meaning or goes
away; adding a field keeps it.

Version 1 was the layout before the schema existed ("platform" and "cells",
no "schema" key); it is not readable by --compare.
"""
from __future__ import annotations

from typing import Any, Dict, List

NAME = "afunix-bench"
VERSION = 2

_NUMBERS = {"type": "array", "items": {"type": "number"}}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}

CELL: Dict[str, Any] = {
    "type": "object",
    "description": "One implementation (column) of one row at one placement.",
    "required": ["key", "workload", "size", "batch", "nfds", "placement", "implementation",
                 "status", "unit", "runs", "median", "spread", "noisy", "attempts"],
    "properties": {
        "key": {"type": "string", "description": "the row: workload-sizeB-xbatch[-Nfd]"},
        "workload": {"type": "string"},
        "size": {"type": "integer", "description": "bytes per message"},
        "batch": {"type": "integer", "description": "messages per call, where batched"},
        "nfds": {"type": "integer", "description": "descriptors per message"},
        "placement": {"type": "string", "enum": ["two-cpus", "one-cpu", "-"],
                      "description": "'-' for a single-process workload"},
        "implementation": {"type": "string", "enum": ["base", "afunix-stdlib", "afunix-c", "c"]},
        "measures": {"type": "string", "description": "what this column ran, in words"},
        "status": {"type": "string", "enum": ["ok", "n/a", "FAILED"]},
        "note": {"type": "string", "description": "why n/a or FAILED"},
        "unit": {"type": "string", "enum": ["pairs/s", "msgs/s", "MB/s", "us", "ns"]},
        "lower_is_better": {"type": "boolean"},
        "count_per_run": {"type": "integer", "description": "messages (pairs, round trips,"
                                                            " calls) in each run"},
        "runs": dict(_NUMBERS, description="the kept attempt: one figure per run, in unit"),
        "p99_runs": dict(_NUMBERS, description="ping-pong: the 99th percentile of each run"),
        "median": dict(_OPTIONAL_NUMBER, description="median of runs; null unless ok"),
        "spread": dict(_OPTIONAL_NUMBER, description="(max - min) / median of runs"),
        "min": _OPTIONAL_NUMBER,
        "max": _OPTIONAL_NUMBER,
        "noisy": {"type": "boolean", "description": "spread over the limit after re-runs"},
        "attempts": {"type": "array", "description": "every measurement, the kept one"
                     " included: {runs, p99_runs}",
                     "items": {"type": "object", "required": ["runs"],
                               "properties": {"runs": _NUMBERS, "p99_runs": _NUMBERS}}},
    },
}

SCHEMA: Dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "python -m afunix bench --json",
    "type": "object",
    "required": ["schema", "version", "afunix", "created", "machine", "interpreter", "backend",
                 "mode", "placements", "cells"],
    "properties": {
        "schema": {"type": "string", "enum": [NAME]},
        "version": {"type": "integer", "enum": [VERSION]},
        "afunix": {"type": "string", "description": "the version measured"},
        "created": {"type": "string", "description": "UTC, ISO 8601"},
        "command": {"type": "array", "items": {"type": "string"},
                    "description": "the command line of the process that measured"},
        "machine": {
            "type": "object",
            "required": ["system", "kernel", "arch", "cpus", "cpus_allowed", "loadavg", "busy"],
            "properties": {
                "system": {"type": "string"}, "kernel": {"type": "string"},
                "arch": {"type": "string"}, "cpus": {"type": ["integer", "null"]},
                "cpus_allowed": {"type": "array", "items": {"type": "integer"}},
                "cpu_model": {"type": "string"},
                "loadavg": _NUMBERS,
                "busy_share": dict(_OPTIONAL_NUMBER, description="share of all CPUs' time"
                                   " other work used in a short sample at the start"),
                "steal_share": dict(_OPTIONAL_NUMBER, description="share stolen by the"
                                    " hypervisor in that sample"),
                "busy": {"type": "array", "items": {"type": "string"},
                         "description": "why the machine looked busy at the start (empty:"
                                        " it did not)"},
            },
        },
        "interpreter": {
            "type": "object",
            "required": ["implementation", "version"],
            "properties": {"implementation": {"type": "string"}, "version": {"type": "string"},
                           "executable": {"type": "string"},
                           "cffi": {"type": ["string", "null"]}},
        },
        "backend": {
            "type": "object", "required": ["active", "c_core"],
            "properties": {"active": {"type": "string", "enum": ["c", "stdlib"]},
                           "c_core": {"type": "string"}},
        },
        "mode": {
            "type": "object", "required": ["name", "runs", "noise_limit", "reruns"],
            "properties": {"name": {"type": "string"}, "runs": {"type": "integer"},
                           "target_seconds": {"type": "number"},
                           "noise_limit": {"type": "number"},
                           "reruns": {"type": "integer"}},
        },
        "placements": {"type": "array", "items": {
            "type": "object", "required": ["name", "sender_cpu", "receiver_cpu"],
            "properties": {"name": {"type": "string"}, "sender_cpu": {"type": "integer"},
                           "receiver_cpu": {"type": "integer"}}}},
        "rows": {"type": "array", "description": "one per row and placement",
                 "items": {"type": "object", "required": ["key", "placement", "noisy",
                                                          "attempts"],
                           "properties": {"key": {"type": "string"},
                                          "placement": {"type": "string"},
                                          "noisy": {"type": "boolean"},
                                          "attempts": {"type": "integer"},
                                          "spread": {"type": "number"},
                                          "goal": dict(_OPTIONAL_NUMBER, description=(
                                              "the af/base the row is meant to reach; null:"
                                              " none")),
                                          "goal_met": {"type": ["boolean", "null"],
                                                       "description": "null: no goal, or no"
                                                                      " figure to judge"}}}},
        "skipped": {"type": "array", "items": {"type": "string"}},
        "elapsed_seconds": {"type": "number"},
        "cells": {"type": "array", "items": CELL},
    },
}

_TYPES: Dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def validate(doc: Any, schema: Dict[str, Any] = SCHEMA, where: str = "$") -> List[str]:
    """Every way `doc` departs from `schema`, as 'path: problem' lines (empty: it conforms)."""
    errors: List[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        names = kinds if isinstance(kinds, list) else [kinds]
        if not any(_is(doc, name) for name in names):
            return ["%s: %s expected, not %s" % (where, " or ".join(names), type(doc).__name__)]
    if "enum" in schema and doc not in schema["enum"]:
        errors.append("%s: %r is not one of %r" % (where, doc, schema["enum"]))
    if isinstance(doc, dict):
        for key in schema.get("required", ()):
            if key not in doc:
                errors.append("%s: %r missing" % (where, key))
        for key, sub in schema.get("properties", {}).items():
            if key in doc:
                errors.extend(validate(doc[key], sub, "%s.%s" % (where, key)))
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            errors.extend(validate(item, schema["items"], "%s[%d]" % (where, i)))
    return errors
