"""Every test runs once per backend: ids `c` and `stdlib`.

The `c` run is skipped, visibly, only where the C core is not built; with
AFUNIX_REQUIRE_C=1 (as in CI) a missing core fails the run instead.
"""
from __future__ import annotations

import gc
import importlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

import afunix
from afunix import _backend, shm

REQUIRE_C = os.environ.get("AFUNIX_REQUIRE_C", "") not in ("", "0")
PYPY = platform.python_implementation() == "PyPy"

#: PyPy's own crash, kept away from: memoryview() of a ctypes array whose inner
#: dimension is empty, such as ``(ctypes.c_uint8 * 0 * 2)()`` (shape (2, 0)),
#: kills PyPy 3.9 (7.3.11) with SIGFPE, an integer division by zero in its
#: _ctypes ``Array.__buffer__`` / ``__pypy__.newmemoryview``.  afunix never
#: makes such a buffer; only a test hands one in, so only it is skipped.
skip_on_pypy_empty_ctypes_dimension = pytest.mark.skipif(
    PYPY, reason="PyPy 3.9 7.3.11 dies with SIGFPE in memoryview() of a ctypes array "
    "with an empty inner dimension (_ctypes Array.__buffer__, shape (2, 0))")


@pytest.fixture(params=["c", "stdlib"], autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Switch afunix to the backend of this run, and back afterwards."""
    previous = _backend.name
    try:
        _backend.use(request.param)
    except ImportError as exc:
        if REQUIRE_C:
            pytest.fail("C core required (AFUNIX_REQUIRE_C=1) but unavailable: %s" % exc)
        pytest.skip("C core not built: %s" % exc)
    assert afunix.BACKEND == request.param
    yield request.param
    _backend.use(previous)


def open_fds() -> set[int]:
    """This process's open descriptors, from /proc/self/fd."""
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    # The descriptor listdir opens for the directory is listed too, but it
    # is the same number every time (the lowest free one), so comparing two
    # calls cancels it out.
    return {int(name) for name in os.listdir(fd_dir)}


@pytest.fixture
def fd_baseline() -> Iterator[set[int]]:
    """Fails the test when it leaves descriptors open that it did not start with."""
    before = open_fds()
    yield before
    leaked = open_fds() - before
    assert not leaked, "descriptors leaked: %s" % sorted(leaked)


def run_python(code: str, backend: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter on `backend`; return the finished process."""
    env = dict(os.environ, AFUNIX_BACKEND=backend)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,  # type: ignore[call-overload]
    )


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for bound paths (sun_path is 108 bytes; pytest's tmp_path is long)."""
    d = tempfile.mkdtemp(dir="/tmp", prefix="afx")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def need_library(name: str) -> None:
    """Import the event-loop library `name` (uvloop, trio); a missing one fails
    under CI=true (the test extra installs it), skips visibly elsewhere."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if name == "uvloop" and platform.python_implementation() != "CPython":
            pytest.skip("uvloop is built for CPython only (the test extra installs it there)")
        if os.environ.get("CI") == "true":
            pytest.fail("%s is required in CI (the test extra installs it): %s" % (name, exc))
        pytest.skip("%s not installed: %s" % (name, exc))


@pytest.fixture(scope="session", autouse=True)
def libuv_global_pipe() -> None:
    """Start uvloop once before any test counts descriptors.

    libuv opens a pipe for its signal handling with the first loop of a
    process and keeps it for the process's life (uv__signal_global_init): the
    first uvloop test would otherwise count it as its own leak.
    """
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return
    uvloop.new_event_loop().close()


@pytest.fixture(params=[
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
])
def anyio_backend(request: pytest.FixtureRequest) -> "tuple[str, dict[str, bool]]":
    """The event loops of tests marked anyio: asyncio's own, uvloop and trio."""
    name, options = request.param
    need_library("uvloop" if options.get("use_uvloop") else name)
    return name, options


def need_tool(name: str) -> str:
    """Path of an external program; a missing one fails under CI=true, skips visibly elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("%s is required in CI (.ci/run installs it)" % name)
        pytest.skip("%s not installed" % name)
    return path


#: The flag of a listening socket in /proc/net/unix (the kernel's __SO_ACCEPTCON).
ACCEPTCON = 0x10000


def wait_for_listener(path: str, proc: "subprocess.Popen[bytes]", timeout: float) -> None:
    """Wait until some process listens on the socket file `path` (while `proc` lives).

    A tool binds, then listens: a connect between the two is refused, so a
    socket file that exists is not yet one to connect to.
    """
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/unix") as f:
            next(f)  # the heading
            for line in f:
                fields = line.split()
                if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & ACCEPTCON:
                    return
        assert proc.poll() is None, "the server exited: %r" % (proc.communicate(),)
        assert time.monotonic() < deadline, "nothing listens on %s" % path
        time.sleep(0.01)


def region_mappings() -> int:
    """Mappings of afunix's shared-memory regions in this process (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:" + shm.REGION_NAME in line)


@pytest.fixture
def clean(fd_baseline: set) -> Iterator[None]:
    """No descriptor and no region mapping left behind by the test."""
    maps = region_mappings()
    yield
    gc.collect()
    assert region_mappings() == maps
