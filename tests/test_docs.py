"""Every Python example in README.md and docs/*.md runs, as a program of its own, on both backends.

Each fenced ```python block is written to a file and run in a fresh
interpreter (bounded in time, so an example that hangs fails).  A block
that needs something around it says so with a marker on the line before
it, ``<!-- example:NAME -->``; NAME is one of the set-ups below, which
prepare what the block talks to (a socket-activation environment, a peer)
and check what the block's comments promise.  Everything else runs as
printed.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 60  # seconds: every example finishes in well under one

pytestmark = pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="needs the source checkout")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*example:(?P<name>[\w-]+)\s*-->\s*$")
_PYTHON = {"python", "py", "python3"}


class Block(NamedTuple):
    where: str  # "README.md:123", the line of the opening fence
    code: str
    marker: Optional[str]


def python_blocks(path: Path) -> List[Block]:
    """The fenced Python blocks of a Markdown file, dedented, with the marker before each."""
    lines = path.read_text().splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, lang, start = fence.group("indent"), fence.group("lang"), i
        i += 1
        body: List[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), "%s:%d: a code block that never ends" % (path.name, start + 1)
        i += 1  # the closing fence
        if lang.lower() not in _PYTHON:
            continue
        for line in body:
            assert not line.strip() or line.startswith(indent), \
                "%s:%d: a line of the block is less indented than its fence" % (path.name, start + 1)
        marker = _MARKER.match(lines[start - 1]) if start else None
        code = "\n".join(line[len(indent):] for line in body) + "\n"
        blocks.append(Block("%s:%d" % (path.relative_to(ROOT), start + 1), code,
                            marker.group("name") if marker else None))
    return blocks


BLOCKS = [block for path in DOCUMENTS if path.exists() for block in python_blocks(path)]


# ---- how a block runs ------------------------------------------------------------


class Run(NamedTuple):
    """One run of a block: the program, its environment, and what to check afterwards."""

    code: str
    env: Dict[str, str]
    pass_fds: Tuple[int, ...] = ()
    launcher: Optional[str] = None  # run the program through this -c code instead of directly
    after: Optional[Callable[[], None]] = None


# The environment of every run: the backend under test, temporary files in a
# short directory of the test's (AF_UNIX paths are at most 107 bytes), and
# nothing of a service manager unless a set-up passes it on purpose.
def _base_env(backend: str, tmp: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")}
    env.update(AFUNIX_BACKEND=backend, TMPDIR=tmp, PYTHONDONTWRITEBYTECODE="1")
    return env


# Appended to every program: it ran on the backend it was meant to.
_BACKEND_CHECK = textwrap.dedent("""
    import os as _os, afunix as _afunix
    assert _afunix.BACKEND == _os.environ["AFUNIX_BACKEND"], _afunix.BACKEND
""")


def _plain(block: Block, env: Dict[str, str]) -> Iterator[Run]:
    yield Run(block.code, env)


# Socket activation (README, "Socket activation and readiness"): run once as
# a plain program (nothing passed: empty lists, notify is False), and once
# as systemd would start it: a listening socket at descriptor 3 named "web",
# LISTEN_PID naming the program itself, and NOTIFY_SOCKET bound here, where
# READY=1 must arrive.
_ACTIVATION_LAUNCHER = textwrap.dedent("""
    import os, sys
    fd = int(sys.argv[1])
    os.dup2(fd, 3)
    if fd != 3:
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())   # exec keeps the pid
    os.execv(sys.executable, [sys.executable, sys.argv[2]])
""")


def _activation(block: Block, env: Dict[str, str]) -> Iterator[Run]:
    yield Run(block.code + "assert named == [] and socks == []\n", env)
    tmp = env["TMPDIR"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with listener, notify:
        listener.bind(os.path.join(tmp, "web.sock"))
        listener.listen()
        notify.bind(os.path.join(tmp, "notify.sock"))
        notify.settimeout(0.0)
        activated = dict(env, LISTEN_FDS="1", LISTEN_FDNAMES="web",
                         NOTIFY_SOCKET=os.path.join(tmp, "notify.sock"))

        def ready_arrived() -> None:
            assert notify.recv(100) == b"READY=1"

        yield Run(block.code + textwrap.dedent("""
            assert [name for name, _ in named] == ["web"]
            assert [sock for _, sock in named] == socks and socks[0].fileno() == 3
            assert socks[0].getsockname().endswith("web.sock")
        """), activated, (listener.fileno(),), _ACTIVATION_LAUNCHER, ready_arrived)


# docs/PROTOCOL.md, "A peer in 20 lines": the peer's two functions, talking
# to an afunix Channel both ways, descriptors included.
_PROTOCOL_PEER_CHECK = textwrap.dedent("""
    import os
    import afunix
    from afunix import Message

    mine, theirs = socket.socketpair()
    channel = afunix.Channel(theirs)
    r, w = os.pipe()
    send_frame(mine, b"plain")
    send_frame(mine, b"with one", [r])
    assert channel.recv_message() == Message(b"plain")
    got = channel.recv_message()
    assert got.data == b"with one" and len(got.fds) == 1
    os.write(w, b"!")
    assert os.read(got.fds[0], 1) == b"!"
    afunix.close_fds(got.fds)
    channel.send_many([b"back", Message(b"with two", fds=[r, w])])
    channel.close()
    frames = list(recv_frames(mine))
    assert [payload for payload, _ in frames] == [b"back", b"with two"]
    assert [len(fds) for _, fds in frames] == [0, 2]
""")


def _protocol_peer(block: Block, env: Dict[str, str]) -> Iterator[Run]:
    yield Run(block.code + _PROTOCOL_PEER_CHECK, env)


SETUPS: Dict[Optional[str], Callable[[Block, Dict[str, str]], Iterator[Run]]] = {
    None: _plain,
    "activation": _activation,
    "protocol-peer": _protocol_peer,
}


def _run(run: Run, where: str, tmp: str) -> None:
    script = os.path.join(tmp, "example.py")
    with open(script, "w") as f:
        f.write(run.code + _BACKEND_CHECK)
    if run.launcher is None:
        argv = [sys.executable, script]
    else:
        argv = [sys.executable, "-c", run.launcher, *map(str, run.pass_fds), script]
    try:
        done = subprocess.run(argv, env=run.env, cwd=tmp, pass_fds=run.pass_fds,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("%s: the example did not finish within %d s" % (where, TIMEOUT))
    assert done.returncode == 0, "%s failed:\n%s%s" % (where, done.stdout, done.stderr)
    if run.after is not None:
        run.after()


# ---- the tests -------------------------------------------------------------------


def test_every_python_block_is_collected() -> None:
    # the extractor misses nothing: as many blocks as opening fences say python
    for path in DOCUMENTS:
        fences = sum(1 for line in path.read_text().splitlines()
                     if (m := _FENCE.match(line)) and m.group("lang").lower() in _PYTHON)
        assert len(python_blocks(path)) == fences, path
    assert sum(block.where.startswith("README.md") for block in BLOCKS) >= 9
    assert any(block.where.startswith("docs/") for block in BLOCKS)
    unknown = [b.where for b in BLOCKS if b.marker not in SETUPS]
    assert not unknown, "markers naming no set-up: %s" % unknown


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_example_runs(block: Block, backend: str, short_dir: str) -> None:
    runs = SETUPS[block.marker](block, _base_env(backend, short_dir))
    for run in runs:
        _run(run, block.where, short_dir)
