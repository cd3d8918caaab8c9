"""pytest plugin for the sanitizer and valgrind jobs: keep only the `c` backend runs.

Selects on the autouse `backend` fixture's parameter (tests/conftest.py),
not on the text of test ids, and fails the run if nothing is left; keeps
LeakSanitizer's exit-time check in the processes that run the tests (see
pytest_configure).
"""
from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.hookimpl(tryfirst=True)  # before other plugins' configure starts a process
def pytest_configure(config: Any) -> None:
    """Keep the exit-time leak check in the processes that run the tests, not in theirs.

    The runtime reads ASAN_OPTIONS when a process starts, so rewriting it
    here changes only the processes started from now on.  Processes the
    tests start keep ASan and UBSan but not the exit-time leak check:
    LeakSanitizer's tracer (gcc 12) crashed with SIGSEGV in a child that
    rewrites its environment and descriptors (tests/test_activation.py),
    depending only on the environment's layout.  Leaks are checked in the
    processes that run the tests, which make nearly every C call of the
    suite: under pytest-xdist those are the workers, which the controller
    starts, so the controller leaves the options as they are (each worker
    rewrites them for its own children when it configures, before any test).
    """
    distributing = getattr(config.option, "dist", "no") != "no"
    if distributing and not hasattr(config, "workerinput"):
        return  # the xdist controller: its children are the workers
    options = os.environ.get("ASAN_OPTIONS")
    if options is not None:
        os.environ["ASAN_OPTIONS"] = options.replace("detect_leaks=1", "detect_leaks=0")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        (keep if backend == "c" else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    if not keep:
        raise RuntimeError("no test runs on the C backend")
