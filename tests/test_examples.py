"""The examples/ programs, run as a user would run them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DAEMON = EXAMPLES / "scan_daemon.py"

pytestmark = pytest.mark.skipif(not DAEMON.exists(), reason="needs the source checkout")


def _start(backend: str, path: str, extra: List[str]) -> "subprocess.Popen[str]":
    daemon = subprocess.Popen(
        [sys.executable, str(DAEMON), "serve", path, *extra],
        env=dict(os.environ, AFUNIX_BACKEND=backend),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert daemon.stdout is not None
    assert daemon.stdout.readline().strip() == "ready", daemon.stderr.read() if daemon.stderr else ""
    return daemon


def _stop(daemon: "subprocess.Popen[str]") -> None:
    daemon.terminate()
    _, errors = daemon.communicate(timeout=30)  # also closes the pipes
    assert "client error" not in errors, errors


@pytest.fixture
def socket_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="afx", dir="/tmp")
    yield directory
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


def _scan(backend: str, path: str, filename: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, str(DAEMON), "scan", path, filename],
        env=dict(os.environ, AFUNIX_BACKEND=backend),
        capture_output=True, text=True, timeout=60,
    )


def test_daemon_scans_the_file_it_is_handed(backend: str, socket_dir: str) -> None:
    path = os.path.join(socket_dir, "scan.sock")
    daemon = _start(backend, path, [])
    try:
        assert (os.stat(path).st_mode & 0o777) == 0o600
        content = b"alpha\nbeta\ngamma\n" * 1000
        with tempfile.NamedTemporaryFile(dir=socket_dir, delete=False) as f:
            f.write(content)
        done = _scan(backend, path, f.name)
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["size"] == len(content)
        assert reply["lines"] == 3000
        assert reply["sha256"] == hashlib.sha256(content).hexdigest()
        assert reply["request"] == f.name
        os.unlink(f.name)
    finally:
        _stop(daemon)
    assert not os.path.exists(path)  # the daemon's socket file went with it


def test_daemon_reads_a_file_it_could_not_open(backend: str, socket_dir: str) -> None:
    # The file has no name left: only the descriptor the client holds reaches it.
    sys.path.insert(0, str(EXAMPLES))
    try:
        import scan_daemon
    finally:
        sys.path.remove(str(EXAMPLES))
    path = os.path.join(socket_dir, "scan.sock")
    daemon = _start(backend, path, [])
    try:
        fd, name = tempfile.mkstemp(dir=socket_dir)
        os.write(fd, b"no name\n")
        os.unlink(name)
        try:
            reply = scan_daemon.request(path, "(unlinked)", fd)
        finally:
            os.close(fd)
        assert reply["size"] == 8 and reply["lines"] == 1
        assert reply["client_pid"] == os.getpid()
    finally:
        _stop(daemon)


def test_daemon_refuses_a_client_whose_uid_is_not_allowed(backend: str, socket_dir: str) -> None:
    path = os.path.join(socket_dir, "scan.sock")
    daemon = _start(backend, path, ["--allow-uid", str(os.getuid() + 12345)])
    try:
        done = _scan(backend, path, "/dev/null")
        assert done.returncode == 1
        assert "is not allowed" in json.loads(done.stdout)["error"]
    finally:
        _stop(daemon)
