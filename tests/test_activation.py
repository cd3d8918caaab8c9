"""listen_fds / listen_fds_with_names / notify, against the protocol and the real systemd tools."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, List

import pytest

import afunix
from conftest import need_tool, wait_for_listener

T = 5.0  # seconds: the bound on every blocking step in these tests




@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# The child puts the descriptors it inherited at 3, 4, ... as a service
# manager would, then sets LISTEN_PID to itself (only the child knows it).
CHILD_PRELUDE = """
import fcntl, os, sys, socket, json
import afunix
passed = [int(x) for x in sys.argv[1].split(",") if x]
# Park them high first, so no copy lands on a number about to be used.
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
for fd in passed:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
for i in range(len(passed)):
    os.set_inheritable(3 + i, True)
os.environ["LISTEN_PID"] = str(os.getpid())
"""


def run_child(code: str, backend: str, fds: List[int], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `code` after CHILD_PRELUDE, with `fds` passed at 3, 4, ... and `env` set."""
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), ",".join(map(str, fds))],
        env=dict(os.environ, AFUNIX_BACKEND=backend, **env),
        pass_fds=fds, capture_output=True, text=True, timeout=30,
    )


# --- listen_fds ---------------------------------------------------------------


def test_nothing_passed(clean_env: pytest.MonkeyPatch, fd_baseline: set[int]) -> None:
    assert afunix.listen_fds() == []
    assert afunix.listen_fds_with_names() == []


def test_another_processes_descriptors_are_not_taken(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "2")
    assert afunix.listen_fds() == []
    assert os.environ["LISTEN_FDS"] == "2"
    assert afunix.listen_fds(unset_environment=True) == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize("value", ["x", "-1", "1.5", ""])
def test_malformed_variables(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDS", value)
    with pytest.raises(ValueError):
        afunix.listen_fds(unset_environment=True)
    assert "LISTEN_FDS" not in os.environ  # unset even when it raises


def test_sockets_families_types_names_and_cloexec(backend: str, short_dir: str) -> None:
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(os.path.join(short_dir, "s"))
    stream.listen()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    with stream, dgram, tcp:
        r = run_child(
            """
            before = dict(os.environ)
            pairs = afunix.listen_fds_with_names(unset_environment=True)
            print(json.dumps({
                "fds": [s.fileno() for _, s in pairs],
                "names": [n for n, _ in pairs],
                "family": [int(s.family) for _, s in pairs],
                "type": [int(s.type) for _, s in pairs],
                "inheritable": [os.get_inheritable(s.fileno()) for _, s in pairs],
                "timeout": [s.gettimeout() for _, s in pairs],
                "fd_blocking": [os.get_blocking(s.fileno()) for _, s in pairs],
                "env": sorted(k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ),
            }))
            """,
            backend, [stream.fileno(), dgram.fileno(), tcp.fileno()],
            {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "web:log:tcp"},
        )
        assert r.returncode == 0, r.stderr
        import json

        got = json.loads(r.stdout)
        assert got["fds"] == [3, 4, 5]
        assert got["names"] == ["web", "log", "tcp"]
        assert got["family"] == [socket.AF_UNIX, socket.AF_UNIX, socket.AF_INET]
        assert got["type"] == [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_STREAM]
        assert got["inheritable"] == [False, False, False]
        # The manager's blocking mode is kept, and the socket object agrees with it.
        assert got["fd_blocking"] == [True, True, False]
        assert got["timeout"] == [None, None, 0.0]
        assert got["env"] == []


def test_names_default_to_unknown_and_environment_kept(backend: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        r = run_child(
            """
            pairs = afunix.listen_fds_with_names()
            socks = afunix.listen_fds()
            print([n for n, _ in pairs], [s.fileno() for s in socks], int(socks[0].type))
            print(os.environ["LISTEN_FDS"], "LISTEN_PID" in os.environ)
            for s in socks:
                s.detach()
            """,
            backend, [a.fileno()], {"LISTEN_FDS": "1"},
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            "['unknown'] [3] %d" % socket.SOCK_SEQPACKET, "1 True"]


def test_name_count_mismatch(backend: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        r = run_child(
            """
            try:
                afunix.listen_fds_with_names()
            except ValueError as exc:
                print("ValueError", exc)
            """,
            backend, [a.fileno()], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "one:two"},
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ValueError")


def test_non_socket_descriptor_is_an_error_and_nothing_is_closed(backend: str) -> None:
    a, b = socket.socketpair()
    rd, wr = os.pipe()
    try:
        with a, b:
            r = run_child(
                """
                import errno, stat
                try:
                    afunix.listen_fds()
                except OSError as exc:
                    print(exc.errno == errno.ENOTSOCK)
                # Both descriptors still open, as the manager passed them.
                print(stat.S_ISSOCK(os.fstat(3).st_mode), stat.S_ISFIFO(os.fstat(4).st_mode))
                """,
                backend, [a.fileno(), rd], {"LISTEN_FDS": "2"},
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines() == ["True", "True True"]
    finally:
        os.close(rd)
        os.close(wr)


def _passed_through_environment() -> list[str]:
    # systemd-socket-activate starts the program with a clean environment:
    # hand on what runs this interpreter as it runs here (a sanitizer
    # runtime preloaded, its options, an import path).
    names = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS",
             "PYTHONMALLOC", "PYTHONPATH", "PATH")
    return [arg for name in names if name in os.environ
            for arg in ("-E", "%s=%s" % (name, os.environ[name]))]


def test_systemd_socket_activate_hands_over_a_listener(backend: str, short_dir: str) -> None:
    tool = need_tool("systemd-socket-activate")
    p = os.path.join(short_dir, "act.sock")
    server_code = textwrap.dedent("""
        import afunix, os, sys
        pairs = afunix.listen_fds_with_names(unset_environment=True)
        assert [n for n, _ in pairs] == ["web"], pairs
        srv = pairs[0][1]
        assert not os.get_inheritable(srv.fileno())
        assert "LISTEN_FDS" not in os.environ
        srv.settimeout(10)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"%s:" % afunix.BACKEND.encode() + conn.recv(100))
    """)
    proc = subprocess.Popen(
        [tool, "-l", p, "--fdname=web", "-E", "AFUNIX_BACKEND=" + backend,
         *_passed_through_environment(),
         "--", sys.executable, "-c", server_code],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for_listener(p, proc, T)
        with afunix.connect(p, timeout=T) as c:
            c.sendall(b"activated")
            assert c.recv(100) == b"%s:activated" % backend.encode()
        out, err = proc.communicate(timeout=T)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
        proc.communicate(timeout=T)


# --- notify -----------------------------------------------------------------


def test_notify_without_notify_socket(clean_env: pytest.MonkeyPatch, fd_baseline: set[int]) -> None:
    assert afunix.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "")
    assert afunix.notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_path_and_abstract(
    clean_env: pytest.MonkeyPatch, short_dir: str, abstract: bool, fd_baseline: set[int]
) -> None:
    if abstract:
        if not afunix.supports("abstract"):
            pytest.skip("no abstract namespace")
        name = "afunix-notify-%d-%d" % (os.getpid(), time.monotonic_ns())
        address: Any = afunix.abstract(name)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        address = os.path.join(short_dir, "notify")
        clean_env.setenv("NOTIFY_SOCKET", address)
    with afunix.listen(address, socket.SOCK_DGRAM) as rx:
        rx.settimeout(T)
        assert afunix.notify("READY=1\nSTATUS=serving") is True
        assert rx.recv(1000) == b"READY=1\nSTATUS=serving"
        assert afunix.notify(b"WATCHDOG=1") is True
        assert rx.recv(1000) == b"WATCHDOG=1"
        assert afunix.notify("STOPPING=1", unset_environment=True) is True
        assert rx.recv(1000) == b"STOPPING=1"
        assert "NOTIFY_SOCKET" not in os.environ
        assert afunix.notify("READY=1") is False


def test_notify_errors(clean_env: pytest.MonkeyPatch, short_dir: str, fd_baseline: set[int]) -> None:
    with pytest.raises(TypeError):
        afunix.notify(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        afunix.notify("")
    clean_env.setenv("NOTIFY_SOCKET", os.path.join(short_dir, "nobody"))
    with pytest.raises(FileNotFoundError):
        afunix.notify("READY=1")
    clean_env.setenv("NOTIFY_SOCKET", "relative/path")
    with pytest.raises(OSError):
        afunix.notify("READY=1")
    clean_env.setenv("NOTIFY_SOCKET", "/" + "x" * 200)
    with pytest.raises(OSError):
        afunix.notify("READY=1", unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ  # unset even when it raises


def test_notify_in_a_child_reaches_us(backend: str, short_dir: str) -> None:
    p = os.path.join(short_dir, "notify")
    with afunix.listen(p, socket.SOCK_DGRAM, mode=0o600) as rx:
        rx.settimeout(T)
        r = subprocess.run(
            [sys.executable, "-c", "import afunix, sys; sys.exit(0 if afunix.notify('READY=1') else 1)"],
            env=dict(os.environ, AFUNIX_BACKEND=backend, NOTIFY_SOCKET=p),
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 0, r.stderr
        assert rx.recv(100) == b"READY=1"


@pytest.mark.parametrize("abstract", [False, True])
def test_systemd_notify_is_received(short_dir: str, abstract: bool, fd_baseline: set[int]) -> None:
    tool = need_tool("systemd-notify")
    if abstract:
        if not afunix.supports("abstract"):
            pytest.skip("no abstract namespace")
        name = "afunix-sdnotify-%d-%d" % (os.getpid(), time.monotonic_ns())
        address: Any = afunix.abstract(name)
        env_value = "@" + name
    else:
        address = env_value = os.path.join(short_dir, "notify")
    with afunix.listen(address, socket.SOCK_DGRAM) as rx:
        rx.settimeout(T)
        proc = subprocess.Popen(
            [tool, "--ready", "--status=up"],
            env=dict(os.environ, NOTIFY_SOCKET=env_value),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            states: List[bytes] = []
            # systemd-notify (v252+) follows the state with a BARRIER=1
            # datagram carrying a pipe, and waits until we close it.
            rx.settimeout(0.2)
            deadline = time.monotonic() + T
            while not any(b"BARRIER=1" in s for s in states):
                try:
                    data, fds, _, _ = socket.recv_fds(rx, 4096, 8)
                except socket.timeout:
                    if proc.poll() is not None:
                        break  # an older systemd-notify without the barrier
                    assert time.monotonic() < deadline, "systemd-notify sent nothing"
                    continue
                for fd in fds:
                    os.close(fd)
                states.append(data)
            out, err = proc.communicate(timeout=T)
            assert proc.returncode == 0, err
        finally:
            proc.kill()
            proc.communicate(timeout=T)
        fields = b"\n".join(states).split(b"\n")
        assert b"READY=1" in fields
        assert b"STATUS=up" in fields


def test_listen_fds_twice_gives_the_same_sockets(backend: str) -> None:
    # Each passed descriptor gets one socket object per process: a second
    # owner would close it under the first when collected.
    code = textwrap.dedent("""
        import gc, os, socket, afunix
        first = afunix.listen_fds()
        second = afunix.listen_fds()
        assert len(first) == 1 and second[0] is first[0], (first, second)
        del first
        gc.collect()
        second[0].send(b"still open")
        print("ok")
    """)
    a, b = socket.socketpair()
    with a, b:
        fd = b.fileno()
        # a launcher puts the descriptor at 3 and its own pid (kept by exec)
        # in LISTEN_PID, as a service manager would
        launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                    "os.environ['LISTEN_PID'] = str(os.getpid()); "
                    "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2]])")
        proc = subprocess.run(
            [sys.executable, "-c", launcher, str(fd), code], pass_fds=[fd],
            env=dict(os.environ, LISTEN_FDS="1", AFUNIX_BACKEND=backend),
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "ok"
        a.settimeout(10)
        assert a.recv(100) == b"still open"
