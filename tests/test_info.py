"""supports() and `python -m afunix info`."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys

import pytest

import afunix


def test_supports_known_names() -> None:
    for name in afunix.CAPABILITIES:
        assert isinstance(afunix.supports(name), bool)
    assert afunix.supports("seqpacket") == hasattr(socket, "SOCK_SEQPACKET")
    if sys.platform.startswith("linux"):
        assert afunix.supports("abstract")
        assert afunix.supports("peercred")


def test_supports_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown capability 'teleport'"):
        afunix.supports("teleport")


def test_info_command(backend: str) -> None:
    import os

    env = dict(os.environ, AFUNIX_BACKEND=backend)
    proc = subprocess.run(
        [sys.executable, "-m", "afunix", "info"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "afunix %s" % afunix.__version__ in out
    assert "backend: %s" % backend in out
    for name in afunix.CAPABILITIES:
        assert name in out
    assert "SCM_MAX_FD" in out and "253" in out
    # the interpreter, named with its own version (PyPy 7.3.11 is Python 3.9)
    own = sys.implementation.version
    assert "python: %s %d.%d.%d" % (platform.python_implementation(), own.major, own.minor,
                                     own.micro) in out
    assert platform.python_version() in out and sys.executable in out
    assert "sun_path" in out and str(afunix.MAX_PATH_BYTES) in out
    if sys.platform.startswith("linux"):
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            qlen = f.read().strip()
        assert "net.unix.max_dgram_qlen" in out and qlen in out
