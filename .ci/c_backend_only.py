"""pytest plugin for the sanitizer and valgrind jobs: keep only the `c` backend runs.

Selects on the autouse `backend` fixture's parameter (tests/conftest.py),
not on the text of test ids, and fails the run if nothing is left.
"""
from __future__ import annotations

import os
from typing import Any


# Done on import (-p loads this before any other plugin runs a command):
# the runtime has read ASAN_OPTIONS for this process already.  Processes
# the tests start keep ASan and UBSan but not the exit-time leak check:
# LeakSanitizer's tracer (gcc 12) crashed with SIGSEGV in a child that
# rewrites its environment and descriptors (tests/test_activation.py),
# depending only on the environment's layout.  Leaks are checked here, in the
# process that runs nearly every C call of the suite.
_options = os.environ.get("ASAN_OPTIONS")
if _options is not None:
    os.environ["ASAN_OPTIONS"] = _options.replace("detect_leaks=1", "detect_leaks=0")


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
