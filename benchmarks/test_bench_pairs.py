"""Socketpair creation: afunix.socketpairs(n) against a loop of socket.socketpair().

The makers are the ones `python -m afunix bench` times (afunix.bench.workloads).
Only creation is timed; closing happens in the teardown of each round.
Goal (issue 2): afunix on the C backend at least 1.4x the stdlib loop.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, List, Tuple

import pytest

from afunix import _backend
from afunix.bench import workloads

N = 500
Pairs = List[Tuple[socket.socket, socket.socket]]


@pytest.mark.parametrize(
    "impl", ["base", "afunix-stdlib", "afunix-c", "c-reference"]
)
def test_socketpairs(benchmark: object, record_median: Callable[..., None], impl: str) -> None:
    try:
        if impl.startswith("afunix-"):
            _backend.use(impl.split("-")[1])
        make, close_pairs = workloads.pair_maker(
            {"base": "stdlib", "c-reference": "c"}.get(impl, "afunix"))
    except ImportError as exc:
        pytest.skip(str(exc))
    made: List[Any] = []

    def run() -> None:
        made[:] = make(N)

    def close() -> None:
        close_pairs(made)
        made.clear()

    benchmark.group = "socketpairs x%d" % N  # type: ignore[attr-defined]
    benchmark.extra_info["pairs_per_call"] = N  # type: ignore[attr-defined]
    benchmark.pedantic(run, teardown=close, rounds=60, warmup_rounds=5)  # type: ignore[attr-defined]
    record_median("socketpairs x%d" % N, impl, benchmark)
    close()  # with --benchmark-disable the teardown does not run
    assert len(made) == 0
