"""Socketpair creation: afunix.socketpairs(n) against a loop of socket.socketpair().

Only creation is timed; closing happens in the teardown of each round.
Goal (issue 2): afunix on the C backend at least 1.4x the stdlib loop.
"""
from __future__ import annotations

import socket
from typing import Callable, List, Tuple

import pytest

import afunix
from afunix import _backend

N = 500
Pairs = List[Tuple[socket.socket, socket.socket]]


def _stdlib_loop() -> Pairs:
    return [socket.socketpair() for _ in range(N)]


def _afunix() -> Pairs:
    return afunix.socketpairs(N)


@pytest.mark.parametrize(
    "impl", ["stdlib-loop", "afunix-stdlib", "afunix-c"]
)
def test_socketpairs(benchmark: object, record_median: Callable[..., None], impl: str) -> None:
    if impl == "stdlib-loop":
        target = _stdlib_loop
    else:
        try:
            _backend.use(impl.split("-")[1])
        except ImportError as exc:
            pytest.skip(str(exc))
        target = _afunix
    made: Pairs = []

    def run() -> None:
        made[:] = target()

    def close() -> None:
        for a, b in made:
            a.close()
            b.close()
        made.clear()

    benchmark.group = "socketpairs x%d" % N  # type: ignore[attr-defined]
    benchmark.extra_info["pairs_per_call"] = N  # type: ignore[attr-defined]
    benchmark.pedantic(run, teardown=close, rounds=60, warmup_rounds=5)  # type: ignore[attr-defined]
    record_median("socketpairs x%d" % N, impl, benchmark)
    assert len(made) == 0
