"""Pin a process to one CPU, on every interpreter that runs the benchmark.

``os.sched_setaffinity`` is missing from PyPy 3.9's os module; there the
same system call is made through libc with cffi (ABI mode, afunix's own
dependency), so the two-cpus and one-cpu placements mean the same on PyPy.
"""
from __future__ import annotations

import os
import sys
from typing import Any, List

_libc: List[Any] = []  # (ffi, libc) once loaded


def pin(cpu: int) -> None:
    """Run the calling process on `cpu` only (Linux; elsewhere the scheduler places it).

    Raises:
        OSError: the kernel refused (a CPU this process may not use).
    """
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    elif sys.platform.startswith("linux"):
        _pin_through_libc(cpu)


def _pin_through_libc(cpu: int) -> None:
    if not _libc:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef("int sched_setaffinity(int pid, size_t cpusetsize, const unsigned long *mask);")
        _libc.append((ffi, ffi.dlopen(None)))
    ffi, libc = _libc[0]
    bits = 8 * ffi.sizeof("unsigned long")
    mask = ffi.new("unsigned long[]", cpu // bits + 1)  # a cpu_set_t: one bit per CPU
    mask[cpu // bits] = 1 << (cpu % bits)
    if libc.sched_setaffinity(0, ffi.sizeof(mask), mask) != 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))
