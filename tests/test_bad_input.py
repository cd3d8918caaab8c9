"""Hostile and wrong input to every public function: clear exceptions, never a crash."""
from __future__ import annotations

import errno
import socket
import sys

import afunix


def test_msg_trunc_flag_keeps_each_message_within_bufsize() -> None:
    # With MSG_TRUNC passed in, Linux reports each datagram's full length;
    # a length past bufsize used to run into the next message's bytes.
    a, b = afunix.socketpair(socket.SOCK_DGRAM)
    with a, b:
        afunix.send_many(a, [b"a" * 10, b"b" * 10, b"c" * 3])
        got = afunix.recv_many(b, 3, 4, socket.MSG_TRUNC)
        assert [m.data for m in got] == [b"aaaa", b"bbbb", b"ccc"]
        assert [bool(m.flags & socket.MSG_TRUNC) for m in got] == [True, True, False]
        afunix.send_many(a, [b"a" * 10, b"b" * 10])
        batch = afunix.RecvBatch(2, 4)
        assert batch.recv(b, socket.MSG_TRUNC) == 2
        assert [bytes(view) for view in batch] == [b"aaaa", b"bbbb"]
        assert bytes(batch[0]) == b"aaaa"


# ---- table: every public callable, wrong input ---------------------------------

import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Tuple  # noqa: E402

import pytest  # noqa: E402

from afunix import Message  # noqa: E402

# (True is an int to the stdlib too: accepted, as sock.recv(True) is)
BAD_SIZES = [-1, 0, 2**31, 2**63, 10**30, 1.5, "8", None]


@pytest.fixture
def env() -> Iterator[Dict[str, Any]]:
    """Things that are not what a call wants: a pipe, a file, AF_INET, a closed socket."""
    a, b = afunix.socketpair(socket.SOCK_SEQPACKET)
    a.settimeout(0.0)
    b.settimeout(0.0)
    r, w = os.pipe()
    f = tempfile.TemporaryFile()
    inet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inet.bind(("127.0.0.1", 0))
    inet.connect(inet.getsockname())
    inet.settimeout(0.0)
    closed, other = afunix.socketpair()
    closed.close()
    other.close()
    yield {"a": a, "b": b, "pipe_r": r, "pipe_w": w, "file": f, "inet": inet, "closed": closed}
    for s in (a, b, inet, f):
        s.close()
    os.close(r)
    os.close(w)


class FileLike:
    def __init__(self, fd: Any) -> None:
        self.fd = fd

    def fileno(self) -> Any:
        return self.fd


# (name of the public callable, case id, call, exceptions that are a clear answer)
Case = Tuple[str, str, Callable[[Dict[str, Any]], Any], Tuple[type, ...]]
# Never OverflowError: an integer past a C int is a ValueError raised by afunix
# itself, with one text on both backends (test_out_of_range_ints_*).
TYPE_OR_VALUE = (TypeError, ValueError)
CASES: List[Case] = []


def case(name: str, label: str, call: Callable[[Dict[str, Any]], Any], *errors: type) -> None:
    CASES.append((name, label, call, errors))


def not_sockets() -> List[Tuple[str, Callable[[Dict[str, Any]], Any]]]:
    return [
        ("closed", lambda e: e["closed"]),
        ("pipe", lambda e: FileLike(e["pipe_r"])),
        ("file", lambda e: e["file"]),
        ("fd-negative", lambda e: FileLike(-5)),
        ("fd-huge", lambda e: FileLike(2**40)),
        ("fd-str", lambda e: FileLike("3")),
        ("int", lambda e: 3),
        ("none", lambda e: None),
    ]


for label, sock in not_sockets():
    case("send_many", label, lambda e, s=sock: afunix.send_many(s(e), [b"x"]), OSError, *TYPE_OR_VALUE)
    case("recv_many", label, lambda e, s=sock: afunix.recv_many(s(e), 1, 8), OSError, *TYPE_OR_VALUE)
    case("RecvBatch", label, lambda e, s=sock: afunix.RecvBatch(1, 8).recv(s(e)), OSError, *TYPE_OR_VALUE)
    case("send_fds", label, lambda e, s=sock: afunix.send_fds(s(e), [b"x"], [0]), OSError, *TYPE_OR_VALUE)
    case("recv_fds", label, lambda e, s=sock: afunix.recv_fds(s(e), 8, 1), OSError, *TYPE_OR_VALUE)
    case("peer_credentials", label, lambda e, s=sock: afunix.peer_credentials(s(e)), OSError, *TYPE_OR_VALUE)
    case("peer_pidfd", label, lambda e, s=sock: afunix.peer_pidfd(s(e)), OSError, *TYPE_OR_VALUE)
    case("pass_credentials", label, lambda e, s=sock: afunix.pass_credentials(s(e)), OSError, *TYPE_OR_VALUE)
    case("Channel", label, lambda e, s=sock: afunix.Channel(s(e)), OSError, *TYPE_OR_VALUE)

for size in BAD_SIZES:
    label = repr(size)
    case("recv_many", "max_messages=" + label, lambda e, n=size: afunix.recv_many(e["b"], n, 8), *TYPE_OR_VALUE)
    case("recv_many", "bufsize=" + label, lambda e, n=size: afunix.recv_many(e["b"], 1, n), *TYPE_OR_VALUE)
    case("RecvBatch", "max_messages=" + label, lambda e, n=size: afunix.RecvBatch(n, 8), *TYPE_OR_VALUE)
    case("RecvBatch", "maxfds=" + label, lambda e, n=size: afunix.RecvBatch(1, 8, maxfds=n if n != 0 else -1),
         *TYPE_OR_VALUE)
    if size != 0:  # bufsize 0 takes descriptors without data, as in the stdlib (test_parity.py)
        case("recv_fds", "bufsize=" + label, lambda e, n=size: afunix.recv_fds(e["b"], n, 1),
             *TYPE_OR_VALUE)
    case("socketpairs", "n=" + label, lambda e, n=size: afunix.socketpairs(n if n != 0 else -1), *TYPE_OR_VALUE)

for flags in [-1 << 40, 1.0, "0", None]:
    case("send_many", "flags=%r" % (flags,), lambda e, f=flags: afunix.send_many(e["a"], [b"x"], f),
         OSError, *TYPE_OR_VALUE)
    case("recv_many", "flags=%r" % (flags,), lambda e, f=flags: afunix.recv_many(e["b"], 1, 8, f),
         OSError, *TYPE_OR_VALUE)

for label, msgs in [
    ("str", ["text"]), ("int", [5]), ("none", [None]), ("not-iterable", 5),
    ("non-contiguous", [memoryview(b"abcdef")[::2]]),
    ("fd-negative", [Message(b"x", fds=(-1,))]), ("fd-str", [Message(b"x", fds=("0",))]),
    ("fd-float", [Message(b"x", fds=(0.0,))]), ("fds-254", [Message(b"x", fds=(0,) * 254)]),
    ("fd-huge", [Message(b"x", fds=(2**40,))]), ("fd-closed", [Message(b"x", fds=(2**20,))]),
    ("address-int", [Message(b"x", address=5)]), ("address-long", [Message(b"x", address="p" * 200)]),
    ("credentials-bad", [Message(b"x", credentials=("a", 1, 2))]),
    ("credentials-huge", [Message(b"x", credentials=(2**40, 0, 0))]),
]:
    case("send_many", label, lambda e, m=msgs: afunix.send_many(e["a"], m), OSError, *TYPE_OR_VALUE)

for label, fds in [("negative", [-1]), ("str", ["1"]), ("254", [0] * 254), ("huge", [2**40]),
                   ("closed", [2**20]), ("none", None)]:
    case("send_fds", "fds-" + label, lambda e, f=fds: afunix.send_fds(e["a"], [b"x"], f), OSError, *TYPE_OR_VALUE)
case("send_fds", "buffers-int", lambda e: afunix.send_fds(e["a"], [5], [0]), *TYPE_OR_VALUE)
# (recv_fds takes a maxfds over 253 as the stdlib does: test_parity.py)
case("recv_fds", "maxfds=-1", lambda e: afunix.recv_fds(e["b"], 8, -1), *TYPE_OR_VALUE)

for label, t in [("type-inet", 999), ("type-str", "x"), ("type-none", None), ("type-raw", socket.SOCK_RAW)]:
    case("socketpair", label, lambda e, t=t: afunix.socketpair(t), OSError, *TYPE_OR_VALUE)
    case("socketpairs", label, lambda e, t=t: afunix.socketpairs(1, t), OSError, *TYPE_OR_VALUE)
    case("listen", label, lambda e, t=t: afunix.listen(afunix.AUTOBIND, t), OSError, *TYPE_OR_VALUE)
    case("channel_pair", label, lambda e, t=t: afunix.channel_pair(t), OSError, *TYPE_OR_VALUE)

for label, address in [("int", 5), ("none", None), ("long-path", "/tmp/" + "p" * 200),
                       ("nul-inside", "/tmp/a\0b"), ("long-abstract", b"\0" + b"a" * 200)]:
    case("listen", "address-" + label, lambda e, a=address: afunix.listen(a), OSError, *TYPE_OR_VALUE)
    case("connect", "address-" + label, lambda e, a=address: afunix.connect(a, timeout=1), OSError,
         *TYPE_OR_VALUE)
case("connect", "timeout-negative", lambda e: afunix.connect("/nonexistent/x", timeout=-1), OSError,
     *TYPE_OR_VALUE)
case("connect", "timeout-str", lambda e: afunix.connect("/nonexistent/x", timeout="1"), OSError, *TYPE_OR_VALUE)
case("abstract", "int", lambda e: afunix.abstract(5), *TYPE_OR_VALUE)
case("abstract", "too-long", lambda e: afunix.abstract("a" * 300), *TYPE_OR_VALUE)
case("notify", "int", lambda e: afunix.notify(5), OSError, *TYPE_OR_VALUE)
case("supports", "int", lambda e: afunix.supports(5), *TYPE_OR_VALUE)
case("close_fds", "str", lambda e: afunix.close_fds(["x"]), *TYPE_OR_VALUE)
case("Channel", "inet", lambda e: afunix.Channel(e["inet"]), OSError, *TYPE_OR_VALUE)

NOT_CALLABLE_WITH_BAD_INPUT = {
    "AUTOBIND", "BACKEND", "CAPABILITIES", "MAX_MESSAGES", "MAX_PATH_BYTES", "SCM_MAX_FD",
    "__version__", "Credentials", "Message", "TruncatedError", "ProtocolError", "MessageKindError",
    "FrameBatch",
    "ListeningSocket",  # value types and constants: any content is allowed
    "Loan",  # made by Channel.loan only: tests/test_lane_loan.py refuses bad loans and sizes
    "listen_fds", "listen_fds_with_names",  # input is the environment: tests/test_activation.py
}


def test_every_public_callable_is_in_the_table() -> None:
    covered = {name for name, *_ in CASES}
    missing = set(afunix.__all__) - covered - NOT_CALLABLE_WITH_BAD_INPUT
    assert not missing, "no bad-input case for %s" % sorted(missing)


@pytest.mark.parametrize("name, label, call, errors", CASES, ids=["%s-%s" % c[:2] for c in CASES])
def test_bad_input_is_a_clear_error(env: Dict[str, Any], name: str, label: str,
                                    call: Callable[[Dict[str, Any]], Any],
                                    errors: Tuple[type, ...]) -> None:
    before = {int(f) for f in os.listdir("/proc/self/fd")}
    try:
        result = call(env)
    except errors:
        pass
    except Exception as exc:  # any other type is not a clear answer
        pytest.fail("%s(%s) raised %s: %s" % (name, label, type(exc).__name__, exc))
    else:
        # only an OSError-or-success case may succeed: say which
        assert OSError in errors, "%s(%s) accepted bad input: %r" % (name, label, result)
        if isinstance(result, tuple) and len(result) == 4:
            afunix.close_fds(result[1])
    if name != "Channel":
        assert {int(f) for f in os.listdir("/proc/self/fd")} <= before | {max(before) + 1}


def test_af_inet_socket_is_refused_clearly(env: Dict[str, Any]) -> None:
    # Addresses, descriptors and credentials are AF_UNIX things: an AF_INET
    # source address used to come back parsed as a sun_path (C backend) or
    # fail with a TypeError deep in the stdlib backend.
    inet = env["inet"]
    inet.send(b"queued")
    for call in (lambda: afunix.send_many(inet, [b"one"]), lambda: afunix.recv_many(inet, 4, 16),
                 lambda: afunix.RecvBatch(4, 16).recv(inet), lambda: afunix.recv_fds(inet, 16, 1),
                 lambda: afunix.send_fds(inet, [b"x"], [0]),
                 lambda: afunix.recv_many(FileLike(inet.fileno()), 4, 16)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EAFNOSUPPORT
    assert inet.recv(16) == b"queued"  # nothing was taken
    assert inet.fileno() >= 0


@pytest.mark.skipif(sys.implementation.name == "pypy",
                    reason="PyPy lets a bytearray be resized while a memoryview exports it "
                           "(no pin; the C core still refuses the mismatch: docs/reliability.md)")
def test_buffer_resized_by_another_thread_during_send_many(env: Dict[str, Any]) -> None:
    a, b = env["a"], env["b"]
    buf = bytearray(b"z" * 64)
    stop = threading.Event()

    def resizer() -> None:
        while not stop.is_set():
            try:
                buf.extend(b"z" * 64)
                del buf[64:]
            except BufferError:  # exported to a send in progress: refused, as it should be
                pass

    t = threading.Thread(target=resizer)
    t.start()
    try:
        for _ in range(300):
            try:
                afunix.send_many(a, [buf] * 8)
            except BlockingIOError:
                pass
            try:
                for m in afunix.recv_many(b, 64, 256):
                    assert set(m.data) == {ord("z")} and len(m.data) % 64 == 0
            except BlockingIOError:
                pass
    finally:
        stop.set()
        t.join(10)


# ---- integers past what the kernel's calls take: one ValueError, both backends ----

from afunix import _backend  # noqa: E402

C_INT_MAX = 2**31 - 1
# (label, call): each passes one integer a C int cannot hold, or a negative
# one where the kernel only takes >= 0.
OUT_OF_RANGE: List[Tuple[str, Callable[[Dict[str, Any]], Any]]] = [
    ("send_many-fd", lambda e: afunix.send_many(e["a"], [Message(b"x", fds=(C_INT_MAX + 1,))])),
    ("send_many-fd-list", lambda e: afunix.send_many(e["a"], [Message(b"x", fds=[0, 2**40])])),
    ("send_many-fd-fileno", lambda e: afunix.send_many(e["a"], [Message(b"x", fds=(FileLike(2**31),))])),
    ("send_fds-fd", lambda e: afunix.send_fds(e["a"], [b"x"], [2**31])),
    ("send_many-flags", lambda e: afunix.send_many(e["a"], [b"x"], 2**31)),
    ("send_many-flags-negative", lambda e: afunix.send_many(e["a"], [b"x"], -1)),
    ("send_fds-flags", lambda e: afunix.send_fds(e["a"], [b"x"], [0], 2**40)),
    ("recv_many-flags", lambda e: afunix.recv_many(e["b"], 1, 8, 2**31)),
    ("recv_many-flags-negative", lambda e: afunix.recv_many(e["b"], 1, 8, -(2**31))),
    ("RecvBatch.recv-flags", lambda e: afunix.RecvBatch(1, 8).recv(e["b"], 2**63)),
    ("recv_fds-flags", lambda e: afunix.recv_fds(e["b"], 8, 1, 2**31)),
    ("credentials-pid", lambda e: afunix.send_many(e["a"], [Message(b"x", credentials=(2**31, 0, 0))])),
    ("credentials-uid", lambda e: afunix.send_many(e["a"], [Message(b"x", credentials=(os.getpid(), 2**32, 0))])),
    ("credentials-gid-negative",
     lambda e: afunix.send_many(e["a"], [Message(b"x", credentials=(os.getpid(), 0, -1))])),
    ("socket-fileno", lambda e: afunix.recv_many(FileLike(2**31), 1, 8)),
    ("close_fds", lambda e: afunix.close_fds([0, 2**31])),
    ("close_fds-negative", lambda e: afunix.close_fds([-(2**40)])),
    ("Channel.send-fd", lambda e: e["channel"].send(b"x", [2**31])),
    ("Channel.send_many-fd", lambda e: e["channel"].send_many([Message(b"x", fds=(2**40,))])),
]


@pytest.mark.parametrize("label, call", OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_ints_are_one_value_error_on_both_backends_before_any_system_call(
        env: Dict[str, Any], label: str, call: Callable[[Dict[str, Any]], Any]) -> None:
    ch_a, ch_b = afunix.channel_pair()
    env["channel"] = ch_a
    answers = {}
    try:
        for name in ("c", "stdlib"):
            try:
                _backend.use(name)
            except ImportError:
                continue  # conftest reports the missing core
            env["a"].send(b"queued")  # a receive must leave it; a send must add nothing
            with pytest.raises(ValueError) as info:
                call(env)
            answers[name] = str(info.value)
            assert "2147483647" in answers[name]
            assert env["b"].recv(16) == b"queued"
            with pytest.raises(BlockingIOError):
                env["b"].recv(16)
            ch_b.socket.settimeout(0.0)
            with pytest.raises(BlockingIOError):
                ch_b.recv()  # the channel sent nothing either
    finally:
        ch_a.close()
        ch_b.close()
    assert len(set(answers.values())) == 1, answers


def test_credentials_in_range_reach_the_kernel_on_both_backends(env: Dict[str, Any]) -> None:
    # The checks refuse only what no kernel call takes: our own pid, uid and
    # gid go through (the kernel checks them), a pid of nobody is ESRCH.
    afunix.pass_credentials(env["b"])
    me = (os.getpid(), os.getuid(), os.getgid())
    assert afunix.send_many(env["a"], [Message(b"x", credentials=me)]) == 1
    [got] = afunix.recv_many(env["b"], 1, 8)
    assert tuple(got.credentials) == me
    with pytest.raises(OSError) as info:
        afunix.send_many(env["a"], [Message(b"x", credentials=(C_INT_MAX, 0, 0))])
    assert not isinstance(info.value, ValueError)


# ---- batch indexes: what a list takes, and TypeError for what it refuses ----------

class Two:
    def __index__(self) -> int:
        return 2


NOT_INDEXES = [1.5, 0.0, "0", None, b"\0", 1j]


def test_recv_batch_index_is_an_integer_as_for_a_list(env: Dict[str, Any]) -> None:
    afunix.send_many(env["a"], [b"zero", b"one", b"two"])
    batch = afunix.RecvBatch(4, 16)
    assert batch.recv(env["b"]) == 3
    like = [b"zero", b"one", b"two"]
    for i in NOT_INDEXES:
        with pytest.raises(TypeError):
            like[i]  # type: ignore[index]
        for use in (batch.__getitem__, batch.fds, batch.flags, batch.address, batch.credentials):
            with pytest.raises(TypeError, match="RecvBatch indices must be integers"):
                use(i)  # type: ignore[arg-type]
    # what a list accepts, so does the batch: bool, __index__, negative
    assert bytes(batch[True]) == like[True]
    assert bytes(batch[Two()]) == like[Two()]  # type: ignore[index]
    assert batch.flags(Two()) == batch.flags(2)  # type: ignore[arg-type]
    assert bytes(batch[-1]) == like[-1]
    with pytest.raises(IndexError):
        batch[3]


def test_frame_batch_index_is_an_integer_as_for_a_list() -> None:
    a, b = afunix.channel_pair()
    with a, b:
        a.send_many([b"zero", b"one", b"two"])
        batch = b.recv_batch()
        assert len(batch) == 3
        for i in NOT_INDEXES:
            for use in (batch.__getitem__, batch.fds):
                with pytest.raises(TypeError, match="FrameBatch indices must be integers"):
                    use(i)  # type: ignore[arg-type]
        assert bytes(batch[Two()]) == b"two"  # type: ignore[index]
        assert batch.fds(Two()) == []  # type: ignore[arg-type]
        with pytest.raises(IndexError):
            batch.fds(3)


@pytest.mark.parametrize("bad", [3.0, "3", None, 2**31])
def test_close_fds_checks_every_descriptor_before_closing_any(backend: str, bad: Any) -> None:
    """A bad item after good ones: one error, the same on both backends, and nothing closed."""
    r, w = os.pipe()
    try:
        with pytest.raises((TypeError, ValueError)) as info:
            afunix.close_fds([r, w, bad])
        os.fstat(r), os.fstat(w)  # both still open
        kind = TypeError if type(bad) is not int else ValueError
        assert type(info.value) is kind
    finally:
        os.close(r)
        os.close(w)
