"""listen / connect / abstract / AUTOBIND: address checks, stale files, live servers, mode, cleanup."""
from __future__ import annotations

import asyncio
import errno
import os
import selectors
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, List

import pytest

import afunix
from afunix import addresses, pathlock

from conftest import need_tool, open_fds, wait_for_listener

LINUX = sys.platform.startswith("linux")
needs_abstract = pytest.mark.skipif(not afunix.supports("abstract"), reason="no abstract namespace")
T = 5.0  # seconds: the bound on every blocking step in these tests




def run(code: str, backend: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `code` with `argv` in a fresh interpreter on `backend`, bounded in time."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv],
        env=dict(os.environ, AFUNIX_BACKEND=backend),
        capture_output=True, text=True, timeout=30,
    )


def stale_socket(path: str, type: int = socket.SOCK_STREAM) -> None:
    """Leave a socket file at `path` with nobody behind it, as a crashed server does."""
    s = socket.socket(socket.AF_UNIX, type)
    s.bind(path)
    if type != socket.SOCK_DGRAM:
        s.listen()
    s.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def echo_once(server: socket.socket, data: bytes = b"ping") -> bytes:
    """Connect to `server` with the stdlib, send `data`, and return what accept() read."""
    c = socket.socket(socket.AF_UNIX, server.type)
    c.settimeout(T)
    with c:
        c.connect(server.getsockname())
        conn, _ = server.accept()
        with conn:
            conn.settimeout(T)
            c.sendall(data)
            return conn.recv(100)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- address checks -----------------------------------------------------------


def test_path_limit_107_accepted_108_rejected(short_dir: str, fd_baseline: set[int]) -> None:
    room = afunix.MAX_PATH_BYTES - len(short_dir) - 1
    ok = os.path.join(short_dir, "x" * room)
    too_long = os.path.join(short_dir, "y" * (room + 1))
    assert len(os.fsencode(ok)) == afunix.MAX_PATH_BYTES == (107 if LINUX else 103)
    with afunix.listen(ok) as srv:
        with afunix.connect(ok, timeout=T):
            pass
        assert srv.path == ok
    for call in (lambda: afunix.listen(too_long), lambda: afunix.connect(too_long)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(afunix.MAX_PATH_BYTES + 1) in str(info.value)
        assert str(afunix.MAX_PATH_BYTES) in str(info.value)
    assert not os.path.exists(too_long)


def test_path_limit_counts_encoded_bytes(short_dir: str) -> None:
    room = afunix.MAX_PATH_BYTES - len(short_dir) - 1
    # "é" is two bytes in UTF-8: room // 2 + 1 of them do not fit although
    # the str is shorter than the limit.
    name = os.path.join(short_dir, "\u00e9" * (room // 2 + 1))
    assert len(name) <= afunix.MAX_PATH_BYTES < len(os.fsencode(name))
    with pytest.raises(ValueError, match="bytes"):
        afunix.listen(name)


@pytest.mark.parametrize("bad", ["", b"", "/tmp/a\0b", b"/tmp/a\0b"])
def test_bad_paths_are_value_errors(bad: Any, fd_baseline: set[int]) -> None:
    for call in (afunix.listen, afunix.connect):
        with pytest.raises(ValueError):
            call(bad)


@pytest.mark.parametrize("bad", ["", b"", "{tmp}/none\0b", b"{tmp}/none\0b"])
def test_a_send_refuses_a_bad_destination_as_socket_sendto_does(
    backend: str, bad: Any, tmp_path: Any
) -> None:
    # listen and connect refuse these before any system call (above); a
    # send's destination is the kernel's to judge, as for socket.sendto: the
    # empty address is EINVAL, a path with a NUL inside is looked up up to
    # the NUL (none there: ENOENT).  Nothing reaches the connected peer.
    tmp = str(tmp_path)
    bad = bad.replace("{tmp}", tmp) if isinstance(bad, str) else bad.replace(b"{tmp}", tmp.encode())
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        with pytest.raises(OSError) as stdlib_error:
            a.sendto(b"x", bad)
        with pytest.raises(OSError) as ours:
            afunix.send_many(a, [afunix.Message(b"x", address=bad)])
        assert type(ours.value) is type(stdlib_error.value)
        assert ours.value.errno == stdlib_error.value.errno
        with pytest.raises(OSError) as ours:
            afunix.send_fds(a, [b"x"], [], address=bad)
        assert type(ours.value) is type(stdlib_error.value)
        assert ours.value.errno == stdlib_error.value.errno
        with pytest.raises(BlockingIOError):
            b.recv(1, socket.MSG_DONTWAIT)  # nothing went


@pytest.mark.parametrize("bad", [None, 3, 1.5, ["/tmp/x"], object()])
def test_bad_address_types_are_type_errors(bad: Any, fd_baseline: set[int]) -> None:
    for call in (afunix.listen, afunix.connect):
        with pytest.raises(TypeError):
            call(bad)


def test_bad_arguments_raise_before_any_system_call(
    short_dir: str, fd_baseline: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_socket(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a socket was created before the arguments were checked")

    monkeypatch.setattr(addresses, "ListeningSocket", no_socket)
    monkeypatch.setattr(addresses.socket, "socket", no_socket)
    p = os.path.join(short_dir, "s")
    cases = [
        (TypeError, lambda: afunix.listen(p, "stream")),
        (ValueError, lambda: afunix.listen(p, 12345)),
        (TypeError, lambda: afunix.listen(p, backlog=1.5)),
        (ValueError, lambda: afunix.listen(p, backlog=-1)),
        (TypeError, lambda: afunix.listen(p, mode="600")),
        (ValueError, lambda: afunix.listen(p, mode=0o1777)),
        (ValueError, lambda: afunix.listen(p, mode=-1)),
        (TypeError, lambda: afunix.connect(p, timeout="1")),
        (TypeError, lambda: afunix.connect(p, timeout=True)),
        (ValueError, lambda: afunix.connect(p, timeout=-1)),
        (ValueError, lambda: afunix.connect(p, timeout=float("nan"))),
        (ValueError, lambda: afunix.connect(p, timeout=float("inf"))),
        (ValueError, lambda: afunix.connect(afunix.AUTOBIND)),  # type: ignore[arg-type]
        (ValueError, lambda: afunix.connect(p, 12345)),
    ]
    if afunix.supports("abstract"):
        cases.append((ValueError, lambda: afunix.listen(afunix.abstract("x"), mode=0o600)))
    for exc_type, call in cases:
        with pytest.raises(exc_type):
            call()
    assert os.listdir(short_dir) == []


def test_bytes_and_pathlike_addresses(short_dir: str) -> None:
    import pathlib

    p = pathlib.Path(short_dir) / "s"
    with afunix.listen(p) as srv:
        assert srv.path == str(p)
        with afunix.connect(os.fsencode(p), timeout=T):
            pass
        with afunix.connect(p, timeout=T):
            pass
    assert not p.exists()
    with afunix.listen(os.fsencode(p)) as srv:
        assert srv.path == str(p)
        assert echo_once(srv) == b"ping"


def test_relative_path(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(short_dir)
    with afunix.listen("rel.sock", mode=0o600) as srv:
        assert mode_of(os.path.join(short_dir, "rel.sock")) == 0o600
        with afunix.connect("rel.sock", timeout=T):
            pass
        srv.accept()[0].close()
    assert os.listdir(short_dir) == []


# --- servers and their sockets ------------------------------------------------


@pytest.mark.parametrize("type", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
def test_listen_and_connect_round_trip(short_dir: str, type: int, fd_baseline: set[int]) -> None:
    if type == socket.SOCK_SEQPACKET and not afunix.supports("seqpacket"):
        pytest.skip("no SOCK_SEQPACKET")
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, type) as srv:
        assert isinstance(srv, socket.socket) and isinstance(srv, afunix.ListeningSocket)
        assert srv.type == type and srv.family == socket.AF_UNIX
        assert not srv.get_inheritable()
        with afunix.connect(p, type, timeout=T) as c:
            conn, _ = srv.accept()
            with conn:
                assert conn.__class__ is socket.socket
                c.sendall(b"abc")
                conn.settimeout(T)
                assert conn.recv(10) == b"abc"
    assert not os.path.exists(p)


def test_dgram_is_bound_not_listening(short_dir: str, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "d")
    with afunix.listen(p, socket.SOCK_DGRAM, mode=0o600) as srv:
        srv.settimeout(T)
        assert mode_of(p) == 0o600
        with afunix.connect(p, socket.SOCK_DGRAM, timeout=T) as c:
            c.send(b"dgram")
            assert srv.recv(100) == b"dgram"
    assert not os.path.exists(p)


def test_backlog_keyword_is_applied(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, backlog=0) as srv:
        # Linux admits backlog + 1 pending connections: a backlog of 0 takes one.
        clients = []
        try:
            for _ in range(64):
                c = socket.socket(socket.AF_UNIX)
                clients.append(c)
                c.setblocking(False)
                c.connect(p)
            pytest.fail("backlog=0 admitted 64 pending connections")
        except BlockingIOError:
            pass
        finally:
            for c in clients:
                c.close()
        assert len(clients) <= 3
        del srv


def test_accept_returns_plain_sockets_and_works_with_selectors(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p) as srv, selectors.DefaultSelector() as sel:
        srv.setblocking(False)
        sel.register(srv, selectors.EVENT_READ)
        with afunix.connect(p, timeout=T):
            assert sel.select(T), "listener never became readable"
            conn, addr = srv.accept()
            with conn:
                assert conn.__class__ is socket.socket
                assert addr in ("", b"", None)


def test_asyncio_sock_accept(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        with afunix.listen(p) as srv:
            srv.setblocking(False)
            client = afunix.connect(p, timeout=T)
            with client:
                conn, _ = await asyncio.wait_for(loop.sock_accept(srv), T)
                with conn:
                    client.sendall(b"aio")
                    return await asyncio.wait_for(loop.sock_recv(conn, 10), T)

    assert asyncio.run(main()) == b"aio"


def test_with_asyncio_start_unix_server_sock(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")

    async def main() -> bytes:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        srv_sock = afunix.listen(p)
        server = await asyncio.start_unix_server(handle, sock=srv_sock)
        async with server:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(p), T)
            writer.write(b"line\n")
            data = await asyncio.wait_for(reader.readline(), T)
            writer.close()
            await writer.wait_closed()
        return data

    assert asyncio.run(main()) == b"line\n"


# --- stale files and live servers ---------------------------------------------


@pytest.mark.parametrize("mode", [None, 0o600])
@pytest.mark.parametrize("type", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_stale_file_is_replaced(short_dir: str, type: int, mode: Any, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "s")
    stale_socket(p, type)
    with afunix.listen(p, type, mode=mode) as srv:
        # The stale file refused connections; the new one accepts them.
        with afunix.connect(p, type, timeout=T):
            pass
        if mode is not None:
            assert mode_of(p) == mode
        del srv
    assert not os.path.exists(p)


def test_stale_file_left_by_a_crashed_process(short_dir: str, backend: str) -> None:
    p = os.path.join(short_dir, "s")
    r = run("import afunix, os, sys; afunix.listen(sys.argv[1]); os._exit(0)", backend, p)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISSOCK(os.lstat(p).st_mode)
    with afunix.listen(p) as srv:
        assert echo_once(srv) == b"ping"


@pytest.mark.parametrize("mode", [None, 0o600])
def test_live_listener_is_not_stolen_by_another_process(short_dir: str, backend: str, mode: Any) -> None:
    p = os.path.join(short_dir, "s")
    server = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import afunix, sys
            srv = afunix.listen(sys.argv[1])
            print("ready", flush=True)
            srv.settimeout(30)
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.settimeout(30)
                    data = conn.recv(100)
                    if data == b"quit":
                        break
                    if data:  # liveness probes connect and close at once
                        conn.sendall(b"first:" + data)
            srv.close()
        """), p],
        env=dict(os.environ, AFUNIX_BACKEND=backend), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        ino = os.lstat(p).st_ino
        second = run(
            """
            import afunix, errno, sys
            try:
                afunix.listen(sys.argv[1], mode=%r)
            except OSError as exc:
                sys.exit(0 if exc.errno == errno.EADDRINUSE else "wrong errno %%r" %% exc)
            sys.exit("second listen succeeded")
            """ % (mode,), backend, p,
        )
        assert second.returncode == 0, second.stderr
        # In this process too, and the first server still serves, from its own file.
        with pytest.raises(OSError) as info:
            afunix.listen(p, mode=mode)
        assert info.value.errno == errno.EADDRINUSE
        assert os.lstat(p).st_ino == ino
        for _ in range(2):
            with afunix.connect(p, timeout=T) as c:
                c.sendall(b"hi")
                assert c.recv(100) == b"first:hi"
        with afunix.connect(p, timeout=T) as c:
            c.sendall(b"quit")
        assert server.wait(timeout=T) == 0
    finally:
        server.kill()
        server.communicate(timeout=T)
    assert not os.path.exists(p), "the first server's close did not remove its file"


def test_live_listener_with_full_backlog_is_detected_without_blocking(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, backlog=0) as srv:
        clients: List[socket.socket] = []
        try:
            while True:
                c = socket.socket(socket.AF_UNIX)
                c.setblocking(False)
                try:
                    c.connect(p)
                except BlockingIOError:
                    c.close()
                    break
                clients.append(c)
            outcome: List[BaseException] = []

            def second() -> None:
                try:
                    afunix.listen(p).close()
                except BaseException as exc:
                    outcome.append(exc)

            t = threading.Thread(target=second, daemon=True)
            t.start()
            t.join(T)
            assert not t.is_alive(), "the liveness probe blocked on a full backlog"
            assert len(outcome) == 1 and isinstance(outcome[0], OSError)
            assert outcome[0].errno == errno.EADDRINUSE
        finally:
            for c in clients:
                c.close()
        assert srv.path == p and os.path.exists(p)


@pytest.mark.parametrize(
    "live_type, new_type",
    [(socket.SOCK_DGRAM, socket.SOCK_STREAM), (socket.SOCK_STREAM, socket.SOCK_DGRAM),
     (socket.SOCK_SEQPACKET, socket.SOCK_STREAM)],
)
def test_live_server_of_another_type_is_in_use(short_dir: str, live_type: int, new_type: int) -> None:
    if socket.SOCK_SEQPACKET in (live_type, new_type) and not afunix.supports("seqpacket"):
        pytest.skip("no SOCK_SEQPACKET")
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, live_type):
        ino = os.lstat(p).st_ino
        with pytest.raises(OSError) as info:
            afunix.listen(p, new_type)
        assert info.value.errno == errno.EADDRINUSE
        assert os.lstat(p).st_ino == ino


def test_regular_file_is_never_removed(short_dir: str, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "data")
    with open(p, "w") as f:
        f.write("precious")
    for mode in (None, 0o600):
        with pytest.raises(FileExistsError):
            afunix.listen(p, mode=mode)
        with open(p) as f:
            assert f.read() == "precious"
    assert sorted(os.listdir(short_dir)) == ["data"]  # no temporary directory left


def test_directory_and_symlink_are_never_removed(short_dir: str, fd_baseline: set[int]) -> None:
    d = os.path.join(short_dir, "dir")
    os.mkdir(d)
    with pytest.raises(FileExistsError):
        afunix.listen(d)
    assert os.path.isdir(d)
    # A symlink, even to a stale socket, is not a socket: it stays.
    target = os.path.join(short_dir, "stale")
    stale_socket(target)
    link = os.path.join(short_dir, "link")
    os.symlink(target, link)
    for mode in (None, 0o600):
        with pytest.raises(FileExistsError):
            afunix.listen(link, mode=mode)
        assert os.path.islink(link) and stat.S_ISSOCK(os.lstat(target).st_mode)


@pytest.mark.parametrize("mode", [None, 0o600])
def test_file_replaced_between_probe_and_unlink_is_kept(
    short_dir: str, mode: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = os.path.join(short_dir, "s")
    stale_socket(p)
    real_probe = addresses._probe
    newcomer: List[socket.socket] = []

    def probe_then_race(raw: bytes, type: int) -> Any:
        answer = real_probe(raw, type)
        if newcomer:
            return answer
        # Another server replaces the stale file right after our probe.
        os.unlink(raw)
        s = socket.socket(socket.AF_UNIX)
        s.bind(raw)
        s.listen()
        newcomer.append(s)
        return answer

    monkeypatch.setattr(addresses, "_probe", probe_then_race)
    try:
        with pytest.raises(OSError) as info:
            afunix.listen(p, mode=mode)
        assert info.value.errno == errno.EADDRINUSE
        assert len(newcomer) == 1
        with afunix.connect(p, timeout=T):
            conn, _ = newcomer[0].accept()
            conn.close()
    finally:
        for s in newcomer:
            s.close()


# --- concurrent listen() calls ---------------------------------------------------

# Races per test in the normal run; AFUNIX_LISTEN_RACES=1000 runs more.
LISTEN_RACES = int(os.environ.get("AFUNIX_LISTEN_RACES", "50"))

# One racing process: on "race T" it calls listen() at time T and says whether
# it won; on "check TOKEN" it says whether the connection that sent TOKEN
# reached its server (the losers' probes are there too, and read EOF), then
# closes the server.
RACER = """
import afunix, socket, sys, time
path, mode = sys.argv[1], eval(sys.argv[2])
srv = None
for line in sys.stdin:
    command, arg = line.split()
    if command == "race":
        time.sleep(max(0.0, float(arg) - time.time()))
        try:
            srv = afunix.listen(path, mode=mode)
        except OSError as exc:
            print("lost", exc.errno, flush=True)
        else:
            print("won", 0, flush=True)
    elif command == "check":
        reached = False
        if srv is not None:
            srv.setblocking(False)
            while True:
                try:
                    conn, _ = srv.accept()
                except BlockingIOError:
                    break
                with conn:
                    conn.settimeout(5)
                    reached = reached or conn.recv(100) == arg.encode()
            srv.close()
            srv = None
        print("reached" if reached else "missed", flush=True)
"""


def race_listen(
    directory: str, backend: str, mode: Any, races: int, paths: int = 4, per_path: int = 3
) -> List[str]:
    """Run `races` races of `per_path` processes calling listen() on one stale file, on
    `paths` paths at once; return what went wrong (each race: one winner, reached)."""
    env = dict(os.environ, AFUNIX_BACKEND=backend)
    names = [os.path.join(directory, "race%d" % k) for k in range(paths)]
    racers = [
        [subprocess.Popen([sys.executable, "-c", RACER, name, repr(mode)], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
         for _ in range(per_path)]
        for name in names
    ]
    everyone = [r for group in racers for r in group]
    # A racer that hangs must fail the test, not stall the suite.
    watchdog = threading.Timer(30 + races * 0.5, lambda: [r.kill() for r in everyone])
    watchdog.start()

    def tell(group: List[subprocess.Popen[str]], line: str) -> None:
        for r in group:
            assert r.stdin is not None
            r.stdin.write(line + "\n")
            r.stdin.flush()

    def answers(group: List[subprocess.Popen[str]]) -> List[str]:
        return [r.stdout.readline().strip() for r in group if r.stdout is not None]

    wrong: List[str] = []
    try:
        done = 0
        while done < races:
            now = min(paths, races - done)
            for name in names[:now]:
                stale_socket(name)
            start = time.time() + 0.02  # every racer is waiting by then
            for group in racers[:now]:
                tell(group, "race %r" % start)
            for k in range(now):
                outcome = answers(racers[k])
                token = "race-%d" % (done + k)
                with socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(T)
                    try:
                        c.connect(names[k])
                        c.sendall(token.encode())
                    except OSError as exc:
                        wrong.append("race %d: %r, connect failed: %s" % (done + k, outcome, exc))
                    tell(racers[k], "check " + token)
                    reached = answers(racers[k])
                won = [i for i, o in enumerate(outcome) if o == "won 0"]
                lost = [o for o in outcome if o != "won 0"]
                if (len(won) != 1 or reached[won[0]] != "reached"
                        or lost != ["lost %d" % errno.EADDRINUSE] * (per_path - 1)):
                    wrong.append("race %d: %r %r" % (done + k, outcome, reached))
                if os.path.lexists(names[k]):  # a loser's file; the next race needs a stale one
                    os.unlink(names[k])
            done += now
    finally:
        watchdog.cancel()
        for r in everyone:
            if r.stdin is not None:
                try:
                    r.stdin.close()
                except BrokenPipeError:
                    pass  # killed by the watchdog: already reported as wrong
        for r in everyone:
            try:
                r.wait(T)
            except subprocess.TimeoutExpired:
                r.kill()
                r.wait(T)
            if r.stdout is not None:
                r.stdout.close()
    return wrong


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, 0o600])
def test_concurrent_listens_on_a_stale_file_have_one_winner(
    short_dir: str, backend: str, mode: Any
) -> None:
    """Processes replacing the same stale file at once: exactly one wins, and the path is its."""
    wrong = race_listen(short_dir, backend, mode, LISTEN_RACES)
    assert not wrong, "%d of %d races went wrong:\n%s" % (
        len(wrong), LISTEN_RACES, "\n".join(wrong[:20]))
    assert os.listdir(short_dir) == [], "lock files or temporary directories left behind"


def pending_token(srv: socket.socket, token: bytes) -> bool:
    """Whether a connection that sent `token` waits in `srv`'s accept queue (probes read EOF)."""
    srv.setblocking(False)
    found = False
    while True:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return found
        with conn:
            conn.settimeout(T)
            found = found or conn.recv(100) == token


def listen_in_threads(p: str, modes: List[Any]) -> List[Any]:
    """Call afunix.listen(p, mode=m) for each of `modes` in threads at once: sockets or errors."""
    results: List[Any] = [None] * len(modes)

    def contender(i: int) -> None:
        try:
            results[i] = afunix.listen(p, mode=modes[i])
        except OSError as exc:
            results[i] = exc

    threads = [threading.Thread(target=contender, args=(i,), daemon=True) for i in range(len(modes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * T)
        assert not t.is_alive(), "listen() hung"
    return results


def one_winner_reached(p: str, results: List[Any]) -> None:
    """Exactly one of `results` is a server, the others EADDRINUSE; a connect to `p` reaches it."""
    try:
        servers = [r for r in results if isinstance(r, socket.socket)]
        errors = [r for r in results if not isinstance(r, socket.socket)]
        assert len(servers) == 1, "%d callers won: %r" % (len(servers), results)
        assert all(isinstance(e, OSError) and e.errno == errno.EADDRINUSE for e in errors), errors
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(T)
            c.connect(p)
            c.sendall(b"who")
            assert pending_token(servers[0], b"who"), "the path does not reach the winner"
    finally:
        for r in results:
            if isinstance(r, socket.socket):
                r.close()


@pytest.mark.parametrize("modes", [[None, None], [0o600, 0o600], [None, 0o600]])
def test_listens_that_reach_the_stale_files_unlink_together_have_one_winner(
    short_dir: str, modes: List[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers that both found the file stale: the one to unlink second must not remove
    what the first put in its place.  The window is made wide: each caller's unlink of the
    path waits (up to 0.5 s) for the other to get there too, and the second one then waits
    until the first has its server at the path."""
    p = os.path.join(short_dir, "s")
    stale_socket(p)
    stale_ino = os.lstat(p).st_ino
    keep = os.path.join(short_dir, "keep")
    os.link(p, keep)  # the stale inode's number is not given to the next file while linked
    raw = os.fsencode(p)
    real_unlink = os.unlink
    both_there = threading.Barrier(2)
    arrivals: List[int] = []
    guard = threading.Lock()

    def replaced() -> bool:
        try:
            return os.lstat(p).st_ino != stale_ino
        except FileNotFoundError:
            return False

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsencode(path) == raw:
            with guard:
                order = len(arrivals)
                arrivals.append(order)
            if order < 2:
                try:
                    both_there.wait(0.5)
                except threading.BrokenBarrierError:
                    pass  # the other caller never came: it is waiting for this one
                deadline = time.monotonic() + T
                while order == 1 and not replaced() and time.monotonic() < deadline:
                    time.sleep(0.001)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(addresses.os, "unlink", unlink)
    one_winner_reached(p, listen_in_threads(p, modes))
    assert os.listdir(short_dir) == ["keep"]


@pytest.mark.parametrize("mode", [None, 0o600])
def test_server_slow_between_bind_and_listen_keeps_its_path(
    short_dir: str, mode: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listen() preempted for longer than the stale recheck (50 ms) between its bind and its
    listen: another listen() on the same path waits for it instead of taking its file."""
    p = os.path.join(short_dir, "s")
    real_listen = addresses.ListeningSocket.listen
    bound = threading.Event()
    first: List[Any] = []

    def slow_listen(self: socket.socket, *args: Any) -> None:
        if threading.current_thread() is slow:
            bound.set()
            time.sleep(0.3)
        real_listen(self, *args)

    def serve() -> None:
        try:
            first.append(afunix.listen(p))
        except OSError as exc:  # pragma: no cover - reported by the assertions
            first.append(exc)

    monkeypatch.setattr(addresses.ListeningSocket, "listen", slow_listen)
    slow = threading.Thread(target=serve, daemon=True)
    slow.start()
    try:
        assert bound.wait(T)
        with pytest.raises(OSError) as info:
            afunix.listen(p, mode=mode).close()
        assert info.value.errno == errno.EADDRINUSE
    finally:
        slow.join(T)
    one_winner_reached(p, first)


# --- the listen() lock file -------------------------------------------------------


def lock_path(p: str) -> str:
    return p + os.fsdecode(pathlock.LOCK_SUFFIX)


HOLD_LOCK = """
import os, sys, time
from afunix.pathlock import PathLock
with PathLock(os.fsencode(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("mode", [None, 0o600])
def test_lock_held_too_long_is_in_use_and_a_killed_holder_blocks_nobody(
    short_dir: str, backend: str, mode: Any, monkeypatch: pytest.MonkeyPatch,
    fd_baseline: set[int],
) -> None:
    p = os.path.join(short_dir, "s")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, p], env=dict(os.environ, AFUNIX_BACKEND=backend),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        monkeypatch.setattr(pathlock, "LOCK_WAIT", 0.3)
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            afunix.listen(p, mode=mode)
        assert info.value.errno == errno.EADDRINUSE and info.value.filename == p
        assert time.monotonic() - start >= 0.3
        assert sorted(os.listdir(short_dir)) == ["s" + os.fsdecode(pathlock.LOCK_SUFFIX)]
    finally:
        holder.kill()
        holder.communicate(timeout=T)
    # Killed while holding: its file stays, its lock went with it.
    assert os.path.isfile(lock_path(p))
    with afunix.listen(p, mode=mode) as srv:
        assert echo_once(srv) == b"ping"
        assert os.listdir(short_dir) == ["s"]  # the leftover lock file is gone too
    assert os.listdir(short_dir) == []


def test_lock_path_taken_by_something_else_is_left_alone(short_dir: str, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "s")
    lock = lock_path(p)
    precious = os.path.join(short_dir, "precious")
    with open(precious, "w") as f:
        f.write("precious")
    makers = [
        ("directory", lambda: os.mkdir(lock), os.path.isdir),
        ("symlink", lambda: os.symlink(precious, lock), os.path.islink),
        ("fifo", lambda: os.mkfifo(lock), lambda q: stat.S_ISFIFO(os.lstat(q).st_mode)),
        ("socket", lambda: stale_socket(lock), lambda q: stat.S_ISSOCK(os.lstat(q).st_mode)),
    ]
    for what, make, still in makers:
        make()
        for mode in (None, 0o600):
            with pytest.raises(FileExistsError, match="lock path"):
                afunix.listen(p, mode=mode)
            assert still(lock), what
        assert sorted(os.listdir(short_dir)) == ["precious", os.path.basename(lock)], what
        (os.rmdir if what == "directory" else os.unlink)(lock)
    with open(precious) as f:
        assert f.read() == "precious"


def test_filesystem_without_file_locks(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where flock() is refused (NFS without a lock manager), listen works as it did unlocked."""
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(pathlock.fcntl, "flock", no_flock)
    p = os.path.join(short_dir, "s")
    stale_socket(p)
    for mode in (None, 0o600):
        with afunix.listen(p, mode=mode) as srv:
            assert os.listdir(short_dir) == ["s"]
            assert echo_once(srv) == b"ping"
    assert os.listdir(short_dir) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root, to run a child as another user")
def test_lock_files_between_users_in_a_sticky_directory(short_dir: str, backend: str) -> None:
    """As in /tmp: each user's listen() removes its own lock file; another user's leftover
    one is a clear PermissionError; a directory nobody may write to fails as it did."""
    os.chmod(short_dir, 0o1777)
    mine = os.path.join(short_dir, "mine")
    theirs = os.path.join(short_dir, "theirs")
    # root's listen() at `mine` was killed while it held the lock: the file stays.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, mine], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    holder.kill()
    holder.communicate(timeout=T)
    closed = os.path.join(short_dir, "closed")
    os.mkdir(closed, 0o755)
    as_nobody = """
        import afunix, errno, os, sys
        os.setgid(65534); os.setuid(65534)
        mine, theirs, closed = sys.argv[1:4]
        try:
            afunix.listen(mine)
        except PermissionError as exc:
            print("mine:", exc.filename == mine + ".afunix-lock", "another user" in str(exc))
        with afunix.listen(theirs, mode=0o600) as srv:
            print("theirs:", sorted(os.listdir(os.path.dirname(theirs))))
        try:
            afunix.listen(os.path.join(closed, "s"))
        except PermissionError as exc:
            print("closed:", exc.errno == errno.EACCES, os.listdir(closed))
    """
    r = run(as_nobody, backend, mine, theirs, closed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "mine: True True",
        "theirs: ['closed', 'mine.afunix-lock', 'theirs']",
        "closed: True []",
    ]
    assert sorted(os.listdir(short_dir)) == ["closed", "mine.afunix-lock"]
    with afunix.listen(mine) as srv:  # its owner's next listen() takes it back and removes it
        assert echo_once(srv) == b"ping"
    assert sorted(os.listdir(short_dir)) == ["closed"]


# --- mode ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o777, 0o000, 0o640])
@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_mode_is_exact_whatever_the_umask(backend: str, short_dir: str, mode: int, umask: int) -> None:
    # In a child: the umask is process-wide and must not leak into pytest.
    p = os.path.join(short_dir, "s")
    r = run(
        """
        import afunix, os, stat, sys
        os.umask(%d)
        srv = afunix.listen(sys.argv[1], mode=%d)
        print(oct(stat.S_IMODE(os.lstat(sys.argv[1]).st_mode)))
        print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))
        srv.close()
        """ % (umask, mode), backend, p,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == [oct(mode), "['s']"]


def test_mode_file_never_appears_with_other_bits(
    short_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whenever the final path exists during listen(), it already has the final mode."""
    p = os.path.join(short_dir, "s")
    seen: List[int] = []

    def watch() -> None:
        try:
            seen.append(mode_of(p))
        except FileNotFoundError:
            pass

    # Deterministic checkpoints right after each step a chmod-after-bind
    # implementation would expose the file in: bind, chmod, listen.
    real_bind, real_listen = addresses.ListeningSocket.bind, addresses.ListeningSocket.listen
    real_chmod = addresses.os.chmod

    def bind(self: socket.socket, address: Any) -> None:
        real_bind(self, address)
        watch()

    def listen(self: socket.socket, *args: Any) -> None:
        watch()
        real_listen(self, *args)
        watch()

    def chmod(*args: Any, **kwargs: Any) -> None:
        watch()
        real_chmod(*args, **kwargs)
        watch()

    monkeypatch.setattr(addresses.ListeningSocket, "bind", bind)
    monkeypatch.setattr(addresses.ListeningSocket, "listen", listen)
    monkeypatch.setattr(addresses.os, "chmod", chmod)
    # And a concurrent observer polling the path, with a umask that would
    # show any window (0o000 gives 0o777 sockets).
    stop = threading.Event()
    polled: List[int] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                polled.append(mode_of(p))
            except FileNotFoundError:
                pass

    old_umask = os.umask(0)
    observer = threading.Thread(target=poll, daemon=True)
    observer.start()
    try:
        for _ in range(200):
            srv = afunix.listen(p, mode=0o600)
            seen.append(mode_of(p))
            srv.close()
    finally:
        stop.set()
        observer.join(T)
        os.umask(old_umask)
    assert set(seen) == {0o600}
    assert set(polled) <= {0o600}


def test_mode_with_short_basename_near_the_limit(short_dir: str, fd_baseline: set[int]) -> None:
    # The private directory's name is longer than "s": the temporary bind
    # name would exceed sun_path, so listen must still manage.
    deep = os.path.join(short_dir, "d" * (afunix.MAX_PATH_BYTES - len(short_dir) - 3))
    os.mkdir(deep)
    p = os.path.join(deep, "s")
    assert len(p) == afunix.MAX_PATH_BYTES
    with afunix.listen(p, mode=0o640) as srv:
        assert mode_of(p) == 0o640
        assert srv.getsockname() == p
        assert echo_once(srv) == b"ping"
    assert os.listdir(deep) == []


def test_getsockname_is_the_public_path(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    for mode in (None, 0o600):
        with afunix.listen(p, mode=mode) as srv:
            assert srv.getsockname() == p
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(T)
                c.connect(srv.getsockname())


# --- close removes the file, and only our own ---------------------------------


@pytest.mark.parametrize("mode", [None, 0o600])
def test_close_removes_own_file(short_dir: str, mode: Any) -> None:
    p = os.path.join(short_dir, "s")
    srv = afunix.listen(p, mode=mode)
    assert os.path.exists(p)
    srv.close()
    assert not os.path.exists(p)
    srv.close()  # twice is harmless, as for socket.socket
    assert srv.fileno() == -1
    with afunix.listen(p, mode=mode):
        assert os.path.exists(p)
    assert not os.path.exists(p)


@pytest.mark.parametrize("mode", [None, 0o600])
def test_close_keeps_another_servers_file(short_dir: str, mode: Any) -> None:
    p = os.path.join(short_dir, "s")
    first = afunix.listen(p, mode=mode)
    os.unlink(p)  # e.g. a restart script clearing the path
    second = afunix.listen(p, mode=mode)
    ino = os.lstat(p).st_ino
    first.close()
    assert os.lstat(p).st_ino == ino, "closing the old server removed the new server's file"
    assert echo_once(second) == b"ping"
    second.close()
    assert not os.path.exists(p)


def test_close_keeps_a_file_put_in_its_place(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    srv = afunix.listen(p)
    os.unlink(p)
    with open(p, "w") as f:
        f.write("x")
    srv.close()
    assert os.path.isfile(p)


def test_detach_and_dup_do_not_remove_the_file(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    srv = afunix.listen(p)
    twin = srv.dup()
    assert twin.path is None
    twin.close()
    assert os.path.exists(p)
    fd = srv.detach()
    assert srv.path is None
    srv.close()
    assert os.path.exists(p)
    with socket.socket(fileno=fd) as plain:
        assert echo_once(plain) == b"ping"
    os.unlink(p)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_child_closing_does_not_remove_parents_file(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p) as srv:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            srv.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert os.path.exists(p)
        assert echo_once(srv) == b"ping"
    assert not os.path.exists(p)


# --- connect --------------------------------------------------------------------


def test_connect_timeout_is_left_on_the_socket(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p):
        with afunix.connect(p, timeout=2.5) as c:
            assert c.gettimeout() == 2.5
        with afunix.connect(p, timeout=0) as c:
            assert c.gettimeout() == 0.0 and not c.getblocking()
        with afunix.connect(p) as c:
            assert c.gettimeout() is None
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(7.0)
        try:
            with afunix.connect(p) as c:
                assert c.gettimeout() == 7.0
        finally:
            socket.setdefaulttimeout(previous)


def test_connect_timeout_bounds_a_full_backlog(short_dir: str, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, backlog=0) as srv:
        clients = []
        try:
            while True:
                c = socket.socket(socket.AF_UNIX)
                clients.append(c)
                c.setblocking(False)
                c.connect(p)
        except BlockingIOError:
            pass
        try:
            start = time.monotonic()
            with pytest.raises(socket.timeout):
                afunix.connect(p, timeout=0.3)
            assert 0.25 <= time.monotonic() - start < 3
            with pytest.raises(BlockingIOError):
                afunix.connect(p, timeout=0)
            # A slot frees up while we wait: the connect gets it.
            threading.Timer(0.2, lambda: srv.accept()[0].close()).start()
            with afunix.connect(p, timeout=T) as c:
                assert c.gettimeout() == T
        finally:
            for c in clients:
                c.close()


def test_connect_errors_leak_nothing(short_dir: str, fd_baseline: set[int]) -> None:
    missing = os.path.join(short_dir, "missing")
    stale = os.path.join(short_dir, "stale")
    stale_socket(stale)
    for _ in range(50):
        with pytest.raises(FileNotFoundError):
            afunix.connect(missing, timeout=T)
        with pytest.raises(ConnectionRefusedError):
            afunix.connect(stale, timeout=T)
        with pytest.raises(ConnectionRefusedError):
            afunix.connect(stale)


# --- abstract names and AUTOBIND ------------------------------------------------


def test_abstract_address_form() -> None:
    if not afunix.supports("abstract"):
        with pytest.raises(OSError):
            afunix.abstract("x")
        return
    assert afunix.abstract("name") == b"\0name"
    assert afunix.abstract(b"na\0me") == b"\0na\0me"
    assert afunix.abstract("\u00e9") == b"\0" + os.fsencode("\u00e9")
    assert afunix.abstract("n" * 107) == b"\0" + b"n" * 107
    with pytest.raises(ValueError, match="108"):
        afunix.abstract("n" * 108)
    with pytest.raises(ValueError):
        afunix.abstract("")
    with pytest.raises(TypeError):
        afunix.abstract(5)  # type: ignore[arg-type]


def test_abstract_without_support_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "supports", lambda name: name != "abstract")
    for call in (lambda: afunix.abstract("x"), lambda: afunix.listen(b"\0x"),
                 lambda: afunix.listen(afunix.AUTOBIND), lambda: afunix.connect(b"\0x")):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EAFNOSUPPORT


@needs_abstract
def test_abstract_interoperates_with_the_stdlib(fd_baseline: set[int]) -> None:
    name = afunix.abstract("afunix-test-%d-%d" % (os.getpid(), time.monotonic_ns()))
    with afunix.listen(name) as srv:
        assert srv.path is None
        assert srv.getsockname() == name
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(T)
            c.connect(name)
            srv.accept()[0].close()
        with pytest.raises(OSError) as info:
            afunix.listen(name)
        assert info.value.errno == errno.EADDRINUSE
    with socket.socket(socket.AF_UNIX) as plain:
        plain.bind(name)
        plain.listen()
        with afunix.connect(name, timeout=T) as c:
            conn, _ = plain.accept()
            with conn:
                c.sendall(b"abs")
                conn.settimeout(T)
                assert conn.recv(10) == b"abs"


@needs_abstract
def test_abstract_longest_name(fd_baseline: set[int]) -> None:
    name = afunix.abstract(("afx%d-" % os.getpid()).ljust(107, "z"))
    with afunix.listen(name, socket.SOCK_DGRAM) as srv:
        srv.settimeout(T)
        with afunix.connect(name, socket.SOCK_DGRAM, timeout=T) as c:
            c.send(b"long")
            assert srv.recv(10) == b"long"
    with pytest.raises(ValueError):
        afunix.listen(b"\0" + b"z" * 108)


@needs_abstract
@pytest.mark.parametrize("type", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_autobind(type: int, fd_baseline: set[int]) -> None:
    with afunix.listen(afunix.AUTOBIND, type) as a, afunix.listen(afunix.AUTOBIND, type) as b:
        name = a.getsockname()
        assert isinstance(name, bytes) and name.startswith(b"\0") and len(name) > 1
        assert name != b.getsockname()
        assert a.path is None
        with afunix.connect(name, type, timeout=T) as c:
            if type == socket.SOCK_STREAM:
                conn, _ = a.accept()
                with conn:
                    c.sendall(b"auto")
                    conn.settimeout(T)
                    assert conn.recv(10) == b"auto"
            else:
                c.send(b"auto")
                a.settimeout(T)
                assert a.recv(10) == b"auto"
    assert repr(afunix.AUTOBIND) == "afunix.AUTOBIND"


# --- real external peers: socat ---------------------------------------------------


def socat(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [need_tool("socat"), "-T", "5", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


def serve_socat_client(srv: socket.socket, client: subprocess.Popen[bytes]) -> bytes:
    srv.settimeout(T)
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(T)
        got = b""
        while not got.endswith(b"\n"):
            chunk = conn.recv(100)
            if not chunk:
                break
            got += chunk
        conn.sendall(b"reply:" + got)
    assert client.stdout is not None and client.stderr is not None
    out = client.stdout.read()  # socat -T 5 bounds this
    assert client.wait(T) == 0, client.stderr.read()
    assert got == b"hello socat\n"
    return out


@pytest.mark.parametrize("mode", [None, 0o600])
def test_socat_connects_to_a_path_server(short_dir: str, mode: Any) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, mode=mode) as srv:
        client = socat("STDIO", "UNIX-CONNECT:" + p)
        assert client.stdin is not None
        client.stdin.write(b"hello socat\n")
        client.stdin.close()
        try:
            assert serve_socat_client(srv, client) == b"reply:hello socat\n"
        finally:
            client.kill()
            client.wait(T)
            for stream in (client.stdout, client.stderr):
                if stream is not None:
                    stream.close()


@needs_abstract
def test_socat_connects_to_an_abstract_server() -> None:
    name = "afunix-socat-%d-%d" % (os.getpid(), time.monotonic_ns())
    with afunix.listen(afunix.abstract(name)) as srv:
        client = socat("STDIO", "ABSTRACT-CONNECT:" + name)
        assert client.stdin is not None
        client.stdin.write(b"hello socat\n")
        client.stdin.close()
        try:
            assert serve_socat_client(srv, client) == b"reply:hello socat\n"
        finally:
            client.kill()
            client.wait(T)
            for stream in (client.stdout, client.stderr):
                if stream is not None:
                    stream.close()


def test_connect_reaches_a_socat_server(short_dir: str, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "socat.sock")
    server = socat("UNIX-LISTEN:" + p, "EXEC:cat")
    try:
        wait_for_listener(p, server, T)
        with afunix.connect(p, timeout=T) as c:
            c.sendall(b"through socat")
            c.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                chunk = c.recv(100)
                if not chunk:
                    break
                got += chunk
        assert got == b"through socat"
        server.wait(T)
    finally:
        server.kill()
        server.communicate(timeout=T)


@needs_abstract
def test_connect_reaches_a_socat_abstract_server(fd_baseline: set[int]) -> None:
    name = "afunix-socat-srv-%d-%d" % (os.getpid(), time.monotonic_ns())
    server = socat("ABSTRACT-LISTEN:" + name, "EXEC:cat")
    try:
        deadline = time.monotonic() + T
        while True:
            try:
                c = afunix.connect(afunix.abstract(name), timeout=T)
                break
            except ConnectionRefusedError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
        with c:
            c.sendall(b"abstract socat")
            c.shutdown(socket.SHUT_WR)
            c.settimeout(T)
            got = b""
            while True:
                chunk = c.recv(100)
                if not chunk:
                    break
                got += chunk
        assert got == b"abstract socat"
    finally:
        server.kill()
        server.communicate(timeout=T)


# --- leaks --------------------------------------------------------------------------


def test_no_descriptor_leak_over_many_cycles(short_dir: str) -> None:
    p = os.path.join(short_dir, "s")
    before = open_fds()
    for i in range(300):
        mode = 0o600 if i % 2 else None
        with afunix.listen(p, mode=mode) as srv:
            with afunix.connect(p, timeout=T) as c:
                conn, _ = srv.accept()
                conn.close()
                del c
    assert open_fds() == before
    assert os.listdir(short_dir) == []


def test_no_descriptor_leak_on_error_paths(short_dir: str) -> None:
    live = os.path.join(short_dir, "live")
    regular = os.path.join(short_dir, "regular")
    stale = os.path.join(short_dir, "stale")
    open(regular, "w").close()
    nodir = os.path.join(short_dir, "no", "such", "dir")
    with afunix.listen(live) as srv:
        before = open_fds()
        for _ in range(100):
            for exc_type, call in [
                (OSError, lambda: afunix.listen(live)),
                (OSError, lambda: afunix.listen(live, mode=0o600)),
                (FileExistsError, lambda: afunix.listen(regular)),
                (FileExistsError, lambda: afunix.listen(regular, mode=0o600)),
                (FileNotFoundError, lambda: afunix.listen(nodir)),
                (FileNotFoundError, lambda: afunix.listen(nodir, mode=0o600)),
                (ValueError, lambda: afunix.listen("x" * 200)),
                (TypeError, lambda: afunix.listen(live, "x")),  # type: ignore[arg-type]
                (ValueError, lambda: afunix.connect(b"")),
            ]:
                with pytest.raises(exc_type):
                    call()
            stale_socket(stale)
            afunix.listen(stale).close()
            # Drain the probes' connections so the backlog never fills.
            srv.setblocking(False)
            while True:
                try:
                    srv.accept()[0].close()
                except BlockingIOError:
                    break
        assert open_fds() == before
    assert sorted(os.listdir(short_dir)) == ["regular"]


def test_default_timeout_also_waits_out_a_full_backlog(short_dir: str, fd_baseline: set[int]) -> None:
    p = os.path.join(short_dir, "s")
    with afunix.listen(p, backlog=0) as srv:
        queued = []
        try:
            # fill the backlog (0 admits one pending connection on Linux)
            for _ in range(4):
                c = socket.socket(socket.AF_UNIX)
                c.setblocking(False)
                try:
                    c.connect(p)
                except BlockingIOError:
                    c.close()
                    break
                queued.append(c)
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(0.2)
            try:
                start = time.monotonic()
                with pytest.raises(socket.timeout):
                    afunix.connect(p)
                assert time.monotonic() - start >= 0.15  # waited, not refused at once
            finally:
                socket.setdefaulttimeout(old)
        finally:
            for c in queued:
                c.close()
    assert srv.fileno() == -1


class _Interrupt(Exception):
    pass


def test_an_interrupt_after_any_call_while_taking_the_lock_leaves_it_free(
    short_dir: str, monkeypatch: pytest.MonkeyPatch, fd_baseline: set[int],
) -> None:
    # Ctrl-C (an exception from a signal handler) while the listen lock is
    # taken.  CPython runs a handler right after a C function returns, so
    # the exception is raised there: after every such call made while the
    # lock is taken, in turn.  Not right after os.open itself: no Python
    # code can take a descriptor from os.open before a handler may run (the
    # stdlib's open() has the same window).
    monkeypatch.setattr(pathlock, "LOCK_WAIT", 0.3)
    raw = os.fsencode(os.path.join(short_dir, "s"))
    callers = {f.__code__ for f in (pathlock._acquire, pathlock.PathLock.__enter__, pathlock._open,
                                    pathlock._create, pathlock._still_named)}
    k = 0
    while True:
        k += 1
        seen = [0]

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "c_return" and frame.f_code in callers and arg is not os.open:
                seen[0] += 1
                if seen[0] == k:
                    raise _Interrupt()

        sys.setprofile(profile)
        try:
            with pathlock.PathLock(raw):
                interrupted = False
        except _Interrupt:
            interrupted = True
        finally:
            sys.setprofile(None)
        if not interrupted:
            break  # k went past the last call
        with pathlock.PathLock(raw) as lock:  # at once: EADDRINUSE after 0.3 s if still held
            assert lock._fd >= 0
        assert os.listdir(short_dir) == [], k
    assert k > 5
